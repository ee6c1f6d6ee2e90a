//! An output path that is, contains or lies inside an input is refused before anything is
//! written, with or without `--force`, however the path is spelt (relative, `..`, a symbolic
//! link), for `merge`, `cache-labels` and `adapt`; the inputs' bytes stay the same.

mod common;

use std::path::{Path, PathBuf};

use common::run;
use symerge::checkpoint::FloatDType;
use symerge::checkpoint::generate::{SyntheticSpec, write_family};

fn digest(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out: Vec<(PathBuf, String)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let h = blake3::hash(&std::fs::read(&p).unwrap()).to_hex().to_string();
            (p, h)
        })
        .collect();
    out.sort();
    out
}

#[test]
fn merge_refuses_outputs_over_its_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("models");
    let spec = SyntheticSpec::preset("llama-tiny", FloatDType::BF16).unwrap();
    let dirs = write_family(&spec, 3, 2, 0.01, &root, 1 << 30).unwrap();
    let cfg = tmp.path().join("ta.yml");
    common::write_merge_config(&cfg, &dirs, &["0.5", "0.5"], "merge_method: task_arithmetic\n");
    let before: Vec<_> = dirs.iter().map(|d| digest(d)).collect();
    std::os::unix::fs::symlink(&dirs[1], tmp.path().join("link")).unwrap();
    let spellings = [
        dirs[0].clone(),                    // the base itself
        dirs[2].clone(),                    // an expert
        dirs[0].join("merged"),             // inside the base
        root.clone(),                       // holding every input
        root.join("expert-1/../base"),      // `..`
        tmp.path().join("link"),            // a symbolic link to an input
        tmp.path().join("link/sub/merged"), // inside it, not yet existing
    ];
    for out in &spellings {
        for force in [false, true] {
            let mut args = vec!["merge", cfg.to_str().unwrap(), "-o", out.to_str().unwrap(), "--device", "cpu"];
            if force {
                args.push("--force");
            }
            let (ok, _, err) = run(&args);
            assert!(!ok, "{} (force {force}) was accepted", out.display());
            assert!(err.contains("lies inside the input"), "{}: {err}", out.display());
        }
    }
    let after: Vec<_> = dirs.iter().map(|d| digest(d)).collect();
    assert_eq!(before, after, "an input changed");
    assert!(!dirs[0].join("merged").exists() && !tmp.path().join("link/sub").exists());
    // Beside the inputs is fine.
    let (ok, _, err) =
        run(&["merge", cfg.to_str().unwrap(), "-o", root.join("merged").to_str().unwrap(), "--device", "cpu"]);
    assert!(ok, "{err}");
}

#[test]
fn cache_labels_refuses_to_write_over_its_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_gqa");
    let inputs = tmp.path().join("in.jsonl");
    std::fs::write(&inputs, "{\"text\": \"hello world\"}\n").unwrap();
    let text = std::fs::read(&inputs).unwrap();
    for out in [inputs.clone(), fixture.join("labels")] {
        let (ok, _, err) = run(&[
            "cache-labels",
            "--expert",
            fixture.to_str().unwrap(),
            "--task",
            "t",
            "--inputs",
            inputs.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--force",
        ]);
        assert!(!ok && err.contains("lies inside the input"), "{}: {err}", out.display());
    }
    assert_eq!(std::fs::read(&inputs).unwrap(), text);
    assert!(!fixture.join("labels").exists());
}
