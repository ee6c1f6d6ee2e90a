//! `symerge methods`: the registry as a table or as JSON, so a script can discover every method
//! and its parameters with their defaults.

use std::fmt;

use serde::Serialize;

use super::registry::{BasePolicy, Fallback, Kind, METHODS, MethodDef, ParamSpec, Scope};

/// Every method of the registry.
#[derive(Debug, Clone, Serialize)]
pub struct Catalog {
    pub methods: Vec<MethodEntry>,
}

/// One method: what it does, what it needs, its parameters.
#[derive(Debug, Clone, Serialize)]
pub struct MethodEntry {
    pub name: &'static str,
    pub summary: &'static str,
    pub base_model: BasePolicy,
    pub min_models: usize,
    pub max_models: Option<usize>,
    pub parameters: Vec<ParamEntry>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ParamEntry {
    pub name: &'static str,
    pub doc: &'static str,
    pub scope: Scope,
    /// The value used when the config gives none; `null` when required or optional.
    pub default: Option<serde_json::Value>,
    pub required: bool,
}

/// The registry, in `symerge methods` order.
pub fn catalog() -> Catalog {
    Catalog { methods: METHODS.iter().map(|m| entry(m)).collect() }
}

fn entry(m: &MethodDef) -> MethodEntry {
    let parameters = m.params.iter().map(param).collect();
    MethodEntry {
        name: m.name,
        summary: m.summary,
        base_model: m.base,
        min_models: m.min_models,
        max_models: m.max_models,
        parameters,
    }
}

fn param(p: &ParamSpec) -> ParamEntry {
    let default = match p.default {
        Fallback::Bool(b) => Some(serde_json::json!(b)),
        // A seed or an iteration count is a whole number: `0`, not `0.0`.
        Fallback::Number(x) if p.kind == Kind::Count && x.fract() == 0.0 && x >= 0.0 => {
            Some(serde_json::json!(x as u64))
        }
        Fallback::Number(x) => Some(serde_json::json!(x)),
        Fallback::Required | Fallback::Unset => None,
    };
    ParamEntry { name: p.name, doc: p.doc, scope: p.scope, default, required: matches!(p.default, Fallback::Required) }
}

impl fmt::Display for Catalog {
    /// Columns as wide as the longest method and parameter names, so every description lines up.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name_w = self.methods.iter().map(|m| m.name.len()).max().unwrap_or(0);
        let param_w = self.methods.iter().flat_map(|m| &m.parameters).map(|p| p.name.len()).max().unwrap_or(0);
        for m in &self.methods {
            let base = match m.base_model {
                BasePolicy::Required => "needs base_model",
                BasePolicy::Optional => "base_model optional",
                BasePolicy::Unused => "a base_model not in models is one more model",
            };
            let count = match (m.min_models, m.max_models) {
                (lo, Some(hi)) if lo == hi => format!("{lo} model(s)"),
                (lo, Some(hi)) => format!("{lo}-{hi} models"),
                (lo, None) => format!("{lo}+ models"),
            };
            writeln!(f, "{:<name_w$} {} ({base}, {count})", m.name, m.summary)?;
            for p in &m.parameters {
                let scope = if p.scope == Scope::PerModel { ", per model" } else { "" };
                let default = match (&p.default, p.required) {
                    (Some(v), _) => format!("default {v}"),
                    (None, true) => "required".to_string(),
                    (None, false) => "optional".to_string(),
                };
                writeln!(f, "{:<w$} {:<param_w$} {} ({default}{scope})", "", p.name, p.doc, w = name_w + 2)?;
            }
        }
        Ok(())
    }
}
