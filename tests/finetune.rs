//! Fine-tuning the real MiniLM-L6 on a real task (`lang-id`, fortunes in six languages), saving
//! and reloading checkpoints, and the command line's handling of bad input.

mod common;

use std::path::{Path, PathBuf};

use common::{T, debian_dir, minilm_dir, read_model, run, write_file};
use symerge::backend::Cpu;
use symerge::data::{DEFAULT_MAX_CHARS, PrepareOptions, Task};
use symerge::model::{
    Bert, FinetuneOptions, LoadOptions, NewHead, SaveOptions, SequenceClassifier, TrainLength, finetune, predict,
};

/// Prepares `lang-id` under `dir` and returns its folder (train/validation/test.jsonl, labels.json).
fn lang_id(dir: &Path) -> PathBuf {
    let opts = PrepareOptions {
        source: debian_dir(),
        out: dir.to_path_buf(),
        max_chars: DEFAULT_MAX_CHARS,
        max_per_class: None,
    };
    symerge::data::prepare(Task::LangId, &opts).unwrap().dir
}

/// The first `n` lines of `src`, written to `dst`.
fn head(src: &Path, dst: &Path, n: usize) -> PathBuf {
    let text = std::fs::read_to_string(src).unwrap();
    let lines: Vec<&str> = text.lines().take(n).collect();
    std::fs::write(dst, lines.join("\n") + "\n").unwrap();
    dst.to_path_buf()
}

/// Names of everything in `dir`, hidden staging directories included.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn fine_tuning_minilm_learns_lang_id() {
    let tmp = tempfile::tempdir().unwrap();
    let task = lang_id(tmp.path());
    let val = head(&task.join("validation.jsonl"), &tmp.path().join("val.jsonl"), 200);
    let out = tmp.path().join("expert");
    let opts = FinetuneOptions {
        length: TrainLength::steps(30),
        batch_size: 16,
        head_lr: Some(1e-3),
        max_len: 24,
        max_examples: Some(2000),
        eval: Some(val.clone()),
        eval_before: true,
        ..FinetuneOptions::new(task.join("train.jsonl"), &out)
    };
    let s = finetune(Cpu, &minilm_dir(), &opts).unwrap();
    let before = s.eval_before.as_ref().unwrap().accuracy;
    let after = s.eval.as_ref().unwrap().accuracy;
    let first = s.losses[..10].iter().sum::<f32>() / 10.0;
    let last = s.losses[s.losses.len() - 10..].iter().sum::<f32>() / 10.0;
    eprintln!(
        "lang-id, 30 steps x 16, max-len 24: accuracy {before:.3} -> {after:.3}, loss {first:.3} -> {last:.3}, training {:.1}s, run {:.1}s",
        s.train_seconds, s.seconds
    );
    // Six classes: chance is about 1/6. Measured: 0.19 before, 0.935 after (loss 1.65 -> 0.54).
    assert!(before < 0.35, "the untrained head should be near chance, got {before}");
    assert!(after > 0.75, "accuracy after 30 steps: {after}");
    assert!(after - before > 0.4, "accuracy {before} -> {after}");
    assert!(last < first * 0.8, "mean loss of the last 10 steps {last} vs the first 10 {first}");
    assert_eq!((s.steps, s.losses.len(), s.train_examples), (30, 30, 2000));
    assert_eq!(s.labels, ["en", "de", "it", "pl", "cs", "eo"], "class names from labels.json, in id order");

    // A Hugging Face classifier checkpoint with the class names.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "BertForSequenceClassification");
    assert_eq!(cfg["num_labels"], 6);
    assert_eq!(cfg["id2label"]["5"], "eo");
    assert_eq!(cfg["label2id"]["pl"], 3);
    assert_eq!(cfg["torch_dtype"], "float32");
    assert_eq!(cfg["hidden_size"], 384, "the base config is kept");
    let tensors = read_model(&out);
    assert_eq!(tensors["classifier.weight"].1, [6, 384]);
    assert!(
        tensors.contains_key("bert.pooler.dense.weight")
            && tensors.contains_key("bert.encoder.layer.5.output.dense.bias")
    );
    assert_eq!(tensors.len(), 105, "103 float tensors of the encoder and pooler + the classifier's 2");
    let base = read_model(&minilm_dir());
    let name = "encoder.layer.2.attention.self.query.weight";
    assert_ne!(tensors[&format!("bert.{name}")].2, base[name].2, "the encoder was trained too");
    for f in ["tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"] {
        assert_eq!(std::fs::read(out.join(f)).unwrap(), std::fs::read(minilm_dir().join(f)).unwrap(), "{f}");
    }
    assert!(!out.join("modules.json").exists(), "sentence-transformers files are not copied");

    // `symerge eval` reads it back (label names through label2id) and scores it the same.
    let (ok, stdout, err) = run(&[
        "eval",
        out.to_str().unwrap(),
        "--inputs",
        val.to_str().unwrap(),
        "--max-len",
        "24",
        "--json",
        "--batch-size",
        "64",
    ]);
    assert!(ok, "{err}");
    let r: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(r["accuracy"].as_f64().unwrap(), after);
    // Identical logits after reloading, in batches of finetune's 64 (the products' blocking, so
    // the last bits, depend on a batch's size); the tolerance only covers the JSON round trip.
    let ce = s.eval.as_ref().unwrap().mean_ce;
    assert!((r["mean_ce"].as_f64().unwrap() - ce).abs() < 1e-12, "{} vs {ce}", r["mean_ce"]);
}

#[test]
fn same_seed_same_weights_through_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let task = lang_id(tmp.path());
    let train = task.join("train.jsonl").to_str().unwrap().to_string();
    let val = head(&task.join("validation.jsonl"), &tmp.path().join("val.jsonl"), 16);
    let go = |name: &str, seed: &str| {
        let out = tmp.path().join(name);
        let (ok, stdout, err) = run(&[
            "finetune",
            minilm_dir().to_str().unwrap(),
            "--train",
            &train,
            "-o",
            out.to_str().unwrap(),
            "--steps",
            "3",
            "--batch-size",
            "8",
            "--max-len",
            "16",
            "--max-examples",
            "64",
            "--head-lr",
            "1e-3",
            "--seed",
            seed,
            "--eval",
            val.to_str().unwrap(),
            "--json",
        ]);
        assert!(ok, "{err}");
        assert!(err.contains("step 3/3"), "the loss is logged: {err}");
        let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(v["steps"], 3);
        assert!(v["final_loss"].as_f64().unwrap().is_finite());
        assert!((0.0..=1.0).contains(&v["eval"]["accuracy"].as_f64().unwrap()));
        assert!(v["seconds"].as_f64().unwrap() > 0.0);
        std::fs::read(out.join("model.safetensors")).unwrap()
    };
    let a = go("a", "0");
    let b = go("b", "0");
    let c = go("c", "1");
    assert!(a == b, "the same seed gives bit-identical weights");
    assert!(a != c, "another seed gives other weights");
}

#[test]
fn save_and_load_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let head = LoadOptions { new_head: Some(NewHead { num_labels: 3, seed: 7 }) };
    let clf = SequenceClassifier::load(Cpu, &minilm_dir(), 64, head).unwrap();
    let texts = ["The quick brown fox.", "Der schnelle braune Fuchs springt.", "a"];
    let want = predict(&clf, &texts, 2).unwrap();

    let out = tmp.path().join("saved");
    let labels = Some(vec!["x".to_string(), "y".into(), "z".into()]);
    let saved = clf.model.save(&out, &SaveOptions { labels: labels.clone(), ..SaveOptions::default() }).unwrap();
    assert_eq!((saved.tensors, saved.params), (105, 22_713_216 + 3 * 384 + 3));
    let back = SequenceClassifier::load(Cpu, &out, 64, LoadOptions::default()).unwrap();
    assert_eq!(back.model.num_labels(), Some(3));
    let logits = |p: Vec<symerge::model::classify::Prediction>| p.into_iter().map(|p| p.logits).collect::<Vec<_>>();
    let got = predict(&back, &texts, 2).unwrap();
    assert_eq!(logits(got.clone()), logits(want.clone()), "identical logits after a float32 round trip");
    // The saved model names its classes, so predictions carry them.
    assert_eq!(got.iter().map(|p| p.label.as_deref()).collect::<Vec<_>>(), [Some("x"); 3]);
    assert_eq!(back.label2id().unwrap()["z"], 2);

    // Refuses to overwrite without force; the existing output is left alone.
    let e = clf.model.save(&out, &SaveOptions::default()).unwrap_err();
    assert!(e.to_string().contains("--force"), "{e}");
    assert!(out.join("model.safetensors").is_file());

    // bfloat16 with force: replaced, smaller, close logits.
    let opts = SaveOptions { dtype: symerge::checkpoint::FloatDType::BF16, labels, force: true };
    let saved = clf.model.save(&out, &opts).unwrap();
    assert!(saved.bytes < 50_000_000, "{}", saved.bytes);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    let back = SequenceClassifier::load(Cpu, &out, 64, LoadOptions::default()).unwrap();
    for (p, q) in predict(&back, &texts, 2).unwrap().iter().zip(&want) {
        for (a, b) in p.probs.iter().zip(&q.probs) {
            assert!((a - b).abs() < 0.05, "{a} vs {b}");
        }
    }
    assert_eq!(entries(tmp.path()), ["saved"], "no staging directory left behind");

    // A bare encoder is written as a BertModel without prefixes and reads back the same.
    let bare = Bert::load(Cpu, &minilm_dir(), LoadOptions::default()).unwrap();
    let enc = tmp.path().join("encoder");
    bare.save(&enc, &SaveOptions::default()).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(enc.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "BertModel");
    let (orig, copy) = (read_model(&minilm_dir()), read_model(&enc));
    // The encoder's float tensors: not the position_ids buffer, which is no weight, nor the pooler,
    // which a model loaded without a head does not hold.
    assert_eq!(copy.len(), 101);
    for (name, t) in &copy {
        assert_eq!(t, &orig[name], "{name}");
    }
}

#[test]
fn bad_input_is_reported_and_leaves_no_output() {
    let tmp = tempfile::tempdir().unwrap();
    let base = minilm_dir();
    let base = base.to_str().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let outs = tmp.path().join("outs");
    std::fs::create_dir_all(&outs).unwrap();
    let out = outs.join("model");
    let out_s = out.to_str().unwrap();

    // An empty training file.
    let empty = data.join("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    let (ok, _, err) = run(&["finetune", base, "--train", empty.to_str().unwrap(), "-o", out_s, "--steps", "1"]);
    assert!(!ok && err.contains("no records") && err.contains("empty.jsonl"), "{err}");

    // A label that labels.json (found beside the training file) does not list.
    std::fs::write(data.join("labels.json"), r#"{"labels": ["pos", "neg"]}"#).unwrap();
    let train = data.join("train.jsonl");
    std::fs::write(&train, "{\"text\": \"good\", \"label\": \"pos\"}\n{\"text\": \"meh\", \"label\": \"neutral\"}\n")
        .unwrap();
    let (ok, _, err) = run(&["finetune", base, "--train", train.to_str().unwrap(), "-o", out_s, "--steps", "1"]);
    assert!(
        !ok && err.contains("train.jsonl: line 2") && err.contains("`neutral`") && err.contains("pos, neg"),
        "{err}"
    );
    // ... named as the labels file's classes, not the training set's (fuzzing round 5).
    let labels_json = data.join("labels.json");
    assert!(err.contains(&format!("classes in the labels file {}", labels_json.display())), "{err}");

    // A bad label in the evaluation file is caught before any training.
    std::fs::write(&train, "{\"text\": \"good\", \"label\": \"pos\"}\n{\"text\": \"bad\", \"label\": \"neg\"}\n")
        .unwrap();
    let eval = data.join("eval.jsonl");
    std::fs::write(&eval, "{\"text\": \"so so\", \"label\": 7}\n").unwrap();
    let args = ["finetune", base, "--train", train.to_str().unwrap(), "-o", out_s, "--steps", "1", "--max-len", "8"];
    let (ok, _, err) = run(&[&args[..], &["--eval", eval.to_str().unwrap()]].concat());
    assert!(!ok && err.contains("eval.jsonl: line 1") && err.contains("outside the model's 2 classes"), "{err}");
    assert!(!err.contains("step 1/1"), "no training ran: {err}");
    assert!(entries(&outs).is_empty(), "nothing written: {:?}", entries(&outs));

    // An explicit labels file that is not one.
    let bogus = data.join("bogus.json");
    std::fs::write(&bogus, r#"{"labels": "pos"}"#).unwrap();
    let (ok, _, err) = run(&[&args[..], &["--labels", bogus.to_str().unwrap()]].concat());
    assert!(!ok && err.contains("bogus.json"), "{err}");

    // The output exists: refused without --force, before any training, and (symerge did not
    // write it, so --force would not replace it either) without suggesting --force.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let (ok, _, err) = run(&args);
    assert!(!ok && err.contains("was not written by symerge") && !err.contains("pass --force"), "{err}");
    assert!(!err.contains("step 1/1"), "no training ran: {err}");
    assert_eq!(entries(&outs), ["model"]);
    assert_eq!(std::fs::read_to_string(out.join("keep.txt")).unwrap(), "mine");
    // With --force too: symerge did not write it, so it is not deleted, and no training runs.
    let by_epochs =
        ["finetune", base, "--train", train.to_str().unwrap(), "-o", out_s, "--epochs", "2", "--max-len", "8"];
    let (ok, _, err) = run(&[&by_epochs[..], &["--force", "--json"]].concat());
    assert!(!ok && err.contains("was not written by symerge") && err.contains(out_s), "{err}");
    assert!(!err.contains("step 1/"), "no training ran: {err}");
    assert_eq!(entries(&outs), ["model"]);
    assert_eq!(std::fs::read_to_string(out.join("keep.txt")).unwrap(), "mine");
    // Emptied, it is replaced; by epochs here: two examples in batches of 16 are one step an epoch.
    std::fs::remove_file(out.join("keep.txt")).unwrap();
    let (ok, stdout, err) = run(&[&by_epochs[..], &["--force", "--json"]].concat());
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!((v["steps"].as_u64(), v["epochs"].as_f64()), (Some(2), Some(2.0)));
    assert!(out.join("model.safetensors").is_file() && out.join(".symerge-output").is_file());
    assert_eq!(entries(&outs), ["model"], "no staging directory left behind");
    // A symerge output is replaced by the next --force run.
    let first = std::fs::read(out.join("model.safetensors")).unwrap();
    let (ok, _, err) = run(&[&args[..], &["--force"]].concat());
    assert!(ok, "{err}");
    assert_ne!(std::fs::read(out.join("model.safetensors")).unwrap(), first, "one step, not two: other weights");
    assert_eq!(entries(&outs), ["model"], "no staging directory left behind");
}

/// Fuzzing round 4: `finetune --dtype float16` narrowed a weight of 1e6 (row 1 of the token-type
/// table, which single-segment texts never read) to inf and reported success; merge refuses the
/// same overflow. Now it is refused, naming the tensor, element and a wider dtype, and nothing is
/// written.
#[test]
fn finetune_refuses_a_dtype_too_narrow_for_a_weight() {
    let tmp = tempfile::tempdir().unwrap();
    let base = common::adapt_fixture::make_expert(&tmp.path().join("base"), 1, 2);
    let name = "bert.embeddings.token_type_embeddings.weight";
    let mut tensors: Vec<T> = read_model(&base).into_iter().map(|(n, (d, s, v))| T::new(&n, d, &s, v)).collect();
    tensors.iter_mut().find(|t| t.name == name).unwrap().values[384] = 1e6;
    write_file(&base.join("model.safetensors"), &tensors);
    let lines: String = common::adapt_fixture::TEXTS[..6]
        .iter()
        .enumerate()
        .map(|(i, t)| format!("{}\n", serde_json::json!({"text": t, "label": format!("class-{}", i % 2)})))
        .collect();
    let train = tmp.path().join("train.jsonl");
    std::fs::write(&train, lines).unwrap();
    let out = tmp.path().join("ft16");
    let args = ["finetune", base.to_str().unwrap(), "--train", train.to_str().unwrap(), "-o", out.to_str().unwrap()];
    let (ok, _, err) = run(&[&args[..], &["--steps", "1", "--max-len", "16", "--dtype", "float16"]].concat());
    assert!(!ok, "an f16 overflow was written");
    for want in [&format!("`{name}`"), "element 384", "overflows", "float16", "65504", "bfloat16"] {
        assert!(err.contains(want), "{want:?} not in: {err}");
    }
    assert!(!out.exists(), "a failed save left its output");
}
