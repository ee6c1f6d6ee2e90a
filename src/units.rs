//! Values people type on the command line, parsed once for every command that takes them: byte
//! sizes (`--out-shard-size`, `--host-mem`, `--device-mem`) and seconds (the timeouts). They are
//! clap value parsers, so a bad value is refused by clap naming the flag.

use std::time::Duration;

use crate::error::{Error, Result};

/// A byte size: `5GB`, `500MB`, `2GiB`, `1.5 TB` (the `bytesize` crate's units: K/M/G/T decimal,
/// KiB/MiB/GiB/TiB binary), at least one byte.
pub fn parse_size(s: &str) -> Result<u64> {
    if let Some(n) = before_lone_b(s) {
        // bytesize reads `8B` as 8 bytes, mergekit's --out-shard-size as 8 billion: a memory
        // budget of 8 bytes silently streams everything (fuzzing round 6).
        return Err(Error::Invalid(format!(
            "`{s}` is ambiguous: a lone B reads as {n} bytes here but as {n} billion bytes in mergekit's \
             --out-shard-size; write {n}GB, or {n} for bytes"
        )));
    }
    let size: bytesize::ByteSize =
        s.parse().map_err(|e| Error::Invalid(format!("`{s}` is not a size (e.g. 5GB, 500MB, 2GiB): {e}")))?;
    if size.as_u64() == 0 {
        return Err(Error::Invalid(format!("size `{s}` must be at least one byte")));
    }
    Ok(size.as_u64())
}

/// A shard size: [`parse_size`]'s units, and mergekit's `--out-shard-size` spelling, where a
/// whole number followed by `B` alone counts billions of bytes (its default `5B` is 5 GB; a
/// shard of a few bytes is never what such a value means). `K` and `M` agree in both.
pub fn parse_shard_size(s: &str) -> Result<u64> {
    let t = s.trim();
    if let Some(digits) = before_lone_b(t) {
        if !digits.bytes().all(|b| b.is_ascii_digit()) {
            // As bytes, `2.5B` wrote every tensor to a shard of its own (fuzzing round 7);
            // mergekit refuses a fraction with its suffixes.
            return Err(Error::Invalid(format!(
                "`{s}`: mergekit's B (billions of bytes) takes a whole number; write {digits}GB"
            )));
        }
        let n: u64 = digits.parse().map_err(|e| Error::Invalid(format!("`{s}` is not a size: {e}")))?;
        return match n.checked_mul(1_000_000_000) {
            Some(0) => Err(Error::Invalid(format!("size `{s}` must be at least one byte"))),
            Some(bytes) => Ok(bytes),
            None => Err(Error::Invalid(format!("size `{s}` is too large"))),
        };
    }
    parse_size(t)
}

/// The number before a lone `B` or `b` (`8B`, `2.5 b`), when that is all `s` is.
fn before_lone_b(s: &str) -> Option<&str> {
    let n = s.trim().strip_suffix(['B', 'b'])?.trim_end();
    let digits = n.bytes().filter(u8::is_ascii_digit).count();
    let points = n.bytes().filter(|&b| b == b'.').count();
    (digits > 0 && digits + points == n.len() && points <= 1).then_some(n)
}

/// [`parse_size`] that also takes `0`: a memory budget that keeps nothing.
pub fn parse_budget(s: &str) -> Result<u64> {
    if s.trim() == "0" { Ok(0) } else { parse_size(s) }
}

/// A positive number of seconds (fractions allowed). A value too large for a `Duration`
/// (`2^64-1`, `1e300`, `inf`) saturates to [`Duration::MAX`]: people write a huge timeout to
/// mean "wait forever", and the waits treat one past any representable instant as no deadline.
pub fn parse_secs(s: &str) -> Result<Duration> {
    match s.trim().parse::<f64>() {
        // `!(v > 0)` also refuses NaN.
        Ok(v) if v > 0.0 => Ok(Duration::try_from_secs_f64(v).unwrap_or(Duration::MAX)),
        _ => Err(Error::Invalid(format!("`{s}` is not a positive number of seconds"))),
    }
}

/// Serializes an f32 a user gave (a learning rate, `lambda_init`) as its shortest decimal that
/// reads back as the same f32: `0.3`, not the f64 widening `0.30000001192092896`.
pub fn f32_as_given<S: serde::Serializer>(v: &f32, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_f64(shortest_f64(*v))
}

/// [`f32_as_given`] for an optional value.
pub fn opt_f32_as_given<S: serde::Serializer>(v: &Option<f32>, s: S) -> std::result::Result<S::Ok, S::Error> {
    match v {
        Some(v) => f32_as_given(v, s),
        None => s.serialize_none(),
    }
}

/// The f64 whose shortest decimal is the f32's (Rust prints an f32 as the shortest decimal that
/// round-trips); a value that does not print as a finite number stays as it is.
fn shortest_f64(v: f32) -> f64 {
    v.to_string().parse::<f64>().ok().filter(|x| x.is_finite()).unwrap_or(v as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_budgets_and_seconds() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1.5 TB").unwrap(), 1_500_000_000_000);
        assert!(parse_size("0").unwrap_err().to_string().contains("at least one byte"));
        assert!(parse_size("5XB").unwrap_err().to_string().contains("is not a size"));
        // mergekit's shard sizes: B is billions, K and M as bytesize reads them.
        for (mk, bytes) in [("5B", 5_000_000_000u64), ("1b", 1_000_000_000), ("500M", 500_000_000), ("100K", 100_000)] {
            assert_eq!(parse_shard_size(mk).unwrap(), bytes, "{mk}");
        }
        assert_eq!(parse_shard_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_shard_size("1000").unwrap(), 1000);
        assert!(parse_shard_size("0B").unwrap_err().to_string().contains("at least one byte"));
        assert!(parse_shard_size("99999999999B").unwrap_err().to_string().contains("too large"));
        // Fuzzing rounds 6 and 7: a number and a lone B is refused where it would be bytes.
        for (shard, want) in [("2.5B", "takes a whole number; write 2.5GB"), ("0.5b", "write 0.5GB")] {
            assert!(parse_shard_size(shard).unwrap_err().to_string().contains(want), "{shard}");
        }
        for budget in ["8B", "8 b", "1.5B"] {
            assert!(parse_budget(budget).unwrap_err().to_string().contains("is ambiguous"), "{budget}");
        }
        assert_eq!(parse_size("8").unwrap(), 8);
        assert_eq!(parse_budget("0").unwrap(), 0);
        assert_eq!(parse_budget("8GB").unwrap(), 8_000_000_000);
        assert_eq!(parse_secs("1.5").unwrap(), Duration::from_millis(1500));
        // Fuzzing round 3: 2^64-1 panicked ("cannot convert float seconds to Duration").
        for forever in ["18446744073709551615", "1e300", "inf"] {
            assert_eq!(parse_secs(forever).unwrap(), Duration::MAX, "{forever}");
        }
        assert_eq!(parse_secs("1e19").unwrap(), Duration::from_secs(10_000_000_000_000_000_000));
        for bad in ["0", "-1", "-inf", "NaN", "x", "-0"] {
            assert!(parse_secs(bad).is_err(), "{bad}");
        }
    }
}
