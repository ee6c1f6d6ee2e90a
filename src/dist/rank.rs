//! Which rank this process is, read from the launcher's environment.
//!
//! The environment is passed in as a lookup function, so tests (and callers that merge
//! command-line overrides) never have to mutate the process environment, which is shared by
//! every thread of a test binary.

use std::fmt;

use serde::Serialize;

use crate::error::{Error, Result};

/// Every environment variable a [`RankInfo`] reads: a launcher that spawns ranks as children
/// (or a test doing so from inside a SLURM job) clears these before setting its own.
pub const LAUNCHER_VARS: &[&str] = &[
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "SLURM_JOB_ID",
    "SLURM_STEP_ID",
];

/// The largest world size accepted. Far above any job this tool runs (the file rendezvous polls
/// one file per rank), and low enough that a garbage `WORLD_SIZE` (`2^64-1`, `1e9`) fails at
/// once with a clear error instead of panicking on an allocation or polling for hours.
pub const MAX_WORLD_SIZE: usize = 65_536;

/// The launcher that set the variables a [`RankInfo`] came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RankSource {
    /// `torchrun` / `torch.distributed.launch`: `RANK`, `WORLD_SIZE`, `LOCAL_RANK` beside the
    /// `TORCHELASTIC_*` variables its agent sets.
    Torchrun,
    /// `RANK` and `WORLD_SIZE` without torchrun's `TORCHELASTIC_*`: a launch by hand or by
    /// another launcher (DeepSpeed, mpirun scripts), which must not be called torchrun.
    Env,
    /// `srun`: `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`.
    Slurm,
    /// No launcher variables: one process, world size 1.
    Single,
}

impl fmt::Display for RankSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RankSource::Torchrun => "torchrun",
            RankSource::Env => "env",
            RankSource::Slurm => "slurm",
            RankSource::Single => "single",
        })
    }
}

/// This process's place in the job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RankInfo {
    /// Global rank, `0..world_size`.
    pub rank: usize,
    pub world_size: usize,
    /// Rank on this node; picks the GPU.
    pub local_rank: usize,
    pub source: RankSource,
    /// `MASTER_ADDR:MASTER_PORT` when torchrun set them (kept for a TCP rendezvous; the file
    /// rendezvous does not need them).
    pub master: Option<(String, u16)>,
    /// An id the launcher gives this run (`SLURM_JOB_ID.SLURM_STEP_ID`, or torchrun's
    /// `TORCHELASTIC_RUN_ID` plus its restart count); keeps concurrent or earlier runs that share
    /// a rendezvous directory apart.
    pub run_id: Option<String>,
}

impl RankInfo {
    /// World size 1, rank 0: no launcher, no communicator needed.
    pub fn single() -> Self {
        RankInfo { rank: 0, world_size: 1, local_rank: 0, source: RankSource::Single, master: None, run_id: None }
    }

    /// Reads the process environment (see [`RankInfo::from_lookup`]).
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(&|name| std::env::var(name).ok())
    }

    /// Discovers the rank from variables looked up with `get`.
    ///
    /// Precedence: `RANK`/`WORLD_SIZE` (torchrun's when a `TORCHELASTIC_*` variable is there too,
    /// else [`RankSource::Env`]), then SLURM (`SLURM_PROCID`), else a single process. torchrun
    /// wins because `srun torchrun ...` sets both and torchrun's ranks are the ones its workers
    /// must use. A missing `LOCAL_RANK`/`SLURM_LOCALID` defaults to the
    /// global rank, which is right for the only launch that omits it: several processes started
    /// by hand on one node.
    pub fn from_lookup(get: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
        let get = |name: &str| get(name).filter(|v| !v.trim().is_empty());
        let (rank_var, world_var, local_var, source) = if get("RANK").is_some() || get("WORLD_SIZE").is_some() {
            if get("SLURM_PROCID").is_some() {
                // `srun torchrun ...` sets both, and torchrun's are the ranks its workers use; said
                // once, since a stray RANK/WORLD_SIZE inside an srun step would wait for ranks
                // that never come.
                tracing::info!("ranks from RANK/WORLD_SIZE; SLURM_PROCID/SLURM_NTASKS are set too and not used");
            }
            ("RANK", "WORLD_SIZE", "LOCAL_RANK", rank_env_source(&get))
        } else if get("SLURM_PROCID").is_some() {
            ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", RankSource::Slurm)
        } else {
            // SLURM_NTASKS without SLURM_PROCID is an `salloc` shell (or a batch script's
            // environment before srun): the command runs once there, as one process. srun sets
            // SLURM_PROCID in every task, so only SLURM_PROCID without SLURM_NTASKS is refused.
            return Ok(Self::single());
        };
        let required = |var: &str, other: &str| -> Result<usize> {
            let value = get(var).ok_or_else(|| Error::Env {
                var: var.into(),
                reason: format!("not set, but {other} is; a launcher sets both"),
            })?;
            parse_count(var, &value)
        };
        let rank = required(rank_var, world_var)?;
        let world_size = required(world_var, rank_var)?;
        if world_size == 0 {
            return Err(Error::Env { var: world_var.into(), reason: "must be at least 1, got 0".into() });
        }
        if world_size > MAX_WORLD_SIZE {
            return Err(Error::Env {
                var: world_var.into(),
                reason: format!("{world_size} ranks is more than the {MAX_WORLD_SIZE} supported"),
            });
        }
        if rank >= world_size {
            return Err(Error::Env {
                var: rank_var.into(),
                reason: format!("rank {rank} is not below {world_var}={world_size}"),
            });
        }
        let local_rank = match get(local_var) {
            Some(v) => parse_count(local_var, &v)?,
            None => rank,
        };
        if local_rank >= world_size {
            return Err(Error::Env {
                var: local_var.into(),
                reason: format!("local rank {local_rank} is not below {world_var}={world_size}"),
            });
        }
        let master = match source {
            RankSource::Torchrun | RankSource::Env => master_addr(&get)?,
            _ => None,
        };
        let run_id = match source {
            RankSource::Slurm => get("SLURM_JOB_ID").map(|job| match get("SLURM_STEP_ID") {
                Some(step) => format!("{job}.{step}"),
                None => job,
            }),
            // torchrun's default run id is the literal `none`, which names no run.
            _ => {
                get("TORCHELASTIC_RUN_ID").filter(|id| id != "none").map(|id| match get("TORCHELASTIC_RESTART_COUNT") {
                    Some(n) => format!("{id}.r{n}"),
                    None => id,
                })
            }
        };
        Ok(RankInfo { rank, world_size, local_rank, source, master, run_id })
    }

    pub fn is_single(&self) -> bool {
        self.world_size == 1
    }

    /// Refuses a launcher's several ranks for a command that runs in one process: each rank
    /// would do the whole job and race the others for the same output (fuzzing round 8: one
    /// rank wrote it, the others failed, and the launcher reported the job failed). Variables
    /// it cannot read are left to the commands that use them.
    pub fn require_single(command: &str) -> Result<()> {
        match Self::from_env() {
            Ok(info) if !info.is_single() => Err(Error::Invalid(format!(
                "`{command}` runs in one process, but a launcher started {} ranks ({info}): each would do the whole \
                 job; run it without the launcher (adapt, cache-labels and merge split their work across ranks)",
                info.world_size
            ))),
            _ => Ok(()),
        }
    }

    /// `rank R/N`, the prefix of this rank's messages.
    pub fn label(&self) -> String {
        format!("rank {}/{}", self.rank, self.world_size)
    }

    /// `error` as this rank's ([`Error::OnRank`]), so that it can be told from the others'; a
    /// single process's error as it is (there is no other rank to tell it from).
    pub fn tag(&self, error: Error) -> Error {
        if self.is_single() {
            return error;
        }
        Error::OnRank { rank: self.rank, world_size: self.world_size, error: Box::new(error) }
    }
}

impl fmt::Display for RankInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rank {}/{} (local {}, {})", self.rank, self.world_size, self.local_rank, self.source)
    }
}

/// torchrun's agent always sets `TORCHELASTIC_RUN_ID` (`none` by default) and
/// `TORCHELASTIC_RESTART_COUNT`; `RANK`/`WORLD_SIZE` alone come from someone else.
fn rank_env_source(get: &dyn Fn(&str) -> Option<String>) -> RankSource {
    match get("TORCHELASTIC_RUN_ID").or_else(|| get("TORCHELASTIC_RESTART_COUNT")) {
        Some(_) => RankSource::Torchrun,
        None => RankSource::Env,
    }
}

fn parse_count(var: &str, value: &str) -> Result<usize> {
    value
        .trim()
        .parse::<usize>()
        .map_err(|_| Error::Env { var: var.into(), reason: format!("`{value}` is not a non-negative integer") })
}

fn master_addr(get: &dyn Fn(&str) -> Option<String>) -> Result<Option<(String, u16)>> {
    match (get("MASTER_ADDR"), get("MASTER_PORT")) {
        (None, None) => Ok(None),
        (Some(_), None) => Err(Error::Env {
            var: "MASTER_PORT".into(),
            reason: "not set, but MASTER_ADDR is; a launcher sets both".into(),
        }),
        (None, Some(_)) => Err(Error::Env {
            var: "MASTER_ADDR".into(),
            reason: "not set, but MASTER_PORT is; a launcher sets both".into(),
        }),
        (Some(addr), Some(port)) => {
            let port = port.trim().parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(|| Error::Env {
                var: "MASTER_PORT".into(),
                reason: format!("`{port}` is not a port number (1-65535)"),
            })?;
            Ok(Some((addr, port)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let owned: Vec<(String, String)> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |name| owned.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    /// Every name `from_lookup` asks for, under torchrun's and SLURM's full sets of variables,
    /// is in [`LAUNCHER_VARS`] (which launchers and tests clear for their children).
    #[test]
    fn launcher_vars_name_every_variable_read() {
        let full = [
            vec![("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")],
            vec![("TORCHELASTIC_RUN_ID", "r"), ("TORCHELASTIC_RESTART_COUNT", "0")],
            vec![("MASTER_ADDR", "h"), ("MASTER_PORT", "29500")],
            vec![("SLURM_PROCID", "1"), ("SLURM_NTASKS", "2"), ("SLURM_LOCALID", "1")],
            vec![("SLURM_JOB_ID", "7"), ("SLURM_STEP_ID", "0")],
        ];
        let torchrun_only = ["RANK", "WORLD_SIZE", "LOCAL_RANK"];
        for torchrun in [true, false] {
            let pairs: Vec<(&str, &str)> =
                full.iter().flatten().copied().filter(|(k, _)| torchrun || !torchrun_only.contains(k)).collect();
            let lookup = env(&pairs);
            let asked = std::cell::RefCell::new(Vec::new());
            let get = |name: &str| {
                asked.borrow_mut().push(name.to_string());
                lookup(name)
            };
            let info = RankInfo::from_lookup(&get).unwrap();
            assert_eq!(info.source, if torchrun { RankSource::Torchrun } else { RankSource::Slurm });
            for name in asked.into_inner() {
                assert!(LAUNCHER_VARS.contains(&name.as_str()), "`{name}` is read but not in LAUNCHER_VARS");
            }
        }
    }

    /// Fuzzing round 3: `2^64-1` panicked on an allocation, `1e9` ignored the timeout.
    #[test]
    fn world_size_is_capped() {
        for (world, ok) in [("65536", true), ("65537", false), ("18446744073709551615", false)] {
            let got = RankInfo::from_lookup(&env(&[("RANK", "0"), ("WORLD_SIZE", world)]));
            match (got, ok) {
                (Ok(info), true) => assert_eq!(info.world_size, MAX_WORLD_SIZE),
                (Err(Error::Env { var, reason }), false) => {
                    assert_eq!(var, "WORLD_SIZE");
                    assert!(reason.contains("more than the 65536 supported"), "{reason}");
                }
                (other, _) => panic!("WORLD_SIZE={world}: {other:?}"),
            }
        }
        let slurm = RankInfo::from_lookup(&env(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "100000")]));
        assert!(matches!(slurm, Err(Error::Env { var, .. }) if var == "SLURM_NTASKS"));
    }

    /// Fuzzing round 3: `RANK`/`WORLD_SIZE` set by hand were reported as torchrun's.
    #[test]
    fn only_torchrun_is_called_torchrun() {
        let by_hand = [("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")];
        assert_eq!(RankInfo::from_lookup(&env(&by_hand[..2])).unwrap().source, RankSource::Env);
        assert_eq!(RankInfo::from_lookup(&env(&by_hand)).unwrap().source, RankSource::Env);
        for var in ["TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"] {
            let torchrun = [by_hand.as_slice(), &[(var, "none")]].concat();
            assert_eq!(RankInfo::from_lookup(&env(&torchrun)).unwrap().source, RankSource::Torchrun, "{var}");
        }
        let info = RankInfo::from_lookup(&env(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")]));
        assert!(matches!(info, Err(Error::Env { var, .. }) if var == "MASTER_PORT"), "MASTER_* still read");
        assert_eq!(serde_json::to_value(RankSource::Env).unwrap(), "env");
    }

    /// Fuzzing round 8 #8: the two half-set SLURM cases differ on purpose. SLURM_NTASKS alone is
    /// an `salloc` shell, where the command runs once (one process); SLURM_PROCID alone is set by
    /// no launcher and is refused. Under `srun torchrun`, torchrun's ranks win.
    #[test]
    fn half_set_slurm_variables() {
        assert_eq!(RankInfo::from_lookup(&env(&[("SLURM_NTASKS", "4")])).unwrap(), RankInfo::single());
        let e = RankInfo::from_lookup(&env(&[("SLURM_PROCID", "1")]));
        assert!(matches!(e, Err(Error::Env { var, .. }) if var == "SLURM_NTASKS"));
        let both = [("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2"), ("RANK", "3"), ("WORLD_SIZE", "8")];
        let info = RankInfo::from_lookup(&env(&both)).unwrap();
        assert_eq!((info.rank, info.world_size), (3, 8));
    }

    #[test]
    fn empty_values_count_as_unset() {
        let info = RankInfo::from_lookup(&env(&[("RANK", " "), ("SLURM_PROCID", "")])).unwrap();
        assert_eq!(info, RankInfo::single());
    }

    #[test]
    fn slurm_step_id_joins_the_job_id() {
        let info = RankInfo::from_lookup(&env(&[
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_JOB_ID", "77"),
            ("SLURM_STEP_ID", "3"),
        ]))
        .unwrap();
        assert_eq!(info.run_id.as_deref(), Some("77.3"));
    }

    #[test]
    fn torchrun_default_run_id_is_ignored() {
        let base = [("RANK", "0"), ("WORLD_SIZE", "2"), ("TORCHELASTIC_RUN_ID", "none")];
        assert_eq!(RankInfo::from_lookup(&env(&base)).unwrap().run_id, None);
        let named =
            [("RANK", "0"), ("WORLD_SIZE", "2"), ("TORCHELASTIC_RUN_ID", "abc"), ("TORCHELASTIC_RESTART_COUNT", "1")];
        assert_eq!(RankInfo::from_lookup(&env(&named)).unwrap().run_id.as_deref(), Some("abc.r1"));
    }
}
