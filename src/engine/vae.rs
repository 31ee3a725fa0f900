//! `AutoencoderKL`, built from `vae/config.json`: the decoder (latents to pixels) and the
//! encoder (pixels to a latent distribution, for image to image).

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use super::config::VaeConfig;
use super::error::{EngineError, Result};
use super::nn::{
    Activation, Conv2d, GroupNorm, Linear, ResnetBlock, Upsample, attention, conv2d, group_norm,
    linear,
};

/// The VAE's single-head self-attention over all pixels of the middle block.
#[derive(Debug, Clone)]
struct VaeAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl VaeAttention {
    fn new(channels: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        // Checkpoints converted before diffusers 0.14 use the old names.
        let legacy = !vb.contains_tensor("to_q.weight") && vb.contains_tensor("query.weight");
        let name = |new: &'static str, old: &'static str| if legacy { old } else { new };
        Ok(Self {
            group_norm: group_norm(groups, channels, 1e-6, vb.pp("group_norm"))?,
            to_q: linear(channels, channels, true, vb.pp(name("to_q", "query")))?,
            to_k: linear(channels, channels, true, vb.pp(name("to_k", "key")))?,
            to_v: linear(channels, channels, true, vb.pp(name("to_v", "value")))?,
            to_out: linear(
                channels,
                channels,
                true,
                if legacy {
                    vb.pp("proj_attn")
                } else {
                    vb.pp("to_out").pp(0)
                },
            )?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (batch, channels, height, width) = xs.dims4()?;
        let tokens = self
            .group_norm
            .forward(xs)?
            .reshape((batch, channels, height * width))?
            .transpose(1, 2)?;
        let q = self.to_q.forward(&tokens)?;
        let k = self.to_k.forward(&tokens)?;
        let v = self.to_v.forward(&tokens)?;
        let out = self
            .to_out
            .forward(&attention(&q, &k, &v, 1, true, None)?)?;
        let out = out
            .transpose(1, 2)?
            .reshape((batch, channels, height, width))?;
        Ok((out + xs)?)
    }
}

/// `count` resnets of a VAE block: the first from `in_channels`, all to `out_channels`.
fn resnet_stack(
    count: usize,
    in_channels: usize,
    out_channels: usize,
    groups: usize,
    vb: VarBuilder,
) -> Result<Vec<ResnetBlock>> {
    (0..count)
        .map(|j| {
            let resnet_in = if j == 0 { in_channels } else { out_channels };
            ResnetBlock::new(
                resnet_in,
                out_channels,
                None,
                groups,
                1e-6,
                Activation::Silu,
                vb.pp(j),
            )
        })
        .collect()
}

/// The middle of the encoder and the decoder: a resnet, single-head attention (unless the config
/// leaves it out), a resnet, at the widest level.
#[derive(Debug, Clone)]
struct VaeMidBlock {
    first: ResnetBlock,
    attention: Option<VaeAttention>,
    second: ResnetBlock,
}

impl VaeMidBlock {
    fn new(config: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let top = config.block_out_channels.last().copied().ok_or_else(|| {
            EngineError::Unsupported("VAE config has no block_out_channels".into())
        })?;
        let groups = config.norm_num_groups;
        let resnet = |j: usize| {
            ResnetBlock::new(
                top,
                top,
                None,
                groups,
                1e-6,
                Activation::Silu,
                vb.pp("resnets").pp(j),
            )
        };
        Ok(Self {
            first: resnet(0)?,
            attention: match config.mid_block_add_attention {
                true => Some(VaeAttention::new(top, groups, vb.pp("attentions").pp(0))?),
                false => None,
            },
            second: resnet(1)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = self.first.forward(xs, None)?;
        if let Some(attention) = &self.attention {
            xs = attention.forward(&xs)?;
        }
        self.second.forward(&xs, None)
    }
}

#[derive(Debug, Clone)]
struct DecoderUpBlock {
    resnets: Vec<ResnetBlock>,
    upsampler: Option<Upsample>,
}

/// The VAE decoder: scaled latents in, RGB in [-1, 1] out.
#[derive(Debug, Clone)]
pub struct VaeDecoder {
    config: VaeConfig,
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid: VaeMidBlock,
    up_blocks: Vec<DecoderUpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    tf32_convolutions: bool,
}

impl VaeDecoder {
    /// Lets an f32 decoder's convolutions use TF32 tensor cores on the GPU, as PyTorch does by
    /// default for cuDNN convolutions: for a VAE upcast from f16 only (SDXL's `force_upcast`).
    pub fn allow_tf32_convolutions(&mut self, allow: bool) {
        self.tf32_convolutions = allow;
    }

    /// Builds the decoder described by `config` from the weights in `vb` (the whole VAE file).
    pub fn new(config: VaeConfig, vb: VarBuilder) -> Result<Self> {
        let channels = &config.block_out_channels;
        let Some(&top) = channels.last() else {
            return Err(EngineError::Unsupported(
                "VAE config has no block_out_channels".into(),
            ));
        };
        let groups = config.norm_num_groups;
        let eps = 1e-6;
        let post_quant_conv = if config.use_post_quant_conv {
            Some(conv2d(
                config.latent_channels,
                config.latent_channels,
                1,
                1,
                vb.pp("post_quant_conv"),
            )?)
        } else {
            None
        };
        let vb = vb.pp("decoder");
        let reversed: Vec<usize> = channels.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(reversed.len());
        let mut out_channels = reversed[0];
        for (i, &level_channels) in reversed.iter().enumerate() {
            let prev_output = out_channels;
            out_channels = level_channels;
            let vb_block = vb.pp("up_blocks").pp(i);
            let resnets = resnet_stack(
                config.layers_per_block + 1,
                prev_output,
                out_channels,
                groups,
                vb_block.pp("resnets"),
            )?;
            let upsampler = if i + 1 < reversed.len() {
                Some(Upsample::new(
                    out_channels,
                    vb_block.pp("upsamplers").pp(0),
                )?)
            } else {
                None
            };
            up_blocks.push(DecoderUpBlock { resnets, upsampler });
        }
        Ok(Self {
            post_quant_conv,
            conv_in: conv2d(config.latent_channels, top, 3, 1, vb.pp("conv_in"))?,
            mid: VaeMidBlock::new(&config, vb.pp("mid_block"))?,
            up_blocks,
            conv_norm_out: group_norm(groups, channels[0], eps, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(channels[0], config.out_channels, 3, 1, vb.pp("conv_out"))?,
            config,
            tf32_convolutions: false,
        })
    }

    /// The config this decoder was built from.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Decodes latents already divided by `scaling_factor` into images in [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        if self.tf32_convolutions {
            super::fused::with_tf32_convolutions(|| self.decode_layers(latents))
        } else {
            self.decode_layers(latents)
        }
    }

    fn decode_layers(&self, latents: &Tensor) -> Result<Tensor> {
        let mut xs = match &self.post_quant_conv {
            Some(conv) => conv.forward(latents)?,
            None => latents.clone(),
        };
        xs = self.conv_in.forward(&xs)?;
        xs = self.mid.forward(&xs)?;
        for block in &self.up_blocks {
            for resnet in &block.resnets {
                xs = resnet.forward(&xs, None)?;
            }
            if let Some(up) = &block.upsampler {
                xs = up.forward(&xs, None)?;
            }
        }
        let xs = self.conv_norm_out.forward_then(&xs, Activation::Silu)?;
        self.conv_out.forward(&xs)
    }
}

#[derive(Debug, Clone)]
struct EncoderDownBlock {
    resnets: Vec<ResnetBlock>,
    /// Diffusers' `Downsample2D` with `padding=0`: pad right and bottom by one, then a strided
    /// 3x3 convolution.
    downsampler: Option<Conv2d>,
}

/// The distribution the encoder gives for each latent: a diagonal Gaussian (diffusers'
/// `DiagonalGaussianDistribution`), in the VAE's own (unscaled) latent space.
#[derive(Debug, Clone)]
pub struct LatentDistribution {
    /// The mean, `(batch, latent channels, h, w)`.
    pub mean: Tensor,
    /// The standard deviation, same shape (`exp(logvar / 2)`, logvar clamped to [-30, 20]).
    pub std: Tensor,
}

impl LatentDistribution {
    /// A draw `mean + std * noise` (diffusers' `sample(generator)`), with `noise` standard
    /// normal of the mean's shape, or with more rows: one draw per row from the same picture.
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        Ok(self.mean.broadcast_add(&self.std.broadcast_mul(noise)?)?)
    }
}

/// The VAE encoder: RGB in [-1, 1] in, a latent distribution out.
#[derive(Debug, Clone)]
pub struct VaeEncoder {
    conv_in: Conv2d,
    down_blocks: Vec<EncoderDownBlock>,
    mid: VaeMidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    quant_conv: Option<Conv2d>,
    latent_channels: usize,
}

impl VaeEncoder {
    /// Builds the encoder described by `config` from the weights in `vb` (the whole VAE file).
    pub fn new(config: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let channels = &config.block_out_channels;
        let Some(&top) = channels.last() else {
            return Err(EngineError::Unsupported(
                "VAE config has no block_out_channels".into(),
            ));
        };
        let groups = config.norm_num_groups;
        let eps = 1e-6;
        let moments = 2 * config.latent_channels;
        let quant_conv = if config.use_quant_conv {
            Some(conv2d(moments, moments, 1, 1, vb.pp("quant_conv"))?)
        } else {
            None
        };
        let vb = vb.pp("encoder");
        let mut down_blocks = Vec::with_capacity(channels.len());
        let mut out_channels = channels[0];
        for (i, &level_channels) in channels.iter().enumerate() {
            let in_channels = out_channels;
            out_channels = level_channels;
            let vb_block = vb.pp("down_blocks").pp(i);
            let resnets = resnet_stack(
                config.layers_per_block,
                in_channels,
                out_channels,
                groups,
                vb_block.pp("resnets"),
            )?;
            let downsampler = if i + 1 < channels.len() {
                Some(
                    conv2d(
                        out_channels,
                        out_channels,
                        3,
                        2,
                        vb_block.pp("downsamplers").pp(0).pp("conv"),
                    )?
                    .with_padding(0),
                )
            } else {
                None
            };
            down_blocks.push(EncoderDownBlock {
                resnets,
                downsampler,
            });
        }
        Ok(Self {
            conv_in: conv2d(config.in_channels, channels[0], 3, 1, vb.pp("conv_in"))?,
            down_blocks,
            mid: VaeMidBlock::new(config, vb.pp("mid_block"))?,
            conv_norm_out: group_norm(groups, top, eps, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(top, moments, 3, 1, vb.pp("conv_out"))?,
            quant_conv,
            latent_channels: config.latent_channels,
        })
    }

    /// Encodes images in [-1, 1] `(batch, 3, H, W)` into the distribution of their latents
    /// (unscaled: multiply a sample by the config's `scaling_factor` for the UNet).
    pub fn encode(&self, pixels: &Tensor) -> Result<LatentDistribution> {
        self.distribution(&self.moments(pixels)?)
    }

    /// The encoder's raw output `(batch, 2 x latent channels, h, w)`: means, then log
    /// variances (what tiles are blended on, as diffusers does).
    pub fn moments(&self, pixels: &Tensor) -> Result<Tensor> {
        let mut xs = self.conv_in.forward(pixels)?;
        for block in &self.down_blocks {
            for resnet in &block.resnets {
                xs = resnet.forward(&xs, None)?;
            }
            if let Some(down) = &block.downsampler {
                let padded = xs
                    .pad_with_zeros(candle_core::D::Minus1, 0, 1)?
                    .pad_with_zeros(candle_core::D::Minus2, 0, 1)?;
                xs = down.forward(&padded)?;
            }
        }
        xs = self.mid.forward(&xs)?;
        let xs = self.conv_norm_out.forward_then(&xs, Activation::Silu)?;
        let mut moments = self.conv_out.forward(&xs)?;
        if let Some(conv) = &self.quant_conv {
            moments = conv.forward(&moments)?;
        }
        Ok(moments)
    }

    /// The distribution that `moments` describe (diffusers' `DiagonalGaussianDistribution`).
    pub fn distribution(&self, moments: &Tensor) -> Result<LatentDistribution> {
        let mean = moments.narrow(1, 0, self.latent_channels)?;
        let logvar = moments
            .narrow(1, self.latent_channels, self.latent_channels)?
            .clamp(-30.0, 20.0)?;
        let std = (logvar * 0.5)?.exp()?;
        Ok(LatentDistribution { mean, std })
    }
}
