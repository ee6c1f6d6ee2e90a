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
    // A log that is not a terminal (a job log, a pipe) has no colour codes.
    assert!(!err.contains('\x1b'), "colour codes in a piped log: {err:?}");
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

/// `--help` and a bad flag exit as clap does on every command, and `--json` output parses on the
/// commands that are quick to run here.
#[test]
fn every_command_has_help_refuses_bad_flags_and_prints_json() {
    let commands = [
        "inspect",
        "merge",
        "bench-cuda",
        "methods",
        "predict",
        "eval",
        "finetune",
        "import-gguf",
        "generate",
        "data",
        "dist-check",
        "cache-labels",
        "adapt",
    ];
    for c in commands {
        let (ok, out, err) = run(&[c, "--help"]);
        assert!(ok && out.contains("Usage: symerge"), "{c} --help: {err}");
        let (ok, _, err) = run(&[c, "--no-such-flag"]);
        assert!(!ok && err.contains("unexpected argument '--no-such-flag'"), "{c}: {err}");
    }
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("fam");
    let json = |args: &[&str]| -> serde_json::Value {
        let (ok, out, err) = run(args);
        assert!(ok, "{args:?}: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}): {out}"))
    };
    let g = json(&["generate", "--experts", "1", "-o", out_dir.to_str().unwrap(), "--json", "-q"]);
    assert_eq!(g["models"].as_array().map(Vec::len), Some(2), "{g}");
    let p = json(&["--json", "generate", "--list"]);
    assert_eq!(p["presets"][0]["name"], "llama-tiny", "{p}");
    let m = json(&["--json", "methods"]);
    let names: Vec<&str> = m["methods"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"ties") && names.contains(&"slerp"), "{names:?}");
    let base = out_dir.join("base");
    let i = json(&["inspect", base.to_str().unwrap(), "--json"]);
    assert!(i["tensors"].as_u64().unwrap() > 0, "{i}");
    for (size, why) in [("0", "at least one byte"), ("5XB", "is not a size")] {
        let (ok, _, err) = run(&["generate", "-o", out_dir.to_str().unwrap(), "--out-shard-size", size]);
        assert!(!ok && err.contains("--out-shard-size") && err.contains(why), "{size}: {err}");
    }
    let d = json(&["dist-check", "--json"]);
    assert_eq!(d["world_size"], 1, "{d}");
}

/// A log and the `--json` of one run say the same, and values print as the user spells them:
/// `merge` logged `merging 2 model(s)` where its JSON said `"models": 3` (it counts the base), and
/// now counts experts and base alike in both; `methods` printed whole defaults as `0.0` and
/// broke its columns on long parameter names; `finetune` logged `Constant schedule` (a Rust
/// name) for `--schedule constant`, and its JSON gave `--lr 1e-3` as 0.0010000000474974513. A
/// `--json` caller got no machine-readable error: it now gets `{"error": ...}` on stdout.
#[test]
fn logs_and_json_agree_and_values_print_as_given() {
    let tmp = tempfile::tempdir().unwrap();
    let fam = tmp.path().join("fam");
    let (ok, _, err) =
        run(&["generate", "--preset", "llama-tiny", "--experts", "2", "-o", fam.to_str().unwrap(), "-q"]);
    assert!(ok, "{err}");
    let cfg = tmp.path().join("m.yml");
    let dirs = [fam.join("base"), fam.join("expert-1"), fam.join("expert-2")];
    common::write_merge_config(&cfg, &dirs, &["0.5", "0.5"], "merge_method: task_arithmetic\n");
    let merged = tmp.path().join("merged");
    let (ok, out, err) = run(&["merge", cfg.to_str().unwrap(), "-o", merged.to_str().unwrap(), "--json"]);
    assert!(ok, "{err}");
    assert!(err.contains("merging 2 expert(s) + base with task_arithmetic"), "{err}");
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((s["experts"].as_u64(), s["models"].as_u64()), (Some(2), Some(3)), "{s}");
    assert!(s["base_model"].as_str().is_some_and(|b| b.ends_with("base")), "{s}");
    // A failure under --json is an object on stdout too (stdout was empty), with a nonzero exit.
    let (ok, out, err) = run(&["merge", cfg.to_str().unwrap(), "-o", merged.to_str().unwrap(), "--json"]);
    let e: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out:?} ({err})"));
    let msg = e["error"].as_str().unwrap_or_default();
    assert!(!ok && msg.contains(merged.to_str().unwrap()) && err.contains(msg), "{e} / {err}");
    // So is a command line clap refuses (fuzzing round 5: stdout was empty), and --help stays text.
    for args in
        [&["merge", "--json", "--no-such-flag"][..], &["--json", "merge"], &["merge", "--threads", "x", "--json"]]
    {
        let (ok, out, err) = run(args);
        let e: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out:?}"));
        let msg = e["error"].as_str().unwrap_or_default();
        assert!(!ok && !msg.is_empty() && err.contains(msg.lines().next().unwrap()), "{args:?}: {e} / {err}");
    }
    let (ok, out, _) = run(&["merge", "--help", "--json"]);
    assert!(ok && out.contains("Usage:") && serde_json::from_str::<serde_json::Value>(&out).is_err(), "{out}");

    let (ok, text, err) = run(&["methods"]);
    assert!(ok, "{err}");
    let line = |name: &str| text.lines().find(|l| l.split_whitespace().next() == Some(name)).unwrap_or("");
    assert!(line("seed").ends_with("(default 0)"), "{}", line("seed"));
    assert!(line("max_iter").contains("(default 10)"), "{}", line("max_iter"));
    // Every parameter's description starts in one column, after the longest name.
    let doc_column = |l: &str| {
        let name_end = l.len() - l.trim_start().len() + l.trim_start().find(' ').unwrap();
        name_end + l[name_end..].len() - l[name_end..].trim_start().len()
    };
    let columns: std::collections::BTreeSet<usize> =
        text.lines().filter(|l| l.starts_with(' ')).map(doc_column).collect();
    assert_eq!(columns.len(), 1, "description columns {columns:?}:\n{text}");

    let train = tmp.path().join("t.jsonl");
    std::fs::write(&train, "{\"text\": \"the cat sat on the mat\"}\n{\"text\": \"merging models\"}\n").unwrap();
    let llama = common::fixture_dir("llama_gqa");
    let tuned = tmp.path().join("tuned");
    let (ok, out, err) = run(&[
        "finetune",
        llama.to_str().unwrap(),
        "--train",
        train.to_str().unwrap(),
        "-o",
        tuned.to_str().unwrap(),
        "--steps",
        "1",
        "--max-len",
        "16",
        "--lr",
        "1e-3",
        "--json",
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("(constant schedule,"), "{err}");
    let f: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(f["lr"].as_f64(), Some(0.001), "{f}");
}

/// The commands whose `--help` is pinned in tests/fixtures/cli_help.txt.
const HELP_COMMANDS: [&[&str]; 15] = [
    &[],
    &["inspect"],
    &["merge"],
    &["bench-cuda"],
    &["methods"],
    &["predict"],
    &["eval"],
    &["finetune"],
    &["import-gguf"],
    &["generate"],
    &["data"],
    &["data", "prepare"],
    &["dist-check"],
    &["cache-labels"],
    &["adapt"],
];

/// One command's help as sorted `ARG :: HELP` lines after its about line: every argument's name,
/// short form, value name, default and help text, and which are required, but not the order clap
/// lists them in, so moving a flag into another struct stays free while renaming, rewording or
/// requiring one does not.
fn help_entries(help: &str) -> Vec<String> {
    let about = help.lines().next().unwrap_or_default().to_string();
    let mut entries: Vec<String> = Vec::new();
    let mut in_list = false;
    for line in help.lines() {
        if let Some(usage) = line.strip_prefix("Usage: ") {
            // Which flags are required: the usage line's words, in any order.
            let mut words: Vec<&str> = usage.split_whitespace().collect();
            words.sort_unstable();
            entries.push(format!("Usage :: {}", words.join(" ")));
        } else if line.ends_with(':') && !line.starts_with(' ') {
            in_list = matches!(line, "Arguments:" | "Options:" | "Commands:");
        } else if in_list && matches!(line.len() - line.trim_start().len(), 2 | 6) {
            let (arg, text) = line.trim().split_once("  ").unwrap_or((line.trim(), ""));
            entries.push(format!("{arg} :: {}", text.trim()));
        } else if in_list && !line.trim().is_empty() {
            let last = entries.last_mut().expect("a continuation line follows an entry");
            if !last.ends_with(":: ") {
                last.push(' ');
            }
            last.push_str(line.trim());
        }
    }
    entries.sort();
    std::iter::once(about).chain(entries).collect()
}

/// Users' scripts and habits rely on every flag's name, short form and default, and the help
/// text is the documentation: both are pinned per command, whichever struct defines them.
/// `SYMERGE_BLESS_HELP=1` rewrites the fixture after an intended change.
#[test]
fn every_flag_keeps_its_name_default_and_help() {
    let mut got = String::new();
    for cmd in HELP_COMMANDS {
        let args: Vec<&str> = cmd.iter().copied().chain(["--help"]).collect();
        let (ok, out, err) = run(&args);
        assert!(ok, "{cmd:?} --help: {err}");
        got.push_str(&format!("## {}\n", cmd.join(" ")));
        for entry in help_entries(&out) {
            got.push_str(&entry);
            got.push('\n');
        }
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cli_help.txt");
    if std::env::var_os("SYMERGE_BLESS_HELP").is_some() {
        std::fs::write(&path, &got).unwrap();
    }
    let want = std::fs::read_to_string(&path).unwrap();
    for (g, w) in got.lines().zip(want.lines()) {
        assert_eq!(g, w, "help differs from {} (first difference shown)", path.display());
    }
    assert_eq!(got.lines().count(), want.lines().count(), "help has other entries than {}", path.display());
}
