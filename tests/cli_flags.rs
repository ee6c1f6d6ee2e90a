//! Flags every command shares: `-q` silences progress and info logs whichever command it is
//! given to (before or after the command name), and contradicting flags are refused.

mod common;

use common::run;

#[test]
fn quiet_silences_every_command_and_refuses_verbose() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = |name: &str| tmp.path().join(name).to_str().unwrap().to_string();
    // Without -q, generate logs what it writes; with -q (after or before the command) nothing.
    let (ok, _, err) = run(&["generate", "--preset", "llama-tiny", "--experts", "1", "-o", &dir("loud")]);
    assert!(ok && err.contains("INFO"), "{err}");
    let (ok, _, err) = run(&["generate", "--preset", "llama-tiny", "--experts", "1", "-o", &dir("quiet"), "-q"]);
    assert!(ok && err.is_empty(), "generate -q printed: {err}");
    let (ok, out, err) = run(&["-q", "inspect", &dir("quiet/base"), "--json"]);
    assert!(ok && err.is_empty() && out.contains("\"tensors\""), "{err}");
    // merge -q (its old spelling) still works, and is silent.
    let cfg = tmp.path().join("m.yml");
    common::write_merge_config(
        &cfg,
        &[tmp.path().join("quiet/base"), tmp.path().join("quiet/expert-1")],
        &["1.0"],
        "merge_method: task_arithmetic\n",
    );
    let (ok, _, err) = run(&["merge", cfg.to_str().unwrap(), "-o", &dir("merged"), "-q", "--device", "cpu"]);
    assert!(ok && err.is_empty(), "merge -q printed: {err}");
    // Errors still reach stderr under -q.
    let (ok, _, err) = run(&["-q", "inspect", &dir("missing")]);
    assert!(!ok && err.contains("missing"), "{err}");
    let (ok, _, err) = run(&["-q", "-v", "inspect", &dir("quiet/base")]);
    assert!(!ok && err.contains("--quiet") && err.contains("--verbose"), "{err}");
}
