//! The adaptation objectives on one batch's logits: SyMerge's expert self-labelling (soft
//! cross-entropy against the cached expert probabilities, optionally confidence-filtered; or the
//! released code's hard-label variant with agreement/confidence filtering) and AdaMerging's
//! entropy minimisation.

use crate::backend::Backend;
use crate::error::Result;
use crate::logits::argmax;

/// What the loss compares the merged model's logits with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Objective {
    /// Cross-entropy against the expert's probabilities; samples whose expert top probability is
    /// below `min_confidence` are left out.
    Soft { min_confidence: Option<f32> },
    /// Cross-entropy against the expert's argmax, for samples where the merged model agrees with
    /// the expert or the expert is at least as confident as the merged model.
    HardConf,
    /// Mean prediction entropy of the merged model (needs no labels).
    Entropy,
}

/// A batch's loss, its gradient wrt the logits, and how many samples counted.
pub struct LossOutput<B: Backend> {
    /// Mean over the kept samples.
    pub loss: f32,
    pub dlogits: B::Buf,
    pub kept: usize,
}

/// A batch's targets and loss before the mean is taken: what data-parallel ranks sum before
/// they agree on the denominator.
pub struct Prepared {
    /// Per-sample targets (`None` for the entropy).
    targets: Option<Vec<f32>>,
    /// The loss averaged over all `rows` (filtered samples count as 0).
    row_mean: f32,
    pub kept: usize,
    pub rows: usize,
}

impl Prepared {
    /// The sum of the per-sample losses over this batch's kept samples.
    pub fn loss_sum(&self) -> f64 {
        self.row_mean as f64 * self.rows as f64
    }
}

/// Evaluates `objective` on `logits` `[rows, cols]` as a mean over the kept samples;
/// `expert_probs` (same shape) are required for the SyMerge objectives.
pub fn evaluate<B: Backend>(
    be: &B,
    objective: Objective,
    logits: &B::Buf,
    expert_probs: Option<&[f32]>,
    rows: usize,
    cols: usize,
) -> Result<LossOutput<B>> {
    let p = prepare(be, objective, logits, expert_probs, rows, cols)?;
    let kept = p.kept;
    finish(be, p, logits, cols, kept)
}

/// Targets, kept samples and the loss of one batch (or one rank's shard of it).
pub fn prepare<B: Backend>(
    be: &B,
    objective: Objective,
    logits: &B::Buf,
    expert_probs: Option<&[f32]>,
    rows: usize,
    cols: usize,
) -> Result<Prepared> {
    let expert = || {
        expert_probs.ok_or_else(|| crate::error::Error::Invalid("this objective needs the expert's soft labels".into()))
    };
    let targets: Vec<f32> = match objective {
        Objective::Entropy => {
            let row_mean = be.download(&be.entropy(logits, rows, cols)?)?[0];
            return Ok(Prepared { targets: None, row_mean, kept: rows, rows });
        }
        Objective::Soft { min_confidence } => {
            let mut t = expert()?.to_vec();
            if let Some(c) = min_confidence {
                for row in t.chunks_mut(cols) {
                    if row.iter().cloned().fold(0.0, f32::max) < c {
                        row.fill(0.0);
                    }
                }
            }
            t
        }
        Objective::HardConf => {
            let merged = be.download(&be.softmax(logits, None, rows, cols, 1)?)?;
            let mut t = vec![0.0; rows * cols];
            for ((row, e), m) in t.chunks_mut(cols).zip(expert()?.chunks(cols)).zip(merged.chunks(cols)) {
                let (ei, mi) = (argmax(e), argmax(m));
                if ei == mi || e[ei] >= m[mi] {
                    row[ei] = 1.0;
                }
            }
            t
        }
    };
    // Filtered samples have all-zero targets: they add nothing to the sum of the cross-entropy
    // nor to its gradient, so a mean over all rows rescaled by rows / kept is a mean over the
    // kept samples.
    let kept = targets.chunks(cols).filter(|r| r.iter().any(|&v| v != 0.0)).count();
    let row_mean =
        if kept == 0 { 0.0 } else { be.download(&be.soft_ce(logits, &be.upload(&targets)?, rows, cols)?)?[0] };
    Ok(Prepared { targets: Some(targets), row_mean, kept, rows })
}

/// The loss and its logits gradient as this batch's share of a mean over `denominator` kept
/// samples: the batch's own kept count alone, or the kept count summed over data-parallel
/// ranks, whose shares then add up to the full batch's mean and gradient.
pub fn finish<B: Backend>(
    be: &B,
    p: Prepared,
    logits: &B::Buf,
    cols: usize,
    denominator: usize,
) -> Result<LossOutput<B>> {
    let rows = p.rows;
    if denominator == 0 || p.kept == 0 {
        return Ok(LossOutput { loss: 0.0, dlogits: be.zeros(rows * cols)?, kept: p.kept });
    }
    let scale = rows as f32 / denominator as f32;
    let dlogits = match &p.targets {
        None => be.entropy_backward(logits, rows, cols, scale)?,
        Some(t) => be.soft_ce_backward(logits, &be.upload(t)?, rows, cols, scale)?,
    };
    Ok(LossOutput { loss: p.row_mean * scale, dlogits, kept: p.kept })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;

    fn ce(z: &[f32], t: &[f32]) -> f64 {
        let m = z.iter().cloned().fold(f32::MIN, f32::max) as f64;
        let lse = m + z.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
        t.iter().zip(z).map(|(&ti, &zi)| -(ti as f64) * (zi as f64 - lse)).sum()
    }

    #[test]
    fn filters_average_over_kept_samples() {
        let be = Cpu;
        let logits = vec![2.0, 0.0, -1.0, /* row 2 */ 0.0, 3.0, 0.0, /* row 3 */ 0.5, 0.4, 0.3];
        let expert = vec![0.9, 0.05, 0.05, /* */ 0.6, 0.3, 0.1, /* */ 0.4, 0.35, 0.25];
        let buf = be.upload(&logits).unwrap();

        let all = evaluate(&be, Objective::Soft { min_confidence: None }, &buf, Some(&expert), 3, 3).unwrap();
        let want: f64 = (0..3).map(|r| ce(&logits[r * 3..r * 3 + 3], &expert[r * 3..r * 3 + 3])).sum::<f64>() / 3.0;
        assert_eq!(all.kept, 3);
        assert!((all.loss as f64 - want).abs() < 1e-5, "{} vs {want}", all.loss);

        // Confidence 0.5 drops row 3 (top 0.4).
        let f = evaluate(&be, Objective::Soft { min_confidence: Some(0.5) }, &buf, Some(&expert), 3, 3).unwrap();
        let want: f64 = (0..2).map(|r| ce(&logits[r * 3..r * 3 + 3], &expert[r * 3..r * 3 + 3])).sum::<f64>() / 2.0;
        assert_eq!(f.kept, 2);
        assert!((f.loss as f64 - want).abs() < 1e-5);
        let g = be.download(&f.dlogits).unwrap();
        assert!(g[6..].iter().all(|&v| v == 0.0), "dropped row has no gradient: {g:?}");

        // Hard-conf: row 1 agrees (class 0); row 2 disagrees (expert 0 at 0.6 vs merged 1 at ~0.91): dropped;
        // row 3 agrees (class 0).
        let h = evaluate(&be, Objective::HardConf, &buf, Some(&expert), 3, 3).unwrap();
        assert_eq!(h.kept, 2);
        let want = (ce(&logits[0..3], &[1.0, 0.0, 0.0]) + ce(&logits[6..9], &[1.0, 0.0, 0.0])) / 2.0;
        assert!((h.loss as f64 - want).abs() < 1e-5);

        let e = evaluate(&be, Objective::Entropy, &buf, None, 3, 3).unwrap();
        assert!(e.loss > 0.0 && e.kept == 3);
        assert!(evaluate(&be, Objective::HardConf, &buf, None, 3, 3).is_err());
    }
}
