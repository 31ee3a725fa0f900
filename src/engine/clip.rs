//! The CLIP text encoder (transformers' `CLIPTextModel` and `CLIPTextModelWithProjection`).

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::{Embedding, LayerNorm, VarBuilder};

use super::config::ClipTextConfig;
use super::error::{EngineError, Result};
use super::nn::{Activation, Linear, attention, linear};

#[derive(Debug, Clone)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl EncoderLayer {
    fn new(config: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        let width = config.hidden_size;
        let eps = config.layer_norm_eps;
        let attn = vb.pp("self_attn");
        Ok(Self {
            layer_norm1: candle_nn::layer_norm(width, eps, vb.pp("layer_norm1"))?,
            q_proj: linear(width, width, true, attn.pp("q_proj"))?,
            k_proj: linear(width, width, true, attn.pp("k_proj"))?,
            v_proj: linear(width, width, true, attn.pp("v_proj"))?,
            out_proj: linear(width, width, true, attn.pp("out_proj"))?,
            layer_norm2: candle_nn::layer_norm(width, eps, vb.pp("layer_norm2"))?,
            fc1: linear(width, config.intermediate_size, true, vb.pp("mlp.fc1"))?,
            fc2: linear(config.intermediate_size, width, true, vb.pp("mlp.fc2"))?,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        heads: usize,
        mask: &Tensor,
        activation: Activation,
    ) -> Result<Tensor> {
        let normed = self.layer_norm1.forward(xs)?;
        let q = self.q_proj.forward(&normed)?;
        let k = self.k_proj.forward(&normed)?;
        let v = self.v_proj.forward(&normed)?;
        let attn = attention(&q, &k, &v, heads, false, Some(mask))?;
        let xs = (self.out_proj.forward(&attn)? + xs)?;
        let normed = self.layer_norm2.forward(&xs)?;
        let mlp = self
            .fc2
            .forward(&activation.apply(&self.fc1.forward(&normed)?)?)?;
        Ok((mlp + xs)?)
    }
}

/// What one pass of the text encoder yields.
#[derive(Debug, Clone)]
pub struct TextEncoding {
    /// `(batch, tokens, width)` after the final LayerNorm (SD 1.x and 2.x condition on this).
    pub last_hidden_state: Tensor,
    /// `(batch, tokens, width)` output of the second-to-last layer, before the final LayerNorm
    /// (`hidden_states[-2]`, which SDXL conditions on).
    pub penultimate_hidden_state: Tensor,
    /// `(batch, width or projection_dim)` the final state at the end-of-text token, projected by
    /// `text_projection` when the model has one.
    pub pooled: Tensor,
}

/// A CLIP text transformer.
#[derive(Debug, Clone)]
pub struct ClipTextEncoder {
    config: ClipTextConfig,
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
    activation: Activation,
}

impl ClipTextEncoder {
    /// Loads the encoder; weight names may or may not carry transformers 4's `text_model.` prefix.
    pub fn new(config: ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        let with_prefix = vb.contains_tensor("text_model.embeddings.token_embedding.weight");
        if !with_prefix && !vb.contains_tensor("embeddings.token_embedding.weight") {
            return Err(EngineError::Unsupported(
                "text encoder weights have neither text_model.embeddings.* nor embeddings.*".into(),
            ));
        }
        let model = if with_prefix {
            vb.pp("text_model")
        } else {
            vb.clone()
        };
        let width = config.hidden_size;
        let embeddings = model.pp("embeddings");
        let token_embedding =
            candle_nn::embedding(config.vocab_size, width, embeddings.pp("token_embedding"))?;
        let position_embedding = candle_nn::embedding(
            config.max_position_embeddings,
            width,
            embeddings.pp("position_embedding"),
        )?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| EncoderLayer::new(&config, model.pp("encoder.layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm =
            candle_nn::layer_norm(width, config.layer_norm_eps, model.pp("final_layer_norm"))?;
        let text_projection = match config.projection_dim {
            Some(dim) if vb.contains_tensor("text_projection.weight") => {
                Some(linear(width, dim, false, vb.pp("text_projection"))?)
            }
            _ => None,
        };
        Ok(Self {
            activation: Activation::parse(&config.hidden_act)?,
            config,
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
        })
    }

    /// The config this encoder was built from.
    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// Width of [`TextEncoding::pooled`].
    pub fn pooled_width(&self) -> usize {
        match &self.text_projection {
            Some(_) => self
                .config
                .projection_dim
                .unwrap_or(self.config.hidden_size),
            None => self.config.hidden_size,
        }
    }

    /// Encodes rows of token ids (each `max_position_embeddings` long).
    pub fn encode(&self, token_ids: &[Vec<u32>], device: &Device) -> Result<TextEncoding> {
        self.encode_skipping(token_ids, device, 1)
    }

    /// Layers the encoder has.
    pub fn layer_count(&self) -> usize {
        self.layers.len()
    }

    /// Encodes as A1111's clip skip does: `skip` 1 is [`ClipTextEncoder::encode`]; N stops
    /// N - 1 layers before the end, and the final layer norm applies to that hidden state (the
    /// last hidden state and the pooled output are then the stopped encoder's).
    pub fn encode_skipping(
        &self,
        token_ids: &[Vec<u32>],
        device: &Device,
        skip: usize,
    ) -> Result<TextEncoding> {
        self.encode_with(token_ids, device, skip, None)
    }

    /// [`ClipTextEncoder::encode_skipping`] where ids past the vocabulary stand for rows of
    /// `extra` `(n, width)` (textual inversion vectors): id `vocab_size + k` reads row `k`.
    pub fn encode_with(
        &self,
        token_ids: &[Vec<u32>],
        device: &Device,
        skip: usize,
        extra: Option<&Tensor>,
    ) -> Result<TextEncoding> {
        if skip == 0 || skip > self.layers.len() {
            return Err(EngineError::InvalidParameter(format!(
                "clip skip must be from 1 to {} (the text encoder's layers), got {skip}",
                self.layers.len()
            )));
        }
        let batch = token_ids.len();
        let len = token_ids.first().map_or(0, Vec::len);
        if batch == 0 || len == 0 || len > self.config.max_position_embeddings {
            return Err(EngineError::InvalidParameter(format!(
                "text encoder takes 1 to {} tokens per row",
                self.config.max_position_embeddings
            )));
        }
        let flat: Vec<u32> = token_ids.iter().flatten().copied().collect();
        let vocab = self.config.vocab_size as u32;
        let extra_rows = extra.map_or(0, |e| e.dims()[0]) as u32;
        if let Some(bad) = flat.iter().find(|&&id| id >= vocab + extra_rows) {
            return Err(EngineError::InvalidParameter(format!(
                "token id {bad} is outside the vocabulary ({vocab}) and the embeddings ({extra_rows})"
            )));
        }
        let clamped: Vec<u32> = flat
            .iter()
            .map(|&id| if id >= vocab { 0 } else { id })
            .collect();
        let ids = Tensor::from_vec(clamped, (batch, len), device)?;
        let mut token_vectors = self.token_embedding.forward(&ids)?;
        if let Some(extra) = extra.filter(|_| flat.iter().any(|&id| id >= vocab)) {
            let width = token_vectors.dim(2)?;
            let rows: Vec<u32> = flat.iter().map(|&id| id.saturating_sub(vocab)).collect();
            let rows = Tensor::from_vec(rows, batch * len, device)?;
            let replacement = extra
                .to_device(device)?
                .to_dtype(token_vectors.dtype())?
                .index_select(&rows, 0)?
                .reshape((batch, len, width))?;
            let mask: Vec<u8> = flat.iter().map(|&id| u8::from(id >= vocab)).collect();
            let mask = Tensor::from_vec(mask, (batch, len, 1), device)?
                .broadcast_as((batch, len, width))?;
            token_vectors = mask.where_cond(&replacement, &token_vectors)?;
        }
        let positions = Tensor::arange(0u32, len as u32, device)?.unsqueeze(0)?;
        let mut xs = token_vectors.broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask = causal_mask(len, device)?;
        let heads = self.config.num_attention_heads;
        let mut penultimate = xs.clone();
        let layer_count = self.layers.len() + 1 - skip;
        for (i, layer) in self.layers[..layer_count].iter().enumerate() {
            if i + 1 == layer_count {
                penultimate = xs.clone();
            }
            xs = layer.forward(&xs, heads, &mask, self.activation)?;
        }
        let last_hidden_state = self.final_layer_norm.forward(&xs)?;
        let mut pooled_rows = Vec::with_capacity(batch);
        for (row, ids) in token_ids.iter().enumerate() {
            let eos = self.eos_position(ids);
            pooled_rows.push(last_hidden_state.i((row, eos))?);
        }
        let mut pooled = Tensor::stack(&pooled_rows, 0)?;
        if let Some(projection) = &self.text_projection {
            pooled = projection.forward(&pooled)?;
        }
        Ok(TextEncoding {
            last_hidden_state,
            penultimate_hidden_state: penultimate,
            pooled,
        })
    }

    /// Where transformers pools: the first end-of-text token, or (legacy configs with
    /// `eos_token_id == 2`) the highest id, which is end-of-text in CLIP's vocabulary.
    fn eos_position(&self, ids: &[u32]) -> usize {
        if self.config.eos_token_id == 2 {
            // Embedding placeholders (past the vocabulary) are not end-of-text.
            let vocab = self.config.vocab_size as u32;
            let max = ids
                .iter()
                .copied()
                .filter(|&id| id < vocab)
                .max()
                .unwrap_or(0);
            ids.iter().position(|&id| id == max).unwrap_or(0)
        } else {
            let eos = self.config.eos_token_id as u32;
            ids.iter().position(|&id| id == eos).unwrap_or(0)
        }
    }
}

fn causal_mask(len: usize, device: &Device) -> Result<Tensor> {
    let values: Vec<f32> = (0..len)
        .flat_map(|i| (0..len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(values, (len, len), device)?.to_dtype(DType::F32)?)
}
