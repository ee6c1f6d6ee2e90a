//! The README's first command at toy size: `scripts/demo.sh --quick` runs every step of the demo
//! (data, fine-tuning, training-free merges tuned on validation, label caches, SyMerge) and prints
//! the accuracy table with every method and a finite accuracy for each task, under the row labels
//! of README's demo table, each tuned method's with the lambda it chose. `SYMERGE_BIN` and `OUT`
//! point it at a binary (no `cargo build`) and an output directory.

mod common;

use std::path::Path;

/// A row label with every number replaced by `N`: the quick run's lambdas and epochs differ
/// from the README's, its labels' wording must not.
fn shape(label: &str) -> String {
    let mut out = String::new();
    for c in label.chars() {
        if c.is_ascii_digit() || (c == '.' && out.ends_with('N')) {
            if !out.ends_with('N') {
                out.push('N');
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The first cell of each row of the first Markdown table headed `| method |` in `text`.
fn row_labels(text: &str) -> Vec<String> {
    text.lines()
        .skip_while(|l| !l.starts_with("| method |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| l.split('|').nth(1).unwrap_or("").trim().to_string())
        .collect()
}

#[test]
fn quick_demo_runs_every_step_and_prints_the_table() {
    common::minilm_dir();
    common::debian_dir();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    // With SYMERGE_BIN the demo must not build: a `cargo` that fails stands first on PATH.
    let fake = tmp.path().join("bin");
    std::fs::create_dir(&fake).unwrap();
    std::fs::write(fake.join("cargo"), "#!/bin/sh\necho 'cargo was run' >&2\nexit 1\n").unwrap();
    std::fs::set_permissions(fake.join("cargo"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", fake.display(), std::env::var("PATH").unwrap_or_default());
    let bin = std::env::var_os("SYMERGE_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_symerge").into());
    let w = tmp.path().join("demo-out");
    let out = std::process::Command::new("bash")
        .arg(root.join("scripts/demo.sh"))
        .arg("--quick")
        .env("SYMERGE_BIN", bin)
        .env("OUT", &w)
        .env("PATH", path)
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");

    let quality: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(w.join("quality.json")).unwrap()).unwrap();
    let tuned = &quality["tuned"];
    let labels = row_labels(&stdout);
    let lambda_in = |label: &str| -> f64 {
        let after = label.split("lambda ").nth(1).unwrap_or_else(|| panic!("no lambda in `{label}`"));
        after.split(',').next().unwrap().parse().unwrap()
    };
    for label in &labels {
        let row = stdout.lines().find(|l| l.starts_with(&format!("| {label} |"))).unwrap();
        let cells: Vec<f64> = row.split('|').skip(2).filter_map(|c| c.trim().parse().ok()).collect();
        assert_eq!(cells.len(), 3, "{label}: two tasks and the average in `{row}`");
        assert!(cells.iter().all(|a| a.is_finite() && (0.0..=100.0).contains(a)), "{row}");
        if label.starts_with("task_arithmetic") {
            assert_eq!(lambda_in(label), tuned["task_arithmetic_lambda"].as_f64().unwrap(), "{label}");
        }
        if label.starts_with("ties") {
            assert_eq!(lambda_in(label), tuned["ties_lambda"].as_f64().unwrap(), "{label}");
        }
    }
    // The README's demo table has the same rows, worded the same (numbers aside).
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let printed: Vec<String> = labels.iter().map(|l| shape(l)).collect();
    let documented: Vec<String> = row_labels(&readme).iter().map(|l| shape(l)).collect();
    assert_eq!(printed, documented, "printed rows vs README's demo table");
    assert!(labels.contains(&"symerge (seed 0, 2 epochs)".to_string()), "{labels:?}");
    assert!(!stdout.contains("average over"), "one seed has no spread to report:\n{stdout}");
    assert!(stdout.contains(&format!("Outputs in {}/", w.display())), "{stdout}");
    assert!(w.join("adapt/symerge-seed0/lambda.json").is_file());
}
