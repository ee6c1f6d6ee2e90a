//! The merge config: YAML in mergekit's format for the methods both tools support, so a mergekit
//! user's config runs unchanged (paths are local directories; nothing is downloaded).
//!
//! ```yaml
//! merge_method: ties
//! base_model: ./base
//! models:
//!   - model: ./expert-a
//!     parameters: {weight: 1.0, density: 0.5}
//!   - model: ./expert-b
//!     parameters: {weight: [0.2, 0.8], density: 0.5}   # gradient over layers
//! parameters: {normalize: true, lambda: 1.0}
//! dtype: bfloat16
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::gta::Gta;
use super::params::ParamValue;
use super::{MergeMethod, MethodInfo, TensorParams};
use super::{dare, linear, method_info, method_names, task_arithmetic, ties};
use crate::checkpoint::FloatDType;
use crate::error::{Error, Result};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    merge_method: String,
    #[serde(default)]
    base_model: Option<String>,
    #[serde(default)]
    models: Vec<RawModel>,
    #[serde(default)]
    parameters: BTreeMap<String, ParamValue>,
    #[serde(default)]
    dtype: Option<String>,
    #[serde(default)]
    out_dtype: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    model: String,
    #[serde(default)]
    parameters: BTreeMap<String, ParamValue>,
}

/// One input model and its parameters.
#[derive(Debug, Clone)]
pub struct ModelEntry {
    pub path: PathBuf,
    pub parameters: BTreeMap<String, ParamValue>,
}

/// A validated merge config.
#[derive(Debug, Clone)]
pub struct MergeConfig {
    /// The file it came from (for error messages).
    pub source: PathBuf,
    pub method: &'static MethodInfo,
    pub base_model: Option<PathBuf>,
    /// The models merged: experts for task-vector methods (the base is never among them),
    /// every averaged model for `linear`.
    pub models: Vec<ModelEntry>,
    pub parameters: BTreeMap<String, ParamValue>,
    /// Output dtype (`out_dtype`, else `dtype`); `None` keeps each tensor's own dtype.
    pub out_dtype: Option<FloatDType>,
    pub lambda_table: Option<LambdaTable>,
}

/// Per-tensor (or per-block) merge coefficients, one per expert, e.g. the Lambda learned by
/// `symerge adapt`. JSON: `{"lambda": {"<tensor or block name>": [l_1, ..., l_K]}}`, with an
/// optional `"models": [...]` naming the experts in order. Entries replace `weight * lambda`
/// for their tensors; tensors without an entry use the config's weights.
#[derive(Debug, Clone, Deserialize)]
pub struct LambdaTable {
    #[serde(default)]
    pub models: Option<Vec<String>>,
    pub lambda: HashMap<String, Vec<f64>>,
    #[serde(skip)]
    pub path: PathBuf,
}

impl LambdaTable {
    pub fn load(path: &Path) -> Result<Self> {
        let text = crate::input_file::read_to_string(path)?;
        let mut t: LambdaTable = serde_json::from_str(&text)
            .map_err(|e| Error::Config { path: path.to_path_buf(), reason: format!("not a Lambda table: {e}") })?;
        t.path = path.to_path_buf();
        Ok(t)
    }
}

fn config_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Config { path: path.to_path_buf(), reason: reason.into() }
}

impl MergeConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = crate::input_file::read_to_string(path)?;
        Self::parse(&text, path)
    }

    /// Parses YAML text; `source` names the file in errors and anchors relative paths.
    pub fn parse(text: &str, source: &Path) -> Result<Self> {
        let raw: RawConfig = serde_yaml_ng::from_str(text).map_err(|e| config_err(source, e.to_string()))?;
        let method = method_info(&raw.merge_method).ok_or_else(|| {
            config_err(source, format!("unknown merge_method `{}` (supported: {})", raw.merge_method, method_names()))
        })?;
        let base_dir = source.parent().unwrap_or_else(|| Path::new("."));
        let locate = |p: &str, field: &str| locate_model(p, base_dir, source, field);

        let base_model = raw.base_model.as_deref().map(|p| locate(p, "base_model")).transpose()?;
        if method.needs_base && base_model.is_none() {
            return Err(config_err(
                source,
                format!(
                    "merge_method `{}` needs `base_model` (the pretrained model the experts were fine-tuned from)",
                    method.name
                ),
            ));
        }

        let mut models = Vec::new();
        for (i, m) in raw.models.into_iter().enumerate() {
            let path = locate(&m.model, &format!("models[{i}].model"))?;
            for key in m.parameters.keys() {
                if !method.model_params.contains(&key.as_str()) {
                    return Err(config_err(
                        source,
                        format!(
                            "models[{i}].parameters.{key}: `{}` takes no per-model parameter `{key}` (supported: {})",
                            method.name,
                            method.model_params.join(", ")
                        ),
                    ));
                }
            }
            let same_as_base = method.needs_base && base_model.as_ref().is_some_and(|b| same_path(b, &path));
            if same_as_base {
                // mergekit configs often list the base among the models; it is not an expert.
                continue;
            }
            models.push(ModelEntry { path, parameters: m.parameters });
        }
        if models.is_empty() {
            return Err(config_err(source, "`models` lists no model to merge (besides the base model)"));
        }

        for key in raw.parameters.keys() {
            let k = key.as_str();
            if !method.global_params.contains(&k) && !method.model_params.contains(&k) {
                let mut allowed: Vec<&str> = method.global_params.to_vec();
                allowed.extend(method.model_params);
                return Err(config_err(
                    source,
                    format!(
                        "parameters.{key}: `{}` has no parameter `{key}` (supported: {})",
                        method.name,
                        allowed.join(", ")
                    ),
                ));
            }
        }
        let check_number =
            |where_: &str, v: &ParamValue| v.check_numeric().map_err(|e| config_err(source, format!("{where_}: {e}")));
        for (key, v) in &raw.parameters {
            match key.as_str() {
                "normalize" | "rescale" | "int8_mask" if v.as_bool().is_none() => {
                    return Err(config_err(source, format!("parameters.{key}: expected true or false")));
                }
                "seed" => match v {
                    ParamValue::Number(x) if *x >= 0.0 && x.fract() == 0.0 => {}
                    _ => return Err(config_err(source, "parameters.seed: expected a whole number >= 0")),
                },
                "lambda_table" if !matches!(v, ParamValue::Text(_)) => {
                    return Err(config_err(source, "parameters.lambda_table: expected a path to a JSON file"));
                }
                "weight" | "density" | "lambda" => check_number(&format!("parameters.{key}"), v)?,
                _ => {}
            }
        }
        for (i, m) in models.iter().enumerate() {
            for (key, v) in &m.parameters {
                check_number(&format!("models[{i}].parameters.{key} ({})", m.path.display()), v)?;
            }
        }

        let out_dtype = raw
            .out_dtype
            .as_deref()
            .or(raw.dtype.as_deref())
            .map(|d| d.parse::<FloatDType>().map_err(|e| config_err(source, format!("dtype: {e}"))))
            .transpose()?;

        let lambda_table = match raw.parameters.get("lambda_table") {
            Some(ParamValue::Text(p)) => {
                let path = resolve_relative(p, base_dir);
                let table = LambdaTable::load(&path)?;
                if let Some(names) = &table.models
                    && names.len() != models.len()
                {
                    return Err(config_err(
                        &path,
                        format!("the table names {} models but the config merges {}", names.len(), models.len()),
                    ));
                }
                for (name, values) in &table.lambda {
                    if values.len() != models.len() {
                        return Err(config_err(
                            &path,
                            format!(
                                "entry `{name}` has {} coefficients but the config merges {} experts",
                                values.len(),
                                models.len()
                            ),
                        ));
                    }
                    if let Some(x) = values.iter().find(|x| !x.is_finite()) {
                        return Err(config_err(&path, format!("entry `{name}` holds {x}, not a finite number")));
                    }
                }
                Some(table)
            }
            _ => None,
        };

        Ok(MergeConfig {
            source: source.to_path_buf(),
            method,
            base_model,
            models,
            parameters: raw.parameters,
            out_dtype,
            lambda_table,
        })
    }

    fn global_bool(&self, key: &str, default: bool) -> bool {
        self.parameters.get(key).and_then(ParamValue::as_bool).unwrap_or(default)
    }

    /// Builds the configured method.
    pub fn build_method(&self) -> Box<dyn MergeMethod> {
        match self.method.name {
            "linear" => Box::new(linear::Linear),
            "task_arithmetic" => Box::new(task_arithmetic::method()),
            "ties" => Box::new(ties::method(self.global_bool("rescale", ties::DEFAULT_RESCALE))),
            name @ ("dare_linear" | "dare_ties") => {
                let seed = match self.parameters.get("seed") {
                    Some(ParamValue::Number(x)) => *x as u64,
                    _ => dare::DEFAULT_SEED,
                };
                let gta: Gta =
                    dare::method(name == "dare_ties", self.global_bool("rescale", dare::DEFAULT_RESCALE), seed);
                Box::new(gta)
            }
            other => unreachable!("method `{other}` is in the registry but not built"),
        }
    }

    fn default_normalize(&self) -> bool {
        match self.method.name {
            "linear" => linear::DEFAULT_NORMALIZE,
            "task_arithmetic" => task_arithmetic::DEFAULT_NORMALIZE,
            "ties" => ties::DEFAULT_NORMALIZE,
            _ => dare::DEFAULT_NORMALIZE,
        }
    }

    /// The parameters for one tensor of block `block`, whose block sits at `position` in
    /// [0, 1] of the stream (for gradients).
    pub fn tensor_params(&self, tensor: &str, block: &str, position: f64) -> Result<TensorParams> {
        if let Some(table) = &self.lambda_table
            && let Some(values) = table.lambda.get(tensor).or_else(|| table.lambda.get(block))
        {
            return Ok(TensorParams {
                weights: values.iter().map(|&x| x as f32).collect(),
                densities: vec![1.0; self.models.len()],
                lambda: 1.0,
                normalize: false,
            });
        }
        let lookup = |m: &ModelEntry, key: &str, default: f64| -> f64 {
            m.parameters
                .get(key)
                .or_else(|| self.parameters.get(key))
                .and_then(|v| v.number_for(tensor, position))
                .unwrap_or(default)
        };
        let weights: Vec<f32> = self.models.iter().map(|m| lookup(m, "weight", 1.0) as f32).collect();
        let mut densities = Vec::with_capacity(self.models.len());
        for m in &self.models {
            let d = lookup(m, "density", 1.0);
            if !(0.0..=1.0).contains(&d) {
                return Err(config_err(
                    &self.source,
                    format!("density {d} for {} at tensor `{tensor}` is outside [0, 1]", m.path.display()),
                ));
            }
            densities.push(d as f32);
        }
        let lambda = self.parameters.get("lambda").and_then(|v| v.number_for(tensor, position)).unwrap_or(1.0) as f32;
        let normalize = self.global_bool("normalize", self.default_normalize());
        self.check_weights(tensor, &weights, normalize)?;
        Ok(TensorParams { weights, densities, lambda, normalize })
    }

    /// Weights that make a degenerate merge are errors (mergekit divides by their zero sum, or
    /// writes zeros): a linear merge whose weights are all 0, and a normalised sum of weights
    /// that is 0 (linear, task_arithmetic, dare_linear; TIES-style consensus normalises by the
    /// agreeing weights of each element instead).
    fn check_weights(&self, tensor: &str, weights: &[f32], normalize: bool) -> Result<()> {
        let name = self.method.name;
        let sum: f32 = weights.iter().sum();
        let problem = if name == "linear" && weights.iter().all(|&w| w == 0.0) {
            Some("every weight is 0, so the output would be all zeros".to_string())
        } else if normalize && matches!(name, "linear" | "task_arithmetic" | "dare_linear") && sum.abs() < 1e-8 {
            Some(format!("the weights {weights:?} sum to 0, and `normalize: true` divides by their sum"))
        } else {
            None
        };
        match problem {
            Some(p) => Err(config_err(&self.source, format!("{name} at tensor `{tensor}`: {p}"))),
            None => Ok(()),
        }
    }
}

fn resolve_relative(p: &str, base_dir: &Path) -> PathBuf {
    let path = PathBuf::from(p);
    if path.is_absolute() || path.exists() { path } else { base_dir.join(path) }
}

/// A model path as written: relative to the working directory if it exists there, else to the
/// config's directory. Hub ids are not downloaded.
fn locate_model(p: &str, base_dir: &Path, source: &Path, field: &str) -> Result<PathBuf> {
    let path = resolve_relative(p, base_dir);
    if path.exists() {
        Ok(path)
    } else {
        Err(config_err(
            source,
            format!(
                "{field}: `{p}` is not a local file or directory (looked in the working directory and in {}); symerge never downloads models",
                base_dir.display()
            ),
        ))
    }
}

fn same_path(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}
