//! The README's first command at toy size: `scripts/demo.sh --quick` runs every step of the demo
//! (data, fine-tuning, training-free merges tuned on validation, label caches, SyMerge) and prints
//! the accuracy table with every method and a finite accuracy for each task.

mod common;

#[test]
fn quick_demo_runs_every_step_and_prints_the_table() {
    common::minilm_dir();
    common::debian_dir();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new("bash").arg(root.join("scripts/demo.sh")).arg("--quick").output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    for method in ["pretrained", "experts", "linear", "task_arithmetic", "ties", "symerge-seed0"] {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(&format!("| {method} |")))
            .unwrap_or_else(|| panic!("no `{method}` row in:\n{stdout}"));
        let cells: Vec<f64> = row.split('|').filter_map(|c| c.trim().parse().ok()).collect();
        assert_eq!(cells.len(), 3, "{method}: two tasks and the average in `{row}`");
        assert!(cells.iter().all(|a| a.is_finite() && (0.0..=100.0).contains(a)), "{row}");
    }
    assert!(stdout.contains("adapt/symerge-seed0/"), "{stdout}");
}
