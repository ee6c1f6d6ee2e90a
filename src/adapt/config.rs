//! The `symerge adapt` config (YAML). Paths are relative to the config file.
//!
//! ```yaml
//! method: symerge            # or adamerging
//! base_model: ./minilm
//! tasks:
//!   - name: wn-verb
//!     expert: ./experts/wn-verb
//!     inputs: ./data/wn-verb/test.jsonl     # test inputs; labels, if every line has one, only score the result
//!     cache: ./cache/wn-verb.labels         # expert soft labels (symerge; made by cache-labels)
//! adapted_layer: head        # head (default) or last_block (causal LMs: final norm + lm_head)
//! granularity: tensor        # one Lambda per task per tensor (default), or per block
//! epochs: 500                # an epoch = one batch and one step per task, tasks shuffled
//! lr: 0.01                   # Lambda's and the adapted layers' Adam rate (lambda_lr, layer_lr
//!                            # set them apart; a causal LM's layer_lr defaults to 1e-5)
//! ```
//!
//! When `base_model` is a causal LM (Llama, Mistral, Qwen2, GPT-2) the experts are causal LMs too,
//! their caches top-k next-token caches, and only `method: symerge` with `loss: soft` applies
//! ([`super::lm`]).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::lambda::Granularity;
use crate::error::{Error, Result};

/// The adapted layer's learning rate for causal LMs when the config sets neither `layer_lr` nor
/// `lr` (classifier heads use `lr`).
pub const LM_LAYER_LR: f32 = 1e-5;

/// Which adaptation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Lambda jointly with one task-specific layer per task, against the experts' soft labels.
    Symerge,
    /// Lambda only, minimising the merged model's prediction entropy.
    Adamerging,
}

/// SyMerge's objective.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    /// Cross-entropy against the expert's probabilities (the paper's).
    Soft,
    /// Cross-entropy against the expert's argmax, keeping a sample when the expert and the merged
    /// model agree or the expert is at least as confident (the released code's variant).
    HardConf,
}

/// What each task keeps for itself (initialised from its expert and trained).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AdaptedLayer {
    /// The classification head (pooler + classifier).
    Head,
    /// The last encoder block, plus the head every task has of its own anyway.
    LastBlock,
}

/// One task: its expert, its unlabelled inputs and their soft-label cache.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TaskConfig {
    pub name: String,
    pub expert: PathBuf,
    pub inputs: PathBuf,
    pub cache: Option<PathBuf>,
}

/// A validated adaptation config with every default filled in.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AdaptConfig {
    #[serde(skip)]
    pub source: PathBuf,
    pub method: Method,
    pub base_model: PathBuf,
    pub tasks: Vec<TaskConfig>,
    pub adapted_layer: AdaptedLayer,
    pub granularity: Granularity,
    #[serde(serialize_with = "crate::units::f32_as_given")]
    pub lambda_init: f32,
    /// Keep Lambda in [0, 1] after every step.
    pub clamp: bool,
    #[serde(serialize_with = "crate::units::f32_as_given")]
    pub lambda_lr: f32,
    #[serde(serialize_with = "crate::units::f32_as_given")]
    pub layer_lr: f32,
    pub batch_size: usize,
    pub epochs: usize,
    pub loss: LossKind,
    /// Soft loss only: drop samples whose expert confidence (top probability) is below this.
    #[serde(serialize_with = "crate::units::opt_f32_as_given")]
    pub confidence: Option<f32>,
    pub seed: u64,
    pub max_len: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    method: String,
    /// `Option`s so a YAML `null` is caught rather than read as the path "null".
    base_model: Option<String>,
    tasks: Vec<RawTask>,
    adapted_layer: Option<String>,
    granularity: Option<String>,
    lambda_init: Option<f32>,
    clamp: Option<bool>,
    lr: Option<f32>,
    lambda_lr: Option<f32>,
    layer_lr: Option<f32>,
    batch_size: Option<usize>,
    epochs: Option<usize>,
    loss: Option<String>,
    confidence: Option<f32>,
    seed: Option<u64>,
    max_len: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTask {
    name: String,
    expert: Option<String>,
    inputs: Option<String>,
    cache: Option<String>,
}

/// A path a config must give: present, not null, not empty.
fn required_path(field: &str, value: Option<&str>) -> std::result::Result<String, String> {
    match value {
        Some(p) if !p.trim().is_empty() => Ok(p.to_string()),
        Some(_) => Err(format!("{field}: is empty (a path is needed)")),
        None => Err(format!("{field}: is missing or null (a path is needed)")),
    }
}

impl AdaptConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = crate::input_file::read_to_string(path)?;
        Self::parse(&text, path)
    }

    /// Parses and validates `text`, read from `source` (relative paths resolve beside it).
    pub fn parse(text: &str, source: &Path) -> Result<Self> {
        let err = |reason: String| Error::Config { path: source.to_path_buf(), reason };
        let raw: RawConfig = crate::input_file::parse_yaml(text).map_err(err)?;
        let dir = source.parent().unwrap_or(Path::new(""));
        // Absolute, so summary.json's paths hold from any working directory.
        let resolve = |p: &str| {
            let joined = if Path::new(p).is_absolute() { PathBuf::from(p) } else { dir.join(p) };
            std::path::absolute(&joined).unwrap_or(joined)
        };
        let method = match raw.method.as_str() {
            "symerge" => Method::Symerge,
            "adamerging" => Method::Adamerging,
            other => return Err(err(format!("method: unknown `{other}` (supported: symerge, adamerging)"))),
        };
        let tasks = parse_tasks(raw.tasks, method, &resolve).map_err(err)?;
        unused_under_adamerging(method, &raw.loss, raw.confidence, &tasks);
        let adapted_layer = match raw.adapted_layer.as_deref().unwrap_or("head") {
            "head" => AdaptedLayer::Head,
            "last_block" => AdaptedLayer::LastBlock,
            other => return Err(err(format!("adapted_layer: unknown `{other}` (supported: head, last_block)"))),
        };
        let granularity = match raw.granularity.as_deref() {
            None => Granularity::Tensor,
            Some(g) => g.parse().map_err(|e: String| err(format!("granularity: {e}")))?,
        };
        let loss = match raw.loss.as_deref().unwrap_or("soft") {
            "soft" => LossKind::Soft,
            "hard_conf" => LossKind::HardConf,
            other => return Err(err(format!("loss: unknown `{other}` (supported: soft, hard_conf)"))),
        };
        if let Some(v) = raw.lr {
            positive("lr", v).map_err(err)?;
        }
        let lr = raw.lr.unwrap_or(match method {
            Method::Symerge => 1e-2,
            Method::Adamerging => 1e-3,
        });
        // A causal LM's adapted layer holds its vocabulary projection (tens of millions of
        // weights the expert already tuned): a classifier head's rate rewrites it in one Adam step.
        let base_model = resolve(&required_path("base_model", raw.base_model.as_deref()).map_err(err)?);
        let lm = crate::model::lm::is_causal_lm_dir(&base_model).unwrap_or(false);
        let default_layer_lr = if lm && raw.lr.is_none() { LM_LAYER_LR } else { lr };
        let cfg = AdaptConfig {
            source: source.to_path_buf(),
            method,
            base_model,
            tasks,
            adapted_layer,
            granularity,
            lambda_init: raw.lambda_init.unwrap_or(0.3),
            clamp: raw.clamp.unwrap_or(true),
            lambda_lr: raw.lambda_lr.unwrap_or(lr),
            layer_lr: raw.layer_lr.unwrap_or(default_layer_lr),
            batch_size: raw.batch_size.unwrap_or(32),
            epochs: raw.epochs.unwrap_or(500),
            loss,
            confidence: raw.confidence,
            seed: raw.seed.unwrap_or(0),
            max_len: raw.max_len.unwrap_or(crate::model::DEFAULT_MAX_LEN),
        };
        cfg.check().map_err(err)?;
        Ok(cfg)
    }

    /// The numbers a config may not hold, named by field.
    fn check(&self) -> std::result::Result<(), String> {
        positive("lambda_lr", self.lambda_lr)?;
        positive("layer_lr", self.layer_lr)?;
        if self.batch_size == 0 {
            return Err("batch_size: must be at least 1".into());
        }
        if let Some(c) = self.confidence
            && !(0.0..=1.0).contains(&c)
        {
            return Err(format!("confidence: must lie in [0, 1], got {c}"));
        }
        if self.confidence.is_some() && self.loss == LossKind::HardConf && self.method == Method::Symerge {
            return Err("confidence: `loss: hard_conf` keeps the samples where the expert is at least as \
                 confident as the merged model and takes no threshold; use `loss: soft` with it"
                .into());
        }
        let init = self.lambda_init;
        if !init.is_finite() || (self.clamp && !(0.0..=1.0).contains(&init)) {
            let range = if self.clamp { "in [0, 1] (clamp is on)" } else { "a finite number" };
            return Err(format!("lambda_init: must be {range}, got {init}"));
        }
        Ok(())
    }
}

impl AdaptConfig {
    /// Every path the config names exists (a cache only where SyMerge reads it); an error names the config file and the key
    /// (`tasks[1].expert: …`), not only the path.
    pub fn require_inputs(&self) -> Result<()> {
        use crate::input_file::{NamedBy, require};
        let file = self.source.as_path();
        require(&self.base_model, NamedBy::Config { file, key: "base_model" })?;
        for (i, t) in self.tasks.iter().enumerate() {
            let named = [
                ("expert", Some(&t.expert)),
                ("inputs", Some(&t.inputs)),
                ("cache", t.cache.as_ref().filter(|_| self.method == Method::Symerge)),
            ];
            for (field, path) in named {
                let Some(path) = path else { continue };
                require(path, NamedBy::Config { file, key: &format!("tasks[{i}].{field}") })?;
            }
        }
        self.check_experts_are_not_the_base()
    }

    /// An expert that is the base has a task vector of zeros: its Lambda column would learn
    /// nothing, and the run would still report it (an easy slip when copying paths).
    fn check_experts_are_not_the_base(&self) -> Result<()> {
        let same = crate::input_file::same_path;
        match self.tasks.iter().position(|t| same(&t.expert, &self.base_model)) {
            Some(i) => Err(Error::Config {
                path: self.source.clone(),
                reason: format!(
                    "tasks[{i}].expert is base_model itself ({}): its task vector would be zero; name the \
                     model fine-tuned for task `{}`",
                    self.base_model.display(),
                    self.tasks[i].name
                ),
            }),
            None => Ok(()),
        }
    }

    /// Refuses a base and experts of different kinds (a causal LM's base with classifier
    /// experts, the reverse, or two causal-LM families) by name, before a family's loader fails
    /// on something that only follows from the mix-up (a classifier's `confidence` setting, a
    /// `model_type` it does not know). Models without a readable `config.json` are left to the
    /// loaders, which say what is wrong with them.
    pub fn check_model_kinds(&self) -> Result<()> {
        let Some(base) = ModelKindOf::read(&self.base_model) else { return Ok(()) };
        for (i, t) in self.tasks.iter().enumerate() {
            let Some(expert) = ModelKindOf::read(&t.expert) else { continue };
            if expert.lm != base.lm {
                return Err(Error::Config {
                    path: self.source.clone(),
                    reason: format!(
                        "base_model is {} but tasks[{i}].expert is {}: the base and every expert must be the \
                         same kind of model (causal LMs: {}; classifiers: BERT family (bert, roberta, xlm-roberta))",
                        base.what,
                        expert.what,
                        crate::model::LmKind::all()
                    ),
                });
            }
        }
        Ok(())
    }
}

/// What kind of model a checkpoint's `config.json` describes, for [`AdaptConfig::check_model_kinds`].
struct ModelKindOf {
    lm: Option<crate::model::LmKind>,
    /// "a causal LM (llama)", "a BERT-family classifier (bert)"...
    what: String,
}

impl ModelKindOf {
    /// `None` when `path` has no `config.json` or it is not a JSON object.
    fn read(path: &Path) -> Option<Self> {
        let dir = if path.is_dir() { path } else { path.parent()? };
        let config = dir.join("config.json");
        // A FIFO or device is left to the loaders' refusal, never opened here.
        let text = config.is_file().then(|| crate::input_file::read_to_string(&config).ok()).flatten()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        let archs: Vec<&str> = v
            .get("architectures")
            .and_then(|a| a.as_array())
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str())
            .collect();
        let model_type = match v.get("model_type").and_then(|t| t.as_str()) {
            Some(t) if !t.is_empty() => t,
            _ => archs.first().copied().unwrap_or("no model_type"),
        };
        let lm = crate::model::LmKind::of(&v);
        let bert = matches!(model_type, "bert" | "roberta" | "xlm-roberta" | "camembert");
        let classifier = archs.iter().any(|a| a.ends_with("ForSequenceClassification"));
        let what = match (lm, bert, classifier) {
            (Some(_), ..) => format!("a causal LM ({model_type})"),
            (None, true, true) => format!("a BERT-family classifier ({model_type})"),
            (None, true, false) => format!("a BERT-family encoder ({model_type})"),
            (None, false, _) => format!("not a causal LM (model_type {model_type})"),
        };
        Some(ModelKindOf { lm, what })
    }
}

/// AdaMerging minimises entropy: the label cache, the loss and the confidence filter of a
/// SyMerge config (often the same file with another `method`) take no part; said once.
fn unused_under_adamerging(method: Method, loss: &Option<String>, confidence: Option<f32>, tasks: &[TaskConfig]) {
    if method != Method::Adamerging {
        return;
    }
    let mut unused = Vec::new();
    if loss.is_some() {
        unused.push("loss");
    }
    if confidence.is_some() {
        unused.push("confidence");
    }
    if tasks.iter().any(|t| t.cache.is_some()) {
        unused.push("tasks[].cache");
    }
    if !unused.is_empty() {
        tracing::warn!("method adamerging minimises entropy without labels: {} ignored", unused.join(", "));
    }
}

/// A learning rate: finite and above zero.
fn positive(field: &str, v: f32) -> std::result::Result<(), String> {
    if v.is_finite() && v > 0.0 { Ok(()) } else { Err(format!("{field}: must be a positive number, got {v}")) }
}

/// A task's name names its directory under the output's `tasks/`: one plain path component, so
/// no name can place a model outside the output (`..`, `/abs`) or over its other files (`.`,
/// an empty name).
pub fn check_task_name(name: &str) -> std::result::Result<(), String> {
    let bad =
        name.is_empty() || name == "." || name == ".." || name.chars().any(|c| c == '/' || c == '\\' || c.is_control());
    if bad {
        return Err(format!(
            "`{}` is not a plain name (it names a directory under tasks/: no `/`, `\\`, control characters, `.` or `..`, not empty)",
            name.escape_debug()
        ));
    }
    // Task models are staged under `tasks/.NAME.partial-XXXXXX` at the end of the run.
    let max = crate::atomic::STAGED_NAME_MAX;
    if name.len() > max {
        return Err(format!("is {} bytes long; a task name may have at most {max} (it names a directory)", name.len()));
    }
    Ok(())
}

/// The tasks, each named once, with paths resolved; SyMerge needs each task's label cache.
fn parse_tasks(
    raw: Vec<RawTask>,
    method: Method,
    resolve: &dyn Fn(&str) -> PathBuf,
) -> std::result::Result<Vec<TaskConfig>, String> {
    if raw.is_empty() {
        return Err("tasks: at least one task is needed".into());
    }
    let mut tasks: Vec<TaskConfig> = Vec::with_capacity(raw.len());
    for (i, t) in raw.into_iter().enumerate() {
        check_task_name(&t.name).map_err(|e| format!("tasks[{i}].name: {e}"))?;
        if tasks.iter().any(|o| o.name == t.name) {
            return Err(format!("tasks[{i}]: task `{}` appears twice", t.name));
        }
        if method == Method::Symerge && t.cache.is_none() {
            return Err(format!(
                "tasks[{i}] ({}): `cache` is required for symerge (make it with `symerge cache-labels`)",
                t.name
            ));
        }
        let expert = resolve(&required_path(&format!("tasks[{i}].expert"), t.expert.as_deref())?);
        let inputs = resolve(&required_path(&format!("tasks[{i}].inputs"), t.inputs.as_deref())?);
        let cache = match t.cache.as_deref() {
            Some(c) => Some(resolve(&required_path(&format!("tasks[{i}].cache"), Some(c))?)),
            None => None,
        };
        if let Some((model, adapter)) = crate::checkpoint::lora::split_ref(&expert) {
            return Err(format!(
                "tasks[{i}] ({}): expert `{}` is a model+lora reference, which adapt does not apply; write \
                 the adapted expert first: `symerge merge` a config with `merge_method: linear` and the one \
                 model `{}+{}`",
                t.name,
                t.expert.as_deref().unwrap_or_default(),
                model.display(),
                adapter.display()
            ));
        }
        tasks.push(TaskConfig { name: t.name, expert, inputs, cache });
    }
    Ok(tasks)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// summary.json records the config with the values as given: f32 widened to f64 wrote
    /// `"lambda_init": 0.30000001192092896` and `"lr": 0.009999999776482582`.
    #[test]
    fn recorded_rates_are_the_values_given() {
        let cfg = AdaptConfig::parse(
            "method: symerge\nbase_model: b\nlambda_init: 0.3\nlr: 1e-2\nlayer_lr: 3e-4\nconfidence: 0.7\n\
             tasks:\n  - {name: a, expert: e, inputs: i, cache: c}\n",
            Path::new("/cfg/adapt.yml"),
        )
        .unwrap();
        let v = serde_json::to_value(&cfg).unwrap();
        let text = serde_json::to_string(&v).unwrap();
        assert!(text.contains("\"lambda_init\":0.3,") && text.contains("\"lambda_lr\":0.01,"), "{text}");
        assert!(text.contains("\"layer_lr\":0.0003,") && text.contains("\"confidence\":0.7,"), "{text}");
        // Read back as f32, the same values.
        assert_eq!(v["lambda_init"].as_f64().map(|x| x as f32), Some(0.3f32));
    }

    /// Fuzzing round 4: an expert that is the base ran with a zero task vector, without a word.
    #[test]
    fn an_expert_that_is_the_base_is_refused_by_key() {
        let dir = tempfile::tempdir().unwrap();
        for d in ["base", "e1"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        for f in ["a.jsonl", "b.jsonl"] {
            std::fs::write(dir.path().join(f), "").unwrap();
        }
        let cfg = |second: &str| {
            let text = format!(
                "method: adamerging\nbase_model: base\ntasks:\n  - {{name: a, expert: e1, inputs: a.jsonl}}\n  \
                 - {{name: b, expert: {second}, inputs: b.jsonl}}\n"
            );
            AdaptConfig::parse(&text, &dir.path().join("adapt.yml")).unwrap()
        };
        let e = cfg("./base").require_inputs().unwrap_err().to_string();
        assert!(e.contains("tasks[1].expert is base_model itself") && e.contains("task `b`"), "{e}");
        std::fs::create_dir(dir.path().join("e2")).unwrap();
        cfg("e2").require_inputs().unwrap();
    }

    /// A name too long to stage under tasks/ is refused by the config check, not after training.
    #[test]
    fn task_name_longer_than_staging_allows_is_refused() {
        let yaml = |name: &str| {
            format!("method: symerge\nbase_model: b\ntasks:\n  - {{name: {name}, expert: e, inputs: i, cache: c}}\n")
        };
        let max = crate::atomic::STAGED_NAME_MAX;
        assert_eq!(max, 239);
        AdaptConfig::parse(&yaml(&"t".repeat(max)), Path::new("/cfg/adapt.yml")).unwrap();
        let e = AdaptConfig::parse(&yaml(&"t".repeat(max + 1)), Path::new("/cfg/adapt.yml")).unwrap_err().to_string();
        assert!(e.contains("tasks[0].name") && e.contains("240 bytes") && e.contains("at most 239"), "{e}");
    }

    #[test]
    fn defaults_paths_and_errors() {
        let src = Path::new("/cfg/adapt.yml");
        let cfg = AdaptConfig::parse(
            "method: symerge\nbase_model: base\ntasks:\n  - {name: a, expert: e/a, inputs: d/a.jsonl, cache: c/a}\n",
            src,
        )
        .unwrap();
        assert_eq!(cfg.base_model, PathBuf::from("/cfg/base"));
        assert_eq!(cfg.tasks[0].cache.as_deref(), Some(Path::new("/cfg/c/a")));
        assert_eq!((cfg.lambda_init, cfg.lambda_lr, cfg.batch_size, cfg.epochs), (0.3, 1e-2, 32, 500));
        assert_eq!(
            (cfg.granularity, cfg.adapted_layer, cfg.loss),
            (Granularity::Tensor, AdaptedLayer::Head, LossKind::Soft)
        );

        assert_eq!(cfg.layer_lr, 1e-2, "a classifier head's rate is lr");

        // A causal-LM base: the adapted layer's own small default, unless lr or layer_lr is set.
        let lm_base = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_gqa");
        let lm_cfg = |extra: &str| {
            let text = format!(
                "method: symerge\nbase_model: {}\n{extra}tasks:\n  - {{name: a, expert: e, inputs: i, cache: c}}\n",
                lm_base.display()
            );
            AdaptConfig::parse(&text, src).unwrap()
        };
        assert_eq!((lm_cfg("").lambda_lr, lm_cfg("").layer_lr), (1e-2, LM_LAYER_LR));
        assert_eq!(lm_cfg("lr: 0.001\n").layer_lr, 1e-3);
        assert_eq!(lm_cfg("layer_lr: 0.0002\n").layer_lr, 2e-4);

        let ada =
            AdaptConfig::parse("method: adamerging\nbase_model: b\ntasks:\n  - {name: a, expert: e, inputs: i}\n", src)
                .unwrap();
        assert_eq!(ada.lambda_lr, 1e-3);

        for (text, want) in [
            ("method: foo\nbase_model: b\ntasks: [{name: a, expert: e, inputs: i}]", "method: unknown `foo`"),
            ("method: symerge\nbase_model: b\ntasks: [{name: a, expert: e, inputs: i}]", "`cache` is required"),
            ("method: adamerging\nbase_model: b\ntasks: []", "at least one task"),
            ("method: adamerging\nbase_model: b\nepoch: 3\ntasks: [{name: a, expert: e, inputs: i}]", "epoch"),
            ("method: adamerging\nbase_model: b\nlr: -1\ntasks: [{name: a, expert: e, inputs: i}]", "positive"),
            (
                "method: adamerging\nbase_model: b\ntasks: [{name: a, expert: e, inputs: i}, {name: a, expert: e, inputs: i}]",
                "twice",
            ),
            (
                "method: adamerging\nbase_model: b\nlambda_lr: 0\ntasks: [{name: a, expert: e, inputs: i}]",
                "lambda_lr: must",
            ),
            // A task's name is its directory under tasks/: nothing that leaves it or overlaps.
            ("method: adamerging\nbase_model: b\ntasks: [{name: '../../m/x', expert: e, inputs: i}]", "tasks[0].name"),
            ("method: adamerging\nbase_model: b\ntasks: [{name: /tmp/x, expert: e, inputs: i}]", "not a plain name"),
            (
                "method: adamerging\nbase_model: b\ntasks: [{name: a, expert: e, inputs: i}, {name: '.', expert: e, inputs: i}]",
                "tasks[1].name",
            ),
            ("method: adamerging\nbase_model: b\ntasks: [{name: '..', expert: e, inputs: i}]", "not a plain name"),
            ("method: adamerging\nbase_model: b\ntasks: [{name: '', expert: e, inputs: i}]", "not a plain name"),
            ("method: adamerging\nbase_model: b\ntasks: [{name: 'a\\b', expert: e, inputs: i}]", "not a plain name"),
            ("method: adamerging\nbase_model: b\ntasks: [{name: \"a\\nb\", expert: e, inputs: i}]", "not a plain name"),
            // Null or empty paths name their field (null was read as the path "null").
            (
                "method: adamerging\nbase_model: null\ntasks: [{name: a, expert: e, inputs: i}]",
                "base_model: is missing",
            ),
            (
                "method: adamerging\nbase_model: b\ntasks: [{name: a, expert: '', inputs: i}]",
                "tasks[0].expert: is empty",
            ),
            (
                "method: adamerging\nbase_model: b\ntasks: [{name: a, expert: e, inputs: ~}]",
                "tasks[0].inputs: is missing",
            ),
            (
                "method: symerge\nbase_model: b\ntasks: [{name: a, expert: e, inputs: i, cache: ''}]",
                "tasks[0].cache: is empty",
            ),
            // lambda_init is checked where it is given, not blamed on the learning rate later.
            (
                "method: adamerging\nbase_model: b\nlambda_init: .nan\ntasks: [{name: a, expert: e, inputs: i}]",
                "lambda_init",
            ),
            (
                "method: adamerging\nbase_model: b\nlambda_init: -1e30\ntasks: [{name: a, expert: e, inputs: i}]",
                "lambda_init",
            ),
            (
                "method: adamerging\nbase_model: b\nclamp: false\nlambda_init: .inf\ntasks: [{name: a, expert: e, inputs: i}]",
                "lambda_init: must be a finite number",
            ),
            // A confidence threshold with the loss that takes none.
            (
                "method: symerge\nbase_model: b\nloss: hard_conf\nconfidence: 0.5\ntasks: [{name: a, expert: e, inputs: i, cache: c}]",
                "confidence: `loss: hard_conf`",
            ),
        ] {
            let e = AdaptConfig::parse(text, src).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("adapt.yml"), "{text}: {e}");
        }
        // A model+lora expert is refused with the way to make it a model.
        let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let text = format!(
            "method: adamerging\nbase_model: b\ntasks: [{{name: a, expert: {}+{}, inputs: i}}]",
            fx.join("mergekit_lora/base").display(),
            fx.join("mergekit_lora/lora-1").display()
        );
        let e = AdaptConfig::parse(&text, src).unwrap_err().to_string();
        assert!(e.contains("model+lora reference") && e.contains("merge_method: linear"), "{e}");
    }
}
