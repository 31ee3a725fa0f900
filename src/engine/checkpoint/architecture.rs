//! A single file's components described as diffusers configs: channels, depths, widths and
//! context sizes from the tensor shapes; head counts, the noise schedule and the VAE's scale from
//! the sidecar config where there is one, else the defaults of the family's original configs.

use std::collections::{BTreeSet, HashMap};

use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::keys::{self, UNET_PREFIX};
use super::original_config::OriginalConfig;
use super::{CheckpointFamily, CheckpointInfo};
use crate::engine::config::{CheckedConfig, ClipTextConfig, UNetConfig, VaeConfig};
use crate::engine::weights::{Conversion, KeyMap};

/// Tensor shapes by key.
pub type Shapes = HashMap<String, Vec<usize>>;

/// What went wrong describing a file, in words for the artist.
pub type DescribeResult<T> = std::result::Result<T, String>;

/// One text encoder of a single file.
#[derive(Debug, Clone)]
pub struct TextEncoderPlan {
    /// Its config, from its shapes.
    pub config: ClipTextConfig,
    /// Its tensors under transformers' names.
    pub keys: KeyMap,
    /// What its tokenizer pads with (`<|endoftext|>` for CLIP ViT-L, `!` for OpenCLIP).
    pub pad_token: &'static str,
}

/// Everything needed to build a model from one file.
#[derive(Debug, Clone)]
pub struct SingleFilePlan {
    /// The UNet's config.
    pub unet: UNetConfig,
    /// The UNet's tensors.
    pub unet_keys: KeyMap,
    /// The VAE's config and tensors, when the VAE is baked in.
    pub vae: Option<(VaeConfig, KeyMap)>,
    /// The text encoders, in the pipeline's order.
    pub text_encoders: Vec<TextEncoderPlan>,
}

fn shape<'a>(shapes: &'a Shapes, key: &str) -> DescribeResult<&'a [usize]> {
    shapes
        .get(key)
        .map(Vec::as_slice)
        .ok_or_else(|| format!("the checkpoint has no {key}"))
}

fn dim(shapes: &Shapes, key: &str, axis: usize) -> DescribeResult<usize> {
    shape(shapes, key)?
        .get(axis)
        .copied()
        .ok_or_else(|| format!("{key} has no dimension {axis}"))
}

/// Parses a config built here, checking it as a config file's would be.
fn config<T: DeserializeOwned + CheckedConfig>(value: Value, what: &str) -> DescribeResult<T> {
    let config: T =
        serde_json::from_value(value).map_err(|e| format!("{what} from the shapes: {e}"))?;
    config
        .check()
        .map_err(|e| format!("{what} from the shapes: {e}"))?;
    Ok(config)
}

/// The shape of the tensor a module will be served under `name`.
fn mapped_shape(shapes: &Shapes, map: &KeyMap, name: &str) -> DescribeResult<Vec<usize>> {
    let stored = map
        .get(name)
        .ok_or_else(|| format!("the checkpoint has no tensor for {name}"))?;
    let mut found = shape(shapes, &stored.key)?.to_vec();
    match stored.conversion {
        Conversion::Transpose => found.reverse(),
        Conversion::Rows { parts, .. } => found[0] /= parts.max(1),
        Conversion::ConvToLinear => found.truncate(2),
        Conversion::Same => {}
    }
    Ok(found)
}

/// A text encoder's config from the tensors it will be served (transformers' names).
fn text_encoder_config(shapes: &Shapes, map: &KeyMap, act: &str) -> DescribeResult<ClipTextConfig> {
    let token = mapped_shape(shapes, map, "text_model.embeddings.token_embedding.weight")?;
    let positions = mapped_shape(
        shapes,
        map,
        "text_model.embeddings.position_embedding.weight",
    )?;
    let layers = keys::indices(map.keys().map(String::as_str), "text_model.encoder.layers.").len();
    let intermediate = mapped_shape(shapes, map, "text_model.encoder.layers.0.mlp.fc1.weight")?;
    let (vocab, width) = (token[0], token[1]);
    let projection = map
        .contains_key("text_projection.weight")
        .then(|| mapped_shape(shapes, map, "text_projection.weight"))
        .transpose()?
        .map(|s| s[0]);
    // Every released CLIP text tower has 64-wide heads (ViT-L 12 x 64, ViT-H 16 x 64, bigG 20 x 64).
    let heads = if width % 64 == 0 { width / 64 } else { 1 };
    config(
        json!({
            "vocab_size": vocab,
            "hidden_size": width,
            "intermediate_size": intermediate[0],
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "max_position_embeddings": positions[0],
            "hidden_act": act,
            "layer_norm_eps": 1e-5,
            "projection_dim": projection,
        }),
        "text encoder config",
    )
}

/// The text encoders of a checkpoint of `family` (none when it has none baked in).
pub fn text_encoders(
    keys: &[String],
    shapes: &Shapes,
    family: CheckpointFamily,
    original: &OriginalConfig,
) -> DescribeResult<Vec<TextEncoderPlan>> {
    let clip = |prefix: &str| -> DescribeResult<Option<TextEncoderPlan>> {
        let map = keys::clip(keys, prefix);
        if map.is_empty() {
            return Ok(None);
        }
        Ok(Some(TextEncoderPlan {
            config: text_encoder_config(shapes, &map, "quick_gelu")?,
            keys: map,
            pad_token: "<|endoftext|>",
        }))
    };
    let open_clip = |prefix: &str, penultimate: bool| -> DescribeResult<Option<TextEncoderPlan>> {
        let layers = keys::indices(keys::under(keys, prefix), "transformer.resblocks.").len();
        if layers == 0 {
            return Ok(None);
        }
        // SD 2.x's FrozenOpenCLIPEmbedder stops before the last block (diffusers drops it too).
        let kept = if penultimate { layers - 1 } else { layers };
        let map = keys::open_clip(keys, prefix, kept);
        Ok(Some(TextEncoderPlan {
            config: text_encoder_config(shapes, &map, "gelu")?,
            keys: map,
            pad_token: "!",
        }))
    };
    let encoders = match family {
        CheckpointFamily::Sd1 => vec![clip("cond_stage_model.transformer.")?],
        CheckpointFamily::Sd2 => {
            let penultimate = original.text_layer.as_deref() != Some("last");
            vec![open_clip("cond_stage_model.model.", penultimate)?]
        }
        CheckpointFamily::Sdxl => vec![
            clip("conditioner.embedders.0.transformer.")?,
            open_clip("conditioner.embedders.1.model.", false)?,
        ],
        CheckpointFamily::SdxlRefiner => vec![open_clip("conditioner.embedders.0.model.", false)?],
        other => return Err(format!("Atelier does not run {}", other.display_name())),
    };
    let found = encoders.iter().flatten().count();
    if found != 0 && found != encoders.len() {
        return Err(format!(
            "the checkpoint has {found} of the {} text encoders {} needs",
            encoders.len(),
            family.display_name()
        ));
    }
    Ok(encoders.into_iter().flatten().collect())
}

/// The UNet's config from its shapes.
fn unet_config(
    keys: &[String],
    shapes: &Shapes,
    info: &CheckpointInfo,
    original: &OriginalConfig,
    pooled_width: Option<usize>,
) -> DescribeResult<UNetConfig> {
    let p = UNET_PREFIX;
    let unet_keys: Vec<&str> = keys::under(keys, p).collect();
    let has = |key: String| shapes.contains_key(&format!("{p}{key}"));
    let conv_in = shape(shapes, &format!("{p}input_blocks.0.0.weight"))?;
    let (model_channels, in_channels) = (conv_in[0], conv_in[1]);
    let out_channels = dim(shapes, &format!("{p}out.2.weight"), 0)?;
    let layers_per_block = keys::unet_layers_per_block(&unet_keys);
    if layers_per_block == 0 {
        return Err("the UNet has no resnets in its first level".into());
    }
    let group = layers_per_block + 1;
    let input_blocks = keys::indices(unet_keys.iter().copied(), "input_blocks.");
    let levels = input_blocks
        .iter()
        .copied()
        .max()
        .unwrap_or(0)
        .div_ceil(group);
    let transformer_depth = |block: &str| {
        keys::indices(
            unet_keys.iter().copied(),
            &format!("{block}.1.transformer_blocks."),
        )
        .len()
    };
    let mut channels = Vec::new();
    let mut down_types = Vec::new();
    let mut depths = Vec::new();
    for level in 0..levels {
        let first = 1 + level * group;
        channels.push(dim(
            shapes,
            &format!("{p}input_blocks.{first}.0.out_layers.3.weight"),
            0,
        )?);
        let depth = transformer_depth(&format!("input_blocks.{first}"));
        down_types.push(if depth > 0 {
            "CrossAttnDownBlock2D"
        } else {
            "DownBlock2D"
        });
        depths.push(depth.max(1));
    }
    let up_types: Vec<&str> = (0..levels)
        .map(
            |level| match transformer_depth(&format!("output_blocks.{}", level * group)) {
                0 => "UpBlock2D",
                _ => "CrossAttnUpBlock2D",
            },
        )
        .collect();
    let attention_key = shapes
        .keys()
        .filter(|k| k.starts_with(p) && k.ends_with(".attn2.to_k.weight"))
        .min()
        .ok_or("the UNet has no cross-attention")?;
    let cross_attention_dim = dim(shapes, attention_key, 1)?;
    let proj_in = attention_key.replace("transformer_blocks.0.attn2.to_k.weight", "proj_in.weight");
    let use_linear_projection = shape(shapes, &proj_in)?.len() == 2;
    // Heads: the sidecar config, else the family's original config (SD 1.x: 8 heads;
    // SD 2.x and SDXL: 64 channels per head).
    let head_channels = match (original.num_heads, original.num_head_channels) {
        (Some(heads), _) => Err(heads),
        (None, Some(width)) => Ok(width),
        (None, None) if info.family == CheckpointFamily::Sd1 => Err(8),
        (None, None) => Ok(64),
    };
    let heads: Vec<usize> = match head_channels {
        Err(heads) => vec![heads; levels],
        Ok(width) => channels.iter().map(|c| (c / width).max(1)).collect(),
    };
    for (c, h) in channels.iter().zip(&heads) {
        if c % h != 0 {
            return Err(format!(
                "{c} channels do not split into {h} heads (a sidecar .yaml can say num_heads \
                 or num_head_channels)"
            ));
        }
    }
    let time_embed = shape(shapes, &format!("{p}time_embed.0.weight"))?;
    if time_embed != [model_channels * 4, model_channels] {
        return Err(format!(
            "the time embedding is {time_embed:?}, not 4 x {model_channels} channels"
        ));
    }
    let mut unet = json!({
        "in_channels": in_channels,
        "out_channels": out_channels,
        "block_out_channels": channels,
        "down_block_types": down_types,
        "up_block_types": up_types,
        "layers_per_block": layers_per_block,
        "norm_num_groups": 32,
        "cross_attention_dim": cross_attention_dim,
        "attention_head_dim": heads,
        "transformer_layers_per_block": depths,
        "use_linear_projection": use_linear_projection,
        // The native size (the configs' own `image_size` is marked unused): 512, 768 for
        // SD 2.x's v models, 1024 for SDXL.
        "sample_size": match info.family {
            CheckpointFamily::Sdxl | CheckpointFamily::SdxlRefiner => 128,
            CheckpointFamily::Sd2 if info.v_prediction == Some(true) => 96,
            _ => 64,
        },
    });
    if !has("middle_block.1.proj_in.weight".into()) {
        return Err(
            "the UNet's middle block has no attention (not a Stable Diffusion UNet)".into(),
        );
    }
    let label = format!("{p}label_emb.0.0.weight");
    if let Some(adm) = shapes.get(&label) {
        let input = adm[1];
        // Size and crop ids (6) for the base; size, crop and aesthetic score (5) for the refiner.
        let ids = if info.family == CheckpointFamily::SdxlRefiner {
            5
        } else {
            6
        };
        let width = match original.time_id_width {
            Some(width) => width,
            None => {
                let pooled = pooled_width.ok_or("an SDXL UNet without the pooled text encoder")?;
                let rest = input.saturating_sub(pooled);
                if rest == 0 || rest % ids != 0 {
                    return Err(format!(
                        "the added embedding takes {input} values, which is not {pooled} pooled \
                         plus {ids} time ids"
                    ));
                }
                rest / ids
            }
        };
        unet["addition_embed_type"] = json!("text_time");
        unet["addition_time_embed_dim"] = json!(width);
        unet["projection_class_embeddings_input_dim"] = json!(input);
    }
    config(unet, "UNet config")
}

/// The VAE's config and tensors under `prefix`, from its shapes; `scaling_factor` is the
/// model's (a VAE file does not say it).
pub fn vae_plan(
    keys: &[String],
    shapes: &Shapes,
    prefix: &str,
    scaling_factor: f64,
) -> DescribeResult<(VaeConfig, KeyMap)> {
    let key = |k: &str| format!("{prefix}{k}");
    let conv_in = shape(shapes, &key("encoder.conv_in.weight"))?;
    let vae_keys: Vec<&str> = keys::under(keys, prefix).collect();
    let levels: BTreeSet<usize> = keys::indices(vae_keys.iter().copied(), "encoder.down.");
    let channels = levels
        .iter()
        .map(|level| {
            dim(
                shapes,
                &key(&format!("encoder.down.{level}.block.0.conv1.weight")),
                0,
            )
        })
        .collect::<DescribeResult<Vec<_>>>()?;
    let layers = keys::indices(vae_keys.iter().copied(), "encoder.down.0.block.").len();
    let blocks = vec!["DownEncoderBlock2D"; channels.len()];
    let up_blocks = vec!["UpDecoderBlock2D"; channels.len()];
    let value = json!({
        "in_channels": conv_in[1],
        "out_channels": dim(shapes, &key("decoder.conv_out.weight"), 0)?,
        "block_out_channels": channels,
        "down_block_types": blocks,
        "up_block_types": up_blocks,
        "latent_channels": dim(shapes, &key("decoder.conv_in.weight"), 1)?,
        "layers_per_block": layers,
        "norm_num_groups": 32,
        "scaling_factor": scaling_factor,
        "force_upcast": true,
        "use_quant_conv": shapes.contains_key(&key("quant_conv.weight")),
        "use_post_quant_conv": shapes.contains_key(&key("post_quant_conv.weight")),
        "mid_block_add_attention": shapes.contains_key(&key("decoder.mid.attn_1.q.weight")),
    });
    Ok((config(value, "VAE config")?, keys::vae(keys, prefix)))
}

/// The VAE's latent scale for a model of `family`: the sidecar's, else the family's.
pub fn scaling_factor(family: CheckpointFamily, original: &OriginalConfig) -> f64 {
    original.scale_factor.unwrap_or(match family {
        CheckpointFamily::Sdxl | CheckpointFamily::SdxlRefiner => 0.13025,
        _ => 0.18215,
    })
}

/// Describes every component of a checkpoint around its `text_encoders` (from
/// [`text_encoders`]); `pooled_width` is that of the text encoders that come from elsewhere
/// when none are baked in (SDXL's added embedding needs it).
pub fn plan(
    keys: &[String],
    shapes: &Shapes,
    info: &CheckpointInfo,
    original: &OriginalConfig,
    text_encoders: Vec<TextEncoderPlan>,
    pooled_width: Option<usize>,
) -> DescribeResult<SingleFilePlan> {
    let pooled_width = text_encoders
        .last()
        .and_then(|e| e.config.projection_dim)
        .or(pooled_width);
    let unet = unet_config(keys, shapes, info, original, pooled_width)?;
    let vae = if info.has_vae {
        let scale = scaling_factor(info.family, original);
        Some(vae_plan(keys, shapes, "first_stage_model.", scale)?)
    } else {
        None
    };
    Ok(SingleFilePlan {
        unet_keys: keys::unet(keys),
        unet,
        vae,
        text_encoders,
    })
}
