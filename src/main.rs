//! The `symerge` command line: parses arguments and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use symerge::adapt::train::AdaptArgs;
use symerge::backend::cuda::bench::BenchOptions;
use symerge::checkpoint::generate::{GenerateOptions, preset_list};
use symerge::data::PrepareArgs;
use symerge::dist::check::CheckOptions;
use symerge::labels::produce::CacheLabelsArgs;
use symerge::merge::engine::MergeArgs;
use symerge::model::finetune::FinetuneArgs;
use symerge::model::import::ImportOptions;
use symerge::model::infer::{EvalArgs, PredictArgs};
use symerge::report::{emit, emit_json, emit_report};

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
        #[command(flatten)]
        args: PredictArgs,
        /// Print a JSON summary on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Accuracy and mean cross-entropy on a labelled JSON-lines file (`text` and `label` fields);
    /// for a causal LM (Llama, Mistral, Qwen2), perplexity, mean next-token loss and top-1
    /// next-token accuracy over `text`.
    Eval {
        #[command(flatten)]
        args: EvalArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Fine-tune every weight of a BERT-family classifier on labelled JSON lines, or of a
    /// Llama-family causal LM on texts (next-token loss), writing a Hugging Face checkpoint
    /// directory (an expert for merging).
    Finetune {
        #[command(flatten)]
        args: FinetuneArgs,
        /// Print a JSON summary on stdout.
        #[arg(long)]
        json: bool,
    },
    /// A Llama-family GGUF file (llama.cpp) as a Hugging Face checkpoint directory: weights
    /// dequantized to f32 (F32, F16, BF16, Q4_0, Q4_1, Q8_0), config.json, tokenizer.json.
    ImportGguf {
        #[command(flatten)]
        opts: ImportOptions,
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

/// Logs go to stderr, so stdout carries only a command's result (a table, JSON).
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
        Command::Predict { args, json } => emit_report(&args.run()?, json)?,
        Command::Eval { args, json } => emit_report(&args.run()?, json)?,
        Command::Finetune { args, json } => emit_report(&args.run()?, json)?,
        Command::ImportGguf { opts, json } => emit_report(&opts.run()?, json)?,
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
