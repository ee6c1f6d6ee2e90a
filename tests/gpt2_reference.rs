//! GPT-2, the third model family, against Hugging Face transformers on tiny seeded models (as
//! released: gelu_new and tied embeddings; and with an untied head, exact GELU and a narrower
//! MLP): logits on real positions, the mean next-token loss and its gradient for every tensor of
//! block 1, the final LayerNorm and both tables, from fixtures that
//! `tests/reference/make_gpt2_fixtures.py` writes (it needs torch). Also: OpenAI's bare tensor
//! names, saving, `symerge eval`'s perplexity, and the config fields it refuses. Without the
//! fixtures the tests say SKIPPED.

mod common;

use std::path::{Path, PathBuf};

use common::reference::{max_rel, read};
use common::{T, from_bytes, run, write_file};
use safetensors::SafeTensors;
use symerge::backend::{Backend, Cpu};
use symerge::model::{CausalLm, Encoded, Gpt2, Gpt2Config, LmBatch, LmConfig, evaluate_lm};

/// Relative tolerance: max |ours - reference| / max |reference|, per tensor.
const TOL: f64 = 1e-4;

/// The fixture directory, or `None` after saying the test is skipped.
fn fixture(name: &str) -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    if dir.join("reference.safetensors").is_file() {
        Some(dir)
    } else {
        let msg = format!("SKIPPED: {} missing; generate with tests/reference/make_gpt2_fixtures.py\n", dir.display());
        print!("{msg}");
        let _ = std::io::Write::write_all(&mut std::io::stderr(), msg.as_bytes());
        None
    }
}

/// The fixture's batch of three right-padded sequences.
fn reference_batch(model: &Gpt2<Cpu>, t: &common::reference::Tensors) -> (Encoded, LmBatch<Cpu>) {
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
    (enc, batch)
}

/// Checks one model against its reference: logits, loss and every reference gradient.
fn check_model(name: &str) -> Option<()> {
    let dir = fixture(name)?;
    let (t, meta) = read(&dir.join("reference.safetensors"));
    let model = Gpt2::load(Cpu, &dir).unwrap();
    let (enc, batch) = reference_batch(&model, &t);
    let vocab = model.config.vocab_size;
    let real = model.logits(&batch).unwrap();
    assert_eq!(real.len(), enc.attention_mask.iter().filter(|&&m| m != 0).count() * vocab);
    let e_logits = max_rel(&real, &t["logits"].1);
    let (loss, grads) = model.lm_loss_grads(&batch).unwrap();
    let e_loss = max_rel(&[loss], &t["loss"].1);
    assert!(e_logits < TOL && e_loss < TOL, "{name}: logits {e_logits:e}, loss {e_loss:e}");

    let grads = model.total_grads(grads).unwrap();
    let layer = format!("transformer.h.{}.", meta["layer"]);
    let in_layer: Vec<&String> = grads.keys().filter(|k| k.starts_with(&layer)).collect();
    assert_eq!(in_layer.len(), 12, "{name}: a block has 12 tensors: {in_layer:?}");
    let (mut checked, mut worst) = (0, 0f64);
    for (key, (shape, reference)) in &t {
        let Some(tensor) = key.strip_prefix("grad.") else { continue };
        let g = grads.get(tensor).unwrap_or_else(|| panic!("{name}: no gradient for {tensor}"));
        assert_eq!(&g.shape, shape, "{name}: {tensor}");
        let e = max_rel(&g.buf, reference);
        worst = worst.max(e);
        assert!(e < TOL, "{name}: gradient of {tensor}: relative error {e:e}");
        checked += 1;
    }
    assert!(in_layer.iter().all(|k| t.contains_key(&format!("grad.{k}"))), "{name}: reference lacks some of the block");
    // The block, ln_f (2), wte and wpe, and lm_head when untied.
    let want = 12 + 4 + usize::from(!model.config.tie_word_embeddings);
    assert_eq!(checked, want, "{name}: gradients checked");
    println!("{name} vs transformers: logits {e_logits:.2e}, loss {e_loss:.2e}, {checked} gradients {worst:.2e}");
    Some(())
}

#[test]
fn gpt2_matches_transformers() {
    let Some(dir) = fixture("gpt2") else { return };
    let model = Gpt2::load(Cpu, &dir).unwrap();
    let c = &model.config;
    assert!(c.tie_word_embeddings && c.n_inner == 4 * c.n_embd, "{c:?}");
    check_model("gpt2");
}

#[test]
fn gpt2_untied_with_exact_gelu_matches_transformers() {
    let Some(dir) = fixture("gpt2_untied") else { return };
    let model = Gpt2::load(Cpu, &dir).unwrap();
    let c = &model.config;
    assert!(!c.tie_word_embeddings && c.n_inner == 96 && c.layer_norm_epsilon == 1e-6, "{c:?}");
    check_model("gpt2_untied");
}

/// The fixture's weights under OpenAI's bare `GPT2Model` names (no `transformer.`), written to
/// `dir` with its config and tokenizer.
fn bare_copy(src: &Path, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let data = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&data).unwrap();
    let tensors: Vec<T> = st
        .tensors()
        .into_iter()
        .map(|(name, v)| {
            let bare = name.strip_prefix("transformer.").unwrap_or(&name).to_string();
            T::new(&bare, v.dtype(), v.shape(), from_bytes(v.dtype(), v.data()))
        })
        .collect();
    write_file(&dir.join("model.safetensors"), &tensors);
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
}

#[test]
fn bare_names_load_and_save_as_they_are() {
    let Some(dir) = fixture("gpt2") else { return };
    let (t, _) = read(&dir.join("reference.safetensors"));
    let tmp = tempfile::tempdir().unwrap();
    let bare = tmp.path().join("bare");
    bare_copy(&dir, &bare);
    let ours = Gpt2::load(Cpu, &dir).unwrap();
    let model = Gpt2::load(Cpu, &bare).unwrap();
    let (_, batch) = reference_batch(&model, &t);
    assert_eq!(model.logits(&batch).unwrap(), ours.logits(&batch).unwrap());
    assert!(model.param("wte.weight").is_some() && model.param("transformer.wte.weight").is_none());

    // Saved: the same names, the same values (f32 holds bf16 exactly), the tied table once.
    let saved = tmp.path().join("saved");
    model.save(&saved, false).unwrap();
    let data = std::fs::read(saved.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&data).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let src = std::fs::read(bare.join("model.safetensors")).unwrap();
    let mut want: Vec<String> = SafeTensors::deserialize(&src).unwrap().names().into_iter().map(String::from).collect();
    want.sort();
    assert_eq!(names, want);
    let again = Gpt2::load(Cpu, &saved).unwrap();
    assert_eq!(again.logits(&batch).unwrap(), ours.logits(&batch).unwrap());
    assert!(saved.join("tokenizer.json").is_file());
}

#[test]
fn config_fields_that_change_the_math_are_refused() {
    let Some(dir) = fixture("gpt2") else { return };
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert!(Gpt2Config::detects(&cfg));
    let path = Path::new("m/config.json");
    for (field, value, says) in [
        ("scale_attn_by_inverse_layer_idx", serde_json::json!(true), "scale_attn_by_inverse_layer_idx"),
        ("scale_attn_weights", serde_json::json!(false), "scale_attn_weights"),
        ("activation_function", serde_json::json!("relu"), "`relu` is not supported"),
        ("add_cross_attention", serde_json::json!(true), "cross-attention"),
        ("n_head", serde_json::json!(5), "not a multiple of n_head"),
        ("n_embd", serde_json::json!(0), "n_embd"),
    ] {
        let mut v = cfg.clone();
        v[field] = value;
        let e = Gpt2Config::from_json(&v, path).unwrap_err().to_string();
        assert!(e.contains(says) && e.contains("m/config.json"), "{field}: {e}");
    }
    let mut v = cfg.clone();
    v["model_type"] = "llama".into();
    assert!(!Gpt2Config::detects(&v));
    assert!(Gpt2Config::from_json(&v, path).unwrap_err().to_string().contains("is not GPT-2"));

    // Longer than the position table: refused with the limit, at load and per batch.
    let model = Gpt2::load(Cpu, &dir).unwrap();
    let n = model.config.n_positions + 1;
    let enc =
        Encoded { batch: 1, seq: n, input_ids: vec![3; n], token_type_ids: vec![0; n], attention_mask: vec![1; n] };
    let e = model.batch(&enc).err().unwrap().to_string();
    assert!(e.contains("position table (n_positions) of 128 tokens"), "{e}");
    let e = CausalLm::<Cpu, Gpt2Config>::load(Cpu, &dir, n).err().unwrap().to_string();
    assert!(e.contains("maximum length 129 exceeds the position table"), "{e}");
}

#[test]
fn eval_perplexity_matches_transformers() {
    let Some(dir) = fixture("gpt2") else { return };
    let (t, meta) = read(&dir.join("reference.safetensors"));
    let texts: Vec<String> = serde_json::from_str(&meta["eval_texts"]).unwrap();
    let tokens: usize = meta["eval_tokens"].parse().unwrap();
    let want = t["eval_loss"].1[0];
    let lm = CausalLm::<Cpu, Gpt2Config>::load(Cpu, &dir, 128).unwrap();
    let report = evaluate_lm(&lm, &texts, 2).unwrap();
    assert_eq!((report.texts, report.tokens), (texts.len(), tokens));
    let e = (report.mean_loss - want).abs() / want;
    assert!(e < TOL, "mean loss {} vs {want} (rel {e:e})", report.mean_loss);

    // The command line picks the family from config.json.
    let tmp = tempfile::tempdir().unwrap();
    let inputs = tmp.path().join("texts.jsonl");
    let lines: Vec<String> = texts.iter().map(|s| serde_json::json!({ "text": s }).to_string()).collect();
    std::fs::write(&inputs, lines.join("\n") + "\n").unwrap();
    let (ok, out, err) =
        run(&["eval", dir.to_str().unwrap(), "--inputs", inputs.to_str().unwrap(), "--json", "--batch-size", "3"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!((v["mean_loss"].as_f64().unwrap() - want).abs() / want < TOL, "{out}");
    assert_eq!(v["top1_accuracy"].as_f64(), Some(report.top1_accuracy));
    let first =
        Cpu.download(&lm.model.logits(&lm.model.batch(&lm.tokenizer.encode(&texts[..1]).unwrap()).unwrap()).unwrap());
    assert!(first.unwrap().iter().all(|v| v.is_finite()));
}
