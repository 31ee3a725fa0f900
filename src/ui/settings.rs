//! What the window remembers across restarts.

use serde::{Deserialize, Serialize};

/// The persisted state: settings and the last parameters. `#[serde(default)]` lets new fields
/// appear without breaking old saves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// The model to load: a folder or a Hub repo id (empty: none chosen yet).
    pub model: String,
    /// Models used before, most recent first.
    pub recent_models: Vec<String>,
    /// `auto`, `cpu`, `cuda` or `metal`.
    pub device: String,
    /// The prompt.
    pub prompt: String,
    /// The negative prompt.
    pub negative_prompt: String,
    /// The seed of the next job.
    pub seed: u64,
    /// Keep the seed; otherwise every Generate draws a new one.
    pub seed_locked: bool,
    /// Denoising steps.
    pub steps: usize,
    /// Guidance scale.
    pub guidance: f64,
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Scheduler id.
    pub scheduler: String,
    /// Sigma schedule (for schedulers that have one).
    pub sigma_schedule: crate::schedulers::SigmaSchedule,
    /// DDIM's eta (0: deterministic).
    pub eta: f64,
    /// Jobs queued per Generate (seeds follow one another).
    pub batch_count: usize,
    /// Full VAE preview every N steps (0: the cheap projection only).
    pub vae_preview_every: usize,
    /// Show the image scaled to fit (else 1:1).
    pub zoom_to_fit: bool,
    /// The gallery's folder (empty: the platform's data directory).
    pub library_dir: String,
    /// How a picture is worked on (strength, resize mode, mask blur, masked content, "only
    /// masked", outpainting).
    pub image_options: crate::engine::pipeline::ImageOptions,
    /// A1111's clip skip (1: the text encoder's last layer).
    pub clip_skip: usize,
    /// Whether text to image runs the hires fix's second pass.
    pub hires_enabled: bool,
    /// The hires fix's settings.
    pub hires: crate::engine::pipeline::HiresFix,
    /// Folders of models as A1111 or ComfyUI keep them (their root or `models` folder), or
    /// plain folders of files: LoRAs, checkpoints, VAEs and embeddings are found there.
    pub models_folders: Vec<String>,
    /// Whether the VAE decodes and encodes in tiles (auto: only images too large for one pass).
    pub vae_tiling: crate::engine::vae_tiling::VaeTiling,
    /// What the artist overrides of each model's own files (VAE, prediction), by model.
    pub model_overrides:
        std::collections::BTreeMap<String, crate::engine::pipeline::ModelOverrides>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            model: String::new(),
            recent_models: Vec::new(),
            device: "auto".into(),
            prompt: String::new(),
            negative_prompt: String::new(),
            seed: 42,
            seed_locked: false,
            steps: 25,
            guidance: 7.5,
            width: 512,
            height: 512,
            scheduler: "euler".into(),
            sigma_schedule: Default::default(),
            eta: 0.0,
            batch_count: 1,
            vae_preview_every: 0,
            zoom_to_fit: true,
            library_dir: String::new(),
            image_options: crate::engine::pipeline::ImageOptions {
                keep_unmasked: true,
                ..Default::default()
            },
            clip_skip: 1,
            hires_enabled: false,
            hires: Default::default(),
            model_overrides: Default::default(),
            models_folders: Vec::new(),
            vae_tiling: Default::default(),
        }
    }
}

impl Settings {
    /// The key under which eframe stores the settings.
    pub const STORAGE_KEY: &'static str = "atelier-settings";

    /// What is overridden of `model`'s files (nothing, unless the artist chose something).
    pub fn overrides_for(&self, model: &str) -> crate::engine::pipeline::ModelOverrides {
        self.model_overrides.get(model).cloned().unwrap_or_default()
    }

    /// The models folders as paths (empty entries dropped).
    pub fn models_roots(&self) -> Vec<std::path::PathBuf> {
        self.models_folders
            .iter()
            .map(|f| f.trim())
            .filter(|f| !f.is_empty())
            .map(std::path::PathBuf::from)
            .collect()
    }

    /// Where embeddings are found.
    pub fn embedding_folders(&self) -> Vec<std::path::PathBuf> {
        crate::models_folders::folders(
            &self.models_roots(),
            crate::models_folders::ModelKind::Embedding,
        )
    }

    /// Where `<lora:name>` tags look.
    pub fn lora_folders(&self) -> Vec<std::path::PathBuf> {
        crate::models_folders::folders(&self.models_roots(), crate::models_folders::ModelKind::Lora)
    }

    /// On a first start (no model chosen yet), choose the model that comes with Atelier, with
    /// its preset's steps, guidance and size. Returns whether it did.
    pub fn choose_bundled_model_if_none(&mut self) -> bool {
        if !self.model.trim().is_empty() {
            return false;
        }
        let preset = MODEL_PRESETS[0];
        self.model = preset.repo.to_string();
        self.steps = preset.steps;
        self.guidance = preset.guidance;
        self.width = preset.size;
        self.height = preset.size;
        true
    }

    /// Puts `model` first in the recent list (at most 8 entries).
    pub fn remember_model(&mut self, model: &str) {
        self.recent_models.retain(|m| m != model);
        self.recent_models.insert(0, model.to_string());
        self.recent_models.truncate(8);
    }
}

/// A model the picker offers by name.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelPreset {
    /// The name shown.
    pub label: &'static str,
    /// The Hub repo id.
    pub repo: &'static str,
    /// Good default steps.
    pub steps: usize,
    /// Good default guidance.
    pub guidance: f64,
    /// Native size.
    pub size: usize,
}

/// The presets of the model picker (the first is the model that comes with Atelier).
pub const MODEL_PRESETS: &[ModelPreset] = &[
    ModelPreset {
        label: "Atelier Shapes (built in)",
        repo: crate::demo_model::MODEL_ID,
        steps: 20,
        guidance: 5.0,
        size: 128,
    },
    ModelPreset {
        label: "SD 1.5",
        repo: "stable-diffusion-v1-5/stable-diffusion-v1-5",
        steps: 25,
        guidance: 7.5,
        size: 512,
    },
    ModelPreset {
        label: "SD 2.1",
        repo: "stabilityai/stable-diffusion-2-1",
        steps: 25,
        guidance: 7.5,
        size: 768,
    },
    ModelPreset {
        label: "SDXL 1.0",
        repo: "stabilityai/stable-diffusion-xl-base-1.0",
        steps: 30,
        guidance: 7.0,
        size: 1024,
    },
    ModelPreset {
        label: "SD-Turbo",
        repo: "stabilityai/sd-turbo",
        steps: 1,
        guidance: 0.0,
        size: 512,
    },
    ModelPreset {
        label: "SDXL-Turbo",
        repo: "stabilityai/sdxl-turbo",
        steps: 1,
        guidance: 0.0,
        size: 512,
    },
];

/// Sizes offered for a family, as (width, height); the native size comes first.
pub fn size_presets(
    family: Option<crate::engine::pipeline::ModelFamily>,
    native: Option<usize>,
) -> Vec<(usize, usize)> {
    use crate::engine::pipeline::ModelFamily;
    let mut sizes: Vec<(usize, usize)> = match family {
        Some(ModelFamily::Sdxl) => vec![
            (1024, 1024),
            (896, 1152),
            (1152, 896),
            (832, 1216),
            (1216, 832),
            (768, 1344),
            (1344, 768),
            (512, 512),
        ],
        Some(ModelFamily::Sd2) => vec![(768, 768), (512, 512), (576, 768), (768, 576), (512, 768)],
        _ => vec![(512, 512), (512, 768), (768, 512), (640, 640), (768, 768)],
    };
    if let Some(native) = native
        && !sizes.contains(&(native, native))
    {
        sizes.insert(0, (native, native));
    }
    sizes
}
