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

use super::params::ParamValue;
use super::registry::{Fallback, Kind, MethodDef, ParamSpec, Scope, Settings};
use super::{MergeMethod, TensorParams, method_def, method_names};
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
    pub method: &'static MethodDef,
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
        let method = method_def(&raw.merge_method).ok_or_else(|| {
            config_err(source, format!("unknown merge_method `{}` (supported: {})", raw.merge_method, method_names()))
        })?;
        let base_dir = source.parent().unwrap_or_else(|| Path::new("."));
        let locate = |p: &str, field: &str| locate_model(p, base_dir, source, field);

        let base_model = raw.base_model.as_deref().map(|p| locate(p, "base_model")).transpose()?;
        if method.needs_base() && base_model.is_none() {
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
            for (key, v) in &m.parameters {
                let spec = method.param(key).filter(|p| p.scope == Scope::PerModel).ok_or_else(|| {
                    let per_model: Vec<&str> =
                        method.params.iter().filter(|p| p.scope == Scope::PerModel).map(|p| p.name).collect();
                    config_err(
                        source,
                        format!(
                            "models[{i}].parameters.{key}: `{}` takes no per-model parameter `{key}` (supported: {})",
                            method.name,
                            per_model.join(", ")
                        ),
                    )
                })?;
                check_value(spec, v).map_err(|e| {
                    config_err(source, format!("models[{i}].parameters.{key} ({}): {e}", path.display()))
                })?;
            }
            let same_as_base = method.uses_base() && base_model.as_ref().is_some_and(|b| same_path(b, &path));
            if same_as_base {
                // mergekit configs often list the base among the models; it is not an expert.
                continue;
            }
            models.push(ModelEntry { path, parameters: m.parameters });
        }
        check_model_count(method, models.len(), source)?;

        for (key, v) in &raw.parameters {
            let spec = method.param(key).ok_or_else(|| {
                config_err(
                    source,
                    format!(
                        "parameters.{key}: `{}` has no parameter `{key}` (supported: {})",
                        method.name,
                        method.param_names()
                    ),
                )
            })?;
            check_value(spec, v).map_err(|e| config_err(source, format!("parameters.{key}: {e}")))?;
        }
        for spec in method.params.iter().filter(|p| p.default == Fallback::Required) {
            let everywhere = raw.parameters.contains_key(spec.name)
                || (spec.scope == Scope::PerModel && models.iter().all(|m| m.parameters.contains_key(spec.name)));
            if !everywhere {
                return Err(config_err(
                    source,
                    format!("parameters.{}: `{}` needs `{}` ({})", spec.name, method.name, spec.name, spec.doc),
                ));
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

    /// Builds the configured method.
    pub fn build_method(&self) -> Box<dyn MergeMethod> {
        (self.method.build)(&Settings {
            def: self.method,
            values: &self.parameters,
            has_base: self.base_model.is_some(),
        })
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
                extra: Default::default(),
            });
        }
        let mut weights = Vec::new();
        let mut densities = Vec::new();
        let mut lambda = 1.0;
        let mut extra = std::collections::BTreeMap::new();
        for spec in self.method.params.iter().filter(|p| p.kind == Kind::Number) {
            let values = self.resolve(spec, tensor, position)?;
            match spec.name {
                "weight" => weights = values,
                "density" => densities = values,
                "lambda" => lambda = values.first().copied().unwrap_or(1.0),
                _ if !values.is_empty() => {
                    extra.insert(spec.name, values);
                }
                _ => {}
            }
        }
        let k = self.models.len();
        if weights.is_empty() {
            weights = vec![1.0; k];
        }
        if densities.is_empty() {
            densities = vec![1.0; k];
        }
        let normalize = self.settings().flag("normalize");
        self.check_weights(tensor, &weights, normalize)?;
        let params = TensorParams { weights, densities, lambda, normalize, extra };
        (self.method.validate)(&params)
            .map_err(|e| config_err(&self.source, format!("{} at tensor `{tensor}`: {e}", self.method.name)))?;
        Ok(params)
    }

    fn settings(&self) -> Settings<'_> {
        Settings { def: self.method, values: &self.parameters, has_base: self.base_model.is_some() }
    }

    /// One numeric parameter for `tensor`: a single value for a global one, one per model for
    /// a per-model one (a model's own value, else the top-level one, else the default); empty
    /// when unset without a default. Values outside the parameter's range are errors.
    fn resolve(&self, spec: &ParamSpec, tensor: &str, position: f64) -> Result<Vec<f32>> {
        let default = match spec.default {
            Fallback::Number(x) => Some(x),
            _ => None,
        };
        let global = self.parameters.get(spec.name);
        let one = |v: Option<&ParamValue>, whose: &str| -> Result<Option<f32>> {
            let x = v.and_then(|v| v.number_for(tensor, position)).or(default);
            if let (Some(x), Some((lo, hi))) = (x, spec.range)
                && !(lo..=hi).contains(&x)
            {
                return Err(config_err(
                    &self.source,
                    format!("{} {x}{whose} at tensor `{tensor}` is outside [{lo}, {hi}]", spec.name),
                ));
            }
            Ok(x.map(|x| x as f32))
        };
        match spec.scope {
            Scope::Global => Ok(one(global, "")?.into_iter().collect()),
            Scope::PerModel => {
                let mut out = Vec::with_capacity(self.models.len());
                for m in &self.models {
                    let whose = format!(" for {}", m.path.display());
                    match one(m.parameters.get(spec.name).or(global), &whose)? {
                        Some(x) => out.push(x),
                        None => return Ok(Vec::new()),
                    }
                }
                Ok(out)
            }
        }
    }

    /// Weights that make a degenerate merge are errors (mergekit divides by their zero sum, or
    /// writes zeros): a linear merge whose weights are all 0, and a normalised sum of weights
    /// that is 0 (methods that sum weights: linear, task_arithmetic, dare_linear, ...; TIES-style consensus normalises by the
    /// agreeing weights of each element instead).
    fn check_weights(&self, tensor: &str, weights: &[f32], normalize: bool) -> Result<()> {
        let name = self.method.name;
        let sum: f32 = weights.iter().sum();
        let problem = if name == "linear" && weights.iter().all(|&w| w == 0.0) {
            Some("every weight is 0, so the output would be all zeros".to_string())
        } else if normalize && self.method.sums_weights && sum.abs() < 1e-8 {
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

/// Checks a parameter's value has the kind its method declares.
fn check_value(spec: &ParamSpec, v: &ParamValue) -> std::result::Result<(), String> {
    match spec.kind {
        Kind::Bool if v.as_bool().is_none() => Err("expected true or false".into()),
        Kind::Count => match v {
            ParamValue::Number(x) if *x >= 0.0 && x.fract() == 0.0 && *x < 2f64.powi(53) => Ok(()),
            _ => Err("expected a whole number >= 0".into()),
        },
        Kind::Path if !matches!(v, ParamValue::Text(_)) => Err("expected a path to a JSON file".into()),
        Kind::Number => v.check_numeric(),
        _ => Ok(()),
    }
}

/// The number of merged models (the base excluded) must be what the method takes.
fn check_model_count(method: &MethodDef, n: usize, source: &Path) -> Result<()> {
    let besides = if method.uses_base() { " besides the base model" } else { "" };
    if n == 0 {
        return Err(config_err(source, format!("`models` lists no model to merge{besides}")));
    }
    let wanted = match (method.min_models, method.max_models) {
        (lo, Some(hi)) if lo == hi && n != lo => Some(format!("exactly {lo}")),
        (lo, _) if n < lo => Some(format!("at least {lo}")),
        (_, Some(hi)) if n > hi => Some(format!("at most {hi}")),
        _ => None,
    };
    match wanted {
        Some(w) => Err(config_err(
            source,
            format!("models: `{}` merges {w} model(s){besides}, the config lists {n}", method.name),
        )),
        None => Ok(()),
    }
}
