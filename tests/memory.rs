//! Bounded memory: merging a generated multi-gigabyte checkpoint keeps the merge process's peak
//! resident set (VmHWM, reported by the child process itself) under about four blocks' worth of
//! input, whatever the model size.

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
