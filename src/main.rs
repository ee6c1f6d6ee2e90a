//! The `symerge` command line: parses arguments and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use symerge::adapt::train::AdaptArgs;
use symerge::backend::cuda::bench::BenchOptions;
use symerge::checkpoint::generate::{GenerateOptions, preset_list};
use symerge::data::PrepareArgs;
use symerge::dist::check::CheckOptions;
use symerge::dist::rank::RankInfo;
use symerge::labels::produce::CacheLabelsArgs;
use symerge::merge::engine::MergeArgs;
use symerge::model::block_bench::BlockBenchArgs;
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
    #[arg(long, short = 'j', alias = "num-threads", global = true)]
    threads: Option<usize>,
    /// Print the result as JSON on stdout instead of text, for every command (a failure as
    /// `{"error": "..."}`, with the error on stderr too and a nonzero exit).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show a checkpoint's architecture, blocks, tensors, parameters, dtypes and bytes.
    Inspect {
        /// A .safetensors file, a *.index.json, or a model directory.
        path: PathBuf,
    },
    /// Training-free merge from a mergekit-style YAML config.
    // clap lists the output group before the config; the config comes first.
    #[command(override_usage = "symerge merge [OPTIONS] <CONFIG> <OUTPUT | -o OUTPUT>")]
    Merge(MergeArgs),
    /// Measure the CUDA engine: copy ceilings, kernels, streaming merge vs the CPU path.
    BenchCuda(BenchOptions),
    /// Time one Llama decoder block, forward and backward, on the CPU or a GPU (f32; PyTorch's
    /// side of the comparison is benches/block_torch.py).
    BenchBlock(BlockBenchArgs),
    /// List the merge methods and their parameters.
    Methods,
    /// Class scores for every text of a JSON-lines file (a `text` field per line).
    Predict(PredictArgs),
    /// Accuracy and mean cross-entropy on a labelled JSON-lines file (`text` and `label` fields);
    /// for a causal LM (Llama, Mistral, Qwen2, GPT-2), perplexity, mean next-token loss and top-1
    /// next-token accuracy over `text`.
    Eval(EvalArgs),
    /// Fine-tune every weight of a BERT-family classifier on labelled JSON lines, or of a causal
    /// LM (Llama family, GPT-2) on texts (next-token loss), writing a Hugging Face checkpoint
    /// directory (an expert for merging).
    Finetune(FinetuneArgs),
    /// A Llama-family GGUF file (llama.cpp) as a Hugging Face checkpoint directory: weights
    /// dequantized to f32 (F32, F16, BF16, Q4_0, Q4_1, Q8_0), config.json, tokenizer.json, and
    /// the special tokens and chat template for transformers (tokenizer_config.json,
    /// generation_config.json).
    ImportGguf(ImportOptions),
    /// Write a seeded synthetic base model and experts (for tests and benchmarks).
    Generate(GenerateOptions),
    /// Labelled text data sets.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// Form the communicator from the launcher's environment (torchrun or SLURM variables; none
    /// means one process), all-reduce a test tensor on every rank and check the sum.
    DistCheck(CheckOptions),
    /// Run an expert over its task's inputs once and cache its soft labels on disk (resumable;
    /// reused when the cache already matches the expert and the inputs).
    CacheLabels(CacheLabelsArgs),
    /// SyMerge (Lambda + one layer per task, expert soft labels) or AdaMerging (Lambda, entropy)
    /// from a YAML config; writes lambda.json, tasks/<task>/ models, train_log.jsonl, summary.json.
    /// A causal-LM base model adapts against the experts' top-k next-token caches.
    Adapt(AdaptArgs),
}

#[derive(Subcommand)]
enum DataCommand {
    /// Build train/validation/test JSONL files for real text tasks from unpacked Debian packages
    /// (wordnet-base, fortunes, fortunes-{de,it,pl,cs,eo}; scripts/fetch-assets.sh fetches them).
    Prepare(PrepareArgs),
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
    // Colour only for a person at a terminal: a job log or a pipe gets plain text, and
    // NO_COLOR (https://no-color.org) turns it off there too.
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi)
        .init();
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let json = cli.json;
    match cli.command {
        Command::Inspect { path } => emit_report(&symerge::inspect::inspect(&path)?, json)?,
        Command::Merge(mut args) => {
            args.opts.progress = !cli.quiet;
            emit_report(&args.run()?, json)?;
        }
        Command::BenchCuda(opts) => emit_report(&opts.run()?, json)?,
        Command::BenchBlock(args) => emit_report(&args.run()?, json)?,
        Command::Methods => emit_report(&symerge::merge::catalog::catalog(), json)?,
        Command::Predict(args) => {
            RankInfo::require_single("predict")?;
            emit_report(&args.run()?, json)?
        }
        Command::Eval(args) => {
            RankInfo::require_single("eval")?;
            emit_report(&args.run()?, json)?
        }
        Command::Finetune(args) => {
            RankInfo::require_single("finetune")?;
            emit_report(&args.run()?, json)?
        }
        Command::ImportGguf(opts) => emit_report(&opts.run()?, json)?,
        Command::Generate(opts) if opts.list => emit_report(&preset_list(), json)?,
        Command::Generate(opts) => emit_report(&opts.generate()?, json)?,
        Command::Data { command: DataCommand::Prepare(args) } => {
            let summaries = args.run(|s| if json { Ok(()) } else { emit(&s.to_string()) })?;
            // An object, as every other command prints: `{"tasks": [...]}`.
            if json {
                emit_json(&serde_json::json!({ "tasks": summaries }))?;
            }
        }
        Command::CacheLabels(args) => emit_report(&args.run()?, json)?,
        Command::Adapt(args) => {
            // Only rank 0 has a summary: it wrote the output.
            if let Some(summary) = args.run()? {
                emit_report(&summary, json)?;
            }
        }
        Command::DistCheck(opts) => emit_report(&opts.run()?, json)?,
    }
    Ok(())
}

/// Parses the command line. clap refuses `-q` with `-v` only when both stand on the same side
/// of the command's name, so the other case is refused here, with clap's own error.
fn parse_cli<I: IntoIterator<Item = T>, T: Into<std::ffi::OsString> + Clone>(args: I) -> Result<Cli, clap::Error> {
    let cli = Cli::try_parse_from(args)?;
    if cli.quiet && cli.verbose > 0 {
        let msg = "the argument '--quiet' cannot be used with '--verbose'";
        return Err(Cli::command().error(clap::error::ErrorKind::ArgumentConflict, msg));
    }
    Ok(cli)
}

/// clap's own exit for a command line it refuses; a `--json` caller (the flag anywhere before
/// `--`) reads stdout, so it gets the usage error there too, as the object other errors give.
fn usage_exit(e: clap::Error) -> ! {
    use clap::error::ErrorKind;
    let shown = matches!(
        e.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    );
    let json = std::env::args_os().skip(1).take_while(|a| a != "--").any(|a| a == "--json");
    if json && !shown {
        let text = e.render().to_string();
        let text = text.trim().strip_prefix("error: ").unwrap_or(text.trim());
        let _ = emit_json(&serde_json::json!({ "error": text }));
    }
    e.exit()
}

fn main() -> ExitCode {
    if let Some(f) = symerge::sysinfo::missing_cpu_feature() {
        eprintln!(
            "error: this symerge was built for x86-64-v3 CPUs and this CPU lacks `{f}`; rebuild with \
             RUSTFLAGS=\"-C target-cpu=x86-64\" cargo build --release"
        );
        return ExitCode::FAILURE;
    }
    let cli = parse_cli(std::env::args_os()).unwrap_or_else(|e| usage_exit(e));
    // First: it may set this process's environment, which is sound only before other threads.
    if let Err(e) = symerge::backend::cpu::set_worker_threads(cli.threads) {
        eprintln!("error: setting up worker threads: {e}");
        return ExitCode::FAILURE;
    }
    init_logging(cli.verbose, cli.quiet);
    symerge::atomic::remove_partials_on_interrupt();
    let json = cli.json;
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            // A --json caller reads stdout: it gets the error there too, as an object.
            if json {
                let _ = emit_json(&serde_json::json!({ "error": format!("{e:#}") }));
            }
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every command (and `generate --list`) with the arguments it requires.
    const COMMANDS: [&[&str]; 14] = [
        &["inspect", "m"],
        &["merge", "c.yml", "--output", "out"],
        &["bench-cuda"],
        &["methods"],
        &["predict", "m", "--inputs", "i.jsonl", "--out", "p.jsonl"],
        &["eval", "m"],
        &["finetune", "m", "--train", "t.jsonl", "--output", "out"],
        &["import-gguf", "f.gguf", "--output", "out"],
        &["generate", "--output", "out"],
        &["generate", "--list"],
        &["data", "prepare", "--out", "d"],
        &["dist-check"],
        &["cache-labels", "--expert", "e", "--task", "t", "--inputs", "i.jsonl", "--output", "c"],
        &["adapt", "a.yml", "--output", "out"],
    ];

    fn parse(before: &[&str], cmd: &[&str], after: &[&str]) -> Result<Cli, clap::Error> {
        parse_cli(["symerge"].iter().chain(before).chain(cmd).chain(after))
    }

    /// `-q`, `-v`, `--json` and `--threads` are one set of flags, taken by every command before or
    /// after its name (issue 16: `generate -q` used to be refused).
    #[test]
    fn every_command_takes_the_global_flags_before_or_after_its_name() {
        let flags = ["-q", "--json", "--threads", "3"];
        for cmd in COMMANDS {
            for (before, after) in [(&flags[..], &[][..]), (&[][..], &flags[..])] {
                let cli = parse(before, cmd, after).unwrap_or_else(|e| panic!("{cmd:?} {flags:?}: {e}"));
                assert!(cli.quiet && cli.json && cli.threads == Some(3) && cli.verbose == 0, "{cmd:?}");
            }
            // (clap counts a global flag's occurrences on one side of the name, not both.)
            for (before, after) in [(&["-vv"][..], &[][..]), (&[][..], &["-vv"][..])] {
                let cli = parse(before, cmd, after).unwrap_or_else(|e| panic!("{cmd:?} -vv: {e}"));
                assert!(cli.verbose == 2 && !cli.quiet && !cli.json && cli.threads.is_none(), "{cmd:?}");
            }
            for (before, after) in
                [(&["-q", "-v"][..], &[][..]), (&["-q"][..], &["-v"][..]), (&[][..], &["-v", "-q"][..])]
            {
                let e = parse(before, cmd, after).err().map(|e| e.kind());
                assert_eq!(e, Some(clap::error::ErrorKind::ArgumentConflict), "{cmd:?}: {before:?} {after:?}");
            }
        }
    }
}
