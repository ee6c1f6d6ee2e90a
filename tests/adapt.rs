//! Adaptation on the real MiniLM-L6 encoder with two experts made from it (seeded perturbations
//! of every weight and their own heads): the soft-label cache is written, reused and checked; the
//! block-streamed Lambda gradient equals the all-resident one and a finite difference; a short
//! SyMerge run lowers the loss, moves Lambda and the heads, and writes models that `eval` and
//! `merge` (with the learned Lambda table) agree with.

mod common;

use common::adapt_fixture::{Fixture, TEXTS, fixture};
use common::{minilm_dir, randoms, read_model, run};
use symerge::adapt::classifier::Adapter;
use symerge::adapt::config::AdaptConfig;
use symerge::adapt::objective::{self, Objective};
use symerge::backend::Cpu;

fn adapter(f: &Fixture) -> Adapter<Cpu> {
    Adapter::load(Cpu, AdaptConfig::load(&f.root.join("adapt.yml")).unwrap()).unwrap()
}

#[test]
fn cache_is_reused_and_mismatches_are_rejected() {
    let f = fixture();
    let r = &f.root;
    let args = |inputs: &str, out: &str| {
        vec![
            "cache-labels".to_string(),
            "--expert".into(),
            r.join("expert-alpha").display().to_string(),
            "--task".into(),
            "alpha".into(),
            "--inputs".into(),
            r.join(inputs).display().to_string(),
            "-o".into(),
            r.join(out).display().to_string(),
            "--max-len".into(),
            "32".into(),
            "--json".into(),
        ]
    };
    let a = args("alpha.jsonl", "alpha.labels");
    let (ok, out, err) = run(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(s["reused"], true, "second run reuses the cache: {s}");
    // --top-k means nothing for a classifier: said, not ignored in silence (fuzzing round 6).
    let mut k = args("alpha.jsonl", "alpha-k.labels");
    k.extend(["--top-k".into(), "5".into()]);
    let (ok, _, err) = run(&k.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok && err.contains("--top-k 5 has no effect") && err.contains("all 3 classes"), "{err}");

    // The cached probabilities are the expert's own predictions.
    let (ok, _, err) = run(&[
        "predict",
        r.join("expert-alpha").to_str().unwrap(),
        "--inputs",
        r.join("alpha.jsonl").to_str().unwrap(),
        "--out",
        r.join("pred.jsonl").to_str().unwrap(),
        "--max-len",
        "32",
    ]);
    assert!(ok, "{err}");
    let cache = symerge::labels::LabelCache::open(&r.join("alpha.labels"), None).unwrap();
    for (i, line) in std::fs::read_to_string(r.join("pred.jsonl")).unwrap().lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        // The predicted class by name (config.json's label2id), beside its index.
        assert_eq!(v["label"], format!("class-{}", v["pred"]), "row {i}");
        for (c, p) in v["probs"].as_array().unwrap().iter().enumerate() {
            assert!((cache.probs(i)[c] - p.as_f64().unwrap() as f32).abs() < 2e-3, "row {i} class {c}");
        }
    }

    // Other inputs with the same cache path: refused, naming the cause.
    std::fs::write(r.join("other.jsonl"), "{\"text\": \"something else\"}\n").unwrap();
    let b = args("other.jsonl", "alpha.labels");
    let (ok, _, err) = run(&b.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!ok && err.contains("different inputs") && err.contains("alpha.labels"), "{err}");

    // Walk-through #13: another task's expert (alpha's, which lacks beta's label class-3) for
    // task beta is refused for the cache/expert mismatch, not for the labels that follow from it.
    let swapped =
        std::fs::read_to_string(r.join("adapt.yml")).unwrap().replace("expert: expert-beta", "expert: expert-alpha");
    std::fs::write(r.join("swapped.yml"), swapped).unwrap();
    let e = Adapter::load(Cpu, AdaptConfig::load(&r.join("swapped.yml")).unwrap()).err().unwrap().to_string();
    assert!(e.contains("beta.labels") && e.contains("different expert checkpoint"), "{e}");

    // adapt refuses a cache made for another task's expert.
    std::fs::copy(r.join("beta.labels"), r.join("alpha.labels")).unwrap();
    let e = Adapter::load(Cpu, AdaptConfig::load(&r.join("adapt.yml")).unwrap()).err().unwrap().to_string();
    assert!(e.contains("different task") && e.contains("alpha.labels"), "{e}");
    // Names are quoted and escaped: a name with an invisible character shows it (fuzzing round 6).
    assert!(e.contains(r#"(cache has "beta", this run has "alpha")"#), "{e}");
    let zw = std::fs::read_to_string(r.join("adapt.yml")).unwrap().replace("name: alpha,", "name: \"beta\\u200b\",");
    std::fs::write(r.join("zw.yml"), zw).unwrap();
    let e = Adapter::load(Cpu, AdaptConfig::load(&r.join("zw.yml")).unwrap()).err().unwrap().to_string();
    assert!(e.contains(r#"(cache has "beta", this run has "beta\u{200b}")"#), "{e}");

    // A corrupted cache is refused.
    let mut bytes = std::fs::read(r.join("beta.labels")).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x10;
    std::fs::write(r.join("beta.labels"), bytes).unwrap();
    std::fs::copy(r.join("beta.labels"), r.join("alpha.labels")).unwrap();
    let e = Adapter::load(Cpu, AdaptConfig::load(&r.join("adapt.yml")).unwrap()).err().unwrap().to_string();
    assert!(e.contains("checksum"), "{e}");
    // cache-labels itself, on that cache, says how to rebuild it, and does with --force.
    let (ok, _, err) = run(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!ok && err.contains("checksum") && err.contains("pass --force to rebuild it"), "{err}");
    let forced: Vec<&str> = a.iter().map(String::as_str).chain(["--force"]).collect();
    let (ok, out, err) = run(&forced);
    assert!(ok, "{err}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap()["reused"], false);
}

#[test]
fn streamed_lambda_gradient_equals_resident_and_finite_difference() {
    let f = fixture();
    let mut a = adapter(&f);
    // Move Lambda off its uniform start so every coefficient matters differently.
    for (i, v) in a.lambda.values.iter_mut().enumerate() {
        *v = 0.2 + 0.6 * ((i * 7919) % 101) as f32 / 100.0;
    }
    let rows = [0usize, 3, 5, 8, 11];
    let task = 1;
    let streamed = a.loss_and_grads(task, &rows).unwrap();
    assert!(streamed.lambda.iter().any(|&g| g != 0.0));

    // All resident: the whole merged model, forward and backward through the model API.
    let be = Cpu;
    let model = a.task_model(task).unwrap();
    let t = &a.tasks[task];
    let tok = symerge::model::TextTokenizer::from_dir(&t.expert, 32).unwrap();
    let texts: Vec<&str> = rows.iter().map(|&i| TEXTS[i]).collect();
    let batch = model.batch(&tok.encode(&texts).unwrap()).unwrap();
    let (logits, saved) = model.forward_saving(&batch).unwrap();
    let probs = t.data.cache.as_ref().unwrap().probs_batch(&rows);
    let lo = objective::evaluate(
        &be,
        Objective::Soft { min_confidence: None },
        &logits,
        Some(&probs),
        rows.len(),
        t.data.classes,
    )
    .unwrap();
    assert!((lo.loss - streamed.loss).abs() <= 1e-6 * lo.loss.abs(), "{} vs {}", lo.loss, streamed.loss);
    let grads = model.backward(&batch, saved, &lo.dlogits).unwrap();
    let mut resident = vec![0f64; a.lambda.values.len()];
    for (b, g) in grads.iter().take(a.shared.len()).enumerate() {
        a.weights.visit(&be, b, None).unwrap().lambda_grad(&be, g, &[], &mut resident).unwrap();
    }
    let norm: f64 = resident.iter().map(|g| g * g).sum::<f64>().sqrt();
    let diff: f64 = resident.iter().zip(&streamed.lambda).map(|(r, s)| (r - s).powi(2)).sum::<f64>().sqrt();
    assert!(diff <= 1e-6 * norm, "streamed vs resident: |diff| {diff} vs |g| {norm}");
    // The head's gradients agree too.
    for (name, g) in &grads[grads.len() - 1] {
        let s = &streamed.private[0][name].buf;
        let d: f32 = g.buf.iter().zip(s).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        assert!(d <= 1e-6 * g.buf.iter().map(|x| x.abs()).fold(0.0, f32::max), "{name}");
    }

    // Central difference of the loss along a random direction of Lambda.
    let dir: Vec<f32> = randoms(5, a.lambda.values.len(), 1.0).iter().map(|&v| v.signum() as f32).collect();
    let eps = 0.02f32;
    let base_values = a.lambda.values.clone();
    let mut loss_at = |s: f32| {
        a.lambda.values = base_values.iter().zip(&dir).map(|(v, d)| v + s * d).collect();
        a.loss_and_grads(task, &rows).unwrap().loss as f64
    };
    let fd = (loss_at(eps) - loss_at(-eps)) / (2.0 * eps as f64);
    let analytic: f64 = streamed.lambda.iter().zip(&dir).map(|(g, &d)| g * d as f64).sum();
    assert!((fd - analytic).abs() <= 0.02 * analytic.abs(), "finite difference {fd} vs analytic {analytic}");
}

#[test]
fn symerge_run_learns_and_writes_consistent_outputs() {
    let f = fixture();
    let r = &f.root;
    let out = r.join("out");
    let (ok, stdout, err) = run(&[
        "adapt",
        r.join("adapt.yml").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--json",
        "--log-every",
        "0",
    ]);
    assert!(ok, "{err}");
    let s: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(s["steps"], 24);
    // Every block kept: loaded once, nothing streamed per step (it was the load / steps).
    assert_eq!(s["streaming"]["mode"], "resident");
    assert_eq!(s["bytes_streamed_per_step"], 0, "{s}");
    assert_eq!(s["streaming"]["bytes_loaded_once"], s["streaming"]["shared_bytes"], "{s}");

    // Loss per task: the last steps below the first steps.
    let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    for task in ["alpha", "beta"] {
        let losses: Vec<f64> = log
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["task"] == task)
            .map(|v| v["loss"].as_f64().unwrap())
            .collect();
        assert_eq!(losses.len(), 12);
        let first: f64 = losses[..3].iter().sum::<f64>() / 3.0;
        let last: f64 = losses[9..].iter().sum::<f64>() / 3.0;
        assert!(last < 0.8 * first, "{task}: loss {first:.4} -> {last:.4}");
    }

    // Lambda moved, stayed in [0, 1], and is a merge Lambda table.
    let table: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("lambda.json")).unwrap()).unwrap();
    let values: Vec<f64> = table["lambda"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|v| v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()))
        .collect();
    assert_eq!(values.len(), 2 * 101, "one coefficient per task per encoder tensor");
    assert!(values.iter().all(|v| (0.0..=1.0).contains(v)));
    assert!(values.iter().filter(|v| (**v - 0.3).abs() > 1e-3).count() > values.len() / 2, "Lambda moved");

    // The adapted head differs from the expert's.
    let adapted = read_model(&out.join("tasks/alpha"));
    let expert = read_model(&r.join("expert-alpha"));
    let (a, e) = (&adapted["classifier.weight"].2, &expert["classifier.weight"].2);
    assert!(a.iter().zip(e).any(|(x, y)| (x - y).abs() > 1e-4), "head trained");

    // `merge` with the learned table rebuilds the same merged encoder.
    let merge_cfg = r.join("merge.yml");
    std::fs::write(
        &merge_cfg,
        format!(
            "merge_method: task_arithmetic\nbase_model: {}\nmodels:\n  - model: expert-alpha\n  - model: expert-beta\nparameters: {{lambda_table: out/lambda.json}}\n",
            minilm_dir().display()
        ),
    )
    .unwrap();
    let (ok, _, err) = run(&["merge", merge_cfg.to_str().unwrap(), "-o", r.join("merged").to_str().unwrap(), "-q"]);
    assert!(ok, "{err}");
    let merged = read_model(&r.join("merged"));
    let name = "encoder.layer.3.intermediate.dense.weight";
    let (m, t) = (&merged[name].2, &adapted[&format!("bert.{name}")].2);
    let worst = m.iter().zip(t).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    assert!(worst < 1e-6, "merge from lambda.json vs adapted model: {worst}");

    // Each task's model loads and evaluates on its labelled inputs; accuracy matches the summary.
    let (ok, stdout, err) = run(&[
        "eval",
        out.join("tasks/beta").to_str().unwrap(),
        "--inputs",
        r.join("beta.jsonl").to_str().unwrap(),
        "--max-len",
        "32",
        "--json",
    ]);
    assert!(ok, "{err}");
    let e: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    // One unit in JSON: adapt's accuracy is a fraction, as eval's (format_version 2 says so).
    assert_eq!(s["format_version"], 2);
    let want = s["tasks"][1]["accuracy"].as_f64().unwrap();
    assert!((e["accuracy"].as_f64().unwrap() - want).abs() < 1e-12, "{e} vs {want}");
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(written["summary"]["tasks"][1]["accuracy"], s["tasks"][1]["accuracy"]);
    assert_eq!(written["summary"]["format_version"], 2);
    let mean = (s["tasks"][0]["accuracy"].as_f64().unwrap() + want) / 2.0;
    assert!((s["average_accuracy"].as_f64().unwrap() - mean).abs() < 1e-12, "{s}");
    // One unit in text: percent with two decimals, as adapt's and `eval ADAPT_OUT`'s tables.
    let (ok, text, err) = run(&[
        "eval",
        out.join("tasks/beta").to_str().unwrap(),
        "--inputs",
        r.join("beta.jsonl").to_str().unwrap(),
        "--max-len",
        "32",
    ]);
    assert!(ok, "{err}");
    let pct = format!("accuracy {:.2}% ", 100.0 * want);
    assert!(text.starts_with(&pct), "{text:?} should start with {pct:?}");

    // The merged encoder from `merge` with the adapted head put on it scores the same.
    let (ok, stdout, err) = run(&[
        "eval",
        r.join("merged").to_str().unwrap(),
        "--head-from",
        out.join("tasks/beta").to_str().unwrap(),
        "--inputs",
        r.join("beta.jsonl").to_str().unwrap(),
        "--max-len",
        "32",
        "--json",
    ]);
    assert!(ok, "{err}");
    let h: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(h["accuracy"], e["accuracy"]);
    assert!((h["mean_ce"].as_f64().unwrap() - e["mean_ce"].as_f64().unwrap()).abs() < 1e-4, "{h} vs {e}");

    // `eval` over the whole output: every task with its own checkpoint and its expert, in one call.
    let (ok, stdout, err) = run(&["eval", out.to_str().unwrap(), "--max-len", "32", "--json"]);
    assert!(ok, "{err}");
    let all: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let tasks = all["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 2);
    for (i, t) in tasks.iter().enumerate() {
        assert_eq!(t["task"], s["tasks"][i]["name"]);
        let want = s["tasks"][i]["accuracy"].as_f64().unwrap();
        assert!((t["adapted"]["accuracy"].as_f64().unwrap() - want).abs() < 1e-12, "{t} vs {want}");
        assert!(t["expert"]["accuracy"].is_f64(), "{t}");
    }
    assert_eq!(tasks[1]["adapted"], e, "same scores as `eval` on the task's checkpoint");
    // Without --max-len, the output is scored at the length its adaptation used (32 here).
    assert_eq!(all["max_len"], 32);
    let (ok, stdout, err) = run(&["eval", out.to_str().unwrap(), "--json"]);
    assert!(ok, "{err}");
    let recorded: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(recorded, all, "the recorded length, not the default 128");
    let mean = (tasks[0]["adapted"]["accuracy"].as_f64().unwrap() + e["accuracy"].as_f64().unwrap()) / 2.0;
    assert!((all["average_adapted"].as_f64().unwrap() - mean).abs() < 1e-12);
    // The expert's score is what `eval` gives the expert itself.
    let (ok, stdout, err) = run(&[
        "eval",
        r.join("expert-alpha").to_str().unwrap(),
        "--inputs",
        r.join("alpha.jsonl").to_str().unwrap(),
        "--max-len",
        "32",
        "--json",
    ]);
    assert!(ok, "{err}");
    let x: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(tasks[0]["expert"], x);
    // Text table and a clear error for an unknown task name.
    let (ok, stdout, err) = run(&["eval", out.to_str().unwrap(), "--max-len", "32", "--no-experts"]);
    assert!(ok && stdout.contains("average") && !stdout.contains("expert"), "{stdout} {err}");
    let (ok, _, err) = run(&["eval", out.to_str().unwrap(), "--task-inputs", "gamma=x.jsonl"]);
    assert!(!ok && err.contains("gamma") && err.contains("alpha"), "{err}");
    // The same task twice: the last won silently (fuzzing round 6).
    let (ok, _, err) =
        run(&["eval", out.to_str().unwrap(), "--task-inputs", "alpha=a.jsonl", "--task-inputs", "alpha=b.jsonl"]);
    assert!(!ok && err.contains("--task-inputs names task `alpha` twice"), "{err}");
    // A task model that is not the one adapt wrote (here the expert's weights copied over it)
    // is refused rather than scored as the adaptation's.
    std::fs::copy(r.join("expert-alpha/model.safetensors"), out.join("tasks/alpha/model.safetensors")).unwrap();
    let (ok, _, err) = run(&["eval", out.to_str().unwrap(), "--no-experts"]);
    assert!(!ok && err.contains("not the model adapt wrote for task `alpha`"), "{err}");
}

/// A confidence filter that keeps no sample trains nothing: said, not silent; Lambda stays at
/// its start.
#[test]
fn a_filter_that_keeps_no_sample_is_reported() {
    let f = fixture();
    let r = &f.root;
    let cfg = std::fs::read_to_string(r.join("adapt.yml")).unwrap().replace("lr: 0.02", "lr: 0.02\nconfidence: 1.0");
    std::fs::write(r.join("strict.yml"), cfg).unwrap();
    let out = r.join("strict");
    let (ok, _, err) = run(&[
        "adapt",
        r.join("strict.yml").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--epochs",
        "2",
        "--no-eval",
    ]);
    assert!(ok, "{err}");
    for task in ["alpha", "beta"] {
        assert!(err.contains(&format!("task `{task}`: no sample counted")), "{err}");
    }
    let table: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("lambda.json")).unwrap()).unwrap();
    let moved = table["lambda"].as_object().unwrap().values().flat_map(|v| v.as_array().unwrap().clone());
    assert!(moved.map(|x| x.as_f64().unwrap()).all(|x| (x - 0.3).abs() < 1e-6));
    // Steps that counted nothing log no loss (a 0 read as a perfect step: fuzzing round 8).
    let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = log.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(!lines.is_empty() && lines.iter().all(|v| v["loss"].is_null()), "{log}");
}

#[test]
fn adamerging_minimises_entropy_and_keeps_heads() {
    let f = fixture();
    let r = &f.root;
    let cfg = std::fs::read_to_string(r.join("adapt.yml")).unwrap().replace("method: symerge", "method: adamerging");
    std::fs::write(r.join("ada.yml"), cfg).unwrap();
    let out = r.join("ada");
    let (ok, _, err) =
        run(&["adapt", r.join("ada.yml").to_str().unwrap(), "-o", out.to_str().unwrap(), "--epochs", "6", "--no-eval"]);
    assert!(ok, "{err}");
    let adapted = read_model(&out.join("tasks/alpha"));
    let expert = read_model(&r.join("expert-alpha"));
    assert_eq!(adapted["classifier.weight"].2, expert["classifier.weight"].2, "AdaMerging trains Lambda only");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.join("train_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 12);
    assert!(lines.iter().all(|v| v["loss"].as_f64().unwrap() >= 0.0));

    // Existing output is not replaced without --force, and nothing half-written appears.
    let (ok, _, err) =
        run(&["adapt", r.join("ada.yml").to_str().unwrap(), "-o", out.to_str().unwrap(), "--epochs", "1"]);
    assert!(!ok && err.contains("--force"), "{err}");
}

/// Streaming every shared block from the mappings, keeping all of them staged, or keeping only
/// the first: the same bits for the loss, Lambda's and the heads' gradients and, after steps, for
/// Lambda and the heads (the merge and the dot products run the same code on the same bytes; only
/// when the bytes are read differs). Streaming reads every shared block twice per step.
#[test]
fn streamed_resident_and_mixed_adaptation_agree_bit_for_bit() {
    let f = fixture();
    let load = |budget| Adapter::load_with(Cpu, AdaptConfig::load(&f.root.join("adapt.yml")).unwrap(), budget).unwrap();
    // Kept blocks get half the budget (the other half is for a step's internals).
    let first = load(Some(0)).weights.blocks[0].bytes();
    let mut runs = [load(Some(0)), load(Some(u64::MAX)), load(Some(2 * first))];
    assert_eq!(load(Some(2 * first - 1)).weights.report().kept_blocks, 0, "the first block takes half");
    let modes: Vec<String> = runs.iter().map(|a| a.weights.report().mode).collect();
    assert_eq!(modes, ["streamed", "resident", "mixed"]);
    let rows = [1usize, 4, 6, 9];
    let grads: Vec<_> = runs.iter().map(|a| a.loss_and_grads(1, &rows).unwrap()).collect();
    for g in &grads[1..] {
        assert_eq!(g.loss.to_bits(), grads[0].loss.to_bits());
        assert_eq!(common::bits64(&g.lambda), common::bits64(&grads[0].lambda));
        for (name, p) in &g.private[0] {
            assert_eq!(common::bits(&p.buf), common::bits(&grads[0].private[0][name].buf), "{name}");
        }
    }
    for a in runs.iter_mut() {
        for task in [0, 1, 0] {
            a.step(task).unwrap();
        }
    }
    for a in &runs[1..] {
        assert_eq!(common::bits(&a.lambda.values), common::bits(&runs[0].lambda.values));
        for (t, t0) in a.tasks.iter().zip(&runs[0].tasks) {
            for (name, p) in &t.private[0] {
                assert_eq!(common::bits(&p.buf), common::bits(&t0.private[0][name].buf), "{} {name}", t.name);
            }
        }
    }
    assert!(runs[0].lambda.values.iter().any(|&v| v != 0.3), "Lambda moved");
    let shared = runs[0].weights.report().shared_bytes;
    assert_eq!(runs[0].weights.bytes_streamed(), 4 * 2 * shared, "streamed: every block twice a step");
    assert_eq!(runs[1].weights.bytes_streamed(), shared, "resident: every block once");
    let mixed = runs[2].weights.report();
    assert_eq!(mixed.kept_blocks, 1);
    assert_eq!(runs[2].weights.bytes_streamed(), first + 4 * 2 * (shared - first));
    // The one-time load of the kept blocks is told apart from what each step streams.
    let once: Vec<u64> = runs.iter().map(|a| a.weights.report().bytes_loaded_once).collect();
    assert_eq!(once, [0, shared, first]);
}

/// A step whose every sample is filtered out is skipped: Lambda and the task's layer stay where
/// the previous step left them. Stepping Adam on its zero gradient moved Lambda on the moments
/// of earlier steps (by 0.06 over a run, in a PyTorch cross-check), which the released code's
/// gradient scaler does not do.
#[test]
fn a_step_that_counts_no_sample_moves_nothing() {
    let f = fixture();
    let mut a = adapter(&f);
    let (_, kept) = a.step(0).unwrap();
    assert!(kept > 0);
    let lambda = a.lambda.values.clone();
    let head = |a: &Adapter<Cpu>| -> Vec<Vec<f32>> {
        a.tasks[1].private.iter().flat_map(|p| p.values().map(|t| t.buf.clone())).collect()
    };
    let before = head(&a);
    a.cfg.confidence = Some(1.0);
    let (_, kept) = a.step(1).unwrap();
    assert_eq!(kept, 0);
    assert!(a.lambda.values == lambda, "Lambda moved on a step that counted no sample");
    assert!(head(&a) == before, "the task's layer moved on a step that counted no sample");
    a.cfg.confidence = None;
    let (_, kept) = a.step(1).unwrap();
    assert!(kept > 0 && a.lambda.values != lambda && head(&a) != before);
}

/// A run shorter than `--log-every` is not silent until its end: a start line says its size and
/// memory mode, and the first and last steps are logged with the time spent and an ETA.
#[test]
fn adapt_logs_a_start_line_and_every_step_line_has_elapsed_and_eta() {
    let f = fixture();
    let r = &f.root;
    let out = r.join("short");
    let (ok, _, err) = run(&[
        "adapt",
        r.join("adapt.yml").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--epochs",
        "2",
        "--log-every",
        "10",
        "--no-eval",
    ]);
    assert!(ok, "{err}");
    let start = err.lines().position(|l| l.contains("adapting 2 tasks (alpha, beta) with symerge: 2 epochs, 4 steps"));
    let start = start.unwrap_or_else(|| panic!("no start line: {err}"));
    assert!(err.lines().nth(start).unwrap().contains("shared blocks resident"), "{err}");
    let steps: Vec<&str> = err.lines().filter(|l| l.contains(" step ") && l.contains("mean lambda")).collect();
    assert_eq!(steps.len(), 2, "the first and the last step: {err}");
    assert!(steps[0].contains("epoch 1/2 step 1/4:") && steps[1].contains("epoch 2/2 step 4/4:"), "{err}");
    assert!(steps.iter().all(|l| l.contains("s elapsed, eta ")), "{err}");
    assert!(steps[1].contains("eta 0s"), "{err}");
    // Walk-through #18: the task models saved inside the staging directory are no info lines
    // (that path never exists after the run), and the output is named once it is in place.
    assert!(!err.contains(".partial-"), "a staging path in the log: {err}");
    assert!(err.contains(&format!("wrote {} (2 task models)", out.display())), "{err}");
}

/// Runs `adapt` on the fixture for `epochs` epochs into `r/NAME`, without scoring.
fn adapt_quietly(r: &std::path::Path, name: &str, epochs: &str) -> std::path::PathBuf {
    let out = r.join(name);
    let yml = r.join("adapt.yml");
    let (ok, _, err) =
        run(&["adapt", yml.to_str().unwrap(), "-o", out.to_str().unwrap(), "--epochs", epochs, "--no-eval"]);
    assert!(ok, "{err}");
    out
}

/// `merge` of `models` (paths beside the config) on `base` with `parameters` into `r/NAME`:
/// (success, stderr).
fn merge_into(
    r: &std::path::Path,
    name: &str,
    base: &std::path::Path,
    models: &[&str],
    params: &str,
) -> (bool, String) {
    let cfg = r.join(format!("{name}.yml"));
    let list: String = models.iter().map(|m| format!("  - model: {m}\n")).collect();
    let text =
        format!("merge_method: task_arithmetic\nbase_model: {}\nmodels:\n{list}parameters: {params}\n", base.display());
    std::fs::write(&cfg, text).unwrap();
    let (ok, _, err) = run(&["merge", cfg.to_str().unwrap(), "-o", r.join(name).to_str().unwrap()]);
    (ok, err)
}

/// lambda.json records each expert (task, path, content sketch) in column order and the base;
/// `merge` with the table refuses a config that lists the experts in another order, saying which
/// position holds which task's expert, and an expert or base the table was not learned with. A
/// copy of an expert elsewhere is still that expert. A table without records (an earlier
/// adapt's) still merges, with a line saying the order cannot be checked.
#[test]
fn a_lambda_table_is_applied_only_to_its_experts_in_their_order() {
    let f = fixture();
    let r = &f.root;
    let out = adapt_quietly(r, "out", "1");
    let table: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("lambda.json")).unwrap()).unwrap();
    for (i, task) in ["alpha", "beta"].iter().enumerate() {
        let e = &table["experts"][i];
        assert_eq!(e["task"], *task, "{table}");
        assert!(e["path"].as_str().unwrap().ends_with(&format!("expert-{task}")), "{e}");
        assert_eq!(e["fingerprint"].as_str().unwrap().len(), 64, "{e}");
    }
    assert_ne!(table["experts"][0]["fingerprint"], table["experts"][1]["fingerprint"]);
    assert!(table["base"]["fingerprint"].is_string(), "{table}");

    let base = minilm_dir();
    let lambda = "{lambda_table: out/lambda.json}";
    let (ok, err) = merge_into(r, "in-order", &base, &["expert-alpha", "expert-beta"], lambda);
    assert!(ok, "{err}");
    let (ok, err) = merge_into(r, "swapped", &base, &["expert-beta", "expert-alpha"], lambda);
    assert!(!ok, "a swapped list must be refused");
    for want in ["models[0]", "is task `beta`'s expert (column 1)", "models[1]", "is task `alpha`'s expert (column 0)"]
    {
        assert!(err.contains(want), "no `{want}` in: {err}");
    }
    assert!(!r.join("swapped").exists());

    std::fs::create_dir(r.join("moved-beta")).unwrap();
    for file in ["model.safetensors", "config.json", "tokenizer.json"] {
        std::fs::copy(r.join("expert-beta").join(file), r.join("moved-beta").join(file)).unwrap();
    }
    let (ok, err) = merge_into(r, "moved", &base, &["expert-alpha", "moved-beta"], lambda);
    assert!(ok, "{err}");

    common::adapt_fixture::make_expert(&r.join("expert-gamma"), 3, 4);
    let (ok, err) = merge_into(r, "stranger", &base, &["expert-alpha", "expert-gamma"], lambda);
    assert!(
        !ok && err.contains("models[1]") && err.contains("expert-gamma") && err.contains("none of the experts"),
        "{err}"
    );
    let (ok, err) = merge_into(r, "other-base", &r.join("expert-gamma"), &["expert-alpha", "expert-beta"], lambda);
    assert!(!ok && err.contains("is not the base"), "{err}");

    let mut old = table.clone();
    let fields = old.as_object_mut().unwrap();
    fields.remove("experts");
    fields.remove("base");
    std::fs::write(r.join("old.json"), old.to_string()).unwrap();
    let (ok, err) = merge_into(r, "old", &base, &["expert-beta", "expert-alpha"], "{lambda_table: old.json}");
    assert!(ok && err.contains("cannot be checked"), "{err}");
}

/// `eval ADAPT_OUT --baseline` scores, per task, the merge adapt started from: task arithmetic at
/// lambda_init with the task's expert head, the scores `merge` + `eval --head-from EXPERT` give.
#[test]
fn eval_baseline_scores_the_merge_adapt_started_from() {
    let f = fixture();
    let r = &f.root;
    let out = adapt_quietly(r, "out", "2");
    let (ok, stdout, err) = run(&["eval", out.to_str().unwrap(), "--baseline", "--no-experts", "--json"]);
    assert!(ok, "{err}");
    let all: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!((all["baseline_lambda"].as_f64().unwrap() - 0.3).abs() < 1e-6, "{all}");

    let (ok, err) = merge_into(r, "ta", &minilm_dir(), &["expert-alpha", "expert-beta"], "{lambda: 0.3, weight: 1.0}");
    assert!(ok, "{err}");
    let mut sum = 0.0;
    for (i, task) in ["alpha", "beta"].iter().enumerate() {
        let (ok, stdout, err) = run(&[
            "eval",
            r.join("ta").to_str().unwrap(),
            "--head-from",
            r.join(format!("expert-{task}")).to_str().unwrap(),
            "--inputs",
            r.join(format!("{task}.jsonl")).to_str().unwrap(),
            "--max-len",
            "32",
            "--json",
        ]);
        assert!(ok, "{err}");
        let want: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        let have = &all["tasks"][i]["baseline"];
        assert_eq!(have["accuracy"], want["accuracy"], "{task}: {have} vs {want}");
        let (h, w) = (have["mean_ce"].as_f64().unwrap(), want["mean_ce"].as_f64().unwrap());
        assert!((h - w).abs() < 1e-4, "{task}: {have} vs {want}");
        assert_ne!(all["tasks"][i]["adapted"], *have, "{task}: the baseline is not the adapted model");
        sum += have["accuracy"].as_f64().unwrap();
    }
    assert!((all["average_baseline"].as_f64().unwrap() - sum / 2.0).abs() < 1e-12, "{all}");

    let (ok, text, err) = run(&["eval", out.to_str().unwrap(), "--baseline", "--no-experts"]);
    assert!(ok, "{err}");
    let header = text.lines().next().unwrap();
    assert!(header.contains("baseline") && header.contains("symerge"), "{text}");
    assert!(text.contains("base + 0.3 x the sum of the task vectors"), "{text}");
    let inputs = r.join("alpha.jsonl");
    let (ok, _, err) =
        run(&["eval", out.join("tasks/alpha").to_str().unwrap(), "--baseline", "--inputs", inputs.to_str().unwrap()]);
    assert!(!ok && err.contains("--baseline"), "{err}");
}

/// Fuzzing round 4: `eval ADAPT_OUT` re-read the recorded inputs without checking them, so a
/// task file cut from 12 lines to 3 was scored as the adaptation's. summary.json now records the
/// hash of each inputs file adapt read, and eval refuses a file that changed, naming it.
#[test]
fn eval_refuses_recorded_inputs_that_changed_since_adapt() {
    let f = fixture();
    let r = &f.root;
    let out = adapt_quietly(r, "out", "1");
    let o = out.to_str().unwrap();
    let (ok, _, err) = run(&["eval", o, "--no-experts"]);
    assert!(ok, "{err}");
    let alpha = r.join("alpha.jsonl");
    let text = std::fs::read_to_string(&alpha).unwrap();
    let cut: String = text.lines().take(3).map(|l| format!("{l}\n")).collect();
    std::fs::write(&alpha, cut).unwrap();
    let (ok, _, err) = run(&["eval", o, "--no-experts"]);
    assert!(
        !ok && err.contains("alpha.jsonl: the inputs of task `alpha` changed since adapt read them (12 records when adapt read it, 3 now")
            && err.contains(&format!("--task-inputs alpha={}", alpha.display())),
        "{err}"
    );
    // Named as other data, the file is scored as it is.
    let (ok, stdout, err) =
        run(&["eval", o, "--no-experts", "--json", "--task-inputs", &format!("alpha={}", alpha.display())]);
    assert!(ok, "{err}");
    let all: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(all["tasks"][0]["examples"], 3, "{all}");
}

/// Fuzzing round 5: `eval ADAPT_OUT` scored the experts (and built the baseline) from the paths
/// adapt recorded without checking they still hold the models adapt read; a replaced expert was
/// reported as the adaptation's expert. lambda.json records each model's content sketch.
#[test]
fn eval_refuses_experts_that_changed_since_adapt() {
    let f = fixture();
    let r = &f.root;
    let out = adapt_quietly(r, "out", "1");
    let o = out.to_str().unwrap();
    let (ok, _, err) = run(&["eval", o, "--baseline"]);
    assert!(ok, "{err}");
    let alpha = r.join("expert-alpha");
    std::fs::remove_dir_all(&alpha).unwrap();
    common::adapt_fixture::make_expert(&alpha, 7, 3);
    let (ok, _, err) = run(&["eval", o]);
    let want = format!("{}: the expert of task `alpha` changed since adapt", alpha.display());
    assert!(!ok && err.contains(&want) && err.contains("--no-experts"), "{err}");
    let (ok, _, err) = run(&["eval", o, "--baseline", "--no-experts"]);
    assert!(!ok && err.contains(&want) && !err.contains("--no-experts"), "{err}");
    // Without experts or a baseline, only the adapted task models are scored.
    let (ok, _, err) = run(&["eval", o, "--no-experts"]);
    assert!(ok, "{err}");
}

/// Fuzzing round 6: `--epochs 0` (which writes the starting merge) reported a final loss of
/// -0.0, and a confidence filter that dropped every sample a final loss of 0.0: losses never
/// computed. Both are null now.
#[test]
fn no_training_is_not_reported_as_a_loss() {
    let f = fixture();
    let r = &f.root;
    let yml = r.join("adapt.yml");
    let strict = r.join("strict.yml");
    std::fs::write(&strict, std::fs::read_to_string(&yml).unwrap() + "confidence: 1.0\n").unwrap();
    for (cfg, epochs) in [(&yml, "0"), (&strict, "1")] {
        let out = r.join(format!("out-{epochs}"));
        let args =
            ["adapt", cfg.to_str().unwrap(), "-o", out.to_str().unwrap(), "--epochs", epochs, "--no-eval", "--json"];
        let (ok, stdout, err) =
            run(&[&args[..], &["--device", "cpu", "--device-mem", "1GB", "--host-mem", "1000PB"]].concat());
        assert!(ok, "{err}");
        let s: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert!(s["tasks"][0]["final_loss"].is_null() && s["tasks"][1]["final_loss"].is_null(), "{s}");
        // Memory flags that do nothing, or ask for more than there is, are said (fuzzing round 6).
        assert!(err.contains("--device-mem has no effect on the cpu backend"), "{err}");
        assert!(err.contains("--host-mem ") && err.contains(" is more than the "), "{err}");
    }
}

/// Fuzzing round 6: an adaptation whose layers overflowed failed its end-of-run score blaming
/// the expert's directory (the in-memory task model carries its path). The final weights' loss
/// now catches it first: the error names the task, and nothing is written.
#[test]
fn an_adapted_model_that_overflows_is_named_by_its_task() {
    let f = fixture();
    let r = &f.root;
    let yml = r.join("adapt.yml");
    let wild = r.join("wild.yml");
    std::fs::write(&wild, std::fs::read_to_string(&yml).unwrap().replace("lr: 0.02", "lr: 1.0e37")).unwrap();
    let out = r.join("wild-out");
    let (ok, _, err) = run(&["adapt", wild.to_str().unwrap(), "-o", out.to_str().unwrap(), "--epochs", "1"]);
    assert!(!ok, "{err}");
    let named =
        ["alpha", "beta"].iter().any(|t| err.contains(&format!("error: task `{t}`: the final weights give a loss of")));
    assert!(named && err.contains("nothing was written; lower the learning rate"), "{err}");
    assert!(!err.contains(&format!("{}", r.join("expert-").display())), "{err}");
    assert!(!out.exists());
}

/// Fuzzing round 6: every step's loss is that of the weights before its update, so `lr: 1e33`
/// reported a healthy final loss (rc 0) for task models that score a cross-entropy of 1e34. Each
/// task's final weights are scored on its last batch (`end_loss`), with a warning when the loss
/// grew by orders of magnitude; at a sane rate the end loss stays near the last step's.
#[test]
fn a_diverged_last_update_is_reported() {
    let f = fixture();
    let r = &f.root;
    let yml = std::fs::read_to_string(r.join("adapt.yml")).unwrap();
    for (lr, diverged) in [("1.0e33", true), ("1.0e-7", false)] {
        let cfg = r.join(format!("lr-{lr}.yml"));
        std::fs::write(&cfg, yml.replace("lr: 0.02", &format!("lr: {lr}"))).unwrap();
        let out = r.join(format!("lr-{lr}-out"));
        let args = ["adapt", cfg.to_str().unwrap(), "-o", out.to_str().unwrap(), "--epochs", "1", "--json"];
        let (ok, stdout, err) = run(&args);
        assert!(ok, "{err}");
        let s: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        for (i, task) in ["alpha", "beta"].iter().enumerate() {
            let (last, end) =
                (s["tasks"][i]["final_loss"].as_f64().unwrap(), s["tasks"][i]["end_loss"].as_f64().unwrap());
            let warned = err.contains(&format!("task `{task}`: the final weights give a loss of"));
            assert_eq!(warned, diverged, "{err}");
            if diverged {
                assert!(end > 1e20 * last && err.contains("training diverged; lower the learning rate"), "{s}\n{err}");
            } else {
                assert!((end - last).abs() < 1e-3 * last, "{s}");
            }
        }
    }
}

/// Fuzzing round 6: adapt had no free-space check before training; it trained every epoch and
/// then failed at the write. The room it asks for up front is the task models' tensor data,
/// which this checks against the files a run writes.
#[test]
fn the_room_asked_before_training_is_what_the_task_models_take() {
    let f = fixture();
    let out = adapt_quietly(&f.root, "room-out", "0");
    let mut written = 0u64;
    for task in ["alpha", "beta"] {
        let bytes = std::fs::read(out.join("tasks").join(task).join("model.safetensors")).unwrap();
        let header = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        written += bytes.len() as u64 - 8 - header;
    }
    let dtype = symerge::checkpoint::FloatDType::F32;
    assert_eq!(adapter(&f).output_bytes(dtype), written);
}

/// Fuzzing round 6: an inputs file valid for one task but labelled with classes its expert lacks
/// failed naming only the file (the same file is fine for the other task); the message names
/// the task and its expert's config. An enormous label name is cut in the message, not echoed
/// whole.
#[test]
fn labels_an_expert_lacks_name_the_task_and_are_cut_short() {
    let f = fixture();
    let r = &f.root;
    let yml = std::fs::read_to_string(r.join("adapt.yml")).unwrap().replace("method: symerge", "method: adamerging");
    let cfg = r.join("other.yml");
    // beta's inputs carry class-3, which alpha's three-class expert lacks.
    std::fs::write(&cfg, yml.replace("inputs: alpha.jsonl", "inputs: beta.jsonl")).unwrap();
    let out = r.join("other-out");
    let (ok, _, err) = run(&["adapt", cfg.to_str().unwrap(), "-o", out.to_str().unwrap(), "--epochs", "1"]);
    let whose = format!("{}'s label2id (the expert of task `alpha`)", r.join("expert-alpha/config.json").display());
    assert!(!ok && err.contains("unknown label `class-3`") && err.contains(&whose), "{err}");
    let huge = "x".repeat(100_000);
    std::fs::write(r.join("huge.jsonl"), format!("{}\n", serde_json::json!({"text": "a text", "label": huge})))
        .unwrap();
    std::fs::write(&cfg, yml.replace("inputs: alpha.jsonl", "inputs: huge.jsonl")).unwrap();
    let (ok, _, err) = run(&["adapt", cfg.to_str().unwrap(), "-o", out.to_str().unwrap(), "--epochs", "1"]);
    assert!(!ok && err.contains(&format!("`{}... (100000 bytes)`", "x".repeat(80))) && err.len() < 2000, "{err}");
}
