//! Which of a model's weights a LoRA module names, built from the model's own weight names (as
//! ComfyUI does): every spelling a trainer uses for a weight maps to it — kohya's
//! `lora_unet_` + diffusers path or + original (SGM) path for SDXL, `lora_te_`/`lora_te1_`/
//! `lora_te2_` + transformers path, diffusers/PEFT's dotted `unet.`/`text_encoder.` paths.

use std::collections::HashMap;

use crate::engine::checkpoint::keys::unet_original_path;
use crate::engine::weights::WeightTable;

/// Module spelling to the model's weight name (`unet.down_blocks...to_q.weight`).
#[derive(Debug, Clone, Default)]
pub struct LoraTargets {
    by_key: HashMap<String, String>,
}

impl LoraTargets {
    /// Every spelling of every `.weight` in `weights`; `layers_per_block` and `up_attention`
    /// describe the UNet (for the original names); `text_encoders` is how many the model has.
    pub fn new(
        weights: &WeightTable,
        layers_per_block: usize,
        up_attention: &[bool],
        text_encoders: usize,
    ) -> Self {
        let mut by_key = HashMap::new();
        let underscored = |path: &str| path.replace('.', "_");
        for name in weights.names() {
            let Some(path) = name.strip_suffix(".weight") else {
                continue;
            };
            let mut add = |key: String| {
                by_key.insert(key, name.to_string());
            };
            if let Some(unet) = path.strip_prefix("unet.") {
                add(format!("lora_unet_{}", underscored(unet)));
                add(format!("unet.{unet}"));
                if let Some(original) = unet_original_path(unet, layers_per_block, up_attention) {
                    add(format!("lora_unet_{}", underscored(&original)));
                }
                continue;
            }
            let (encoder, rest) = match path.split_once('.') {
                Some(("text_encoder", rest)) => (1, rest),
                Some(("text_encoder_2", rest)) => (2, rest),
                _ => continue,
            };
            // transformers 5 saves CLIPTextModel without its `text_model.` level.
            let canonical =
                if rest.starts_with("text_model.") || rest.starts_with("text_projection") {
                    rest.to_string()
                } else {
                    format!("text_model.{rest}")
                };
            let component = if encoder == 1 {
                "text_encoder"
            } else {
                "text_encoder_2"
            };
            add(format!("{component}.{canonical}"));
            add(format!("lora_te{encoder}_{}", underscored(&canonical)));
            if encoder == 1 && text_encoders == 1 {
                add(format!("lora_te_{}", underscored(&canonical)));
            }
        }
        Self { by_key }
    }

    /// The weight a module key names, if any.
    pub fn weight_for(&self, module_key: &str) -> Option<&str> {
        if let Some(found) = self.by_key.get(module_key) {
            return Some(found);
        }
        // PEFT files written by some trainers carry a `base_model.model.` level.
        if let Some(inner) = module_key.strip_prefix("base_model.model.")
            && let Some(found) = self.by_key.get(inner)
        {
            return Some(found);
        }
        // diffusers' first LoRA format named attention processors:
        // `unet.….attn1.processor.to_q_lora.down.weight` (module `….processor.to_q`).
        let old = module_key.replace(".processor.", ".");
        let old = match old.strip_suffix(".to_out") {
            Some(head) => format!("{head}.to_out.0"),
            None => old,
        };
        self.by_key.get(&old).map(String::as_str)
    }
}

/// The family a LoRA was trained for, guessed from its keys (for the message when it does not
/// fit the model).
pub fn guess_family(module_keys: &[&str]) -> Option<&'static str> {
    if module_keys
        .iter()
        .any(|k| k.starts_with("lora_te2_") || k.starts_with("text_encoder_2."))
        || module_keys.iter().any(|k| {
            k.starts_with("lora_unet_input_blocks") || k.starts_with("lora_unet_output_blocks")
        })
    {
        return Some("SDXL");
    }
    if module_keys
        .iter()
        .any(|k| k.starts_with("lora_unet_") || k.starts_with("unet."))
    {
        return Some("SD 1.x/2.x");
    }
    None
}
