//! `UNet2DConditionModel`: the denoiser, built from `unet/config.json`.
//!
//! Mirrors diffusers' module tree and weight names, so the Hub's safetensors load as they are.

use candle_core::{D, DType, Tensor};
use candle_nn::VarBuilder;

use super::config::UNetConfig;
use super::error::{EngineError, Result};
use super::nn::{
    Activation, Conv2d, Downsample, GroupNorm, ResnetBlock, TimestepMlp, Upsample, conv2d,
    group_norm, timestep_embedding,
};

mod transformer;

use transformer::SpatialTransformer;

#[derive(Debug, Clone)]
struct DownBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    downsampler: Option<Downsample>,
}

#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    upsampler: Option<Upsample>,
}

#[derive(Debug, Clone)]
struct MidBlock {
    first: ResnetBlock,
    attentions: Vec<SpatialTransformer>,
    resnets: Vec<ResnetBlock>,
}

/// SDXL's extra conditioning: the pooled text embedding and the six size/crop time ids.
#[derive(Debug, Clone)]
pub struct AddedConditions {
    /// `(batch, pooled_width)` pooled and projected text embedding of the second encoder.
    pub text_embeds: Tensor,
    /// `(batch, 6)` original size, crop top-left and target size, as f32.
    pub time_ids: Tensor,
}

/// The UNet, ready to run.
#[derive(Debug, Clone)]
pub struct UNet {
    config: UNetConfig,
    conv_in: Conv2d,
    time_embedding: TimestepMlp,
    add_embedding: Option<TimestepMlp>,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    activation: Activation,
    /// CUDA graphs of whole evaluations, by input shapes (shared by clones: they share the
    /// weights the graphs read).
    #[cfg(feature = "cuda")]
    graphs: std::sync::Arc<std::sync::Mutex<super::cuda::GraphCache>>,
}

fn is_cross_attn(block_type: &str) -> Result<bool> {
    match block_type {
        "CrossAttnDownBlock2D" | "CrossAttnUpBlock2D" => Ok(true),
        "DownBlock2D" | "UpBlock2D" => Ok(false),
        other => Err(EngineError::Unsupported(format!("UNet block type {other}"))),
    }
}

impl UNet {
    /// Builds the UNet described by `config` from the weights in `vb`.
    pub fn new(config: UNetConfig, vb: VarBuilder) -> Result<Self> {
        let channels = &config.block_out_channels;
        let levels = channels.len();
        if levels == 0
            || config.down_block_types.len() != levels
            || config.up_block_types.len() != levels
        {
            return Err(EngineError::Unsupported(
                "UNet config: block_out_channels, down_block_types and up_block_types differ in length".into(),
            ));
        }
        let activation = Activation::parse(&config.act_fn)?;
        let groups = config.norm_num_groups;
        let eps = config.norm_eps;
        let time_dim = channels[0] * 4;
        let context_dim = |i: usize| config.cross_attention_dim.at(i).unwrap_or(1280);
        let layers_at = |i: usize| config.transformer_layers_per_block.at(i).unwrap_or(1);

        let conv_in = conv2d(
            config.in_channels,
            channels[0],
            config.conv_in_kernel,
            1,
            vb.pp("conv_in"),
        )?;
        // LCM-distilled UNets take the guidance scale as an embedding (time_cond_proj_dim).
        let time_embedding = match config.time_cond_proj_dim {
            Some(condition_dim) => TimestepMlp::with_condition(
                channels[0],
                time_dim,
                activation,
                condition_dim,
                vb.pp("time_embedding"),
            )?,
            None => TimestepMlp::new(channels[0], time_dim, activation, vb.pp("time_embedding"))?,
        };
        let add_embedding = match config.addition_embed_type.as_deref() {
            None => None,
            Some("text_time") => {
                let in_dim = config
                    .projection_class_embeddings_input_dim
                    .ok_or_else(|| {
                        EngineError::Unsupported(
                            "text_time UNet without projection_class_embeddings_input_dim".into(),
                        )
                    })?;
                Some(TimestepMlp::new(
                    in_dim,
                    time_dim,
                    activation,
                    vb.pp("add_embedding"),
                )?)
            }
            Some(other) => {
                return Err(EngineError::Unsupported(format!(
                    "UNet addition_embed_type {other:?}"
                )));
            }
        };

        let mut down_blocks = Vec::with_capacity(levels);
        let mut out_channels = channels[0];
        for (i, block_type) in config.down_block_types.iter().enumerate() {
            let in_channels = out_channels;
            out_channels = channels[i];
            let vb_block = vb.pp("down_blocks").pp(i);
            let cross = is_cross_attn(block_type)?;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..config.layers_per_block {
                let resnet_in = if j == 0 { in_channels } else { out_channels };
                resnets.push(ResnetBlock::new(
                    resnet_in,
                    out_channels,
                    Some(time_dim),
                    groups,
                    eps,
                    activation,
                    vb_block.pp("resnets").pp(j),
                )?);
                if cross {
                    attentions.push(SpatialTransformer::new(
                        out_channels,
                        config.heads(i),
                        layers_at(i),
                        context_dim(i),
                        &config,
                        vb_block.pp("attentions").pp(j),
                    )?);
                }
            }
            let downsampler = if i + 1 < levels {
                Some(Downsample::new(
                    out_channels,
                    vb_block.pp("downsamplers").pp(0),
                )?)
            } else {
                None
            };
            down_blocks.push(DownBlock {
                resnets,
                attentions,
                downsampler,
            });
        }

        let last = levels - 1;
        let mid_channels = channels[last];
        let mid_block = match config.mid_block_type.as_deref() {
            None => None,
            Some(kind @ ("UNetMidBlock2DCrossAttn" | "UNetMidBlock2D")) => {
                let vb_mid = vb.pp("mid_block");
                let resnet = |j: usize| {
                    ResnetBlock::new(
                        mid_channels,
                        mid_channels,
                        Some(time_dim),
                        groups,
                        eps,
                        activation,
                        vb_mid.pp("resnets").pp(j),
                    )
                };
                let attentions = if kind == "UNetMidBlock2DCrossAttn" {
                    vec![SpatialTransformer::new(
                        mid_channels,
                        config.heads(last),
                        layers_at(last),
                        context_dim(last),
                        &config,
                        vb_mid.pp("attentions").pp(0),
                    )?]
                } else {
                    Vec::new()
                };
                Some(MidBlock {
                    first: resnet(0)?,
                    attentions,
                    resnets: vec![resnet(1)?],
                })
            }
            Some(other) => {
                return Err(EngineError::Unsupported(format!("UNet mid block {other}")));
            }
        };

        let mut up_blocks = Vec::with_capacity(levels);
        let reversed: Vec<usize> = channels.iter().rev().copied().collect();
        let mut prev_output = reversed[0];
        for (i, block_type) in config.up_block_types.iter().enumerate() {
            let level = last - i;
            let out_channels = reversed[i];
            let skip_in = reversed[(i + 1).min(last)];
            let vb_block = vb.pp("up_blocks").pp(i);
            let cross = is_cross_attn(block_type)?;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            let resnet_count = config.layers_per_block + 1;
            for j in 0..resnet_count {
                let skip = if j == resnet_count - 1 {
                    skip_in
                } else {
                    out_channels
                };
                let resnet_in = if j == 0 { prev_output } else { out_channels };
                resnets.push(ResnetBlock::new(
                    resnet_in + skip,
                    out_channels,
                    Some(time_dim),
                    groups,
                    eps,
                    activation,
                    vb_block.pp("resnets").pp(j),
                )?);
                if cross {
                    attentions.push(SpatialTransformer::new(
                        out_channels,
                        config.heads(level),
                        layers_at(level),
                        context_dim(level),
                        &config,
                        vb_block.pp("attentions").pp(j),
                    )?);
                }
            }
            let upsampler = if i < last {
                Some(Upsample::new(
                    out_channels,
                    vb_block.pp("upsamplers").pp(0),
                )?)
            } else {
                None
            };
            prev_output = out_channels;
            up_blocks.push(UpBlock {
                resnets,
                attentions,
                upsampler,
            });
        }

        Ok(Self {
            conv_norm_out: group_norm(groups, channels[0], eps, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(
                channels[0],
                config.out_channels,
                config.conv_out_kernel,
                1,
                vb.pp("conv_out"),
            )?,
            config,
            conv_in,
            time_embedding,
            add_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            activation,
            #[cfg(feature = "cuda")]
            graphs: Default::default(),
        })
    }

    /// The config this UNet was built from.
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Whether the UNet needs SDXL's [`AddedConditions`].
    pub fn needs_added_conditions(&self) -> bool {
        self.add_embedding.is_some()
    }

    /// Predicts noise (or v, or x0) for `sample` `(batch, C, h, w)` at `timestep`, conditioned on
    /// `context` `(batch, tokens, width)`.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        context: &Tensor,
        added: Option<&AddedConditions>,
    ) -> Result<Tensor> {
        self.forward_with_guidance(sample, timestep, context, added, None)
    }

    /// Whether this is an LCM-distilled UNet, which takes the guidance scale as an embedding of
    /// this width instead of classifier-free guidance.
    pub fn guidance_embedding_dim(&self) -> Option<usize> {
        self.config.time_cond_proj_dim
    }

    /// [`UNet::forward`] with an LCM-distilled UNet's guidance embedding `(batch, dim)`
    /// (see [`guidance_scale_embedding`]).
    pub fn forward_with_guidance(
        &self,
        sample: &Tensor,
        timestep: f64,
        context: &Tensor,
        added: Option<&AddedConditions>,
        guidance: Option<&Tensor>,
    ) -> Result<Tensor> {
        // The whole evaluation is one function of device tensors (the timestep too), so that it
        // can run as one CUDA graph: [sample, timesteps, context, (text_embeds, time_ids),
        // (guidance)].
        let timesteps = Tensor::full(timestep as f32, sample.dim(0)?, sample.device())?;
        let mut inputs = vec![sample.clone(), timesteps, context.clone()];
        if let Some(added) = added {
            inputs.extend([added.text_embeds.clone(), added.time_ids.clone()]);
        }
        inputs.extend(guidance.cloned());
        let (has_added, has_guidance) = (added.is_some(), guidance.is_some());
        self.run_graphed(&inputs, |inputs| {
            let mut rest = inputs[3..].iter();
            let mut next = || {
                rest.next().cloned().ok_or_else(|| {
                    EngineError::InvalidParameter("UNet inputs do not line up".into())
                })
            };
            let added = match has_added {
                true => Some(AddedConditions {
                    text_embeds: next()?,
                    time_ids: next()?,
                }),
                false => None,
            };
            let guidance = match has_guidance {
                true => Some(next()?),
                false => None,
            };
            let emb = self.embedding(&inputs[0], &inputs[1], added.as_ref(), guidance.as_ref())?;
            self.body(&inputs[0], &emb, &inputs[2])
        })
    }

    /// `evaluate(inputs)`, replayed from a CUDA graph where it can be.
    #[cfg(feature = "cuda")]
    fn run_graphed(
        &self,
        inputs: &[Tensor],
        evaluate: impl Fn(&[Tensor]) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let mut graphs = self
            .graphs
            .lock()
            .map_err(|_| EngineError::Device("the UNet's CUDA graphs were poisoned".into()))?;
        graphs.run(inputs, evaluate)
    }

    /// `evaluate(inputs)`.
    #[cfg(not(feature = "cuda"))]
    fn run_graphed(
        &self,
        inputs: &[Tensor],
        evaluate: impl Fn(&[Tensor]) -> Result<Tensor>,
    ) -> Result<Tensor> {
        evaluate(inputs)
    }

    /// Whether this UNet's steps are captured into CUDA graphs and replayed (on by default on
    /// CUDA unless `ATELIER_CUDA_GRAPHS=0`; no effect elsewhere).
    pub fn set_cuda_graphs(&self, enabled: bool) {
        #[cfg(feature = "cuda")]
        if let Ok(mut graphs) = self.graphs.lock() {
            graphs.set_enabled(enabled);
        }
        #[cfg(not(feature = "cuda"))]
        let _ = enabled;
    }

    /// What the CUDA graphs have done so far, `None` off CUDA builds.
    #[cfg(feature = "cuda")]
    pub fn cuda_graph_report(&self) -> Option<super::cuda::GraphReport> {
        self.graphs.lock().ok().map(|graphs| graphs.report())
    }

    /// The time embedding of `timesteps` `(batch,)` f32 (with SDXL's added conditions and LCM's
    /// guidance embedding), `(batch, width)` in the sample's precision.
    fn embedding(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        added: Option<&AddedConditions>,
        guidance: Option<&Tensor>,
    ) -> Result<Tensor> {
        let batch = sample.dim(0)?;
        let dtype = sample.dtype();
        let t_emb = timestep_embedding(
            timesteps,
            self.config.block_out_channels[0],
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
        )?
        .to_dtype(dtype)?;
        let guidance = match guidance {
            Some(g) => Some(g.to_dtype(dtype)?),
            None => None,
        };
        let mut emb = self
            .time_embedding
            .forward_with_condition(&t_emb, guidance.as_ref())?;
        if let Some(add_embedding) = &self.add_embedding {
            let added = added.ok_or_else(|| {
                EngineError::InvalidParameter(
                    "this UNet needs pooled text embeddings and time ids (SDXL)".into(),
                )
            })?;
            let time_dim = self.config.addition_time_embed_dim.unwrap_or(256);
            let time_embeds = timestep_embedding(
                &added.time_ids.flatten_all()?,
                time_dim,
                self.config.flip_sin_to_cos,
                self.config.freq_shift,
            )?
            .reshape((batch, ()))?;
            let add_embeds = Tensor::cat(
                &[added.text_embeds.to_dtype(DType::F32)?, time_embeds],
                D::Minus1,
            )?
            .to_dtype(dtype)?;
            emb = (emb + add_embedding.forward(&add_embeds)?)?;
        }

        Ok(emb)
    }

    /// Everything after the time embedding.
    fn body(&self, sample: &Tensor, emb: &Tensor, context: &Tensor) -> Result<Tensor> {
        let mut hidden = self.conv_in.forward(sample)?;
        let mut skips = vec![hidden.clone()];
        for block in &self.down_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                hidden = resnet.forward(&hidden, Some(emb))?;
                if let Some(attn) = block.attentions.get(j) {
                    hidden = attn.forward(&hidden, context)?;
                }
                skips.push(hidden.clone());
            }
            if let Some(down) = &block.downsampler {
                hidden = down.forward(&hidden)?;
                skips.push(hidden.clone());
            }
        }

        if let Some(mid) = &self.mid_block {
            hidden = mid.first.forward(&hidden, Some(emb))?;
            for (j, resnet) in mid.resnets.iter().enumerate() {
                if let Some(attn) = mid.attentions.get(j) {
                    hidden = attn.forward(&hidden, context)?;
                }
                hidden = resnet.forward(&hidden, Some(emb))?;
            }
        }

        for block in &self.up_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip = skips.pop().ok_or_else(|| {
                    EngineError::Unsupported("UNet skip connections do not line up".into())
                })?;
                hidden = Tensor::cat(&[&hidden, &skip], 1)?;
                hidden = resnet.forward(&hidden, Some(emb))?;
                if let Some(attn) = block.attentions.get(j) {
                    hidden = attn.forward(&hidden, context)?;
                }
            }
            if let Some(up) = &block.upsampler {
                // Upsample to the next skip's size, which handles sizes not divisible by 2^levels.
                let size = match skips.last() {
                    Some(skip) => {
                        let (_, _, h, w) = skip.dims4()?;
                        Some((h, w))
                    }
                    None => None,
                };
                hidden = up.forward(&hidden, size)?;
            }
        }

        let hidden = self.conv_norm_out.forward_then(&hidden, self.activation)?;
        self.conv_out.forward(&hidden)
    }
}

/// The guidance-scale embedding of LCM-distilled UNets (diffusers'
/// `get_guidance_scale_embedding`): `w * 1000` in sines then cosines of `dim / 2` frequencies,
/// one row per batch item, in float32.
pub fn guidance_scale_embedding(
    w: f64,
    dim: usize,
    batch: usize,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let half = dim / 2;
    let scale = (10000f32).ln() / (half as f32 - 1.0).max(1.0);
    let w = w as f32 * 1000.0;
    let mut row: Vec<f32> = Vec::with_capacity(dim);
    let args: Vec<f32> = (0..half).map(|i| w * (i as f32 * -scale).exp()).collect();
    row.extend(args.iter().map(|a| a.sin()));
    row.extend(args.iter().map(|a| a.cos()));
    if dim % 2 == 1 {
        row.push(0.0);
    }
    Ok(Tensor::from_vec(row, (1, dim), device)?.repeat((batch, 1))?)
}
