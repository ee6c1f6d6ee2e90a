//! MiniLM-L6 against Hugging Face transformers: token ids, [CLS] hidden states, logits, the soft-
//! label loss and its gradients for a whole encoder layer, the pooler, the classifier and the
//! embedding LayerNorm, from a fixture that `tests/reference/make_bert_fixtures.py` writes
//! (it needs torch, so it is generated on a machine that has it). Without the fixture this test
//! says SKIPPED instead of passing silently.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::minilm_dir;
use common::reference::{max_rel, read};
use symerge::backend::Cpu;
use symerge::model::{Bert, Encoded, LoadOptions, NewHead, TextTokenizer};

const FIXTURE: &str = "tests/fixtures/minilm_reference.safetensors";
const HEAD: &str = "tests/fixtures/minilm_head.safetensors";
/// Relative tolerance: max |ours - reference| / max |reference|, per tensor.
const TOL: f64 = 1e-4;

fn as_u32(v: &[f64]) -> Vec<u32> {
    v.iter().map(|&x| x as u32).collect()
}

#[test]
fn minilm_matches_transformers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (fixture, head) = (root.join(FIXTURE), root.join(HEAD));
    if !fixture.is_file() || !head.is_file() {
        println!("SKIPPED: {FIXTURE} missing; generate with tests/reference/make_bert_fixtures.py");
        eprintln!("SKIPPED: {FIXTURE} missing; generate with tests/reference/make_bert_fixtures.py");
        return;
    }
    let (t, meta) = read(&fixture);
    let (head_t, _) = read(&head);
    let dir = minilm_dir();
    let mut model = Bert::load(Cpu, &dir, LoadOptions { new_head: Some(NewHead { num_labels: 3, seed: 0 }) }).unwrap();
    for name in ["classifier.weight", "classifier.bias"] {
        let v: Vec<f32> = head_t[name].1.iter().map(|&x| x as f32).collect();
        model.set_param(name, &v).unwrap();
    }

    // Our tokenizer (padding per batch) gives exactly the reference ids.
    let (shape, ids) = &t["input_ids"];
    let (n, seq) = (shape[0], shape[1]);
    let texts: Vec<String> = serde_json::from_str(&meta["texts"]).unwrap();
    let max_len: usize = meta["max_len"].parse().unwrap();
    let enc = TextTokenizer::from_dir(&dir, max_len).unwrap().encode(&texts).unwrap();
    let want = Encoded {
        batch: n,
        seq,
        input_ids: as_u32(ids),
        token_type_ids: as_u32(&t["token_type_ids"].1),
        attention_mask: as_u32(&t["attention_mask"].1),
    };
    assert_eq!(enc, want, "tokenization differs from the reference");

    let batch = model.batch(&want).unwrap();
    let hidden = model.hidden_states(&batch).unwrap();
    let h = model.config.hidden_size;
    let cls: Vec<f32> = (0..n).flat_map(|b| hidden[b * seq * h..(b * seq + 1) * h].to_vec()).collect();
    let e_cls = max_rel(&cls, &t["cls_hidden"].1);
    let logits = model.logits(&batch).unwrap();
    let e_logits = max_rel(&logits, &t["logits"].1);
    let targets: Vec<f32> = t["targets"].1.iter().map(|&x| x as f32).collect();
    let (loss, grads) = model.soft_ce_grads(&batch, &targets).unwrap();
    let e_loss = max_rel(&[loss], &t["loss"].1);
    println!("vs transformers: [CLS] hidden {e_cls:.2e}, logits {e_logits:.2e}, loss {e_loss:.2e}");
    assert!(e_cls < TOL && e_logits < TOL && e_loss < TOL, "cls {e_cls:e} logits {e_logits:e} loss {e_loss:e}");

    // The fixture keeps an evenly strided sample of each gradient (see the script).
    let strides: HashMap<String, usize> = serde_json::from_str(&meta["grad_strides"]).unwrap();
    let mut checked = 0;
    let mut worst = 0f64;
    for (key, (_, reference)) in &t {
        let Some(name) = key.strip_prefix("grad.") else { continue };
        let g = grads.iter().find_map(|p| p.get(name)).unwrap_or_else(|| panic!("no gradient for {name}"));
        let sample: Vec<f32> = g.buf.iter().step_by(strides[name]).copied().collect();
        assert_eq!(sample.len(), reference.len(), "{name}: sample size");
        // The key bias cannot change attention (it shifts every score of a query equally), so
        // its true gradient is zero: the reference holds f64 round-off, ours f32 round-off.
        let ref_max = reference.iter().map(|v| v.abs()).fold(0.0, f64::max);
        if ref_max < 1e-12 {
            let ours_max = sample.iter().map(|v| v.abs() as f64).fold(0.0, f64::max);
            assert!(ours_max < 1e-6, "gradient of {name} should vanish, max |g| = {ours_max:e}");
            checked += 1;
            continue;
        }
        let e = max_rel(&sample, reference);
        worst = worst.max(e);
        assert!(e < TOL, "gradient of {name}: relative error {e:e}");
        checked += 1;
    }
    assert!(checked >= 16, "the fixture holds only {checked} gradients");
    println!("vs transformers: {checked} gradients, max relative error {worst:.2e}");
}
