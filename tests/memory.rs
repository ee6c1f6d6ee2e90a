//! Bounded memory: merging a generated multi-gigabyte checkpoint keeps the merge process's peak
//! resident set (VmHWM, reported by the child process itself) under about four blocks' worth of
//! input, whatever the model size; streamed adaptation of the same family stays under a bound
//! derived from the blocks in flight and the adapted heads.

mod common;

use common::run;
use symerge::checkpoint::generate::{SyntheticSpec, write_family};
use symerge::checkpoint::{Checkpoint, FloatDType, group_blocks};

#[test]
fn merge_of_2gb_checkpoint_keeps_rss_under_four_blocks() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = SyntheticSpec::preset("llama-rss", FloatDType::BF16).unwrap();
    let dirs = write_family(&spec, 11, 2, 0.01, tmp.path(), 300_000_000).unwrap();
    let ckpts: Vec<Checkpoint> = dirs.iter().map(|d| Checkpoint::open(d).unwrap()).collect();
    let total: u64 = ckpts.iter().map(Checkpoint::data_bytes).sum();
    assert!(total >= 2_000_000_000, "inputs are {total} bytes");
    // A block's worth: the largest block's bytes summed over the three models.
    let blocks = group_blocks(ckpts[0].tensors.iter().map(|t| t.name.as_str()));
    assert!(blocks.len() >= 20, "many blocks: {}", blocks.len());
    let block_bytes = blocks
        .iter()
        .map(|b| {
            b.tensors.iter().map(|n| ckpts.iter().map(|c| c.get(n).unwrap().nbytes() as u64).sum::<u64>()).sum::<u64>()
        })
        .max()
        .unwrap();
    drop(ckpts);

    for method in ["task_arithmetic", "ties"] {
        let cfg = tmp.path().join(format!("{method}.yml"));
        std::fs::write(
            &cfg,
            format!(
                "merge_method: {method}\nbase_model: {}\nmodels:\n  - model: {}\n    parameters: {{weight: 0.5, density: 0.5}}\n  - model: {}\n    parameters: {{weight: 0.5, density: 0.5}}\n",
                dirs[0].display(),
                dirs[1].display(),
                dirs[2].display()
            )
            .replace(", density: 0.5", if method == "ties" { ", density: 0.5" } else { "" }),
        )
        .unwrap();
        let out = tmp.path().join(format!("out-{method}"));
        // The CPU executor's bound; the GPU path's pinned staging ring is sized by its unit
        // instead (and a CUDA context adds its own resident memory).
        let (ok, stdout, err) =
            run(&["merge", cfg.to_str().unwrap(), "-o", out.to_str().unwrap(), "--json", "-q", "--device", "cpu"]);
        assert!(ok, "{err}");
        let s: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        let peak = s["peak_rss_bytes"].as_u64().expect("VmHWM is available on Linux");
        eprintln!(
            "{method}: read {:.2} GB, peak RSS {:.0} MB, largest block {:.0} MB ({:.2} blocks), {:.2} GB/s",
            total as f64 / 1e9,
            peak as f64 / 1e6,
            block_bytes as f64 / 1e6,
            peak as f64 / block_bytes as f64,
            s["read_gb_per_s"].as_f64().unwrap()
        );
        assert!(peak < 4 * block_bytes, "{method}: peak RSS {peak} >= 4 blocks ({block_bytes} each)");
        assert_eq!(s["bytes_read"].as_u64().unwrap(), total);
        std::fs::remove_dir_all(&out).unwrap();
    }
}

/// Streamed adaptation of a causal LM: `adapt --host-mem 0` over the same 2.1 GB family (base +
/// 2 experts, bf16, 26 layers) trains four SyMerge steps and writes both tasks' models with a
/// peak RSS under a bound derived from what must be resident at once:
/// - stored bytes of the blocks in flight: the one being merged and the one being prefetched,
///   over the three models (2 x the largest shared block);
/// - the merged f32 weights of a block, their gradients, and the copy a backward or a write
///   makes (3 x the largest block in f32);
/// - each task's own head (`lm_head` + norm, f32) with its gradient and Adam's two moments (4x),
///   and one copy while its model is written;
/// - 200 MB for the binary, the tokenizer, threads' stacks, activations and label caches.
///
/// The old path held every task vector in host f32: 8.56 GB on this family.
#[test]
fn streamed_adapt_of_2gb_llm_family_keeps_rss_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = SyntheticSpec::preset("llama-rss", FloatDType::BF16).unwrap();
    let dirs = write_family(&spec, 12, 2, 0.01, tmp.path(), 300_000_000).unwrap();
    let tokenizer = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_gqa/tokenizer.json");
    for d in &dirs {
        std::fs::copy(&tokenizer, d.join("tokenizer.json")).unwrap();
    }
    let base = Checkpoint::open(&dirs[0]).unwrap();
    let (vocab, hidden) = (8000u64, 1024u64);
    let blocks = group_blocks(base.tensors.iter().map(|t| t.name.as_str()));
    let block_bytes = |b: &symerge::checkpoint::BlockSpec| -> u64 {
        b.tensors.iter().map(|n| base.get(n).unwrap().nbytes() as u64).sum()
    };
    // Shared: the embedding and the decoder layers (bf16 = 2 bytes an element, 3 models).
    let largest = blocks.iter().filter(|b| !b.tensors.iter().any(|n| n.starts_with("lm_head"))).map(block_bytes).max();
    let largest_stored = 3 * largest.unwrap();
    let largest_f32 = largest_stored / 3 * 2;
    let head_f32 = 4 * (vocab * hidden + hidden);
    let bound = 2 * largest_stored + 3 * largest_f32 + 2 * 5 * head_f32 + 200_000_000;
    drop(base);

    let texts = ["the cat sat on the mat", "a river flows to the sea", "hello world", "to measure time"];
    let mut tasks = String::new();
    for (k, task) in ["alpha", "beta"].iter().enumerate() {
        tasks += &common::lm_task(tmp.path(), task, &dirs[k + 1], &texts[k..], 16, 8);
    }
    let settings = format!("base_model: {}\nmax_len: 16\nbatch_size: 2\nepochs: 2\n", dirs[0].display());
    let s = common::adapt_streamed(tmp.path(), &settings, &tasks);
    let out = tmp.path().join("adapted");
    let peak = s["peak_rss_bytes"].as_u64().expect("VmHWM is available on Linux");
    let shared = s["streaming"]["shared_bytes"].as_u64().unwrap();
    eprintln!(
        "adapt: {} steps, shared blocks {:.2} GB streamed ({} per step), peak RSS {:.0} MB, bound {:.0} MB, {:.1} s",
        s["steps"],
        shared as f64 / 1e9,
        s["bytes_streamed_per_step"],
        peak as f64 / 1e6,
        bound as f64 / 1e6,
        s["seconds"].as_f64().unwrap()
    );
    assert_eq!(s["streaming"]["mode"], "streamed");
    assert_eq!(s["steps"], 4);
    assert_eq!(s["bytes_streamed_per_step"].as_u64().unwrap(), 2 * shared, "every shared block twice a step");
    assert!(peak < bound, "peak RSS {peak} >= bound {bound}");
    assert!(peak < 1_000_000_000, "peak RSS {peak} is not under 1 GB");
    assert_eq!(s["out_dtype"], "bfloat16", "the models are written in the base's dtype");
    for task in ["alpha", "beta"] {
        let model = Checkpoint::open(out.join("tasks").join(task)).unwrap();
        assert_eq!(model.tensors.len(), 1 + 26 * 9 + 2, "{task}: embedding, 26 layers, norm and head");
        assert!(model.tensors.iter().all(|t| t.dtype == safetensors::Dtype::BF16), "{task}");
    }
}
