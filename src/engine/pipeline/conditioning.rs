//! What the UNet reads besides the latents, at each step: the prompts encoded as A1111 reads
//! them with prompt editing (`[from:to:when]`, `[a|b]`) and composable prompts (`a AND b:0.5`),
//! and how the predictions of its parts combine into one guided prediction.

use candle_core::Tensor;

use super::{GenerationRequest, StableDiffusion};
use crate::engine::error::{EngineError, Result};
use crate::engine::prompt_schedule::{SchedulePass, composable_parts, prompt_schedule, text_at};
use crate::engine::unet::AddedConditions;

/// The text embeddings the UNet reads, one part per text: with classifier-free guidance the
/// negative prompt's first, then each part of the prompt (one without `AND`).
pub(super) enum Context {
    /// `(parts x batch, tokens, width)`: every part of the same length, one UNet evaluation.
    Batched(Tensor),
    /// Parts of different lengths (chunk counts), each `(batch, tokens, width)`: one UNet
    /// evaluation per part, as A1111 does by default (padding them would change the image).
    Separate(Vec<Tensor>),
}

/// What the UNet reads besides the latents at one step.
pub(super) struct Conditioning {
    /// Text embeddings.
    pub(super) context: Context,
    /// SDXL's pooled text and size conditioning, for all parts' rows.
    pub(super) added: Option<AddedConditions>,
    /// LCM-distilled UNets' guidance-scale embedding.
    pub(super) guidance_embedding: Option<Tensor>,
    /// Whether classifier-free guidance runs (the negative prompt is part 0).
    pub(super) guided: bool,
    /// The prompt's parts' weights (A1111's composable prompt): guided, the prediction is
    /// `uncond + sum(weight x scale x (cond - uncond))`.
    pub(super) weights: Vec<f64>,
}

impl Conditioning {
    /// How many parts (rows of `batch`) the UNet's batch has: the prompt's, and the negative
    /// prompt's when guided.
    pub(super) fn parts(&self) -> usize {
        self.weights.len() + usize::from(self.guided)
    }

    /// The guided prediction from the UNet's `prediction` for all parts (`parts x batch` rows,
    /// in the order of the context).
    pub(super) fn combine(&self, prediction: &Tensor, batch: usize, scale: f64) -> Result<Tensor> {
        let part = |index: usize| prediction.narrow(0, index * batch, batch);
        if !self.guided {
            return Ok(part(0)?);
        }
        let uncond = part(0)?;
        let mut guided = uncond.clone();
        for (index, weight) in self.weights.iter().enumerate() {
            let cond = part(index + 1)?;
            guided = (&guided + ((cond - &uncond)? * (weight * scale))?)?;
        }
        Ok(guided)
    }
}

/// What the UNet reads at each step of a pass: with prompt editing, conditionings that change
/// during sampling.
pub(super) struct ConditioningSchedule {
    /// One per distinct set of prompt texts.
    conditionings: Vec<Conditioning>,
    /// `(last step, conditioning)` in order: steps (counted from 0 within the pass, as A1111
    /// counts them) up to the first pair's last step use its conditioning, and so on; the last
    /// pair's holds after its step.
    last_steps: Vec<(usize, usize)>,
}

impl ConditioningSchedule {
    /// The conditioning of `step` (counted from 0 within the pass).
    pub(super) fn at(&self, step: usize) -> &Conditioning {
        let index = self
            .last_steps
            .iter()
            .find(|(last, _)| step <= *last)
            .or(self.last_steps.last())
            .map_or(0, |&(_, index)| index);
        &self.conditionings[index]
    }
}

impl StableDiffusion {
    /// Encodes the prompts into what the UNet reads at each step of `pass`: one conditioning per
    /// distinct set of texts that A1111's prompt editing gives the negative prompt and each part
    /// of the prompt (`AND`; a prompt without either is one text throughout).
    pub(super) fn condition_schedule(
        &self,
        request: &GenerationRequest,
        pass: SchedulePass,
    ) -> Result<ConditioningSchedule> {
        // Read as A1111 reads them: `<lora:…>` tags out first, then `AND` and the weights
        // (the prompt only), then each text's editing.
        let stripped = crate::engine::extra_networks::strip(&request.prompt);
        let parts = composable_parts(&stripped);
        let weights: Vec<f64> = parts.iter().map(|p| p.1).collect();
        // Texts without `<lora:…>` tags encode as the prompt with them does (the tokenizer
        // leaves the tags out too).
        let mut schedules: Vec<Vec<(usize, String)>> = parts
            .iter()
            .map(|(text, _)| prompt_schedule(text, pass))
            .collect();
        let negative = crate::engine::extra_networks::strip(&request.negative_prompt);
        schedules.push(prompt_schedule(&negative, pass));
        let mut boundaries: Vec<usize> = schedules.iter().flatten().map(|p| p.0).collect();
        boundaries.sort_unstable();
        boundaries.dedup();
        let mut known: Vec<Vec<&str>> = Vec::new();
        let mut schedule = ConditioningSchedule {
            conditionings: Vec::new(),
            last_steps: Vec::new(),
        };
        for boundary in boundaries {
            let texts: Vec<&str> = schedules.iter().map(|s| text_at(s, boundary)).collect();
            let index = match known.iter().position(|k| *k == texts) {
                Some(index) => index,
                None => {
                    let (negative, prompts) = texts.split_last().unwrap_or((&"", &[]));
                    schedule
                        .conditionings
                        .push(self.condition(request, prompts, negative, &weights)?);
                    known.push(texts);
                    known.len() - 1
                }
            };
            schedule.last_steps.push((boundary, index));
        }
        Ok(schedule)
    }

    /// Encodes `prompts` (the parts of a composable prompt, weighed by `weights`) and
    /// `negative_prompt` into what the UNet reads, for the whole batch.
    fn condition(
        &self,
        request: &GenerationRequest,
        prompts: &[&str],
        negative_prompt: &str,
        weights: &[f64],
    ) -> Result<Conditioning> {
        let batch = request.batch_size;
        let positives = prompts
            .iter()
            .map(|prompt| self.encode_prompt_with(prompt, request.clip_skip))
            .collect::<Result<Vec<_>>>()?;
        let Some(first) = positives.first() else {
            return Err(EngineError::InvalidParameter(
                "the prompt has no part".into(),
            ));
        };
        let composable = positives.len() > 1 || weights.iter().any(|&w| w != 1.0);
        // LCM-distilled UNets take the guidance scale as an embedding and run without
        // classifier-free guidance (as LatentConsistencyModelPipeline does).
        let guidance_embedding = match self.unet.guidance_embedding_dim() {
            Some(_) if composable => {
                return Err(EngineError::InvalidParameter(
                    "`AND` and prompt weights (`prompt:0.5`) weigh the prompt's guidance, and \
                     this model (guidance-distilled, LCM) runs without classifier-free \
                     guidance: write the prompt without them"
                        .into(),
                ));
            }
            Some(dim) => Some(crate::engine::unet::guidance_scale_embedding(
                request.guidance_scale - 1.0,
                dim,
                batch,
                &self.device,
            )?),
            None => None,
        };
        // A composable prompt needs the negative prompt's prediction at any scale (A1111's
        // formula); a plain one only above 1.
        let guided = (request.guidance_scale > 1.0 || composable) && guidance_embedding.is_none();
        let negative = if guided {
            Some(self.encode_negative_prompt_with(negative_prompt, first, request.clip_skip)?)
        } else {
            None
        };
        let repeat = |t: &Tensor| -> Result<Tensor> {
            let rows: Vec<Tensor> = (0..batch).map(|_| t.clone()).collect();
            Ok(Tensor::cat(&rows, 0)?)
        };
        let mut contexts = Vec::new();
        let mut pooled = Vec::new();
        for embeddings in negative.iter().chain(&positives) {
            contexts.push(repeat(&embeddings.context)?.to_dtype(self.dtype)?);
            if let Some(p) = &embeddings.pooled {
                pooled.push(repeat(p)?);
            }
        }
        let parts = contexts.len();
        let model_batch = batch * parts;
        let same_length = contexts
            .iter()
            .map(|c| c.dim(1))
            .collect::<candle_core::Result<Vec<_>>>()?
            .windows(2)
            .all(|pair| pair[0] == pair[1]);
        let context = if same_length {
            Context::Batched(Tensor::cat(&contexts, 0)?)
        } else {
            Context::Separate(contexts)
        };
        let added = if self.unet.needs_added_conditions() {
            let text_embeds = Tensor::cat(&pooled, 0)?;
            let (h, w) = (request.height as f32, request.width as f32);
            let time_ids = if self.time_id_count() == Some(5) {
                // The SDXL refiner: original size, crop, aesthetic score (diffusers' defaults:
                // 6 for the prompt, 2.5 for the negative prompt).
                let ids: Vec<f32> = (0..parts)
                    .flat_map(|part| {
                        let score = if guided && part == 0 { 2.5 } else { 6.0 };
                        std::iter::repeat_n([h, w, 0.0, 0.0, score], batch).flatten()
                    })
                    .collect();
                Tensor::from_vec(ids, (model_batch, 5), &self.device)?
            } else {
                let ids = [h, w, 0.0, 0.0, h, w];
                Tensor::new(&ids, &self.device)?
                    .unsqueeze(0)?
                    .repeat((model_batch, 1))?
            };
            Some(AddedConditions {
                text_embeds,
                time_ids,
            })
        } else {
            None
        };
        Ok(Conditioning {
            context,
            added,
            guidance_embedding,
            guided,
            weights: weights.to_vec(),
        })
    }
}
