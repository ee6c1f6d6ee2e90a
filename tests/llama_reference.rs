//! The Llama family against Hugging Face transformers on tiny seeded models (Llama with GQA, Llama
//! with linear RoPE scaling and biases, Mistral with head_dim != hidden / heads, Qwen2 with q/k/v
//! biases and tied embeddings): logits on real positions, the mean next-token loss and its
//! gradient for every tensor of decoder layer 1 and the final norm, from fixtures that
//! `tests/reference/make_llama_fixtures.py` writes (it needs torch). Also `symerge eval`'s
//! perplexity against the reference. Without the fixtures the tests say SKIPPED.

mod common;

use std::path::{Path, PathBuf};

use common::reference::{max_rel, read};
use common::run;
use symerge::backend::{Backend, Cpu};
use symerge::model::{CausalLm, Encoded, Llama, LlamaFamily, evaluate_lm};

/// Relative tolerance: max |ours - reference| / max |reference|, per tensor.
const TOL: f64 = 1e-4;

/// The fixture directory, or `None` after saying the test is skipped.
fn fixture(name: &str) -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    if dir.join("reference.safetensors").is_file() {
        Some(dir)
    } else {
        let msg = format!("SKIPPED: {} missing; generate with tests/reference/make_llama_fixtures.py\n", dir.display());
        print!("{msg}");
        let _ = std::io::Write::write_all(&mut std::io::stderr(), msg.as_bytes());
        None
    }
}

/// Checks one model; returns (logits, loss, worst gradient) relative errors.
fn check_model(name: &str, family: LlamaFamily) -> Option<(f64, f64, f64)> {
    let dir = fixture(name)?;
    let (t, meta) = read(&dir.join("reference.safetensors"));
    let model = Llama::load(Cpu, &dir).unwrap();
    assert_eq!(model.config.family, family);
    let (shape, ids) = &t["input_ids"];
    let (n, seq) = (shape[0], shape[1]);
    let enc = Encoded {
        batch: n,
        seq,
        input_ids: ids.iter().map(|&v| v as u32).collect(),
        token_type_ids: vec![0; n * seq],
        attention_mask: t["attention_mask"].1.iter().map(|&v| v as u32).collect(),
    };
    let batch = model.batch(&enc).unwrap();
    let vocab = model.config.vocab_size;
    // Logits come packed: the real tokens' rows only, in order.
    let real = model.logits(&batch).unwrap();
    assert_eq!(real.len(), enc.attention_mask.iter().filter(|&&m| m != 0).count() * vocab);
    let e_logits = max_rel(&real, &t["logits"].1);
    let (loss, grads) = model.lm_loss_grads(&batch).unwrap();
    let e_loss = max_rel(&[loss], &t["loss"].1);
    assert!(
        e_logits < TOL && e_loss < TOL,
        "{name}: logits {e_logits:e}, loss {e_loss:e} ({loss} vs {})",
        t["loss"].1[0]
    );
    assert!((model.lm_loss(&batch).unwrap() - loss).abs() <= 1e-6 * loss.abs(), "{name}: lm_loss differs");

    let grads = model.total_grads(grads).unwrap();
    let layer = format!("model.layers.{}.", meta["layer"]);
    let want: Vec<&String> = grads.keys().filter(|k| k.starts_with(&layer)).collect();
    let mut checked = 0;
    let mut worst = 0f64;
    for (key, (shape, reference)) in &t {
        let Some(tensor) = key.strip_prefix("grad.") else { continue };
        let g = grads.get(tensor).unwrap_or_else(|| panic!("{name}: no gradient for {tensor}"));
        assert_eq!(&g.shape, shape, "{name}: {tensor}");
        let e = max_rel(&g.buf, reference);
        worst = worst.max(e);
        assert!(e < TOL, "{name}: gradient of {tensor}: relative error {e:e}");
        checked += 1;
    }
    // Every tensor of the layer is in the reference, plus at least the final norm.
    assert!(want.iter().all(|k| t.contains_key(&format!("grad.{k}"))), "{name}: reference lacks some of {want:?}");
    assert!(checked > want.len(), "{name}: only {checked} gradients checked");
    println!("{name} vs transformers: logits {e_logits:.2e}, loss {e_loss:.2e}, {checked} gradients {worst:.2e}");
    Some((e_logits, e_loss, worst))
}

#[test]
fn llama_gqa_matches_transformers() {
    check_model("llama_gqa", LlamaFamily::Llama);
}

#[test]
fn llama_linear_rope_scaling_and_biases_match_transformers() {
    let Some(dir) = fixture("llama_scaled") else { return };
    let model = Llama::load(Cpu, &dir).unwrap();
    // The fixture's config uses the older rope_theta + rope_scaling fields.
    assert_eq!((model.config.rope_scale, model.config.qkv_bias, model.config.mlp_bias), (2.0, true, true));
    check_model("llama_scaled", LlamaFamily::Llama);
}

#[test]
fn mistral_matches_transformers() {
    let Some(dir) = fixture("mistral") else { return };
    let model = Llama::load(Cpu, &dir).unwrap();
    assert_eq!((model.config.head_dim, model.config.num_key_value_heads), (32, 1));
    check_model("mistral", LlamaFamily::Mistral);
}

#[test]
fn qwen2_matches_transformers() {
    let Some(dir) = fixture("qwen2") else { return };
    let model = Llama::load(Cpu, &dir).unwrap();
    assert!(model.config.tie_word_embeddings && model.config.qkv_bias && !model.config.o_bias);
    // Tied: the embedding's gradient in the reference is the sum of its two uses.
    check_model("qwen2", LlamaFamily::Qwen2);
}

#[test]
fn eval_perplexity_matches_transformers() {
    let Some(dir) = fixture("llama_gqa") else { return };
    let (t, meta) = read(&dir.join("reference.safetensors"));
    let texts: Vec<String> = serde_json::from_str(&meta["eval_texts"]).unwrap();
    let tokens: usize = meta["eval_tokens"].parse().unwrap();
    let want = t["eval_loss"].1[0];

    // The library, with batches of two (so texts of different lengths share a padded batch).
    let lm = CausalLm::<Cpu>::load(Cpu, &dir, 128).unwrap();
    let report = evaluate_lm(&lm, &texts, 2).unwrap();
    assert_eq!((report.texts, report.tokens), (texts.len(), tokens));
    let e = (report.mean_loss - want).abs() / want;
    assert!(e < TOL, "mean loss {} vs {want} (rel {e:e})", report.mean_loss);
    assert!((report.perplexity - want.exp()).abs() / want.exp() < 2.0 * TOL);

    // Top-1 accuracy, counted here text by text (no padding) with an argmax of our own.
    let (mut hits, mut n, v) = (0usize, 0usize, lm.model.config.vocab_size);
    for toks in lm.tokenizer.tokenize(&texts).unwrap() {
        let batch = lm.model.batch(&lm.tokenizer.pad(&[&toks])).unwrap();
        let z = Cpu.download(&lm.model.logits(&batch).unwrap()).unwrap();
        for (row, next) in z.chunks(v).zip(&toks.ids[1..]) {
            let best = (0..v).fold(0, |b, j| if row[j] > row[b] { j } else { b });
            hits += usize::from(best == *next as usize);
            n += 1;
        }
    }
    assert_eq!(n, tokens);
    assert!(hits > 0, "a seeded model that never predicts a token makes this check empty");
    assert_eq!(report.top1_accuracy, hits as f64 / n as f64);

    // The command line.
    let tmp = tempfile::tempdir().unwrap();
    let inputs = tmp.path().join("texts.jsonl");
    let lines: Vec<String> = texts.iter().map(|s| serde_json::json!({ "text": s }).to_string()).collect();
    std::fs::write(&inputs, lines.join("\n") + "\n").unwrap();
    let (ok, out, err) =
        run(&["eval", dir.to_str().unwrap(), "--inputs", inputs.to_str().unwrap(), "--json", "--batch-size", "3"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let cli_loss = v["mean_loss"].as_f64().unwrap();
    assert!((cli_loss - want).abs() / want < TOL, "{out}");
    assert_eq!(v["tokens"].as_u64(), Some(tokens as u64));
    assert_eq!(v["top1_accuracy"].as_f64(), Some(report.top1_accuracy));
    let (ok, out, err) = run(&["eval", dir.to_str().unwrap(), "--inputs", inputs.to_str().unwrap()]);
    assert!(ok && out.starts_with("perplexity "), "{out}{err}");
    println!("eval vs transformers: mean loss rel error {e:.2e}; {}", out.trim());

    let preds = tmp.path().join("preds.jsonl");
    let (ok, _, err) = run(&[
        "predict",
        dir.to_str().unwrap(),
        "--inputs",
        inputs.to_str().unwrap(),
        "--out",
        preds.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("is a causal LM") && err.contains("symerge eval"), "{err}");
    assert!(!preds.exists());
}
