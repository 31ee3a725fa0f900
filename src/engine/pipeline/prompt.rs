//! Text encoding: prompts to the UNet's conditioning.

use std::sync::Arc;

use candle_core::{D, DType, Tensor};

use super::{ModelFamily, StableDiffusion};
use crate::engine::embeddings::{EmbeddingTokens, TextualInversion};
use crate::engine::error::Result;
use crate::engine::prompt_syntax::PromptChunk;

/// Conditioning for the UNet, for one prompt.
#[derive(Debug, Clone)]
pub struct PromptEmbeddings {
    /// `(1, 77 * chunks, width)` per-token context: each 75-token chunk of the prompt encoded on
    /// its own, as A1111 does.
    pub context: Tensor,
    /// `(1, pooled_width)` pooled text of the first chunk (SDXL only).
    pub pooled: Option<Tensor>,
}

impl StableDiffusion {
    /// Makes `embeddings` available to prompts (their words trigger them), replacing the
    /// previous set; returns, for each that does not fit this model's text encoders (an SD 1.x
    /// embedding on SDXL, say) and is left out, its name and why.
    pub fn set_embeddings(
        &mut self,
        embeddings: Vec<Arc<TextualInversion>>,
    ) -> Vec<(String, String)> {
        let widths: Vec<usize> = self
            .text_encoders
            .iter()
            .map(|part| part.encoder.config().hidden_size)
            .collect();
        let mut warnings = Vec::new();
        self.embeddings = embeddings
            .into_iter()
            .filter(|embedding| {
                let fits = (0..widths.len()).all(|i| embedding.vectors_for(i, &widths).is_some());
                if !fits {
                    let theirs: Vec<usize> =
                        embedding.vectors.iter().map(|v| v.dims()[1]).collect();
                    warnings.push((
                        embedding.name.clone(),
                        format!(
                            "embedding {} has {theirs:?}-wide vectors, this model's text \
                             encoders take {widths:?}: left out",
                            embedding.name
                        ),
                    ));
                }
                fits
            })
            .collect();
        warnings
    }

    /// The embeddings whose words a prompt holds (name and short hash, A1111's `TI hashes`).
    pub fn embeddings_in(&self, prompt: &str) -> Vec<(String, String)> {
        let (tokens, _, sources) = self.embedding_tokens(0);
        let mut used = Vec::new();
        for piece in crate::engine::embeddings::split_at_embeddings(
            &crate::engine::extra_networks::strip(prompt),
            &tokens,
        ) {
            if let Err(index) = piece {
                let embedding = &self.embeddings[sources[index]];
                let entry = (embedding.name.clone(), embedding.hash.clone());
                if !used.contains(&entry) {
                    used.push(entry);
                }
            }
        }
        used
    }

    /// Text encoder `encoder`'s view of the embeddings: their words with placeholder ids past
    /// its vocabulary, the vectors those ids read, and which embedding each word is.
    fn embedding_tokens(
        &self,
        encoder: usize,
    ) -> (Vec<EmbeddingTokens>, Option<Tensor>, Vec<usize>) {
        let Some(part) = self.text_encoders.get(encoder) else {
            return (Vec::new(), None, Vec::new());
        };
        let config = part.encoder.config();
        let widths: Vec<usize> = self
            .text_encoders
            .iter()
            .map(|part| part.encoder.config().hidden_size)
            .collect();
        let mut next = config.vocab_size as u32;
        let mut tokens = Vec::new();
        let mut rows = Vec::new();
        let mut sources = Vec::new();
        for (source, embedding) in self.embeddings.iter().enumerate() {
            if let Some(vectors) = embedding.vectors_for(encoder, &widths) {
                sources.push(source);
                let n = vectors.dims()[0] as u32;
                tokens.push(EmbeddingTokens {
                    word: embedding.name.to_lowercase(),
                    ids: (next..next + n).collect(),
                });
                rows.push(vectors.clone());
                next += n;
            }
        }
        // Longer words first, so that "ink-style" wins over "ink".
        let order: Vec<usize> = {
            let mut order: Vec<usize> = (0..tokens.len()).collect();
            order.sort_by_key(|&i| std::cmp::Reverse(tokens[i].word.len()));
            order
        };
        let tokens = order.iter().map(|&i| tokens[i].clone()).collect();
        let sources = order.iter().map(|&i| sources[i]).collect();
        let extra = (!rows.is_empty())
            .then(|| Tensor::cat(&rows, 0))
            .transpose()
            .ok()
            .flatten();
        (tokens, extra, sources)
    }

    /// Prompt tokens in one chunk, without the start and end tokens (75 for CLIP).
    pub fn max_prompt_tokens(&self) -> usize {
        self.text_encoders[0].tokenizer.max_length() - 2
    }

    /// A thread-safe counter of prompt tokens as A1111 counts them (emphasis syntax left out,
    /// chunks padded after a comma or `BREAK`; with `AND` or prompt editing, the longest text
    /// any part takes over 20 steps, as A1111's `get_prompt_lengths` does), for the prompt box.
    pub fn token_counter(&self) -> Arc<dyn Fn(&str) -> usize + Send + Sync> {
        use crate::engine::prompt_schedule::{SchedulePass, composable_parts, prompt_schedule};
        let tokenizer = self.text_encoders[0].tokenizer.clone();
        Arc::new(move |prompt: &str| {
            let stripped = crate::engine::extra_networks::strip(prompt);
            composable_parts(&stripped)
                .iter()
                .flat_map(|(text, _)| prompt_schedule(text, SchedulePass::First { steps: 20 }))
                .map(|(_, text)| tokenizer.chunks(&text).map_or(0, |(_, count)| count))
                .max()
                .unwrap_or(0)
        })
    }

    /// Tokenizes `prompt` with every tokenizer of the model as transformers does (plain text,
    /// truncated to one chunk): what diffusers' pipelines feed their text encoders.
    pub fn tokenize(&self, prompt: &str) -> Result<Vec<Vec<u32>>> {
        self.text_encoders
            .iter()
            .map(|part| Ok(part.tokenizer.tokenize(prompt)?.ids))
            .collect()
    }

    /// Tokenizes `prompt` with every tokenizer of the model as A1111 does: its chunks (token ids
    /// and weights), which [`StableDiffusion::encode_prompt`] encodes.
    pub fn prompt_chunks(&self, prompt: &str) -> Result<Vec<Vec<PromptChunk>>> {
        self.text_encoders
            .iter()
            .map(|part| Ok(part.tokenizer.chunks(prompt)?.0))
            .collect()
    }

    /// Encodes one prompt as A1111 does (emphasis, `BREAK`, no truncation: 75-token chunks,
    /// each encoded on its own, weighted, and concatenated); a prompt without emphasis that fits
    /// one chunk gives exactly what diffusers' pipeline of this family gives.
    pub fn encode_prompt(&self, prompt: &str) -> Result<PromptEmbeddings> {
        self.encode_prompt_with(prompt, 1)
    }

    /// [`StableDiffusion::encode_prompt`] with A1111's clip skip: SD 1.x reads the hidden state
    /// `clip_skip` layers from the end through the final layer norm; SD 2.x and SDXL read their
    /// penultimate layer whatever it says, as A1111 does with its default settings.
    pub fn encode_prompt_with(&self, prompt: &str, clip_skip: usize) -> Result<PromptEmbeddings> {
        let skip = match self.family {
            ModelFamily::Sd1 => clip_skip,
            ModelFamily::Sd2 | ModelFamily::Sdxl => 1,
        };
        let mut contexts = Vec::with_capacity(self.text_encoders.len());
        let mut pooled = None;
        for (encoder_index, part) in self.text_encoders.iter().enumerate() {
            let (embedding_tokens, extra, _) = self.embedding_tokens(encoder_index);
            let (chunks, _) = part.tokenizer.chunks_with(prompt, &embedding_tokens)?;
            let mut encoded = Vec::with_capacity(chunks.len());
            for (index, chunk) in chunks.iter().enumerate() {
                let encoding = part.encoder.encode_with(
                    std::slice::from_ref(&chunk.tokens),
                    &part.device,
                    skip,
                    extra.as_ref(),
                )?;
                // From an encoder kept on the CPU: to the UNet's device and precision.
                // (No copy when it already is.)
                let to_model = |t: Tensor| -> Result<Tensor> {
                    Ok(t.to_device(&self.device)?.to_dtype(self.dtype)?)
                };
                let hidden = match self.family {
                    ModelFamily::Sdxl => {
                        if index == 0 {
                            pooled = Some(to_model(encoding.pooled)?);
                        }
                        encoding.penultimate_hidden_state
                    }
                    ModelFamily::Sd1 | ModelFamily::Sd2 => encoding.last_hidden_state,
                };
                encoded.push(to_model(emphasize(&hidden, &chunk.weights)?)?);
            }
            contexts.push(if encoded.len() == 1 {
                encoded.remove(0)
            } else {
                Tensor::cat(&encoded, 1)?
            });
        }
        let context = if contexts.len() == 1 {
            contexts.remove(0)
        } else {
            Tensor::cat(&contexts, D::Minus1)?
        };
        Ok(PromptEmbeddings { context, pooled })
    }

    /// The negative conditioning: zeros for SDXL models that ask for it when the prompt is empty.
    pub fn encode_negative_prompt(
        &self,
        negative_prompt: &str,
        positive: &PromptEmbeddings,
    ) -> Result<PromptEmbeddings> {
        self.encode_negative_prompt_with(negative_prompt, positive, 1)
    }

    /// [`StableDiffusion::encode_negative_prompt`] with A1111's clip skip.
    pub fn encode_negative_prompt_with(
        &self,
        negative_prompt: &str,
        positive: &PromptEmbeddings,
        clip_skip: usize,
    ) -> Result<PromptEmbeddings> {
        if negative_prompt.is_empty() && self.force_zeros_for_empty_prompt {
            // The prompt's shape, as diffusers zeroes it (zero keys and values attend to
            // nothing, so its length does not change the image; equal lengths batch together).
            return Ok(PromptEmbeddings {
                context: positive.context.zeros_like()?,
                pooled: positive
                    .pooled
                    .as_ref()
                    .map(Tensor::zeros_like)
                    .transpose()?,
            });
        }
        self.encode_prompt_with(negative_prompt, clip_skip)
    }
}

/// A1111's "Original" emphasis: every token's hidden state multiplied by its weight, then the
/// whole chunk rescaled so that its mean is what it was before. Unchanged when every weight is 1.
fn emphasize(hidden: &Tensor, weights: &[f32]) -> Result<Tensor> {
    if weights.iter().all(|&w| w == 1.0) {
        return Ok(hidden.clone());
    }
    let dtype = hidden.dtype();
    let hidden = hidden.to_dtype(DType::F32)?;
    let original_mean = hidden.mean_all()?.to_scalar::<f32>()?;
    let weights = Tensor::from_slice(weights, (1, weights.len(), 1), hidden.device())?;
    let weighted = hidden.broadcast_mul(&weights)?;
    let new_mean = weighted.mean_all()?.to_scalar::<f32>()?;
    let rescaled = (weighted * f64::from(original_mean / new_mean))?;
    Ok(rescaled.to_dtype(dtype)?)
}
