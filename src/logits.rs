//! Row-wise reductions over logits shared by evaluation, prediction, the adaptation objectives and
//! the CPU backend, so every "predicted class" and every log-normaliser is computed one way.

/// The index of the largest value, the first on ties (0 for an empty row). Used over logits
/// rather than probabilities: softmax in f32 can round distinct logits to equal probabilities.
pub fn argmax(row: &[f32]) -> usize {
    row.iter().enumerate().fold(0, |best, (i, &v)| if v > row[best] { i } else { best })
}

/// `log(sum(exp(row)))`, stably, in f64 (f32 sums over a vocabulary lose the small terms).
pub fn logsumexp(row: &[f32]) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NEG_INFINITY, -5.0]), 1);
        assert_eq!(argmax(&[]), 0);
    }

    #[test]
    fn logsumexp_is_stable_and_exact_on_known_values() {
        assert!((logsumexp(&[0.0, 0.0]) - 2f64.ln()).abs() < 1e-15);
        // exp(1000) overflows f64; the shift keeps it finite.
        assert!((logsumexp(&[1000.0, 1000.0]) - (1000.0 + 2f64.ln())).abs() < 1e-12);
        // 50k equal tiny terms next to a dominant one: each would vanish in an f32 running sum.
        let mut row = vec![-20.0f32; 50_000];
        row[0] = 0.0;
        let want = (1.0 + 49_999.0 * (-20f64).exp()).ln();
        // An f32 running sum would give 0 here (every term below half an ulp of 1).
        assert!((logsumexp(&row) - want).abs() < 1e-6 * want);
    }
}
