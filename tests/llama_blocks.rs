//! Llama-family blocks on tiny random checkpoints written to disk: finite-difference checks of a
//! decoder layer, the head and the whole model's next-token loss (untied GQA Llama with linear
//! RoPE scaling, and Qwen2 with biases and tied embeddings), padding and batching invariance, and
//! configs or inputs we refuse with an error naming the field.

mod common;

use std::path::Path;

use common::grad::{check, check_extrapolated, dot, rand_f32};
use common::reference::rel_diff;
use common::{T, randoms, write_file};
use safetensors::Dtype;
use symerge::backend::Cpu;
use symerge::checkpoint::FloatDType;
use symerge::checkpoint::generate::{SyntheticSpec, Variant, write_model};
use symerge::model::chain::{HeadPart, LayerPart, PartTensors};
use symerge::model::llama::DecoderLayer;
use symerge::model::{Encoded, Llama, LlamaBlock, Param, Params};

const HIDDEN: usize = 16;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 4;
const INTER: usize = 24;
const VOCAB: usize = 30;

/// Writes a tiny two-layer checkpoint: `qwen2` gives q/k/v biases and tied embeddings, otherwise a
/// Llama with an untied lm_head and linear RoPE scaling (factor 2).
fn tiny(dir: &Path, qwen2: bool) -> serde_json::Value {
    std::fs::create_dir_all(dir).unwrap();
    let mut ts = Vec::new();
    let mut seed = 300;
    let mut add = |name: String, shape: &[usize], scale: f64, shift: f64| {
        seed += 1;
        let n = shape.iter().product();
        let vals = randoms(seed, n, scale).into_iter().map(|v| v + shift).collect();
        ts.push(T::new(&name, Dtype::F32, shape, vals));
    };
    let (h, q, kv) = (HIDDEN, HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    add("model.embed_tokens.weight".into(), &[VOCAB, h], 1.0, 0.0);
    for l in 0..2 {
        let p = format!("model.layers.{l}");
        add(format!("{p}.input_layernorm.weight"), &[h], 0.3, 1.0);
        for (rel, shape) in [("q_proj", [q, h]), ("k_proj", [kv, h]), ("v_proj", [kv, h]), ("o_proj", [h, q])] {
            add(format!("{p}.self_attn.{rel}.weight"), &shape, 0.35, 0.0);
            if qwen2 && rel != "o_proj" {
                add(format!("{p}.self_attn.{rel}.bias"), &shape[..1], 0.3, 0.0);
            }
        }
        add(format!("{p}.post_attention_layernorm.weight"), &[h], 0.3, 1.0);
        add(format!("{p}.mlp.gate_proj.weight"), &[INTER, h], 0.6, 0.0);
        add(format!("{p}.mlp.up_proj.weight"), &[INTER, h], 0.6, 0.0);
        add(format!("{p}.mlp.down_proj.weight"), &[h, INTER], 0.4, 0.0);
    }
    add("model.norm.weight".into(), &[h], 0.3, 1.0);
    if !qwen2 {
        add("lm_head.weight".into(), &[VOCAB, h], 0.5, 0.0);
    }
    write_file(&dir.join("model.safetensors"), &ts);
    let mut cfg = serde_json::json!({
        "model_type": if qwen2 { "qwen2" } else { "llama" },
        "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": 2,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "rms_norm_eps": 1e-5,
        "hidden_act": "silu", "tie_word_embeddings": qwen2,
    });
    if qwen2 {
        cfg["rope_theta"] = 1e6.into();
    } else {
        cfg["rope_scaling"] = serde_json::json!({"type": "linear", "factor": 2.0});
    }
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    cfg
}

/// Three sequences right-padded to 6: lengths 6, 4 and 2.
fn encoded(pad: u32) -> Encoded {
    let mask = vec![1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0];
    let ids = vec![3, 7, 11, 2, 19, 5, 4, 9, 28, 13, 0, 0, 8, 1, 0, 0, 0, 0];
    let input_ids = ids.iter().zip(&mask).map(|(&i, &m)| if m == 1 { i } else { pad }).collect();
    Encoded { batch: 3, seq: 6, input_ids, token_type_ids: vec![0; 18], attention_mask: mask }
}

fn to_params(names: &[(String, Vec<usize>)], values: &[Vec<f32>]) -> Params<Cpu> {
    names.iter().zip(values).map(|((n, s), v)| (n.clone(), Param { shape: s.clone(), buf: v.clone() })).collect()
}

fn values_of(p: &Params<Cpu>, names: &[(String, Vec<usize>)]) -> Vec<Vec<f32>> {
    names.iter().map(|(n, _)| p[n].buf.clone()).collect()
}

fn grads_of(g: &Params<Cpu>, names: &[(String, Vec<usize>)]) -> Vec<Option<Vec<f32>>> {
    names.iter().map(|(n, _)| Some(g.get(n).unwrap_or_else(|| panic!("no gradient for {n}")).buf.clone())).collect()
}

fn layer_case(qwen2: bool) {
    let tmp = tempfile::tempdir().unwrap();
    tiny(tmp.path(), qwen2);
    let model = Llama::load(Cpu, tmp.path()).unwrap();
    let batch = model.batch(&encoded(0)).unwrap();
    let LlamaBlock::Layer(layer) = &model.blocks[2] else { panic!("block 2 is not a layer") };
    let names = layer.param_shapes();
    assert_eq!(names.len(), if qwen2 { 12 } else { 9 });
    let x = rand_f32(7, batch.rows() * HIDDEN, 1.0);
    let r = rand_f32(8, batch.rows() * HIDDEN, 1.0);
    let (dx, g) = layer.backward(&Cpu, &model.params[2], &batch, &x, None, &r).unwrap();
    // Internals kept by the forward give the same gradients, bit for bit, without recomputing.
    let (y, kept) = layer.forward_keeping(&Cpu, &model.params[2], &batch, &x).unwrap();
    assert_eq!(y, layer.forward(&Cpu, &model.params[2], &batch, &x).unwrap());
    assert!(DecoderLayer::internals_len(&Cpu, &kept) > 4 * x.len(), "internals hold the layer's activations");
    let (dx2, g2) = layer.backward(&Cpu, &model.params[2], &batch, &x, Some(kept), &r).unwrap();
    assert_eq!(dx, dx2);
    assert!(g.iter().all(|(n, v)| v.buf == g2[n].buf) && g.len() == g2.len());
    assert_eq!(g.len(), names.len(), "one gradient per tensor");
    let mut inputs = vec![x];
    inputs.extend(values_of(&model.params[2], &names));
    let mut grads = vec![Some(dx)];
    grads.extend(grads_of(&g, &names));
    let f = |xs: &[Vec<f32>]| layer.forward(&Cpu, &to_params(&names, &xs[1..]), &batch, &xs[0]).unwrap();
    let name = if qwen2 { "qwen2 layer" } else { "llama layer" };
    check_extrapolated(name, &f, &inputs, &r, &grads, 1e-2, 1e-2);
}

#[test]
fn llama_layer_gradients_match_finite_differences() {
    layer_case(false);
}

#[test]
fn qwen2_layer_gradients_match_finite_differences() {
    layer_case(true);
}

#[test]
fn head_gradients_match_finite_differences() {
    let tmp = tempfile::tempdir().unwrap();
    tiny(tmp.path(), false);
    let model = Llama::load(Cpu, tmp.path()).unwrap();
    let batch = model.batch(&encoded(0)).unwrap();
    let last = model.blocks.len() - 1;
    let LlamaBlock::Head(head) = &model.blocks[last] else { panic!("last block is not the head") };
    let names = head.param_shapes();
    let x = rand_f32(12, batch.rows() * HIDDEN, 1.0);
    let r = rand_f32(13, batch.rows() * VOCAB, 1.0);
    let (dx, g) = head.backward(&Cpu, &model.params[last], &batch, &x, &r).unwrap();
    let mut inputs = vec![x];
    inputs.extend(values_of(&model.params[last], &names));
    let mut grads = vec![Some(dx)];
    grads.extend(grads_of(&g, &names));
    let f = |xs: &[Vec<f32>]| head.forward(&Cpu, &to_params(&names, &xs[1..]), &batch, &xs[0]).unwrap();
    check("lm head", &f, &inputs, &r, &grads, 3e-3, 1e-2);
}

/// The chained backward against finite differences (central, Richardson-extrapolated) of the
/// next-token loss along a random direction in every tensor (both copies of a tied embedding move
/// together).
fn whole_model_case(qwen2: bool) {
    let tmp = tempfile::tempdir().unwrap();
    tiny(tmp.path(), qwen2);
    let mut model = Llama::load(Cpu, tmp.path()).unwrap();
    let batch = model.batch(&encoded(0)).unwrap();
    // 5 + 3 + 1 next-token targets.
    assert_eq!(batch.labels, vec![7, 11, 2, 19, 5, 9, 28, 13, 1]);
    let (loss, grads) = model.lm_loss_grads(&batch).unwrap();
    assert!(loss.is_finite() && loss > 0.0);
    assert_eq!(grads.len(), model.blocks.len());
    let tied_in_head = grads.last().unwrap().contains_key("model.embed_tokens.weight");
    assert_eq!(tied_in_head, qwen2, "the head reports an embedding gradient exactly when tied");
    let total = model.total_grads(grads).unwrap();
    let eps = 1e-2f32;
    let mut worst = 0f64;
    for (i, (name, g)) in total.iter().enumerate() {
        let base = model.param(name).unwrap().buf.clone();
        let u = rand_f32(500 + i as u64, base.len(), 1.0);
        let an = dot(&g.buf, &u);
        let mut eval = |step: f32| {
            let v: Vec<f32> = base.iter().zip(&u).map(|(x, d)| x + step * d).collect();
            model.set_param(name, &v).unwrap();
            model.lm_loss(&batch).unwrap() as f64
        };
        let mut central = |h: f32| (eval(h) - eval(-h)) / (2.0 * h as f64);
        // Richardson: cancels the h^2 term of the central difference, which along directions
        // with a small first derivative (e.g. o_proj) dominates at any step f32 noise allows.
        let fd = (4.0 * central(eps / 2.0) - central(eps)) / 3.0;
        model.set_param(name, &base).unwrap();
        let rel = rel_diff(fd, an, 1e-4);
        worst = worst.max(rel);
        assert!(rel < 1e-2, "{name}: fd {fd:e} vs analytic {an:e} (rel {rel:.2e})");
    }
    eprintln!("{} whole model: {} tensors, max relative error {worst:.2e}", model.path.display(), total.len());
}

#[test]
fn whole_llama_loss_gradients_match_finite_differences() {
    whole_model_case(false);
}

#[test]
fn whole_qwen2_loss_gradients_match_finite_differences() {
    whole_model_case(true);
}

#[test]
fn padding_and_batching_do_not_change_real_logits() {
    let tmp = tempfile::tempdir().unwrap();
    tiny(tmp.path(), false);
    let model = Llama::load(Cpu, tmp.path()).unwrap();
    let enc = encoded(0);
    let batch = model.batch(&enc).unwrap();
    // Packed: the 12 real tokens only carry activations and logits.
    assert_eq!((batch.rows(), batch.batch * batch.seq), (12, 18));
    let logits = model.logits(&batch).unwrap();
    assert_eq!(logits.len(), 12 * VOCAB);
    // Other pad ids change no logit.
    assert_eq!(logits, model.logits(&model.batch(&encoded(17)).unwrap()).unwrap());
    // The second sequence alone, unpadded, gives the same logits (causal: later tokens and
    // padding are invisible).
    let single = Encoded {
        batch: 1,
        seq: 4,
        input_ids: enc.input_ids[6..10].to_vec(),
        token_type_ids: vec![0; 4],
        attention_mask: vec![1; 4],
    };
    let alone = model.logits(&model.batch(&single).unwrap()).unwrap();
    for (a, b) in logits[6 * VOCAB..10 * VOCAB].iter().zip(&alone) {
        assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
    }
    // A prefix's logits do not depend on what follows it.
    let prefix = Encoded { batch: 1, seq: 3, input_ids: enc.input_ids[..3].to_vec(), ..single.clone() };
    let prefix = Encoded { attention_mask: vec![1; 3], token_type_ids: vec![0; 3], ..prefix };
    let p = model.logits(&model.batch(&prefix).unwrap()).unwrap();
    for (a, b) in logits[..3 * VOCAB].iter().zip(&p) {
        assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
    }
}

#[test]
fn generated_llama_checkpoint_loads_and_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = SyntheticSpec::preset("llama-tiny", FloatDType::F32).unwrap();
    let dir = write_model(&spec, 3, Variant::Base, tmp.path(), 1 << 30).unwrap();
    let model = Llama::load(Cpu, &dir).unwrap();
    assert_eq!((model.config.num_attention_heads, model.config.num_key_value_heads), (4, 2));
    assert_eq!(model.blocks.len(), spec.layers + 2);
    let enc = Encoded {
        batch: 1,
        seq: 5,
        input_ids: vec![1, 2, 3, 4, 5],
        token_type_ids: vec![0; 5],
        attention_mask: vec![1; 5],
    };
    let loss = model.lm_loss(&model.batch(&enc).unwrap()).unwrap();
    assert!(loss.is_finite() && loss > 0.0, "{loss}");
}

#[test]
fn unsupported_configs_and_inputs_are_errors_naming_the_cause() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tiny(tmp.path(), false);
    let cfg_path = tmp.path().join("config.json");
    let load_with = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut v = good.clone();
        edit(&mut v);
        std::fs::write(&cfg_path, v.to_string()).unwrap();
        Llama::load(Cpu, tmp.path()).err().map(|e| e.to_string()).unwrap_or_default()
    };
    let e = load_with(&|v| v["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0}));
    assert!(e.contains("config.json") && e.contains("rope_scaling") && e.contains("`yarn`"), "{e}");
    let e = load_with(&|v| v["rope_scaling"] = serde_json::json!({"type": "linear"}));
    assert!(e.contains("needs a `factor`"), "{e}");
    let e = load_with(&|v| {
        v["rope_parameters"] = serde_json::json!({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})
    });
    assert!(e.contains("rope_parameters") && e.contains("`dynamic`"), "{e}");
    let e = load_with(&|v| v["hidden_act"] = "gelu".into());
    assert!(e.contains("hidden_act") && e.contains("gelu"), "{e}");
    let e = load_with(&|v| v["num_key_value_heads"] = 3.into());
    assert!(e.contains("not a multiple of num_key_value_heads 3"), "{e}");
    let e = load_with(&|v| v["rms_norm_eps"] = "small".into());
    assert!(e.contains("rms_norm_eps") && e.contains("positive number"), "{e}");
    let e = load_with(&|v| v["vocab_size"] = serde_json::Value::Null);
    assert!(e.contains("vocab_size"), "{e}");
    let e = load_with(&|v| v["model_type"] = "bert".into());
    assert!(e.contains("not a Llama-family causal LM") && e.contains("GPT-2 (gpt2)"), "{e}");
    // Missing tensors and wrong shapes name the tensor (and both shapes).
    let e = load_with(&|v| v["model_type"] = "qwen2".into());
    assert!(e.contains("model.layers.0.self_attn.q_proj.bias") && e.contains("missing"), "{e}");
    let e = load_with(&|v| v["intermediate_size"] = 20.into());
    assert!(
        e.contains("model.layers.0.mlp.gate_proj.weight") && e.contains("[24, 16]") && e.contains("[20, 16]"),
        "{e}"
    );
    let e = load_with(&|v| v["tie_word_embeddings"] = true.into());
    assert!(e.is_empty(), "tied loads even when lm_head.weight is present: {e}");
    // Another head named by `architectures` is not a causal LM, tied or not (fuzzing round 8:
    // with tied embeddings a sequence classifier ran as an LM, its `score` head dropped).
    for tied in [true, false] {
        let e = load_with(&|v| {
            v["architectures"] = serde_json::json!(["LlamaForSequenceClassification"]);
            v["tie_word_embeddings"] = tied.into();
        });
        assert!(e.contains("config.json") && e.contains("`LlamaForSequenceClassification` is not a causal LM"), "{e}");
    }
    let e = load_with(&|v| v["architectures"] = serde_json::json!(["LlamaForCausalLM"]));
    assert!(e.is_empty(), "{e}");

    let tied_dir = tmp.path().join("tied");
    let mut v = tiny(&tied_dir, true);
    v["tie_word_embeddings"] = false.into();
    std::fs::write(tied_dir.join("config.json"), v.to_string()).unwrap();
    let e = Llama::load(Cpu, &tied_dir).err().unwrap().to_string();
    assert!(e.contains("`lm_head.weight` is missing") && e.contains("tie_word_embeddings"), "{e}");

    std::fs::write(&cfg_path, good.to_string()).unwrap();
    let model = Llama::load(Cpu, tmp.path()).unwrap();
    let mut enc = encoded(0);
    enc.input_ids[4] = VOCAB as u32;
    let e = model.batch(&enc).err().unwrap().to_string();
    assert!(e.contains("token id 30 (sequence 0, position 4)"), "{e}");
    // Left padding would give real tokens the wrong positions.
    let mut enc = encoded(0);
    enc.attention_mask[12..18].copy_from_slice(&[0, 0, 0, 0, 1, 1]);
    let e = model.batch(&enc).err().unwrap().to_string();
    assert!(e.contains("sequence 2 is not right-padded"), "{e}");
    // One-token sequences have no targets.
    let one = Encoded { batch: 1, seq: 1, input_ids: vec![3], token_type_ids: vec![0], attention_mask: vec![1] };
    let e = model.lm_loss(&model.batch(&one).unwrap()).err().unwrap().to_string();
    assert!(e.contains("fewer than two tokens"), "{e}");

    // Mistral's sliding window: exact up to the window, refused beyond it.
    let mut v = good.clone();
    v["model_type"] = "mistral".into();
    v["sliding_window"] = 5.into();
    v.as_object_mut().unwrap().remove("rope_scaling");
    std::fs::write(&cfg_path, v.to_string()).unwrap();
    let model = Llama::load(Cpu, tmp.path()).unwrap();
    assert_eq!(model.config.sliding_window, Some(5));
    let e = model.batch(&encoded(0)).err().unwrap().to_string();
    assert!(e.contains("6 tokens exceed") && e.contains("sliding attention window of 5"), "{e}");
    let short = Encoded {
        batch: 1,
        seq: 5,
        input_ids: vec![1, 2, 3, 4, 5],
        token_type_ids: vec![0; 5],
        attention_mask: vec![1; 5],
    };
    assert!(model.batch(&short).is_ok());
}
