//! The command line: `atelier generate`, `atelier bench`, ... (the same binary as the window).

mod bench;
mod generate;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Atelier: Stable Diffusion on your own GPU. Without a command, it opens the window.
#[derive(Debug, Parser)]
#[command(name = "atelier", version, about, long_about = None)]
pub struct Cli {
    /// What to do; without one, Atelier opens its window.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The headless subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate images from a prompt and save them as PNG (parameters in the metadata).
    Generate(generate::GenerateArgs),
    /// Time text encoding, UNet steps and VAE decode.
    Bench(bench::BenchArgs),
}

/// Runs the command line; returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => run_window(),
        Some(Command::Generate(args)) => generate::run(args),
        Some(Command::Bench(args)) => bench::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Opens the studio window and runs until it closes.
pub fn run_window() -> anyhow::Result<()> {
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("Atelier")
            .with_inner_size([1400.0, 900.0])
            .with_min_inner_size([900.0, 600.0]),
        renderer: eframe::Renderer::Wgpu,
        ..Default::default()
    };
    eframe::run_native(
        "Atelier",
        options,
        Box::new(|cc| {
            let engine = Box::new(crate::worker::DiffusionEngine::default());
            Ok(Box::new(crate::ui::AtelierApp::new(cc, engine)?))
        }),
    )
    .map_err(|e| anyhow::anyhow!("the window failed: {e}"))
}

/// Reads `--device`, defaulting to the best available.
fn open_device(name: &str) -> anyhow::Result<candle_core::Device> {
    let choice = crate::engine::pipeline::DeviceChoice::parse(name)?;
    Ok(choice.open()?)
}
