//! Data-parallel runs over several processes, nodes or GPUs.
//!
//! - [`rank`]: which rank this process is, from torchrun or SLURM variables.
//! - [`rendezvous`]: ranks meet in a shared directory; rank 0 shares a payload (the NCCL
//!   unique id) and every wait ends in a timeout naming the missing ranks.
//! - [`collective`]: the [`Collective`] trait and its CPU implementations (single process,
//!   threads in one process, files in the rendezvous directory).
//! - [`nccl`]: NCCL on CUDA devices, the id shared through the rendezvous.
//! - [`data_parallel`]: batch sharding, gradient averaging, parameter hashes.
//! - [`check`]: what `symerge dist-check` runs on every rank.
//!
//! World size 1 takes none of this: [`connect`] returns [`Single`] without a launcher,
//! directory or library.

pub mod check;
pub mod collective;
pub mod data_parallel;
pub mod nccl;
pub mod rank;
pub mod rendezvous;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

pub use collective::{Collective, FileGroup, LocalGroup, LocalRank, Single};
pub use rank::{RankInfo, RankSource};
pub use rendezvous::{Rendezvous, RendezvousOptions};

use crate::error::{Error, Result};
use crate::units::parse_secs;

/// The instant a wait of `timeout` from now ends; `None` when no instant is that far (a timeout
/// given as "forever", such as `2^64-1` seconds): no deadline.
pub(crate) fn deadline_after(timeout: Duration) -> Option<Instant> {
    Instant::now().checked_add(timeout)
}

/// Whether `deadline` has passed; never, without one.
pub(crate) fn passed(deadline: Option<Instant>) -> bool {
    deadline.is_some_and(|d| Instant::now() >= d)
}

/// Which communicator carries collectives when the world has more than one rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Files in the rendezvous directory: CPU only, slow, needs nothing but a shared filesystem.
    File,
    /// NCCL on CUDA devices.
    Nccl,
}

impl FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "file" => Ok(Backend::File),
            "nccl" => Ok(Backend::Nccl),
            other => Err(format!("unknown backend `{other}` (available: file, nccl)")),
        }
    }
}

/// How the ranks of a multi-process run find each other and how long they wait; also the flags
/// of every command that runs on several ranks. Ignored without launcher variables
/// (`RANK`/`WORLD_SIZE` from torchrun, or `SLURM_PROCID`/`SLURM_NTASKS` from srun).
#[derive(Clone, Debug, clap::Args)]
pub struct ConnectOptions {
    /// Directory every rank can reach (a shared filesystem across nodes); needed when the
    /// world has more than one rank.
    #[arg(long, value_name = "DIR")]
    pub rendezvous: Option<PathBuf>,
    /// Seconds a rank waits for the others to arrive before failing (a huge value, or inf, waits
    /// without limit).
    #[arg(long, value_name = "SECS", default_value = "300", value_parser = parse_secs)]
    pub rendezvous_timeout: Duration,
    /// Seconds a rank waits inside one collective before failing (a huge value, or inf, waits
    /// without limit).
    #[arg(long, value_name = "SECS", default_value = "300", value_parser = parse_secs)]
    pub collective_timeout: Duration,
    /// Keeps runs that share the rendezvous directory apart (default: SLURM_JOB_ID.SLURM_STEP_ID
    /// or TORCHELASTIC_RUN_ID).
    #[arg(long)]
    pub job_id: Option<String>,
    /// Communicator: file (through the rendezvous directory, CPU; one rank needs none) or nccl
    /// (one GPU per rank, LOCAL_RANK picks it; with one rank a real one-GPU communicator).
    #[arg(long, default_value = "file")]
    pub backend: Backend,
}

/// The default wait for the other ranks, at the rendezvous and inside a collective.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

impl Default for ConnectOptions {
    /// No rendezvous directory, 300 s timeouts, the file backend: the flags' defaults.
    fn default() -> Self {
        ConnectOptions {
            rendezvous: None,
            rendezvous_timeout: DEFAULT_TIMEOUT,
            collective_timeout: DEFAULT_TIMEOUT,
            job_id: None,
            backend: Backend::File,
        }
    }
}

impl ConnectOptions {
    /// Refuses, before the ranks meet (which creates it), a `--rendezvous` directory that is,
    /// contains or lies inside `output` or one of `inputs` ([`crate::atomic::check_rendezvous_apart`]).
    /// Checked with one rank too, where it goes unused: the same command on more ranks would use it.
    pub fn check_apart(&self, output: &Path, inputs: &[&Path]) -> Result<()> {
        match &self.rendezvous {
            Some(dir) => crate::atomic::check_rendezvous_apart(dir, output, inputs),
            None => Ok(()),
        }
    }

    /// This process's rank, from the launcher's variables, and its communicator ([`Single`]
    /// without a launcher); a failure to connect names the rank. `run` is what the run is
    /// ([`run_fingerprint`]): ranks of another job that meet in the same directory are refused.
    pub fn connect_from_env(&self, run: &str) -> Result<(RankInfo, Box<dyn Collective>)> {
        let info = RankInfo::from_env()?;
        let coll = connect(&info, self, run).map_err(|e| info.tag(e))?;
        Ok((info, coll))
    }
}

/// What a run is, for the rendezvous: `summary` (the command and its output, which a person
/// reading a refusal recognises) and a hash of `details` (the settings every rank must share,
/// such as the effective config). Ranks of one job compute the same string; two jobs that
/// differ in anything hashed do not, so one cannot join the other.
pub fn run_fingerprint(summary: &str, details: &[&[u8]]) -> String {
    let mut h = blake3::Hasher::new();
    for part in details {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part);
    }
    let hex = h.finalize().to_hex();
    format!("{summary} [{}]", &hex[..12])
}

/// The communicator for this rank: [`Single`] for world size 1 (a one-rank NCCL communicator
/// when NCCL is asked for), else the rendezvous followed by the chosen backend; `run` is the
/// run's [`run_fingerprint`]. Its errors do not name the rank: [`RankInfo::tag`] does that once.
pub fn connect(info: &RankInfo, opts: &ConnectOptions, run: &str) -> Result<Box<dyn Collective>> {
    if info.is_single() {
        return match opts.backend {
            Backend::File => Ok(Box::new(Single)),
            Backend::Nccl => Ok(Box::new(nccl::connect(info, None, opts.collective_timeout)?)),
        };
    }
    let Some(dir) = &opts.rendezvous else {
        return Err(Error::Invalid(format!(
            "a world of {} ranks needs --rendezvous DIR, a directory every rank can reach (a shared filesystem across nodes)",
            info.world_size
        )));
    };
    let ropts = RendezvousOptions {
        job_id: opts.job_id.clone(),
        fingerprint: run.to_string(),
        ..RendezvousOptions::new(dir, opts.rendezvous_timeout)
    };
    match opts.backend {
        Backend::Nccl => Ok(Box::new(nccl::connect(info, Some(&ropts), opts.collective_timeout)?)),
        Backend::File => {
            let rdzv = rendezvous::rendezvous(info, &ropts, &[])?;
            Ok(Box::new(FileGroup::new(rdzv, opts.collective_timeout)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::parse_args;

    #[test]
    fn cli_defaults_are_the_library_defaults() {
        let opts: ConnectOptions = parse_args(&[]).unwrap();
        assert_eq!(format!("{opts:?}"), format!("{:?}", ConnectOptions::default()));
        let opts: ConnectOptions = parse_args(&["--rendezvous-timeout", "1.5", "--backend", "nccl"]).unwrap();
        assert_eq!((opts.rendezvous_timeout, opts.backend), (Duration::from_millis(1500), Backend::Nccl));
        let bad = parse_args::<ConnectOptions>(&["--collective-timeout", "0"]).err().unwrap();
        assert!(bad.to_string().contains("not a positive number of seconds"), "{bad}");
    }
}
