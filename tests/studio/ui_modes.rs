//! The window's modes, headless: painting a mask, each mode's controls reaching the job, the
//! gallery keeping what redoes an image, and comparisons of a picture's strengths.
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use crate::window;

use atelier::engine::init_image::{HiresUpscaler, MaskedContent, ResizeMode};
use atelier::ui::UiCommand;
use egui::{Event, Modifiers, PointerButton, Pos2, Rect, Role, Vec2};
use egui_kittest::kittest::Queryable;
use image::{GrayImage, Luma, Rgb, RgbImage};
use window::{Fixture, settings, start, start_real};

/// A picture outside the library folder (which the gallery indexes), given to the Studio tab.
fn open_picture(f: &mut Fixture, folder: &std::path::Path, width: u32, height: u32) {
    let path = folder.join("photo.png");
    RgbImage::from_fn(width, height, |x, y| {
        Rgb([(x % 256) as u8, (y % 256) as u8, 90])
    })
    .save(&path)
    .unwrap();
    f.harness
        .state_mut()
        .apply_for_test(UiCommand::SetInitImage(path));
    f.wait_for("the picture", |app| app.init_image.is_some());
}

/// Where the picture sits in the mask canvas (fitted and centred, as the painter draws it
/// before any zoom or pan).
fn picture_on_screen(f: &Fixture) -> Rect {
    let canvas = f.harness.get_by_label("Mask canvas").rect();
    let (width, height) = f.app().init_image.as_ref().unwrap().image.dimensions();
    let size = Vec2::new(width as f32, height as f32);
    let zoom = (canvas.width() / size.x).min(canvas.height() / size.y);
    Rect::from_center_size(canvas.center() + f.app().mask_editor.pan, size * zoom)
}

/// The screen position of picture pixel (`x`, `y`).
fn screen_of(f: &Fixture, x: f32, y: f32) -> Pos2 {
    let rect = picture_on_screen(f);
    let (width, _) = f.app().init_image.as_ref().unwrap().image.dimensions();
    let zoom = rect.width() / width as f32;
    rect.min + Vec2::new(x, y) * zoom
}

/// Drags with `button` through `points` (screen positions), a frame per move.
fn drag(f: &mut Fixture, button: PointerButton, points: &[Pos2]) {
    let press = |pos: Pos2, pressed: bool| Event::PointerButton {
        pos,
        button,
        pressed,
        modifiers: Modifiers::NONE,
    };
    f.harness
        .input_mut()
        .events
        .push(Event::PointerMoved(points[0]));
    f.harness.step();
    f.harness.input_mut().events.push(press(points[0], true));
    f.harness.step();
    for &point in &points[1..] {
        f.harness
            .input_mut()
            .events
            .push(Event::PointerMoved(point));
        f.harness.step();
    }
    let last = *points.last().unwrap();
    f.harness.input_mut().events.push(press(last, false));
    f.harness.step();
    f.harness.step();
}

/// Opens the combo box labelled `label` and picks `option`.
fn pick(f: &mut Fixture, label: &str, option: &str) {
    f.harness
        .get_by_role_and_label(Role::ComboBox, label)
        .click();
    f.harness.step();
    f.harness.step();
    f.click(option);
}

fn mask_pixel(f: &Fixture, x: u32, y: u32) -> u8 {
    f.app()
        .init_image
        .as_ref()
        .unwrap()
        .mask
        .as_ref()
        .unwrap()
        .mask()
        .get_pixel(x, y)[0]
}

#[test]
fn painting_a_mask_brush_eraser_undo_invert_clear_zoom_and_pan() {
    let mut f = start(settings(), false, false, None);
    let outside = tempfile::tempdir().unwrap();
    open_picture(&mut f, outside.path(), 200, 100);
    // Generating with an empty mask explains and queues nothing.
    f.click("Paint mask…");
    assert!(f.app().mask_editor.open);
    f.click("Done");
    assert!(!f.app().mask_editor.open);
    f.click("Generate");
    assert!(
        f.app()
            .error
            .as_ref()
            .unwrap()
            .message
            .contains("mask is empty")
    );
    assert!(f.jobs().is_empty());

    f.click("Edit mask…");
    f.set_slider("Brush size", 6.0);
    f.harness.step();
    assert_eq!(f.app().mask_editor.brush_radius_px, 6.0);
    // A stroke along the middle, from x 20 to x 180.
    let stroke: Vec<Pos2> = (0..=8)
        .map(|k| screen_of(&f, 20.0 + 20.0 * k as f32, 50.0))
        .collect();
    drag(&mut f, PointerButton::Primary, &stroke);
    assert_eq!(mask_pixel(&f, 100, 50), 255, "painted along the stroke");
    assert_eq!(mask_pixel(&f, 100, 54), 255, "within the brush radius");
    assert_eq!(mask_pixel(&f, 100, 60), 0, "beyond the brush radius");
    assert_eq!(mask_pixel(&f, 5, 50), 0, "before the stroke");
    // The eraser takes part of it back.
    f.click("Eraser");
    let erase = [screen_of(&f, 95.0, 50.0), screen_of(&f, 105.0, 50.0)];
    drag(&mut f, PointerButton::Primary, &erase);
    assert_eq!(mask_pixel(&f, 100, 50), 0);
    assert_eq!(mask_pixel(&f, 60, 50), 255);
    // Undo brings the erased part back; invert swaps; clear empties; undo again.
    f.click("Undo");
    assert_eq!(mask_pixel(&f, 100, 50), 255);
    f.click("Invert");
    assert_eq!(mask_pixel(&f, 100, 50), 0);
    assert_eq!(mask_pixel(&f, 5, 5), 255);
    f.click("Clear mask");
    assert!(
        f.app()
            .init_image
            .as_ref()
            .unwrap()
            .mask
            .as_ref()
            .unwrap()
            .is_empty()
    );
    f.click("Undo");
    f.click("Undo");
    assert_eq!(mask_pixel(&f, 100, 50), 255);
    assert_eq!(mask_pixel(&f, 5, 5), 0);
    // Zoom in with the button and the wheel; pan with a right drag; the brush still lands
    // where the pointer is.
    f.click("+");
    let zoom = f.app().mask_editor.zoom.unwrap();
    let middle = screen_of(&f, 100.0, 50.0);
    f.harness
        .input_mut()
        .events
        .push(Event::PointerMoved(middle));
    f.harness.step();
    f.harness.input_mut().events.push(Event::MouseWheel {
        unit: egui::MouseWheelUnit::Point,
        delta: Vec2::new(0.0, 120.0),
        phase: egui::TouchPhase::Move,
        source: egui::MouseWheelSource::Unknown,
        modifiers: Modifiers::NONE,
    });
    for _ in 0..20 {
        f.harness.step();
    }
    assert!(
        f.app().mask_editor.zoom.unwrap() > zoom,
        "the wheel zooms in"
    );
    let canvas = f.harness.get_by_label("Mask canvas").rect();
    let pan_before = f.app().mask_editor.pan;
    drag(
        &mut f,
        PointerButton::Secondary,
        &[canvas.center(), canvas.center() + Vec2::new(40.0, 10.0)],
    );
    let moved = f.app().mask_editor.pan - pan_before;
    assert!(
        moved.x > 20.0 && moved.y > 5.0,
        "a right drag pans: {moved:?}"
    );
    f.click("Fit");
    assert_eq!(f.app().mask_editor.zoom, None);
    f.click("Brush");
    let dab = [screen_of(&f, 190.0, 10.0), screen_of(&f, 190.0, 10.0)];
    drag(&mut f, PointerButton::Primary, &dab);
    assert_eq!(mask_pixel(&f, 190, 10), 255);
    // The painted mask is the job's.
    f.click("Done");
    f.click("Generate");
    f.wait_for_jobs(1);
    let seen = f.seen.lock().unwrap();
    let job = seen.images[0].as_ref().unwrap();
    let mask = job.mask.as_ref().unwrap();
    assert_eq!(mask.dimensions(), (200, 100));
    assert_eq!(mask.get_pixel(100, 50)[0], 255);
    assert_eq!(mask.get_pixel(5, 5)[0], 0);
    assert!(job.is_inpainting());
}

#[test]
fn a_picture_wider_than_the_gpu_takes_is_shown_scaled_and_painted_at_full_size() {
    let mut f = start(settings(), false, false, None);
    let outside = tempfile::tempdir().unwrap();
    // Wider than any GPU texture (8192, or egui's default 2048): shown scaled, never a panic.
    let max_side = f.harness.ctx.input(|input| input.max_texture_side);
    assert!(max_side < 9000, "the harness allows {max_side}");
    open_picture(&mut f, outside.path(), 9000, 60);
    f.click("Paint mask…");
    let stroke = [screen_of(&f, 4000.0, 30.0), screen_of(&f, 5000.0, 30.0)];
    drag(&mut f, PointerButton::Primary, &stroke);
    assert_eq!(
        mask_pixel(&f, 4500, 30),
        255,
        "the mask keeps the picture's resolution"
    );
    assert_eq!(mask_pixel(&f, 3000, 30), 0);
    assert_eq!(
        f.app()
            .init_image
            .as_ref()
            .unwrap()
            .mask
            .as_ref()
            .unwrap()
            .mask()
            .dimensions(),
        (9000, 60)
    );
}

#[test]
fn each_modes_controls_reach_the_job() {
    let mut f = start(settings(), false, false, None);
    let outside = tempfile::tempdir().unwrap();
    open_picture(&mut f, outside.path(), 64, 48);
    // Image to image: strength and resize mode.
    f.set_slider("Denoising strength", 0.55);
    f.harness.step();
    pick(&mut f, "Resize mode", "Crop and resize");
    f.click("Use its size");
    assert_eq!((f.app().settings.width, f.app().settings.height), (64, 48));
    f.click("Generate");
    f.wait_for_jobs(1);
    {
        let seen = f.seen.lock().unwrap();
        let job = seen.images[0].as_ref().unwrap();
        assert_eq!(job.options.strength, 0.55);
        assert_eq!(job.options.resize_mode, ResizeMode::CropAndResize);
        assert!(job.mask.is_none() && !job.is_inpainting());
        assert_eq!((seen.jobs[0].width, seen.jobs[0].height), (64, 48));
    }
    // Inpainting from a mask file of another size: blur, masked content, only masked.
    let mask_path = outside.path().join("mask.png");
    GrayImage::from_fn(32, 24, |x, _| Luma([if x < 16 { 255 } else { 0 }]))
        .save(&mask_path)
        .unwrap();
    f.harness
        .state_mut()
        .apply_for_test(UiCommand::SetMaskFile(mask_path));
    f.wait_for("the mask", |app| {
        app.init_image.as_ref().unwrap().mask.is_some()
    });
    f.set_slider("Mask blur", 9.0);
    f.harness.step();
    pick(&mut f, "Masked content", "latent noise");
    f.click("Only masked");
    f.set_slider("Masked area padding", 12.0);
    f.harness.step();
    f.click("Generate");
    f.wait_for_jobs(2);
    {
        let seen = f.seen.lock().unwrap();
        let job = seen.images[1].as_ref().unwrap();
        assert_eq!(job.options.mask_blur, 9.0);
        assert_eq!(job.options.masked_content, MaskedContent::LatentNoise);
        assert_eq!(job.options.only_masked_padding, Some(12));
        assert!(
            job.options.keep_unmasked,
            "the window keeps the rest of the picture"
        );
        let mask = job.mask.as_ref().unwrap();
        assert_eq!(
            mask.dimensions(),
            (64, 48),
            "the mask is fitted to the picture"
        );
        assert_eq!(mask.get_pixel(4, 10)[0], 255);
        assert_eq!(mask.get_pixel(60, 10)[0], 0);
    }
    // Outpainting: no mask, 16 pixels on the right.
    f.click("Remove mask");
    f.harness
        .get_by_role_and_label(Role::SpinButton, "Right")
        .set_value_accesskit(16.0);
    f.harness.step();
    f.harness.step();
    assert_eq!(
        f.app().settings.image_options.strength,
        1.0,
        "outpainting starts from noise"
    );
    f.click("Use its size");
    assert_eq!((f.app().settings.width, f.app().settings.height), (80, 48));
    f.click("Generate");
    f.wait_for_jobs(3);
    {
        let seen = f.seen.lock().unwrap();
        let job = seen.images[2].as_ref().unwrap();
        let outpaint = job.options.outpaint.unwrap();
        assert_eq!(
            (outpaint.left, outpaint.top, outpaint.right, outpaint.bottom),
            (0, 0, 16, 0)
        );
        assert_eq!(job.canvas().dimensions(), (80, 48));
        assert!(job.is_inpainting());
    }
    // The hires fix, for text to image only.
    f.click("Clear");
    f.click("Hires fix");
    f.set_slider("Upscale by", 1.5);
    f.set_slider("Hires strength", 0.45);
    f.set_slider("Hires steps", 3.0);
    f.harness.step();
    pick(&mut f, "Upscaler", "Lanczos");
    f.click("Generate");
    f.wait_for_jobs(4);
    let hires = f.seen.lock().unwrap().hires[3].unwrap();
    assert_eq!(hires.scale, 1.5);
    assert_eq!(hires.strength, 0.45);
    assert_eq!(hires.steps, Some(3));
    assert_eq!(hires.upscaler, HiresUpscaler::Lanczos);
    assert!(f.seen.lock().unwrap().images[3].is_none());
    // The gallery keeps the hires settings, and the first pass's size (as A1111 writes it).
    f.wait_for("the hires image in the gallery", |app| {
        app.gallery
            .entries
            .iter()
            .any(|e| e.metadata.hires.is_some())
    });
    let entry = f
        .app()
        .gallery
        .entries
        .iter()
        .find(|e| e.metadata.hires.is_some())
        .unwrap()
        .clone();
    assert_eq!(entry.metadata.hires, Some(hires));
    assert_eq!((entry.metadata.width, entry.metadata.height), (80, 48));
    assert_eq!(entry.metadata.to_a1111().get("Hires upscale"), Some("1.5"));
    f.click("Hires fix");
    assert!(!f.app().settings.hires_enabled);
    f.harness
        .state_mut()
        .apply_for_test(UiCommand::UseSettings(entry.id));
    assert!(f.app().settings.hires_enabled);
    assert_eq!(f.app().settings.hires, hires);
}

#[test]
fn the_gallery_keeps_the_mask_and_use_these_settings_restores_the_inpainting() {
    let mut f = start(settings(), false, false, None);
    let outside = tempfile::tempdir().unwrap();
    open_picture(&mut f, outside.path(), 96, 64);
    f.click("Paint mask…");
    let stroke = [screen_of(&f, 10.0, 10.0), screen_of(&f, 50.0, 30.0)];
    drag(&mut f, PointerButton::Primary, &stroke);
    f.click("Done");
    f.set_slider("Mask blur", 2.0);
    f.harness.step();
    let painted = f
        .app()
        .init_image
        .as_ref()
        .unwrap()
        .mask
        .as_ref()
        .unwrap()
        .mask()
        .clone();
    // Three variations of one photo and mask store each once.
    for _ in 0..3 {
        f.click("Generate");
    }
    f.wait_for_jobs(3);
    f.wait_for("the images in the gallery", |app| {
        app.gallery.entries.len() == 3
    });
    let entry = f.app().gallery.entries[0].clone();
    let metadata = &entry.metadata;
    assert!(metadata.is_inpainting());
    assert_eq!(metadata.image_options.unwrap().mask_blur, 2.0);
    let text = metadata.to_a1111().to_text();
    assert!(text.contains("Mask blur: 2"), "{text}");
    assert!(text.contains("Denoising strength: 0.75"), "{text}");
    let inputs = f.library.path().join(".atelier").join("inputs");
    assert_eq!(
        std::fs::read_dir(&inputs).unwrap().count(),
        2,
        "a picture and a mask"
    );
    let kept = atelier::gallery::library::input_path(
        f.library.path(),
        metadata.mask_image.as_ref().unwrap(),
    );
    assert_eq!(image::open(&kept).unwrap().to_luma8(), painted);
    // The detail panel says how it was made.
    f.click("Gallery");
    f.harness
        .state_mut()
        .apply_for_test(UiCommand::SelectImage(Some(entry.id)));
    f.wait_for("the detail panel", |app| app.gallery.full_image.is_some());
    assert!(
        f.harness
            .query_by_label_contains("inpainting, strength 0.75")
            .is_some()
    );
    assert!(f.harness.query_by_label_contains("blur 2 px").is_some());
    f.click("Studio");
    // Back to text to image, then Use these settings brings the picture and its mask back.
    f.click("Clear");
    assert!(f.app().init_image.is_none());
    f.harness.state_mut().settings.image_options.mask_blur = 30.0;
    f.harness
        .state_mut()
        .apply_for_test(UiCommand::UseSettings(entry.id));
    f.wait_for("the picture and mask", |app| {
        app.init_image.as_ref().is_some_and(|i| i.mask.is_some())
    });
    assert_eq!(f.app().settings.image_options.mask_blur, 2.0);
    assert_eq!(
        f.app()
            .init_image
            .as_ref()
            .unwrap()
            .mask
            .as_ref()
            .unwrap()
            .mask(),
        &painted
    );
    assert_eq!(
        f.app().init_image.as_ref().unwrap().image.dimensions(),
        (96, 64)
    );
}

#[test]
fn compare_varies_the_strength_of_an_inpainting_job() {
    let mut f = start(settings(), false, false, None);
    let outside = tempfile::tempdir().unwrap();
    // Without a picture, strength rows are refused with a reason.
    f.click("Compare");
    f.click("Euler");
    {
        let view = &mut f.harness.state_mut().compare;
        view.row_kind = atelier::ui::compare::RowKind::Strength;
        view.row_values = "0.3, 0.6".into();
    }
    f.harness.step();
    f.click("Run comparison (2 cells)");
    assert!(
        f.app()
            .compare
            .error
            .as_ref()
            .unwrap()
            .contains("need a picture")
    );
    f.click("Studio");
    open_picture(&mut f, outside.path(), 64, 64);
    f.click("Paint mask…");
    let stroke = [screen_of(&f, 10.0, 32.0), screen_of(&f, 54.0, 32.0)];
    drag(&mut f, PointerButton::Primary, &stroke);
    f.click("Done");
    f.click("Compare");
    assert!(
        f.harness
            .query_by_label_contains("Inpainting of photo.png")
            .is_some()
    );
    // (The sampler list is long: UniPC is picked as the list would, below the fold.)
    f.harness
        .state_mut()
        .compare
        .samplers
        .push(atelier::schedulers::Sampler::parse("unipc").unwrap());
    f.harness.step();
    f.click("Run comparison (4 cells)");
    f.wait_for_jobs(4);
    f.wait_for("every cell", |app| {
        app.compare.cells.iter().all(|c| c.image.is_some())
    });
    let seen = f.seen.lock().unwrap();
    let mut strengths: Vec<f64> = seen
        .images
        .iter()
        .map(|image| {
            let image = image.as_ref().unwrap();
            assert!(image.mask.is_some(), "every cell inpaints");
            image.options.strength
        })
        .collect();
    strengths.sort_by(f64::total_cmp);
    assert_eq!(strengths, vec![0.3, 0.3, 0.6, 0.6]);
    drop(seen);
    assert!(
        f.harness
            .query_all_by_label_contains("strength 0.6")
            .count()
            > 0
            && f.harness
                .query_all_by_label_contains("strength 0.3")
                .count()
                > 0,
        "the rows are labelled by strength"
    );
}

#[test]
fn the_real_engine_inpaints_and_runs_the_hires_fix_in_the_window() {
    let mut f = start_real(tempfile::tempdir().unwrap(), 4);
    let outside = tempfile::tempdir().unwrap();
    open_picture(&mut f, outside.path(), 64, 48);
    let mask_path = outside.path().join("mask.png");
    GrayImage::from_fn(64, 48, |x, _| Luma([if x >= 32 { 255 } else { 0 }]))
        .save(&mask_path)
        .unwrap();
    f.harness
        .state_mut()
        .apply_for_test(UiCommand::SetMaskFile(mask_path));
    f.wait_for("the mask", |app| {
        app.init_image.as_ref().unwrap().mask.is_some()
    });
    f.harness.state_mut().settings.image_options.mask_blur = 0.0;
    f.click("Generate");
    f.wait_for("the inpainted image", |app| app.shown.is_some());
    assert!(
        f.app().frame_stats.first_preview_secs.is_some(),
        "previews arrived while it denoised"
    );
    let shown = f.app().shown.as_ref().unwrap().image.clone();
    assert_eq!(shown.dimensions(), (64, 48));
    assert!(
        f.harness.query_by_label_contains("· 3 steps in").is_some(),
        "4 steps at strength 0.75 run 3, and the status says 3"
    );
    let picture = f.app().init_image.as_ref().unwrap().image.clone();
    // The left half is kept exactly (the window keeps the rest of the picture); the right half
    // is repainted.
    for (x, y, p) in shown.enumerate_pixels() {
        if x < 32 {
            assert_eq!(p, picture.get_pixel(x, y), "kept at ({x}, {y})");
        }
    }
    assert!(
        shown
            .enumerate_pixels()
            .filter(|(x, _, _)| *x >= 32)
            .any(|(x, y, p)| p != picture.get_pixel(x, y)),
        "the masked half is repainted"
    );
    // The hires fix: 64x48, then 96x72; the progress counts both passes.
    f.click("Clear");
    f.click("Hires fix");
    f.harness.state_mut().settings.hires.scale = 1.5;
    f.harness.state_mut().settings.hires.strength = 0.5;
    f.click("Generate");
    let most_steps = std::cell::Cell::new(0);
    f.wait_for("the hires image", |app| {
        if let Some(running) = &app.running {
            most_steps.set(most_steps.get().max(running.total_steps));
        }
        app.running.is_none()
            && app
                .shown
                .as_ref()
                .is_some_and(|s| s.image.dimensions() == (96, 72))
    });
    assert_eq!(most_steps.get(), 6, "4 steps, then 2 at strength 0.5");
    assert!(
        f.harness
            .query_by_label_contains("hires fix, 6 steps over both passes")
            .is_some()
    );
    assert_eq!(f.app().shown.as_ref().unwrap().request.width, 96);
}
