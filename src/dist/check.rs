//! `symerge dist-check`: proves on every rank that the communicator forms and that an
//! all-reduce returns the right sum, and measures what it costs.

use std::fmt;
use std::time::Instant;

use serde::Serialize;

use crate::dist::ConnectOptions;
use crate::dist::collective::Collective;
use crate::dist::data_parallel::verify_identical;
use crate::dist::rank::{RankInfo, RankSource};
use crate::error::{Error, Result};

/// `symerge dist-check`'s flags: how to connect, and the size of the test tensor.
#[derive(Clone, Debug, clap::Args)]
pub struct CheckOptions {
    #[command(flatten)]
    pub dist: ConnectOptions,
    /// Elements of the test tensor (f32; at most 2^30 = 1073741824, 4 GiB).
    #[arg(long, default_value_t = DEFAULT_ELEMENTS,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(..=MAX_ELEMENTS as u64))]
    pub elements: usize,
}

/// 64 Ki f32: enough to see a wrong sum, small enough to check in milliseconds.
pub const DEFAULT_ELEMENTS: usize = 1 << 16;

/// The largest test tensor: 4 GiB of f32 per buffer (nccl-tests' usual largest size is of this
/// order), of which a rank holds a few copies. A larger `--elements` failed on an allocation
/// (`2^64-1`: a capacity-overflow panic) or would exhaust the host's memory.
pub const MAX_ELEMENTS: usize = 1 << 30;

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions { dist: ConnectOptions::default(), elements: DEFAULT_ELEMENTS }
    }
}

impl CheckOptions {
    /// Connects this process as the launcher's environment says and runs [`run_check`] on it.
    pub fn run(&self) -> Result<CheckReport> {
        let run = crate::dist::run_fingerprint(&format!("dist-check --elements {}", self.elements), &[]);
        let (info, mut coll) = self.dist.connect_from_env(&run)?;
        run_check(coll.as_mut(), &info, self.elements).map_err(|e| info.tag(e))
    }
}

/// One rank's result.
#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub source: RankSource,
    pub backend: String,
    pub device: String,
    pub host: String,
    pub elements: usize,
    /// Hash of the all-reduced tensor: equal on every rank when they agree bit for bit.
    pub sum_hash: String,
    /// Seconds of the fastest timed all-reduce.
    pub seconds: f64,
    /// Bytes per second of one rank's buffer (nccl-tests' `algbw`); 0 for one rank.
    pub algbw_gb_per_s: f64,
    /// `algbw * 2 (n - 1) / n`: the traffic a ring all-reduce puts on each link, comparable
    /// across world sizes (nccl-tests' `busbw`).
    pub busbw_gb_per_s: f64,
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ok: rank {}/{} (local {}, {}) host {}, device {}, backend {}: all-reduce of {} f32 correct, sum hash {}, {:.3} ms",
            self.rank,
            self.world_size,
            self.local_rank,
            self.source,
            self.host,
            self.device,
            self.backend,
            self.elements,
            self.sum_hash,
            self.seconds * 1e3
        )?;
        if self.world_size > 1 {
            write!(f, ", bus bandwidth {:.3} GB/s (algbw {:.3} GB/s)", self.busbw_gb_per_s, self.algbw_gb_per_s)?;
        }
        writeln!(f)
    }
}

/// What rank `rank` contributes at `i`: small integers, so every partial sum is exact in f32
/// and the expected total has a closed form.
fn test_value(rank: usize, i: usize) -> f32 {
    (rank + 1) as f32 + (i % 7) as f32
}

/// All-reduces a test tensor of `elements` values, checks the sum on this rank, checks every
/// rank got the same bits, and times the all-reduce.
pub fn run_check(coll: &mut dyn Collective, info: &RankInfo, elements: usize) -> Result<CheckReport> {
    if elements > MAX_ELEMENTS {
        return Err(Error::Invalid(format!(
            "--elements {elements} is more than the {MAX_ELEMENTS} (2^30, 4 GiB of f32) a check allocates at most"
        )));
    }
    let (rank, world) = (coll.rank(), coll.world_size());
    let fresh = || (0..elements).map(|i| test_value(rank, i)).collect::<Vec<f32>>();
    let mut buf = fresh();
    coll.all_reduce_sum_f32(&mut buf)?;
    let base = (world * (world + 1) / 2) as f32;
    if let Some(i) = (0..elements).find(|&i| buf[i] != base + (world * (i % 7)) as f32) {
        let reason = format!(
            "all-reduce gave {} at element {i} on rank {rank}, expected {}",
            buf[i],
            base + (world * (i % 7)) as f32
        );
        coll.abort(&reason);
        return Err(Error::Collective { backend: coll.backend().into(), reason });
    }
    let hash = verify_identical(coll, &buf)?;
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let mut b = fresh();
        coll.barrier()?;
        let t = Instant::now();
        coll.all_reduce_sum_f32(&mut b)?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    // One rank moves no data, so it has no bandwidth to report.
    let algbw = if world > 1 { (elements * 4) as f64 / best.max(1e-9) / 1e9 } else { 0.0 };
    let busbw = algbw * 2.0 * (world - 1) as f64 / world as f64;
    coll.barrier()?;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string();
    Ok(CheckReport {
        rank,
        world_size: world,
        local_rank: info.local_rank,
        source: info.source,
        backend: coll.backend().into(),
        device: coll.device(),
        host,
        elements,
        sum_hash: format!("{hash:016x}"),
        seconds: best,
        algbw_gb_per_s: algbw,
        busbw_gb_per_s: busbw,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::parse_args;

    #[test]
    fn cli_defaults_are_the_library_defaults() {
        let opts: CheckOptions = parse_args(&[]).unwrap();
        assert_eq!(format!("{opts:?}"), format!("{:?}", CheckOptions::default()));
    }

    /// Fuzzing round 3: `--elements 2^64-1` panicked with a capacity overflow.
    #[test]
    fn elements_are_bounded() {
        let at_most: CheckOptions = parse_args(&["--elements", "1073741824"]).unwrap();
        assert_eq!(at_most.elements, MAX_ELEMENTS);
        for huge in ["1073741825", "18446744073709551615"] {
            let err = parse_args::<CheckOptions>(&["--elements", huge]).err().unwrap().to_string();
            assert!(err.contains("--elements") && err.contains("1073741824"), "{err}");
        }
        let err = run_check(&mut crate::dist::Single, &RankInfo::single(), usize::MAX).unwrap_err().to_string();
        assert!(err.contains("--elements 18446744073709551615 is more than the 1073741824"), "{err}");
    }

    #[test]
    fn one_process_checks_its_own_sum() {
        let report = run_check(&mut crate::dist::Single, &RankInfo::single(), 100).unwrap();
        assert_eq!((report.world_size, report.elements), (1, 100));
    }
}
