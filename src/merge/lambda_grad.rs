//! dL/dLambda for one tensor, the CPU twin of `kernels/lambda_grad.cu`: for every task k,
//! `g_k = sum_i grad_i * tau_k,i`, with `tau_k = theta_k - base` (or given directly).
//!
//! The sum is deterministic whatever the thread count: the tensor is cut into fixed tiles of
//! [`TILE`] elements, each tile is summed in f64 by [`dot_f64`] (eight interleaved lanes, added
//! in a fixed order), and the tile sums are added in tile order. The task-vector difference is
//! taken in f32, as the merge and the kernel take it.

use rayon::prelude::*;

use crate::error::{Error, Result};

/// Elements per tile: the kernel's per-CTA tile, so both cut the tensor in the same places.
pub const TILE: usize = 8192;

/// `g_k` for every input. `grad`, `base` and each input must have the same length.
pub fn lambda_grad(grad: &[f32], base: Option<&[f32]>, inputs: &[&[f32]]) -> Result<Vec<f64>> {
    let n = grad.len();
    let bad_len = |what: &str, len: usize| Error::Shape {
        op: "lambda_grad",
        reason: format!("{what} has {len} elements but the gradient has {n}"),
    };
    if let Some(b) = base
        && b.len() != n
    {
        return Err(bad_len("the base", b.len()));
    }
    if let Some((k, t)) = inputs.iter().enumerate().find(|(_, t)| t.len() != n) {
        return Err(bad_len(&format!("input {k}"), t.len()));
    }
    let k_count = inputs.len();
    let tiles: Vec<Vec<f64>> = (0..n.div_ceil(TILE))
        .into_par_iter()
        .map(|t| {
            let range = t * TILE..((t + 1) * TILE).min(n);
            let g = &grad[range.clone()];
            let xs: Vec<&[f32]> = inputs.iter().map(|input| &input[range.clone()]).collect();
            match base {
                Some(b) => dots_with_base(g, &b[range.clone()], &xs),
                None => xs.iter().map(|x| dot_f64(g, x, None)).collect(),
            }
        })
        .collect();
    let mut out = vec![0f64; k_count];
    for tile in &tiles {
        for (o, v) in out.iter_mut().zip(tile) {
            *o += v;
        }
    }
    Ok(out)
}

/// Lanes of [`dot_f64`]: independent sums the compiler can keep in vector registers.
pub const LANES: usize = 8;

/// `sum_i g_i * (x_i - b_i)` (or `g_i * x_i` without `b`) in f64: element `i` goes to lane
/// `i % 8`, and the lanes are added in order at the end. A fixed order (deterministic, the same
/// for every caller) that does not chain every addition on the previous one.
pub fn dot_f64(g: &[f32], x: &[f32], b: Option<&[f32]>) -> f64 {
    let n = g.len().min(x.len());
    match b {
        Some(b) => dots_of::<1>(&g[..n], &b[..n], &[&x[..n]])[0],
        None => {
            let mut acc = [0f64; LANES];
            dot_lanes(&mut acc, g, x);
            acc.iter().sum()
        }
    }
}

/// [`dot_f64`] with base `b` of `g` against every input in `xs` (each as long as `g`), the same
/// bits, up to four inputs in one pass over `g` and `b`.
pub fn dots_with_base(g: &[f32], b: &[f32], xs: &[&[f32]]) -> Vec<f64> {
    let mut out = Vec::with_capacity(xs.len());
    for group in xs.chunks(4) {
        match group.len() {
            4 => out.extend(dots_of::<4>(g, b, group)),
            3 => out.extend(dots_of::<3>(g, b, group)),
            2 => out.extend(dots_of::<2>(g, b, group)),
            _ => out.extend(dots_of::<1>(g, b, group)),
        }
    }
    out
}

/// [`dot_f64`]'s lanes for `N` inputs at once, their accumulators in registers (a run-time count
/// kept them in memory and the loop scalar: slower than one pass per input).
#[inline(always)]
fn dots_of<const N: usize>(g: &[f32], b: &[f32], xs: &[&[f32]]) -> [f64; N] {
    let xs: [&[f32]; N] = std::array::from_fn(|k| xs[k]);
    let mut acc = [[0f64; LANES]; N];
    let full = g.len() / LANES * LANES;
    for at in (0..full).step_by(LANES) {
        let (g8, b8) = (&g[at..at + LANES], &b[at..at + LANES]);
        for k in 0..N {
            let x8 = &xs[k][at..at + LANES];
            for l in 0..LANES {
                acc[k][l] += g8[l] as f64 * (x8[l] - b8[l]) as f64;
            }
        }
    }
    for i in full..g.len() {
        for (acc, x) in acc.iter_mut().zip(xs) {
            acc[i % LANES] += g[i] as f64 * (x[i] - b[i]) as f64;
        }
    }
    std::array::from_fn(|k| acc[k].iter().sum())
}

/// [`dot_f64`]'s lanes without a base, added onto `acc`: element `i` of the slices goes to lane
/// `i % 8`. Consecutive stretches that start on multiples of 8 accumulate exactly as one call
/// over their concatenation would. Values already widened to f64 sum to the same bits as their
/// f32 originals (a product of two f32 is exact in f64).
pub fn dot_lanes<T: Copy + Into<f64>>(acc: &mut [f64; LANES], g: &[T], x: &[T]) {
    let n = g.len().min(x.len());
    let full = n / LANES * LANES;
    for (g, x) in g[..full].chunks_exact(LANES).zip(x[..full].chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] += g[l].into() * x[l].into();
        }
    }
    for i in full..n {
        acc[i % LANES] += g[i].into() * x[i].into();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed);
        (0..n).map(|_| rand::Rng::random::<f32>(&mut rng) - 0.5).collect()
    }

    #[test]
    fn matches_a_naive_f64_sum() {
        for (n, k) in [(1, 1), (8191, 3), (8193, 8), (100_003, 3), (0, 2)] {
            let grad = values(n, 1);
            let base = values(n, 2);
            let inputs: Vec<Vec<f32>> = (0..k).map(|i| values(n, 10 + i as u64)).collect();
            let views: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
            let got = lambda_grad(&grad, Some(&base), &views).unwrap();
            let direct = lambda_grad(&grad, None, &views).unwrap();
            for kk in 0..k {
                let want: f64 = (0..n).map(|i| grad[i] as f64 * (inputs[kk][i] - base[i]) as f64).sum::<f64>();
                let want_direct: f64 = (0..n).map(|i| grad[i] as f64 * inputs[kk][i] as f64).sum::<f64>();
                let scale: f64 = (0..n).map(|i| (grad[i] as f64 * inputs[kk][i] as f64).abs()).sum::<f64>() + 1e-30;
                assert!((got[kk] - want).abs() / scale < 1e-12, "n {n} k {kk}: {} vs {want}", got[kk]);
                assert!((direct[kk] - want_direct).abs() / scale < 1e-12, "n {n} k {kk}");
            }
        }
    }

    #[test]
    fn same_bits_for_any_thread_count() {
        let n = 5 * TILE + 77;
        let grad = values(n, 3);
        let inputs: Vec<Vec<f32>> = (0..3).map(|i| values(n, 20 + i)).collect();
        let views: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
        let many = lambda_grad(&grad, None, &views).unwrap();
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(|| lambda_grad(&grad, None, &views).unwrap());
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&many), bits(&one));
    }

    #[test]
    fn rejects_mismatched_lengths() {
        let g = vec![0.5f32; 10];
        let x = vec![1f32; 9];
        assert!(lambda_grad(&g, None, &[&x]).is_err());
        assert!(lambda_grad(&g, Some(&x), &[&g]).is_err());
    }
}
