//! The command line: `atelier generate`, `atelier bench`, ... (the same binary as the window).

mod bench;
pub mod compare;
pub mod gallery;
mod generate;
pub mod models;
pub mod modes;
pub mod plot;
pub mod sampler_steps;
pub mod schedulers;
pub mod shapes_check;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Atelier: Stable Diffusion on your own GPU. Without a command, it opens the window.
#[derive(Debug, Parser)]
#[command(name = "atelier", version, about, long_about = None)]
pub struct Cli {
    /// What to do; without one, Atelier opens its window.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Settings for the window (they override the remembered ones).
    #[command(flatten)]
    pub window: WindowArgs,
}

/// Options of the window (`atelier` without a command).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct WindowArgs {
    /// Open with this model (folder or repo id).
    #[arg(long)]
    pub model: Option<String>,
    /// Start with this prompt.
    #[arg(long)]
    pub prompt: Option<String>,
    /// Start with this many steps.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Start with this size, WIDTHxHEIGHT.
    #[arg(long, value_parser = parse_size)]
    pub size: Option<(usize, usize)>,
    /// Start with this seed, locked.
    #[arg(long)]
    pub seed: Option<u64>,
    /// cpu, cuda, metal or auto.
    #[arg(long)]
    pub device: Option<String>,
    /// The gallery's library folder.
    #[arg(long)]
    pub library: Option<std::path::PathBuf>,
    /// Start from this picture (image to image).
    #[arg(long)]
    pub init_image: Option<std::path::PathBuf>,
    /// With --init-image: inpaint where this mask is white (or transparent).
    #[arg(long, requires = "init_image")]
    pub mask: Option<std::path::PathBuf>,
    /// With --init-image: the denoising strength.
    #[arg(long, requires = "init_image")]
    pub strength: Option<f64>,
    /// With --init-image: outpaint LEFT,TOP,RIGHT,BOTTOM pixels.
    #[arg(long, requires = "init_image", value_parser = parse_outpaint)]
    pub outpaint: Option<crate::engine::init_image::Outpaint>,
    /// Press Generate as soon as the model has loaded.
    #[arg(long)]
    pub generate: bool,
}

fn parse_outpaint(text: &str) -> Result<crate::engine::init_image::Outpaint, String> {
    crate::engine::init_image::Outpaint::parse(text).map_err(|e| e.to_string())
}

fn parse_size(text: &str) -> Result<(usize, usize), String> {
    let (w, h) = text
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("expected WIDTHxHEIGHT, got {text:?}"))?;
    let parse = |v: &str| v.trim().parse::<usize>().map_err(|e| format!("{v:?}: {e}"));
    Ok((parse(w)?, parse(h)?))
}

impl WindowArgs {
    /// Applies the options to the remembered settings.
    pub fn apply(&self, settings: &mut crate::ui::settings::Settings) {
        if let Some(model) = &self.model {
            settings.model = model.clone();
        }
        if let Some(prompt) = &self.prompt {
            settings.prompt = prompt.clone();
        }
        if let Some(steps) = self.steps {
            settings.steps = steps;
        }
        if let Some((width, height)) = self.size {
            settings.width = width;
            settings.height = height;
        }
        if let Some(seed) = self.seed {
            settings.seed = seed;
            settings.seed_locked = true;
        }
        if let Some(device) = &self.device {
            settings.device = device.clone();
        }
        if let Some(library) = &self.library {
            settings.library_dir = library.display().to_string();
        }
        if self.init_image.is_some() {
            settings.image_options.outpaint = self.outpaint;
        }
        if let Some(strength) = self.strength {
            settings.image_options.strength = strength.clamp(0.05, 1.0);
        } else if self.outpaint.is_some() {
            settings.image_options.strength = 1.0;
        }
    }
}

/// The headless subcommands.
#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once at start-up; boxing buys nothing
pub enum Command {
    /// Generate images from a prompt and save them as PNG (parameters in the metadata).
    Generate(generate::GenerateArgs),
    /// Time text encoding, UNet steps and VAE decode.
    Bench(bench::BenchArgs),
    /// Measure every sampler against the ideal denoiser: error at 5, 10, 20 and 50 model
    /// evaluations.
    Schedulers(schedulers::SchedulersArgs),
    /// The gallery on the command line: list, search, rebuild, import, bench.
    Gallery(gallery::GalleryArgs),
    /// Model files: `models scan DIR` tells what each holds (family, variant, size, hash).
    Models(models::ModelsArgs),
    /// A grid of the same prompt under several samplers (and steps, guidance, seeds or prompt
    /// variants down the rows), saved as one labelled PNG.
    Compare(compare::CompareArgs),
    /// Does a prompt steer the picture? Generates the validation prompts of Atelier Shapes (or
    /// reads pictures made of them) and reports the accuracy of colour, background, shape and
    /// position.
    ShapesCheck(shapes_check::ShapesCheckArgs),
}

/// Runs the command line; returns the process exit code.
pub fn main() -> ExitCode {
    crate::engine::cpu_kernels::keep_freed_memory();
    let cli = Cli::parse();
    let result = match cli.command {
        None => run_window(cli.window),
        Some(Command::Generate(args)) => generate::run(args),
        Some(Command::Bench(args)) => bench::run(args),
        Some(Command::Schedulers(args)) => schedulers::run(args),
        Some(Command::Gallery(args)) => gallery::run(args),
        Some(Command::Models(args)) => models::run(args),
        Some(Command::Compare(args)) => compare::run(args),
        Some(Command::ShapesCheck(args)) => shapes_check::run(args),
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
pub fn run_window(args: WindowArgs) -> anyhow::Result<()> {
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
            let mut settings: crate::ui::settings::Settings = cc
                .storage
                .and_then(|storage| {
                    eframe::get_value(storage, crate::ui::settings::Settings::STORAGE_KEY)
                })
                .unwrap_or_default();
            args.apply(&mut settings);
            settings.choose_bundled_model_if_none();
            let mut app = crate::ui::AtelierApp::with_settings(&cc.egui_ctx, engine, settings)?;
            app.generate_when_loaded = args.generate;
            if let Some(image) = &args.init_image {
                app.start_from_picture(&cc.egui_ctx, image.clone(), args.mask.clone());
            }
            Ok(Box::new(app))
        }),
    )
    .map_err(|e| anyhow::anyhow!("the window failed: {e}"))
}

/// Reads `--device`, defaulting to the best available.
fn open_device(name: &str) -> anyhow::Result<candle_core::Device> {
    let choice = crate::engine::pipeline::DeviceChoice::parse(name)?;
    Ok(choice.open()?)
}

/// Checks, before any work, that a file can be written at `path`: the name ends in
/// `.extension` (any case), its folder exists and a file can be created in it (a real probe,
/// which also catches read-only mounts), and it is not a folder. `flag` names the option in
/// messages.
fn check_output_file(path: &std::path::Path, flag: &str, extension: &str) -> anyhow::Result<()> {
    let has_extension = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case(extension));
    if !has_extension {
        anyhow::bail!(
            "{flag} must name a .{extension} file, got {}",
            path.display()
        );
    }
    if path.is_dir() {
        anyhow::bail!("{flag} {} is a folder", path.display());
    }
    let folder = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    if !folder.is_dir() {
        anyhow::bail!(
            "{flag}: the folder {} does not exist (nothing was generated)",
            folder.display()
        );
    }
    crate::gallery::metadata::probe_writable(folder).map_err(|error| {
        anyhow::anyhow!(
            "{flag}: cannot write in {} ({error}; nothing was generated)",
            folder.display()
        )
    })
}

/// Writes a finished PNG to `path`; if that fails after all (disk full, folder removed
/// meanwhile), writes it to the temporary folder instead so that the work is not lost, and
/// says where. Returns the path written.
fn write_png_or_rescue(
    path: &std::path::Path,
    image: &image::RgbImage,
    text_chunks: &[(&str, &str)],
) -> anyhow::Result<std::path::PathBuf> {
    use crate::gallery::metadata::write_png;
    match write_png(path, image, text_chunks) {
        Ok(()) => Ok(path.to_path_buf()),
        Err(error) => {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "image.png".into());
            let rescue =
                std::env::temp_dir().join(format!("atelier-rescued-{}-{name}", std::process::id()));
            write_png(&rescue, image, text_chunks).map_err(|rescue_error| {
                anyhow::anyhow!(
                    "{error}; writing it to {} failed too: {rescue_error}",
                    rescue.display()
                )
            })?;
            eprintln!(
                "warning: {error}; the image was saved to {} instead",
                rescue.display()
            );
            Ok(rescue)
        }
    }
}
