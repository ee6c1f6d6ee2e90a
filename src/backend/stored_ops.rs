//! The ops adaptation runs on stored weights, on the CPU: the reference twins of the CUDA
//! backend's `merge_stored` (kernel `gta_merge` of `kernels/merge.cu` with a base, every task
//! kept, coefficient lambda_k and an outer lambda of 1), `lambda_grad_stored` (`kernels/
//! lambda_grad.cu`, cut into the same tiles as [`crate::merge::lambda_grad`]) and `adam_step`
//! (`adam_step` of `kernels/ops.cu`).
//!
//! Inputs are [`StoredTensor`] views into the checkpoints' mappings, decoded chunk by chunk, so
//! neither the base nor any task vector is ever held whole in f32.

use rayon::prelude::*;

use crate::checkpoint::StoredTensor;
use crate::error::{Error, Result};
use crate::merge::lambda_grad::{TILE, dots_with_base};

/// Elements per parallel piece of a merge (a multiple of the kernels' 8-element vectors).
const MERGE_CHUNK: usize = 1 << 14;

/// Elements of a merge's accumulator block: kept in registers while every expert adds into it.
const MERGE_BLOCK: usize = 64;

thread_local! {
    /// This worker's decoding buffers (the base's piece, then each expert's), kept from piece to
    /// piece: fresh ones were allocated and zero-filled for every piece before being decoded
    /// into, a memset as large as the decoding itself.
    static SCRATCH: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Elements `start..start + len` of the base and of every expert as f32 (in place when stored
/// as f32, else decoded into `bufs`), handed to `f`.
fn with_pieces<T>(
    start: usize,
    len: usize,
    base: &StoredTensor,
    experts: &[&StoredTensor],
    f: impl FnOnce(&[f32], &[&[f32]]) -> T,
) -> T {
    SCRATCH.with_borrow_mut(|bufs| {
        if bufs.len() < experts.len() + 1 {
            bufs.resize_with(experts.len() + 1, Vec::new);
        }
        let (bb, eb) = bufs.split_at_mut(1);
        let b = base.f32s(start, len, &mut bb[0]);
        let es: Vec<&[f32]> = experts.iter().zip(eb.iter_mut()).map(|(x, buf)| x.f32s(start, len, buf)).collect();
        f(b, &es)
    })
}

/// One Adam update's scalars, computed once per step on the host as PyTorch's `Adam` does
/// (bias corrections folded into `step_size` and `c2_sqrt`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamStep {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// `lr / (1 - beta1^t)`.
    pub step_size: f32,
    /// `sqrt(1 - beta2^t)`.
    pub c2_sqrt: f32,
    /// Each gradient is multiplied by this first: gradient-norm clipping's factor, applied where
    /// the gradients are (1 leaves them as they are, bit for bit).
    pub grad_scale: f32,
}

impl AdamStep {
    /// The scalars of step `t` (1-based).
    pub fn new(lr: f32, beta1: f32, beta2: f32, eps: f32, t: i32) -> Self {
        let c1 = 1.0 - beta1.powi(t);
        let c2 = 1.0 - beta2.powi(t);
        AdamStep { beta1, beta2, eps, step_size: lr / c1, c2_sqrt: c2.sqrt(), grad_scale: 1.0 }
    }

    /// The same step on gradients scaled by `s` first (`clip_grad_norm_` before the step).
    pub fn with_grad_scale(self, s: f32) -> Self {
        AdamStep { grad_scale: s, ..self }
    }
}

/// One Adam update of `params` in place (moments `m`, `v`), element by element in the order the
/// kernel computes it.
pub fn adam_update(params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], s: &AdamStep) {
    let AdamStep { beta1, beta2, eps, step_size, c2_sqrt, grad_scale } = *s;
    let (one_b1, one_b2) = (1.0 - beta1, 1.0 - beta2);
    params
        .par_chunks_mut(MERGE_CHUNK)
        .zip(grads.par_chunks(MERGE_CHUNK))
        .zip(m.par_chunks_mut(MERGE_CHUNK))
        .zip(v.par_chunks_mut(MERGE_CHUNK))
        .for_each(|(((p, g), m), v)| {
            for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                let g = g * grad_scale;
                *m = beta1 * *m + one_b1 * g;
                *v = beta2 * *v + one_b2 * g * g;
                *p -= step_size * *m / (v.sqrt() / c2_sqrt + eps);
            }
        });
}

/// Checks that `experts` (and `coefs`, when given) match `base` in shape.
pub fn check_stored(
    op: &'static str,
    base: &StoredTensor,
    experts: &[&StoredTensor],
    coefs: Option<usize>,
) -> Result<()> {
    if let Some(e) = experts.iter().find(|e| e.shape != base.shape) {
        return Err(Error::Shape {
            op,
            reason: format!(
                "`{}` in {} has shape {:?}, the base's `{}` {:?}",
                e.name,
                e.file.display(),
                e.shape,
                base.name,
                base.shape
            ),
        });
    }
    if let Some(n) = coefs
        && n != experts.len()
    {
        return Err(Error::Shape { op, reason: format!("{n} coefficients for {} experts", experts.len()) });
    }
    Ok(())
}

/// `base + sum_k coefs[k] (expert_k - base)`, as the merge kernel computes it: the weighted
/// differences summed in f32 in expert order from zero, then added to the base. A non-finite
/// result is an error naming the input (file, tensor, element) that holds a non-finite value,
/// or the coefficients when the inputs are finite and the sum overflowed.
pub fn merge_stored(base: &StoredTensor, experts: &[&StoredTensor], coefs: &[f32]) -> Result<Vec<f32>> {
    check_stored("merge_stored", base, experts, Some(coefs.len()))?;
    let n = base.numel();
    // Every element is written below (merge_into fills its chunk).
    let mut out = crate::backend::scratch::take(n);
    let bad = out
        .par_chunks_mut(MERGE_CHUNK)
        .enumerate()
        .filter_map(|(c, o)| {
            let start = c * MERGE_CHUNK;
            merge_into(o, start, base, experts, coefs);
            o.iter().position(|v| !v.is_finite()).map(|i| start + i)
        })
        .min();
    match bad {
        None => Ok(out),
        Some(i) => Err(non_finite(base, experts, coefs, i, out[i])),
    }
}

/// Elements `start..start + o.len()` of the merge into `o`, in the kernel's order: the weighted
/// differences summed in f32 in expert order from zero, then added to the base.
///
/// Every expert adds into a block of [`MERGE_BLOCK`] accumulators before the next block (one
/// read of each input, no store and reload of the output per expert).
fn merge_into(o: &mut [f32], start: usize, base: &StoredTensor, experts: &[&StoredTensor], coefs: &[f32]) {
    with_pieces(start, o.len(), base, experts, |b, es| {
        for (blk, ob) in o.chunks_mut(MERGE_BLOCK).enumerate() {
            let at = blk * MERGE_BLOCK..blk * MERGE_BLOCK + ob.len();
            let bb = &b[at.clone()];
            let mut acc = [0f32; MERGE_BLOCK];
            for (e, &coef) in es.iter().zip(coefs) {
                for ((a, &e), &b) in acc.iter_mut().zip(&e[at.clone()]).zip(bb) {
                    *a += coef * (e - b);
                }
            }
            for ((o, &a), &b) in ob.iter_mut().zip(&acc).zip(bb) {
                *o = a + b;
            }
        }
    })
}

/// `<g, expert_k - base>` over elements `start..start + g.len()`, for every expert
/// ([`dots_with_base`]: each expert's sum is `dot_f64`'s bits, up to four experts a pass).
fn dots(g: &[f32], start: usize, base: &StoredTensor, experts: &[&StoredTensor]) -> Vec<f64> {
    with_pieces(start, g.len(), base, experts, |b, es| dots_with_base(g, b, es))
}

/// Partial sums (one per tile or row, each with a value per expert) added in order.
fn sum_in_order(parts: &[Vec<f64>], experts: usize) -> Vec<f64> {
    let mut out = vec![0f64; experts];
    for part in parts {
        out.iter_mut().zip(part).for_each(|(o, v)| *o += v);
    }
    out
}

/// Checks that a gradient has `base`'s element count.
fn check_grad(op: &'static str, grad: &[f32], base: &StoredTensor) -> Result<()> {
    if grad.len() == base.numel() {
        return Ok(());
    }
    let reason = format!("the gradient has {} elements but `{}` has {}", grad.len(), base.name, base.numel());
    Err(Error::Shape { op, reason })
}

/// Checks that `rows` (sorted, unique) index rows of `base` seen as a table of `row_len` columns.
pub(crate) fn check_rows(op: &'static str, base: &StoredTensor, rows: &[u32], row_len: usize) -> Result<()> {
    let n = base.numel();
    if row_len == 0 || !n.is_multiple_of(row_len) {
        return Err(Error::Shape { op, reason: format!("`{}` of {n} elements has no rows of {row_len}", base.name) });
    }
    if rows.windows(2).any(|w| w[0] >= w[1]) {
        return Err(Error::Shape { op, reason: "rows must be sorted and unique".into() });
    }
    if let Some(&r) = rows.last().filter(|&&r| r as usize >= n / row_len) {
        return Err(Error::Shape { op, reason: format!("row {r} is outside `{}`'s {} rows", base.name, n / row_len) });
    }
    Ok(())
}

/// [`merge_stored`] of only the rows `rows` (sorted, unique) of a table of `row_len` columns, in
/// a full-size result whose other rows are zero: for lookup tables (embeddings), of which a
/// batch reads a few rows. Each computed element is bit-identical to [`merge_stored`]'s; the
/// untouched rows of the result are never written (fresh zero pages stay unmapped).
pub fn merge_stored_rows(
    base: &StoredTensor,
    experts: &[&StoredTensor],
    coefs: &[f32],
    rows: &[u32],
    row_len: usize,
) -> Result<Vec<f32>> {
    check_stored("merge_stored_rows", base, experts, Some(coefs.len()))?;
    check_rows("merge_stored_rows", base, rows, row_len)?;
    let mut packed = vec![0f32; rows.len() * row_len];
    packed.par_chunks_mut(row_len).zip(rows.par_iter()).for_each(|(o, &r)| {
        merge_into(o, r as usize * row_len, base, experts, coefs);
    });
    if let Some(i) = packed.iter().position(|v| !v.is_finite()) {
        let at = rows[i / row_len] as usize * row_len + i % row_len;
        return Err(non_finite(base, experts, coefs, at, packed[i]));
    }
    let mut out = vec![0f32; base.numel()];
    for (p, &r) in packed.chunks(row_len).zip(rows) {
        out[r as usize * row_len..(r as usize + 1) * row_len].copy_from_slice(p);
    }
    Ok(out)
}

/// [`lambda_grad_stored`] for a gradient that is zero outside `rows` (sorted, unique; a table of
/// `row_len` columns): only those rows are read. Equal to the full op up to the order of the f64
/// sums (row by row here, tile by tile there).
pub fn lambda_grad_stored_rows(
    grad: &[f32],
    base: &StoredTensor,
    experts: &[&StoredTensor],
    rows: &[u32],
    row_len: usize,
) -> Result<Vec<f64>> {
    check_stored("lambda_grad_stored_rows", base, experts, None)?;
    check_rows("lambda_grad_stored_rows", base, rows, row_len)?;
    check_grad("lambda_grad_stored_rows", grad, base)?;
    let per_row: Vec<Vec<f64>> = rows
        .par_iter()
        .map(|&r| {
            let start = r as usize * row_len;
            dots(&grad[start..start + row_len], start, base, experts)
        })
        .collect();
    Ok(sum_in_order(&per_row, experts.len()))
}

/// The error for a non-finite merged element `i`: the first input that is non-finite there, or
/// the overflowing combination.
fn non_finite(base: &StoredTensor, experts: &[&StoredTensor], coefs: &[f32], i: usize, value: f32) -> Error {
    for t in std::iter::once(base).chain(experts.iter().copied()) {
        let mut v = [0f32];
        t.decode_into(i, &mut v);
        if !v[0].is_finite() {
            return Error::NonFinite { path: t.file.clone(), tensor: t.name.clone(), index: i, value: v[0] };
        }
    }
    Error::Invalid(format!(
        "merging `{}` with coefficients {coefs:?} overflowed to {value} at element {i}; lower the learning rate",
        base.name
    ))
}

/// `g_k = sum_i grad_i (expert_k,i - base_i)` for every expert, in f64: each [`TILE`] of
/// elements summed in index order, the tiles in tile order, so the result is the bits of
/// [`crate::merge::lambda_grad`] over the decoded values whatever the thread count.
pub fn lambda_grad_stored(grad: &[f32], base: &StoredTensor, experts: &[&StoredTensor]) -> Result<Vec<f64>> {
    check_stored("lambda_grad_stored", base, experts, None)?;
    check_grad("lambda_grad_stored", grad, base)?;
    let n = grad.len();
    let tiles: Vec<Vec<f64>> = (0..n.div_ceil(TILE))
        .into_par_iter()
        .map(|t| {
            let start = t * TILE;
            dots(&grad[start..(start + TILE).min(n)], start, base, experts)
        })
        .collect();
    Ok(sum_in_order(&tiles, experts.len()))
}

#[cfg(test)]
mod tests {
    use half::bf16;

    use super::*;
    use crate::merge::lambda_grad::lambda_grad;

    fn wave(n: usize, s: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * s).sin()).collect()
    }

    fn stored_f32(name: &str, v: &[f32]) -> StoredTensor {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        StoredTensor::from_bytes(name, crate::checkpoint::FloatDType::F32, &[v.len()], &bytes).unwrap()
    }

    fn stored_bf16(name: &str, v: &[f32]) -> (StoredTensor, Vec<f32>) {
        let h: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
        let bytes: Vec<u8> = h.iter().flat_map(|x| x.to_le_bytes()).collect();
        let t = StoredTensor::from_bytes(name, crate::checkpoint::FloatDType::BF16, &[v.len()], &bytes).unwrap();
        (t, h.iter().map(|x| x.to_f32()).collect())
    }

    #[test]
    fn merge_matches_the_kernel_order_and_an_f64_sum() {
        let n = 2 * MERGE_CHUNK + 13;
        let base = wave(n, 0.37);
        let experts: Vec<Vec<f32>> = [1.1, 2.3, 0.7].iter().map(|&s| wave(n, s)).collect();
        let coefs = [0.3f32, -0.2, 0.9];
        let bs = stored_f32("w", &base);
        let es: Vec<StoredTensor> = experts.iter().map(|e| stored_f32("w", e)).collect();
        let views: Vec<&StoredTensor> = es.iter().collect();
        let got = merge_stored(&bs, &views, &coefs).unwrap();
        for i in 0..n {
            let mut acc = 0f32;
            for (e, c) in experts.iter().zip(coefs) {
                acc += c * (e[i] - base[i]);
            }
            assert_eq!(got[i].to_bits(), (base[i] + acc).to_bits(), "element {i}");
            let exact = base[i] as f64
                + experts.iter().zip(coefs).map(|(e, c)| c as f64 * (e[i] as f64 - base[i] as f64)).sum::<f64>();
            assert!((got[i] as f64 - exact).abs() <= 4e-7 * (1.0 + exact.abs()), "element {i}");
        }
    }

    #[test]
    fn lambda_grad_is_the_f32_twin_on_decoded_values() {
        let n = 3 * TILE + 5;
        let grad = wave(n, 0.05);
        let (bs, base) = stored_bf16("w", &wave(n, 0.37));
        let pairs: Vec<(StoredTensor, Vec<f32>)> = [1.1, 2.3].iter().map(|&s| stored_bf16("w", &wave(n, s))).collect();
        let views: Vec<&StoredTensor> = pairs.iter().map(|p| &p.0).collect();
        let decoded: Vec<&[f32]> = pairs.iter().map(|p| p.1.as_slice()).collect();
        let got = lambda_grad_stored(&grad, &bs, &views).unwrap();
        let want = lambda_grad(&grad, Some(&base), &decoded).unwrap();
        assert_eq!(
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn non_finite_inputs_and_bad_shapes_are_named() {
        let mut e = wave(100, 1.0);
        e[42] = f32::NAN;
        let bs = stored_f32("layer.w", &wave(100, 0.5));
        let es = stored_f32("layer.w", &e);
        let err = merge_stored(&bs, &[&es], &[0.5]).unwrap_err().to_string();
        assert!(err.contains("layer.w") && err.contains("42"), "{err}");
        let short = stored_f32("layer.w", &wave(99, 1.0));
        let err = merge_stored(&bs, &[&short], &[0.5]).unwrap_err().to_string();
        assert!(err.contains("[99]") && err.contains("[100]"), "{err}");
        assert!(merge_stored(&bs, &[&es], &[0.5, 0.1]).is_err());
        assert!(lambda_grad_stored(&[0.0; 7], &bs, &[&bs]).is_err());
        let huge = stored_f32("layer.w", &[3e38f32; 4]);
        let err = merge_stored(&stored_f32("layer.w", &[0.0; 4]), &[&huge], &[2.0]).unwrap_err().to_string();
        assert!(err.contains("overflowed"), "{err}");
    }

    #[test]
    fn row_ops_equal_the_full_ops_on_their_rows() {
        let (rows_n, row_len) = (300, 37);
        let n = rows_n * row_len;
        let (bs, _) = stored_bf16("emb", &wave(n, 0.37));
        let pairs: Vec<(StoredTensor, Vec<f32>)> =
            [1.1, 2.3].iter().map(|&s| stored_bf16("emb", &wave(n, s))).collect();
        let views: Vec<&StoredTensor> = pairs.iter().map(|p| &p.0).collect();
        let rows = [0u32, 5, 6, 150, 299];
        let coefs = [0.3f32, -0.7];
        let full = merge_stored(&bs, &views, &coefs).unwrap();
        let sparse = merge_stored_rows(&bs, &views, &coefs, &rows, row_len).unwrap();
        for r in 0..rows_n {
            let span = r * row_len..(r + 1) * row_len;
            if rows.contains(&(r as u32)) {
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&sparse[span.clone()]), bits(&full[span]), "row {r}");
            } else {
                assert!(sparse[span].iter().all(|&v| v == 0.0), "row {r}");
            }
        }
        // A gradient living on those rows: the row op reads only them and agrees with the full op.
        let mut grad = vec![0f32; n];
        for &r in &rows {
            grad[r as usize * row_len..(r as usize + 1) * row_len].copy_from_slice(&wave(row_len, 0.1 + r as f32));
        }
        let want = lambda_grad_stored(&grad, &bs, &views).unwrap();
        let got = lambda_grad_stored_rows(&grad, &bs, &views, &rows, row_len).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-12 * w.abs().max(1.0), "{g} vs {w}");
        }
        // Rows out of range, unsorted or not dividing the tensor are shape errors.
        assert!(merge_stored_rows(&bs, &views, &coefs, &[300], row_len).is_err());
        assert!(merge_stored_rows(&bs, &views, &coefs, &[5, 5], row_len).is_err());
        assert!(lambda_grad_stored_rows(&grad, &bs, &views, &[2, 1], row_len).is_err());
        assert!(merge_stored_rows(&bs, &views, &coefs, &[1], 7).is_err());
    }

    /// The update's operations one element at a time, as `kernels/ops.cu` writes them.
    #[test]
    fn adam_update_is_the_element_formula_in_kernel_order() {
        let n = MERGE_CHUNK + 3;
        let (mut p, mut m, mut v) = (wave(n, 0.2), vec![0f32; n], vec![0f32; n]);
        let (mut pe, mut me, mut ve) = (p.clone(), m.clone(), v.clone());
        for t in 1..=3 {
            let g = wave(n, 0.3 * t as f32);
            // The second step clips: its gradients are scaled first.
            let gs = if t == 2 { 0.37 } else { 1.0 };
            let s = AdamStep::new(0.01, 0.9, 0.999, 1e-8, t).with_grad_scale(gs);
            adam_update(&mut p, &g, &mut m, &mut v, &s);
            for i in 0..n {
                let gi = g[i] * gs;
                let mi = s.beta1 * me[i] + (1.0 - s.beta1) * gi;
                let vi = s.beta2 * ve[i] + (1.0 - s.beta2) * gi * gi;
                me[i] = mi;
                ve[i] = vi;
                pe[i] -= s.step_size * mi / (vi.sqrt() / s.c2_sqrt + s.eps);
            }
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&p), bits(&pe));
        assert_eq!(bits(&v), bits(&ve));
        assert!(p.iter().zip(wave(n, 0.2)).any(|(a, b)| a != &b), "parameters moved");
    }
}
