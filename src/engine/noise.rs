//! Seeded Gaussian noise: it lives with the schedulers, which draw from it too.

pub use crate::schedulers::noise::NoiseGenerator;
