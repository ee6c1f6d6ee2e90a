//! Streaming merge throughput on a generated Llama-shaped checkpoint (base + 3 experts, bf16),
//! side by side with the I/O floor: reading the same files start to end, as `cat` does.
//!
//! The inputs are generated once into `target/bench-data/` and reused. Pick the shape with
//! `SYMERGE_BENCH_PRESET` (default `llama-1b`, 1.1B parameters = 8.8 GB of inputs; `llama-tiny`
//! for a quick check). Criterion reports GiB/s of input read; `benches/RESULTS.md` has the ratios.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use symerge::checkpoint::FloatDType;
use symerge::checkpoint::generate::{SyntheticSpec, write_family};
use symerge::merge::config::MergeConfig;
use symerge::merge::executor::{MergeOptions, merge};

const EXPERTS: u32 = 3;

/// The generated family for `preset`, written on first use (a marker file says it is complete).
fn family(preset: &str) -> Vec<PathBuf> {
    let root =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-data").join(format!("{preset}-bf16-k{EXPERTS}"));
    let dirs: Vec<PathBuf> =
        std::iter::once(root.join("base")).chain((1..=EXPERTS).map(|k| root.join(format!("expert-{k}")))).collect();
    let marker = root.join("complete");
    if !marker.is_file() {
        let spec = SyntheticSpec::preset(preset, FloatDType::BF16).unwrap_or_else(|| panic!("unknown preset {preset}"));
        eprintln!("generating {preset} (base + {EXPERTS} experts) into {}", root.display());
        let _ = std::fs::remove_dir_all(&root);
        let written = write_family(&spec, 0, EXPERTS, 0.01, &root, 5_000_000_000).expect("generate bench inputs");
        assert_eq!(written, dirs);
        std::fs::write(&marker, b"").expect("write marker");
    }
    dirs
}

fn weight_files(dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for d in dirs {
        for e in std::fs::read_dir(d).expect("read bench dir") {
            let p = e.expect("dir entry").path();
            if p.extension().is_some_and(|x| x == "safetensors") {
                files.push(p);
            }
        }
    }
    files.sort();
    files
}

/// Reads every file start to end through a 1 MiB buffer: what `cat f > /dev/null` costs.
fn cat(files: &[PathBuf], buf: &mut [u8]) -> u64 {
    let mut total = 0u64;
    for f in files {
        let mut file = std::fs::File::open(f).expect("open");
        loop {
            let n = file.read(buf).expect("read");
            if n == 0 {
                break;
            }
            total += n as u64;
        }
    }
    total
}

fn config(method: &str, dirs: &[PathBuf]) -> MergeConfig {
    let density = if method == "ties" { ", density: 0.2" } else { "" };
    let mut text =
        format!("merge_method: {method}\nbase_model: {}\nparameters: {{lambda: 1.0}}\nmodels:\n", dirs[0].display());
    for d in &dirs[1..] {
        text.push_str(&format!("  - model: {}\n    parameters: {{weight: 0.3{density}}}\n", d.display()));
    }
    MergeConfig::parse(&text, Path::new("bench.yml")).expect("bench config")
}

fn bench_merge(c: &mut Criterion) {
    let preset = std::env::var("SYMERGE_BENCH_PRESET").unwrap_or_else(|_| "llama-1b".into());
    let dirs = family(&preset);
    let files = weight_files(&dirs);
    let input_bytes: u64 = files.iter().map(|f| std::fs::metadata(f).expect("stat").len()).sum();
    let out = dirs[0].parent().expect("bench root").with_file_name(format!("{preset}-out"));

    let mut group = c.benchmark_group(format!("merge/{preset}"));
    group.sample_size(10).measurement_time(Duration::from_secs(1)).warm_up_time(Duration::from_millis(1));
    group.throughput(Throughput::Bytes(input_bytes));
    let mut buf = vec![0u8; 1 << 20];
    group.bench_function("cat (I/O floor)", |b| b.iter(|| cat(&files, &mut buf)));
    for method in ["task_arithmetic", "ties"] {
        let cfg = config(method, &dirs);
        let opts = MergeOptions {
            max_shard_bytes: 5_000_000_000,
            force: true,
            progress: false,
            ..MergeOptions::new(out.clone())
        };
        group.bench_function(method, |b| b.iter(|| merge(&cfg, &opts).expect("merge")));
    }
    group.finish();
    let _ = std::fs::remove_dir_all(&out);
}

criterion_group!(benches, bench_merge);
criterion_main!(benches);
