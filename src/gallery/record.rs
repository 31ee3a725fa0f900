//! What Atelier knows about one image, whoever made it: our own full parameters (the `atelier`
//! JSON chunk), or what AUTOMATIC1111, ComfyUI or InvokeAI wrote.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::import;
use super::metadata::{A1111Parameters, PARAMETERS_KEYWORD};
use crate::engine::init_image::{HiresUpscaler, MaskedContent};
use crate::engine::pipeline::{GenerationRequest, HiresFix, ImageJob, ImageOptions, Timings};
use crate::schedulers::{Sampler, SchedulerKind, SigmaSchedule};

/// The PNG text keyword of Atelier's own JSON metadata.
pub const ATELIER_KEYWORD: &str = "atelier";

/// Which program wrote an image's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MetadataSource {
    /// Atelier itself (full parameters).
    #[default]
    Atelier,
    /// AUTOMATIC1111's `parameters` chunk (also Forge, SD.Next, ...).
    A1111,
    /// ComfyUI's `prompt` node graph.
    ComfyUi,
    /// InvokeAI's `invokeai_metadata`.
    InvokeAi,
    /// A PNG without any generation metadata.
    None,
}

impl MetadataSource {
    /// The name shown to artists.
    pub fn display_name(self) -> &'static str {
        match self {
            MetadataSource::Atelier => "Atelier",
            MetadataSource::A1111 => "AUTOMATIC1111",
            MetadataSource::ComfyUi => "ComfyUI",
            MetadataSource::InvokeAi => "InvokeAI",
            MetadataSource::None => "no metadata",
        }
    }

    /// The stored id.
    pub fn id(self) -> &'static str {
        match self {
            MetadataSource::Atelier => "atelier",
            MetadataSource::A1111 => "a1111",
            MetadataSource::ComfyUi => "comfyui",
            MetadataSource::InvokeAi => "invokeai",
            MetadataSource::None => "none",
        }
    }
}

/// Where the time of a generation went.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct TimingRecord {
    /// Text encoding, seconds.
    pub text_encoding_secs: f64,
    /// Denoising, seconds.
    pub denoising_secs: f64,
    /// VAE decode, seconds.
    pub decode_secs: f64,
    /// The whole job, seconds.
    pub total_secs: f64,
}

impl From<Timings> for TimingRecord {
    fn from(t: Timings) -> Self {
        Self {
            text_encoding_secs: t.text_encoding_secs,
            denoising_secs: t.denoising_secs,
            decode_secs: t.decode_secs,
            total_secs: t.total_secs,
        }
    }
}

/// The parameters of one image. Everything but the prompt may be unknown for images from other
/// tools.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct ImageMetadata {
    /// The prompt.
    pub prompt: String,
    /// The negative prompt.
    pub negative_prompt: String,
    /// The model: folder, repo id or checkpoint name.
    pub model: String,
    /// First 10 hex digits of the SHA-256 of the model's UNet weights file (A1111's style).
    pub model_hash: Option<String>,
    /// Our sampler id (`dpmpp-2m-karras`) when known, else the other tool's sampler name.
    pub scheduler: String,
    /// DDIM's eta, when not 0.
    pub eta: Option<f64>,
    /// The seed.
    pub seed: Option<u64>,
    /// Denoising steps.
    pub steps: Option<usize>,
    /// Guidance scale.
    pub guidance: Option<f64>,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Where the time went (Atelier's images).
    pub timings: Option<TimingRecord>,
    /// The program and version that made the image.
    pub app_version: String,
    /// When it was made, seconds since 1970 (UTC).
    pub created_unix: i64,
    /// Which program wrote the metadata.
    pub source: MetadataSource,
    /// The comparison this image is a cell of, if any.
    pub comparison: Option<ComparisonRef>,
    /// Image to image: how much of the init picture was repainted (A1111's "Denoising
    /// strength"); `None` for text to image.
    pub denoising_strength: Option<f64>,
    /// Image to image: the picture it started from, kept in the library's inputs (a name for
    /// `Library::input_path`).
    pub init_image: Option<String>,
    /// Inpainting: the mask it used, kept in the library's inputs like the init image.
    pub mask_image: Option<String>,
    /// Whether a masked region was repainted (inpainting or outpainting) rather than the whole
    /// picture.
    pub inpainted: bool,
    /// How the init picture was worked on (resize mode, mask blur, masked content, "only
    /// masked", outpainting); `None` for text to image.
    pub image_options: Option<ImageOptions>,
    /// A1111's clip skip, when not 1.
    pub clip_skip: Option<usize>,
    /// The VAE chosen in place of the model's (file name, A1111's `VAE`); `None`: baked in.
    pub vae: Option<String>,
    /// The LoRAs merged: name and short hash (A1111's `Lora hashes`).
    pub lora_hashes: Vec<(String, String)>,
    /// The embeddings the prompts used: name and short hash (A1111's `TI hashes`).
    pub ti_hashes: Vec<(String, String)>,
    /// The hires fix's second pass, if it had one (the size and steps above are the first
    /// pass's, as A1111 writes them).
    pub hires: Option<HiresFix>,
}

/// Where an image sits in a comparison grid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ComparisonRef {
    /// The comparison's id (shared by its cells).
    pub id: String,
    /// The cell's row.
    pub row: usize,
    /// The cell's column.
    pub column: usize,
    /// The whole plan, as JSON, so that any cell can reopen the comparison.
    pub plan_json: String,
}

impl ImageMetadata {
    /// The metadata of an image Atelier just generated.
    pub fn for_generation(
        request: &GenerationRequest,
        model: &str,
        model_hash: Option<String>,
        timings: Timings,
        created_unix: i64,
    ) -> Self {
        Self {
            prompt: request.prompt.clone(),
            negative_prompt: request.negative_prompt.clone(),
            model: model.to_string(),
            model_hash,
            scheduler: Sampler {
                kind: request.scheduler,
                sigmas: request.sigmas,
            }
            .id(),
            eta: (request.eta > 0.0).then_some(request.eta),
            seed: Some(request.seed),
            steps: Some(request.steps),
            guidance: Some(request.guidance_scale),
            width: request.width as u32,
            height: request.height as u32,
            timings: Some(timings.into()),
            app_version: format!("atelier {}", env!("CARGO_PKG_VERSION")),
            created_unix,
            source: MetadataSource::Atelier,
            comparison: None,
            denoising_strength: None,
            init_image: None,
            mask_image: None,
            inpainted: false,
            image_options: None,
            clip_skip: (request.clip_skip > 1).then_some(request.clip_skip),
            vae: None,
            lora_hashes: Vec::new(),
            ti_hashes: Vec::new(),
            hires: None,
        }
    }

    /// Records a job's modes: the picture's settings (the stored picture and mask are named by
    /// the library when it keeps them) and the hires fix.
    pub fn set_modes(&mut self, image: Option<&ImageJob>, hires: Option<&HiresFix>) {
        self.image_options = image.map(|image| image.options);
        self.inpainted = image.is_some_and(ImageJob::is_inpainting);
        self.hires = hires.copied();
        self.denoising_strength = match (image, hires) {
            (Some(image), _) => Some(image.options.strength),
            (None, Some(hires)) => Some(hires.strength),
            (None, None) => None,
        };
    }

    /// Whether the image repainted a masked region (a mask, or outpainting).
    pub fn is_inpainting(&self) -> bool {
        self.inpainted
    }

    /// Our sampler, if the scheduler names one we know.
    pub fn sampler(&self) -> Option<Sampler> {
        Sampler::parse(&self.scheduler)
            .ok()
            .or_else(|| sampler_from_a1111(&self.scheduler, None))
    }

    /// The A1111 `parameters` text for these parameters (what other tools read).
    pub fn to_a1111(&self) -> A1111Parameters {
        let mut pairs = Vec::new();
        if let Some(steps) = self.steps {
            pairs.push(("Steps".to_string(), steps.to_string()));
        }
        match self.sampler() {
            Some(sampler) => {
                pairs.push(("Sampler".into(), sampler.kind.display_name().into()));
                if sampler.sigmas != SigmaSchedule::Default {
                    pairs.push(("Schedule type".into(), sampler.sigmas.display_name().into()));
                }
            }
            None if !self.scheduler.is_empty() => {
                pairs.push(("Sampler".into(), self.scheduler.clone()));
            }
            None => {}
        }
        if let Some(eta) = self.eta {
            pairs.push(("Eta DDIM".into(), eta.to_string()));
        }
        if let Some(guidance) = self.guidance {
            pairs.push(("CFG scale".into(), guidance.to_string()));
        }
        if let Some(seed) = self.seed {
            pairs.push(("Seed".into(), seed.to_string()));
        }
        pairs.push(("Size".into(), format!("{}x{}", self.width, self.height)));
        if let Some(clip_skip) = self.clip_skip.filter(|&n| n > 1) {
            pairs.push(("Clip skip".into(), clip_skip.to_string()));
        }
        let mut modes = A1111Parameters::default();
        match (&self.image_options, &self.hires) {
            (Some(options), _) => modes.push_image_options(options, self.is_inpainting()),
            (None, Some(hires)) => modes.push_hires(hires, self.steps.unwrap_or_default()),
            (None, None) => {
                if let Some(strength) = self.denoising_strength {
                    modes
                        .pairs
                        .push(("Denoising strength".into(), strength.to_string()));
                }
            }
        }
        pairs.extend(modes.pairs);
        if let Some(hash) = &self.model_hash {
            pairs.push(("Model hash".into(), hash.clone()));
        }
        if !self.model.is_empty() {
            pairs.push(("Model".into(), self.model.clone()));
        }
        if let Some(vae) = &self.vae {
            pairs.push(("VAE".into(), vae.clone()));
        }
        if !self.lora_hashes.is_empty() {
            pairs.push(("Lora hashes".into(), format_name_hashes(&self.lora_hashes)));
        }
        if !self.ti_hashes.is_empty() {
            pairs.push(("TI hashes".into(), format_name_hashes(&self.ti_hashes)));
        }
        if !self.app_version.is_empty() {
            pairs.push(("Version".into(), self.app_version.clone()));
        }
        A1111Parameters {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            pairs,
        }
    }

    /// The PNG text chunks to write: A1111's `parameters` and our full JSON.
    pub fn text_chunks(&self) -> Vec<(&'static str, String)> {
        vec![
            (PARAMETERS_KEYWORD, self.to_a1111().to_text()),
            (
                ATELIER_KEYWORD,
                serde_json::to_string(self).unwrap_or_default(),
            ),
        ]
    }

    /// Reads parameters from A1111's text.
    pub fn from_a1111(parameters: &A1111Parameters) -> Self {
        let number = |key: &str| {
            parameters
                .get(key)
                .and_then(|v| v.trim().parse::<f64>().ok())
        };
        let (width, height) = parameters
            .get("Size")
            .and_then(|size| {
                let (w, h) = size.split_once('x')?;
                Some((w.trim().parse().ok()?, h.trim().parse().ok()?))
            })
            .unwrap_or((0, 0));
        let sampler_name = parameters.get("Sampler").unwrap_or_default();
        let scheduler = sampler_from_a1111(sampler_name, parameters.get("Schedule type"))
            .map(|s| s.id())
            .unwrap_or_else(|| sampler_name.to_string());
        Self {
            prompt: parameters.prompt.clone(),
            negative_prompt: parameters.negative_prompt.clone(),
            model: parameters.get("Model").unwrap_or_default().to_string(),
            model_hash: parameters.get("Model hash").map(str::to_string),
            scheduler,
            eta: number("Eta DDIM").filter(|e| *e > 0.0),
            seed: parameters.get("Seed").and_then(|v| v.trim().parse().ok()),
            steps: parameters.get("Steps").and_then(|v| v.trim().parse().ok()),
            guidance: number("CFG scale"),
            width,
            height,
            timings: None,
            app_version: parameters.get("Version").unwrap_or_default().to_string(),
            created_unix: 0,
            source: MetadataSource::A1111,
            comparison: None,
            denoising_strength: number("Denoising strength"),
            init_image: None,
            mask_image: None,
            inpainted: parameters.get("Mask blur").is_some(),
            image_options: image_options_from_a1111(parameters),
            clip_skip: parameters
                .get("Clip skip")
                .and_then(|v| v.trim().parse::<usize>().ok())
                .filter(|&n| (2..=24).contains(&n)),
            lora_hashes: parameters
                .get("Lora hashes")
                .map(parse_name_hashes)
                .unwrap_or_default(),
            ti_hashes: parameters
                .get("TI hashes")
                .map(parse_name_hashes)
                .unwrap_or_default(),
            vae: parameters
                .get("VAE")
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_string),
            hires: hires_from_a1111(parameters),
        }
    }

    /// The best metadata among a PNG's text chunks: ours, then A1111's, ComfyUI's, InvokeAI's.
    /// `None` when none of them is there (or readable).
    pub fn from_chunks(chunks: &BTreeMap<String, String>) -> Option<Self> {
        if let Some(json) = chunks.get(ATELIER_KEYWORD)
            && let Ok(mut metadata) = serde_json::from_str::<ImageMetadata>(json)
        {
            metadata.source = MetadataSource::Atelier;
            return Some(metadata);
        }
        if let Some(text) = chunks.get(PARAMETERS_KEYWORD) {
            let parameters = A1111Parameters::parse(text);
            if !parameters.prompt.is_empty() || !parameters.pairs.is_empty() {
                return Some(Self::from_a1111(&parameters));
            }
        }
        if let Some(graph) = chunks.get("prompt")
            && let Some(metadata) = import::from_comfyui(graph)
        {
            return Some(metadata);
        }
        if let Some(json) = chunks.get("invokeai_metadata")
            && let Some(metadata) = import::from_invokeai(json)
        {
            return Some(metadata);
        }
        None
    }

    /// Fills the request fields these parameters know (prompt, seed, steps, ...), leaving the
    /// others as they are. Returns what could not be used, for the artist to see.
    pub fn apply_to(&self, request: &mut GenerationRequest) -> Vec<String> {
        let mut skipped = Vec::new();
        request.prompt = self.prompt.clone();
        request.negative_prompt = self.negative_prompt.clone();
        if let Some(seed) = self.seed {
            request.seed = seed;
        }
        if let Some(steps) = self.steps {
            request.steps = steps;
        }
        if let Some(guidance) = self.guidance {
            request.guidance_scale = guidance;
        }
        if self.width > 0 && self.height > 0 {
            request.width = self.width as usize;
            request.height = self.height as usize;
        }
        match self.sampler() {
            Some(sampler) => {
                request.scheduler = sampler.kind;
                request.sigmas = sampler.sigmas;
            }
            None if !self.scheduler.is_empty() => {
                skipped.push(format!(
                    "sampler {:?} (not one Atelier has)",
                    self.scheduler
                ));
            }
            None => {}
        }
        request.eta = self.eta.unwrap_or(0.0);
        request.clip_skip = self.clip_skip.unwrap_or(1);
        skipped
    }
}

/// The inpainting settings A1111's img2img infotext records (`Mask blur`, `Masked content`,
/// `Inpaint area`, `Masked area padding`), with its denoising strength; `None` when it has
/// neither a mask blur nor a hires fix's keys but a strength (plain img2img) or nothing.
fn image_options_from_a1111(parameters: &A1111Parameters) -> Option<ImageOptions> {
    let number = |key: &str| {
        parameters
            .get(key)
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    if parameters.get("Hires upscale").is_some() {
        return None;
    }
    let strength = number("Denoising strength")?;
    let mut options = ImageOptions {
        strength,
        ..ImageOptions::default()
    };
    if let Some(blur) = number("Mask blur") {
        options.mask_blur = blur as f32;
    }
    if let Some(content) = parameters.get("Masked content")
        && let Ok(content) = MaskedContent::parse(content)
    {
        options.masked_content = content;
    }
    if parameters
        .get("Inpaint area")
        .is_some_and(|area| area.trim().eq_ignore_ascii_case("Only masked"))
    {
        options.only_masked_padding = Some(number("Masked area padding").unwrap_or(32.0) as u32);
    }
    Some(options)
}

/// A1111's hires fix keys (`Hires upscale`, `Hires steps`, `Hires upscaler`, with the denoising
/// strength).
fn hires_from_a1111(parameters: &A1111Parameters) -> Option<HiresFix> {
    let number = |key: &str| {
        parameters
            .get(key)
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    let scale = number("Hires upscale")?;
    Some(HiresFix {
        scale,
        strength: number("Denoising strength").unwrap_or(0.7),
        steps: number("Hires steps")
            .filter(|steps| *steps >= 1.0)
            .map(|steps| steps as usize),
        // Other upscalers (ESRGAN models) are not ours: Lanczos is the nearest image upscale.
        upscaler: parameters
            .get("Hires upscaler")
            .and_then(|name| HiresUpscaler::parse(name).ok())
            .unwrap_or(HiresUpscaler::Lanczos),
    })
}

/// Our sampler for an A1111 sampler name (`DPM++ 2M`, or the older `DPM++ 2M Karras`) and
/// schedule type (`Karras`).
pub fn sampler_from_a1111(name: &str, schedule_type: Option<&str>) -> Option<Sampler> {
    let name = name.trim();
    let (base, suffix) = [SigmaSchedule::Karras, SigmaSchedule::Exponential]
        .iter()
        .find_map(|s| {
            name.strip_suffix(&format!(" {}", s.display_name()))
                .map(|base| (base, *s))
        })
        .unwrap_or((name, SigmaSchedule::Default));
    let kind = SchedulerKind::ALL.iter().copied().find(|kind| {
        kind.display_name().eq_ignore_ascii_case(base)
            || kind.id().eq_ignore_ascii_case(base)
            || (*kind == SchedulerKind::Pndm && base.eq_ignore_ascii_case("PNDM"))
            || (*kind == SchedulerKind::UniPc && base.eq_ignore_ascii_case("UniPC"))
    })?;
    let sigmas = match schedule_type.map(str::trim) {
        Some(t) if t.eq_ignore_ascii_case("Karras") => SigmaSchedule::Karras,
        Some(t) if t.eq_ignore_ascii_case("Exponential") => SigmaSchedule::Exponential,
        _ => suffix,
    };
    let sigmas = if kind.supports(sigmas) {
        sigmas
    } else {
        SigmaSchedule::Default
    };
    Some(Sampler { kind, sigmas })
}

/// A1111's `name: hash, name2: hash` (its `Lora hashes` and `TI hashes`).
pub fn format_name_hashes(pairs: &[(String, String)]) -> String {
    pairs
        .iter()
        .map(|(name, hash)| format!("{name}: {hash}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Reads `name: hash, name2: hash`; entries without a colon are skipped.
pub fn parse_name_hashes(text: &str) -> Vec<(String, String)> {
    text.split(',')
        .filter_map(|entry| {
            let (name, hash) = entry.rsplit_once(':')?;
            Some((name.trim().to_string(), hash.trim().to_string()))
        })
        .filter(|(name, _)| !name.is_empty())
        .collect()
}
