//! Init images and masks: fitted to the job's size as AUTOMATIC1111's resize modes do, masks from
//! a black-and-white file or an alpha channel, blurred, canvases extended for outpainting, and the
//! tensors the engine takes.

use candle_core::{Device, Tensor};
use image::imageops::FilterType;
use image::{DynamicImage, GrayImage, Luma, RgbImage};

use super::error::{EngineError, Result};

/// How an init image of another size is fitted to the job's size (A1111's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResizeMode {
    /// Stretch to the size, aspect ratio ignored.
    #[default]
    JustResize,
    /// Scale to cover the size, then cut the overhang evenly from both sides.
    CropAndResize,
    /// Scale to fit inside the size, then fill the rest by extending the edge pixels.
    ResizeAndFill,
}

impl ResizeMode {
    /// Every mode, in menu order.
    pub const ALL: [ResizeMode; 3] = [
        ResizeMode::JustResize,
        ResizeMode::CropAndResize,
        ResizeMode::ResizeAndFill,
    ];

    /// The CLI id, e.g. `crop-and-resize`.
    pub fn id(self) -> &'static str {
        match self {
            ResizeMode::JustResize => "just-resize",
            ResizeMode::CropAndResize => "crop-and-resize",
            ResizeMode::ResizeAndFill => "resize-and-fill",
        }
    }

    /// A1111's name ("Crop and resize").
    pub fn display_name(self) -> &'static str {
        match self {
            ResizeMode::JustResize => "Just resize",
            ResizeMode::CropAndResize => "Crop and resize",
            ResizeMode::ResizeAndFill => "Resize and fill",
        }
    }

    /// Parses a CLI id or A1111's name; the error lists the valid ids.
    pub fn parse(id: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|mode| mode.id() == id || mode.display_name().eq_ignore_ascii_case(id))
            .ok_or_else(|| {
                EngineError::InvalidParameter(format!(
                    "unknown resize mode {id:?}; one of {}",
                    Self::ALL.map(ResizeMode::id).join(", ")
                ))
            })
    }
}

/// `image` fitted to `width` x `height` by `mode` (Lanczos resampling); unchanged when it
/// already has that size.
pub fn fit_init_image(image: &RgbImage, width: u32, height: u32, mode: ResizeMode) -> RgbImage {
    let (w, h) = image.dimensions();
    if (w, h) == (width, height) {
        return image.clone();
    }
    let scaled = |scale: f64| {
        let sw = ((w as f64 * scale).round() as u32).max(1);
        let sh = ((h as f64 * scale).round() as u32).max(1);
        if (sw, sh) == (w, h) {
            return image.clone();
        }
        image::imageops::resize(image, sw, sh, FilterType::Lanczos3)
    };
    match mode {
        ResizeMode::JustResize => {
            image::imageops::resize(image, width, height, FilterType::Lanczos3)
        }
        ResizeMode::CropAndResize => {
            let scale = (width as f64 / w as f64).max(height as f64 / h as f64);
            let cover = scaled(scale);
            let x = (cover.width().saturating_sub(width)) / 2;
            let y = (cover.height().saturating_sub(height)) / 2;
            image::imageops::crop_imm(&cover, x, y, width, height).to_image()
        }
        ResizeMode::ResizeAndFill => {
            let scale = (width as f64 / w as f64).min(height as f64 / h as f64);
            let inside = scaled(scale);
            let x0 = (width.saturating_sub(inside.width())) / 2;
            let y0 = (height.saturating_sub(inside.height())) / 2;
            // Every pixel takes the nearest pixel of the fitted image: the edges extend outward.
            RgbImage::from_fn(width, height, |x, y| {
                let sx = x.saturating_sub(x0).min(inside.width() - 1);
                let sy = y.saturating_sub(y0).min(inside.height() - 1);
                *inside.get_pixel(sx, sy)
            })
        }
    }
}

/// An 8-bit image as the `(1, 3, H, W)` f32 tensor in [0, 1] that image to image takes.
pub fn image_to_tensor(image: &RgbImage, device: &Device) -> Result<Tensor> {
    let (width, height) = image.dimensions();
    let values: Vec<f32> = image.as_raw().iter().map(|&b| b as f32 / 255.0).collect();
    let hwc = Tensor::from_vec(values, (height as usize, width as usize, 3), device)?;
    Ok(hwc.permute((2, 0, 1))?.unsqueeze(0)?.contiguous()?)
}

/// A mask from an image: where its alpha channel is transparent (an image with an erased
/// region), else where it is bright (a black-and-white mask: white is repainted). 255 = repaint.
pub fn mask_from_image(image: &DynamicImage) -> GrayImage {
    let rgba = image.to_rgba8();
    let has_transparency = image.color().has_alpha() && rgba.pixels().any(|p| p[3] < 255);
    if has_transparency {
        GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| {
            Luma([255 - rgba.get_pixel(x, y)[3]])
        })
    } else {
        image.to_luma8()
    }
}

/// `mask` fitted to `width` x `height` (stretched, as the init image is with the same mode,
/// nearest-neighbour so that it stays hard) and blurred by a Gaussian of `blur_sigma` pixels
/// (A1111's "mask blur"; 0 leaves it as it is).
pub fn prepare_mask(
    mask: &GrayImage,
    width: u32,
    height: u32,
    mode: ResizeMode,
    blur_sigma: f32,
) -> GrayImage {
    let as_rgb = DynamicImage::ImageLuma8(mask.clone()).to_rgb8();
    let fitted = if as_rgb.dimensions() == (width, height) {
        mask.clone()
    } else {
        let resized = match mode {
            ResizeMode::JustResize => {
                image::imageops::resize(&as_rgb, width, height, FilterType::Nearest)
            }
            _ => fit_init_image(&as_rgb, width, height, mode),
        };
        DynamicImage::ImageRgb8(resized).to_luma8()
    };
    if blur_sigma > 0.0 {
        image::imageops::blur(&fitted, blur_sigma)
    } else {
        fitted
    }
}

/// A mask as the `(1, 1, H, W)` f32 tensor in [0, 1] that inpainting takes (1 = repaint).
pub fn mask_to_tensor(mask: &GrayImage, device: &Device) -> Result<Tensor> {
    let (width, height) = mask.dimensions();
    let values: Vec<f32> = mask.as_raw().iter().map(|&b| b as f32 / 255.0).collect();
    Ok(Tensor::from_vec(
        values,
        (1, 1, height as usize, width as usize),
        device,
    )?)
}

/// Pixels added on each side of a picture for outpainting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Outpaint {
    /// Added on the left.
    pub left: u32,
    /// Added on top.
    pub top: u32,
    /// Added on the right.
    pub right: u32,
    /// Added at the bottom.
    pub bottom: u32,
}

impl Outpaint {
    /// Parses `L,T,R,B` in pixels.
    pub fn parse(text: &str) -> Result<Self> {
        let values: Vec<u32> = text
            .split(',')
            .map(|v| v.trim().parse::<u32>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| {
                EngineError::InvalidParameter(format!(
                    "outpaint takes LEFT,TOP,RIGHT,BOTTOM in pixels, got {text:?}"
                ))
            })?;
        let [left, top, right, bottom] = values[..] else {
            return Err(EngineError::InvalidParameter(format!(
                "outpaint takes four values LEFT,TOP,RIGHT,BOTTOM, got {text:?}"
            )));
        };
        if left + top + right + bottom == 0 || [left, top, right, bottom].iter().any(|&v| v > 4096)
        {
            return Err(EngineError::InvalidParameter(format!(
                "outpaint adds 1 to 4096 pixels on at least one side, got {text:?}"
            )));
        }
        Ok(Self {
            left,
            top,
            right,
            bottom,
        })
    }

    /// The picture on a larger canvas whose new area repeats the nearest edge pixels (A1111's
    /// "fill"-like start for the new area), and the mask of the new area (255 = repaint).
    pub fn extend(self, image: &RgbImage) -> (RgbImage, GrayImage) {
        let (w, h) = image.dimensions();
        let (width, height) = (w + self.left + self.right, h + self.top + self.bottom);
        let canvas = RgbImage::from_fn(width, height, |x, y| {
            let sx = x.saturating_sub(self.left).min(w - 1);
            let sy = y.saturating_sub(self.top).min(h - 1);
            *image.get_pixel(sx, sy)
        });
        let mask = GrayImage::from_fn(width, height, |x, y| {
            let inside = x >= self.left && x < self.left + w && y >= self.top && y < self.top + h;
            Luma([if inside { 0 } else { 255 }])
        });
        (canvas, mask)
    }
}

/// What the masked region starts from (A1111's "masked content").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MaskedContent {
    /// The picture as it is.
    #[default]
    Original,
    /// The picture's surroundings smeared into the region ([`fill_masked`]).
    Fill,
    /// Fresh noise in the region's latents (the engine's `latent_noise`).
    LatentNoise,
}

impl MaskedContent {
    /// Every choice, in menu order.
    pub const ALL: [MaskedContent; 3] = [
        MaskedContent::Original,
        MaskedContent::Fill,
        MaskedContent::LatentNoise,
    ];

    /// The CLI id.
    pub fn id(self) -> &'static str {
        match self {
            MaskedContent::Original => "original",
            MaskedContent::Fill => "fill",
            MaskedContent::LatentNoise => "noise",
        }
    }

    /// A1111's name, as its infotext writes it.
    pub fn display_name(self) -> &'static str {
        match self {
            MaskedContent::Original => "original",
            MaskedContent::Fill => "fill",
            MaskedContent::LatentNoise => "latent noise",
        }
    }

    /// Parses a CLI id or A1111's name; the error lists the valid ids.
    pub fn parse(id: &str) -> Result<Self> {
        let id = id.trim();
        let known = |m: &MaskedContent| m.id() == id || m.display_name().eq_ignore_ascii_case(id);
        Self::ALL.into_iter().find(known).ok_or_else(|| {
            EngineError::InvalidParameter(format!(
                "unknown masked content {id:?}; one of {}",
                Self::ALL.map(MaskedContent::id).join(", ")
            ))
        })
    }
}

/// `image` with the region where `mask` >= 128 filled from its surroundings: a push-pull fill
/// (the known pixels averaged over ever coarser grids, then each masked pixel takes the finest
/// average that reaches it), the smooth colour wash A1111's "fill" starts from.
pub fn fill_masked(image: &RgbImage, mask: &GrayImage) -> RgbImage {
    let (width, height) = image.dimensions();
    // Level 0: known pixels with weight 1, masked ones with weight 0.
    let mut levels: Vec<(u32, u32, Vec<[f32; 4]>)> = vec![(
        width,
        height,
        image
            .pixels()
            .zip(mask.pixels())
            .map(|(p, m)| {
                let w = if m[0] >= 128 { 0.0 } else { 1.0 };
                [p[0] as f32 * w, p[1] as f32 * w, p[2] as f32 * w, w]
            })
            .collect(),
    )];
    while let Some((w, h, cells)) = levels.last().filter(|(w, h, _)| *w > 1 || *h > 1) {
        let (nw, nh) = (w.div_ceil(2), h.div_ceil(2));
        let mut next = vec![[0.0f32; 4]; (nw * nh) as usize];
        for y in 0..*h {
            for x in 0..*w {
                let cell = cells[(y * w + x) as usize];
                let target = &mut next[((y / 2) * nw + x / 2) as usize];
                for c in 0..4 {
                    target[c] += cell[c];
                }
            }
        }
        levels.push((nw, nh, next));
    }
    let colour_at = |x: u32, y: u32| -> [f32; 3] {
        for (level, (w, _, cells)) in levels.iter().enumerate() {
            let cell = cells[((y >> level) * w + (x >> level)) as usize];
            if cell[3] > 0.0 {
                return [cell[0] / cell[3], cell[1] / cell[3], cell[2] / cell[3]];
            }
        }
        [127.0; 3]
    };
    RgbImage::from_fn(width, height, |x, y| {
        if mask.get_pixel(x, y)[0] >= 128 {
            let c = colour_at(x, y);
            image::Rgb(c.map(|v| v.round().clamp(0.0, 255.0) as u8))
        } else {
            *image.get_pixel(x, y)
        }
    })
}

/// A box `(x, y, width, height)` in pixels.
pub type Region = (u32, u32, u32, u32);

/// A1111's "only masked" region: the mask's bounding box grown by `padding` pixels on every
/// side, then widened or heightened to the job's aspect ratio `width` : `height`, within the
/// picture. `None` when the mask is empty.
pub fn masked_region(mask: &GrayImage, padding: u32, width: u32, height: u32) -> Option<Region> {
    let (image_width, image_height) = mask.dimensions();
    let mut bounds: Option<(u32, u32, u32, u32)> = None;
    for (x, y, p) in mask.enumerate_pixels() {
        if p[0] >= 128 {
            bounds = Some(match bounds {
                None => (x, y, x, y),
                Some((x0, y0, x1, y1)) => (x0.min(x), y0.min(y), x1.max(x), y1.max(y)),
            });
        }
    }
    let (x0, y0, x1, y1) = bounds?;
    let mut x0 = x0.saturating_sub(padding) as f64;
    let mut y0 = y0.saturating_sub(padding) as f64;
    let mut x1 = (x1 + 1 + padding).min(image_width) as f64;
    let mut y1 = (y1 + 1 + padding).min(image_height) as f64;
    let ratio = width as f64 / height as f64;
    let (w, h) = (x1 - x0, y1 - y0);
    if w / h < ratio {
        let grow = (h * ratio - w) / 2.0;
        x0 -= grow;
        x1 += grow;
    } else {
        let grow = (w / ratio - h) / 2.0;
        y0 -= grow;
        y1 += grow;
    }
    // Shift back inside the picture, then clip what still does not fit.
    let shift = |low: &mut f64, high: &mut f64, limit: f64| {
        if *low < 0.0 {
            *high -= *low;
            *low = 0.0;
        }
        if *high > limit {
            *low = (*low - (*high - limit)).max(0.0);
            *high = limit;
        }
    };
    shift(&mut x0, &mut x1, image_width as f64);
    shift(&mut y0, &mut y1, image_height as f64);
    let (x, y) = (x0.round() as u32, y0.round() as u32);
    let region_width = (x1.round() as u32).saturating_sub(x).max(1);
    let region_height = (y1.round() as u32).saturating_sub(y).max(1);
    Some((x, y, region_width, region_height))
}

/// Pastes `result` (the inpainted crop, any size) back into `original` over `region`, blending
/// by `mask` (the whole picture's, blurred: a feathered edge): the picture outside the mask is
/// kept exactly.
pub fn paste_back(
    original: &RgbImage,
    result: &RgbImage,
    region: Region,
    mask: &GrayImage,
) -> RgbImage {
    let (x, y, width, height) = region;
    let fitted = if result.dimensions() == (width, height) {
        result.clone()
    } else {
        image::imageops::resize(result, width, height, FilterType::Lanczos3)
    };
    let mut out = original.clone();
    for (dx, dy, p) in fitted.enumerate_pixels() {
        let (px, py) = (x + dx, y + dy);
        let alpha = mask.get_pixel(px, py)[0] as f32 / 255.0;
        let old = out.get_pixel(px, py);
        let blended = image::Rgb(std::array::from_fn(|c| {
            (old[c] as f32 * (1.0 - alpha) + p[c] as f32 * alpha).round() as u8
        }));
        out.put_pixel(px, py, blended);
    }
    out
}

/// How the first pass of a hires fix is enlarged before the second (A1111's upscaler names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HiresUpscaler {
    /// "Latent": the latents, bilinear.
    Latent,
    /// "Latent (nearest)": the latents, nearest neighbour.
    LatentNearest,
    /// "Lanczos": the decoded image, Lanczos; encoded again for the second pass.
    Lanczos,
}

impl HiresUpscaler {
    /// Every upscaler, in menu order.
    pub const ALL: [HiresUpscaler; 3] = [
        HiresUpscaler::Latent,
        HiresUpscaler::LatentNearest,
        HiresUpscaler::Lanczos,
    ];

    /// The CLI id.
    pub fn id(self) -> &'static str {
        match self {
            HiresUpscaler::Latent => "latent",
            HiresUpscaler::LatentNearest => "latent-nearest",
            HiresUpscaler::Lanczos => "lanczos",
        }
    }

    /// A1111's name, as its infotext writes it.
    pub fn display_name(self) -> &'static str {
        match self {
            HiresUpscaler::Latent => "Latent",
            HiresUpscaler::LatentNearest => "Latent (nearest)",
            HiresUpscaler::Lanczos => "Lanczos",
        }
    }

    /// Parses a CLI id or A1111's name; the error lists the valid ids.
    pub fn parse(id: &str) -> Result<Self> {
        let id = id.trim();
        let known = |u: &HiresUpscaler| u.id() == id || u.display_name().eq_ignore_ascii_case(id);
        Self::ALL.into_iter().find(known).ok_or_else(|| {
            EngineError::InvalidParameter(format!(
                "unknown hires upscaler {id:?}; one of {}",
                Self::ALL.map(HiresUpscaler::id).join(", ")
            ))
        })
    }
}

/// `(b, c, h, w)` latents resized to `(b, c, height, width)`: bilinear as PyTorch's
/// `interpolate(mode="bilinear", align_corners=False)`, or nearest as `mode="nearest"`.
pub fn resize_latents(
    latents: &Tensor,
    height: usize,
    width: usize,
    bilinear: bool,
) -> Result<Tensor> {
    let (_, _, in_height, in_width) = latents.dims4()?;
    let along = |xs: &Tensor, dim: usize, input: usize, output: usize| -> Result<Tensor> {
        let scale = input as f32 / output as f32;
        if !bilinear {
            let picked: Vec<u32> = (0..output)
                .map(|j| ((j as f32 * scale).floor() as usize).min(input - 1) as u32)
                .collect();
            return Ok(xs.index_select(&Tensor::new(picked, xs.device())?, dim)?);
        }
        let mut low = Vec::with_capacity(output);
        let mut high = Vec::with_capacity(output);
        let mut weight = Vec::with_capacity(output);
        for j in 0..output {
            let source = ((j as f32 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (source.floor() as usize).min(input - 1);
            low.push(i0 as u32);
            high.push((i0 + 1).min(input - 1) as u32);
            weight.push(source - i0 as f32);
        }
        let a = xs.index_select(&Tensor::new(low, xs.device())?, dim)?;
        let b = xs.index_select(&Tensor::new(high, xs.device())?, dim)?;
        let mut shape = vec![1usize; 4];
        shape[dim] = output;
        let w = Tensor::new(weight, xs.device())?.reshape(shape)?;
        Ok((&a + (b - &a)?.broadcast_mul(&w)?)?)
    };
    let tall = along(latents, 2, in_height, height)?;
    along(&tall, 3, in_width, width)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, 7])
        })
    }

    #[test]
    fn every_mode_gives_the_size_asked_for() {
        let wide = gradient(40, 20);
        for mode in ResizeMode::ALL {
            assert_eq!(fit_init_image(&wide, 16, 16, mode).dimensions(), (16, 16));
            assert_eq!(fit_init_image(&wide, 30, 10, mode).dimensions(), (30, 10));
        }
        assert_eq!(
            ResizeMode::parse("crop-and-resize").ok(),
            Some(ResizeMode::CropAndResize)
        );
        assert!(ResizeMode::parse("stretch").is_err());
    }

    #[test]
    fn crop_keeps_the_centre_and_fill_extends_the_edges() {
        let wide = gradient(40, 20);
        // Crop: a 20x20 square from the middle of the 40x20 image (no scaling needed).
        let cropped = fit_init_image(&wide, 20, 20, ResizeMode::CropAndResize);
        assert_eq!(cropped.get_pixel(0, 0), wide.get_pixel(10, 0));
        // Fill: the 40x20 image scaled to 20x10 in the middle of 20x20; the top rows repeat the
        // fitted image's first row.
        let filled = fit_init_image(&wide, 20, 20, ResizeMode::ResizeAndFill);
        assert_eq!(filled.get_pixel(7, 0), filled.get_pixel(7, 5));
        assert_eq!(filled.get_pixel(7, 19), filled.get_pixel(7, 14));
    }

    #[test]
    fn the_tensor_is_channels_first_in_zero_to_one() {
        let image = gradient(4, 2);
        let tensor = image_to_tensor(&image, &Device::Cpu).expect("tensor");
        assert_eq!(tensor.dims(), &[1, 3, 2, 4]);
        let red: Vec<f32> = tensor
            .narrow(1, 0, 1)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("values");
        assert_eq!(red[1], image.get_pixel(1, 0)[0] as f32 / 255.0);
    }

    #[test]
    fn masks_come_from_alpha_or_brightness() {
        let mut rgba = image::RgbaImage::from_pixel(4, 2, image::Rgba([10, 20, 30, 255]));
        rgba.put_pixel(1, 1, image::Rgba([10, 20, 30, 0]));
        let mask = mask_from_image(&DynamicImage::ImageRgba8(rgba));
        assert_eq!(mask.get_pixel(1, 1)[0], 255);
        assert_eq!(mask.get_pixel(0, 0)[0], 0);
        let mut bw = GrayImage::new(4, 2);
        bw.put_pixel(3, 0, Luma([255]));
        let mask = mask_from_image(&DynamicImage::ImageLuma8(bw));
        assert_eq!((mask.get_pixel(3, 0)[0], mask.get_pixel(0, 0)[0]), (255, 0));
        let blurred = prepare_mask(&mask, 8, 4, ResizeMode::JustResize, 1.0);
        assert_eq!(blurred.dimensions(), (8, 4));
        assert!(blurred.get_pixel(5, 0)[0] > 0 && blurred.get_pixel(5, 0)[0] < 255);
    }

    #[test]
    fn outpainting_extends_the_canvas_and_masks_the_new_area() {
        let image = gradient(4, 2);
        let outpaint = Outpaint::parse("2,0,1,3").expect("parses");
        let (canvas, mask) = outpaint.extend(&image);
        assert_eq!(canvas.dimensions(), (7, 5));
        assert_eq!(canvas.get_pixel(0, 0), image.get_pixel(0, 0));
        assert_eq!(canvas.get_pixel(2, 1), image.get_pixel(0, 1));
        assert_eq!(canvas.get_pixel(6, 4), image.get_pixel(3, 1));
        assert_eq!((mask.get_pixel(2, 0)[0], mask.get_pixel(1, 0)[0]), (0, 255));
        assert_eq!(mask.get_pixel(3, 2)[0], 255);
        assert!(Outpaint::parse("1,2,3").is_err());
        assert!(Outpaint::parse("0,0,0,0").is_err());
    }

    #[test]
    fn latents_resize_as_pytorch_interpolates() {
        // 1x1x2x2 [[0, 1], [2, 3]] doubled: bilinear (align_corners=False) gives
        // [0, 0.25, 0.75, 1] on the first row, as torch does.
        let x = Tensor::new(&[0.0f32, 1.0, 2.0, 3.0], &Device::Cpu)
            .and_then(|t| t.reshape((1, 1, 2, 2)))
            .expect("tensor");
        let up = resize_latents(&x, 4, 4, true).expect("bilinear");
        let rows: Vec<Vec<f32>> = up
            .squeeze(0)
            .and_then(|t| t.squeeze(0))
            .and_then(|t| t.to_vec2())
            .expect("rows");
        assert_eq!(rows[0], vec![0.0, 0.25, 0.75, 1.0]);
        assert_eq!(rows[1], vec![0.5, 0.75, 1.25, 1.5]);
        let near = resize_latents(&x, 4, 4, false).expect("nearest");
        let rows: Vec<Vec<f32>> = near
            .squeeze(0)
            .and_then(|t| t.squeeze(0))
            .and_then(|t| t.to_vec2())
            .expect("rows");
        assert_eq!(rows[3], vec![2.0, 2.0, 3.0, 3.0]);
        assert!(HiresUpscaler::parse("esrgan").is_err());
    }

    #[test]
    fn fill_washes_the_surroundings_into_the_hole() {
        let image = RgbImage::from_fn(8, 8, |x, _| {
            image::Rgb([if x < 4 { 200 } else { 20 }, 0, 0])
        });
        let mask = GrayImage::from_fn(8, 8, |x, y| {
            Luma([if (2..6).contains(&x) && (2..6).contains(&y) {
                255
            } else {
                0
            }])
        });
        let filled = fill_masked(&image, &mask);
        assert_eq!(filled.get_pixel(0, 0), image.get_pixel(0, 0));
        // Each side of the hole takes the colour of the picture beside it.
        assert_eq!(filled.get_pixel(2, 3)[0], 200);
        assert_eq!(filled.get_pixel(5, 3)[0], 20);
        assert!(MaskedContent::parse("nothing").is_err());
    }

    #[test]
    fn only_masked_crops_around_the_mask_at_the_jobs_aspect_and_pastes_back() {
        let mask = GrayImage::from_fn(100, 60, |x, y| {
            Luma([if (40..50).contains(&x) && (20..30).contains(&y) {
                255
            } else {
                0
            }])
        });
        let region = masked_region(&mask, 5, 64, 32).expect("a region");
        let (x, y, w, h) = region;
        assert!(
            x <= 35 && y <= 15 && x + w >= 55 && y + h >= 35,
            "{region:?}"
        );
        assert!(((w as f64 / h as f64) - 2.0).abs() < 0.1, "{region:?}");
        assert!(x + w <= 100 && y + h <= 60);
        assert_eq!(masked_region(&GrayImage::new(10, 10), 5, 8, 8), None);
        let original = RgbImage::from_pixel(100, 60, image::Rgb([9, 9, 9]));
        let result = RgbImage::from_pixel(64, 32, image::Rgb([250, 250, 250]));
        let pasted = paste_back(&original, &result, region, &mask);
        assert_eq!(pasted.get_pixel(45, 25)[0], 250);
        assert_eq!(pasted.get_pixel(0, 0)[0], 9);
        assert_eq!(pasted.get_pixel(x, y)[0], 9, "outside the mask stays");
    }
}
