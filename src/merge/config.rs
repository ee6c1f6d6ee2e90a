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
use crate::checkpoint::layers::{layer_of, renumber};
use crate::error::{Error, Result};
use crate::input_file::same_path;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    merge_method: String,
    #[serde(default)]
    base_model: Option<String>,
    #[serde(default)]
    models: Vec<RawModel>,
    #[serde(default, deserialize_with = "super::params::named_values")]
    parameters: BTreeMap<String, ParamValue>,
    #[serde(default)]
    dtype: Option<String>,
    #[serde(default)]
    out_dtype: Option<String>,
    #[serde(default)]
    slices: Option<Vec<RawSlice>>,
    #[serde(default)]
    tokenizer_source: Option<String>,
    #[serde(default)]
    chat_template: Option<String>,
    #[serde(default)]
    tokenizer: Option<RawTokenizer>,
    /// mergekit's `modules:` form; single-module models (every family symerge loads) call
    /// their one module `default`.
    #[serde(default, deserialize_with = "crate::ordered_map::entries")]
    modules: Vec<(String, RawModule)>,
}

/// One output module (mergekit's `OutputModuleDefinition`): `models` or `slices`, and the
/// `parameters` between a slice's and the top-level ones.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModule {
    #[serde(default)]
    models: Vec<RawModel>,
    #[serde(default)]
    slices: Option<Vec<RawSlice>>,
    #[serde(default, deserialize_with = "super::params::named_values")]
    parameters: BTreeMap<String, ParamValue>,
}

/// mergekit's `tokenizer:` block (`TokenizerConfig`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTokenizer {
    #[serde(default)]
    source: Option<String>,
    #[serde(default, deserialize_with = "crate::ordered_map::entries")]
    tokens: Vec<(String, RawTokenEmbedding)>,
    #[serde(default)]
    pad_to_multiple_of: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTokenEmbedding {
    #[serde(default)]
    source: Option<RawEmbedSource>,
    #[serde(default)]
    force: bool,
}

/// A model path (or `{model: path}`), or `{kind: zero}`, or
/// `{kind: model_token, model, token | token_id}`.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawEmbedSource {
    Model(String),
    Kind {
        #[serde(default)]
        kind: Option<String>,
        #[serde(default)]
        model: Option<String>,
        #[serde(default)]
        token: Option<String>,
        #[serde(default)]
        token_id: Option<usize>,
    },
}

/// One output slice: layers taken from each source, merged with the config's method.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSlice {
    sources: Vec<RawSource>,
    #[serde(default)]
    base_model: Option<String>,
    /// Accepted for mergekit's sake, which ignores it too (0.1.5 never reads it).
    #[serde(default)]
    residual_weight: Option<f64>,
    #[serde(default, deserialize_with = "super::params::named_values")]
    parameters: BTreeMap<String, ParamValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    model: String,
    #[serde(deserialize_with = "lax_layer_range")]
    layer_range: [usize; 2],
    #[serde(default, deserialize_with = "super::params::named_values")]
    parameters: BTreeMap<String, ParamValue>,
}

/// A `layer_range` as pydantic reads it for mergekit: whole numbers also written as floats
/// (`2.0`), quoted (`"2"`) or as booleans (fuzzing round 7: refused with serde's "expected usize").
fn lax_layer_range<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<[usize; 2], D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Index {
        Whole(u64),
        Float(f64),
        Flag(bool),
        Text(String),
    }
    let index = |i: Index| -> std::result::Result<usize, String> {
        let x = match i {
            Index::Whole(n) => return usize::try_from(n).map_err(|_| format!("{n} is too large")),
            Index::Float(x) => x,
            Index::Flag(b) => return Ok(usize::from(b)),
            Index::Text(t) => t.trim().parse::<f64>().map_err(|_| format!("`{t}` is not a layer index"))?,
        };
        if x >= 0.0 && x.fract() == 0.0 && x < 2f64.powi(53) {
            Ok(x as usize)
        } else {
            Err(format!("{x} is not a layer index (a whole number >= 0)"))
        }
    };
    let [a, b] = <[Index; 2]>::deserialize(d)?;
    Ok([index(a).map_err(serde::de::Error::custom)?, index(b).map_err(serde::de::Error::custom)?])
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    model: String,
    #[serde(default, deserialize_with = "super::params::named_values")]
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
    /// The numeric `parameters` of the `modules:` form's one module: resolved after a slice's
    /// and before the top-level ones (its merge-wide switches are folded into `parameters`).
    pub module_parameters: BTreeMap<String, ParamValue>,
    /// Output dtype (`out_dtype`, else `dtype`); `None` keeps each tensor's own dtype.
    pub out_dtype: Option<FloatDType>,
    /// mergekit's `dtype`: inputs are rounded to it before the math (which runs in f32).
    pub compute_dtype: Option<FloatDType>,
    pub lambda_table: Option<LambdaTable>,
    /// The `slices` form; empty for the `models` form. `models` and `base_model` then hold
    /// the first slice's experts and the top-level base.
    pub slices: Vec<SliceDef>,
    /// Whose tokenizer files the output gets (`tokenizer_source`, or `tokenizer.source`).
    pub tokenizer_source: Option<TokenizerSource>,
    /// `tokenizer.tokens` in the order written: tokens the output vocabulary lacks are added to
    /// it in that order, and where given tokens' embedding rows come from.
    pub tokens: Vec<(String, TokenEmbedding)>,
    /// `tokenizer.pad_to_multiple_of`: the output's rows rounded up to a multiple of it, the
    /// padding rows each model's mean row.
    pub pad_to_multiple_of: Option<usize>,
    /// `chat_template`: a template's text, or `auto` (the most common one among the inputs).
    pub chat_template: Option<String>,
    /// The config's text as given (written beside the output as `mergekit_config.yml`).
    pub text: String,
}

/// The models one tensor merges and the `parameters` between theirs and the top-level ones.
struct Group<'a> {
    models: Vec<&'a ModelEntry>,
    /// Each model's own name for the tensor, which its per-model parameters' filters see
    /// (mergekit resolves them against the input tensor): in a slice that takes layers
    /// `a .. b`, output layer `i` is the model's layer `a + i - first`.
    input_names: Vec<String>,
    slice: Option<&'a BTreeMap<String, ParamValue>>,
}

/// One input of a slice: layers `layers.0 .. layers.1` of a model.
#[derive(Debug, Clone)]
pub struct SourceDef {
    pub model: ModelEntry,
    pub layers: (usize, usize),
    /// Its index in the slice's `sources` as written (before the base was moved first):
    /// mergekit merges the tensors after the layer stack over the last slice's sources up to
    /// the first slice's source count in this order.
    pub written: usize,
}

/// One output slice of the `slices` form.
#[derive(Debug, Clone)]
pub struct SliceDef {
    /// The sources in merge order: the base first when the method subtracts one.
    pub sources: Vec<SourceDef>,
    /// Whether `sources[0]` is the base (subtracted, never among `experts`).
    pub has_base: bool,
    /// The merged models, with their parameters (the sources without the base).
    pub experts: Vec<ModelEntry>,
    /// The slice's own `parameters`, between the sources' and the top-level ones.
    pub parameters: BTreeMap<String, ParamValue>,
    /// The slice's `base_model`, else the top-level one, whether or not the method subtracts
    /// it: mergekit gives a token several sources hold the base's row.
    pub base_model: Option<PathBuf>,
}

impl SliceDef {
    /// Layers the slice contributes to the output.
    pub fn len(&self) -> usize {
        self.sources[0].layers.1 - self.sources[0].layers.0
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether source `p` (in merge order) of this, the last slice, takes part in the tensors
    /// after the layer stack (final norm, head) when the first slice has `first_count` sources.
    /// mergekit 0.1.5 (`plan_module`) pairs the last slice's models with one weight per source
    /// of the *first* slice and `zip`s the two lists, so only the last slice's first
    /// `first_count` sources as written take part.
    pub fn in_tail(&self, p: usize, first_count: usize) -> bool {
        self.sources.get(p).is_some_and(|s| s.written < first_count)
    }
}

/// One `tokenizer.tokens` entry: where the token's rows come from for the models that lack it
/// (for every model when `force`d).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEmbedding {
    /// `None`: the token's rows are the usual ones, and an error where it needs a configured one
    /// (as in mergekit).
    pub source: Option<EmbedSource>,
    pub force: bool,
}

/// Where a configured token's row comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum EmbedSource {
    /// That model's row for the same token.
    Model(PathBuf),
    Zero,
    /// That model's row for another token of its own vocabulary.
    ModelToken {
        model: PathBuf,
        token: TokenRef,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum TokenRef {
    Id(usize),
    Text(String),
}

/// `tokenizer_source`: the base model's tokenizer, or a given model's.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenizerSource {
    Base,
    Model(PathBuf),
    /// The base's tokenizer (else the first model's) plus every token of the others it lacks.
    Union,
}

/// Per-tensor (or per-block) merge coefficients, one per expert, e.g. the Lambda learned by
/// `symerge adapt`. JSON: `{"lambda": {"<tensor or block name>": [l_1, ..., l_K]}}`, with an
/// optional `"models": [...]` naming the experts in order, and optional `"experts"` / `"base"`
/// recording who they are (see [`RecordedModel`]). Entries replace `weight * lambda`
/// for their tensors; tensors without an entry use the config's weights.
#[derive(Debug, Clone, Deserialize)]
pub struct LambdaTable {
    #[serde(default)]
    pub models: Option<Vec<String>>,
    /// The experts the coefficients belong to, in coefficient order (`adapt` writes them since
    /// lambda.json had them; an older table has none and cannot be checked).
    #[serde(default)]
    pub experts: Option<Vec<RecordedModel>>,
    /// The base the task vectors were taken from.
    #[serde(default)]
    pub base: Option<RecordedModel>,
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

/// A model a Lambda table was learned with: the path `adapt` read it from and its
/// [`crate::labels::fingerprint::checkpoint_sketch`], which `merge` compares with the config's
/// models (see [`super::table_models`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct RecordedModel {
    /// The task whose column this expert is (absent for the base).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    pub path: PathBuf,
    pub fingerprint: String,
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
        crate::input_file::check_yaml11_integers(text).map_err(|e| config_err(source, e))?;
        let mut raw: RawConfig = crate::input_file::parse_yaml(text).map_err(|e| config_err(source, e))?;
        refuse_unsupported(&raw, source)?;
        let method = method_def(&raw.merge_method).ok_or_else(|| {
            config_err(source, format!("unknown merge_method `{}` (supported: {})", raw.merge_method, method_names()))
        })?;
        let (prefix, module) = take_module(&mut raw, source)?;
        let base_dir = source.parent().unwrap_or_else(|| Path::new("."));
        let base_model =
            raw.base_model.as_deref().map(|p| locate_model(p, base_dir, source, "base_model")).transpose()?;
        let slices = match raw.slices.take() {
            Some(_) if !raw.models.is_empty() => {
                return Err(config_err(source, format!("{prefix}give either `models` or `slices`, not both")));
            }
            Some(raw_slices) => parse_slices(method, raw_slices, base_model.as_deref(), base_dir, source, prefix)?,
            None => Vec::new(),
        };
        let (models, base_added) = if slices.is_empty() {
            parse_models(method, std::mem::take(&mut raw.models), base_model.as_deref(), base_dir, source, prefix)?
        } else {
            (slices[0].experts.clone(), false)
        };
        check_params(method, &mut raw.parameters, source, "parameters")?;
        let module_parameters = split_module_params(method, module, &mut raw.parameters, source)?;
        let mut merge_wide = raw.parameters.clone();
        merge_wide.extend(module_parameters.clone());
        if slices.is_empty() {
            let added_base = base_model.as_deref().filter(|_| base_added);
            check_required(method, &merge_wide, &BTreeMap::new(), &models, added_base, source, prefix)?;
        }
        for (i, s) in slices.iter().enumerate() {
            check_required(
                method,
                &merge_wide,
                &s.parameters,
                &s.experts,
                None,
                source,
                &format!("{prefix}slices[{i}]: "),
            )?;
        }
        let (out_dtype, compute_dtype) = parse_dtypes(&raw, source)?;
        let lambda_table = match raw.parameters.get("lambda_table") {
            Some(_) if !slices.is_empty() => {
                return Err(config_err(
                    source,
                    "parameters.lambda_table: a Lambda table merges `models`, not `slices`",
                ));
            }
            Some(ParamValue::Text(p)) => {
                let table = resolve_relative(p, base_dir)
                    .map_err(|e| config_err(source, format!("parameters.lambda_table: {e}")))?;
                Some(load_lambda_table(&table, models.len())?)
            }
            _ => None,
        };
        let (tokenizer_source, tokens, pad_to_multiple_of) = parse_tokenizer(&mut raw, base_dir, source)?;
        if tokenizer_source == Some(TokenizerSource::Base) && base_model.is_none() {
            return Err(config_err(source, "tokenizer_source: `base` needs a top-level `base_model`"));
        }
        Ok(MergeConfig {
            source: source.to_path_buf(),
            method,
            base_model,
            models,
            parameters: raw.parameters,
            module_parameters,
            out_dtype,
            compute_dtype,
            lambda_table,
            slices,
            tokenizer_source,
            tokens,
            pad_to_multiple_of,
            chat_template: raw.chat_template,
            text: text.to_string(),
        })
    }

    /// Builds the configured method as the `models` form (or slice 0) uses it: the one an
    /// engine that takes no `slices` config runs.
    pub fn build_method(&self) -> Box<dyn MergeMethod> {
        self.build_method_in(0)
    }

    /// Builds the method as slice `slice` (0 for the `models` form) uses it: with or without
    /// a base, which slices of one config may differ in (mergekit resolves the base per slice).
    pub fn build_method_in(&self, slice: usize) -> Box<dyn MergeMethod> {
        (self.method.build)(&self.settings(slice))
    }

    /// One method per slice (one for the `models` form), in order, so each tensor merges
    /// with its own slice's notion of a base.
    pub fn build_methods(&self) -> Vec<Box<dyn MergeMethod>> {
        (0..self.slices.len().max(1)).map(|s| self.build_method_in(s)).collect()
    }

    /// Whether slice `slice`'s (for the `models` form, the config's) merged models are task
    /// vectors over a base, the merge's first input.
    pub fn has_base_in(&self, slice: usize) -> bool {
        match self.slices.get(slice) {
            Some(s) => s.has_base,
            None => self.base_model.is_some(),
        }
    }

    /// The base the first slice's (the `models` form's) experts are task vectors over, if any:
    /// what `merge` reports as the base beside its count of experts.
    pub fn subtracted_base(&self) -> Option<&Path> {
        match self.slices.first() {
            Some(s) => s.sources.first().filter(|_| s.has_base).map(|b| b.model.path.as_path()),
            None => self.base_model.as_deref().filter(|_| self.method.uses_base()),
        }
    }

    /// The config with `seed: <seed>` among its top-level parameters, when its method takes a
    /// seed and neither the top level nor a slice sets one (mergekit's `--random-seed`);
    /// `None` when nothing would change.
    pub fn with_default_seed(&self, seed: u64) -> Option<MergeConfig> {
        let takes_seed = self.method.params.iter().any(|p| p.name == "seed");
        let set = self.parameters.contains_key("seed") || self.slices.iter().any(|s| s.parameters.contains_key("seed"));
        if !takes_seed || set {
            return None;
        }
        let mut c = self.clone();
        c.parameters.insert("seed".into(), ParamValue::Number(seed as f64));
        Some(c)
    }

    /// Every model the config reads, once each, in order of first mention.
    pub fn referenced_models(&self) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = Vec::new();
        let all = self.base_model.iter().chain(self.models.iter().map(|m| &m.path));
        let sliced = self.slices.iter().flat_map(|s| s.sources.iter().map(|x| &x.model.path));
        for p in all.chain(sliced) {
            if !out.iter().any(|q| same_path(q, p)) {
                out.push(p.clone());
            }
        }
        out
    }

    /// The parameters for one tensor of block `block` (of the `models` form, or of slice 0),
    /// at gradient position `position` in [0, 1].
    pub fn tensor_params(&self, tensor: &str, block: &str, position: f64) -> Result<TensorParams> {
        self.tensor_params_in(0, tensor, block, position)
    }

    /// The parameters for one tensor of slice `slice` (0 for the `models` form): a model's
    /// own value, else the slice's, else the top-level one, else the default (mergekit's
    /// precedence).
    pub fn tensor_params_in(&self, slice: usize, tensor: &str, block: &str, position: f64) -> Result<TensorParams> {
        let count = self.slices.get(slice).map_or(self.models.len(), |s| s.experts.len());
        let all: Vec<usize> = (0..count).collect();
        self.tensor_params_among(slice, &all, tensor, block, position)
    }

    /// [`Self::tensor_params_in`] for a tensor that only some of the slice's merged models hold
    /// (`among`: their indices in the slice's `experts`), as mergekit resolves it: per-model
    /// values for those models only, so weights normalise over the models that take part.
    pub fn tensor_params_among(
        &self,
        slice: usize,
        among: &[usize],
        tensor: &str,
        block: &str,
        position: f64,
    ) -> Result<TensorParams> {
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
        let group = self.group(slice, among, tensor);
        let mut weights = Vec::new();
        let mut densities = Vec::new();
        let mut lambda = 1.0;
        let mut extra = std::collections::BTreeMap::new();
        for spec in self.method.params.iter().filter(|p| p.kind == Kind::Number) {
            let values = self.resolve(&group, spec, tensor, position)?;
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
        let k = group.models.len();
        if weights.is_empty() {
            weights = vec![1.0; k];
        }
        if densities.is_empty() {
            densities = vec![1.0; k];
        }
        let normalize = self.settings(slice).flag("normalize");
        self.check_weights(tensor, &weights, normalize)?;
        let params = TensorParams { weights, densities, lambda, normalize, extra };
        (self.method.validate)(&params)
            .map_err(|e| config_err(&self.source, format!("{} at tensor `{tensor}`: {e}", self.method.name)))?;
        Ok(params)
    }

    fn settings(&self, slice: usize) -> Settings<'_> {
        let own = self.slices.get(slice).map(|s| &s.parameters);
        Settings { def: self.method, values: &self.parameters, slice: own, has_base: self.has_base_in(slice) }
    }

    /// The merged models at indices `among` of slice `slice` (of the config for the `models`
    /// form), with their names for `tensor`, and the slice's parameters.
    fn group(&self, slice: usize, among: &[usize], tensor: &str) -> Group<'_> {
        let Some(s) = self.slices.get(slice) else {
            let models: Vec<&ModelEntry> = among.iter().filter_map(|&i| self.models.get(i)).collect();
            let input_names = vec![tensor.to_string(); models.len()];
            return Group { models, input_names, slice: None };
        };
        let first_out: usize = self.slices[..slice].iter().map(SliceDef::len).sum();
        let sources = &s.sources[usize::from(s.has_base)..];
        let picked: Vec<&SourceDef> = among.iter().filter_map(|&i| sources.get(i)).collect();
        let input_names = picked
            .iter()
            .map(|src| match layer_of(tensor) {
                Some((_, i)) if i >= first_out => {
                    renumber(tensor, src.layers.0 + i - first_out).unwrap_or_else(|| tensor.to_string())
                }
                _ => tensor.to_string(),
            })
            .collect();
        Group { models: picked.iter().map(|src| &src.model).collect(), input_names, slice: Some(&s.parameters) }
    }

    /// One numeric parameter for `tensor`: a single value for a global one, one per model for
    /// a per-model one; empty when unset without a default. As in mergekit, the model's
    /// `parameters` come first, then the slice's, the module's, the top level's, and a level whose
    /// setting gives no value for this tensor (a filtered list none of whose filters match)
    /// passes to the next. Values outside the parameter's range are errors.
    fn resolve(&self, group: &Group<'_>, spec: &ParamSpec, tensor: &str, position: f64) -> Result<Vec<f32>> {
        let default = match spec.default {
            Fallback::Number(x) => Some(x),
            _ if spec.name == "weight" && self.lambda_table.is_some() => Some(1.0),
            _ => None,
        };
        // Global parameters see the output tensor's name, per-model ones the model's own.
        let value = |model: Option<&BTreeMap<String, ParamValue>>, name: &str| {
            model
                .into_iter()
                .chain(group.slice)
                .chain([&self.module_parameters, &self.parameters])
                .find_map(|p| p.get(spec.name).and_then(|v| v.number_for(name, position)))
                .or(default)
        };
        let checked = |x: Option<f64>, whose: &str| -> Result<Option<f32>> {
            if let (Some(x), Some((lo, hi))) = (x, spec.range)
                && !(lo..=hi).contains(&x)
            {
                return Err(config_err(
                    &self.source,
                    format!("{} {x}{whose} at tensor `{tensor}` is outside [{lo}, {hi}]", spec.name),
                ));
            }
            if x.is_none() && default.is_none() && spec.default == Fallback::Required {
                // Given (check_required saw it), but a filtered list matches none of this
                // tensor's names: mergekit stops here too ("Missing required parameter").
                return Err(config_err(
                    &self.source,
                    format!(
                        "{}{whose} at tensor `{tensor}`: no filter of `{}` matches this tensor and `{}` has no default; \
                         add an entry without a filter",
                        spec.name, spec.name, spec.name
                    ),
                ));
            }
            Ok(x.map(|x| x as f32))
        };
        match spec.scope {
            Scope::Global => Ok(checked(value(None, tensor), "")?.into_iter().collect()),
            Scope::PerModel => {
                let mut out = Vec::with_capacity(group.models.len());
                for (m, name) in group.models.iter().zip(&group.input_names) {
                    let whose = format!(" for {}", m.path.display());
                    match checked(value(Some(&m.parameters), name), &whose)? {
                        Some(x) => out.push(x),
                        None => return Ok(Vec::new()),
                    }
                }
                Ok(out)
            }
        }
    }

    /// The dtype a merged tensor is rounded to before it is cast to `out_dtype`: a narrow `dtype`
    /// (bf16, f16) with a different `out_dtype`. mergekit's methods return their result in
    /// `dtype` and only then cast it, so `dtype: bfloat16, out_dtype: float16` stores
    /// f16(bf16(x)) and `out_dtype: float32` bf16-precision values (fuzzing round 7).
    pub fn result_rounding(&self) -> Option<FloatDType> {
        let d = self.compute_dtype?;
        (d.size() < 4 && self.out_dtype.is_some_and(|o| o != d)).then_some(d)
    }

    /// Weights that make a degenerate linear merge are errors (mergekit writes zeros, or divides
    /// by their zero sum and writes inf): all 0, or summing to 0 under `normalize: true`. The
    /// task-vector methods divide by 1 where the sum is 0, as mergekit's `merge_group` does.
    fn check_weights(&self, tensor: &str, weights: &[f32], normalize: bool) -> Result<()> {
        let name = self.method.name;
        let sum: f32 = weights.iter().sum();
        let problem = if name == "linear" && weights.iter().all(|&w| w == 0.0) {
            Some("every weight is 0, so the output would be all zeros".to_string())
        } else if normalize && name == "linear" && sum == 0.0 {
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

/// Largest `pad_to_multiple_of` taken (mergekit's users pad to 8 .. 128): a larger one would add
/// more padding rows than any vocabulary has tokens.
const MAX_PAD_MULTIPLE: usize = 1 << 16;

/// `tokenizer_source`, or the `tokenizer:` block (whose `source` defaults to `union`, as in
/// mergekit): the source, the configured tokens and the padding multiple.
type TokenizerParts = (Option<TokenizerSource>, Vec<(String, TokenEmbedding)>, Option<usize>);

fn parse_tokenizer(raw: &mut RawConfig, base_dir: &Path, source: &Path) -> Result<TokenizerParts> {
    let block = raw.tokenizer.take();
    let named = match &block {
        Some(b) => Some(b.source.clone().unwrap_or_else(|| "union".into())),
        None => raw.tokenizer_source.clone(),
    };
    let field = if block.is_some() { "tokenizer.source" } else { "tokenizer_source" };
    let src = match named.as_deref() {
        None => None,
        Some("base") => Some(TokenizerSource::Base),
        Some("union") => Some(TokenizerSource::Union),
        Some(p) => Some(TokenizerSource::Model(locate_model(p, base_dir, source, field)?)),
    };
    let Some(block) = block else { return Ok((src, Vec::new(), None)) };
    if let Some(m) = block.pad_to_multiple_of.filter(|m| *m > MAX_PAD_MULTIPLE) {
        return Err(config_err(source, format!("tokenizer.pad_to_multiple_of: {m} is more than {MAX_PAD_MULTIPLE}")));
    }
    let mut tokens: Vec<(String, TokenEmbedding)> = Vec::new();
    for (token, t) in block.tokens {
        let field = format!("tokenizer.tokens.{token:?}");
        let bad = |why: &str| config_err(source, format!("{field}: {why}"));
        if tokens.iter().any(|(t, _)| *t == token) {
            return Err(bad("given twice"));
        }
        let source = t.source.map(|raw| parse_embed_source(raw, &field, base_dir, source)).transpose()?;
        tokens.push((token, TokenEmbedding { source, force: t.force }));
    }
    // mergekit pads only to a positive multiple.
    Ok((src, tokens, block.pad_to_multiple_of.filter(|m| *m > 0)))
}

/// One `tokenizer.tokens` entry's `source` (at `field`), its model located.
fn parse_embed_source(raw: RawEmbedSource, field: &str, base_dir: &Path, source: &Path) -> Result<EmbedSource> {
    let bad = |why: &str| config_err(source, format!("{field}: {why}"));
    let model = |p: &str| locate_model(p, base_dir, source, &format!("{field}.source"));
    let (kind, m, token, token_id) = match raw {
        RawEmbedSource::Model(p) => return Ok(EmbedSource::Model(model(&p)?)),
        RawEmbedSource::Kind { kind, model, token, token_id } => (kind, model, token, token_id),
    };
    Ok(match (kind.as_deref(), m, token, token_id) {
        (None, Some(m), None, None) => EmbedSource::Model(model(&m)?),
        (Some("zero"), None, None, None) => EmbedSource::Zero,
        (Some("model_token"), Some(m), Some(t), None) => {
            EmbedSource::ModelToken { model: model(&m)?, token: TokenRef::Text(t) }
        }
        (Some("model_token"), Some(m), None, Some(id)) => {
            EmbedSource::ModelToken { model: model(&m)?, token: TokenRef::Id(id) }
        }
        (Some("model_token"), ..) => return Err(bad("model_token needs a `model` and one of `token`, `token_id`")),
        (Some("zero"), ..) => return Err(bad("kind zero takes no other field")),
        (None, ..) => return Err(bad("a source without `kind` is a model: give only `model`")),
        (Some(k), ..) => return Err(bad(&format!("unknown kind `{k}` (zero, model_token)"))),
    })
}

/// The one module mergekit gives a single-module architecture (every family symerge loads).
const MODULE: &str = "default";

/// Module parameters as written, before [`split_module_params`].
type ModuleParams = Option<BTreeMap<String, ParamValue>>;

/// mergekit's `modules:` form: the module's `models` or `slices` move to the config's, and its
/// `parameters` are returned for [`split_module_params`], with the prefix that names the moved
/// fields in errors. `modules: {}` counts as absent, as in mergekit.
fn take_module(raw: &mut RawConfig, source: &Path) -> Result<(&'static str, ModuleParams)> {
    let mut modules = std::mem::take(&mut raw.modules);
    match modules.len() {
        0 => return Ok(("", None)),
        1 => {}
        n => {
            let names: Vec<&str> = modules.iter().map(|(k, _)| k.as_str()).collect();
            return Err(config_err(
                source,
                format!(
                    "modules: lists {n} modules ({}); the model families symerge loads have one, which mergekit calls `{MODULE}`",
                    names.join(", ")
                ),
            ));
        }
    }
    let (name, module) = modules.remove(0);
    if name != MODULE {
        return Err(config_err(
            source,
            format!(
                "modules.{name}: the model families symerge loads have one module, which mergekit calls `{MODULE}`"
            ),
        ));
    }
    if !raw.models.is_empty() || raw.slices.is_some() {
        return Err(config_err(source, "modules: give one of `models`, `slices` or `modules` (as mergekit)"));
    }
    if module.models.is_empty() == module.slices.is_none() {
        return Err(config_err(source, format!("modules.{MODULE}: give either `models` or `slices` (as mergekit)")));
    }
    raw.models = module.models;
    raw.slices = module.slices;
    Ok(("modules.default.", Some(module.parameters)))
}

/// The module's `parameters`, checked: numeric ones stay a level of their own (after a slice's,
/// before the top level's, as mergekit resolves them); merge-wide switches and counts override
/// the top level's, since the one module is the whole merge.
fn split_module_params(
    method: &MethodDef,
    module: ModuleParams,
    top: &mut BTreeMap<String, ParamValue>,
    source: &Path,
) -> Result<BTreeMap<String, ParamValue>> {
    let Some(mut params) = module else { return Ok(BTreeMap::new()) };
    check_params(method, &mut params, source, &format!("modules.{MODULE}.parameters"))?;
    let (numeric, switches): (BTreeMap<_, _>, BTreeMap<_, _>) =
        params.into_iter().partition(|(k, _)| method.param(k).is_some_and(|p| p.kind == Kind::Number));
    top.extend(switches);
    Ok(numeric)
}

/// mergekit keys symerge knows but does not implement: refused by name, not as unknown keys.
fn refuse_unsupported(raw: &RawConfig, source: &Path) -> Result<()> {
    if raw.tokenizer.is_some() && raw.tokenizer_source.is_some() {
        return Err(config_err(source, "tokenizer and tokenizer_source: give one of them, not both (as mergekit)"));
    }
    if let Some(slices) = &raw.slices
        && slices.iter().any(|s| s.residual_weight.is_some())
    {
        tracing::warn!("slices[].residual_weight is ignored (mergekit 0.1.5 ignores it too)");
    }
    Ok(())
}

/// `dtype` and `out_dtype`: the output gets `out_dtype`, else `dtype`, else each tensor's own.
fn parse_dtypes(raw: &RawConfig, source: &Path) -> Result<(Option<FloatDType>, Option<FloatDType>)> {
    let parse = |d: &Option<String>, key: &str| {
        d.as_deref().map(|d| d.parse::<FloatDType>().map_err(|e| config_err(source, format!("{key}: {e}")))).transpose()
    };
    let compute = parse(&raw.dtype, "dtype")?;
    let out = parse(&raw.out_dtype, "out_dtype")?;
    Ok((out.or(compute), compute))
}

/// The `models` form: every model with its checked parameters; the base, when the method
/// subtracts it, is left out (mergekit configs often list it among the models), and added last
/// when the method merges weights and `models` leaves it out (mergekit's rule), which the
/// `bool` says.
fn parse_models(
    method: &'static MethodDef,
    raw: Vec<RawModel>,
    base_model: Option<&Path>,
    base_dir: &Path,
    source: &Path,
    prefix: &str,
) -> Result<(Vec<ModelEntry>, bool)> {
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
    let mut seen: Vec<PathBuf> = Vec::new();
    for (i, mut m) in raw.into_iter().enumerate() {
        let path = locate_model(&m.model, base_dir, source, &format!("{prefix}models[{i}].model"))?;
        // mergekit refuses a model listed twice ("Duplicate merge inputs"); merged anyway, its
        // task vector would count twice (its weights summed), which no config means.
        if let Some(j) = seen.iter().position(|p| same_path(p, &path)) {
            return Err(config_err(
                source,
                format!("{prefix}models[{i}].model: {} is models[{j}] already; list each model once", path.display()),
            ));
        }
        seen.push(path.clone());
        check_model_params(method, &mut m.parameters, source, &format!("{prefix}models[{i}]"), &path)?;
        if method.uses_base() && base_model.is_some_and(|b| same_path(b, &path)) {
            continue;
        }
        models.push(ModelEntry { path, parameters: m.parameters });
    }
    // mergekit merges a base_model that `models` leaves out as one more model, last, with no
    // parameters of its own; a method that subtracts no base would otherwise drop it silently.
    let added = base_model.filter(|b| !method.uses_base() && !seen.iter().any(|p| same_path(p, b)));
    if let Some(b) = added {
        models.push(ModelEntry { path: b.to_path_buf(), parameters: BTreeMap::new() });
    }
    check_model_count(method, models.len(), source, prefix).map_err(|e| match (e, added) {
        (Error::Config { path, reason }, Some(_)) => Error::Config { path, reason: format!("{reason}{BASE_ADDED}") },
        (e, _) => e,
    })?;
    Ok((models, added.is_some()))
}

/// Said where a base_model counts as one more merged model (the `bool` [`parse_models`] returns).
const BASE_ADDED: &str = " (the base_model counts: mergekit merges a base_model that `models` does not list as one \
                          more model)";

/// The `slices` form, checked as mergekit checks it: sources of one slice span equally many
/// layers and are distinct models; a base the method uses is one of each slice's sources.
/// Slices may merge different numbers of models (each tensor is merged over its own slice's
/// sources); the tensors after the layer stack must be mergeable from the last slice's sources
/// that take part in them (see [`SliceDef::in_tail`]). With a method whose base is optional,
/// some slices may merge with a base and others without, each tensor as its slice says.
fn parse_slices(
    method: &'static MethodDef,
    raw: Vec<RawSlice>,
    base_model: Option<&Path>,
    base_dir: &Path,
    source: &Path,
    prefix: &str,
) -> Result<Vec<SliceDef>> {
    if raw.is_empty() {
        return Err(config_err(source, format!("{prefix}slices: lists no slice")));
    }
    let mut out: Vec<SliceDef> = Vec::with_capacity(raw.len());
    for (i, mut s) in raw.into_iter().enumerate() {
        let here = format!("{prefix}slices[{i}]");
        let slice_base = s
            .base_model
            .as_deref()
            .map(|p| locate_model(p, base_dir, source, &format!("{here}.base_model")))
            .transpose()?;
        let base = if method.uses_base() { slice_base.as_deref().or(base_model) } else { None };
        check_params(method, &mut s.parameters, source, &format!("{here}.parameters"))?;
        if let Some(key) = s.parameters.keys().find(|k| method.param(k).is_some_and(|p| p.kind == Kind::Path)) {
            return Err(config_err(
                source,
                format!(
                    "{here}.parameters.{key}: `{key}` holds for the whole merge; set it in the top-level `parameters`"
                ),
            ));
        }
        let mut slice = parse_slice(method, s, base, base_dir, source, &here)?;
        slice.base_model = slice_base.or_else(|| base_model.map(Path::to_path_buf));
        out.push(slice);
    }
    check_tail(&out, source)?;
    Ok(out)
}

/// The tensors after the layer stack merge the last slice's sources that [`SliceDef::in_tail`]
/// keeps, which must include its base (mergekit fails on such a config too, but only once it
/// reaches those tensors). They are as many as the first slice's sources, so the method takes
/// their number of models.
fn check_tail(slices: &[SliceDef], source: &Path) -> Result<()> {
    let (Some(first), Some(last)) = (slices.first(), slices.last()) else { return Ok(()) };
    let n0 = first.sources.len();
    if !last.has_base || last.in_tail(0, n0) {
        return Ok(());
    }
    Err(config_err(
        source,
        format!(
            "slices[{}].sources[{}]: the base model {} is not among the first {n0} source(s) of the last slice as written, \
             over which mergekit merges the final norm and head (slices[0] has {n0}); list it earlier",
            slices.len() - 1,
            last.sources[0].written,
            last.sources[0].model.path.display()
        ),
    ))
}

/// One slice: its sources located and checked, the base moved first.
fn parse_slice(
    method: &'static MethodDef,
    s: RawSlice,
    base: Option<&Path>,
    base_dir: &Path,
    source: &Path,
    here: &str,
) -> Result<SliceDef> {
    let mut sources = Vec::with_capacity(s.sources.len());
    for (j, mut src) in s.sources.into_iter().enumerate() {
        let at = format!("{here}.sources[{j}]");
        let path = locate_model(&src.model, base_dir, source, &format!("{at}.model"))?;
        check_model_params(method, &mut src.parameters, source, &at, &path)?;
        let [a, b] = src.layer_range;
        // An empty range (`[n, n]`) adds no layer, as in mergekit; its sources still merge
        // the embeddings (first slice) or the final norm and head (last slice).
        if a > b {
            return Err(config_err(source, format!("{at}.layer_range: [{a}, {b}] ends before it starts")));
        }
        if sources.iter().any(|x: &SourceDef| same_path(&x.model.path, &path)) {
            return Err(config_err(source, format!("{at}.model: {} is already a source of {here}", path.display())));
        }
        sources.push(SourceDef { model: ModelEntry { path, parameters: src.parameters }, layers: (a, b), written: j });
    }
    let Some(first) = sources.first() else {
        return Err(config_err(source, format!("{here}.sources: lists no model")));
    };
    let len = first.layers.1 - first.layers.0;
    if let Some((j, s)) = sources.iter().enumerate().find(|(_, s)| s.layers.1 - s.layers.0 != len) {
        return Err(config_err(
            source,
            format!("{here}.sources[{j}].layer_range spans {} layers, sources[0] spans {len}", s.layers.1 - s.layers.0),
        ));
    }
    let base_at = match base {
        Some(b) => Some(sources.iter().position(|s| same_path(&s.model.path, b)).ok_or_else(|| {
            config_err(source, format!("{here}: the base model {} is not one of the slice's sources", b.display()))
        })?),
        None if method.needs_base() => {
            return Err(config_err(source, format!("{here}: merge_method `{}` needs `base_model`", method.name)));
        }
        None => None,
    };
    if let Some(k) = base_at {
        let b = sources.remove(k);
        sources.insert(0, b);
    }
    let has_base = base_at.is_some();
    let experts: Vec<ModelEntry> = sources[usize::from(has_base)..].iter().map(|s| s.model.clone()).collect();
    check_model_count(method, experts.len(), source, &format!("{here}: "))?;
    Ok(SliceDef { sources, has_base, experts, parameters: s.parameters, base_model: None })
}

/// A model's (or source's) `parameters`: per-model parameters of the method, of the right kind.
fn check_model_params(
    method: &MethodDef,
    params: &mut BTreeMap<String, ParamValue>,
    source: &Path,
    at: &str,
    path: &Path,
) -> Result<()> {
    let per_model = |key: &str| method.param(key).filter(|p| p.scope == Scope::PerModel);
    let why = |key: &str| {
        let names: Vec<&str> = method.params.iter().filter(|p| p.scope == Scope::PerModel).map(|p| p.name).collect();
        let names = if names.is_empty() { "none".to_string() } else { names.join(", ") };
        format!("{at}.parameters.{key}: `{}` takes no per-model parameter `{key}` (supported: {names})", method.name)
    };
    drop_foreign(params, |k| per_model(k).is_some(), why, source)?;
    for (key, v) in params.iter_mut() {
        let spec = per_model(key).expect("foreign parameters dropped");
        check_value(spec, v)
            .map_err(|e| config_err(source, format!("{at}.parameters.{key} ({}): {e}", path.display())))?;
    }
    Ok(())
}

/// A top-level or slice `parameters` block: parameters of the method, of the right kind.
fn check_params(method: &MethodDef, params: &mut BTreeMap<String, ParamValue>, source: &Path, at: &str) -> Result<()> {
    let why = |key: &str| {
        format!("{at}.{key}: `{}` has no parameter `{key}` (supported: {})", method.name, method.param_names())
    };
    drop_foreign(params, |k| method.param(k).is_some(), why, source)?;
    for (key, v) in params.iter_mut() {
        let spec = method.param(key).expect("foreign parameters dropped");
        check_value(spec, v).map_err(|e| config_err(source, format!("{at}.{key}: {e}")))?;
    }
    Ok(())
}

/// Parameters the method cannot use where they are written: mergekit ignores them, and a config
/// written for one method often carries another's (`density` left under `task_arithmetic`), so
/// a name some method takes is dropped with a warning; a name no method knows (a typo) is an
/// error, `why` saying what the method takes.
fn drop_foreign(
    params: &mut BTreeMap<String, ParamValue>,
    usable: impl Fn(&str) -> bool,
    why: impl Fn(&str) -> String,
    source: &Path,
) -> Result<()> {
    let foreign: Vec<String> = params.keys().filter(|k| !usable(k)).cloned().collect();
    for key in foreign {
        if !super::registry::any_method_takes(&key) {
            return Err(config_err(source, format!("{}; no merge method takes `{key}`", why(&key))));
        }
        tracing::warn!("{}: ignored, as mergekit ignores it", why(&key));
        params.remove(&key);
    }
    Ok(())
}

/// A parameter without a default must be given for every model: at the top level, for the
/// slice, or (per-model ones) by every model. As in mergekit ("Missing required parameter
/// weight for <model>"), the error names the first model left without one.
fn check_required(
    method: &MethodDef,
    global: &BTreeMap<String, ParamValue>,
    slice: &BTreeMap<String, ParamValue>,
    models: &[ModelEntry],
    added_base: Option<&Path>,
    source: &Path,
    at: &str,
) -> Result<()> {
    for spec in method.params.iter().filter(|p| is_required(p, global)) {
        if global.contains_key(spec.name) || slice.contains_key(spec.name) {
            continue;
        }
        let needs = format!("{at}parameters.{}: `{}` needs `{}` ({})", spec.name, method.name, spec.name, spec.doc);
        if spec.scope == Scope::Global {
            return Err(config_err(source, needs));
        }
        if let Some(m) = models.iter().find(|m| !m.parameters.contains_key(spec.name)) {
            let why = format!(
                "{needs}, and model {} has none (mergekit 0.1.5 refuses it too: \"Missing required parameter {}\"); \
                 give it under the model's, the slice's or the top-level `parameters`{}",
                m.path.display(),
                spec.name,
                if added_base.is_some_and(|b| same_path(b, &m.path)) { BASE_ADDED } else { "" }
            );
            return Err(config_err(source, why));
        }
    }
    Ok(())
}

/// Whether `spec` must be given. A Lambda table (symerge's own `lambda_table`, which mergekit
/// does not know) sets the weights itself, so under one `weight` stays optional, 1 for the
/// tensors the table leaves out.
fn is_required(spec: &ParamSpec, global: &BTreeMap<String, ParamValue>) -> bool {
    spec.default == Fallback::Required && !(spec.name == "weight" && global.contains_key("lambda_table"))
}

/// A Lambda table whose entries each hold one finite coefficient per merged model.
fn load_lambda_table(path: &Path, models: usize) -> Result<LambdaTable> {
    let table = LambdaTable::load(path)?;
    if let Some(names) = &table.models
        && names.len() != models
    {
        return Err(config_err(path, format!("the table names {} models but the config merges {models}", names.len())));
    }
    if let Some(experts) = &table.experts
        && experts.len() != models
    {
        return Err(config_err(
            path,
            format!("the table records {} experts but the config merges {models}", experts.len()),
        ));
    }
    for (name, values) in &table.lambda {
        if values.len() != models {
            return Err(config_err(
                path,
                format!("entry `{name}` has {} coefficients but the config merges {models} experts", values.len()),
            ));
        }
        if let Some(x) = values.iter().find(|x| !x.is_finite()) {
            return Err(config_err(path, format!("entry `{name}` holds {x}, not a finite number")));
        }
    }
    Ok(table)
}

/// Where a relative path in a merge config points. mergekit reads it from the working directory,
/// symerge's README from the config's folder: the working directory wins when the path exists
/// there, else the config's folder. A path that names two different files or folders, one in
/// each place, is refused: the same config would merge different models depending on where it
/// runs.
fn resolve_relative(p: &str, base_dir: &Path) -> std::result::Result<PathBuf, String> {
    let path = PathBuf::from(p);
    if path.is_absolute() {
        return Ok(crate::input_file::clean(&path));
    }
    let beside_config = crate::input_file::clean(&base_dir.join(&path));
    if !path.exists() {
        return Ok(beside_config);
    }
    let here = crate::input_file::clean(&path);
    let same = match (std::fs::canonicalize(&here), std::fs::canonicalize(&beside_config)) {
        (Ok(a), Ok(b)) => a == b,
        _ => true,
    };
    if same {
        return Ok(here);
    }
    let here = std::env::current_dir().map(|d| crate::input_file::clean(&d.join(&here))).unwrap_or(here);
    Err(format!(
        "`{p}` names two different paths: {} from the working directory (where mergekit reads it) and \
         {} beside the config; write an absolute path, or run from the config's folder",
        here.display(),
        beside_config.display()
    ))
}

/// A model path as given: relative ones resolved by [`resolve_relative`]; mergekit's
/// `model+lora` form resolves both parts, which must exist ([`crate::checkpoint::lora`]).
/// Hub ids are not downloaded.
fn locate_model(p: &str, base_dir: &Path, source: &Path, field: &str) -> Result<PathBuf> {
    if p.trim().is_empty() || p.trim_end_matches('+').is_empty() {
        // An empty path would resolve to the config's own folder.
        return Err(config_err(source, format!("{field}: `{p}` names no model")));
    }
    let resolve = |q: &str| resolve_relative(q, base_dir).map_err(|e| config_err(source, format!("{field}: {e}")));
    let path = resolve(p)?;
    if path.exists() {
        return Ok(path);
    }
    // mergekit's `path@revision`: the revision of a local model is ignored, as mergekit does.
    if let Some((model, rev)) = p.split_once('@').filter(|(m, r)| !r.contains('@') && !m.is_empty() && !r.is_empty())
        && !p.contains('+')
    {
        let local = resolve(model)?;
        if local.exists() {
            tracing::warn!("{field}: `{p}` is the local model {} (revision `{rev}` ignored)", local.display());
            return Ok(local);
        }
    }
    let mut lora = Vec::new();
    for (i, _) in p.match_indices('+') {
        lora.push((resolve(&p[..i])?, resolve(&p[i + 1..])?));
    }
    if let Some((m, a)) = lora.iter().find(|(m, a)| m.exists() && a.exists()) {
        return Ok(PathBuf::from(format!("{}+{}", m.display(), a.display())));
    }
    let dir = if base_dir.as_os_str().is_empty() { Path::new(".") } else { base_dir };
    let what = match lora.first() {
        Some((m, a)) => format!(
            "`{p}` is neither a local file or directory nor a model+lora pair of them ({} {}, {} {})",
            m.display(),
            if m.exists() { "exists" } else { "does not exist" },
            a.display(),
            if a.exists() { "exists" } else { "does not exist" }
        ),
        None => format!("`{p}` is not a local file or directory"),
    };
    Err(config_err(
        source,
        format!(
            "{field}: {what} (looked in the working directory and in {}); symerge never downloads models",
            dir.display()
        ),
    ))
}

/// Checks a parameter's value has the kind its method declares.
fn check_value(spec: &ParamSpec, v: &mut ParamValue) -> std::result::Result<(), String> {
    if matches!(spec.kind, Kind::Number | Kind::Count) {
        v.coerce_numeric();
    }
    if spec.kind == Kind::Bool {
        v.coerce_bool();
    }
    let per_tensor = matches!(v, ParamValue::Filtered(_) | ParamValue::Gradient(_));
    match spec.kind {
        // mergekit resolves these per tensor too; symerge builds the method once per merge, so
        // one value everywhere would be a silently different merge.
        Kind::Bool | Kind::Count if per_tensor => Err(format!(
            "a filtered list or gradient: symerge takes one value of `{}` for the whole merge (mergekit \
             resolves it per tensor, which symerge does not); give one value",
            spec.name
        )),
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
fn check_model_count(method: &MethodDef, n: usize, source: &Path, at: &str) -> Result<()> {
    let besides = if method.uses_base() { " besides the base model" } else { "" };
    if n == 0 {
        return Err(config_err(source, format!("{at}`models` lists no model to merge{besides}")));
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
            format!("{at}models: `{}` merges {w} model(s){besides}, the config lists {n}", method.name),
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `yaml` with `{a}`, `{b}`, ... replaced by empty model directories (parsing only
    /// checks that models exist).
    fn parse(yaml: &str) -> Result<MergeConfig> {
        let dir = tempfile::tempdir().unwrap();
        let mut text = yaml.to_string();
        for m in ["base", "a", "b", "c"] {
            std::fs::create_dir(dir.path().join(m)).unwrap();
            text = text.replace(&format!("{{{m}}}"), dir.path().join(m).to_str().unwrap());
        }
        MergeConfig::parse(&text, &dir.path().join("merge.yml"))
    }

    const FRANKEN: &str = "merge_method: linear
slices:
  - sources:
      - {model: '{a}', layer_range: [0, 1], parameters: {weight: 0.3}}
      - {model: '{b}', layer_range: [0, 1], parameters: {weight: 0.7}}
  - sources:
      - {model: '{c}', layer_range: [1, 2], parameters: {weight: 2.0}}
";

    #[test]
    fn slices_may_merge_different_numbers_of_models() {
        let c = parse(FRANKEN).unwrap();
        let counts: Vec<usize> = c.slices.iter().map(|s| s.experts.len()).collect();
        assert_eq!(counts, [2, 1]);
        assert!(c.slices[1].in_tail(0, 2));
        let p = c.tensor_params_in(1, "model.layers.1.mlp.up_proj.weight", "model.layers.1", 0.0).unwrap();
        assert_eq!(p.weights, [2.0]);
    }

    /// The final norm and head take the last slice's first sources as written, as many as the
    /// first slice has; their weights are those models' only.
    #[test]
    fn the_tail_takes_the_last_slices_first_sources_as_written() {
        let yaml = "merge_method: task_arithmetic
base_model: '{base}'
slices:
  - sources:
      - {model: '{base}', layer_range: [0, 2]}
      - {model: '{a}', layer_range: [0, 2], parameters: {weight: 0.5}}
  - sources:
      - {model: '{b}', layer_range: [1, 2], parameters: {weight: 0.25}}
      - {model: '{base}', layer_range: [1, 2]}
      - {model: '{c}', layer_range: [1, 2], parameters: {weight: 0.75}}
";
        let c = parse(yaml).unwrap();
        let last = &c.slices[1];
        let written: Vec<usize> = last.sources.iter().map(|s| s.written).collect();
        assert_eq!(written, [1, 0, 2], "the base first in merge order");
        let tail: Vec<bool> = (0..3).map(|p| last.in_tail(p, 2)).collect();
        assert_eq!(tail, [true, true, false]);
        let p = c.tensor_params_among(1, &[0], "model.norm.weight", "model.norm", 0.0).unwrap();
        assert_eq!(p.weights, [0.25]);
        assert_eq!(c.tensor_params_in(1, "x", "x", 0.0).unwrap().weights, [0.25, 0.75]);
    }

    #[test]
    fn a_base_outside_the_tail_is_refused_naming_its_source() {
        let yaml = "merge_method: task_arithmetic
base_model: '{base}'
parameters: {weight: 1.0}
slices:
  - sources:
      - {model: '{base}', layer_range: [0, 2]}
      - {model: '{a}', layer_range: [0, 2]}
  - sources:
      - {model: '{b}', layer_range: [1, 2]}
      - {model: '{c}', layer_range: [1, 2]}
      - {model: '{base}', layer_range: [1, 2]}
";
        let e = parse(yaml).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("slices[1].sources[2]: the base model"), "{e}");
        assert!(e.contains("first 2 source(s) of the last slice"), "{e}");
    }

    const MIXED: &str = "merge_method: multislerp
parameters: {weight: 1.0}
slices:
  - sources:
      - {model: '{a}', layer_range: [0, 1], parameters: {weight: 0.25}}
      - {model: '{b}', layer_range: [0, 1]}
  - base_model: '{base}'
    sources:
      - {model: '{c}', layer_range: [1, 2], parameters: {weight: 0.5}}
      - {model: '{base}', layer_range: [1, 2]}
      - {model: '{a}', layer_range: [1, 2]}
";

    /// As in mergekit, a method whose base is optional may merge some slices with a base and
    /// others without: each slice keeps its own base, its own merged models and its own method.
    #[test]
    fn slices_may_merge_with_and_without_a_base() {
        let c = parse(MIXED).unwrap();
        let bases: Vec<bool> = c.slices.iter().map(|s| s.has_base).collect();
        assert_eq!(bases, [false, true]);
        assert_eq!((c.has_base_in(0), c.has_base_in(1)), (false, true));
        assert!(c.slices[1].sources[0].model.path.ends_with("base"), "the base first in merge order");
        let experts: Vec<usize> = c.slices.iter().map(|s| s.experts.len()).collect();
        assert_eq!(experts, [2, 2]);
        let t = "model.layers.0.mlp.up_proj.weight";
        assert_eq!(c.tensor_params_in(0, t, "model.layers.0", 0.0).unwrap().weights, [0.25, 1.0]);
        assert_eq!(c.tensor_params_in(1, t, "model.layers.1", 0.0).unwrap().weights, [0.5, 1.0]);
        let methods = c.build_methods();
        let subtracts: Vec<bool> = methods.iter().map(|m| m.needs_base()).collect();
        assert_eq!(subtracts, [false, true]);
    }

    /// Fuzzing round 4: a model listed twice merged with its weights summed; mergekit refuses
    /// it ("Duplicate merge inputs"). Another spelling of the same directory is the same model.
    #[test]
    fn a_model_listed_twice_is_refused() {
        let yaml = "merge_method: task_arithmetic
base_model: '{base}'
models:
  - {model: '{a}', parameters: {weight: 0.3}}
  - {model: '{b}', parameters: {weight: 0.5}}
  - {model: '{a}/.', parameters: {weight: 0.9}}
";
        let e = parse(yaml).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("models[2].model:") && e.contains("is models[0] already"), "{e}");
        // The base among the models, once, is still the usual mergekit habit.
        let listed = "merge_method: task_arithmetic
base_model: '{base}'
models:
  - {model: '{base}'}
  - {model: '{a}', parameters: {weight: 0.3}}
";
        assert_eq!(parse(listed).unwrap().models.len(), 1);
    }

    /// The `models` form asks the top-level base; a slices config without any base builds one
    /// baseless method per slice.
    #[test]
    fn has_base_in_follows_the_form() {
        let models = "merge_method: nuslerp
base_model: '{base}'
models:
  - {model: '{a}', parameters: {weight: 0.5}}
  - {model: '{b}', parameters: {weight: 0.5}}
";
        let c = parse(models).unwrap();
        assert!(c.has_base_in(0));
        assert_eq!(c.build_methods().len(), 1);
        let c = parse(FRANKEN).unwrap();
        assert_eq!((c.has_base_in(0), c.has_base_in(1)), (false, false));
        assert_eq!(c.build_methods().len(), 2);
    }

    /// Mixing is no excuse to skip the other checks: a slice's base must still be one of its
    /// sources, named by the slice's path.
    #[test]
    fn a_mixed_slice_without_its_base_among_its_sources_is_refused() {
        let yaml = MIXED.replace("      - {model: '{base}', layer_range: [1, 2]}\n", "");
        let e = parse(&yaml).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("slices[1]: the base model"), "{e}");
        assert!(e.contains("is not one of the slice's sources"), "{e}");
    }

    /// The final norm and head merge with the last slice's base, which must be among its
    /// first sources as written (as many as the first slice has).
    #[test]
    fn a_mixed_last_slice_base_outside_the_tail_is_refused() {
        let yaml = "merge_method: multislerp
parameters: {weight: 1.0}
slices:
  - sources:
      - {model: '{a}', layer_range: [0, 1]}
  - base_model: '{base}'
    sources:
      - {model: '{c}', layer_range: [1, 2]}
      - {model: '{base}', layer_range: [1, 2]}
";
        let e = parse(yaml).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("slices[1].sources[1]: the base model"), "{e}");
    }
}
