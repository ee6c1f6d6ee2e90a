//! Every CUDA kernel against its CPU twin, on fresh random inputs of awkward sizes (not
//! multiples of the block or vector size), K = 1, 3, 8 (and more), outputs poisoned with NaN bits
//! before each launch. Without a CUDA device each test prints `SKIPPED: no CUDA device (...)`.

use symerge::backend::cuda::kernels::{HostTensor, MergeLaunch};
mod common;

use common::reference::norm_rel;

use common::gpu;
use rand::Rng;
use symerge::checkpoint::FloatDType;
use symerge::checkpoint::dtype::{decode, encode_into};
use symerge::merge::lambda_grad::lambda_grad;
use symerge::merge::linear::Linear;
use symerge::merge::philox::{ElementStream, name_hash};
use symerge::merge::sce::Sce;
use symerge::merge::select::{Threshold, keep_count, magnitude_threshold};
use symerge::merge::slerp::Slerp;
use symerge::merge::stats::{InMemory, TensorStats};
use symerge::merge::{ChunkCtx, MergeMethod, TensorParams, breadcrumbs, dare, della, task_arithmetic, ties};

const DTYPES: [FloatDType; 3] = [FloatDType::F32, FloatDType::F16, FloatDType::BF16];
const SIZES: [usize; 5] = [1, 7, 13, 4099, 300_007];

/// Fresh values for every call: the seed mixes in a counter and the clock.
fn fresh_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    t ^ COUNTER.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn uniform(n: usize, seed: u64, center: f32, spread: f32) -> Vec<f32> {
    let mut rng = common::seeded(seed);
    (0..n).map(|_| center + spread * (rng.random::<f32>() - 0.5)).collect()
}

fn encode(dtype: FloatDType, v: &[f32]) -> Vec<u8> {
    let mut b = vec![0u8; v.len() * dtype.size()];
    encode_into(dtype, v, &mut b);
    b
}

fn decoded(dtype: FloatDType, b: &[u8]) -> Vec<f32> {
    let mut v = vec![0f32; b.len() / dtype.size()];
    decode(dtype, b, &mut v);
    v
}

/// A family of inputs: base and K experts as bytes of `dtype`, plus their decoded values.
struct Inputs {
    dtype: FloatDType,
    base: Vec<u8>,
    experts: Vec<Vec<u8>>,
}

fn inputs(dtype: FloatDType, n: usize, k: usize) -> Inputs {
    let seed = fresh_seed();
    let base = uniform(n, seed, 0.0, 0.08);
    let experts = (0..k)
        .map(|i| {
            let d = uniform(n, seed ^ ((i as u64 + 1) * 7919), 0.0, 0.02);
            encode(dtype, &base.iter().zip(&d).map(|(b, d)| b + d).collect::<Vec<_>>())
        })
        .collect();
    Inputs { dtype, base: encode(dtype, &base), experts }
}

/// The CPU twin: the method's own `merge_chunk` over the whole range, then the output encoding.
#[allow(clippy::too_many_arguments)]
fn cpu_merge(
    method: &dyn MergeMethod,
    p: &TensorParams,
    th: &[Threshold],
    hash: u32,
    inp: &Inputs,
    out_dtype: FloatDType,
    offset: usize,
) -> Vec<u8> {
    let base = decoded(inp.dtype, &inp.base);
    let experts: Vec<Vec<f32>> = inp.experts.iter().map(|e| decoded(inp.dtype, e)).collect();
    let views: Vec<&[f32]> = experts.iter().map(Vec::as_slice).collect();
    let mut out = vec![0f32; base.len()];
    let ctx = ChunkCtx::new(offset, p, th, hash);
    let b = method.needs_base().then_some(base.as_slice());
    method.merge_chunk(&ctx, b, &views, &mut out, &mut Vec::new());
    encode(out_dtype, &out)
}

fn cpu_thresholds(inp: &Inputs, densities: &[f32]) -> Vec<Threshold> {
    let base = decoded(inp.dtype, &inp.base);
    inp.experts
        .iter()
        .zip(densities)
        .map(|(e, &d)| {
            let e = decoded(inp.dtype, e);
            let n = e.len();
            magnitude_threshold(n, keep_count(d, n), |off, out| {
                for (i, o) in out.iter_mut().enumerate() {
                    *o = e[off + i] - base[off + i];
                }
                Ok(())
            })
            .unwrap()
        })
        .collect()
}

#[test]
fn merge_kernel_matches_cpu_for_every_method() {
    // The CPU twins run everywhere (so this test's own setup is checked on every machine);
    // the GPU comparisons only where a device exists.
    let gpu = gpu();
    let ta = task_arithmetic::method();
    let ti = ties::method(false);
    let dl = dare::method(false, true, 1234);
    let dt = dare::method(true, true, 99);
    let methods: Vec<(&str, &dyn MergeMethod)> =
        vec![("linear", &Linear), ("task_arithmetic", &ta), ("ties", &ti), ("dare_linear", &dl), ("dare_ties", &dt)];
    let mut identical = 0usize;
    let mut cases = 0usize;
    for dtype in DTYPES {
        for k in [1usize, 3, 8] {
            for &n in &SIZES {
                let inp = inputs(dtype, n, k);
                for (name, method) in &methods {
                    let p = TensorParams {
                        weights: (0..k).map(|i| 0.3 + 0.2 * i as f32).collect(),
                        densities: (0..k).map(|i| [0.5, 0.3, 0.9][i % 3]).collect(),
                        lambda: 0.8,
                        normalize: *name == "linear" || *name == "ties",
                        ..Default::default()
                    };
                    let th = if method.needs_thresholds() { cpu_thresholds(&inp, &p.densities) } else { vec![] };
                    if let (true, Some(gpu)) = (method.needs_thresholds(), &gpu) {
                        // The GPU's own selection must pick the same thresholds.
                        for (e, (want, &d)) in inp.experts.iter().zip(th.iter().zip(&p.densities)) {
                            let got = gpu
                                .magnitude_threshold_host(
                                    HostTensor { bytes: &inp.base, dtype },
                                    HostTensor { bytes: e, dtype },
                                    keep_count(d, n),
                                )
                                .unwrap();
                            assert_eq!(got, *want, "{name} {dtype} n={n} k={k}: GPU threshold");
                        }
                    }
                    for out_dtype in [dtype, FloatDType::F32] {
                        for offset in [0usize, 65536 * 3, 5] {
                            let hash = name_hash(name);
                            let base = method.needs_base().then_some(HostTensor { bytes: &inp.base, dtype });
                            let mut experts: Vec<HostTensor<'_>> =
                                inp.experts.iter().map(|e| HostTensor { bytes: e, dtype }).collect();
                            let (want, p2) = if method.needs_base() {
                                (cpu_merge(*method, &p, &th, hash, &inp, out_dtype, offset), p.clone())
                            } else {
                                // Linear averages the base too, as one more model.
                                experts.insert(0, HostTensor { bytes: &inp.base, dtype });
                                let mut p2 = p.clone();
                                p2.weights.insert(0, 0.25);
                                p2.densities.insert(0, 1.0);
                                let mut all = vec![inp.base.clone()];
                                all.extend(inp.experts.iter().cloned());
                                let lin = Inputs { dtype, base: inp.base.clone(), experts: all };
                                (cpu_merge(*method, &p2, &[], hash, &lin, out_dtype, offset), p2)
                            };
                            let form = method.kernel_form().expect("every method has a GPU form");
                            let Some(gpu) = &gpu else { continue };
                            let got = gpu.merge_host(form, &p2, &th, hash, base, &experts, out_dtype, offset).unwrap();
                            assert!(!got.bad, "{name}: flagged bad on finite data");
                            let (g, w) = (decoded(out_dtype, &got.bytes), decoded(out_dtype, &want));
                            let err = norm_rel(&g, &w);
                            let tol = 4.0 * out_dtype.epsilon();
                            assert!(
                                err <= tol,
                                "{name} {dtype}->{out_dtype} n={n} k={k} offset={offset}: rel err {err:e} > {tol:e}"
                            );
                            cases += 1;
                            identical += usize::from(got.bytes == want);
                        }
                    }
                }
            }
        }
    }
    if gpu.is_some() {
        println!("merge: {identical}/{cases} cases bit-identical to the CPU");
    }
}

#[test]
fn merge_kernel_takes_many_experts() {
    let Some(gpu) = gpu() else { return };
    let ta = task_arithmetic::method();
    for k in [32usize, 64] {
        let inp = inputs(FloatDType::BF16, 10_001, k);
        let p = TensorParams {
            weights: vec![1.0 / k as f32; k],
            densities: vec![1.0; k],
            lambda: 1.0,
            normalize: false,
            ..Default::default()
        };
        let want = cpu_merge(&ta, &p, &[], 1, &inp, FloatDType::BF16, 0);
        let experts: Vec<HostTensor<'_>> =
            inp.experts.iter().map(|e| HostTensor { bytes: e, dtype: FloatDType::BF16 }).collect();
        let got = gpu
            .merge_host(
                ta.kernel_form().unwrap(),
                &p,
                &[],
                1,
                Some(HostTensor { bytes: &inp.base, dtype: FloatDType::BF16 }),
                &experts,
                FloatDType::BF16,
                0,
            )
            .unwrap();
        let err = norm_rel(&decoded(FloatDType::BF16, &got.bytes), &decoded(FloatDType::BF16, &want));
        assert!(err <= 4.0 * FloatDType::BF16.epsilon(), "K={k}: {err:e}");
    }
}

#[test]
fn merge_kernel_flags_non_finite_values() {
    let Some(gpu) = gpu() else { return };
    let ta = task_arithmetic::method();
    let p =
        TensorParams { weights: vec![1.0], densities: vec![1.0], lambda: 1.0, normalize: false, ..Default::default() };
    let mut e = vec![0.5f32; 1001];
    e[777] = f32::NAN;
    let base = encode(FloatDType::F32, &vec![0.25; 1001]);
    let ex = encode(FloatDType::F32, &e);
    let run = |b: &[u8], x: &[u8], out| {
        gpu.merge_host(
            ta.kernel_form().unwrap(),
            &p,
            &[],
            0,
            Some(HostTensor { bytes: b, dtype: FloatDType::F32 }),
            &[HostTensor { bytes: x, dtype: FloatDType::F32 }],
            out,
            0,
        )
        .unwrap()
    };
    assert!(run(&base, &ex, FloatDType::F32).bad, "NaN input");
    let big = encode(FloatDType::F32, &vec![70_000.0; 1001]);
    assert!(run(&base, &big, FloatDType::F16).bad, "f16 overflow");
    assert!(!run(&base, &big, FloatDType::F32).bad, "fits in f32");
}

#[test]
fn lambda_grad_matches_cpu_and_is_deterministic() {
    let Some(gpu) = gpu() else { return };
    for (d, dtype) in DTYPES.into_iter().enumerate() {
        for k in [1usize, 3, 8, 20] {
            for n in [1usize, 8191, 8193, 1_000_003] {
                let seed = fresh_seed();
                let grad = uniform(n, seed, 0.0, 2.0);
                let base_f = uniform(n, seed ^ 1, 0.0, 0.08);
                let base = encode(dtype, &base_f);
                // Task i in the i-th dtype after the base's: experts stored in other dtypes than
                // the base (float32 fine-tunes of a bfloat16 base) are each read in their own.
                let task_dt = |i: usize| DTYPES[(d + i) % DTYPES.len()];
                let tasks: Vec<Vec<u8>> =
                    (0..k).map(|i| encode(task_dt(i), &uniform(n, seed ^ ((i as u64 + 2) * 31), 0.0, 0.08))).collect();
                let views: Vec<HostTensor<'_>> =
                    tasks.iter().enumerate().map(|(i, t)| HostTensor { bytes: t, dtype: task_dt(i) }).collect();
                let dec: Vec<Vec<f32>> = tasks.iter().enumerate().map(|(i, t)| decoded(task_dt(i), t)).collect();
                let dec_views: Vec<&[f32]> = dec.iter().map(Vec::as_slice).collect();
                let base_dec = decoded(dtype, &base);
                for with_base in [false, true] {
                    let b = with_base.then_some(HostTensor { bytes: &base, dtype });
                    let got = gpu.lambda_grad_host(&grad, b, &views).unwrap();
                    let again = gpu.lambda_grad_host(&grad, b, &views).unwrap();
                    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got), bits(&again), "lambda_grad not deterministic ({dtype}, K={k}, n={n})");
                    let want = lambda_grad(&grad, with_base.then_some(base_dec.as_slice()), &dec_views).unwrap();
                    for kk in 0..k {
                        let scale: f64 = grad
                            .iter()
                            .zip(dec[kk].iter().zip(&base_dec))
                            .map(|(&g, (&t, &b))| (g as f64 * if with_base { (t - b) as f64 } else { t as f64 }).abs())
                            .sum::<f64>()
                            + 1e-30;
                        let err = (got[kk] - want[kk]).abs() / scale;
                        assert!(
                            err < 1e-5,
                            "{dtype} K={k} n={n} base={with_base} task {kk}: {} vs {}",
                            got[kk],
                            want[kk]
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn ties_threshold_matches_cpu_with_heavy_ties() {
    let Some(gpu) = gpu() else { return };
    let n = 150_001;
    // Values from a tiny set: many exact ties at every threshold.
    let base = vec![0f32; n];
    let e: Vec<f32> = (0..n).map(|i| [0.5, -0.5, 0.25, 0.0, -1.0][i % 5] * ((i % 3) as f32)).collect();
    let inp = Inputs {
        dtype: FloatDType::BF16,
        base: encode(FloatDType::BF16, &base),
        experts: vec![encode(FloatDType::BF16, &e)],
    };
    for k in [0usize, 1, 29_999, 30_000, 30_001, 77_777, 149_999, n] {
        let want_direct = magnitude_threshold(n, k, |off, out| {
            out.copy_from_slice(&e[off..off + out.len()]);
            Ok(())
        })
        .unwrap();
        let got = gpu
            .magnitude_threshold_host(
                HostTensor { bytes: &inp.base, dtype: FloatDType::BF16 },
                HostTensor { bytes: &inp.experts[0], dtype: FloatDType::BF16 },
                k,
            )
            .unwrap();
        assert_eq!(got, want_direct, "k={k}");
    }
}

#[test]
fn dare_philox_is_bit_identical_to_cpu() {
    let Some(gpu) = gpu() else { return };
    for (seed, offset, n) in [(0u64, 0usize, 1usize), (42, 3, 1001), (u64::MAX, 65536 * 7, 300_007), (7, 5, 9)] {
        let tensor = name_hash("model.layers.3.mlp.up_proj.weight");
        for task in [0u32, 2, 31] {
            let got = gpu.dare_uniform_host(seed, tensor, task, offset, n).unwrap();
            let mut want = vec![0f32; n];
            ElementStream::new(seed, tensor, task).fill_uniform(offset, &mut want);
            assert_eq!(
                got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "seed {seed} offset {offset} task {task}"
            );
        }
        let inp = inputs(FloatDType::BF16, n, 1);
        let (b, e) = (decoded(FloatDType::BF16, &inp.base), decoded(FloatDType::BF16, &inp.experts[0]));
        let mut u = vec![0f32; n];
        ElementStream::new(seed, tensor, 1).fill_uniform(offset, &mut u);
        let want: Vec<f32> = (0..n).map(|i| if u[i] < 0.3 { (0.5f32 / 0.3) * (e[i] - b[i]) } else { 0.0 }).collect();
        let got = gpu
            .dare_sparsify_host(
                HostTensor { bytes: &inp.base, dtype: FloatDType::BF16 },
                HostTensor { bytes: &inp.experts[0], dtype: FloatDType::BF16 },
                offset,
                seed,
                tensor,
                1,
                0.3,
                0.5 / 0.3,
            )
            .unwrap();
        assert_eq!(
            got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
    }
}

/// Elements `from..` of a host tensor.
fn tail_of(t: HostTensor<'_>, from: usize) -> HostTensor<'_> {
    HostTensor { bytes: &t.bytes[from * t.dtype.size()..], dtype: t.dtype }
}

/// The CPU twin of a kernel that takes the CPU pre-pass's statistics: `prepare` over the whole
/// inputs, then `merge_chunk` over the whole tensor with them.
fn cpu_prepared(method: &dyn MergeMethod, p: &TensorParams, hash: u32, inp: &Inputs) -> (TensorStats, Vec<f32>) {
    let base = decoded(inp.dtype, &inp.base);
    let experts: Vec<Vec<f32>> = inp.experts.iter().map(|e| decoded(inp.dtype, e)).collect();
    let views: Vec<&[f32]> = experts.iter().map(Vec::as_slice).collect();
    let n = base.len();
    let pass =
        InMemory { base: Some(&base), experts: views.clone(), row_len: n, chunk_len: 4096, params: p, name_hash: hash };
    let stats = method.prepare(&pass).unwrap();
    let ctx = ChunkCtx {
        offset: 0,
        params: p,
        thresholds: &stats.thresholds,
        name_hash: hash,
        scalars: &stats.scalars,
        row_len: n,
    };
    let mut out = vec![0f32; n];
    method.merge_chunk(&ctx, Some(&base), &views, &mut out, &mut Vec::new());
    (stats, out)
}

/// SLERP, Breadcrumbs (with and without l1 rescale, with and without TIES) and SCE kernels
/// against their CPU twins, given the CPU pre-pass's statistics (the GPU engine computes them
/// the same way): elementwise f32 in the CPU's order without FMA, so every byte must match,
/// for the whole tensor and for its second half launched alone at its tensor offset (thresholds
/// with ties broken by index see tensor indices).
#[test]
fn prepared_kernels_match_cpu_bit_for_bit() {
    let gpu = gpu();
    let methods: Vec<(&str, Box<dyn MergeMethod>)> = vec![
        ("slerp", Box::new(Slerp)),
        ("breadcrumbs", Box::new(breadcrumbs::method(false, false))),
        ("breadcrumbs_rescale", Box::new(breadcrumbs::method(false, true))),
        ("breadcrumbs_ties", Box::new(breadcrumbs::method(true, true))),
        ("sce", Box::new(Sce)),
    ];
    let mut cases = 0usize;
    for dtype in DTYPES {
        for &n in &SIZES {
            for (name, method) in &methods {
                for k in if *name == "slerp" { vec![1usize] } else { vec![1, 3, 8] } {
                    let inp = inputs(dtype, n, k);
                    let mut p = TensorParams {
                        weights: (0..k).map(|i| 0.3 + 0.2 * i as f32).collect(),
                        densities: (0..k).map(|i| [0.5, 0.3, 1.0][i % 3]).collect(),
                        lambda: 0.8,
                        normalize: name.ends_with("ties"),
                        ..Default::default()
                    };
                    p.extra.insert("gamma", (0..k).map(|i| [0.01, 0.05, 0.0][i % 3]).collect());
                    p.extra.insert("t", vec![0.3]);
                    p.extra.insert("select_topk", vec![0.5]);
                    let hash = name_hash(name);
                    let (stats, want) = cpu_prepared(method.as_ref(), &p, hash, &inp);
                    let form = method.kernel_form().expect("a GPU form");
                    let Some(gpu) = &gpu else { continue };
                    let half = n / 2 / 8 * 8;
                    for out_dtype in [dtype, FloatDType::F32] {
                        let want = encode(out_dtype, &want);
                        let base = HostTensor { bytes: &inp.base, dtype };
                        let experts: Vec<HostTensor<'_>> =
                            inp.experts.iter().map(|e| HostTensor { bytes: e, dtype }).collect();
                        let got =
                            gpu.merge_host_stats(form, &p, &stats, hash, Some(base), &experts, out_dtype, 0).unwrap();
                        assert!(!got.bad, "{name}: flagged bad on finite data");
                        assert!(got.bytes == want, "{name} {dtype}->{out_dtype} n={n} k={k}: not the CPU's bytes");
                        let experts: Vec<HostTensor<'_>> = experts.iter().map(|&e| tail_of(e, half)).collect();
                        let got = gpu
                            .merge_host_stats(
                                form,
                                &p,
                                &stats,
                                hash,
                                Some(tail_of(base, half)),
                                &experts,
                                out_dtype,
                                half,
                            )
                            .unwrap();
                        let osize = out_dtype.size();
                        assert!(
                            got.bytes == want[half * osize..],
                            "{name} {dtype}->{out_dtype} n={n} k={k}: second half"
                        );
                        cases += 2;
                    }
                }
            }
        }
    }
    if gpu.is_some() {
        println!("prepared kernels: {cases} cases bit-identical to the CPU");
    }
}

/// DELLA inputs with ties in the magnitudes: every fifth base value is 0 and the experts
/// there are +-0.015 (one bf16 or f32 value, so |tau| ties across the row with both signs),
/// and expert 0 equals the base at every seventh element (ties at zero).
fn della_inputs(dtype: FloatDType, n: usize, k: usize) -> Inputs {
    let seed = fresh_seed();
    let mut base = uniform(n, seed, 0.0, 0.08);
    let mut experts: Vec<Vec<f32>> = (0..k)
        .map(|i| {
            let d = uniform(n, seed ^ ((i as u64 + 1) * 7919), 0.0, 0.02);
            base.iter().zip(&d).map(|(b, d)| b + d).collect()
        })
        .collect();
    for i in (0..n).step_by(5) {
        base[i] = 0.0;
        for (e, x) in experts.iter_mut().enumerate() {
            x[i] = if e % 2 == 0 { 0.015 } else { -0.015 };
        }
    }
    for i in (0..n).step_by(7) {
        experts[0][i] = base[i];
    }
    Inputs { dtype, base: encode(dtype, &base), experts: experts.iter().map(|e| encode(dtype, e)).collect() }
}

/// The CPU DELLA over rows of `row_len`: the l1 pre-pass, then `merge_chunk` over the whole
/// tensor, from the values as stored.
fn cpu_della(
    method: &dyn MergeMethod,
    p: &TensorParams,
    hash: u32,
    inp: &Inputs,
    row_len: usize,
) -> (TensorStats, Vec<f32>) {
    let base = decoded(inp.dtype, &inp.base);
    let experts: Vec<Vec<f32>> = inp.experts.iter().map(|e| decoded(inp.dtype, e)).collect();
    let views: Vec<&[f32]> = experts.iter().map(Vec::as_slice).collect();
    let chunk_len = (4096 / row_len).max(1) * row_len;
    let pass = InMemory { base: Some(&base), experts: views.clone(), row_len, chunk_len, params: p, name_hash: hash };
    let stats = method.prepare(&pass).unwrap();
    let ctx = ChunkCtx {
        offset: 0,
        params: p,
        thresholds: &stats.thresholds,
        name_hash: hash,
        scalars: &stats.scalars,
        row_len,
    };
    let mut out = vec![0f32; base.len()];
    method.merge_chunk(&ctx, Some(&base), &views, &mut out, &mut Vec::new());
    (stats, out)
}

/// `della_merge` against the CPU's DELLA (`della` and `della_linear`, with and without the l1
/// rescale), every byte: rows of 1, odd rows, 4096 and 16384 (the longest row the H100/H200
/// sort takes with K = 3), K = 1 and 3 (densities 0.5, 0.3 and 1: pruned and kept whole), ties
/// in magnitude, f32 and bf16 in, both out; the whole tensor and its later rows launched alone
/// at their tensor offset (Philox sees tensor indices). Rows too long for the sort are refused
/// (the engine merges those tensors on the CPU).
#[test]
fn della_kernel_matches_cpu_bit_for_bit() {
    let gpu = gpu();
    let shapes = [(5usize, 1usize), (3, 7), (4, 1001), (2, 4096), (1, 16384)];
    let mut cases = 0usize;
    for dtype in [FloatDType::F32, FloatDType::BF16] {
        for &(rows, row_len) in &shapes {
            for k in [1usize, 3] {
                for (ties, rescale) in [(true, true), (false, true), (true, false)] {
                    let n = rows * row_len;
                    let inp = della_inputs(dtype, n, k);
                    let mut p = TensorParams {
                        weights: (0..k).map(|i| 0.3 + 0.2 * i as f32).collect(),
                        densities: (0..k).map(|i| [0.5, 0.3, 1.0][i % 3]).collect(),
                        lambda: 0.8,
                        normalize: ties,
                        ..Default::default()
                    };
                    p.extra.insert("epsilon", (0..k).map(|i| [0.1, 0.2, 0.05][i % 3]).collect());
                    let method = della::method(ties, rescale, 42);
                    let hash = name_hash("model.layers.0.mlp.down_proj.weight");
                    let (stats, want) = cpu_della(&method, &p, hash, &inp, row_len);
                    let Some(gpu) = &gpu else { continue };
                    let dtypes = vec![dtype; k];
                    let form = method.kernel_form().expect("della has a GPU form");
                    let plan = MergeLaunch::plan_stats(form, &p, &stats, hash, &dtypes).unwrap().for_rows(row_len);
                    let what = format!("della ties={ties} rescale={rescale} {dtype} rows {rows}x{row_len} k={k}");
                    for out_dtype in [dtype, FloatDType::F32] {
                        let want = encode(out_dtype, &want);
                        let base = HostTensor { bytes: &inp.base, dtype };
                        let experts: Vec<HostTensor<'_>> =
                            inp.experts.iter().map(|e| HostTensor { bytes: e, dtype }).collect();
                        let got = gpu.merge_host_plan(&plan, Some(base), &experts, out_dtype, 0).unwrap();
                        assert!(!got.bad, "{what}: flagged bad on finite data");
                        assert!(got.bytes == want, "{what} -> {out_dtype}: not the CPU's bytes");
                        let from = rows / 2 * row_len;
                        let experts: Vec<HostTensor<'_>> = experts.iter().map(|&e| tail_of(e, from)).collect();
                        let got =
                            gpu.merge_host_plan(&plan, Some(tail_of(base, from)), &experts, out_dtype, from).unwrap();
                        let osize = out_dtype.size();
                        assert!(got.bytes == want[from * osize..], "{what} -> {out_dtype}: rows from {from}");
                        cases += 2;
                    }
                }
            }
        }
    }
    let Some(gpu) = &gpu else { return };
    let long = 16385;
    assert!(!gpu.kernels.della_fits(long, 3), "a row of {long} with K = 3 fits: raise the test's row");
    let inp = della_inputs(FloatDType::BF16, long, 3);
    let p = TensorParams { weights: vec![1.0; 3], densities: vec![0.5; 3], lambda: 1.0, ..Default::default() };
    let method = della::method(true, false, 1);
    let plan =
        MergeLaunch::plan_stats(method.kernel_form().unwrap(), &p, &TensorStats::default(), 1, &[FloatDType::BF16; 3])
            .unwrap()
            .for_rows(long);
    let base = HostTensor { bytes: &inp.base, dtype: FloatDType::BF16 };
    let experts: Vec<HostTensor<'_>> =
        inp.experts.iter().map(|e| HostTensor { bytes: e, dtype: FloatDType::BF16 }).collect();
    assert!(gpu.merge_host_plan(&plan, Some(base), &experts, FloatDType::BF16, 0).is_err(), "rows too long refused");
    println!("della kernel: {cases} cases bit-identical to the CPU");
}
