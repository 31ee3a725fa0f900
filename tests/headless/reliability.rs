//! Hostile and clumsy input, crashes and concurrent writers: nothing is lost, nothing hangs,
//! nothing crashes. Each test names the failure it guards against (issue 15).
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use atelier::gallery::library::{GalleryError, Library};
use atelier::gallery::metadata::write_png;
use atelier::gallery::png_read::{decode_rgb_bounded, read_text_bounded};
use atelier::gallery::search::GalleryQuery;
use common::*;
use image::RgbImage;

fn atelier() -> Command {
    Command::new(env!("CARGO_BIN_EXE_atelier"))
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs `command`, killing it after `limit`: a hang is a failure, not a stuck test.
fn run_bounded(command: &mut Command, limit: Duration) -> Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if started.elapsed() > limit {
            child.kill().unwrap();
            panic!("{command:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pixels(value: u8) -> RgbImage {
    RgbImage::from_pixel(16, 12, image::Rgb([value, 255 - value, 40]))
}

/// A PNG made of raw chunks (signature, then each `(type, data)` with its checksum).
fn raw_png(chunks: &[(&[u8; 4], Vec<u8>)]) -> Vec<u8> {
    let mut bytes = vec![0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];
    for (kind, data) in chunks {
        bytes.extend_from_slice(&(data.len() as u32).to_be_bytes());
        bytes.extend_from_slice(*kind);
        bytes.extend_from_slice(data);
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(*kind);
        hasher.update(data);
        bytes.extend_from_slice(&hasher.finalize().to_be_bytes());
    }
    bytes
}

fn ihdr(width: u32, height: u32) -> Vec<u8> {
    let mut data = width.to_be_bytes().to_vec();
    data.extend_from_slice(&height.to_be_bytes());
    data.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
    data
}

fn png_files(folder: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(folder)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    files.sort();
    files
}

fn temp_files(folder: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(folder)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".tmp"))
        .collect()
}

fn compare_into_library(library: &Path, out: &Path, steps: &str) -> Command {
    let mut command = atelier();
    command
        .args(["compare", "--model"])
        .arg(model_dir("sd1"))
        .args([
            "--prompt",
            "a fox",
            "--scheduler",
            "euler,ddim,unipc",
            "--steps",
            steps,
            "--device",
            "cpu",
            "--library",
        ])
        .arg(library)
        .arg("--out")
        .arg(out);
    command
}

#[test]
fn two_processes_saving_into_one_library_lose_nothing() {
    // Issue 15.1: names picked by an exists check, then a rename over the other's file; both
    // runs in the same second got one comparison id.
    let dir = tempfile::tempdir().unwrap();
    let library = dir.path().join("library");
    let mut children: Vec<_> = (0..2)
        .map(|i| {
            compare_into_library(&library, &dir.path().join(format!("grid{i}.png")), "1,2")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children.drain(..) {
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "{}", stderr(&output));
    }
    // 2 processes x 3 samplers x 2 rows, all with seed 0 in the same few seconds: the same
    // names were wanted again and again.
    let files = png_files(&library);
    assert_eq!(files.len(), 12, "{files:?}");
    for file in &files {
        decode_rgb_bounded(file).unwrap();
    }
    assert!(temp_files(&library).is_empty());
    let (library, report) = Library::open(&library).unwrap();
    assert!(report.skipped.is_empty(), "{report:?}");
    let entries = library.search(&GalleryQuery::default()).unwrap();
    assert_eq!(entries.len(), 12);
    let comparisons: std::collections::BTreeSet<String> = entries
        .iter()
        .map(|e| e.metadata.comparison.as_ref().unwrap().id.clone())
        .collect();
    assert_eq!(comparisons.len(), 2, "each run is its own comparison");
}

#[test]
fn a_kill_during_saves_loses_no_finished_image() {
    // Issue 15.9 and the guarantee "a crash loses at most the job in flight": SIGKILL at
    // seeded random moments while a comparison saves its cells, then open the library.
    let dir = tempfile::tempdir().unwrap();
    let library = dir.path().join("library");
    let mut delay_ms = 400u64;
    for round in 0..3 {
        let mut child = compare_into_library(
            &library,
            &dir.path().join(format!("grid{round}.png")),
            "1,2,3,4",
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        delay_ms = 300 + (delay_ms * 7919) % 1200;
        let _ = child.kill();
        child.wait().unwrap();
    }
    // Temporary files of the killed writers are recovered (complete) or removed (partial) once
    // they are old enough; make them old rather than wait.
    let temps = age_temp_files(&library);
    let (opened, report) = Library::open(&library).unwrap();
    assert_eq!(report.recovered + report.removed_partial, temps);
    assert!(temp_files(&library).is_empty());
    let files = png_files(&library);
    for file in &files {
        decode_rgb_bounded(file).unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(opened.count().unwrap(), files.len());
    assert!(report.skipped.is_empty(), "{report:?}");
}

/// Makes every temporary file in `folder` ten minutes old: old enough to count as abandoned.
fn age_temp_files(folder: &Path) -> usize {
    let temps = temp_files(folder);
    for temp in &temps {
        let file = std::fs::File::options().write(true).open(temp).unwrap();
        file.set_modified(std::time::SystemTime::now() - Duration::from_secs(600))
            .unwrap();
    }
    temps.len()
}

#[test]
fn a_kill_during_imports_leaves_every_file_whole() {
    // The same guarantee where a process does nothing but write: `gallery import` copies and
    // names files back to back, so SIGKILL lands inside a save most of the time.
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source");
    std::fs::create_dir_all(&source).unwrap();
    atelier::gallery::library::write_sample_library(&source, 400).unwrap();
    let files = png_files(&source);
    let library = dir.path().join("library");
    std::fs::create_dir_all(&library).unwrap();
    // How long a whole import takes on this machine (into a scratch library), so that the kills
    // land inside the imports however fast the machine is.
    let scratch = dir.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let started = std::time::Instant::now();
    let status = atelier()
        .args(["gallery", "import", "--library"])
        .arg(&scratch)
        .args(&files)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let whole = started.elapsed();
    let mut kills = 0;
    for attempt in 0..6u32 {
        let mut child = atelier()
            .args(["gallery", "import", "--library"])
            .arg(&library)
            .args(&files)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // From a tenth to two thirds of the way through, at different points each time.
        std::thread::sleep(whole.mul_f64(0.1 + 0.11 * f64::from(attempt)));
        if child.try_wait().unwrap().is_none() {
            kills += 1;
        }
        let _ = child.kill();
        child.wait().unwrap();
    }
    assert!(
        kills >= 3,
        "the imports finished before they could be killed"
    );
    let temps = age_temp_files(&library);
    let (opened, report) = Library::open(&library).unwrap();
    eprintln!(
        "{kills} kills, {temps} temporary files left: {} recovered, {} removed",
        report.recovered, report.removed_partial
    );
    assert_eq!(report.recovered + report.removed_partial, temps);
    assert!(temp_files(&library).is_empty());
    let imported = png_files(&library);
    assert!(!imported.is_empty());
    for file in &imported {
        decode_rgb_bounded(file).unwrap_or_else(|e| panic!("{e}"));
    }
    assert!(report.skipped.is_empty(), "{report:?}");
    assert_eq!(opened.count().unwrap(), imported.len());
}

#[test]
fn temporary_files_of_dead_writers_are_recovered_or_removed() {
    // Issue 15.9: `.NAME.PID.tmp` files (a complete PNG) were never recovered or removed.
    let dir = tempfile::tempdir().unwrap();
    let complete = dir.path().join(".20261128-101010-5.png.4194303.tmp");
    let half = dir
        .path()
        .join(".20261128-101010-6.png.4194303.0badf00d.tmp");
    let fresh = dir
        .path()
        .join(".20261128-101010-7.png.4194303.0badf00d.tmp");
    let not_ours = dir.path().join(".notes.txt.4194303.tmp");
    write_png(
        &dir.path().join("staging.png"),
        &pixels(3),
        &[("parameters", "kept\nSteps: 1, Seed: 5, Size: 16x12")],
    )
    .unwrap();
    std::fs::rename(dir.path().join("staging.png"), &complete).unwrap();
    let bytes = std::fs::read(&complete).unwrap();
    std::fs::write(&half, &bytes[..bytes.len() / 2]).unwrap();
    std::fs::write(&fresh, &bytes[..bytes.len() / 2]).unwrap();
    std::fs::write(&not_ours, b"x").unwrap();
    for old in [&complete, &half, &not_ours] {
        let file = std::fs::File::options().write(true).open(old).unwrap();
        file.set_modified(std::time::SystemTime::now() - Duration::from_secs(600))
            .unwrap();
    }
    let (library, report) = Library::open(dir.path()).unwrap();
    assert_eq!((report.recovered, report.removed_partial), (1, 1));
    assert!(dir.path().join("20261128-101010-5.png").is_file());
    assert!(!complete.exists() && !half.exists());
    assert!(
        fresh.exists(),
        "a young temporary file may still be written"
    );
    assert!(
        not_ours.exists(),
        "only our own temporary files are touched"
    );
    let entries = library.search(&GalleryQuery::default()).unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].metadata.prompt, "kept");
}

#[test]
fn a_png_claiming_a_huge_size_is_listed_not_decoded() {
    // Issue 15.2: a 370-byte PNG with a 100000x100000 header aborted every gallery open.
    let dir = tempfile::tempdir().unwrap();
    let bomb = dir.path().join("bomb.png");
    std::fs::write(
        &bomb,
        raw_png(&[
            (b"IHDR", ihdr(100_000, 100_000)),
            (
                b"IDAT",
                vec![0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
            ),
            (b"IEND", vec![]),
        ]),
    )
    .unwrap();
    let output = run_bounded(
        atelier()
            .args(["gallery", "list", "--library"])
            .arg(dir.path()),
        Duration::from_secs(60),
    );
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("1 of 1 images"),
        "{}",
        stderr(&output)
    );
    let error = decode_rgb_bounded(&bomb).unwrap_err().to_string();
    assert!(error.contains("larger than Atelier decodes"), "{error}");
    let (mut library, _) = Library::open(dir.path()).unwrap();
    let error = library.import(&bomb).unwrap_err().to_string();
    assert!(error.contains("bomb.png"), "{error}");
    let thumb = atelier::gallery::library::thumbnail(dir.path(), "bomb.png", 128);
    assert!(thumb.is_err());
}

#[test]
fn a_fifo_named_like_a_png_is_skipped_not_read() {
    // Issue 15.3: a FIFO named x.png hung `gallery list` and `compare --library` forever.
    let dir = tempfile::tempdir().unwrap();
    write_png(
        &dir.path().join("real.png"),
        &pixels(1),
        &[("parameters", "real\nSteps: 1, Seed: 1, Size: 16x12")],
    )
    .unwrap();
    let fifo = dir.path().join("x.png");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let output = run_bounded(
        atelier()
            .args(["gallery", "list", "--library"])
            .arg(dir.path()),
        Duration::from_secs(60),
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stderr(&output);
    assert!(text.contains("skipped x.png: not a regular file"), "{text}");
    assert!(text.contains("1 of 1 images"), "{text}");
    let (mut library, _) = Library::open(dir.path()).unwrap();
    assert!(library.import(&fifo).is_err());
}

#[test]
fn a_busy_index_is_reported_and_left_alone() {
    // Issue 15.4: a lock held for more than 5 s got the live index renamed to index.corrupt-*.
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut library, _) = Library::open(dir.path()).unwrap();
        library.save(&pixels(1), &Default::default()).unwrap();
    }
    // Another process holds the write lock while a new image waits to be indexed.
    let index = dir.path().join(".atelier/index.sqlite3");
    let holder = rusqlite::Connection::open(&index).unwrap();
    holder.execute_batch("BEGIN IMMEDIATE").unwrap();
    write_png(&dir.path().join("new.png"), &pixels(2), &[]).unwrap();
    let error = match Library::open(dir.path()) {
        Err(error) => error,
        Ok(_) => panic!("opened while another process held the write lock"),
    };
    assert!(matches!(error, GalleryError::Busy), "{error}");
    assert!(error.to_string().contains("busy"), "{error}");
    let aside = std::fs::read_dir(dir.path().join(".atelier"))
        .unwrap()
        .any(|e| e.unwrap().file_name().to_string_lossy().contains("corrupt"));
    assert!(!aside, "a busy index is not corrupt");
    holder.execute_batch("COMMIT").unwrap();
    drop(holder);
    let (library, _) = Library::open(dir.path()).unwrap();
    assert_eq!(library.count().unwrap(), 2);
}

/// Runs `gallery list` on `library` with the folder mounted read-only (root: a private mount
/// namespace with a read-only bind mount; others: the folder's write bits removed).
fn list_read_only(library: &Path) -> Output {
    let binary = env!("CARGO_BIN_EXE_atelier");
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if is_root {
        let script = format!(
            "mount --bind -o ro '{lib}' '{lib}' && exec '{binary}' gallery list --library '{lib}'",
            lib = library.display()
        );
        let output = Command::new("unshare")
            .args(["-m", "sh", "-c", &script])
            .output()
            .unwrap();
        assert!(
            !stderr(&output).contains("mount:") && !stderr(&output).contains("unshare:"),
            "cannot make a read-only mount here: {}",
            stderr(&output)
        );
        output
    } else {
        use std::os::unix::fs::PermissionsExt;
        let set_mode = |path: &Path, mode| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        let meta = library.join(".atelier");
        set_mode(&meta, 0o555);
        set_mode(library, 0o555);
        let output = atelier()
            .args(["gallery", "list", "--library"])
            .arg(library)
            .output()
            .unwrap();
        set_mode(library, 0o755);
        set_mode(&meta, 0o755);
        output
    }
}

#[test]
fn a_read_only_library_is_listed_read_only() {
    // Issue 15.4: "attempt to write a readonly database"; a read-only index was renamed away.
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut library, _) = Library::open(dir.path()).unwrap();
        for seed in 0..3u8 {
            let metadata = atelier::gallery::record::ImageMetadata {
                prompt: format!("lighthouse {seed}"),
                seed: Some(seed as u64),
                ..Default::default()
            };
            library.save(&pixels(seed), &metadata).unwrap();
        }
    }
    // One image arrives after the index was written: a read-only open must still show it.
    write_png(
        &dir.path().join("late.png"),
        &pixels(9),
        &[("parameters", "late arrival\nSteps: 1, Seed: 9, Size: 16x12")],
    )
    .unwrap();
    let output = list_read_only(dir.path());
    let text = stderr(&output);
    assert!(output.status.success(), "{text}");
    assert!(text.contains("opened read-only"), "{text}");
    assert!(text.contains("4 of 4 images"), "{text}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("late arrival") && stdout.contains("lighthouse 2"));
    let aside = std::fs::read_dir(dir.path().join(".atelier"))
        .unwrap()
        .any(|e| e.unwrap().file_name().to_string_lossy().contains("corrupt"));
    assert!(!aside);
}

#[test]
fn oversized_text_chunks_are_left_out_and_the_image_stays() {
    // Issue 15.7: a zTXt chunk expanding to 400 MB took 33 s and 3.4 GB to index; a valid PNG
    // with a 32 MB text chunk disappeared from the gallery.
    let dir = tempfile::tempdir().unwrap();
    // 64 MiB of text in a few kB.
    let compressed = miniz_oxide::deflate::compress_to_vec_zlib(&vec![b'a'; 64 << 20], 6);
    let mut bomb_chunk = b"parameters\0\0".to_vec();
    bomb_chunk.extend_from_slice(&compressed);
    let idat = {
        // One 16x12 RGB image, filter byte 0 on each row, stored zlib.
        let raw = vec![0u8; 12 * (1 + 16 * 3)];
        miniz_oxide::deflate::compress_to_vec_zlib(&raw, 6)
    };
    std::fs::write(
        dir.path().join("bomb.png"),
        raw_png(&[
            (b"IHDR", ihdr(16, 12)),
            (b"zTXt", bomb_chunk),
            (b"IDAT", idat.clone()),
            (b"IEND", vec![]),
        ]),
    )
    .unwrap();
    let mut huge_comment = b"Comment\0".to_vec();
    huge_comment.extend(std::iter::repeat_n(b'x', 32 << 20));
    let mut parameters = b"parameters\0".to_vec();
    parameters.extend_from_slice(b"a quiet harbour\nSteps: 20, Seed: 3, Size: 16x12");
    std::fs::write(
        dir.path().join("big.png"),
        raw_png(&[
            (b"IHDR", ihdr(16, 12)),
            (b"tEXt", huge_comment),
            (b"tEXt", parameters),
            (b"IDAT", idat),
            (b"IEND", vec![]),
        ]),
    )
    .unwrap();
    let started = Instant::now();
    let (library, report) = Library::open(dir.path()).unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(library.count().unwrap(), 2);
    assert_eq!(report.notes.len(), 2, "{report:?}");
    let harbour = library
        .search(&GalleryQuery {
            text: "harbour".into(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(harbour.len(), 1, "the big file keeps its parameters");
    assert_eq!(harbour[0].metadata.seed, Some(3));
    let index_bytes = std::fs::metadata(dir.path().join(".atelier/index.sqlite3"))
        .unwrap()
        .len()
        + std::fs::metadata(dir.path().join(".atelier/index.sqlite3-wal"))
            .map(|m| m.len())
            .unwrap_or(0);
    assert!(index_bytes < 4 << 20, "index grew to {index_bytes} bytes");
    let text = read_text_bounded(&dir.path().join("bomb.png")).unwrap();
    assert!(text.chunks.is_empty());
    assert!(text.skipped[0].contains("expands to more than"), "{text:?}");
}

#[test]
fn a_lying_npy_header_is_an_error_not_an_abort() {
    // Issue 15.6: a 192-byte .npy claiming shape (2^40,) aborted `generate`.
    let dir = tempfile::tempdir().unwrap();
    let npy = dir.path().join("noise.npy");
    let mut header =
        "{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776,), }".to_string();
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&[0u8; 64]);
    std::fs::write(&npy, &bytes).unwrap();
    let output = run_bounded(
        atelier()
            .args(["generate", "--model"])
            .arg(model_dir("sd1"))
            .args(["--prompt", "a fox", "--steps", "1", "--device", "cpu"])
            .arg("--init-noise")
            .arg(&npy)
            .arg("--out")
            .arg(dir.path().join("x.png")),
        Duration::from_secs(120),
    );
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("1099511627776 values) but the file holds 64 bytes"),
        "{}",
        stderr(&output)
    );
}

/// A copy of the SD 1.x fixture with `edit` applied to one component's config.
fn fixture_with_config(
    dir: &Path,
    component: &str,
    file: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> PathBuf {
    let model = dir.join("model");
    let source = model_dir("sd1");
    for entry in walk(&source) {
        let target = model.join(entry.strip_prefix(&source).unwrap());
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(&entry, &target).unwrap();
    }
    let path = model.join(component).join(file);
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, config.to_string()).unwrap();
    model
}

fn walk(folder: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(folder).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[test]
fn bad_configs_name_the_field_instead_of_panicking() {
    // Issue 15.5: exit 101 on attention_head_dim 0, num_attention_heads 0 and trained_betas [];
    // "steps must be between 1 and 0"; "differ in length" when every list was empty.
    let cases: [(&str, &str, &str, serde_json::Value, &str); 5] = [
        (
            "unet",
            "config.json",
            "attention_head_dim",
            0.into(),
            "attention_head_dim must be between 1",
        ),
        (
            "text_encoder",
            "config.json",
            "num_attention_heads",
            0.into(),
            "num_attention_heads must be between 1",
        ),
        (
            "scheduler",
            "scheduler_config.json",
            "trained_betas",
            serde_json::json!([]),
            "trained_betas has 0 values",
        ),
        (
            "scheduler",
            "scheduler_config.json",
            "num_train_timesteps",
            0.into(),
            "num_train_timesteps must be between 1",
        ),
        (
            "unet",
            "config.json",
            "block_out_channels",
            serde_json::json!([]),
            "block_out_channels is empty",
        ),
    ];
    for (component, file, field, value, message) in cases {
        let dir = tempfile::tempdir().unwrap();
        let model = fixture_with_config(dir.path(), component, file, |config| {
            config[field] = value.clone();
            if field == "block_out_channels" {
                config["down_block_types"] = serde_json::json!([]);
                config["up_block_types"] = serde_json::json!([]);
            }
        });
        let output = atelier()
            .args(["generate", "--model"])
            .arg(&model)
            .args([
                "--prompt", "a fox", "--steps", "2", "--device", "cpu", "--out",
            ])
            .arg(dir.path().join("x.png"))
            .output()
            .unwrap();
        let text = stderr(&output);
        assert_eq!(output.status.code(), Some(1), "{field}: {text}");
        assert!(text.contains(message), "{field}: {text}");
        assert!(
            text.contains(file),
            "{field}: the message names the file: {text}"
        );
    }
    // The scheduler command reads configs too.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("scheduler_config.json");
    std::fs::write(&config, r#"{"trained_betas": []}"#).unwrap();
    let output = atelier()
        .args(["schedulers", "--samples", "100", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains("trained_betas has 0 values"));
}

#[test]
fn outputs_are_checked_before_any_work() {
    // Issue 15.8: work lost late.
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str], out: &Path| {
        atelier()
            .args(args)
            .arg("--model")
            .arg(model_dir("sd1"))
            .args(["--prompt", "a fox", "--device", "cpu", "--out"])
            .arg(out)
            .output()
            .unwrap()
    };
    let missing = dir.path().join("no/such/folder/grid.png");
    let output = run(&["compare", "--scheduler", "euler,ddim"], &missing);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("does not exist (nothing was generated)"),
        "{}",
        stderr(&output)
    );
    // --save-latents must be a .npy: it can no longer replace the PNG with NumPy data.
    let out = dir.path().join("same.png");
    let output = atelier()
        .args(["generate", "--model"])
        .arg(model_dir("sd1"))
        .args(["--prompt", "a fox", "--steps", "1", "--device", "cpu"])
        .arg("--save-latents")
        .arg(&out)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("--save-latents must name a .npy file"));
    assert!(!out.exists());
    // compare takes .PNG as generate does.
    let upper = dir.path().join("GRID.PNG");
    let output = run(&["compare", "--scheduler", "euler", "--steps", "1"], &upper);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(upper.is_file());
}

#[test]
fn a_flat_result_is_an_error_not_an_image() {
    // Issue 15.10: guidance 1e308 or all-NaN initial noise gave a flat image with exit 0.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("flat.png");
    let output = atelier()
        .args(["generate", "--model"])
        .arg(model_dir("sd1"))
        .args(["--prompt", "a fox", "--steps", "2", "--device", "cpu"])
        .args(["--guidance", "1e308", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("not finite"),
        "{}",
        stderr(&output)
    );
    assert!(!out.exists());

    let model = load_model("sd1");
    let request = atelier::engine::pipeline::GenerationRequest {
        prompt: "a fox".into(),
        steps: 2,
        width: 64,
        height: 64,
        ..Default::default()
    };
    let shape = model.latent_shape(&request);
    let nan =
        candle_core::Tensor::full(f32::NAN, shape.to_vec(), &candle_core::Device::Cpu).unwrap();
    let error = match model.generate(
        &request,
        Some(&nan),
        Default::default(),
        &std::sync::atomic::AtomicBool::new(false),
        &mut |_| {},
    ) {
        Err(error) => error.to_string(),
        Ok(_) => panic!("NaN noise made an image"),
    };
    assert!(error.contains("NaN"), "{error}");
}

#[test]
fn the_gallery_command_line_says_what_it_means() {
    // Issue 15.10: a typo'd --library made an empty library; --limit >= 2^63 failed with
    // "datatype mismatch"; rebuild skipped corrupt PNGs without naming them; OS errors were
    // printed twice.
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("libary");
    let output = atelier()
        .args(["gallery", "list", "--library"])
        .arg(&typo)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("the folder does not exist"));
    assert!(!typo.exists());

    let library = dir.path().join("library");
    {
        let (mut opened, _) = Library::open(&library).unwrap();
        opened.save(&pixels(1), &Default::default()).unwrap();
    }
    std::fs::write(library.join("broken.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let output = atelier()
        .args([
            "gallery",
            "list",
            "--limit",
            "18446744073709551615",
            "--library",
        ])
        .arg(&library)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("1 of 1 images"),
        "{}",
        stderr(&output)
    );
    let output = atelier()
        .args(["gallery", "rebuild", "--library"])
        .arg(&library)
        .output()
        .unwrap();
    assert!(output.status.success());
    let text = stderr(&output);
    assert!(text.contains("skipped broken.png"), "{text}");
    assert!(text.contains("1 images indexed, 1 skipped"), "{text}");

    let output = atelier()
        .args(["generate", "--model"])
        .arg(model_dir("sd1"))
        .args(["--prompt", "x", "--device", "cpu", "--init-noise"])
        .arg(dir.path().join("missing.npy"))
        .arg("--out")
        .arg(dir.path().join("x.png"))
        .output()
        .unwrap();
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert_eq!(text.matches("os error 2").count(), 1, "{text}");
}

#[test]
fn searches_for_symbols_match_symbols() {
    // Issue 15.10: a search for only an emoji or punctuation returned every image.
    let dir = tempfile::tempdir().unwrap();
    let (mut library, _) = Library::open(dir.path()).unwrap();
    for (seed, prompt) in ["a dragon 🐉 at night", "a castle (detailed)", "plain fox"]
        .into_iter()
        .enumerate()
    {
        let metadata = atelier::gallery::record::ImageMetadata {
            prompt: prompt.into(),
            seed: Some(seed as u64),
            ..Default::default()
        };
        library.save(&pixels(seed as u8), &metadata).unwrap();
    }
    let find = |text: &str| -> Vec<String> {
        library
            .search(&GalleryQuery {
                text: text.into(),
                ..Default::default()
            })
            .unwrap()
            .into_iter()
            .map(|e| e.metadata.prompt)
            .collect()
    };
    assert_eq!(find("🐉"), vec!["a dragon 🐉 at night"]);
    assert_eq!(find("🦊"), Vec::<String>::new());
    assert_eq!(find("("), vec!["a castle (detailed)"]);
    assert_eq!(find("dragon 🐉"), vec!["a dragon 🐉 at night"]);
    assert_eq!(find("fox").len(), 1);
    assert_eq!(find("  ").len(), 3);
}

#[test]
fn file_names_that_are_not_utf8_are_named_not_merged() {
    // Issue 15.10: two non-UTF-8 names collided in the index (rebuild counted 10, list 9).
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    for (i, name) in [&b"caf\xe9-1.png"[..], &b"caf\xe9-2.png"[..]]
        .iter()
        .enumerate()
    {
        let path = dir.path().join(std::ffi::OsStr::from_bytes(name));
        write_png(
            &path,
            &pixels(i as u8),
            &[("parameters", "cafe\nSteps: 1, Seed: 1, Size: 16x12")],
        )
        .unwrap();
    }
    write_png(&dir.path().join("plain.png"), &pixels(7), &[]).unwrap();
    let (mut library, report) = Library::open(dir.path()).unwrap();
    assert_eq!(library.count().unwrap(), 1);
    assert_eq!(report.skipped.len(), 2, "{report:?}");
    assert!(report.skipped[0].1.contains("not valid UTF-8"));
    let rebuilt = library.rebuild().unwrap();
    assert_eq!((rebuilt.added, rebuilt.skipped.len()), (1, 2));
    assert_eq!(library.count().unwrap(), 1);
}
