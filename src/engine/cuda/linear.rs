//! Linear layers as one GEMM each: the bias in cuBLASLt's epilogue (f16) or a bias pass (f32),
//! and optionally accumulated onto a residual in place (the attention blocks' skip connections),
//! which saves the separate addition's pass over memory.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublas::{Gemm, GemmConfig, sys};
use candle_core::cuda_backend::cudarc::cublaslt::{CudaBlasLT, Matmul, MatmulConfig};
use candle_core::cuda_backend::cudarc::driver::{CudaView, CudaViewMut, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::{DType, InplaceOp2, Layout, Result, Shape, Tensor};
use half::f16;

use super::{
    GemmScalar, blas_lt, contiguous_slice, cuda_only, function, grid_2d, lt_error, suffix, timed,
    with_tensor_view,
};

/// `out = x W^T + bias (+ out when accumulate)` for `rows` rows: `x` is `(rows, in)`, the
/// weight `(out_dim, in)`, `out` `(rows, out_dim)`, all contiguous.
fn linear_into<T: GemmScalar>(
    device: &CudaDevice,
    xs: &CudaView<'_, T>,
    ws: &CudaView<'_, T>,
    bias: Option<&Tensor>,
    out: &mut CudaViewMut<'_, T>,
    (rows, in_dim, out_dim): (usize, usize, usize),
    accumulate: bool,
) -> Result<()>
where
    candle_core::cuda_backend::cudarc::cublas::CudaBlas: Gemm<T>,
    CudaBlasLT: Matmul<T>,
{
    // f16 with a bias: cuBLASLt adds the bias in the GEMM's epilogue.
    if let (DType::F16, Some(bias)) = (<T as super::cudnn::ConvScalar>::DTYPE, bias) {
        let config = MatmulConfig {
            transa: true,
            transb: false,
            transc: false,
            m: out_dim as u64,
            n: rows as u64,
            k: in_dim as u64,
            alpha: 1.0,
            lda: in_dim as i64,
            ldb: in_dim as i64,
            beta: if accumulate { 1.0 } else { 0.0 },
            ldc: out_dim as i64,
            stride_a: None,
            stride_b: None,
            stride_c: None,
            stride_bias: None,
            batch_size: None,
        };
        let handle = blas_lt(device)?;
        return with_tensor_view::<T, _>(bias, out_dim, "linear bias", |bs| {
            timed("linear.gemm+bias", device, || {
                // SAFETY: f16 buffers of out * in, rows * in, rows * out and out elements.
                unsafe { handle.matmul(config, ws, xs, out, Some(&bs), None) }.map_err(lt_error)
            })
        });
    }
    let config = GemmConfig {
        transa: sys::cublasOperation_t::CUBLAS_OP_T,
        transb: sys::cublasOperation_t::CUBLAS_OP_N,
        m: out_dim as i32,
        n: rows as i32,
        k: in_dim as i32,
        alpha: T::ONE,
        lda: in_dim as i32,
        ldb: in_dim as i32,
        beta: if accumulate { T::ONE } else { T::ZERO },
        ldc: out_dim as i32,
    };
    let blas = device.cublas_handle();
    timed("linear.gemm", device, || {
        // SAFETY: buffers of rows * in, out * in and rows * out elements.
        unsafe { blas.gemm(config, ws, xs, out) }.w()
    })?;
    if let Some(bias) = bias {
        with_tensor_view::<T, _>(bias, out_dim, "linear bias", |bs| {
            let func = function(
                device,
                &format!(
                    "add_bias_rows_{}",
                    suffix(<T as super::cudnn::ConvScalar>::DTYPE)?
                ),
                0,
            )?;
            let (rows_i, columns_i) = (rows as i64, out_dim as i32);
            let stream = device.cuda_stream();
            let mut builder = stream.launch_builder(&func);
            builder.arg(out).arg(&bs).arg(&rows_i).arg(&columns_i);
            timed("linear.bias", device, || {
                // SAFETY: arguments match the kernel's signature.
                unsafe { builder.launch(grid_2d(out_dim, rows)) }.w()
            })
        })?;
    }
    Ok(())
}

/// The `(rows, in, out)` of a linear layer on a `(..., in)` input and an `(out, in)` weight.
fn linear_dims(x: &Layout, weight: &Layout) -> Result<(usize, usize, usize)> {
    let dims = x.shape().dims();
    let in_dim = dims[dims.len() - 1];
    let rows = x.shape().elem_count() / in_dim.max(1);
    let (out_dim, weight_in) = weight.shape().dims2()?;
    if weight_in != in_dim {
        candle_core::bail!("linear: input width {in_dim}, weight {weight_in}");
    }
    Ok((rows, in_dim, out_dim))
}

/// `x W^T + bias` for a contiguous `(..., in)` input and `(out, in)` weight: one cuBLAS GEMM
/// (with the bias in cuBLASLt's epilogue in f16, a bias pass in f32).
pub struct LinearOp {
    /// `(out,)`, added to every row.
    pub bias: Option<Tensor>,
}

impl LinearOp {
    fn run<T: GemmScalar>(
        &self,
        x: (&CudaStorage, &Layout),
        weight: (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)>
    where
        candle_core::cuda_backend::cudarc::cublas::CudaBlas: Gemm<T>,
        CudaBlasLT: Matmul<T>,
    {
        let device = x.0.device().clone();
        let (rows, in_dim, out_dim) = linear_dims(x.1, weight.1)?;
        let xs = contiguous_slice::<T>(x.0, x.1, "linear input")?;
        let ws = contiguous_slice::<T>(weight.0, weight.1, "linear weight")?;
        // SAFETY: the GEMM (not accumulating) writes every element.
        let mut out = unsafe { device.alloc::<T>(rows * out_dim)? };
        linear_into(
            &device,
            &xs,
            &ws,
            self.bias.as_ref(),
            &mut out.slice_mut(..),
            (rows, in_dim, out_dim),
            false,
        )?;
        let mut out_dims = x.1.shape().dims().to_vec();
        let last = out_dims.len() - 1;
        out_dims[last] = out_dim;
        Ok((
            CudaStorage::wrap_cuda_slice(out, device),
            Shape::from(out_dims),
        ))
    }
}

impl candle_core::CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "atelier-linear"
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
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        match x.dtype() {
            DType::F16 => self.run::<f16>((x, xl), (w, wl)),
            DType::F32 => self.run::<f32>((x, xl), (w, wl)),
            other => candle_core::bail!("linear kernel: unsupported {other:?}"),
        }
    }
}

/// In place on a residual `r`: `r += x W^T + bias`, the GEMM accumulating onto `r` (beta 1),
/// for a contiguous `(..., in)` input `x` and a contiguous residual `(..., out)` of as many rows.
pub struct LinearAddOp {
    /// `(out, in)`.
    pub weight: Tensor,
    /// `(out,)`, added to every row.
    pub bias: Option<Tensor>,
}

impl LinearAddOp {
    fn run<T: GemmScalar>(
        &self,
        residual: (&mut CudaStorage, &Layout),
        x: (&CudaStorage, &Layout),
    ) -> Result<()>
    where
        candle_core::cuda_backend::cudarc::cublas::CudaBlas: Gemm<T>,
        CudaBlasLT: Matmul<T>,
    {
        let device = x.0.device().clone();
        let (weight_storage, weight_layout) = self.weight.storage_and_layout();
        let candle_core::Storage::Cuda(weight_storage) = &*weight_storage else {
            candle_core::bail!("linear weight is not on the GPU");
        };
        let (rows, in_dim, out_dim) = linear_dims(x.1, weight_layout)?;
        if residual.1.shape().elem_count() != rows * out_dim || !residual.1.is_contiguous() {
            candle_core::bail!(
                "linear onto a residual: {:?} for {rows} rows of {out_dim}",
                residual.1.shape()
            );
        }
        let xs = contiguous_slice::<T>(x.0, x.1, "linear input")?;
        let ws = contiguous_slice::<T>(weight_storage, weight_layout, "linear weight")?;
        let offset = residual.1.start_offset();
        let mut target = residual.0.as_cuda_slice_mut::<T>()?.slice_mut(offset..);
        linear_into(
            &device,
            &xs,
            &ws,
            self.bias.as_ref(),
            &mut target,
            (rows, in_dim, out_dim),
            true,
        )
    }
}

impl InplaceOp2 for LinearAddOp {
    fn name(&self) -> &'static str {
        "atelier-linear-add"
    }

    fn cpu_fwd(
        &self,
        _: &mut candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<()> {
        candle_core::bail!("{} runs on CUDA only", InplaceOp2::name(self))
    }

    fn cuda_fwd(
        &self,
        residual: &mut CudaStorage,
        rl: &Layout,
        x: &CudaStorage,
        xl: &Layout,
    ) -> Result<()> {
        match x.dtype() {
            DType::F16 => self.run::<f16>((residual, rl), (x, xl)),
            DType::F32 => self.run::<f32>((residual, rl), (x, xl)),
            other => candle_core::bail!("linear kernel: unsupported {other:?}"),
        }
    }
}
