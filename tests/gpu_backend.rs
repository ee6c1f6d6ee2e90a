//! The CUDA backend against the CPU reference: every op forward and backward on fresh random
//! inputs of awkward sizes (not multiples of 32 or of the kernels' block size; grouped-query and
//! causal attention; padding masks with padded tails and a fully padded sequence); two runs give
//! identical bits; the real MiniLM-L6 sequence classifier's logits and gradients; a few SyMerge
//! adaptation steps; the CLI with `--device cuda`.
//!
//! Tolerance: `||gpu - cpu|| / ||cpu||` (f64) per output. 1e-5 for every op (both sides are f32
//! with different summation orders, about 1e-6 apart); 0 (bit-identical) where both compute the
//! same f32 operations in the same order (add, embedding and its scatter-add, the L1 gradient).
//! Whole-model checks allow 1e-4 for logits and a batch's loss, 1e-3 for gradients and for losses
//! after optimiser steps (six layers of rounding differences); Lambda after four adaptation steps
//! may differ in at most 1% of its coefficients (see the test). Every comparison prints its error, and a test reports all its failures
//! at once. Without a CUDA device each GPU test prints `SKIPPED: no CUDA device (...)`.

mod common;

use common::reference::norm_rel;

use common::adapt_fixture::{TEXTS, fixture};
use common::{gpu, minilm_dir, randoms};
use symerge::adapt::classifier::Adapter;
use symerge::adapt::config::AdaptConfig;
use symerge::backend::cuda::Cuda;
use symerge::backend::{AdamStep, AttnShape, Backend, Cpu, Gelu, StoredGrad, StoredMerge};
use symerge::checkpoint::{FloatDType, StoredTensor};
use symerge::model::{CausalLm, Gpt2Config, LlamaConfig, LmArch, LoadOptions, NewHead, Params, SequenceClassifier};

const OP_TOL: f64 = 1e-5;
const MODEL_TOL: f64 = 1e-4;
const GRAD_TOL: f64 = 1e-3;

fn cuda() -> Option<Cuda> {
    gpu().map(|g| Cuda::new(g).unwrap_or_else(|e| panic!("the CUDA backend could not start: {e}")))
}

/// Fresh values for every run: the clock mixed with a counter (printed, to replay a failure).
fn fresh_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    t ^ COUNTER.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn rand(seed: u64, n: usize, scale: f64) -> Vec<f32> {
    randoms(seed, n, scale).into_iter().map(|v| v as f32).collect()
}

fn max_abs(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).abs()).fold(0.0, f64::max)
}

/// Collects comparisons; `finish` fails the test with every failure listed.
struct Report {
    cuda: Cuda,
    seed: u64,
    failures: Vec<String>,
}

impl Report {
    fn new(cuda: Cuda) -> Self {
        let seed = fresh_seed();
        eprintln!("seed {seed}");
        Report { cuda, seed, failures: Vec::new() }
    }

    /// Fresh random values (each call a new stream from the run's seed).
    fn rand(&mut self, n: usize, scale: f64) -> Vec<f32> {
        self.seed = self.seed.wrapping_add(0x9E37_79B9);
        rand(self.seed, n, scale)
    }

    fn up(&self, v: &[f32]) -> <Cuda as Backend>::Buf {
        self.cuda.upload(v).unwrap()
    }

    fn down(&self, b: &<Cuda as Backend>::Buf) -> Vec<f32> {
        self.cuda.download(b).unwrap()
    }

    /// Compares host values; prints the error; records a failure above `tol`.
    fn values(&mut self, name: &str, gpu: &[f32], cpu: &[f32], tol: f64) -> f64 {
        self.values_floored(name, gpu, cpu, tol, 0.0)
    }

    /// [`Self::values`] with the error relative to the larger of the CPU's norm and `floor`:
    /// for a tensor whose exact value is zero and whose computed one is rounding noise on both
    /// sides, which a relative error would compare noise to noise.
    fn values_floored(&mut self, name: &str, gpu: &[f32], cpu: &[f32], tol: f64, floor: f64) -> f64 {
        if gpu.len() != cpu.len() {
            self.failures.push(format!("{name}: {} elements on the GPU, {} on the CPU", gpu.len(), cpu.len()));
            return f64::NAN;
        }
        let norm = |v: &[f32]| v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        let diff: Vec<f32> = gpu.iter().zip(cpu).map(|(g, c)| g - c).collect();
        let e = if norm(cpu) >= floor { norm_rel(gpu, cpu) } else { norm(&diff) / floor };
        let ok = e <= tol;
        eprintln!(
            "{name:<48} rel err {e:.2e}  max abs {:.2e}  n {:>8}  tol {tol:.0e}{}",
            max_abs(gpu, cpu),
            cpu.len(),
            if ok { "" } else { "  FAILED" }
        );
        if !ok {
            self.failures.push(format!("{name}: rel err {e:.3e} > {tol:.0e}"));
        }
        e
    }

    fn buf(&mut self, name: &str, gpu: &<Cuda as Backend>::Buf, cpu: &[f32], tol: f64) -> f64 {
        let g = self.down(gpu);
        self.values(name, &g, cpu, tol)
    }

    fn check(&mut self, name: &str, ok: bool, what: String) {
        eprintln!("{name:<48} {}", if ok { "ok" } else { "FAILED" });
        if !ok {
            self.failures.push(format!("{name}: {what}"));
        }
    }

    fn finish(self) {
        assert!(self.failures.is_empty(), "{} failure(s):\n{}", self.failures.len(), self.failures.join("\n"));
    }
}

#[test]
fn gemm_and_linear_match_cpu() {
    let Some(cuda) = cuda() else { return };
    let mut r = Report::new(cuda);
    let cpu = Cpu;
    for &(m, n, k) in &[(37, 53, 29), (1, 77, 130), (129, 1, 3), (65, 33, 0), (300, 257, 191)] {
        for ta in [false, true] {
            for tb in [false, true] {
                let (a, b, c0) = (r.rand(m * k, 1.0), r.rand(k * n, 1.0), r.rand(m * n, 1.0));
                let mut c = c0.clone();
                cpu.gemm(ta, tb, m, n, k, 0.7, &a, &b, 1.3, &mut c).unwrap();
                let mut cg = r.up(&c0);
                r.cuda.gemm(ta, tb, m, n, k, 0.7, &r.up(&a), &r.up(&b), 1.3, &mut cg).unwrap();
                r.buf(&format!("gemm {m}x{n}x{k} ta={ta} tb={tb}"), &cg, &c, OP_TOL);
            }
        }
    }
    for &(rows, inp, out) in &[(37, 91, 45), (1, 384, 7), (130, 33, 1), (5, 0, 3)] {
        let (x, w, b, dy) =
            (r.rand(rows * inp, 1.0), r.rand(out * inp, 0.3), r.rand(out, 0.5), r.rand(rows * out, 1.0));
        let (xg, wg, bg, dyg) = (r.up(&x), r.up(&w), r.up(&b), r.up(&dy));
        let name = format!("linear {rows}x{inp}->{out}");
        for bias in [true, false] {
            let y = cpu.linear(&x, &w, bias.then_some(&b), rows, inp, out).unwrap();
            let yg = r.cuda.linear(&xg, &wg, bias.then_some(&bg), rows, inp, out).unwrap();
            r.buf(&format!("{name} bias={bias}"), &yg, &y, OP_TOL);
        }
        for (need_dx, has_bias) in [(true, true), (false, false)] {
            let g = cpu.linear_backward(&x, &w, &dy, rows, inp, out, need_dx, has_bias).unwrap();
            let gg = r.cuda.linear_backward(&xg, &wg, &dyg, rows, inp, out, need_dx, has_bias).unwrap();
            r.buf(&format!("{name} backward dw"), &gg.dw, &g.dw, OP_TOL);
            match (g.dx, gg.dx) {
                (Some(c), Some(gv)) => _ = r.buf(&format!("{name} backward dx"), &gv, &c, OP_TOL),
                (None, None) => {}
                _ => r.check(&format!("{name} backward dx"), false, "dx present on one side only".into()),
            }
            match (g.db, gg.db) {
                (Some(c), Some(gv)) => _ = r.buf(&format!("{name} backward db"), &gv, &c, OP_TOL),
                (None, None) => {}
                _ => r.check(&format!("{name} backward db"), false, "db present on one side only".into()),
            }
        }
    }
    // Shape errors are the CPU's.
    let e = r.cuda.linear(&r.up(&[0.0; 5]), &r.up(&[0.0; 6]), None, 2, 3, 2).err().map(|e| e.to_string());
    r.check(
        "linear shape error",
        e.as_deref().is_some_and(|e| e.contains("x has 5 elements, expected 6")),
        format!("{e:?}"),
    );
    r.finish();
}

#[test]
fn elementwise_layernorm_and_softmax_match_cpu() {
    let Some(cuda) = cuda() else { return };
    let mut r = Report::new(cuda);
    let cpu = Cpu;
    let n = 10_007;
    let (x, y) = (r.rand(n, 4.0), r.rand(n, 1.0));
    let (xg, yg) = (r.up(&x), r.up(&y));
    r.buf("add", &r.cuda.add(&xg, &yg).unwrap(), &cpu.add(&x, &y).unwrap(), 0.0);
    let mut acc = r.up(&x);
    r.cuda.add_assign(&mut acc, &yg).unwrap();
    r.buf("add_assign", &acc, &cpu.add(&x, &y).unwrap(), 0.0);
    for kind in [Gelu::Erf, Gelu::Tanh] {
        r.buf(&format!("gelu {kind:?}"), &r.cuda.gelu(&xg, kind).unwrap(), &cpu.gelu(&x, kind).unwrap(), OP_TOL);
        let (g, c) = (r.cuda.gelu_backward(&xg, &yg, kind).unwrap(), cpu.gelu_backward(&x, &y, kind).unwrap());
        r.buf(&format!("gelu {kind:?} backward"), &g, &c, OP_TOL);
    }
    r.buf("tanh", &r.cuda.tanh(&xg).unwrap(), &cpu.tanh(&x).unwrap(), OP_TOL);
    r.buf("tanh backward", &r.cuda.tanh_backward(&xg, &yg).unwrap(), &cpu.tanh_backward(&x, &y).unwrap(), OP_TOL);

    for &(rows, dim) in &[(37, 383), (3, 1031), (5, 1), (300, 384)] {
        for eps in [1e-12f32, 1e-5] {
            let x: Vec<f32> = r.rand(rows * dim, 2.0).iter().map(|v| v + 3.0).collect();
            let (gamma, beta, dy) = (r.rand(dim, 1.0), r.rand(dim, 1.0), r.rand(rows * dim, 1.0));
            let (xg, gg, bg, dyg) = (r.up(&x), r.up(&gamma), r.up(&beta), r.up(&dy));
            let name = format!("layernorm {rows}x{dim} eps {eps:e}");
            let yc = cpu.layernorm(&x, &gamma, &beta, rows, dim, eps).unwrap();
            r.buf(&name, &r.cuda.layernorm(&xg, &gg, &bg, rows, dim, eps).unwrap(), &yc, OP_TOL);
            let c = cpu.layernorm_backward(&x, &gamma, &dy, rows, dim, eps).unwrap();
            let g = r.cuda.layernorm_backward(&xg, &gg, &dyg, rows, dim, eps).unwrap();
            r.buf(&format!("{name} backward dx"), &g.dx, &c.dx, OP_TOL);
            r.buf(&format!("{name} backward dgamma"), &g.dgamma, &c.dgamma, OP_TOL);
            r.buf(&format!("{name} backward dbeta"), &g.dbeta, &c.dbeta, OP_TOL);
        }
    }

    for &(rows, cols, group) in &[(60, 77, 3), (7, 1, 7), (12, 300, 4)] {
        let x = r.rand(rows * cols, 3.0);
        // Mask rows: zeros, f32::MIN at a few columns, and one row hiding every column.
        let mut mask = vec![0f32; rows / group * cols];
        for (i, m) in mask.iter_mut().enumerate() {
            if i % 5 == 3 {
                *m = f32::MIN;
            }
        }
        mask[..cols].fill(f32::MIN);
        let dy = r.rand(rows * cols, 1.0);
        let (xg, mg, dyg) = (r.up(&x), r.up(&mask), r.up(&dy));
        let name = format!("softmax {rows}x{cols}");
        for masked in [false, true] {
            let m = masked.then_some(&mask);
            let yc = cpu.softmax(&x, m, rows, cols, group).unwrap();
            let yg = r.cuda.softmax(&xg, masked.then_some(&mg), rows, cols, group).unwrap();
            r.buf(&format!("{name} mask={masked}"), &yg, &yc, OP_TOL);
            let dc = cpu.softmax_backward(&yc, &dy, rows, cols).unwrap();
            let dg = r.cuda.softmax_backward(&r.up(&yc), &dyg, rows, cols).unwrap();
            r.buf(&format!("{name} mask={masked} backward"), &dg, &dc, OP_TOL);
        }
    }
    r.finish();
}

/// `[batch, seq_k]` key mask: sequence b has `real[b]` real tokens, then padding.
fn key_mask(seq_k: usize, real: &[usize]) -> Vec<f32> {
    real.iter().flat_map(|&n| (0..seq_k).map(move |j| if j < n { 1.0 } else { 0.0 })).collect()
}

#[test]
fn attention_matches_cpu() {
    let Some(cuda) = cuda() else { return };
    let mut r = Report::new(cuda);
    let cpu = Cpu;
    let shape = |batch, seq_q, seq_k, heads, kv_heads, head_dim, causal| AttnShape {
        batch,
        seq_q,
        seq_k,
        heads,
        kv_heads,
        head_dim,
        causal,
        live_queries_only: false,
    };
    let cases: Vec<(&str, AttnShape, Option<Vec<f32>>)> = vec![
        ("bert padded tails", AttnShape::bidirectional(3, 13, 4, 24), Some(key_mask(13, &[12, 8, 13]))),
        ("bert no mask", AttnShape::bidirectional(2, 37, 12, 32), None),
        ("gqa causal padded", shape(2, 7, 11, 6, 2, 13, true), Some(key_mask(11, &[11, 6]))),
        ("gqa no mask", shape(1, 33, 33, 8, 4, 64, false), None),
        ("mqa causal, one sequence all padding", shape(4, 5, 5, 3, 1, 7, true), Some(key_mask(5, &[5, 0, 2, 4]))),
        ("long keys", shape(2, 3, 300, 2, 2, 16, false), Some(key_mask(300, &[257, 300]))),
    ];
    for (name, s, mask) in cases {
        let (q, k, v, dout) =
            (r.rand(s.q_len(), 1.5), r.rand(s.kv_len(), 1.5), r.rand(s.kv_len(), 1.0), r.rand(s.q_len(), 1.0));
        let (qg, kg, vg, dg) = (r.up(&q), r.up(&k), r.up(&v), r.up(&dout));
        let mg = mask.as_ref().map(|m| r.up(m));
        let name = format!("attention {name} {s:?}");
        let oc = cpu.attention(&q, &k, &v, mask.as_ref(), s).unwrap();
        r.buf(&name, &r.cuda.attention(&qg, &kg, &vg, mg.as_ref(), s).unwrap(), &oc, OP_TOL);
        let c = cpu.attention_backward(&q, &k, &v, mask.as_ref(), &dout, s).unwrap();
        let g = r.cuda.attention_backward(&qg, &kg, &vg, mg.as_ref(), &dg, s).unwrap();
        r.buf("  backward dq", &g.dq, &c.dq, OP_TOL);
        r.buf("  backward dk", &g.dk, &c.dk, OP_TOL);
        r.buf("  backward dv", &g.dv, &c.dv, OP_TOL);
        // Padded keys get exactly zero gradient, as on the CPU.
        if let Some(m) = &mask {
            let (dk, dv) = (r.down(&g.dk), r.down(&g.dv));
            let ks = s.kv_heads * s.head_dim;
            let leaked = m.iter().enumerate().filter(|&(_, &mv)| mv == 0.0).any(|(row, _)| {
                dk[row * ks..(row + 1) * ks].iter().chain(&dv[row * ks..(row + 1) * ks]).any(|&x| x != 0.0)
            });
            // A sequence with every key padded has uniform weights, hence gradients, on both sides.
            let all_padded = m.chunks(s.seq_k).any(|row| row.iter().all(|&x| x == 0.0));
            if !all_padded {
                r.check("  padded keys get zero gradient", !leaked, "nonzero dk/dv on a padded key".into());
            }
        }
    }
    let bad = AttnShape { kv_heads: 3, ..AttnShape::bidirectional(1, 2, 4, 2) };
    let z = r.up(&vec![0.0; bad.q_len()]);
    let e = r.cuda.attention(&z, &r.up(&vec![0.0; bad.kv_len()]), &r.up(&vec![0.0; bad.kv_len()]), None, bad).err();
    r.check("attention shape error", e.is_some_and(|e| e.to_string().contains("cannot be grouped")), "accepted".into());
    r.finish();
}

#[test]
fn gathers_and_losses_match_cpu() {
    let Some(cuda) = cuda() else { return };
    let mut r = Report::new(cuda);
    let cpu = Cpu;
    let (vocab, dim, n) = (1001, 37, 300);
    let table = r.rand(vocab * dim, 1.0);
    // Repeated ids (only 50 distinct of 1001), in a scrambled order.
    let ids: Vec<u32> = (0..n as u32).map(|i| (i * 7919 % 50) * 13 % vocab as u32).collect();
    let dy = r.rand(n * dim, 1.0);
    let (tg, ig, dyg) = (r.up(&table), r.cuda.upload_ids(&ids).unwrap(), r.up(&dy));
    r.buf("embedding", &r.cuda.embedding(&tg, &ig, dim).unwrap(), &cpu.embedding(&table, &ids, dim).unwrap(), 0.0);
    let c = cpu.embedding_backward(&ids, &dy, vocab, dim).unwrap();
    r.buf("embedding backward (scatter-add)", &r.cuda.embedding_backward(&ig, &dyg, vocab, dim).unwrap(), &c, 0.0);
    let bad = r.cuda.upload_ids(&[0, 1001]).unwrap();
    let e = r.cuda.embedding(&tg, &bad, dim).err().map(|e| e.to_string());
    r.check("embedding id error", e.as_deref().is_some_and(|e| e.contains("id 1001 at position 1")), format!("{e:?}"));

    for &(rows, cols) in &[(37, 7), (1, 2), (300, 19)] {
        let z = r.rand(rows * cols, 3.0);
        let mut t: Vec<f32> = r.rand(rows * cols, 1.0).iter().map(|v| v.abs() + 0.05).collect();
        for row in t.chunks_mut(cols) {
            let s: f32 = row.iter().sum();
            row.iter_mut().for_each(|v| *v /= s);
        }
        t[..cols].fill(0.0); // a filtered sample: all-zero targets
        let (zg, tg) = (r.up(&z), r.up(&t));
        let name = format!("{rows}x{cols}");
        r.buf(
            &format!("soft_ce {name}"),
            &r.cuda.soft_ce(&zg, &tg, rows, cols).unwrap(),
            &cpu.soft_ce(&z, &t, rows, cols).unwrap(),
            OP_TOL,
        );
        let c = cpu.soft_ce_backward(&z, &t, rows, cols, 0.7).unwrap();
        r.buf(
            &format!("soft_ce {name} backward"),
            &r.cuda.soft_ce_backward(&zg, &tg, rows, cols, 0.7).unwrap(),
            &c,
            OP_TOL,
        );
        r.buf(
            &format!("entropy {name}"),
            &r.cuda.entropy(&zg, rows, cols).unwrap(),
            &cpu.entropy(&z, rows, cols).unwrap(),
            OP_TOL,
        );
        let c = cpu.entropy_backward(&z, rows, cols, 0.7).unwrap();
        r.buf(&format!("entropy {name} backward"), &r.cuda.entropy_backward(&zg, rows, cols, 0.7).unwrap(), &c, OP_TOL);
    }
    for n in [1, 4095, 10_007] {
        let (x, t) = (r.rand(n, 1.0), r.rand(n, 1.0));
        let (xg, tg) = (r.up(&x), r.up(&t));
        r.buf(&format!("l1 n={n}"), &r.cuda.l1(&xg, Some(&tg)).unwrap(), &cpu.l1(&x, Some(&t)).unwrap(), OP_TOL);
        r.buf(&format!("l1 n={n} no target"), &r.cuda.l1(&xg, None).unwrap(), &cpu.l1(&x, None).unwrap(), OP_TOL);
        let c = cpu.l1_backward(&x, Some(&t), 0.7).unwrap();
        r.buf(&format!("l1 n={n} backward"), &r.cuda.l1_backward(&xg, Some(&tg), 0.7).unwrap(), &c, 0.0);
        let c = cpu.l1_backward(&x, None, 0.7).unwrap();
        r.buf(&format!("l1 n={n} backward no target"), &r.cuda.l1_backward(&xg, None, 0.7).unwrap(), &c, 0.0);
    }
    r.finish();
}

/// The Llama family's ops (RMSNorm, rotary embedding, SwiGLU) and the top-k cross-entropy, forward
/// and backward, on awkward sizes: dims that are not multiples of the block size, a head_dim of
/// 2, positions far beyond the sine's fast range, a 49152-token vocabulary, rows whose ids cover
/// every column, rows without a bucket; then a whole causal LM's loss and gradients.
#[test]
fn llama_ops_and_top_k_loss_match_cpu() {
    let Some(cuda) = cuda() else { return };
    let mut r = Report::new(cuda);
    let cpu = Cpu;
    for &(rows, dim, eps) in &[(37, 383, 1e-5f32), (3, 1031, 1e-6), (5, 1, 1e-5), (300, 576, 1e-5)] {
        let (x, gamma, dy) = (r.rand(rows * dim, 2.0), r.rand(dim, 1.0), r.rand(rows * dim, 1.0));
        let (xg, gg, dyg) = (r.up(&x), r.up(&gamma), r.up(&dy));
        let name = format!("rmsnorm {rows}x{dim}");
        r.buf(
            &name,
            &r.cuda.rmsnorm(&xg, &gg, rows, dim, eps).unwrap(),
            &cpu.rmsnorm(&x, &gamma, rows, dim, eps).unwrap(),
            OP_TOL,
        );
        let (dx, dgamma) = cpu.rmsnorm_backward(&x, &gamma, &dy, rows, dim, eps).unwrap();
        let (dxg, dgg) = r.cuda.rmsnorm_backward(&xg, &gg, &dyg, rows, dim, eps).unwrap();
        r.buf(&format!("{name} dx"), &dxg, &dx, OP_TOL);
        r.buf(&format!("{name} dgamma"), &dgg, &dgamma, OP_TOL);
    }
    for &(rows, heads, head_dim, theta, scale) in
        &[(37, 3, 64, 10_000f32, 1f32), (5, 9, 2, 100_000.0, 1.0), (300, 2, 130, 500_000.0, 2.0)]
    {
        let x = r.rand(rows * heads * head_dim, 1.0);
        // Positions up to 200k: angles past 105615 take sinf's slow argument reduction.
        let positions: Vec<u32> = (0..rows as u32).map(|i| (i * 7919 + 3) % 200_000).collect();
        let (xg, pg) = (r.up(&x), r.cuda.upload_ids(&positions).unwrap());
        let name = format!("rope {rows}x{heads}x{head_dim} theta {theta} scale {scale}");
        let c = cpu.rope(&x, &positions, heads, head_dim, theta, scale).unwrap();
        r.buf(&name, &r.cuda.rope(&xg, &pg, heads, head_dim, theta, scale).unwrap(), &c, OP_TOL);
        let c = cpu.rope_backward(&x, &positions, heads, head_dim, theta, scale).unwrap();
        r.buf(
            &format!("{name} backward"),
            &r.cuda.rope_backward(&xg, &pg, heads, head_dim, theta, scale).unwrap(),
            &c,
            OP_TOL,
        );
    }
    let e = r
        .cuda
        .rope(&r.up(&[0.0; 6]), &r.cuda.upload_ids(&[0, 1]).unwrap(), 1, 3, 1e4, 1.0)
        .err()
        .map(|e| e.to_string());
    r.check("rope odd head_dim error", e.as_deref().is_some_and(|e| e.contains("must be even")), format!("{e:?}"));
    for n in [1, 1000, 4097] {
        let (g, u, dy) = (r.rand(n, 4.0), r.rand(n, 1.0), r.rand(n, 1.0));
        let (gg, ug, dyg) = (r.up(&g), r.up(&u), r.up(&dy));
        r.buf(&format!("swiglu n={n}"), &r.cuda.swiglu(&gg, &ug).unwrap(), &cpu.swiglu(&g, &u).unwrap(), OP_TOL);
        let (dg, du) = cpu.swiglu_backward(&g, &u, &dy).unwrap();
        let (dgg, dug) = r.cuda.swiglu_backward(&gg, &ug, &dyg).unwrap();
        r.buf(&format!("swiglu n={n} dgate"), &dgg, &dg, OP_TOL);
        r.buf(&format!("swiglu n={n} dup"), &dug, &du, OP_TOL);
    }
    for &(rows, cols, k) in &[(37, 1001, 16), (3, 8, 8), (5, 49_152, 64), (130, 33, 1)] {
        let z = r.rand(rows * cols, 4.0);
        // Distinct ids per row (a stride coprime to cols walks distinct columns).
        let ids: Vec<u32> = (0..rows).flat_map(|i| (0..k).map(move |j| ((i * 31 + j * 7) % cols) as u32)).collect();
        let ids = if cols % 7 == 0 { (0..rows).flat_map(|_| 0..k as u32).collect() } else { ids };
        let mut t: Vec<f32> = r.rand(rows * k, 1.0).iter().map(|v| v.abs() + 0.01).collect();
        let mut rest: Vec<f32> = r.rand(rows, 0.3).iter().map(|v| v.abs()).collect();
        rest[0] = 0.0; // no bucket on the first row
        for (row, rm) in t.chunks_mut(k).zip(&rest) {
            let s: f32 = row.iter().sum::<f32>() / (1.0 - rm);
            row.iter_mut().for_each(|v| *v /= s);
        }
        let (zg, ig, tg, rg) = (r.up(&z), r.cuda.upload_ids(&ids).unwrap(), r.up(&t), r.up(&rest));
        let name = format!("topk_ce {rows}x{cols} k {k}");
        let c = cpu.topk_ce(&z, &ids, &t, &rest, rows, cols, k).unwrap();
        r.buf(&name, &r.cuda.topk_ce(&zg, &ig, &tg, &rg, rows, cols, k).unwrap(), &c, OP_TOL);
        let c = cpu.topk_ce_backward(&z, &ids, &t, &rest, rows, cols, k, 0.7).unwrap();
        let g = r.cuda.topk_ce_backward(&zg, &ig, &tg, &rg, rows, cols, k, 0.7).unwrap();
        r.buf(&format!("{name} backward"), &g, &c, OP_TOL);
    }
    let bad = r.cuda.upload_ids(&[0, 9]).unwrap();
    let (z, t, rest) = (r.up(&[0.0; 8]), r.up(&[0.5, 0.5]), r.up(&[0.0]));
    let e = r.cuda.topk_ce(&z, &bad, &t, &rest, 1, 8, 2).err().map(|e| e.to_string());
    r.check("topk_ce id error", e.as_deref().is_some_and(|e| e.contains("id 9")), format!("{e:?}"));

    // Whole causal LMs of both families: Llama (grouped-query attention) and GPT-2 (learned
    // positions, fused Conv1D projections, tied embeddings).
    causal_lm_matches::<LlamaConfig>(&mut r, "llama_gqa");
    causal_lm_matches::<Gpt2Config>(&mut r, "gpt2");
    r.finish();
}

/// The fixture causal LM `name` of family `A`: its loss and every gradient on the GPU against
/// the CPU.
fn causal_lm_matches<A: LmArch<Cpu> + LmArch<Cuda>>(r: &mut Report, name: &str) {
    let dir = common::fixture_dir(name);
    let texts = ["the cat sat on the mat", "x", "merging models by task arithmetic, again and again"];
    let cpu = CausalLm::<Cpu, A>::load(Cpu, &dir, 32).unwrap();
    let batch = cpu.model.batch(&cpu.tokenizer.encode(&texts).unwrap()).unwrap();
    let (lc, gc) = cpu.model.lm_loss_grads(&batch).unwrap();
    let gc = cpu.model.total_grads(gc).unwrap();
    let lm = CausalLm::<Cuda, A>::load(r.cuda.clone(), &dir, 32).unwrap();
    let batch = lm.model.batch(&lm.tokenizer.encode(&texts).unwrap()).unwrap();
    let (lg, gg) = lm.model.lm_loss_grads(&batch).unwrap();
    let gg = lm.model.total_grads(gg).unwrap();
    r.values(&format!("{name} loss"), &[lg], &[lc], MODEL_TOL);
    for (tensor, t) in &gc {
        match gg.get(tensor) {
            Some(g) => {
                r.buf(&format!("{name} grad {tensor}"), &g.buf, &t.buf, GRAD_TOL);
            }
            None => r.check(&format!("{name} grad {tensor}"), false, "missing on the GPU".into()),
        }
    }
}

/// Every op with a reduction, on fixed inputs: all outputs, downloaded.
fn reduction_outputs(cuda: &Cuda, seed: u64) -> Vec<Vec<f32>> {
    let up = |v: &[f32]| cuda.upload(v).unwrap();
    let down = |b: &<Cuda as Backend>::Buf| cuda.download(b).unwrap();
    let mut out = Vec::new();
    let (rows, inp, o) = (257, 384, 1536);
    let (x, w, dy) =
        (up(&rand(seed, rows * inp, 1.0)), up(&rand(seed + 1, o * inp, 0.1)), up(&rand(seed + 2, rows * o, 1.0)));
    let g = cuda.linear_backward(&x, &w, &dy, rows, inp, o, true, true).unwrap();
    out.extend([down(&g.dx.unwrap()), down(&g.dw), down(&g.db.unwrap())]);
    let (gamma, dyn_) = (up(&rand(seed + 3, inp, 1.0)), up(&rand(seed + 4, rows * inp, 1.0)));
    let n = cuda.layernorm_backward(&x, &gamma, &dyn_, rows, inp, 1e-12).unwrap();
    out.extend([down(&n.dx), down(&n.dgamma), down(&n.dbeta)]);
    let s = AttnShape {
        batch: 3,
        seq_q: 41,
        seq_k: 41,
        heads: 6,
        kv_heads: 2,
        head_dim: 32,
        causal: false,
        live_queries_only: false,
    };
    let (q, k, v, d) = (
        up(&rand(seed + 5, s.q_len(), 1.0)),
        up(&rand(seed + 6, s.kv_len(), 1.0)),
        up(&rand(seed + 7, s.kv_len(), 1.0)),
        up(&rand(seed + 8, s.q_len(), 1.0)),
    );
    let mask = up(&key_mask(41, &[41, 30, 1]));
    out.push(down(&cuda.attention(&q, &k, &v, Some(&mask), s).unwrap()));
    let a = cuda.attention_backward(&q, &k, &v, Some(&mask), &d, s).unwrap();
    out.extend([down(&a.dq), down(&a.dk), down(&a.dv)]);
    let ids: Vec<u32> = (0..rows as u32).map(|i| i * 31 % 97).collect();
    out.push(down(&cuda.embedding_backward(&cuda.upload_ids(&ids).unwrap(), &x, 100, inp).unwrap()));
    let z = up(&rand(seed + 9, 64 * 9, 3.0));
    let t = up(&rand(seed + 10, 64 * 9, 1.0).iter().map(|v| v.abs()).collect::<Vec<_>>());
    out.extend([
        down(&cuda.soft_ce(&z, &t, 64, 9).unwrap()),
        down(&cuda.soft_ce_backward(&z, &t, 64, 9, 1.0).unwrap()),
        down(&cuda.entropy(&z, 64, 9).unwrap()),
        down(&cuda.entropy_backward(&z, 64, 9, 1.0).unwrap()),
        down(&cuda.l1(&x, Some(&dyn_)).unwrap()),
        down(&cuda.softmax(&x, None, rows, inp, 1).unwrap()),
    ]);
    out
}

#[test]
fn two_runs_give_identical_bits() {
    let Some(cuda) = cuda() else { return };
    let seed = fresh_seed();
    let first = reduction_outputs(&cuda, seed);
    let second = reduction_outputs(&cuda, seed);
    let differing: Vec<usize> = first
        .iter()
        .zip(&second)
        .enumerate()
        .filter(|(_, (a, b))| a.iter().map(|v| v.to_bits()).ne(b.iter().map(|v| v.to_bits())))
        .map(|(i, _)| i)
        .collect();
    eprintln!("{} outputs compared bit for bit; differing: {differing:?}", first.len());
    assert!(differing.is_empty(), "outputs {differing:?} differ between two identical runs (seed {seed})");
}

fn new_head(seed: u64) -> LoadOptions {
    LoadOptions { new_head: Some(NewHead { num_labels: 3, seed }) }
}

/// Compares every gradient tensor of every block. A tensor whose norm is under 1e-5 of all the
/// gradients' is compared against that floor: attention's key bias has an exact gradient of zero
/// (softmax is unchanged by a shift common to a query's scores), and both sides compute rounding
/// noise of about 1e-11 there (seen on an H200: relative errors of 1.3-1.6 between the noises).
fn compare_grads(r: &mut Report, what: &str, gpu: &[Params<Cuda>], cpu: &[Params<Cpu>], tol: f64) {
    if gpu.len() != cpu.len() {
        r.check(what, false, format!("{} blocks of gradients on the GPU, {} on the CPU", gpu.len(), cpu.len()));
        return;
    }
    let total: f64 = cpu.iter().flat_map(|b| b.values()).flat_map(|t| &t.buf).map(|&x| (x as f64).powi(2)).sum();
    let floor = 1e-5 * total.sqrt();
    for (b, (gb, cb)) in gpu.iter().zip(cpu).enumerate() {
        let names: Vec<&String> = cb.keys().collect();
        r.check(
            &format!("{what} block {b}: same tensors"),
            gb.keys().collect::<Vec<_>>() == names,
            format!("{names:?}"),
        );
        for (name, c) in cb {
            if let Some(g) = gb.get(name) {
                let gv = r.down(&g.buf);
                r.values_floored(&format!("{what} {name}"), &gv, &c.buf, tol, floor);
            }
        }
    }
}

#[test]
fn minilm_classifier_logits_and_gradients_match_cpu() {
    let Some(cuda) = cuda() else { return };
    let mut r = Report::new(cuda.clone());
    let texts = &TEXTS[..7];
    let c = SequenceClassifier::load(Cpu, &minilm_dir(), 128, new_head(5)).unwrap();
    let g = SequenceClassifier::load(cuda.clone(), &minilm_dir(), 128, new_head(5)).unwrap();
    let enc = c.tokenizer.encode(texts).unwrap();
    let lens = enc.lengths();
    eprintln!("{} texts of {lens:?} tokens (padded to {})", enc.batch, enc.seq);
    let (bc, bg) = (c.model.batch(&enc).unwrap(), g.model.batch(&enc).unwrap());
    let hc = c.model.hidden_states(&bc).unwrap();
    r.buf("minilm last hidden states", &g.model.hidden_states(&bg).unwrap(), &hc, MODEL_TOL);
    let lc = c.model.logits(&bc).unwrap();
    r.buf("minilm logits", &g.model.logits(&bg).unwrap(), &lc, MODEL_TOL);

    let mut t = rand(fresh_seed(), enc.batch * 3, 1.0).iter().map(|v| v.abs() + 0.1).collect::<Vec<_>>();
    for row in t.chunks_mut(3) {
        let s: f32 = row.iter().sum();
        row.iter_mut().for_each(|v| *v /= s);
    }
    let (loss_c, grads_c) = c.model.soft_ce_grads(&bc, &t).unwrap();
    let (loss_g, grads_g) = g.model.soft_ce_grads(&bg, &cuda.upload(&t).unwrap()).unwrap();
    r.values("minilm soft-CE loss", &[loss_g], &[loss_c], MODEL_TOL);
    compare_grads(&mut r, "minilm grad", &grads_g, &grads_c, GRAD_TOL);
    r.finish();
}

/// For each expert k, `sum_i |grad_i * (expert_k,i - base_i)|`: the scale a dot product's
/// rounding error is proportional to. f32 partials (the device) against f64 tiles (the CPU) differ
/// by about 1e-7 of it; relative to the dot product itself the error grows without bound as its
/// terms cancel (seen on an H200: 2.3e-6 relative on 8191 random terms).
fn lambda_grad_scale(grad: &[f32], base: &StoredTensor, experts: &[&StoredTensor]) -> Vec<f64> {
    let decode = |t: &StoredTensor| {
        let mut v = vec![0f32; t.numel()];
        t.decode_into(0, &mut v);
        v
    };
    let b = decode(base);
    experts
        .iter()
        .map(|e| decode(e).iter().zip(&b).zip(grad).map(|((&x, &y), &g)| (g as f64 * (x - y) as f64).abs()).sum())
        .collect()
}

/// The stored dtypes the ops read, in the order the tests pair them (base i, expert i + 1).
const DTYPES: [FloatDType; 3] = [FloatDType::F32, FloatDType::BF16, FloatDType::F16];

/// `values` stored in `dtype` (rounded), as a view the backends stage.
fn stored(name: &str, dtype: FloatDType, values: &[f32]) -> (StoredTensor, Vec<f32>) {
    let mut bytes = vec![0u8; values.len() * dtype.size()];
    symerge::checkpoint::dtype::encode_into(dtype, values, &mut bytes);
    let t = StoredTensor::from_bytes(name, dtype, &[values.len()], &bytes).unwrap();
    let mut decoded = vec![0f32; values.len()];
    t.decode_into(0, &mut decoded);
    (t, decoded)
}

/// Adaptation's ops on staged checkpoint bytes: the merge (every dtype mix) and Adam give the
/// CPU twin's bits; the Lambda gradient (f32 partials on the device, f64 tiles on the CPU, an
/// expert in another dtype than the base) agrees to 1e-6 of the sum of its terms' magnitudes.
#[test]
fn stored_ops_match_cpu() {
    let Some(cuda) = cuda() else { return };
    let mut r = Report::new(cuda.clone());
    for n in [1usize, 7, 8, 8191, 100_003] {
        for (i, &bd) in DTYPES.iter().enumerate() {
            let ed = DTYPES[(i + 1) % 3];
            let base = r.rand(n, 1.0);
            let (bs, _) = stored("w", bd, &base);
            let experts: Vec<StoredTensor> = (0..3).map(|_| stored("w", ed, &r.rand(n, 1.0)).0).collect();
            let coefs = [0.3f32, -0.7, 1.1];
            let cpu_in: Vec<&StoredTensor> = experts.iter().collect();
            let want = Cpu.merge_stored(&bs, &cpu_in, &coefs).unwrap();
            let gb = cuda.stage(&bs).unwrap();
            let ge: Vec<_> = experts.iter().map(|e| cuda.stage(e).unwrap()).collect();
            let refs: Vec<_> = ge.iter().collect();
            let got = cuda.merge_stored(&gb, &refs, &coefs).unwrap();
            r.buf(&format!("merge_stored n {n} {bd}/{ed}"), &got, &want, 0.0);

            let (same, _) = stored("w", bd, &r.rand(n, 1.0));
            let grad = r.rand(n, 1.0);
            // The third expert is stored in another dtype than the base (a float32 fine-tune of a
            // bfloat16 base): each is read in its own.
            let tasks = [&same, &bs, &experts[0]];
            let want = Cpu.lambda_grad_stored(&grad, &bs, &tasks).unwrap();
            let gs = cuda.stage(&same).unwrap();
            let got = cuda.lambda_grad_stored(&r.up(&grad), &gb, &[&gs, &gb, &ge[0]]).unwrap();
            let scale = lambda_grad_scale(&grad, &bs, &tasks);
            let worst = (0..3).map(|k| (got[k] - want[k]).abs() / scale[k].max(1e-30)).fold(0f64, f64::max);
            r.check(
                &format!("lambda_grad_stored n {n} {bd} (+{ed} expert): {worst:.1e} of sum |terms|"),
                worst <= 1e-6,
                format!("{got:?} vs the CPU's {want:?}"),
            );
        }
        let (mut p, mut m, mut v) = (r.rand(n, 1.0), vec![0f32; n], vec![0f32; n]);
        let (mut pg, mut mg, mut vg) = (r.up(&p), r.up(&m), r.up(&v));
        for t in 1..=3 {
            let g = r.rand(n, 0.1);
            // The third step clips: its gradients are scaled in the kernel.
            let step = AdamStep::new(0.01, 0.9, 0.999, 1e-8, t).with_grad_scale(if t == 3 { 0.29 } else { 1.0 });
            Cpu.adam_step(&mut p, &g, &mut m, &mut v, &step).unwrap();
            cuda.adam_step(&mut pg, &r.up(&g), &mut mg, &mut vg, &step).unwrap();
        }
        r.buf(&format!("adam_step n {n} params"), &pg, &p, 0.0);
        r.buf(&format!("adam_step n {n} second moment"), &vg, &v, 0.0);
    }
    r.finish();
}

/// The optimizer's other ops: a device copy is bit for bit; the sums of squares of several
/// buffers at once (empty ones, ones across many tiles) agree with the CPU's element-order f64
/// sums to 1e-12 relative.
#[test]
fn copy_and_sum_squares_match_cpu() {
    let Some(cuda) = cuda() else { return };
    let mut r = Report::new(cuda.clone());
    let host: Vec<Vec<f32>> = [0usize, 1, 255, 65_537, 3_000_001].iter().map(|&n| r.rand(n, 1.0)).collect();
    let dev: Vec<_> = host.iter().map(|h| r.up(h)).collect();
    for (h, d) in host.iter().zip(&dev) {
        let c = cuda.copy(d).unwrap();
        r.buf(&format!("copy n {}", h.len()), &c, h, 0.0);
    }
    let want = Cpu.sum_squares(&host.iter().collect::<Vec<_>>()).unwrap();
    let got = cuda.sum_squares(&dev.iter().collect::<Vec<_>>()).unwrap();
    let ok = got.len() == want.len() && got.iter().zip(&want).all(|(g, w)| (g - w).abs() <= 1e-12 * w.abs());
    r.check("sum_squares of five buffers", ok, format!("{got:?} vs {want:?}"));
    r.finish();
}

/// The row-wise ops of lookup tables: only the listed rows merged (bit-identical to the CPU twin,
/// the rest zero) and reduced (1e-6 relative), on row lengths that break 16-byte alignment, for
/// every dtype and an expert in another dtype than the base; no rows; an unsorted row list
/// refused with the CPU's words.
#[test]
fn stored_row_ops_match_cpu() {
    let Some(cuda) = cuda() else { return };
    let mut r = Report::new(cuda.clone());
    for &(n_rows, row_len) in &[(1001usize, 37usize), (64, 576), (3, 1)] {
        for (i, &dt) in DTYPES.iter().enumerate() {
            let n = n_rows * row_len;
            let (bs, _) = stored("embed", dt, &r.rand(n, 1.0));
            // The second expert in another dtype than the base.
            let experts: Vec<StoredTensor> =
                [dt, DTYPES[(i + 1) % 3]].iter().map(|&d| stored("embed", d, &r.rand(n, 1.0)).0).collect();
            let cpu_in: Vec<&StoredTensor> = experts.iter().collect();
            let (gb, ge) =
                (cuda.stage(&bs).unwrap(), experts.iter().map(|e| cuda.stage(e).unwrap()).collect::<Vec<_>>());
            let refs: Vec<_> = ge.iter().collect();
            let coefs = [0.3f32, 0.9];
            for rows in [(0..n_rows as u32).step_by(3).collect::<Vec<_>>(), vec![n_rows as u32 - 1], vec![]] {
                let name = format!("rows {}/{n_rows} x {row_len} {dt}", rows.len());
                let want = Cpu.merge_stored_rows(&bs, &cpu_in, &coefs, &rows, row_len).unwrap();
                let got = cuda.merge_stored_rows(&gb, &refs, &coefs, &rows, row_len).unwrap();
                r.buf(&format!("merge_stored_rows {name}"), &got, &want, 0.0);
                let mut grad = vec![0f32; n];
                let fill = r.rand(rows.len() * row_len, 1.0);
                for (i, &row) in rows.iter().enumerate() {
                    let at = row as usize * row_len;
                    grad[at..at + row_len].copy_from_slice(&fill[i * row_len..(i + 1) * row_len]);
                }
                let want = Cpu.lambda_grad_stored_rows(&grad, &bs, &cpu_in, &rows, row_len).unwrap();
                let got = cuda.lambda_grad_stored_rows(&r.up(&grad), &gb, &refs, &rows, row_len).unwrap();
                let (w32, g32): (Vec<f32>, Vec<f32>) =
                    want.iter().zip(&got).map(|(&w, &g)| (w as f32, g as f32)).unzip();
                r.values(&format!("lambda_grad_stored_rows {name}"), &g32, &w32, 1e-6);
            }
        }
    }
    let (bs, _) = stored("embed", FloatDType::F32, &r.rand(40, 1.0));
    let gb = cuda.stage(&bs).unwrap();
    let e = cuda.merge_stored_rows(&gb, &[&gb], &[0.5], &[3, 1], 4).err().map(|e| e.to_string());
    r.check("unsorted rows refused", e.as_deref().is_some_and(|e| e.contains("sorted and unique")), format!("{e:?}"));
    r.finish();
}

/// A block's tensors merged and reduced in one batch (one wait for the device each) give what
/// the CPU twins give one at a time, a lookup table's rows included; a non-finite value in the
/// second tensor is the CPU's error naming that tensor.
#[test]
fn stored_ops_in_batches_match_cpu() {
    let Some(cuda) = cuda() else { return };
    let mut r = Report::new(cuda.clone());
    let shapes = [(64usize, FloatDType::BF16), (8191, FloatDType::F32), (1001 * 37, FloatDType::F16)];
    let host: Vec<(StoredTensor, Vec<StoredTensor>)> = shapes
        .iter()
        .enumerate()
        .map(|(i, &(n, dt))| {
            let name = format!("t{i}");
            (stored(&name, dt, &r.rand(n, 1.0)).0, (0..2).map(|_| stored(&name, dt, &r.rand(n, 1.0)).0).collect())
        })
        .collect();
    let dev: Vec<_> = host
        .iter()
        .map(|(b, e)| (cuda.stage(b).unwrap(), e.iter().map(|x| cuda.stage(x).unwrap()).collect::<Vec<_>>()))
        .collect();
    let coefs = [0.4f32, -0.6];
    let rows: Vec<u32> = (0..1001).step_by(7).collect();
    let rows_of = |i: usize| (i == 2).then_some((rows.as_slice(), 37usize));
    let cpu_jobs: Vec<StoredMerge<'_, StoredTensor>> = host
        .iter()
        .enumerate()
        .map(|(i, (b, e))| StoredMerge { base: b, experts: e.iter().collect(), coefs: &coefs, rows: rows_of(i) })
        .collect();
    let gpu_jobs: Vec<StoredMerge<'_, _>> = dev
        .iter()
        .enumerate()
        .map(|(i, (b, e))| StoredMerge { base: b, experts: e.iter().collect(), coefs: &coefs, rows: rows_of(i) })
        .collect();
    let want = Cpu.merge_stored_many(&cpu_jobs).unwrap();
    let got = cuda.merge_stored_many(&gpu_jobs).unwrap();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        r.buf(&format!("merge_stored_many job {i}"), g, w, 0.0);
    }
    let grads: Vec<Vec<f32>> = want.iter().map(|w| r.rand(w.len(), 1.0)).collect();
    let up: Vec<_> = grads.iter().map(|g| r.up(g)).collect();
    let cpu_g: Vec<StoredGrad<'_, StoredTensor, Vec<f32>>> = cpu_jobs
        .iter()
        .zip(&grads)
        .map(|(j, g)| StoredGrad { grad: g, base: j.base, experts: j.experts.clone(), rows: j.rows })
        .collect();
    let gpu_g: Vec<StoredGrad<'_, _, _>> = gpu_jobs
        .iter()
        .zip(&up)
        .map(|(j, g)| StoredGrad { grad: g, base: j.base, experts: j.experts.clone(), rows: j.rows })
        .collect();
    let want = Cpu.lambda_grad_stored_many(&cpu_g).unwrap();
    let got = cuda.lambda_grad_stored_many(&gpu_g).unwrap();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let (g32, w32): (Vec<f32>, Vec<f32>) = g.iter().zip(w).map(|(&g, &w)| (g as f32, w as f32)).unzip();
        r.values(&format!("lambda_grad_stored_many job {i}"), &g32, &w32, 1e-6);
    }
    // Queued twice (the adaptation sweep's way: read once after every block), then read: each
    // queue gives the bits of the waited-for call.
    let queued = vec![cuda.lambda_grad_stored_queue(&gpu_g).unwrap(), cuda.lambda_grad_stored_queue(&gpu_g).unwrap()];
    let read = cuda.read_dots(queued).unwrap();
    let bits = |v: &[Vec<f64>]| v.iter().flatten().map(|x| x.to_bits()).collect::<Vec<_>>();
    r.check(
        "queued dots equal the waited-for ones",
        read.len() == 2 && read.iter().all(|q| bits(q) == bits(&got)),
        format!("{read:?} vs {got:?}"),
    );
    let mut poisoned = r.rand(8191, 1.0);
    poisoned[77] = f32::NAN;
    let (bad, _) = stored("t1", FloatDType::F32, &poisoned);
    let bad_dev = cuda.stage(&bad).unwrap();
    // Queued (the forward sweep's way: checked once after every block): the same outputs, no
    // error until the check, and then the waited-for call's error.
    let (queued, clean) = cuda.merge_stored_queue(&gpu_jobs).unwrap();
    let waited = cuda.merge_stored_many(&gpu_jobs).unwrap();
    for (i, (q, g)) in queued.iter().zip(&waited).enumerate() {
        let (q, g) = (r.down(q), r.down(g));
        r.values(&format!("queued merge job {i}"), &q, &g, 0.0);
    }
    let mut jobs = gpu_jobs;
    jobs[1].experts[1] = &bad_dev;
    let e = cuda.merge_stored_many(&jobs).err().map(|e| e.to_string());
    r.check("a NaN in job 1 names it", e.as_deref().is_some_and(|e| e.contains("`t1`")), format!("{e:?}"));
    let (_, poisoned_checks) = cuda.merge_stored_queue(&jobs).unwrap();
    let eq = cuda.check_merges(vec![clean, poisoned_checks]).err().map(|e| e.to_string());
    r.check("a queued NaN is the same error at the check", eq == e, format!("{eq:?} vs {e:?}"));
    r.finish();
}

/// A block staged at once through the pinned ring (tensors larger than one of its 64 MiB
/// buffers, empty and one-element ones, every dtype) holds exactly the stored values: each
/// merged against itself with coefficient 0 gives its decoded values bit for bit.
#[test]
fn staged_blocks_arrive_whole() {
    let Some(cuda) = cuda() else { return };
    let mut r = Report::new(cuda.clone());
    let sizes = [0usize, 1, 7, (1 << 20) + 3, (16 << 20) + 5, 9, 40 << 20, 2];
    let tensors: Vec<(StoredTensor, Vec<f32>)> =
        sizes.iter().enumerate().map(|(i, &n)| stored(&format!("t{i}"), DTYPES[i % 3], &r.rand(n, 1.0))).collect();
    let views: Vec<&StoredTensor> = tensors.iter().map(|(t, _)| t).collect();
    let staged = cuda.stage_many(&views).unwrap();
    r.check("one staged tensor per view", staged.len() == views.len(), format!("{} staged", staged.len()));
    for ((t, want), g) in tensors.iter().zip(&staged) {
        r.check(
            &format!("staged {} holds {} bytes", t.name, t.nbytes()),
            cuda.staged_bytes(g) == t.nbytes() as u64,
            String::new(),
        );
        if t.numel() > 0 {
            let got = cuda.merge_stored(g, &[g], &[0.0]).unwrap();
            r.buf(&format!("staged {} ({} values, {})", t.name, t.numel(), t.dtype), &got, want, 0.0);
        }
    }
    r.finish();
}

/// Streamed on the GPU (`budget 0`: every block staged to the device at each visit) equals the
/// kept-on-device run bit for bit.
#[test]
fn streamed_adaptation_on_the_gpu_equals_resident() {
    let Some(cuda) = cuda() else { return };
    let f = fixture();
    let cfg = AdaptConfig::load(&f.root.join("adapt.yml")).unwrap();
    let mut runs = [Some(0), Some(u64::MAX)].map(|b| Adapter::load_with(cuda.clone(), cfg.clone(), b).unwrap());
    for a in runs.iter_mut() {
        for task in [0, 1, 0] {
            a.step(task).unwrap();
        }
    }
    assert_eq!(runs[0].weights.report().mode, "streamed");
    assert_eq!(runs[1].weights.report().mode, "resident");
    assert_eq!(common::bits(&runs[0].lambda.values), common::bits(&runs[1].lambda.values));
}

#[test]
fn adaptation_steps_match_cpu() {
    let Some(cuda) = cuda() else { return };
    let mut r = Report::new(cuda.clone());
    let f = fixture();
    let cfg = AdaptConfig::load(&f.root.join("adapt.yml")).unwrap();
    let mut ac = Adapter::load(Cpu, cfg.clone()).unwrap();
    // Streamed on the GPU (every block staged at each visit); the resident run gives the same
    // bits (streamed_adaptation_on_the_gpu_equals_resident).
    let mut ag = Adapter::load_with(cuda, cfg, Some(0)).unwrap();
    assert_eq!(ag.weights.report().mode, "streamed");

    // One batch's loss and gradients (Lambda and the task's own head).
    let rows = [0usize, 3, 5, 8, 11];
    let gc = ac.loss_and_grads(1, &rows).unwrap();
    let gg = ag.loss_and_grads(1, &rows).unwrap();
    r.values("adapt loss", &[gg.loss], &[gc.loss], MODEL_TOL);
    let (lc, lg): (Vec<f32>, Vec<f32>) = gc.lambda.iter().zip(&gg.lambda).map(|(&c, &g)| (c as f32, g as f32)).unzip();
    r.values("adapt Lambda gradient", &lg, &lc, GRAD_TOL);
    compare_grads(&mut r, "adapt head grad", &gg.private, &gc.private, GRAD_TOL);

    // A few optimiser steps on both tasks: losses and Lambda stay together. Adam's first steps
    // move each coefficient by about lr * sign(gradient), so a gradient within rounding of zero
    // can send one coefficient another way: more than one in a hundred moving apart is a failure,
    // and the losses (which such a coefficient barely moves) must agree to the gradient tolerance.
    for step in 0..4 {
        let task = step % 2;
        let (c, _) = ac.step(task).unwrap();
        let (g, _) = ag.step(task).unwrap();
        r.values(&format!("adapt step {step} (task {task}) loss"), &[g], &[c], GRAD_TOL);
    }
    let (lg, lc) = (&ag.lambda.values, &ac.lambda.values);
    eprintln!("adapt Lambda after 4 steps: rel err {:.2e}, max abs {:.2e}", norm_rel(lg, lc), max_abs(lg, lc));
    let apart = lg.iter().zip(lc).filter(|(g, c)| (*g - *c).abs() > 1e-3).count();
    let total = lc.len();
    r.check(
        &format!("adapt Lambda: {apart} of {total} coefficients apart by > 1e-3"),
        apart * 100 <= total,
        String::new(),
    );
    r.finish();
}

/// Runs the CLI (`$SYMERGE_BIN` away from the build tree).
fn cli(args: &[&str]) -> (bool, String, String) {
    let o = common::symerge().args(args).output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn cli_device_cuda_matches_cpu_or_fails_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = tmp.path().join("in.jsonl");
    let lines: String = TEXTS
        .iter()
        .enumerate()
        .map(|(i, t)| format!("{}\n", serde_json::json!({"text": t, "label": i % 2})))
        .collect();
    std::fs::write(&inputs, lines).unwrap();
    let m = minilm_dir();
    let (m, i) = (m.to_str().unwrap(), inputs.to_str().unwrap());
    let out = |name: &str| tmp.path().join(name).display().to_string();
    let predict =
        |device: &str, o: &str| cli(&["predict", m, "--inputs", i, "--out", o, "--new-head", "2", "--device", device]);
    let finetune = |device: &str, o: &str| {
        cli(&[
            "finetune",
            m,
            "--train",
            i,
            "-o",
            o,
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--max-len",
            "32",
            "--json",
            "--device",
            device,
        ])
    };
    let read = |p: String| -> Vec<f32> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .flat_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["logits"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect::<Vec<_>>()
            })
            .collect()
    };
    let losses = |s: &str| -> Vec<f32> {
        let v: serde_json::Value = serde_json::from_str(s).unwrap();
        ["initial_loss", "final_loss"].iter().filter_map(|k| v[k].as_f64()).map(|x| x as f32).collect()
    };
    // The CPU runs first, GPU or not: they check the outputs this test reads (an H200 run found
    // it reading a `losses` field that finetune's summary no longer has).
    let (ok, _, err) = predict("cpu", &out("cpu.jsonl"));
    assert!(ok, "{err}");
    let c = read(out("cpu.jsonl"));
    assert_eq!(c.len(), 2 * TEXTS.len(), "two logits per text");
    let (ok, cpu_json, err) = finetune("cpu", &out("ft-cpu"));
    assert!(ok, "{err}");
    let lc = losses(&cpu_json);
    assert!(lc.len() == 2 && lc.iter().all(|l| l.is_finite()), "{cpu_json}");
    if let Err(reason) = symerge::backend::cuda::probe() {
        for (what, (ok, _, err)) in
            [("predict", predict("cuda", &out("p.jsonl"))), ("finetune", finetune("cuda", &out("ft")))]
        {
            assert!(!ok && err.contains("use --device cpu") && err.contains(&reason), "{what}: {err}");
        }
        assert!(!tmp.path().join("p.jsonl").exists() && !tmp.path().join("ft").exists(), "nothing written");
        common::skip_gpu_test(&format!("no CUDA device ({reason}); --device cuda fails clearly"));
        return;
    }
    let (ok, _, err) = predict("cuda", &out("cuda.jsonl"));
    assert!(ok, "{err}");
    let g = read(out("cuda.jsonl"));
    let e = norm_rel(&g, &c);
    eprintln!("predict --device cuda vs cpu: logits rel err {e:.2e}");
    assert!(e <= MODEL_TOL, "predict logits differ: {e:e}");

    let (ok, cuda_json, err) = finetune("cuda", &out("ft-cuda"));
    assert!(ok, "{err}");
    let lg = losses(&cuda_json);
    let e = norm_rel(&lg, &lc);
    eprintln!("finetune --device cuda vs cpu: losses {lg:?} vs {lc:?}, rel err {e:.2e}");
    assert!(lg.len() == 2 && e <= MODEL_TOL, "finetune losses differ: {e:e}");
}
