//! The gallery: metadata round trips, imports from other tools, rebuilds, corrupt files and
//! indexes, and search over 10,000 images.
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::path::Path;

use atelier::engine::pipeline::{GenerationRequest, Timings};
use atelier::gallery::library::{GalleryError, Library};
use atelier::gallery::metadata::{A1111Parameters, read_png_text, write_png};
use atelier::gallery::record::{ImageMetadata, MetadataSource};
use atelier::gallery::search::GalleryQuery;
use atelier::schedulers::{SchedulerKind, SigmaSchedule};
use image::RgbImage;

fn pixels(seed: u8) -> RgbImage {
    RgbImage::from_fn(16, 12, |x, y| {
        image::Rgb([seed, (x * 13) as u8, (y * 17) as u8])
    })
}

fn generated(prompt: &str, seed: u64, scheduler: SchedulerKind) -> ImageMetadata {
    let request = GenerationRequest {
        prompt: prompt.into(),
        negative_prompt: "blurry, lowres".into(),
        seed,
        steps: 20,
        guidance_scale: 6.5,
        width: 16,
        height: 12,
        scheduler,
        sigmas: SigmaSchedule::Karras,
        ..Default::default()
    };
    ImageMetadata::for_generation(
        &request,
        "stabilityai/sd-turbo",
        Some("6ce0161689".into()),
        Timings {
            text_encoding_secs: 0.1,
            denoising_secs: 2.0,
            decode_secs: 0.3,
            total_secs: 2.4,
        },
        1_764_000_000 + seed as i64,
    )
}

/// A PNG with the given text chunks, as another tool would write it.
fn foreign_png(path: &Path, chunks: &[(&str, &str)]) {
    write_png(path, &pixels(9), chunks).unwrap();
}

#[test]
fn our_metadata_round_trips_through_the_png() {
    let dir = tempfile::tempdir().unwrap();
    let (mut library, _) = Library::open(dir.path()).unwrap();
    let metadata = generated(
        "a fox, \"quoted\": yes\nsecond line",
        7,
        SchedulerKind::DpmPp2m,
    );
    let entry = library.save(&pixels(1), &metadata).unwrap();
    let chunks = read_png_text(&library.image_path(&entry)).unwrap();
    // Our JSON gives everything back, timings and hash included.
    assert_eq!(ImageMetadata::from_chunks(&chunks).unwrap(), metadata);
    // Other tools read A1111's chunk: the same values, with the sampler in A1111's words.
    let a1111 = A1111Parameters::parse(&chunks["parameters"]);
    assert_eq!(a1111.prompt, metadata.prompt);
    assert_eq!(a1111.negative_prompt, "blurry, lowres");
    assert_eq!(a1111.get("Sampler"), Some("DPM++ 2M"));
    assert_eq!(a1111.get("Schedule type"), Some("Karras"));
    assert_eq!(a1111.get("Seed"), Some("7"));
    assert_eq!(a1111.get("Model hash"), Some("6ce0161689"));
    let back = ImageMetadata::from_a1111(&a1111);
    assert_eq!(back.scheduler, "dpmpp-2m-karras");
    assert_eq!(
        (back.seed, back.steps, back.guidance),
        (Some(7), Some(20), Some(6.5))
    );
    assert_eq!((back.width, back.height), (16, 12));
}

#[test]
fn a1111_text_with_quotes_old_sampler_names_and_missing_keys() {
    let text = "masterpiece, \"best\" quality\nNegative prompt: ugly, \"bad hands\"\nSteps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234567890, Size: 512x768, Model: \"v1-5: pruned, emaonly\", Lora hashes: \"a: 1, b: 2\"";
    let metadata = ImageMetadata::from_a1111(&A1111Parameters::parse(text));
    assert_eq!(metadata.prompt, "masterpiece, \"best\" quality");
    assert_eq!(metadata.negative_prompt, "ugly, \"bad hands\"");
    assert_eq!(metadata.scheduler, "dpmpp-2m-karras");
    assert_eq!(metadata.model, "v1-5: pruned, emaonly");
    assert_eq!((metadata.width, metadata.height), (512, 768));
    assert_eq!(metadata.seed, Some(1_234_567_890));
    // Missing keys stay unknown rather than made up.
    let sparse = ImageMetadata::from_a1111(&A1111Parameters::parse(
        "just a prompt\nSteps: 12, Sampler: Some New Sampler, CFG scale: 5",
    ));
    assert_eq!(sparse.seed, None);
    assert_eq!((sparse.width, sparse.height), (0, 0));
    assert_eq!(sparse.scheduler, "Some New Sampler");
    let mut request = GenerationRequest::default();
    let skipped = sparse.apply_to(&mut request);
    assert_eq!(request.prompt, "just a prompt");
    assert_eq!(request.steps, 12);
    assert_eq!(request.seed, GenerationRequest::default().seed);
    assert_eq!(skipped.len(), 1, "{skipped:?}");
}

const COMFY_GRAPH: &str = r#"{
  "3": {"class_type": "KSampler", "inputs": {"seed": 156680208700286, "steps": 20, "cfg": 8.0,
        "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 1.0,
        "model": ["10", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
  "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
  "10": {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1], "lora_name": "x.safetensors"}},
  "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 768, "batch_size": 1}},
  "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "beautiful scenery, glass bottle", "clip": ["4", 1]}},
  "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["4", 1]}},
  "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}}
}"#;

const INVOKE_JSON: &str = r#"{"generation_mode": "txt2img", "positive_prompt": "a cozy cabin in the woods",
  "negative_prompt": "people", "width": 768, "height": 512, "seed": 42, "steps": 28, "cfg_scale": 6.0,
  "scheduler": "dpmpp_2m_k", "model": {"key": "k", "hash": "blake3:abc", "name": "Juggernaut XL", "base": "sdxl"},
  "app_version": "5.0.0"}"#;

#[test]
fn imports_read_each_tools_format() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let (mut library, _) = Library::open(dir.path()).unwrap();

    let a1111 = outside.path().join("a1111.png");
    foreign_png(
        &a1111,
        &[(
            "parameters",
            "a castle on a hill, (golden hour:1.2)\nNegative prompt: blurry, lowres\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234567890, Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1",
        )],
    );
    let comfy = outside.path().join("ComfyUI_00001_.png");
    foreign_png(&comfy, &[("prompt", COMFY_GRAPH), ("workflow", "{}")]);
    let invoke = outside.path().join("invoke.png");
    foreign_png(&invoke, &[("invokeai_metadata", INVOKE_JSON)]);

    let entry = library.import(&a1111).unwrap();
    let m = &entry.metadata;
    assert_eq!(m.source, MetadataSource::A1111);
    assert_eq!(m.prompt, "a castle on a hill, (golden hour:1.2)");
    assert_eq!(m.scheduler, "dpmpp-2m-karras");
    assert_eq!(
        (m.seed, m.steps, m.guidance),
        (Some(1_234_567_890), Some(20), Some(7.0))
    );
    assert_eq!(m.model_hash.as_deref(), Some("6ce0161689"));

    let m = library.import(&comfy).unwrap().metadata;
    assert_eq!(m.source, MetadataSource::ComfyUi);
    assert_eq!(m.prompt, "beautiful scenery, glass bottle");
    assert_eq!(m.negative_prompt, "text, watermark");
    assert_eq!(m.model, "v1-5-pruned-emaonly.safetensors");
    assert_eq!(m.scheduler, "dpmpp-2m-karras");
    assert_eq!(
        (m.seed, m.steps, m.guidance),
        (Some(156_680_208_700_286), Some(20), Some(8.0))
    );
    assert_eq!((m.width, m.height), (512, 768));

    let m = library.import(&invoke).unwrap().metadata;
    assert_eq!(m.source, MetadataSource::InvokeAi);
    assert_eq!(m.prompt, "a cozy cabin in the woods");
    assert_eq!(m.model, "Juggernaut XL");
    assert_eq!(m.scheduler, "dpmpp-2m-karras");
    assert_eq!(
        (m.seed, m.steps, m.width, m.height),
        (Some(42), Some(28), 768, 512)
    );

    // All three are copies inside the library, found by search.
    assert_eq!(library.count().unwrap(), 3);
    let found = library
        .search(&GalleryQuery {
            text: "scenery glass".into(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(found.len(), 1);
    assert!(dir.path().join(&found[0].file).exists());
}

#[test]
fn bad_imports_say_why_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let (mut library, _) = Library::open(dir.path()).unwrap();
    library
        .save(&pixels(1), &generated("kept", 1, SchedulerKind::Euler))
        .unwrap();
    let files_before = std::fs::read_dir(dir.path()).unwrap().count();

    let corrupt = outside.path().join("corrupt.png");
    std::fs::write(&corrupt, b"\x89PNG\r\n\x1a\n this is not a png").unwrap();
    let error = library.import(&corrupt).unwrap_err();
    assert!(matches!(error, GalleryError::Png(_)), "{error}");
    assert!(error.to_string().contains("corrupt.png"), "{error}");

    // A real PNG cut short: the header reads, the pixels do not.
    let truncated = outside.path().join("truncated.png");
    foreign_png(
        &truncated,
        &[("parameters", "a\nSteps: 1, Seed: 2, Size: 16x12")],
    );
    let bytes = std::fs::read(&truncated).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() - 40]).unwrap();
    assert!(library.import(&truncated).is_err());

    let plain = outside.path().join("plain.png");
    foreign_png(&plain, &[]);
    let error = library.import(&plain).unwrap_err();
    assert!(matches!(error, GalleryError::NoMetadata(_)), "{error}");
    assert!(error.to_string().contains("no generation parameters"));

    let text = outside.path().join("notes.txt");
    std::fs::write(&text, "hello").unwrap();
    assert!(matches!(
        library.import(&text).unwrap_err(),
        GalleryError::NotPng(_)
    ));

    assert_eq!(library.count().unwrap(), 1);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), files_before);
}

#[test]
fn the_index_is_rebuilt_from_the_pngs_after_it_is_deleted() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut library, _) = Library::open(dir.path()).unwrap();
        for seed in 0..3 {
            let entry = library
                .save(
                    &pixels(seed as u8),
                    &generated("a red fox", seed, SchedulerKind::UniPc),
                )
                .unwrap();
            if seed == 1 {
                library.set_favourite(entry.id, true).unwrap();
            }
        }
    }
    // Another tool drops a PNG into the folder meanwhile.
    foreign_png(
        &dir.path().join("dropped.png"),
        &[(
            "parameters",
            "a blue bird\nSteps: 4, Sampler: Euler a, Seed: 5, Size: 16x12",
        )],
    );
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(dir.path().join(format!(".atelier/index.sqlite3{suffix}")));
    }
    let (library, report) = Library::open(dir.path()).unwrap();
    assert_eq!(report.added, 4);
    let all = library.search(&GalleryQuery::default()).unwrap();
    assert_eq!(all.len(), 4);
    // Newest first; the favourite survived; our own metadata came back whole.
    let favourites = library
        .search(&GalleryQuery {
            favourites_only: true,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(favourites.len(), 1);
    assert_eq!(
        favourites[0].metadata,
        generated("a red fox", 1, SchedulerKind::UniPc)
    );
    let bird = library
        .search(&GalleryQuery {
            text: "bird".into(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(bird[0].metadata.scheduler, "euler-a");
}

#[test]
fn a_corrupt_index_is_set_aside_and_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut library, _) = Library::open(dir.path()).unwrap();
        library
            .save(
                &pixels(3),
                &generated("lighthouse at dusk", 3, SchedulerKind::Deis),
            )
            .unwrap();
    }
    let index = dir.path().join(".atelier/index.sqlite3");
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", index.display()));
    }
    std::fs::write(
        &index,
        b"SQLite format 3\0 but then garbage garbage garbage",
    )
    .unwrap();
    let (library, report) = Library::open(dir.path()).unwrap();
    assert!(report.rebuilt_corrupt_index);
    let found = library
        .search(&GalleryQuery {
            text: "lighthouse".into(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(found.len(), 1);
    let kept_aside = std::fs::read_dir(dir.path().join(".atelier"))
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().contains("corrupt"));
    assert!(kept_aside);
}

#[test]
fn delete_and_undo_filters_and_corrupt_files_in_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    let (mut library, _) = Library::open(dir.path()).unwrap();
    let a = library
        .save(&pixels(1), &generated("a castle", 1, SchedulerKind::Euler))
        .unwrap();
    library
        .save(
            &pixels(2),
            &generated("a castle at night", 2, SchedulerKind::Lms),
        )
        .unwrap();
    let deleted = library.delete(a.id).unwrap();
    assert!(!library.image_path(&a).exists());
    assert_eq!(library.count().unwrap(), 1);
    let back = library.undo_delete(&deleted).unwrap();
    assert!(library.image_path(&back).exists());
    assert_eq!(library.count().unwrap(), 2);

    let lms = library
        .search(&GalleryQuery {
            scheduler: Some("lms-karras".into()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(lms.len(), 1);
    let recent = library
        .search(&GalleryQuery {
            since_unix: Some(1_764_000_002),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(recent.len(), 1);
    assert_eq!(
        library.models().unwrap(),
        vec!["stabilityai/sd-turbo".to_string()]
    );

    // A broken PNG in the folder is skipped, not fatal.
    std::fs::write(dir.path().join("broken.png"), b"nope").unwrap();
    let report = library.sync().unwrap();
    assert_eq!(report.added, 0);
    assert_eq!(library.count().unwrap(), 2);
}

/// Keyset pages: an image saved between two pages (the newest of all) neither shifts nor
/// repeats the rows of the pages after it.
#[test]
fn a_save_between_pages_does_not_shift_them() {
    let dir = tempfile::tempdir().unwrap();
    let (mut library, _) = Library::open(dir.path()).unwrap();
    for seed in 0..30 {
        library
            .save(
                &pixels(seed as u8),
                &generated("a red fox", seed, SchedulerKind::Euler),
            )
            .unwrap();
    }
    let query = GalleryQuery::default();
    let first = library.search_page(&query, None, 10).unwrap();
    library
        .save(
            &pixels(99),
            &generated("a red fox", 99, SchedulerKind::Euler),
        )
        .unwrap();
    let mut ids: Vec<i64> = first.entries.iter().map(|e| e.id).collect();
    let mut after = first.last;
    loop {
        let page = library.search_page(&query, after, 10).unwrap();
        if page.entries.is_empty() {
            break;
        }
        after = page.last;
        ids.extend(page.entries.iter().map(|e| e.id));
    }
    let unique: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(ids.len(), 30, "every image of the first search once");
    assert_eq!(unique.len(), 30);
}

#[test]
fn search_over_ten_thousand_images() {
    let dir = tempfile::tempdir().unwrap();
    atelier::gallery::library::write_sample_library(dir.path(), 10_000).unwrap();
    let started = std::time::Instant::now();
    let (library, report) = Library::open(dir.path()).unwrap();
    let index_secs = started.elapsed().as_secs_f64();
    assert_eq!(report.added, 10_000);
    let started = std::time::Instant::now();
    let dragons = library
        .search(&GalleryQuery {
            text: "dragon artist4".into(),
            ..Default::default()
        })
        .unwrap();
    let search_ms = started.elapsed().as_secs_f64() * 1e3;
    // "dragon" is every 8th image (as subject) plus the light of 1/8; artist4 prefixes artist4,
    // artist40..49: check against a plain scan.
    let expected = (0..10_000)
        .filter(|i| {
            let artist = format!("artist{}", i % 100);
            (i % 8 == 7 || (i / 8) % 8 == 7) && artist.starts_with("artist4")
        })
        .count();
    assert_eq!(dragons.len(), expected);
    let all = library.search(&GalleryQuery::default()).unwrap();
    assert_eq!(all.len(), 10_000);
    // Pages, one after the other, are the whole result in the same order, for a search and a
    // filter alike; a limit stops them.
    for query in [
        GalleryQuery {
            text: "dragon".into(),
            ..Default::default()
        },
        GalleryQuery::default(),
        GalleryQuery {
            text: "fox".into(),
            favourites_only: true,
            ..Default::default()
        },
    ] {
        let whole = library.search(&query).unwrap();
        let mut paged = Vec::new();
        let mut after = None;
        loop {
            let page = library.search_page(&query, after, 240).unwrap();
            let done = page.entries.len() < 240;
            after = page.last;
            paged.extend(page.entries);
            if done {
                break;
            }
        }
        assert_eq!(
            paged.iter().map(|e| e.id).collect::<Vec<_>>(),
            whole.iter().map(|e| e.id).collect::<Vec<_>>()
        );
    }
    let limited = library
        .search(&GalleryQuery {
            limit: 5000,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(limited.len(), 5000);
    assert_eq!(limited[..], all[..5000]);
    println!(
        "indexed 10,000 PNGs in {index_secs:.2} s; full-text search in {search_ms:.1} ms ({} hits)",
        dragons.len()
    );
}

#[test]
fn a1111_img2img_inpainting_and_hires_keys_are_read_and_written() {
    use atelier::engine::init_image::{HiresUpscaler, MaskedContent};
    let inpaint = A1111Parameters::parse(
        "a barn\nNegative prompt: blurry\nSteps: 30, Sampler: Euler a, CFG scale: 7, Seed: 9, \
         Size: 512x512, Denoising strength: 0.6, Mask blur: 8, Masked content: latent noise, \
         Inpaint area: Only masked, Masked area padding: 48",
    );
    let metadata = ImageMetadata::from_a1111(&inpaint);
    let options = metadata.image_options.unwrap();
    assert_eq!(options.strength, 0.6);
    assert_eq!(options.mask_blur, 8.0);
    assert_eq!(options.masked_content, MaskedContent::LatentNoise);
    assert_eq!(options.only_masked_padding, Some(48));
    assert!(metadata.is_inpainting() && metadata.hires.is_none());
    // Written back as A1111 wrote them.
    let written = metadata.to_a1111();
    for (key, value) in [
        ("Denoising strength", "0.6"),
        ("Mask blur", "8"),
        ("Masked content", "latent noise"),
        ("Inpaint area", "Only masked"),
        ("Masked area padding", "48"),
    ] {
        assert_eq!(written.get(key), Some(value), "{key}");
    }
    // Clip skip, read, written back and applied.
    let skipped = ImageMetadata::from_a1111(&A1111Parameters::parse(
        "a barn\nSteps: 20, Sampler: Euler, Seed: 1, Size: 512x512, Clip skip: 2, \
         VAE: vae-ft-mse-840000-ema-pruned.safetensors",
    ));
    assert_eq!(skipped.clip_skip, Some(2));
    assert_eq!(skipped.to_a1111().get("Clip skip"), Some("2"));
    assert_eq!(
        skipped.vae.as_deref(),
        Some("vae-ft-mse-840000-ema-pruned.safetensors")
    );
    assert_eq!(
        skipped.to_a1111().get("VAE"),
        Some("vae-ft-mse-840000-ema-pruned.safetensors")
    );
    let mut request = GenerationRequest::default();
    skipped.apply_to(&mut request);
    assert_eq!(request.clip_skip, 2);
    // Plain img2img: a strength and no mask keys.
    let img2img = ImageMetadata::from_a1111(&A1111Parameters::parse(
        "a barn\nSteps: 20, Sampler: Euler, Seed: 1, Size: 512x512, Denoising strength: 0.45",
    ));
    assert_eq!(img2img.image_options.unwrap().strength, 0.45);
    assert!(!img2img.is_inpainting());
    assert_eq!(img2img.to_a1111().get("Mask blur"), None);
    // The hires fix: its strength is the second pass's, not an init picture's.
    let hires = ImageMetadata::from_a1111(&A1111Parameters::parse(
        "a barn\nSteps: 20, Sampler: Euler, Seed: 1, Size: 512x512, Denoising strength: 0.55, \
         Hires upscale: 2, Hires steps: 15, Hires upscaler: Latent (nearest)",
    ));
    assert!(hires.image_options.is_none());
    let fix = hires.hires.unwrap();
    assert_eq!(
        (fix.scale, fix.strength, fix.steps, fix.upscaler),
        (2.0, 0.55, Some(15), HiresUpscaler::LatentNearest)
    );
    let written = hires.to_a1111();
    assert_eq!(written.get("Hires upscaler"), Some("Latent (nearest)"));
    assert_eq!(written.get("Hires steps"), Some("15"));
    // An ESRGAN upscaler we do not have falls back to Lanczos, the nearest image upscale.
    let esrgan = ImageMetadata::from_a1111(&A1111Parameters::parse(
        "a barn\nSteps: 20, Size: 512x512, Hires upscale: 1.5, Hires upscaler: 4x-UltraSharp",
    ));
    assert_eq!(esrgan.hires.unwrap().upscaler, HiresUpscaler::Lanczos);
}
