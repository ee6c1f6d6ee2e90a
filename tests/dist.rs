//! Distributed foundations without a GPU: rank discovery from each launcher's variables, the file
//! rendezvous between real processes (including a missing rank timing out), the in-process
//! collective, and the data-parallel identity (per-rank gradients combine into the full-batch
//! gradient).

mod common;

use common::reference::norm_rel;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{randoms, symerge};
use symerge::Error;
use symerge::dist::data_parallel::{average_gradients, param_hash, shard_range, verify_digest, verify_identical};
use symerge::dist::{Collective, LocalGroup, LocalRank, RankInfo, RankSource};

// ---------------------------------------------------------------- rank discovery

fn discover(pairs: &[(&str, &str)]) -> symerge::Result<RankInfo> {
    RankInfo::from_lookup(&|name| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string()))
}

/// The error must exist and name `var`.
fn expect_env_error(pairs: &[(&str, &str)], var: &str) {
    match discover(pairs) {
        Err(Error::Env { var: v, reason }) => {
            assert_eq!(v, var, "{pairs:?}: wrong variable blamed ({reason})");
            let msg = Error::Env { var: v, reason }.to_string();
            assert!(msg.contains(var), "{msg}");
        }
        other => panic!("{pairs:?}: expected an error naming {var}, got {other:?}"),
    }
}

#[test]
fn torchrun_environment() {
    let info = discover(&[
        ("RANK", "5"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_RANK", "1"),
        ("MASTER_ADDR", "node07"),
        ("MASTER_PORT", "29500"),
        ("TORCHELASTIC_RUN_ID", "job-42"),
    ])
    .unwrap();
    assert_eq!((info.rank, info.world_size, info.local_rank, info.source), (5, 8, 1, RankSource::Torchrun));
    assert_eq!(info.master, Some(("node07".to_string(), 29500)));
    assert_eq!(info.run_id.as_deref(), Some("job-42"));
}

#[test]
fn slurm_environment() {
    let info =
        discover(&[("SLURM_PROCID", "3"), ("SLURM_NTASKS", "4"), ("SLURM_LOCALID", "1"), ("SLURM_JOB_ID", "991")])
            .unwrap();
    assert_eq!((info.rank, info.world_size, info.local_rank, info.source), (3, 4, 1, RankSource::Slurm));
    assert_eq!(info.run_id.as_deref(), Some("991"));
    assert_eq!(info.master, None);
}

#[test]
fn torchrun_wins_over_slurm_and_nothing_means_single() {
    // `srun torchrun ...`: both sets present; torchrun's ranks are the workers' ranks.
    let info = discover(&[
        ("RANK", "2"),
        ("WORLD_SIZE", "16"),
        ("LOCAL_RANK", "2"),
        ("TORCHELASTIC_RESTART_COUNT", "0"),
        ("SLURM_PROCID", "0"),
        ("SLURM_NTASKS", "2"),
    ])
    .unwrap();
    assert_eq!((info.rank, info.world_size, info.source), (2, 16, RankSource::Torchrun));

    let single = discover(&[("SLURM_JOB_ID", "5"), ("SLURM_NTASKS", "4")]).unwrap();
    assert_eq!((single.rank, single.world_size, single.local_rank, single.source), (0, 1, 0, RankSource::Single));
    assert!(single.is_single());

    // A hand launch without LOCAL_RANK is one node: the local rank is the rank.
    let manual = discover(&[("RANK", "1"), ("WORLD_SIZE", "2")]).unwrap();
    assert_eq!(manual.local_rank, 1);
}

#[test]
fn bad_environments_name_the_variable() {
    expect_env_error(&[("RANK", "one"), ("WORLD_SIZE", "2")], "RANK");
    expect_env_error(&[("RANK", "-1"), ("WORLD_SIZE", "2")], "RANK");
    expect_env_error(&[("RANK", "0"), ("WORLD_SIZE", "2.5")], "WORLD_SIZE");
    expect_env_error(&[("RANK", "0"), ("WORLD_SIZE", "0")], "WORLD_SIZE");
    expect_env_error(&[("RANK", "2"), ("WORLD_SIZE", "2")], "RANK");
    expect_env_error(&[("RANK", "0")], "WORLD_SIZE");
    expect_env_error(&[("WORLD_SIZE", "4")], "RANK");
    expect_env_error(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "x")], "LOCAL_RANK");
    expect_env_error(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "2")], "LOCAL_RANK");
    expect_env_error(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")], "MASTER_PORT");
    expect_env_error(
        &[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "99999")],
        "MASTER_PORT",
    );
    expect_env_error(&[("SLURM_PROCID", "0")], "SLURM_NTASKS");
    expect_env_error(&[("SLURM_PROCID", "4"), ("SLURM_NTASKS", "4")], "SLURM_PROCID");
    expect_env_error(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "x")], "SLURM_NTASKS");
    expect_env_error(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2"), ("SLURM_LOCALID", "?")], "SLURM_LOCALID");
}

// ---------------------------------------------------------------- dist-check across processes

fn dist_check(env: &[(&str, String)], args: &[&str]) -> Command {
    let mut cmd = symerge();
    for v in symerge::dist::rank::LAUNCHER_VARS {
        cmd.env_remove(v);
    }
    cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    cmd.arg("dist-check").args(args).arg("--elements").arg("1000");
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

fn spawn_rank(rank: usize, world: usize, dir: &std::path::Path, timeout: &str) -> Child {
    dist_check(
        &[("RANK", rank.to_string()), ("WORLD_SIZE", world.to_string())],
        &["--rendezvous", dir.to_str().unwrap(), "--rendezvous-timeout", timeout, "--json"],
    )
    .spawn()
    .unwrap()
}

struct Finished {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn finish(child: Child) -> Finished {
    let out = child.wait_with_output().unwrap();
    Finished {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn three_processes_rendezvous_and_agree_on_the_sum() {
    let tmp = tempfile::tempdir().unwrap();
    let children: Vec<Child> = (0..3).map(|r| spawn_rank(r, 3, tmp.path(), "20")).collect();
    let reports: Vec<serde_json::Value> = children
        .into_iter()
        .map(|c| {
            let f = finish(c);
            assert!(f.ok, "rank failed:\n{}", f.stderr);
            serde_json::from_str(f.stdout.trim()).unwrap()
        })
        .collect();
    let mut ranks: Vec<u64> = reports.iter().map(|r| r["rank"].as_u64().unwrap()).collect();
    ranks.sort();
    assert_eq!(ranks, [0, 1, 2]);
    for r in &reports {
        assert_eq!(r["world_size"], 3);
        assert_eq!(r["backend"], "file");
        assert_eq!(r["source"], "env", "RANK/WORLD_SIZE without torchrun's TORCHELASTIC_* variables");
        assert_eq!(r["sum_hash"], reports[0]["sum_hash"], "ranks disagree on the sum");
    }
    // The hash is of the expected sum: rank r contributes (r + 1) + i % 7.
    let expected: Vec<f32> = (0..1000).map(|i| 6.0 + 3.0 * (i % 7) as f32).collect();
    assert_eq!(reports[0]["sum_hash"], format!("{:016x}", param_hash(&expected)));
}

#[test]
fn a_missing_rank_times_out_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let children: Vec<Child> = (0..2).map(|r| spawn_rank(r, 3, tmp.path(), "2")).collect();
    let results: Vec<Finished> = children.into_iter().map(finish).collect();
    let elapsed = start.elapsed();
    for (rank, f) in results.iter().enumerate() {
        assert!(!f.ok, "rank {rank} should fail when rank 2 never starts");
        assert!(f.stderr.contains(&format!("rank {rank}/3")), "rank {rank}: {}", f.stderr);
        assert!(f.stderr.contains("rank(s) 2 of 3 never arrived"), "rank {rank}: {}", f.stderr);
        assert!(f.stderr.contains(tmp.path().to_str().unwrap()), "names the directory: {}", f.stderr);
        assert!(!f.stderr.contains("panicked"), "{}", f.stderr);
    }
    assert!(elapsed >= Duration::from_secs(2), "gave up before the timeout: {elapsed:?}");
    assert!(elapsed < Duration::from_secs(8), "took {elapsed:?} for a 2 s timeout");
}

/// Fuzzing round 3: `--rendezvous-timeout 1e19` panicked adding it to an instant, and
/// `2^64-1` seconds converting it to a duration. A timeout that large (or `inf`) waits without
/// limit.
#[test]
fn a_huge_timeout_means_no_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let (max, dir) = ("18446744073709551615", tmp.path().to_str().unwrap());
    let timeouts = [["1e19", max], [max, "inf"]];
    let children: Vec<Child> = (0..2)
        .map(|r| {
            let env = [("RANK", r.to_string()), ("WORLD_SIZE", "2".to_string())];
            let [rdzv, coll] = timeouts[r];
            let args = ["--rendezvous", dir, "--rendezvous-timeout", rdzv, "--collective-timeout", coll];
            dist_check(&env, &args).spawn().unwrap()
        })
        .collect();
    for f in children.into_iter().map(finish) {
        assert!(f.ok && !f.stderr.contains("panicked"), "{}", f.stderr);
    }
}

#[test]
fn a_missing_rank_zero_is_named_too() {
    let tmp = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let results: Vec<Finished> =
        (1..3).map(|r| spawn_rank(r, 3, tmp.path(), "1")).collect::<Vec<_>>().into_iter().map(finish).collect();
    for f in &results {
        assert!(!f.ok);
        assert!(f.stderr.contains("rank(s) 0 of 3 never arrived"), "{}", f.stderr);
        assert!(f.stderr.contains("rank 0 never wrote the rendezvous payload"), "{}", f.stderr);
    }
    assert!(start.elapsed() < Duration::from_secs(6));
}

#[test]
fn one_process_needs_no_launcher() {
    let f = finish(dist_check(&[], &["--json"]).spawn().unwrap());
    assert!(f.ok, "{}", f.stderr);
    let report: serde_json::Value = serde_json::from_str(f.stdout.trim()).unwrap();
    assert_eq!((report["world_size"].as_u64(), report["backend"].as_str()), (Some(1), Some("single")));
    let expected: Vec<f32> = (0..1000).map(|i| 1.0 + (i % 7) as f32).collect();
    assert_eq!(report["sum_hash"], format!("{:016x}", param_hash(&expected)));
}

#[test]
fn several_ranks_need_a_directory_and_nccl_says_why_not() {
    let env = [("SLURM_PROCID", "0".to_string()), ("SLURM_NTASKS", "2".to_string())];
    let by_hand = [("RANK", "0".to_string()), ("WORLD_SIZE", "2".to_string())];
    for env in [&env, &by_hand] {
        let f = finish(dist_check(env, &[]).spawn().unwrap());
        assert!(!f.ok);
        assert!(f.stderr.contains("rank 0/2: a world of 2 ranks needs --rendezvous DIR"), "{}", f.stderr);
        // Fuzzing round 3: the rank was named twice (`rank 0/2: rank 0/2 (local 0, torchrun): ...`).
        assert_eq!(f.stderr.matches("rank 0/2").count(), 1, "{}", f.stderr);
    }

    let tmp = tempfile::tempdir().unwrap();
    let f =
        finish(dist_check(&env, &["--rendezvous", tmp.path().to_str().unwrap(), "--backend", "nccl"]).spawn().unwrap());
    assert!(!f.ok);
    assert!(f.stderr.contains("NCCL backend"), "{}", f.stderr);
    assert!(!f.stderr.contains("panicked"), "{}", f.stderr);

    let f = finish(dist_check(&[("RANK", "0".into()), ("WORLD_SIZE", "zero".into())], &[]).spawn().unwrap());
    assert!(!f.ok);
    assert!(f.stderr.contains("WORLD_SIZE"), "{}", f.stderr);
}

// ---------------------------------------------------------------- in-process collective

/// Runs `f` on every rank of a fresh group, each on its own thread; results by rank.
fn on_ranks<T: Send + 'static>(
    world: usize,
    timeout: Duration,
    f: impl Fn(&mut LocalRank) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let handles: Vec<_> = LocalGroup::ranks(world, timeout)
        .into_iter()
        .map(|mut rank| {
            let f = f.clone();
            std::thread::spawn(move || f(&mut rank))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn rank_data(rank: usize, n: usize) -> Vec<f32> {
    randoms(100 + rank as u64, n, 1e3).into_iter().map(|v| v as f32).collect()
}

#[test]
fn local_all_reduce_is_the_rank_order_sum_on_every_rank_every_run() {
    let n = 4099;
    for world in 2..=4 {
        let mut expected = rank_data(0, n);
        for r in 1..world {
            for (e, v) in expected.iter_mut().zip(rank_data(r, n)) {
                *e += v;
            }
        }
        let exact: Vec<f64> =
            (0..n).map(|i| (0..world).map(|r| randoms(100 + r as u64, n, 1e3)[i] as f32 as f64).sum()).collect();
        for run in 0..3u64 {
            let results = on_ranks(world, Duration::from_secs(10), move |c| {
                // Arrive in a different order each run.
                std::thread::sleep(Duration::from_millis((c.rank() as u64 * 7 + run * 5) % 13));
                let mut buf = rank_data(c.rank(), n);
                c.all_reduce_sum_f32(&mut buf).unwrap();
                buf
            });
            for (rank, got) in results.iter().enumerate() {
                let same_bits = got.iter().zip(&expected).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same_bits, "world {world} run {run}: rank {rank} differs from the rank-order sum");
                for (g, e) in got.iter().zip(&exact) {
                    assert!((*g as f64 - e).abs() <= 1e-3, "world {world}: {g} vs {e}");
                }
            }
        }
    }
}

#[test]
fn local_broadcast_barrier_and_repeated_ops() {
    let results = on_ranks(3, Duration::from_secs(10), |c| {
        let mut out = Vec::new();
        for step in 0..20 {
            let mut b = vec![c.rank() as f32 + step as f32; 5];
            c.broadcast_f32(&mut b, step % 3).unwrap();
            out.push(b[0]);
            c.barrier().unwrap();
            let mut s = [1.0f32];
            c.all_reduce_sum_f32(&mut s).unwrap();
            out.push(s[0]);
        }
        out
    });
    for got in &results {
        let expected: Vec<f32> = (0..20).flat_map(|step| [(step % 3 + step) as f32, 3.0]).collect();
        assert_eq!(got, &expected);
    }
}

#[test]
fn local_missing_rank_times_out_naming_it() {
    let mut ranks = LocalGroup::ranks(3, Duration::from_millis(300));
    // Rank 2 exists but never calls; its handle stays alive so only the timeout can end the wait.
    let absent = ranks.pop().unwrap();
    let start = Instant::now();
    let handles: Vec<_> = ranks
        .into_iter()
        .map(|mut c| {
            std::thread::spawn(move || {
                let mut buf = vec![1.0f32; 4];
                c.all_reduce_sum_f32(&mut buf).unwrap_err().to_string()
            })
        })
        .collect();
    for h in handles {
        let msg = h.join().unwrap();
        assert!(msg.contains("timed out") && msg.contains("waiting for rank(s) 2"), "{msg}");
    }
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(3), "{elapsed:?}");
    drop(absent);
}

// ---------------------------------------------------------------- data-parallel math

/// A batch for softmax regression: `x` is `batch x dim`, labels in `0..classes`.
struct Problem {
    x: Vec<f64>,
    y: Vec<usize>,
    w: Vec<f64>,
    dim: usize,
    classes: usize,
}

impl Problem {
    fn new(batch: usize, seed: u64) -> Self {
        let (dim, classes) = (6, 4);
        let x = randoms(seed, batch * dim, 2.0);
        let y = randoms(seed + 1, batch, 1.0).iter().map(|v| ((v + 1.0) * 2.0) as usize % classes).collect();
        let w = randoms(seed + 2, dim * classes, 1.0);
        Problem { x, y, w, dim, classes }
    }

    /// Mean over `rows` of d CE(softmax(x W), y) / dW, computed analytically: x^T (p - onehot).
    /// An empty range gives 0/0 = NaN, as a naive implementation would.
    fn mean_grad(&self, rows: std::ops::Range<usize>) -> Vec<f64> {
        let (d, c) = (self.dim, self.classes);
        let mut g = vec![0.0; d * c];
        let n = rows.len();
        for b in rows {
            let xb = &self.x[b * d..(b + 1) * d];
            let logits: Vec<f64> = (0..c).map(|k| (0..d).map(|j| xb[j] * self.w[j * c + k]).sum()).collect();
            let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = logits.iter().map(|l| (l - max).exp()).sum();
            for k in 0..c {
                let p = (logits[k] - max).exp() / z;
                let err = p - f64::from(u8::from(k == self.y[b]));
                for j in 0..d {
                    g[j * c + k] += xb[j] * err;
                }
            }
        }
        g.iter().map(|v| v / n as f64).collect()
    }
}

#[test]
fn averaged_shard_gradients_equal_the_full_batch_gradient() {
    for (batch, world) in [(12, 2), (12, 3), (12, 4), (10, 3), (11, 4), (7, 2), (3, 4)] {
        let problem = std::sync::Arc::new(Problem::new(batch, batch as u64 * 10 + world as u64));
        let full = problem.mean_grad(0..batch);
        let p = std::sync::Arc::clone(&problem);
        let results = on_ranks(world, Duration::from_secs(10), move |c| {
            let rows = shard_range(batch, c.rank(), c.world_size());
            let n = rows.len();
            let mut g: Vec<f32> = p.mean_grad(rows).iter().map(|&v| v as f32).collect();
            average_gradients(c, &mut g, n, batch).unwrap();
            g
        });
        for (rank, g) in results.iter().enumerate() {
            let err = norm_rel(g, &full);
            assert!(err <= 1e-6, "batch {batch} world {world} rank {rank}: relative error {err:e}");
            assert_eq!(param_hash(g), param_hash(&results[0]), "ranks hold different gradients");
        }
        // The check can fail: a plain mean of per-rank means over-weights the smaller shards.
        if batch % world != 0 && batch >= world {
            let naive: Vec<f64> = (0..full.len())
                .map(|i| {
                    (0..world).map(|r| problem.mean_grad(shard_range(batch, r, world))[i]).sum::<f64>() / world as f64
                })
                .collect();
            let naive32: Vec<f32> = naive.iter().map(|&v| v as f32).collect();
            assert!(norm_rel(&naive32, &full) > 1e-4, "batch {batch} world {world}: the naive mean should differ");
        }
    }
}

#[test]
fn diverged_parameters_are_caught_on_every_rank() {
    let results = on_ranks(3, Duration::from_secs(10), |c| {
        let mut params = vec![0.25f32; 64];
        let same = verify_identical(c, &params);
        if c.rank() == 2 {
            params[17] = f32::from_bits(params[17].to_bits() ^ 1);
        }
        let diverged = verify_identical(c, &params);
        (same.map_err(|e| e.to_string()), diverged.map_err(|e| e.to_string()))
    });
    let expected = param_hash(&[0.25f32; 64]);
    for (same, diverged) in results {
        assert_eq!(same, Ok(expected));
        let msg = diverged.unwrap_err();
        assert!(msg.contains("parameters differ across ranks: 1 rank(s)"), "{msg}");
    }
}

#[test]
fn differing_digests_are_named_on_every_rank() {
    let results = on_ranks(3, Duration::from_secs(10), |c| {
        let mut digest = [7u8; 32];
        let same = verify_digest(c, "Lambda", &digest).map_err(|e| e.to_string());
        if c.rank() == 2 {
            digest[31] = 8;
        }
        (same, verify_digest(c, "Lambda", &digest).map_err(|e| e.to_string()))
    });
    for (rank, (same, differ)) in results.into_iter().enumerate() {
        assert_eq!(same, Ok(()));
        let msg = differ.unwrap_err();
        assert!(msg.contains("Lambda differs across ranks: rank(s) 2 disagree with rank 0"), "{msg}");
        let held = if rank == 2 { "08" } else { "07" };
        assert!(msg.ends_with(&format!("rank {rank} holds {}{held}", "07".repeat(31))), "{msg}");
    }
}

/// Fuzzing round 8: single-process commands under a launcher's several ranks each did the whole
/// job (one wrote the output, the rest failed on it). Now refused on every rank before any work;
/// a world of one runs as before.
#[test]
fn single_process_commands_refuse_several_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = tmp.path().join("t.jsonl");
    std::fs::write(&inputs, "{\"text\": \"hello there world\"}\n").unwrap();
    let gpt2 = common::fixture_dir("gpt2");
    let eval = |rank: &str, world: &str| {
        symerge()
            .args(["-q", "eval", gpt2.to_str().unwrap(), "--inputs", inputs.to_str().unwrap()])
            .env("RANK", rank)
            .env("WORLD_SIZE", world)
            .output()
            .unwrap()
    };
    for rank in ["0", "1"] {
        let out = eval(rank, "2");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("`eval` runs in one process") && err.contains("2 ranks"),
            "{err}"
        );
    }
    let out = eval("0", "1");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = symerge()
        .args(["-q", "finetune", gpt2.to_str().unwrap(), "--train", inputs.to_str().unwrap(), "-o"])
        .arg(tmp.path().join("ft"))
        .env("SLURM_PROCID", "1")
        .env("SLURM_NTASKS", "4")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("`finetune` runs in one process"), "{err}");
    assert!(!tmp.path().join("ft").exists());
}
