//! Convolutions on the CPU: 3x3 ones with stride 1 and padding 1 by Winograd's F(4x4, 3x3)
//! (`winograd.rs`), the others by im2col from contiguous rows and one GEMM per band into NCHW.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape};
use rayon::prelude::*;

use super::contiguous;

/// A 2-D convolution with bias on contiguous f32 NCHW tensors (groups 1, dilation 1), written
/// straight into NCHW: the bias fills the output, then one GEMM per band of output rows adds
/// weights x columns, where a band's columns (im2col) are built row by row from contiguous
/// slices of the input in parallel. candle's CPU convolution transposes the whole input to NHWC
/// and scatters every patch, which cost more than the GEMMs themselves.
#[derive(Debug, Clone, Copy)]
pub struct CpuConv2dOp {
    /// Step between output pixels.
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
}

/// The fewest output pixels per image (32x32) for which a 3x3 convolution goes by Winograd: its
/// filters are transformed on every call (4x the weight: keeping them would take another 8 GB
/// for SD 1.5's UNet), which at the UNet's 1280-channel levels of 8x8 and 16x16 pixels costs
/// more than it saves.
const MIN_WINOGRAD_PIXELS: usize = 1024;

/// The most f32 values of im2col columns built at once (64 MiB).
const MAX_COLUMN_VALUES: usize = 1 << 24;

impl CustomOp3 for CpuConv2dOp {
    fn name(&self) -> &'static str {
        "atelier-cpu-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let input = contiguous(xs, xs_layout, "the input")?;
        let weight = contiguous(weight, weight_layout, "the weight")?;
        let bias = contiguous(bias, bias_layout, "the bias")?;
        let (
            Ok(&[batch, channels, height, width]),
            Ok(&[out_channels, in_channels, kernel_h, kernel_w]),
        ) = (
            <&[usize; 4]>::try_from(xs_layout.shape().dims()),
            <&[usize; 4]>::try_from(weight_layout.shape().dims()),
        )
        else {
            candle_core::bail!("CPU conv2d: input and weight must be 4-D");
        };
        if in_channels != channels || bias.len() != out_channels || self.stride == 0 {
            candle_core::bail!(
                "CPU conv2d: weight {:?} and bias of {} do not fit input {:?}",
                weight_layout.shape().dims(),
                bias.len(),
                xs_layout.shape().dims()
            );
        }
        let padded_h = height + 2 * self.padding;
        let padded_w = width + 2 * self.padding;
        if padded_h < kernel_h || padded_w < kernel_w {
            candle_core::bail!("CPU conv2d: the kernel is larger than the padded input");
        }
        let out_h = (padded_h - kernel_h) / self.stride + 1;
        let out_w = (padded_w - kernel_w) / self.stride + 1;
        let plane = out_h * out_w;
        let depth = channels * kernel_h * kernel_w;
        let mut output = vec![0f32; batch * out_channels * plane];
        output
            .par_chunks_mut(plane.max(1))
            .enumerate()
            .for_each(|(index, values)| values.fill(bias[index % out_channels]));
        let parallelism = super::gemm_parallelism();
        let winograd = kernel_h == 3
            && kernel_w == 3
            && self.stride == 1
            && self.padding == 1
            && height * width >= MIN_WINOGRAD_PIXELS;
        if winograd {
            let filters = super::winograd::transform_filters(weight, out_channels, channels);
            for item in 0..batch {
                let image = &input[item * channels * height * width..][..channels * height * width];
                let out = &mut output[item * out_channels * plane..][..out_channels * plane];
                super::winograd::convolve_3x3_add(
                    out,
                    image,
                    &filters,
                    (out_channels, channels, height, width),
                );
            }
            return Ok((
                CpuStorage::F32(output),
                Shape::from((batch, out_channels, out_h, out_w)),
            ));
        }
        let pointwise = kernel_h == 1 && kernel_w == 1 && self.stride == 1 && self.padding == 0;
        let band_rows = (MAX_COLUMN_VALUES / (depth * out_w).max(1)).clamp(1, out_h);
        let mut columns = if pointwise {
            Vec::new()
        } else {
            vec![0f32; depth * band_rows * out_w]
        };
        for item in 0..batch {
            let image = &input[item * channels * height * width..][..channels * height * width];
            let out = &mut output[item * out_channels * plane..][..out_channels * plane];
            if pointwise {
                // The image itself is the (channels x plane) matrix of columns.
                add_product(
                    out,
                    plane,
                    weight,
                    image,
                    (out_channels, channels, plane),
                    parallelism,
                );
                continue;
            }
            for first_row in (0..out_h).step_by(band_rows) {
                let rows = band_rows.min(out_h - first_row);
                let span = rows * out_w;
                let band = &mut columns[..depth * span];
                band.par_chunks_mut(span)
                    .enumerate()
                    .for_each(|(row, values)| {
                        let channel = row / (kernel_h * kernel_w);
                        let ky = (row / kernel_w) % kernel_h;
                        let kx = row % kernel_w;
                        let source = &image[channel * height * width..][..height * width];
                        self.fill_column_row(
                            values,
                            source,
                            (height, width),
                            (ky, kx),
                            first_row,
                            out_w,
                        );
                    });
                // The band's outputs: rows first_row.. of each output channel's plane.
                add_product(
                    &mut out[first_row * out_w..],
                    plane,
                    weight,
                    band,
                    (out_channels, depth, span),
                    parallelism,
                );
            }
        }
        Ok((
            CpuStorage::F32(output),
            Shape::from((batch, out_channels, out_h, out_w)),
        ))
    }
}

/// `out += weight x columns` for `weight` (rows x depth) and `columns` (depth x span), both
/// row-major, into the first `span` values of each of `rows` rows of `out`, which lie `stride`
/// values apart.
fn add_product(
    out: &mut [f32],
    stride: usize,
    weight: &[f32],
    columns: &[f32],
    (rows, depth, span): (usize, usize, usize),
    parallelism: gemm::Parallelism,
) {
    assert!(weight.len() >= rows * depth && columns.len() >= depth * span);
    assert!(rows == 0 || out.len() >= (rows - 1) * stride + span);
    // SAFETY: the asserts above keep every read and write of the three matrices in bounds.
    unsafe {
        gemm::gemm(
            rows,
            span,
            depth,
            out.as_mut_ptr(),
            1,
            stride as isize,
            true,
            weight.as_ptr(),
            1,
            depth as isize,
            columns.as_ptr(),
            1,
            span as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

impl CpuConv2dOp {
    /// One im2col row: the input pixels that kernel tap (`ky`, `kx`) of one channel meets for
    /// output rows `first_row..` (zero where the tap falls in the padding).
    fn fill_column_row(
        &self,
        values: &mut [f32],
        source: &[f32],
        (height, width): (usize, usize),
        (ky, kx): (usize, usize),
        first_row: usize,
        out_w: usize,
    ) {
        for (offset, row_values) in values.chunks_mut(out_w).enumerate() {
            let in_y = ((first_row + offset) * self.stride + ky) as isize - self.padding as isize;
            if in_y < 0 || in_y >= height as isize {
                row_values.fill(0.0);
                continue;
            }
            let line = &source[in_y as usize * width..][..width];
            if self.stride == 1 {
                // Output x reads input x + kx - padding: one contiguous copy between zeros.
                let shift = kx as isize - self.padding as isize;
                let first = (-shift).clamp(0, out_w as isize) as usize;
                let last = (width as isize - shift).clamp(first as isize, out_w as isize) as usize;
                row_values[..first].fill(0.0);
                row_values[first..last].copy_from_slice(
                    &line[(first as isize + shift) as usize..(last as isize + shift) as usize],
                );
                row_values[last..].fill(0.0);
            } else {
                for (x, value) in row_values.iter_mut().enumerate() {
                    let in_x = (x * self.stride + kx) as isize - self.padding as isize;
                    *value = if in_x < 0 || in_x >= width as isize {
                        0.0
                    } else {
                        line[in_x as usize]
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn convolution_matches_candles() {
        let device = Device::Cpu;
        let pattern = |shape: (usize, usize, usize, usize), scale: f64| {
            let count = shape.0 * shape.1 * shape.2 * shape.3;
            (Tensor::arange(0f32, count as f32, &device)
                .unwrap()
                .reshape(shape)
                .unwrap()
                .affine(0.37, 0.1)
                .unwrap()
                .sin()
                .unwrap()
                * scale)
                .unwrap()
        };
        // (input, kernel, stride, padding): SD's 3x3 convolutions (Winograd), the UNet's strided
        // downsamplers, the VAE encoder's unpadded ones, 1x1 shortcuts, odd sizes.
        let cases = [
            ((2, 5, 9, 11), 3, 1, 1),
            // Winograd (at least 32x32 pixels): sizes that are and are not multiples of 4.
            ((1, 4, 32, 32), 3, 1, 1),
            ((2, 3, 33, 35), 3, 1, 1),
            ((1, 4, 10, 7), 3, 2, 1),
            ((1, 3, 9, 9), 3, 2, 0),
            ((2, 6, 5, 8), 1, 1, 0),
            ((1, 3, 6, 6), 3, 1, 0),
            ((1, 2, 4, 5), 1, 2, 0),
        ];
        for (shape, kernel, stride, padding) in cases {
            let xs = pattern(shape, 2.0);
            let weight = pattern((7, shape.1, kernel, kernel), 0.5);
            let bias = Tensor::new(&[0.1f32, -0.2, 0.3, 0.0, 1.0, -1.0, 0.5], &device).unwrap();
            let op = CpuConv2dOp { stride, padding };
            let ours = xs.apply_op3_no_bwd(&weight, &bias, &op).unwrap();
            let reference = xs
                .conv2d(&weight, padding, stride, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, 7, 1, 1)).unwrap())
                .unwrap();
            assert_eq!(
                ours.dims(),
                reference.dims(),
                "{shape:?} k{kernel} s{stride}"
            );
            let difference = crate::engine::test_support::max_abs_difference(&ours, &reference);
            assert!(
                difference < 1e-4,
                "{shape:?} k{kernel} s{stride} p{padding}: {difference}"
            );
        }
    }
}
