//! The shared part of the merged model during adaptation, streamed from the checkpoints.
//!
//! For every tensor of the shared blocks this holds zero-copy views ([`StoredTensor`]) of its
//! stored bytes in the base and in each expert; nothing is decoded up front and no task vector
//! is ever materialised. When the forward (or the recomputing backward) reaches block `b`,
//! [`SharedWeights::visit`] stages its bytes on the backend (the CPU reads the mapping in place,
//! CUDA copies the bytes to the device), [`BlockVisit::merged`] builds the merged weights
//! `theta_pre + sum_k lambda_k tau_k` with [`Backend::merge_stored`], and in the backward
//! [`BlockVisit::lambda_grad`] turns the block's weight gradients into Lambda gradients with
//! [`Backend::lambda_grad_stored`] from the same staged bytes.
//!
//! A memory budget decides which blocks stay staged between visits ("kept": their pages stay
//! mapped on the CPU, their bytes stay on the device with CUDA) and which are streamed: staged at
//! each visit and released after it, while a prefetch thread maps the next block in the
//! direction of travel (forward 0..L, backward L..0). With everything kept (small models) a step
//! reads nothing twice; with nothing kept, resident memory is about two blocks of stored bytes
//! whatever the model size.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, unbounded};
use serde::Serialize;

use super::lambda::Lambda;
use crate::backend::{Backend, StoredGrad, StoredMerge};
use crate::checkpoint::{Checkpoint, FloatDType, StoredTensor};
use crate::error::{Error, Result};
use crate::model::chain::TableRows;
use crate::model::{Param, Params};

/// One shared tensor: where it is stored in the base and in each expert.
pub struct SharedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    /// Its Lambda row.
    pub row: usize,
    /// The base's view first, then each expert's, in Lambda's model order.
    pub stored: Vec<StoredTensor>,
}

/// One shared block's tensors.
pub struct SharedBlock {
    pub name: String,
    pub tensors: Vec<SharedTensor>,
}

impl SharedBlock {
    /// Stored bytes of the block over the base and every expert.
    pub fn bytes(&self) -> u64 {
        self.tensors.iter().flat_map(|t| &t.stored).map(|s| s.nbytes() as u64).sum()
    }

    /// Bytes of the block's merged weights in f32.
    pub fn f32_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| 4 * t.shape.iter().product::<usize>() as u64).sum()
    }

    fn views(&self) -> impl Iterator<Item = &StoredTensor> {
        self.tensors.iter().flat_map(|t| &t.stored)
    }
}

/// The shape of a block as the model defines it: its name and its parameters' names and shapes.
pub struct BlockLayout {
    pub name: String,
    pub params: Vec<(String, Vec<usize>)>,
}

/// How the shared blocks were held, for the run's summary.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StreamReport {
    /// `resident` (every block kept), `streamed` (none kept) or `mixed`.
    pub mode: String,
    pub blocks: usize,
    pub kept_blocks: usize,
    /// Stored bytes of the shared blocks over the base and all experts.
    pub shared_bytes: u64,
    pub kept_bytes: u64,
    /// The memory budget: kept blocks take at most half, a step's internals the rest.
    pub budget_bytes: u64,
    /// Bytes staged from the checkpoints over the whole run (kept blocks count once).
    pub bytes_streamed: u64,
    /// The part of `bytes_streamed` that was the kept blocks' one-time load (their first
    /// visit); the rest was streamed step by step.
    pub bytes_loaded_once: u64,
}

/// A block's staged tensors: per tensor, the base's then each expert's.
type StagedBlock<B> = Vec<Vec<<B as Backend>::Stored>>;

/// The shared blocks' stored weights (see the module notes).
pub struct SharedWeights<B: Backend> {
    pub blocks: Vec<SharedBlock>,
    /// Staged blocks kept between visits (`None`: streamed), filled on first use.
    kept: Vec<Option<OnceLock<StagedBlock<B>>>>,
    prefetch: Option<Prefetcher>,
    streamed: AtomicU64,
    /// Of `streamed`, the kept blocks' first staging: a one-time cost, not a per-step one.
    loaded_once: AtomicU64,
    budget: u64,
}

/// A block being worked on: its staged bytes, released (when streamed) on drop.
pub struct BlockVisit<'a, B: Backend> {
    block: &'a SharedBlock,
    staged: Staged<'a, B>,
    /// Drop the block's pages afterwards (streamed, and not needed again right away).
    release: bool,
}

enum Staged<'a, B: Backend> {
    Kept(&'a [Vec<B::Stored>]),
    Owned(StagedBlock<B>),
}

impl<B: Backend> SharedWeights<B> {
    /// The dtype most of the base's shared weights (by element) are stored in; f32 without any.
    pub fn base_dtype(&self) -> FloatDType {
        let mut count: Vec<(FloatDType, usize)> = Vec::new();
        for s in self.blocks.iter().flat_map(|b| &b.tensors).filter_map(|t| t.stored.first()) {
            match count.iter_mut().find(|(d, _)| *d == s.dtype) {
                Some((_, n)) => *n += s.numel(),
                None => count.push((s.dtype, s.numel())),
            }
        }
        count.into_iter().max_by_key(|&(_, n)| n).map_or(FloatDType::F32, |(d, _)| d)
    }

    /// Resolves every shared tensor of `layout` in the base checkpoint and each expert's (a
    /// wrapper prefix such as `bert.` may differ), checking shapes and dtypes, and decides which
    /// blocks to keep: blocks in order while their stored bytes fit in half of `budget` (default:
    /// half the backend's free memory). The other half is left for each step's layer internals
    /// and merged weights ([`Self::spare_bytes`]): kept blocks only save re-reading bytes, kept
    /// internals save a quarter of a step's compute, so a model too big to keep whole does not
    /// give all of the budget to its first blocks.
    pub fn open(
        be: &B,
        base: &Path,
        experts: &[PathBuf],
        layout: &[BlockLayout],
        lambda: &Lambda,
        budget: Option<u64>,
    ) -> Result<Self> {
        let base_ck = Checkpoint::open(base)?;
        let expert_cks = experts.iter().map(Checkpoint::open).collect::<Result<Vec<_>>>()?;
        let mut blocks = Vec::with_capacity(layout.len());
        for l in layout {
            let mut tensors = Vec::with_capacity(l.params.len());
            for (name, shape) in &l.params {
                let row = lambda.row_of(name, &l.name).ok_or_else(|| {
                    Error::Invalid(format!("internal: shared tensor `{name}` has no Lambda coefficients"))
                })?;
                let stored = std::iter::once(&base_ck)
                    .chain(&expert_cks)
                    .map(|ck| ck.stored_shaped(name, shape))
                    .collect::<Result<Vec<_>>>()?;
                tensors.push(SharedTensor { name: name.clone(), shape: shape.clone(), row, stored });
            }
            blocks.push(SharedBlock { name: l.name.clone(), tensors });
        }
        let budget = budget.unwrap_or_else(|| be.free_memory().unwrap_or(0) / 2);
        let mut left = budget / 2;
        let mut kept = Vec::with_capacity(blocks.len());
        for b in &blocks {
            let fits = b.bytes() <= left && kept.iter().all(Option::is_some);
            if fits {
                left -= b.bytes();
            }
            kept.push(fits.then(OnceLock::new));
        }
        let streamed_views: Vec<Vec<StoredTensor>> = blocks
            .iter()
            .zip(&kept)
            .map(|(b, k)| if k.is_some() { Vec::new() } else { b.views().cloned().collect() })
            .collect();
        let prefetch = kept.iter().any(Option::is_none).then(|| Prefetcher::start(streamed_views));
        Ok(SharedWeights {
            blocks,
            kept,
            prefetch,
            streamed: AtomicU64::new(0),
            loaded_once: AtomicU64::new(0),
            budget,
        })
    }

    /// Stages block `b` for use; `next` is the block to be visited after it (the prefetch
    /// target), `Some(b)` when `b` is needed again right away (the turn from forward to
    /// backward), which keeps its pages.
    pub fn visit(&self, be: &B, b: usize, next: Option<usize>) -> Result<BlockVisit<'_, B>> {
        let block = &self.blocks[b];
        if let Some(p) = &self.prefetch {
            p.wait_and_request(next.filter(|&n| n != b && self.kept[n].is_none()));
        }
        let staged = match &self.kept[b] {
            Some(cell) => {
                if cell.get().is_none() {
                    self.streamed.fetch_add(block.bytes(), Ordering::Relaxed);
                    self.loaded_once.fetch_add(block.bytes(), Ordering::Relaxed);
                    // Two threads may stage it at once; either copy serves.
                    let _ = cell.set(stage_block(be, block)?);
                }
                Staged::Kept(cell.get().map(Vec::as_slice).unwrap_or_default())
            }
            None => {
                self.streamed.fetch_add(block.bytes(), Ordering::Relaxed);
                Staged::Owned(stage_block(be, block)?)
            }
        };
        Ok(BlockVisit { block, staged, release: self.kept[b].is_none() && next != Some(b) })
    }

    /// The next block in the direction of travel: forward `b + 1`, backward `b - 1`, and at the
    /// ends the same block (it is visited again at once: the turn, or the next step's start).
    pub fn next_block(&self, b: usize, forward: bool) -> usize {
        match forward {
            true if b + 1 < self.blocks.len() => b + 1,
            false if b > 0 => b - 1,
            _ => b,
        }
    }

    /// Block `b`'s merged weights, visited on its own (writing a task's model, tests).
    pub fn merged_block(&self, be: &B, b: usize, lambda: &Lambda) -> Result<Params<B>> {
        self.visit(be, b, Some(self.next_block(b, true)))?.merged(be, lambda)
    }

    /// The budget left after the kept blocks: room a step may fill with forward internals
    /// (kept for the backward instead of recomputed).
    pub fn spare_bytes(&self) -> u64 {
        self.budget.saturating_sub(self.report().kept_bytes)
    }

    /// Bytes staged from the checkpoints so far.
    pub fn bytes_streamed(&self) -> u64 {
        self.streamed.load(Ordering::Relaxed)
    }

    pub fn report(&self) -> StreamReport {
        let kept_blocks = self.kept.iter().filter(|k| k.is_some()).count();
        let mode = match kept_blocks {
            k if k == self.blocks.len() => "resident",
            0 => "streamed",
            _ => "mixed",
        };
        StreamReport {
            mode: mode.into(),
            blocks: self.blocks.len(),
            kept_blocks,
            shared_bytes: self.blocks.iter().map(SharedBlock::bytes).sum(),
            kept_bytes: self.blocks.iter().zip(&self.kept).filter(|(_, k)| k.is_some()).map(|(b, _)| b.bytes()).sum(),
            budget_bytes: self.budget,
            bytes_streamed: self.bytes_streamed(),
            bytes_loaded_once: self.loaded_once.load(Ordering::Relaxed),
        }
    }
}

impl<B: Backend> BlockVisit<'_, B> {
    fn staged(&self) -> &[Vec<B::Stored>] {
        match &self.staged {
            Staged::Kept(s) => s,
            Staged::Owned(s) => s,
        }
    }

    /// The block's merged weights `base + sum_k lambda_k (theta_k - base)`, on the backend.
    pub fn merged(&self, be: &B, lambda: &Lambda) -> Result<Params<B>> {
        self.merged_rows(be, lambda, &[])
    }

    /// [`Self::merged`] with the lookup tables named in `lookups` merged only on the rows listed
    /// there (the rows a batch reads; the rest of the table is zero).
    pub fn merged_rows(&self, be: &B, lambda: &Lambda, lookups: &[TableRows]) -> Result<Params<B>> {
        let (p, checks) = self.merged_rows_queued(be, lambda, lookups)?;
        be.check_merges(vec![checks])?;
        Ok(p)
    }

    /// [`Self::merged_rows`] with the non-finite check left to [`Backend::check_merges`] (a
    /// sweep checks its blocks once).
    pub fn merged_rows_queued(
        &self,
        be: &B,
        lambda: &Lambda,
        lookups: &[TableRows],
    ) -> Result<(Params<B>, B::MergeChecks)> {
        let jobs: Vec<StoredMerge<'_, B::Stored>> = self
            .block
            .tensors
            .iter()
            .zip(self.staged())
            .map(|(t, s)| StoredMerge {
                base: &s[0],
                experts: s[1..].iter().collect(),
                coefs: lambda.row(t.row),
                rows: lookup_of(lookups, t),
            })
            .collect();
        let (bufs, checks) = be.merge_stored_queue(&jobs)?;
        let mut out = Params::new();
        for (t, buf) in self.block.tensors.iter().zip(bufs) {
            out.insert(t.name.clone(), Param { shape: t.shape.clone(), buf });
        }
        Ok((out, checks))
    }

    /// Adds the block's Lambda gradients to `out` (`[rows, K]`, like Lambda's values) from the
    /// gradients of its merged weights; a lookup table in `lookups` has gradient only on its
    /// listed rows, and only those are read.
    pub fn lambda_grad(&self, be: &B, grads: &Params<B>, lookups: &[TableRows], out: &mut [f64]) -> Result<()> {
        let queued = self.lambda_grad_queue(be, grads, lookups)?;
        add_dots(be, vec![queued], out)
    }

    /// [`Self::lambda_grad`] queued on the backend; [`add_dots`] adds the results once the
    /// sweep is done (a GPU is waited for once per step, not once per block).
    pub fn lambda_grad_queue(&self, be: &B, grads: &Params<B>, lookups: &[TableRows]) -> Result<QueuedDots<B>> {
        let mut jobs: Vec<StoredGrad<'_, B::Stored, B::Buf>> = Vec::with_capacity(self.block.tensors.len());
        for (t, s) in self.block.tensors.iter().zip(self.staged()) {
            let g = grads
                .get(&t.name)
                .ok_or_else(|| Error::Invalid(format!("internal: no gradient for shared tensor `{}`", t.name)))?;
            jobs.push(StoredGrad {
                grad: &g.buf,
                base: &s[0],
                experts: s[1..].iter().collect(),
                rows: lookup_of(lookups, t),
            });
        }
        let slots = self.block.tensors.iter().zip(&jobs).map(|(t, job)| (t.row, job.experts.len())).collect();
        Ok(QueuedDots { dots: be.lambda_grad_stored_queue(&jobs)?, slots })
    }
}

/// A block's Lambda dot products queued on the backend, with each job's Lambda row and task
/// count.
pub struct QueuedDots<B: Backend> {
    dots: B::Dots,
    slots: Vec<(usize, usize)>,
}

/// Adds queued blocks' dot products to Lambda's gradient `out` (`[rows, K]`), in queue order
/// (the order, hence the f64 sums, of adding each block's as it is computed).
pub fn add_dots<B: Backend>(be: &B, queued: Vec<QueuedDots<B>>, out: &mut [f64]) -> Result<()> {
    let mut slots = Vec::with_capacity(queued.len());
    let dots: Vec<B::Dots> = queued
        .into_iter()
        .map(|q| {
            slots.push(q.slots);
            q.dots
        })
        .collect();
    for (block, slots) in be.read_dots(dots)?.into_iter().zip(slots) {
        for (dots, (row, k)) in block.into_iter().zip(slots) {
            for (j, dot) in dots.into_iter().enumerate() {
                out[row * k + j] += dot;
            }
        }
    }
    Ok(())
}

/// The rows and row length of `t` when `lookups` lists it.
fn lookup_of<'a>(lookups: &'a [TableRows], t: &SharedTensor) -> Option<(&'a [u32], usize)> {
    let (_, rows) = lookups.iter().find(|(name, _)| *name == t.name)?;
    Some((rows, t.shape.iter().skip(1).product()))
}

impl<B: Backend> Drop for BlockVisit<'_, B> {
    fn drop(&mut self) {
        if self.release {
            self.block.views().for_each(StoredTensor::release);
        }
    }
}

fn stage_block<B: Backend>(be: &B, block: &SharedBlock) -> Result<StagedBlock<B>> {
    let views: Vec<&StoredTensor> = block.tensors.iter().flat_map(|t| &t.stored).collect();
    let mut staged = be.stage_many(&views)?.into_iter();
    Ok(block.tensors.iter().map(|t| staged.by_ref().take(t.stored.len()).collect()).collect())
}

/// A thread that maps a streamed block's pages in while the previous block is computed. At most
/// one request is in flight: a visit first waits for the outstanding one (normally the block it
/// is about to read), so a block is never released while it is being mapped.
struct Prefetcher {
    state: Mutex<PrefetchState>,
    worker: Option<JoinHandle<()>>,
}

struct PrefetchState {
    requests: Option<Sender<usize>>,
    done: Receiver<usize>,
    pending: Option<usize>,
}

impl Prefetcher {
    fn start(blocks: Vec<Vec<StoredTensor>>) -> Self {
        let (requests, rx) = unbounded::<usize>();
        let (done_tx, done) = unbounded::<usize>();
        let worker = std::thread::Builder::new()
            .name("adapt-prefetch".into())
            .spawn(move || {
                for b in rx {
                    blocks[b].iter().for_each(StoredTensor::populate);
                    if done_tx.send(b).is_err() {
                        return;
                    }
                }
            })
            .ok();
        let requests = worker.as_ref().map(|_| requests);
        Prefetcher { state: Mutex::new(PrefetchState { requests, done, pending: None }), worker }
    }

    /// Waits for the outstanding request, then asks for `next` (if any).
    fn wait_and_request(&self, next: Option<usize>) {
        // A poisoned lock only means another thread panicked; prefetching is advisory.
        let Ok(mut s) = self.state.lock() else { return };
        if s.pending.take().is_some() {
            let _ = s.done.recv();
        }
        if let (Some(n), Some(tx)) = (next, &s.requests)
            && tx.send(n).is_ok()
        {
            s.pending = Some(n);
        }
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        if let Ok(mut s) = self.state.lock() {
            s.requests = None;
        }
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}
