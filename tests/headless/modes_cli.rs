//! `atelier generate` in every mode from the command line: inpainting with a black-and-white or
//! alpha mask, outpainting, and the hires fix, on the SD 1.x fixtures (CPU).
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use crate::common;

use std::path::Path;
use std::process::{Command, Output};

use atelier::gallery::metadata::{A1111Parameters, read_png_text};
use common::*;
use image::{GrayImage, Luma, RgbImage};

fn photo() -> RgbImage {
    RgbImage::from_fn(64, 48, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 5) as u8, ((x + y) * 2) as u8])
    })
}

fn generate(model: &str, args: &[&str], out: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_atelier"))
        .args(["generate", "--model"])
        .arg(model_dir(model))
        .args([
            "--prompt", "a fox", "--steps", "6", "--device", "cpu", "--seed", "5",
        ])
        .args(args)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

fn ok(output: &Output) {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn parameters(path: &Path) -> A1111Parameters {
    A1111Parameters::parse(&read_png_text(path).unwrap()["parameters"])
}

/// Mean absolute difference per channel over the pixels where `inside(x, y)`.
fn difference(a: &RgbImage, b: &RgbImage, inside: impl Fn(u32, u32) -> bool) -> f64 {
    let (mut total, mut count) = (0.0, 0usize);
    for (x, y, p) in a.enumerate_pixels() {
        if inside(x, y) {
            let q = b.get_pixel(x, y);
            total += (0..3)
                .map(|c| (p[c] as f64 - q[c] as f64).abs())
                .sum::<f64>();
            count += 3;
        }
    }
    total / count as f64
}

#[test]
fn inpainting_repaints_the_masked_region_from_a_file_or_an_alpha_channel() {
    let dir = tempfile::tempdir().unwrap();
    let photo_path = dir.path().join("photo.png");
    photo().save(&photo_path).unwrap();
    // The right half is white: repaint it.
    let in_mask = |x: u32, _y: u32| x >= 32;
    let mask = GrayImage::from_fn(64, 48, |x, y| Luma([if in_mask(x, y) { 255 } else { 0 }]));
    let mask_path = dir.path().join("mask.png");
    mask.save(&mask_path).unwrap();
    // The other half, for comparison: the mask decides what is made. (What is made is checked
    // against diffusers in tests/headless/inpaint.rs; random weights keep nothing recognisable here.)
    let other_mask = GrayImage::from_fn(64, 48, |x, y| Luma([if in_mask(x, y) { 0 } else { 255 }]));
    let other_path = dir.path().join("other.png");
    other_mask.save(&other_path).unwrap();
    for model in ["sd1-inpaint", "sd1"] {
        let mut made = Vec::new();
        for (name, mask) in [("right", &mask_path), ("left", &other_path)] {
            let out = dir.path().join(format!("{model}-{name}.png"));
            let output = generate(
                model,
                &[
                    "--init-image",
                    photo_path.to_str().unwrap(),
                    "--mask",
                    mask.to_str().unwrap(),
                    "--strength",
                    "1",
                    "--mask-blur",
                    "0",
                ],
                &out,
            );
            ok(&output);
            let params = parameters(&out);
            assert_eq!(params.get("Mask blur"), Some("0"));
            assert_eq!(params.get("Denoising strength"), Some("1"));
            made.push(image::open(&out).unwrap().to_rgb8());
        }
        assert_eq!(made[0].dimensions(), (64, 48));
        assert!(
            difference(&made[0], &made[1], |_, _| true) > 1.0,
            "{model}: the mask changes nothing"
        );
    }
    // The same region as transparency in the photo itself.
    let mut rgba = image::DynamicImage::ImageRgb8(photo()).to_rgba8();
    for (x, _, p) in rgba.enumerate_pixels_mut() {
        if in_mask(x, 0) {
            p[3] = 0;
        }
    }
    let erased = dir.path().join("erased.png");
    rgba.save(&erased).unwrap();
    let from_alpha = dir.path().join("alpha.png");
    ok(&generate(
        "sd1-inpaint",
        &[
            "--init-image",
            photo_path.to_str().unwrap(),
            "--mask",
            erased.to_str().unwrap(),
            "--strength",
            "1",
            "--mask-blur",
            "0",
        ],
        &from_alpha,
    ));
    assert_eq!(
        image::open(&from_alpha).unwrap().to_rgb8(),
        image::open(dir.path().join("sd1-inpaint-right.png"))
            .unwrap()
            .to_rgb8(),
        "an alpha mask is the same mask"
    );
    // An empty mask is refused before the model loads.
    let empty = dir.path().join("empty.png");
    GrayImage::new(64, 48).save(&empty).unwrap();
    let output = generate(
        "sd1",
        &[
            "--init-image",
            photo_path.to_str().unwrap(),
            "--mask",
            empty.to_str().unwrap(),
        ],
        &dir.path().join("x.png"),
    );
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("the mask is empty"));
    let output = generate(
        "sd1",
        &["--mask", mask_path.to_str().unwrap()],
        &dir.path().join("x.png"),
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("--mask needs --init-image"));
}

#[test]
fn outpainting_extends_the_canvas() {
    let dir = tempfile::tempdir().unwrap();
    let photo_path = dir.path().join("photo.png");
    photo().save(&photo_path).unwrap();
    let out = dir.path().join("wider.png");
    ok(&generate(
        "sd1-inpaint",
        &[
            "--init-image",
            photo_path.to_str().unwrap(),
            "--outpaint",
            "16,0,16,0",
        ],
        &out,
    ));
    let made = image::open(&out).unwrap().to_rgb8();
    assert_eq!(made.dimensions(), (96, 48));
    // The old picture stays (near) where it was; the new strips are painted.
    let shifted = RgbImage::from_fn(96, 48, |x, y| {
        *photo().get_pixel(x.saturating_sub(16).min(63), y)
    });
    let old = difference(&made, &shifted, |x, _| (20..76).contains(&x));
    let new = difference(&made, &shifted, |x, _| !(12..84).contains(&x));
    assert!(new > old, "new strips {new:.1} vs old picture {old:.1}");
    assert_eq!(parameters(&out).get("Denoising strength"), Some("1"));
    let output = generate(
        "sd1",
        &[
            "--init-image",
            photo_path.to_str().unwrap(),
            "--outpaint",
            "1,2,3",
        ],
        &dir.path().join("x.png"),
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("four values"));
}

#[test]
fn the_hires_fix_renders_a_second_larger_pass() {
    let dir = tempfile::tempdir().unwrap();
    for upscaler in ["latent", "latent-nearest", "lanczos"] {
        let out = dir.path().join(format!("{upscaler}.png"));
        ok(&generate(
            "sd1",
            &[
                "--width",
                "32",
                "--height",
                "24",
                "--hires-scale",
                "2",
                "--hires-steps",
                "3",
                "--hires-strength",
                "0.5",
                "--hires-upscaler",
                upscaler,
            ],
            &out,
        ));
        assert_eq!(image::open(&out).unwrap().to_rgb8().dimensions(), (64, 48));
        let params = parameters(&out);
        assert_eq!(params.get("Hires upscale"), Some("2"));
        assert_eq!(params.get("Hires steps"), Some("3"));
        assert_eq!(params.get("Denoising strength"), Some("0.5"));
        assert!(params.get("Hires upscaler").is_some());
    }
    let output = generate("sd1", &["--hires-scale", "9"], &dir.path().join("x.png"));
    assert!(String::from_utf8_lossy(&output.stderr).contains("at most 4"));
    let output = generate(
        "sd1",
        &["--hires-scale", "2", "--hires-upscaler", "esrgan"],
        &dir.path().join("x.png"),
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown hires upscaler"));
}

#[test]
fn only_masked_works_on_a_crop_and_keeps_the_rest_of_the_picture() {
    let dir = tempfile::tempdir().unwrap();
    // A larger picture with a small hole: the job runs at 32x32 around it.
    // The hole holds something unlike its surroundings (white), which "fill" replaces.
    let hole = |x: u32, y: u32| (40..52).contains(&x) && (30..42).contains(&y);
    let big = RgbImage::from_fn(96, 80, |x, y| {
        if hole(x, y) {
            image::Rgb([255, 255, 255])
        } else {
            image::Rgb([(x * 2) as u8, (y * 3) as u8, 90])
        }
    });
    let big_path = dir.path().join("big.png");
    big.save(&big_path).unwrap();
    let mask = GrayImage::from_fn(96, 80, |x, y| Luma([if hole(x, y) { 255 } else { 0 }]));
    let mask_path = dir.path().join("hole.png");
    mask.save(&mask_path).unwrap();
    let mut made = Vec::new();
    for content in ["original", "fill", "noise"] {
        let out = dir.path().join(format!("{content}.png"));
        ok(&generate(
            "sd1",
            &[
                "--init-image",
                big_path.to_str().unwrap(),
                "--mask",
                mask_path.to_str().unwrap(),
                "--inpaint-area",
                "masked",
                "--inpaint-padding",
                "8",
                "--width",
                "32",
                "--height",
                "32",
                "--masked-content",
                content,
                "--strength",
                "0.35",
            ],
            &out,
        ));
        let image = image::open(&out).unwrap().to_rgb8();
        assert_eq!(image.dimensions(), (96, 80), "the whole picture comes back");
        // Beyond the blur's reach the picture is exactly as it was.
        let far = |x: u32, y: u32| !(28..64).contains(&x) || !(18..54).contains(&y);
        assert_eq!(difference(&image, &big, far), 0.0, "{content}");
        assert!(
            difference(&image, &big, hole) > 1.0,
            "{content}: the hole is repainted"
        );
        let params = parameters(&out);
        assert_eq!(params.get("Inpaint area"), Some("Only masked"));
        assert_eq!(params.get("Masked area padding"), Some("8"));
        made.push(image);
    }
    assert_eq!(
        parameters(&dir.path().join("noise.png")).get("Masked content"),
        Some("latent noise")
    );
    assert!(
        difference(&made[0], &made[1], hole) > 2.0,
        "fill starts from something else"
    );
    assert!(
        difference(&made[0], &made[2], hole) > 2.0,
        "latent noise starts from something else"
    );
    let output = generate(
        "sd1",
        &[
            "--init-image",
            big_path.to_str().unwrap(),
            "--inpaint-area",
            "masked",
        ],
        &dir.path().join("x.png"),
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("need a mask"));
}

#[test]
fn sixteen_bit_and_grey_pictures_are_taken_as_they_are() {
    let dir = tempfile::tempdir().unwrap();
    // A 16-bit RGB PNG as the picture, a 16-bit grey PNG as the mask, of another size.
    let deep: image::ImageBuffer<image::Rgb<u16>, Vec<u16>> =
        image::ImageBuffer::from_fn(80, 60, |x, y| {
            image::Rgb([(x * 800) as u16, (y * 1000) as u16, 30000])
        });
    let deep_path = dir.path().join("deep.png");
    deep.save(&deep_path).unwrap();
    let grey: image::ImageBuffer<Luma<u16>, Vec<u16>> =
        image::ImageBuffer::from_fn(80, 60, |x, _| Luma([if x > 40 { 65535 } else { 0 }]));
    let grey_path = dir.path().join("grey.png");
    grey.save(&grey_path).unwrap();
    let out = dir.path().join("out.png");
    ok(&generate(
        "sd1",
        &[
            "--init-image",
            deep_path.to_str().unwrap(),
            "--mask",
            grey_path.to_str().unwrap(),
            "--width",
            "64",
            "--height",
            "48",
        ],
        &out,
    ));
    assert_eq!(image::open(&out).unwrap().to_rgb8().dimensions(), (64, 48));
}

#[test]
fn keep_unmasked_pastes_the_picture_back_outside_the_mask() {
    let dir = tempfile::tempdir().unwrap();
    let photo_path = dir.path().join("photo.png");
    photo().save(&photo_path).unwrap();
    let in_mask = |x: u32, _y: u32| x >= 32;
    let mask = GrayImage::from_fn(64, 48, |x, y| Luma([if in_mask(x, y) { 255 } else { 0 }]));
    let mask_path = dir.path().join("mask.png");
    mask.save(&mask_path).unwrap();
    let mut made = Vec::new();
    for keep in [false, true] {
        let out = dir.path().join(format!("keep-{keep}.png"));
        let mut args = vec![
            "--init-image",
            photo_path.to_str().unwrap(),
            "--mask",
            mask_path.to_str().unwrap(),
            "--strength",
            "0.8",
            "--mask-blur",
            "0",
        ];
        if keep {
            args.push("--keep-unmasked");
        }
        ok(&generate("sd1", &args, &out));
        made.push(image::open(&out).unwrap().to_rgb8());
    }
    let kept = |x: u32, y: u32| !in_mask(x, y);
    // diffusers' output: every pixel went through the (random) VAE.
    assert!(difference(&made[0], &photo(), kept) > 5.0);
    // A1111's: outside the mask, the picture exactly; inside, the same repaint.
    assert_eq!(difference(&made[1], &photo(), kept), 0.0);
    assert_eq!(difference(&made[1], &made[0], in_mask), 0.0);
    // Without a mask there is nothing to keep.
    let out = dir.path().join("no-mask.png");
    let output = generate("sd1", &["--keep-unmasked"], &out);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--keep-unmasked"));
}
