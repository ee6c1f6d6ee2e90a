//! `cache-labels` and `merge` split over 2 real processes through the file rendezvous: the
//! stitched label cache is byte-identical to the one-process cache, and the merged tensors are
//! identical to the one-process merge (the shard layout may differ).

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::adapt_fixture::fixture;
use common::{read_model, run, symerge};

/// Runs `args` as every rank of a world of `world` through `rdzv`; panics naming a failed rank.
fn run_ranks(world: usize, rdzv: &Path, args: &[&str]) {
    let children: Vec<Child> = (0..world)
        .map(|r| {
            let mut cmd: Command = symerge();
            for v in symerge::dist::rank::LAUNCHER_VARS {
                cmd.env_remove(v);
            }
            cmd.env("RANK", r.to_string()).env("WORLD_SIZE", world.to_string());
            cmd.args(args).args(["--rendezvous", rdzv.to_str().unwrap(), "--rendezvous-timeout", "60"]);
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
        })
        .collect();
    for (r, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "rank {r} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn two_ranks_write_the_same_label_cache_bytes() {
    let f = fixture();
    let r = &f.root;
    // Batches of 5 over 12 inputs: 5, 5, 2; rank 0 runs two batches and rank 1 one.
    let args = |out: &str| -> Vec<String> {
        [
            "cache-labels",
            "--expert",
            r.join("expert-beta").to_str().unwrap(),
            "--task",
            "beta",
            "--inputs",
            r.join("beta.jsonl").to_str().unwrap(),
            "-o",
            r.join(out).to_str().unwrap(),
            "--max-len",
            "32",
            "--batch-size",
            "5",
        ]
        .map(String::from)
        .to_vec()
    };
    let single = args("single.labels");
    let (ok, _, err) = run(&single.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    let split = args("split.labels");
    run_ranks(2, &r.join("rdzv"), &split.iter().map(String::as_str).collect::<Vec<_>>());
    let (a, b) = (std::fs::read(r.join("single.labels")).unwrap(), std::fs::read(r.join("split.labels")).unwrap());
    assert_eq!(a.len(), b.len());
    assert!(a == b, "the stitched cache differs from the one-process cache");
    let leftovers: Vec<String> = std::fs::read_dir(r)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("split.labels."))
        .collect();
    assert!(leftovers.is_empty(), "parts left behind: {leftovers:?}");
    // adapt's reader accepts it for this expert and these inputs.
    let cache = symerge::labels::LabelCache::open(&r.join("split.labels"), None).unwrap();
    assert_eq!((cache.rows(), cache.classes()), (12, 4));
}

#[test]
fn two_ranks_merge_the_same_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (ok, _, err) = run(&[
        "generate",
        "--preset",
        "llama-tiny",
        "-o",
        root.join("family").to_str().unwrap(),
        "--experts",
        "2",
        "--dtype",
        "float32",
    ]);
    assert!(ok, "{err}");
    // DARE draws its random drops per tensor: a rank must draw what one process draws.
    let cfg = root.join("merge.yml");
    std::fs::write(
        &cfg,
        "merge_method: dare_ties\nbase_model: family/base\nparameters: {weight: 1.0, density: 0.5, seed: 7}\nmodels:\n  - model: family/expert-1\n  - model: family/expert-2\n",
    )
    .unwrap();
    let merge = |out: &str| -> Vec<String> {
        [
            "merge",
            cfg.to_str().unwrap(),
            "-o",
            root.join(out).to_str().unwrap(),
            "-q",
            "--device",
            "cpu",
            "--out-shard-size",
            "200KB",
        ]
        .map(String::from)
        .to_vec()
    };
    let single = merge("single");
    let (ok, _, err) = run(&single.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    let split = merge("split");
    run_ranks(2, &root.join("rdzv"), &split.iter().map(String::as_str).collect::<Vec<_>>());

    let (a, b) = (read_model(&root.join("single")), read_model(&root.join("split")));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "tensor names");
    for (name, (dt, shape, values)) in &a {
        let (dt2, shape2, values2) = &b[name];
        assert_eq!((dt, shape), (dt2, shape2), "{name}");
        assert!(values.iter().zip(values2).all(|(x, y)| x.to_bits() == y.to_bits()), "{name} differs");
    }
    let shards = std::fs::read_dir(root.join("split"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "safetensors"))
        .count();
    assert!(shards >= 2, "both ranks wrote shards");
    assert!(root.join("split/model.safetensors.index.json").exists());
    assert!(root.join("split/config.json").exists());
    let leftovers: Vec<String> = std::fs::read_dir(root)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "staging left behind: {leftovers:?}");
}
