//! Top-k next-token label caches of a causal LM (the tiny `llama_gqa` fixture) and the loss
//! against them: cached values equal the model's own softmax top-k, reuse, resume and the errors
//! of corrupt or mismatched caches, and the bucket cross-entropy's value and gradients against
//! a direct f64 evaluation and finite differences.

mod common;

use std::path::{Path, PathBuf};

use common::grad::{dot, rand_f32};
use common::reference::rel_diff;
use symerge::backend::{Backend, Cpu};
use symerge::dist::LocalGroup;
use symerge::labels::cache::partial_path;
use symerge::labels::produce::{CacheLabelsOptions, cache_labels, cache_labels_in, provenance, top_k};
use symerge::labels::{CacheWriter, LabelCache, LabelKind, Provenance, TopKLabels};
use symerge::model::CausalLm;

const TEXTS: [&str; 5] = [
    "the cat sat on the mat",
    "",
    "hello world, this is a longer text with more words",
    "a",
    "merging models by task arithmetic",
];
const MAX_LEN: usize = 32;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_gqa")
}

fn opts(output: &Path, k: usize, batch_size: usize) -> CacheLabelsOptions {
    CacheLabelsOptions {
        expert: fixture(),
        task: "lm".into(),
        output: output.to_path_buf(),
        batch_size,
        max_len: MAX_LEN,
        force: false,
        top_k: k,
    }
}

/// The model's next-token probabilities (f64) of every predicted position of `text`, run alone.
fn reference(lm: &CausalLm<Cpu>, text: &str) -> Vec<Vec<f64>> {
    let vocab = lm.model.config.vocab_size;
    let enc = lm.tokenizer.encode(&[text]).unwrap();
    let batch = lm.model.batch(&enc).unwrap();
    let logits = Cpu.download(&lm.model.logits(&batch).unwrap()).unwrap();
    (0..enc.seq.saturating_sub(1))
        .map(|t| {
            let z = &logits[t * vocab..(t + 1) * vocab];
            let m = z.iter().copied().fold(f32::MIN, f32::max) as f64;
            let s: f64 = z.iter().map(|&v| (v as f64 - m).exp()).sum();
            z.iter().map(|&v| (v as f64 - m).exp() / s).collect()
        })
        .collect()
}

#[test]
fn cached_top_k_is_the_models_own_softmax_top_k() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lm.labels");
    let k = 8;
    let summary = cache_labels(Cpu, &TEXTS, &opts(&out, k, 2)).unwrap();
    assert!(!summary.reused);
    assert_eq!((summary.rows, summary.top_k, summary.classes), (TEXTS.len(), Some(k), 0));

    let lm = CausalLm::<Cpu>::load(Cpu, &fixture(), MAX_LEN).unwrap();
    let vocab = lm.model.config.vocab_size;
    let want = provenance(&fixture(), "lm", MAX_LEN, &TEXTS).unwrap();
    let cache = LabelCache::open(&out, Some(&want)).unwrap();
    assert_eq!(cache.kind(), LabelKind::TopK { k, vocab });
    let mut total = 0;
    for (i, text) in TEXTS.iter().enumerate() {
        let probs = reference(&lm, text);
        assert_eq!(cache.positions(i), probs.len(), "input {i}: one entry per predicted position");
        total += probs.len();
        let got = cache.topk(i).unwrap();
        assert_eq!((got.k, got.positions()), (k, probs.len()));
        for (t, p) in probs.iter().enumerate() {
            let ids = &got.ids[t * k..(t + 1) * k];
            let cached = &got.probs[t * k..(t + 1) * k];
            let mut sorted = p.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            for (j, (&id, &c)) in ids.iter().zip(cached).enumerate() {
                let exact = p[id as usize];
                assert!((c as f64 - exact).abs() <= 1e-5 * exact + 1e-9, "input {i} pos {t}: {c} vs {exact}");
                // The j-th cached token is the j-th most probable (up to ties within rounding).
                assert!((exact - sorted[j]).abs() <= 1e-6, "input {i} pos {t} rank {j}: {exact} vs {}", sorted[j]);
            }
            let outside: f64 = (0..vocab).filter(|v| !ids.contains(&(*v as u32))).map(|v| p[v]).sum();
            let rest = got.rest[t] as f64;
            assert!((rest - outside).abs() <= 1e-5 * outside + 1e-9, "input {i} pos {t}: rest {rest} vs {outside}");
            let sum: f64 = cached.iter().map(|&v| v as f64).sum::<f64>() + rest;
            assert!((sum - 1.0).abs() < 1e-5, "input {i} pos {t}: mass {sum}");
        }
    }
    assert_eq!(cache.header.positions, Some(total));
    assert_eq!(summary.positions, Some(total));
    assert_eq!(cache.positions(1), 0, "an input of one token predicts nothing");
    assert_eq!(cache.topk_batch(&[2, 0]).unwrap().positions(), cache.positions(2) + cache.positions(0));

    // Same inputs and expert: reused without running anything; another k is a mismatch.
    let again = cache_labels(Cpu, &TEXTS, &opts(&out, k, 3)).unwrap();
    assert!(again.reused);
    let e = cache_labels(Cpu, &TEXTS, &opts(&out, 16, 2)).unwrap_err().to_string();
    assert!(e.contains("top 8") && e.contains("asks for 16") && e.contains("lm.labels"), "{e}");
    // Other inputs: refused, naming the field, unless forced.
    let other = ["the cat sat", "on the mat"];
    let e = cache_labels(Cpu, &other, &opts(&out, k, 2)).unwrap_err().to_string();
    assert!(e.contains("different inputs"), "{e}");
    let forced = cache_labels(Cpu, &other, &CacheLabelsOptions { force: true, ..opts(&out, 4, 2) }).unwrap();
    assert_eq!((forced.rows, forced.top_k, forced.reused), (2, Some(4), false));

    // A k beyond the vocabulary keeps the whole distribution, with nothing left over.
    let all = dir.path().join("all.labels");
    let s = cache_labels(Cpu, &TEXTS[..1], &opts(&all, 10_000, 1)).unwrap();
    assert_eq!(s.top_k, Some(vocab));
    let c = LabelCache::open(&all, None).unwrap().topk(0).unwrap();
    assert!(c.rest.iter().all(|&r| r == 0.0));
}

#[test]
fn killed_run_resumes_to_identical_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole.labels");
    cache_labels(Cpu, &TEXTS, &opts(&whole, 5, 1)).unwrap();
    let reference = LabelCache::open(&whole, None).unwrap();

    // A run killed after three inputs, with a torn record at the end.
    let path = dir.path().join("resumed.labels");
    let prov = provenance(&fixture(), "lm", MAX_LEN, &TEXTS).unwrap();
    let positions: Vec<usize> = (0..TEXTS.len()).map(|i| reference.positions(i)).collect();
    let vocab = 512;
    {
        let mut w = CacheWriter::create_topk(&path, prov.clone(), 5, vocab, &positions).unwrap();
        let first = reference.topk_batch(&[0, 1, 2]).unwrap();
        w.append_topk(&first.ids, &first.probs, &first.rest).unwrap();
        w.flush().unwrap();
    }
    let partial = partial_path(&path);
    let len = std::fs::metadata(&partial).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&partial).unwrap().set_len(len + 7).unwrap();
    assert!(!path.exists());

    let s = cache_labels(Cpu, &TEXTS, &opts(&path, 5, 1)).unwrap();
    // Input 3 ("a") has one position; 0..3 were whole and the writer resumes after them.
    assert_eq!(s.resumed_rows, 3);
    assert_eq!(std::fs::read(&path).unwrap(), std::fs::read(&whole).unwrap());
    assert!(!partial.exists());

    // A partial file for another k is not continued.
    {
        let mut w = CacheWriter::create_topk(&path, prov.clone(), 6, vocab, &positions).unwrap();
        w.flush().unwrap();
    }
    let w = CacheWriter::create_topk(&path, prov, 5, vocab, &positions).unwrap();
    assert_eq!(w.rows_written(), 0);
}

fn prov(task: &str) -> Provenance {
    Provenance {
        task: task.into(),
        expert_hash: "e".repeat(64),
        tokenizer_hash: "t".repeat(64),
        inputs_hash: "i".repeat(64),
        max_len: None,
    }
}

/// Seeded labels for `positions` positions: distinct ids, decreasing probabilities.
fn labels(positions: usize, k: usize, vocab: usize, seed: u64) -> TopKLabels {
    let r = rand_f32(seed, positions * vocab, 3.0);
    let mut out = TopKLabels { k, ids: vec![], probs: vec![], rest: vec![] };
    for z in r.chunks(vocab) {
        let (i, p, rest) = top_k(z, k);
        out.ids.extend(i);
        out.probs.extend(p);
        out.rest.push(rest);
    }
    out
}

fn open_err(path: &Path, want: Option<&Provenance>) -> String {
    match LabelCache::open(path, want) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_topk_caches_and_appends_are_rejected_with_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lm.labels");
    let (k, vocab) = (3, 11);
    let positions = [4, 0, 2, 5];
    let l = labels(11, k, vocab, 9);
    let mut w = CacheWriter::create_topk(&path, prov("lm"), k, vocab, &positions).unwrap();
    // Positions that end inside an input are refused, and nothing is written.
    let e = w.append_topk(&l.ids[..3 * k], &l.probs[..3 * k], &l.rest[..3]).unwrap_err().to_string();
    assert!(e.contains("whole inputs") && e.contains("lm.labels"), "{e}");
    let e = w.append_topk(&l.ids[..k], &l.probs[..2 * k], &l.rest[..1]).unwrap_err().to_string();
    assert!(e.contains("positions of top-3"), "{e}");
    let e = w.append_classification(&[0.5, 0.5], &[0.0, 0.0]).unwrap_err().to_string();
    assert!(e.contains("top-k cache"), "{e}");
    // Inputs 0 and 1 (no positions), then 2 and 3.
    w.append_topk(&l.ids[..4 * k], &l.probs[..4 * k], &l.rest[..4]).unwrap();
    assert_eq!(w.rows_written(), 2);
    w.append_topk(&l.ids[4 * k..], &l.probs[4 * k..], &l.rest[4..]).unwrap();
    let e = w.append_topk(&l.ids[..k], &l.probs[..k], &l.rest[..1]).unwrap_err().to_string();
    assert!(e.contains("more than the planned 11"), "{e}");
    w.finish().unwrap();
    let cache = LabelCache::open(&path, Some(&prov("lm"))).unwrap();
    let back = cache.topk_batch(&[0, 1, 2, 3]).unwrap();
    assert_eq!(back, l, "f32 values and u32 ids round-trip exactly");
    assert!(cache.topk(4).unwrap_err().to_string().contains("past the cache's 4 inputs"));
    assert!(cache.probs(0).is_empty());
    let good = std::fs::read(&path).unwrap();

    for (field, want) in [
        ("task", Provenance { task: "x".into(), ..prov("lm") }),
        ("expert checkpoint", Provenance { expert_hash: "x".into(), ..prov("lm") }),
        ("tokenizer", Provenance { tokenizer_hash: "x".into(), ..prov("lm") }),
        ("inputs", Provenance { inputs_hash: "x".into(), ..prov("lm") }),
    ] {
        let err = open_err(&path, Some(&want));
        assert!(err.contains(&format!("different {field}")) && err.contains("lm.labels"), "{err}");
    }
    // A flipped bit in the offset table and in a record.
    for at in [4096 + 9, good.len() - 3] {
        let mut flipped = good.clone();
        flipped[at] ^= 0x10;
        std::fs::write(&path, &flipped).unwrap();
        assert!(open_err(&path, None).contains("checksum"), "byte {at}");
    }
    std::fs::write(&path, &good[..good.len() - 4]).unwrap();
    assert!(open_err(&path, None).contains("truncated"));
    // The header of a top-k cache as a classification reader expects it is refused too.
    let text = String::from_utf8_lossy(&good[8..4096]).replace("\"f32\"", "\"f16\"");
    let mut relabelled = good.clone();
    relabelled[8..4096].copy_from_slice(text.as_bytes());
    std::fs::write(&path, &relabelled).unwrap();
    assert!(open_err(&path, None).contains("unsupported dtype"));

    // A token listed twice at one position (its probability would count twice) is refused.
    let mut twice = l.clone();
    twice.ids[4 * k + 2] = twice.ids[4 * k];
    let mut w = CacheWriter::create_topk(&path, prov("lm"), k, vocab, &positions).unwrap();
    w.append_topk(&twice.ids, &twice.probs, &twice.rest).unwrap();
    w.finish().unwrap();
    let e = open_err(&path, None);
    assert!(e.contains("position 4") && e.contains("listed twice"), "{e}");

    let e = CacheWriter::create_topk(&path, prov("lm"), 0, vocab, &positions).err().unwrap().to_string();
    assert!(e.contains("top-k of 0"), "{e}");
    let e = CacheWriter::create(&path, prov("lm"), LabelKind::TopK { k, vocab }, 4, vec![]).err().unwrap().to_string();
    assert!(e.contains("create_topk"), "{e}");
}

/// The bucket cross-entropy of one row, directly in f64.
fn bucket_ce(z: &[f32], ids: &[u32], t: &[f32], rest: f32) -> f64 {
    let m = z.iter().copied().fold(f32::MIN, f32::max) as f64;
    let s: f64 = z.iter().map(|&v| (v as f64 - m).exp()).sum();
    let p = |i: usize| (z[i] as f64 - m).exp() / s;
    let inside: f64 = ids.iter().map(|&i| p(i as usize)).sum();
    let mut l: f64 = ids.iter().zip(t).map(|(&i, &tj)| -(tj as f64) * p(i as usize).ln()).sum();
    if rest != 0.0 {
        l -= rest as f64 * (1.0 - inside).ln();
    }
    l
}

#[test]
fn topk_loss_and_gradient_match_f64_and_finite_differences() {
    let (rows, vocab) = (4, 13);
    for k in [1, 4, vocab] {
        let l = labels(rows, k, vocab, 21 + k as u64);
        let z = rand_f32(5, rows * vocab, 2.0);
        let be = Cpu;
        let (zb, ids, t, rest) = (
            be.upload(&z).unwrap(),
            be.upload_ids(&l.ids).unwrap(),
            be.upload(&l.probs).unwrap(),
            be.upload(&l.rest).unwrap(),
        );
        let loss =
            |z: &[f32]| be.download(&be.topk_ce(&z.to_vec(), &ids, &t, &rest, rows, vocab, k).unwrap()).unwrap()[0];
        let want: f64 = (0..rows)
            .map(|r| {
                bucket_ce(
                    &z[r * vocab..(r + 1) * vocab],
                    &l.ids[r * k..(r + 1) * k],
                    &l.probs[r * k..(r + 1) * k],
                    l.rest[r],
                )
            })
            .sum::<f64>()
            / rows as f64;
        assert!((loss(&z) as f64 - want).abs() < 1e-5 * want.abs().max(1.0), "k {k}: {} vs {want}", loss(&z));
        let g = be.download(&be.topk_ce_backward(&zb, &ids, &t, &rest, rows, vocab, k, 2.0).unwrap()).unwrap();
        // Targets and rest sum to 1, so every row's gradient sums to 0.
        for (r, gr) in g.chunks(vocab).enumerate() {
            assert!(gr.iter().sum::<f32>().abs() < 1e-6, "k {k} row {r}: {gr:?}");
        }
        for dir in 0..3u64 {
            let u = rand_f32(100 + dir, z.len(), 1.0);
            let at = |h: f32| loss(&z.iter().zip(&u).map(|(a, b)| a + h * b).collect::<Vec<_>>()) as f64;
            let fd = (at(1e-2) - at(-1e-2)) / 2e-2;
            let an = dot(&g, &u) / 2.0;
            assert!((fd - an).abs() <= 2e-3 * an.abs().max(0.05), "k {k}: fd {fd:e} vs analytic {an:e}");
        }
    }
    // Ids outside the vocabulary are an error naming the op.
    let e = Cpu.topk_ce(&vec![0.0; 4], &vec![4], &vec![1.0], &vec![0.0], 1, 4, 1).unwrap_err().to_string();
    assert!(e.contains("topk_ce") && e.contains("id 4"), "{e}");
}

/// The whole model's gradient of the loss against a perturbed expert's cached labels, along a
/// random direction in every tensor, against Richardson-extrapolated central differences.
#[test]
fn model_topk_loss_gradients_match_finite_differences() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lm.labels");
    let texts = &TEXTS[..3];
    cache_labels(Cpu, texts, &opts(&out, 6, 3)).unwrap();
    let cache = LabelCache::open(&out, None).unwrap();
    let mut lm = CausalLm::<Cpu>::load(Cpu, &fixture(), MAX_LEN).unwrap();
    // Move the student away from the expert so the loss has a gradient worth checking.
    for name in ["lm_head.weight", "model.layers.1.mlp.up_proj.weight"] {
        let v = Cpu.download(&lm.model.param(name).unwrap().buf).unwrap();
        let noise = rand_f32(77, v.len(), 0.05);
        lm.model.set_param(name, &v.iter().zip(&noise).map(|(a, b)| a + b).collect::<Vec<_>>()).unwrap();
    }
    let batch = lm.model.batch(&lm.tokenizer.encode(texts).unwrap()).unwrap();
    let labels = cache.topk_batch(&[0, 1, 2]).unwrap();
    let (loss, grads) = lm.model.topk_loss_grads(&batch, &labels).unwrap();
    assert!((loss - lm.model.topk_loss(&batch, &labels).unwrap()).abs() < 1e-6);
    let model = &mut lm.model;
    let total = model.total_grads(grads).unwrap();
    let mut worst = 0f64;
    for (i, (name, g)) in total.iter().enumerate() {
        let base = model.param(name).unwrap().buf.clone();
        let u = rand_f32(900 + i as u64, base.len(), 1.0);
        let an = dot(&g.buf, &u);
        let mut eval = |step: f32| {
            let v: Vec<f32> = base.iter().zip(&u).map(|(x, d)| x + step * d).collect();
            model.set_param(name, &v).unwrap();
            model.topk_loss(&batch, &labels).unwrap() as f64
        };
        let mut central = |h: f32| (eval(h) - eval(-h)) / (2.0 * h as f64);
        let fd = (4.0 * central(5e-3) - central(1e-2)) / 3.0;
        model.set_param(name, &base).unwrap();
        // Most directional derivatives here are ~1e-3; the first layer's q_proj (init scale
        // 0.02) gives ~5e-5, where the f32 noise of the differences is a few percent, so errors
        // are relative to at least 1e-3.
        let rel = rel_diff(fd, an, 1e-3);
        worst = worst.max(rel);
        assert!(rel < 1e-2, "{name}: fd {fd:e} vs analytic {an:e} (rel {rel:.2e})");
    }
    eprintln!("top-k loss {loss:.4}: {} tensors, max relative error {worst:.2e}", total.len());
    // Labels for another batch are refused, naming the counts.
    let e = model.topk_loss(&batch, &cache.topk_batch(&[0]).unwrap()).unwrap_err().to_string();
    assert!(e.contains("positions") && e.contains("next-token targets"), "{e}");
}

/// Three in-process ranks stitch the same bytes as one process (batches of 2 over 5 inputs:
/// ranks run 1, 1 and 1 batches, the last holding one input), and the CLI picks the top-k cache
/// from the expert's config.
#[test]
fn ranks_and_cli_write_the_same_topk_cache() {
    let dir = tempfile::tempdir().unwrap();
    let single = dir.path().join("single.labels");
    cache_labels(Cpu, &TEXTS, &opts(&single, 4, 2)).unwrap();
    let split = dir.path().join("split.labels");
    let ranks = LocalGroup::ranks(3, std::time::Duration::from_secs(60));
    std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|mut rank| {
                let o = opts(&split, 4, 2);
                s.spawn(move || cache_labels_in(Cpu, &TEXTS, &o, &mut rank).map(|s| s.positions))
            })
            .collect();
        for h in handles {
            assert!(h.join().unwrap().unwrap().is_some());
        }
    });
    assert!(std::fs::read(&single).unwrap() == std::fs::read(&split).unwrap(), "stitched cache differs");

    let inputs = dir.path().join("in.jsonl");
    let lines: String = TEXTS.iter().map(|t| format!("{}\n", serde_json::json!({ "text": t }))).collect();
    std::fs::write(&inputs, lines).unwrap();
    let cli = dir.path().join("cli.labels");
    let (ok, out, err) = common::run(&[
        "cache-labels",
        "--expert",
        fixture().to_str().unwrap(),
        "--task",
        "lm",
        "--inputs",
        inputs.to_str().unwrap(),
        "-o",
        cli.to_str().unwrap(),
        "--max-len",
        "32",
        "--batch-size",
        "2",
        "--top-k",
        "4",
        "--json",
    ]);
    assert!(ok, "{err}");
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["top_k"], 4);
    assert!(std::fs::read(&single).unwrap() == std::fs::read(&cli).unwrap(), "the CLI's cache differs");
}

/// Fuzzing round 8: inputs without positions first made a fresh run look resumed, so the header
/// and offset table were never written and a cache that would not open landed at the output.
#[test]
fn leading_inputs_without_positions_cache_like_any_other() {
    let dir = tempfile::tempdir().unwrap();
    let texts = ["", "a", "the cat sat on the mat", "a"];
    let out = dir.path().join("short-first.labels");
    let s = cache_labels(Cpu, &texts, &opts(&out, 4, 1)).unwrap();
    assert_eq!((s.rows, s.resumed_rows), (4, 0));
    let cache = LabelCache::open(&out, Some(&provenance(&fixture(), "lm", MAX_LEN, &texts).unwrap())).unwrap();
    let lm = CausalLm::<Cpu>::load(Cpu, &fixture(), MAX_LEN).unwrap();
    for (i, text) in texts.iter().enumerate() {
        assert_eq!(cache.positions(i), reference(&lm, text).len(), "input {i}");
    }
    assert!(cache.positions(2) > 0);
    // The same cache as the one written with the inputs in another order, input for input.
    let other = dir.path().join("long-first.labels");
    let reordered = [texts[2], texts[0], texts[1], texts[3]];
    cache_labels(Cpu, &reordered, &opts(&other, 4, 1)).unwrap();
    let b = LabelCache::open(&other, None).unwrap();
    assert_eq!(cache.topk(2).unwrap().ids, b.topk(0).unwrap().ids);
}
