//! Bad input: every case exits non-zero with a message naming the file and tensor or config
//! field, and leaves no output (not even a partial directory) behind.

mod common;

use std::path::{Path, PathBuf};

use common::{T, randoms, read_model, run, write_model};
use safetensors::Dtype;

fn model(dir: &Path, scale_seed: u64) -> PathBuf {
    let t = vec![
        T::new("encoder.layer.0.attention.self.query.weight", Dtype::F32, &[8, 8], randoms(scale_seed, 64, 0.5)),
        T::new("encoder.layer.0.output.dense.bias", Dtype::F32, &[8], randoms(scale_seed + 1, 8, 0.5)),
        T::new("embeddings.position_ids", Dtype::I64, &[4], vec![0.0, 1.0, 2.0, 3.0]),
    ];
    write_model(dir, &t)
}

struct Case {
    tmp: tempfile::TempDir,
    base: PathBuf,
    expert: PathBuf,
}

fn case() -> Case {
    let tmp = tempfile::tempdir().unwrap();
    let base = model(&tmp.path().join("base"), 1);
    let expert = model(&tmp.path().join("expert"), 2);
    Case { tmp, base, expert }
}

impl Case {
    fn config(&self, method: &str, extra: &str) -> PathBuf {
        let y = format!(
            "merge_method: {method}\nbase_model: {}\nmodels:\n  - model: {}\n    parameters: {{weight: 1.0}}\n{extra}",
            self.base.display(),
            self.expert.display()
        );
        let p = self.tmp.path().join("merge.yml");
        std::fs::write(&p, y).unwrap();
        p
    }

    fn out(&self) -> PathBuf {
        self.tmp.path().join("out")
    }

    /// Runs `merge` and checks failure, the message fragments, and that no output remains.
    fn expect_failure(&self, config: &Path, fragments: &[&str]) {
        let (ok, _, err) = run(&["merge", config.to_str().unwrap(), "-o", self.out().to_str().unwrap(), "-q"]);
        assert!(!ok, "merge should fail; stderr: {err}");
        for f in fragments {
            assert!(err.contains(f), "stderr should mention `{f}`:\n{err}");
        }
        assert!(!err.contains("panicked"), "no panic: {err}");
        assert!(!self.out().exists(), "no output directory after a failure");
        let leftovers: Vec<_> = std::fs::read_dir(self.tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("partial"))
            .collect();
        assert!(leftovers.is_empty(), "partial output left behind: {leftovers:?}");
    }

    fn weights(&self, which: &Path) -> PathBuf {
        which.join("model.safetensors")
    }
}

#[test]
fn good_case_succeeds() {
    // The control: the same fixtures merge fine, so the failures below are due to the damage.
    let c = case();
    let cfg = c.config("task_arithmetic", "");
    let (ok, _, err) = run(&["merge", cfg.to_str().unwrap(), "-o", c.out().to_str().unwrap(), "-q"]);
    assert!(ok, "{err}");
    assert!(c.out().join("model.safetensors").is_file());
    // A second run refuses to overwrite without --force, then replaces with it.
    let (ok, _, err) = run(&["merge", cfg.to_str().unwrap(), "-o", c.out().to_str().unwrap(), "-q"]);
    assert!(!ok && err.contains("already exists") && err.contains("--force"), "{err}");
    let (ok, _, err) = run(&["merge", cfg.to_str().unwrap(), "-o", c.out().to_str().unwrap(), "-q", "--force"]);
    assert!(ok, "{err}");
}

#[test]
fn missing_model_directory() {
    let c = case();
    std::fs::remove_dir_all(&c.expert).unwrap();
    let cfg = c.config("task_arithmetic", "");
    c.expect_failure(&cfg, &["models[0].model", "expert", "never downloads"]);
}

#[test]
fn truncated_safetensors() {
    let c = case();
    let f = c.weights(&c.expert);
    let data = std::fs::read(&f).unwrap();
    std::fs::write(&f, &data[..data.len() - 10]).unwrap();
    let cfg = c.config("task_arithmetic", "");
    c.expect_failure(&cfg, &[f.to_str().unwrap(), "truncated"]);
}

#[test]
fn corrupt_header() {
    let c = case();
    let f = c.weights(&c.expert);
    let mut data = std::fs::read(&f).unwrap();
    data[8] = b'#';
    std::fs::write(&f, &data).unwrap();
    let cfg = c.config("task_arithmetic", "");
    c.expect_failure(&cfg, &[f.to_str().unwrap(), "not a valid safetensors file"]);

    // A header length pointing far past the end of the file.
    data[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&f, &data).unwrap();
    c.expect_failure(&cfg, &[f.to_str().unwrap()]);

    // Too short to hold even the length.
    std::fs::write(&f, b"abc").unwrap();
    c.expect_failure(&cfg, &[f.to_str().unwrap(), "too short"]);
}

#[test]
fn shape_mismatch() {
    let c = case();
    let t = vec![
        T::new("encoder.layer.0.attention.self.query.weight", Dtype::F32, &[4, 16], randoms(5, 64, 0.5)),
        T::new("encoder.layer.0.output.dense.bias", Dtype::F32, &[8], randoms(6, 8, 0.5)),
        T::new("embeddings.position_ids", Dtype::I64, &[4], vec![0.0, 1.0, 2.0, 3.0]),
    ];
    write_model(&c.expert, &t);
    let cfg = c.config("ties", "");
    c.expect_failure(
        &cfg,
        &[c.weights(&c.expert).to_str().unwrap(), "encoder.layer.0.attention.self.query.weight", "[4, 16]", "[8, 8]"],
    );
}

#[test]
fn dtype_mismatch() {
    let c = case();
    let t = vec![
        T::new("encoder.layer.0.attention.self.query.weight", Dtype::F32, &[8, 8], randoms(5, 64, 0.5)),
        T::new("encoder.layer.0.output.dense.bias", Dtype::F32, &[8], randoms(6, 8, 0.5)),
        T::new("embeddings.position_ids", Dtype::F32, &[4], vec![0.0, 1.0, 2.0, 3.0]),
    ];
    write_model(&c.expert, &t);
    let cfg = c.config("task_arithmetic", "");
    c.expect_failure(&cfg, &[c.weights(&c.expert).to_str().unwrap(), "embeddings.position_ids", "F32", "I64"]);
}

#[test]
fn tensor_missing_in_expert() {
    let c = case();
    let t = vec![
        T::new("encoder.layer.0.attention.self.query.weight", Dtype::F32, &[8, 8], randoms(5, 64, 0.5)),
        T::new("embeddings.position_ids", Dtype::I64, &[4], vec![0.0, 1.0, 2.0, 3.0]),
    ];
    write_model(&c.expert, &t);
    let cfg = c.config("dare_ties", "");
    c.expect_failure(&cfg, &[c.expert.to_str().unwrap(), "encoder.layer.0.output.dense.bias", "missing"]);
}

#[test]
fn non_finite_values() {
    for (where_, value) in [("expert", f64::NAN), ("base", f64::INFINITY)] {
        let c = case();
        let mut v = randoms(5, 64, 0.5);
        v[17] = value;
        let t = vec![
            T::new("encoder.layer.0.attention.self.query.weight", Dtype::F32, &[8, 8], v),
            T::new("encoder.layer.0.output.dense.bias", Dtype::F32, &[8], randoms(6, 8, 0.5)),
            T::new("embeddings.position_ids", Dtype::I64, &[4], vec![0.0, 1.0, 2.0, 3.0]),
        ];
        let dir = if where_ == "expert" { &c.expert } else { &c.base };
        write_model(dir, &t);
        let cfg = c.config("task_arithmetic", "");
        c.expect_failure(
            &cfg,
            &[
                c.weights(dir).to_str().unwrap(),
                "encoder.layer.0.attention.self.query.weight",
                "non-finite",
                "element 17",
            ],
        );
    }
}

/// Passthrough copies stored bytes without decoding them (see `MergeMethod::copies_model`),
/// and still refuses a NaN, naming the file, the tensor and the element.
#[test]
fn non_finite_value_in_a_copied_tensor() {
    let c = case();
    let mut v = randoms(5, 64, 0.5);
    v[41] = f64::NAN;
    let t = vec![
        T::new("encoder.layer.0.attention.self.query.weight", Dtype::BF16, &[8, 8], v),
        T::new("encoder.layer.0.output.dense.bias", Dtype::BF16, &[8], randoms(6, 8, 0.5)),
    ];
    write_model(&c.expert, &t);
    let cfg = c.tmp.path().join("passthrough.yml");
    std::fs::write(&cfg, format!("merge_method: passthrough\nmodels:\n  - model: {}\n", c.expert.display())).unwrap();
    c.expect_failure(
        &cfg,
        &[
            c.weights(&c.expert).to_str().unwrap(),
            "encoder.layer.0.attention.self.query.weight",
            "non-finite",
            "element 41",
        ],
    );
}

/// A finite merged value too large for f16 is an overflow of the output dtype (named, with its
/// largest value), not a "non-finite value".
#[test]
fn output_overflowing_its_dtype() {
    let c = case();
    let cfg = c.config("task_arithmetic", "parameters: {lambda: 1.0e9}\ndtype: float16\n");
    c.expect_failure(&cfg, &["overflows the output dtype float16", "65504", "tensor `encoder.layer.0."]);
    let (_, _, err) = run(&["merge", cfg.to_str().unwrap(), "-o", c.out().to_str().unwrap(), "-q"]);
    assert!(!err.contains("non-finite"), "{err}");
}

#[test]
fn config_errors_name_the_field() {
    let c = case();
    let cfg = c.config("frankenmerge", "");
    c.expect_failure(&cfg, &["merge.yml", "unknown merge_method `frankenmerge`", "ties", "dare_linear"]);

    let cfg = c.config("ties", "tokenizer_soruce: base\n");
    c.expect_failure(&cfg, &["merge.yml", "tokenizer_soruce", "merge_method"]);

    let cfg = c.config("ties", "parameters: {denisty: 0.5}\n");
    c.expect_failure(&cfg, &["parameters.denisty", "density"]);

    let cfg = c.config("ties", "parameters: {normalize: 3}\n");
    c.expect_failure(&cfg, &["parameters.normalize", "true or false"]);

    let cfg = c.config("ties", "parameters: {density: 1.5}\n");
    c.expect_failure(&cfg, &["density 1.5", "outside [0, 1]"]);

    let y = format!("merge_method: ties\nmodels:\n  - model: {}\n", c.expert.display());
    let p = c.tmp.path().join("merge.yml");
    std::fs::write(&p, y).unwrap();
    c.expect_failure(&p, &["needs `base_model`"]);

    let cfg = c.config("ties", "dtype: int8\n");
    c.expect_failure(&cfg, &["dtype", "int8"]);
}

/// mergekit 0.1.5 has no default `weight` for `linear` or the task-vector methods ("Missing
/// required parameter weight for <model>"): a model without one, in the `models` form or as a
/// slice source, is refused naming `weight`, the method and that model, where it once merged
/// with weight 1. Given once at the top level, it holds for every model.
#[test]
fn a_model_without_weight_is_refused_as_in_mergekit() {
    let c = case();
    let third = model(&c.tmp.path().join("third"), 3);
    let (b, e, t) = (c.base.display(), c.expert.display(), third.display());
    let write = |name: &str, yaml: String| {
        let p = c.tmp.path().join(name);
        std::fs::write(&p, yaml).unwrap();
        p
    };
    let linear = write(
        "linear.yml",
        format!(
            "merge_method: linear
models:
  - model: {e}
    parameters: {{weight: 0.5}}
  - model: {t}
"
        ),
    );
    c.expect_failure(
        &linear,
        &["linear.yml", "parameters.weight", "`linear` needs `weight`", &format!("model {t} has none")],
    );
    let ties = write(
        "ties.yml",
        format!(
            "merge_method: ties
base_model: {b}
models:
  - model: {e}
    parameters: {{density: 0.5}}
"
        ),
    );
    c.expect_failure(
        &ties,
        &["ties.yml", "parameters.weight", "`ties` needs `weight`", &format!("model {e} has none")],
    );
    let sliced = write(
        "sliced.yml",
        format!(
            "merge_method: linear
slices:
  - sources:
      - {{model: {e}, layer_range: [0, 1], parameters: {{weight: 1}}}}
      - {{model: {t}, layer_range: [0, 1]}}
"
        ),
    );
    c.expect_failure(
        &sliced,
        &["slices[0]: parameters.weight", "`linear` needs `weight`", &format!("model {t} has none")],
    );
    // A top-level weight is every model's.
    let top = write(
        "top.yml",
        format!(
            "merge_method: linear
parameters: {{weight: 1}}
models:
  - model: {e}
  - model: {t}
"
        ),
    );
    let (ok, _, err) = run(&["merge", top.to_str().unwrap(), "-o", c.out().to_str().unwrap(), "-q"]);
    assert!(ok, "{err}");
}

/// mergekit resolves every parameter per tensor, booleans and counts included; symerge builds
/// the method once per merge, so a filtered list or gradient of a switch (`normalize`,
/// `rescale`, `max_iter`) is refused naming the key and saying why, where merging would apply
/// one value everywhere: at the top level, under `modules.default`, and per slice.
#[test]
fn per_tensor_switches_are_refused_naming_the_key() {
    let c = case();
    let filtered = c.config("ties", "parameters: {normalize: [{filter: query, value: false}, {value: true}]}\n");
    c.expect_failure(&filtered, &["parameters.normalize", "filtered list or gradient", "one value of `normalize`"]);
    let gradient = c.config("karcher", "parameters: {max_iter: [2, 10]}\n");
    c.expect_failure(&gradient, &["parameters.max_iter", "filtered list or gradient", "per tensor"]);
    let (b, e) = (c.base.display(), c.expert.display());
    let module = c.tmp.path().join("module.yml");
    std::fs::write(
        &module,
        format!(
            "merge_method: ties\nbase_model: {b}\nmodules:\n  default:\n    models:\n      - {{model: {e}, parameters: {{weight: 1}}}}\n    parameters: {{rescale: [{{filter: query, value: true}}]}}\n"
        ),
    )
    .unwrap();
    c.expect_failure(&module, &["modules.default.parameters.rescale", "filtered list or gradient"]);
    let sliced = c.tmp.path().join("sliced.yml");
    std::fs::write(
        &sliced,
        format!(
            "merge_method: ties\nbase_model: {b}\nslices:\n  - sources:\n      - {{model: {b}, layer_range: [0, 1]}}\n      - {{model: {e}, layer_range: [0, 1], parameters: {{weight: 1}}}}\n    parameters: {{normalize: [{{filter: mlp, value: false}}]}}\n"
        ),
    )
    .unwrap();
    // One value per slice is taken (tests/mergekit_parity.rs, `slices_switches`); a list is not.
    c.expect_failure(&sliced, &["slices[0].parameters.normalize", "filtered list or gradient"]);
}

#[test]
fn broken_shard_index() {
    let c = case();
    let index = serde_json::json!({
        "metadata": {"total_size": 1},
        "weight_map": {"encoder.layer.0.attention.self.query.weight": "model-00001-of-00002.safetensors"}
    });
    std::fs::write(c.expert.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let cfg = c.config("task_arithmetic", "");
    // Beside the single file, the index makes the directory ambiguous; alone, its shard is missing.
    c.expect_failure(&cfg, &["model.safetensors.index.json", "holds two checkpoints"]);
    std::fs::remove_file(c.expert.join("model.safetensors")).unwrap();
    c.expect_failure(&cfg, &["model.safetensors.index.json", "model-00001-of-00002.safetensors", "does not exist"]);
}

/// Runs the CLI, killing it after `secs` (a hang fails the test instead of stalling it).
fn run_bounded(args: &[&str], secs: u64) -> (bool, String) {
    let mut child = common::symerge()
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            return (status.success(), err);
        }
        if start.elapsed().as_secs() >= secs {
            child.kill().unwrap();
            panic!("symerge {args:?} hung for {secs} s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// FIFOs (and directories) where a checkpoint, a config, a label cache or an inputs file belongs
/// are refused at once, naming the path and what it is; nothing blocks waiting for a writer.
#[test]
fn fifos_and_directories_as_inputs_are_refused_without_hanging() {
    let tmp = tempfile::tempdir().unwrap();
    let fifo = tmp.path().join("pipe.safetensors");
    let ok = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success();
    assert!(ok, "mkfifo failed");
    let f = fifo.to_str().unwrap();
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_gqa");
    let dir = tmp.path().to_str().unwrap();
    let out = tmp.path().join("elsewhere").join("out");
    let o = out.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["inspect", f], "a FIFO"),
        (vec!["merge", f, "-o", o], "a FIFO"),
        (vec!["adapt", f, "-o", o], "a FIFO"),
        (vec!["import-gguf", f, "-o", o], "a FIFO"),
        (vec!["eval", fixture.to_str().unwrap(), "--inputs", f], "a FIFO"),
        (vec!["cache-labels", "--expert", fixture.to_str().unwrap(), "--task", "t", "--inputs", f, "-o", o], "a FIFO"),
        (vec!["eval", fixture.to_str().unwrap(), "--inputs", dir], "a directory"),
    ];
    for (args, what) in cases {
        let (ok, err) = run_bounded(&args, 20);
        assert!(!ok, "{args:?} succeeded");
        assert!(err.contains(what) && (err.contains(f) || err.contains(dir)), "{args:?}: {err}");
    }
}

/// Messages name the file and say what is wrong once: an OS error is not repeated, a dangling
/// symbolic link says so, an empty inputs file is named, invalid UTF-8 gives its line.
#[test]
fn messages_name_the_file_and_the_cause_once() {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_gqa");
    let link = tmp.path().join("broken");
    std::os::unix::fs::symlink(tmp.path().join("nowhere"), &link).unwrap();
    let empty = tmp.path().join("empty.jsonl");
    std::fs::write(&empty, "\n  \n").unwrap();
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, b"{\"text\": \"a\"}\n{\"text\": \"b\"}\n\xff\xfe\n").unwrap();
    let missing = tmp.path().join("missing");
    let fx = fixture.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["inspect", missing.to_str().unwrap()], "No such file"),
        (vec!["inspect", link.to_str().unwrap()], "broken symbolic link"),
        (vec!["eval", fx, "--inputs", empty.to_str().unwrap()], "no records"),
        (vec!["eval", fx, "--inputs", bad.to_str().unwrap()], "line 3 is not valid UTF-8"),
    ];
    for (args, want) in cases {
        let (ok, _, err) = run(&args);
        let path = args.iter().find(|a| a.starts_with(tmp.path().to_str().unwrap())).unwrap();
        assert!(!ok && err.contains(want) && err.contains(path), "{args:?}: {err}");
        assert!(!err.contains("panicked") && err.matches("os error").count() <= 1, "{args:?}: {err}");
    }
}

/// Degenerate merges are errors naming the config, and a model whose config.json disagrees with
/// the base's architecture (or is no JSON object, or is a directory) is refused naming the file.
#[test]
fn degenerate_configs_and_disagreeing_architectures_are_refused() {
    use symerge::checkpoint::FloatDType;
    use symerge::checkpoint::generate::{SyntheticSpec, write_family};
    let tmp = tempfile::tempdir().unwrap();
    let spec = SyntheticSpec::preset("llama-tiny", FloatDType::F32).unwrap();
    let dirs = write_family(&spec, 9, 2, 0.01, &tmp.path().join("m"), 1 << 30).unwrap();
    // Writes `NAME.yml` (base + the two experts with weights w1, w2, then `body`) and merges it.
    let merge = |name: &str, body: &str, w1: &str, w2: &str| {
        let cfg = tmp.path().join(format!("{name}.yml"));
        common::write_merge_config(&cfg, &dirs, &[w1, w2], body);
        let out = tmp.path().join(format!("out-{name}"));
        let (ok, _, err) = run(&["merge", cfg.to_str().unwrap(), "-o", out.to_str().unwrap(), "--device", "cpu"]);
        (ok, err, cfg)
    };
    let cases = [
        // linear merges the base_model too (mergekit's rule), at the top-level weight.
        ("linear0", "merge_method: linear\nparameters: {weight: 0.0}\n", "0.0", "0.0", Some("every weight is 0")),
        (
            "linnorm",
            "merge_method: linear\nparameters: {normalize: true, weight: 0}\n",
            "1.0",
            "-1.0",
            Some("sum to 0"),
        ),
        // mergekit's task-vector methods divide by 1 where the weights sum to 0.
        ("tanorm", "merge_method: task_arithmetic\nparameters: {normalize: true}\n", "1.0", "-1.0", None),
        ("tiesnorm", "merge_method: ties\nparameters: {normalize: true, density: 0.5}\n", "1.0", "-1.0", None),
        ("plain", "merge_method: task_arithmetic\n", "0.5", "0.5", None),
    ];
    for (name, body, w1, w2, want) in cases {
        let (ok, err, cfg) = merge(name, body, w1, w2);
        match want {
            Some(w) => assert!(!ok && err.contains(w) && err.contains(cfg.to_str().unwrap()), "{name}: {err}"),
            None => assert!(ok, "{name}: {err}"),
        }
    }

    // An expert whose config.json cuts the same hidden size into other heads.
    let expert_cfg = dirs[2].join("config.json");
    let original = std::fs::read_to_string(&expert_cfg).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&original).unwrap();
    v["num_attention_heads"] = (v["num_attention_heads"].as_u64().unwrap() * 2).into();
    std::fs::write(&expert_cfg, v.to_string()).unwrap();
    let plain = tmp.path().join("plain.yml");
    let out = tmp.path().join("out-arch");
    let args = ["merge", plain.to_str().unwrap(), "-o", out.to_str().unwrap(), "--device", "cpu"];
    let (ok, _, err) = run(&args);
    assert!(!ok && err.contains("num_attention_heads") && err.contains(expert_cfg.to_str().unwrap()), "{err}");
    // config.json that is no JSON object, or a directory.
    std::fs::write(&expert_cfg, "[1, 2]").unwrap();
    let (ok, _, err) = run(&args);
    assert!(!ok && err.contains("not a JSON object") && err.contains(expert_cfg.to_str().unwrap()), "{err}");
    std::fs::remove_file(&expert_cfg).unwrap();
    std::fs::create_dir(&expert_cfg).unwrap();
    let (ok, _, err) = run(&args);
    assert!(!ok && err.contains("a directory") && err.contains(expert_cfg.to_str().unwrap()), "{err}");
}

/// Writes a safetensors file with this header (padded) and `data` zero bytes of data.
fn write_raw(file: &Path, header: &str, data: usize) {
    let mut header = header.as_bytes().to_vec();
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(&header);
    bytes.extend(vec![0u8; data]);
    std::fs::write(file, bytes).unwrap();
}

/// A header whose tensor's shape and dtype do not fill its byte range names that tensor (the
/// `safetensors` crate only says "invalid shape, data type, or offset for tensor"), whatever the
/// dtype (sizes come from the crate, so C64 and the sub-byte F4 are covered too) and also when
/// the sizes overflow.
#[test]
fn inconsistent_tensor_info_names_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("bad.safetensors");
    let cases = [
        (
            r#""layer.w":{"dtype":"F32","shape":[2,3],"data_offsets":[8,28]}"#,
            28,
            "`layer.w`: shape [2, 3] of F32 needs 24 bytes",
        ),
        (
            r#""layer.c":{"dtype":"C64","shape":[2],"data_offsets":[8,16]}"#,
            16,
            "`layer.c`: shape [2] of C64 needs 16 bytes",
        ),
        (r#""layer.q":{"dtype":"F4","shape":[3],"data_offsets":[8,10]}"#, 10, "`layer.q`: shape [3] of F4 is 12 bits"),
        (
            r#""layer.o":{"dtype":"U8","shape":[4611686018427387904,4611686018427387904,0],"data_offsets":[8,8]}"#,
            8,
            "`layer.o`: shape [4611686018427387904, 4611686018427387904, 0] of U8 needs more than 2^64 bytes",
        ),
    ];
    for (entry, data, want) in cases {
        write_raw(&file, &format!(r#"{{"a.ok":{{"dtype":"F32","shape":[2],"data_offsets":[0,8]}},{entry}}}"#), data);
        let (ok, _, err) = run(&["inspect", file.to_str().unwrap()]);
        assert!(!ok && err.contains(want) && err.contains(file.to_str().unwrap()), "{want}: {err}");
    }
}

/// What stands where a checkpoint's files belong is described as what it is: a dangling link or
/// a directory named model.safetensors, an index that is a directory, a shard the index names
/// that is a directory, and an index that lists no tensors are errors naming the path, never
/// "no checkpoint found" or an empty checkpoint.
#[test]
fn checkpoint_files_that_are_no_files_say_what_they_are() {
    let tmp = tempfile::tempdir().unwrap();
    let make = |name: &str| {
        let dir = tmp.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        dir
    };
    let dangling = make("dangling");
    std::os::unix::fs::symlink(tmp.path().join("gone.safetensors"), dangling.join("model.safetensors")).unwrap();
    let dir_weights = make("dir-weights");
    std::fs::create_dir(dir_weights.join("model.safetensors")).unwrap();
    let dir_index = make("dir-index");
    std::fs::create_dir(dir_index.join("model.safetensors.index.json")).unwrap();
    let dir_shard = make("dir-shard");
    let index = r#"{"weight_map": {"w": "model-00001-of-00001.safetensors"}}"#;
    std::fs::write(dir_shard.join("model.safetensors.index.json"), index).unwrap();
    std::fs::create_dir(dir_shard.join("model-00001-of-00001.safetensors")).unwrap();
    let empty = make("empty-index");
    std::fs::write(empty.join("model.safetensors.index.json"), r#"{"weight_map": {}}"#).unwrap();
    let cases = [
        (&dangling, "model.safetensors: a broken symbolic link"),
        (&dir_weights, "model.safetensors is a directory"),
        (&dir_index, "model.safetensors.index.json is a directory"),
        (&dir_shard, "model-00001-of-00001.safetensors is a directory"),
        (&empty, "model.safetensors.index.json: lists no tensors"),
    ];
    for (dir, want) in cases {
        let (ok, _, err) = run(&["inspect", dir.to_str().unwrap()]);
        assert!(!ok && err.contains(want) && err.contains(dir.to_str().unwrap()), "{want}: {err}");
        assert!(!err.contains("no checkpoint found"), "{err}");
    }
}

/// A label cache where a directory or a FIFO stands is refused naming it and what it is: as an
/// adapt task's cache, as cache-labels' output (with or without --force, before any labelling),
/// and as the partial file a resumed cache-labels would read.
#[test]
fn label_cache_paths_that_are_no_files_say_what_they_are() {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_gqa");
    let (fx, dir) = (fixture.to_str().unwrap(), tmp.path().join("cachedir"));
    std::fs::create_dir(&dir).unwrap();
    let inputs = tmp.path().join("in.jsonl");
    std::fs::write(&inputs, "{\"text\": \"hello world\"}\n").unwrap();
    let cfg = tmp.path().join("adapt.yml");
    // The expert must not be the base itself (refused first): a copy of it is another model.
    let expert = tmp.path().join("expert");
    std::fs::create_dir(&expert).unwrap();
    for f in std::fs::read_dir(&fixture).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, expert.join(f.file_name().unwrap())).unwrap();
    }
    let task =
        format!("{{name: t, expert: {}, inputs: {}, cache: {}}}", expert.display(), inputs.display(), dir.display());
    std::fs::write(&cfg, format!("method: symerge\nbase_model: {fx}\nepochs: 1\ntasks:\n  - {task}\n")).unwrap();
    let out = tmp.path().join("out");
    let (i, o, d) = (inputs.to_str().unwrap(), out.to_str().unwrap(), dir.to_str().unwrap());
    let (ok, _, err) = run(&["adapt", cfg.to_str().unwrap(), "-o", o, "--device", "cpu"]);
    assert!(!ok && err.contains(&format!("{d} is a directory")), "{err}");
    let label = ["cache-labels", "--expert", fx, "--task", "t", "--inputs", i, "-o"];
    for force in [&[][..], &["--force"]] {
        let (ok, _, err) = run(&[&label[..], &[d], force].concat());
        assert!(!ok && err.contains(&format!("{d}: is a directory, not a cache file")), "{force:?}: {err}");
    }
    let target = tmp.path().join("t.labels");
    let partial = tmp.path().join("t.labels.partial");
    assert!(std::process::Command::new("mkfifo").arg(&partial).status().unwrap().success());
    let (ok, err) = run_bounded(&[&label[..], &[target.to_str().unwrap()]].concat(), 20);
    assert!(!ok && err.contains(&format!("{} is a FIFO", partial.display())), "{err}");
}

/// `files` of the small real Llama fixture copied into `dir` (made), which is returned.
fn copy_llama_fixture(dir: &Path, files: &[&str]) -> PathBuf {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_gqa");
    std::fs::create_dir_all(dir).unwrap();
    for f in files {
        std::fs::copy(fixture.join(f), dir.join(f)).unwrap();
    }
    dir.to_path_buf()
}

/// A tokenizer.json that is a directory says so (it was "not found").
#[test]
fn a_tokenizer_that_is_a_directory_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let model = copy_llama_fixture(&tmp.path().join("model"), &["config.json", "model.safetensors"]);
    std::fs::create_dir(model.join("tokenizer.json")).unwrap();
    let inputs = tmp.path().join("in.jsonl");
    std::fs::write(&inputs, "{\"text\": \"hello world\"}\n").unwrap();
    let (ok, _, err) = run(&["eval", model.to_str().unwrap(), "--inputs", inputs.to_str().unwrap()]);
    let want = format!("{} is a directory", model.join("tokenizer.json").display());
    assert!(!ok && err.contains(&want) && !err.contains("not found"), "{err}");
}

/// A merge whose output the disk cannot hold fails before it writes anything, saying what it
/// needs and what is free. The model is a sparse file declaring 8 TiB of bf16: it takes no disk
/// space, and nothing reads its data.
#[test]
fn an_output_larger_than_the_free_disk_is_refused_before_writing() {
    let tmp = tempfile::tempdir().unwrap();
    let n: u64 = 1 << 42;
    let free = symerge::sysinfo::free_disk_bytes(tmp.path()).expect("statvfs of the temporary directory");
    if free >= 2 * n {
        eprintln!("SKIPPED: {free} bytes free, more than the sparse model's 8 TiB");
        return;
    }
    let dir = tmp.path().join("huge");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("model.safetensors");
    write_raw(&file, &format!(r#"{{"w":{{"dtype":"BF16","shape":[{n}],"data_offsets":[0,{}]}}}}"#, 2 * n), 0);
    let len = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(len + 2 * n).unwrap();
    let cfg = tmp.path().join("m.yml");
    let yaml =
        format!("merge_method: linear\nmodels:\n  - model: {}\n    parameters: {{weight: 1.0}}\n", dir.display());
    std::fs::write(&cfg, yaml).unwrap();
    let out = tmp.path().join("out");
    let (ok, err) = run_bounded(&["merge", cfg.to_str().unwrap(), "-o", out.to_str().unwrap(), "-q"], 60);
    assert!(!ok, "merge should fail");
    let parent = tmp.path().to_str().unwrap();
    assert!(err.contains(parent) && err.contains("needs 8.0 TiB") && err.contains("free"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.exists(), "no output after the refusal");
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 2, "only the model and the config remain: {left:?}");
}

/// Walk-through #13: a missing input said only "No such file or directory", not which of a
/// command's paths (operand, flag, config key) was wrong.
#[test]
fn a_missing_input_is_named_by_its_argument_or_config_key() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = common::fixture_dir("llama_gqa");
    let (fx, t) = (fx.to_str().unwrap(), tmp.path());
    let present = t.join("present");
    std::fs::create_dir(&present).unwrap();
    let missing = t.join("missing");
    let (p, m) = (present.to_str().unwrap(), missing.to_str().unwrap());
    let adapt = t.join("adapt.yml");
    std::fs::write(
        &adapt,
        format!(
            "method: symerge\nbase_model: {p}\ntasks:\n  - {{name: a, expert: {p}, inputs: {p}, cache: {p}}}\n  \
             - {{name: b, expert: {m}, inputs: {p}, cache: {p}}}\n"
        ),
    )
    .unwrap();
    let out = t.join("out");
    let o = out.to_str().unwrap();
    let cases: Vec<(Vec<&str>, String)> = vec![
        (vec!["eval", m, "--inputs", p], format!("error: MODEL: {m}: No such file")),
        (vec!["eval", fx, "--inputs", m], format!("error: --inputs: {m}: No such file")),
        (vec!["predict", fx, "--inputs", m, "--out", o], format!("error: --inputs: {m}")),
        (vec!["cache-labels", "--expert", fx, "--task", "a", "--inputs", m, "-o", o], format!("error: --inputs: {m}")),
        (vec!["cache-labels", "--expert", m, "--task", "a", "--inputs", p, "-o", o], format!("error: --expert: {m}")),
        (vec!["finetune", fx, "--train", m, "-o", o], format!("error: --train: {m}: No such file")),
        (
            vec!["adapt", adapt.to_str().unwrap(), "-o", o],
            format!("error: config {}: tasks[1].expert: {m}: No such file", adapt.display()),
        ),
    ];
    for (args, want) in cases {
        let (ok, _, err) = run(&args);
        assert!(!ok && err.contains(&want), "{args:?}: want `{want}` in:\n{err}");
        assert!(!out.exists(), "{args:?} wrote an output");
    }
}

/// MiniLM (weights linked, not copied) in `dir` with its tokenizer's single-text template
/// replaced by `single`.
fn minilm_with_template(dir: &Path, single: serde_json::Value) -> PathBuf {
    let src = common::minilm_dir();
    std::fs::create_dir_all(dir).unwrap();
    std::os::unix::fs::symlink(src.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer.json")).unwrap()).unwrap();
    tok["post_processor"]["single"] = single;
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    dir.join("tokenizer.json")
}

/// Fuzzing round 3: a template token type past `type_vocab_size` named no file, and a template
/// longer than the model's positions was blamed on the maximum length the user asked for.
#[test]
fn a_tokenizer_template_that_does_not_fit_names_the_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d.jsonl");
    std::fs::write(&data, "{\"text\": \"a word\", \"label\": 0}\n").unwrap();
    let special = |id: &str| serde_json::json!({"SpecialToken": {"id": id, "type_id": 0}});
    let seq = |type_id: u64| serde_json::json!({"Sequence": {"id": "A", "type_id": type_id}});
    let huge_type = serde_json::json!([special("[CLS]"), seq(1_000_000), special("[SEP]")]);
    let mut long: Vec<serde_json::Value> = vec![special("[CLS]"); 600];
    long.extend([seq(0), special("[SEP]")]);
    let cases = [
        ("type", huge_type, "its post_processor gives token type 1000000, but the model has 2 token types"),
        (
            "long",
            long.into(),
            "its post_processor template adds 601 special tokens to every text, which leaves no room for text",
        ),
    ];
    for (name, single, want) in cases {
        let dir = tmp.path().join(name);
        let tokenizer = minilm_with_template(&dir, single);
        let args = [dir.to_str().unwrap(), "--inputs", data.to_str().unwrap(), "--new-head", "2", "--max-len", "16"];
        let (ok, _, err) = run(&[&["eval"], &args[..], &["--device", "cpu"]].concat());
        assert!(!ok && err.contains(&format!("tokenizer {}: {want}", tokenizer.display())), "{name}: {err}");
        if name == "type" {
            assert!(err.contains(&format!("{} type_vocab_size", dir.join("config.json").display())), "{err}");
        }
        assert!(!err.contains("smaller maximum length"), "{err}");
    }
}

/// Fuzzing round 3 (section 8) and walk-through #18: a config sharing parameters through a YAML
/// merge key (as mergekit's PyYAML reads them) merges like the spelt-out one, its `./` paths
/// are shown without the `.` (the card said `gen/./base`), and an anchor holder we do not know
/// is still refused by name.
#[test]
fn yaml_merge_keys_expand_and_joined_paths_are_clean() {
    let c = case();
    let run_merge = |yaml: &str, out: &Path| {
        let cfg = c.tmp.path().join("m.yml");
        std::fs::write(&cfg, yaml).unwrap();
        run(&["merge", cfg.to_str().unwrap(), "-o", out.to_str().unwrap(), "-q"])
    };
    let plain = "merge_method: linear\nmodels:\n  - model: ./base\n    parameters: {weight: 0.3}\n  - model: ./expert\n    \
                 parameters: {weight: 0.3}\n";
    let merged = "merge_method: linear\nmodels:\n  - model: ./base\n    parameters: &w {weight: 0.3}\n  - model: ./expert\n    \
                  parameters: {<<: *w}\n";
    let (a, b) = (c.tmp.path().join("plain"), c.tmp.path().join("merged"));
    let (ok, _, err) = run_merge(plain, &a);
    assert!(ok, "{err}");
    let (ok, _, err) = run_merge(merged, &b);
    assert!(ok, "{err}");
    assert_eq!(
        std::fs::read(a.join("model.safetensors")).unwrap(),
        std::fs::read(b.join("model.safetensors")).unwrap()
    );
    let card = std::fs::read_to_string(b.join("README.md")).unwrap();
    assert!(card.contains(&c.expert.display().to_string()) && !card.contains("/./"), "{card}");
    let holder = format!("defaults: &w {{weight: 0.3}}\n{}", merged.replace("&w ", ""));
    let (ok, _, err) = run_merge(&holder, &c.tmp.path().join("held"));
    assert!(!ok && err.contains("unknown field `defaults`"), "{err}");
}

/// A relative model path is read from the working directory (mergekit's rule) or, when it is not
/// there, beside the config (the README's); one that names a different model in each place is
/// refused, as the same config would otherwise merge different models depending on the cwd.
#[test]
fn a_relative_model_path_that_names_two_models_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (cfg_dir, cwd) = (tmp.path().join("cfg"), tmp.path().join("cwd"));
    std::fs::create_dir_all(&cwd).unwrap();
    model(&cfg_dir.join("base"), 1);
    model(&cfg_dir.join("expert"), 2);
    let cfg = cfg_dir.join("merge.yml");
    let yaml =
        "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: expert\n    parameters: {weight: 0.5}\n";
    std::fs::write(&cfg, yaml).unwrap();
    let merge = |dir: &Path, out: &str| {
        let o = common::symerge()
            .current_dir(dir)
            .args(["merge", cfg.to_str().unwrap(), "-o", out, "-q"])
            .output()
            .unwrap();
        (o.status.success(), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    // Only beside the config, and from the config's own folder (both places the same): merged.
    let (ok, err) = merge(&cwd, "out1");
    assert!(ok, "{err}");
    let (ok, err) = merge(&cfg_dir, "out2");
    assert!(ok, "{err}");
    // A different `base` in the working directory: refused, both candidates named, no output.
    model(&cwd.join("base"), 7);
    let (ok, err) = merge(&cwd, "out3");
    assert!(!ok, "an ambiguous path merged");
    for want in ["base_model: `base` names two different paths", "cwd/base", "cfg/base", "absolute path"] {
        assert!(err.contains(want), "want `{want}` in:\n{err}");
    }
    assert!(!cwd.join("out3").exists());
    // Only in the working directory (mergekit's rule): merged from there.
    std::fs::remove_dir_all(cfg_dir.join("base")).unwrap();
    let (ok, err) = merge(&cwd, "out4");
    assert!(ok, "{err}");
    let (a, b) = (common::read_model(&cwd.join("out1")), common::read_model(&cwd.join("out4")));
    assert_ne!(a, b, "out4 merged the working directory's base, not the config's");
}

/// Fuzzing round 7: a model stored as pickled PyTorch weights (`pytorch_model.bin`, the layout
/// of many older Hub models) was refused as "no checkpoint found"; mergekit unpickles it. It is
/// named as what it is, with how to convert it, given as a directory or as the file.
#[test]
fn a_pickled_checkpoint_is_named_as_such() {
    let c = case();
    let old = c.tmp.path().join("old");
    std::fs::create_dir(&old).unwrap();
    std::fs::write(old.join("config.json"), "{}").unwrap();
    std::fs::write(old.join("training_args.bin"), b"\x80\x04").unwrap();
    std::fs::write(old.join("pytorch_model.bin"), b"\x80\x04").unwrap();
    let pickle = old.join("pytorch_model.bin");
    for given in [&old, &pickle] {
        let y = format!(
            "merge_method: linear\nmodels:\n  - model: {}\n    parameters: {{weight: 0.5}}\n  - model: {}\n    parameters: {{weight: 0.5}}\n",
            c.expert.display(),
            given.display()
        );
        let cfg = c.tmp.path().join("pickle.yml");
        std::fs::write(&cfg, y).unwrap();
        let want = format!("{}: a pickled PyTorch checkpoint, which symerge does not read", pickle.display());
        c.expect_failure(&cfg, &[&want, "safe_serialization=True"]);
    }
}

/// Fuzzing round 6: `merge --dtype` replaced the config's `out_dtype` without a word; it still
/// wins, and says so.
#[test]
fn a_dtype_flag_over_the_configs_out_dtype_is_said() {
    let c = case();
    let cfg = c.config("task_arithmetic", "out_dtype: float16\n");
    let out = c.out();
    let (ok, _, err) = run(&["merge", cfg.to_str().unwrap(), "-o", out.to_str().unwrap(), "--dtype", "bfloat16"]);
    assert!(ok && err.contains("--dtype bfloat16 overrides the config's output dtype float16"), "{err}");
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("encoder.layer.0.output.dense.bias").unwrap().dtype(), Dtype::BF16);
}

/// Fuzzing round 7: a merge of an f16 and a bf16 model stores f32 tensors (as PyTorch promotes
/// them), but config.json kept the donor's `torch_dtype: float16`. It records the dtype every
/// stored weight has.
#[test]
fn config_json_records_the_dtype_of_mixed_inputs_merged() {
    let tmp = tempfile::tempdir().unwrap();
    let model = |name: &str, dtype: Dtype, seed: u64| {
        let dir = write_model(
            &tmp.path().join(name),
            &[T::new("encoder.layer.0.output.dense.weight", dtype, &[4, 4], randoms(seed, 16, 0.5))],
        );
        std::fs::write(dir.join("config.json"), format!(r#"{{"model_type": "test", "torch_dtype": "{name}"}}"#))
            .unwrap();
        dir
    };
    let (a, b) = (model("float16", Dtype::F16, 1), model("bfloat16", Dtype::BF16, 2));
    let cfg = tmp.path().join("m.yml");
    let y = format!(
        "merge_method: linear\nmodels:\n  - {{model: {}, parameters: {{weight: 0.5}}}}\n  - {{model: {}, parameters: {{weight: 0.5}}}}\n",
        a.display(),
        b.display()
    );
    std::fs::write(&cfg, y).unwrap();
    let out = tmp.path().join("out");
    let (ok, _, err) = run(&["merge", cfg.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert!(ok, "{err}");
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(written["torch_dtype"], "float32", "{written}");
    assert_eq!(read_model(&out)["encoder.layer.0.output.dense.weight"].0, Dtype::F32);
}

/// Fuzzing round 8 #9c: `--batch-size 0` is refused at the command line, naming the flag, by
/// every command that takes it (it was refused later, in words that blamed the model).
#[test]
fn batch_size_zero_is_refused_naming_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, i, o) = (tmp.path().join("m"), tmp.path().join("in.jsonl"), tmp.path().join("out"));
    std::fs::write(&i, "{\"text\": \"a\", \"label\": 0}\n").unwrap();
    let (m, i, o) = (m.to_str().unwrap(), i.to_str().unwrap(), o.to_str().unwrap());
    for args in [
        vec!["predict", m, "--inputs", i, "--out", o],
        vec!["eval", m, "--inputs", i],
        vec!["finetune", m, "--train", i, "-o", o],
        vec!["cache-labels", "--expert", m, "--task", "t", "--inputs", i, "-o", o],
    ] {
        let (ok, _, err) = run(&[args.as_slice(), &["--batch-size", "0"]].concat());
        assert!(!ok && err.contains("'--batch-size <BATCH_SIZE>': must be at least 1"), "{args:?}: {err}");
    }
    assert!(!Path::new(o).exists(), "nothing written");
}

/// Fuzzing round 8 #9e: `generate --delta-scale` names the value as given when it is out of
/// float32's range (1e39 was reported as "inf"), and takes a negative scale as a number.
#[test]
fn delta_scale_is_named_as_given_and_may_be_negative() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("fam");
    let gen_with = |v: &str| {
        run(&["generate", "--preset", "llama-tiny", "--experts", "1", "-o", out.to_str().unwrap(), "--delta-scale", v])
    };
    for v in ["1e39", "-1e39", "nan"] {
        let (ok, _, err) = gen_with(v);
        assert!(
            !ok && err.contains(&format!("invalid value '{v}' for '--delta-scale")) && err.contains("finite"),
            "{v}: {err}"
        );
        assert!(!out.exists(), "nothing written for {v}");
    }
    let (ok, _, err) = gen_with("-0.02");
    assert!(ok, "{err}");
    assert!(out.join("expert-1").join("model.safetensors").exists());
}

/// Fuzzing round 8: stored tensors a model does not read (another architecture's, a pretraining
/// head) were ignored without a word; transformers lists them as unexpected. One warning names
/// them; a checkpoint the model reads whole gets none.
#[test]
fn unread_stored_tensors_are_named_once() {
    let tmp = tempfile::tempdir().unwrap();
    let m = copy_llama_fixture(&tmp.path().join("m"), &["config.json", "model.safetensors", "tokenizer.json"]);
    let inputs = tmp.path().join("in.jsonl");
    std::fs::write(&inputs, "{\"text\": \"the cat sat on the mat\"}\n").unwrap();
    let eval = || run(&["eval", m.to_str().unwrap(), "--inputs", inputs.to_str().unwrap(), "--device", "cpu"]);
    let (ok, _, err) = eval();
    assert!(ok && !err.contains("not read by"), "{err}");
    let mut tensors: Vec<T> =
        read_model(&m).into_iter().map(|(name, (dt, shape, values))| T::new(&name, dt, &shape, values)).collect();
    tensors.push(T::new("model.vision_tower.proj.weight", Dtype::F32, &[2, 3], randoms(9, 6, 0.1)));
    common::write_file(&m.join("model.safetensors"), &tensors);
    let (ok, _, err) = eval();
    assert!(ok, "{err}");
    assert!(
        err.contains("1 stored tensor(s) are not read by a causal LM")
            && err.contains("model.vision_tower.proj.weight"),
        "{err}"
    );
    assert_eq!(err.matches("not read by").count(), 1, "one warning: {err}");
}
