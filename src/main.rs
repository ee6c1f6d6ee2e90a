//! The `symerge` command line: parses arguments and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
use clap::{Parser, Subcommand};
use symerge::adapt::report::{ReportOptions, evaluate_adapted, is_adapt_output};
use symerge::adapt::train::AdaptArgs;
use symerge::backend::Device;
use symerge::backend::cuda::bench::BenchOptions;
use symerge::checkpoint::generate::{GenerateOptions, preset_list};
use symerge::data::PrepareArgs;
use symerge::data::jsonl::read_jsonl;
use symerge::dist::check::CheckOptions;
use symerge::labels::produce::CacheLabelsArgs;
use symerge::merge::engine::MergeArgs;
use symerge::model::{
    Bert, CausalLm, DEFAULT_MAX_LEN, FinetuneOptions, LoadOptions, NewHead, PredictSummary, SequenceClassifier,
    check_predictions_output, evaluate, evaluate_lm, finetune, finetune_lm, is_causal_lm_dir, predict,
    write_predictions,
};
use symerge::report::{emit, emit_json, emit_report};
use symerge::with_backend;

#[derive(Parser)]
#[command(name = "symerge", version, about = "Merge fine-tuned transformer checkpoints at LLM scale")]
struct Cli {
    /// More log output (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// No progress bars or progress lines, and warnings and errors only, for every command.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
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
        #[command(flatten)]
        args: MergeArgs,
        /// Print a JSON summary on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Measure the CUDA engine: copy ceilings, kernels, streaming merge vs the CPU path.
    BenchCuda {
        #[command(flatten)]
        opts: BenchOptions,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List the merge methods and their parameters.
    Methods {
        /// Print the list as JSON.
        #[arg(long)]
        json: bool,
    },
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
        /// Replace an existing --out, when it is an earlier predictions file.
        #[arg(long)]
        force: bool,
        /// Print a JSON summary on stdout.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        run: InferenceArgs,
    },
    /// Accuracy and mean cross-entropy on a labelled JSON-lines file (`text` and `label` fields);
    /// for a causal LM (Llama, Mistral, Qwen2), perplexity, mean next-token loss and top-1
    /// next-token accuracy over `text`.
    Eval {
        /// A classifier checkpoint, or the output directory of `symerge adapt` (then every task
        /// is scored with its own checkpoint and, for comparison, its expert).
        model: PathBuf,
        /// JSON lines with `text` and `label` (a name from config.json's label2id, or an index);
        /// a causal LM needs only `text`. Not needed for an adapt output: each task's recorded
        /// inputs are used.
        #[arg(long)]
        inputs: Option<PathBuf>,
        /// Adapt output only: labelled data for one task instead of its recorded inputs.
        #[arg(long, value_name = "TASK=PATH", value_parser = parse_task_path)]
        task_inputs: Vec<(String, PathBuf)>,
        /// Adapt output only: skip scoring the experts.
        #[arg(long)]
        no_experts: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        run: InferenceArgs,
    },
    /// Fine-tune every weight of a BERT-family classifier on labelled JSON lines, or of a
    /// Llama-family causal LM on texts (next-token loss), writing a Hugging Face checkpoint
    /// directory (an expert for merging).
    Finetune {
        /// Pretrained model directory: a BERT-family encoder (e.g. MiniLM), which gets a new
        /// seeded classification head replacing any it has, or a Llama-family causal LM (its
        /// config.json's model_type says which).
        base: PathBuf,
        #[command(flatten)]
        opts: FinetuneOptions,
        /// Where the math runs: auto (a CUDA device if usable, else the CPU), cpu, cuda (under a
        /// launcher the GPU of LOCAL_RANK), cuda:N.
        #[arg(long, default_value = "auto")]
        device: Device,
        /// Print a JSON summary on stdout.
        #[arg(long)]
        json: bool,
    },
    /// A Llama-family GGUF file (llama.cpp) as a Hugging Face checkpoint directory: weights
    /// dequantized to f32 (F32, F16, BF16, Q4_0, Q4_1, Q8_0), config.json, tokenizer.json.
    ImportGguf {
        file: PathBuf,
        /// Output directory (written atomically).
        #[arg(short, long)]
        output: PathBuf,
        /// Replace an existing output directory that symerge wrote (it holds .symerge-output) or
        /// that is empty; anything else is refused.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// Write a seeded synthetic base model and experts (for tests and benchmarks).
    Generate {
        #[command(flatten)]
        opts: GenerateOptions,
        /// Print a JSON summary on stdout (the model directories otherwise, one per line).
        #[arg(long)]
        json: bool,
    },
    /// Labelled text data sets.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// Form the communicator from the launcher's environment (torchrun or SLURM variables; none
    /// means one process), all-reduce a test tensor on every rank and check the sum.
    DistCheck {
        #[command(flatten)]
        opts: CheckOptions,
        /// Print a JSON line instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run an expert over its task's inputs once and cache its soft labels on disk (resumable;
    /// reused when the cache already matches the expert and the inputs).
    CacheLabels {
        #[command(flatten)]
        args: CacheLabelsArgs,
        #[arg(long)]
        json: bool,
    },
    /// SyMerge (Lambda + one layer per task, expert soft labels) or AdaMerging (Lambda, entropy)
    /// from a YAML config; writes lambda.json, tasks/<task>/ models, train_log.jsonl, summary.json.
    /// A causal-LM base model adapts against the experts' top-k next-token caches.
    Adapt {
        #[command(flatten)]
        args: AdaptArgs,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Build train/validation/test JSONL files for real text tasks from unpacked Debian packages
    /// (wordnet-base, fortunes, fortunes-{de,it,pl,cs,eo}; scripts/fetch-assets.sh fetches them).
    Prepare {
        #[command(flatten)]
        args: PrepareArgs,
        /// Print a JSON summary on stdout.
        #[arg(long)]
        json: bool,
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
    /// Where the math runs: auto (a CUDA device if usable, else the CPU), cpu, cuda (under a
    /// launcher the GPU of LOCAL_RANK), cuda:N.
    #[arg(long, default_value = "auto")]
    device: Device,
    /// Add a new, seeded random classification head with N labels (e.g. to a bare pretrained
    /// encoder); replaces the checkpoint's classifier if it has one.
    #[arg(long, value_name = "N")]
    new_head: Option<usize>,
    /// Seed of the new head's weights.
    #[arg(long, default_value_t = 0)]
    head_seed: u64,
    /// Use this fine-tuned model's head (pooler, classifier, label names) on MODEL's encoder,
    /// e.g. to score a merged encoder on one task.
    #[arg(long, value_name = "EXPERT", conflicts_with = "new_head")]
    head_from: Option<PathBuf>,
}

impl InferenceArgs {
    fn load_lm<B: symerge::backend::Backend + Clone>(
        &self,
        be: B,
        model: &std::path::Path,
    ) -> anyhow::Result<CausalLm<B>> {
        if self.new_head.is_some() || self.head_from.is_some() {
            bail!("{} is a causal LM: --new-head and --head-from apply to classifiers only", model.display());
        }
        Ok(CausalLm::load(be, model, self.max_len)?)
    }

    fn load<B: symerge::backend::Backend + Clone>(
        &self,
        be: B,
        model: &std::path::Path,
    ) -> anyhow::Result<SequenceClassifier<B>> {
        let opts =
            LoadOptions { new_head: self.new_head.map(|num_labels| NewHead { num_labels, seed: self.head_seed }) };
        let mut clf = SequenceClassifier::load(be.clone(), model, self.max_len, opts)?;
        if let Some(expert) = &self.head_from {
            clf.model.use_head_of(Bert::load(be, expert, LoadOptions::default())?)?;
        }
        if clf.model.num_labels().is_none() {
            bail!(
                "{} has no classification head (classifier.weight); pass --new-head N to add a seeded random one",
                model.display()
            );
        }
        Ok(clf)
    }
}

/// The data file of an `eval` on one model (not an adapt output), rejecting adapt-only flags.
fn plain_eval_inputs(
    model: &std::path::Path,
    inputs: Option<PathBuf>,
    task_inputs: &[(String, PathBuf)],
    no_experts: bool,
) -> anyhow::Result<PathBuf> {
    if !task_inputs.is_empty() || no_experts {
        bail!("--task-inputs and --no-experts apply to an adapt output directory only");
    }
    inputs
        .ok_or_else(|| anyhow::anyhow!("--inputs DATA.jsonl is required (JSON lines to score {} on)", model.display()))
}

/// Parses `TASK=PATH`.
fn parse_task_path(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((task, path)) if !task.is_empty() && !path.is_empty() => Ok((task.to_string(), PathBuf::from(path))),
        _ => Err(format!("`{s}` is not TASK=PATH")),
    }
}

/// Writes to stdout; a closed pipe (`symerge inspect X | head`) is not an error.
fn init_logging(verbose: u8, quiet: bool) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        _ if quiet => "warn",
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Inspect { path, json } => {
            let info = symerge::inspect::inspect(&path)?;
            emit_report(&info, json)?;
        }
        Command::Merge { mut args, json } => {
            args.opts.progress = !cli.quiet;
            emit_report(&args.run()?, json)?;
        }
        Command::BenchCuda { opts, json } => emit_report(&opts.run()?, json)?,
        Command::Methods { json } => emit_report(&symerge::merge::catalog::catalog(), json)?,
        Command::Predict { model, inputs, out, force, json, run } => {
            if is_causal_lm_dir(&model)? {
                bail!(
                    "{} is a causal LM: predict scores sequence classifiers; `symerge eval` reports its perplexity",
                    model.display()
                );
            }
            check_predictions_output(&out, &[&model, &inputs], force)?;
            let lines = read_jsonl(&inputs)?;
            let start = std::time::Instant::now();
            let texts: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
            let preds = with_backend!(run.device, |be| predict(&run.load(be, &model)?, &texts, run.batch_size)?);
            write_predictions(&out, &preds)?;
            let summary =
                PredictSummary { output: out, predictions: preds.len(), seconds: start.elapsed().as_secs_f64() };
            emit_report(&summary, json)?;
        }
        Command::Eval { model, inputs, task_inputs, no_experts, json, run } if is_adapt_output(&model) => {
            if inputs.is_some() {
                bail!("{} is an adapt output: name data per task with --task-inputs TASK=PATH", model.display());
            }
            let opts = ReportOptions {
                data: task_inputs.into_iter().collect(),
                experts: !no_experts,
                batch_size: run.batch_size,
                max_len: run.max_len,
            };
            let report = with_backend!(run.device, |be| evaluate_adapted(be, &model, &opts)?);
            emit_report(&report, json)?;
        }
        Command::Eval { model, inputs, task_inputs, no_experts, json, run } if is_causal_lm_dir(&model)? => {
            let inputs = plain_eval_inputs(&model, inputs, &task_inputs, no_experts)?;
            let lines = read_jsonl(&inputs)?;
            let texts: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
            let report =
                with_backend!(run.device, |be| evaluate_lm(&run.load_lm(be, &model)?, &texts, run.batch_size)?);
            emit_report(&report, json)?;
        }
        Command::Eval { model, inputs, task_inputs, no_experts, json, run } => {
            let inputs = plain_eval_inputs(&model, inputs, &task_inputs, no_experts)?;
            let lines = read_jsonl(&inputs)?;
            let texts: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
            let report = with_backend!(run.device, |be| {
                let clf = run.load(be, &model)?;
                evaluate(&clf, &texts, &clf.label_ids(&lines, &inputs)?, run.batch_size)?
            });
            emit_report(&report, json)?;
        }
        Command::Finetune { base, opts, device, json } => {
            if is_causal_lm_dir(&base)? {
                let summary = with_backend!(device, |be| finetune_lm(be, &base, &opts)?);
                return Ok(emit_report(&summary, json)?);
            }
            let summary = with_backend!(device, |be| finetune(be, &base, &opts)?);
            emit_report(&summary, json)?;
        }
        Command::ImportGguf { file, output, force, json } => {
            emit_report(&symerge::model::import::import_gguf(&file, &output, force)?, json)?;
        }
        Command::Generate { opts, json: _ } if opts.list => emit(&preset_list())?,
        Command::Generate { opts, json } => emit_report(&opts.generate()?, json)?,
        Command::Data { command: DataCommand::Prepare { args, json } } => {
            let summaries = args.run(|s| if json { Ok(()) } else { emit(&s.to_string()) })?;
            if json {
                emit_json(&summaries)?;
            }
        }
        Command::CacheLabels { args, json } => emit_report(&args.run()?, json)?,
        Command::Adapt { args, json } => {
            // Only rank 0 has a summary: it wrote the output.
            if let Some(summary) = args.run()? {
                emit_report(&summary, json)?;
            }
        }
        Command::DistCheck { opts, json } => emit_report(&opts.run()?, json)?,
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // First: it may set this process's environment, which is sound only before other threads.
    if let Err(e) = symerge::backend::cpu::set_worker_threads(cli.threads) {
        eprintln!("error: setting up worker threads: {e}");
        return ExitCode::FAILURE;
    }
    init_logging(cli.verbose, cli.quiet);
    symerge::atomic::remove_partials_on_interrupt();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
