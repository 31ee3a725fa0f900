//! Atelier: a desktop studio for Stable Diffusion, on candle.

pub mod cli;
pub mod compare;
pub mod demo_model;
pub mod engine;
pub mod gallery;
pub mod models_folders;
pub mod schedulers;
pub mod ui;
pub mod worker;
