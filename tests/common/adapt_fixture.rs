//! The real small adaptation setup shared by the adaptation tests: MiniLM-L6 as the base and
//! two experts made from it (seeded perturbations of every weight and their own heads), twelve
//! labelled texts per task, their label caches, and an `adapt.yml` over them.

use std::path::{Path, PathBuf};

use safetensors::Dtype;

use super::{T, minilm_dir, randoms, read_model, run, write_model};

pub const TEXTS: &[&str] = &[
    "a large natural stream of water flowing in a channel to the sea",
    "move fast by using one's feet, with one foot off the ground at any given time",
    "an instrument used for measuring time",
    "the quality of being honest",
    "cause to be embarrassed; cause to feel self-conscious",
    "a building where travelers can pay for lodging and meals",
    "a domesticated carnivorous mammal kept as a pet",
    "make a mistake or be incorrect",
    "the act of travelling by air",
    "to express gratitude",
    "the fruit of a tree of the rose family",
    "a written communication addressed to a person",
];

/// An expert: MiniLM with every float weight moved by a seeded perturbation and a new head of
/// `classes` labels; config names its labels.
pub fn make_expert(dir: &Path, seed: u64, classes: usize) -> PathBuf {
    let base = read_model(&minilm_dir());
    let mut tensors = Vec::new();
    for (i, (name, (dt, shape, values))) in base.iter().enumerate() {
        // Float weights are perturbed (and written as F32, whatever the base stores, so a
        // half-precision copy of MiniLM makes experts too); integer buffers are copied.
        if !matches!(dt, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            tensors.push(T::new(&format!("bert.{name}"), *dt, shape, values.clone()));
            continue;
        }
        let delta = randoms(seed * 1000 + i as u64, values.len(), 0.01);
        let v = values.iter().zip(&delta).map(|(a, d)| a + d).collect();
        tensors.push(T::new(&format!("bert.{name}"), Dtype::F32, shape, v));
    }
    tensors.push(T::new("classifier.weight", Dtype::F32, &[classes, 384], randoms(seed + 77, classes * 384, 0.3)));
    tensors.push(T::new("classifier.bias", Dtype::F32, &[classes], randoms(seed + 78, classes, 0.1)));
    write_model(dir, &tensors);
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(minilm_dir().join("config.json")).unwrap()).unwrap();
    let labels: serde_json::Map<String, serde_json::Value> =
        (0..classes).map(|c| (format!("class-{c}"), serde_json::json!(c))).collect();
    cfg["label2id"] = labels.into();
    cfg["architectures"] = serde_json::json!(["BertForSequenceClassification"]);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(minilm_dir().join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    dir.to_path_buf()
}

pub struct Fixture {
    pub _tmp: tempfile::TempDir,
    pub root: PathBuf,
}

/// Two experts (3 and 4 classes), labelled inputs per task, and their label caches.
pub fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    for (task, seed, classes) in [("alpha", 1, 3), ("beta", 2, 4)] {
        make_expert(&root.join(format!("expert-{task}")), seed, classes);
        let lines: String = TEXTS
            .iter()
            .enumerate()
            .map(|(i, t)| format!("{}\n", serde_json::json!({"text": t, "label": format!("class-{}", i % classes)})))
            .collect();
        std::fs::write(root.join(format!("{task}.jsonl")), lines).unwrap();
        let (ok, out, err) = run(&[
            "cache-labels",
            "--expert",
            root.join(format!("expert-{task}")).to_str().unwrap(),
            "--task",
            task,
            "--inputs",
            root.join(format!("{task}.jsonl")).to_str().unwrap(),
            "-o",
            root.join(format!("{task}.labels")).to_str().unwrap(),
            "--max-len",
            "32",
            "--json",
        ]);
        assert!(ok, "{err}");
        let s: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            (s["rows"].as_u64(), s["classes"].as_u64(), s["reused"].as_bool()),
            (Some(12), Some(classes as u64), Some(false))
        );
    }
    let cfg = format!(
        "method: symerge\nbase_model: {}\nbatch_size: 6\nepochs: 12\nlr: 0.02\nmax_len: 32\ntasks:\n{}",
        minilm_dir().display(),
        ["alpha", "beta"]
            .iter()
            .map(|t| format!("  - {{name: {t}, expert: expert-{t}, inputs: {t}.jsonl, cache: {t}.labels}}\n"))
            .collect::<String>()
    );
    std::fs::write(root.join("adapt.yml"), cfg).unwrap();
    Fixture { _tmp: tmp, root }
}
