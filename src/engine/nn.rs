//! Building blocks shared by the UNet, the VAE and the text encoder.

use candle_core::{D, DType, Module, Tensor};
use candle_nn::VarBuilder;

use super::error::{EngineError, Result};
use super::profile;

pub use super::fused::{Conv2d, GroupNorm};

/// A 2-D convolution with bias, `padding = kernel / 2`.
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    Conv2d::new(in_channels, out_channels, kernel, stride, vb)
}

/// A GroupNorm with affine weights.
pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    GroupNorm::new(groups, channels, eps, vb)
}

/// A linear layer. On CUDA it runs as one GEMM with the bias in cuBLASLt's epilogue (f16) or a
/// bias pass (f32) ([`super::cuda::LinearOp`]); on the CPU in f32 as one GEMM over all rows on
/// top of the bias ([`super::cpu_kernels::CpuLinearOp`]); elsewhere through candle, making its
/// input contiguous first: candle 0.11's `Linear` returns wrong rows for a batched input with
/// transposed strides (checked in `tests/headless/candle_quirks.rs`).
#[derive(Debug, Clone)]
pub struct Linear(candle_nn::Linear);

impl Linear {
    /// One layer computing the outputs of `layers` side by side (their weights stacked), so that
    /// one GEMM replaces several. All or none of them must have a bias.
    pub fn concat(layers: &[&Linear]) -> Result<Linear> {
        let weights: Vec<&Tensor> = layers.iter().map(|l| l.0.weight()).collect();
        let biases: Option<Vec<&Tensor>> = layers.iter().map(|l| l.0.bias()).collect();
        let bias = match biases {
            Some(biases) => {
                let stacked = Tensor::cat(&biases, 0)?;
                super::weights::note_stacked(&biases, &stacked);
                Some(stacked)
            }
            None => None,
        };
        let weight = Tensor::cat(&weights, 0)?;
        // A LoRA must still find each weight, now rows of the stacked one.
        super::weights::note_stacked(&weights, &weight);
        Ok(Linear(candle_nn::Linear::new(weight, bias)))
    }

    /// `residual + self(xs)`. Where our CUDA kernels run, the GEMM accumulates onto
    /// `residual`'s memory in place (no separate addition pass), so the caller hands
    /// `residual` over: no other handle on its storage may be read afterwards.
    pub fn forward_onto(&self, xs: &Tensor, residual: Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if super::fused::kernels_for(xs.device(), xs.dtype())
            && residual.dtype() == xs.dtype()
            && residual.is_contiguous()
        {
            return profile::scope("linear", xs.device(), || {
                let op = super::cuda::LinearAddOp {
                    weight: self.0.weight().clone(),
                    bias: self.0.bias().cloned(),
                };
                residual.inplace_op2(&xs.contiguous()?, &op)?;
                Ok(residual)
            });
        }
        Ok((self.forward(xs)? + residual)?)
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let run = || -> Result<Tensor> {
            #[cfg(feature = "cuda")]
            if super::fused::kernels_for(xs.device(), xs.dtype()) {
                let op = super::cuda::LinearOp {
                    bias: self.0.bias().cloned(),
                };
                return Ok(xs.contiguous()?.apply_op2_no_bwd(self.0.weight(), &op)?);
            }
            let weight = self.0.weight();
            if xs.device().is_cpu()
                && xs.dtype() == DType::F32
                && weight.dtype() == DType::F32
                && self.0.bias().is_none_or(|bias| bias.dtype() == DType::F32)
            {
                let (xs, weight) = (xs.contiguous()?, weight.contiguous()?);
                let op = super::cpu_kernels::CpuLinearOp;
                return Ok(match self.0.bias() {
                    Some(bias) => xs.apply_op3_no_bwd(&weight, &bias.contiguous()?, &op)?,
                    None => xs.apply_op2_no_bwd(&weight, &op)?,
                });
            }
            Ok(if xs.is_contiguous() {
                self.0.forward(xs)?
            } else {
                self.0.forward(&xs.contiguous()?)?
            })
        };
        profile::scope("linear", xs.device(), run).map_err(candle_core::Error::wrap)
    }
}

/// LayerNorm over the last dimension with affine weights, through our kernel where it runs
/// ([`super::cuda::LayerNormOp`]), else candle's.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    inner: candle_nn::LayerNorm,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    eps: f64,
}

impl LayerNorm {
    /// Loads `weight` and `bias` of width `dim` under `vb`.
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            inner: candle_nn::layer_norm(dim, eps, vb)?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        #[cfg(feature = "cuda")]
        if super::fused::kernels_for(xs.device(), xs.dtype())
            && let Some(bias) = self.inner.bias()
        {
            let op = super::cuda::LayerNormOp {
                eps: self.eps as f32,
            };
            return xs
                .contiguous()?
                .apply_op3_no_bwd(self.inner.weight(), bias, &op);
        }
        self.inner.forward(xs)
    }
}

/// A linear layer, with or without bias.
pub fn linear(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear(if bias {
        candle_nn::linear(in_dim, out_dim, vb)?
    } else {
        candle_nn::linear_no_bias(in_dim, out_dim, vb)?
    }))
}

/// The activations the configs name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// x * sigmoid(x).
    Silu,
    /// The exact (erf) GELU.
    Gelu,
    /// x * sigmoid(1.702 x), OpenAI CLIP's approximation.
    QuickGelu,
}

impl Activation {
    /// Parses a config's activation name.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "silu" | "swish" => Ok(Activation::Silu),
            "gelu" => Ok(Activation::Gelu),
            "quick_gelu" => Ok(Activation::QuickGelu),
            other => Err(EngineError::Unsupported(format!("activation {other:?}"))),
        }
    }

    /// Applies the activation.
    pub fn apply(self, xs: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::Silu => candle_nn::ops::silu(xs)?,
            Activation::Gelu => xs.gelu_erf()?,
            Activation::QuickGelu => (xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?)?,
        })
    }
}

/// Multi-head scaled dot-product attention over `(batch, tokens, heads * head_dim)` tensors.
///
/// Scores and softmax run in f32 when `upcast` is set or the inputs are half precision, which
/// is what PyTorch's SDPA does internally for f16. `mask`, if any, is added to the scores.
pub fn attention(
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    heads: usize,
    upcast: bool,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    profile::scope("attention", query.device(), || {
        attention_unprofiled(query, key, value, heads, upcast, mask)
    })
}

fn attention_unprofiled(
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    heads: usize,
    upcast: bool,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (batch, query_len, width) = query.dims3()?;
    let key_len = key.dim(1)?;
    let head_dim = width / heads;
    let scale = 1.0 / (head_dim as f64).sqrt();
    if mask.is_none()
        && let Some(out) = super::fused::flash_attention(query, key, value, heads, scale)?
    {
        return Ok(out);
    }
    let split = |xs: &Tensor, len: usize| -> Result<Tensor> {
        Ok(xs
            .reshape((batch, len, heads, head_dim))?
            .transpose(1, 2)?
            .contiguous()?)
    };
    let dtype = query.dtype();
    if mask.is_none()
        && query.device().is_cpu()
        && [query.dtype(), key.dtype(), value.dtype()] == [DType::F32; 3]
    {
        let op = super::cpu_kernels::CpuAttentionOp {
            scale: scale as f32,
        };
        let rows = |xs: &Tensor, len: usize| -> Result<Tensor> {
            Ok(split(xs, len)?.reshape((batch * heads, len, head_dim))?)
        };
        let out = rows(query, query_len)?.apply_op3_no_bwd(
            &rows(key, key_len)?,
            &rows(value, key_len)?,
            &op,
        )?;
        return Ok(out
            .reshape((batch, heads, query_len, head_dim))?
            .transpose(1, 2)?
            .reshape((batch, query_len, width))?);
    }
    let compute_dtype = if upcast || dtype != DType::F32 && dtype != DType::F64 {
        DType::F32
    } else {
        dtype
    };
    // f16 on CUDA: f32 scores straight from the f16 values in one tensor-core GEMM (the same
    // products as from f32 copies); elsewhere from copies in the compute type.
    let f16_scores =
        super::fused::has_f16_attention_scores(query.device(), dtype) && key.dtype() == DType::F16;
    let q = if f16_scores {
        split(query, query_len)?
    } else {
        split(query, query_len)?.to_dtype(compute_dtype)?
    };
    let k = split(key, key_len)?;
    let k_t = if f16_scores {
        None
    } else {
        Some(k.to_dtype(compute_dtype)?.t()?)
    };
    let v = split(value, key_len)?;
    // Score matrices grow with the square of the token count (4096 tokens at SD 1.5's first
    // level): process queries in chunks so that each chunk's scores stay small. On the CPU this
    // keeps them in cache and avoids huge allocations; on GPUs it bounds memory.
    let max_score_elements = if query.device().is_cpu() {
        1 << 21
    } else {
        1 << 26
    };
    let rows = batch * heads;
    let chunk = (max_score_elements / (rows * key_len).max(1)).clamp(1, query_len);
    let attend = |q: &Tensor, mask: Option<Tensor>| -> Result<Tensor> {
        let mut scores = match &k_t {
            // An f32 model upcast from f16 on CUDA: three TF32 passes (about f32's exactness).
            Some(k_t) if compute_dtype == DType::F32 && dtype == DType::F32 => {
                match super::fused::tf32x3_matmul(q, &k, true)? {
                    Some(scores) => (scores * scale)?,
                    None => (q.matmul(k_t)? * scale)?,
                }
            }
            Some(k_t) => (q.matmul(k_t)? * scale)?,
            None => {
                let len = q.dim(2)?;
                let rows_of = |t: &Tensor, len: usize| t.reshape((rows, len, head_dim));
                super::fused::attention_scores_f32(
                    &rows_of(q, len)?,
                    &rows_of(&k, key_len)?,
                    scale,
                )?
                .reshape((batch, heads, len, key_len))?
            }
        };
        if let Some(mask) = mask {
            scores = scores.broadcast_add(&mask.to_dtype(compute_dtype)?)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
        Ok(match super::fused::tf32x3_matmul(&probs, &v, false)? {
            Some(out) => out,
            None => probs.matmul(&v)?,
        })
    };
    let out = if chunk >= query_len {
        attend(&q, mask.cloned())?
    } else {
        let mut outputs = Vec::with_capacity(query_len.div_ceil(chunk));
        for start in (0..query_len).step_by(chunk) {
            let len = chunk.min(query_len - start);
            let q_chunk = q.narrow(2, start, len)?.contiguous()?;
            let mask_chunk = match mask {
                Some(mask) => Some(mask.narrow(mask.rank() - 2, start, len)?),
                None => None,
            };
            outputs.push(attend(&q_chunk, mask_chunk)?);
        }
        Tensor::cat(&outputs, 2)?
    };
    Ok(out.transpose(1, 2)?.reshape((batch, query_len, width))?)
}

/// Sinusoidal embedding of (possibly fractional) timesteps, as diffusers' `get_timestep_embedding`.
///
/// `timesteps` is a 1-D f32 tensor; the result is `(len, dim)` in f32.
pub fn timestep_embedding(
    timesteps: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
) -> Result<Tensor> {
    let half_dim = dim / 2;
    let device = timesteps.device();
    let exponents: Vec<f32> = (0..half_dim)
        .map(|i| {
            let exponent = -(10000f64.ln()) * i as f64 / (half_dim as f64 - downscale_freq_shift);
            exponent as f32
        })
        .collect();
    // diffusers computes exp() of the f32 exponent in f32; so do we.
    let freqs = Tensor::new(exponents.as_slice(), device)?.exp()?;
    let args = timesteps
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs.unsqueeze(0)?)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos {
        Tensor::cat(&[cos, sin], D::Minus1)?
    } else {
        Tensor::cat(&[sin, cos], D::Minus1)?
    };
    if dim % 2 == 1 {
        return Ok(emb.pad_with_zeros(D::Minus1, 0, 1)?);
    }
    Ok(emb)
}

/// Diffusers' `TimestepEmbedding`: linear, activation, linear.
#[derive(Debug, Clone)]
pub struct TimestepMlp {
    linear_1: Linear,
    linear_2: Linear,
    activation: Activation,
    /// LCM-distilled UNets: projects the guidance-scale embedding into the input.
    cond_proj: Option<Linear>,
}

impl TimestepMlp {
    /// Loads `linear_1` and `linear_2` under `vb`.
    pub fn new(
        in_dim: usize,
        out_dim: usize,
        activation: Activation,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            linear_1: linear(in_dim, out_dim, true, vb.pp("linear_1"))?,
            linear_2: linear(out_dim, out_dim, true, vb.pp("linear_2"))?,
            activation,
            cond_proj: None,
        })
    }

    /// The MLP with a `cond_proj` (no bias) that adds a condition of width `condition_dim` to
    /// its input, as diffusers' `TimestepEmbedding(cond_proj_dim=...)`.
    pub fn with_condition(
        in_dim: usize,
        out_dim: usize,
        activation: Activation,
        condition_dim: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mut mlp = Self::new(in_dim, out_dim, activation, vb.clone())?;
        mlp.cond_proj = Some(linear(condition_dim, in_dim, false, vb.pp("cond_proj"))?);
        Ok(mlp)
    }

    /// Applies the MLP.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_with_condition(xs, None)
    }

    /// Applies the MLP, first adding the projected `condition` (if the MLP has a projection).
    pub fn forward_with_condition(
        &self,
        xs: &Tensor,
        condition: Option<&Tensor>,
    ) -> Result<Tensor> {
        let xs = match (&self.cond_proj, condition) {
            (Some(projection), Some(condition)) => (xs + projection.forward(condition)?)?,
            _ => xs.clone(),
        };
        let xs = self.activation.apply(&self.linear_1.forward(&xs)?)?;
        Ok(self.linear_2.forward(&xs)?)
    }
}

/// Diffusers' `ResnetBlock2D` with the default (additive) time-embedding norm.
#[derive(Debug, Clone)]
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    activation: Activation,
}

impl ResnetBlock {
    /// Loads a resnet from `in_channels` to `out_channels`; `temb_channels` is `None` in the VAE.
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        temb_channels: Option<usize>,
        groups: usize,
        eps: f64,
        activation: Activation,
        vb: VarBuilder,
    ) -> Result<Self> {
        let time_emb_proj = match temb_channels {
            Some(channels) => Some(linear(
                channels,
                out_channels,
                true,
                vb.pp("time_emb_proj"),
            )?),
            None => None,
        };
        let conv_shortcut = if in_channels != out_channels {
            Some(conv2d(
                in_channels,
                out_channels,
                1,
                1,
                vb.pp("conv_shortcut"),
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1: group_norm(groups, in_channels, eps, vb.pp("norm1"))?,
            conv1: conv2d(in_channels, out_channels, 3, 1, vb.pp("conv1"))?,
            time_emb_proj,
            norm2: group_norm(groups, out_channels, eps, vb.pp("norm2"))?,
            conv2: conv2d(out_channels, out_channels, 3, 1, vb.pp("conv2"))?,
            conv_shortcut,
            activation,
        })
    }

    /// Applies the block; `temb` is the (already computed) time embedding, if any.
    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let act = self.activation;
        let normed = self.norm1.forward_then(xs, act)?;
        // The projected time embedding, one value per image and channel, is added to conv1's
        // output in the convolution's own first pass where the kernels run.
        let hidden = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => {
                let temb = proj.forward(&act.apply(temb)?)?;
                self.conv1.forward_add_per_channel(&normed, &temb)?
            }
            _ => self.conv1.forward(&normed)?,
        };
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        self.conv2
            .forward_add(&self.norm2.forward_then(&hidden, act)?, &shortcut)
    }
}

/// Diffusers' `Downsample2D` with a strided convolution.
#[derive(Debug, Clone)]
pub struct Downsample {
    conv: Conv2d,
}

impl Downsample {
    /// Loads `conv` under `vb`; `padding` is 1 in the UNet, 0 (with asymmetric padding) in the VAE encoder.
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: conv2d(channels, channels, 3, 2, vb.pp("conv"))?,
        })
    }

    /// Halves the resolution.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.conv.forward(xs)
    }
}

/// Diffusers' `Upsample2D`: nearest-neighbour interpolation, then a convolution.
#[derive(Debug, Clone)]
pub struct Upsample {
    conv: Conv2d,
}

impl Upsample {
    /// Loads `conv` under `vb`.
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: conv2d(channels, channels, 3, 1, vb.pp("conv"))?,
        })
    }

    /// Upsamples to `size` (height, width), or doubles when `None`.
    pub fn forward(&self, xs: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, height, width) = xs.dims4()?;
        let (out_h, out_w) = size.unwrap_or((height * 2, width * 2));
        let xs = super::fused::upsample_nearest(xs, out_h, out_w)?;
        self.conv.forward(&xs)
    }
}
