//! Generation parameters in the PNG formats artists already use.
//!
//! The AUTOMATIC1111 `parameters` text chunk: prompt lines, an optional `Negative prompt:` line,
//! then one line of `Key: value` pairs joined by ", " (values with `,`, `:` or a newline are
//! JSON-quoted).

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use image::RgbImage;

/// The PNG text keyword of AUTOMATIC1111's parameters.
pub const PARAMETERS_KEYWORD: &str = "parameters";

/// What A1111's `parameters` chunk says about an image.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct A1111Parameters {
    /// The prompt (may span lines).
    pub prompt: String,
    /// The negative prompt, empty if none.
    pub negative_prompt: String,
    /// The `Key: value` pairs, in order.
    pub pairs: Vec<(String, String)>,
}

impl A1111Parameters {
    /// The parameters of one generated image, in A1111's order and wording.
    pub fn for_request(
        request: &crate::engine::pipeline::GenerationRequest,
        model_name: &str,
    ) -> Self {
        let mut pairs = vec![
            ("Steps".to_string(), request.steps.to_string()),
            (
                "Sampler".to_string(),
                request.scheduler.display_name().to_string(),
            ),
        ];
        if request.sigmas != crate::schedulers::SigmaSchedule::Default {
            pairs.push(("Schedule type".into(), request.sigmas.display_name().into()));
        }
        if request.scheduler == crate::schedulers::SchedulerKind::Ddim && request.eta > 0.0 {
            // A1111's key for DDIM's eta.
            pairs.push(("Eta DDIM".into(), request.eta.to_string()));
        }
        pairs.extend([
            ("CFG scale".to_string(), request.guidance_scale.to_string()),
            ("Seed".to_string(), request.seed.to_string()),
            (
                "Size".to_string(),
                format!("{}x{}", request.width, request.height),
            ),
        ]);
        if request.clip_skip > 1 {
            pairs.push(("Clip skip".into(), request.clip_skip.to_string()));
        }
        pairs.extend([
            ("Model".to_string(), model_name.to_string()),
            (
                "Version".to_string(),
                format!("atelier {}", env!("CARGO_PKG_VERSION")),
            ),
        ]);
        Self {
            prompt: request.prompt.clone(),
            negative_prompt: request.negative_prompt.clone(),
            pairs,
        }
    }

    /// Adds A1111's entries for a picture worked on: the denoising strength, and for a mask its
    /// blur, masked content and "only masked" area.
    pub fn push_image_options(
        &mut self,
        options: &crate::engine::pipeline::ImageOptions,
        inpainting: bool,
    ) {
        self.pairs
            .push(("Denoising strength".into(), options.strength.to_string()));
        if inpainting {
            self.pairs
                .push(("Mask blur".into(), options.mask_blur.to_string()));
            self.pairs.push((
                "Masked content".into(),
                options.masked_content.display_name().into(),
            ));
            if let Some(padding) = options.only_masked_padding {
                self.pairs
                    .push(("Inpaint area".into(), "Only masked".into()));
                self.pairs
                    .push(("Masked area padding".into(), padding.to_string()));
            }
        }
    }

    /// Adds A1111's entries for a hires fix whose first pass had `steps` steps.
    pub fn push_hires(&mut self, hires: &crate::engine::pipeline::HiresFix, steps: usize) {
        self.pairs.extend([
            ("Denoising strength".into(), hires.strength.to_string()),
            ("Hires upscale".into(), hires.scale.to_string()),
            (
                "Hires steps".into(),
                hires.steps.unwrap_or(steps).to_string(),
            ),
            (
                "Hires upscaler".into(),
                hires.upscaler.display_name().into(),
            ),
        ]);
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Renders the chunk text.
    pub fn to_text(&self) -> String {
        let mut text = self.prompt.clone();
        if !self.negative_prompt.is_empty() {
            text.push_str("\nNegative prompt: ");
            text.push_str(&self.negative_prompt);
        }
        let pairs: Vec<String> = self
            .pairs
            .iter()
            .map(|(k, v)| format!("{k}: {}", quote_value(v)))
            .collect();
        if !pairs.is_empty() {
            text.push('\n');
            text.push_str(&pairs.join(", "));
        }
        text
    }

    /// Parses chunk text as A1111 does: the last line holds the parameters only if it has at
    /// least 3 pairs.
    pub fn parse(text: &str) -> Self {
        let mut lines: Vec<&str> = text.trim().split('\n').collect();
        let mut pairs = Vec::new();
        if let Some(last) = lines.last() {
            let parsed = parse_pairs(last);
            if parsed.len() >= 3 {
                pairs = parsed;
                lines.pop();
            }
        }
        let mut prompt_lines = Vec::new();
        let mut negative_lines = Vec::new();
        let mut in_negative = false;
        for line in lines {
            if let Some(rest) = line.strip_prefix("Negative prompt:") {
                in_negative = true;
                negative_lines.push(rest.trim_start());
            } else if in_negative {
                negative_lines.push(line);
            } else {
                prompt_lines.push(line);
            }
        }
        Self {
            prompt: prompt_lines.join("\n").trim().to_string(),
            negative_prompt: negative_lines.join("\n").trim().to_string(),
            pairs,
        }
    }
}

fn quote_value(value: &str) -> String {
    if value.contains([',', ':', '\n', '"']) {
        serde_json::to_string(value).unwrap_or_else(|_| value.replace(',', " "))
    } else {
        value.to_string()
    }
}

/// Splits `Key: value, Key: "quoted, value", ...`.
fn parse_pairs(line: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let chars: Vec<char> = line.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        while i < chars.len() && (chars[i] == ' ' || chars[i] == ',') {
            i += 1;
        }
        let key_start = i;
        while i < chars.len() && chars[i] != ':' && chars[i] != ',' {
            i += 1;
        }
        if i >= chars.len() || chars[i] != ':' {
            return pairs;
        }
        let key: String = chars[key_start..i]
            .iter()
            .collect::<String>()
            .trim()
            .to_string();
        i += 1;
        while i < chars.len() && chars[i] == ' ' {
            i += 1;
        }
        let value = if i < chars.len() && chars[i] == '"' {
            let start = i;
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i = (i + 1).min(chars.len());
            let raw: String = chars[start..i].iter().collect();
            serde_json::from_str::<String>(&raw).unwrap_or(raw)
        } else {
            let start = i;
            while i < chars.len() && chars[i] != ',' {
                i += 1;
            }
            chars[start..i]
                .iter()
                .collect::<String>()
                .trim()
                .to_string()
        };
        if key.is_empty() {
            return pairs;
        }
        pairs.push((key, value));
    }
    pairs
}

/// Errors reading or writing PNG files.
#[derive(Debug, thiserror::Error)]
pub enum PngError {
    /// The file could not be read or written.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        error: std::io::Error,
    },
    /// The PNG encoder or decoder failed (corrupt file, ...).
    #[error("{path}: not a readable image ({message})")]
    Format {
        /// The file.
        path: String,
        /// What the decoder said.
        message: String,
    },
}

/// Checks that a file can be created in `folder` by creating (and removing) one: permission
/// bits say nothing for root, and nothing about read-only mounts.
pub fn probe_writable(folder: &Path) -> std::io::Result<()> {
    let probe = folder.join(format!(
        ".atelier-probe-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// A temporary name beside `file_name` in `folder` that no other process or machine picks: the
/// final name, this process's id and a random token (`.NAME.PID.TOKEN.tmp`).
/// [`parse_temp_name`] reads it back, so that a file left by a crash can be recovered.
pub fn temp_path_for(folder: &Path, file_name: &str) -> PathBuf {
    let token: u32 = rand::random();
    folder.join(format!(
        ".{file_name}.{}.{token:08x}.tmp",
        std::process::id()
    ))
}

/// A temporary file's intended name and its writer's process id, from
/// `.NAME.PID.TOKEN.tmp` (or the older `.NAME.PID.tmp`); `None` for any other name.
pub fn parse_temp_name(temp_name: &str) -> Option<(String, u32)> {
    let inner = temp_name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let is_png_name = |name: &str| {
        !name.starts_with('.')
            && Path::new(name)
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("png"))
    };
    let (head, last) = inner.rsplit_once('.')?;
    // .NAME.PID.TOKEN.tmp
    if last.len() == 8
        && last.chars().all(|c| c.is_ascii_hexdigit())
        && let Some((name, pid)) = head.rsplit_once('.')
        && let Ok(pid) = pid.parse()
        && is_png_name(name)
    {
        return Some((name.to_string(), pid));
    }
    // .NAME.PID.tmp (before the token was added)
    let pid = last.parse().ok()?;
    is_png_name(head).then(|| (head.to_string(), pid))
}

/// Encodes `image` with its text chunks into a new temporary file in `folder` (synced to disk),
/// named for `file_name`; returns the temporary file's path. Nothing is left behind on error.
fn write_png_temp(
    folder: &Path,
    file_name: &str,
    image: &RgbImage,
    text_chunks: &[(&str, &str)],
) -> Result<PathBuf, PngError> {
    let temp_path = temp_path_for(folder, file_name);
    let display = temp_path.display().to_string();
    let io_error = |error| PngError::Io {
        path: display.clone(),
        error,
    };
    let format_error = |e: png::EncodingError| PngError::Format {
        path: display.clone(),
        message: e.to_string(),
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temp_path)
        .map_err(io_error)?;
    let result = (|| {
        let mut buffered = BufWriter::new(file);
        let mut encoder = png::Encoder::new(&mut buffered, image.width(), image.height());
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        for (keyword, text) in text_chunks {
            if text.chars().all(|c| (c as u32) < 256) {
                encoder
                    .add_text_chunk((*keyword).to_string(), (*text).to_string())
                    .map_err(format_error)?;
            } else {
                encoder
                    .add_itxt_chunk((*keyword).to_string(), (*text).to_string())
                    .map_err(format_error)?;
            }
        }
        let mut writer = encoder.write_header().map_err(format_error)?;
        writer
            .write_image_data(image.as_raw())
            .map_err(format_error)?;
        writer.finish().map_err(format_error)?;
        buffered.flush().map_err(io_error)?;
        buffered.get_ref().sync_all().map_err(io_error)
    })();
    match result {
        Ok(()) => Ok(temp_path),
        Err(error) => {
            let _ = std::fs::remove_file(&temp_path);
            Err(error)
        }
    }
}

fn folder_and_name(path: &Path) -> (&Path, String) {
    let folder = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image.png".into());
    (folder, file_name)
}

/// Writes `image` as a PNG with text chunks, atomically: a temporary file in the same folder,
/// then a rename over `path`, so a crash never leaves half an image.
pub fn write_png(
    path: &Path,
    image: &RgbImage,
    text_chunks: &[(&str, &str)],
) -> Result<(), PngError> {
    let (folder, file_name) = folder_and_name(path);
    let temp_path = write_png_temp(folder, &file_name, image, text_chunks)?;
    std::fs::rename(&temp_path, path).map_err(|error| {
        let _ = std::fs::remove_file(&temp_path);
        PngError::Io {
            path: path.display().to_string(),
            error,
        }
    })
}

/// Gives the finished file `temp` the name `target` only if no file has it, atomically even
/// between processes and machines sharing the folder: a hard link fails when the name exists;
/// where the filesystem has no hard links, the name is claimed with an exclusive create and
/// then replaced by the file. `AlreadyExists` when the name is taken; `temp` is kept then.
pub fn publish_no_clobber(temp: &Path, target: &Path) -> std::io::Result<()> {
    match std::fs::hard_link(temp, target) {
        Ok(()) => {
            let _ = std::fs::remove_file(temp);
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(e),
        Err(_) => {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(target)?;
            std::fs::rename(temp, target)
        }
    }
}

/// Writes `image` into `folder` under the first name that `candidate(n)` (n = 1, 2, ...) gives
/// that no file has, never replacing a file, even one that another process creates meanwhile.
/// Returns the name taken.
pub fn write_png_new(
    folder: &Path,
    candidate: impl Fn(usize) -> String,
    image: &RgbImage,
    text_chunks: &[(&str, &str)],
) -> Result<String, PngError> {
    let temp_path = write_png_temp(folder, &candidate(1), image, text_chunks)?;
    publish_temp(folder, &temp_path, candidate)
}

/// Publishes the finished temporary file `temp_path` in `folder` under the first free name
/// that `candidate(n)` gives (see [`write_png_new`]); removes it on error.
pub fn publish_temp(
    folder: &Path,
    temp_path: &Path,
    candidate: impl Fn(usize) -> String,
) -> Result<String, PngError> {
    for n in 1..=100_000 {
        let name = candidate(n);
        let target = folder.join(&name);
        match publish_no_clobber(temp_path, &target) {
            Ok(()) => return Ok(name),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(error) => {
                let _ = std::fs::remove_file(temp_path);
                return Err(PngError::Io {
                    path: target.display().to_string(),
                    error,
                });
            }
        }
    }
    let _ = std::fs::remove_file(temp_path);
    Err(PngError::Io {
        path: folder.display().to_string(),
        error: std::io::Error::other("no free file name"),
    })
}

/// Reads every text chunk (tEXt, zTXt, iTXt) of a PNG, keyword to text, wherever it sits in the
/// file, without decoding the pixels and within the limits of [`super::png_read`] (oversized
/// chunks are left out; [`super::png_read::read_text_bounded`] says which).
pub fn read_png_text(path: &Path) -> Result<BTreeMap<String, String>, PngError> {
    Ok(super::png_read::read_text_bounded(path)?.chunks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_quoted_values() {
        let params = A1111Parameters {
            prompt: "a castle on a hill, (golden hour:1.2)\nsecond line".into(),
            negative_prompt: "blurry, lowres".into(),
            pairs: vec![
                ("Steps".into(), "20".into()),
                ("Sampler".into(), "DPM++ 2M".into()),
                ("CFG scale".into(), "7".into()),
                ("Model".into(), "org/model: v2, final".into()),
                ("Size".into(), "512x768".into()),
            ],
        };
        let parsed = A1111Parameters::parse(&params.to_text());
        assert_eq!(parsed, params);
        assert!(
            params
                .to_text()
                .contains(r#"Model: "org/model: v2, final""#)
        );
    }

    #[test]
    fn parses_a1111_text() {
        let text = "a castle on a hill, (golden hour:1.2)\nNegative prompt: blurry, lowres\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234567890, Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1";
        let parsed = A1111Parameters::parse(text);
        assert_eq!(parsed.prompt, "a castle on a hill, (golden hour:1.2)");
        assert_eq!(parsed.negative_prompt, "blurry, lowres");
        assert_eq!(parsed.get("Seed"), Some("1234567890"));
        assert_eq!(parsed.get("Schedule type"), Some("Karras"));
        assert_eq!(parsed.get("Size"), Some("512x768"));
    }

    #[test]
    fn last_line_with_fewer_than_three_pairs_is_prompt() {
        let parsed = A1111Parameters::parse("a cat\nstyle: oil, mood: calm");
        assert_eq!(parsed.prompt, "a cat\nstyle: oil, mood: calm");
        assert!(parsed.pairs.is_empty());
    }
}
