//! The `config.json` files of a diffusers folder, parsed into typed structs.
//!
//! Every model shape comes from these files: nothing about SD 1.5 is assumed.
//! Fields that diffusers allows as "one value or one per block" are read by
//! [`PerBlock`], and every default mirrors the diffusers class it comes from.

use serde::Deserialize;

pub use crate::schedulers::config::SchedulerConfig;
use crate::schedulers::config::check_finite;

/// A value that diffusers configs give either once or once per block.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock<T> {
    /// One value for every block.
    Same(T),
    /// One value per block, in down-block order.
    Each(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    /// The value for block `index` (the last value repeats if the list is short).
    pub fn at(&self, index: usize) -> Option<T> {
        match self {
            PerBlock::Same(value) => Some(value.clone()),
            PerBlock::Each(values) => values.get(index).or(values.last()).cloned(),
        }
    }
}

fn default_in_channels() -> usize {
    4
}
fn default_layers_per_block() -> usize {
    2
}
fn default_norm_num_groups() -> usize {
    32
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}
fn default_cross_attention_dim() -> PerBlock<usize> {
    PerBlock::Same(1280)
}
fn default_attention_head_dim() -> PerBlock<usize> {
    PerBlock::Same(8)
}
fn default_transformer_layers() -> PerBlock<usize> {
    PerBlock::Same(1)
}
fn default_unet_channels() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn default_down_blocks() -> Vec<String> {
    vec![
        "CrossAttnDownBlock2D".into(),
        "CrossAttnDownBlock2D".into(),
        "CrossAttnDownBlock2D".into(),
        "DownBlock2D".into(),
    ]
}
fn default_up_blocks() -> Vec<String> {
    vec![
        "UpBlock2D".into(),
        "CrossAttnUpBlock2D".into(),
        "CrossAttnUpBlock2D".into(),
        "CrossAttnUpBlock2D".into(),
    ]
}
fn default_mid_block() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn default_act() -> String {
    "silu".into()
}
fn default_conv_kernel() -> usize {
    3
}

/// `unet/config.json`, as `UNet2DConditionModel` reads it.
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    /// Latent channels in.
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
    /// Latent channels out.
    #[serde(default = "default_in_channels")]
    pub out_channels: usize,
    /// Channels of each resolution level.
    #[serde(default = "default_unet_channels")]
    pub block_out_channels: Vec<usize>,
    /// Kinds of the down blocks (`CrossAttnDownBlock2D` or `DownBlock2D`).
    #[serde(default = "default_down_blocks")]
    pub down_block_types: Vec<String>,
    /// Kinds of the up blocks (`CrossAttnUpBlock2D` or `UpBlock2D`).
    #[serde(default = "default_up_blocks")]
    pub up_block_types: Vec<String>,
    /// Kind of the middle block; `null` means none.
    #[serde(default = "default_mid_block")]
    pub mid_block_type: Option<String>,
    /// Resnets per down block (up blocks have one more).
    #[serde(default = "default_layers_per_block")]
    pub layers_per_block: usize,
    /// Groups of every GroupNorm.
    #[serde(default = "default_norm_num_groups")]
    pub norm_num_groups: usize,
    /// Epsilon of the resnets' GroupNorms.
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// Width of the text embeddings the cross-attention reads.
    #[serde(default = "default_cross_attention_dim")]
    pub cross_attention_dim: PerBlock<usize>,
    /// Heads per block; diffusers historically names the head count this way.
    #[serde(default = "default_attention_head_dim")]
    pub attention_head_dim: PerBlock<usize>,
    /// Heads per block, when the config names them explicitly.
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    /// Transformer blocks inside each attention block.
    #[serde(default = "default_transformer_layers")]
    pub transformer_layers_per_block: PerBlock<usize>,
    /// Linear (SD 2.x, SDXL) rather than 1x1-conv projections around the transformer.
    #[serde(default)]
    pub use_linear_projection: bool,
    /// Compute attention scores in f32 (SD 2.1).
    #[serde(default)]
    pub upcast_attention: bool,
    /// Order of sine and cosine in the timestep embedding.
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    /// Frequency shift of the timestep embedding.
    #[serde(default)]
    pub freq_shift: f64,
    /// Activation of the timestep MLP and resnets.
    #[serde(default = "default_act")]
    pub act_fn: String,
    /// `text_time` for SDXL's pooled-text and size conditioning.
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// Width of each SDXL time id's sinusoidal embedding.
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    /// Input width of SDXL's `add_embedding`.
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// Guidance-embedding width of LCM-distilled UNets.
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    /// Kernel of `conv_in`.
    #[serde(default = "default_conv_kernel")]
    pub conv_in_kernel: usize,
    /// Kernel of `conv_out`.
    #[serde(default = "default_conv_kernel")]
    pub conv_out_kernel: usize,
    /// Native latent size (image size / VAE factor).
    #[serde(default)]
    pub sample_size: Option<usize>,
}

impl UNetConfig {
    /// Attention heads of down block `index` (diffusers' `num_attention_heads or attention_head_dim`).
    pub fn heads(&self, index: usize) -> usize {
        self.num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .at(index)
            .unwrap_or(8)
    }
}

fn default_vae_channels() -> Vec<usize> {
    vec![64]
}
fn default_latent_channels() -> usize {
    4
}
fn default_vae_layers() -> usize {
    1
}
fn default_scaling_factor() -> f64 {
    0.18215
}
fn default_image_channels() -> usize {
    3
}

/// `vae/config.json`, as `AutoencoderKL` reads it.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    /// Image channels in.
    #[serde(default = "default_image_channels")]
    pub in_channels: usize,
    /// Image channels out.
    #[serde(default = "default_image_channels")]
    pub out_channels: usize,
    /// Channels of each level; the downsampling factor is 2^(len - 1).
    #[serde(default = "default_vae_channels")]
    pub block_out_channels: Vec<usize>,
    /// Latent channels.
    #[serde(default = "default_latent_channels")]
    pub latent_channels: usize,
    /// Resnets per encoder block (decoder blocks have one more).
    #[serde(default = "default_vae_layers")]
    pub layers_per_block: usize,
    /// Groups of every GroupNorm.
    #[serde(default = "default_norm_num_groups")]
    pub norm_num_groups: usize,
    /// Latents are multiplied by this before the UNet sees them.
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
    /// Subtracted before scaling (SD3-style VAEs); absent in SD 1/2/XL.
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// True when the VAE overflows in f16 (SDXL's): decode it in f32.
    #[serde(default = "default_true")]
    pub force_upcast: bool,
    /// Whether the 1x1 `post_quant_conv` exists.
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    /// Whether the encoder's 1x1 `quant_conv` exists.
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    /// Whether the middle blocks have self-attention.
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
    /// The image side it was trained at: diffusers' tile size when decoding in tiles.
    #[serde(default, deserialize_with = "first_or_number")]
    pub sample_size: Option<usize>,
}

impl VaeConfig {
    /// Pixels per latent cell along each side: 2^(len(block_out_channels) - 1).
    pub fn scale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }
}

fn default_clip_vocab() -> usize {
    49408
}
fn default_clip_hidden() -> usize {
    512
}
fn default_clip_intermediate() -> usize {
    2048
}
fn default_clip_layers() -> usize {
    12
}
fn default_clip_heads() -> usize {
    8
}
fn default_clip_positions() -> usize {
    77
}
fn default_clip_act() -> String {
    "quick_gelu".into()
}
fn default_layer_norm_eps() -> f64 {
    1e-5
}
fn default_eos() -> i64 {
    2
}

/// `text_encoder/config.json`, as transformers' `CLIPTextConfig` reads it.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    /// Token vocabulary size.
    #[serde(default = "default_clip_vocab")]
    pub vocab_size: usize,
    /// Width of the hidden states.
    #[serde(default = "default_clip_hidden")]
    pub hidden_size: usize,
    /// Width of the MLPs.
    #[serde(default = "default_clip_intermediate")]
    pub intermediate_size: usize,
    /// Encoder layers.
    #[serde(default = "default_clip_layers")]
    pub num_hidden_layers: usize,
    /// Attention heads.
    #[serde(default = "default_clip_heads")]
    pub num_attention_heads: usize,
    /// Maximum tokens (77).
    #[serde(default = "default_clip_positions")]
    pub max_position_embeddings: usize,
    /// `quick_gelu` (OpenAI CLIP) or `gelu` (OpenCLIP).
    #[serde(default = "default_clip_act")]
    pub hidden_act: String,
    /// LayerNorm epsilon.
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Output width of `text_projection` (CLIPTextModelWithProjection).
    #[serde(default)]
    pub projection_dim: Option<usize>,
    /// End-of-text id; 2 is transformers' legacy value meaning "the highest id".
    #[serde(default = "default_eos")]
    pub eos_token_id: i64,
    /// The transformers class that wrote the file.
    #[serde(default)]
    pub architectures: Vec<String>,
}

/// `model_index.json`: which components a pipeline has.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct ModelIndex {
    /// The diffusers pipeline class (`StableDiffusionPipeline`, `StableDiffusionXLPipeline`, ...).
    #[serde(rename = "_class_name", default)]
    pub class_name: String,
    /// SDXL: an empty negative prompt means zero embeddings.
    #[serde(default)]
    pub force_zeros_for_empty_prompt: Option<bool>,
    /// Components and their classes, e.g. `"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]`.
    #[serde(flatten)]
    pub components: std::collections::BTreeMap<String, serde_json::Value>,
}

impl ModelIndex {
    /// Whether the pipeline names a component (`text_encoder_2`, ...), and it is not null.
    pub fn has_component(&self, name: &str) -> bool {
        match self.components.get(name) {
            Some(serde_json::Value::Array(parts)) => parts.iter().all(|p| !p.is_null()),
            _ => false,
        }
    }
}

/// A config checked as it is read, so that an unusable value is an error that names its field
/// rather than a panic or a black image deep inside a model.
pub trait CheckedConfig {
    /// `Err` with the first field that holds an unusable value, and why.
    fn check(&self) -> Result<(), String>;
}

/// The largest channel count, head count, layer count or vocabulary a config may ask for: far
/// beyond any real model, small enough that no size computed from it overflows.
const MAX_SIZE: usize = 1 << 20;

fn check_size(field: &str, value: usize) -> Result<(), String> {
    if value == 0 || value > MAX_SIZE {
        return Err(format!(
            "{field} must be between 1 and {MAX_SIZE}, got {value}"
        ));
    }
    Ok(())
}

fn check_per_block(field: &str, value: &PerBlock<usize>, blocks: usize) -> Result<(), String> {
    match value {
        PerBlock::Same(v) => check_size(field, *v),
        PerBlock::Each(values) if values.is_empty() => Err(format!("{field} is an empty list")),
        PerBlock::Each(values) => {
            for v in values.iter().take(blocks.max(1)) {
                check_size(field, *v)?;
            }
            Ok(())
        }
    }
}

fn check_channels(field: &str, channels: &[usize], groups: usize) -> Result<(), String> {
    if channels.is_empty() {
        return Err(format!("{field} is empty"));
    }
    if channels.len() > 8 {
        return Err(format!("{field} has {} levels; at most 8", channels.len()));
    }
    for &c in channels {
        check_size(field, c)?;
        if !c.is_multiple_of(groups) {
            return Err(format!(
                "{field}: {c} channels cannot be split into norm_num_groups = {groups} groups"
            ));
        }
    }
    Ok(())
}

impl CheckedConfig for UNetConfig {
    fn check(&self) -> Result<(), String> {
        check_size("norm_num_groups", self.norm_num_groups)?;
        check_channels(
            "block_out_channels",
            &self.block_out_channels,
            self.norm_num_groups,
        )?;
        let levels = self.block_out_channels.len();
        for (field, types) in [
            ("down_block_types", &self.down_block_types),
            ("up_block_types", &self.up_block_types),
        ] {
            if types.len() != levels {
                return Err(format!(
                    "{field} has {} entries but block_out_channels has {levels}",
                    types.len()
                ));
            }
        }
        check_size("in_channels", self.in_channels)?;
        check_size("out_channels", self.out_channels)?;
        check_size("layers_per_block", self.layers_per_block)?;
        check_finite("norm_eps", self.norm_eps)?;
        check_finite("freq_shift", self.freq_shift)?;
        check_per_block("cross_attention_dim", &self.cross_attention_dim, levels)?;
        check_per_block(
            "transformer_layers_per_block",
            &self.transformer_layers_per_block,
            levels,
        )?;
        let heads_field = if self.num_attention_heads.is_some() {
            "num_attention_heads"
        } else {
            "attention_head_dim"
        };
        check_per_block(
            heads_field,
            self.num_attention_heads
                .as_ref()
                .unwrap_or(&self.attention_head_dim),
            levels,
        )?;
        for (index, &channels) in self.block_out_channels.iter().enumerate() {
            let heads = self.heads(index);
            if !channels.is_multiple_of(heads) {
                return Err(format!(
                    "{heads_field}: {heads} heads do not divide the {channels} channels of block {index}"
                ));
            }
        }
        for (field, kernel) in [
            ("conv_in_kernel", self.conv_in_kernel),
            ("conv_out_kernel", self.conv_out_kernel),
        ] {
            if kernel % 2 == 0 || kernel > 15 {
                return Err(format!(
                    "{field} must be an odd number up to 15, got {kernel}"
                ));
            }
        }
        for (field, value) in [
            ("addition_time_embed_dim", self.addition_time_embed_dim),
            (
                "projection_class_embeddings_input_dim",
                self.projection_class_embeddings_input_dim,
            ),
            ("time_cond_proj_dim", self.time_cond_proj_dim),
            ("sample_size", self.sample_size),
        ] {
            if let Some(value) = value {
                check_size(field, value)?;
            }
        }
        Ok(())
    }
}

impl CheckedConfig for VaeConfig {
    fn check(&self) -> Result<(), String> {
        check_size("norm_num_groups", self.norm_num_groups)?;
        check_channels(
            "block_out_channels",
            &self.block_out_channels,
            self.norm_num_groups,
        )?;
        check_size("in_channels", self.in_channels)?;
        check_size("out_channels", self.out_channels)?;
        check_size("latent_channels", self.latent_channels)?;
        check_size("layers_per_block", self.layers_per_block)?;
        check_finite("scaling_factor", self.scaling_factor)?;
        if self.scaling_factor == 0.0 {
            return Err("scaling_factor must not be 0".into());
        }
        if let Some(shift) = self.shift_factor {
            check_finite("shift_factor", shift)?;
        }
        Ok(())
    }
}

impl CheckedConfig for ClipTextConfig {
    fn check(&self) -> Result<(), String> {
        check_size("vocab_size", self.vocab_size)?;
        check_size("hidden_size", self.hidden_size)?;
        check_size("intermediate_size", self.intermediate_size)?;
        check_size("num_hidden_layers", self.num_hidden_layers)?;
        check_size("num_attention_heads", self.num_attention_heads)?;
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "num_attention_heads: {} heads do not divide hidden_size {}",
                self.num_attention_heads, self.hidden_size
            ));
        }
        if self.max_position_embeddings < 2 || self.max_position_embeddings > 4096 {
            return Err(format!(
                "max_position_embeddings must be between 2 and 4096, got {}",
                self.max_position_embeddings
            ));
        }
        check_finite("layer_norm_eps", self.layer_norm_eps)?;
        if let Some(dim) = self.projection_dim {
            check_size("projection_dim", dim)?;
        }
        Ok(())
    }
}

impl CheckedConfig for SchedulerConfig {
    fn check(&self) -> Result<(), String> {
        SchedulerConfig::check(self)
    }
}

impl CheckedConfig for ModelIndex {
    fn check(&self) -> Result<(), String> {
        Ok(())
    }
}

/// `sample_size` as diffusers writes it: a number, `[height, width]` (the first is taken), or
/// null.
fn first_or_number<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> std::result::Result<Option<usize>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        One(usize),
        Pair(Vec<usize>),
    }
    Ok(match Option::<Size>::deserialize(deserializer)? {
        Some(Size::One(side)) => Some(side),
        Some(Size::Pair(sides)) => sides.first().copied(),
        None => None,
    })
}
