//! `merge --device cuda` end to end against `--device cpu`: every method on a small family cut
//! into many tiny units (the staging ring turns over hundreds of times), resident inputs reused
//! across runs, the exact CPU error for a non-finite input, and a multi-GB Llama-shaped family
//! through the CLI. Without a CUDA device each test prints `SKIPPED: no CUDA device (...)`.

mod common;

use common::gpu;

use std::path::Path;

use symerge::backend::cuda::bench::compare_outputs;
use symerge::backend::cuda::stream_merge::{CudaEngine, CudaOptions};
use symerge::checkpoint::FloatDType;
use symerge::checkpoint::generate::{Family, SyntheticSpec, write_family};
use symerge::merge::config::MergeConfig;
use symerge::merge::executor::{MergeOptions, merge, merge_with};

/// The CLI binary: `$SYMERGE_BIN` when the tests run away from the build tree (the GPU check
/// copies prebuilt executables to the device machine), else the one cargo built.
fn symerge_bin() -> std::path::PathBuf {
    std::env::var_os("SYMERGE_BIN").map_or_else(|| env!("CARGO_BIN_EXE_symerge").into(), Into::into)
}

fn opts(out: &Path) -> MergeOptions {
    MergeOptions { max_shard_bytes: 300_000, force: true, progress: false, ..MergeOptions::new(out) }
}

fn config(dir: &Path, method: &str, experts: u32, extra: &str) -> MergeConfig {
    let mut y = format!("merge_method: {method}\n");
    if method != "linear" {
        y.push_str("base_model: base\n");
    }
    y.push_str("models:\n");
    if method == "linear" {
        y.push_str("  - model: base\n    parameters: {weight: 0.5}\n");
    }
    let sparse = method == "ties" || method.starts_with("dare");
    for k in 1..=experts {
        let density = if sparse { format!(", density: {:.2}", [0.5, 0.3, 0.8][k as usize % 3]) } else { String::new() };
        y.push_str(&format!(
            "  - model: expert-{k}\n    parameters: {{weight: {:.2}{density}}}\n",
            0.2 + 0.15 * k as f64
        ));
    }
    y.push_str(extra);
    let path = dir.join(format!("{method}.yml"));
    std::fs::write(&path, y).unwrap();
    MergeConfig::load(&path).unwrap()
}

/// GPU and CPU outputs must be identical bit for bit (the kernels are compiled without FMA
/// contraction and compute in the CPU's order); the bound allows one bf16 rounding in case a
/// conversion differs somewhere.
fn assert_same(gpu_out: &Path, cpu_out: &Path, what: &str) {
    let (differing, worst) = compare_outputs(gpu_out, cpu_out).unwrap();
    assert!(worst <= FloatDType::BF16.epsilon(), "{what}: {differing} tensors differ, max rel diff {worst:e}");
    if differing > 0 {
        eprintln!("{what}: {differing} tensors differ within bf16 rounding (max {worst:e})");
    }
}

#[test]
fn every_method_matches_cpu_through_a_tiny_ring() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = SyntheticSpec::preset("llama-tiny", FloatDType::BF16).unwrap();
    write_family(&spec, 5, 3, 0.01, tmp.path(), 200_000).unwrap();
    // The CPU references first (cheap): their configs are then checked on every machine.
    let methods = [
        ("task_arithmetic", "parameters: {lambda: 0.7}\n"),
        ("ties", "parameters: {lambda: 1.0}\n"),
        ("dare_linear", "parameters: {seed: 11}\n"),
        ("dare_ties", "parameters: {seed: 12}\ndtype: float32\n"),
        ("linear", ""),
    ];
    let cfgs: Vec<_> = methods
        .iter()
        .map(|(method, extra)| {
            let cfg = config(tmp.path(), method, 3, extra);
            merge(&cfg, &opts(&tmp.path().join(format!("{method}-cpu")))).unwrap();
            (*method, cfg)
        })
        .collect();
    let Some(gpu) = gpu() else { return };
    for (method, cfg) in cfgs {
        let cpu_out = tmp.path().join(format!("{method}-cpu"));
        // Staged through pinned slots (small and large units), and straight from page-locked maps.
        for (unit, register_inputs) in [(64 << 10, false), (1 << 30, false), (64 << 10, true)] {
            let gpu_out = tmp.path().join(format!("{method}-gpu-{unit}-{register_inputs}"));
            let mut engine =
                CudaEngine::new(&gpu, CudaOptions { unit_bytes: Some(unit), register_inputs, ..Default::default() });
            let summary = merge_with(&cfg, &opts(&gpu_out), &mut engine).unwrap();
            assert!(summary.device.starts_with("cuda"), "{}", summary.device);
            let stats = engine.last.clone().unwrap();
            if unit < 1 << 20 && method != "ties" {
                assert!(stats.units > 10, "{method}: only {} units", stats.units);
            }
            assert_same(&gpu_out, &cpu_out, &format!("{method} unit {unit} register {register_inputs}"));
        }
    }
}

#[test]
fn resident_inputs_are_reused_across_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = SyntheticSpec::preset("llama-tiny", FloatDType::BF16).unwrap();
    write_family(&spec, 6, 2, 0.01, tmp.path(), 1 << 30).unwrap();
    let cfg = config(tmp.path(), "task_arithmetic", 2, "");
    let cpu_out = tmp.path().join("cpu");
    merge(&cfg, &opts(&cpu_out)).unwrap();
    let Some(gpu) = gpu() else { return };
    let mut engine = CudaEngine::new(&gpu, CudaOptions { device_mem: Some(4 << 30), ..Default::default() });
    for run in 0..2 {
        let out = tmp.path().join(format!("gpu-{run}"));
        merge_with(&cfg, &opts(&out), &mut engine).unwrap();
        let stats = engine.last.clone().unwrap();
        assert!(stats.resident);
        assert_eq!(stats.reused_resident, run == 1);
        assert_same(&out, &cpu_out, &format!("resident run {run}"));
    }
}

#[test]
fn non_finite_input_gives_the_cpu_error() {
    use common::T;
    use safetensors::Dtype;
    let tmp = tempfile::tempdir().unwrap();
    let n = 5000;
    let vals = |s: u64| common::randoms(s, n, 0.1);
    common::write_model(&tmp.path().join("base"), &[T::new("w", Dtype::BF16, &[50, 100], vals(1))]);
    let mut bad = vals(2);
    bad[4321] = f64::NAN;
    common::write_model(&tmp.path().join("expert-1"), &[T::new("w", Dtype::BF16, &[50, 100], bad)]);
    let cfg = config(tmp.path(), "task_arithmetic", 1, "");
    let cpu = merge(&cfg, &opts(&tmp.path().join("cpu"))).unwrap_err().to_string();
    assert!(cpu.contains("4321"), "{cpu}");
    let Some(gpu) = gpu() else { return };
    let gpu_err =
        symerge::backend::cuda::stream_merge::merge(&cfg, &opts(&tmp.path().join("gpu")), &gpu, CudaOptions::default())
            .unwrap_err()
            .to_string();
    assert_eq!(gpu_err, cpu);
    assert!(!tmp.path().join("gpu").exists(), "no partial output");
}

/// The end-to-end check: a generated multi-GB Llama-shaped family (llama-1b shapes,
/// base + 3 experts in bf16: 8.8 GB in) merged by the CLI on both devices.
#[test]
fn cli_merge_on_a_multi_gb_checkpoint_matches_cpu() {
    let Some(_gpu) = gpu() else { return };
    let dir = std::env::var_os("SYMERGE_GPU_TEST_DIR").map_or_else(std::env::temp_dir, Into::into);
    let tmp = tempfile::tempdir_in(dir).unwrap();
    let fam = tmp.path().join("fam");
    let spec = SyntheticSpec::preset("llama-1b", FloatDType::BF16).unwrap();
    write_family(&spec, 0, 3, 0.01, &fam, 2_000_000_000).unwrap();
    let cfg = config(&fam, "task_arithmetic", 3, "parameters: {lambda: 0.9}\n");
    let cfg_path = cfg.source.clone();
    for device in ["cuda", "cpu"] {
        let out = tmp.path().join(device);
        let run = std::process::Command::new(symerge_bin())
            .args([
                "merge",
                cfg_path.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
                "--device",
                device,
                "--json",
                "-q",
            ])
            .output()
            .unwrap();
        let (stdout, err) = (String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
        assert!(run.status.success(), "{device}: {err}");
        let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        eprintln!("{device}: {:.2}s, {:.2} GB/s", summary["seconds"], summary["read_gb_per_s"]);
        assert!(summary["device"].as_str().unwrap().starts_with(device));
    }
    assert_same(&tmp.path().join("cuda"), &tmp.path().join("cpu"), "llama-1b task_arithmetic");
}

/// The methods whose kernels take the CPU pre-pass's statistics (SLERP, Breadcrumbs with and
/// without TIES, SCE), end to end against the CPU engine: tensors cut into many small units and
/// in one large unit. Their kernels are elementwise in the CPU's order, so the bytes must match.
#[test]
fn prepared_methods_match_cpu_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = SyntheticSpec::preset("llama-tiny", FloatDType::BF16).unwrap();
    write_family(&spec, 7, 3, 0.01, tmp.path(), 200_000).unwrap();
    let crumbs = |method: &str, rescale: bool| {
        let mut y = format!("merge_method: {method}\nbase_model: base\nmodels:\n");
        for (k, (d, g)) in [(0.5, 0.01), (0.3, 0.05), (0.8, 0.02)].iter().enumerate() {
            y += &format!(
                "  - model: expert-{}\n    parameters: {{weight: 0.{}, density: {d}, gamma: {g}}}\n",
                k + 1,
                k + 4
            );
        }
        y + &format!("parameters: {{rescale: {rescale}}}\n")
    };
    let configs = [
        ("slerp", "merge_method: slerp\nbase_model: base\nmodels:\n  - model: base\n  - model: expert-1\nparameters: {t: 0.3}\n".to_string()),
        ("breadcrumbs", crumbs("breadcrumbs", false)),
        ("breadcrumbs_rescale", crumbs("breadcrumbs", true)),
        ("breadcrumbs_ties", crumbs("breadcrumbs_ties", true)),
        ("sce", "merge_method: sce\nbase_model: base\nmodels:\n  - model: expert-1\n  - model: expert-2\n  - model: expert-3\nparameters: {select_topk: 0.5}\ndtype: float32\n".to_string()),
    ];
    merges_match_cpu_bit_for_bit(tmp.path(), &configs);
}

/// DELLA end to end (`della` with and without rescale, `della_linear`, K = 1 and 3) against the
/// CPU engine, in many small units (tensors cut between rows) and in one: the bytes must match.
/// A second family has a 20000-column MLP row, longer than the kernel's shared-memory sort
/// (16384 at K = 3 on H100/H200): those tensors go to the CPU inside the GPU run (one warning
/// line), the rest to the kernel, and the output must still be the CPU's.
#[test]
fn della_methods_match_cpu_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let tiny = SyntheticSpec::preset("llama-tiny", FloatDType::BF16).unwrap();
    let wide = SyntheticSpec {
        family: Family::Llama,
        vocab: 64,
        hidden: 8,
        intermediate: 20_000,
        layers: 1,
        heads: 2,
        kv_heads: 2,
        dtype: FloatDType::BF16,
    };
    let della = |method: &str, experts: usize, rescale: bool, dir: &str| {
        let mut y = format!("merge_method: {method}\nbase_model: {dir}/base\nmodels:\n");
        for (k, (d, e)) in [(0.5, 0.1), (0.3, 0.2), (1.0, 0.0)].iter().take(experts).enumerate() {
            y += &format!(
                "  - model: {dir}/expert-{}\n    parameters: {{weight: 0.{}, density: {d}, epsilon: {e}}}\n",
                k + 1,
                k + 4
            );
        }
        y + &format!("parameters: {{rescale: {rescale}, seed: 3}}\n")
    };
    write_family(&tiny, 9, 3, 0.01, &tmp.path().join("tiny"), 200_000).unwrap();
    write_family(&wide, 10, 3, 0.01, &tmp.path().join("wide"), 2_000_000).unwrap();
    let configs = [
        ("della", della("della", 3, true, "tiny")),
        ("della_norescale", della("della", 3, false, "tiny")),
        ("della_linear", della("della_linear", 3, true, "tiny")),
        ("della_k1", della("della", 1, true, "tiny")),
        ("della_wide", della("della", 3, true, "wide")),
    ];
    merges_match_cpu_bit_for_bit(tmp.path(), &configs);
}

/// Merges each `(name, yaml)` on the CPU (in `dir`), then, with a GPU, on the CUDA engine in
/// many small units and in one, and asserts the output bytes are the CPU's.
fn merges_match_cpu_bit_for_bit(dir: &Path, configs: &[(&str, String)]) {
    let cfgs: Vec<_> = configs
        .iter()
        .map(|(name, yaml)| {
            let path = dir.join(format!("{name}.yml"));
            std::fs::write(&path, yaml).unwrap();
            let cfg = MergeConfig::load(&path).unwrap();
            merge(&cfg, &opts(&dir.join(format!("{name}-cpu")))).unwrap();
            (*name, cfg)
        })
        .collect();
    let Some(gpu) = gpu() else { return };
    for (name, cfg) in cfgs {
        for unit in [64 << 10, 1 << 30] {
            let gpu_out = dir.join(format!("{name}-gpu-{unit}"));
            let mut engine = CudaEngine::new(&gpu, CudaOptions { unit_bytes: Some(unit), ..Default::default() });
            let summary = merge_with(&cfg, &opts(&gpu_out), &mut engine).unwrap();
            assert!(summary.device.starts_with("cuda"), "{name}: {}", summary.device);
            let (differing, worst) = compare_outputs(&gpu_out, &dir.join(format!("{name}-cpu"))).unwrap();
            assert_eq!((differing, worst), (0, 0.0), "{name}, units of {unit} bytes");
        }
    }
}
