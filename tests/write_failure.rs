//! A write that fails part-way (the disk full, a quota, a file-size limit) ends the run with an
//! error naming the file being written, a non-zero exit and no partial output; the inputs are
//! untouched. The failure is made real with `RLIMIT_FSIZE`: past the limit `write(2)` fails with
//! EFBIG, as it fails with ENOSPC on a full disk, on whichever route (direct or page cache) the
//! shard writer takes. symerge ignores SIGXFSZ so the limit is an error it reports and cleans up
//! after, not a signal that kills it with the partial output left behind.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use symerge::checkpoint::FloatDType;
use symerge::checkpoint::generate::{Family, SyntheticSpec, write_family};

/// `symerge args` with every file it writes limited to `limit` bytes.
fn run_limited(args: &[&str], limit: u64) -> Output {
    let mut cmd = common::symerge();
    cmd.args(args);
    // SAFETY: setrlimit(2) only, between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit { rlim_cur: limit, rlim_max: limit };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().unwrap()
}

/// Everything in `dir`, recursively, with its bytes: to show the inputs are untouched.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn a_write_failing_mid_merge_is_reported_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = SyntheticSpec {
        family: Family::Llama,
        vocab: 4000,
        hidden: 256,
        intermediate: 704,
        layers: 6,
        heads: 4,
        kv_heads: 4,
        dtype: FloatDType::BF16,
    };
    // One shard of about 14 MB a model. The limits below fall inside the first 8 MB write of the
    // direct route, and after it (that write succeeds, the next one fails part-way).
    let dirs = write_family(&spec, 3, 2, 0.01, &tmp.path().join("models"), 50_000_000).unwrap();
    let inputs = snapshot(&tmp.path().join("models"));
    let cfg = tmp.path().join("ta.yml");
    common::write_merge_config(&cfg, &dirs, &["0.5", "0.5"], "merge_method: task_arithmetic\n");
    let outdir = tmp.path().join("out");
    std::fs::create_dir_all(&outdir).unwrap();
    let out = outdir.join("merged");
    let args = ["merge", cfg.to_str().unwrap(), "-o", out.to_str().unwrap(), "--device", "cpu"];
    for limit in [1_000_000u64, 10_000_000] {
        let res = run_limited(&args, limit);
        let stderr = String::from_utf8_lossy(&res.stderr);
        assert!(!res.status.success(), "limit {limit}: the merge succeeded");
        assert!(res.status.code().is_some(), "limit {limit}: killed by a signal: {:?}", res.status);
        assert!(!stderr.contains("panicked"), "limit {limit}: {stderr}");
        assert!(
            stderr.contains(".safetensors") && stderr.to_lowercase().contains("file too large"),
            "limit {limit}: the error names neither the file nor the cause: {stderr}"
        );
        assert!(!stderr.contains("rank 0/1"), "a single process's error names a rank: {stderr}");
        // The file as the output will hold it, not its hidden staging directory.
        let named = stderr.contains(&format!("error: {}/model", out.display()));
        assert!(named && !stderr.contains(".partial-"), "limit {limit}: {stderr}");
        assert!(entries(&outdir).is_empty(), "limit {limit} left {:?}", entries(&outdir));
    }
    assert!(snapshot(&tmp.path().join("models")) == inputs, "an input changed");
    // Without the limit the same merge completes: the failures above came from the limit.
    let res = run_limited(&args, libc::RLIM_INFINITY);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    assert!(out.join("config.json").exists());
}

#[test]
fn a_write_failing_mid_generate_leaves_no_model_and_no_empty_family() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("family");
    let args = ["generate", "--preset", "llama-tiny", "--experts", "1", "-o", out.to_str().unwrap()];
    let res = run_limited(&args, 4096);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.code() == Some(1), "{:?}: {stderr}", res.status);
    assert!(stderr.contains(".safetensors") && stderr.to_lowercase().contains("file too large"), "{stderr}");
    assert!(entries(tmp.path()).is_empty(), "left {:?}", entries(tmp.path()));
    let res = run_limited(&args, libc::RLIM_INFINITY);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    assert_eq!(entries(&out), ["base", "expert-1"]);
}

/// A small output written in one piece (`predict --out`) fails the same way, naming the output
/// once: the error used to carry the path twice, once from `tempfile`'s own wrapper, and then
/// named the hidden temporary file (fuzzing round 6).
#[test]
fn a_write_failing_in_predict_names_its_file_once() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = tmp.path().join("texts.jsonl");
    let lines: String = (0..40).map(|i| format!("{{\"text\": \"text number {i} about nothing\"}}\n")).collect();
    std::fs::write(&inputs, lines).unwrap();
    let outdir = tmp.path().join("out");
    std::fs::create_dir_all(&outdir).unwrap();
    let preds = outdir.join("p.jsonl");
    let m = common::minilm_dir();
    let args = [
        "predict",
        m.to_str().unwrap(),
        "--new-head",
        "3",
        "--inputs",
        inputs.to_str().unwrap(),
        "-o", // the short form every writing command takes
        preds.to_str().unwrap(),
        "--device",
        "cpu",
    ];
    let res = run_limited(&args, 1000);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.code() == Some(1), "{:?}: {stderr}", res.status);
    assert!(stderr.to_lowercase().contains("file too large"), "{stderr}");
    assert!(!stderr.contains(".tmp-"), "the hidden temporary file is named: {stderr}");
    let named = preds.display().to_string();
    assert_eq!(stderr.matches(&named).count(), 1, "the output is not named once: {stderr}");
    assert!(entries(&outdir).is_empty(), "left {:?}", entries(&outdir));
    assert!(run_limited(&args, libc::RLIM_INFINITY).status.success());
    assert_eq!(entries(&outdir), ["p.jsonl"]);
}

/// Fuzzing round 6: adapt's task models are staged inside its own staging directory, and a write
/// failing there was reported under `.OUT.partial-Xy12Zq/tasks/.TASK.partial-Ab34Cd/`; the
/// error names the file as the output will hold it.
#[test]
fn a_write_failing_in_adapt_names_the_task_model_in_the_output() {
    let f = common::adapt_fixture::fixture();
    let out = f.root.join("out");
    let cfg = f.root.join("adapt.yml");
    let args = ["adapt", cfg.to_str().unwrap(), "-o", out.to_str().unwrap(), "--epochs", "1", "--no-eval"];
    let inputs = snapshot(&f.root);
    let res = run_limited(&args, 200_000);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.code() == Some(1), "{:?}: {stderr}", res.status);
    let named =
        ["alpha", "beta"].iter().any(|t| stderr.contains(&format!("error: {}/", out.join("tasks").join(t).display())));
    assert!(named && stderr.to_lowercase().contains("file too large"), "{stderr}");
    assert!(!stderr.contains(".partial-"), "{stderr}");
    assert!(!out.exists() && snapshot(&f.root) == inputs);
}
