//! Inputs that lie about themselves, found by a fuzzing round of the CLI (thirteenth session):
//! a config.json's layer count that no tensor backs, GGUF metadata that disagrees with the
//! tensors, task names that are paths. Each must end in an error naming the file and the field,
//! key or tensor, quickly and in little memory, with no output left and nothing written outside
//! the output.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::gguf::{Meta, TinyGguf};
use common::{fixture_dir, minilm_dir, run};

/// Copies the model directory `from` to `to` with one config.json key set to `value`.
fn with_config(from: &Path, to: &Path, key: &str, value: serde_json::Value) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
    let path = to.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg[key] = value;
    std::fs::write(&path, cfg.to_string()).unwrap();
}

/// Runs the CLI and returns its stderr, asserting it failed cleanly within `limit`.
fn fails_fast(args: &[&str], limit: Duration) -> String {
    let start = Instant::now();
    let (ok, _, err) = run(args);
    let took = start.elapsed();
    assert!(!ok, "{args:?} succeeded");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    assert!(took < limit, "{args:?} took {took:?} before failing: {err}");
    err
}

/// A layer count of a billion used to size the model's block list (about 60 bytes a layer:
/// 23 GB, then the out-of-memory killer) before any tensor was looked up. It is now checked
/// against the layers the tensors hold, in every family.
#[test]
fn a_layer_count_no_tensor_backs_is_refused_before_sizing_the_model() {
    let tmp = tempfile::tempdir().unwrap();
    let texts = tmp.path().join("t.jsonl");
    std::fs::write(&texts, "{\"text\": \"hello world\", \"label\": 0}\n").unwrap();
    let t = texts.to_str().unwrap();
    let preds = tmp.path().join("p.jsonl");
    let p = preds.to_str().unwrap();
    let cases: [(_, _, &[&str]); 3] = [
        (fixture_dir("llama_gqa"), "num_hidden_layers", &["eval", "--inputs", t]),
        (fixture_dir("gpt2"), "n_layer", &["eval", "--inputs", t]),
        (minilm_dir(), "num_hidden_layers", &["predict", "--new-head", "2", "--inputs", t, "--out", p]),
    ];
    for (i, (from, key, args)) in cases.iter().enumerate() {
        let dir = tmp.path().join(format!("m{i}"));
        with_config(from, &dir, key, serde_json::json!(1_000_000_000u64));
        let m = dir.to_str().unwrap();
        let cmd: Vec<&str> = args.iter().copied().chain([m, "--device", "cpu"]).collect();
        let err = fails_fast(&cmd, Duration::from_secs(20));
        let config = dir.join("config.json");
        assert!(
            err.contains(&format!("{key} is 1000000000")) && err.contains(config.to_str().unwrap()),
            "{key}: {err}"
        );
        // The same model with its real count still loads (the check does not refuse good models).
        with_config(
            from,
            &dir,
            key,
            serde_json::from_str(&std::fs::read_to_string(from.join("config.json")).unwrap())
                .map(|c: serde_json::Value| c[*key].clone())
                .unwrap(),
        );
        let (ok, _, err) = run(&cmd);
        assert!(ok, "{key}: the real count is refused: {err}");
    }
}

/// The import reads the file back as a model before committing it: metadata that disagrees
/// with the tensors (a block count, a width, a NaN epsilon), tensors the layout lacks or does
/// not have, and token lists a tokenizer cannot be made of are refused, naming the file and the
/// key or tensor; a tensor listed twice was a panic in the writer.
#[test]
fn lying_gguf_files_are_refused_at_import() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good.gguf");
    TinyGguf::new().write(&good);
    let out = tmp.path().join("good-out");
    let (ok, _, err) = run(&["import-gguf", good.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert!(ok, "the untouched tiny file must import: {err}");
    let (ok, _, err) = run(&["inspect", out.to_str().unwrap()]);
    assert!(ok, "{err}");

    let tokens = |g: &TinyGguf| match &g.meta.iter().find(|(k, _)| k == "tokenizer.ggml.tokens").unwrap().1 {
        Meta::Strs(t) => t.clone(),
        _ => unreachable!(),
    };
    let mut dup_tensor = TinyGguf::new();
    dup_tensor.tensors.push(dup_tensor.tensors[1].clone());
    let mut stray_layer = TinyGguf::new();
    stray_layer.tensors.push(("blk.1000000.attn_norm.weight".into(), vec![8]));
    let mut missing = TinyGguf::new();
    missing.tensors.retain(|(n, _)| n != "blk.0.ffn_up.weight");
    let mut dup_token = TinyGguf::new();
    let mut toks = tokens(&dup_token);
    toks[299] = toks[298].clone();
    dup_token = dup_token.set("tokenizer.ggml.tokens", Meta::Strs(toks));
    let mut too_many = TinyGguf::new();
    let mut toks = tokens(&too_many);
    toks.push("extra".into());
    too_many = too_many.set("tokenizer.ggml.token_type", Meta::I32s(vec![1; toks.len()]));
    too_many = too_many.set("tokenizer.ggml.tokens", Meta::Strs(toks));
    let cases: Vec<(&str, TinyGguf, &str)> = vec![
        ("layers", TinyGguf::new().set("llama.block_count", Meta::U32(100_000_000)), "llama.block_count"),
        ("width", TinyGguf::new().set("llama.embedding_length", Meta::U32(16)), "`token_embd.weight` has shape"),
        ("ffn", TinyGguf::new().set("llama.feed_forward_length", Meta::U32(12)), "`blk.0.ffn_gate.weight` has shape"),
        (
            "eps",
            TinyGguf::new().set("llama.attention.layer_norm_rms_epsilon", Meta::F32(f32::NAN)),
            "layer_norm_rms_epsilon` is NaN",
        ),
        ("rope", TinyGguf::new().set("llama.rope.freq_base", Meta::F32(f32::INFINITY)), "rope.freq_base` is inf"),
        ("dup tensor", dup_tensor, "are both `model.layers.0.input_layernorm.weight`"),
        ("stray layer", stray_layer, "`blk.1000000.attn_norm.weight` is not part of the 1-layer model"),
        ("missing", missing, "`model.layers.0.mlp.up_proj.weight` is missing"),
        ("dup token", dup_token, "lists `"),
        ("too many tokens", too_many, "lists 301 tokens for 300 embedding rows"),
        ("no tokens", TinyGguf::new().set("tokenizer.ggml.tokens", Meta::Strs(Vec::new())), "lists 0 tokens"),
    ];
    for (what, g, want) in cases {
        let file = tmp.path().join(format!("{}.gguf", what.replace(' ', "-")));
        g.write(&file);
        let out = tmp.path().join(format!("{}-out", what.replace(' ', "-")));
        let err =
            fails_fast(&["import-gguf", file.to_str().unwrap(), "-o", out.to_str().unwrap()], Duration::from_secs(20));
        assert!(err.contains(file.to_str().unwrap()) && err.contains(want), "{what}: expected `{want}` in: {err}");
        assert!(!out.exists(), "{what}: left an output");
    }
}

/// A task's name names its directory under the output's tasks/: `..`, absolute names, `.` and
/// an empty name used to place a model outside the output (into an input model's directory)
/// or over the output's own files. They are refused as the config is read, before any model
/// loads; `cache-labels --task` refuses them too.
#[test]
fn task_names_cannot_leave_the_output() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let escape = root.join("escaped");
    for (i, name) in
        [format!("../{}", escape.display()), escape.display().to_string(), ".".into(), "".into(), "..".into()]
            .iter()
            .enumerate()
    {
        let cfg = root.join(format!("adapt-{i}.yml"));
        std::fs::write(
            &cfg,
            format!(
                "method: adamerging\nbase_model: base\ntasks:\n  - {{name: ok, expert: e1, inputs: t.jsonl}}\n  - {{name: {}, expert: e2, inputs: t.jsonl}}\n",
                serde_json::to_string(name).unwrap()
            ),
        )
        .unwrap();
        let out = root.join(format!("out-{i}"));
        let err = fails_fast(&["adapt", cfg.to_str().unwrap(), "-o", out.to_str().unwrap()], Duration::from_secs(20));
        assert!(err.contains("tasks[1].name") && err.contains("not a plain name"), "{name:?}: {err}");
        assert!(!out.exists() && !escape.exists(), "{name:?}: wrote something");
    }
    let texts = root.join("t.jsonl");
    std::fs::write(&texts, "{\"text\": \"hello\"}\n").unwrap();
    let cache = root.join("c.labels");
    let err = fails_fast(
        &[
            "cache-labels",
            "--expert",
            fixture_dir("llama_gqa").to_str().unwrap(),
            "--task",
            "../x",
            "--inputs",
            texts.to_str().unwrap(),
            "-o",
            cache.to_str().unwrap(),
        ],
        Duration::from_secs(20),
    );
    assert!(err.contains("--task") && err.contains("not a plain name"), "{err}");
    assert!(!cache.exists());
}

/// A class count no task has: a stray id in the training data (`label: 4000000000`) sized a
/// 96 GB label table and aborted the process, and `predict --new-head 3000000000` likewise.
#[test]
fn absurd_class_counts_are_refused_by_line_or_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let train = tmp.path().join("train.jsonl");
    std::fs::write(&train, "{\"text\": \"hello\", \"label\": 0}\n{\"text\": \"bye\", \"label\": 4000000000}\n")
        .unwrap();
    let out = tmp.path().join("ft");
    let m = minilm_dir();
    let err = fails_fast(
        &[
            "finetune",
            m.to_str().unwrap(),
            "--train",
            train.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--steps",
            "1",
        ],
        Duration::from_secs(30),
    );
    assert!(
        err.contains(train.to_str().unwrap()) && err.contains("line 2") && err.contains("label 4000000000"),
        "{err}"
    );
    assert!(!out.exists());
    let preds = tmp.path().join("p.jsonl");
    let err = fails_fast(
        &[
            "predict",
            m.to_str().unwrap(),
            "--new-head",
            "3000000000",
            "--inputs",
            train.to_str().unwrap(),
            "--out",
            preds.to_str().unwrap(),
        ],
        Duration::from_secs(30),
    );
    assert!(err.contains("1 to 1048576 labels, not 3000000000"), "{err}");
    assert!(!preds.exists());
}

/// Fuzzing round 3: one `label_id` 1048575 among ids 0 and 1 built a million-class head
/// silently (1.2 GB, rc 0). Such sparse ids are refused by line, pointing to --labels; ids
/// that fill their range are not.
#[test]
fn sparse_class_ids_are_refused_by_line() {
    let tmp = tempfile::tempdir().unwrap();
    let train = tmp.path().join("train.jsonl");
    let lines =
        "{\"text\": \"a\", \"label\": 0}\n{\"text\": \"b\", \"label\": 1048575}\n{\"text\": \"c\", \"label\": 1}\n";
    std::fs::write(&train, lines).unwrap();
    let out = tmp.path().join("ft");
    let m = minilm_dir();
    let args = ["finetune", m.to_str().unwrap(), "--train", train.to_str().unwrap(), "-o", out.to_str().unwrap()];
    let err = fails_fast(&[&args[..], &["--steps", "1", "--device", "cpu"]].concat(), Duration::from_secs(30));
    assert!(
        err.contains(&format!("{}: line 2: label 1048575: the data uses 3 distinct class ids", train.display())),
        "{err}"
    );
    assert!(err.contains("pass --labels"), "{err}");
    assert!(!out.exists());
    // 1001 classes, all used: dense enough, whatever their count.
    let ex: Vec<symerge::data::jsonl::Example> =
        (0..1001).map(|i| symerge::data::jsonl::Example { text: "t".into(), label: None, label_id: Some(i) }).collect();
    let classes = symerge::model::finetune::class_names(&ex, &train, None).unwrap();
    assert_eq!(classes.names.len(), 1001);
}

/// The base decides a merge's tensors, so a base that lacks some (a sharded index that leaves
/// out a shard, an empty header) would give an incomplete model: refused, naming the base and
/// the tensor or field. An expert's own head that the base lacks is still left out, said at info
/// level; other tensors the base lacks are left out with a warning (second fuzzing round).
#[test]
fn a_base_missing_tensors_is_refused_by_merge() {
    use common::{T, read_model, write_model};
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixture_dir("mergekit");
    let base = read_model(&fx.join("base"));
    let copy = |name: &str, keep: &dyn Fn(&str) -> bool, extra: Option<&str>| {
        let mut ts: Vec<T> =
            base.iter().filter(|(n, _)| keep(n)).map(|(n, (d, s, v))| T::new(n, *d, s, v.clone())).collect();
        if let Some(head) = extra {
            ts.push(T::new(head, safetensors::Dtype::F32, &[2, 16], vec![0.5; 32]));
        }
        let dir = write_model(&tmp.path().join(name), &ts);
        std::fs::copy(fx.join("base/config.json"), dir.join("config.json")).unwrap();
        dir
    };
    let experts = [copy("e1", &|_| true, Some("score.weight")), copy("e2", &|_| true, Some("score.weight"))];
    let merge_with = |base: &Path, out: &str| {
        let cfg = tmp.path().join(format!("{out}.yml"));
        common::write_merge_config(
            &cfg,
            &[base.to_path_buf(), experts[0].clone(), experts[1].clone()],
            &["0.5", "0.5"],
            "merge_method: task_arithmetic\n",
        );
        let out = tmp.path().join(out);
        let r = run(&["merge", cfg.to_str().unwrap(), "-o", out.to_str().unwrap()]);
        (r, out)
    };
    type Keep<'a> = &'a dyn Fn(&str) -> bool;
    let cases: [(&str, Keep, &str); 3] = [
        ("no-mlp", &|n| n != "model.layers.0.mlp.up_proj.weight", "lacks tensor `model.layers.0.mlp.up_proj.weight`"),
        ("no-layer-1", &|n| !n.contains("layers.1."), "num_hidden_layers is 2, but the checkpoint's tensors hold 1"),
        ("empty", &|_| false, "holds no tensor"),
    ];
    for (name, keep, want) in cases {
        let b = copy(name, keep, None);
        let ((ok, _, err), out) = merge_with(&b, &format!("out-{name}"));
        assert!(!ok, "{name}: merged");
        assert!(err.contains(want) && err.contains(name), "{name}: {err}");
        assert!(!out.exists());
    }
    // The experts' own head, which the base lacks, is left out, said at info level with the way
    // to score a task (every merge of classifiers has one: a warning read like a fault).
    let ((ok, _, err), out) = merge_with(&copy("whole", &|_| true, None), "out-whole");
    assert!(ok, "{err}");
    let line = err.lines().find(|l| l.contains("score.weight")).unwrap_or_else(|| panic!("{err}"));
    assert!(line.contains("INFO") && !line.contains("WARN"), "{line}");
    assert!(line.contains("1 task-head tensors") && line.contains("eval --head-from EXPERT"), "{line}");
    assert!(!read_model(&out).contains_key("score.weight"));
    // Any other tensor the base lacks still gets a warning.
    let odd = [copy("odd1", &|_| true, Some("model.mystery.weight")), copy("odd2", &|_| true, None)];
    let cfg = tmp.path().join("odd.yml");
    common::write_merge_config(
        &cfg,
        &[fx.join("base"), odd[0].clone(), odd[1].clone()],
        &["0.5", "0.5"],
        "merge_method: task_arithmetic\n",
    );
    let (ok, _, err) = run(&["merge", cfg.to_str().unwrap(), "-o", tmp.path().join("out-odd").to_str().unwrap()]);
    assert!(ok, "{err}");
    let line = err.lines().find(|l| l.contains("model.mystery.weight")).unwrap_or_else(|| panic!("{err}"));
    assert!(line.contains("WARN") && line.contains("1 tensors of the inputs are not in the reference model"), "{line}");
}

/// A directory holding both a single-file checkpoint and a sharded index (a stale leftover of
/// re-sharding): transformers reads the single file, a sharded reader the index, so which
/// weights are meant is ambiguous. Refused, naming both, rather than read one way silently.
#[test]
fn a_directory_with_two_checkpoints_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixture_dir("mergekit").join("base");
    let dir = tmp.path().join("both");
    std::fs::create_dir(&dir).unwrap();
    for f in ["model.safetensors", "config.json"] {
        std::fs::copy(fx.join(f), dir.join(f)).unwrap();
    }
    std::fs::copy(fx.join("model.safetensors"), dir.join("model-00001-of-00001.safetensors")).unwrap();
    let names: Vec<String> = common::read_model(&fx).into_keys().collect();
    let map: serde_json::Map<String, serde_json::Value> =
        names.iter().map(|n| (n.clone(), "model-00001-of-00001.safetensors".into())).collect();
    std::fs::write(dir.join("model.safetensors.index.json"), serde_json::json!({"weight_map": map}).to_string())
        .unwrap();
    let cfg = tmp.path().join("m.yml");
    std::fs::write(
        &cfg,
        format!("merge_method: linear\nparameters: {{weight: 1.0}}\nmodels:\n  - model: {}\n", dir.display()),
    )
    .unwrap();
    let out = tmp.path().join("out");
    let (ok, _, err) = run(&["merge", cfg.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert!(!ok, "merged an ambiguous directory");
    assert!(err.contains("model.safetensors.index.json") && err.contains("both/model.safetensors "), "{err}");
    assert!(!out.exists());
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let (ok, _, err) = run(&["merge", cfg.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert!(ok, "{err}");
}
