//! File rendezvous in a directory every rank can see (a shared filesystem across nodes, or any
//! directory on one node).
//!
//! Why files: every cluster has a shared filesystem, and it needs no open port, no address
//! agreement and no extra service. The protocol, inside `DIR/run-<job key>/`:
//! 1. Rank 0 removes what an earlier run left there, picks a random generation nonce and writes
//!    `payload` (nonce, world size, the bytes to share: the NCCL unique id) atomically
//!    (temp file + rename, so nobody reads half a file).
//! 2. Every rank reads `payload` and writes `<nonce>.arrived.<rank>`. A rank that read a stale
//!    `payload` from an earlier run re-arrives under the new nonce once rank 0 replaces it.
//! 3. When all `world_size` arrival files exist, rank 0 removes `payload` and writes
//!    `<nonce>.go`; the others return when they see it. Removing `payload` before `go` means a
//!    stale `payload` can only belong to a run that never completed, so a late rank cannot join
//!    a dead run and proceed alone.
//!
//! Every wait has a deadline; on timeout the error names the directory and the ranks that never
//! arrived, and rank 0 writes `<nonce>.abort` so the ranks already waiting fail at once.
//! Files are polled by exact name, not by listing the directory, because NFS caches directory
//! listings for up to a minute while a lookup by name is revalidated much sooner.
//!
//! [`Rendezvous::all_gather_bytes`] (and [`Rendezvous::barrier`] on top of it) reuse the same
//! mechanism after the rendezvous: each rank writes `<nonce>.op<seq>.<rank>` and reads everyone's.

use std::collections::hash_map::RandomState;
use std::fs;
use std::hash::{BuildHasher, Hasher};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::dist::rank::{MAX_WORLD_SIZE, RankInfo, RankSource};
use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"SYMRDZV1";
const NONCE_LEN: usize = 16;
/// How long a rank that timed out spends looking for the others' arrival files to name them in
/// its error: a bound, because with thousands of ranks that is thousands of lookups.
const REPORT_SWEEP: Duration = Duration::from_secs(1);

/// Where and how long to wait.
#[derive(Clone, Debug)]
pub struct RendezvousOptions {
    /// The shared directory (created if missing).
    pub dir: PathBuf,
    /// How long a rank waits for the others before failing.
    pub timeout: Duration,
    /// Sleep between looks at the directory.
    pub poll: Duration,
    /// Keeps runs sharing `dir` apart; default: the launcher's run id, else `default`.
    pub job_id: Option<String>,
}

impl RendezvousOptions {
    pub fn new(dir: impl Into<PathBuf>, timeout: Duration) -> Self {
        RendezvousOptions { dir: dir.into(), timeout, poll: Duration::from_millis(20), job_id: None }
    }
}

/// A completed rendezvous: the shared payload, and the directory the ranks keep using for
/// file-based collectives.
#[derive(Debug)]
pub struct Rendezvous {
    run_dir: PathBuf,
    nonce: String,
    rank: usize,
    world_size: usize,
    payload: Vec<u8>,
    poll: Duration,
    seq: u64,
}

/// Meets the other ranks in `opts.dir`. Rank 0 shares `payload`; the other ranks' `payload`
/// argument is ignored and they receive rank 0's.
pub fn rendezvous(info: &RankInfo, opts: &RendezvousOptions, payload: &[u8]) -> Result<Rendezvous> {
    // `RankInfo`'s fields are public: check here too what `from_lookup` checks, before anything
    // is allocated per rank.
    if info.world_size == 0 || info.world_size > MAX_WORLD_SIZE || info.rank >= info.world_size {
        return Err(Error::Invalid(format!(
            "{info}: a rendezvous needs a world of 1 to {MAX_WORLD_SIZE} ranks and a rank below it"
        )));
    }
    let key = opts.job_id.clone().or_else(|| info.run_id.clone()).unwrap_or_else(|| "default".into());
    let run_dir = opts.dir.join(format!("run-{}", sanitize(&key)));
    fs::create_dir_all(&run_dir).map_err(|e| Error::io(&run_dir, e))?;
    tracing::debug!("{info}: rendezvous in {}", run_dir.display());
    let deadline = Instant::now() + opts.timeout;
    let waiter = Waiter { run_dir: &run_dir, info, start: Instant::now(), deadline, poll: opts.poll };
    let (nonce, payload) = if info.rank == 0 { waiter.lead(payload)? } else { waiter.follow()? };
    tracing::info!("{info}: rendezvous complete in {}", run_dir.display());
    Ok(Rendezvous { run_dir, nonce, rank: info.rank, world_size: info.world_size, payload, poll: opts.poll, seq: 0 })
}

struct Waiter<'a> {
    run_dir: &'a Path,
    info: &'a RankInfo,
    start: Instant,
    deadline: Instant,
    poll: Duration,
}

impl Waiter<'_> {
    fn lead(&self, payload: &[u8]) -> Result<(String, Vec<u8>)> {
        clear_old_files(self.run_dir)?;
        let nonce = new_nonce();
        let world = self.info.world_size;
        let mut bytes = Vec::with_capacity(32 + payload.len());
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(nonce.as_bytes());
        bytes.extend_from_slice(&(world as u64).to_le_bytes());
        bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        bytes.extend_from_slice(payload);
        let payload_path = self.run_dir.join("payload");
        write_atomic(&payload_path, &bytes)?;
        write_atomic(&self.run_dir.join(arrived_name(&nonce, 0)), arrival_note().as_bytes())?;
        let mut arrived = vec![false; world];
        arrived[0] = true;
        loop {
            sweep(self.run_dir, &nonce, &mut arrived, self.deadline);
            if arrived.iter().all(|&a| a) {
                remove_if_present(&payload_path)?;
                write_atomic(&self.run_dir.join(format!("{nonce}.go")), b"")?;
                for r in 0..world {
                    remove_if_present(&self.run_dir.join(arrived_name(&nonce, r)))?;
                }
                return Ok((nonce, payload.to_vec()));
            }
            if Instant::now() >= self.deadline {
                let (missing, present) = split(&arrived);
                let err = self.timeout_error(missing, present, String::new());
                // Late ranks must not join a run rank 0 has given up on.
                let _ = remove_if_present(&payload_path);
                let _ = write_atomic(&self.run_dir.join(format!("{nonce}.abort")), err.to_string().as_bytes());
                return Err(err);
            }
            std::thread::sleep(self.poll);
        }
    }

    fn follow(&self) -> Result<(String, Vec<u8>)> {
        let rank = self.info.rank;
        let world = self.info.world_size;
        let payload_path = self.run_dir.join("payload");
        let mut joined: Option<(String, Vec<u8>)> = None;
        let mut mismatch = String::new();
        loop {
            match read_payload(&payload_path)? {
                Some(p) if p.world_size != world => {
                    mismatch = format!(
                        "; {} says world size {}, this rank has {world} (stale file, or ranks launched with different sizes?)",
                        payload_path.display(),
                        p.world_size
                    );
                }
                Some(p) if joined.as_ref().is_none_or(|(n, _)| *n != p.nonce) => {
                    write_atomic(&self.run_dir.join(arrived_name(&p.nonce, rank)), arrival_note().as_bytes())?;
                    tracing::debug!("rank {rank}: joined rendezvous generation {}", p.nonce);
                    joined = Some((p.nonce, p.payload));
                }
                _ => {}
            }
            if let Some((nonce, shared)) = &joined {
                if self.run_dir.join(format!("{nonce}.go")).exists() {
                    return Ok((nonce.clone(), shared.clone()));
                }
                let abort = self.run_dir.join(format!("{nonce}.abort"));
                if let Ok(reason) = fs::read_to_string(&abort) {
                    return Err(Error::Rendezvous {
                        dir: self.run_dir.to_path_buf(),
                        reason: format!("rank 0 gave up: {reason}"),
                    });
                }
            }
            if Instant::now() >= self.deadline {
                return Err(match &joined {
                    Some((nonce, _)) => {
                        let mut arrived = vec![false; world];
                        sweep(self.run_dir, nonce, &mut arrived, Instant::now() + REPORT_SWEEP);
                        let (missing, arrived) = split(&arrived);
                        self.timeout_error(missing, arrived, mismatch)
                    }
                    // Without rank 0's nonce there is no generation to look for others in; all
                    // this rank knows is that rank 0 is missing and that it is here itself.
                    None => {
                        let hint = if mismatch.is_empty() {
                            "; rank 0 never wrote the rendezvous payload (other ranks not checked)".to_string()
                        } else {
                            mismatch
                        };
                        self.timeout_error(vec![0], vec![rank], hint)
                    }
                });
            }
            std::thread::sleep(self.poll);
        }
    }

    fn timeout_error(&self, missing: Vec<usize>, arrived: Vec<usize>, mut hint: String) -> Error {
        hint.push_str(match self.info.source {
            RankSource::Slurm => {
                "; were all tasks started with srun (in the batch script itself SLURM_PROCID is 0 of SLURM_NTASKS)?"
            }
            _ => "; were all ranks started, with the same --rendezvous directory (on a filesystem all nodes share) and job id?",
        });
        Error::RendezvousTimeout {
            dir: self.run_dir.to_path_buf(),
            waited_s: self.start.elapsed().as_secs_f64(),
            world_size: self.info.world_size,
            missing,
            arrived,
            hint,
        }
    }
}

/// Marks the ranks whose arrival file for `nonce` exists, stopping at `stop` (the ranks not
/// looked at stay unmarked): one sweep is a lookup per rank, and the deadline must hold whatever
/// the world size.
fn sweep(run_dir: &Path, nonce: &str, seen: &mut [bool], stop: Instant) {
    for (r, s) in seen.iter_mut().enumerate() {
        if Instant::now() >= stop {
            return;
        }
        if !*s {
            *s = run_dir.join(arrived_name(nonce, r)).exists();
        }
    }
}

/// (absent ranks, present ranks) from a presence flag per rank.
fn split(present: &[bool]) -> (Vec<usize>, Vec<usize>) {
    (0..present.len()).partition(|&r| !present[r])
}

impl Rendezvous {
    /// What rank 0 shared.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// The run's directory inside the rendezvous directory.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// Every rank contributes `data` and receives all contributions, indexed by rank. Ranks must
    /// call collectives in the same order; `op` only labels errors.
    pub fn all_gather_bytes(&mut self, data: &[u8], op: &str, timeout: Duration) -> Result<Vec<Vec<u8>>> {
        let seq = self.seq;
        self.seq += 1;
        let start = Instant::now();
        write_atomic(&self.run_dir.join(self.op_name(seq, self.rank)), data)?;
        let mut got: Vec<Option<Vec<u8>>> = vec![None; self.world_size];
        loop {
            for (r, slot) in got.iter_mut().enumerate() {
                if slot.is_none() {
                    *slot = read_if_present(&self.run_dir.join(self.op_name(seq, r)))?;
                }
            }
            if got.iter().all(Option::is_some) {
                break;
            }
            self.check_abort()?;
            if start.elapsed() >= timeout {
                let err = Error::CollectiveTimeout {
                    backend: "file".into(),
                    op: op.into(),
                    seq,
                    rank: self.rank,
                    waited_s: start.elapsed().as_secs_f64(),
                    missing: (0..self.world_size).filter(|&r| got[r].is_none()).collect(),
                };
                self.abort(&err.to_string());
                return Err(err);
            }
            std::thread::sleep(self.poll);
        }
        // Everyone wrote op `seq` only after reading all of op `seq - 1`, so nobody needs our
        // previous file any more.
        if seq > 0 {
            remove_if_present(&self.run_dir.join(self.op_name(seq - 1, self.rank)))?;
        }
        Ok(got.into_iter().flatten().collect())
    }

    /// Returns once every rank has reached the same barrier.
    pub fn barrier(&mut self, timeout: Duration) -> Result<()> {
        self.all_gather_bytes(&[], "barrier", timeout).map(|_| ())
    }

    /// Tells the other ranks this run failed, so their waits end now instead of at the timeout.
    pub fn abort(&self, reason: &str) {
        let note = format!("rank {}: {reason}", self.rank);
        let path = self.run_dir.join(format!("{}.abort", self.nonce));
        if !path.exists()
            && let Err(e) = write_atomic(&path, note.as_bytes())
        {
            tracing::warn!("could not signal the abort to the other ranks: {e}");
        }
    }

    fn check_abort(&self) -> Result<()> {
        match fs::read_to_string(self.run_dir.join(format!("{}.abort", self.nonce))) {
            Ok(reason) => Err(Error::Collective { backend: "file".into(), reason: format!("aborted by {reason}") }),
            Err(_) => Ok(()),
        }
    }

    fn op_name(&self, seq: u64, rank: usize) -> String {
        format!("{}.op{seq}.{rank}", self.nonce)
    }
}

struct Payload {
    nonce: String,
    world_size: usize,
    payload: Vec<u8>,
}

/// `Ok(None)` when the file is absent or not a payload (a half-updated directory is normal
/// while rank 0 starts).
fn read_payload(path: &Path) -> Result<Option<Payload>> {
    let Some(bytes) = read_if_present(path)? else { return Ok(None) };
    let head = 8 + NONCE_LEN + 16;
    if bytes.len() < head || &bytes[..8] != MAGIC {
        return Ok(None);
    }
    let Ok(nonce) = std::str::from_utf8(&bytes[8..8 + NONCE_LEN]) else { return Ok(None) };
    let word = |at: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&bytes[at..at + 8]);
        u64::from_le_bytes(w) as usize
    };
    let world_size = word(8 + NONCE_LEN);
    let len = word(8 + NONCE_LEN + 8);
    if bytes.len() - head != len {
        return Ok(None);
    }
    Ok(Some(Payload { nonce: nonce.to_string(), world_size, payload: bytes[head..].to_vec() }))
}

/// `Ok(None)` when absent; NFS's "stale file handle" (a file replaced while we opened it) also
/// just means "look again".
fn read_if_present(path: &Path) -> Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESTALE) => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(Error::io(path, e)),
        _ => Ok(()),
    }
}

/// Writes `path` so that readers see either nothing or the whole content.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp =
        path.with_file_name(format!(".tmp.{name}.{}.{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed)));
    fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// Rank 0 removes files an earlier run left (never temp files: another rank may be mid-write).
/// Directories are not ours: every name the protocol uses is a file, so one is left alone with
/// a warning (failing here would leave the other ranks waiting for their timeout), unless it
/// takes the name `payload`, which rank 0 must write.
fn clear_old_files(run_dir: &Path) -> Result<()> {
    let entries = fs::read_dir(run_dir).map_err(|e| Error::io(run_dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(run_dir, e))?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with(".tmp.") {
            continue;
        }
        let path = entry.path();
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            if name == "payload" {
                return Err(Error::Rendezvous {
                    dir: run_dir.to_path_buf(),
                    reason: format!(
                        "{} is a directory; rank 0 writes its payload file there: remove it",
                        path.display()
                    ),
                });
            }
            tracing::warn!(
                "{}: a directory in the rendezvous directory, not written by symerge; left alone",
                path.display()
            );
            continue;
        }
        remove_if_present(&path)?;
    }
    Ok(())
}

fn arrived_name(nonce: &str, rank: usize) -> String {
    format!("{nonce}.arrived.{rank}")
}

/// Host and pid, so a person reading the directory can tell who arrived.
fn arrival_note() -> String {
    let host = fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{} {}\n", host.trim(), std::process::id())
}

/// 16 hex digits; `RandomState` is seeded from the OS, and time and pid make collisions between
/// processes started together even less likely.
fn new_nonce() -> String {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

/// A job id as a file name component.
fn sanitize(key: &str) -> String {
    key.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') { c } else { '_' }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(rank: usize, world_size: usize) -> RankInfo {
        RankInfo { rank, world_size, ..RankInfo::single() }
    }

    fn opts(dir: &Path, timeout_ms: u64) -> RendezvousOptions {
        RendezvousOptions {
            poll: Duration::from_millis(2),
            ..RendezvousOptions::new(dir, Duration::from_millis(timeout_ms))
        }
    }

    #[test]
    fn threads_meet_share_the_payload_and_gather() {
        let tmp = tempfile::tempdir().unwrap();
        let world = 4;
        let handles: Vec<_> = (0..world)
            .map(|r| {
                let o = opts(tmp.path(), 5000);
                std::thread::spawn(move || {
                    let mut rv = rendezvous(&info(r, world), &o, &[7, 8, 9]).unwrap();
                    assert_eq!(rv.payload(), &[7, 8, 9]);
                    let mut all = Vec::new();
                    for round in 0..3u8 {
                        all.push(rv.all_gather_bytes(&[r as u8, round], "test", Duration::from_secs(5)).unwrap());
                    }
                    rv.barrier(Duration::from_secs(5)).unwrap();
                    all
                })
            })
            .collect();
        for h in handles {
            let all = h.join().unwrap();
            for (round, gathered) in all.iter().enumerate() {
                let expected: Vec<Vec<u8>> = (0..world as u8).map(|r| vec![r, round as u8]).collect();
                assert_eq!(gathered, &expected);
            }
        }
    }

    #[test]
    fn a_stale_payload_is_replaced_and_not_joined_for_good() {
        let tmp = tempfile::tempdir().unwrap();
        let run_dir = tmp.path().join("run-default");
        fs::create_dir_all(&run_dir).unwrap();
        // An earlier run that never completed left its payload behind.
        let mut stale = Vec::new();
        stale.extend_from_slice(MAGIC);
        stale.extend_from_slice(b"0123456789abcdef");
        stale.extend_from_slice(&2u64.to_le_bytes());
        stale.extend_from_slice(&1u64.to_le_bytes());
        stale.push(42);
        fs::write(run_dir.join("payload"), &stale).unwrap();
        let o = opts(tmp.path(), 5000);
        let follower = std::thread::spawn(move || rendezvous(&info(1, 2), &o, &[]).unwrap().payload().to_vec());
        std::thread::sleep(Duration::from_millis(50));
        let lead = rendezvous(&info(0, 2), &opts(tmp.path(), 5000), &[1]).unwrap();
        assert_eq!(lead.payload(), &[1]);
        assert_eq!(follower.join().unwrap(), vec![1]);
    }

    /// Fuzzing round 3: rank 0 failed with a bare "Is a directory" and rank 1 waited for its
    /// timeout.
    #[test]
    fn a_directory_left_in_the_run_dir_is_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let junk = tmp.path().join("run-default").join("subdir");
        fs::create_dir_all(&junk).unwrap();
        fs::write(junk.join("x"), b"x").unwrap();
        let o = opts(tmp.path(), 5000);
        let follower = std::thread::spawn(move || rendezvous(&info(1, 2), &o, &[]).map(|r| r.payload().to_vec()));
        let lead = rendezvous(&info(0, 2), &opts(tmp.path(), 5000), &[3]).unwrap();
        assert_eq!(lead.payload(), &[3]);
        assert_eq!(follower.join().unwrap().unwrap(), vec![3]);
        assert!(junk.join("x").exists(), "the directory is not ours to remove");

        fs::create_dir(tmp.path().join("run-default").join("payload")).unwrap();
        let msg = rendezvous(&info(0, 2), &opts(tmp.path(), 200), &[]).unwrap_err().to_string();
        assert!(msg.contains("payload is a directory"), "{msg}");
    }

    #[test]
    fn a_sweep_stops_at_its_deadline() {
        let tmp = tempfile::tempdir().unwrap();
        for r in 0..3 {
            fs::write(tmp.path().join(arrived_name("n", r)), b"").unwrap();
        }
        let mut seen = [false; 3];
        sweep(tmp.path(), "n", &mut seen, Instant::now());
        assert_eq!(seen, [false; 3], "no lookup after the deadline");
        sweep(tmp.path(), "n", &mut seen, Instant::now() + Duration::from_secs(60));
        assert_eq!(seen, [true; 3]);
    }

    /// Fuzzing round 3: a huge world panicked (2^64-1) or overran its timeout (1e9), and the
    /// error listed every missing rank.
    #[test]
    fn the_largest_world_times_out_on_time_with_a_short_message() {
        let tmp = tempfile::tempdir().unwrap();
        let start = Instant::now();
        let msg = rendezvous(&info(0, MAX_WORLD_SIZE), &opts(tmp.path(), 300), &[]).unwrap_err().to_string();
        assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
        assert!(msg.contains("rank(s) 1-65535 (65535 ranks) of 65536 never arrived"), "{msg}");
        assert!(msg.len() < 600, "{} bytes", msg.len());
        let huge = RankInfo { world_size: usize::MAX, ..info(0, 1) };
        let msg = rendezvous(&huge, &opts(tmp.path(), 300), &[]).unwrap_err().to_string();
        assert!(msg.contains("a world of 1 to 65536 ranks"), "{msg}");
    }

    #[test]
    fn a_lone_rank_names_the_missing_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let err = rendezvous(&info(0, 3), &opts(tmp.path(), 100), &[]).unwrap_err();
        match &err {
            Error::RendezvousTimeout { missing, arrived, .. } => {
                assert_eq!(missing, &[1, 2]);
                assert_eq!(arrived, &[0]);
            }
            other => panic!("unexpected error {other}"),
        }
        let msg = err.to_string();
        assert!(msg.contains("rank(s) 1, 2 of 3 never arrived"), "{msg}");
        assert!(msg.contains(&tmp.path().display().to_string()), "{msg}");
    }
}
