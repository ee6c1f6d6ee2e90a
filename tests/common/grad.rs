//! Finite-difference gradient checking for f32 code.
//!
//! A function `f(inputs) -> out` is reduced to the scalar `L = sum(out * r)` for a fixed random
//! `r` (accumulated in f64), so the analytic gradient is the backward with `dy = r`. For random
//! directions `u`, the central difference `(L(x + eps u) - L(x - eps u)) / 2 eps` must match
//! `<grad, u>`; a projection tests every coordinate at once, and a large `eps` keeps f32 rounding
//! in the forward far below the tolerance.
#![allow(dead_code)]

use super::randoms;
use super::reference::rel_diff;

pub fn rand_f32(seed: u64, n: usize, scale: f64) -> Vec<f32> {
    randoms(seed, n, scale).into_iter().map(|v| v as f32).collect()
}

pub fn dot(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// Checks `grads[i]` (the analytic dL/d inputs[i], `None` to skip) against central differences
/// along `dirs` random directions; returns the largest relative error seen, after asserting it is
/// below `tol`.
pub fn check(
    name: &str,
    f: &dyn Fn(&[Vec<f32>]) -> Vec<f32>,
    inputs: &[Vec<f32>],
    r: &[f32],
    grads: &[Option<Vec<f32>>],
    eps: f32,
    tol: f64,
) -> f64 {
    check_impl(name, f, inputs, r, grads, eps, tol, false)
}

/// [`check`] with Richardson extrapolation of central differences at `eps` and `eps / 2`, which
/// cancels their `eps^2` error: for functions curved enough (attention with sharp softmax) that no
/// step is both small enough for the truncation error and large enough for f32 noise.
pub fn check_extrapolated(
    name: &str,
    f: &dyn Fn(&[Vec<f32>]) -> Vec<f32>,
    inputs: &[Vec<f32>],
    r: &[f32],
    grads: &[Option<Vec<f32>>],
    eps: f32,
    tol: f64,
) -> f64 {
    check_impl(name, f, inputs, r, grads, eps, tol, true)
}

#[allow(clippy::too_many_arguments)]
fn check_impl(
    name: &str,
    f: &dyn Fn(&[Vec<f32>]) -> Vec<f32>,
    inputs: &[Vec<f32>],
    r: &[f32],
    grads: &[Option<Vec<f32>>],
    eps: f32,
    tol: f64,
    richardson: bool,
) -> f64 {
    assert_eq!(inputs.len(), grads.len());
    let mut worst = 0f64;
    for (i, g) in grads.iter().enumerate() {
        let Some(g) = g else { continue };
        assert_eq!(g.len(), inputs[i].len(), "{name}: gradient {i} has the wrong length");
        for d in 0..3u64 {
            let u = rand_f32(1000 + 17 * i as u64 + d, g.len(), 1.0);
            let eval = |step: f32| {
                let mut xs = inputs.to_vec();
                for (x, &uj) in xs[i].iter_mut().zip(&u) {
                    *x += step * uj;
                }
                let out = f(&xs);
                assert_eq!(out.len(), r.len(), "{name}: output length");
                dot(&out, r)
            };
            let central = |h: f32| (eval(h) - eval(-h)) / (2.0 * h as f64);
            let fd = if richardson { (4.0 * central(eps / 2.0) - central(eps)) / 3.0 } else { central(eps) };
            let an = dot(g, &u);
            // Relative to the larger of the two, floored at a twentieth of |g| (the RMS of a
            // random direction's derivative): a direction nearly orthogonal to g has a tiny
            // derivative that the difference's f32 noise swamps, while a wrong gradient is off by
            // about |g|.
            let floor = 0.05 * dot(g, g).sqrt();
            let rel = rel_diff(fd, an, floor.max(1e-6));
            worst = worst.max(rel);
            assert!(
                rel < tol,
                "{name}: input {i}, direction {d}: finite difference {fd:.6e} vs analytic {an:.6e} (rel {rel:.2e})"
            );
        }
    }
    eprintln!("{name}: max relative error {worst:.2e}");
    worst
}
