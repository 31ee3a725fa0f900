//! Text encoding: prompts to the UNet's conditioning.

use std::sync::Arc;

use candle_core::{D, Tensor};

use super::{ModelFamily, StableDiffusion};
use crate::engine::error::Result;

/// Conditioning for the UNet, for one prompt.
#[derive(Debug, Clone)]
pub struct PromptEmbeddings {
    /// `(1, 77, width)` per-token context.
    pub context: Tensor,
    /// `(1, pooled_width)` pooled text (SDXL only).
    pub pooled: Option<Tensor>,
    /// Prompt tokens dropped because the prompt was longer than the encoder takes.
    pub dropped_tokens: usize,
}

impl StableDiffusion {
    /// Prompt tokens the text encoder takes, without the start and end tokens (75 for CLIP).
    pub fn max_prompt_tokens(&self) -> usize {
        self.text_encoders[0].tokenizer.max_length() - 2
    }

    /// A thread-safe counter of prompt tokens (the first tokenizer's), for the prompt box.
    pub fn token_counter(&self) -> Arc<dyn Fn(&str) -> usize + Send + Sync> {
        let tokenizer = self.text_encoders[0].tokenizer.clone();
        Arc::new(move |prompt: &str| tokenizer.prompt_tokens(prompt).map_or(0, |t| t.len()))
    }

    /// Tokenizes `prompt` with every tokenizer of the model.
    pub fn tokenize(&self, prompt: &str) -> Result<Vec<Vec<u32>>> {
        self.text_encoders
            .iter()
            .map(|part| Ok(part.tokenizer.tokenize(prompt)?.ids))
            .collect()
    }

    /// Encodes one prompt as the diffusers pipeline of this family does.
    pub fn encode_prompt(&self, prompt: &str) -> Result<PromptEmbeddings> {
        let mut contexts = Vec::with_capacity(self.text_encoders.len());
        let mut pooled = None;
        let mut dropped_tokens = 0;
        for part in &self.text_encoders {
            let tokens = part.tokenizer.tokenize(prompt)?;
            dropped_tokens = dropped_tokens.max(tokens.dropped_tokens);
            let encoding = part.encoder.encode(&[tokens.ids], &self.device)?;
            match self.family {
                ModelFamily::Sdxl => {
                    contexts.push(encoding.penultimate_hidden_state);
                    pooled = Some(encoding.pooled);
                }
                ModelFamily::Sd1 | ModelFamily::Sd2 => contexts.push(encoding.last_hidden_state),
            }
        }
        let context = if contexts.len() == 1 {
            contexts.remove(0)
        } else {
            Tensor::cat(&contexts, D::Minus1)?
        };
        Ok(PromptEmbeddings {
            context,
            pooled,
            dropped_tokens,
        })
    }

    /// The negative conditioning: zeros for SDXL models that ask for it when the prompt is empty.
    pub fn encode_negative_prompt(
        &self,
        negative_prompt: &str,
        positive: &PromptEmbeddings,
    ) -> Result<PromptEmbeddings> {
        if negative_prompt.is_empty() && self.force_zeros_for_empty_prompt {
            return Ok(PromptEmbeddings {
                context: positive.context.zeros_like()?,
                pooled: positive
                    .pooled
                    .as_ref()
                    .map(Tensor::zeros_like)
                    .transpose()?,
                dropped_tokens: 0,
            });
        }
        self.encode_prompt(negative_prompt)
    }
}
