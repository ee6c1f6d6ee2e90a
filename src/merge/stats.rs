//! Whole-tensor statistics computed before a tensor is merged chunk by chunk: magnitude
//! thresholds (TIES, breadcrumbs, SCE), dot products (SLERP, Model Stock) and mask sums
//! (l1 rescaling). A method asks for them in [`super::MergeMethod::prepare`] through a
//! [`TensorPass`], which streams the tensor's inputs; every reduction here runs over fixed
//! chunks and sums their partial results in chunk order, so the statistics do not depend on
//! threads or on how the merge itself is chunked.

use rayon::prelude::*;

use super::TensorParams;
use super::lambda_grad::{LANES, dot_lanes};
use super::select::{Threshold, magnitude_thresholds};
use crate::error::Result;

/// What [`super::MergeMethod::prepare`] hands to every chunk of the tensor.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TensorStats {
    /// Magnitude thresholds, in an order the method defines.
    pub thresholds: Vec<Threshold>,
    /// Scalars (coefficients, norms, rescale factors), in an order the method defines.
    pub scalars: Vec<f64>,
}

/// Read access to one tensor's inputs, for statistics passes.
pub trait TensorPass: Sync {
    /// Elements in the tensor.
    fn len(&self) -> usize;

    /// Length of the last dimension: rows of this length are contiguous.
    fn row_len(&self) -> usize;

    /// Elements per pass chunk: a multiple of [`Self::row_len`] when the method works on
    /// whole rows.
    fn chunk_len(&self) -> usize;

    fn params(&self) -> &TensorParams;

    /// Identifies the tensor in the random streams.
    fn name_hash(&self) -> u32;

    fn experts(&self) -> usize;

    /// Writes elements `offset .. offset + base.len()` of the base into `base` (when the
    /// method has one; else leaves it alone) and of expert `k` into `experts[k]`.
    fn read(&self, offset: usize, base: &mut [f32], experts: &mut [Vec<f32>]) -> Result<()>;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Runs `f` on every chunk of the tensor (in parallel) and returns the results in chunk
/// order. `f(offset, base, experts)` sees the chunk's values.
pub fn map_chunks<P, F>(pass: &dyn TensorPass, f: F) -> Result<Vec<P>>
where
    P: Send,
    F: Fn(usize, &[f32], &[Vec<f32>]) -> P + Sync,
{
    let n = pass.len();
    let chunk = pass.chunk_len().max(1);
    let k = pass.experts();
    (0..n.div_ceil(chunk))
        .into_par_iter()
        .map_init(
            || (Vec::new(), vec![Vec::new(); k]),
            |(base, experts): &mut (Vec<f32>, Vec<Vec<f32>>), c| {
                let offset = c * chunk;
                let len = chunk.min(n - offset);
                base.resize(len, 0.0);
                experts.iter_mut().for_each(|e| e.resize(len, 0.0));
                pass.read(offset, base, experts)?;
                Ok(f(offset, base, experts))
            },
        )
        .collect()
}

/// Sums per-chunk vectors element-wise in chunk order.
pub fn sum_in_order(parts: Vec<Vec<f64>>, len: usize) -> Vec<f64> {
    parts.into_iter().fold(vec![0.0; len], |mut acc, p| {
        acc.iter_mut().zip(p).for_each(|(a, x)| *a += x);
        acc
    })
}

/// Which vectors a Gram matrix is taken over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vectors {
    /// The base (first) and then every expert, as stored.
    BaseAndExperts,
    /// Every expert's task vector, expert minus base.
    TaskVectors,
}

/// The Gram matrix (row-major, `m x m`) of the chosen vectors over the whole tensor, in f64.
pub fn gram(pass: &dyn TensorPass, vectors: Vectors) -> Result<Vec<f64>> {
    let k = pass.experts();
    let m = match vectors {
        Vectors::BaseAndExperts => k + 1,
        Vectors::TaskVectors => k,
    };
    let parts = map_chunks(pass, |_, base, experts| {
        // f32 vectors (task vectors rounded to f32 as before) widened to f64 once per stretch,
        // then every pair's products summed in 8 lanes (`dot_f64`'s order over the chunk). A
        // product of two f32 values is exact in f64, so this is the same sum, bit for bit, as
        // widening inside each dot; the stretch's vectors stay in L1/L2 for all pairs.
        let n = base.len();
        let mut acc = vec![[0f64; LANES]; m * m];
        let mut wide = vec![0f64; m * GRAM_STRETCH];
        for s in (0..n).step_by(GRAM_STRETCH) {
            let e = (s + GRAM_STRETCH).min(n);
            let len = e - s;
            for (v, w) in wide.chunks_mut(GRAM_STRETCH).enumerate() {
                let w = &mut w[..len];
                match (vectors, v) {
                    (Vectors::BaseAndExperts, 0) => widen(w, &base[s..e]),
                    (Vectors::BaseAndExperts, v) => widen(w, &experts[v - 1][s..e]),
                    (Vectors::TaskVectors, v) => widen_diff(w, &experts[v][s..e], &base[s..e]),
                }
            }
            let ws: Vec<&[f64]> = wide.chunks(GRAM_STRETCH).map(|w| &w[..len]).collect();
            for i in 0..m {
                for j in i..m {
                    dot_lanes(&mut acc[i * m + j], ws[i], ws[j]);
                }
            }
        }
        let mut g = vec![0f64; m * m];
        for i in 0..m {
            for j in i..m {
                let d: f64 = acc[i * m + j].iter().sum();
                g[i * m + j] = d;
                g[j * m + i] = d;
            }
        }
        g
    })?;
    Ok(sum_in_order(parts, m * m))
}

fn widen(out: &mut [f64], x: &[f32]) {
    out.iter_mut().zip(x).for_each(|(o, &x)| *o = x as f64);
}

/// `x - b` rounded to f32 (the task vector as stored in f32), then widened.
fn widen_diff(out: &mut [f64], x: &[f32], b: &[f32]) {
    out.iter_mut().zip(x).zip(b).for_each(|((o, &x), &b)| *o = (x - b) as f64);
}

/// Elements of a Gram chunk handled at a time: a multiple of [`LANES`], so the lanes carry
/// over exactly; a stretch's widened vectors (8 KB each) stay in L1.
const GRAM_STRETCH: usize = 1024;

/// Exact magnitude thresholds of `ks.len()` value streams, stream `s` keeping its `ks[s]`
/// largest magnitudes. `values(base, experts, out)` writes each stream's values for a chunk
/// into `out[s]`.
pub fn thresholds<F>(pass: &dyn TensorPass, ks: &[usize], values: F) -> Result<Vec<Threshold>>
where
    F: Fn(&[f32], &[Vec<f32>], &mut [Vec<f32>]) + Sync,
{
    let k = pass.experts();
    magnitude_thresholds(pass.len(), ks, |offset, bufs| {
        let len = bufs[0].len();
        let mut base = vec![0f32; len];
        let mut experts = vec![vec![0f32; len]; k];
        pass.read(offset, &mut base, &mut experts)?;
        values(&base, &experts, &mut bufs[..ks.len()]);
        Ok(())
    })
}

/// A tensor's inputs held in memory: for tests and for callers outside the executor.
pub struct InMemory<'a> {
    pub base: Option<&'a [f32]>,
    pub experts: Vec<&'a [f32]>,
    pub row_len: usize,
    pub chunk_len: usize,
    pub params: &'a TensorParams,
    pub name_hash: u32,
}

impl TensorPass for InMemory<'_> {
    fn len(&self) -> usize {
        self.experts.first().map_or(0, |e| e.len())
    }

    fn row_len(&self) -> usize {
        self.row_len
    }

    fn chunk_len(&self) -> usize {
        self.chunk_len
    }

    fn params(&self) -> &TensorParams {
        self.params
    }

    fn name_hash(&self) -> u32 {
        self.name_hash
    }

    fn experts(&self) -> usize {
        self.experts.len()
    }

    fn read(&self, offset: usize, base: &mut [f32], experts: &mut [Vec<f32>]) -> Result<()> {
        let end = offset + base.len();
        if let Some(b) = self.base {
            base.copy_from_slice(&b[offset..end]);
        }
        for (out, e) in experts.iter_mut().zip(&self.experts) {
            out.copy_from_slice(&e[offset..end]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::lambda_grad::dot_f64;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed);
        (0..n).map(|_| rand::Rng::random::<f32>(&mut rng) - 0.5).collect()
    }

    /// The Gram matrix is each pair's `dot_f64` per chunk (task vectors rounded to f32 first),
    /// summed in chunk order: exactly, for chunks that are not multiples of the stretch and a
    /// tail that is not a multiple of the lanes.
    #[test]
    fn gram_is_the_chunked_f64_dot_of_every_pair() {
        let (n, chunk, k) = (12_345, 5_000, 3);
        let base = values(n, 1);
        let experts: Vec<Vec<f32>> = (0..k).map(|e| values(n, 10 + e as u64)).collect();
        let params = TensorParams::default();
        let pass = InMemory {
            base: Some(&base),
            experts: experts.iter().map(Vec::as_slice).collect(),
            row_len: n,
            chunk_len: chunk,
            params: &params,
            name_hash: 0,
        };
        let tv: Vec<Vec<f32>> = experts.iter().map(|e| e.iter().zip(&base).map(|(x, b)| x - b).collect()).collect();
        let all: Vec<&Vec<f32>> = std::iter::once(&base).chain(&experts).collect();
        for (vectors, vs) in [(Vectors::TaskVectors, tv.iter().collect::<Vec<_>>()), (Vectors::BaseAndExperts, all)] {
            let m = vs.len();
            let g = gram(&pass, vectors).unwrap();
            for i in 0..m {
                for j in 0..m {
                    let want = (0..n).step_by(chunk).fold(0.0, |acc, s| {
                        let e = (s + chunk).min(n);
                        acc + dot_f64(&vs[i][s..e], &vs[j][s..e], None)
                    });
                    assert_eq!(g[i * m + j].to_bits(), want.to_bits(), "{vectors:?} ({i}, {j})");
                }
            }
        }
    }
}
