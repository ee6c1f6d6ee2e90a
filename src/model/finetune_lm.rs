//! Full fine-tuning of a Llama-family causal LM on a JSONL of texts: every weight trains with
//! Adam on the mean next-token cross-entropy over the real tokens of each batch.
//!
//! It shares [`super::finetune`](mod@super::finetune)'s options, seeded batch order, schedule, clipping and Adam
//! (only the batch's loss differs), so the same data, options and seed give bit-identical
//! weights. Texts are right-padded per batch, and the packed [`super::LmBatch`] makes padding
//! cost nothing; texts of fewer than two tokens predict nothing and are left out.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use super::Params;
use super::causal::{LmArch, LmKind};
use super::finetune::{
    EVAL_BATCH, FinetuneOptions, LrSchedule, Objective, Trainer, check_options, loss_ends, read_examples, total_steps,
    train,
};
use super::lm::{CausalLm, LmEvalReport, evaluate_lm};
use super::save::SavedModel;
use super::tokenize::Tokens;
use crate::backend::Backend;
use crate::checkpoint::FloatDType;
use crate::data::jsonl::read_jsonl;
use crate::error::{Error, Result};

/// What a causal-LM fine-tuning run did (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct LmFinetuneSummary {
    pub base: PathBuf,
    pub output: PathBuf,
    /// Texts trained on (those of at least two tokens).
    pub train_texts: usize,
    /// Texts left out for having fewer than two tokens.
    pub skipped_texts: usize,
    pub steps: usize,
    /// Passes over the training texts (fractional when training by steps).
    pub epochs: f64,
    pub batch_size: usize,
    #[serde(serialize_with = "crate::units::f32_as_given")]
    pub lr: f32,
    pub schedule: LrSchedule,
    pub warmup_steps: usize,
    /// Mean loss of the first (up to) 10 steps, at most half the run.
    pub initial_loss: f32,
    /// Mean loss of the last (up to) 10 steps, at most half the run.
    pub final_loss: f32,
    /// The mean next-token loss of every step.
    pub losses: Vec<f32>,
    /// Mean next-token loss on the eval texts before training (with `eval_before`).
    pub eval_before: Option<LmEvalReport>,
    /// Mean next-token loss on the eval texts after training.
    pub eval: Option<LmEvalReport>,
    /// Time spent in training steps.
    pub train_seconds: f64,
    /// The whole run: loading, training, evaluation and saving.
    pub seconds: f64,
    pub saved: SavedModel,
}

/// The causal LM's objective: mean next-token cross-entropy over the batch's real tokens.
struct NextToken<'a, B: Backend, A: LmArch<B>> {
    lm: &'a mut CausalLm<B, A>,
    tokens: &'a [Tokens],
}

impl<B: Backend, A: LmArch<B>> Objective<B> for NextToken<'_, B, A> {
    fn backend(&self) -> &B {
        &self.lm.model.backend
    }

    fn loss_grads(&mut self, chunk: &[usize]) -> Result<(f32, Params<B>)> {
        let model = &self.lm.model;
        let enc = self.lm.tokenizer.pad(&chunk.iter().map(|&i| &self.tokens[i]).collect::<Vec<_>>());
        let (loss, grads) = model.lm_loss_grads(&model.batch(&enc)?)?;
        Ok((loss, model.total_grads(grads)?))
    }

    fn backend_and_params(&mut self) -> (&B, &mut [Params<B>]) {
        let m = &mut self.lm.model;
        (&m.backend, &mut m.params)
    }
}

/// The options a causal LM cannot use, refused rather than ignored; the family of `base`.
fn check_lm_options(base: &Path, opts: &FinetuneOptions) -> Result<LmKind> {
    let refuse = |what: &str| {
        Err(Error::Invalid(format!(
            "{} is a causal LM, which trains on the texts alone: {what} is for classifiers",
            base.display()
        )))
    };
    if opts.labels.is_some() {
        return refuse("a labels file (--labels)");
    }
    if opts.head_lr.is_some() {
        return refuse("a head learning rate (--head-lr)");
    }
    if opts.dtype != FloatDType::F32 {
        return Err(Error::Invalid(format!(
            "causal LMs are saved in float32; {} was asked for (drop --dtype)",
            opts.dtype
        )));
    }
    LmKind::of_dir(base)?.ok_or_else(|| {
        Error::Invalid(format!(
            "{}: config.json does not describe a causal LM of the {}",
            base.display(),
            LmKind::all()
        ))
    })
}

/// Refuses `--eval` texts of which none has a next token to score, before training (fuzzing
/// round 6: every step ran, then the score failed naming the base model and the trained
/// weights were lost).
fn check_eval_texts(tokenizer: &super::TextTokenizer, texts: &[String], path: &Path) -> Result<()> {
    if tokenizer.tokenize(texts)?.iter().any(|t| t.ids.len() >= 2) {
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "{} (--eval): no text has two tokens or more, so there is no next token to score",
        path.display()
    )))
}

/// Fine-tunes the causal LM `base` on the texts of `opts.train` (their labels, if any, are
/// ignored) and saves it to `opts.output` as [`super::LmModel::save`] writes models. Options are
/// checked before loading, the output appears only when complete.
pub fn finetune_lm<B: Backend>(backend: B, base: &Path, opts: &FinetuneOptions) -> Result<LmFinetuneSummary> {
    check_options(opts, &[base, opts.train.as_path()])?;
    let kind = check_lm_options(base, opts)?;
    crate::with_lm_arch!(kind, A => finetune_as::<B, A>(backend, base, opts))
}

/// [`finetune_lm`] for a model of family `A`, the options checked.
fn finetune_as<B: Backend, A: LmArch<B>>(backend: B, base: &Path, opts: &FinetuneOptions) -> Result<LmFinetuneSummary> {
    let start = Instant::now();
    let examples = read_examples(opts)?;
    let eval_texts = opts.eval.as_deref().map(texts_of).transpose()?;
    let mut lm = CausalLm::<B, A>::load(backend, base, opts.max_len)?;
    let score = |lm: &CausalLm<B, A>, when: &str| -> Result<Option<LmEvalReport>> {
        let Some(texts) = &eval_texts else { return Ok(None) };
        let r = evaluate_lm(lm, texts, EVAL_BATCH)?;
        tracing::info!("{when} training: mean next-token loss {:.4} (perplexity {:.2})", r.mean_loss, r.perplexity);
        Ok(Some(r))
    };
    super::save::check_room(&opts.output, &lm.model.params, super::SaveOptions::default().dtype)?;
    if let (Some(texts), Some(path)) = (&eval_texts, &opts.eval) {
        check_eval_texts(&lm.tokenizer, texts, path)?;
    }
    let eval_before = if opts.eval_before { score(&lm, "before")? } else { None };

    let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
    let tokens: Vec<Tokens> = lm.tokenizer.tokenize(&texts)?.into_iter().filter(|t| t.ids.len() >= 2).collect();
    let (n, skipped) = (tokens.len(), texts.len() - tokens.len());
    if n == 0 {
        return Err(Error::Invalid(format!(
            "{}: no text has two tokens or more, so there is no next token to learn",
            opts.train.display()
        )));
    }
    let steps = total_steps(opts, n);
    tracing::info!(
        "fine-tuning {} on {n} texts ({skipped} too short): {steps} steps of {}, lr {} ({} schedule, {} warmup steps), max {} tokens, seed {}",
        base.display(),
        opts.batch_size,
        opts.lr,
        opts.schedule,
        opts.warmup_steps,
        opts.max_len,
        opts.seed
    );
    let mut trainer = Trainer::new(&lm.model.backend, &lm.model.params, |_| opts.lr)?;
    let run = train(&mut NextToken { lm: &mut lm, tokens: &tokens }, &mut trainer, n, opts)?;

    let eval = score(&lm, "after")?;
    let saved = lm.model.save(&opts.output, opts.force)?;
    let (initial_loss, final_loss) = loss_ends(&run.losses);
    Ok(LmFinetuneSummary {
        base: base.to_path_buf(),
        output: opts.output.clone(),
        train_texts: n,
        skipped_texts: skipped,
        steps,
        epochs: run.seen as f64 / n as f64,
        batch_size: opts.batch_size,
        lr: opts.lr,
        schedule: opts.schedule,
        warmup_steps: opts.warmup_steps,
        initial_loss,
        final_loss,
        losses: run.losses,
        eval_before,
        eval,
        train_seconds: run.seconds,
        seconds: start.elapsed().as_secs_f64(),
        saved,
    })
}

/// The texts of a JSONL file.
fn texts_of(path: &Path) -> Result<Vec<String>> {
    Ok(read_jsonl(path)?.into_iter().map(|e| e.text).collect())
}
