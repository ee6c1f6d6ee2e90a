//! File rendezvous in a directory every rank can see (a shared filesystem across nodes, or any
//! directory on one node).
//!
//! Why files: every cluster has a shared filesystem, and it needs no open port, no address
//! agreement and no extra service. The protocol, inside `DIR/run-<job key>/`:
//! 1. Rank 0 removes what an earlier run left there (but not the files of a generation that may
//!    still be finishing its last collective), picks a random generation nonce and writes
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
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::dist::rank::{MAX_WORLD_SIZE, RankInfo, RankSource};
use crate::dist::{deadline_after, passed};
use crate::error::{Error, Result};

/// Version 2 added the run's fingerprint; a version-1 payload is not read (as if absent).
const MAGIC: &[u8; 8] = b"SYMRDZV2";
const PAYLOAD: &str = "payload";
/// Rank 0's heartbeat file ([`Heartbeat`]).
const ALIVE: &str = "alive";
/// Heartbeats a watcher waits to see `alive` change before it takes a run for dead.
const STALE_BEATS: u32 = 3;
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
    /// What this run is ([`crate::dist::run_fingerprint`]): every rank of one job passes the
    /// same, so that a rank of another job that shares the directory and job id is refused at
    /// once instead of joining this one.
    pub fingerprint: String,
    /// How often rank 0 rewrites `alive`; a run whose `alive` stays the same for
    /// [`STALE_BEATS`] of these is taken for one that crashed.
    pub heartbeat: Duration,
}

impl RendezvousOptions {
    pub fn new(dir: impl Into<PathBuf>, timeout: Duration) -> Self {
        RendezvousOptions {
            dir: dir.into(),
            timeout,
            poll: Duration::from_millis(20),
            job_id: None,
            fingerprint: String::new(),
            heartbeat: Duration::from_secs(1),
        }
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
    /// Rank 0's: shows the directory is in use for as long as this run lives.
    _heartbeat: Option<Heartbeat>,
}

/// The rendezvous directory is a directory, or a path that can become one: a dangling link or a
/// file there made `create_dir_all` say only "File exists" (fuzzing round 5).
fn check_rendezvous_dir(dir: &Path) -> Result<()> {
    let Ok(meta) = fs::symlink_metadata(dir) else { return Ok(()) };
    let why = match fs::metadata(dir) {
        Ok(m) if m.is_dir() => return Ok(()),
        Ok(_) => "is not a directory".to_string(),
        Err(_) if meta.file_type().is_symlink() => match fs::read_link(dir) {
            Ok(to) => format!("is a symbolic link to {}, which does not exist", to.display()),
            Err(_) => "is a symbolic link that leads nowhere".to_string(),
        },
        Err(e) => e.to_string(),
    };
    Err(Error::Invalid(format!("rendezvous directory {}: {why}", dir.display())))
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
    check_rendezvous_dir(&opts.dir)?;
    fs::create_dir_all(&run_dir).map_err(|e| Error::io(&run_dir, e))?;
    tracing::debug!("{info}: rendezvous in {}", run_dir.display());
    let deadline = deadline_after(opts.timeout);
    let waiter = Waiter { run_dir: &run_dir, info, opts, token: new_nonce(), start: Instant::now(), deadline };
    let (nonce, payload, heartbeat) = match info.rank {
        0 => waiter.lead(payload)?,
        _ => waiter.follow().map(|(nonce, payload)| (nonce, payload, None))?,
    };
    tracing::info!("{info}: rendezvous complete in {}", run_dir.display());
    Ok(Rendezvous {
        run_dir,
        nonce,
        rank: info.rank,
        world_size: info.world_size,
        payload,
        poll: opts.poll,
        seq: 0,
        _heartbeat: heartbeat,
    })
}

struct Waiter<'a> {
    run_dir: &'a Path,
    info: &'a RankInfo,
    opts: &'a RendezvousOptions,
    /// This call's own mark in the arrival file it claims, to tell its claim from another's.
    token: String,
    start: Instant,
    /// `None`: a timeout too long for an `Instant` waits without limit.
    deadline: Option<Instant>,
}

/// A payload this rank cannot join (another job's, or its rank already claimed), until it is
/// known whether its run is live (refuse now) or a crashed run's leftover (wait for our rank 0).
struct Suspect {
    nonce: String,
    reason: String,
    since: Instant,
    /// `alive` when the payload was first seen: a change under the same nonce means a live run.
    alive: Option<Vec<u8>>,
}

/// A follower's view while it waits.
#[derive(Default)]
struct Following {
    joined: Option<(String, Vec<u8>)>,
    suspect: Option<Suspect>,
    /// Generations found dead: their payloads are ignored.
    dead: Vec<String>,
    /// Why a payload was ignored, for the timeout error.
    hint: String,
}

impl Waiter<'_> {
    fn lead(&self, payload: &[u8]) -> Result<(String, Vec<u8>, Option<Heartbeat>)> {
        self.refuse_a_live_run()?;
        clear_old_files(self.run_dir)?;
        let nonce = new_nonce();
        let heartbeat = Heartbeat::start(self.run_dir, &nonce, self.opts.heartbeat)?;
        let bytes = encode_payload(&nonce, self.info.world_size, &self.opts.fingerprint, payload);
        write_atomic(&self.run_dir.join(PAYLOAD), &bytes)?;
        if let Some(who) = self.claim(&nonce)? {
            return Err(self.conflict(format!("rank 0's arrival under a new nonce is already held ({who})")));
        }
        self.wait_for_all(&nonce)?;
        Ok((nonce, payload.to_vec(), Some(heartbeat)))
    }

    /// Rank 0 waits for every arrival file of `nonce`, then tells the others to go.
    fn wait_for_all(&self, nonce: &str) -> Result<()> {
        let world = self.info.world_size;
        let payload_path = self.run_dir.join(PAYLOAD);
        let mut arrived = vec![false; world];
        arrived[0] = true;
        loop {
            sweep(self.run_dir, nonce, &mut arrived, self.deadline);
            if arrived.iter().all(|&a| a) {
                remove_if_present(&payload_path)?;
                write_atomic(&self.run_dir.join(format!("{nonce}.go")), b"")?;
                for r in 0..world {
                    remove_if_present(&self.run_dir.join(arrived_name(nonce, r)))?;
                }
                return Ok(());
            }
            self.check_still_lead(nonce)?;
            if passed(self.deadline) {
                let (missing, present) = split(&arrived);
                let err = self.timeout_error(missing, present, String::new());
                // Late ranks must not join a run rank 0 has given up on.
                let _ = remove_if_present(&payload_path);
                let _ = write_atomic(&self.run_dir.join(format!("{nonce}.abort")), err.to_string().as_bytes());
                return Err(err);
            }
            std::thread::sleep(self.opts.poll);
        }
    }

    /// A second rank 0 (another job with the same directory and job id) must not clear a live
    /// run's files. If `alive` changes while it is watched for [`STALE_BEATS`] heartbeats, its
    /// run is live; if it stays the same, a crashed run left it and it is cleared with the rest.
    fn refuse_a_live_run(&self) -> Result<()> {
        let alive = self.run_dir.join(ALIVE);
        let Some(first) = read_if_present(&alive)? else { return Ok(()) };
        let until = Instant::now() + self.stale_after();
        while Instant::now() < until {
            std::thread::sleep(self.opts.poll);
            match read_if_present(&alive)? {
                None => return Ok(()),
                Some(now) if now != first => {
                    return Err(self.conflict(format!("another run is live there ({})", describe_alive(&now))));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Two rank 0s that started together both found no live run; the one whose payload the
    /// other replaced steps back.
    fn check_still_lead(&self, nonce: &str) -> Result<()> {
        match read_payload(&self.run_dir.join(PAYLOAD))? {
            Some(p) if p.nonce == nonce => Ok(()),
            _ => Err(self.conflict("another rank 0 replaced this run's payload".into())),
        }
    }

    fn follow(&self) -> Result<(String, Vec<u8>)> {
        let mut st = Following::default();
        loop {
            if let Some(p) = read_payload(&self.run_dir.join(PAYLOAD))? {
                self.consider(p, &mut st)?;
            }
            self.judge(&mut st)?;
            if let Some((nonce, shared)) = &st.joined {
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
            if passed(self.deadline) {
                return Err(self.follower_timeout(st));
            }
            std::thread::sleep(self.opts.poll);
        }
    }

    /// A payload not seen before is joined (this rank's arrival claimed), or suspected.
    fn consider(&self, p: Payload, st: &mut Following) -> Result<()> {
        let seen = st.dead.contains(&p.nonce)
            || st.joined.as_ref().is_some_and(|(n, _)| *n == p.nonce)
            || st.suspect.as_ref().is_some_and(|s| s.nonce == p.nonce);
        if seen {
            return Ok(());
        }
        let refusal = match self.mismatch(&p) {
            Some(why) => Some(why),
            None => {
                self.claim(&p.nonce)?.map(|who| format!("another run already holds rank {} ({who})", self.info.rank))
            }
        };
        match refusal {
            None => {
                tracing::debug!("rank {}: joined rendezvous generation {}", self.info.rank, p.nonce);
                st.joined = Some((p.nonce, p.payload));
                st.suspect = None;
            }
            Some(reason) => {
                let alive = read_if_present(&self.run_dir.join(ALIVE))?;
                st.suspect = Some(Suspect { nonce: p.nonce, reason, since: Instant::now(), alive });
            }
        }
        Ok(())
    }

    /// Why this rank cannot belong to the run that wrote `p`, if it cannot.
    fn mismatch(&self, p: &Payload) -> Option<String> {
        let world = self.info.world_size;
        if p.world_size != world {
            return Some(format!("its rank 0 has world size {}, this rank {world}", p.world_size));
        }
        if p.fingerprint != self.opts.fingerprint {
            return Some(format!(
                "its rank 0 runs `{}`, this rank `{}`: another job",
                p.fingerprint, self.opts.fingerprint
            ));
        }
        None
    }

    /// A suspect payload's run is live when its rank 0's `alive` changes or it went ahead
    /// without this rank: refuse at once. When nothing moves for [`STALE_BEATS`] heartbeats, a
    /// crashed run left it: ignore it and wait for this job's rank 0 to replace it.
    fn judge(&self, st: &mut Following) -> Result<()> {
        let Some(s) = &st.suspect else { return Ok(()) };
        let went_ahead = self.run_dir.join(format!("{}.go", s.nonce)).exists();
        let beat = read_if_present(&self.run_dir.join(ALIVE))?;
        let beating = beat.as_ref().is_some_and(|b| Some(b) != s.alive.as_ref() && alive_nonce(b) == s.nonce);
        if went_ahead || beating {
            return Err(self.conflict(s.reason.clone()));
        }
        if s.since.elapsed() >= self.stale_after() {
            st.hint = format!("; ignored {} left by a run that is not live ({})", PAYLOAD, s.reason);
            st.dead.push(s.nonce.clone());
            st.suspect = None;
        }
        Ok(())
    }

    /// Claims this rank's arrival in generation `nonce`, exclusively: `None` when claimed, else
    /// who holds it.
    fn claim(&self, nonce: &str) -> Result<Option<String>> {
        let path = self.run_dir.join(arrived_name(nonce, self.info.rank));
        let note = format!("{} {}", self.token, host_and_pid());
        if create_exclusive(&path, note.as_bytes())? {
            return Ok(None);
        }
        let held = read_if_present(&path)?.map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
        Ok(match held.trim().split_once(' ') {
            Some((token, _)) if token == self.token => None,
            Some((_, who)) => Some(who.to_string()),
            None => Some("a process that left no note".into()),
        })
    }

    fn follower_timeout(&self, st: Following) -> Error {
        match &st.joined {
            Some((nonce, _)) => {
                let mut arrived = vec![false; self.info.world_size];
                sweep(self.run_dir, nonce, &mut arrived, deadline_after(REPORT_SWEEP));
                let (missing, arrived) = split(&arrived);
                self.timeout_error(missing, arrived, st.hint)
            }
            // Without rank 0's nonce there is no generation to look for others in; all this
            // rank knows is that rank 0 is missing and that it is here itself.
            None => {
                let hint = if st.hint.is_empty() {
                    "; rank 0 never wrote the rendezvous payload (other ranks not checked)".to_string()
                } else {
                    st.hint
                };
                self.timeout_error(vec![0], vec![self.info.rank], hint)
            }
        }
    }

    fn stale_after(&self) -> Duration {
        self.opts.heartbeat * STALE_BEATS
    }

    /// Another job uses this run directory: the cure is a job id of its own.
    fn conflict(&self, reason: String) -> Error {
        Error::Rendezvous {
            dir: self.run_dir.to_path_buf(),
            reason: format!("{reason}; give each job its own --job-id"),
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

/// Rank 0's sign of life for as long as its [`Rendezvous`] lives: `alive` rewritten every
/// interval with the run's nonce and a counter. Another job's rank 0, or a rank that finds a
/// payload it cannot join, watches it change to tell a live run from a crashed one's leftovers,
/// without comparing clocks across nodes.
#[derive(Debug)]
struct Heartbeat {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Heartbeat {
    fn start(run_dir: &Path, nonce: &str, every: Duration) -> Result<Heartbeat> {
        let path = run_dir.join(ALIVE);
        let who = host_and_pid();
        write_atomic(&path, format!("{nonce} 0 {who}").as_bytes())?;
        let (stop, stopped) = mpsc::channel::<()>();
        let nonce = nonce.to_string();
        let thread = std::thread::spawn(move || {
            let mut beat = 0u64;
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                beat += 1;
                if let Err(e) = write_atomic(&path, format!("{nonce} {beat} {who}").as_bytes()) {
                    tracing::warn!("rendezvous heartbeat: {e}");
                }
            }
            // Still ours: removed, so that the next run need not watch it to see it is stale.
            if read_if_present(&path).ok().flatten().is_some_and(|b| alive_nonce(&b) == nonce) {
                let _ = fs::remove_file(&path);
            }
        });
        Ok(Heartbeat { stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The nonce an `alive` file names (its first word).
fn alive_nonce(alive: &[u8]) -> String {
    String::from_utf8_lossy(alive).split_whitespace().next().unwrap_or_default().to_string()
}

/// Who wrote an `alive` file, for messages: `rank 0 on HOST, pid PID`.
fn describe_alive(alive: &[u8]) -> String {
    let text = String::from_utf8_lossy(alive);
    let who: Vec<&str> = text.split_whitespace().skip(2).collect();
    format!("its rank 0: {}", who.join(" "))
}

/// Marks the ranks whose arrival file for `nonce` exists, stopping at `stop` (the ranks not
/// looked at stay unmarked): one sweep is a lookup per rank, and the deadline must hold whatever
/// the world size.
fn sweep(run_dir: &Path, nonce: &str, seen: &mut [bool], stop: Option<Instant>) {
    for (r, s) in seen.iter_mut().enumerate() {
        if passed(stop) {
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
    fingerprint: String,
    payload: Vec<u8>,
}

/// `MAGIC`, nonce, world size, then the fingerprint and the payload, each after its length.
fn encode_payload(nonce: &str, world_size: usize, fingerprint: &str, payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(48 + fingerprint.len() + payload.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(nonce.as_bytes());
    bytes.extend_from_slice(&(world_size as u64).to_le_bytes());
    for part in [fingerprint.as_bytes(), payload] {
        bytes.extend_from_slice(&(part.len() as u64).to_le_bytes());
        bytes.extend_from_slice(part);
    }
    bytes
}

/// `Ok(None)` when the file is absent or not a payload (a half-updated directory is normal
/// while rank 0 starts).
fn read_payload(path: &Path) -> Result<Option<Payload>> {
    let Some(bytes) = read_if_present(path)? else { return Ok(None) };
    Ok(decode_payload(&bytes))
}

fn decode_payload(bytes: &[u8]) -> Option<Payload> {
    let rest = bytes.strip_prefix(MAGIC)?;
    let nonce = std::str::from_utf8(rest.get(..NONCE_LEN)?).ok()?.to_string();
    let (world_size, rest) = take_word(&rest[NONCE_LEN..])?;
    let (fp_len, rest) = take_word(rest)?;
    let fingerprint = String::from_utf8_lossy(rest.get(..fp_len)?).into_owned();
    let (len, rest) = take_word(&rest[fp_len..])?;
    if rest.len() != len {
        return None;
    }
    Some(Payload { nonce, world_size, fingerprint, payload: rest.to_vec() })
}

/// A little-endian u64 from the front of `bytes`, and what follows it.
fn take_word(bytes: &[u8]) -> Option<(usize, &[u8])> {
    let word: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
    Some((usize::try_from(u64::from_le_bytes(word)).ok()?, &bytes[8..]))
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

/// A temporary name beside `path`, unique in this process (rank 0 never clears `.tmp.` files).
fn temp_path(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".tmp.{name}.{}.{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed)))
}

/// Creates `path` holding `bytes` only if nothing is there yet (`false` if something is): a
/// hard link from a complete temporary file fails on an existing name, also on NFS where
/// `O_EXCL` was long unreliable, and readers never see half a file. A file system without hard
/// links gets `O_EXCL` (create_new).
fn create_exclusive(path: &Path, bytes: &[u8]) -> Result<bool> {
    let tmp = temp_path(path);
    fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
        Err(_) => match fs::OpenOptions::new().write(true).create_new(true).open(path) {
            Ok(mut f) => std::io::Write::write_all(&mut f, bytes).map(|()| true).map_err(|e| Error::io(path, e)),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(Error::io(path, e)),
        },
    }
}

/// Writes `path` so that readers see either nothing or the whole content.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_path(path);
    fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// Rank 0 removes files an earlier run left (never temp files: another rank may be mid-write),
/// except the files of a generation that may still be finishing ([`KEEP_FINISHING`]).
/// Directories are not ours: every name the protocol uses is a file, so one is left alone with
/// a warning (failing here would leave the other ranks waiting for their timeout), unless it
/// takes the name `payload`, which rank 0 must write.
fn clear_old_files(run_dir: &Path) -> Result<()> {
    let mut files = Vec::new();
    for entry in fs::read_dir(run_dir).map_err(|e| Error::io(run_dir, e))? {
        let entry = entry.map_err(|e| Error::io(run_dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(".tmp.") {
            continue;
        }
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            skip_dir(run_dir, &name)?;
            continue;
        }
        let modified = entry.metadata().and_then(|m| m.modified()).ok();
        files.push((name, entry.path(), modified));
    }
    let finishing = finishing_generations(&files);
    for (name, path, _) in &files {
        if generation_of(name).is_none_or(|nonce| !finishing.contains(&nonce)) {
            remove_if_present(path)?;
        }
    }
    Ok(())
}

/// A directory in the run directory: left alone with a warning, or an error if it takes the
/// name `payload`.
fn skip_dir(run_dir: &Path, name: &str) -> Result<()> {
    let path = run_dir.join(name);
    if name == PAYLOAD {
        return Err(Error::Rendezvous {
            dir: run_dir.to_path_buf(),
            reason: format!("{} is a directory; rank 0 writes its payload file there: remove it", path.display()),
        });
    }
    tracing::warn!("{}: a directory in the rendezvous directory, not written by symerge; left alone", path.display());
    Ok(())
}

/// How long after its newest file a generation's files (`<nonce>.*`) survive a new run's
/// clearing. A run is over for rank 0 once its last collective has every rank's file, and rank 0
/// then removes `alive`; but the other ranks may not have read rank 0's file of that collective
/// yet (fuzzing round 3: a new job's rank 0 deleted it and the old run's rank 1 timed out in its
/// last barrier). Nothing tells the new rank 0 when they have: they write no heartbeat, and
/// `alive` is gone. The newest file of a generation is the last rank's entry into its latest
/// collective (or rendezvous), after which the others need only see the files; an hour covers
/// slow NFS lookups, stalled processes and clock skew between the nodes that stamp the files
/// and this one. Keeping them costs nothing: a new run uses a new nonce, and a later run
/// removes them.
const KEEP_FINISHING: Duration = Duration::from_secs(3600);

/// The nonces of the generations whose newest file is younger than [`KEEP_FINISHING`] (a file
/// stamped in the future, by a node whose clock runs ahead, counts as young).
fn finishing_generations(files: &[(String, PathBuf, Option<SystemTime>)]) -> Vec<&str> {
    let now = SystemTime::now();
    let young = |t: &Option<SystemTime>| t.is_some_and(|t| now.duration_since(t).unwrap_or_default() < KEEP_FINISHING);
    let mut nonces: Vec<&str> =
        files.iter().filter(|(_, _, t)| young(t)).filter_map(|(name, _, _)| generation_of(name)).collect();
    nonces.sort_unstable();
    nonces.dedup();
    nonces
}

/// The nonce a generation's file name starts with (`<nonce>.go`, `<nonce>.op3.1`, ...).
fn generation_of(name: &str) -> Option<&str> {
    let (nonce, rest) = name.split_at_checked(NONCE_LEN)?;
    (nonce.bytes().all(|b| b.is_ascii_hexdigit()) && rest.starts_with('.')).then_some(nonce)
}

fn arrived_name(nonce: &str, rank: usize) -> String {
    format!("{nonce}.arrived.{rank}")
}

/// `host HOST pid PID`, so that a person reading the directory, or an error, can tell who
/// wrote a file.
fn host_and_pid() -> String {
    let host = fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("host {} pid {}", host.trim(), std::process::id())
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
            heartbeat: Duration::from_millis(50),
            ..RendezvousOptions::new(dir, Duration::from_millis(timeout_ms))
        }
    }

    /// [`opts`] for a run that is `fingerprint`.
    fn opts_as(dir: &Path, timeout_ms: u64, fingerprint: &str) -> RendezvousOptions {
        RendezvousOptions { fingerprint: fingerprint.into(), ..opts(dir, timeout_ms) }
    }

    /// Runs `rendezvous` on a thread.
    fn spawn(
        rank: usize,
        world: usize,
        o: RendezvousOptions,
    ) -> std::thread::JoinHandle<Result<(Rendezvous, Duration)>> {
        std::thread::spawn(move || {
            let start = Instant::now();
            rendezvous(&info(rank, world), &o, &[5]).map(|r| (r, start.elapsed()))
        })
    }

    /// Waits until `path` exists.
    fn wait_for(path: &Path) {
        let start = Instant::now();
        while !path.exists() {
            assert!(start.elapsed() < Duration::from_secs(10), "{} never appeared", path.display());
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The arrival files in `run_dir`.
    fn arrivals(run_dir: &Path) -> Vec<String> {
        let Ok(entries) = fs::read_dir(run_dir) else { return Vec::new() };
        let names = entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned());
        names.filter(|n| n.contains(".arrived.") && !n.starts_with(".tmp.")).collect()
    }

    /// Fuzzing round 3: two jobs on one directory and job id had two processes act as rank 1.
    /// Now the second claimant fails at once, and the first joins as if nothing happened.
    #[test]
    fn a_second_claimant_of_a_rank_is_refused_and_the_first_goes_on() {
        let tmp = tempfile::tempdir().unwrap();
        let run_dir = tmp.path().join("run-default");
        let lead = spawn(0, 3, opts(tmp.path(), 10_000));
        let first = spawn(1, 3, opts(tmp.path(), 10_000));
        let start = Instant::now();
        while arrivals(&run_dir).iter().filter(|n| n.ends_with(".arrived.1")).count() == 0 {
            assert!(start.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(2));
        }
        let (second, took) = match spawn(1, 3, opts(tmp.path(), 10_000)).join().unwrap() {
            Err(e) => (e.to_string(), start.elapsed()),
            Ok(_) => panic!("a second rank 1 joined the run"),
        };
        assert!(second.contains("another run already holds rank 1 (host "), "{second}");
        assert!(second.contains("give each job its own --job-id"), "{second}");
        assert!(second.contains(&run_dir.display().to_string()), "{second}");
        assert!(took < Duration::from_secs(5), "refused after {took:?}, not at once");
        let last = spawn(2, 3, opts(tmp.path(), 10_000));
        for h in [lead, first, last] {
            assert_eq!(h.join().unwrap().unwrap().0.payload(), &[5]);
        }
    }

    /// A rank of another job (same directory, same job id) is refused by what its run is,
    /// naming both, well before the timeout; the right rank then joins.
    #[test]
    fn a_follower_of_another_job_is_refused_naming_both() {
        let tmp = tempfile::tempdir().unwrap();
        let lead = spawn(0, 2, opts_as(tmp.path(), 10_000, "adapt -o outA [aaaa]"));
        wait_for(&tmp.path().join("run-default").join(PAYLOAD));
        let msg = match spawn(1, 2, opts_as(tmp.path(), 10_000, "adapt -o outB [bbbb]")).join().unwrap() {
            Err(e) => e.to_string(),
            Ok((_, _)) => panic!("a rank of another job joined"),
        };
        assert!(msg.contains("its rank 0 runs `adapt -o outA [aaaa]`, this rank `adapt -o outB [bbbb]`"), "{msg}");
        let right = spawn(1, 2, opts_as(tmp.path(), 10_000, "adapt -o outA [aaaa]"));
        let (_, waited) = lead.join().unwrap().unwrap();
        assert!(waited < Duration::from_secs(5), "{waited:?}");
        right.join().unwrap().unwrap();
    }

    /// A second rank 0 neither clears a live run's files nor replaces its payload, during the
    /// rendezvous or after it (collectives use the directory); once the run ends, the next one
    /// starts without waiting.
    #[test]
    fn a_second_rank_zero_is_refused_while_the_first_runs() {
        let tmp = tempfile::tempdir().unwrap();
        let lead = spawn(0, 2, opts(tmp.path(), 10_000));
        wait_for(&tmp.path().join("run-default").join(PAYLOAD));
        let msg = spawn(0, 2, opts(tmp.path(), 10_000)).join().unwrap().err().unwrap().to_string();
        assert!(msg.contains("another run is live there (its rank 0: host "), "{msg}");
        let follower = spawn(1, 2, opts(tmp.path(), 10_000));
        let (mut r0, _) = lead.join().unwrap().unwrap();
        let (mut r1, _) = follower.join().unwrap().unwrap();
        let msg = spawn(0, 2, opts(tmp.path(), 10_000)).join().unwrap().err().unwrap().to_string();
        assert!(msg.contains("another run is live there"), "{msg}");
        let gather = std::thread::spawn(move || r1.barrier(Duration::from_secs(5)).map(|()| r1));
        r0.barrier(Duration::from_secs(5)).unwrap();
        drop(gather.join().unwrap().unwrap());
        drop(r0);
        assert!(!tmp.path().join("run-default").join(ALIVE).exists(), "a finished run leaves no heartbeat");
        let msg = spawn(0, 2, opts(tmp.path(), 100)).join().unwrap().err().unwrap().to_string();
        assert!(msg.contains("rank(s) 1 of 2 never arrived"), "{msg}");
    }

    /// A crashed run's payload, arrival files and heartbeat (nothing changes any more) do not
    /// block the next run, whether a follower of it starts before its rank 0 or after.
    #[test]
    fn a_crashed_runs_leftovers_do_not_block_the_next_run() {
        for fingerprint in ["", "an older job"] {
            let tmp = tempfile::tempdir().unwrap();
            let run_dir = tmp.path().join("run-default");
            fs::create_dir_all(&run_dir).unwrap();
            let old = "0123456789abcdef";
            fs::write(run_dir.join(PAYLOAD), encode_payload(old, 2, fingerprint, &[1])).unwrap();
            fs::write(run_dir.join(ALIVE), format!("{old} 7 host gone pid 1")).unwrap();
            for r in 0..2 {
                fs::write(run_dir.join(arrived_name(old, r)), "token host gone pid 1").unwrap();
            }
            let follower = spawn(1, 2, opts(tmp.path(), 10_000));
            std::thread::sleep(Duration::from_millis(50));
            let lead = spawn(0, 2, opts(tmp.path(), 10_000));
            assert_eq!(follower.join().unwrap().unwrap().0.payload(), &[5], "{fingerprint:?}");
            lead.join().unwrap().unwrap();
        }
    }

    /// Fuzzing round 5: a dangling link said only "File exists".
    #[test]
    fn a_rendezvous_that_cannot_be_a_directory_says_why() {
        let tmp = tempfile::tempdir().unwrap();
        let link = tmp.path().join("rdv");
        std::os::unix::fs::symlink(tmp.path().join("gone"), &link).unwrap();
        let msg = rendezvous(&info(0, 1), &opts(&link, 100), &[]).err().unwrap().to_string();
        assert!(msg.contains("is a symbolic link to") && msg.contains("gone, which does not exist"), "{msg}");
        let file = tmp.path().join("file");
        fs::write(&file, "").unwrap();
        let msg = rendezvous(&info(0, 1), &opts(&file, 100), &[]).err().unwrap().to_string();
        assert!(msg.contains("file: is not a directory"), "{msg}");
        fs::create_dir(tmp.path().join("gone")).unwrap();
        rendezvous(&info(0, 1), &opts(&link, 100), &[]).unwrap();
    }

    #[test]
    fn payloads_round_trip_and_garbage_is_not_one() {
        let bytes = encode_payload("0123456789abcdef", 3, "merge -o out", &[9, 8]);
        let p = decode_payload(&bytes).unwrap();
        assert_eq!((p.nonce.as_str(), p.world_size, p.fingerprint.as_str()), ("0123456789abcdef", 3, "merge -o out"));
        assert_eq!(p.payload, [9, 8]);
        for cut in 0..bytes.len() {
            assert!(decode_payload(&bytes[..cut]).is_none(), "{cut}");
        }
        let mut huge = bytes.clone();
        huge[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode_payload(&huge).is_none());
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
        fs::write(run_dir.join(PAYLOAD), encode_payload("0123456789abcdef", 2, "", &[42])).unwrap();
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
        drop(lead);

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
        sweep(tmp.path(), "n", &mut seen, Some(Instant::now()));
        assert_eq!(seen, [false; 3], "no lookup after the deadline");
        sweep(tmp.path(), "n", &mut seen, deadline_after(Duration::from_secs(60)));
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

    /// The names in `dir`, sorted.
    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        v.sort();
        v
    }

    /// Writes `name` in `dir`, stamped `age` ago.
    fn file_aged(dir: &Path, name: &str, age: Duration) {
        let path = dir.join(name);
        fs::write(&path, b"").unwrap();
        let f = fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(SystemTime::now() - age).unwrap();
    }

    /// Fuzzing round 3: clearing removed every file, also those of a run whose other ranks were
    /// still reading its last collective. A generation is kept while its newest file is recent
    /// (however old its others: rank 0 may have waited hours in that collective).
    #[test]
    fn clearing_keeps_the_files_of_a_generation_that_may_be_finishing() {
        let tmp = tempfile::tempdir().unwrap();
        let (finishing, done) = ("00000000000000aa", "00000000000000bb");
        let hours = Duration::from_secs(2 * 3600);
        file_aged(tmp.path(), &format!("{finishing}.op9.0"), hours);
        file_aged(tmp.path(), &format!("{finishing}.op9.1"), Duration::ZERO);
        file_aged(tmp.path(), &format!("{finishing}.go"), hours);
        for name in [format!("{done}.op3.0"), format!("{done}.abort"), "payload".into(), "alive".into()] {
            file_aged(tmp.path(), &name, hours);
        }
        for name in ["payload", "alive", "0000000000000zzz.op1.0", ".tmp.payload.1.0"] {
            file_aged(tmp.path(), name, Duration::ZERO);
        }
        clear_old_files(tmp.path()).unwrap();
        let kept = [".tmp.payload.1.0", "00000000000000aa.go", "00000000000000aa.op9.0", "00000000000000aa.op9.1"];
        assert_eq!(names(tmp.path()), kept);
    }

    /// The race itself: rank 1 of a run is still polling for rank 0's file of their last barrier
    /// when rank 0 has finished (its `alive` gone) and a new job's rank 0 clears the directory.
    /// Rank 1 must still complete, not time out.
    #[test]
    fn a_new_run_does_not_break_the_last_barrier_of_the_previous_one() {
        let tmp = tempfile::tempdir().unwrap();
        let follower = spawn(1, 2, opts(tmp.path(), 10_000));
        let (mut r0, _) = spawn(0, 2, opts(tmp.path(), 10_000)).join().unwrap().unwrap();
        let (mut r1, _) = follower.join().unwrap().unwrap();
        // Rank 1 looks for rank 0's file once, before rank 0 writes it, and then not for 2 s.
        r1.poll = Duration::from_secs(2);
        let mine = tmp.path().join("run-default").join(r1.op_name(0, 1));
        let last = std::thread::spawn(move || r1.barrier(Duration::from_millis(500)));
        wait_for(&mine);
        std::thread::sleep(Duration::from_millis(100));
        r0.barrier(Duration::from_secs(5)).unwrap();
        drop(r0);
        let next = rendezvous(&info(0, 2), &opts(tmp.path(), 50), &[]).unwrap_err().to_string();
        assert!(next.contains("rank(s) 1 of 2 never arrived"), "{next}");
        last.join().unwrap().unwrap();
    }

    /// Fuzzing round 3: a timeout of 1e19 s panicked ("overflow when adding duration to
    /// instant"); one too long for an `Instant` is no deadline, in the rendezvous and the
    /// collectives after it.
    #[test]
    fn a_timeout_past_any_instant_waits_without_limit() {
        let tmp = tempfile::tempdir().unwrap();
        let forever = |rank| {
            let o = RendezvousOptions { timeout: Duration::MAX, ..opts(tmp.path(), 0) };
            std::thread::spawn(move || {
                let mut r = rendezvous(&info(rank, 2), &o, &[4])?;
                r.barrier(Duration::MAX).map(|()| r.payload().to_vec())
            })
        };
        let (lead, follower) = (forever(0), forever(1));
        assert_eq!(lead.join().unwrap().unwrap(), [4]);
        assert_eq!(follower.join().unwrap().unwrap(), [4]);
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
