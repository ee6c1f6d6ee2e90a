//! The method registry: one [`MethodDef`] value per method carries its name, its parameters
//! (scope, kind, default, allowed range), what inputs it takes and how to build it, so the
//! config validates and resolves every method the same way. Adding a method is one file
//! holding its `DEF` plus one line in [`METHODS`].

use std::collections::BTreeMap;

use super::TensorParams;
use super::params::ParamValue;
use super::{
    MergeMethod, arcee_fusion, breadcrumbs, dare, della, karcher, linear, model_stock, multislerp, nearswap, nuslerp,
    passthrough, ram, sce, slerp, task_arithmetic, ties,
};

/// Every method, in the order `symerge methods` lists them.
pub const METHODS: &[&MethodDef] = &[
    &linear::DEF,
    &task_arithmetic::DEF,
    &ties::DEF,
    &dare::DEF_LINEAR,
    &dare::DEF_TIES,
    &breadcrumbs::DEF,
    &breadcrumbs::DEF_TIES,
    &della::DEF,
    &della::DEF_LINEAR,
    &slerp::DEF,
    &model_stock::DEF,
    &nearswap::DEF,
    &passthrough::DEF,
    &sce::DEF,
    &nuslerp::DEF,
    &multislerp::DEF,
    &karcher::DEF,
    &arcee_fusion::DEF,
    &ram::DEF,
    &ram::DEF_PLUS,
];

/// Looks a method up by name.
pub fn method_def(name: &str) -> Option<&'static MethodDef> {
    METHODS.iter().copied().find(|m| m.name == name)
}

/// Whether any registered method takes a parameter called `name`.
pub fn any_method_takes(name: &str) -> bool {
    METHODS.iter().any(|m| m.param(name).is_some())
}

/// Names of all methods, comma separated (for error messages).
pub fn method_names() -> String {
    METHODS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
}

/// Where a parameter may be written (`symerge methods --json`: `global` or `per_model`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Only under the config's top-level `parameters`.
    Global,
    /// Under each model's `parameters`; a top-level value is the default for every model.
    PerModel,
}

/// What a parameter's value must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Bool,
    /// A number, a gradient over layers or a filtered list: resolved per tensor.
    Number,
    /// A whole number >= 0 fixed for the whole merge (seeds, iteration counts).
    Count,
    /// A file path.
    Path,
}

/// A parameter's value when the config does not give one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fallback {
    Bool(bool),
    Number(f64),
    /// The method has no value to fall back on: the config must give one.
    Required,
    /// Absent means "not used" (a Lambda table, passthrough's scale).
    Unset,
}

/// One parameter of one method.
#[derive(Debug, Clone, Copy)]
pub struct ParamSpec {
    pub name: &'static str,
    pub scope: Scope,
    pub kind: Kind,
    pub default: Fallback,
    /// Inclusive bounds checked on every resolved value.
    pub range: Option<(f64, f64)>,
    pub doc: &'static str,
}

impl ParamSpec {
    pub const fn global(name: &'static str, kind: Kind, default: Fallback, doc: &'static str) -> Self {
        ParamSpec { name, scope: Scope::Global, kind, default, range: None, doc }
    }

    pub const fn per_model(name: &'static str, default: Fallback, doc: &'static str) -> Self {
        ParamSpec { name, scope: Scope::PerModel, kind: Kind::Number, default, range: None, doc }
    }

    pub const fn within(mut self, lo: f64, hi: f64) -> Self {
        self.range = Some((lo, hi));
        self
    }
}

/// Whether a method subtracts a base model (`symerge methods --json`: `required`, `unused` or
/// `optional`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BasePolicy {
    /// Works on task vectors: `base_model` is required and is never among the merged models.
    Required,
    /// Works on the models' weights; a `base_model` names the output's tensors and side files,
    /// and is merged as one more model when `models` does not list it (mergekit's rule).
    Unused,
    /// Works on task vectors when a `base_model` is given, on the weights otherwise.
    Optional,
}

/// Everything the registry knows about a method.
pub struct MethodDef {
    pub name: &'static str,
    pub summary: &'static str,
    pub base: BasePolicy,
    /// How many models are merged (besides the base): at least `min_models`, at most
    /// `max_models` when given.
    pub min_models: usize,
    pub max_models: Option<usize>,
    pub params: &'static [ParamSpec],
    /// Checks one tensor's resolved parameters beyond each one's range (relations between
    /// them); the error names the parameter.
    pub validate: fn(&TensorParams) -> Result<(), String>,
    /// Builds the method from the config's merge-wide settings.
    pub build: fn(&Settings<'_>) -> Box<dyn MergeMethod>,
}

impl std::fmt::Debug for MethodDef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MethodDef").field("name", &self.name).finish_non_exhaustive()
    }
}

impl MethodDef {
    pub fn needs_base(&self) -> bool {
        self.base == BasePolicy::Required
    }

    /// Whether a given `base_model` is subtracted (and so is not among the merged models).
    pub fn uses_base(&self) -> bool {
        self.base != BasePolicy::Unused
    }

    pub fn param(&self, name: &str) -> Option<&'static ParamSpec> {
        self.params.iter().find(|p| p.name == name)
    }

    /// The parameter names, comma separated (for error messages).
    pub fn param_names(&self) -> String {
        self.params.iter().map(|p| p.name).collect::<Vec<_>>().join(", ")
    }
}

/// The values a method is built from: booleans and counts, with the registry's defaults
/// filled in. A slice's own `parameters` come before the top level's, as in mergekit, where a
/// slice's `normalize` holds for that slice's tensors.
pub struct Settings<'a> {
    pub def: &'static MethodDef,
    pub values: &'a BTreeMap<String, ParamValue>,
    /// The slice's `parameters` (none for the `models` form).
    pub slice: Option<&'a BTreeMap<String, ParamValue>>,
    /// The config names a `base_model`.
    pub has_base: bool,
}

impl Settings<'_> {
    /// The value given for `name`: the slice's, else the top level's.
    fn given(&self, name: &str) -> Option<&ParamValue> {
        self.slice.and_then(|s| s.get(name)).or_else(|| self.values.get(name))
    }

    /// A boolean parameter, or its default.
    pub fn flag(&self, name: &str) -> bool {
        let default = match self.def.param(name).map(|p| p.default) {
            Some(Fallback::Bool(b)) => b,
            _ => false,
        };
        self.given(name).and_then(ParamValue::as_bool).unwrap_or(default)
    }

    /// A whole-number parameter, or its default (validated as a count when the config loaded).
    pub fn count(&self, name: &str) -> u64 {
        let default = match self.def.param(name).map(|p| p.default) {
            Some(Fallback::Number(x)) => x as u64,
            _ => 0,
        };
        match self.given(name) {
            Some(ParamValue::Number(x)) => *x as u64,
            _ => default,
        }
    }
}

/// Parameters shared by the generalized-task-arithmetic family.
pub const LAMBDA: ParamSpec =
    ParamSpec::global("lambda", Kind::Number, Fallback::Number(1.0), "scale of the mixed delta");
/// Required, as in mergekit 0.1.5 ("Missing required parameter weight"): a model without a
/// weight is more likely a forgotten line than a wish for 1.
pub const WEIGHT: ParamSpec = ParamSpec::per_model("weight", Fallback::Required, "weight of the model");
pub const DENSITY: ParamSpec =
    ParamSpec::per_model("density", Fallback::Number(1.0), "fraction of the task vector kept").within(0.0, 1.0);
pub const INT8_MASK: ParamSpec = ParamSpec::global(
    "int8_mask",
    Kind::Bool,
    Fallback::Bool(false),
    "mergekit's int8 mask storage; symerge never stores masks, so both values give the same merge",
);
pub const SEED: ParamSpec =
    ParamSpec::global("seed", Kind::Count, Fallback::Number(0.0), "seed of the Philox random masks");

pub const fn normalize(default: bool) -> ParamSpec {
    ParamSpec::global("normalize", Kind::Bool, Fallback::Bool(default), "divide by the sum of (agreeing) weights")
}

pub const fn rescale(default: bool, doc: &'static str) -> ParamSpec {
    ParamSpec::global("rescale", Kind::Bool, Fallback::Bool(default), doc)
}

/// For methods whose parameters need no check beyond their ranges.
pub fn no_check(_: &TensorParams) -> Result<(), String> {
    Ok(())
}
