//! Seeded Gaussian noise: the same seed gives the same noise on every machine and device.

use candle_core::{Device, Tensor};
use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};
use rand_distr::StandardNormal;

use super::error::Result;

/// A seeded source of standard-normal noise, drawn on the CPU in row-major order and then
/// moved to the device, so that a seed means the same image on CPU, CUDA and Metal.
#[derive(Debug)]
pub struct NoiseGenerator {
    rng: ChaCha8Rng,
}

impl NoiseGenerator {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// Draws a standard-normal f32 tensor of `shape` on `device`.
    pub fn randn(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let count: usize = shape.iter().product();
        let values: Vec<f32> = (0..count)
            .map(|_| self.rng.sample::<f32, _>(StandardNormal))
            .collect();
        Ok(Tensor::from_vec(values, shape, &Device::Cpu)?.to_device(device)?)
    }
}
