//! Large f32 buffers recycled between the CPU backend's ops.
//!
//! A streamed adaptation step merges every shared tensor twice and takes its weight gradient
//! once, each a fresh tensor-sized vector; above glibc's mmap threshold (32 MiB at most) every
//! one is a new mapping, so the kernel faults in and zeroes each page and unmaps it after: on
//! the llama-1b family about 13 GB a step. Ops whose output is fully overwritten ([`take`]) draw
//! from this pool instead, and the adaptation loop hands the buffers back ([`give`]) when a
//! block is done with them.
//!
//! The pool holds nothing until [`set_limit`] gives it room, and never more than that many
//! bytes, so a peak-memory bound that counted the buffers while they were live still holds;
//! `set_limit(0)` empties it (before the outputs are written, say).

use std::sync::Mutex;

/// Buffers smaller than this (in elements, 1 MiB) are left to the allocator, which reuses them
/// cheaply.
const MIN_ELEMS: usize = 1 << 18;

/// Freed buffers and the room they may take.
struct Pool {
    limit: usize,
    held: usize,
    bufs: Vec<Vec<f32>>,
}

impl Pool {
    const fn new() -> Self {
        Pool { limit: 0, held: 0, bufs: Vec::new() }
    }

    fn set_limit(&mut self, bytes: usize) {
        self.limit = bytes;
        while self.held > self.limit {
            let Some(b) = self.bufs.pop() else { break };
            self.held -= b.capacity() * 4;
        }
    }

    /// The smallest held buffer that holds `n` without wasting more than half of itself,
    /// resized to `n`.
    fn take(&mut self, n: usize) -> Option<Vec<f32>> {
        if n < MIN_ELEMS {
            return None;
        }
        let fits = |b: &Vec<f32>| b.capacity() >= n && b.capacity() / 2 <= n;
        let (i, _) = self.bufs.iter().enumerate().filter(|(_, b)| fits(b)).min_by_key(|(_, b)| b.capacity())?;
        let mut b = self.bufs.swap_remove(i);
        self.held -= b.capacity() * 4;
        b.resize(n, 0.0);
        Some(b)
    }

    fn give(&mut self, b: Vec<f32>) {
        let bytes = b.capacity() * 4;
        if b.capacity() >= MIN_ELEMS && self.held + bytes <= self.limit {
            self.held += bytes;
            self.bufs.push(b);
        }
    }
}

static POOL: Mutex<Pool> = Mutex::new(Pool::new());

fn with_pool<T>(f: impl FnOnce(&mut Pool) -> T) -> T {
    // A panic while holding the lock leaves the pool consistent (a push or a remove), so a
    // poisoned lock is still usable.
    f(&mut POOL.lock().unwrap_or_else(|p| p.into_inner()))
}

/// Lets the pool keep up to `bytes` of freed buffers; 0 empties it.
pub fn set_limit(bytes: usize) {
    with_pool(|p| p.set_limit(bytes));
}

/// A vector of `n` elements whose values are unspecified (zeros, or a recycled buffer's old
/// values): for outputs the caller overwrites entirely.
pub fn take(n: usize) -> Vec<f32> {
    with_pool(|p| p.take(n)).unwrap_or_else(|| vec![0f32; n])
}

/// Hands a buffer back for a later [`take`]; dropped when the pool has no room for it.
pub fn give(b: Vec<f32>) {
    if b.capacity() >= MIN_ELEMS {
        with_pool(|p| p.give(b));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_within_the_limit_and_fit_the_request() {
        let n = MIN_ELEMS * 2;
        let mut p = Pool::new();
        p.give(vec![1.0; n]);
        assert_eq!(p.held, 0, "no room before set_limit");

        p.set_limit(3 * n * 4);
        for v in 1..=4 {
            p.give(vec![v as f32; n]);
        }
        assert_eq!(p.held, 3 * n * 4, "the fourth did not fit");
        p.give(vec![9.0; MIN_ELEMS - 1]);
        assert_eq!(p.bufs.len(), 3, "small buffers are left to the allocator");

        let b = p.take(n - 5).expect("a held buffer fits");
        assert_eq!(b.len(), n - 5);
        assert!(b.iter().all(|&v| v == b[0]) && (1.0..=3.0).contains(&b[0]), "a recycled buffer");
        assert!(p.take(n / 4).is_none(), "a buffer four times too big is not used");
        assert!(p.take(n + 1).is_none(), "nor one too small");
        assert!(p.take(MIN_ELEMS - 1).is_none());
        assert_eq!(p.held, 2 * n * 4);

        p.set_limit(n * 4);
        assert_eq!((p.held, p.bufs.len()), (n * 4, 1), "a lower limit drops what no longer fits");
        p.set_limit(0);
        assert_eq!((p.held, p.bufs.len()), (0, 0));
    }
}
