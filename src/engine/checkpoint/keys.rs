//! The original (CompVis/SGM) layout's keys under diffusers' module names, as diffusers'
//! `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint` and
//! `convert_open_clip_checkpoint` rename them; only names, never the weights themselves.

use std::collections::BTreeSet;

use crate::engine::weights::{Conversion, KeyMap, StoredTensor};

/// The UNet's prefix in a single file.
pub const UNET_PREFIX: &str = "model.diffusion_model.";

/// The keys under `prefix`, without it.
pub fn under<'a>(keys: &'a [String], prefix: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    keys.iter().filter_map(move |k| k.strip_prefix(prefix))
}

/// Distinct values of the numeric path segment after `head` (`input_blocks.` -> 0, 1, ...).
pub fn indices<'a>(keys: impl Iterator<Item = &'a str>, head: &str) -> BTreeSet<usize> {
    keys.filter_map(|k| k.strip_prefix(head)?.split('.').next()?.parse().ok())
        .collect()
}

/// Resnets per down level: the input blocks before the first downsampler, less `conv_in`.
pub fn unet_layers_per_block(unet_keys: &[&str]) -> usize {
    let blocks = indices(unet_keys.iter().copied(), "input_blocks.");
    blocks
        .iter()
        .copied()
        .find(|i| {
            unet_keys
                .iter()
                .any(|k| k.starts_with(&format!("input_blocks.{i}.0.op.")))
        })
        .map(|first_down| first_down.saturating_sub(1))
        .unwrap_or_else(|| blocks.len().saturating_sub(1))
}

fn resnet_part(rest: &str) -> String {
    let renamed = [
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("emb_layers.1.", "time_emb_proj."),
        ("skip_connection.", "conv_shortcut."),
    ]
    .iter()
    .find_map(|(old, new)| rest.strip_prefix(old).map(|tail| format!("{new}{tail}")));
    renamed.unwrap_or_else(|| rest.to_string())
}

/// `(index, rest)` of `input_blocks.7.1.proj_in.weight` after `input_blocks.` = `(7, "1.proj_in.weight")`.
fn split_index<'a>(key: &'a str, head: &str) -> Option<(usize, &'a str)> {
    let rest = key.strip_prefix(head)?;
    let (index, rest) = rest.split_once('.')?;
    Some((index.parse().ok()?, rest))
}

/// Diffusers' name of one UNet key (without the prefix), or `None` for keys diffusers drops.
fn unet_name(key: &str, layers_per_block: usize) -> Option<String> {
    let group = layers_per_block + 1;
    let fixed = [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
        ("label_emb.0.0.", "add_embedding.linear_1."),
        ("label_emb.0.2.", "add_embedding.linear_2."),
    ];
    for (old, new) in fixed {
        if let Some(tail) = key.strip_prefix(old) {
            return Some(format!("{new}{tail}"));
        }
    }
    if let Some((i, rest)) = split_index(key, "input_blocks.") {
        if i == 0 {
            return None;
        }
        let (block, layer) = ((i - 1) / group, (i - 1) % group);
        if let Some(tail) = rest.strip_prefix("0.op.") {
            return Some(format!("down_blocks.{block}.downsamplers.0.conv.{tail}"));
        }
        if let Some(tail) = rest.strip_prefix("0.") {
            return Some(format!(
                "down_blocks.{block}.resnets.{layer}.{}",
                resnet_part(tail)
            ));
        }
        if let Some(tail) = rest.strip_prefix("1.") {
            return Some(format!("down_blocks.{block}.attentions.{layer}.{tail}"));
        }
        return None;
    }
    if let Some((i, rest)) = split_index(key, "middle_block.") {
        return match i {
            1 => Some(format!("mid_block.attentions.0.{rest}")),
            0 | 2 => Some(format!("mid_block.resnets.{}.{}", i / 2, resnet_part(rest))),
            _ => None,
        };
    }
    if let Some((i, rest)) = split_index(key, "output_blocks.") {
        let (block, layer) = (i / group, i % group);
        if let Some(tail) = rest.strip_prefix("0.") {
            return Some(format!(
                "up_blocks.{block}.resnets.{layer}.{}",
                resnet_part(tail)
            ));
        }
        for upsampler in ["1.conv.", "2.conv."] {
            if let Some(tail) = rest.strip_prefix(upsampler) {
                return Some(format!("up_blocks.{block}.upsamplers.0.conv.{tail}"));
            }
        }
        if let Some(tail) = rest.strip_prefix("1.") {
            return Some(format!("up_blocks.{block}.attentions.{layer}.{tail}"));
        }
    }
    None
}

/// The original (SGM) name of a diffusers UNet module path (`down_blocks.1.attentions.0.proj_in`
/// -> `input_blocks.4.1.proj_in`), as kohya names SDXL LoRAs; `up_attention` says which up
/// blocks have attention (their upsampler moves one slot on).
pub fn unet_original_path(
    path: &str,
    layers_per_block: usize,
    up_attention: &[bool],
) -> Option<String> {
    let group = layers_per_block + 1;
    let resnet = |rest: &str| -> String {
        let (part, tail) = rest.split_once('.').unwrap_or((rest, ""));
        let renamed = match part {
            "norm1" => "in_layers.0",
            "conv1" => "in_layers.2",
            "norm2" => "out_layers.0",
            "conv2" => "out_layers.3",
            "time_emb_proj" => "emb_layers.1",
            "conv_shortcut" => "skip_connection",
            other => other,
        };
        if tail.is_empty() {
            renamed.to_string()
        } else {
            format!("{renamed}.{tail}")
        }
    };
    for (new, old) in [
        ("time_embedding.linear_1", "time_embed.0"),
        ("time_embedding.linear_2", "time_embed.2"),
        ("conv_in", "input_blocks.0.0"),
        ("conv_norm_out", "out.0"),
        ("conv_out", "out.2"),
        ("add_embedding.linear_1", "label_emb.0.0"),
        ("add_embedding.linear_2", "label_emb.0.2"),
    ] {
        if path == new {
            return Some(old.to_string());
        }
    }
    let parts: Vec<&str> = path.splitn(5, '.').collect();
    let number = |i: usize| parts.get(i)?.parse::<usize>().ok();
    match parts.first().copied()? {
        "down_blocks" => {
            let block = number(1)?;
            match *parts.get(2)? {
                "downsamplers" => Some(format!("input_blocks.{}.0.op", (block + 1) * group)),
                kind => {
                    let index = 1 + block * group + number(3)?;
                    let rest = parts.get(4).copied().unwrap_or("");
                    Some(match kind {
                        "resnets" => format!("input_blocks.{index}.0.{}", resnet(rest)),
                        "attentions" => format!("input_blocks.{index}.1.{rest}"),
                        _ => return None,
                    })
                }
            }
        }
        "mid_block" => {
            let index = number(2)?;
            let rest = parts.get(3..)?.join(".");
            match *parts.get(1)? {
                "resnets" => Some(format!("middle_block.{}.{}", 2 * index, resnet(&rest))),
                "attentions" => Some(format!("middle_block.1.{rest}")),
                _ => None,
            }
        }
        "up_blocks" => {
            let block = number(1)?;
            match *parts.get(2)? {
                "upsamplers" => {
                    let slot = if *up_attention.get(block)? { 2 } else { 1 };
                    Some(format!(
                        "output_blocks.{}.{slot}.conv",
                        block * group + group - 1
                    ))
                }
                kind => {
                    let index = block * group + number(3)?;
                    let rest = parts.get(4).copied().unwrap_or("");
                    Some(match kind {
                        "resnets" => format!("output_blocks.{index}.0.{}", resnet(rest)),
                        "attentions" => format!("output_blocks.{index}.1.{rest}"),
                        _ => return None,
                    })
                }
            }
        }
        _ => None,
    }
}

/// The UNet's keys (`model.diffusion_model.*`; EMA copies ignored, as diffusers and A1111 do).
pub fn unet(keys: &[String]) -> KeyMap {
    let unet_keys: Vec<&str> = under(keys, UNET_PREFIX).collect();
    let layers_per_block = unet_layers_per_block(&unet_keys);
    unet_keys
        .iter()
        .filter_map(|key| {
            let name = unet_name(key, layers_per_block)?;
            Some((name, StoredTensor::same(format!("{UNET_PREFIX}{key}"))))
        })
        .collect()
}

/// Diffusers' name of one VAE key (without the prefix); `up_levels` numbers the decoder's
/// levels, which the original layout counts from the bottom.
fn vae_name(key: &str, up_levels: usize) -> Option<(String, Conversion)> {
    let fixed = [
        ("encoder.norm_out.", "encoder.conv_norm_out."),
        ("decoder.norm_out.", "decoder.conv_norm_out."),
    ];
    for (old, new) in fixed {
        if let Some(tail) = key.strip_prefix(old) {
            return Some((format!("{new}{tail}"), Conversion::Same));
        }
    }
    for same in [
        "encoder.conv_in.",
        "encoder.conv_out.",
        "decoder.conv_in.",
        "decoder.conv_out.",
        "quant_conv.",
        "post_quant_conv.",
    ] {
        if key.starts_with(same) {
            return Some((key.to_string(), Conversion::Same));
        }
    }
    let (half, rest) = key.split_once('.')?;
    if half != "encoder" && half != "decoder" {
        return None;
    }
    let resnet = |tail: &str| tail.replacen("nin_shortcut.", "conv_shortcut.", 1);
    if let Some((level, rest)) = split_index(rest, "down.") {
        if let Some((j, tail)) = split_index(rest, "block.") {
            return Some((
                format!("{half}.down_blocks.{level}.resnets.{j}.{}", resnet(tail)),
                Conversion::Same,
            ));
        }
        let tail = rest.strip_prefix("downsample.conv.")?;
        return Some((
            format!("{half}.down_blocks.{level}.downsamplers.0.conv.{tail}"),
            Conversion::Same,
        ));
    }
    if let Some((level, rest)) = split_index(rest, "up.") {
        let block = up_levels.checked_sub(level + 1)?;
        if let Some((j, tail)) = split_index(rest, "block.") {
            return Some((
                format!("{half}.up_blocks.{block}.resnets.{j}.{}", resnet(tail)),
                Conversion::Same,
            ));
        }
        let tail = rest.strip_prefix("upsample.conv.")?;
        return Some((
            format!("{half}.up_blocks.{block}.upsamplers.0.conv.{tail}"),
            Conversion::Same,
        ));
    }
    for (i, block) in [(0, "mid.block_1."), (1, "mid.block_2.")] {
        if let Some(tail) = rest.strip_prefix(block) {
            return Some((
                format!("{half}.mid_block.resnets.{i}.{}", resnet(tail)),
                Conversion::Same,
            ));
        }
    }
    let tail = rest.strip_prefix("mid.attn_1.")?;
    let (part, param) = tail.split_once('.')?;
    let renamed = match part {
        "norm" => "group_norm",
        "q" => "to_q",
        "k" => "to_k",
        "v" => "to_v",
        "proj_out" => "to_out.0",
        _ => return None,
    };
    let conversion = match part {
        "norm" => Conversion::Same,
        _ => Conversion::ConvToLinear,
    };
    Some((
        format!("{half}.mid_block.attentions.0.{renamed}.{param}"),
        conversion,
    ))
}

/// The VAE's keys under `prefix` (`first_stage_model.` in a checkpoint, empty in a VAE file).
pub fn vae(keys: &[String], prefix: &str) -> KeyMap {
    let vae_keys: Vec<&str> = under(keys, prefix).collect();
    let up_levels = indices(vae_keys.iter().copied(), "decoder.up.").len();
    vae_keys
        .iter()
        .filter_map(|key| {
            let (name, conversion) = vae_name(key, up_levels)?;
            Some((
                name,
                StoredTensor {
                    key: format!("{prefix}{key}"),
                    conversion,
                },
            ))
        })
        .collect()
}

/// A text encoder stored in transformers' own layout under `prefix` (SD 1.x's and SDXL's
/// CLIP ViT-L); old files lack the `text_model.` level.
pub fn clip(keys: &[String], prefix: &str) -> KeyMap {
    under(keys, prefix)
        .filter(|key| !key.ends_with("position_ids"))
        .map(|key| {
            let name = if key.starts_with("text_model.") || key.starts_with("text_projection.") {
                key.to_string()
            } else {
                format!("text_model.{key}")
            };
            (name, StoredTensor::same(format!("{prefix}{key}")))
        })
        .collect()
}

/// An OpenCLIP text encoder under `prefix` (SD 2.x's ViT-H, SDXL's bigG), its first
/// `layers_kept` residual blocks under transformers' names.
pub fn open_clip(keys: &[String], prefix: &str, layers_kept: usize) -> KeyMap {
    let mut map = KeyMap::new();
    for key in under(keys, prefix) {
        let stored = |conversion| StoredTensor {
            key: format!("{prefix}{key}"),
            conversion,
        };
        let fixed = match key {
            "positional_embedding" => Some("text_model.embeddings.position_embedding.weight"),
            "token_embedding.weight" => Some("text_model.embeddings.token_embedding.weight"),
            "ln_final.weight" => Some("text_model.final_layer_norm.weight"),
            "ln_final.bias" => Some("text_model.final_layer_norm.bias"),
            _ => None,
        };
        if let Some(name) = fixed {
            map.insert(name.to_string(), stored(Conversion::Same));
            continue;
        }
        if key == "text_projection" {
            map.insert(
                "text_projection.weight".into(),
                stored(Conversion::Transpose),
            );
            continue;
        }
        let Some((layer, rest)) = split_index(key, "transformer.resblocks.") else {
            continue;
        };
        if layer >= layers_kept {
            continue;
        }
        let base = format!("text_model.encoder.layers.{layer}");
        if let Some(param) = rest.strip_prefix("attn.in_proj_") {
            for (index, projection) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                map.insert(
                    format!("{base}.self_attn.{projection}.{param}"),
                    stored(Conversion::Rows { index, parts: 3 }),
                );
            }
            continue;
        }
        let renamed = [
            ("ln_1.", "layer_norm1."),
            ("ln_2.", "layer_norm2."),
            ("mlp.c_fc.", "mlp.fc1."),
            ("mlp.c_proj.", "mlp.fc2."),
            ("attn.out_proj.", "self_attn.out_proj."),
        ]
        .iter()
        .find_map(|(old, new)| rest.strip_prefix(old).map(|tail| format!("{new}{tail}")));
        if let Some(renamed) = renamed {
            map.insert(format!("{base}.{renamed}"), stored(Conversion::Same));
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(names: &[&str]) -> Vec<String> {
        names.iter().map(|k| k.to_string()).collect()
    }

    #[test]
    fn unet_blocks_walk_down_and_up_in_groups() {
        let p = UNET_PREFIX;
        let file = keys(&[
            &format!("{p}input_blocks.0.0.weight"),
            &format!("{p}input_blocks.1.0.in_layers.2.weight"),
            &format!("{p}input_blocks.2.1.proj_in.weight"),
            &format!("{p}input_blocks.3.0.op.weight"),
            &format!("{p}input_blocks.4.0.skip_connection.weight"),
            &format!("{p}middle_block.2.emb_layers.1.bias"),
            &format!("{p}output_blocks.2.1.conv.weight"),
            &format!("{p}output_blocks.5.2.conv.bias"),
            &format!("{p}output_blocks.5.1.transformer_blocks.0.attn2.to_k.weight"),
            &format!("{p}label_emb.0.2.weight"),
            "model_ema.diffusion_modelinput_blocks00weight",
        ]);
        let map = unet(&file);
        let name = |key: &str| {
            map.iter()
                .find(|(_, stored)| stored.key == format!("{p}{key}"))
                .map(|(name, _)| name.as_str())
        };
        assert_eq!(name("input_blocks.0.0.weight"), Some("conv_in.weight"));
        assert_eq!(
            name("input_blocks.1.0.in_layers.2.weight"),
            Some("down_blocks.0.resnets.0.conv1.weight")
        );
        assert_eq!(
            name("input_blocks.2.1.proj_in.weight"),
            Some("down_blocks.0.attentions.1.proj_in.weight")
        );
        assert_eq!(
            name("input_blocks.3.0.op.weight"),
            Some("down_blocks.0.downsamplers.0.conv.weight")
        );
        assert_eq!(
            name("input_blocks.4.0.skip_connection.weight"),
            Some("down_blocks.1.resnets.0.conv_shortcut.weight")
        );
        assert_eq!(
            name("middle_block.2.emb_layers.1.bias"),
            Some("mid_block.resnets.1.time_emb_proj.bias")
        );
        assert_eq!(
            name("output_blocks.2.1.conv.weight"),
            Some("up_blocks.0.upsamplers.0.conv.weight")
        );
        assert_eq!(
            name("output_blocks.5.2.conv.bias"),
            Some("up_blocks.1.upsamplers.0.conv.bias")
        );
        assert_eq!(
            name("output_blocks.5.1.transformer_blocks.0.attn2.to_k.weight"),
            Some("up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k.weight")
        );
        assert_eq!(
            name("label_emb.0.2.weight"),
            Some("add_embedding.linear_2.weight")
        );
        assert_eq!(map.len(), 10, "EMA keys are not the model's");
    }

    #[test]
    fn original_names_invert_the_conversion() {
        let lpb = 2;
        let up_attention = [true, true, false];
        for key in [
            "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
            "input_blocks.3.0.op",
            "input_blocks.5.0.in_layers.2",
            "input_blocks.4.0.skip_connection",
            "middle_block.1.proj_in",
            "middle_block.2.out_layers.3",
            "output_blocks.2.2.conv",
            "output_blocks.8.1.conv",
            "output_blocks.7.0.emb_layers.1",
            "output_blocks.1.1.transformer_blocks.1.ff.net.0.proj",
            "time_embed.0",
            "label_emb.0.2",
            "out.2",
        ] {
            let diffusers = unet_name(&format!("{key}.weight"), lpb).expect(key);
            let path = diffusers.strip_suffix(".weight").unwrap();
            assert_eq!(
                unet_original_path(path, lpb, &up_attention).as_deref(),
                Some(key),
                "{path}"
            );
        }
    }

    #[test]
    fn vae_decoder_levels_are_numbered_from_the_top() {
        let file = keys(&[
            "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
            "first_stage_model.decoder.up.1.upsample.conv.weight",
            "first_stage_model.encoder.mid.attn_1.q.weight",
            "first_stage_model.encoder.norm_out.bias",
        ]);
        let map = vae(&file, "first_stage_model.");
        assert_eq!(
            map["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"].key,
            "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight"
        );
        assert!(map.contains_key("decoder.up_blocks.0.upsamplers.0.conv.weight"));
        assert_eq!(
            map["encoder.mid_block.attentions.0.to_q.weight"].conversion,
            Conversion::ConvToLinear
        );
        assert!(map.contains_key("encoder.conv_norm_out.bias"));
    }

    #[test]
    fn open_clip_splits_the_stacked_projection_and_drops_later_layers() {
        let p = "cond_stage_model.model.";
        let file = keys(&[
            &format!("{p}transformer.resblocks.0.attn.in_proj_weight"),
            &format!("{p}transformer.resblocks.1.mlp.c_fc.bias"),
            &format!("{p}text_projection"),
            &format!("{p}positional_embedding"),
        ]);
        let map = open_clip(&file, p, 1);
        assert_eq!(
            map["text_model.encoder.layers.0.self_attn.v_proj.weight"].conversion,
            Conversion::Rows { index: 2, parts: 3 }
        );
        assert!(!map.keys().any(|k| k.contains("layers.1.")));
        assert_eq!(
            map["text_projection.weight"].conversion,
            Conversion::Transpose
        );
        assert!(map.contains_key("text_model.embeddings.position_embedding.weight"));
    }

    #[test]
    fn old_clip_files_gain_the_text_model_level() {
        let file = keys(&[
            "cond_stage_model.transformer.embeddings.token_embedding.weight",
            "cond_stage_model.transformer.text_model.embeddings.position_ids",
        ]);
        let map = clip(&file, "cond_stage_model.transformer.");
        assert_eq!(
            map.keys().collect::<Vec<_>>(),
            vec!["text_model.embeddings.token_embedding.weight"]
        );
    }
}
