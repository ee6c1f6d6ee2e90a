//! What a command prints when it is done: the summary as JSON with `--json`, otherwise its
//! human form, either lines on stdout (tables, scores) or one log line (for commands whose
//! result is a written artifact). Every command goes through [`emit_report`], so `--json`
//! means the same thing everywhere and a closed pipe (`| head`) is never an error.

use std::io::Write;
use std::path::Path;

use serde::Serialize;

use crate::adapt::report::AdaptEvalOutcome;
use crate::adapt::train::{AdaptSummary, SummaryLabels};
use crate::error::{Error, Result};
use crate::labels::produce::CacheLabelsSummary;
use crate::merge::executor::MergeSummary;
use crate::model::import::ImportSummary;
use crate::model::{EvalReport, FinetuneSummary, LmEvalReport, LmFinetuneSummary, PredictSummary};

/// The human form of a command's result.
pub enum Human {
    /// Printed on stdout as is.
    Stdout(String),
    /// Logged at info level (hidden by `-q`): the command's output is a file or directory.
    Log(String),
}

/// A command's result.
pub trait Report: Serialize {
    fn human(&self) -> Human;
}

/// Writes `text` to stdout; a reader that went away is not an error.
pub fn emit(text: &str) -> Result<()> {
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.map_err(|e| Error::io("stdout", e)),
    }
}

/// Prints `value` as pretty JSON (`json`) or in its human form.
pub fn emit_report<T: Report + ?Sized>(value: &T, json: bool) -> Result<()> {
    if json {
        return emit_json(value);
    }
    match value.human() {
        Human::Stdout(text) => emit(&text),
        Human::Log(line) => {
            tracing::info!("{line}");
            Ok(())
        }
    }
}

/// Prints any serialisable value as pretty JSON and a newline.
pub fn emit_json<T: Serialize + ?Sized>(value: &T) -> Result<()> {
    let text =
        serde_json::to_string_pretty(value).map_err(|e| Error::Invalid(format!("serialising the summary: {e}")))?;
    emit(&format!("{text}\n"))
}

impl Report for MergeSummary {
    fn human(&self) -> Human {
        Human::Log(format!(
            "wrote {} ({} tensors, {} shard(s)) in {:.1}s, read {:.2} GB at {:.2} GB/s",
            self.output.display(),
            self.tensors,
            self.shards,
            self.seconds,
            self.bytes_read as f64 / 1e9,
            self.read_gb_per_s
        ))
    }
}

impl Report for EvalReport {
    fn human(&self) -> Human {
        Human::Stdout(format!(
            "accuracy {:.2}% ({} examples), mean cross-entropy {:.4}\n",
            100.0 * self.accuracy,
            self.examples,
            self.mean_ce
        ))
    }
}

impl Report for LmEvalReport {
    fn human(&self) -> Human {
        Human::Stdout(format!(
            "perplexity {:.4}, mean loss {:.4}, top-1 accuracy {:.2}% ({} tokens predicted in {} texts)\n",
            self.perplexity,
            self.mean_loss,
            100.0 * self.top1_accuracy,
            self.tokens,
            self.texts
        ))
    }
}

impl Report for FinetuneSummary {
    fn human(&self) -> Human {
        let acc = self.eval.as_ref().map(|r| format!(", eval accuracy {:.2}%", 100.0 * r.accuracy)).unwrap_or_default();
        let s = self;
        finetune_line(&s.output, s.steps, s.seconds, "loss", [s.initial_loss, s.final_loss], &acc)
    }
}

impl Report for LmFinetuneSummary {
    fn human(&self) -> Human {
        let eval = self.eval.as_ref().map(|r| format!(", eval loss {:.4}", r.mean_loss)).unwrap_or_default();
        let s = self;
        finetune_line(&s.output, s.steps, s.seconds, "next-token loss", [s.initial_loss, s.final_loss], &eval)
    }
}

/// The line both fine-tuning summaries print; `tail` is the held-out evaluation, if any.
fn finetune_line(output: &Path, steps: usize, seconds: f64, loss: &str, [first, last]: [f32; 2], tail: &str) -> Human {
    Human::Log(format!(
        "wrote {} after {steps} steps in {seconds:.1}s: {loss} {first:.4} -> {last:.4}{tail}",
        output.display()
    ))
}

impl Report for crate::model::finetune::FinetuneOutcome {
    fn human(&self) -> Human {
        use crate::model::finetune::FinetuneOutcome;
        match self {
            FinetuneOutcome::Classifier(s) => s.human(),
            FinetuneOutcome::Lm(s) => s.human(),
        }
    }
}

impl Report for crate::model::infer::EvalOutcome {
    fn human(&self) -> Human {
        use crate::model::infer::EvalOutcome;
        match self {
            EvalOutcome::Adapted(r) => r.human(),
            EvalOutcome::Lm(r) => r.human(),
            EvalOutcome::Classifier(r) => r.human(),
        }
    }
}

impl Report for PredictSummary {
    fn human(&self) -> Human {
        Human::Log(format!(
            "wrote {} predictions to {} in {:.1}s",
            self.predictions,
            self.output.display(),
            self.seconds
        ))
    }
}

impl Report for ImportSummary {
    fn human(&self) -> Human {
        Human::Stdout(format!(
            "wrote {} ({} tensors, {} parameters, vocab {}, {} embeddings)\n",
            self.output.display(),
            self.tensors,
            self.params,
            self.vocab,
            if self.tied_embeddings { "tied" } else { "untied" }
        ))
    }
}

impl Report for CacheLabelsSummary {
    fn human(&self) -> Human {
        let shape = match (self.top_k, self.positions) {
            (Some(k), Some(p)) => format!("{} inputs, {p} positions x top-{k}", self.rows),
            _ => format!("{} rows x {} classes", self.rows, self.classes),
        };
        Human::Log(format!(
            "{} {} ({shape}) in {:.1}s",
            if self.reused { "reused" } else { "wrote" },
            self.output.display(),
            self.seconds
        ))
    }
}

impl Report for AdaptSummary {
    fn human(&self) -> Human {
        let mut out = String::new();
        let SummaryLabels { score, loss } = self.labels;
        for t in &self.tasks {
            let acc = t.accuracy.map_or("-".to_string(), |a| format!("{:.2}%", 100.0 * a));
            let ppl = t.perplexity.map(|p| format!("  perplexity {p:.2}")).unwrap_or_default();
            let mut trained = t.final_loss.map_or("-".to_string(), |l| format!("{l:.4}"));
            if let Some(end) = t.end_loss {
                trained += &format!(" (final weights {end:.4})");
            }
            out +=
                &format!("{:<16} {score} {acc:>8}{ppl}  {loss} {trained}  mean lambda {:.3}\n", t.name, t.lambda_mean);
        }
        if let Some(a) = self.average_accuracy {
            let ppl =
                self.average_perplexity.map(|p| format!("  perplexity {p:.2} (geometric mean)")).unwrap_or_default();
            out += &format!("{:<16} {score} {:>7.2}%{ppl}\n", "average", 100.0 * a);
        }
        let s = &self.streaming;
        // Kept blocks are loaded once: per step, only the streamed ones are read (twice).
        let per_step = match self.bytes_streamed_per_step {
            0 => "nothing streamed per step".to_string(),
            b => format!("{:.1} MB streamed per step", b as f64 / 1e6),
        };
        out += &format!(
            "shared blocks    {} ({} of {} kept, {:.1} MB kept of {:.1} MB), {per_step}\n",
            s.mode,
            s.kept_blocks,
            s.blocks,
            s.kept_bytes as f64 / 1e6,
            s.shared_bytes as f64 / 1e6,
        );
        Human::Stdout(out)
    }
}

/// Implements [`Report`] for results whose `Display` is their human form on stdout.
macro_rules! stdout_display {
    ($($t:ty),*) => {
        $(impl Report for $t {
            fn human(&self) -> Human {
                Human::Stdout(self.to_string())
            }
        })*
    };
}

stdout_display!(
    AdaptEvalOutcome,
    crate::checkpoint::generate::GenerateSummary,
    crate::checkpoint::generate::PresetList,
    crate::merge::catalog::Catalog,
    crate::inspect::Inspection,
    crate::dist::check::CheckReport,
    crate::backend::cuda::bench::BenchReport,
    crate::model::block_bench::BlockBenchReport
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapt::shared::StreamReport;
    use crate::adapt::train::TaskReport;

    fn adapt_summary(accuracy: Option<f64>) -> AdaptSummary {
        let task = |name: &str| TaskReport {
            name: name.into(),
            inputs: 10,
            accuracy,
            perplexity: None,
            next_token_loss: None,
            final_loss: Some(0.5),
            end_loss: Some(0.25),
            lambda_mean: 0.3,
            model_hash: None,
            inputs_hash: None,
        };
        AdaptSummary {
            format_version: crate::adapt::train::SUMMARY_FORMAT_VERSION,
            method: crate::adapt::config::Method::Symerge,
            output: "out".into(),
            epochs: 1,
            steps: 2,
            seconds: 1.0,
            world_size: 1,
            lambda_rows: 1,
            lambda_hash: String::new(),
            out_dtype: "f32".into(),
            tasks: vec![task("alpha"), task("beta")],
            average_accuracy: accuracy,
            average_perplexity: None,
            labels: crate::adapt::train::SummaryLabels { score: "accuracy", loss: "final loss" },
            streaming: StreamReport {
                mode: "resident".into(),
                blocks: 2,
                kept_blocks: 2,
                shared_bytes: 2_000_000,
                kept_bytes: 2_000_000,
                budget_bytes: 8_000_000,
                bytes_streamed: 2_000_000,
                bytes_loaded_once: 2_000_000,
            },
            bytes_streamed_per_step: 0,
            peak_rss_bytes: None,
        }
    }

    fn stdout_of(r: &impl Report) -> String {
        match r.human() {
            Human::Stdout(s) | Human::Log(s) => s,
        }
    }

    /// Accuracies are fractions in the summary and percent (2 decimals) in its text.
    #[test]
    fn adapt_text_prints_fractions_as_percent() {
        let text = stdout_of(&adapt_summary(Some(0.5152394775036284)));
        assert!(text.contains("alpha            accuracy   51.52%"), "{text}");
        assert!(text.contains("average          accuracy   51.52%"), "{text}");
        assert!(stdout_of(&adapt_summary(None)).contains("accuracy        -"));
    }

    /// A resident run streams nothing per step and says so; a streamed one gives its bytes.
    #[test]
    fn adapt_text_says_what_is_streamed_per_step() {
        let mut s = adapt_summary(None);
        let text = stdout_of(&s);
        assert!(text.contains("resident (2 of 2 kept, 2.0 MB kept of 2.0 MB), nothing streamed per step"), "{text}");
        s.bytes_streamed_per_step = 4_000_000;
        assert!(stdout_of(&s).contains("), 4.0 MB streamed per step"));
    }

    #[test]
    fn eval_text_prints_percent() {
        let r = EvalReport { examples: 1378, accuracy: 0.5152394775036284, mean_ce: 1.25 };
        assert_eq!(stdout_of(&r), "accuracy 51.52% (1378 examples), mean cross-entropy 1.2500\n");
    }
}
