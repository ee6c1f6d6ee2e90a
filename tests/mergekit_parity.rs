//! The registry's methods against mergekit 0.1.5 itself, on a tiny Llama checkpoint and
//! mergekit's own outputs (tests/reference/make_mergekit_fixtures.py), plus what a fixture
//! cannot show: exactness under chunking, DELLA's random masks by their statistics, and the
//! registry's errors.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::reference::{nan_max, rel_diff};
use common::{T, randoms, read_model, write_model};
use safetensors::Dtype;
use symerge::merge::config::MergeConfig;
use symerge::merge::executor::{MergeOptions, merge};
use symerge::merge::philox::name_hash;
use symerge::merge::stats::InMemory;
use symerge::merge::{ChunkCtx, select};

/// A checkpoint's tensors as [`read_model`] gives them: name -> (dtype, shape, values).
type Tensors = BTreeMap<String, (Dtype, Vec<usize>, Vec<f64>)>;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mergekit")
}

/// Inputs with different vocabularies and mergekit's merges of them under `tokenizer_source`
/// (tests/reference/make_vocab_fixtures.py).
fn vocab_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mergekit_vocab")
}

fn opts(out: &Path) -> MergeOptions {
    MergeOptions { max_shard_bytes: u64::MAX, force: false, progress: false, ..MergeOptions::new(out.to_path_buf()) }
}

/// Writes `yaml` to `dir/name.yml`, merges it into `dir/name`, and reads the result back.
fn merge_yaml(dir: &Path, name: &str, yaml: &str) -> BTreeMap<String, (Dtype, Vec<usize>, Vec<f64>)> {
    let cfg = dir.join(format!("{name}.yml"));
    std::fs::write(&cfg, yaml).unwrap();
    let out = dir.join(name);
    let config = MergeConfig::load(&cfg).unwrap_or_else(|e| panic!("{name}: {e}"));
    merge(&config, &opts(&out)).unwrap_or_else(|e| panic!("{name}: {e}"));
    read_model(&out)
}

/// Largest [`rel_diff`] of ours and mergekit's entries over a case's tensors, floored at 1e-3
/// (entries mergekit zeroes, or that cancel to ~0, count absolutely); NaN anywhere gives NaN.
fn max_relative_error(
    ours: &BTreeMap<String, (Dtype, Vec<usize>, Vec<f64>)>,
    theirs: &BTreeMap<String, (Dtype, Vec<usize>, Vec<f64>)>,
    case: &str,
) -> f64 {
    assert_eq!(ours.keys().collect::<Vec<_>>(), theirs.keys().collect::<Vec<_>>(), "{case}: tensor names");
    let mut worst = 0f64;
    for (name, (_, shape, want)) in theirs {
        let (_, got_shape, got) = &ours[name];
        assert_eq!(got_shape, shape, "{case} {name}");
        for (&a, &b) in got.iter().zip(want) {
            worst = nan_max(worst, rel_diff(a, b, 1e-3));
        }
    }
    worst
}

/// Largest relative error allowed per case: f32 rounding (values cancelling to ~1e-3 after a
/// SLERP are off by up to ~1.5e-5 relative). Cases whose config sets a compute `dtype`:
/// mergekit does its arithmetic in that dtype, symerge in f32 on inputs rounded to it, so
/// results may differ by the dtype's rounding.
/// Cases whose result is rounded to `dtype` before `out_dtype` (a linear merge mergekit does in
/// f32) must match exactly as the others do.
fn tolerance(case: &str) -> f64 {
    if case.starts_with("dtype_") && !case.starts_with("dtype_bf16_out_") { 8e-3 } else { 2e-5 }
}

#[test]
fn every_method_matches_mergekit_0_1_5() {
    let tmp = tempfile::tempdir().unwrap();
    check_cases(&fixtures(), tmp.path(), 48);
}

/// `tokenizer_source` (a model, `base` or `union`) over experts that added tokens and one that
/// numbers two tokens the other way round: every input's embeddings and head are permuted into
/// the output vocabulary (rows for tokens an input lacks from the one input that has them, the
/// base, their mean or zeros) before the merge, as mergekit does; under `slices`, over the
/// models of the slice each tensor comes from. The output's tokenizer vocabulary and
/// `vocab_size` are mergekit's.
#[test]
fn differing_vocabularies_are_permuted_as_mergekit_does() {
    let dir = vocab_fixtures();
    let tmp = tempfile::tempdir().unwrap();
    check_cases(&dir, tmp.path(), 13);
    let vocab = |p: &Path| tokenizers::Tokenizer::from_file(p).unwrap().get_vocab(true);
    for entry in std::fs::read_dir(dir.join("out")).unwrap() {
        let path = entry.unwrap().path();
        let Some(case) = path.file_name().unwrap().to_str().unwrap().strip_suffix(".tokenizer.json") else { continue };
        let ours = vocab(&tmp.path().join(case).join("tokenizer.json"));
        assert_eq!(ours, vocab(&path), "{case}: mergekit's output vocabulary");
    }
    // No hidden directory of permuted tensors is left beside the outputs.
    let hidden: Vec<String> = entries(tmp.path()).into_iter().filter(|n| n.starts_with('.')).collect();
    assert!(hidden.is_empty(), "{hidden:?}");
}

/// mergekit's `model+lora` references: PEFT LoRA adapters (plain, rsLoRA with an
/// `alpha_pattern`, an embedding adapter, a head in `modules_to_save`) applied to their models
/// before the merge, also to the base; fixtures from tests/reference/make_lora_fixtures.py.
#[test]
fn lora_adapters_are_applied_as_mergekit_does() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mergekit_lora");
    let tmp = tempfile::tempdir().unwrap();
    check_cases(&dir, tmp.path(), 3);
    // The adapted tensors' scratch directory is gone with the merge.
    let hidden: Vec<String> = entries(tmp.path()).into_iter().filter(|n| n.starts_with('.')).collect();
    assert!(hidden.is_empty(), "{hidden:?}");
    // The adapter changes what it targets: the merge of the adapted base alone is not the base.
    let (alone, base) = (read_model(&tmp.path().join("lora_linear_alone")), read_model(&dir.join("base")));
    for name in ["model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight", "lm_head.weight"] {
        assert_ne!(alone[name].2, base[name].2, "{name}");
    }
    assert_eq!(alone["model.layers.0.mlp.up_proj.weight"].2, base["model.layers.0.mlp.up_proj.weight"].2);
    // An adapter that stores no tensor changes nothing (and writes no scratch file).
    let empty = tmp.path().join("empty-adapter");
    copy_files(&dir.join("lora-1"), &empty, &["adapter_config.json"]);
    common::write_file(&empty.join("adapter_model.safetensors"), &[]);
    let yaml = format!(
        "merge_method: linear\nmodels:\n  - model: {}+{}\n    parameters: {{weight: 1.0}}\n",
        dir.join("base").display(),
        empty.display()
    );
    assert_eq!(merge_yaml(tmp.path(), "unchanged", &yaml), base);
    // A `model+lora` donor of a slices config (its first source) gives its model's config.json:
    // the slices form merges as the models form does.
    let (b, l) = (dir.join("base").display().to_string(), dir.join("lora-2").display().to_string());
    let sliced = format!(
        "merge_method: passthrough\nslices:\n  - sources:\n      - {{model: '{b}+{l}', layer_range: [0, 2]}}\n"
    );
    assert_eq!(merge_yaml(tmp.path(), "sliced", &sliced), alone);
    assert!(tmp.path().join("sliced/config.json").is_file());
}

/// A bad `model+lora` reference is an error naming the adapter or the part that does not
/// exist, before anything is written.
#[test]
fn bad_lora_references_are_refused() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mergekit_lora");
    let tmp = tempfile::tempdir().unwrap();
    let (base, lora) = (dir.join("base"), dir.join("lora-1"));
    let dora = tmp.path().join("dora");
    std::fs::create_dir_all(&dora).unwrap();
    std::fs::copy(lora.join("adapter_model.safetensors"), dora.join("adapter_model.safetensors")).unwrap();
    let cfg = std::fs::read_to_string(lora.join("adapter_config.json")).unwrap();
    std::fs::write(dora.join("adapter_config.json"), cfg.replace("\"use_dora\": false", "\"use_dora\": true")).unwrap();
    let pickled = tmp.path().join("pickled");
    std::fs::create_dir_all(&pickled).unwrap();
    std::fs::write(pickled.join("adapter_config.json"), &cfg).unwrap();
    std::fs::write(pickled.join("adapter_model.bin"), b"not read").unwrap();
    // An alpha that overflows f32 once scaled: named at the adapter (the merge would name the
    // deleted scratch file the adapted tensors are staged in).
    let loud = tmp.path().join("loud");
    std::fs::create_dir_all(&loud).unwrap();
    std::fs::copy(lora.join("adapter_model.safetensors"), loud.join("adapter_model.safetensors")).unwrap();
    let mut loud_cfg: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    loud_cfg["lora_alpha"] = serde_json::json!(1e300);
    std::fs::write(loud.join("adapter_config.json"), loud_cfg.to_string()).unwrap();
    // An adapter_model.safetensors that is a FIFO exists: it is named for what it is.
    let fifo = tmp.path().join("fifo");
    std::fs::create_dir_all(&fifo).unwrap();
    std::fs::write(fifo.join("adapter_config.json"), &cfg).unwrap();
    let made = std::process::Command::new("mkfifo").arg(fifo.join("adapter_model.safetensors")).status().unwrap();
    assert!(made.success(), "mkfifo failed");
    let yaml = |adapter: &Path| {
        format!(
            "merge_method: linear\nmodels:\n  - model: {}+{}\n    parameters: {{weight: 1.0}}\n",
            base.display(),
            adapter.display()
        )
    };
    let cases = [
        (yaml(&fifo), format!("{} is a FIFO, not a regular file", fifo.join("adapter_model.safetensors").display())),
        (yaml(&dora), "a DoRA adapter".to_string()),
        (yaml(&pickled), "no adapter_model.safetensors".to_string()),
        (yaml(&loud), format!("{}: applied to `", loud.join("adapter_model.safetensors").display())),
        (yaml(&tmp.path().join("absent")), format!("{} does not exist", tmp.path().join("absent").display())),
    ];
    for (yaml, want) in cases {
        let got = config_error(tmp.path(), &yaml);
        assert!(got.contains(&want), "expected `{want}` in: {got}");
        assert!(!tmp.path().join("bad-out").exists());
        let hidden = entries(tmp.path()).into_iter().filter(|n| n.starts_with('.'));
        assert_eq!(hidden.count(), 0, "{want}: scratch left behind");
    }
}

/// Adapters PEFT would not load, or would load some other way than what the merge would do
/// silently, are refused naming adapter_model.safetensors and the tensor: a `lora_B` without
/// its `lora_A` (its update was dropped), one module given twice (with and without the
/// `base_model.model.` prefix: one copy won), and factors whose rank is not adapter_config.json's
/// `r` or `rank_pattern` value (PEFT refuses such tensors; the scale used the factors' rank).
#[test]
fn inconsistent_lora_adapters_are_refused() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mergekit_lora");
    let tmp = tempfile::tempdir().unwrap();
    let lora = dir.join("lora-1");
    let tensors = read_file(&lora.join("adapter_model.safetensors"));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(lora.join("adapter_config.json")).unwrap()).unwrap();
    let q = "base_model.model.model.layers.0.self_attn.q_proj";
    let (qa, qb) = (format!("{q}.lora_A.weight"), format!("{q}.lora_B.weight"));
    let variant = |name: &str, edit: &dyn Fn(&mut Tensors), cfg: &serde_json::Value| {
        let mut t = tensors.clone();
        edit(&mut t);
        let out = tmp.path().join(name);
        std::fs::create_dir_all(&out).unwrap();
        let list: Vec<T> = t.iter().map(|(n, (d, s, v))| T::new(n, *d, s, v.clone())).collect();
        common::write_file(&out.join("adapter_model.safetensors"), &list);
        std::fs::write(out.join("adapter_config.json"), cfg.to_string()).unwrap();
        out
    };
    let orphan = variant("orphan", &|t| drop(t.remove(&qa)), &cfg);
    let twice = variant(
        "twice",
        &|t| {
            let (a, b) = (t[&qa].clone(), t[&qb].clone());
            t.insert(qa.replace("base_model.model.", ""), a);
            t.insert(qb.replace("base_model.model.", ""), b);
        },
        &cfg,
    );
    let mut r3 = cfg.clone();
    r3["r"] = serde_json::json!(3);
    let wrong_r = variant("wrong-r", &|_| {}, &r3);
    let mut pattern = cfg.clone();
    pattern["rank_pattern"] = serde_json::json!({"down_proj": 4, "q_proj": 8});
    let wrong_pattern = variant("wrong-pattern", &|_| {}, &pattern);
    let file = |d: &Path| d.join("adapter_model.safetensors").display().to_string();
    let cases = [
        (&orphan, format!("{}: `{qb}` has no `{qa}`", file(&orphan))),
        (&twice, format!("{}: `{qa}` and `{}` both give", file(&twice), qa.replace("base_model.model.", ""))),
        (&wrong_r, format!("{}: adapter_config.json's r is 3, but `", file(&wrong_r))),
        (&wrong_pattern, format!("adapter_config.json's rank_pattern \"q_proj\" is 8, but `{qa}` [4, 16] has rank 4")),
    ];
    for (adapter, want) in cases {
        let yaml = format!(
            "merge_method: linear\nmodels:\n  - model: {}+{}\n    parameters: {{weight: 1.0}}\n",
            dir.join("expert-1").display(),
            adapter.display()
        );
        let got = config_error(tmp.path(), &yaml);
        assert!(got.contains(&want), "expected `{want}` in: {got}");
        assert!(!tmp.path().join("bad-out").exists());
    }
    // The same rank_pattern with the factors' rank is fine.
    pattern["rank_pattern"] = serde_json::json!({"q_proj": 4});
    let right_pattern = variant("right-pattern", &|_| {}, &pattern);
    let yaml = format!(
        "merge_method: linear\nmodels:\n  - model: {}+{}\n    parameters: {{weight: 1.0}}\n",
        dir.join("expert-1").display(),
        right_pattern.display()
    );
    merge_yaml(tmp.path(), "right-pattern-out", &yaml);
}

/// Merges every case of `dir/cases.json` into `tmp` and compares it with mergekit's output.
fn check_cases(dir: &Path, tmp: &Path, min_cases: usize) {
    let cases: BTreeMap<String, String> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    assert!(cases.len() >= min_cases, "fixture cases: {}", cases.len());
    let mut report = Vec::new();
    for (case, yaml) in &cases {
        let mut yaml = yaml.replace("{base}", dir.join("base").to_str().unwrap());
        for e in 1..=6 {
            yaml = yaml.replace(&format!("{{expert-{e}}}"), dir.join(format!("expert-{e}")).to_str().unwrap());
            yaml = yaml.replace(&format!("{{lora-{e}}}"), dir.join(format!("lora-{e}")).to_str().unwrap());
        }
        let ours = merge_yaml(tmp, case, &yaml);
        let theirs = read_file(&dir.join("out").join(format!("{case}.safetensors")));
        for (name, (dtype, _, _)) in &theirs {
            assert_eq!(ours.get(name).map(|t| t.0), Some(*dtype), "{case} {name}: dtype");
        }
        let err = max_relative_error(&ours, &theirs, case);
        report.push((case.clone(), err));
        let their_config = dir.join("out").join(format!("{case}.config.json"));
        if their_config.exists() {
            check_config(&tmp.join(case).join("config.json"), &their_config, case);
        }
    }
    let line: Vec<String> = report.iter().map(|(c, e)| format!("{c}: {e:.2e}")).collect();
    eprintln!("max relative error per case: {}", line.join(", "));
    let bad: Vec<&String> = report.iter().filter(|(c, e)| e.is_nan() || *e > tolerance(c)).map(|(c, _)| c).collect();
    assert!(bad.is_empty(), "cases off mergekit by more than their tolerance: {bad:?}");
}

/// The output `config.json` agrees with mergekit's on the architecture, the layer count
/// included.
fn check_config(ours: &Path, theirs: &Path, case: &str) {
    let read = |p: &Path| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap() };
    let (ours, theirs) = (read(ours), read(theirs));
    for key in ["num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"] {
        assert_eq!(ours[key], theirs[key], "{case}: config.json `{key}`");
    }
}

/// The names in `dir`.
fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
}

/// Copies `files` of the model directory `from` into `to` (made here).
fn copy_files(from: &Path, to: &Path, files: &[&str]) {
    std::fs::create_dir_all(to).unwrap();
    for f in files {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

/// One safetensors file, read like [`read_model`] reads a directory.
fn read_file(path: &Path) -> Tensors {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(path, tmp.path().join("model.safetensors")).unwrap();
    read_model(tmp.path())
}

/// A base and `experts` fine-tunes with tensors large enough that merges, statistics passes
/// and rows span many chunks (rows of 40000 cross the 4096-element merge chunks).
fn big_family(dir: &Path, experts: usize) -> Vec<PathBuf> {
    let shapes: [(&str, &[usize]); 3] = [("a.weight", &[70_001]), ("b.weight", &[3, 40_000]), ("c.weight", &[5, 7])];
    (0..=experts)
        .map(|m| {
            let tensors: Vec<T> = shapes
                .iter()
                .enumerate()
                .map(|(ti, (name, shape))| {
                    let n: usize = shape.iter().product();
                    let base = randoms(100 + ti as u64, n, 0.5);
                    let common = randoms(200 + ti as u64, n, 0.03);
                    let values = if m == 0 {
                        base
                    } else {
                        let own = randoms(300 + (m * 10 + ti) as u64, n, 0.03 * m as f64);
                        base.iter().zip(&common).zip(&own).map(|((b, c), o)| b + c + o).collect()
                    };
                    T::new(name, Dtype::F32, shape, values)
                })
                .collect();
            let name = if m == 0 { "base".to_string() } else { format!("e{m}") };
            write_model(&dir.join(name), &tensors)
        })
        .collect()
}

fn yaml_for(method: &str, paths: &[PathBuf], model_params: &str, params: &str) -> String {
    let mut y = format!("merge_method: {method}\nbase_model: {}\nmodels:\n", paths[0].display());
    for p in &paths[1..] {
        y += &format!("  - model: {}\n    parameters: {{{model_params}}}\n", p.display());
    }
    if !params.is_empty() {
        y += &format!("parameters: {{{params}}}\n");
    }
    y
}

/// The streamed merge (statistics pre-pass, 4096-element or whole-row chunks, threads) gives
/// the same bits as one call of the method over each whole tensor.
#[test]
fn statistics_methods_are_exact_under_chunking() {
    let tmp = tempfile::tempdir().unwrap();
    let paths = big_family(tmp.path(), 3);
    let inputs: Vec<_> = paths.iter().map(|p| read_model(p)).collect();
    let cases = [
        ("slerp", 1, "", "t: 0.35"),
        ("model_stock", 3, "", ""),
        ("model_stock", 3, "", "filter_wise: true"),
        ("breadcrumbs", 3, "weight: 0.6, density: 0.4, gamma: 0.05", "rescale: true"),
        ("breadcrumbs_ties", 3, "weight: 0.6, density: 0.4", ""),
        ("della", 3, "weight: 0.6, density: 0.4, epsilon: 0.2", "seed: 5"),
        ("della_linear", 2, "weight: 0.5, density: 0.7", "seed: 9, rescale: false"),
        ("sce", 3, "", "select_topk: 0.3"),
        ("nuslerp", 2, "weight: 0.5", ""),
        ("nuslerp", 2, "weight: 0.5", "nuslerp_flatten: false"),
        ("nuslerp", 2, "weight: 0.5", "nuslerp_flatten: false, nuslerp_row_wise: true"),
        ("multislerp", 3, "weight: 0.4", ""),
        ("karcher", 2, "", "tol: 0"),
        ("arcee_fusion", 1, "", ""),
        ("ramplus_tl", 3, "", "epsilon: 0.03, r: 0.5, alpha: 0.8"),
    ];
    for (i, (method, k, mp, gp)) in cases.iter().enumerate() {
        let yaml = yaml_for(method, &paths[..=*k], mp, gp);
        let out = merge_yaml(tmp.path(), &format!("{method}-{i}"), &yaml);
        let config = MergeConfig::load(&tmp.path().join(format!("{method}-{i}.yml"))).unwrap();
        let m = config.build_method();
        for (name, (_, shape, got)) in &out {
            let f32s = |v: &Vec<f64>| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
            let base = f32s(&inputs[0][name].2);
            let experts: Vec<Vec<f32>> = inputs[1..=*k].iter().map(|x| f32s(&x[name].2)).collect();
            let params = config.tensor_params(name, "", 0.0).unwrap();
            let row_len = *shape.last().unwrap();
            let chunk_len = if m.whole_rows() { (select::CHUNK / row_len).max(1) * row_len } else { select::CHUNK };
            let pass = InMemory {
                base: Some(&base),
                experts: experts.iter().map(Vec::as_slice).collect(),
                row_len,
                chunk_len,
                params: &params,
                name_hash: name_hash(name),
            };
            let stats = m.prepare(&pass).unwrap();
            let ctx = ChunkCtx {
                offset: 0,
                params: &params,
                thresholds: &stats.thresholds,
                name_hash: name_hash(name),
                scalars: &stats.scalars,
                row_len,
            };
            let mut whole = vec![0f32; base.len()];
            let views: Vec<&[f32]> = experts.iter().map(Vec::as_slice).collect();
            m.merge_chunk(&ctx, Some(&base), &views, &mut whole, &mut Vec::new());
            let got: Vec<u32> = got.iter().map(|&x| (x as f32).to_bits()).collect();
            let want: Vec<u32> = whole.iter().map(|x| x.to_bits()).collect();
            assert!(got == want, "{method} ({gp}) {name}: streamed merge differs from the whole-tensor call");
        }
    }
}

/// DELLA's masks cannot match torch's generator, so they are checked by what they must be:
/// kept fraction `density`, keep probability rising with magnitude rank from
/// `density - epsilon` to `density + epsilon`, the l1 rescale exact, and the seed in control.
#[test]
fn della_masks_have_the_right_statistics() {
    let tmp = tempfile::tempdir().unwrap();
    let paths = big_family(tmp.path(), 1);
    let (density, epsilon) = (0.4, 0.2);
    let mp = format!("weight: 1.0, density: {density}, epsilon: {epsilon}");
    let plain = merge_yaml(tmp.path(), "plain", &yaml_for("della_linear", &paths, &mp, "seed: 3, rescale: false"));
    let scaled = merge_yaml(tmp.path(), "scaled", &yaml_for("della_linear", &paths, &mp, "seed: 3"));
    let other = merge_yaml(tmp.path(), "other", &yaml_for("della_linear", &paths, &mp, "seed: 4"));
    let (base, expert) = (read_model(&paths[0]), read_model(&paths[1]));
    let name = "b.weight";
    let f32s = |v: &Vec<f64>| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
    let (b, e, p, s) = (f32s(&base[name].2), f32s(&expert[name].2), f32s(&plain[name].2), f32s(&scaled[name].2));
    let tau: Vec<f32> = e.iter().zip(&b).map(|(x, y)| x - y).collect();
    let kept: Vec<bool> = p.iter().zip(&b).map(|(x, y)| x != y).collect();
    // Without rescale a kept entry is base + tau exactly.
    for i in 0..tau.len() {
        if kept[i] {
            assert_eq!(p[i], b[i] + tau[i], "kept entry {i}");
        }
    }
    for row in 0..3 {
        let r = row * 40_000..(row + 1) * 40_000;
        let frac = kept[r.clone()].iter().filter(|&&k| k).count() as f64 / 40_000.0;
        assert!((frac - density).abs() < 0.01, "row {row}: kept {frac}");
        let mut order: Vec<usize> = r.clone().collect();
        order.sort_by(|&x, &y| tau[x].abs().total_cmp(&tau[y].abs()));
        let tenth = |part: &[usize]| part.iter().filter(|&&i| kept[i]).count() as f64 / part.len() as f64;
        // Mean keep probability of the lowest and highest tenth of ranks: d -+ 0.9 epsilon.
        let (low, high) = (tenth(&order[..4000]), tenth(&order[36_000..]));
        assert!((low - (density - 0.9 * epsilon)).abs() < 0.025, "row {row}: low tenth kept {low}");
        assert!((high - (density + 0.9 * epsilon)).abs() < 0.025, "row {row}: high tenth kept {high}");
    }
    // Same seed, same mask; the rescale restores the l1 norm of the task vector exactly.
    let before: f64 = tau.iter().map(|x| x.abs() as f64).sum();
    let after: f64 = tau.iter().zip(&kept).filter(|(_, k)| **k).map(|(x, _)| x.abs() as f64).sum();
    let factor = (before / after) as f32;
    for i in 0..tau.len() {
        let want = if kept[i] { b[i] + (tau[i] * factor) } else { b[i] };
        assert!((s[i] - want).abs() <= 1e-6 * want.abs().max(1.0), "rescaled entry {i}: {} vs {want}", s[i]);
    }
    assert_ne!(other[name].2, scaled[name].2, "another seed, another mask");
}

fn config_error(dir: &Path, yaml: &str) -> String {
    let cfg = dir.join("bad.yml");
    std::fs::write(&cfg, yaml).unwrap();
    match MergeConfig::load(&cfg) {
        Err(e) => e.to_string(),
        Ok(c) => merge(&c, &opts(&dir.join("bad-out"))).map(|_| String::new()).unwrap_or_else(|e| e.to_string()),
    }
}

#[test]
fn registry_errors_name_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let paths = big_family(tmp.path(), 2);
    let two = &paths[..];
    let one = &paths[..2];
    let cases: Vec<(String, &[&str])> = vec![
        (yaml_for("slurp", one, "", ""), &["unknown merge_method `slurp`", "slerp"]),
        (yaml_for("slerp", one, "", "t: 0.5, tt: 1"), &["parameters.tt", "no parameter `tt`"]),
        (yaml_for("slerp", one, "", ""), &["parameters.t", "needs `t`"]),
        (yaml_for("slerp", one, "", "t: yes"), &["parameters.t", "expected a number"]),
        (yaml_for("slerp", one, "wieght: 1", "t: 0.5"), &["models[0].parameters.wieght", "no merge method takes"]),
        (yaml_for("slerp", two, "", "t: 0.5"), &["exactly 1 model", "lists 2"]),
        (yaml_for("model_stock", one, "", ""), &["at least 2 model", "lists 1"]),
        (yaml_for("ties", one, "weight: 1, density: 0.5", "int8_mask: 3"), &["parameters.int8_mask", "true or false"]),
        (yaml_for("della", one, "weight: 1, density: 0.5", "seed: -1"), &["parameters.seed", "whole number"]),
        (yaml_for("breadcrumbs", one, "weight: 1, density: 0.5, gamma: 1.5", ""), &["gamma 1.5", "outside [0, 1]"]),
        (yaml_for("della", one, "weight: 1, density: 0.9, epsilon: 0.15", ""), &["epsilon 0.15", "density 0.9"]),
        (
            yaml_for("nearswap", one, "", "t: 0.1, filterwise: true"),
            &["parameters.filterwise", "no merge method takes"],
        ),
        (yaml_for("multislerp", two, "", ""), &["parameters.weight", "`multislerp` needs `weight`"]),
        (yaml_for("linear", two, "", ""), &["parameters.weight", "`linear` needs `weight`", "has none"]),
        // A base_model `models` leaves out is one more model (fuzzing round 5: dropped silently).
        (yaml_for("linear", one, "weight: 1", ""), &["`linear` needs `weight`", "has none", "the base_model counts"]),
        (yaml_for("passthrough", one, "", ""), &["exactly 1 model(s)", "lists 2", "the base_model counts"]),
        (yaml_for("task_arithmetic", one, "density: 0.5", ""), &["`task_arithmetic` needs `weight`", "has none"]),
        (yaml_for("karcher", one, "", "max_iter: 2.5"), &["parameters.max_iter", "whole number"]),
        (yaml_for("arcee_fusion", two, "", ""), &["exactly 1 model", "lists 2"]),
        ("merge_method: linear\nmodels:\n  - model: ''\n".to_string(), &["models[0].model", "names no model"]),
        (
            yaml_for("task_arithmetic", one, "weight: [[1, 2], [3]]", ""),
            &["models[0].parameters: weight: not a parameter value"],
        ),
        // An entry's own fault is named (fuzzing round 7: "not a parameter value").
        (
            yaml_for("linear", one, "weight: [{filter: mlp, value: 0.1, value: 0.9}]", ""),
            &["parameters.weight[0]", "duplicate entry", "\"value\""],
        ),
        (
            yaml_for("linear", one, "weight: [{filter: mlp, valu: 0.1}]", ""),
            &["weight: unknown field `valu` in a {filter, value} entry"],
        ),
        (yaml_for("linear", one, "weight: {filter: mlp}", ""), &["weight: a {filter, value} entry without `value`"]),
        // The key is named (fuzzing round 5: the message stopped at `parameters`).
        (
            yaml_for("ties", one, "weight: 1, density: 0.5", "normalize: [true, false]"),
            &["parameters: normalize: not a parameter value"],
        ),
        // A required parameter whose filters miss a tensor: mergekit stops there too.
        (yaml_for("slerp", one, "", "t: [{filter: mlp, value: 0.5}]"), &["t at tensor `", "no filter of `t` matches"]),
        (
            yaml_for("nuslerp", two, "weight: [{filter: self_attn, value: 0.5}]", ""),
            &["weight for ", "no filter of `weight` matches"],
        ),
    ];
    for (yaml, needles) in cases {
        let err = config_error(tmp.path(), &yaml);
        for n in needles {
            assert!(err.contains(n), "error for\n{yaml}\nlacks `{n}`: {err}");
        }
    }
    assert!(!tmp.path().join("bad-out").exists(), "nothing written");
}

/// A parameter another method takes, where this method cannot use it (`density` left under
/// `task_arithmetic`, a per-model `weight` for `slerp`, `filter_wise` for `nearswap`, the global
/// `normalize` per model), is ignored with a warning, as mergekit ignores it: the merge is the
/// one without it.
#[test]
fn parameters_of_other_methods_are_ignored_as_mergekit_does() {
    let tmp = tempfile::tempdir().unwrap();
    let paths = big_family(tmp.path(), 2);
    let cases = [
        (
            "task_arithmetic",
            &paths[..],
            "weight: 0.5, density: 0.3, normalize: true",
            "lambda: 0.9, gamma: 0.1",
            "weight: 0.5",
            "lambda: 0.9",
        ),
        ("slerp", &paths[..2], "weight: 1", "t: 0.3, filter_wise: true", "", "t: 0.3"),
        ("nearswap", &paths[..2], "density: 0.5", "t: 0.1, filter_wise: true", "", "t: 0.1"),
    ];
    for (i, (method, models, stray_model, stray_top, clean_model, clean_top)) in cases.into_iter().enumerate() {
        let with = merge_yaml(tmp.path(), &format!("with-{i}"), &yaml_for(method, models, stray_model, stray_top));
        let without =
            merge_yaml(tmp.path(), &format!("without-{i}"), &yaml_for(method, models, clean_model, clean_top));
        assert_eq!(with, without, "{method}");
    }
}

/// Spellings mergekit's pydantic config accepts: numbers written as strings (`weight: "0.5"`,
/// `seed: "3"`) and `torch.`-prefixed dtypes; each merges as its plain form does.
#[test]
fn mergekit_spellings_merge_as_their_plain_forms() {
    let tmp = tempfile::tempdir().unwrap();
    let paths = big_family(tmp.path(), 2);
    let cases = [
        ("task_arithmetic", "weight: \"0.5\"", "lambda: \"0.9\"", "weight: 0.5", "lambda: 0.9", ""),
        ("dare_ties", "weight: 1, density: \"0.5\"", "seed: \"3\"", "weight: 1, density: 0.5", "seed: 3", ""),
        ("task_arithmetic", "weight: 0.5", "lambda: 0.9", "weight: 0.5", "lambda: 0.9", "dtype: torch.bfloat16\n"),
    ];
    for (i, (method, quoted_model, quoted_top, model, top, dtype)) in cases.into_iter().enumerate() {
        let with = merge_yaml(
            tmp.path(),
            &format!("quoted-{i}"),
            &(yaml_for(method, &paths, quoted_model, quoted_top) + dtype),
        );
        let plain_dtype = dtype.replace("torch.", "");
        let plain =
            merge_yaml(tmp.path(), &format!("plain-{i}"), &(yaml_for(method, &paths, model, top) + &plain_dtype));
        assert_eq!(with, plain, "{method} {quoted_model} {quoted_top} {dtype}");
    }
}

/// `int8_mask` is accepted for mergekit's configs: symerge never stores masks, so it cannot
/// change the merge (the parity cases set it); here, the same bits either way.
#[test]
fn int8_mask_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let paths = big_family(tmp.path(), 2);
    let a = merge_yaml(tmp.path(), "a", &yaml_for("ties", &paths, "weight: 1, density: 0.3", "int8_mask: true"));
    let b = merge_yaml(tmp.path(), "b", &yaml_for("ties", &paths, "weight: 1, density: 0.3", "int8_mask: false"));
    assert_eq!(a, b);
}

/// A method without a GPU kernel asked to run on CUDA runs on the CPU and says so once.
#[test]
fn cuda_request_for_a_cpu_method_falls_back_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let paths = big_family(tmp.path(), 2);
    let cfg = tmp.path().join("s.yml");
    let yaml = yaml_for("model_stock", &paths, "", "");
    std::fs::write(&cfg, &yaml).unwrap();
    let out = tmp.path().join("out");
    let (ok, _, err) = common::run(&["merge", cfg.to_str().unwrap(), "-o", out.to_str().unwrap(), "--device", "cuda"]);
    assert!(ok, "{err}");
    let lines = err.lines().filter(|l| l.contains("model_stock has no GPU kernel")).count();
    assert_eq!(lines, 1, "one line says why: {err}");
    let cpu = merge_yaml(tmp.path(), "cpu", &yaml);
    assert_eq!(read_model(&out), cpu);
}

/// Slices merging different numbers of models under `--device cuda`: the CPU engine merges
/// them (the GPU engine takes no slices config) and one line says so.
#[test]
fn cuda_request_for_unequal_slices_falls_back_with_one_line() {
    let dir = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let (e1, e2, e3) = (dir.join("expert-1"), dir.join("expert-2"), dir.join("expert-3"));
    let yaml = format!(
        "merge_method: linear\nparameters: {{weight: 1.0}}\nslices:\n  - sources:\n      - {{model: {}, layer_range: [0, 1]}}\n      - {{model: {}, layer_range: [0, 1]}}\n  - sources:\n      - {{model: {}, layer_range: [1, 2]}}\n",
        e1.display(),
        e2.display(),
        e3.display()
    );
    let cfg = tmp.path().join("u.yml");
    std::fs::write(&cfg, &yaml).unwrap();
    let out = tmp.path().join("out");
    let (ok, _, err) = common::run(&["merge", cfg.to_str().unwrap(), "-o", out.to_str().unwrap(), "--device", "cuda"]);
    assert!(ok, "{err}");
    let lines = err.lines().filter(|l| l.contains("a `slices` config merges on the CPU engine only")).count();
    assert_eq!(lines, 1, "one line says why: {err}");
    assert_eq!(read_model(&out), merge_yaml(tmp.path(), "cpu", &yaml));
}

/// A slices config's mistakes are refused before anything is written, naming the key.
#[test]
fn slices_errors_name_the_key() {
    let dir = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let (b, e1, e2) = (dir.join("base"), dir.join("expert-1"), dir.join("expert-2"));
    let (b, e1, e2) = (b.display(), e1.display(), e2.display());
    let cases = [
        (
            format!(
                "merge_method: slerp\nbase_model: {b}\nparameters: {{t: 0.5}}\nslices:\n  - sources:\n      - {{model: {b}, layer_range: [0, 2]}}\n      - {{model: {e1}, layer_range: [0, 1]}}\n"
            ),
            "slices[0].sources[1].layer_range spans 1 layers, sources[0] spans 2",
        ),
        (
            format!(
                "merge_method: slerp\nbase_model: {b}\nparameters: {{t: 0.5}}\nslices:\n  - sources:\n      - {{model: {e2}, layer_range: [0, 2]}}\n      - {{model: {e1}, layer_range: [0, 2]}}\n"
            ),
            "slices[0]: the base model",
        ),
        (
            format!("merge_method: passthrough\nslices:\n  - sources:\n      - {{model: {e1}, layer_range: [1, 3]}}\n"),
            "slices[0]: layer_range [1, 3] of",
        ),
        (
            format!(
                "merge_method: passthrough\nslices:\n  - sources:\n      - {{model: {e1}, layer_range: [0, 1], layers: 2}}\n"
            ),
            "unknown field `layers`",
        ),
        (
            format!(
                "merge_method: multislerp\nparameters: {{weight: 1.0}}\nslices:\n  - sources:\n      - {{model: {e1}, layer_range: [0, 1]}}\n      - {{model: {e2}, layer_range: [0, 1]}}\n  - base_model: {b}\n    sources:\n      - {{model: {e2}, layer_range: [1, 2]}}\n      - {{model: {e1}, layer_range: [1, 2]}}\n"
            ),
            "slices[1]: the base model",
        ),
        (
            format!(
                "merge_method: task_arithmetic\nbase_model: {b}\nparameters: {{weight: 1.0}}\nslices:\n  - sources:\n      - {{model: {b}, layer_range: [0, 1]}}\n      - {{model: {e1}, layer_range: [0, 1]}}\n  - sources:\n      - {{model: {e1}, layer_range: [1, 2]}}\n      - {{model: {e2}, layer_range: [1, 2]}}\n      - {{model: {b}, layer_range: [1, 2]}}\n"
            ),
            "slices[1].sources[2]: the base model",
        ),
        (
            format!(
                "merge_method: ties\nbase_model: {b}\nslices:\n  - parameters: {{normalize: [{{filter: mlp, value: false}}]}}\n    sources:\n      - {{model: {b}, layer_range: [0, 2]}}\n      - {{model: {e1}, layer_range: [0, 2]}}\n"
            ),
            "slices[0].parameters.normalize",
        ),
        (
            format!(
                "merge_method: linear\ntokenizer: {{source: {e1}}}\ntokenizer_source: {e1}\nmodels:\n  - {{model: {e1}, parameters: {{weight: 1}}}}\n"
            ),
            "tokenizer and tokenizer_source",
        ),
        (
            format!(
                "merge_method: linear\ntokenizer: {{tokens: {{a: {{source: {{kind: mean}}}}}}}}\nmodels:\n  - {{model: {e1}, parameters: {{weight: 1}}}}\n"
            ),
            "unknown kind `mean`",
        ),
        (
            format!(
                "merge_method: linear\ntokenizer: {{tokens: {{a: {{source: {{kind: model_token, model: {e1}}}}}}}}}\nmodels:\n  - {{model: {e1}, parameters: {{weight: 1}}}}\n"
            ),
            "model_token needs a `model` and one of `token`, `token_id`",
        ),
        (
            format!(
                "merge_method: linear\ntokenizer: {{pad_to_multiple_of: 18446744073709551615}}\nmodels:\n  - {{model: {e1}, parameters: {{weight: 1}}}}\n"
            ),
            "tokenizer.pad_to_multiple_of: 18446744073709551615 is more than 65536",
        ),
        (
            format!(
                "merge_method: linear\ntokenizer: {{tokens: {{a: {{source: {e1}}}, a: {{force: true}}}}}}\nmodels:\n  - {{model: {e1}, parameters: {{weight: 1}}}}\n"
            ),
            "given twice",
        ),
        (
            format!(
                "merge_method: linear\ntokenizer: {{source: {e1}, padding: 8}}\nmodels:\n  - {{model: {e1}, parameters: {{weight: 1}}}}\n"
            ),
            "unknown field `padding`",
        ),
        (
            format!(
                "merge_method: linear\nmodules: {{text: {{models: [{{model: {e1}}}]}}, vision: {{models: [{{model: {e1}}}]}}}}\n"
            ),
            "modules: lists 2 modules (text, vision)",
        ),
        (
            format!("merge_method: linear\nmodules: {{text_decoder: {{models: [{{model: {e1}}}]}}}}\n"),
            "modules.text_decoder: the model families symerge loads have one module",
        ),
        (
            format!(
                "merge_method: linear\nmodules: {{default: {{models: [{{model: {e1}}}]}}}}\nmodels:\n  - {{model: {e1}, parameters: {{weight: 1}}}}\n"
            ),
            "give one of `models`, `slices` or `modules`",
        ),
        (
            "merge_method: linear\nmodules: {default: {parameters: {weight: 1}}}\n".to_string(),
            "modules.default: give either",
        ),
        (
            format!(
                "merge_method: linear\nmodules: {{default: {{models: [{{model: {e1}, parameters: {{desnity: 1}}}}]}}}}\n"
            ),
            "modules.default.models[0].parameters.desnity",
        ),
        (
            format!(
                "merge_method: linear\nmodules: {{default: {{models: [{{model: {e1}}}], parameters: {{wieght: 1}}}}}}\n"
            ),
            "modules.default.parameters.wieght",
        ),
        (
            format!("merge_method: linear\nmodules: {{default: {{models: [{{model: {e1}}}], layers: 2}}}}\n"),
            "unknown field `layers`",
        ),
        (
            format!(
                "merge_method: linear\nchat_template: chatml\nmodels:\n  - {{model: {e1}, parameters: {{weight: 1}}}}\n"
            ),
            "chat_template: `chatml`",
        ),
        (
            format!(
                "merge_method: linear\nout_dtype: float64\nmodels:\n  - {{model: {e1}, parameters: {{weight: 1}}}}\n"
            ),
            "out_dtype:",
        ),
    ];
    for (yaml, want) in cases {
        let got = config_error(tmp.path(), &yaml);
        assert!(got.contains(want), "expected `{want}` in: {got}");
        assert!(!tmp.path().join("bad-out").exists(), "{want}: an output was written");
    }
}

/// `tokenizer_source` copies that model's tokenizer when every vocabulary agrees (mergekit's
/// permutation is then the identity) and refuses otherwise; `chat_template: auto` takes the
/// inputs' most common template.
#[test]
fn tokenizer_source_and_chat_template() {
    let dir = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let vocab = |extra: &str| {
        let words: Vec<String> = (0..32).map(|i| format!("\"{extra}w{i}\": {i}")).collect();
        format!(
            "{{\"version\": \"1.0\", \"model\": {{\"type\": \"WordLevel\", \"vocab\": {{{}}}, \"unk_token\": \"{extra}w0\"}}}}",
            words.join(", ")
        )
    };
    for (name, words, template) in
        [("a", "", "{{ A }} template text"), ("b", "", "{{ B }} template text"), ("c", "x", "")]
    {
        let m = tmp.path().join(name);
        copy_files(&dir.join("expert-1"), &m, &["config.json", "model.safetensors"]);
        std::fs::write(m.join("tokenizer.json"), vocab(words)).unwrap();
        let tc = serde_json::json!({"chat_template": template, "from": name});
        std::fs::write(m.join("tokenizer_config.json"), tc.to_string()).unwrap();
    }
    let (a, b, c) = (tmp.path().join("a"), tmp.path().join("b"), tmp.path().join("c"));
    let yaml = format!(
        "merge_method: linear\nparameters: {{weight: 1}}\ntokenizer_source: {}\nchat_template: auto\nmodels:\n  - model: {}\n  - model: {}\n",
        b.display(),
        a.display(),
        b.display(),
    );
    let got = config_error(tmp.path(), &yaml);
    assert!(got.is_empty(), "{got}");
    let out = tmp.path().join("bad-out");
    let tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(tc["from"], "b", "tokenizer files come from tokenizer_source");
    assert!(tc.get("chat_template").is_none());
    let template = std::fs::read_to_string(out.join("chat_template.jinja")).unwrap();
    assert_eq!(template, "{{ A }} template text", "a tie goes to the first model mentioned");
    std::fs::remove_dir_all(&out).unwrap();
    let yaml = format!(
        "merge_method: linear\nparameters: {{weight: 1}}\ntokenizer_source: base\nbase_model: {}\nmodels:\n  - model: {}\n",
        a.display(),
        c.display()
    );
    // c shares no token with the base: every row of its permuted embeddings is the base's (the
    // one model that has the token), as in mergekit.
    let got = config_error(tmp.path(), &yaml);
    assert!(got.is_empty(), "{got}");
    let (merged, base) = (read_model(&out), read_model(&a));
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        assert_eq!(merged[name].2, base[name].2, "{name}: the base's rows");
    }
    let tok = serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(out.join("tokenizer.json")).unwrap());
    assert_eq!(tok.unwrap()["model"]["unk_token"], "w0", "the base's tokenizer");
}

/// `union` without a base starts from the first model's tokenizer in config order (mergekit
/// starts from an arbitrary one: its models are a Python set) and adds the others' new tokens
/// after it; every model's rows follow their tokens.
#[test]
fn union_without_a_base_starts_from_the_first_model() {
    let dir = vocab_fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let (e1, e2) = (dir.join("expert-1"), dir.join("expert-2"));
    let yaml = format!(
        "merge_method: linear\ntokenizer_source: union\nmodels:\n  - model: {}\n    parameters: {{weight: 1.0}}\n  - model: {}\n    parameters: {{weight: 0.0}}\n",
        e2.display(),
        e1.display()
    );
    let out = merge_yaml(tmp.path(), "u", &yaml);
    let vocab = tokenizers::Tokenizer::from_file(tmp.path().join("u/tokenizer.json")).unwrap().get_vocab(true);
    assert_eq!((vocab.len(), vocab["<|im_end|>"], vocab["<|im_start|>"]), (34, 32, 33), "expert-2's order first");
    // Weight 1 on expert-2: its own rows, and expert-1's row for the token only expert-1 has.
    let (theirs1, theirs2) = (read_model(&e1), read_model(&e2));
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        let row = |t: &[f64], r: usize| t[r * 16..(r + 1) * 16].to_vec();
        let got = &out[name].2;
        assert_eq!(out[name].1, vec![34, 16], "{name}");
        assert_eq!(row(got, 32), row(&theirs2[name].2, 32), "{name}: <|im_end|> is expert-2's row 32");
        assert_eq!(row(got, 33), row(&theirs1[name].2, 32), "{name}: <|im_start|> is expert-1's row 32");
        assert_eq!(row(got, 5), row(&theirs2[name].2, 5), "{name}: t5");
    }
}

/// A `union` output's `tokenizer_config.json` (`added_tokens_decoder`) and `added_tokens.json`
/// list the new tokens of its `tokenizer.json`, as transformers writes them for mergekit; files
/// and keys the donor lacks are not made up.
#[test]
fn a_union_lists_its_new_tokens_in_the_tokenizer_config() {
    let dir = vocab_fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    copy_files(&dir.join("base"), &base, &["config.json", "model.safetensors", "tokenizer.json"]);
    let cfg = r#"{"tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": {}}"#;
    std::fs::write(base.join("tokenizer_config.json"), cfg).unwrap();
    std::fs::write(base.join("added_tokens.json"), "{}").unwrap();
    let yaml = |base: &Path| {
        format!(
            "merge_method: task_arithmetic\nbase_model: {}\ntokenizer_source: union\nmodels:\n  - model: {}\n    parameters: {{weight: 0.5}}\n  - model: {}\n    parameters: {{weight: 0.5}}\n",
            base.display(),
            dir.join("expert-1").display(),
            dir.join("expert-2").display()
        )
    };
    merge_yaml(tmp.path(), "u", &yaml(&base));
    let json = |p: PathBuf| serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(p).unwrap()).unwrap();
    let out = tmp.path().join("u");
    let tokens = json(out.join("tokenizer.json"))["added_tokens"].clone();
    let decoder = json(out.join("tokenizer_config.json"))["added_tokens_decoder"].clone();
    let listed: Vec<(String, serde_json::Value)> =
        tokens.as_array().unwrap().iter().map(|t| (t["id"].to_string(), t["content"].clone())).collect();
    assert_eq!(listed.len(), 2, "{tokens}");
    for (id, content) in &listed {
        assert_eq!(decoder[id]["content"], *content, "{decoder}");
        assert_eq!(decoder[id]["special"], true, "{decoder}");
    }
    let extra = json(out.join("added_tokens.json"));
    assert_eq!(extra, serde_json::json!({"<|im_start|>": 32, "<|im_end|>": 33}));
    // The fixture base has neither: the output has neither.
    merge_yaml(tmp.path(), "plain", &yaml(&dir.join("base")));
    let plain = tmp.path().join("plain");
    assert!(json(plain.join("tokenizer_config.json")).get("added_tokens_decoder").is_none());
    assert!(!plain.join("added_tokens.json").exists());
}

/// An expert whose head is tied to its embeddings (no `lm_head.weight`) merged with a base that
/// stores one lends its embedding table as its head, as mergekit's `tied_names` do (checked by
/// hand: bit-identical to mergekit 0.1.5's output for this config); before, the merge stopped
/// with "`lm_head.weight` is missing".
#[test]
fn an_expert_with_a_tied_head_lends_its_embeddings() {
    let dir = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let e1 = read_model(&dir.join("expert-1"));
    let tensors: Vec<T> = e1
        .iter()
        .filter(|(n, _)| *n != "lm_head.weight")
        .map(|(n, (dtype, shape, values))| T::new(n, *dtype, shape, values.clone()))
        .collect();
    let tied = write_model(&tmp.path().join("tied"), &tensors);
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expert-1/config.json")).unwrap()).unwrap();
    cfg["tie_word_embeddings"] = true.into();
    std::fs::write(tied.join("config.json"), cfg.to_string()).unwrap();
    let yaml = format!(
        "merge_method: task_arithmetic\nbase_model: {}\nmodels:\n  - model: {}\n    parameters: {{weight: 0.5}}\n  - model: {}\n    parameters: {{weight: 0.25}}\n",
        dir.join("base").display(),
        tied.display(),
        dir.join("expert-2").display()
    );
    let out = merge_yaml(tmp.path(), "t", &yaml);
    let (base, e2) = (read_model(&dir.join("base")), read_model(&dir.join("expert-2")));
    let (b, emb, h2) = (&base["lm_head.weight"].2, &e1["model.embed_tokens.weight"].2, &e2["lm_head.weight"].2);
    let got = &out["lm_head.weight"].2;
    for i in 0..b.len() {
        let want = b[i] + 0.5 * (emb[i] - b[i]) + 0.25 * (h2[i] - b[i]);
        assert!((got[i] - want).abs() <= 1e-6 * want.abs().max(1.0), "lm_head[{i}]: {} vs {want}", got[i]);
    }
    assert_ne!(emb, &e1["lm_head.weight"].2, "the fixture's untied head differs from its embeddings");
    // The tied model as the base: the output still gets a merged head, the base's embeddings as
    // its head (mergekit plans every tensor any input stores).
    let yaml = format!(
        "merge_method: task_arithmetic\nbase_model: {}\nmodels:\n  - model: {}\n    parameters: {{weight: 0.25}}\n",
        tied.display(),
        dir.join("expert-2").display()
    );
    let out = merge_yaml(tmp.path(), "t2", &yaml);
    let got = &out["lm_head.weight"].2;
    for i in 0..b.len() {
        let want = emb[i] + 0.25 * (h2[i] - emb[i]);
        assert!((got[i] - want).abs() <= 1e-6 * want.abs().max(1.0), "lm_head[{i}]: {} vs {want}", got[i]);
    }
}

/// A `tokenizer.tokens` source must be one of the models merging the token's rows, as in
/// mergekit; the error names the token and nothing is written.
#[test]
fn a_token_source_outside_the_merge_is_refused() {
    let dir = vocab_fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let yaml = format!(
        "merge_method: linear\nparameters: {{weight: 1}}\ntokenizer:\n  source: {e1}\n  tokens:\n    \"<|im_start|>\": {{source: {e3}}}\nmodels:\n  - model: {e1}\n  - model: {e2}\n",
        e1 = dir.join("expert-1").display(),
        e2 = dir.join("expert-2").display(),
        e3 = dir.join("expert-3").display(),
    );
    let got = config_error(tmp.path(), &yaml);
    assert!(got.contains("tokenizer.tokens.\"<|im_start|>\"") && got.contains("not one of the merged models"), "{got}");
    let left = entries(tmp.path());
    assert_eq!(left.len(), 1, "only the config remains: {left:?}");
}

/// As mergekit's, the output carries its merge config verbatim (`mergekit_config.yml`) and a model
/// card naming the merged models and the method; the base's own card, merge config and weight
/// indexes stay behind.
#[test]
fn the_output_carries_its_config_and_a_card_not_the_donors() {
    let dir = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    copy_files(&dir.join("base"), &base, &["config.json", "model.safetensors"]);
    std::fs::write(base.join("README.md"), "# the base model's own card\n").unwrap();
    std::fs::write(base.join("mergekit_config.yml"), "merge_method: made-the-base\n").unwrap();
    std::fs::write(base.join("pytorch_model.bin.index.json"), "{}").unwrap();
    std::fs::write(base.join("generation_config.json"), "{}").unwrap();
    let yaml = format!(
        "# my merge\nmerge_method: task_arithmetic\nbase_model: {}\nmodels:\n  - model: {}\n    parameters: {{weight: 0.5}}\n",
        base.display(),
        dir.join("expert-1").display()
    );
    merge_yaml(tmp.path(), "m", &yaml);
    let out = tmp.path().join("m");
    assert_eq!(std::fs::read_to_string(out.join("mergekit_config.yml")).unwrap(), yaml);
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.starts_with("---\nlibrary_name: transformers\n"), "{card}");
    assert!(card.contains("`task_arithmetic`") && card.contains(&dir.join("expert-1").display().to_string()), "{card}");
    assert!(card.contains("# my merge"), "the config is in the card: {card}");
    assert!(card.contains("\n# m\n"), "titled with the output's name: {card}");
    assert!(!card.contains("own card"), "{card}");
    assert!(!out.join("pytorch_model.bin.index.json").exists());
    assert!(out.join("generation_config.json").exists(), "other side files are still copied");
}

/// A multimodal config states its vocabulary in `text_config.vocab_size`: that is where the
/// output's goes (mergekit's `vocab_size_config_key`), and a top-level key is not made up.
#[test]
fn a_vocabulary_under_text_config_is_read_and_set_there() {
    let dir = vocab_fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for m in ["base", "expert-1"] {
        let to = tmp.path().join(m);
        copy_files(&dir.join(m), &to, &["model.safetensors", "tokenizer.json", "tokenizer_config.json"]);
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(m).join("config.json")).unwrap()).unwrap();
        let n = cfg.as_object_mut().unwrap().remove("vocab_size").unwrap();
        cfg["text_config"] = serde_json::json!({ "vocab_size": n });
        std::fs::write(to.join("config.json"), cfg.to_string()).unwrap();
        paths.push(to);
    }
    let yaml = format!(
        "merge_method: task_arithmetic\nbase_model: {b}\ntokenizer_source: {e}\nmodels:\n  - model: {e}\n    parameters: {{weight: 0.5}}\n",
        b = paths[0].display(),
        e = paths[1].display()
    );
    let out = merge_yaml(tmp.path(), "mm", &yaml);
    assert_eq!(out["model.embed_tokens.weight"].1, vec![34, 16]);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("mm/config.json")).unwrap()).unwrap();
    assert_eq!(cfg["text_config"]["vocab_size"], 34, "{cfg}");
    assert!(cfg.get("vocab_size").is_none(), "{cfg}");
}

/// A tokenizer whose ids run past its model's embedding rows is an error naming the model and
/// the tensor, and leaves no output or hidden directory behind.
#[test]
fn a_tokenizer_beyond_its_embedding_rows_is_refused() {
    let dir = vocab_fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let short = tmp.path().join("short");
    copy_files(&dir.join("expert-1"), &short, &["config.json", "tokenizer.json", "tokenizer_config.json"]);
    // The base's 32 rows under expert-1's 34 tokens (and its vocab_size of 34).
    std::fs::copy(dir.join("base/model.safetensors"), short.join("model.safetensors")).unwrap();
    let yaml = format!(
        "merge_method: linear\nparameters: {{weight: 1}}\ntokenizer_source: {}\nmodels:\n  - model: {}\n  - model: {}\n",
        short.display(),
        short.display(),
        dir.join("expert-2").display()
    );
    let got = config_error(tmp.path(), &yaml);
    assert!(got.contains(short.to_str().unwrap()) && got.contains("`lm_head.weight` has shape [32, 16]"), "{got}");
    assert!(got.contains("no row 32"), "{got}");
    let left = entries(tmp.path());
    assert_eq!(left.len(), 2, "only the model and the config remain: {left:?}");
}

/// An input with only a `tokenizer.model` (which mergekit would read) is refused by name, not
/// taken to share the first input's vocabulary.
#[test]
fn a_tokenizer_symerge_cannot_read_is_refused() {
    let dir = vocab_fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let spm = tmp.path().join("spm-only");
    copy_files(&dir.join("expert-1"), &spm, &["config.json", "model.safetensors"]);
    std::fs::write(spm.join("tokenizer.model"), b"not read").unwrap();
    let yaml = format!(
        "merge_method: linear\nparameters: {{weight: 1}}\ntokenizer_source: {}\nmodels:\n  - model: {}\n  - model: {}\n",
        dir.join("expert-1").display(),
        dir.join("expert-1").display(),
        spm.display()
    );
    let got = config_error(tmp.path(), &yaml);
    assert!(got.contains("tokenizer.model but no tokenizer.json") && got.contains("spm-only"), "{got}");
    assert!(!tmp.path().join("bad-out").exists());
}

/// A 1-D vocabulary tensor (a head's bias) is permuted like the rows of the embeddings: expert-3
/// numbers t5 and t7 the other way round, so its stored bias has those entries swapped, and the
/// merge in the base's vocabulary averages each token's own entries.
#[test]
fn a_head_bias_is_permuted_with_its_tokens() {
    let dir = vocab_fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let (b, c) = (randoms(11, 32, 0.5), randoms(12, 32, 0.5));
    let mut stored_c = c.clone();
    stored_c.swap(5, 7);
    for (name, bias) in [("base", &b), ("expert-3", &stored_c)] {
        let to = tmp.path().join(name);
        let mut tensors: Vec<T> = read_model(&dir.join(name))
            .into_iter()
            .map(|(n, (dtype, shape, values))| T::new(&n, dtype, &shape, values))
            .collect();
        tensors.push(T::new("lm_head.bias", Dtype::F32, &[32], bias.clone()));
        write_model(&to, &tensors);
        for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(dir.join(name).join(f), to.join(f)).unwrap();
        }
    }
    let (base, e3) = (tmp.path().join("base"), tmp.path().join("expert-3"));
    let yaml = format!(
        "merge_method: linear\nbase_model: {}\ntokenizer_source: base\nmodels:\n  - model: {}\n    parameters: {{weight: 0.5}}\n  - model: {}\n    parameters: {{weight: 0.5}}\n",
        base.display(),
        base.display(),
        e3.display()
    );
    let out = merge_yaml(tmp.path(), "biased", &yaml);
    let got = &out["lm_head.bias"].2;
    for t in 0..32 {
        let want = (b[t] + c[t]) / 2.0;
        assert!((got[t] - want).abs() <= 1e-6 * want.abs().max(1.0), "token t{t}: {} vs {want}", got[t]);
    }
}

/// `mergekit-yaml CONFIG OUT` with mergekit's flags runs unchanged: the output after the config,
/// `--random-seed` as the seed of a randomized method whose config sets none (the same merge as
/// `seed:` in the config, another than the default seed's), `--out-shard-size 1B` as 10^9 bytes,
/// `--no-copy-tokenizer` and `--no-write-model-card`, `-j`, and flags without effect here.
#[test]
fn a_mergekit_command_line_runs_unchanged() {
    let dir = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    copy_files(&dir.join("base"), &base, &["config.json", "model.safetensors"]);
    std::fs::write(base.join("tokenizer_config.json"), "{}").unwrap();
    std::fs::write(base.join("special_tokens_map.json"), "{}").unwrap();
    std::fs::write(base.join("generation_config.json"), "{}").unwrap();
    let models = |seed: &str| {
        let experts: Vec<String> = (1..=2)
            .map(|k| {
                format!(
                    "  - model: {}\n    parameters: {{weight: 0.5, density: 0.5}}\n",
                    dir.join(format!("expert-{k}")).display()
                )
            })
            .collect();
        format!("merge_method: dare_ties\nbase_model: {}\n{seed}models:\n{}", base.display(), experts.concat())
    };
    let run = |name: &str, yaml: &str, flags: &[&str]| {
        let cfg = tmp.path().join(format!("{name}.yml"));
        std::fs::write(&cfg, yaml).unwrap();
        let out = tmp.path().join(name);
        let o = common::symerge()
            .args(["merge", cfg.to_str().unwrap(), out.to_str().unwrap(), "-q"])
            .args(flags)
            .output()
            .unwrap();
        assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
        out
    };
    let flags = [
        "--random-seed",
        "7",
        "--out-shard-size",
        "1B",
        "--copy-tokenizer",
        "--no-copy-tokenizer",
        "--no-write-model-card",
        "-j",
        "2",
        "--lazy-unpickle",
        "--lora-merge-cache",
        "/nonexistent",
        "--trust-remote-code",
        // mergekit's default spelled out (fuzzing round 7: refused by the parser), after the
        // refused form: the later wins, as in mergekit.
        "--unsafe-truncate-embeddings",
        "--no-unsafe-truncate-embeddings",
    ];
    let cli = run("cli", &models(""), &flags);
    let in_config = run("in-config", &models("parameters: {seed: 7}\n"), &[]);
    let default_seed = run("default", &models(""), &[]);
    assert_eq!(read_model(&cli), read_model(&in_config), "--random-seed 7 is `seed: 7`");
    assert_ne!(read_model(&cli), read_model(&default_seed), "and not the default seed");
    let files = entries(&cli);
    assert!(files.contains(&"model.safetensors".to_string()), "one shard under 10^9 bytes: {files:?}");
    // mergekit copies the generation settings only with the tokenizer.
    for absent in ["tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "README.md"] {
        assert!(!files.iter().any(|f| f == absent), "{absent} in {files:?}");
    }
    assert!(entries(&in_config).contains(&"tokenizer_config.json".to_string()), "copied by default");
    assert!(entries(&in_config).contains(&"generation_config.json".to_string()), "copied by default");
    assert!(entries(&in_config).contains(&"README.md".to_string()), "a card by default");
    // A config's own seed wins over --random-seed.
    let seeded_both = run("both", &models("parameters: {seed: 7}\n"), &["--random-seed", "9"]);
    assert_eq!(read_model(&seeded_both), read_model(&in_config));
}

/// Inputs of another `model_type` are refused unless `--allow-crimes` (mergekit's rule for
/// mixed architectures), naming the input and the flag; with it the merge runs. Inputs of other
/// sizes are refused for their sizes, without suggesting the flag.
#[test]
fn mixing_model_types_needs_allow_crimes() {
    let dir = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let other = tmp.path().join("other");
    copy_files(&dir.join("expert-1"), &other, &["config.json", "model.safetensors"]);
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(other.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "llama", "the fixture is a Llama");
    cfg["model_type"] = "mistral".into();
    std::fs::write(other.join("config.json"), cfg.to_string()).unwrap();
    let yaml = format!(
        "merge_method: task_arithmetic\nparameters: {{weight: 1}}\nbase_model: {}\nmodels:\n  - model: {}\n",
        dir.join("base").display(),
        other.display()
    );
    let cfg_path = tmp.path().join("m.yml");
    std::fs::write(&cfg_path, &yaml).unwrap();
    let out = tmp.path().join("out");
    let e = merge(&MergeConfig::load(&cfg_path).unwrap(), &opts(&out)).unwrap_err().to_string();
    assert!(e.contains("--allow-crimes") && e.contains("mistral") && e.contains("other"), "{e}");
    assert!(!out.exists());
    let allowed = MergeOptions { allow_crimes: true, ..opts(&out) };
    merge(&MergeConfig::load(&cfg_path).unwrap(), &allowed).unwrap();
    assert!(out.join("model.safetensors").exists());

    // Of other sizes as well (BERT into Llama), the sizes are named first and no flag is
    // suggested: --allow-crimes led only to the size error.
    cfg["hidden_size"] = (cfg["hidden_size"].as_u64().unwrap() * 2).into();
    std::fs::write(other.join("config.json"), cfg.to_string()).unwrap();
    let sized = tmp.path().join("sized");
    let e = merge(&MergeConfig::load(&cfg_path).unwrap(), &opts(&sized)).unwrap_err().to_string();
    assert!(e.contains("`hidden_size`") && e.contains("(model_type mistral vs llama)"), "{e}");
    assert!(!e.contains("--allow-crimes"), "{e}");
}

/// A `slices` config whose slices each have one source (a passthrough frankenmerge) checks
/// its sources against the model that gives the output its config.json, as the `models` form
/// checks its inputs: another `model_type` needs `--allow-crimes`, another vocabulary (here a
/// real 48-token Llama beside the 32-token base) is refused, both naming the slice and model.
#[test]
fn one_source_slices_check_model_types_and_sizes() {
    let dir = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let edit_config = |to: &Path, edit: &dyn Fn(&mut serde_json::Value)| {
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expert-1/config.json")).unwrap()).unwrap();
        edit(&mut cfg);
        std::fs::write(to.join("config.json"), cfg.to_string()).unwrap();
    };
    let other = tmp.path().join("other");
    copy_files(&dir.join("expert-1"), &other, &["model.safetensors"]);
    edit_config(&other, &|c| c["model_type"] = "mistral".into());
    let wide = tmp.path().join("wide");
    let tensors: Vec<T> = read_model(&dir.join("expert-1"))
        .into_iter()
        .map(|(n, (dt, mut shape, mut v))| {
            if n == "model.embed_tokens.weight" || n == "lm_head.weight" {
                v.extend(randoms(7, 16 * shape[1], 0.1));
                shape[0] += 16;
            }
            T::new(&n, dt, &shape, v)
        })
        .collect();
    write_model(&wide, &tensors);
    edit_config(&wide, &|c| c["vocab_size"] = 48.into());
    let frank = |second: &Path| {
        let yaml = format!(
            "merge_method: passthrough\nslices:\n  - sources: [{{model: {}, layer_range: [0, 1]}}]\n  - sources: [{{model: {}, layer_range: [1, 2]}}]\n",
            dir.join("base").display(),
            second.display()
        );
        let path = tmp.path().join("frank.yml");
        std::fs::write(&path, yaml).unwrap();
        MergeConfig::load(&path).unwrap()
    };
    let out = tmp.path().join("out");
    let e = merge(&frank(&other), &opts(&out)).unwrap_err().to_string();
    assert!(e.contains("slices[1]") && e.contains("--allow-crimes") && e.contains("mistral"), "{e}");
    assert!(e.contains(&other.join("config.json").display().to_string()), "{e}");
    assert!(!out.exists());
    merge(&frank(&other), &MergeOptions { allow_crimes: true, ..opts(&out) }).unwrap();
    assert_eq!(read_model(&out).len(), 21, "both slices' layers, the base's embeddings, the other's head");

    let sized = tmp.path().join("sized");
    let e = merge(&frank(&wide), &opts(&sized)).unwrap_err().to_string();
    assert!(e.contains("slices[1]") && e.contains("`vocab_size` is 48") && e.contains("wide"), "{e}");
    assert!(!e.contains("--allow-crimes"), "{e}");
    assert!(!sized.exists());
}

/// Inputs stored in different float dtypes merge into float32, as PyTorch (so mergekit, with no
/// `dtype` set) promotes them; inputs of one dtype keep it. A bf16 base's values merge as they
/// are (bf16 widens exactly), so the output equals the merge of an f32 copy of it.
#[test]
fn mixed_input_dtypes_merge_in_float32() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixtures();
    let copy_as = |name: &str, dtype: Dtype, to_f32: bool| {
        let ts: Vec<T> = read_model(&fx.join(name))
            .into_iter()
            .map(|(n, (_, shape, v))| {
                let rounded = T::new(&n, dtype, &shape, v);
                let back = common::from_bytes(dtype, &common::to_bytes(dtype, &rounded.values));
                T::new(&n, if to_f32 { Dtype::F32 } else { dtype }, &shape, back)
            })
            .collect();
        let dir = write_model(&tmp.path().join(format!("{name}-{dtype:?}-{to_f32}")), &ts);
        std::fs::copy(fx.join(name).join("config.json"), dir.join("config.json")).unwrap();
        dir
    };
    // The base (the reference, whose dtype the output took before) in bf16, the experts in f32.
    let base_bf16 = copy_as("base", Dtype::BF16, false);
    let base_widened = copy_as("base", Dtype::BF16, true);
    let (e1, e2) = (fx.join("expert-1"), fx.join("expert-2"));
    let yaml = |b: &Path, e1: &Path, e2: &Path| {
        format!(
            "merge_method: ties\nbase_model: {}\nmodels:\n  - model: {}\n    parameters: {{weight: 0.6, density: 0.5}}\n  - model: {}\n    parameters: {{weight: 0.4, density: 0.7}}\n",
            b.display(),
            e1.display(),
            e2.display()
        )
    };
    let mixed = merge_yaml(tmp.path(), "mixed", &yaml(&base_bf16, &e1, &e2));
    let widened = merge_yaml(tmp.path(), "widened", &yaml(&base_widened, &e1, &e2));
    assert!(mixed.values().all(|(d, _, _)| *d == Dtype::F32), "a mixed merge is float32");
    assert_eq!(mixed, widened);
    // All bf16: stays bf16.
    let (b16, e2_16) = (copy_as("base", Dtype::BF16, false), copy_as("expert-2", Dtype::BF16, false));
    let all16 = merge_yaml(tmp.path(), "all16", &yaml(&b16, &copy_as("expert-1", Dtype::BF16, false), &e2_16));
    assert!(all16.values().all(|(d, _, _)| *d == Dtype::BF16));
}

/// A frankenmerge's config.json gets its layers' own `layer_types` (transformers 5 refuses a
/// Qwen2 config whose list is another length than `num_hidden_layers`), each from its source's
/// config at the source's layer; where a source has none, the list is left out for
/// transformers to derive.
#[test]
fn frankenmerges_write_their_layers_own_layer_types() {
    let tmp = tempfile::tempdir().unwrap();
    let with_types = |name: &str, types: Option<[&str; 2]>| {
        let dir = tmp.path().join(name);
        copy_files(&fixtures().join(name), &dir, &["model.safetensors", "config.json"]);
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        if let Some(t) = types {
            cfg["layer_types"] = serde_json::json!(t);
        }
        std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
        dir
    };
    let e1 = with_types("expert-1", Some(["full_attention", "sliding_attention"]));
    let e2 = with_types("expert-2", Some(["sliding_attention", "full_attention"]));
    let yaml = |a: &Path, b: &Path| {
        format!(
            "merge_method: passthrough\nslices:\n  - sources: [{{model: {}, layer_range: [0, 2]}}]\n  - sources: [{{model: {}, layer_range: [0, 2]}}]\n  - sources: [{{model: {}, layer_range: [1, 2]}}]\n",
            a.display(),
            b.display(),
            a.display()
        )
    };
    let config = |name: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join(name).join("config.json")).unwrap()).unwrap()
    };
    merge_yaml(tmp.path(), "typed", &yaml(&e1, &e2));
    let typed = config("typed");
    assert_eq!(typed["num_hidden_layers"], 5);
    let want = ["full_attention", "sliding_attention", "sliding_attention", "full_attention", "sliding_attention"];
    assert_eq!(typed["layer_types"], serde_json::json!(want));
    let e3 = with_types("expert-3", None);
    merge_yaml(tmp.path(), "untyped", &yaml(&e1, &e3));
    let untyped = config("untyped");
    assert_eq!(untyped["num_hidden_layers"], 5);
    assert!(untyped.get("layer_types").is_none(), "{untyped}");
}

/// mergekit's `path@revision` (fuzzing round 7 #7): a local model's revision is ignored, as
/// mergekit ignores it; the path before the `@` must exist, and two `@` are refused as there.
#[test]
fn a_local_models_revision_is_ignored() {
    let tmp = tempfile::tempdir().unwrap();
    let paths = big_family(tmp.path(), 1);
    let plain = yaml_for("task_arithmetic", &paths, "weight: 0.5", "");
    let want = merge_yaml(tmp.path(), "plain", &plain);
    let at =
        plain.replace(&format!("model: {}\n", paths[1].display()), &format!("model: {}@main\n", paths[1].display()));
    assert_ne!(at, plain);
    assert_eq!(merge_yaml(tmp.path(), "at", &at), want);
    let twice =
        plain.replace(&format!("model: {}\n", paths[1].display()), &format!("model: {}@a@b\n", paths[1].display()));
    assert!(config_error(tmp.path(), &twice).contains("is not a local file or directory"));
    let missing = plain.replace(&format!("model: {}\n", paths[1].display()), "model: /nowhere/x@main\n");
    assert!(config_error(tmp.path(), &missing).contains("`/nowhere/x@main` is not a local file or directory"));
}
