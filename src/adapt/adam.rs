//! Adam (Kingma & Ba), as PyTorch's `torch.optim.Adam` computes it (bias-corrected moments,
//! `eps` added after the square root, no weight decay), over flat f32 parameter slices. The
//! released SyMerge and AdaMerging code use it for both Lambda and the adapted layers.
//! [`Adam`] keeps host state (Lambda: a few hundred values); [`BufAdam`] keeps it on the backend
//! (the adapted layers). Both run the same update, [`adam_update`] or its kernel twin.

use crate::backend::stored_ops::adam_update;
use crate::backend::{AdamStep, Backend};
use crate::error::Result;

/// Adam's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConfig {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
}

impl AdamConfig {
    /// PyTorch's defaults with the given learning rate.
    pub fn with_lr(lr: f32) -> Self {
        AdamConfig { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8 }
    }
}

/// Adam's state for one parameter group.
#[derive(Debug, Clone)]
pub struct Adam {
    pub config: AdamConfig,
    step: i32,
    m: Vec<f32>,
    v: Vec<f32>,
}

impl Adam {
    pub fn new(len: usize, config: AdamConfig) -> Self {
        Adam { config, step: 0, m: vec![0.0; len], v: vec![0.0; len] }
    }

    /// Steps taken so far.
    pub fn steps(&self) -> i32 {
        self.step
    }

    /// One update of `params` from `grads` (same length as the state).
    pub fn step(&mut self, params: &mut [f32], grads: &[f32]) {
        assert_eq!(params.len(), self.m.len(), "Adam state and parameters differ in length");
        assert_eq!(grads.len(), self.m.len(), "Adam state and gradients differ in length");
        self.step += 1;
        adam_update(params, grads, &mut self.m, &mut self.v, &self.config.scalars(self.step));
    }
}

impl AdamConfig {
    /// The update scalars of step `t` (1-based).
    pub fn scalars(&self, t: i32) -> AdamStep {
        AdamStep::new(self.lr, self.beta1, self.beta2, self.eps, t)
    }
}

/// Adam's state for one tensor on a backend: the moments live where the tensor does and a step
/// is one fused backend op ([`Backend::adam_step`]), so an adapted layer never leaves the device.
pub struct BufAdam<B: Backend> {
    pub config: AdamConfig,
    step: i32,
    m: B::Buf,
    v: B::Buf,
}

impl<B: Backend> BufAdam<B> {
    pub fn new(be: &B, len: usize, config: AdamConfig) -> Result<Self> {
        Ok(BufAdam { config, step: 0, m: be.zeros(len)?, v: be.zeros(len)? })
    }

    /// One update of `params` from `grads`.
    pub fn step(&mut self, be: &B, params: &mut B::Buf, grads: &B::Buf) -> Result<()> {
        self.step_scaled(be, params, grads, 1.0)
    }

    /// One update from `grads` times `grad_scale` (gradient-norm clipping), scaled in the kernel.
    pub fn step_scaled(&mut self, be: &B, params: &mut B::Buf, grads: &B::Buf, grad_scale: f32) -> Result<()> {
        self.step += 1;
        let s = self.config.scalars(self.step).with_grad_scale(grad_scale);
        be.adam_step(params, grads, &mut self.m, &mut self.v, &s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two steps worked by hand from the update rule in f64.
    #[test]
    fn matches_the_update_rule() {
        let cfg = AdamConfig { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8 };
        let mut adam = Adam::new(2, cfg);
        let mut p = [1.0f32, -2.0];
        let grads = [[0.5f32, -1.0], [0.25, 3.0]];
        let (mut m, mut v, mut want) = ([0f64; 2], [0f64; 2], [1.0f64, -2.0]);
        for (t, g) in grads.iter().enumerate() {
            adam.step(&mut p, g);
            let t = t as i32 + 1;
            for i in 0..2 {
                m[i] = 0.9 * m[i] + 0.1 * g[i] as f64;
                v[i] = 0.999 * v[i] + 0.001 * (g[i] as f64).powi(2);
                let mh = m[i] / (1.0 - 0.9f64.powi(t));
                let vh = v[i] / (1.0 - 0.999f64.powi(t));
                want[i] -= 0.1 * mh / (vh.sqrt() + 1e-8);
            }
            for i in 0..2 {
                assert!((p[i] as f64 - want[i]).abs() < 1e-6, "step {t}: {} vs {}", p[i], want[i]);
            }
        }
        assert_eq!(adam.steps(), 2);
    }

    #[test]
    fn minimises_a_quadratic() {
        let mut adam = Adam::new(3, AdamConfig::with_lr(0.05));
        let target = [0.3f32, -1.5, 2.0];
        let mut p = [0f32; 3];
        for _ in 0..2000 {
            let g: Vec<f32> = p.iter().zip(&target).map(|(x, t)| 2.0 * (x - t)).collect();
            adam.step(&mut p, &g);
        }
        for (x, t) in p.iter().zip(&target) {
            assert!((x - t).abs() < 1e-3, "{x} vs {t}");
        }
    }
}
