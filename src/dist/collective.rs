//! Collective operations behind one trait, so the training loop is written once and runs on one
//! process ([`Single`]), on threads in one process ([`LocalGroup`]: tests, and later several
//! local GPUs driven by one process), across processes through a shared directory
//! ([`FileGroup`]: CPU clusters and `dist-check`), and on GPUs through NCCL
//! ([`crate::dist::nccl`]).
//!
//! Every implementation gives all ranks bit-identical results, and the CPU ones sum in rank
//! order, so a run is reproducible whatever order the ranks arrive in. Every wait has a
//! timeout: a rank that dies or never arrives makes the others fail with an error naming it.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::dist::rendezvous::Rendezvous;
use crate::error::{Error, Result};

/// What data-parallel training needs from a communicator. Every rank must call the same
/// operations in the same order with buffers of the same length.
pub trait Collective: Send {
    /// `single`, `local`, `file` or `nccl`.
    fn backend(&self) -> &'static str;
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Where the data is reduced, for reports: `cpu`, or `cuda:N (name)`.
    fn device(&self) -> String {
        "cpu".into()
    }
    /// Replaces `buf` on every rank with the element-wise sum over ranks.
    fn all_reduce_sum_f32(&mut self, buf: &mut [f32]) -> Result<()>;
    /// Copies `root`'s `buf` into every rank's `buf`.
    fn broadcast_f32(&mut self, buf: &mut [f32], root: usize) -> Result<()>;
    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<()>;
    /// Best effort: tells the other ranks this one failed, so they stop waiting for it now
    /// rather than at their timeout. Backends whose failure is already visible do nothing.
    fn abort(&self, _reason: &str) {}
    /// The NCCL communicator behind this collective, if it is one: device buffers on its GPU
    /// can then be reduced where they are ([`crate::backend::Backend::all_reduce_sum`]) instead of
    /// through host memory.
    fn nccl(&mut self) -> Option<&mut crate::dist::nccl::NcclGroup> {
        None
    }
}

/// Element-wise sum, adding rank 0, then 1, then 2...: the fixed order is what makes the result
/// independent of arrival order.
pub fn sum_in_rank_order<'a>(mut parts: impl Iterator<Item = &'a [f32]>, out: &mut [f32]) {
    match parts.next() {
        Some(first) => out.copy_from_slice(first),
        None => out.fill(0.0),
    }
    for part in parts {
        for (o, &p) in out.iter_mut().zip(part) {
            *o += p;
        }
    }
}

fn check_root(backend: &str, root: usize, world_size: usize) -> Result<()> {
    if root >= world_size {
        return Err(Error::Collective {
            backend: backend.into(),
            reason: format!("broadcast root {root} is not below the world size {world_size}"),
        });
    }
    Ok(())
}

/// World size 1: every operation is the identity, and no communicator library is loaded.
#[derive(Debug, Default)]
pub struct Single;

impl Collective for Single {
    fn backend(&self) -> &'static str {
        "single"
    }
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum_f32(&mut self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn broadcast_f32(&mut self, _buf: &mut [f32], root: usize) -> Result<()> {
        check_root("single", root, 1)
    }
    fn barrier(&mut self) -> Result<()> {
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    AllReduce,
    Broadcast(usize),
    Barrier,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::AllReduce => "all_reduce",
            Op::Broadcast(_) => "broadcast",
            Op::Barrier => "barrier",
        }
    }
}

/// An in-process group of `world_size` ranks sharing memory; hand one [`LocalRank`] to each
/// thread.
pub struct LocalGroup;

impl LocalGroup {
    /// The ranks of a new group; each operation fails after `timeout` if a rank is missing.
    pub fn ranks(world_size: usize, timeout: Duration) -> Vec<LocalRank> {
        let shared = Arc::new(Shared {
            world_size,
            timeout,
            state: Mutex::new(State {
                seq: 0,
                contrib: vec![None; world_size],
                result: None,
                taken: vec![false; world_size],
                broken: None,
            }),
            cv: Condvar::new(),
        });
        (0..world_size).map(|rank| LocalRank { rank, seq: 0, shared: Arc::clone(&shared) }).collect()
    }
}

struct Shared {
    world_size: usize,
    timeout: Duration,
    state: Mutex<State>,
    cv: Condvar,
}

/// One operation at a time: ranks deposit contributions for `seq`; the last to arrive computes
/// the result; when every rank has taken it, `seq` advances. A rank that runs ahead waits for
/// `seq` to reach its own sequence number.
struct State {
    seq: u64,
    contrib: Vec<Option<(Op, Vec<f32>)>>,
    result: Option<std::result::Result<Vec<f32>, String>>,
    taken: Vec<bool>,
    /// Set when a rank timed out or left; every later wait fails with it at once.
    broken: Option<String>,
}

/// One rank of a [`LocalGroup`].
pub struct LocalRank {
    rank: usize,
    seq: u64,
    shared: Arc<Shared>,
}

impl LocalRank {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere cannot leave `State` half-updated in a way we rely on; the
        // dropped rank marks the group broken anyway.
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn error(&self, reason: String) -> Error {
        Error::Collective { backend: "local".into(), reason }
    }

    fn timeout(&self, op: Op, start: Instant, missing: Vec<usize>) -> Error {
        Error::CollectiveTimeout {
            backend: "local".into(),
            op: op.name().into(),
            seq: self.seq,
            rank: self.rank,
            waited_s: start.elapsed().as_secs_f64(),
            missing,
        }
    }

    /// Waits on the condition variable until `done(state)` or the deadline (none: no limit).
    fn wait<'a>(
        &'a self,
        mut state: MutexGuard<'a, State>,
        deadline: Option<Instant>,
        done: impl Fn(&State) -> bool,
    ) -> (MutexGuard<'a, State>, bool) {
        while !done(&state) && state.broken.is_none() {
            state = match deadline {
                None => self.shared.cv.wait(state).unwrap_or_else(|e| e.into_inner()),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return (state, false);
                    }
                    self.shared.cv.wait_timeout(state, deadline - now).unwrap_or_else(|e| e.into_inner()).0
                }
            };
        }
        (state, true)
    }

    fn run(&mut self, op: Op, data: &[f32]) -> Result<Vec<f32>> {
        let start = Instant::now();
        // A timeout too long for an `Instant` ("forever") is no deadline.
        let deadline = start.checked_add(self.shared.timeout);
        let seq = self.seq;
        let state = self.lock();
        let (mut state, ok) = self.wait(state, deadline, |s| s.seq == seq);
        if let Some(b) = &state.broken {
            return Err(self.error(b.clone()));
        }
        if !ok {
            let missing: Vec<usize> = (0..self.shared.world_size).filter(|&r| !state.taken[r]).collect();
            let err = self.timeout(op, start, missing);
            state.broken = Some(err.to_string());
            self.shared.cv.notify_all();
            return Err(err);
        }
        state.contrib[self.rank] = Some((op, data.to_vec()));
        if state.contrib.iter().all(Option::is_some) {
            state.result = Some(combine(&state.contrib));
            self.shared.cv.notify_all();
        }
        let (mut state, ok) = self.wait(state, deadline, |s| s.result.is_some());
        // A finished result stands even if a rank broke the group after producing it.
        let result = match (&state.result, &state.broken, ok) {
            (Some(r), _, _) => r.clone(),
            (None, Some(b), _) => return Err(self.error(b.clone())),
            (None, None, _) => {
                let missing: Vec<usize> = (0..self.shared.world_size).filter(|&r| state.contrib[r].is_none()).collect();
                let err = self.timeout(op, start, missing);
                state.broken = Some(err.to_string());
                self.shared.cv.notify_all();
                return Err(err);
            }
        };
        state.taken[self.rank] = true;
        if state.taken.iter().all(|&t| t) {
            state.contrib.iter_mut().for_each(|c| *c = None);
            state.taken.iter_mut().for_each(|t| *t = false);
            state.result = None;
            state.seq += 1;
            self.shared.cv.notify_all();
        }
        drop(state);
        self.seq += 1;
        result.map_err(|reason| self.error(reason))
    }
}

/// The result every rank receives, or why the ranks' calls do not match.
fn combine(contrib: &[Option<(Op, Vec<f32>)>]) -> std::result::Result<Vec<f32>, String> {
    let parts: Vec<(Op, &[f32])> = contrib.iter().flatten().map(|(op, v)| (*op, v.as_slice())).collect();
    let (op0, _) = parts[0];
    if let Some(r) = parts.iter().position(|(op, _)| *op != op0) {
        return Err(format!("rank 0 called {:?} but rank {r} called {:?}", op0, parts[r].0));
    }
    match op0 {
        Op::Barrier => Ok(Vec::new()),
        Op::Broadcast(root) => Ok(parts[root].1.to_vec()),
        Op::AllReduce => {
            let len = parts[0].1.len();
            if let Some(r) = parts.iter().position(|(_, v)| v.len() != len) {
                return Err(format!(
                    "all_reduce buffer lengths differ: rank 0 has {len} elements, rank {r} has {}",
                    parts[r].1.len()
                ));
            }
            let mut out = vec![0.0; len];
            sum_in_rank_order(parts.iter().map(|(_, v)| *v), &mut out);
            Ok(out)
        }
    }
}

impl Drop for LocalRank {
    /// A rank that leaves (finished early, or its thread panicked) must not leave the others
    /// waiting for the timeout.
    fn drop(&mut self) {
        let mut state = self.lock();
        if state.broken.is_none() {
            state.broken = Some(format!("rank {} left the group after {} collective(s)", self.rank, self.seq));
        }
        self.shared.cv.notify_all();
    }
}

impl Collective for LocalRank {
    fn backend(&self) -> &'static str {
        "local"
    }
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.world_size
    }
    fn all_reduce_sum_f32(&mut self, buf: &mut [f32]) -> Result<()> {
        let out = self.run(Op::AllReduce, buf)?;
        buf.copy_from_slice(&out);
        Ok(())
    }
    fn broadcast_f32(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        check_root("local", root, self.shared.world_size)?;
        let data = if self.rank == root { &buf[..] } else { &[] };
        let out = self.run(Op::Broadcast(root), data)?;
        if out.len() != buf.len() {
            return Err(self.error(format!(
                "broadcast buffer lengths differ: root {root} has {} elements, rank {} has {}",
                out.len(),
                self.rank,
                buf.len()
            )));
        }
        buf.copy_from_slice(&out);
        Ok(())
    }
    fn barrier(&mut self) -> Result<()> {
        self.run(Op::Barrier, &[]).map(|_| ())
    }
}

/// Collectives through the rendezvous directory: each operation is an all-gather of files.
/// Slow (a few file-system round trips per call) but needs nothing beyond a shared filesystem,
/// which makes it right for checks and CPU clusters, and wrong for gradients of a large model.
pub struct FileGroup {
    rdzv: Rendezvous,
    timeout: Duration,
}

impl FileGroup {
    /// Collectives over a completed rendezvous; each fails after `timeout` if a rank is missing.
    pub fn new(rdzv: Rendezvous, timeout: Duration) -> Self {
        FileGroup { rdzv, timeout }
    }

    fn gather(&mut self, op: &str, data: &[f32]) -> Result<Vec<Vec<f32>>> {
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        let all = self.rdzv.all_gather_bytes(&bytes, op, self.timeout)?;
        all.into_iter()
            .enumerate()
            .map(|(r, b)| {
                if b.len() % 4 != 0 {
                    return Err(Error::Collective {
                        backend: "file".into(),
                        reason: format!("rank {r} sent {} bytes, not whole f32 values", b.len()),
                    });
                }
                Ok(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
            })
            .collect()
    }
}

impl Collective for FileGroup {
    fn backend(&self) -> &'static str {
        "file"
    }
    fn rank(&self) -> usize {
        self.rdzv.rank()
    }
    fn world_size(&self) -> usize {
        self.rdzv.world_size()
    }
    fn all_reduce_sum_f32(&mut self, buf: &mut [f32]) -> Result<()> {
        let parts = self.gather("all_reduce", buf)?;
        if let Some(r) = parts.iter().position(|p| p.len() != buf.len()) {
            return Err(Error::Collective {
                backend: "file".into(),
                reason: format!(
                    "all_reduce buffer lengths differ: rank {} has {} elements, rank {r} has {}",
                    self.rank(),
                    buf.len(),
                    parts[r].len()
                ),
            });
        }
        sum_in_rank_order(parts.iter().map(Vec::as_slice), buf);
        Ok(())
    }
    fn broadcast_f32(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        check_root("file", root, self.world_size())?;
        let data = if self.rank() == root { &buf[..] } else { &[] };
        let parts = self.gather("broadcast", data)?;
        if parts[root].len() != buf.len() {
            return Err(Error::Collective {
                backend: "file".into(),
                reason: format!(
                    "broadcast buffer lengths differ: root {root} has {} elements, rank {} has {}",
                    parts[root].len(),
                    self.rank(),
                    buf.len()
                ),
            });
        }
        buf.copy_from_slice(&parts[root]);
        Ok(())
    }
    fn barrier(&mut self) -> Result<()> {
        self.rdzv.barrier(self.timeout)
    }
    fn abort(&self, reason: &str) {
        self.rdzv.abort(reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mismatched_calls_fail_on_every_rank() {
        let ranks = LocalGroup::ranks(2, Duration::from_secs(5));
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|mut c| {
                std::thread::spawn(move || {
                    let mut buf = vec![1.0; 3 + c.rank()];
                    c.all_reduce_sum_f32(&mut buf).unwrap_err().to_string()
                })
            })
            .collect();
        for h in handles {
            let msg = h.join().unwrap();
            assert!(msg.contains("lengths differ"), "{msg}");
        }
    }

    /// Fuzzing round 3: a timeout past any `Instant` panicked on `start + timeout`.
    #[test]
    fn a_timeout_past_any_instant_waits_without_limit() {
        let handles: Vec<_> = LocalGroup::ranks(2, Duration::MAX)
            .into_iter()
            .map(|mut c| {
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(20 * c.rank() as u64));
                    let mut buf = [1.0f32];
                    c.all_reduce_sum_f32(&mut buf).map(|()| buf[0])
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap().unwrap(), 2.0);
        }
    }

    #[test]
    fn a_rank_that_leaves_fails_the_others_fast() {
        let mut ranks = LocalGroup::ranks(2, Duration::from_secs(30));
        let mut r0 = ranks.remove(0);
        drop(ranks);
        let start = Instant::now();
        let msg = r0.barrier().unwrap_err().to_string();
        assert!(msg.contains("rank 1 left the group"), "{msg}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    /// Two thread-ranks through a real rendezvous directory; `timeout` is the collectives'
    /// (the rendezvous gets longer: on a loaded machine 200 ms is not enough to start a thread).
    fn file_pair(dir: &std::path::Path, timeout: Duration) -> (FileGroup, FileGroup) {
        use crate::dist::rank::RankInfo;
        use crate::dist::rendezvous::{RendezvousOptions, rendezvous};
        let wait = Duration::from_secs(20);
        let opts = RendezvousOptions { poll: Duration::from_millis(2), ..RendezvousOptions::new(dir, wait) };
        let o = opts.clone();
        let r1 = std::thread::spawn(move || {
            rendezvous(&RankInfo { rank: 1, world_size: 2, ..RankInfo::single() }, &o, &[]).unwrap()
        });
        let r0 = rendezvous(&RankInfo { world_size: 2, ..RankInfo::single() }, &opts, &[]).unwrap();
        (FileGroup::new(r0, timeout), FileGroup::new(r1.join().unwrap(), timeout))
    }

    #[test]
    fn file_group_times_out_naming_the_absent_rank_and_honours_aborts() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut g0, g1) = file_pair(tmp.path(), Duration::from_millis(200));
        let start = Instant::now();
        let msg = g0.all_reduce_sum_f32(&mut [1.0]).unwrap_err().to_string();
        assert!(msg.contains("file collective #0 (all_reduce) on rank 0 timed out"), "{msg}");
        assert!(msg.contains("waiting for rank(s) 1"), "{msg}");
        assert!(start.elapsed() < Duration::from_secs(3));
        drop(g1);

        let tmp = tempfile::tempdir().unwrap();
        let (mut g0, g1) = file_pair(tmp.path(), Duration::from_secs(30));
        g1.abort("out of memory");
        let start = Instant::now();
        let msg = g0.barrier().unwrap_err().to_string();
        assert!(msg.contains("aborted by rank 1: out of memory"), "{msg}");
        assert!(start.elapsed() < Duration::from_secs(3), "an abort must not wait for the timeout");
    }

    #[test]
    fn single_is_the_identity() {
        let mut s = Single;
        let mut v = vec![1.5, -2.0];
        s.all_reduce_sum_f32(&mut v).unwrap();
        s.broadcast_f32(&mut v, 0).unwrap();
        assert_eq!(v, [1.5, -2.0]);
        assert!(s.broadcast_f32(&mut v, 1).is_err());
    }
}
