//! The learned merge coefficients Lambda: one row of K values (one per task) for each parameter
//! tensor (the released SyMerge/AdaMerging granularity) or for each block.
//!
//! Saved as the Lambda table that `symerge merge` reads (`parameters.lambda_table` of a
//! `task_arithmetic` config), so the merged model of an adaptation run can be rebuilt, or
//! re-merged in another dtype, by the training-free engine.

use std::collections::HashMap;
use std::path::Path;

use serde_json::json;

use super::config::AdaptConfig;
use crate::atomic::write_atomic;
use crate::error::{Error, Result};
use crate::labels::fingerprint::model_sketch;
use crate::merge::config::RecordedModel;

/// What one row of Lambda covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    Tensor,
    Block,
}

impl std::str::FromStr for Granularity {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "tensor" => Ok(Granularity::Tensor),
            "block" => Ok(Granularity::Block),
            other => Err(format!("unknown Lambda granularity `{other}` (tensor, block)")),
        }
    }
}

/// Lambda: `keys.len()` rows of `models.len()` coefficients.
#[derive(Debug, Clone)]
pub struct Lambda {
    pub granularity: Granularity,
    /// The task models, in coefficient order.
    pub models: Vec<String>,
    /// Tensor or block names, in model order.
    pub keys: Vec<String>,
    /// Row-major `[keys, models]`.
    pub values: Vec<f32>,
    index: HashMap<String, usize>,
}

impl Lambda {
    /// Every coefficient set to `init` (0.3 in the papers).
    pub fn new(granularity: Granularity, models: Vec<String>, keys: Vec<String>, init: f32) -> Self {
        let index = keys.iter().enumerate().map(|(i, k)| (k.clone(), i)).collect();
        let values = vec![init; keys.len() * models.len()];
        Lambda { granularity, models, keys, values, index }
    }

    pub fn tasks(&self) -> usize {
        self.models.len()
    }

    /// The row index of a tensor of block `block` (by this Lambda's granularity).
    pub fn row_of(&self, tensor: &str, block: &str) -> Option<usize> {
        let key = match self.granularity {
            Granularity::Tensor => tensor,
            Granularity::Block => block,
        };
        self.index.get(key).copied()
    }

    /// The K coefficients of row `r`.
    pub fn row(&self, r: usize) -> &[f32] {
        let k = self.tasks();
        &self.values[r * k..(r + 1) * k]
    }

    /// Keeps every coefficient in `[lo, hi]`, projected after each step. (The released code
    /// clamps where Lambda is used instead and keeps the raw values; README, "Clamping".)
    pub fn clamp(&mut self, lo: f32, hi: f32) {
        self.values.iter_mut().for_each(|v| *v = v.clamp(lo, hi));
    }

    /// BLAKE3 of the coefficients' bits: equal on every rank iff the ranks agree exactly.
    pub fn hash(&self) -> String {
        blake3::Hash::from_bytes(self.digest()).to_hex().to_string()
    }

    /// The raw 32 bytes behind [`Lambda::hash`].
    pub fn digest(&self) -> [u8; 32] {
        let bytes: Vec<u8> = self.values.iter().flat_map(|v| v.to_le_bytes()).collect();
        *blake3::hash(&bytes).as_bytes()
    }

    /// The Lambda table JSON `symerge merge` reads.
    pub fn to_json(&self) -> serde_json::Value {
        let table: serde_json::Map<String, serde_json::Value> =
            self.keys.iter().enumerate().map(|(r, key)| (key.clone(), json!(self.row(r)))).collect();
        json!({"granularity": self.granularity, "models": self.models, "lambda": table})
    }

    /// Writes the table to `path` atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        write_json(path, &self.to_json())
    }

    /// [`Lambda::save`] with the models the table was learned from: `base` and `experts` in
    /// column order, by path and content sketch, so `merge` can refuse a config that lists the
    /// experts in another order (which would give each expert another task's coefficients).
    pub fn save_with_models(&self, path: &Path, base: &RecordedModel, experts: &[RecordedModel]) -> Result<()> {
        let mut table = self.to_json();
        table["base"] = json!(base);
        table["experts"] = json!(experts);
        write_json(path, &table)
    }
}

/// The base and the experts of `cfg` (in task order) as a Lambda table records them.
pub fn recorded_models(cfg: &AdaptConfig) -> Result<(RecordedModel, Vec<RecordedModel>)> {
    let record = |task: Option<&str>, path: &Path| -> Result<RecordedModel> {
        let fingerprint = model_sketch(path)?;
        Ok(RecordedModel { task: task.map(str::to_string), path: path.to_path_buf(), fingerprint })
    };
    let base = record(None, &cfg.base_model)?;
    let experts = cfg.tasks.iter().map(|t| record(Some(&t.name), &t.expert)).collect::<Result<Vec<_>>>()?;
    Ok((base, experts))
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Invalid(e.to_string()))?;
    write_atomic(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::config::LambdaTable;

    #[test]
    fn rows_by_granularity_and_table_round_trip() {
        let models = vec!["a".to_string(), "b".to_string()];
        let keys = vec!["encoder.layer.0.w".to_string(), "encoder.layer.1.w".to_string()];
        let mut l = Lambda::new(Granularity::Tensor, models.clone(), keys, 0.3);
        assert_eq!(l.row_of("encoder.layer.1.w", "encoder.layer.1"), Some(1));
        assert_eq!(l.row_of("missing", "encoder.layer.1"), None);
        l.values = vec![0.1, -0.5, 1.7, 0.4];
        l.clamp(0.0, 1.0);
        assert_eq!(l.values, vec![0.1, 0.0, 1.0, 0.4]);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lambda.json");
        l.save(&path).unwrap();
        let table = LambdaTable::load(&path).unwrap();
        assert_eq!(table.models.as_deref(), Some(&models[..]));
        assert_eq!(table.lambda["encoder.layer.1.w"], vec![1.0, 0.4f32 as f64]);

        let b = Lambda::new(Granularity::Block, models, vec!["encoder.layer.0".into()], 0.3);
        assert_eq!(b.row_of("encoder.layer.0.attention.self.query.weight", "encoder.layer.0"), Some(0));
        assert_ne!(b.hash(), l.hash());
    }
}
