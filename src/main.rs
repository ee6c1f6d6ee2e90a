//! The `symerge` command line: parses arguments and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use symerge::backend::cuda::stream_merge::CudaOptions;
use symerge::backend::cuda::{DeviceSpec, Resolved};
use symerge::backend::{Cpu, Device};
use symerge::checkpoint::FloatDType;
use symerge::checkpoint::generate::{PRESETS, SyntheticSpec, write_family};
use symerge::merge::METHODS;
use symerge::merge::config::MergeConfig;
use symerge::merge::executor::{MergeOptions, merge};
use symerge::model::{DEFAULT_MAX_LEN, LoadOptions, NewHead, SequenceClassifier, evaluate, predict};

#[derive(Parser)]
#[command(name = "symerge", version, about = "Merge fine-tuned transformer checkpoints at LLM scale")]
struct Cli {
    /// More log output (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Worker threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show a checkpoint's architecture, blocks, tensors, parameters, dtypes and bytes.
    Inspect {
        /// A .safetensors file, a *.index.json, or a model directory.
        path: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Training-free merge from a mergekit-style YAML config.
    Merge {
        config: PathBuf,
        /// Output directory (written atomically: it appears only when complete).
        #[arg(short, long)]
        output: PathBuf,
        /// Output dtype (float32, float16, bfloat16); default: the config's, else the inputs'.
        #[arg(long)]
        dtype: Option<FloatDType>,
        /// Largest shard, e.g. 5GB, 500MB, 2GiB.
        #[arg(long, default_value = "5GB", value_parser = parse_size)]
        out_shard_size: u64,
        /// Replace an existing output directory.
        #[arg(long)]
        force: bool,
        /// Print a JSON summary on stdout.
        #[arg(long)]
        json: bool,
        /// No progress bar or progress lines.
        #[arg(short, long)]
        quiet: bool,
        /// Where the math runs: auto (a CUDA device if usable, else the CPU), cpu, cuda, cuda:N.
        #[arg(long, default_value = "auto")]
        device: DeviceSpec,
        /// Device memory the GPU merge may use, e.g. 20GB (default: what is free, less 2 GB).
        /// When it holds every input, inputs stay resident on the device.
        #[arg(long, value_parser = parse_size)]
        device_mem: Option<u64>,
    },
    /// Measure the CUDA engine: copy ceilings, kernels, streaming merge vs the CPU path.
    BenchCuda {
        /// Synthetic family for the streaming merge (see `symerge generate --list`).
        #[arg(long, default_value = "llama-7b")]
        preset: String,
        #[arg(long, default_value_t = 2)]
        experts: u32,
        /// Where the family is generated (reused when present) and merged.
        #[arg(long, default_value = "/tmp/symerge-bench")]
        dir: PathBuf,
        /// Elements per tensor in the kernel timings.
        #[arg(long, default_value_t = 1 << 27)]
        kernel_elems: usize,
        /// Timed repeats per kernel (median reported).
        #[arg(long, default_value_t = 20)]
        repeats: usize,
        /// Kernels and copy rates only.
        #[arg(long)]
        skip_stream: bool,
        /// Skip the CPU merge (wall time and output comparison).
        #[arg(long)]
        skip_cpu: bool,
        /// Keep the merged outputs.
        #[arg(long)]
        keep_outputs: bool,
        /// CUDA device ordinal.
        #[arg(long, default_value_t = 0)]
        gpu: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Also write the JSON report to this file.
        #[arg(long)]
        report: Option<PathBuf>,
    },
    /// List the merge methods and their parameters.
    Methods,
    /// Class scores for every text of a JSON-lines file (a `text` field per line).
    Predict {
        /// Model directory: config.json, safetensors weights, tokenizer.json.
        model: PathBuf,
        /// JSON lines with a `text` field (other fields are ignored).
        #[arg(long)]
        inputs: PathBuf,
        /// Output JSON lines, one per input in order, with `logits`, `probs` and `pred`
        /// (written atomically).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        run: InferenceArgs,
    },
    /// Accuracy and mean cross-entropy on a labelled JSON-lines file (`text` and `label` fields).
    Eval {
        model: PathBuf,
        /// JSON lines with `text` and `label` (a name from config.json's label2id, or an index).
        #[arg(long)]
        inputs: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        run: InferenceArgs,
    },
    /// Write a seeded synthetic base model and experts (for tests and benchmarks).
    Generate {
        /// Shape preset (see `symerge generate --list`).
        #[arg(long, default_value = "llama-tiny")]
        preset: String,
        /// Output directory; gets base/ and expert-1/ .. expert-K/.
        #[arg(short, long, required_unless_present = "list")]
        output: Option<PathBuf>,
        #[arg(long, default_value = "bfloat16")]
        dtype: FloatDType,
        #[arg(long, default_value_t = 3)]
        experts: u32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Size of the experts' task vectors (uniform in +-scale).
        #[arg(long, default_value_t = 0.01)]
        delta_scale: f32,
        #[arg(long, default_value = "5GB", value_parser = parse_size)]
        out_shard_size: u64,
        /// List the presets.
        #[arg(long)]
        list: bool,
    },
}

/// Options shared by the commands that run a model.
#[derive(clap::Args)]
struct InferenceArgs {
    /// Texts per forward pass.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Truncate texts to this many tokens (including [CLS] and [SEP]).
    #[arg(long, default_value_t = DEFAULT_MAX_LEN)]
    max_len: usize,
    /// Where the math runs: cpu or cuda.
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Add a new, seeded random classification head with N labels (e.g. to a bare pretrained
    /// encoder); replaces the checkpoint's classifier if it has one.
    #[arg(long, value_name = "N")]
    new_head: Option<usize>,
    /// Seed of the new head's weights.
    #[arg(long, default_value_t = 0)]
    head_seed: u64,
}

impl InferenceArgs {
    fn load(&self, model: &std::path::Path) -> anyhow::Result<SequenceClassifier<Cpu>> {
        if self.device == Device::Cuda {
            bail!("the CUDA backend is not built yet; use --device cpu");
        }
        let opts =
            LoadOptions { new_head: self.new_head.map(|num_labels| NewHead { num_labels, seed: self.head_seed }) };
        let clf = SequenceClassifier::load(Cpu, model, self.max_len, opts)?;
        if clf.model.num_labels().is_none() {
            bail!(
                "{} has no classification head (classifier.weight); pass --new-head N to add a seeded random one",
                model.display()
            );
        }
        Ok(clf)
    }
}

/// One line of an inputs file.
struct InputLine {
    line: usize,
    text: String,
    label: Option<serde_json::Value>,
}

/// Reads JSON lines with a string `text` field (and `label` when `want_label`); blank lines are
/// skipped, anything else that is not such an object is an error naming the line.
fn read_jsonl(path: &std::path::Path, want_label: bool) -> anyhow::Result<Vec<InputLine>> {
    let data = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, raw) in data.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let mut v: serde_json::Value =
            serde_json::from_str(raw).with_context(|| format!("{}:{line}: not a JSON object", path.display()))?;
        let Some(obj) = v.as_object_mut() else { bail!("{}:{line}: not a JSON object", path.display()) };
        let text = match obj.remove("text") {
            Some(serde_json::Value::String(t)) => t,
            Some(other) => bail!("{}:{line}: field `text` must be a string, got {other}", path.display()),
            None => bail!("{}:{line}: missing field `text`", path.display()),
        };
        let label = obj.remove("label");
        if want_label && label.is_none() {
            bail!("{}:{line}: missing field `label`", path.display());
        }
        out.push(InputLine { line, text, label });
    }
    Ok(out)
}

/// A `label` value as a class index: an integer, or a name from config.json's `label2id`.
fn label_index(
    v: &serde_json::Value,
    clf: &SequenceClassifier<Cpu>,
    path: &std::path::Path,
    line: usize,
) -> anyhow::Result<usize> {
    let n = clf.model.num_labels().unwrap_or(0);
    let idx = match v {
        serde_json::Value::Number(x) => match x.as_u64() {
            Some(i) => i as usize,
            None => bail!("{}:{line}: label {x} is not a class index", path.display()),
        },
        serde_json::Value::String(name) => match clf.label2id() {
            Some(map) => match map.get(name) {
                Some(&i) => i,
                None => {
                    let known: Vec<&str> = map.keys().map(String::as_str).collect();
                    bail!(
                        "{}:{line}: unknown label `{name}` (config.json label2id has: {})",
                        path.display(),
                        known.join(", ")
                    )
                }
            },
            None => bail!(
                "{}:{line}: unknown label `{name}`: config.json has no label2id, so labels must be class indices",
                path.display()
            ),
        },
        other => bail!("{}:{line}: label must be a name or an index, got {other}", path.display()),
    };
    if idx >= n {
        bail!("{}:{line}: label {idx} is outside the model's {n} classes", path.display());
    }
    Ok(idx)
}

/// Writes `text` to `path` through a temporary file in the same directory, so `path` appears
/// only complete.
fn write_atomically(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    let mut tmp =
        tempfile::NamedTempFile::new_in(dir).with_context(|| format!("creating a file in {}", dir.display()))?;
    tmp.write_all(text.as_bytes()).with_context(|| format!("writing {}", tmp.path().display()))?;
    tmp.as_file().sync_all().with_context(|| format!("writing {}", tmp.path().display()))?;
    tmp.persist(path).with_context(|| format!("renaming onto {}", path.display()))?;
    Ok(())
}

/// Parses `5GB`, `500MB`, `2GiB`, `1048576`.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| format!("`{s}` is not a size (e.g. 5GB, 500MB, 2GiB)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" | "k" => 1e3,
        "mb" | "m" => 1e6,
        "gb" | "g" => 1e9,
        "tb" | "t" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024f64.powi(2),
        "gib" => 1024f64.powi(3),
        "tib" => 1024f64.powi(4),
        other => return Err(format!("unknown size unit `{other}` in `{s}`")),
    };
    let bytes = value * mult;
    if bytes < 1.0 {
        return Err(format!("size `{s}` must be at least one byte"));
    }
    Ok(bytes as u64)
}

/// Writes to stdout; a closed pipe (`symerge inspect X | head`) is not an error.
fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(n) = cli.threads {
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("setting up worker threads")?;
    }
    match cli.command {
        Command::Inspect { path, json } => {
            let info = symerge::inspect::inspect(&path)?;
            if json {
                emit(&format!("{}\n", serde_json::to_string_pretty(&info)?))?;
            } else {
                emit(&info.to_string())?;
            }
        }
        Command::Merge { config, output, dtype, out_shard_size, force, json, quiet, device, device_mem } => {
            let cfg = MergeConfig::load(&config)?;
            tracing::info!("merging {} model(s) with {} into {}", cfg.models.len(), cfg.method.name, output.display());
            let opts =
                MergeOptions { output, max_shard_bytes: out_shard_size, out_dtype: dtype, force, progress: !quiet };
            let resolved = match (device, symerge::backend::cuda::stream_merge::unsupported(&cfg)) {
                (DeviceSpec::Auto, Some(why)) => {
                    tracing::info!("--device auto: using the CPU ({why})");
                    Resolved::Cpu { reason: Some(why) }
                }
                (DeviceSpec::Cuda(_), Some(why)) => bail!("{why}; use --device cpu"),
                _ => symerge::backend::cuda::resolve(device)?,
            };
            let summary = match resolved {
                Resolved::Cpu { .. } => merge(&cfg, &opts)?,
                Resolved::Cuda(gpu) => symerge::backend::cuda::stream_merge::merge(
                    &cfg,
                    &opts,
                    &gpu,
                    CudaOptions { device_mem, ..Default::default() },
                )?,
            };
            if json {
                emit(&format!("{}\n", serde_json::to_string_pretty(&summary)?))?;
            } else {
                tracing::info!(
                    "wrote {} ({} tensors, {} shard(s)) in {:.1}s, read {:.2} GB at {:.2} GB/s",
                    summary.output.display(),
                    summary.tensors,
                    summary.shards,
                    summary.seconds,
                    summary.bytes_read as f64 / 1e9,
                    summary.read_gb_per_s
                );
            }
        }
        Command::BenchCuda {
            preset,
            experts,
            dir,
            kernel_elems,
            repeats,
            skip_stream,
            skip_cpu,
            keep_outputs,
            gpu,
            json,
            report: report_path,
        } => {
            let gpu = match symerge::backend::cuda::resolve(DeviceSpec::Cuda(gpu))? {
                Resolved::Cuda(g) => g,
                Resolved::Cpu { .. } => bail!("bench-cuda needs a CUDA device"),
            };
            let opts = symerge::backend::cuda::bench::BenchOptions {
                preset,
                experts,
                dir,
                kernel_elems,
                skip_stream,
                skip_cpu,
                keep_outputs,
                repeats,
            };
            let report = symerge::backend::cuda::bench::run(&gpu, &opts)?;
            if let Some(path) = report_path {
                write_atomically(&path, &serde_json::to_string_pretty(&report)?)?;
            }
            if json {
                emit(&format!("{}\n", serde_json::to_string_pretty(&report)?))?;
            } else {
                emit(&report.to_string())?;
            }
        }
        Command::Methods => {
            for m in METHODS {
                let mut params: Vec<&str> = m.global_params.to_vec();
                params.extend(m.model_params);
                println!("{:<16} {}", m.name, m.summary);
                println!(
                    "{:<16} parameters: {}{}",
                    "",
                    params.join(", "),
                    if m.needs_base { "; needs base_model" } else { "" }
                );
            }
        }
        Command::Predict { model, inputs, out, run } => {
            let lines = read_jsonl(&inputs, false)?;
            let clf = run.load(&model)?;
            let start = std::time::Instant::now();
            let texts: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
            let preds = predict(&clf, &texts, run.batch_size)?;
            let mut text = String::new();
            for p in &preds {
                let best = p.probs.iter().enumerate().fold(0, |b, (i, &v)| if v > p.probs[b] { i } else { b });
                let row = serde_json::json!({ "logits": p.logits, "probs": p.probs, "pred": best });
                text.push_str(&row.to_string());
                text.push('\n');
            }
            write_atomically(&out, &text)?;
            tracing::info!(
                "wrote {} predictions to {} in {:.1}s",
                preds.len(),
                out.display(),
                start.elapsed().as_secs_f64()
            );
        }
        Command::Eval { model, inputs, json, run } => {
            let lines = read_jsonl(&inputs, true)?;
            let clf = run.load(&model)?;
            let mut labels = Vec::with_capacity(lines.len());
            for l in &lines {
                let v = l.label.as_ref().context("label checked when reading")?;
                labels.push(label_index(v, &clf, &inputs, l.line)?);
            }
            let texts: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
            let report = evaluate(&clf, &texts, &labels, run.batch_size)?;
            if json {
                emit(&format!("{}\n", serde_json::to_string_pretty(&report)?))?;
            } else {
                emit(&format!(
                    "accuracy {:.4} ({} examples), mean cross-entropy {:.4}\n",
                    report.accuracy, report.examples, report.mean_ce
                ))?;
            }
        }
        Command::Generate { preset, output, dtype, experts, seed, delta_scale, out_shard_size, list } => {
            if list {
                for (name, what) in PRESETS {
                    println!("{name:<12} {what}");
                }
                return Ok(());
            }
            let Some(output) = output else { bail!("--output is required") };
            let Some(spec) = SyntheticSpec::preset(&preset, dtype) else {
                let names: Vec<&str> = PRESETS.iter().map(|p| p.0).collect();
                bail!("unknown preset `{preset}` (available: {})", names.join(", "));
            };
            tracing::info!("writing {} params x {} models to {}", spec.num_params(), experts + 1, output.display());
            let dirs = write_family(&spec, seed, experts, delta_scale, &output, out_shard_size)?;
            for d in dirs {
                println!("{}", d.display());
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
