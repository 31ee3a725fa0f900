//! The command line: `atelier generate`, `atelier bench`, ... (the same binary as the window).

mod bench;
mod generate;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

/// Atelier: Stable Diffusion on your own GPU.
#[derive(Debug, Parser)]
#[command(name = "atelier", version, about, long_about = None)]
pub struct Cli {
    /// What to do; without one, Atelier prints this help.
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
        None => Cli::command().print_help().map_err(anyhow::Error::from),
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

/// Reads `--device`, defaulting to the best available.
fn open_device(name: &str) -> anyhow::Result<candle_core::Device> {
    let choice = crate::engine::pipeline::DeviceChoice::parse(name)?;
    Ok(choice.open()?)
}
