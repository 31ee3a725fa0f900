//! Memory-bound operations of the UNet with kernels of our own (`elementwise.cuh`): LayerNorm,
//! the transposes between the image's `(channels, pixels)` and the attention blocks' tokens
//! (with the block's residual added on the way back), and the 2x nearest upsampling. candle's
//! generic strided kernels took 3-10x longer on these shapes.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaStorage, WrapErr};
use candle_core::{CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape};
use half::f16;

use super::{contiguous_slice, cuda_only, function, grid_2d, suffix};

/// LayerNorm over the last dimension with affine weights (PyTorch's: biased variance, `eps`
/// added to it). Inputs: x `(..., width)`, weight `(width,)`, bias `(width,)`.
pub struct LayerNormOp {
    /// Added to the variance.
    pub eps: f32,
}

impl LayerNormOp {
    fn run<T: CudaDType + DeviceRepr>(
        &self,
        x: (&CudaStorage, &Layout),
        weight: (&CudaStorage, &Layout),
        bias: (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let device = x.0.device().clone();
        let shape = x.1.shape().clone();
        let columns = shape.dims().last().copied().unwrap_or(1);
        if weight.1.shape().elem_count() != columns || bias.1.shape().elem_count() != columns {
            candle_core::bail!("LayerNorm: weights for {columns} columns expected");
        }
        let rows = shape.elem_count() / columns.max(1);
        let xs = contiguous_slice::<T>(x.0, x.1, "LayerNorm input")?;
        let ws = contiguous_slice::<T>(weight.0, weight.1, "LayerNorm weight")?;
        let bs = contiguous_slice::<T>(bias.0, bias.1, "LayerNorm bias")?;
        // SAFETY: the kernel writes every element.
        let mut out: CudaSlice<T> = unsafe { device.alloc::<T>(shape.elem_count())? };
        let aligned = [x.1, weight.1, bias.1]
            .iter()
            .all(|layout| layout.start_offset().is_multiple_of(8));
        // Rows kept in registers as 16-byte vectors: up to 2 or 8 vectors per lane.
        let name = match (x.0.dtype(), columns.is_multiple_of(8) && aligned) {
            (DType::F16, true) if columns <= 512 => "layer_norm_f16x8_v2".to_string(),
            (DType::F16, true) if columns <= 2048 => "layer_norm_f16x8_v8".to_string(),
            (dtype, _) => format!("layer_norm_{}", suffix(dtype)?),
        };
        const ROWS_PER_BLOCK: usize = 4;
        let blocks = u32::try_from(rows.div_ceil(ROWS_PER_BLOCK))
            .map_err(|_| candle_core::Error::Msg("LayerNorm: too many rows".into()))?;
        let config = LaunchConfig {
            grid_dim: (blocks.max(1), 1, 1),
            block_dim: (32 * ROWS_PER_BLOCK as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let func = function(&device, &name, 0)?;
        let (rows_i, columns_i) = (rows as i64, columns as i32);
        let stream = device.cuda_stream();
        let mut builder = stream.launch_builder(&func);
        builder
            .arg(&xs)
            .arg(&ws)
            .arg(&bs)
            .arg(&mut out)
            .arg(&rows_i)
            .arg(&columns_i)
            .arg(&self.eps);
        // SAFETY: arguments match the kernel's signature; sizes are checked above.
        unsafe { builder.launch(config) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, device), shape))
    }
}

three_input_op!(LayerNormOp, "atelier-layer-norm");

/// Swaps the last two dimensions of a contiguous `(batch, rows, columns)` tensor, giving a
/// contiguous `(batch, columns, rows)`; as a `CustomOp2` it also adds a residual of the output's
/// shape.
pub struct TransposeOp;

impl TransposeOp {
    fn run<T: CudaDType + DeviceRepr>(
        &self,
        x: (&CudaStorage, &Layout),
        residual: Option<(&CudaStorage, &Layout)>,
    ) -> Result<(CudaStorage, Shape)> {
        let device = x.0.device().clone();
        let (batch, rows, columns) = x.1.shape().dims3()?;
        let too_large = |value: usize| value >= i32::MAX as usize;
        if too_large(rows) || too_large(columns) || batch > 65_535 || rows.div_ceil(32) > 65_535 {
            candle_core::bail!("transpose kernel: {:?} is too large", x.1.shape());
        }
        let xs = contiguous_slice::<T>(x.0, x.1, "transpose input")?;
        let residual = match residual {
            Some((storage, layout)) => {
                if layout.shape().dims() != [batch, columns, rows] {
                    candle_core::bail!(
                        "transpose: residual {:?} for an output of {:?}",
                        layout.shape(),
                        (batch, columns, rows)
                    );
                }
                Some(contiguous_slice::<T>(
                    storage,
                    layout,
                    "transpose residual",
                )?)
            }
            None => None,
        };
        // SAFETY: the kernel writes every element.
        let mut out: CudaSlice<T> = unsafe { device.alloc::<T>(batch * rows * columns)? };
        let func = function(
            &device,
            &format!("transpose_rows_{}", suffix(x.0.dtype())?),
            0,
        )?;
        let config = LaunchConfig {
            grid_dim: (
                columns.div_ceil(32).max(1) as u32,
                rows.div_ceil(32).max(1) as u32,
                batch.max(1) as u32,
            ),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        };
        let (rows_i, columns_i) = (rows as i32, columns as i32);
        let null: u64 = 0;
        let stream = device.cuda_stream();
        let mut builder = stream.launch_builder(&func);
        builder.arg(&xs);
        match &residual {
            Some(view) => builder.arg(view),
            None => builder.arg(&null),
        };
        builder.arg(&mut out).arg(&rows_i).arg(&columns_i);
        // SAFETY: arguments match the kernel's signature; a null residual is checked by it.
        unsafe { builder.launch(config) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, device),
            Shape::from((batch, columns, rows)),
        ))
    }

    fn dispatch(
        &self,
        x: (&CudaStorage, &Layout),
        residual: Option<(&CudaStorage, &Layout)>,
    ) -> Result<(CudaStorage, Shape)> {
        if let Some((storage, _)) = residual
            && storage.dtype() != x.0.dtype()
        {
            candle_core::bail!("transpose: residual of another type");
        }
        match x.0.dtype() {
            DType::F16 => self.run::<f16>(x, residual),
            DType::F32 => self.run::<f32>(x, residual),
            other => candle_core::bail!("transpose kernel: unsupported {other:?}"),
        }
    }
}

impl CustomOp1 for TransposeOp {
    fn name(&self) -> &'static str {
        "atelier-transpose"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        cuda_only(CustomOp1::name(self))
    }

    fn cuda_fwd(&self, x: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        self.dispatch((x, layout), None)
    }
}

impl CustomOp2 for TransposeOp {
    fn name(&self) -> &'static str {
        "atelier-transpose-add"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        cuda_only(CustomOp2::name(self))
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        residual: &CudaStorage,
        rl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.dispatch((x, xl), Some((residual, rl)))
    }
}

/// Nearest-neighbour upsampling by exactly 2 of a contiguous `(batch, channels, h, w)` tensor.
pub struct Upsample2xOp;

impl Upsample2xOp {
    fn run<T: CudaDType + DeviceRepr>(
        &self,
        x: &CudaStorage,
        layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let device = x.device().clone();
        let (batch, channels, height, width) = layout.shape().dims4()?;
        if height * width >= i32::MAX as usize / 4 {
            candle_core::bail!("upsample kernel: {height}x{width} is too large");
        }
        let xs = contiguous_slice::<T>(x, layout, "upsample input")?;
        let planes = batch * channels;
        // SAFETY: the kernel writes every element.
        let mut out: CudaSlice<T> = unsafe { device.alloc::<T>(planes * 4 * height * width)? };
        let func = function(
            &device,
            &format!("upsample_nearest_2x_{}", suffix(x.dtype())?),
            0,
        )?;
        let (planes_i, height_i, width_i) = (planes as i64, height as i32, width as i32);
        let stream = device.cuda_stream();
        let mut builder = stream.launch_builder(&func);
        builder
            .arg(&xs)
            .arg(&mut out)
            .arg(&planes_i)
            .arg(&height_i)
            .arg(&width_i);
        // SAFETY: arguments match the kernel's signature.
        unsafe { builder.launch(grid_2d(height * width, planes)) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, device),
            Shape::from((batch, channels, 2 * height, 2 * width)),
        ))
    }
}

one_input_op!(Upsample2xOp, "atelier-upsample-2x");
