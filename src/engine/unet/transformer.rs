//! The UNet's attention blocks: diffusers' `Transformer2DModel` (the latent image as tokens,
//! self-attention, cross-attention to the text, a GEGLU feed-forward) and its parts.

use candle_core::{D, Module, Tensor};
use candle_nn::VarBuilder;

use crate::engine::config::UNetConfig;
use crate::engine::error::Result;
use crate::engine::fused::{image_to_tokens, tokens_to_image};
use crate::engine::nn::{
    Conv2d, GroupNorm, LayerNorm, Linear, attention, conv2d, group_norm, linear,
};

/// The q, k and v projections: separate, or stacked into one GEMM where our CUDA kernels run
/// (the attention kernel reads q, k and v as column ranges of the stacked output).
#[derive(Debug, Clone)]
enum Projections {
    Separate {
        q: Linear,
        k: Linear,
        v: Linear,
    },
    /// Self-attention: `[q | k | v]` from the same input.
    StackedQkv(Linear),
    /// Cross-attention: q from the image tokens, `[k | v]` from the context.
    StackedKv {
        q: Linear,
        kv: Linear,
    },
}

/// Diffusers' `Attention` as used in transformer blocks (no bias on q, k, v).
#[derive(Debug, Clone)]
struct CrossAttention {
    projections: Projections,
    to_out: Linear,
    heads: usize,
    inner: usize,
    upcast: bool,
}

impl CrossAttention {
    fn new(
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
        upcast: bool,
        is_self_attention: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let q = linear(query_dim, inner, false, vb.pp("to_q"))?;
        let k = linear(context_dim, inner, false, vb.pp("to_k"))?;
        let v = linear(context_dim, inner, false, vb.pp("to_v"))?;
        let projections = if !crate::engine::fused::kernels_for(vb.device(), vb.dtype()) {
            Projections::Separate { q, k, v }
        } else if is_self_attention {
            Projections::StackedQkv(Linear::concat(&[&q, &k, &v])?)
        } else {
            Projections::StackedKv {
                kv: Linear::concat(&[&k, &v])?,
                q,
            }
        };
        Ok(Self {
            projections,
            to_out: linear(inner, query_dim, true, vb.pp("to_out").pp("0"))?,
            heads,
            inner,
            upcast,
        })
    }

    /// `residual + attention(xs, context)`: the output projection accumulates onto `residual`
    /// (see [`Linear::forward_onto`]).
    fn forward_onto(
        &self,
        xs: &Tensor,
        context: Option<&Tensor>,
        residual: Tensor,
    ) -> Result<Tensor> {
        let context = context.unwrap_or(xs);
        let width = self.inner;
        let (q, k, v) = match &self.projections {
            Projections::Separate { q, k, v } => {
                (q.forward(xs)?, k.forward(context)?, v.forward(context)?)
            }
            Projections::StackedQkv(qkv) => {
                let qkv = qkv.forward(xs)?;
                (
                    qkv.narrow(D::Minus1, 0, width)?,
                    qkv.narrow(D::Minus1, width, width)?,
                    qkv.narrow(D::Minus1, 2 * width, width)?,
                )
            }
            Projections::StackedKv { q, kv } => {
                let kv = kv.forward(context)?;
                (
                    q.forward(xs)?,
                    kv.narrow(D::Minus1, 0, width)?,
                    kv.narrow(D::Minus1, width, width)?,
                )
            }
        };
        let out = attention(&q, &k, &v, self.heads, self.upcast, None)?;
        self.to_out.forward_onto(&out, residual)
    }
}

/// Diffusers' `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward.
#[derive(Debug, Clone)]
struct TransformerBlock {
    norm1: LayerNorm,
    attn1: CrossAttention,
    norm2: LayerNorm,
    attn2: CrossAttention,
    norm3: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
}

impl TransformerBlock {
    fn new(
        dim: usize,
        heads: usize,
        context_dim: usize,
        upcast: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let head_dim = dim / heads;
        let inner_ff = dim * 4;
        Ok(Self {
            norm1: LayerNorm::new(dim, 1e-5, vb.pp("norm1"))?,
            attn1: CrossAttention::new(dim, dim, heads, head_dim, upcast, true, vb.pp("attn1"))?,
            norm2: LayerNorm::new(dim, 1e-5, vb.pp("norm2"))?,
            attn2: CrossAttention::new(
                dim,
                context_dim,
                heads,
                head_dim,
                upcast,
                false,
                vb.pp("attn2"),
            )?,
            norm3: LayerNorm::new(dim, 1e-5, vb.pp("norm3"))?,
            ff_in: linear(dim, inner_ff * 2, true, vb.pp("ff.net.0.proj"))?,
            ff_out: linear(inner_ff, dim, true, vb.pp("ff.net.2"))?,
        })
    }

    /// The block on `xs`, whose memory the residual additions reuse (it is handed over).
    fn forward(&self, xs: Tensor, context: &Tensor) -> Result<Tensor> {
        let normed = self.norm1.forward(&xs)?;
        let xs = self.attn1.forward_onto(&normed, None, xs)?;
        let normed = self.norm2.forward(&xs)?;
        let xs = self.attn2.forward_onto(&normed, Some(context), xs)?;
        let projected = self.ff_in.forward(&self.norm3.forward(&xs)?)?;
        self.ff_out
            .forward_onto(&crate::engine::fused::geglu(&projected)?, xs)
    }
}

#[derive(Debug, Clone)]
enum Projection {
    Linear(Linear),
    Conv(Conv2d),
}

/// Diffusers' `Transformer2DModel` for continuous (latent image) inputs.
#[derive(Debug, Clone)]
pub(super) struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<TransformerBlock>,
    proj_out: Projection,
}

impl SpatialTransformer {
    pub(super) fn new(
        channels: usize,
        heads: usize,
        layers: usize,
        context_dim: usize,
        config: &UNetConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        let projection = |name: &str| -> Result<Projection> {
            Ok(if config.use_linear_projection {
                Projection::Linear(linear(channels, channels, true, vb.pp(name))?)
            } else {
                Projection::Conv(conv2d(channels, channels, 1, 1, vb.pp(name))?)
            })
        };
        let blocks = (0..layers)
            .map(|k| {
                TransformerBlock::new(
                    channels,
                    heads,
                    context_dim,
                    config.upcast_attention,
                    vb.pp("transformer_blocks").pp(k),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: group_norm(config.norm_num_groups, channels, 1e-6, vb.pp("norm"))?,
            proj_in: projection("proj_in")?,
            blocks,
            proj_out: projection("proj_out")?,
        })
    }

    pub(super) fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (_, _, height, width) = xs.dims4()?;
        let normed = self.norm.forward(xs)?;
        let mut hidden = match &self.proj_in {
            Projection::Conv(conv) => image_to_tokens(&conv.forward(&normed)?)?,
            Projection::Linear(lin) => lin.forward(&image_to_tokens(&normed)?)?,
        };
        for block in &self.blocks {
            hidden = block.forward(hidden, context)?;
        }
        match &self.proj_out {
            Projection::Conv(conv) => {
                conv.forward_add(&tokens_to_image(&hidden, (height, width), None)?, xs)
            }
            Projection::Linear(lin) => {
                tokens_to_image(&lin.forward(&hidden)?, (height, width), Some(xs))
            }
        }
    }
}
