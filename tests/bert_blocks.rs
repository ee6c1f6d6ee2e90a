//! BERT blocks on tiny random checkpoints written to disk: loading (BERT and RoBERTa naming,
//! prefixes, new heads, errors), finite-difference gradient checks of every block and of the
//! whole chain, and padding that must not leak into real tokens.

mod common;

use std::path::Path;

use common::grad::{check, dot, rand_f32};
use common::reference::rel_diff;
use common::{T, randoms, write_file};
use safetensors::Dtype;
use symerge::backend::{Backend, Cpu};
use symerge::model::bert::{Batch, Block, EncoderLayer};
use symerge::model::chain::{EmbeddingPart, HeadPart, LayerPart, PartTensors};
use symerge::model::{Bert, ChainBlock, Encoded, LoadOptions, NewHead, Param, Params};

const HIDDEN: usize = 8;
const INTER: usize = 12;
const VOCAB: usize = 20;
const MAXPOS: usize = 16;
const LABELS: usize = 3;

/// Writes a tiny checkpoint: `family` "bert" or "roberta"; `prefix` e.g. "bert."; `head` adds a
/// classification head in the family's naming.
fn tiny(dir: &Path, family: &str, prefix: &str, head: bool, act: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let mut ts = Vec::new();
    let mut seed = 100;
    let mut add = |name: String, shape: &[usize], scale: f64, shift: f64| {
        seed += 1;
        let n = shape.iter().product();
        let vals = randoms(seed, n, scale).into_iter().map(|v| v + shift).collect();
        ts.push(T::new(&name, Dtype::F32, shape, vals));
    };
    let h = HIDDEN;
    add(format!("{prefix}embeddings.word_embeddings.weight"), &[VOCAB, h], 1.0, 0.0);
    add(format!("{prefix}embeddings.position_embeddings.weight"), &[MAXPOS, h], 0.5, 0.0);
    add(format!("{prefix}embeddings.token_type_embeddings.weight"), &[2, h], 0.5, 0.0);
    add(format!("{prefix}embeddings.LayerNorm.weight"), &[h], 0.3, 1.0);
    add(format!("{prefix}embeddings.LayerNorm.bias"), &[h], 0.3, 0.0);
    for l in 0..2 {
        for (rel, shape) in [
            ("attention.self.query", [h, h]),
            ("attention.self.key", [h, h]),
            ("attention.self.value", [h, h]),
            ("attention.output.dense", [h, h]),
            ("intermediate.dense", [INTER, h]),
            ("output.dense", [h, INTER]),
        ] {
            add(format!("{prefix}encoder.layer.{l}.{rel}.weight"), &shape, 0.6, 0.0);
            add(format!("{prefix}encoder.layer.{l}.{rel}.bias"), &shape[..1], 0.2, 0.0);
        }
        for ln in ["attention.output.LayerNorm", "output.LayerNorm"] {
            add(format!("{prefix}encoder.layer.{l}.{ln}.weight"), &[h], 0.3, 1.0);
            add(format!("{prefix}encoder.layer.{l}.{ln}.bias"), &[h], 0.3, 0.0);
        }
    }
    add(format!("{prefix}pooler.dense.weight"), &[h, h], 0.5, 0.0);
    add(format!("{prefix}pooler.dense.bias"), &[h], 0.2, 0.0);
    if head {
        if family == "roberta" {
            add("classifier.dense.weight".into(), &[h, h], 0.5, 0.0);
            add("classifier.dense.bias".into(), &[h], 0.2, 0.0);
            add("classifier.out_proj.weight".into(), &[LABELS, h], 0.5, 0.0);
            add("classifier.out_proj.bias".into(), &[LABELS], 0.2, 0.0);
        } else {
            add("classifier.weight".into(), &[LABELS, h], 0.5, 0.0);
            add("classifier.bias".into(), &[LABELS], 0.2, 0.0);
        }
    }
    write_file(&dir.join("model.safetensors"), &ts);
    let cfg = serde_json::json!({
        "model_type": family, "vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": 2,
        "num_attention_heads": 2, "intermediate_size": INTER, "hidden_act": act,
        "max_position_embeddings": MAXPOS, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
        "pad_token_id": if family == "roberta" { 1 } else { 0 },
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
}

/// Two sequences: 6 real tokens, and 3 real + 3 padding.
fn encoded(pad: u32) -> Encoded {
    Encoded {
        batch: 2,
        seq: 6,
        input_ids: vec![2, 5, 7, 11, 13, 3, 2, 9, 3, pad, pad, pad],
        token_type_ids: vec![0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0],
        attention_mask: vec![1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    }
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

#[test]
fn encoder_layer_gradients_match_finite_differences() {
    let tmp = tempfile::tempdir().unwrap();
    tiny(tmp.path(), "bert", "bert.", true, "gelu");
    let model = Bert::load(Cpu, tmp.path(), LoadOptions::default()).unwrap();
    let batch = model.batch(&encoded(0)).unwrap();
    let Block::Layer(layer) = &model.blocks[1] else { panic!("block 1 is not a layer") };
    let names = layer.param_shapes();
    assert_eq!(names.len(), 16);
    let x = rand_f32(7, batch.rows() * HIDDEN, 1.0);
    let r = rand_f32(8, batch.rows() * HIDDEN, 1.0);
    let (dx, g) = layer.backward(&Cpu, &model.params[1], &batch, &x, None, &r).unwrap();
    // Internals kept by the forward give the same gradients, bit for bit, without recomputing.
    let (y, kept) = layer.forward_keeping(&Cpu, &model.params[1], &batch, &x).unwrap();
    assert_eq!(y, layer.forward(&Cpu, &model.params[1], &batch, &x).unwrap());
    assert!(EncoderLayer::internals_len(&Cpu, &kept) > 4 * x.len(), "internals hold the layer's activations");
    let (dx2, g2) = layer.backward(&Cpu, &model.params[1], &batch, &x, Some(kept), &r).unwrap();
    assert_eq!(dx, dx2);
    assert!(g.iter().all(|(n, v)| v.buf == g2[n].buf) && g.len() == g2.len());
    assert_eq!(g.len(), 16, "one gradient per tensor");
    // A key bias adds the same score to every key of a query: softmax cancels it exactly.
    let kb = &g["encoder.layer.0.attention.self.key.bias"].buf;
    assert!(kb.iter().all(|v| v.abs() < 1e-5), "key bias gradient {kb:?}");
    let mut inputs = vec![x.clone()];
    inputs.extend(values_of(&model.params[1], &names));
    let mut grads = vec![Some(dx)];
    grads.extend(grads_of(&g, &names));
    // Checked exactly above; its finite difference is pure f32 noise.
    grads[1 + 3] = None;
    let f = |xs: &[Vec<f32>]| layer.forward(&Cpu, &to_params(&names, &xs[1..]), &batch, &xs[0]).unwrap();
    check("encoder layer", &f, &inputs, &r, &grads, 3e-3, 1e-2);
}

#[test]
fn padding_does_not_leak_into_real_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    tiny(tmp.path(), "bert", "", true, "gelu");
    let model = Bert::load(Cpu, tmp.path(), LoadOptions::default()).unwrap();
    let enc = encoded(0);
    let batch = model.batch(&enc).unwrap();
    // The chain works on the 9 real tokens only: padding costs no projection or MLP work.
    let real = enc.attention_mask.iter().filter(|&&m| m == 1).count();
    assert_eq!((batch.rows(), real, enc.batch * enc.seq), (9, 9, 12));
    // Other pad ids at the padded positions change no logit and no real token's hidden state;
    // the padded rows of the returned hidden states are zero.
    let logits = model.logits(&batch).unwrap();
    let hidden = model.hidden_states(&batch).unwrap();
    let mut enc2 = enc.clone();
    for (id, &m) in enc2.input_ids.iter_mut().zip(&enc.attention_mask) {
        if m == 0 {
            *id = 17;
        }
    }
    let batch2 = model.batch(&enc2).unwrap();
    assert_eq!(logits, model.logits(&batch2).unwrap());
    assert_eq!(hidden, model.hidden_states(&batch2).unwrap());
    for (row, &m) in enc.attention_mask.iter().enumerate() {
        let values = &hidden[row * HIDDEN..(row + 1) * HIDDEN];
        assert_eq!(m == 0, values.iter().all(|&v| v == 0.0), "row {row}");
    }
    // The second sequence alone (no padding at all) gives the same logits.
    let single = Encoded {
        batch: 1,
        seq: 3,
        input_ids: enc.input_ids[6..9].to_vec(),
        token_type_ids: enc.token_type_ids[6..9].to_vec(),
        attention_mask: vec![1; 3],
    };
    let alone = model.logits(&model.batch(&single).unwrap()).unwrap();
    let worst = alone.iter().zip(&logits[LABELS..]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst < 1e-5, "packed vs alone: {worst:e}");
    // A left-padded sequence (no [CLS] in its first slot) is refused with a message.
    let mut left = enc.clone();
    left.attention_mask = vec![1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1];
    let e = model.batch(&left).err().expect("left padding").to_string();
    assert!(e.contains("sequence 1") && e.contains("padding"), "{e}");
}

#[test]
fn embeddings_and_head_gradients_match_finite_differences() {
    let tmp = tempfile::tempdir().unwrap();
    tiny(tmp.path(), "bert", "bert.", true, "gelu");
    let model = Bert::load(Cpu, tmp.path(), LoadOptions::default()).unwrap();
    let batch = model.batch(&encoded(0)).unwrap();

    let Block::Embedding(emb) = &model.blocks[0] else { panic!() };
    let names = emb.param_shapes();
    let r = rand_f32(11, batch.rows() * HIDDEN, 1.0);
    let g = emb.backward(&Cpu, &model.params[0], &batch, &r).unwrap();
    let f = |xs: &[Vec<f32>]| emb.forward(&Cpu, &to_params(&names, xs), &batch).unwrap();
    check("embeddings", &f, &values_of(&model.params[0], &names), &r, &grads_of(&g, &names), 1e-2, 1e-2);

    let Block::Head(head) = &model.blocks[3] else { panic!() };
    let names = head.param_shapes();
    let hidden = rand_f32(12, batch.rows() * HIDDEN, 1.0);
    let r = rand_f32(13, batch.batch * LABELS, 1.0);
    let (dh, g) = head.backward(&Cpu, &model.params[3], &batch, &hidden, &r).unwrap();
    // Only the [CLS] rows (0 and 6) receive gradient.
    for row in 0..batch.rows() {
        let nonzero = dh[row * HIDDEN..(row + 1) * HIDDEN].iter().any(|&v| v != 0.0);
        assert_eq!(nonzero, row == 0 || row == 6, "row {row}");
    }
    let mut inputs = vec![hidden];
    inputs.extend(values_of(&model.params[3], &names));
    let mut grads = vec![Some(dh)];
    grads.extend(grads_of(&g, &names));
    let f = |xs: &[Vec<f32>]| head.forward(&Cpu, &to_params(&names, &xs[1..]), &batch, &xs[0]).unwrap();
    check("head", &f, &inputs, &r, &grads, 1e-2, 1e-2);
}

/// The chained backward (memory-lean: recompute from saved inputs) against finite differences of
/// the soft-label CE loss along random directions in each block's parameters.
fn whole_model_case(family: &str, prefix: &str, act: &str, pad: u32) {
    let tmp = tempfile::tempdir().unwrap();
    tiny(tmp.path(), family, prefix, true, act);
    let mut model = Bert::load(Cpu, tmp.path(), LoadOptions::default()).unwrap();
    let batch = model.batch(&encoded(pad)).unwrap();
    let targets = vec![0.2f32, 0.5, 0.3, 0.7, 0.1, 0.2];
    let (loss, grads) = model.soft_ce_grads(&batch, &targets).unwrap();
    assert!(loss.is_finite() && loss > 0.0);
    assert_eq!(grads.len(), model.blocks.len());
    let eps = 3e-3f32;
    let mut worst = 0f64;
    for (bi, block) in model.blocks.clone().iter().enumerate() {
        let names = block.param_shapes();
        let u: Vec<Vec<f32>> = names
            .iter()
            .enumerate()
            .map(|(i, (_, s))| rand_f32(50 + 31 * bi as u64 + i as u64, s.iter().product(), 1.0))
            .collect();
        let an: f64 = names.iter().zip(&u).map(|((n, _), uu)| dot(&grads[bi][n].buf, uu)).sum();
        let base = values_of(&model.params[bi], &names);
        let mut eval = |sign: f32| {
            for ((n, _), (b, uu)) in names.iter().zip(base.iter().zip(&u)) {
                let v: Vec<f32> = b.iter().zip(uu).map(|(x, d)| x + sign * eps * d).collect();
                model.set_param(n, &v).unwrap();
            }
            let logits = model.logits(&batch).unwrap();
            Cpu.soft_ce(&logits, &targets, 2, LABELS).unwrap()[0] as f64
        };
        let fd = (eval(1.0) - eval(-1.0)) / (2.0 * eps as f64);
        for ((n, _), b) in names.iter().zip(&base) {
            model.set_param(n, b).unwrap();
        }
        let rel = rel_diff(fd, an, 1e-6);
        worst = worst.max(rel);
        assert!(rel < 1e-2, "{family} block {}: fd {fd:e} vs analytic {an:e} (rel {rel:.2e})", block.name());
    }
    eprintln!("{family} whole model: max relative error {worst:.2e}");
}

#[test]
fn whole_bert_gradients_match_finite_differences() {
    whole_model_case("bert", "bert.", "gelu", 0);
}

#[test]
fn whole_roberta_gradients_match_finite_differences() {
    whole_model_case("roberta", "roberta.", "gelu_new", 1);
}

#[test]
fn roberta_positions_skip_padding_and_batching_is_invariant() {
    let tmp = tempfile::tempdir().unwrap();
    tiny(tmp.path(), "roberta", "roberta.", true, "gelu_new");
    let model = Bert::load(Cpu, tmp.path(), LoadOptions::default()).unwrap();
    assert_eq!(model.config.position_offset(), 2);
    assert_eq!(model.config.max_seq_len(), MAXPOS - 2);
    assert_eq!(model.head().unwrap().style, symerge::model::bert::HeadStyle::Roberta);
    let enc = encoded(1);
    let both = model.logits(&model.batch(&enc).unwrap()).unwrap();
    // The second sequence alone, unpadded.
    let single = Encoded {
        batch: 1,
        seq: 3,
        input_ids: enc.input_ids[6..9].to_vec(),
        token_type_ids: enc.token_type_ids[6..9].to_vec(),
        attention_mask: vec![1, 1, 1],
    };
    let alone = model.logits(&model.batch(&single).unwrap()).unwrap();
    for (a, b) in both[LABELS..].iter().zip(&alone) {
        assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{both:?} vs {alone:?}");
    }
    // Too long for the position table.
    let long =
        Encoded { batch: 1, seq: 15, input_ids: vec![3; 15], token_type_ids: vec![0; 15], attention_mask: vec![1; 15] };
    let e = model.batch(&long).err().expect("sequence longer than the positions").to_string();
    assert!(e.contains("15 tokens exceed the model's 14 positions"), "{e}");
}

#[test]
fn new_head_is_seeded_and_keeps_the_pooler() {
    let tmp = tempfile::tempdir().unwrap();
    tiny(tmp.path(), "bert", "", false, "gelu");
    let bare = Bert::load(Cpu, tmp.path(), LoadOptions::default()).unwrap();
    assert!(bare.head().is_none() && bare.blocks.len() == 3);
    let e = bare.logits(&bare.batch(&encoded(0)).unwrap()).err().unwrap().to_string();
    assert!(e.contains("no classification head"), "{e}");

    let load =
        |seed, n| Bert::load(Cpu, tmp.path(), LoadOptions { new_head: Some(NewHead { num_labels: n, seed }) }).unwrap();
    let (a, b, c) = (load(7, 4), load(7, 4), load(8, 4));
    assert_eq!(a.num_labels(), Some(4));
    let w = |m: &Bert<Cpu>, n: &str| m.param(n).unwrap().buf.clone();
    assert_eq!(w(&a, "classifier.weight"), w(&b, "classifier.weight"));
    assert_ne!(w(&a, "classifier.weight"), w(&c, "classifier.weight"));
    assert!(w(&a, "classifier.bias").iter().all(|&v| v == 0.0));
    // The pooler comes from the checkpoint, unchanged by the seed.
    assert_eq!(w(&a, "pooler.dense.weight"), w(&c, "pooler.dense.weight"));
    // N(0, 0.02): the sample std of 32 values is within a factor of two.
    let cw = w(&a, "classifier.weight");
    let std = (cw.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / cw.len() as f64).sqrt();
    assert!((0.01..0.04).contains(&std), "std {std}");
}

#[test]
fn load_errors_name_the_tensor_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    tiny(tmp.path(), "bert", "", true, "gelu");
    // config.json says hidden 8; claim 12 heads -> not divisible.
    let cfg_path = tmp.path().join("config.json");
    let good = std::fs::read_to_string(&cfg_path).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
    v["num_attention_heads"] = 3.into();
    std::fs::write(&cfg_path, v.to_string()).unwrap();
    let e = Bert::load(Cpu, tmp.path(), LoadOptions::default()).err().unwrap().to_string();
    assert!(e.contains("config.json") && e.contains("not divisible by num_attention_heads 3"), "{e}");

    v["num_attention_heads"] = 2.into();
    v["intermediate_size"] = 16.into();
    std::fs::write(&cfg_path, v.to_string()).unwrap();
    let e = Bert::load(Cpu, tmp.path(), LoadOptions::default()).err().unwrap().to_string();
    assert!(
        e.contains("model.safetensors")
            && e.contains("encoder.layer.0.intermediate.dense.weight")
            && e.contains("[12, 8]")
            && e.contains("[16, 8]"),
        "{e}"
    );

    v["intermediate_size"] = INTER.into();
    v["model_type"] = "llama".into();
    std::fs::write(&cfg_path, v.to_string()).unwrap();
    let e = Bert::load(Cpu, tmp.path(), LoadOptions::default()).err().unwrap().to_string();
    assert!(e.contains("`llama`") && e.contains("not a BERT-family"), "{e}");

    v["model_type"] = "bert".into();
    v["hidden_act"] = "relu".into();
    std::fs::write(&cfg_path, v.to_string()).unwrap();
    let e = Bert::load(Cpu, tmp.path(), LoadOptions::default()).err().unwrap().to_string();
    assert!(e.contains("hidden_act") && e.contains("relu"), "{e}");

    // Heads scored as softmax classifiers only: regression and multi-label heads are refused
    // (fuzzing round 8: scored as one-class softmax, accuracy 1.0, exit 0).
    v["hidden_act"] = "gelu".into();
    for (problem, want) in [
        ("regression", "field `problem_type`: `regression` heads are not supported"),
        ("multi_label_classification", "`multi_label_classification` heads are not supported"),
        ("ranking", "field `problem_type`: unknown `ranking`"),
    ] {
        v["problem_type"] = problem.into();
        std::fs::write(&cfg_path, v.to_string()).unwrap();
        let e = Bert::load(Cpu, tmp.path(), LoadOptions::default()).err().unwrap().to_string();
        assert!(e.contains("config.json") && e.contains(want), "{e}");
    }
    v["problem_type"] = "single_label_classification".into();
    std::fs::write(&cfg_path, v.to_string()).unwrap();
    assert_eq!(Bert::load(Cpu, tmp.path(), LoadOptions::default()).unwrap().num_labels(), Some(LABELS));
    v.as_object_mut().unwrap().remove("problem_type");
    // One output is transformers' regression head even without a problem_type.
    std::fs::write(&cfg_path, v.to_string()).unwrap();
    let one = tempfile::tempdir().unwrap();
    let mut ts: Vec<T> = common::read_model(tmp.path())
        .into_iter()
        .filter(|(n, _)| !n.starts_with("classifier."))
        .map(|(n, (dt, shape, vals))| T::new(&n, dt, &shape, vals))
        .collect();
    ts.push(T::new("classifier.weight", Dtype::F32, &[1, HIDDEN], randoms(7, HIDDEN, 0.5)));
    ts.push(T::new("classifier.bias", Dtype::F32, &[1], vec![0.1]));
    write_file(&one.path().join("model.safetensors"), &ts);
    std::fs::copy(&cfg_path, one.path().join("config.json")).unwrap();
    let e = Bert::load(Cpu, one.path(), LoadOptions::default()).err().unwrap().to_string();
    assert!(e.contains("`classifier.weight` has one output") && e.contains("regression head"), "{e}");

    // Out-of-vocabulary ids are an error, not a read past the table.
    std::fs::write(&cfg_path, good).unwrap();
    let model = Bert::load(Cpu, tmp.path(), LoadOptions::default()).unwrap();
    let mut enc = encoded(0);
    enc.input_ids[2] = VOCAB as u32;
    let e = model.logits(&model.batch(&enc).unwrap()).err().unwrap().to_string();
    assert!(e.contains("id 20 at position 2 is outside the table (20 rows)"), "{e}");
}

#[test]
fn saved_state_is_only_block_inputs() {
    // The memory-lean contract: backward from saved inputs equals backward computed block by block
    // with inputs recomputed from scratch.
    let tmp = tempfile::tempdir().unwrap();
    tiny(tmp.path(), "bert", "", true, "gelu");
    let model = Bert::load(Cpu, tmp.path(), LoadOptions::default()).unwrap();
    let batch: Batch<Cpu> = model.batch(&encoded(0)).unwrap();
    let (logits, saved) = model.forward_saving(&batch).unwrap();
    assert_eq!(logits, model.logits(&batch).unwrap());
    let dl = rand_f32(20, logits.len(), 1.0);
    let grads = model.backward(&batch, saved, &dl).unwrap();
    let mut acts = vec![None];
    let mut x: Option<Vec<f32>> = None;
    for (b, p) in model.blocks.iter().zip(&model.params) {
        x = Some(b.forward(&Cpu, p, &batch, x.as_ref()).unwrap());
        acts.push(x.clone());
    }
    let mut dy = dl.clone();
    for i in (0..model.blocks.len()).rev() {
        let (dx, g) = model.blocks[i].backward(&Cpu, &model.params[i], &batch, acts[i].as_ref(), None, &dy).unwrap();
        for (name, t) in &g {
            assert_eq!(t.buf, grads[i][name].buf, "{name}");
        }
        if let Some(dx) = dx {
            dy = dx;
        }
    }
}

#[test]
fn roberta_classifier_saves_with_its_own_names_and_reloads() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    tiny(&src, "roberta", "roberta.", true, "gelu_new");
    let model = Bert::load(Cpu, &src, LoadOptions::default()).unwrap();
    let out = tmp.path().join("saved");
    let labels = Some(vec!["neg".to_string(), "neu".into(), "pos".into()]);
    model.save(&out, &symerge::model::SaveOptions { labels, ..Default::default() }).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "RobertaForSequenceClassification");
    assert_eq!(cfg["model_type"], "roberta");
    assert_eq!(cfg["id2label"]["2"], "pos");
    let names: Vec<String> = common::read_model(&out).into_keys().collect();
    for n in ["roberta.embeddings.word_embeddings.weight", "roberta.encoder.layer.1.output.dense.bias"] {
        assert!(names.contains(&n.to_string()), "{n} in {names:?}");
    }
    for n in ["classifier.dense.weight", "classifier.out_proj.weight", "classifier.out_proj.bias"] {
        assert!(names.contains(&n.to_string()), "{n} in {names:?}");
    }
    assert!(!names.iter().any(|n| n.contains("pooler")), "RoBERTa's classifier has no pooler: {names:?}");
    let back = Bert::load(Cpu, &out, LoadOptions::default()).unwrap();
    let enc = encoded(1);
    assert_eq!(back.logits(&back.batch(&enc).unwrap()).unwrap(), model.logits(&model.batch(&enc).unwrap()).unwrap());
}
