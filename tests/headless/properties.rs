//! Property tests of every parser of outside input: whatever the bytes, they return a value or
//! an error, never panic, hang or allocate without bound; and what we write, we read back.
//! (`scripts/fuzz.sh` runs the same parsers under libFuzzer for longer.)
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use crate::common;

use std::collections::BTreeMap;
use std::path::Path;

use atelier::engine::config::{
    CheckedConfig, ClipTextConfig, SchedulerConfig, UNetConfig, VaeConfig,
};
use atelier::engine::npy::parse_npy_header;
use atelier::gallery::metadata::{A1111Parameters, write_png};
use atelier::gallery::png_read::read_text_from;
use atelier::gallery::record::ImageMetadata;
use atelier::schedulers::{SchedulerKind, SigmaSchedule};
use proptest::prelude::*;

/// 256 cases from a fixed seed, so that CI is repeatable; the fuzz
/// targets explore at random. Set `ATELIER_PROPTEST_RANDOM=1` for a random seed.
fn config() -> ProptestConfig {
    let rng_seed = if std::env::var_os("ATELIER_PROPTEST_RANDOM").is_some() {
        proptest::test_runner::RngSeed::Random
    } else {
        proptest::test_runner::RngSeed::Fixed(0x5eed_a7e1)
    };
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        rng_seed,
        ..ProptestConfig::default()
    }
}

/// Text that looks like what the parsers expect, mixed with anything.
fn metadata_like_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-z ,():\\[\\]\\\\0-9.]{0,40}(\nNegative prompt: [a-z ,]{0,20})?(\n[A-Za-z ]{1,12}: [^\n]{0,20}(, [A-Za-z ]{1,12}: [^\n]{0,20}){0,6})?",
        "\\{\"[a-z_]{1,12}\": (\\{[^}]{0,40}\\}|\"[^\"]{0,20}\"|[0-9.e-]{1,8}|null|\\[[0-9, ]{0,20}\\])\\}",
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn a1111_parameters_parse_anything(text in metadata_like_text()) {
        let parsed = A1111Parameters::parse(&text);
        // What we write from what we read parses to the same thing when it has a parameters
        // line. (Without one the format is ambiguous, in A1111 too: a last prompt line that reads
        // like three `key: value` pairs is taken for parameters.)
        if parsed.pairs.len() >= 3 {
            let again = A1111Parameters::parse(&parsed.to_text());
            prop_assert_eq!(again.prompt.trim(), parsed.prompt.trim());
            prop_assert_eq!(&again.negative_prompt, &parsed.negative_prompt);
            prop_assert_eq!(again.pairs.len(), parsed.pairs.len());
        }
    }

    #[test]
    fn a1111_parameters_round_trip(
        prompt in "[^\n]{0,30}",
        negative in "[a-z ,()]{0,20}",
        pairs in proptest::collection::vec(("[A-Z][a-z]{1,8}", "[^\n\"]{1,16}"), 3..8),
    ) {
        let params = A1111Parameters {
            prompt: prompt.trim().to_string(),
            negative_prompt: negative.trim().to_string(),
            pairs: pairs
                .into_iter()
                .map(|(k, v)| (k, v.trim().to_string()))
                .filter(|(_, v)| !v.is_empty())
                .collect(),
        };
        prop_assume!(params.pairs.len() >= 3 && !params.prompt.starts_with("Negative prompt:"));
        prop_assert_eq!(A1111Parameters::parse(&params.to_text()), params);
    }

    #[test]
    fn png_metadata_of_any_tool_parses_or_is_none(
        parameters in proptest::option::of(metadata_like_text()),
        comfy in proptest::option::of(metadata_like_text()),
        invoke in proptest::option::of(metadata_like_text()),
        ours in proptest::option::of(metadata_like_text()),
    ) {
        let mut chunks = BTreeMap::new();
        for (key, value) in [
            ("parameters", parameters),
            ("prompt", comfy),
            ("invokeai_metadata", invoke),
            ("atelier", ours),
        ] {
            if let Some(value) = value {
                chunks.insert(key.to_string(), value);
            }
        }
        let _ = ImageMetadata::from_chunks(&chunks);
    }

    #[test]
    fn png_text_reader_survives_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let mut file = vec![0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];
        file.extend_from_slice(&bytes);
        for input in [&bytes, &file] {
            let len = input.len() as u64;
            let _ = read_text_from(std::io::Cursor::new(input.as_slice()), len, Path::new("x.png"));
        }
    }

    #[test]
    fn png_text_reader_survives_damaged_pngs(
        chunks in proptest::collection::vec(("[a-z]{1,10}", "[ -~]{0,60}"), 0..4),
        cut in 0usize..2000,
        flip in proptest::option::of((0usize..2000, any::<u8>())),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.png");
        let image = image::RgbImage::from_pixel(5, 3, image::Rgb([1, 2, 3]));
        let borrowed: Vec<(&str, &str)> =
            chunks.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        write_png(&path, &image, &borrowed).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        // Intact, the text comes back exactly.
        let read = read_text_from(
            std::io::Cursor::new(bytes.as_slice()),
            bytes.len() as u64,
            &path,
        )
        .unwrap();
        let expected: BTreeMap<String, String> = chunks.iter().cloned().collect();
        prop_assert_eq!(read.chunks, expected);
        prop_assert_eq!((read.width, read.height), (5, 3));
        // Damaged, it reads what it can.
        if let Some((at, value)) = flip {
            let at = at % bytes.len();
            bytes[at] ^= value;
        }
        bytes.truncate(cut.min(bytes.len()));
        let _ = read_text_from(std::io::Cursor::new(bytes.as_slice()), bytes.len() as u64, &path);
    }

    #[test]
    fn npy_headers_parse_or_fail(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let mut file = b"\x93NUMPY\x01\x00".to_vec();
        file.extend_from_slice(&bytes);
        let _ = parse_npy_header(&bytes);
        if let Ok(header) = parse_npy_header(&file) {
            let _ = header.element_count();
        }
    }

    #[test]
    fn npy_headers_round_trip(shape in proptest::collection::vec(0usize..1 << 40, 0..5)) {
        let dims = shape.iter().map(|d| format!("{d}, ")).collect::<String>();
        let header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({dims}), }}\n");
        let mut file = b"\x93NUMPY\x01\x00".to_vec();
        file.extend_from_slice(&(header.len() as u16).to_le_bytes());
        file.extend_from_slice(header.as_bytes());
        let parsed = parse_npy_header(&file).unwrap();
        prop_assert_eq!(parsed.shape, shape);
        prop_assert_eq!(parsed.descr, "<f4");
        prop_assert_eq!(parsed.data_offset, file.len());
    }

    #[test]
    fn model_configs_parse_and_check_without_panicking(
        json in "\\{(\"[a-z_]{3,30}\": (-?[0-9]{1,6}|\\[[0-9, ]{0,12}\\]|\"[a-zA-Z0-9]{0,12}\"|true|null), ){0,6}\"x\": 0\\}",
        numbers in proptest::collection::vec(0usize..3000, 12),
    ) {
        // Random JSON, then the fields that shape the model set to random sizes.
        for text in [json.clone(), format!(
            r#"{{"block_out_channels": [{}, {}], "norm_num_groups": {}, "attention_head_dim": {},
                "layers_per_block": {}, "cross_attention_dim": {}, "hidden_size": {},
                "num_attention_heads": {}, "latent_channels": {}, "in_channels": {},
                "conv_in_kernel": {}, "max_position_embeddings": {},
                "down_block_types": ["DownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "UpBlock2D"]}}"#,
            numbers[0], numbers[1], numbers[2], numbers[3], numbers[4], numbers[5],
            numbers[6], numbers[7], numbers[8], numbers[9], numbers[10], numbers[11]
        )] {
            if let Ok(unet) = serde_json::from_str::<UNetConfig>(&text) && unet.check().is_ok() {
                for (i, &c) in unet.block_out_channels.iter().enumerate() {
                    prop_assert!(c > 0 && c % unet.norm_num_groups == 0);
                    prop_assert!(unet.heads(i) > 0 && c % unet.heads(i) == 0);
                }
            }
            if let Ok(vae) = serde_json::from_str::<VaeConfig>(&text) && vae.check().is_ok() {
                prop_assert!(vae.scale_factor() >= 1);
            }
            if let Ok(clip) = serde_json::from_str::<ClipTextConfig>(&text) && clip.check().is_ok() {
                prop_assert_eq!(clip.hidden_size % clip.num_attention_heads, 0);
            }
        }
    }

    #[test]
    fn every_scheduler_runs_on_every_config_that_passes_the_check(
        train in prop_oneof![2 => Just(None), 3 => (1usize..1200).prop_map(Some), 1 => Just(Some(0))],
        betas_kind in 0u8..4,
        beta_value in -0.5f64..1.5,
        betas_len in 0usize..40,
        start in prop_oneof![3 => (0.0f64..0.05).prop_map(Some), 1 => proptest::option::of(-0.1f64..1.2)],
        end in prop_oneof![3 => (0.005f64..0.05).prop_map(Some), 1 => proptest::option::of(-0.1f64..1.2)],
        schedule in proptest::option::of(prop_oneof![
            Just("linear".to_string()), Just("scaled_linear".to_string()),
            Just("squaredcos_cap_v2".to_string()), "[a-z]{1,6}"
        ]),
        spacing in proptest::option::of(prop_oneof![
            Just("leading".to_string()), Just("linspace".to_string()),
            Just("trailing".to_string()), "[a-z]{1,6}"
        ]),
        offset in prop_oneof![3 => proptest::option::of(0usize..2), 1 => proptest::option::of(0usize..1200)],
        order in proptest::option::of(0usize..5),
        prediction in proptest::option::of(prop_oneof![
            Just("epsilon".to_string()), Just("v_prediction".to_string()),
            Just("sample".to_string()), "[a-z]{1,6}"
        ]),
        steps in 1usize..60,
    ) {
        let train_count = train.unwrap_or(1000);
        let trained_betas = match betas_kind {
            0 | 1 => None,
            // One beta per training step, all the same (in range or not).
            2 => Some(vec![beta_value; train_count.min(2000)]),
            _ => Some(vec![beta_value; betas_len]),
        };
        let config = SchedulerConfig {
            num_train_timesteps: train,
            trained_betas,
            beta_start: start,
            beta_end: end,
            beta_schedule: schedule,
            timestep_spacing: spacing,
            steps_offset: offset,
            solver_order: order,
            prediction_type: prediction,
            ..Default::default()
        };
        let passes = config.check().is_ok();
        for kind in SchedulerKind::ALL {
            for sigmas in SigmaSchedule::ALL {
                // An error is fine; a panic fails the test. A config that fails the check never
                // builds.
                let built = kind.build(&config, steps, *sigmas, 0.0);
                if !passes {
                    prop_assert!(built.is_err());
                }
                if let Ok(scheduler) = built {
                    prop_assert!(scheduler.timesteps().iter().all(|t| t.is_finite()));
                }
            }
        }
    }

    #[test]
    fn safetensors_headers_of_any_bytes_are_errors(
        bytes in proptest::collection::vec(any::<u8>(), 0..300),
        claimed in any::<u64>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        for (name, content) in [
            ("raw.safetensors", bytes.clone()),
            ("claimed.safetensors", [claimed.to_le_bytes().as_slice(), &bytes].concat()),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, content).unwrap();
            // SAFETY: the file was written above and nothing changes it while it is mapped.
            let _ = unsafe { candle_core::safetensors::MmapedSafetensors::new(&path) };
        }
    }
}

#[test]
fn prompts_of_any_text_tokenize_within_the_limit() {
    let files = atelier::engine::source::ModelFiles::new(
        atelier::engine::source::ModelSource::Folder(common::model_dir("sd1")),
        None,
    );
    let tokenizer = atelier::engine::tokenizer::ClipTokenizer::load(&files, "tokenizer").unwrap();
    let mut runner = proptest::test_runner::TestRunner::new(config());
    runner
        .run(
            &prop_oneof![any::<String>(), "[a-z ,()\\[\\]:.0-9<>]{0,400}"],
            |prompt| {
                let tokens = tokenizer.tokenize(&prompt).unwrap();
                prop_assert_eq!(tokens.ids.len(), tokenizer.max_length());
                Ok(())
            },
        )
        .unwrap();
}
