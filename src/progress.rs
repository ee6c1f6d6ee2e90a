//! Progress for long work: an indicatif bar on a terminal, `tracing` log lines otherwise, so
//! headless runs (CI, SLURM logs) still show where they are.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// Byte-based progress of one job.
pub struct Progress {
    label: &'static str,
    bar: Option<ProgressBar>,
    enabled: bool,
    total: u64,
    done: u64,
    start: Instant,
    last_log: Instant,
}

impl Progress {
    /// `enabled = false` reports nothing (library use, `--quiet`).
    pub fn new(label: &'static str, total_bytes: u64, enabled: bool) -> Self {
        let bar = (enabled && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(total_bytes);
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} {msg}",
                )
                .expect("static template")
                .progress_chars("=> "),
            );
            bar.set_prefix(label);
            bar
        });
        let now = Instant::now();
        Progress { label, bar, enabled, total: total_bytes, done: 0, start: now, last_log: now }
    }

    /// Records that `bytes` more were processed, finishing step `what`.
    pub fn advance(&mut self, what: &str, bytes: u64) {
        self.done += bytes;
        if let Some(bar) = &self.bar {
            bar.set_message(what.to_string());
            bar.set_position(self.done);
        } else if self.enabled && (self.last_log.elapsed() >= Duration::from_secs(2) || self.done == self.total) {
            self.last_log = Instant::now();
            let secs = self.start.elapsed().as_secs_f64().max(1e-9);
            tracing::info!(
                "{}: {what} done, {:.1}% of {:.2} GB, {:.2} GB/s",
                self.label,
                100.0 * self.done as f64 / self.total.max(1) as f64,
                self.total as f64 / 1e9,
                self.done as f64 / secs / 1e9
            );
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
