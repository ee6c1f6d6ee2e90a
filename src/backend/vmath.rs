//! Branch-free f32 `erf` and `exp` for the CPU backend's element-wise loops (GELU and its
//! gradient), and f64 `exp` and `ln` for the merge statistics (Arcee Fusion's row divergences).
//! libm's are scalar calls that keep the compiler from vectorising a loop; these are plain
//! arithmetic on the value (a rational function, a range reduction and a polynomial), so a loop
//! over a slice compiles to SIMD code. Their errors are bounded by the tests below.

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

/// `a * b + c`, fused where the target has FMA (x86-64-v3, this project's build), else two
/// rounded operations (a fused multiply-add in software would be slower than both).
#[inline(always)]
fn madd(a: f64, b: f64, c: f64) -> f64 {
    #[cfg(target_feature = "fma")]
    {
        a.mul_add(b, c)
    }
    #[cfg(not(target_feature = "fma"))]
    {
        a * b + c
    }
}

/// ln 2 split as fdlibm splits it (its bits): `n * LN2_HI_64` is exact for |n| < 2^11.
const LN2_HI_64: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
const LN2_LO_64: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
/// Adding and subtracting 1.5 * 2^52 rounds an f64 of magnitude below 2^51 to an integer, which
/// then sits in the low bits of the sum.
const ROUNDER_64: f64 = 6_755_399_441_055_744.0;

/// `e^v` in f64 to within 2 ulp for `v` in [-708, 709]; below, about 3e-308 (not 0 or a
/// subnormal), above, about 8e307 (not infinity).
#[inline(always)]
pub fn exp64(v: f64) -> f64 {
    let v = v.clamp(-708.0, 709.0);
    let t = v * std::f64::consts::LOG2_E + ROUNDER_64;
    let n = t - ROUNDER_64;
    let r = (v - n * LN2_HI_64) - n * LN2_LO_64;
    // e^r on |r| <= ln2 / 2 by its Taylor series to degree 13 (truncation below 5e-18).
    let mut c = [0f64; 14];
    c[0] = 1.0;
    for k in 1..14 {
        c[k] = c[k - 1] / k as f64;
    }
    let p = c.iter().rev().fold(0.0f64, |acc, &c| madd(acc, r, c));
    // 2^n in the exponent field, n (in [-1022, 1023]) read from the low bits of `t`.
    let n = (t.to_bits() as i64).wrapping_sub(ROUNDER_64.to_bits() as i64);
    p * f64::from_bits(((n + 1023) as u64) << 52)
}

/// `ln x` in f64 to within 2 ulp for normal positive `x` (callers pass no zeros, subnormals,
/// infinities or NaNs): `x = m 2^e` with m in [sqrt(1/2), sqrt(2)), and
/// `ln m = 2 atanh(s)`, `s = (m - 1) / (m + 1)`, by its series in `s^2`.
#[inline(always)]
pub fn ln64(x: f64) -> f64 {
    let bits = x.to_bits();
    let e = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | (1023u64 << 52));
    let big = m > std::f64::consts::SQRT_2;
    let (m, e) = if big { (m * 0.5, e + 1) } else { (m, e) };
    let s = (m - 1.0) / (m + 1.0);
    let z = s * s;
    // 1 + z/3 + z^2/5 + ... + z^12/25; |z| <= 0.0295, so the next term is below 1e-20.
    let mut c = [0f64; 13];
    for (k, c) in c.iter_mut().enumerate() {
        *c = 1.0 / (2 * k + 1) as f64;
    }
    let series = c.iter().rev().fold(0.0f64, |acc, &c| madd(acc, z, c));
    let e = e as f64;
    e * LN2_HI_64 + (2.0 * s * series + e * LN2_LO_64)
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

    /// Relative error in units of the last place of `b`.
    fn ulps(a: f64, b: f64) -> f64 {
        (a - b).abs() / (b.abs() * f64::EPSILON)
    }

    #[test]
    fn exp64_is_within_2_ulp_on_its_range() {
        let mut worst = 0f64;
        let grid = (0..=2_000_000).map(|i| -708.0 + 1417.0 * i as f64 / 2e6);
        for v in grid.chain((0..=200_000).map(|i| -1.0 + i as f64 / 1e5)) {
            worst = worst.max(ulps(exp64(v), v.exp()));
        }
        eprintln!("max error {worst} ulp");
        assert!(worst <= 2.0, "max error {worst} ulp");
        assert_eq!(exp64(0.0), 1.0);
        assert!(exp64(-1e4) > 0.0 && exp64(-1e4) < 3e-307);
        assert!(exp64(1e4).is_finite());
    }

    #[test]
    fn ln64_is_within_2_ulp_of_std() {
        let mut worst = 0f64;
        // Ratios of softmax probabilities: 1e-9 to 1e9, and around 1 (where ln is near 0).
        let wide = (0..=2_000_000).map(|i| 10f64.powf(-9.0 + 18.0 * i as f64 / 2e6));
        let near_one = (1..=200_000).map(|i| 1.0 + (i as f64 - 100_000.0) * 1e-6);
        for x in wide.chain(near_one) {
            let want = x.ln();
            let err = if want == 0.0 { ln64(x).abs() } else { ulps(ln64(x), want) };
            worst = worst.max(err);
        }
        eprintln!("max error {worst} ulp");
        assert!(worst <= 2.0, "max error {worst} ulp");
        assert_eq!(ln64(1.0), 0.0);
        for x in [f64::MIN_POSITIVE, 1e-300, 0.5, 2.0, std::f64::consts::SQRT_2, 1e300, f64::MAX] {
            assert!(ulps(ln64(x), x.ln()) <= 2.0, "ln64({x:e}) = {} vs {}", ln64(x), x.ln());
        }
    }
}
