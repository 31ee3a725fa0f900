//! Seeded Gaussian noise: the same seed gives the same noise on every machine and device.

use candle_core::{Device, Tensor};
use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};
use rand_distr::StandardNormal;

use super::error::{Result, SchedulerError};

/// A seeded source of standard-normal noise, drawn on the CPU in row-major order and then
/// moved to the device, so that a seed means the same image on CPU, CUDA and Metal.
#[derive(Debug)]
pub struct NoiseGenerator {
    source: NoiseSource,
}

#[derive(Debug)]
enum NoiseSource {
    Seeded(Box<ChaCha8Rng>),
    Replay(std::collections::VecDeque<Tensor>),
}

impl NoiseGenerator {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            source: NoiseSource::Seeded(Box::new(ChaCha8Rng::seed_from_u64(seed))),
        }
    }

    /// A generator that hands out `noise` in order: the test hook that lets a stochastic
    /// scheduler run on another implementation's noise.
    pub fn replay(noise: Vec<Tensor>) -> Self {
        Self {
            source: NoiseSource::Replay(noise.into()),
        }
    }

    /// Draws standard-normal noise shaped like `like`, on its device and in its dtype.
    pub fn randn_like(&mut self, like: &Tensor) -> Result<Tensor> {
        Ok(self
            .randn(like.dims(), like.device())?
            .to_dtype(like.dtype())?)
    }

    /// Draws a standard-normal f32 tensor of `shape` on `device`.
    pub fn randn(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        match &mut self.source {
            NoiseSource::Seeded(rng) => {
                let count: usize = shape.iter().product();
                let values: Vec<f32> = (0..count)
                    .map(|_| rng.sample::<f32, _>(StandardNormal))
                    .collect();
                Ok(Tensor::from_vec(values, shape, &Device::Cpu)?.to_device(device)?)
            }
            NoiseSource::Replay(queue) => {
                let next = queue.pop_front().ok_or_else(|| {
                    SchedulerError::InvalidParameter("replayed noise ran out".into())
                })?;
                if next.dims() != shape {
                    return Err(SchedulerError::InvalidParameter(format!(
                        "replayed noise has shape {:?}, the scheduler wants {shape:?}",
                        next.dims()
                    )));
                }
                Ok(next.to_device(device)?)
            }
        }
    }
}
