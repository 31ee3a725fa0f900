//! Generation parameters in the PNG formats artists already use.
//!
//! The AUTOMATIC1111 `parameters` text chunk: prompt lines, an optional `Negative prompt:` line,
//! then one line of `Key: value` pairs joined by ", " (values with `,`, `:` or a newline are
//! JSON-quoted).

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::Path;

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
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The PNG encoder or decoder failed (corrupt file, ...).
    #[error("{path}: not a readable PNG ({message})")]
    Format {
        /// The file.
        path: String,
        /// What the decoder said.
        message: String,
    },
}

/// Writes `image` as a PNG with text chunks, atomically: a temporary file in the same folder,
/// then a rename, so a crash never leaves half an image.
pub fn write_png(
    path: &Path,
    image: &RgbImage,
    text_chunks: &[(&str, &str)],
) -> Result<(), PngError> {
    let display = path.display().to_string();
    let io_error = |source| PngError::Io {
        path: display.clone(),
        source,
    };
    let format_error = |e: png::EncodingError| PngError::Format {
        path: display.clone(),
        message: e.to_string(),
    };
    let folder = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image.png".into());
    let temp_path = folder.join(format!(".{file_name}.{}.tmp", std::process::id()));
    let file = std::fs::File::create(&temp_path).map_err(io_error)?;
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
        buffered.get_ref().sync_all().map_err(io_error)?;
        drop(buffered);
        std::fs::rename(&temp_path, path).map_err(io_error)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp_path);
    }
    result
}

/// The text chunks of a PNG that come before its image data (where Atelier, A1111 (PIL),
/// ComfyUI and InvokeAI all put them), without decoding the pixels; falls back to
/// [`read_png_text`] when there are none. Fast enough to index thousands of files.
pub fn read_png_text_fast(path: &Path) -> Result<BTreeMap<String, String>, PngError> {
    let display = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| PngError::Io {
        path: display.clone(),
        source,
    })?;
    let reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .map_err(|e| PngError::Format {
            path: display.clone(),
            message: e.to_string(),
        })?;
    let chunks = text_of(reader.info());
    if chunks.is_empty() {
        return read_png_text(path);
    }
    Ok(chunks)
}

fn text_of(info: &png::Info<'_>) -> BTreeMap<String, String> {
    let mut chunks = BTreeMap::new();
    for chunk in &info.uncompressed_latin1_text {
        chunks.insert(chunk.keyword.clone(), chunk.text.clone());
    }
    for chunk in &info.compressed_latin1_text {
        if let Ok(text) = chunk.get_text() {
            chunks.insert(chunk.keyword.clone(), text);
        }
    }
    for chunk in &info.utf8_text {
        if let Ok(text) = chunk.get_text() {
            chunks.insert(chunk.keyword.clone(), text);
        }
    }
    chunks
}

/// Reads every text chunk (tEXt, zTXt, iTXt) of a PNG, keyword to text.
pub fn read_png_text(path: &Path) -> Result<BTreeMap<String, String>, PngError> {
    let display = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| PngError::Io {
        path: display.clone(),
        source,
    })?;
    let format_error = |e: png::DecodingError| PngError::Format {
        path: display.clone(),
        message: e.to_string(),
    };
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .map_err(format_error)?;
    // Text chunks may follow the image data: read the whole image to reach them.
    let mut buffer = vec![0; reader.output_buffer_size().unwrap_or(0)];
    reader.next_frame(&mut buffer).map_err(format_error)?;
    reader.finish().map_err(format_error)?;
    Ok(text_of(reader.info()))
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
