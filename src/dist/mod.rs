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

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

pub use collective::{Collective, FileGroup, LocalGroup, LocalRank, Single};
pub use rank::{RankInfo, RankSource};
pub use rendezvous::{Rendezvous, RendezvousOptions};

use crate::error::{Error, Result};

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

/// How ranks find each other and how long they wait.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// Shared directory for the rendezvous; required when the world has more than one rank.
    pub rendezvous: Option<PathBuf>,
    pub rendezvous_timeout: Duration,
    /// Longest wait inside one collective before naming the ranks that never arrived.
    pub collective_timeout: Duration,
    /// Overrides the launcher's run id as the key that keeps runs sharing a directory apart.
    pub job_id: Option<String>,
    pub backend: Backend,
}

/// The communicator for this rank: [`Single`] for world size 1 (a one-rank NCCL communicator
/// when NCCL is asked for), else the rendezvous followed by the chosen backend.
pub fn connect(info: &RankInfo, opts: &ConnectOptions) -> Result<Box<dyn Collective>> {
    if info.is_single() {
        return match opts.backend {
            Backend::File => Ok(Box::new(Single)),
            Backend::Nccl => Ok(Box::new(nccl::connect(info, None, opts.collective_timeout)?)),
        };
    }
    let Some(dir) = &opts.rendezvous else {
        return Err(Error::Invalid(format!(
            "{info}: a world of {} ranks needs --rendezvous DIR, a directory every rank can reach (a shared filesystem across nodes)",
            info.world_size
        )));
    };
    let ropts =
        RendezvousOptions { job_id: opts.job_id.clone(), ..RendezvousOptions::new(dir, opts.rendezvous_timeout) };
    match opts.backend {
        Backend::Nccl => Ok(Box::new(nccl::connect(info, Some(&ropts), opts.collective_timeout)?)),
        Backend::File => {
            let rdzv = rendezvous::rendezvous(info, &ropts, &[])?;
            Ok(Box::new(FileGroup::new(rdzv, opts.collective_timeout)))
        }
    }
}
