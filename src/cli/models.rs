//! `atelier models scan DIR`: what a folder of model files holds, from each file's header.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

use crate::engine::checkpoint::{inspect, refuse_pickle};

/// Arguments of `atelier models`.
#[derive(Debug, Args)]
pub struct ModelsArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: ModelsCommand,
}

/// The `models` subcommands.
#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// List what models folders hold, as the window's Settings -> Models folders reads them:
    /// an A1111 installation (models/Stable-diffusion, models/Lora, models/VAE, embeddings), a
    /// ComfyUI one (models/checkpoints, loras, vae, embeddings), or a plain folder.
    List {
        /// The folders.
        #[arg(required = true)]
        folders: Vec<PathBuf>,
    },
    /// List the model files in a folder (and its subfolders, as A1111's and ComfyUI's models
    /// folders nest them) with their family, variant and size.
    Scan {
        /// The folder.
        folder: PathBuf,
        /// Also compute each file's hash as A1111 writes it (SHA-256, first 10 hex digits:
        /// "AutoV2"); reads every byte.
        #[arg(long)]
        hash: bool,
    },
}

/// Model files at most this many folders deep are listed.
const MAX_DEPTH: usize = 4;

fn model_files(folder: &Path, depth: usize, found: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(folder)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            if depth < MAX_DEPTH {
                model_files(&path, depth + 1, found)?;
            }
            continue;
        }
        let extension = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        if matches!(
            extension.as_deref(),
            Some("safetensors" | "ckpt" | "pt" | "pth" | "bin")
        ) {
            found.push(path);
        }
    }
    Ok(())
}

/// Runs `atelier models`.
pub fn run(args: ModelsArgs) -> anyhow::Result<()> {
    match args.command {
        ModelsCommand::List { folders } => {
            use crate::models_folders::{ModelKind, files, folders as kind_folders, scan};
            let missing: Vec<String> = folders
                .iter()
                .filter(|f| !f.is_dir())
                .map(|f| f.display().to_string())
                .collect();
            if !missing.is_empty() {
                anyhow::bail!("not folders: {}", missing.join(", "));
            }
            let found = scan(&folders);
            println!("checkpoints ({}):", found.checkpoints.len());
            for entry in &found.checkpoints {
                let hash = entry
                    .hash
                    .as_ref()
                    .map(|h| format!("  [{h}]"))
                    .unwrap_or_default();
                println!("  {}: {}{hash}", entry.name, entry.summary);
            }
            println!("LoRAs ({}): {}", found.loras.len(), found.loras.join(", "));
            let names = |kind| -> Vec<String> {
                files(&kind_folders(&folders, kind))
                    .iter()
                    .map(|p| crate::models_folders::stem(p))
                    .collect()
            };
            let vaes = names(ModelKind::Vae);
            println!("VAEs ({}): {}", vaes.len(), vaes.join(", "));
            let embeddings = names(ModelKind::Embedding);
            println!(
                "embeddings ({}): {}",
                embeddings.len(),
                embeddings.join(", ")
            );
            Ok(())
        }
        ModelsCommand::Scan { folder, hash } => {
            if !folder.is_dir() {
                anyhow::bail!("{} is not a folder", folder.display());
            }
            let mut files = Vec::new();
            model_files(&folder, 0, &mut files)?;
            let mut hashes = crate::gallery::hash_cache::HashCache::open_default();
            if files.is_empty() {
                println!(
                    "no model files (.safetensors, .ckpt) in {}",
                    folder.display()
                );
            }
            for path in files {
                let name = path
                    .strip_prefix(&folder)
                    .unwrap_or(&path)
                    .display()
                    .to_string();
                let what = match refuse_pickle(&path) {
                    Some(_) => "a Python pickle: not loaded (it could run code); use its .safetensors version".to_string(),
                    None => match inspect(&path) {
                        Ok(info) => info.summary(),
                        Err(error) => format!("unreadable: {error}"),
                    },
                };
                let hash = if hash {
                    match hashes.hash(&path) {
                        Ok(hash) => format!("  [{hash}]"),
                        Err(error) => format!("  [no hash: {error}]"),
                    }
                } else {
                    String::new()
                };
                println!("{name}: {what}{hash}");
            }
            Ok(())
        }
    }
}
