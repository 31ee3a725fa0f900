//! Attention: the flash-style tensor-core kernel for heads up to 160 wide, and f32 scores from
//! one GEMM for wider ones (the VAE's single 512-wide head).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublas::sys;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::{CustomOp3, DType, Layout, Result, Shape};
use half::f16;

use super::{contiguous_slice, cuda_only, function, hopper_attention_kernel, tf32_gemm};

/// Attention scores `scale * q k^T` in f32 from f16 `(rows, query tokens, width)` queries and
/// `(rows, key tokens, width)` keys, one tensor-core GEMM per row (f32 sums and output, so the
/// scores are what an f32 product of the same values gives, up to summation order). For heads
/// wider than the flash kernel takes (the VAE's single 512-wide head): PyTorch's attention keeps
/// its scores in f32 too, where rounding them to f16 would move the softmax.
pub struct AttentionScoresOp {
    /// Multiplies the scores (1 / sqrt(width)).
    pub scale: f32,
}

impl candle_core::CustomOp2 for AttentionScoresOp {
    fn name(&self) -> &'static str {
        "atelier-attention-scores"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        cuda_only(self.name())
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        ql: &Layout,
        k: &CudaStorage,
        kl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        use candle_core::cuda_backend::cudarc::cublas::result::gemm_strided_batched_ex;
        use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
        use std::ffi::c_void;
        if q.dtype() != DType::F16 || k.dtype() != DType::F16 {
            candle_core::bail!("attention scores: f16 queries and keys only");
        }
        let (rows, query_len, width) = ql.shape().dims3()?;
        let (key_rows, key_len, key_width) = kl.shape().dims3()?;
        if key_rows != rows || key_width != width {
            candle_core::bail!(
                "attention scores: keys {:?} for queries {:?}",
                kl.shape(),
                ql.shape()
            );
        }
        let device = q.device().clone();
        let stream = device.cuda_stream();
        let qs = contiguous_slice::<f16>(q, ql, "attention queries")?;
        let ks = contiguous_slice::<f16>(k, kl, "attention keys")?;
        // SAFETY: the GEMM (beta = 0) writes every element.
        let mut scores: CudaSlice<f32> =
            unsafe { device.alloc::<f32>(rows * query_len * key_len)? };
        let (alpha, beta) = (self.scale, 0.0f32);
        let (k_ptr, k_use) = ks.device_ptr(&stream);
        let (q_ptr, q_use) = qs.device_ptr(&stream);
        let (s_ptr, s_use) = scores.device_ptr_mut(&stream);
        let blas = device.cublas_handle();
        let dim = |value: usize| -> Result<i32> {
            i32::try_from(value)
                .map_err(|_| candle_core::Error::Msg("attention scores: too large".into()))
        };
        // Column-major: scores^T (keys x queries) = K (keys x width) . Q^T (width x queries).
        // SAFETY: f16 buffers of rows * key_len * width and rows * query_len * width elements,
        // an f32 output of rows * query_len * key_len, and f32 scalars for the 32F compute type.
        unsafe {
            gemm_strided_batched_ex(
                *blas.handle(),
                sys::cublasOperation_t::CUBLAS_OP_T,
                sys::cublasOperation_t::CUBLAS_OP_N,
                dim(key_len)?,
                dim(query_len)?,
                dim(width)?,
                (&alpha as *const f32).cast::<c_void>(),
                k_ptr as *const c_void,
                sys::cudaDataType_t::CUDA_R_16F,
                dim(width)?,
                (key_len * width) as i64,
                q_ptr as *const c_void,
                sys::cudaDataType_t::CUDA_R_16F,
                dim(width)?,
                (query_len * width) as i64,
                (&beta as *const f32).cast::<c_void>(),
                s_ptr as *mut c_void,
                sys::cudaDataType_t::CUDA_R_32F,
                dim(key_len)?,
                (query_len * key_len) as i64,
                dim(rows)?,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| candle_core::Error::Msg(format!("cuBLAS: {e:?}")))?;
        drop((k_use, q_use, s_use));
        Ok((
            CudaStorage::wrap_cuda_slice(scores, device),
            Shape::from((rows, query_len, key_len)),
        ))
    }
}

/// Head widths the attention kernel is built for (a head is zero-padded up to one of them).
pub const ATTENTION_HEAD_DIMS: [usize; 8] = [16, 32, 48, 64, 80, 96, 128, 160];

/// Scaled dot-product attention without a mask over f16 `(batch, tokens, heads * head_dim)`
/// tensors whose rows may be strided (q, k and v can be column ranges of one projection).
pub struct FlashAttentionOp {
    /// Number of heads.
    pub heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Multiplies the scores before the softmax.
    pub scale: f32,
}

impl FlashAttentionOp {
    /// The padded head width the kernel uses, if any.
    pub fn padded_head_dim(head_dim: usize) -> Option<usize> {
        ATTENTION_HEAD_DIMS.iter().copied().find(|&p| p >= head_dim)
    }

    /// Queries per block (8 warps of 16) and keys per tile, as in kernels.cu.
    const BLOCK_QUERIES: usize = 128;
    const BLOCK_KEYS: usize = 64;

    /// Shared memory of the Hopper kernel: three stages of a 64-key key tile and value tile
    /// (128-byte rows), plus 1 KiB to align them to the swizzle's 1024 bytes.
    const HOPPER_SHARED_BYTES: u32 = 3 * 2 * 64 * 128 + 1024;

    /// The Hopper kernel (attention_sm90.cu), where `device` runs it.
    fn hopper_kernel(device: &CudaDevice) -> Option<CudaFunction> {
        hopper_attention_kernel(
            device,
            "flash_attention_wgmma_d64",
            Self::HOPPER_SHARED_BYTES,
        )
    }

    /// Whether 64-wide heads take the Hopper kernel on `device` (compute capability 9.0, the
    /// kernel built and accepted by the driver, `ATELIER_HOPPER_ATTENTION` not `0`).
    pub fn uses_hopper_kernel(device: &CudaDevice) -> bool {
        Self::hopper_kernel(device).is_some()
    }

    fn shared_bytes(padded: usize) -> usize {
        // Two stages of one key tile and one value tile, rows padded by 8 halves.
        2 * 2 * Self::BLOCK_KEYS * (padded + 8) * 2
    }
}

fn rows_layout(layout: &Layout, what: &str) -> Result<(usize, usize, usize)> {
    let (batch, _, _) = layout.shape().dims3()?;
    let stride = layout.stride();
    if stride[2] != 1 {
        candle_core::bail!("attention {what}: columns must be contiguous");
    }
    let batch_stride = if batch == 1 { 0 } else { stride[0] };
    Ok((layout.start_offset(), stride[1], batch_stride))
}

impl CustomOp3 for FlashAttentionOp {
    fn name(&self) -> &'static str {
        "atelier-flash-attention"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        cuda_only(self.name())
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        ql: &Layout,
        k: &CudaStorage,
        kl: &Layout,
        v: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let device = q.device().clone();
        let (batch, nq, _) = ql.shape().dims3()?;
        let nk = kl.shape().dims3()?.1;
        let (q_offset, q_stride, q_batch) = rows_layout(ql, "query")?;
        let (k_offset, kv_stride, kv_batch) = rows_layout(kl, "key")?;
        let (v_offset, v_stride, v_batch) = rows_layout(vl, "value")?;
        if v_stride != kv_stride || v_batch != kv_batch {
            candle_core::bail!("attention: keys and values must share their layout");
        }
        let Some(padded) = Self::padded_head_dim(self.head_dim) else {
            candle_core::bail!("attention kernel: head width {} too large", self.head_dim);
        };
        let width = self.heads * self.head_dim;
        let qs = q.as_cuda_slice::<f16>()?.slice(q_offset..);
        let ks = k.as_cuda_slice::<f16>()?.slice(k_offset..);
        let vs = v.as_cuda_slice::<f16>()?.slice(v_offset..);
        // SAFETY: the kernel writes every element of every query row and head.
        let mut out: CudaSlice<f16> = unsafe { device.alloc::<f16>(batch * nq * width)? };
        // Hopper's wgmma kernel for 64-wide heads: one warpgroup (64 queries) per block, which
        // measured within 1.2 % of two at SDXL's 4,096 tokens and faster at every other size.
        let hopper_kernel = if self.head_dim == 64 {
            Self::hopper_kernel(&device)
        } else {
            None
        };
        let hopper = hopper_kernel.is_some();
        let (func, config) = if let Some(func) = hopper_kernel {
            let config = LaunchConfig {
                grid_dim: (nq.div_ceil(64) as u32, self.heads as u32, batch as u32),
                block_dim: (128, 1, 1),
                shared_mem_bytes: Self::HOPPER_SHARED_BYTES,
            };
            (func, config)
        } else {
            let shared = Self::shared_bytes(padded) as u32;
            let func = function(&device, &format!("flash_attention_d{padded}"), shared)?;
            let config = LaunchConfig {
                grid_dim: (
                    nq.div_ceil(Self::BLOCK_QUERIES) as u32,
                    self.heads as u32,
                    batch as u32,
                ),
                block_dim: (256, 1, 1),
                shared_mem_bytes: shared,
            };
            (func, config)
        };
        let (nq_i, nk_i, d_i) = (nq as i32, nk as i32, self.head_dim as i32);
        let strides = [
            q_stride as i64,
            kv_stride as i64,
            width as i64,
            q_batch as i64,
            kv_batch as i64,
            (nq * width) as i64,
        ];
        let scale_log2 = self.scale * std::f32::consts::LOG2_E;
        let stream = device.cuda_stream();
        let mut builder = stream.launch_builder(&func);
        builder
            .arg(&qs)
            .arg(&ks)
            .arg(&vs)
            .arg(&mut out)
            .arg(&nq_i)
            .arg(&nk_i);
        if !hopper {
            // The Hopper kernel's head width is fixed.
            builder.arg(&d_i);
        }
        for stride in &strides {
            builder.arg(stride);
        }
        builder.arg(&scale_log2);
        // SAFETY: arguments match the kernel's signature; alignment is checked by the caller.
        unsafe { builder.launch(config) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, device),
            Shape::from((batch, nq, width)),
        ))
    }
}

/// Batched f32 matrix products `a b` (or `a b^T`) on TF32 tensor cores in three passes: each
/// operand is split into its TF32 rounding and the remainder, and `big * big + big * small +
/// small * big` comes within f32's own rounding (the remainders' product is below it), as
/// PyTorch's f32 attention kernels compute. For the attention of a VAE that runs upcast to f32
/// (SDXL's), which a plain f32 GEMM would make several times slower. Inputs: `a` `(batch, m, k)`,
/// `b` `(batch, k, n)` or, transposed, `(batch, n, k)`, both contiguous f32.
pub struct Tf32x3MatmulOp {
    /// `b` is given as `(batch, n, k)`: the product is `a b^T`.
    pub transpose_b: bool,
}

impl candle_core::CustomOp2 for Tf32x3MatmulOp {
    fn name(&self) -> &'static str {
        "atelier-tf32x3-matmul"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        cuda_only(self.name())
    }

    fn cuda_fwd(
        &self,
        a: &CudaStorage,
        al: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        use candle_core::cuda_backend::cudarc::cublas::{GemmConfig, StridedBatchedConfig};
        if a.dtype() != DType::F32 || b.dtype() != DType::F32 {
            candle_core::bail!("three-pass TF32 products: f32 only");
        }
        let (batch, m, k) = al.shape().dims3()?;
        let (b_batch, b_rows, b_cols) = bl.shape().dims3()?;
        let n = if self.transpose_b { b_rows } else { b_cols };
        let b_k = if self.transpose_b { b_cols } else { b_rows };
        if b_batch != batch || b_k != k {
            candle_core::bail!(
                "three-pass TF32 products: {:?} by {:?}",
                al.shape(),
                bl.shape()
            );
        }
        let dim = |value: usize| -> Result<i32> {
            i32::try_from(value)
                .map_err(|_| candle_core::Error::Msg("three-pass TF32 products: too large".into()))
        };
        let device = a.device().clone();
        let stream = device.cuda_stream();
        let a_view = contiguous_slice::<f32>(a, al, "product input")?;
        let b_view = contiguous_slice::<f32>(b, bl, "product input")?;
        let split = function(&device, "split_tf32", 0)?;
        // Each operand as (TF32 part, remainder).
        let halves = |view: &candle_core::cuda_backend::cudarc::driver::CudaView<'_, f32>,
                      count: usize|
         -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
            // SAFETY: split_tf32 writes every element of both.
            let mut big = unsafe { device.alloc::<f32>(count)? };
            let mut small = unsafe { device.alloc::<f32>(count)? };
            let count_i = count as i64;
            let mut builder = stream.launch_builder(&split);
            builder
                .arg(view)
                .arg(&mut big)
                .arg(&mut small)
                .arg(&count_i);
            let config = LaunchConfig {
                grid_dim: (count.div_ceil(256).clamp(1, 65_535) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: arguments match the kernel's signature.
            unsafe { builder.launch(config) }.w()?;
            Ok((big, small))
        };
        let (a_big, a_small) = halves(&a_view, batch * m * k)?;
        let (b_big, b_small) = halves(&b_view, batch * k * n)?;
        // SAFETY: the first pass (beta = 0) writes every element.
        let mut out: CudaSlice<f32> = unsafe { device.alloc::<f32>(batch * m * n)? };
        let blas = device.cublas_handle();
        // Column-major: out^T (n x m) = op(b)^T (n x k) . a^T (k x m).
        let (transa, lda) = if self.transpose_b {
            (sys::cublasOperation_t::CUBLAS_OP_T, dim(k)?)
        } else {
            (sys::cublasOperation_t::CUBLAS_OP_N, dim(n)?)
        };
        let config = StridedBatchedConfig {
            gemm: GemmConfig {
                transa,
                transb: sys::cublasOperation_t::CUBLAS_OP_N,
                m: dim(n)?,
                n: dim(m)?,
                k: dim(k)?,
                alpha: 1.0f32,
                lda,
                ldb: dim(k)?,
                beta: 0.0f32,
                ldc: dim(n)?,
            },
            batch_size: dim(batch)?,
            stride_a: (k * n) as i64,
            stride_b: (m * k) as i64,
            stride_c: (m * n) as i64,
        };
        let mut target = out.slice_mut(..);
        // Smallest terms first, the TF32 parts' product last.
        for (b_part, a_part, beta) in [
            (&b_small, &a_big, 0.0f32),
            (&b_big, &a_small, 1.0),
            (&b_big, &a_big, 1.0),
        ] {
            tf32_gemm(
                &blas,
                &stream,
                &config,
                &b_part.slice(..),
                &a_part.slice(..),
                &mut target,
                beta,
            )?;
        }
        Ok((
            CudaStorage::wrap_cuda_slice(out, device),
            Shape::from((batch, m, n)),
        ))
    }
}
