//! Data-parallel `adapt` on the real small setup of tests/adapt.rs: the shards' all-reduced
//! gradients equal the full batch's (uneven and empty shards included), 2 and 3 real processes
//! through the file rendezvous learn the single process's Lambda, and a rank killed mid-run
//! makes the others fail within the collective timeout.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::adapt_fixture::{Fixture, fixture};
use common::reference::rel_diff;
use common::{read_model, symerge};
use symerge::adapt::classifier::Adapter;
use symerge::adapt::config::AdaptConfig;
use symerge::backend::Cpu;
use symerge::dist::{Collective, LocalGroup};

/// `symerge adapt` as rank `rank` of `world` (no launcher variables for world 1).
fn adapt_rank(rank: usize, world: usize, cfg: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut cmd = symerge();
    for v in symerge::dist::rank::LAUNCHER_VARS {
        cmd.env_remove(v);
    }
    if world > 1 {
        cmd.env("RANK", rank.to_string()).env("WORLD_SIZE", world.to_string());
    }
    cmd.args(["adapt", cfg.to_str().unwrap(), "-o", out.to_str().unwrap(), "--json", "--log-every", "0"]);
    cmd.args(extra).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

fn finish(child: Child) -> (bool, String, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The small config with a batch of 5 (uneven over 2 and 3 ranks) and fewer epochs.
fn dist_config(f: &Fixture, epochs: usize) -> std::path::PathBuf {
    let text = std::fs::read_to_string(f.root.join("adapt.yml"))
        .unwrap()
        .replace("batch_size: 6", "batch_size: 5")
        .replace("epochs: 12", &format!("epochs: {epochs}"));
    let path = f.root.join("dist.yml");
    std::fs::write(&path, text).unwrap();
    path
}

fn lambda_values(dir: &Path) -> Vec<(String, Vec<f64>)> {
    let table: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("lambda.json")).unwrap()).unwrap();
    table["lambda"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()))
        .collect()
}

#[test]
fn shard_gradients_all_reduce_to_the_full_batch_gradient() {
    let f = fixture();
    let a = Adapter::load(Cpu, AdaptConfig::load(&f.root.join("adapt.yml")).unwrap()).unwrap();
    // 3 rows over 4 ranks leaves rank 3 without rows; 5 over 2 and 3 is uneven.
    for (rows, world) in [(&[0usize, 3, 5, 8, 11][..], 2), (&[0, 3, 5, 8, 11][..], 3), (&[1, 2, 7][..], 4)] {
        for task in 0..2 {
            let full = a.loss_and_grads(task, rows).unwrap();
            let results: Vec<_> = std::thread::scope(|s| {
                let handles: Vec<_> = LocalGroup::ranks(world, Duration::from_secs(60))
                    .into_iter()
                    .map(|mut c| {
                        let a = &a;
                        s.spawn(move || {
                            let g = a.loss_and_grads_in(task, rows, &mut c).unwrap();
                            (c.rank(), g)
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let norm: f64 = full.lambda.iter().map(|g| g * g).sum::<f64>().sqrt();
            assert!(norm > 0.0);
            for (rank, g) in &results {
                let what = format!("rows {rows:?} world {world} task {task} rank {rank}");
                assert_eq!(g.kept, full.kept, "{what}");
                assert!(
                    (g.loss - full.loss).abs() <= 1e-5 * full.loss.abs(),
                    "{what}: loss {} vs {}",
                    g.loss,
                    full.loss
                );
                let diff: f64 = g.lambda.iter().zip(&full.lambda).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
                // Rounding only: a shard's products have other shapes than the full batch's, and
                // the gemm crate's k blocks (so an element's last bits) follow the shape. Measured
                // up to 1.2e-5 (Lambda) and 1.3e-5 (adapted layers) relative, one text per rank.
                assert!(diff <= 3e-5 * norm, "{what}: Lambda gradient off by {diff:e} of {norm:e}");
                assert_eq!(g.lambda, results[0].1.lambda, "{what}: ranks hold different Lambda gradients");
                for (name, p) in &full.private[0] {
                    let (want, got) = (&p.buf, &g.private[0][name].buf);
                    let scale = want.iter().map(|x| x.abs()).fold(0.0, f32::max);
                    let worst = want.iter().zip(got).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
                    assert!(worst <= 3e-5 * scale, "{what}: {name} off by {worst} of {scale}");
                    assert_eq!(got, &results[0].1.private[0][name].buf, "{what}: {name} differs across ranks");
                }
            }
        }
    }
}

#[test]
fn two_and_three_processes_learn_the_single_process_lambda() {
    let f = fixture();
    let cfg = dist_config(&f, 4);
    let single = f.root.join("single");
    let (ok, stdout, err) = finish(adapt_rank(0, 1, &cfg, &single, &[]).spawn().unwrap());
    assert!(ok, "{err}");
    let want: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let want_lambda = lambda_values(&single);

    for world in [2, 3] {
        let out = f.root.join(format!("out-{world}"));
        let rdzv = f.root.join("rdzv");
        let children: Vec<Child> = (0..world)
            .map(|r| {
                adapt_rank(
                    r,
                    world,
                    &cfg,
                    &out,
                    &[
                        "--rendezvous",
                        rdzv.to_str().unwrap(),
                        "--job-id",
                        &format!("w{world}"),
                        "--rendezvous-timeout",
                        "60",
                    ],
                )
                .spawn()
                .unwrap()
            })
            .collect();
        let results: Vec<_> = children.into_iter().map(finish).collect();
        for (r, (ok, _, err)) in results.iter().enumerate() {
            assert!(ok, "world {world} rank {r} failed:\n{err}");
        }
        assert!(results[1].2.contains("agree on all"), "the ranks compared their Lambda: {}", results[1].2);
        let got: serde_json::Value = serde_json::from_str(&results[0].1).unwrap();
        assert_eq!(got["world_size"], world);
        assert_eq!(got["steps"], want["steps"]);
        let names = |s: &serde_json::Value| -> Vec<String> {
            s["tasks"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap().to_string()).collect()
        };
        assert_eq!(names(&got), names(&want), "world {world}: task set");
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
        assert_eq!(names(&summary["summary"]), names(&want), "world {world}: summary.json task set");

        let got_lambda = lambda_values(&out);
        assert_eq!(got_lambda.len(), want_lambda.len());
        // Shards sum in another order than one batch (and Adam rescales small gradients), so the
        // values agree to rounding, not bit for bit: 3e-5 relative over the whole table, 2e-4 for
        // any one coefficient. (Measured: 7.5e-6 with the merge summing into the base element by
        // element, 1.0e-5 with the kernel's order, differences summed first, 1.27e-5 (worst
        // coefficient 1.14e-4) with the gemm crate's shape-dependent k blocks: the size of this
        // noise follows the rounding pattern, not a bug.) The key biases are left out: their gradient is zero in exact
        // arithmetic (softmax ignores a constant added to every score of a query), so Adam turns
        // whatever rounding noise they get into lr-sized steps, in any summation order.
        let (mut diff, mut norm, mut worst) = (0f64, 0f64, 0f64);
        for ((kw, w), (kg, g)) in want_lambda.iter().zip(&got_lambda) {
            assert_eq!(kw, kg);
            if kw.ends_with("attention.self.key.bias") {
                continue;
            }
            for (x, y) in w.iter().zip(g) {
                let rel = rel_diff(*x, *y, 1e-2);
                assert!(rel <= 2e-4, "world {world} {kw}: {y} vs single {x}");
                worst = worst.max(rel);
                diff += (x - y).powi(2);
                norm += x * x;
            }
        }
        let rel = (diff / norm).sqrt();
        eprintln!("world {world}: Lambda relative difference {rel:e} (worst coefficient {worst:e})");
        assert!(rel <= 3e-5, "world {world}: relative Lambda difference {rel:e}");
        // Lambda moved, so the comparison means something.
        assert!(want_lambda.iter().flat_map(|(_, v)| v).any(|x| (x - 0.3).abs() > 1e-3));

        // The adapted heads agree too, and only rank 0 wrote: one output, no leftovers. Adam
        // turns the shards' rounding into step-sized differences on near-zero gradients, so the
        // bound is relative to how far training moved the head from the expert's (1%).
        let expert = read_model(&f.root.join("expert-beta"));
        let (a, b) = (read_model(&single.join("tasks/beta")), read_model(&out.join("tasks/beta")));
        let (e, a, b) = (&expert["classifier.weight"].2, &a["classifier.weight"].2, &b["classifier.weight"].2);
        let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
        let moved = a.iter().zip(e).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
        eprintln!("world {world}: adapted head differs by {worst:e}; training moved it by {moved:e}");
        assert!(
            moved > 1e-3 && worst <= 1e-2 * moved,
            "world {world}: adapted head differs by {worst} (moved {moved})"
        );
        let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
        assert_eq!(log.lines().count(), want["steps"].as_u64().unwrap() as usize);
        let partial: Vec<_> = std::fs::read_dir(&f.root)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("partial"))
            .collect();
        assert!(partial.is_empty(), "staging left behind: {partial:?}");
    }
}

#[test]
fn a_rank_killed_mid_run_fails_the_others_within_the_timeout() {
    let f = fixture();
    let cfg = dist_config(&f, 500);
    let rdzv = f.root.join("rdzv");
    let out = f.root.join("out");
    let timeout = 5.0;
    let mut children: Vec<Child> = (0..3)
        .map(|r| {
            adapt_rank(
                r,
                3,
                &cfg,
                &out,
                &["--rendezvous", rdzv.to_str().unwrap(), "--collective-timeout", &timeout.to_string()],
            )
            .spawn()
            .unwrap()
        })
        .collect();
    // Wait until training is under way: collective #10's files appear in the run directory.
    let run_dir = rdzv.join("run-default");
    let start = Instant::now();
    let under_way = || {
        std::fs::read_dir(&run_dir).is_ok_and(|d| {
            d.filter_map(|e| e.ok()).any(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.split(".op").nth(1).and_then(|s| s.split('.').next()).and_then(|s| s.parse::<u64>().ok()) >= Some(10)
            })
        })
    };
    while !under_way() {
        assert!(start.elapsed() < Duration::from_secs(120), "training never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut victim = children.remove(2);
    victim.kill().unwrap();
    victim.wait().unwrap();
    let killed = Instant::now();
    let results: Vec<_> = children.into_iter().map(finish).collect();
    let elapsed = killed.elapsed();
    for (r, (ok, _, err)) in results.iter().enumerate() {
        assert!(!ok, "rank {r} should fail once rank 2 is gone");
        assert!(err.contains(&format!("rank {r}/3")), "rank {r}: {err}");
        assert!(err.contains("rank(s) 2") || err.contains("aborted by rank"), "rank {r} names the cause: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    assert!(elapsed < Duration::from_secs_f64(timeout + 10.0), "took {elapsed:?} for a {timeout} s timeout");
    assert!(!out.exists(), "a failed run wrote output");
}
