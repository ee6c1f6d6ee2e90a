//! Every CPU backend op: forward values against small independent f64 references, and backward
//! against central finite differences (see `common::grad`).

mod common;

use common::grad::{check, dot, rand_f32};
use symerge::backend::{AdamStep, AttnShape, Backend, Cpu, Gelu};

const TOL: f64 = 1e-2;

#[test]
fn linear_gradients_with_and_without_bias() {
    let cpu = Cpu;
    let (rows, inp, out) = (5, 7, 4);
    let x = rand_f32(1, rows * inp, 1.0);
    let w = rand_f32(2, out * inp, 0.5);
    let b = rand_f32(3, out, 0.5);
    let r = rand_f32(4, rows * out, 1.0);
    // Forward against a direct sum.
    let y = cpu.linear(&x, &w, Some(&b), rows, inp, out).unwrap();
    for i in 0..rows {
        for o in 0..out {
            let want: f64 = b[o] as f64 + (0..inp).map(|p| x[i * inp + p] as f64 * w[o * inp + p] as f64).sum::<f64>();
            assert!((y[i * out + o] as f64 - want).abs() < 1e-5, "linear forward");
        }
    }
    let g = cpu.linear_backward(&x, &w, &r, rows, inp, out, true, true).unwrap();
    let f = |xs: &[Vec<f32>]| cpu.linear(&xs[0], &xs[1], Some(&xs[2]), rows, inp, out).unwrap();
    check("linear+bias", &f, &[x.clone(), w.clone(), b], &r, &[g.dx, Some(g.dw), g.db], 1e-2, TOL);

    let g = cpu.linear_backward(&x, &w, &r, rows, inp, out, false, false).unwrap();
    assert!(g.dx.is_none() && g.db.is_none());
    let f = |xs: &[Vec<f32>]| cpu.linear(&xs[0], &xs[1], None, rows, inp, out).unwrap();
    check("linear", &f, &[x, w], &r, &[None, Some(g.dw)], 1e-2, TOL);
}

#[test]
fn linear_threaded_path_matches_gradients() {
    // Large enough that the products split over threads.
    let cpu = Cpu;
    let (rows, inp, out) = (96, 80, 72);
    let x = rand_f32(11, rows * inp, 1.0);
    let w = rand_f32(12, out * inp, 0.2);
    let b = rand_f32(13, out, 0.2);
    let r = rand_f32(14, rows * out, 1.0);
    let g = cpu.linear_backward(&x, &w, &r, rows, inp, out, true, true).unwrap();
    let f = |xs: &[Vec<f32>]| cpu.linear(&xs[0], &xs[1], Some(&xs[2]), rows, inp, out).unwrap();
    check("linear (threaded)", &f, &[x, w, b], &r, &[g.dx, Some(g.dw), g.db], 1e-2, TOL);
}

#[test]
fn layernorm_normalises_and_gradients_match() {
    let cpu = Cpu;
    let (rows, dim) = (4, 16);
    let x: Vec<f32> = rand_f32(21, rows * dim, 2.0).iter().map(|v| v + 3.0).collect();
    let gamma = rand_f32(22, dim, 1.0);
    let beta = rand_f32(23, dim, 1.0);
    let ones = vec![1.0f32; dim];
    let zeros = vec![0.0f32; dim];
    let y = cpu.layernorm(&x, &ones, &zeros, rows, dim, 1e-12).unwrap();
    for row in y.chunks(dim) {
        let mean: f64 = row.iter().map(|&v| v as f64).sum::<f64>() / dim as f64;
        let var: f64 = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / dim as f64;
        assert!(mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-4, "mean {mean} var {var}");
    }
    for eps in [1e-12f32, 1e-5] {
        let r = rand_f32(24, rows * dim, 1.0);
        let g = cpu.layernorm_backward(&x, &gamma, &r, rows, dim, eps).unwrap();
        let f = |xs: &[Vec<f32>]| cpu.layernorm(&xs[0], &xs[1], &xs[2], rows, dim, eps).unwrap();
        check(
            &format!("layernorm eps {eps}"),
            &f,
            &[x.clone(), gamma.clone(), beta.clone()],
            &r,
            &[Some(g.dx), Some(g.dgamma), Some(g.dbeta)],
            1e-2,
            TOL,
        );
    }
}

#[test]
fn activations_match_known_values_and_gradients() {
    let cpu = Cpu;
    // Reference values: x * Phi(x) and the tanh approximation at x = 1 and -0.5.
    let y = cpu.gelu(&vec![1.0, -0.5], Gelu::Erf).unwrap();
    assert!((y[0] - 0.841_344_7).abs() < 1e-6 && (y[1] + 0.154_268_5).abs() < 1e-6, "{y:?}");
    let y = cpu.gelu(&vec![1.0, -0.5], Gelu::Tanh).unwrap();
    assert!((y[0] - 0.841_192).abs() < 1e-5 && (y[1] + 0.154_286).abs() < 1e-5, "{y:?}");

    let x = rand_f32(31, 64, 3.0);
    let r = rand_f32(32, 64, 1.0);
    for kind in [Gelu::Erf, Gelu::Tanh] {
        let g = cpu.gelu_backward(&x, &r, kind).unwrap();
        let f = |xs: &[Vec<f32>]| cpu.gelu(&xs[0], kind).unwrap();
        check(&format!("gelu {kind:?}"), &f, std::slice::from_ref(&x), &r, &[Some(g)], 1e-3, TOL);
    }
    let g = cpu.tanh_backward(&x, &r).unwrap();
    let f = |xs: &[Vec<f32>]| cpu.tanh(&xs[0]).unwrap();
    check("tanh", &f, std::slice::from_ref(&x), &r, &[Some(g)], 1e-3, TOL);

    let mut a = x.clone();
    cpu.add_assign(&mut a, &r).unwrap();
    assert_eq!(a, cpu.add(&x, &r).unwrap());
    assert!(cpu.add(&x, &vec![0.0; 3]).is_err());
}

#[test]
fn softmax_with_grouped_additive_mask() {
    let cpu = Cpu;
    let (rows, cols, group) = (6, 5, 3);
    let x = rand_f32(41, rows * cols, 2.0);
    let mut mask = vec![0.0f32; rows / group * cols];
    mask[cols + 4] = f32::MIN; // the second mask row hides the last column for rows 3..6
    let y = cpu.softmax(&x, Some(&mask), rows, cols, group).unwrap();
    for (r, row) in y.chunks(cols).enumerate() {
        let s: f32 = row.iter().sum();
        assert!((s - 1.0).abs() < 1e-6);
        if r >= group {
            assert_eq!(row[4], 0.0, "masked entry must get exactly zero weight");
        }
    }
    let r = rand_f32(42, rows * cols, 1.0);
    let dx = cpu.softmax_backward(&y, &r, rows, cols).unwrap();
    let f = |xs: &[Vec<f32>]| cpu.softmax(&xs[0], Some(&mask), rows, cols, group).unwrap();
    check("softmax", &f, std::slice::from_ref(&x), &r, &[Some(dx)], 1e-2, TOL);
    assert!(cpu.softmax(&x, Some(&mask), rows, cols, 4).is_err());
}

/// Attention computed naively in f64, straight from the definition.
fn attention_reference(q: &[f32], k: &[f32], v: &[f32], mask: Option<&[f32]>, s: AttnShape) -> Vec<f64> {
    let (qs, ks, hd) = (s.heads * s.head_dim, s.kv_heads * s.head_dim, s.head_dim);
    let mut out = vec![0f64; s.q_len()];
    for b in 0..s.batch {
        for h in 0..s.heads {
            let g = h / (s.heads / s.kv_heads);
            for i in 0..s.seq_q {
                let mut scores = Vec::new();
                for j in 0..s.seq_k {
                    let visible =
                        mask.is_none_or(|m| m[b * s.seq_k + j] != 0.0) && (!s.causal || j <= i + (s.seq_k - s.seq_q));
                    if visible {
                        let d: f64 = (0..hd)
                            .map(|t| {
                                q[(b * s.seq_q + i) * qs + h * hd + t] as f64
                                    * k[(b * s.seq_k + j) * ks + g * hd + t] as f64
                            })
                            .sum();
                        scores.push((j, d / (hd as f64).sqrt()));
                    }
                }
                let max = scores.iter().map(|s| s.1).fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|s| (s.1 - max).exp()).sum();
                for (j, sc) in scores {
                    let p = (sc - max).exp() / z;
                    for t in 0..hd {
                        out[(b * s.seq_q + i) * qs + h * hd + t] += p * v[(b * s.seq_k + j) * ks + g * hd + t] as f64;
                    }
                }
            }
        }
    }
    out
}

fn attention_case(name: &str, s: AttnShape, mask: Option<Vec<f32>>) {
    let cpu = Cpu;
    let q = rand_f32(51, s.q_len(), 1.5);
    let k = rand_f32(52, s.kv_len(), 1.5);
    let v = rand_f32(53, s.kv_len(), 1.0);
    let out = cpu.attention(&q, &k, &v, mask.as_ref(), s).unwrap();
    let want = attention_reference(&q, &k, &v, mask.as_deref(), s);
    let max_err = out.iter().zip(&want).map(|(&a, &b)| (a as f64 - b).abs()).fold(0.0, f64::max);
    assert!(max_err < 1e-5, "{name}: forward differs from the f64 reference by {max_err:e}");

    let r = rand_f32(54, s.q_len(), 1.0);
    let g = cpu.attention_backward(&q, &k, &v, mask.as_ref(), &r, s).unwrap();
    let f = |xs: &[Vec<f32>]| cpu.attention(&xs[0], &xs[1], &xs[2], mask.as_ref(), s).unwrap();
    check(
        name,
        &f,
        &[q.clone(), k.clone(), v.clone()],
        &r,
        &[Some(g.dq), Some(g.dk.clone()), Some(g.dv.clone())],
        1e-2,
        TOL,
    );

    // Padded keys and values get exactly zero gradient and changing them changes nothing.
    if let Some(m) = &mask {
        let ks = s.kv_heads * s.head_dim;
        let mut k2 = k.clone();
        let mut v2 = v.clone();
        for b in 0..s.batch {
            for j in 0..s.seq_k {
                if m[b * s.seq_k + j] == 0.0 {
                    let row = (b * s.seq_k + j) * ks;
                    assert!(g.dk[row..row + ks].iter().chain(&g.dv[row..row + ks]).all(|&x| x == 0.0), "{name}");
                    for t in row..row + ks {
                        k2[t] += 10.0;
                        v2[t] -= 7.0;
                    }
                }
            }
        }
        assert_eq!(out, cpu.attention(&q, &k2, &v2, Some(m), s).unwrap(), "{name}: padding leaked into outputs");
    }
}

#[test]
fn attention_with_padding_mask() {
    let s = AttnShape::bidirectional(2, 5, 2, 4);
    // The second sequence has two padded positions at the end.
    let mask = vec![1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0];
    attention_case("attention (padding)", s, Some(mask));
    attention_case("attention (no mask)", s, None);
    // Masks that are not live keys followed by padding: gaps.
    let odd = vec![1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0];
    attention_case("attention (gaps)", s, Some(odd));
    // Every key masked: every score is finfo.min, so the weights are uniform (as in Hugging
    // Face), whatever the scores were.
    let q = rand_f32(55, s.q_len(), 1.5);
    let k = rand_f32(56, s.kv_len(), 1.5);
    let v = rand_f32(57, s.kv_len(), 1.0);
    let out = Cpu.attention(&q, &k, &v, Some(&vec![0.0; 10]), s).unwrap();
    let width = s.heads * s.head_dim;
    for b in 0..s.batch {
        let mean: Vec<f32> =
            (0..width).map(|c| (0..5).map(|j| v[(b * 5 + j) * width + c]).sum::<f32>() / 5.0).collect();
        for i in 0..5 {
            let row = &out[(b * 5 + i) * width..(b * 5 + i + 1) * width];
            assert!(row.iter().zip(&mean).all(|(a, m)| (a - m).abs() < 1e-5), "all masked: {row:?} vs {mean:?}");
        }
    }
}

/// With `live_queries_only` the live positions' outputs and all three gradients (for an output
/// gradient that is zero at padded positions, as a packing caller's is) equal the full
/// computation's; the padded positions' output rows are zero.
#[test]
fn attention_of_live_queries_only() {
    let cpu = Cpu;
    let causal = AttnShape {
        batch: 3,
        seq_q: 6,
        seq_k: 6,
        heads: 4,
        kv_heads: 2,
        head_dim: 5,
        causal: true,
        live_queries_only: false,
    };
    for (name, s) in [("bidirectional", AttnShape::bidirectional(3, 6, 2, 4)), ("causal GQA", causal)] {
        let lens = [6usize, 2, 4];
        let mask: Vec<f32> = lens.iter().flat_map(|&n| (0..6).map(move |j| if j < n { 1.0 } else { 0.0 })).collect();
        let width = s.heads * s.head_dim;
        let live_row = |r: usize| r % 6 < lens[r / 6];
        let (q, k, v) = (rand_f32(71, s.q_len(), 1.5), rand_f32(72, s.kv_len(), 1.5), rand_f32(73, s.kv_len(), 1.0));
        let mut dout = rand_f32(74, s.q_len(), 1.0);
        for (r, row) in dout.chunks_mut(width).enumerate() {
            if !live_row(r) {
                row.fill(0.0);
            }
        }
        let full = cpu.attention(&q, &k, &v, Some(&mask), s).unwrap();
        let live = cpu.attention(&q, &k, &v, Some(&mask), s.live_queries_only()).unwrap();
        for (r, (a, b)) in full.chunks(width).zip(live.chunks(width)).enumerate() {
            if live_row(r) {
                assert_eq!(a, b, "{name}: live row {r}");
            } else {
                assert!(b.iter().all(|&x| x == 0.0), "{name}: padded row {r} is {b:?}");
                assert!(a.iter().any(|&x| x != 0.0), "{name}: the full computation fills padded row {r}");
            }
        }
        let gf = cpu.attention_backward(&q, &k, &v, Some(&mask), &dout, s).unwrap();
        let gl = cpu.attention_backward(&q, &k, &v, Some(&mask), &dout, s.live_queries_only()).unwrap();
        for (what, a, b) in [("dq", &gf.dq, &gl.dq), ("dk", &gf.dk, &gl.dk), ("dv", &gf.dv, &gl.dv)] {
            let err = a.iter().zip(b.iter()).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(err < 1e-6, "{name}: {what} differs by {err:e}");
        }
    }
}

#[test]
fn attention_causal_grouped_query() {
    let s = AttnShape {
        batch: 2,
        seq_q: 3,
        seq_k: 5,
        heads: 4,
        kv_heads: 2,
        head_dim: 3,
        causal: true,
        live_queries_only: false,
    };
    let mask = vec![1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0];
    attention_case("attention (causal, GQA, padding)", s, Some(mask));
    // Right padding: the live-prefix path, which leaves padded keys out of the products.
    let right = vec![1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0];
    attention_case("attention (causal, GQA, right padding)", s, Some(right));
    let bad = AttnShape { kv_heads: 3, ..s };
    assert!(
        Cpu.attention(&vec![0.0; bad.q_len()], &vec![0.0; bad.kv_len()], &vec![0.0; bad.kv_len()], None, bad).is_err()
    );
}

#[test]
fn embedding_lookup_and_scatter_add() {
    let cpu = Cpu;
    let (vocab, dim) = (6, 4);
    let table = rand_f32(61, vocab * dim, 1.0);
    // Repeated ids (2 appears three times) must accumulate in the backward.
    let ids = vec![2u32, 0, 2, 5, 2];
    let out = cpu.embedding(&table, &ids, dim).unwrap();
    for (i, &id) in ids.iter().enumerate() {
        assert_eq!(&out[i * dim..(i + 1) * dim], &table[id as usize * dim..(id as usize + 1) * dim]);
    }
    let r = rand_f32(62, ids.len() * dim, 1.0);
    let g = cpu.embedding_backward(&ids, &r, vocab, dim).unwrap();
    for t in 0..dim {
        let want = r[t] + r[2 * dim + t] + r[4 * dim + t];
        assert!((g[2 * dim + t] - want).abs() < 1e-6);
        assert_eq!(g[dim + t], 0.0, "row 1 is never looked up");
    }
    let f = |xs: &[Vec<f32>]| cpu.embedding(&xs[0], &ids, dim).unwrap();
    check("embedding", &f, &[table], &r, &[Some(g)], 1e-2, TOL);
    assert!(cpu.embedding_backward(&vec![6], &vec![0.0; dim], vocab, dim).is_err());
}

/// Strictly increasing ids (packed rows put back in the padded layout) take a parallel path:
/// each listed row is its `dy` row, every other row zero, over tables whose rows span several
/// of its chunks, including the first and last rows.
#[test]
fn embedding_backward_of_increasing_ids_places_each_row() {
    let cpu = Cpu;
    let dim = 5;
    for (vocab, ids) in [
        (300usize, vec![0u32, 1, 63, 64, 65, 130, 299]),
        (7, vec![3]),
        (130, (0..130).collect::<Vec<u32>>()),
        (9, vec![]),
    ] {
        let dy = rand_f32(63, ids.len() * dim, 1.0);
        let g = cpu.embedding_backward(&ids, &dy, vocab, dim).unwrap();
        assert_eq!(g.len(), vocab * dim);
        for r in 0..vocab {
            let row = &g[r * dim..(r + 1) * dim];
            match ids.iter().position(|&id| id as usize == r) {
                Some(i) => assert_eq!(row, &dy[i * dim..(i + 1) * dim], "row {r} of {vocab}"),
                None => assert!(row.iter().all(|&v| v == 0.0), "row {r} of {vocab} is not zero"),
            }
        }
    }
}

#[test]
fn losses_values_and_gradients() {
    let cpu = Cpu;
    let (rows, cols) = (4, 5);
    let z = rand_f32(71, rows * cols, 3.0);
    // Soft targets: each row a probability vector.
    let mut t = rand_f32(72, rows * cols, 1.0).iter().map(|v| v.abs() + 0.05).collect::<Vec<_>>();
    for row in t.chunks_mut(cols) {
        let s: f32 = row.iter().sum();
        row.iter_mut().for_each(|v| *v /= s);
    }
    let mut ce = 0f64;
    let mut ent = 0f64;
    for (zr, tr) in z.chunks(cols).zip(t.chunks(cols)) {
        let m = zr.iter().copied().fold(f32::MIN, f32::max) as f64;
        let lse = m + zr.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
        ce += zr.iter().zip(tr).map(|(&zj, &tj)| -(tj as f64) * (zj as f64 - lse)).sum::<f64>();
        ent -= zr.iter().map(|&zj| (zj as f64 - lse).exp() * (zj as f64 - lse)).sum::<f64>();
    }
    let got = cpu.soft_ce(&z, &t, rows, cols).unwrap()[0] as f64;
    assert!((got - ce / rows as f64).abs() < 1e-5, "soft CE {got} vs {}", ce / rows as f64);
    let got = cpu.entropy(&z, rows, cols).unwrap()[0] as f64;
    assert!((got - ent / rows as f64).abs() < 1e-5, "entropy {got} vs {}", ent / rows as f64);

    // A scalar loss: the checker's `r` is the upstream gradient (here 0.7).
    let r = vec![0.7f32];
    let g = cpu.soft_ce_backward(&z, &t, rows, cols, 0.7).unwrap();
    let f = |xs: &[Vec<f32>]| cpu.soft_ce(&xs[0], &t, rows, cols).unwrap();
    check("soft_ce", &f, std::slice::from_ref(&z), &r, &[Some(g)], 1e-2, TOL);

    let g = cpu.entropy_backward(&z, rows, cols, 0.7).unwrap();
    let f = |xs: &[Vec<f32>]| cpu.entropy(&xs[0], rows, cols).unwrap();
    check("entropy", &f, std::slice::from_ref(&z), &r, &[Some(g)], 1e-2, TOL);

    // L1 has a kink at x == t: keep every |x - t| well above eps.
    let x: Vec<f32> = rand_f32(73, 30, 1.0).iter().map(|v| v + 0.2 * v.signum()).collect();
    let tgt = vec![0.0f32; 30];
    let want = x.iter().map(|v| v.abs() as f64).sum::<f64>() / 30.0;
    assert!((cpu.l1(&x, None).unwrap()[0] as f64 - want).abs() < 1e-6);
    let tgt2: Vec<f32> = x.iter().map(|v| v - 0.5 * v.signum()).collect();
    assert!((cpu.l1(&x, Some(&tgt2)).unwrap()[0] - 0.5).abs() < 1e-6);
    let g = cpu.l1_backward(&x, Some(&tgt), 0.7).unwrap();
    assert_eq!(g, cpu.l1_backward(&x, None, 0.7).unwrap());
    let f = |xs: &[Vec<f32>]| cpu.l1(&xs[0], Some(&tgt)).unwrap();
    check("l1", &f, std::slice::from_ref(&x), &r, &[Some(g)], 1e-2, TOL);

    // Gradient of CE at the target distribution's own logits is zero.
    let logt: Vec<f32> = t.iter().map(|v| v.ln()).collect();
    let g = cpu.soft_ce_backward(&logt, &t, rows, cols, 1.0).unwrap();
    assert!(dot(&g, &g) < 1e-12);
}

#[test]
fn rmsnorm_values_and_gradients() {
    let cpu = Cpu;
    let (rows, dim) = (5, 16);
    let x: Vec<f32> = rand_f32(61, rows * dim, 2.0).iter().map(|v| v + 1.0).collect();
    let gamma: Vec<f32> = rand_f32(62, dim, 0.5).iter().map(|v| v + 1.0).collect();
    let eps = 1e-5f32;
    let y = cpu.rmsnorm(&x, &gamma, rows, dim, eps).unwrap();
    for (r, (yr, xr)) in y.chunks(dim).zip(x.chunks(dim)).enumerate() {
        let ms: f64 = xr.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / dim as f64;
        for j in 0..dim {
            let want = xr[j] as f64 / (ms + eps as f64).sqrt() * gamma[j] as f64;
            assert!((yr[j] as f64 - want).abs() < 1e-5 * (1.0 + want.abs()), "row {r} col {j}: {} vs {want}", yr[j]);
        }
    }
    for eps in [1e-6f32, 0.5] {
        let r = rand_f32(63, rows * dim, 1.0);
        let (dx, dg) = cpu.rmsnorm_backward(&x, &gamma, &r, rows, dim, eps).unwrap();
        let f = |xs: &[Vec<f32>]| cpu.rmsnorm(&xs[0], &xs[1], rows, dim, eps).unwrap();
        check(&format!("rmsnorm eps {eps}"), &f, &[x.clone(), gamma.clone()], &r, &[Some(dx), Some(dg)], 1e-2, TOL);
    }
    // More rows than one reduction block, so the dgamma partial sums are combined.
    let rows = 70;
    let x = rand_f32(64, rows * dim, 1.0);
    let r = rand_f32(65, rows * dim, 1.0);
    let (dx, dg) = cpu.rmsnorm_backward(&x, &gamma, &r, rows, dim, 1e-6).unwrap();
    let f = |xs: &[Vec<f32>]| cpu.rmsnorm(&xs[0], &xs[1], rows, dim, 1e-6).unwrap();
    check("rmsnorm (blocks)", &f, &[x, gamma.clone()], &r, &[Some(dx), Some(dg)], 1e-2, TOL);
    assert!(cpu.rmsnorm(&vec![0.0; 7], &gamma, 1, dim, 1e-6).is_err());
}

/// Rotary embedding in f64 from the definition: pairs (i, i + d/2) rotated by
/// `position / scale * theta^(-2i/d)`.
fn rope_reference(x: &[f32], pos: &[u32], heads: usize, d: usize, theta: f64, scale: f64) -> Vec<f64> {
    let mut out = vec![0f64; x.len()];
    let half = d / 2;
    for (r, &p) in pos.iter().enumerate() {
        for h in 0..heads {
            let base = r * heads * d + h * d;
            for i in 0..half {
                let a = p as f64 / scale * theta.powf(-((2 * i) as f64) / d as f64);
                let (x1, x2) = (x[base + i] as f64, x[base + i + half] as f64);
                out[base + i] = x1 * a.cos() - x2 * a.sin();
                out[base + i + half] = x2 * a.cos() + x1 * a.sin();
            }
        }
    }
    out
}

#[test]
fn rope_rotates_pairs_and_backward_is_the_inverse() {
    let cpu = Cpu;
    let (heads, d) = (3, 8);
    let pos: Vec<u32> = vec![0, 1, 2, 7, 0, 30];
    let x = rand_f32(71, pos.len() * heads * d, 1.0);
    for (theta, scale) in [(10000.0f32, 1.0f32), (500.0, 2.0), (1e6, 4.0)] {
        let y = cpu.rope(&x, &pos, heads, d, theta, scale).unwrap();
        let want = rope_reference(&x, &pos, heads, d, theta as f64, scale as f64);
        for (i, (&a, &b)) in y.iter().zip(&want).enumerate() {
            assert!((a as f64 - b).abs() < 2e-5, "theta {theta} scale {scale} element {i}: {a} vs {b}");
        }
        // Position 0 is the identity; rotations keep each pair's norm.
        assert_eq!(y[..heads * d], x[..heads * d]);
        let back = cpu.rope_backward(&y, &pos, heads, d, theta, scale).unwrap();
        for (a, b) in back.iter().zip(&x) {
            assert!((a - b).abs() < 1e-5, "inverse rotation: {a} vs {b}");
        }
        let r = rand_f32(72, x.len(), 1.0);
        let dx = cpu.rope_backward(&r, &pos, heads, d, theta, scale).unwrap();
        let f = |xs: &[Vec<f32>]| cpu.rope(&xs[0], &pos, heads, d, theta, scale).unwrap();
        check(&format!("rope theta {theta} scale {scale}"), &f, std::slice::from_ref(&x), &r, &[Some(dx)], 1e-2, TOL);
    }
    // Linear scaling by 2 at position 2p is no scaling at position p.
    let a = cpu.rope(&x[..heads * d].to_vec(), &vec![14], heads, d, 10000.0, 2.0).unwrap();
    let b = cpu.rope(&x[..heads * d].to_vec(), &vec![7], heads, d, 10000.0, 1.0).unwrap();
    for (p, q) in a.iter().zip(&b) {
        assert!((p - q).abs() < 1e-6);
    }
    let e = cpu.rope(&x, &pos, heads * d / 3, 3, 10000.0, 1.0).unwrap_err().to_string();
    assert!(e.contains("rope") && e.contains("even"), "{e}");
    assert!(cpu.rope(&x, &pos[..5].to_vec(), heads, d, 10000.0, 1.0).is_err());
}

#[test]
fn swiglu_values_and_gradients() {
    let cpu = Cpu;
    let y = cpu.swiglu(&vec![1.0, -2.0, 0.0], &vec![2.0, 3.0, 5.0]).unwrap();
    // silu(1) = 0.7310586, silu(-2) = -0.2384058
    let want = [2.0 * 0.731_058_6, 3.0 * -0.238_405_8, 0.0];
    for (a, b) in y.iter().zip(want) {
        assert!((a - b).abs() < 1e-6, "{y:?}");
    }
    // Far tails stay finite: silu(-100) = 0, silu(100) = 100.
    let y = cpu.swiglu(&vec![-100.0, 100.0], &vec![1.0, 1.0]).unwrap();
    assert!(y[0].abs() < 1e-30 && (y[1] - 100.0).abs() < 1e-4, "{y:?}");
    let gate = rand_f32(81, 96, 3.0);
    let up = rand_f32(82, 96, 1.0);
    let r = rand_f32(83, 96, 1.0);
    let (dg, du) = cpu.swiglu_backward(&gate, &up, &r).unwrap();
    let f = |xs: &[Vec<f32>]| cpu.swiglu(&xs[0], &xs[1]).unwrap();
    check("swiglu", &f, &[gate.clone(), up], &r, &[Some(dg), Some(du)], 1e-3, TOL);
    assert!(cpu.swiglu(&gate, &vec![0.0; 3]).is_err());
}

/// The optimizer's ops: Adam with a gradient scale is Adam on the scaled gradients, bit for bit;
/// sums of squares are per buffer (empty ones 0); a copy is the buffer.
#[test]
fn optimizer_ops_scale_sum_and_copy() {
    let be = Cpu;
    let g: Vec<f32> = (0..1000).map(|i| ((i * 37 % 101) as f32 - 50.0) * 1e-3).collect();
    let scaled: Vec<f32> = g.iter().map(|x| x * 0.4).collect();
    let p0: Vec<f32> = (0..1000).map(|i| (i as f32).sin()).collect();
    let step = AdamStep::new(1e-2, 0.9, 0.999, 1e-8, 1);
    let (mut a, mut ma, mut va) = (p0.clone(), vec![0f32; 1000], vec![0f32; 1000]);
    be.adam_step(&mut a, &g, &mut ma, &mut va, &step.with_grad_scale(0.4)).unwrap();
    let (mut b, mut mb, mut vb) = (p0.clone(), vec![0f32; 1000], vec![0f32; 1000]);
    be.adam_step(&mut b, &scaled, &mut mb, &mut vb, &step).unwrap();
    assert_eq!(a, b, "scaled in the step == scaled before it");
    assert_ne!(a, p0);
    let sums = be.sum_squares(&[&g, &Vec::new(), &vec![3.0, 4.0]]).unwrap();
    let want: f64 = g.iter().map(|&x| x as f64 * x as f64).sum();
    assert_eq!(sums, [want, 0.0, 25.0]);
    assert_eq!(be.copy(&g).unwrap(), g);
}
