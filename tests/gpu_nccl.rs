//! NCCL on a real GPU: a one-rank communicator runs a real all-reduce and broadcast, on host
//! slices and on the CUDA backend's own device buffers, and `dist-check --backend nccl` reports
//! the rank, world, device and bus bandwidth. Without a GPU (or NCCL) the tests print SKIPPED
//! and pass.

mod common;

use std::time::Duration;

use symerge::backend::Backend;
use symerge::backend::cuda::Cuda;
use symerge::dist::nccl::{connect, cuda_device_count};
use symerge::dist::{Collective, RankInfo};

/// Whether a GPU is there; prints why not, as the other GPU tests do.
fn have_gpu() -> bool {
    match cuda_device_count() {
        Ok(n) if n > 0 => true,
        Ok(_) => skip("the driver reports 0 devices"),
        Err(why) => skip(&why),
    }
}

/// The CLI: `$SYMERGE_BIN` when run away from the build tree (scripts/gpu-check.sh).
fn symerge() -> std::process::Command {
    let bin = std::env::var_os("SYMERGE_BIN").map_or_else(|| env!("CARGO_BIN_EXE_symerge").into(), Into::into);
    std::process::Command::new::<std::ffi::OsString>(bin)
}

fn skip(why: &str) -> bool {
    common::skip_gpu_test(&format!("no CUDA device ({why})"));
    false
}

#[test]
fn one_rank_communicator_all_reduces_and_broadcasts() {
    if !have_gpu() {
        return;
    }
    let mut g = connect(&RankInfo::single(), None, Duration::from_secs(60)).expect("NCCL communicator of one rank");
    assert_eq!((g.backend(), g.rank(), g.world_size()), ("nccl", 0, 1));
    assert!(g.device().starts_with("cuda:0"), "{}", g.device());
    let n = 1 << 20;
    let data: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 * 0.5 - 7.0).collect();
    let mut buf = data.clone();
    g.all_reduce_sum_f32(&mut buf).unwrap();
    // The sum over one rank is that rank's data, bit for bit, after a round trip through NCCL.
    assert!(buf.iter().zip(&data).all(|(a, b)| a.to_bits() == b.to_bits()), "all-reduce changed the data");
    g.broadcast_f32(&mut buf, 0).unwrap();
    assert_eq!(buf, data);
    assert!(g.broadcast_f32(&mut buf, 1).is_err(), "root 1 does not exist");
    g.barrier().unwrap();
    let mut empty: [f32; 0] = [];
    g.all_reduce_sum_f32(&mut empty).unwrap();
}

#[test]
fn backend_buffers_are_reduced_on_the_device_after_the_kernels_that_wrote_them() {
    if !have_gpu() {
        return;
    }
    let be = Cuda::open(0).expect("CUDA backend on GPU 0");
    let mut g = connect(&RankInfo::single(), None, Duration::from_secs(60)).expect("NCCL communicator of one rank");
    let n = (1 << 22) + 3;
    let a: Vec<f32> = (0..n).map(|i| (i % 977) as f32 * 0.25 - 3.0).collect();
    let b: Vec<f32> = (0..n).map(|i| (i % 13) as f32 * 1e-3).collect();
    // A kernel writes `x` just before the reduction, on the backend's stream: NCCL's own stream
    // must wait for it, or it would reduce stale memory.
    let mut x = be.add(&be.upload(&a).unwrap(), &be.upload(&b).unwrap()).unwrap();
    let mut empty = be.zeros(0).unwrap();
    let mut one = be.upload(&[3.5]).unwrap();
    be.all_reduce_sum(&mut g, &mut [&mut x, &mut empty, &mut one]).unwrap();
    let want: Vec<f32> = a.iter().zip(&b).map(|(p, q)| p + q).collect();
    let got = be.download(&x).unwrap();
    assert!(got.iter().zip(&want).all(|(p, q)| p.to_bits() == q.to_bits()), "device all-reduce changed the data");
    assert_eq!((be.download(&empty).unwrap().len(), be.download(&one).unwrap()), (0, vec![3.5]));
}

#[test]
fn dist_check_with_nccl_reports_device_and_bandwidth() {
    if !have_gpu() {
        return;
    }
    let out = symerge().args(["dist-check", "--backend", "nccl", "--elements", "4194304", "--json"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((r["backend"].as_str(), r["world_size"].as_u64(), r["rank"].as_u64()), (Some("nccl"), Some(1), Some(0)));
    assert!(r["device"].as_str().unwrap().starts_with("cuda:0"), "{r}");
    assert!(r["seconds"].as_f64().unwrap() > 0.0, "{r}");
    // One rank moves nothing over links: nccl-tests' busbw factor 2(n-1)/n is 0.
    assert_eq!(r["busbw_gb_per_s"].as_f64(), Some(0.0), "{r}");
    eprintln!("dist-check nccl: {r}");
}

/// Data-parallel `adapt` on one GPU: a one-rank NCCL communicator (every Lambda and head gradient
/// all-reduced on the device, Lambda compared across ranks) learns exactly what the run without
/// a communicator learns, on the real small adaptation setup.
#[test]
fn one_rank_nccl_adapt_equals_the_plain_run() {
    if !have_gpu() {
        return;
    }
    let f = common::adapt_fixture::fixture();
    let cfg = f.root.join("adapt.yml");
    let run = |name: &str, extra: &[&str]| -> serde_json::Value {
        let out = f.root.join(name);
        let mut cmd = symerge();
        for v in symerge::dist::rank::LAUNCHER_VARS {
            cmd.env_remove(v);
        }
        let o = cmd
            .args(["adapt", cfg.to_str().unwrap(), "-o", out.to_str().unwrap(), "--json", "--no-eval", "--epochs", "3"])
            .args(["--device", "cuda"])
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_str(&std::fs::read_to_string(out.join("lambda.json")).unwrap()).unwrap()
    };
    let plain = run("plain", &[]);
    let nccl = run("nccl", &["--backend", "nccl"]);
    assert_eq!(plain["lambda"], nccl["lambda"], "one rank's all-reduce is the identity: Lambda must not move");
    eprintln!("one-rank NCCL adapt: Lambda identical to the plain run");
}
