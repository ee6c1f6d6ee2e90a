//! An output path that is, contains or lies inside an input is refused before anything is
//! written, with or without `--force`, however the path is spelt (relative, `..`, a symbolic
//! link), for `merge`, `cache-labels` and `adapt`; the inputs' bytes stay the same.
//!
//! `--force` replaces only what symerge wrote: a directory holding the `.symerge-output` marker
//! (which every fresh output carries), an empty directory, or (`cache-labels`) a label cache.
//! A directory of the user's files, a plain file or a symbolic link is refused, untouched.
//!
//! An output name too long for the sibling it is first written as, and a `--rendezvous`
//! directory overlapping the output or an input, are refused before anything is created.

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

/// A model whose files are symbolic links into another directory (Hugging Face's cache layout,
/// or links into an earlier output) lives there too: `--force` onto that directory would replace
/// the input's weights through its links. Refused, naming the linked file (here by merge; every
/// command shares the check).
#[test]
fn outputs_holding_an_inputs_linked_files_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = SyntheticSpec::preset("llama-tiny", FloatDType::BF16).unwrap();
    let dirs = write_family(&spec, 5, 2, 0.01, &tmp.path().join("models"), 1 << 30).unwrap();
    let cfg = tmp.path().join("ta.yml");
    common::write_merge_config(&cfg, &dirs, &["0.5", "0.5"], "merge_method: task_arithmetic\n");
    let prev = tmp.path().join("prev");
    let (ok, _, err) = run(&["merge", cfg.to_str().unwrap(), "-o", prev.to_str().unwrap(), "--device", "cpu"]);
    assert!(ok, "{err}");
    // A snapshot of the earlier output made of links, used as an expert.
    let snap = tmp.path().join("snap");
    std::fs::create_dir(&snap).unwrap();
    for name in ["model.safetensors", "config.json"] {
        std::os::unix::fs::symlink(prev.join(name), snap.join(name)).unwrap();
    }
    let cfg2 = tmp.path().join("ta2.yml");
    let inputs = [dirs[0].clone(), dirs[1].clone(), snap.clone()];
    common::write_merge_config(&cfg2, &inputs, &["0.5", "0.5"], "merge_method: task_arithmetic\n");
    let before = std::fs::read(prev.join("model.safetensors")).unwrap();
    for target in [prev.clone(), tmp.path().join("prev/../prev")] {
        let (ok, _, err) =
            run(&["merge", cfg2.to_str().unwrap(), "-o", target.to_str().unwrap(), "--force", "--device", "cpu"]);
        assert!(!ok, "{} replaced the files an input links to", target.display());
        assert!(err.contains("lies inside the input") && err.contains("snap/model.safetensors"), "{err}");
    }
    assert_eq!(std::fs::read(prev.join("model.safetensors")).unwrap(), before, "the input changed");
    let (ok, _, err) = run(&["merge", cfg2.to_str().unwrap(), "-o", tmp.path().join("new").to_str().unwrap()]);
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

/// Every file under `dir` (recursively, hidden ones included) with its bytes; links are listed
/// with their target, not followed.
fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.is_symlink() {
                out.push((p.clone(), std::fs::read_link(&p).unwrap().into_os_string().into_encoded_bytes()));
            } else if meta.is_dir() {
                out.push((p.clone(), b"<dir>".to_vec()));
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// The marker of a fresh output: one JSON line naming symerge, its version and the command (an
/// argument of which contains `command`).
fn assert_marker(dir: &Path, command: &str) {
    let text = std::fs::read_to_string(dir.join(".symerge-output"))
        .unwrap_or_else(|e| panic!("{} has no .symerge-output: {e}", dir.display()));
    assert_eq!(text.lines().count(), 1, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["written_by"], "symerge", "{text}");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"), "{text}");
    let args: Vec<&str> = v["command"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert!(args.iter().any(|a| a.contains(command)), "{text}");
}

#[test]
fn merge_force_replaces_only_what_symerge_wrote() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = SyntheticSpec::preset("llama-tiny", FloatDType::BF16).unwrap();
    let dirs = write_family(&spec, 4, 2, 0.01, &tmp.path().join("models"), 1 << 30).unwrap();
    for d in &dirs {
        assert_marker(d, "output_guard"); // written by this test process
    }
    let cfg = tmp.path().join("ta.yml");
    common::write_merge_config(&cfg, &dirs, &["0.5", "0.5"], "merge_method: task_arithmetic\n");
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let merge = |out: &Path, force: bool| {
        let mut args = vec!["merge", cfg.to_str().unwrap(), "-o", out.to_str().unwrap(), "--device", "cpu", "-q"];
        if force {
            args.push("--force");
        }
        run(&args)
    };

    // A fresh output carries the marker.
    let ours = work.join("merged");
    let (ok, _, err) = merge(&ours, false);
    assert!(ok, "{err}");
    assert_marker(&ours, "merge");
    let weights = std::fs::read(ours.join("model.safetensors")).unwrap();
    // (a) Over a previous symerge output: refused without --force, replaced with it (a file
    // added to it since goes with it).
    std::fs::write(ours.join("stale.txt"), "left over").unwrap();
    let (ok, _, err) = merge(&ours, false);
    assert!(!ok && err.contains("already exists") && err.contains("--force"), "{err}");
    let (ok, _, err) = merge(&ours, true);
    assert!(ok, "{err}");
    assert!(!ours.join("stale.txt").exists(), "the old output was not replaced");
    assert_eq!(std::fs::read(ours.join("model.safetensors")).unwrap(), weights);
    assert_marker(&ours, "--force");

    // (c) An empty directory is replaced.
    let empty = work.join("empty");
    std::fs::create_dir(&empty).unwrap();
    let (ok, _, err) = merge(&empty, true);
    assert!(ok, "{err}");
    assert_eq!(std::fs::read(empty.join("model.safetensors")).unwrap(), weights);
    assert_marker(&empty, "merge");

    // (b) A directory of the user's files without the marker, (d) a plain file, a symbolic link
    // to a directory (the user's, or even a symerge output), and a marker that is no marker:
    // refused with --force, naming the path and why; nothing changes anywhere under `work`.
    let user = work.join("user-dir");
    std::fs::create_dir_all(user.join("sub")).unwrap();
    std::fs::write(user.join("notes.txt"), "precious").unwrap();
    std::fs::write(user.join("sub/data.bin"), [1u8, 2, 3]).unwrap();
    let file = work.join("user-file");
    std::fs::write(&file, "precious too").unwrap();
    let link_user = work.join("link-to-user-dir");
    std::os::unix::fs::symlink(&user, &link_user).unwrap();
    let link_ours = work.join("link-to-output");
    std::os::unix::fs::symlink(&ours, &link_ours).unwrap();
    let fake = work.join("fake-marker");
    std::fs::create_dir(&fake).unwrap();
    std::fs::write(fake.join(".symerge-output"), "not json").unwrap();
    std::fs::write(fake.join("notes.txt"), "precious").unwrap();
    let before = tree(&work);
    for (out, why) in [
        (&user, "is not empty and was not written by symerge (no .symerge-output marker)"),
        (&file, "is a regular file, not a directory symerge wrote"),
        (&link_user, "is a symbolic link"),
        (&link_ours, "is a symbolic link"),
        (&fake, "is not empty and was not written by symerge"),
    ] {
        // Walk-through #13: without --force the reason comes at once, not a `--force` hint
        // that --force then refuses.
        for force in [false, true] {
            let (ok, _, err) = merge(out, force);
            assert!(!ok, "{} was replaced", out.display());
            assert!(err.contains(&format!("output {} {why}", out.display())), "{}: {err}", out.display());
            assert!(err.contains("remove it yourself or choose another output"), "{err}");
            assert!(!err.contains("panicked") && !err.contains("pass --force"), "{err}");
        }
    }
    assert_eq!(tree(&work), before, "a refused --force changed something (or left a partial)");
}

#[test]
fn cache_labels_force_replaces_only_label_caches() {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_gqa");
    let inputs = tmp.path().join("in.jsonl");
    std::fs::write(&inputs, "{\"text\": \"hello world\"}\n").unwrap();
    let other = tmp.path().join("other.jsonl");
    std::fs::write(&other, "{\"text\": \"hello\"}\n{\"text\": \"world again\"}\n").unwrap();
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let label = |texts: &Path, out: &Path, force: bool| {
        let mut args = vec![
            "cache-labels",
            "--expert",
            fixture.to_str().unwrap(),
            "--task",
            "t",
            "--inputs",
            texts.to_str().unwrap(),
            "--top-k",
            "4",
            "-o",
            out.to_str().unwrap(),
            "--json",
        ];
        if force {
            args.push("--force");
        }
        run(&args)
    };
    let rows = |stdout: &str| serde_json::from_str::<serde_json::Value>(stdout).unwrap()["rows"].as_u64().unwrap();

    // (a) A cache of ours made for other inputs: refused without --force, rebuilt with it.
    let cache = work.join("t.labels");
    let (ok, stdout, err) = label(&inputs, &cache, false);
    assert!(ok, "{err}");
    assert_eq!(rows(&stdout), 1);
    assert!(std::fs::read(&cache).unwrap().starts_with(b"SYMLBL"));
    let (ok, _, err) = label(&other, &cache, false);
    assert!(!ok, "a cache for other inputs was replaced without --force: {err}");
    let (ok, stdout, err) = label(&other, &cache, true);
    assert!(ok, "{err}");
    assert_eq!(rows(&stdout), 2, "rebuilt for the other inputs");
    // A damaged cache (header intact) is still ours to rebuild.
    let mut bytes = std::fs::read(&cache).unwrap();
    bytes.truncate(bytes.len() - 3);
    std::fs::write(&cache, &bytes).unwrap();
    let (ok, stdout, err) = label(&inputs, &cache, true);
    assert!(ok, "{err}");
    assert_eq!(rows(&stdout), 1);

    // (b) A directory holding the user's file, an empty directory (a cache is a file), (d) plain
    // files (text, empty, a cache's magic only halfway) and a symbolic link to a cache: refused
    // with --force, untouched, no partial file left.
    let user = work.join("user-dir");
    std::fs::create_dir(&user).unwrap();
    std::fs::write(user.join("notes.txt"), "precious").unwrap();
    let empty = work.join("empty-dir");
    std::fs::create_dir(&empty).unwrap();
    let text = work.join("notes.txt");
    std::fs::write(&text, "precious").unwrap();
    let blank = work.join("blank");
    std::fs::write(&blank, "").unwrap();
    let half = work.join("half-magic");
    std::fs::write(&half, "SYMLBL").unwrap();
    let link = work.join("link.labels");
    std::os::unix::fs::symlink(&cache, &link).unwrap();
    let before = tree(&work);
    for (out, why) in [
        (&user, "is a directory, not a cache file".to_string()),
        (&empty, "is a directory, not a cache file".to_string()),
        (&text, format!("output {} exists and is not a symerge label cache", text.display())),
        (&blank, format!("output {} exists and is not a symerge label cache", blank.display())),
        (&half, format!("output {} exists and is not a symerge label cache", half.display())),
        (&link, format!("output {} is a symbolic link", link.display())),
    ] {
        let (ok, _, err) = label(&inputs, out, true);
        assert!(!ok, "{} was replaced", out.display());
        assert!(err.contains(&why), "{}: {err}", out.display());
        assert!(!err.contains("panicked"), "{err}");
    }
    assert_eq!(tree(&work), before, "a refused --force changed something (or left a partial)");
}

/// `generate` rewrites its own models, refuses a model directory it did not write before writing
/// any, and its fresh models carry the marker.
#[test]
fn generate_replaces_only_its_own_models() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("fam");
    let gen_args = ["generate", "--preset", "llama-tiny", "--experts", "2", "-o", root.to_str().unwrap()];
    let (ok, _, err) = run(&gen_args);
    assert!(ok, "{err}");
    for d in ["base", "expert-1", "expert-2"] {
        assert_marker(&root.join(d), "generate");
    }
    let (ok, _, err) = run(&gen_args);
    assert!(ok, "a second generate over its own output: {err}");
    std::fs::remove_dir_all(root.join("expert-2")).unwrap();
    std::fs::create_dir(root.join("expert-2")).unwrap();
    std::fs::write(root.join("expert-2/mine.txt"), "precious").unwrap();
    let before = tree(&root);
    let (ok, _, err) = run(&gen_args);
    assert!(!ok && err.contains("was not written by symerge"), "{err}");
    assert!(err.contains(&root.join("expert-2").display().to_string()), "{err}");
    assert_eq!(tree(&root), before, "base and expert-1 were rewritten before the refusal");
}

/// Fuzzing round 3: `predict -o /dev/null` (or a FIFO) said "already exists; pass --force",
/// which --force then refused; the first message now says why it cannot be replaced.
#[test]
fn predict_says_at_once_why_a_special_file_is_not_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = tmp.path().join("in.jsonl");
    std::fs::write(&inputs, "{\"text\": \"a\"}\n").unwrap();
    let fifo = tmp.path().join("fifo");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let user = tmp.path().join("user.jsonl");
    std::fs::write(&user, "precious\n").unwrap();
    let model = common::minilm_dir();
    for (out, why) in [
        (Path::new("/dev/null"), "is a special file, not a predictions file"),
        (fifo.as_path(), "is a special file, not a predictions file"),
        (user.as_path(), "exists and is not a predictions file"),
    ] {
        for force in [false, true] {
            let mut args = vec!["predict", model.to_str().unwrap(), "--inputs", inputs.to_str().unwrap()];
            args.extend(["--out", out.to_str().unwrap(), "--device", "cpu"]);
            if force {
                args.push("--force");
            }
            let (ok, _, err) = run(&args);
            assert!(!ok && err.contains(why) && err.contains("remove it yourself"), "{out:?} {force}: {err}");
            assert!(!err.contains("pass --force"), "{err}");
        }
    }
    assert_eq!(std::fs::read_to_string(&user).unwrap(), "precious\n");
}

/// Fuzzing round 4: an output name of 240 to 255 bytes (a legal file name) failed opaquely ("File
/// name too long" on the hidden `.NAME.partial-XXXXXX` staging directory, or the cache's
/// `NAME.partial`). It is now refused before any work, naming the output and the limit, and
/// nothing is created; the longest name that fits is written.
#[test]
fn output_names_too_long_for_their_staging_name_are_refused_up_front() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = SyntheticSpec::preset("llama-tiny", FloatDType::BF16).unwrap();
    let dirs = write_family(&spec, 7, 2, 0.01, &tmp.path().join("models"), 1 << 30).unwrap();
    let cfg = tmp.path().join("ta.yml");
    common::write_merge_config(&cfg, &dirs, &["0.5", "0.5"], "merge_method: task_arithmetic\n");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_gqa");
    let inputs = tmp.path().join("in.jsonl");
    std::fs::write(&inputs, "{\"text\": \"hello world\"}\n").unwrap();
    let merge = |out: &Path| run(&["merge", cfg.to_str().unwrap(), "-o", out.to_str().unwrap(), "--device", "cpu"]);
    let label = |out: &Path| {
        let expert = fixture.to_str().unwrap();
        run(&[
            "cache-labels",
            "--expert",
            expert,
            "--task",
            "t",
            "--inputs",
            inputs.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ])
    };
    let before = tree(tmp.path());
    let long = tmp.path().join("o".repeat(245));
    let (ok, _, err) = merge(&long);
    assert!(!ok, "merge wrote a 245-byte output name");
    assert!(err.contains("is 245 bytes, over the 239 that fit") && err.contains("`.NAME.partial-XXXXXX`"), "{err}");
    assert!(err.contains(&long.display().to_string()), "{err}");
    let long = tmp.path().join("c".repeat(250));
    let (ok, _, err) = label(&long);
    assert!(!ok, "cache-labels wrote a 250-byte output name");
    assert!(err.contains("is 250 bytes, over the 247 that fit") && err.contains("`NAME.partial`"), "{err}");
    assert_eq!(tree(tmp.path()), before, "a refused output left something behind");

    let (ok, _, err) = merge(&tmp.path().join("o".repeat(239)));
    assert!(ok, "the longest name that fits: {err}");
    let (ok, _, err) = label(&tmp.path().join("c".repeat(247)));
    assert!(ok, "the longest name that fits: {err}");
    assert!(tmp.path().join("c".repeat(247)).is_file());
}

/// Runs `merge` with `--rendezvous rdzv` as one rank (`None`) or as rank `r` of 2.
fn merge_ranked(cfg: &Path, out: &Path, rdzv: &Path, rank: Option<usize>) -> std::process::Child {
    let mut cmd = common::symerge();
    for v in symerge::dist::rank::LAUNCHER_VARS {
        cmd.env_remove(v);
    }
    if let Some(r) = rank {
        cmd.env("RANK", r.to_string()).env("WORLD_SIZE", "2");
    }
    cmd.args(["merge", cfg.to_str().unwrap(), "-o", out.to_str().unwrap(), "--force", "--device", "cpu"]);
    cmd.args(["--rendezvous", rdzv.to_str().unwrap(), "--rendezvous-timeout", "20", "--collective-timeout", "20"]);
    cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    cmd.spawn().unwrap()
}

/// Fuzzing round 4: `--rendezvous` was checked against nothing. Onto the output, a forced commit
/// deleted the live rendezvous (the run failed although the output was replaced), or symerge
/// created the output itself and then refused it as existing, leaving `run-default/` behind;
/// onto an input, the ranks wrote their files into the input model. Each is now refused before
/// anything is created, on one rank or two, naming `--rendezvous` and the other path.
#[test]
fn a_rendezvous_directory_overlapping_the_output_or_an_input_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = SyntheticSpec::preset("llama-tiny", FloatDType::BF16).unwrap();
    let dirs = write_family(&spec, 9, 2, 0.01, &tmp.path().join("models"), 1 << 30).unwrap();
    let cfg = tmp.path().join("ta.yml");
    common::write_merge_config(&cfg, &dirs, &["0.5", "0.5"], "merge_method: task_arithmetic\n");
    let out = tmp.path().join("out");
    let (ok, _, err) = run(&["merge", cfg.to_str().unwrap(), "-o", out.to_str().unwrap(), "--device", "cpu"]);
    assert!(ok, "{err}");
    let fresh = tmp.path().join("fresh");
    let before = tree(tmp.path());
    let cases = [
        (&out, out.clone(), "output", &out), // (a) the previous output, replaced with --force
        (&fresh, fresh.clone(), "output", &fresh), // (b) an output not yet there
        (&out, out.join("rdzv"), "output", &out), // inside the output
        (&out, tmp.path().to_path_buf(), "output", &out), // holding it
        (&fresh, dirs[0].clone(), "input", &dirs[0]), // (c) an input model
        (&fresh, dirs[1].join("rdzv"), "input", &dirs[1]), // inside one
        (&fresh, cfg.clone(), "input", &cfg), // the config file
    ];
    for (o, rdzv, role, other) in &cases {
        let rank_runs: Vec<Option<usize>> = if rdzv == *o { vec![None, Some(0)] } else { vec![None] };
        for rank in rank_runs {
            let children = match rank {
                None => vec![merge_ranked(&cfg, o, rdzv, None)],
                Some(_) => (0..2).map(|r| merge_ranked(&cfg, o, rdzv, Some(r))).collect(),
            };
            for child in children {
                let done = child.wait_with_output().unwrap();
                let err = String::from_utf8_lossy(&done.stderr);
                assert!(!done.status.success(), "--rendezvous {} with -o {} was accepted", rdzv.display(), o.display());
                let named = format!(
                    "--rendezvous {} is, contains or lies inside the {role} {}",
                    rdzv.display(),
                    other.display()
                );
                assert!(err.contains(&named), "{err}");
            }
        }
    }
    assert_eq!(tree(tmp.path()), before, "a refused rendezvous created or changed something");
    // Apart from both, one rank merges as before.
    let rdzv = tmp.path().join("rdzv");
    let done = merge_ranked(&cfg, &fresh, &rdzv, None).wait_with_output().unwrap();
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
}

/// `cache-labels` and `adapt` share the check: here a rendezvous inside the expert.
#[test]
fn cache_labels_refuses_a_rendezvous_inside_its_expert() {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_gqa");
    let inputs = tmp.path().join("in.jsonl");
    std::fs::write(&inputs, "{\"text\": \"hello world\"}\n").unwrap();
    let rdzv = fixture.join("rdzv");
    let out = tmp.path().join("t.labels");
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
        "--rendezvous",
        rdzv.to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains(&format!("--rendezvous {} is, contains or lies inside the input", rdzv.display())),
        "{err}"
    );
    assert!(!out.exists() && !rdzv.exists());
}

/// Fuzzing round 6: the guard knew models, data and caches but not the other files a command
/// reads, so `--force` onto an earlier output holding them deleted them: merge's Lambda table,
/// its `tokenizer_source` model and its own config, finetune's `--eval` file, adapt's config.
#[test]
fn every_file_a_command_reads_is_guarded() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let spec = SyntheticSpec::preset("llama-tiny", FloatDType::F32).unwrap();
    let dirs = write_family(&spec, 3, 2, 0.01, &t.join("models"), 1 << 30).unwrap();
    let cfg = t.join("ta.yml");
    common::write_merge_config(&cfg, &dirs, &["0.5", "0.5"], "merge_method: task_arithmetic\n");
    let prev = t.join("prev");
    let (ok, _, err) = run(&["merge", cfg.to_str().unwrap(), "-o", prev.to_str().unwrap()]);
    assert!(ok, "{err}");
    let p = prev.to_str().unwrap();
    // Files of the kinds each command reads, inside that (symerge-written) output.
    std::fs::write(prev.join("lambda.json"), r#"{"lambda": {"model.layers.0": [0.5, 0.5]}}"#).unwrap();
    std::fs::copy(&cfg, prev.join("again.yml")).unwrap();
    std::fs::write(prev.join("eval.jsonl"), "{\"text\": \"hello there\"}\n").unwrap();
    let (present, expert) = (t.join("present"), t.join("expert"));
    std::fs::create_dir(&present).unwrap();
    std::fs::create_dir(&expert).unwrap();
    let (d, e) = (present.display(), expert.display());
    let adapt =
        format!("method: symerge\nbase_model: {d}\ntasks:\n  - {{name: a, expert: {e}, inputs: {d}, cache: {d}}}\n");
    std::fs::write(prev.join("adapt.yml"), adapt).unwrap();
    let extra = |name: &str, body: &str| {
        let path = t.join(name);
        common::write_merge_config(&path, &dirs, &["0.5", "0.5"], body);
        path.to_str().unwrap().to_string()
    };
    let table =
        extra("table.yml", &format!("merge_method: task_arithmetic\nparameters: {{lambda_table: {p}/lambda.json}}\n"));
    let donor = extra("donor.yml", &format!("merge_method: task_arithmetic\ntokenizer_source: {p}\n"));
    let texts = t.join("t.jsonl");
    std::fs::write(&texts, "{\"text\": \"a few words to train on\"}\n").unwrap();
    let lm = common::fixture_dir("llama_gqa");
    let (again, adapt_cfg, eval) = (prev.join("again.yml"), prev.join("adapt.yml"), prev.join("eval.jsonl"));
    let cases: Vec<(Vec<&str>, PathBuf)> = vec![
        (vec!["merge", &table, "-o", p], prev.join("lambda.json")),
        (vec!["merge", &donor, "-o", p], prev.clone()),
        (vec!["merge", again.to_str().unwrap(), "-o", p], again.clone()),
        (
            vec![
                "finetune",
                lm.to_str().unwrap(),
                "--train",
                texts.to_str().unwrap(),
                "--eval",
                eval.to_str().unwrap(),
                "-o",
                p,
            ],
            eval.clone(),
        ),
        (vec!["adapt", adapt_cfg.to_str().unwrap(), "-o", p], adapt_cfg.clone()),
    ];
    let before = tree(&prev);
    for (args, input) in cases {
        let (ok, _, err) = run(&[&args[..], &["--force"]].concat());
        assert!(
            !ok && err.contains("lies inside the input") && err.contains(input.to_str().unwrap()),
            "{args:?}: {err}"
        );
        assert_eq!(tree(&prev), before, "{args:?} changed the earlier output");
    }
}

/// Fuzzing round 6: `-o .` (or `out/.`) over an earlier output merged every block and then
/// failed the final rename with "Device or resource busy"; `adapt -o .` in an empty directory
/// trained and then blamed the directory. A path that does not end in a name is refused before
/// any work, with the name to give instead; the earlier output stays as it was.
#[test]
fn an_output_path_ending_in_dot_is_refused_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("models");
    let spec = SyntheticSpec::preset("llama-tiny", FloatDType::BF16).unwrap();
    let dirs = write_family(&spec, 3, 1, 0.01, &root, 1 << 30).unwrap();
    let cfg = tmp.path().join("ta.yml");
    common::write_merge_config(&cfg, &dirs, &["0.5"], "merge_method: task_arithmetic\n");
    let out = tmp.path().join("out");
    let (ok, _, err) = run(&["merge", cfg.to_str().unwrap(), "-o", out.to_str().unwrap(), "--device", "cpu"]);
    assert!(ok, "{err}");
    let before = digest(&out);
    let named = format!("give it by name (`{}`)", std::fs::canonicalize(&out).unwrap().display());
    for (dir, path) in [(tmp.path(), "out/."), (out.as_path(), "."), (out.as_path(), "./"), (&out.join("sub"), "..")] {
        std::fs::create_dir_all(dir).unwrap();
        let args = ["merge", cfg.to_str().unwrap(), "-o", path, "--device", "cpu", "--force"];
        let res = common::symerge().args(args).current_dir(dir).output().unwrap();
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(!res.status.success() && err.contains("the path does not end in a name"), "{path}: {err}");
        assert!(err.contains(&named) && !err.contains("block"), "{path}: {err}");
    }
    std::fs::remove_dir(out.join("sub")).unwrap();
    assert_eq!(digest(&out), before);
}

/// Fuzzing round 6: `predict -o -` wrote a file named `-` (rc 0, nothing on stdout), where most
/// tools mean standard output. An output of `-` is refused, saying how to name such a file.
#[test]
fn an_output_of_dash_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = tmp.path().join("in.jsonl");
    std::fs::write(&inputs, "{\"text\": \"a text\"}\n").unwrap();
    let m = common::minilm_dir();
    let args = ["predict", m.to_str().unwrap(), "--new-head", "2", "--inputs", inputs.to_str().unwrap(), "-o", "-"];
    let res = common::symerge().args(args).current_dir(tmp.path()).output().unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success() && err.contains("not to standard output") && err.contains("./-"), "{err}");
    assert!(!tmp.path().join("-").exists());
}
