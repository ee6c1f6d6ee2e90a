//! `symerge adapt` for causal LMs on two experts made from the tiny `llama_gqa` fixture (seeded
//! perturbations of every weight) with top-k label caches: the block-streamed Lambda gradient
//! matches finite differences and splits over ranks, training lowers both tasks' losses and moves
//! Lambda, `last_block` adapts the last layer, and the CLI writes models that load and evaluate.

mod common;

use std::path::{Path, PathBuf};

use common::{T, from_bytes, randoms, read_model, run, write_file};
use safetensors::SafeTensors;
use symerge::adapt::config::AdaptConfig;
use symerge::adapt::lm::LmAdapter;
use symerge::backend::Cpu;
use symerge::dist::LocalGroup;
use symerge::labels::produce::{CacheLabelsOptions, cache_labels};
use symerge::model::{CausalLm, ChainBlock, Gpt2Block, Gpt2Config, LlamaBlock, LmArch};

const TEXTS: [&str; 8] = [
    "the cat sat on the mat",
    "a river flows to the sea",
    "merging models by task arithmetic",
    "hello world",
    "an instrument used for measuring time",
    "x",
    "the quality of being honest",
    "to express gratitude to a friend",
];

fn base_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// The fixture `base` with every weight moved by a seeded perturbation of half its init scale.
fn make_expert(base: &str, dir: &Path, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let data = std::fs::read(base_dir(base).join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&data).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let tensors: Vec<T> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let v = st.tensor(name).unwrap();
            let values = from_bytes(v.dtype(), v.data());
            let d = randoms(seed * 1000 + i as u64, values.len(), 0.01);
            T::new(name, v.dtype(), v.shape(), values.iter().zip(&d).map(|(a, b)| a + b).collect())
        })
        .collect();
    write_file(&dir.join("model.safetensors"), &tensors);
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(base_dir(base).join(f), dir.join(f)).unwrap();
    }
}

struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

/// Two experts of `llama_gqa`, their inputs (halves of the texts, shifted) and top-k caches, and
/// `adapt.yml`.
fn fixture(adapted_layer: &str) -> Fixture {
    fixture_of("llama_gqa", adapted_layer)
}

/// [`fixture`] over the fixture model `base`.
fn fixture_of(base: &str, adapted_layer: &str) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let mut tasks = String::new();
    for (task, seed) in [("alpha", 1u64), ("beta", 2)] {
        make_expert(base, &root.join(format!("expert-{task}")), seed);
        let texts: Vec<&str> = TEXTS.iter().cycle().skip(seed as usize * 3).take(6).copied().collect();
        let lines: String = texts.iter().map(|t| format!("{}\n", serde_json::json!({ "text": t }))).collect();
        std::fs::write(root.join(format!("{task}.jsonl")), lines).unwrap();
        let opts = CacheLabelsOptions {
            expert: root.join(format!("expert-{task}")),
            task: task.into(),
            output: root.join(format!("{task}.labels")),
            batch_size: 4,
            max_len: 32,
            force: false,
            top_k: 16,
        };
        cache_labels(Cpu, &texts, &opts).unwrap();
        tasks.push_str(&format!(
            "  - {{name: {task}, expert: expert-{task}, inputs: {task}.jsonl, cache: {task}.labels}}\n"
        ));
    }
    let yml = format!(
        "method: symerge\nbase_model: {}\nadapted_layer: {adapted_layer}\nmax_len: 32\nbatch_size: 4\nlambda_lr: 0.05\nlayer_lr: 0.002\n\
         epochs: 3\ntasks:\n{tasks}",
        base_dir(base).display()
    );
    std::fs::write(root.join("adapt.yml"), yml).unwrap();
    Fixture { _tmp: tmp, root }
}

fn adapter(f: &Fixture) -> LmAdapter<Cpu> {
    LmAdapter::<Cpu>::load(Cpu, AdaptConfig::load(&f.root.join("adapt.yml")).unwrap()).unwrap()
}

/// The loss's derivative in Lambda coefficient `j` on task `task`'s `rows`: Richardson-extrapolated
/// central differences (steps 0.05 and 0.1), Lambda restored afterwards.
fn lambda_fd<A: LmArch<Cpu>>(a: &mut LmAdapter<Cpu, A>, task: usize, rows: &[usize], j: usize) -> f64 {
    let base = a.lambda.values[j];
    let mut at = |h: f32| {
        a.lambda.values[j] = base + h;
        a.loss_and_grads(task, rows).unwrap().loss as f64
    };
    let central = |at: &mut dyn FnMut(f32) -> f64, h: f32| (at(h) - at(-h)) / (2.0 * h as f64);
    let fd = (4.0 * central(&mut at, 0.05) - central(&mut at, 0.1)) / 3.0;
    a.lambda.values[j] = base;
    fd
}

#[test]
fn lambda_gradient_matches_finite_differences_and_splits_over_ranks() {
    let f = fixture("head");
    let mut a = adapter(&f);
    // Embedding + 2 layers shared; the head is each task's own.
    assert_eq!(a.shared.len(), 3);
    assert!(matches!(a.tasks[0].private_blocks[..], [LlamaBlock::Head(ref h)] if !h.tied));
    let rows = [0, 2, 3, 5];
    let g = a.loss_and_grads(1, &rows).unwrap();
    assert!(g.loss > 0.0 && g.kept > 0);
    let n = a.lambda.values.len();
    let mut checked = 0;
    for j in (0..n).step_by((n / 9).max(1)) {
        let fd = lambda_fd(&mut a, 1, &rows, j);
        let an = g.lambda[j];
        assert!(
            (fd - an).abs() <= 1e-2 * an.abs() + 2e-5,
            "Lambda {j} ({}): fd {fd:e} vs {an:e}",
            a.lambda.keys[j / 2]
        );
        checked += (an != 0.0) as usize;
    }
    assert!(checked > 3, "most checked coefficients have a gradient");

    // Three ranks (shards of 2, 1 and 1 inputs) give the same loss and gradients.
    let ranks = LocalGroup::ranks(3, std::time::Duration::from_secs(60));
    let a = &a;
    let results: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> =
            ranks.into_iter().map(|mut r| s.spawn(move || a.loss_and_grads_in(1, &rows, &mut r).unwrap())).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &results {
        assert_eq!(r.kept, g.kept);
        assert!((r.loss - g.loss).abs() < 1e-5, "{} vs {}", r.loss, g.loss);
        for (x, y) in r.lambda.iter().zip(&g.lambda) {
            assert!((x - y).abs() <= 1e-4 * y.abs() + 1e-7, "{x} vs {y}");
        }
        let (gp, rp) = (&g.private[0]["lm_head.weight"].buf, &r.private[0]["lm_head.weight"].buf);
        assert!(gp.iter().zip(rp).all(|(x, y)| (x - y).abs() <= 1e-4 * y.abs() + 1e-7));
    }
}

/// The expert's own loss against its cache: the entropy of its coarsened distribution, the
/// floor a merged model approaches.
fn expert_floor<A: LmArch<Cpu>>(a: &LmAdapter<Cpu, A>, task: usize) -> f32 {
    let t = &a.tasks[task];
    let lm = CausalLm::<Cpu, A>::load(Cpu, &t.expert, 32).unwrap();
    let all: Vec<usize> = (0..t.texts.len()).collect();
    let batch = lm.model.batch(&lm.tokenizer.encode(&t.texts).unwrap()).unwrap();
    lm.model.topk_loss(&batch, &t.data.cache.as_ref().unwrap().topk_batch(&all).unwrap()).unwrap()
}

#[test]
fn training_lowers_the_loss_and_moves_lambda() {
    let f = fixture("head");
    let mut a = adapter(&f);
    let all: Vec<usize> = (0..6).collect();
    let floor: Vec<f32> = (0..2).map(|t| expert_floor(&a, t)).collect();
    let before: Vec<f32> = (0..2).map(|t| a.loss_and_grads(t, &all).unwrap().loss).collect();
    for _ in 0..15 {
        for t in 0..2 {
            a.step(t).unwrap();
        }
    }
    let after: Vec<f32> = (0..2).map(|t| a.loss_and_grads(t, &all).unwrap().loss).collect();
    eprintln!("floor {floor:?} losses {before:?} -> {after:?}");
    // The excess over the floor (the KL to the coarsened expert) at least halves.
    for t in 0..2 {
        assert!(
            after[t] - floor[t] < 0.5 * (before[t] - floor[t]),
            "task {t}: loss {} -> {}, floor {}",
            before[t],
            after[t],
            floor[t]
        );
    }
    assert!(a.lambda.values.iter().any(|&v| (v - 0.3).abs() > 1e-2), "Lambda moved");
    assert!(a.lambda.values.iter().all(|&v| (0.0..=1.0).contains(&v)), "clamped");
}

#[test]
fn last_block_adapts_the_last_layer_and_the_cli_writes_loadable_models() {
    let f = fixture("last_block");
    let a = adapter(&f);
    assert_eq!(a.shared.len(), 2);
    let names: Vec<String> = a.tasks[0].private_blocks.iter().map(LlamaBlock::name).collect();
    assert_eq!(names, ["model.layers.1", "head"]);
    assert!(a.lambda.keys.iter().all(|k| !k.contains("layers.1.")), "the last layer has no Lambda");
    drop(a);

    let out = f.root.join("out");
    let cfg = f.root.join("adapt.yml");
    let (ok, stdout, err) =
        run(&["adapt", cfg.to_str().unwrap(), "-o", out.to_str().unwrap(), "--json", "--out-dtype", "bf16"]);
    assert!(ok, "{err}");
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!((&summary["steps"], &summary["out_dtype"]), (&6.into(), &"bfloat16".into()));
    assert!(out.join("lambda.json").is_file() && out.join("train_log.jsonl").is_file());
    for task in ["alpha", "beta"] {
        let dir = out.join("tasks").join(task);
        let lm = CausalLm::<Cpu>::load(Cpu, &dir, 32).unwrap();
        assert!(!lm.model.config.tie_word_embeddings);
        let stored = symerge::checkpoint::Checkpoint::open(&dir).unwrap();
        assert!(stored.tensors.iter().all(|t| t.dtype == safetensors::Dtype::BF16), "{task}: --out-dtype bf16");
        let (ok, text, err) = run(&[
            "eval",
            dir.to_str().unwrap(),
            "--inputs",
            f.root.join(format!("{task}.jsonl")).to_str().unwrap(),
            "--max-len",
            "32",
            "--json",
        ]);
        assert!(ok, "{err}");
        let report: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(report["perplexity"].as_f64().unwrap().is_finite(), "{report}");
    }

    // A classification cache, or another task's inputs, are refused naming the cache.
    let yml = std::fs::read_to_string(f.root.join("adapt.yml")).unwrap();
    std::fs::write(f.root.join("bad.yml"), yml.replace("inputs: alpha.jsonl", "inputs: beta.jsonl")).unwrap();
    let e = LmAdapter::<Cpu>::load(Cpu, AdaptConfig::load(&f.root.join("bad.yml")).unwrap()).err().unwrap().to_string();
    assert!(e.contains("alpha.labels") && e.contains("different inputs"), "{e}");
    std::fs::write(f.root.join("bad.yml"), yml.replace("epochs: 3", "epochs: 3\nloss: hard_conf")).unwrap();
    let e = LmAdapter::<Cpu>::load(Cpu, AdaptConfig::load(&f.root.join("bad.yml")).unwrap()).err().unwrap().to_string();
    assert!(e.contains("top-k soft loss only"), "{e}");
}

/// `eval` of a causal-LM adapt output: every task's adapted model and its expert get the
/// next-token scores `eval MODEL --inputs` gives each alone (at the adaptation's max length),
/// averaged over tasks (mean loss, so a geometric-mean perplexity), as JSON and as a table. The
/// adapt summary itself reports the same scores for the adapted models (in f32, as stored here).
#[test]
fn eval_of_a_causal_lm_adapt_output_scores_every_task_and_its_expert() {
    let f = fixture("head");
    let out = f.root.join("out");
    let cfg = f.root.join("adapt.yml");
    let args = ["adapt", cfg.to_str().unwrap(), "-o", out.to_str().unwrap(), "--out-dtype", "f32"];
    let (ok, adapt_text, err) = run(&args);
    assert!(ok, "{err}");
    assert!(adapt_text.contains("top-k soft loss") && adapt_text.contains("perplexity"), "{adapt_text}");
    // The room adapt asks for before training is the task models' tensor data.
    let data_bytes = |task: &str| {
        let bytes = std::fs::read(out.join("tasks").join(task).join("model.safetensors")).unwrap();
        bytes.len() as u64 - 8 - u64::from_le_bytes(bytes[..8].try_into().unwrap())
    };
    let room = adapter(&f).output_bytes(symerge::checkpoint::FloatDType::F32);
    assert_eq!(room, data_bytes("alpha") + data_bytes("beta"));
    let (ok, stdout, err) = run(&["eval", out.to_str().unwrap(), "--json"]);
    assert!(ok, "{err}");
    let all: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(all["max_len"], 32, "the adaptation's length, not the default 128");
    let tasks = all["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 2);
    let alone = |model: &Path, task: &str| -> serde_json::Value {
        let data = f.root.join(format!("{task}.jsonl"));
        let args = ["eval", model.to_str().unwrap(), "--inputs", data.to_str().unwrap(), "--max-len", "32", "--json"];
        let (ok, text, err) = run(&args);
        assert!(ok, "{err}");
        serde_json::from_str(&text).unwrap()
    };
    for (t, task) in tasks.iter().zip(["alpha", "beta"]) {
        assert_eq!((&t["task"], &t["examples"]), (&task.into(), &6.into()));
        assert_eq!(t["adapted"], alone(&out.join("tasks").join(task), task), "{task}: the task's model alone");
        assert_eq!(t["expert"], alone(&f.root.join(format!("expert-{task}")), task), "{task}: its expert alone");
        assert!(t["adapted"]["perplexity"].as_f64().unwrap().is_finite() && t["adapted"]["top1_accuracy"].is_f64());
    }
    let loss = |t: &serde_json::Value, m: &str| t[m]["mean_loss"].as_f64().unwrap();
    let mean = (loss(&tasks[0], "adapted") + loss(&tasks[1], "adapted")) / 2.0;
    let avg = &all["average_adapted"];
    assert!((avg["mean_loss"].as_f64().unwrap() - mean).abs() < 1e-12, "{avg}");
    let ppl = |t: &serde_json::Value| t["adapted"]["perplexity"].as_f64().unwrap();
    let geo = (ppl(&tasks[0]) * ppl(&tasks[1])).sqrt();
    assert!((avg["perplexity"].as_f64().unwrap() - geo).abs() < 1e-9 * geo, "geometric mean: {avg} vs {geo}");
    assert!(all["average_expert"]["perplexity"].is_f64(), "{all}");

    // adapt's summary: each task's top-1 accuracy (a fraction, as eval's), perplexity and next-token loss are
    // eval's, up to the order of sums (adapt batches by its batch_size, eval by 32).
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let summary = &summary["summary"];
    for (s, t) in summary["tasks"].as_array().unwrap().iter().zip(tasks) {
        let (s_ppl, e_ppl) = (s["perplexity"].as_f64().unwrap(), ppl(t));
        assert!((s_ppl - e_ppl).abs() < 1e-6 * e_ppl, "{s} vs {t}");
        assert!((s["next_token_loss"].as_f64().unwrap() - loss(t, "adapted")).abs() < 1e-6, "{s} vs {t}");
        let one_token = 1.0 / t["adapted"]["tokens"].as_f64().unwrap();
        let top1 = t["adapted"]["top1_accuracy"].as_f64().unwrap();
        assert!((s["accuracy"].as_f64().unwrap() - top1).abs() <= one_token + 1e-9, "{s} vs {t}");
    }
    assert!((summary["average_perplexity"].as_f64().unwrap() - geo).abs() < 1e-6 * geo, "{summary}");
    assert!(summary["average_accuracy"].is_f64(), "{summary}");
    // --no-eval: no scores, the loss still named for what it is.
    let no_eval = f.root.join("no-eval");
    let (ok, text, err) = run(&["adapt", cfg.to_str().unwrap(), "-o", no_eval.to_str().unwrap(), "--no-eval"]);
    assert!(ok && text.contains("top-k soft loss") && !text.contains("perplexity"), "{text} {err}");
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(no_eval.join("summary.json")).unwrap()).unwrap();
    assert!(s["summary"]["tasks"][0]["accuracy"].is_null() && s["summary"]["tasks"][0].get("perplexity").is_none());

    // The table: a row per task with its numbers, the average, the experts' columns.
    let (ok, table, err) = run(&["eval", out.to_str().unwrap()]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    assert!(lines[0].contains("symerge loss") && lines[0].contains("perplexity") && lines[0].contains("expert"));
    for (line, t) in lines[1..3].iter().zip(tasks) {
        let name = t["task"].as_str().unwrap();
        assert!(line.starts_with(name) && line.contains(&format!("{:.2}", ppl(t))), "{name}: {line}");
    }
    assert!(lines[3].starts_with("average") && lines[3].contains(&format!("{geo:.2}")), "{table}");
    let (ok, table, err) = run(&["eval", out.to_str().unwrap(), "--no-experts"]);
    assert!(ok && !table.contains("expert") && table.contains("average"), "{table} {err}");
}

/// AdaMerging on a causal LM, without label caches: its Lambda gradient is the entropy's (finite
/// differences), training lowers the mean next-token entropy of both tasks, and each task's head
/// stays its expert's.
#[test]
fn adamerging_learns_lambda_by_next_token_entropy_with_the_heads_frozen() {
    let f = fixture("head");
    let yml = std::fs::read_to_string(f.root.join("adapt.yml")).unwrap();
    let yml = yml.replace("method: symerge", "method: adamerging").replace(", cache: alpha.labels", "");
    let yml = yml.replace(", cache: beta.labels", "");
    std::fs::write(f.root.join("ada.yml"), &yml).unwrap();
    let mut a = LmAdapter::<Cpu>::load(Cpu, AdaptConfig::load(&f.root.join("ada.yml")).unwrap()).unwrap();
    assert!(a.tasks.iter().all(|t| t.data.cache.is_none()));
    let rows = [0, 2, 3, 5];
    let g = a.loss_and_grads(0, &rows).unwrap();
    let positions: usize = rows.iter().map(|&i| a.tasks[0].tokens[i].ids.len() - 1).sum();
    assert_eq!(g.kept, positions);
    // The entropy of a distribution over the fixture's vocabulary lies in (0, ln V].
    assert!(g.loss > 0.0 && (g.loss as f64) < (a.family.base.config.vocab_size as f64).ln());
    let n = a.lambda.values.len();
    let mut checked = 0;
    for j in (0..n).step_by((n / 7).max(1)) {
        let fd = lambda_fd(&mut a, 0, &rows, j);
        let an = g.lambda[j];
        assert!((fd - an).abs() <= 1e-2 * an.abs() + 2e-5, "Lambda {j}: fd {fd:e} vs {an:e}");
        checked += (an != 0.0) as usize;
    }
    assert!(checked > 3, "most checked coefficients have a gradient");

    let head = |a: &LmAdapter<Cpu>, t: usize| a.tasks[t].private[0]["lm_head.weight"].buf.clone();
    let heads: Vec<Vec<f32>> = (0..2).map(|t| head(&a, t)).collect();
    let all: Vec<usize> = (0..6).collect();
    let before: Vec<f32> = (0..2).map(|t| a.loss_and_grads(t, &all).unwrap().loss).collect();
    for _ in 0..15 {
        for t in 0..2 {
            a.step(t).unwrap();
        }
    }
    let after: Vec<f32> = (0..2).map(|t| a.loss_and_grads(t, &all).unwrap().loss).collect();
    eprintln!("entropy {before:?} -> {after:?}");
    for t in 0..2 {
        assert!(after[t] < before[t] - 1e-3, "task {t}: entropy {} -> {}", before[t], after[t]);
        assert!(head(&a, t) == heads[t], "task {t}'s head is frozen");
    }
    assert!(a.lambda.values.iter().any(|&v| (v - 0.3).abs() > 1e-2), "Lambda moved");
}

/// Streamed, resident and mixed shared blocks give the same bits for a causal LM too, for both
/// adapted-layer choices, and streaming reads every shared block twice per step.
#[test]
fn streamed_resident_and_mixed_adaptation_agree_bit_for_bit() {
    for layer in ["head", "last_block"] {
        let f = fixture(layer);
        let cfg = || AdaptConfig::load(&f.root.join("adapt.yml")).unwrap();
        let first = LmAdapter::<Cpu>::load_with(Cpu, cfg(), Some(0)).unwrap().weights.blocks[0].bytes();
        let mut runs: Vec<LmAdapter<Cpu>> = [Some(0), Some(u64::MAX), Some(2 * first)]
            .map(|b| LmAdapter::<Cpu>::load_with(Cpu, cfg(), b).unwrap())
            .into();
        let modes: Vec<String> = runs.iter().map(|a| a.weights.report().mode).collect();
        assert_eq!(modes, ["streamed", "resident", "mixed"], "{layer}");
        let rows = [0usize, 2, 5];
        let grads: Vec<_> = runs.iter().map(|a| a.loss_and_grads(0, &rows).unwrap()).collect();
        for g in &grads[1..] {
            assert_eq!(g.loss.to_bits(), grads[0].loss.to_bits(), "{layer}");
            assert_eq!(common::bits64(&g.lambda), common::bits64(&grads[0].lambda), "{layer}");
        }
        for a in runs.iter_mut() {
            for task in [0, 1, 1] {
                a.step(task).unwrap();
            }
        }
        for a in &runs[1..] {
            assert_eq!(common::bits(&a.lambda.values), common::bits(&runs[0].lambda.values), "{layer}");
            for (t, t0) in a.tasks.iter().zip(&runs[0].tasks) {
                for (p, p0) in t.private.iter().zip(&t0.private) {
                    for (name, v) in p {
                        assert_eq!(common::bits(&v.buf), common::bits(&p0[name].buf), "{layer} {} {name}", t.name);
                    }
                }
            }
        }
        let shared = runs[0].weights.report().shared_bytes;
        assert_eq!(runs[0].weights.bytes_streamed(), 4 * 2 * shared, "{layer}");
        assert_eq!(runs[1].weights.bytes_streamed(), shared, "{layer}");
    }
}

/// `adapt` refuses an output over an expert or a cache, with `--force` too, before training;
/// the expert's files stay as they were.
#[test]
fn adapt_refuses_outputs_over_its_inputs() {
    let f = fixture("head");
    let expert = f.root.join("expert-alpha");
    let weights = std::fs::read(expert.join("model.safetensors")).unwrap();
    for out in [expert.clone(), expert.join("adapted"), f.root.join("alpha.labels"), f.root.clone()] {
        let (ok, _, err) =
            run(&["adapt", f.root.join("adapt.yml").to_str().unwrap(), "-o", out.to_str().unwrap(), "--force"]);
        assert!(!ok && err.contains("lies inside the input"), "{}: {err}", out.display());
    }
    assert_eq!(std::fs::read(expert.join("model.safetensors")).unwrap(), weights);
    assert!(!expert.join("adapted").exists());
}

/// GPT-2, a family of its own (learned positions, fused `Conv1D` projections, LayerNorm), adapts
/// through the same adapter: its Lambda gradient (the position table's included, merged by the
/// rows a batch reads) matches finite differences, streamed and resident runs agree bit for bit,
/// training closes most of the gap to the experts, and the CLI writes models that load as GPT-2.
#[test]
fn gpt2_adapts_through_the_same_adapter() {
    if !base_dir("gpt2").join("model.safetensors").is_file() {
        println!("SKIPPED: tests/fixtures/gpt2 missing; generate with tests/reference/make_gpt2_fixtures.py");
        return;
    }
    let f = fixture_of("gpt2", "head");
    let cfg = || AdaptConfig::load(&f.root.join("adapt.yml")).unwrap();
    let mut a = LmAdapter::<Cpu, Gpt2Config>::load_with(Cpu, cfg(), Some(0)).unwrap();
    assert_eq!(a.shared.len(), 3);
    assert!(matches!(a.tasks[0].private_blocks[..], [Gpt2Block::Head(ref h)] if !h.tied));
    assert!(a.tasks[0].private[0].contains_key("lm_head.weight"), "the task's head is untied from wte");
    assert!(a.lambda.keys.iter().any(|k| k == "transformer.wpe.weight"), "{:?}", a.lambda.keys);

    let rows = [0, 2, 3, 5];
    let g = a.loss_and_grads(1, &rows).unwrap();
    let mut resident = LmAdapter::<Cpu, Gpt2Config>::load_with(Cpu, cfg(), Some(u64::MAX)).unwrap();
    let r = resident.loss_and_grads(1, &rows).unwrap();
    assert_eq!((r.loss.to_bits(), common::bits64(&r.lambda)), (g.loss.to_bits(), common::bits64(&g.lambda)));
    let n = a.lambda.values.len();
    let mut checked = Vec::new();
    for j in 0..n {
        let fd = lambda_fd(&mut a, 1, &rows, j);
        let an = g.lambda[j];
        let key = &a.lambda.keys[j / 2];
        assert!((fd - an).abs() <= 1e-2 * an.abs() + 2e-5, "Lambda {j} ({key}): fd {fd:e} vs {an:e}");
        if an.abs() > 1e-4 {
            checked.push(key.clone());
        }
    }
    assert!(checked.iter().any(|k| k.contains("wpe")) && checked.len() > n / 2, "{checked:?}");

    let all: Vec<usize> = (0..6).collect();
    let floor: Vec<f32> = (0..2).map(|t| expert_floor(&a, t)).collect();
    let before: Vec<f32> = (0..2).map(|t| a.loss_and_grads(t, &all).unwrap().loss).collect();
    for _ in 0..15 {
        for t in 0..2 {
            a.step(t).unwrap();
            resident.step(t).unwrap();
        }
    }
    let after: Vec<f32> = (0..2).map(|t| a.loss_and_grads(t, &all).unwrap().loss).collect();
    eprintln!("gpt2: floor {floor:?} losses {before:?} -> {after:?}");
    for t in 0..2 {
        assert!(after[t] - floor[t] < 0.5 * (before[t] - floor[t]), "task {t}: {} -> {}", before[t], after[t]);
    }
    assert_eq!(common::bits(&a.lambda.values), common::bits(&resident.lambda.values), "streamed == resident");
    drop((a, resident));

    // `last_block`: the last GPT-2 block and the head are each task's own, streamed == resident.
    let lb = fixture_of("gpt2", "last_block");
    let cfg = || AdaptConfig::load(&lb.root.join("adapt.yml")).unwrap();
    let mut runs = [Some(0), Some(u64::MAX)].map(|b| LmAdapter::<Cpu, Gpt2Config>::load_with(Cpu, cfg(), b).unwrap());
    let names: Vec<String> = runs[0].tasks[0].private_blocks.iter().map(ChainBlock::<Cpu>::name).collect();
    assert_eq!(names, ["transformer.h.1", "head"]);
    for a in runs.iter_mut() {
        for task in [0, 1, 0] {
            a.step(task).unwrap();
        }
    }
    assert_eq!(common::bits(&runs[0].lambda.values), common::bits(&runs[1].lambda.values));
    let block = "transformer.h.1.attn.c_attn.weight";
    let (p0, p1) = (&runs[0].tasks[0].private[0][block].buf, &runs[1].tasks[0].private[0][block].buf);
    assert_eq!(common::bits(p0), common::bits(p1), "the adapted block trains alike");
    drop(runs);

    let out = f.root.join("out");
    let (ok, _, err) = run(&["adapt", f.root.join("adapt.yml").to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert!(ok, "{err}");
    for task in ["alpha", "beta"] {
        let lm = CausalLm::<Cpu, Gpt2Config>::load(Cpu, &out.join("tasks").join(task), 32).unwrap();
        assert!(!lm.model.config.tie_word_embeddings && lm.model.param("lm_head.weight").is_some());
        let batch = lm.model.batch(&lm.tokenizer.encode(&TEXTS[..2]).unwrap()).unwrap();
        assert!(lm.model.lm_loss(&batch).unwrap().is_finite());
    }
}

/// A causal-LM base with classifier experts, or the reverse, is refused as that, naming the
/// task, before anything else about the config (a classifier's `confidence`, which causal LMs
/// refuse, was the first error), and the message lists every supported family, GPT-2 included.
#[test]
fn a_base_and_experts_of_different_kinds_are_refused_as_such() {
    let tmp = tempfile::tempdir().unwrap();
    let r = tmp.path();
    let config_only = |name: &str, config: &str| {
        std::fs::create_dir_all(r.join(name)).unwrap();
        std::fs::write(r.join(name).join("config.json"), config).unwrap();
        r.join(name)
    };
    let classifier =
        config_only("clf", r#"{"model_type": "bert", "architectures": ["BertForSequenceClassification"]}"#);
    let encoder = config_only("enc", r#"{"model_type": "bert", "architectures": ["BertModel"]}"#);
    std::fs::write(r.join("in.jsonl"), "{\"text\": \"hello world\"}\n").unwrap();
    let adapt = |base: &Path, experts: [&Path; 2]| {
        let cfg = r.join("adapt.yml");
        let mut text = format!("method: symerge\nbase_model: {}\nconfidence: 0.5\ntasks:\n", base.display());
        for (name, e) in ["a", "b"].iter().zip(experts) {
            text += &format!("  - {{name: {name}, expert: {}, inputs: in.jsonl, cache: {name}.labels}}\n", e.display());
        }
        std::fs::write(&cfg, text).unwrap();
        run(&["adapt", cfg.to_str().unwrap(), "-o", r.join("out").to_str().unwrap(), "--no-eval"])
    };
    let llama = base_dir("llama_gqa");
    let (ok, _, err) = adapt(&llama, [&llama, &classifier]);
    assert!(!ok, "{err}");
    let want = "base_model is a causal LM (llama) but tasks[1].expert is a BERT-family classifier (bert)";
    assert!(err.contains(want), "{err}");
    assert!(!err.contains("confidence") && err.contains("GPT-2 (gpt2)"), "{err}");
    assert!(!r.join("out").exists());
    // The reverse: a BERT base, a causal-LM expert.
    let (ok, _, err) = adapt(&encoder, [&classifier, &base_dir("gpt2")]);
    assert!(!ok, "{err}");
    let want = "base_model is a BERT-family encoder (bert) but tasks[1].expert is a causal LM (gpt2)";
    assert!(err.contains(want), "{err}");
}

/// `eval ADAPT_OUT --baseline` on a causal LM scores, per task, the model adapt started from
/// (Lambda at lambda_init, each task's own lm_head from its expert): what an adaptation of zero
/// epochs writes as its task models. The table gets the baseline's columns and says what it is.
#[test]
fn eval_baseline_of_a_causal_lm_scores_the_model_adapt_started_from() {
    let f = fixture("head");
    let cfg = f.root.join("adapt.yml");
    let adapt = |name: &str, epochs: &str| {
        let out = f.root.join(name);
        let args = ["adapt", cfg.to_str().unwrap(), "-o", out.to_str().unwrap(), "--epochs", epochs, "--no-eval"];
        let (ok, _, err) = run(&args);
        assert!(ok, "{err}");
        out
    };
    let (out, start) = (adapt("out", "3"), adapt("start", "0"));
    let (ok, stdout, err) = run(&["eval", out.to_str().unwrap(), "--baseline", "--json"]);
    assert!(ok, "{err}");
    let all: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let (ok, stdout, err) = run(&["eval", start.to_str().unwrap(), "--no-experts", "--json"]);
    assert!(ok, "{err}");
    let zero: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    for i in 0..2 {
        let t = &all["tasks"][i];
        assert_eq!(t["baseline"], zero["tasks"][i]["adapted"], "{t}");
        assert_ne!(t["baseline"], t["adapted"], "{t}");
        assert!(t["expert"]["perplexity"].is_f64(), "{t}");
    }
    assert_eq!(all["average_baseline"], zero["average_adapted"], "{all}");

    let (ok, table, err) = run(&["eval", out.to_str().unwrap(), "--baseline", "--no-experts"]);
    assert!(ok, "{err}");
    let header = table.lines().next().unwrap();
    assert!(header.contains("baseline loss") && header.contains("symerge loss"), "{table}");
    assert!(table.contains("the merge adapt started from"), "{table}");
}

/// Fuzzing round 4: `adapt --out-dtype f16` narrowed a weight of 1e6 (an embedding row no text
/// reads, in the base and both experts) to inf in every task model and reported success; merge
/// refuses the same overflow. Now adapt refuses it, naming the tensor, element and a wider dtype,
/// and nothing is written.
#[test]
fn adapt_refuses_an_out_dtype_too_narrow_for_a_weight() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let big = 500 * 64;
    let base = root.join("base");
    let mut tasks = String::new();
    for (dir, seed) in [(base.clone(), 9u64), (root.join("expert-alpha"), 1), (root.join("expert-beta"), 2)] {
        make_expert("llama_gqa", &dir, seed);
        let mut tensors: Vec<T> = read_model(&dir).into_iter().map(|(n, (d, s, v))| T::new(&n, d, &s, v)).collect();
        tensors.iter_mut().find(|t| t.name == "model.embed_tokens.weight").unwrap().values[big] = 1e6;
        write_file(&dir.join("model.safetensors"), &tensors);
        if seed != 9 {
            let task = dir.file_name().unwrap().to_str().unwrap().trim_start_matches("expert-").to_string();
            tasks += &common::lm_task(root, &task, &dir, &TEXTS[..6], 32, 16);
        }
    }
    let yml = format!(
        "method: symerge\nbase_model: {}\nadapted_layer: head\nmax_len: 32\nbatch_size: 4\nlambda_lr: 0.05\n\
         layer_lr: 0.002\nepochs: 1\ntasks:\n{tasks}",
        base.display()
    );
    std::fs::write(root.join("adapt.yml"), yml).unwrap();
    let out = root.join("ad16");
    let cfg = root.join("adapt.yml");
    let (ok, _, err) = run(&["adapt", cfg.to_str().unwrap(), "-o", out.to_str().unwrap(), "--out-dtype", "f16"]);
    assert!(!ok, "an f16 overflow was written");
    for want in ["`model.embed_tokens.weight`", &format!("element {big}"), "overflows", "float16", "bfloat16"] {
        assert!(err.contains(want), "{want:?} not in: {err}");
    }
    assert!(!out.exists(), "a failed adapt left its output");
}
