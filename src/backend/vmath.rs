//! Branch-free f32 `erf` and `exp` for the CPU backend's element-wise loops (GELU and its
//! gradient). libm's are scalar calls that keep the compiler from vectorising a loop; these are
//! plain arithmetic on the value (a rational function, a range reduction and a polynomial), so a
//! loop over a slice compiles to SIMD code. Their errors are bounded by the tests below.

/// Beyond this `erf` rounds to ±1 in f32 (erf(3.92) = 1 - 1.5e-8).
const ERF_CLAMP: f32 = 3.92;
/// `erf(x) / x` as `P(x^2) / Q(x^2)` on [0, 3.92]: coefficients fitted here by iteratively
/// reweighted least squares on the relative error (max abs error of the f32 evaluation 3.6e-7).
const ERF_P: [f32; 6] =
    [std::f32::consts::FRAC_2_SQRT_PI, 0.187_159_78, 0.052_375_53, 0.003_641_883_4, 0.000_284_827_26, 2.110_970_3e-6];
const ERF_Q: [f32; 6] = [1.0, 0.499_199, 0.112_818_28, 0.014_719_038, 0.001_137_619_4, 3.871_897e-5];

/// The error function, max abs error 4e-7 (libm's `erff` is the reference in the tests).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-ERF_CLAMP, ERF_CLAMP);
    let t = x * x;
    let p = ERF_P.iter().rev().fold(0.0f32, |acc, &c| acc * t + c);
    let q = ERF_Q.iter().rev().fold(0.0f32, |acc, &c| acc * t + c);
    (x * p / q).clamp(-1.0, 1.0)
}

const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in two so `n * LN2_HI` is exact for the `n` used (Cody and Waite's reduction).
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// Adding and subtracting 1.5 * 2^23 rounds an f32 of magnitude below 2^22 to an integer.
const ROUNDER: f32 = 12_582_912.0;

/// `e^v` for `v` in [-87, 88] to within 2 ulp; below -87 it returns about 1.7e-38 (not 0), above
/// 88 about 1.65e38 (not infinity): for the callers here (the normal density) both are far out
/// of reach.
#[inline(always)]
pub fn exp(v: f32) -> f32 {
    let v = v.clamp(-87.0, 88.0);
    let n = (v * LOG2_E + ROUNDER) - ROUNDER;
    let r = (v - n * LN2_HI) - n * LN2_LO;
    // e^r on |r| <= ln2 / 2 by its Taylor series to degree 7 (truncation below 6e-9).
    const C: [f32; 8] = [1.0, 1.0, 0.5, 1.0 / 6.0, 1.0 / 24.0, 1.0 / 120.0, 1.0 / 720.0, 1.0 / 5040.0];
    let p = C.iter().rev().fold(0.0f32, |acc, &c| acc * r + c);
    // 2^n built in the exponent field; n is in [-126, 127] after the clamp.
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    p * scale
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(lo: f32, hi: f32, n: usize) -> impl Iterator<Item = f32> {
        (0..=n).map(move |i| lo + (hi - lo) * i as f32 / n as f32)
    }

    #[test]
    fn erf_is_within_4e7_of_libm_and_odd() {
        let mut worst = 0f64;
        for x in grid(-6.0, 6.0, 600_000) {
            let (a, b) = (erf(x) as f64, libm::erf(x as f64));
            worst = worst.max((a - b).abs());
            assert_eq!(erf(-x), -erf(x), "odd at {x}");
            assert!(erf(x).abs() <= 1.0);
        }
        assert!(worst < 4e-7, "max abs error {worst:e}");
        assert_eq!(erf(0.0), 0.0);
        assert!(1.0 - erf(f32::INFINITY) < 1e-7 && erf(f32::NEG_INFINITY) == -erf(f32::INFINITY));
        // Small arguments keep their relative accuracy (erf(x) ~ 2x / sqrt(pi)).
        for x in [1e-30f32, 1e-10, 1e-5, 1e-3] {
            let rel = (erf(x) as f64 / libm::erf(x as f64) - 1.0).abs();
            assert!(rel < 1e-6, "erf({x}) relative error {rel:e}");
        }
    }

    #[test]
    fn exp_is_within_2_ulp_on_its_range() {
        let mut worst = 0f64;
        for v in grid(-87.0, 88.0, 1_000_000) {
            let (a, b) = (exp(v) as f64, (v as f64).exp());
            worst = worst.max((a - b).abs() / b);
        }
        assert!(worst < 2.5e-7, "max relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) < 2e-38 && exp(-1000.0) >= 0.0);
        assert!(exp(1000.0).is_finite());
    }
}
