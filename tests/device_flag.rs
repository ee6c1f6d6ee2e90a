//! `symerge merge --device`: auto falls back to the CPU with one line saying why (and gives the
//! CPU's output), cpu never touches CUDA, an explicit cuda without a device fails clearly and
//! writes nothing, bad spellings are rejected. Runs everywhere; the no-device checks only where
//! there is no device.

mod common;

use symerge::backend::cuda::probe;
use symerge::checkpoint::FloatDType;
use symerge::checkpoint::generate::{SyntheticSpec, write_family};

#[test]
fn device_flag_behaves_on_this_machine() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = SyntheticSpec::preset("llama-tiny", FloatDType::BF16).unwrap();
    write_family(&spec, 1, 2, 0.01, tmp.path(), 1 << 30).unwrap();
    let cfg = tmp.path().join("m.yml");
    std::fs::write(
        &cfg,
        "merge_method: task_arithmetic\nbase_model: base\nparameters: {weight: 1.0}\nmodels:\n  - model: expert-1\n  - model: expert-2\n",
    )
    .unwrap();
    let merge = |device: &str, out: &str| {
        let out = tmp.path().join(out);
        // `$SYMERGE_BIN` when run away from the build tree (scripts/gpu-check.sh on a GPU machine).
        let bin = std::env::var_os("SYMERGE_BIN")
            .map_or_else(|| env!("CARGO_BIN_EXE_symerge").into(), std::path::PathBuf::from);
        let o = std::process::Command::new(bin)
            .args(["merge", cfg.to_str().unwrap(), "-o", out.to_str().unwrap(), "--device", device])
            .output()
            .unwrap();
        let r = (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        );
        (r, out)
    };
    let ((ok, _, err), cpu_out) = merge("cpu", "cpu");
    assert!(ok, "{err}");
    assert!(!err.contains("--device auto"), "cpu does not probe: {err}");
    let ((ok, _, err), auto_out) = merge("auto", "auto");
    assert!(ok, "{err}");
    let a = common::read_model(&auto_out);
    let c = common::read_model(&cpu_out);
    // With a GPU, auto runs there: its output must equal the CPU's exactly.
    assert_eq!(a, c, "auto and cpu outputs differ");

    let ((ok, _, err), _) = merge("cuda:x", "bad");
    assert!(!ok && err.contains("expected auto, cpu, cuda or cuda:N"), "{err}");

    if let Err(reason) = probe() {
        assert!(err_line_once(&merge("auto", "auto2").0.2, "--device auto: using the CPU"), "auto says why once");
        let ((ok, _, err), out) = merge("cuda", "cuda");
        assert!(!ok, "cuda without a device must fail");
        assert!(err.contains("use --device cpu") && err.contains(&reason), "{err}");
        assert!(!out.exists(), "nothing written");
        let ((ok, _, err), _) = merge("cuda:3", "cuda3");
        assert!(!ok && err.contains("use --device cpu"), "{err}");
        common::skip_gpu_test(&format!("no CUDA device ({reason}); auto ran on the CPU, cuda failed clearly"));
    }
}

fn err_line_once(stderr: &str, needle: &str) -> bool {
    stderr.lines().filter(|l| l.contains(needle)).count() == 1
}

/// Every other command takes the same `--device` spelling with the same default (`auto`).
#[test]
fn every_command_defaults_to_auto_and_spells_devices_alike() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::fixture_dir("llama_gqa");
    let texts = tmp.path().join("t.jsonl");
    std::fs::write(&texts, "{\"text\": \"the cat sat on the mat\"}\n").unwrap();
    let eval = |device: Option<&str>| {
        let mut args = vec!["eval", model.to_str().unwrap(), "--inputs", texts.to_str().unwrap(), "--json"];
        if let Some(d) = device {
            args.extend(["--device", d]);
        }
        common::run(&args)
    };
    let (ok, cpu, err) = eval(Some("cpu"));
    assert!(ok, "{err}");
    assert!(!err.contains("--device auto"), "cpu does not probe: {err}");
    let (ok, default, err) = eval(None);
    assert!(ok, "{err}");
    // With a GPU the default runs there (f32 sums in another order): the same loss to 1e-5.
    let loss = |out: &str| serde_json::from_str::<serde_json::Value>(out).unwrap()["mean_loss"].as_f64().unwrap();
    assert!((loss(&default) - loss(&cpu)).abs() <= 1e-5 * loss(&cpu), "{default} vs {cpu}");
    let (ok, _, err) = eval(Some("tpu"));
    assert!(!ok && err.contains("expected auto, cpu, cuda or cuda:N"), "{err}");
    if let Err(reason) = probe() {
        assert!(err_line_once(&err_of(eval(None)), "--device auto: using the CPU"), "the default says why once");
        let (ok, _, err) = eval(Some("cuda:1"));
        assert!(!ok && err.contains(&reason) && err.contains("use --device cpu"), "{err}");
        common::skip_gpu_test(&format!("no CUDA device ({reason}); auto ran on the CPU, cuda:1 failed clearly"));
    }
}

fn err_of(r: (bool, String, String)) -> String {
    r.2
}
