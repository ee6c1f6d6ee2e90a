//! Interruptions leave nothing half-written: SIGINT and SIGTERM during a merge remove its
//! partial output before the process exits; what a SIGKILL-ed run leaves is removed by the next
//! run at the same output; `generate` killed mid-model leaves no truncated model.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use symerge::checkpoint::FloatDType;
use symerge::checkpoint::generate::{SyntheticSpec, write_family};

/// Hidden `.partial-` entries in `dir`.
fn partials(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|r| r.flatten().map(|e| e.path()).filter(|p| p.to_string_lossy().contains(".partial-")).collect())
        .unwrap_or_default()
}

/// Starts `symerge args`, waits until a partial output appears in `watch` (the run is writing),
/// lets it work `after`, then sends `signal`; returns whether it exited successfully and its code.
fn interrupt(args: &[&str], watch: &Path, after: Duration, signal: i32) -> (bool, Option<i32>) {
    let mut child = common::symerge()
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while partials(watch).is_empty() {
        assert!(child.try_wait().unwrap().is_none(), "{args:?} finished before it could be interrupted");
        assert!(start.elapsed() < Duration::from_secs(60), "no partial output appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(after);
    // SAFETY: plain kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
    let status = child.wait().unwrap();
    (status.success(), status.code())
}

#[test]
fn interrupted_runs_leave_no_partial_output() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = SyntheticSpec::preset("llama-rss", FloatDType::BF16).unwrap();
    let dirs = write_family(&spec, 5, 2, 0.01, &tmp.path().join("models"), 300_000_000).unwrap();
    let cfg = tmp.path().join("ta.yml");
    common::write_merge_config(&cfg, &dirs, &["0.5", "0.5"], "merge_method: task_arithmetic\n");
    let outdir = tmp.path().join("out");
    std::fs::create_dir_all(&outdir).unwrap();
    let out = outdir.join("merged");
    let args = ["merge", cfg.to_str().unwrap(), "-o", out.to_str().unwrap(), "--device", "cpu"];
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let (ok, code) = interrupt(&args, &outdir, Duration::from_millis(300), signal);
        assert!(!ok && code == Some(130), "signal {signal}: exit {code:?}");
        assert!(partials(&outdir).is_empty() && !out.exists(), "signal {signal} left {:?}", partials(&outdir));
    }
    // SIGKILL cannot be caught: the partial stays until the next run at the same output.
    let (ok, _) = interrupt(&args, &outdir, Duration::from_millis(300), libc::SIGKILL);
    assert!(!ok);
    assert_eq!(partials(&outdir).len(), 1, "a killed run leaves its partial");
    let (ok, _, err) = common::run(&args);
    assert!(ok, "{err}");
    assert!(partials(&outdir).is_empty(), "the next run removed the dead run's partial: {:?}", partials(&outdir));
    assert!(out.join("model.safetensors").is_file());

    // `generate` builds each model in a staging directory: killed, it leaves no model.
    let generated = tmp.path().join("gen");
    let gen_args = ["generate", "--preset", "llama-rss", "--experts", "1", "-o", generated.to_str().unwrap()];
    std::fs::create_dir_all(&generated).unwrap();
    let (ok, _) = interrupt(&gen_args, &generated, Duration::from_millis(100), libc::SIGKILL);
    assert!(!ok);
    assert!(!generated.join("base").exists(), "a killed generate left a half-written base model");

    // Stopped once the base is complete (its expert is being staged), it leaves no model at all:
    // every model is staged before any is renamed into place, so no base stands without experts.
    let mut child = common::symerge()
        .args(gen_args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let expert_staging = || partials(&generated).iter().any(|p| p.to_string_lossy().contains(".expert-1.partial-"));
    while !expert_staging() {
        assert!(child.try_wait().unwrap().is_none(), "generate finished before its expert was staged");
        assert!(start.elapsed() < Duration::from_secs(120), "the expert's staging never appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: plain kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert!(!generated.join("base").exists() && !generated.join("expert-1").exists(), "a partial family was left");
    assert!(partials(&generated).is_empty(), "{:?}", partials(&generated));
}
