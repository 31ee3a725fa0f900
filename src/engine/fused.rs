//! Operations with a fused CUDA kernel of our own (`engine/cuda`) and candle's operations as the
//! fallback: on the CPU, on Metal, for other precisions, or when `ATELIER_CUDA_KERNELS=off`
//! (to compare). The fallbacks are exactly what the engine computed before the kernels existed.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use super::error::{EngineError, Result};
use super::nn::Activation;
use super::profile;

/// Whether our CUDA kernels may run for a tensor of this dtype on this device.
pub fn kernels_for(device: &Device, dtype: DType) -> bool {
    #[cfg(feature = "cuda")]
    {
        use std::sync::OnceLock;
        static ENABLED: OnceLock<bool> = OnceLock::new();
        let enabled = *ENABLED.get_or_init(|| {
            !matches!(
                std::env::var("ATELIER_CUDA_KERNELS").as_deref(),
                Ok("off" | "0" | "false")
            )
        });
        enabled
            && matches!(dtype, DType::F16 | DType::F32)
            && match device {
                Device::Cuda(cuda) => supports_kernels(cuda),
                _ => false,
            }
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (device, dtype);
        false
    }
}

thread_local! {
    static TF32_CONVOLUTIONS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with f32 convolutions on the GPU's TF32 tensor cores (10-bit mantissas in the
/// products, f32 sums), as PyTorch runs cuDNN convolutions by default
/// (`torch.backends.cudnn.allow_tf32`). Used for the VAE that SDXL upcasts from f16 to f32.
pub fn with_tf32_convolutions<T>(f: impl FnOnce() -> T) -> T {
    let before = TF32_CONVOLUTIONS.with(|flag| flag.replace(true));
    let value = f();
    TF32_CONVOLUTIONS.with(|flag| flag.set(before));
    value
}

/// `a b` (or `a b^T` when `transpose_b`) for f32 `(..., m, k)` and `(..., k, n)` (or
/// `(..., n, k)`) tensors in three TF32 tensor-core passes, about as exact as an f32 product
/// ([`super::cuda::Tf32x3MatmulOp`]): on CUDA, inside [`with_tf32_convolutions`] (a model that
/// runs upcast to f32). `None` elsewhere: the caller then multiplies in plain f32.
pub fn tf32x3_matmul(a: &Tensor, b: &Tensor, transpose_b: bool) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if TF32_CONVOLUTIONS.with(std::cell::Cell::get)
        && a.dtype() == DType::F32
        && b.dtype() == DType::F32
        && kernels_for(a.device(), a.dtype())
        && a.rank() >= 2
        && a.rank() == b.rank()
    {
        let dims = a.dims();
        let (m, k) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        let leading = &dims[..dims.len() - 2];
        let batch: usize = leading.iter().product();
        let b_dims = b.dims();
        let b_last2 = (b_dims[b_dims.len() - 2], b_dims[b_dims.len() - 1]);
        let n = if transpose_b { b_last2.0 } else { b_last2.1 };
        let out = a.contiguous()?.reshape((batch, m, k))?.apply_op2_no_bwd(
            &b.contiguous()?.reshape((batch, b_last2.0, b_last2.1))?,
            &super::cuda::Tf32x3MatmulOp { transpose_b },
        )?;
        let mut out_dims = leading.to_vec();
        out_dims.extend([m, n]);
        return Ok(Some(out.reshape(out_dims)?));
    }
    let _ = (a, b, transpose_b);
    Ok(None)
}

/// Our kernels use Ampere's instructions (`mma.sync` m16n8k16, `cp.async`): compute capability
/// 8.0 or newer. Older GPUs keep candle's operations.
#[cfg(feature = "cuda")]
fn supports_kernels(device: &candle_core::CudaDevice) -> bool {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
    use std::sync::OnceLock;
    static AMPERE_OR_NEWER: OnceLock<bool> = OnceLock::new();
    *AMPERE_OR_NEWER.get_or_init(|| {
        device
            .cuda_stream()
            .context()
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
            .map(|major| major >= 8)
            .unwrap_or(false)
    })
}

/// A 2-D convolution with bias and `padding = kernel / 2` (diffusers' `nn.Conv2d`).
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    /// Loads `weight` `(out, in, kernel, kernel)` and `bias` under `vb`.
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            weight: vb.get((out_channels, in_channels, kernel, kernel), "weight")?,
            bias: vb.get(out_channels, "bias")?,
            stride,
            padding: kernel / 2,
        })
    }

    /// The same convolution with another zero padding on every side (the VAE encoder's
    /// downsamplers pad asymmetrically first, then convolve without padding).
    pub fn with_padding(mut self, padding: usize) -> Self {
        self.padding = padding;
        self
    }

    /// Convolves `xs` `(batch, in, h, w)`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.run(xs, None, None)
    }

    /// Convolves `xs` and adds `residual` (the output's shape) in the same pass where it can.
    pub fn forward_add(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.run(xs, Some(residual), None)
    }

    /// Convolves `xs` and adds `plane_bias` `(batch, out channels)` to every pixel of the
    /// matching output plane (a ResNet block's time embedding), in the same pass where it can.
    pub fn forward_add_per_channel(&self, xs: &Tensor, plane_bias: &Tensor) -> Result<Tensor> {
        self.run(xs, None, Some(plane_bias))
    }

    fn run(
        &self,
        xs: &Tensor,
        residual: Option<&Tensor>,
        plane_bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        profile::scope("conv2d", xs.device(), || {
            #[cfg(feature = "cuda")]
            if kernels_for(xs.device(), xs.dtype()) {
                let op = super::cuda::Conv2dOp {
                    stride: self.stride,
                    padding: self.padding,
                    tf32: TF32_CONVOLUTIONS.with(std::cell::Cell::get),
                    residual: residual.map(Tensor::contiguous).transpose()?,
                    plane_bias: plane_bias
                        .map(|bias| {
                            let (_, channels) = bias.dims2()?;
                            bias.to_dtype(xs.dtype())?
                                .broadcast_as((xs.dim(0)?, channels))?
                                .contiguous()
                        })
                        .transpose()?,
                };
                return Ok(xs
                    .contiguous()?
                    .apply_op3_no_bwd(&self.weight, &self.bias, &op)?);
            }
            let out = if xs.device().is_cpu()
                && xs.dtype() == DType::F32
                && self.weight.dtype() == DType::F32
                && self.bias.dtype() == DType::F32
            {
                let op = super::cpu_kernels::CpuConv2dOp {
                    stride: self.stride,
                    padding: self.padding,
                };
                xs.contiguous()?
                    .apply_op3_no_bwd(&self.weight.contiguous()?, &self.bias, &op)?
            } else {
                let out = xs.conv2d(&self.weight, self.padding, self.stride, 1, 1)?;
                out.broadcast_add(&self.bias.reshape((1, (), 1, 1))?)?
            };
            let out = match plane_bias {
                Some(bias) => {
                    let (batch, channels) = bias.dims2()?;
                    out.broadcast_add(&bias.reshape((batch, channels, 1, 1))?)?
                }
                None => out,
            };
            Ok(match residual {
                Some(residual) => (residual + out)?,
                None => out,
            })
        })
    }
}

/// GroupNorm with affine weights, optionally fused with the activation that follows it.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    inner: candle_nn::GroupNorm,
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// Loads `weight` and `bias` under `vb`.
    pub fn new(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            return Err(EngineError::Unsupported(format!(
                "GroupNorm with {groups} groups cannot split {channels} channels"
            )));
        }
        let weight = vb.get(channels, "weight")?;
        let bias = vb.get(channels, "bias")?;
        let inner = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
        Ok(Self {
            inner,
            weight,
            bias,
            groups,
            eps,
        })
    }

    /// Normalises `xs` `(batch, channels, ...)`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.run(xs, None)
    }

    /// Normalises `xs`, then applies `activation`.
    pub fn forward_then(&self, xs: &Tensor, activation: Activation) -> Result<Tensor> {
        self.run(xs, Some(activation))
    }

    fn run(&self, xs: &Tensor, activation: Option<Activation>) -> Result<Tensor> {
        // In a tiled VAE pass: the statistics of the whole image.
        let parts = super::shared_norm::NormParts {
            groups: self.groups,
            eps: self.eps,
            weight: &self.weight,
            bias: &self.bias,
            activation,
        };
        if let Some(out) = super::shared_norm::intercept(xs, &parts)? {
            return Ok(out);
        }
        profile::scope("group_norm", xs.device(), || {
            #[cfg(feature = "cuda")]
            if kernels_for(xs.device(), xs.dtype()) && activation != Some(Activation::Gelu) {
                let op = super::cuda::GroupNormOp {
                    groups: self.groups,
                    eps: self.eps as f32,
                    silu: activation == Some(Activation::Silu),
                };
                let out = xs
                    .contiguous()?
                    .apply_op3_no_bwd(&self.weight, &self.bias, &op)?;
                return match activation {
                    Some(Activation::QuickGelu) => Activation::QuickGelu.apply(&out),
                    _ => Ok(out),
                };
            }
            if xs.device().is_cpu()
                && xs.dtype() == DType::F32
                && self.weight.dtype() == DType::F32
                && self.bias.dtype() == DType::F32
            {
                let op = super::cpu_kernels::CpuGroupNormOp {
                    groups: self.groups,
                    eps: self.eps,
                    silu: activation == Some(Activation::Silu),
                };
                let out = xs
                    .contiguous()?
                    .apply_op3_no_bwd(&self.weight, &self.bias, &op)?;
                return match activation {
                    Some(Activation::Silu) | None => Ok(out),
                    Some(other) => other.apply(&out),
                };
            }
            let out = self.inner.forward(xs)?;
            match activation {
                Some(activation) => activation.apply(&out),
                None => Ok(out),
            }
        })
    }
}

/// GEGLU: splits the last dimension into `[hidden | gate]` and returns `hidden * gelu(gate)`.
pub fn geglu(projected: &Tensor) -> Result<Tensor> {
    profile::scope("geglu", projected.device(), || {
        #[cfg(feature = "cuda")]
        if kernels_for(projected.device(), projected.dtype()) {
            return Ok(projected
                .contiguous()?
                .apply_op1_no_bwd(&super::cuda::GegluOp)?);
        }
        if projected.device().is_cpu() && projected.dtype() == DType::F32 {
            return Ok(projected
                .contiguous()?
                .apply_op1_no_bwd(&super::cpu_kernels::CpuGegluOp)?);
        }
        let half = projected.dim(candle_core::D::Minus1)? / 2;
        let hidden = projected.narrow(candle_core::D::Minus1, 0, half)?;
        let gate = projected.narrow(candle_core::D::Minus1, half, half)?;
        Ok((hidden * gate.gelu_erf()?)?)
    })
}

/// `(batch, channels, h, w)` image as `(batch, h * w, channels)` tokens (contiguous).
pub fn image_to_tokens(xs: &Tensor) -> Result<Tensor> {
    let (batch, channels, height, width) = xs.dims4()?;
    #[cfg(feature = "cuda")]
    if kernels_for(xs.device(), xs.dtype()) {
        return Ok(xs
            .contiguous()?
            .reshape((batch, channels, height * width))?
            .apply_op1_no_bwd(&super::cuda::TransposeOp)?);
    }
    Ok(xs
        .permute((0, 2, 3, 1))?
        .reshape((batch, height * width, channels))?
        .contiguous()?)
}

/// `(batch, h * w, channels)` tokens back as a contiguous `(batch, channels, h, w)` image, plus
/// `residual` (that image's shape) if given, in the same pass where our kernels run.
pub fn tokens_to_image(
    tokens: &Tensor,
    (height, width): (usize, usize),
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let (batch, _, channels) = tokens.dims3()?;
    #[cfg(feature = "cuda")]
    if kernels_for(tokens.device(), tokens.dtype())
        && residual.is_none_or(|r| r.dtype() == tokens.dtype())
    {
        let tokens = tokens.contiguous()?;
        let op = super::cuda::TransposeOp;
        let image = match residual {
            Some(residual) => tokens.apply_op2_no_bwd(
                &residual
                    .contiguous()?
                    .reshape((batch, channels, height * width))?,
                &op,
            )?,
            None => tokens.apply_op1_no_bwd(&op)?,
        };
        return Ok(image.reshape((batch, channels, height, width))?);
    }
    let image = tokens
        .reshape((batch, height, width, channels))?
        .permute((0, 3, 1, 2))?
        .contiguous()?;
    Ok(match residual {
        Some(residual) => (image + residual)?,
        None => image,
    })
}

/// Nearest-neighbour upsampling of `(batch, channels, h, w)` to `(out_h, out_w)`; exact
/// doubling runs through our kernel where it can.
pub fn upsample_nearest(xs: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        let (_, _, height, width) = xs.dims4()?;
        if kernels_for(xs.device(), xs.dtype()) && (out_h, out_w) == (2 * height, 2 * width) {
            return Ok(xs
                .contiguous()?
                .apply_op1_no_bwd(&super::cuda::Upsample2xOp)?);
        }
    }
    Ok(xs.upsample_nearest2d(out_h, out_w)?)
}

/// Whether [`attention_scores_f32`] takes queries of this device and type (f16 on CUDA).
pub fn has_f16_attention_scores(device: &Device, dtype: DType) -> bool {
    cfg!(feature = "cuda") && dtype == DType::F16 && kernels_for(device, dtype)
}

/// `scale * q k^T` in f32 for f16 `(rows, tokens, width)` queries and keys on CUDA, in one
/// tensor-core GEMM per row; an error where [`has_f16_attention_scores`] says no.
pub fn attention_scores_f32(query: &Tensor, key: &Tensor, scale: f64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if has_f16_attention_scores(query.device(), query.dtype()) && key.dtype() == DType::F16 {
        let op = super::cuda::AttentionScoresOp {
            scale: scale as f32,
        };
        return Ok(query
            .contiguous()?
            .apply_op2_no_bwd(&key.contiguous()?, &op)?);
    }
    let _ = (key, scale);
    Err(EngineError::Unsupported(format!(
        "f16 attention scores need f16 on CUDA, not {:?} on {:?}",
        query.dtype(),
        query.device()
    )))
}

/// Attention through the tensor-core kernel when it applies: CUDA, f16, no mask, a supported
/// head width, 16-byte aligned rows. `None` means: use the general path.
pub fn flash_attention(
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    {
        if !kernels_for(query.device(), query.dtype()) || query.dtype() != DType::F16 {
            return Ok(None);
        }
        let width = query.dim(2)?;
        let head_dim = width / heads;
        if super::cuda::FlashAttentionOp::padded_head_dim(head_dim).is_none()
            || !head_dim.is_multiple_of(8)
            || key.dim(2)? != width
            || value.dim(2)? != width
        {
            return Ok(None);
        }
        let aligned = |t: &Tensor| {
            let layout = t.layout();
            let stride = layout.stride();
            stride[2] == 1
                && stride[1].is_multiple_of(8)
                && stride[0].is_multiple_of(8)
                && layout.start_offset().is_multiple_of(8)
        };
        let query = if aligned(query) {
            query.clone()
        } else {
            query.contiguous()?
        };
        let key = if aligned(key) {
            key.clone()
        } else {
            key.contiguous()?
        };
        let value = if aligned(value) && value.stride() == key.stride() {
            value.clone()
        } else {
            value.contiguous()?
        };
        let key = if key.stride() == value.stride() {
            key
        } else {
            key.contiguous()?
        };
        let op = super::cuda::FlashAttentionOp {
            heads,
            head_dim,
            scale: scale as f32,
        };
        Ok(Some(query.apply_op3_no_bwd(&key, &value, &op)?))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (query, key, value, heads, scale);
        Ok(None)
    }
}
