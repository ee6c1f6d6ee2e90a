//! `symerge inspect`: what a checkpoint holds (architecture, blocks, tensors, parameters, dtypes,
//! bytes), as text or JSON.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::checkpoint::layers::architecture;
use crate::checkpoint::{BlockKind, Checkpoint, group_blocks};
use crate::error::Result;

/// One block of the layer map.
#[derive(Debug, Clone, Serialize)]
pub struct BlockInfo {
    pub name: String,
    pub kind: BlockKind,
    pub tensors: usize,
    pub params: u64,
    pub bytes: u64,
}

/// Everything `inspect` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    pub path: PathBuf,
    pub architecture: String,
    pub shards: Vec<PathBuf>,
    pub tensors: usize,
    pub params: u64,
    pub bytes: u64,
    /// Tensor count per dtype.
    pub dtypes: BTreeMap<String, usize>,
    pub layers: usize,
    pub blocks: Vec<BlockInfo>,
    /// Selected `config.json` fields (hidden size, layers, heads, vocabulary).
    pub config: BTreeMap<String, serde_json::Value>,
}

const CONFIG_KEYS: &[&str] = &[
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "max_position_embeddings",
    "torch_dtype",
];

pub fn inspect(path: &Path) -> Result<Inspection> {
    crate::input_file::require(path, crate::input_file::NamedBy::Arg("model"))?;
    let ckpt = Checkpoint::open(path)?;
    let names = || ckpt.tensors.iter().map(|t| t.name.as_str());
    let blocks: Vec<BlockInfo> = group_blocks(names())
        .into_iter()
        .map(|b| {
            let metas: Vec<_> = b.tensors.iter().filter_map(|n| ckpt.get(n)).collect();
            BlockInfo {
                params: metas.iter().map(|m| m.numel() as u64).sum(),
                bytes: metas.iter().map(|m| m.nbytes() as u64).sum(),
                tensors: metas.len(),
                name: b.name,
                kind: b.kind,
            }
        })
        .collect();
    let mut dtypes = BTreeMap::new();
    for t in &ckpt.tensors {
        *dtypes.entry(format!("{:?}", t.dtype)).or_insert(0) += 1;
    }
    let config = ckpt
        .config
        .as_ref()
        .and_then(|c| c.as_object())
        .map(|o| CONFIG_KEYS.iter().filter_map(|k| o.get(*k).map(|v| (k.to_string(), v.clone()))).collect())
        .unwrap_or_default();
    Ok(Inspection {
        path: path.to_path_buf(),
        architecture: architecture(ckpt.config.as_ref(), names()),
        shards: ckpt.shards.iter().map(|s| s.path.clone()).collect(),
        tensors: ckpt.tensors.len(),
        params: ckpt.num_params(),
        bytes: ckpt.data_bytes(),
        dtypes,
        layers: blocks.iter().filter(|b| b.kind == BlockKind::Layer).count(),
        blocks,
        config,
    })
}

fn human_bytes(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.2} {}", units[u])
}

fn human_count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "checkpoint    {}", self.path.display())?;
        writeln!(f, "architecture  {}", self.architecture)?;
        writeln!(f, "shards        {}", self.shards.len())?;
        writeln!(f, "tensors       {}", self.tensors)?;
        writeln!(f, "parameters    {} ({})", human_count(self.params), self.params)?;
        writeln!(f, "bytes         {} ({})", human_bytes(self.bytes), self.bytes)?;
        let dt: Vec<String> = self.dtypes.iter().map(|(d, n)| format!("{d} x{n}")).collect();
        writeln!(f, "dtypes        {}", dt.join(", "))?;
        writeln!(f, "layers        {} ({} blocks)", self.layers, self.blocks.len())?;
        for (k, v) in &self.config {
            writeln!(f, "config        {k} = {v}")?;
        }
        writeln!(f)?;
        writeln!(f, "{:<40} {:>10} {:>8} {:>12} {:>12}", "block", "kind", "tensors", "params", "bytes")?;
        for b in &self.blocks {
            let kind =
                serde_json::to_value(b.kind).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
            writeln!(
                f,
                "{:<40} {:>10} {:>8} {:>12} {:>12}",
                b.name,
                kind,
                b.tensors,
                human_count(b.params),
                human_bytes(b.bytes)
            )?;
        }
        Ok(())
    }
}
