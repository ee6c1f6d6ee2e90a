//! Every merge method against an independent f64 computation written here, in f32, f16 and
//! bf16, through the whole streaming path (files in, files out).

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{T, randoms, read_model, write_model};
use safetensors::Dtype;
use symerge::merge::config::MergeConfig;
use symerge::merge::executor::{MergeOptions, merge};
use symerge::merge::philox::{ElementStream, name_hash};

/// Tensors of the test model: (name, shape). One crosses the 65536-element chunk size, so
/// chunking, multi-chunk thresholds and per-element random streams are all exercised.
const SHAPES: &[(&str, &[usize])] = &[
    ("embeddings.word_embeddings.weight", &[50, 16]),
    ("encoder.layer.0.attention.self.query.weight", &[16, 16]),
    ("encoder.layer.0.intermediate.dense.weight", &[70_001]),
    ("encoder.layer.1.attention.self.query.weight", &[16, 16]),
    ("encoder.layer.1.output.LayerNorm.bias", &[16]),
    ("pooler.dense.weight", &[16, 16]),
];
const POSITION_IDS: &str = "embeddings.position_ids";

fn make_family(dir: &Path, dtype: Dtype, experts: usize) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for m in 0..=experts {
        let mut tensors: Vec<T> = SHAPES
            .iter()
            .enumerate()
            .map(|(ti, (name, shape))| {
                let n: usize = shape.iter().product();
                let base = randoms(1000 + ti as u64, n, 0.5);
                let values = if m == 0 {
                    base
                } else {
                    let delta = randoms(m as u64 * 7919 + ti as u64, n, 0.05);
                    base.iter().zip(&delta).map(|(b, d)| b + d).collect()
                };
                T::new(name, dtype, shape, values)
            })
            .collect();
        tensors.push(T::new(POSITION_IDS, Dtype::I64, &[1, 10], (0..10).map(|i| i as f64).collect()));
        let name = if m == 0 { "base".to_string() } else { format!("expert-{m}") };
        out.push(write_model(&dir.join(name), &tensors));
    }
    out
}

struct Spec<'a> {
    method: &'a str,
    weights: &'a [f64],
    densities: &'a [f64],
    lambda: f64,
    normalize: Option<bool>,
    seed: u64,
}

fn config_yaml(spec: &Spec<'_>, paths: &[std::path::PathBuf], out_dtype: Option<&str>) -> String {
    let mut y = format!("merge_method: {}\nbase_model: {}\nmodels:\n", spec.method, paths[0].display());
    let uses_density = spec.method != "task_arithmetic";
    for (k, p) in paths[1..].iter().enumerate() {
        y += &format!("  - model: {}\n    parameters:\n      weight: {}\n", p.display(), spec.weights[k]);
        if uses_density {
            y += &format!("      density: {}\n", spec.densities[k]);
        }
    }
    let mut params = vec![format!("lambda: {}", spec.lambda)];
    if let Some(n) = spec.normalize {
        params.push(format!("normalize: {n}"));
    }
    if spec.method.starts_with("dare") {
        params.push(format!("seed: {}", spec.seed));
    }
    if !params.is_empty() {
        y += &format!("parameters: {{{}}}\n", params.join(", "));
    }
    if let Some(d) = out_dtype {
        // `out_dtype` converts the output only; `dtype` would also round the inputs (mergekit).
        y += &format!("out_dtype: {d}\n");
    }
    y
}

/// Candidate outputs per element: the value, and the other one when the TIES sign election is
/// within rounding of a tie (f32 and f64 may then legitimately elect different signs).
fn reference(spec: &Spec<'_>, name: &str, base: &[f64], experts: &[Vec<f64>]) -> Vec<(f64, Option<f64>, f64)> {
    let n = base.len();
    let kk = experts.len();
    if spec.method == "linear" {
        let wsum: f64 = spec.weights.iter().sum();
        let norm = spec.normalize.unwrap_or(true);
        return (0..n)
            .map(|i| {
                let s: f64 = (0..kk).map(|k| spec.weights[k] * experts[k][i]).sum();
                let mag: f64 = (0..kk).map(|k| (spec.weights[k] * experts[k][i]).abs()).sum();
                (if norm { s / wsum } else { s }, None, mag)
            })
            .collect();
    }
    // Sparsified, weighted task vectors.
    let mut d = vec![vec![0f64; n]; kk];
    for k in 0..kk {
        let w = spec.weights[k];
        let dens = spec.densities[k];
        match spec.method {
            "task_arithmetic" => (0..n).for_each(|i| d[k][i] = w * (experts[k][i] - base[i])),
            "ties" => {
                // Selection is defined on the f32 task vector, as computed in f32 by any backend.
                let tau32: Vec<f32> = (0..n).map(|i| experts[k][i] as f32 - base[i] as f32).collect();
                let keep = ((dens * n as f64).floor() as usize).min(n);
                let mut idx: Vec<usize> = (0..n).collect();
                idx.sort_by(|&a, &b| tau32[b].abs().total_cmp(&tau32[a].abs()).then(a.cmp(&b)));
                for &i in &idx[..if dens >= 1.0 { n } else { keep }] {
                    d[k][i] = w * (experts[k][i] - base[i]);
                }
            }
            _ => {
                let mut u = vec![0f32; n];
                ElementStream::new(spec.seed, name_hash(name), k as u32).fill_uniform(0, &mut u);
                let scale = if dens < 1.0 { w / dens } else { w };
                for i in 0..n {
                    if dens >= 1.0 || u[i] < dens as f32 {
                        d[k][i] = scale * (experts[k][i] - base[i]);
                    }
                }
            }
        }
    }
    let consensus = spec.method == "ties" || spec.method == "dare_ties";
    let normalize = spec.normalize.unwrap_or(spec.method == "ties");
    let finish = |mixed: f64, div: f64, b: f64| b + spec.lambda * if normalize { mixed / div } else { mixed };
    (0..n)
        .map(|i| {
            let mag = base[i].abs() + spec.lambda.abs() * (0..kk).map(|k| d[k][i].abs()).sum::<f64>();
            if !consensus {
                let mixed: f64 = (0..kk).map(|k| d[k][i]).sum();
                let wsum: f64 = spec.weights.iter().sum();
                return (finish(mixed, if wsum.abs() < 1e-8 { 1.0 } else { wsum }, base[i]), None, mag);
            }
            let with_sign = |positive: bool| {
                let (mut mixed, mut div) = (0.0, 0.0);
                for (dk, wk) in d.iter().zip(spec.weights.iter()) {
                    if (positive && dk[i] > 0.0) || (!positive && dk[i] < 0.0) {
                        mixed += dk[i];
                        div += wk;
                    }
                }
                finish(mixed, if div == 0.0 { 1.0 } else { div }, base[i])
            };
            let s: f64 = (0..kk).map(|k| d[k][i]).sum();
            let abs_sum: f64 = (0..kk).map(|k| d[k][i].abs()).sum();
            let main = with_sign(s >= 0.0);
            let alt = (abs_sum > 0.0 && s.abs() <= 1e-5 * abs_sum).then(|| with_sign(s < 0.0));
            (main, alt, mag)
        })
        .collect()
}

fn epsilon(dtype: Dtype) -> f64 {
    match dtype {
        Dtype::F32 => 2f64.powi(-24),
        Dtype::F16 => 2f64.powi(-11),
        Dtype::BF16 => 2f64.powi(-8),
        _ => 0.0,
    }
}

fn run_and_check(spec: &Spec<'_>, in_dtype: Dtype, out_dtype: Option<(&str, Dtype)>) {
    let tmp = tempfile::tempdir().unwrap();
    let paths = make_family(tmp.path(), in_dtype, spec.weights.len());
    let cfg_path = tmp.path().join("merge.yml");
    let yaml = config_yaml(spec, &paths, out_dtype.map(|o| o.0));
    std::fs::write(&cfg_path, &yaml).unwrap();
    let config = MergeConfig::load(&cfg_path).unwrap();
    let out = tmp.path().join("out");
    merge(
        &config,
        &MergeOptions {
            max_shard_bytes: 5_000_000_000,
            force: false,
            progress: false,
            ..MergeOptions::new(out.clone())
        },
    )
    .unwrap();

    let inputs: Vec<BTreeMap<_, _>> = paths.iter().map(|p| read_model(p)).collect();
    let merged = read_model(&out);
    let out_dt = out_dtype.map_or(in_dtype, |o| o.1);
    assert_eq!(merged.len(), SHAPES.len() + 1);
    assert_eq!(merged[POSITION_IDS].2, inputs[0][POSITION_IDS].2, "integer buffers are copied");
    assert_eq!(merged[POSITION_IDS].0, Dtype::I64);
    let (mut ambiguous, mut total) = (0usize, 0usize);
    for (name, shape) in SHAPES {
        let (dt, got_shape, got) = &merged[*name];
        assert_eq!(*dt, out_dt, "{name}");
        assert_eq!(got_shape.as_slice(), *shape, "{name}");
        let base = &inputs[0][*name].2;
        let experts: Vec<Vec<f64>> = inputs[1..].iter().map(|m| m[*name].2.clone()).collect();
        let refs = reference(spec, name, base, &experts);
        let eps = epsilon(out_dt);
        for (i, (&o, &(r, alt, mag))) in got.iter().zip(&refs).enumerate() {
            let tol = |r: f64| eps * r.abs() * 1.01 + 2e-6 * mag + 1e-7;
            let ok = (o - r).abs() <= tol(r) || alt.is_some_and(|a| (o - a).abs() <= tol(a));
            assert!(
                ok,
                "{} {:?}->{:?} {name}[{i}]: got {o}, want {r} (alt {alt:?}), tol {}",
                spec.method,
                in_dtype,
                out_dt,
                tol(r)
            );
            ambiguous += alt.is_some() as usize;
            total += 1;
        }
    }
    // The reference accepts either sign only where the election is within rounding of a tie;
    // that must stay rare or the check would be toothless.
    assert!(ambiguous * 100 <= total, "too many sign ties: {ambiguous} of {total}");
}

const DTYPES: [Dtype; 3] = [Dtype::F32, Dtype::F16, Dtype::BF16];

#[test]
fn linear_matches_reference() {
    for dt in DTYPES {
        // linear averages the listed models; the test lists experts 1..3 and no base_model
        // (which mergekit would merge as one more model).
        let spec =
            Spec { method: "linear", weights: &[0.5, 0.3, 0.2], densities: &[], lambda: 1.0, normalize: None, seed: 0 };
        run_linear(&spec, dt);
    }
}

fn run_linear(spec: &Spec<'_>, dt: Dtype) {
    let tmp = tempfile::tempdir().unwrap();
    let paths = make_family(tmp.path(), dt, 3);
    let mut y = "merge_method: linear\nmodels:\n".to_string();
    for (k, p) in paths[1..].iter().enumerate() {
        y += &format!("  - model: {}\n    parameters: {{weight: {}}}\n", p.display(), spec.weights[k]);
    }
    let cfg_path = tmp.path().join("m.yml");
    std::fs::write(&cfg_path, y).unwrap();
    let out = tmp.path().join("out");
    let config = MergeConfig::load(&cfg_path).unwrap();
    merge(
        &config,
        &MergeOptions { max_shard_bytes: u64::MAX, force: false, progress: false, ..MergeOptions::new(out.clone()) },
    )
    .unwrap();
    let inputs: Vec<BTreeMap<_, _>> = paths.iter().map(|p| read_model(p)).collect();
    let merged = read_model(&out);
    for (name, _) in SHAPES {
        let experts: Vec<Vec<f64>> = inputs[1..].iter().map(|m| m[*name].2.clone()).collect();
        let refs = reference(spec, name, &inputs[0][*name].2, &experts);
        let eps = epsilon(dt);
        for (i, (&o, &(r, _, mag))) in merged[*name].2.iter().zip(&refs).enumerate() {
            assert!((o - r).abs() <= eps * r.abs() * 1.01 + 2e-6 * mag + 1e-7, "linear {dt:?} {name}[{i}]: {o} vs {r}");
        }
    }
}

#[test]
fn task_arithmetic_matches_reference() {
    for dt in DTYPES {
        let spec = Spec {
            method: "task_arithmetic",
            weights: &[1.0, 0.5, -0.25],
            densities: &[1.0; 3],
            lambda: 0.7,
            normalize: None,
            seed: 0,
        };
        run_and_check(&spec, dt, None);
    }
    let spec = Spec {
        method: "task_arithmetic",
        weights: &[0.2, 0.6, 0.4],
        densities: &[1.0; 3],
        lambda: 1.3,
        normalize: Some(true),
        seed: 0,
    };
    run_and_check(&spec, Dtype::F32, None);
}

#[test]
fn ties_matches_reference() {
    for dt in DTYPES {
        let spec = Spec {
            method: "ties",
            weights: &[1.0, 0.7, 0.4],
            densities: &[0.5, 0.2, 0.9],
            lambda: 1.0,
            normalize: None,
            seed: 0,
        };
        run_and_check(&spec, dt, None);
    }
    let spec = Spec {
        method: "ties",
        weights: &[1.0, 1.0, 1.0],
        densities: &[0.3, 0.3, 0.3],
        lambda: 0.8,
        normalize: Some(false),
        seed: 0,
    };
    run_and_check(&spec, Dtype::BF16, None);
}

#[test]
fn dare_linear_matches_reference() {
    for dt in DTYPES {
        let spec = Spec {
            method: "dare_linear",
            weights: &[0.5, 0.5, 1.0],
            densities: &[0.3, 0.6, 1.0],
            lambda: 1.0,
            normalize: None,
            seed: 42,
        };
        run_and_check(&spec, dt, None);
    }
}

#[test]
fn dare_ties_matches_reference() {
    for dt in DTYPES {
        let spec = Spec {
            method: "dare_ties",
            weights: &[1.0, 0.8, 0.6],
            densities: &[0.5, 0.5, 0.25],
            lambda: 0.9,
            normalize: None,
            seed: 7,
        };
        run_and_check(&spec, dt, None);
    }
}

#[test]
fn output_dtype_conversion_from_mixed_inputs() {
    let spec =
        Spec { method: "ties", weights: &[1.0, 0.5], densities: &[0.6, 0.6], lambda: 1.0, normalize: None, seed: 0 };
    run_and_check(&spec, Dtype::BF16, Some(("float16", Dtype::F16)));
    run_and_check(&spec, Dtype::F16, Some(("float32", Dtype::F32)));
    let spec = Spec {
        method: "task_arithmetic",
        weights: &[1.0, 0.5],
        densities: &[1.0; 2],
        lambda: 1.0,
        normalize: None,
        seed: 0,
    };
    run_and_check(&spec, Dtype::F32, Some(("bfloat16", Dtype::BF16)));
}

/// The same seed gives the same bytes; another seed gives other masks; the kept fraction is
/// the density.
#[test]
fn dare_is_reproducible_per_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let paths = make_family(tmp.path(), Dtype::F32, 1);
    let run_seed = |seed: u64, out: &str| {
        let y = format!(
            "merge_method: dare_linear\nbase_model: {}\nmodels:\n  - model: {}\n    parameters: {{weight: 1.0, density: 0.3}}\nparameters: {{seed: {seed}}}\n",
            paths[0].display(),
            paths[1].display()
        );
        let cfg = tmp.path().join(format!("{out}.yml"));
        std::fs::write(&cfg, y).unwrap();
        let o = tmp.path().join(out);
        merge(
            &MergeConfig::load(&cfg).unwrap(),
            &MergeOptions { max_shard_bytes: u64::MAX, force: false, progress: false, ..MergeOptions::new(o.clone()) },
        )
        .unwrap();
        std::fs::read(o.join("model.safetensors")).unwrap()
    };
    let a = run_seed(1, "a");
    let b = run_seed(1, "b");
    let c = run_seed(2, "c");
    assert_eq!(a, b, "same seed, same bytes");
    assert_ne!(a, c, "different seed, different masks");
    let merged = read_model(&tmp.path().join("a"));
    let base = read_model(&paths[0]);
    let name = "encoder.layer.0.intermediate.dense.weight";
    let changed = merged[name].2.iter().zip(&base[name].2).filter(|(m, b)| m != b).count();
    let frac = changed as f64 / merged[name].2.len() as f64;
    assert!((frac - 0.3).abs() < 0.01, "kept fraction {frac}");
}

/// Gradient and filtered weights resolve per block and per tensor, as in mergekit.
#[test]
fn per_layer_and_filtered_parameters() {
    let tmp = tempfile::tempdir().unwrap();
    let paths = make_family(tmp.path(), Dtype::F32, 1);
    let y = format!(
        "merge_method: task_arithmetic\nbase_model: {}\nmodels:\n  - model: {}\n    parameters:\n      weight:\n        - {{filter: LayerNorm, value: 0.5}}\n        - {{value: [0.0, 1.0]}}\n",
        paths[0].display(),
        paths[1].display()
    );
    let cfg = tmp.path().join("g.yml");
    std::fs::write(&cfg, y).unwrap();
    let out = tmp.path().join("out");
    merge(
        &MergeConfig::load(&cfg).unwrap(),
        &MergeOptions { max_shard_bytes: u64::MAX, force: false, progress: false, ..MergeOptions::new(out.clone()) },
    )
    .unwrap();
    let (m, b, e) = (read_model(&out), read_model(&paths[0]), read_model(&paths[1]));
    // mergekit's placement: layer i of n at i / (n - 1); embeddings and pooler at 0.
    let expect = [
        ("embeddings.word_embeddings.weight", 0.0),
        ("encoder.layer.0.attention.self.query.weight", 0.0),
        ("encoder.layer.1.attention.self.query.weight", 1.0),
        ("encoder.layer.1.output.LayerNorm.bias", 0.5),
        ("pooler.dense.weight", 0.0),
    ];
    for (name, w) in expect {
        for i in 0..m[name].2.len() {
            let want = b[name].2[i] + w * (e[name].2[i] - b[name].2[i]);
            assert!((m[name].2[i] - want).abs() < 1e-6, "{name}[{i}] weight {w}");
        }
    }
}

/// A Lambda table (what `adapt` learns) sets per-tensor and per-block coefficients.
#[test]
fn lambda_table_overrides_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let paths = make_family(tmp.path(), Dtype::F32, 2);
    let table = serde_json::json!({
        "models": ["a", "b"],
        "lambda": {
            "encoder.layer.0.attention.self.query.weight": [0.1, 0.9],
            "encoder.layer.1": [0.4, 0.0],
        }
    });
    std::fs::write(tmp.path().join("lambda.json"), table.to_string()).unwrap();
    let y = format!(
        "merge_method: task_arithmetic\nbase_model: {}\nmodels:\n  - model: {}\n    parameters: {{weight: 0.3}}\n  - model: {}\n    parameters: {{weight: 0.3}}\nparameters: {{lambda_table: lambda.json}}\n",
        paths[0].display(),
        paths[1].display(),
        paths[2].display()
    );
    let cfg = tmp.path().join("t.yml");
    std::fs::write(&cfg, y).unwrap();
    let out = tmp.path().join("out");
    merge(
        &MergeConfig::load(&cfg).unwrap(),
        &MergeOptions { max_shard_bytes: u64::MAX, force: false, progress: false, ..MergeOptions::new(out.clone()) },
    )
    .unwrap();
    let m = read_model(&out);
    let ins: Vec<_> = paths.iter().map(|p| read_model(p)).collect();
    let cases = [
        ("encoder.layer.0.attention.self.query.weight", [0.1, 0.9]),
        ("encoder.layer.1.attention.self.query.weight", [0.4, 0.0]),
        ("encoder.layer.1.output.LayerNorm.bias", [0.4, 0.0]),
        ("pooler.dense.weight", [0.3, 0.3]),
    ];
    for (name, l) in cases {
        for i in 0..m[name].2.len() {
            let b = ins[0][name].2[i];
            let want = b + l[0] * (ins[1][name].2[i] - b) + l[1] * (ins[2][name].2[i] - b);
            assert!((m[name].2[i] - want).abs() < 1e-6, "{name}[{i}]");
        }
    }

    // A table entry naming nothing in the model is an error, not a silent fallback.
    std::fs::write(tmp.path().join("lambda.json"), r#"{"lambda": {"encoder.layer.9": [1, 1]}}"#).unwrap();
    let err = merge(
        &MergeConfig::load(&cfg).unwrap(),
        &MergeOptions {
            max_shard_bytes: u64::MAX,
            force: false,
            progress: false,
            ..MergeOptions::new(tmp.path().join("o2"))
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("encoder.layer.9"), "{err}");
    assert!(!tmp.path().join("o2").exists());

    // Fuzzing round 6: an emptied table merged every tensor at weight 1, lambda 1 in silence.
    // It is refused; a table that leaves some tensors out says which, and what they get.
    std::fs::write(tmp.path().join("lambda.json"), r#"{"lambda": {}}"#).unwrap();
    let (ok, _, err) = common::run(&["merge", cfg.to_str().unwrap(), "-o", tmp.path().join("o3").to_str().unwrap()]);
    assert!(!ok && err.contains("holds no coefficients for any of the"), "{err}");
    std::fs::write(tmp.path().join("lambda.json"), table.to_string()).unwrap();
    let (ok, _, err) = common::run(&["merge", cfg.to_str().unwrap(), "-o", tmp.path().join("o4").to_str().unwrap()]);
    assert!(ok, "{err}");
    let warning = err.lines().find(|l| l.contains("have no entry in")).unwrap_or_else(|| panic!("no warning: {err}"));
    assert!(warning.contains("embeddings.") && warning.contains("config's `weight` and `lambda`"), "{warning}");
}

/// As in mergekit, a base_model that `models` leaves out is averaged as one more model, at the
/// top-level weight (required, as for every model); it names the output's tensors, so the
/// experts' heads it lacks (of different shapes here) are left out.
#[test]
fn linear_averages_a_base_as_one_more_model_and_leaves_out_heads_it_lacks() {
    let tmp = tempfile::tempdir().unwrap();
    let w = |v: [f64; 4]| T::new("encoder.w", Dtype::F32, &[4], v.to_vec());
    let base = write_model(&tmp.path().join("base"), &[w([1.0, 1.0, 1.0, 1.0])]);
    let a = write_model(
        &tmp.path().join("a"),
        &[w([2.0, 4.0, 6.0, 8.0]), T::new("classifier.weight", Dtype::F32, &[2, 4], vec![0.5; 8])],
    );
    let b = write_model(
        &tmp.path().join("b"),
        &[w([4.0, 0.0, 2.0, 0.0]), T::new("classifier.weight", Dtype::F32, &[3, 4], vec![0.5; 12])],
    );
    let cfg = |base_line: &str| {
        format!(
            "merge_method: linear\n{base_line}models:\n  - model: {}\n    parameters: {{weight: 3}}\n  - model: {}\n    parameters: {{weight: 1}}\n",
            a.display(),
            b.display()
        )
    };
    let with_base = format!("base_model: {}\nparameters: {{weight: 4}}\n", base.display());
    let path = tmp.path().join("m.yml");
    std::fs::write(&path, cfg(&with_base)).unwrap();
    let opts = |out: &str| MergeOptions {
        max_shard_bytes: u64::MAX,
        force: false,
        progress: false,
        ..MergeOptions::new(tmp.path().join(out))
    };
    merge(&MergeConfig::load(&path).unwrap(), &opts("with-base")).unwrap();
    let merged = read_model(&tmp.path().join("with-base"));
    assert_eq!(merged.keys().collect::<Vec<_>>(), ["encoder.w"], "heads of different shapes are left out");
    assert_eq!(merged["encoder.w"].2, vec![1.75, 2.0, 3.0, 3.5], "(3a + b + 4 base) / 8");

    // The base without a weight: refused, as mergekit refuses it.
    std::fs::write(&path, cfg(&format!("base_model: {}\n", base.display()))).unwrap();
    let err = MergeConfig::load(&path).unwrap_err().to_string();
    assert!(err.contains("needs `weight`") && err.contains("the base_model counts"), "{err}");

    std::fs::write(&path, cfg("")).unwrap();
    let err = merge(&MergeConfig::load(&path).unwrap(), &opts("no-base")).unwrap_err().to_string();
    assert!(err.contains("classifier.weight") && err.contains("shape"), "{err}");
}

#[test]
fn experts_without_integer_buffers_merge_with_the_base_ones() {
    // Recent `transformers` no longer saves BERT's `embeddings.position_ids`; the base has it.
    let tmp = tempfile::tempdir().unwrap();
    let ids = || T::new(POSITION_IDS, Dtype::I64, &[1, 4], vec![0.0, 1.0, 2.0, 3.0]);
    let base = write_model(&tmp.path().join("base"), &[T::new("w", Dtype::F32, &[2], vec![1.0, 2.0]), ids()]);
    let expert = write_model(&tmp.path().join("e"), &[T::new("bert.w", Dtype::F32, &[2], vec![3.0, 2.0])]);
    let path = tmp.path().join("m.yml");
    std::fs::write(
        &path,
        format!(
            "merge_method: task_arithmetic\nbase_model: {}\nmodels:\n  - model: {}\nparameters: {{lambda: 0.5, weight: 1.0}}\n",
            base.display(),
            expert.display()
        ),
    )
    .unwrap();
    let out = tmp.path().join("out");
    let opts = MergeOptions { max_shard_bytes: u64::MAX, progress: false, ..MergeOptions::new(out.clone()) };
    merge(&MergeConfig::load(&path).unwrap(), &opts).unwrap();
    let merged = read_model(&out);
    assert_eq!(merged["w"].2, vec![2.0, 2.0]);
    assert_eq!(merged[POSITION_IDS].2, vec![0.0, 1.0, 2.0, 3.0]);
}

/// Fuzzing round 5: float64 and FP8 weights are not buffers: they were copied from the base
/// (or the first model) like position ids, so the "merge" was an input, with exit code 0. They
/// are refused naming the file, the tensor and the dtype, and nothing is written.
#[test]
fn weights_in_a_float_dtype_symerge_cannot_compute_with_are_refused() {
    for dtype in [Dtype::F64, Dtype::F8_E4M3] {
        let tmp = tempfile::tempdir().unwrap();
        let ids = || T::new(POSITION_IDS, Dtype::I64, &[1, 4], vec![0.0, 1.0, 2.0, 3.0]);
        let base = write_model(&tmp.path().join("base"), &[T::new("w", dtype, &[2], vec![1.0, 2.0]), ids()]);
        let expert = write_model(&tmp.path().join("e"), &[T::new("w", dtype, &[2], vec![3.0, 2.0]), ids()]);
        let path = tmp.path().join("m.yml");
        let yaml = format!(
            "merge_method: task_arithmetic\nbase_model: {}\nmodels:\n  - model: {}\nparameters: {{weight: 1.0}}\n",
            base.display(),
            expert.display()
        );
        std::fs::write(&path, yaml).unwrap();
        let out = tmp.path().join("out");
        let opts = MergeOptions { max_shard_bytes: u64::MAX, progress: false, ..MergeOptions::new(out.clone()) };
        let e = merge(&MergeConfig::load(&path).unwrap(), &opts).unwrap_err().to_string();
        let want = format!("unsupported dtype {dtype:?} for tensor `w`");
        assert!(e.contains(&want) && e.contains("base"), "{dtype:?}: {e}");
        assert!(!out.exists(), "{dtype:?}: an output was written");
    }
}

/// Passthrough without a scale copies each tensor's stored bytes (bf16, f16, f32 alike); with
/// a scale, or another output dtype, it computes as every other method does.
#[test]
fn passthrough_copies_stored_bytes_and_computes_otherwise() {
    for dtype in [Dtype::BF16, Dtype::F16, Dtype::F32] {
        let tmp = tempfile::tempdir().unwrap();
        let paths = make_family(tmp.path(), dtype, 1);
        let run = |name: &str, extra: &str| {
            let yaml = format!("merge_method: passthrough\nmodels:\n  - model: {}\n{extra}", paths[1].display());
            let cfg = tmp.path().join(format!("{name}.yml"));
            std::fs::write(&cfg, yaml).unwrap();
            let out = tmp.path().join(name);
            let opts = MergeOptions {
                max_shard_bytes: 5_000_000_000,
                force: false,
                progress: false,
                ..MergeOptions::new(out.clone())
            };
            merge(&MergeConfig::load(&cfg).unwrap(), &opts).unwrap();
            out
        };
        let bytes_of = |dir: &Path| {
            let data = std::fs::read(dir.join("model.safetensors")).unwrap();
            let st = safetensors::SafeTensors::deserialize(&data).unwrap();
            let mut m: BTreeMap<String, Vec<u8>> =
                st.tensors().into_iter().map(|(n, v)| (n, v.data().to_vec())).collect();
            m.remove(POSITION_IDS);
            m
        };
        let expert = bytes_of(&paths[1]);
        assert_eq!(bytes_of(&run("plain", "")), expert, "{dtype:?}: the stored bytes");

        let values = read_model(&paths[1]);
        let scaled = read_model(&run("scaled", "    parameters: {scale: 2.0}\n"));
        let wide = read_model(&run("wide", "out_dtype: float32\n"));
        for (name, _) in SHAPES {
            let x = &values[*name].2;
            let twice: Vec<f64> = x.iter().map(|v| 2.0 * v).collect();
            assert_eq!(scaled[*name].2, twice, "{dtype:?} {name}: times a power of two is exact");
            assert_eq!(wide[*name].0, Dtype::F32);
            assert_eq!(&wide[*name].2, x, "{dtype:?} {name}: widening is exact");
        }
    }
}

/// Parameters symerge takes that mergekit 0.1.5 does not: the seed of its Philox masks and the
/// Lambda table `symerge adapt` learns.
const SYMERGE_ONLY: &[(&str, &str)] = &[
    ("dare_linear", "seed"),
    ("dare_ties", "seed"),
    ("della", "seed"),
    ("della_linear", "seed"),
    ("task_arithmetic", "lambda_table"),
];

/// The registry (as `symerge methods --json` gives it) against mergekit 0.1.5's own parameter
/// definitions (`tests/fixtures/mergekit_params.json`, dumped by
/// `tests/reference/dump_mergekit_params.py`): the same methods, and for each the same
/// parameters with the same scope, the same required ones and the same defaults, so a config
/// mergekit refuses (a linear model without `weight`) is refused here and one it completes with
/// a default is completed with the same value.
#[test]
fn registry_matches_mergekit_parameter_definitions() {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mergekit_params.json"))
            .unwrap();
    let table: serde_json::Value = serde_json::from_str(&text).unwrap();
    let theirs = table["methods"].as_object().unwrap();
    let (ok, stdout, err) = common::run(&["methods", "--json"]);
    assert!(ok, "{err}");
    let catalog: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let ours = catalog["methods"].as_array().unwrap();
    let mut our_names: Vec<&str> = ours.iter().map(|m| m["name"].as_str().unwrap()).collect();
    let mut their_names: Vec<&str> = theirs.keys().map(String::as_str).collect();
    our_names.sort_unstable();
    their_names.sort_unstable();
    assert_eq!(our_names, their_names, "methods");
    let mut diffs = Vec::new();
    for m in ours {
        let name = m["name"].as_str().unwrap();
        let (our_params, their_params) = (m["parameters"].as_array().unwrap(), theirs[name].as_object().unwrap());
        for p in our_params {
            let param = p["name"].as_str().unwrap();
            let Some(t) = their_params.get(param) else {
                if !SYMERGE_ONLY.contains(&(name, param)) {
                    diffs.push(format!("{name}.{param}: mergekit has no such parameter"));
                }
                continue;
            };
            let ours = (p["scope"].clone(), p["required"].as_bool().unwrap(), default_of(p.get("default")));
            let want = (t["scope"].clone(), t["required"].as_bool().unwrap(), default_of(t.get("default")));
            if ours != want {
                diffs.push(format!("{name}.{param}: ours {ours:?}, mergekit {want:?}"));
            }
        }
        for param in their_params.keys() {
            if !our_params.iter().any(|p| p["name"] == param.as_str()) {
                diffs.push(format!("{name}.{param}: symerge lacks it"));
            }
        }
    }
    assert!(diffs.is_empty(), "registry differs from mergekit 0.1.5:\n{}", diffs.join("\n"));
}

/// A default as a comparable value: numbers as f64 (`10` and `10.0` are one default), `null`
/// and absent alike (an optional parameter without a value).
fn default_of(v: Option<&serde_json::Value>) -> Option<String> {
    match v {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::Number(n)) => Some(format!("{:?}", n.as_f64().unwrap())),
        Some(other) => Some(other.to_string()),
    }
}
