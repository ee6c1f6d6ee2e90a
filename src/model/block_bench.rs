//! `symerge bench-block`: one Llama decoder block, forward and backward to its input and every
//! weight, on a backend, timed: our side of the block comparison whose PyTorch side is
//! `benches/block_torch.py` (same shapes, same flop count). The weights are seeded random f32;
//! the batch is `batch` full sequences of `seq` tokens (no padding), causal attention.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Instant;

use serde::Serialize;

use super::chain::{LayerPart, PartTensors};
use super::llama::DecoderLayer;
use super::tokenize::Encoded;
use super::{LmBatch, Param, Params};
use crate::backend::{Backend, Device};
use crate::error::{Error, Result};
use crate::merge::philox::{ElementStream, name_hash};

/// The block shapes `benches/block_torch.py` knows.
const SHAPES: [(&str, usize, usize, usize, usize); 2] =
    [("llama-7b", 4096, 11008, 32, 32), ("llama-tiny", 256, 688, 8, 4)];

/// Options of `symerge bench-block`.
#[derive(Debug, Clone, clap::Args)]
pub struct BlockBenchArgs {
    /// Block shape: llama-7b (hidden 4096, MLP 11008, 32 heads) or llama-tiny (256, 688, 8/4).
    #[arg(long, default_value = "llama-7b")]
    pub shape: String,
    /// Sequences per batch.
    #[arg(long, default_value_t = 4, value_parser = super::infer::parse_batch_size)]
    pub batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 1024, value_parser = super::infer::parse_batch_size)]
    pub seq: usize,
    /// Timed repeats (the median is reported), after `--warmup` untimed ones.
    #[arg(long, default_value_t = 10, value_parser = super::infer::parse_batch_size)]
    pub repeats: usize,
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Where the math runs: auto, cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: Device,
}

/// Medians of the timed repeats.
#[derive(Debug, Clone, Serialize)]
pub struct BlockBenchReport {
    pub device: String,
    pub shape: String,
    pub tokens: usize,
    pub seq: usize,
    /// Matmul flops of forward + backward, counted as `benches/block_torch.py` counts them.
    pub flops: f64,
    pub forward_ms: f64,
    pub forward_backward_ms: f64,
    /// The same with the weight gradients' buffers recycled between repeats (adaptation's way).
    pub forward_backward_recycled_ms: f64,
    pub tflops: f64,
    pub us_per_token: f64,
    pub repeats: usize,
}

impl fmt::Display for BlockBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}, {} block (f32), {} tokens (seq {})", self.device, self.shape, self.tokens, self.seq)?;
        writeln!(f, "  forward          {:9.2} ms", self.forward_ms)?;
        writeln!(
            f,
            "  forward+backward {:9.2} ms  {:7.2} TFLOP/s  {:.3} us/token (median of {})",
            self.forward_backward_ms, self.tflops, self.us_per_token, self.repeats
        )?;
        writeln!(f, "  recycled buffers {:9.2} ms", self.forward_backward_recycled_ms)
    }
}

impl BlockBenchArgs {
    pub fn run(&self) -> Result<BlockBenchReport> {
        crate::with_backend!(self.device, |be| self.run_on(&be))
    }

    /// The benchmark on `be`.
    pub fn run_on<B: Backend>(&self, be: &B) -> Result<BlockBenchReport> {
        let layer = self.layer()?;
        let p = random_params(be, &layer, 0)?;
        let (n, s, h) = (self.batch, self.seq, layer.hidden);
        let enc = Encoded {
            batch: n,
            seq: s,
            input_ids: vec![0; n * s],
            token_type_ids: vec![0; n * s],
            attention_mask: vec![1; n * s],
        };
        let batch = LmBatch::upload(be, &enc, 1, None)?;
        let x = be.upload(&uniform(1, "x", n * s * h, 0.0, 1.0))?;
        let dy = be.upload(&uniform(1, "dy", n * s * h, 0.0, 1.0))?;
        // A host read of one reduction waits for the queued work: the GPU's timings end there.
        let forward = || -> Result<()> {
            let y = layer.forward(be, &p, &batch, &x)?;
            be.sum_squares(&[&y]).map(drop)
        };
        // `recycle`: the weight gradients go back to the backend's scratch pool for the next
        // repeat, as the adaptation loop hands a block's buffers back (no fresh pages per step).
        let step = |recycle: bool| -> Result<()> {
            let (y, kept) = layer.forward_keeping(be, &p, &batch, &x)?;
            drop(y);
            let (dx, grads) = layer.backward(be, &p, &batch, &x, Some(kept), &dy)?;
            if recycle {
                grads.into_values().for_each(|g| be.recycle(g.buf));
            }
            be.sum_squares(&[&dx]).map(drop)
        };
        let forward_ms = median_ms(self.warmup, self.repeats, forward)?;
        let ms = median_ms(self.warmup, self.repeats, || step(false))?;
        let param_bytes: usize = p.values().map(|q| 4 * q.shape.iter().product::<usize>()).sum();
        be.scratch_limit(2 * param_bytes);
        let recycled_ms = median_ms(self.warmup, self.repeats, || step(true));
        be.scratch_limit(0);
        let recycled_ms = recycled_ms?;
        let tokens = n * s;
        let flops = block_flops(tokens, s, h, layer.intermediate, layer.heads, layer.kv_heads);
        Ok(BlockBenchReport {
            device: be.name().to_string(),
            shape: self.shape.clone(),
            tokens,
            seq: s,
            flops,
            forward_ms,
            forward_backward_ms: ms,
            forward_backward_recycled_ms: recycled_ms,
            tflops: flops / ms / 1e9,
            us_per_token: 1e3 * ms / tokens as f64,
            repeats: self.repeats,
        })
    }

    fn layer(&self) -> Result<DecoderLayer> {
        let Some(&(_, hidden, intermediate, heads, kv_heads)) = SHAPES.iter().find(|s| s.0 == self.shape) else {
            let known: Vec<&str> = SHAPES.iter().map(|s| s.0).collect();
            return Err(Error::Invalid(format!("--shape {}: not one of {}", self.shape, known.join(", "))));
        };
        Ok(DecoderLayer {
            index: 0,
            hidden,
            intermediate,
            heads,
            kv_heads,
            head_dim: hidden / heads,
            eps: 1e-5,
            rope_theta: 10000.0,
            rope_scale: 1.0,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
        })
    }
}

/// Seeded weights in +-0.02 (norm weights near 1), uploaded.
fn random_params<B: Backend>(be: &B, layer: &DecoderLayer, seed: u64) -> Result<Params<B>> {
    let mut p = BTreeMap::new();
    for (name, shape) in layer.param_shapes() {
        let centre = if name.ends_with("layernorm.weight") { 1.0 } else { 0.0 };
        let v = uniform(seed, &name, shape.iter().product(), centre, 0.02);
        p.insert(name, Param { buf: be.upload(&v)?, shape });
    }
    Ok(p)
}

/// `n` seeded values uniform in `centre +- half`.
fn uniform(seed: u64, name: &str, n: usize, centre: f32, half: f32) -> Vec<f32> {
    let mut u = vec![0f32; n];
    ElementStream::new(seed, name_hash(name), 0).fill_uniform(0, &mut u);
    u.iter_mut().for_each(|v| *v = centre + half * (2.0 * *v - 1.0));
    u
}

/// Median wall milliseconds of `repeats` calls after `warmup` untimed ones.
fn median_ms(warmup: usize, repeats: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Matmul flops of forward + backward (backward = 2x forward), attention counted in full: the
/// formula of `benches/block_torch.py`, so the two report the same TFLOP/s for the same time.
pub fn block_flops(tokens: usize, seq: usize, hidden: usize, inter: usize, heads: usize, kv_heads: usize) -> f64 {
    let (t, s, h, i) = (tokens as f64, seq as f64, hidden as f64, inter as f64);
    let kv = h * kv_heads as f64 / heads as f64;
    let proj = 2.0 * t * (2.0 * h * h + 2.0 * h * kv + 3.0 * h * i);
    let attn = 2.0 * 2.0 * t * s * h;
    3.0 * (proj + attn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;

    /// The tiny block runs forward and backward on the CPU and reports consistent numbers; an
    /// unknown shape is refused naming the known ones.
    #[test]
    fn tiny_block_runs_on_the_cpu() {
        let args = BlockBenchArgs {
            shape: "llama-tiny".into(),
            batch: 2,
            seq: 16,
            repeats: 3,
            warmup: 1,
            device: Device::Cpu,
        };
        let r = args.run_on(&Cpu).unwrap();
        assert_eq!((r.tokens, r.seq), (32, 16));
        assert!(r.forward_ms > 0.0 && r.forward_backward_ms > 0.0 && r.forward_backward_recycled_ms > 0.0, "{r:?}");
        assert!((r.tflops - r.flops / r.forward_backward_ms / 1e9).abs() < 1e-12);
        let bad = BlockBenchArgs { shape: "llama-3".into(), ..args };
        let e = bad.run_on(&Cpu).unwrap_err().to_string();
        assert!(e.contains("--shape llama-3") && e.contains("llama-7b, llama-tiny"), "{e}");
    }

    /// The flop count of `benches/block_torch.py` (its formula, evaluated there for llama-7b at
    /// 4 x 1024 tokens).
    #[test]
    fn flops_match_the_pytorch_script() {
        let f = block_flops(4096, 1024, 4096, 11008, 32, 32);
        let proj = 2.0 * 4096.0 * (2.0 * 4096.0f64.powi(2) * 2.0 + 3.0 * 4096.0 * 11008.0);
        assert_eq!(f, 3.0 * (proj + 4.0 * 4096.0 * 1024.0 * 4096.0));
    }
}
