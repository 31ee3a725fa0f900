//! Atelier: a desktop studio for Stable Diffusion, on candle.

pub mod engine;
pub mod schedulers;
