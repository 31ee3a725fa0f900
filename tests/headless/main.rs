//! Every test that runs without a window, in one test binary: one link of the engine rather than
//! one per file, which keeps a clean build's disk use and link time down. Each module is one
//! subject (`cargo test --test headless lora::` runs one).

#[path = "../common/mod.rs"]
mod common;

mod candle_quirks;
mod checkpoints;
mod cli;
mod compare;
mod demo_model;
mod embeddings;
mod engine;
mod gallery;
mod ideal_denoiser;
mod img2img;
mod inpaint;
mod late_start;
mod lora;
mod memory_options;
mod modes_cli;
mod parity;
mod prompt_editing;
mod prompts;
mod properties;
mod reliability;
mod schedulers;
mod single_file;
