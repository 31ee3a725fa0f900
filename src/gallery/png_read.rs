//! Bounded reading of PNG files that Atelier did not write.
//!
//! A PNG from the outside can claim any size in its header, carry text chunks that expand to
//! gigabytes, or not be a file at all (a FIFO named `x.png`). The readers here never allocate
//! more than their limits: text chunks are found by walking the chunk list (image data is
//! skipped by seeking, never decoded), each text chunk is read and decompressed only up to
//! [`MAX_TEXT_CHUNK_BYTES`], and pixels are decoded only when the header's size is within
//! [`MAX_DECODED_PIXELS`].

use std::collections::BTreeMap;
use std::io::{Seek, SeekFrom};
use std::path::Path;

use super::metadata::PngError;

/// The largest text chunk read, after decompression (A1111 parameters are a few kB, ComfyUI's
/// graphs a few hundred kB); a larger chunk is skipped and named in [`PngText::skipped`].
pub const MAX_TEXT_CHUNK_BYTES: usize = 2 << 20;
/// The most text read from one file, all chunks together.
pub const MAX_TEXT_TOTAL_BYTES: usize = 8 << 20;
/// The largest image whose pixels are decoded (16384 x 16384).
pub const MAX_DECODED_PIXELS: u64 = 16384 * 16384;

const SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];

/// The text of a PNG and what was left out of it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PngText {
    /// Keyword to text, for every text chunk (tEXt, zTXt, iTXt) within the limits.
    pub chunks: BTreeMap<String, String>,
    /// Width from the header.
    pub width: u32,
    /// Height from the header.
    pub height: u32,
    /// Text chunks that were not read, each with the reason (too large, undecodable).
    pub skipped: Vec<String>,
}

fn format_error(path: &Path, message: impl Into<String>) -> PngError {
    PngError::Format {
        path: path.display().to_string(),
        message: message.into(),
    }
}

fn io_error(path: &Path, error: std::io::Error) -> PngError {
    PngError::Io {
        path: path.display().to_string(),
        error,
    }
}

/// Opens `path` for reading only if it is a regular file: opening a FIFO or a device would
/// block or read forever.
pub fn open_regular_file(path: &Path) -> Result<std::fs::File, PngError> {
    let metadata = std::fs::metadata(path).map_err(|e| io_error(path, e))?;
    if !metadata.is_file() {
        return Err(format_error(path, "not a regular file"));
    }
    std::fs::File::open(path).map_err(|e| io_error(path, e))
}

/// Latin-1 bytes as a string (tEXt and zTXt are Latin-1).
fn latin1(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| b as char).collect()
}

fn inflate_limited(data: &[u8], limit: usize) -> Result<Vec<u8>, String> {
    miniz_oxide::inflate::decompress_to_vec_zlib_with_limit(data, limit).map_err(|e| {
        if e.status == miniz_oxide::inflate::TINFLStatus::HasMoreOutput {
            format!("expands to more than {} MiB", limit >> 20)
        } else {
            format!("bad compressed data ({:?})", e.status)
        }
    })
}

/// Decodes one text chunk's data into (keyword, text).
fn decode_text_chunk(
    kind: &[u8; 4],
    data: &[u8],
    limit: usize,
) -> Result<(String, String), String> {
    let nul = data
        .iter()
        .position(|&b| b == 0)
        .ok_or("no keyword terminator")?;
    let keyword = latin1(&data[..nul]);
    if keyword.is_empty() || keyword.len() > 79 {
        return Err("keyword must be 1-79 bytes".into());
    }
    let rest = &data[nul + 1..];
    let text = match kind {
        b"tEXt" => latin1(rest),
        b"zTXt" => {
            let (&method, compressed) = rest.split_first().ok_or("truncated zTXt")?;
            if method != 0 {
                return Err(format!("unknown compression method {method}"));
            }
            latin1(&inflate_limited(compressed, limit)?)
        }
        _ => {
            // iTXt: flag, method, language\0, translated keyword\0, text (UTF-8).
            let [flag, method, tail @ ..] = rest else {
                return Err("truncated iTXt".into());
            };
            let language_end = tail.iter().position(|&b| b == 0).ok_or("truncated iTXt")?;
            let tail = &tail[language_end + 1..];
            let translated_end = tail.iter().position(|&b| b == 0).ok_or("truncated iTXt")?;
            let body = &tail[translated_end + 1..];
            let bytes = match (flag, method) {
                (0, _) => body.to_vec(),
                (1, 0) => inflate_limited(body, limit)?,
                _ => return Err(format!("unknown compression {flag}/{method}")),
            };
            String::from_utf8(bytes).map_err(|_| "text is not UTF-8".to_string())?
        }
    };
    Ok((keyword, text))
}

/// Reads the header and every text chunk of a PNG, wherever they are in the file, within the
/// limits above. Image data is skipped, never decoded; chunk checksums of text chunks are
/// checked. A truncated file gives what was found before the cut (a PNG being written by
/// another program is read again later).
pub fn read_text_bounded(path: &Path) -> Result<PngText, PngError> {
    let file = open_regular_file(path)?;
    let file_len = file.metadata().map_err(|e| io_error(path, e))?.len();
    read_text_from(std::io::BufReader::new(file), file_len, path)
}

/// [`read_text_bounded`] on any seekable reader of `file_len` bytes (`path` names it in errors).
pub fn read_text_from(
    mut reader: impl std::io::BufRead + Seek,
    file_len: u64,
    path: &Path,
) -> Result<PngText, PngError> {
    let mut signature = [0u8; 8];
    reader
        .read_exact(&mut signature)
        .map_err(|_| format_error(path, "too short to be a PNG"))?;
    if signature != SIGNATURE {
        return Err(format_error(path, "no PNG signature"));
    }
    let mut text = PngText::default();
    let mut total_text = 0usize;
    let mut position = 8u64;
    let mut first = true;
    loop {
        let mut head = [0u8; 8];
        if reader.read_exact(&mut head).is_err() {
            if first {
                return Err(format_error(path, "no header chunk"));
            }
            break; // truncated after a whole chunk: keep what we have
        }
        let length = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let kind = [head[4], head[5], head[6], head[7]];
        if length > i32::MAX as u32 {
            return Err(format_error(path, "chunk length out of range"));
        }
        let length = length as u64;
        if position + 12 + length > file_len {
            if first {
                return Err(format_error(path, "truncated header chunk"));
            }
            break;
        }
        if first {
            if &kind != b"IHDR" || length != 13 {
                return Err(format_error(path, "the first chunk is not a header"));
            }
            let mut header = [0u8; 13];
            reader
                .read_exact(&mut header)
                .map_err(|e| io_error(path, e))?;
            text.width = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
            text.height = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
            if text.width == 0 || text.height == 0 {
                return Err(format_error(path, "zero width or height"));
            }
            let mut crc = [0u8; 4];
            reader.read_exact(&mut crc).map_err(|e| io_error(path, e))?;
            first = false;
        } else if matches!(&kind, b"tEXt" | b"zTXt" | b"iTXt") {
            let budget = MAX_TEXT_CHUNK_BYTES.min(MAX_TEXT_TOTAL_BYTES - total_text);
            if length as usize > budget {
                text.skipped.push(format!(
                    "{} chunk of {:.1} MB (limit {} MiB)",
                    String::from_utf8_lossy(&kind),
                    length as f64 / 1e6,
                    budget >> 20
                ));
                reader
                    .seek(SeekFrom::Current(length as i64 + 4))
                    .map_err(|e| io_error(path, e))?;
            } else {
                let mut data = vec![0u8; length as usize + 4];
                reader
                    .read_exact(&mut data)
                    .map_err(|e| io_error(path, e))?;
                let (body, crc) = data.split_at(length as usize);
                let mut hasher = crc32fast::Hasher::new();
                hasher.update(&kind);
                hasher.update(body);
                if hasher.finalize().to_be_bytes() != crc {
                    text.skipped.push(format!(
                        "{} chunk with a bad checksum",
                        String::from_utf8_lossy(&kind)
                    ));
                } else {
                    match decode_text_chunk(&kind, body, budget) {
                        Ok((keyword, value)) => {
                            total_text += value.len();
                            text.chunks.insert(keyword, value);
                        }
                        Err(why) => text
                            .skipped
                            .push(format!("{} chunk: {why}", String::from_utf8_lossy(&kind))),
                    }
                }
            }
        } else if &kind == b"IEND" {
            break;
        } else {
            reader
                .seek(SeekFrom::Current(length as i64 + 4))
                .map_err(|e| io_error(path, e))?;
        }
        position += 12 + length;
    }
    Ok(text)
}

/// Decodes an image's pixels as RGB, refusing images larger than [`MAX_DECODED_PIXELS`] before
/// allocating anything, and anything that is not a regular file.
pub fn decode_rgb_bounded(path: &Path) -> Result<image::RgbImage, PngError> {
    Ok(decode_bounded(path)?.to_rgb8())
}

/// Decodes an image as it is stored (any channels, 8 or 16 bits), within the same bounds as
/// [`decode_rgb_bounded`].
pub fn decode_bounded(path: &Path) -> Result<image::DynamicImage, PngError> {
    let open_reader = || -> Result<_, PngError> {
        image::ImageReader::new(std::io::BufReader::new(open_regular_file(path)?))
            .with_guessed_format()
            .map_err(|e| io_error(path, e))
    };
    let (width, height) = open_reader()?
        .into_dimensions()
        .map_err(|e| format_error(path, e.to_string()))?;
    if width as u64 * height as u64 > MAX_DECODED_PIXELS {
        return Err(format_error(
            path,
            format!("{width}x{height} is larger than Atelier decodes (16384x16384)"),
        ));
    }
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(MAX_DECODED_PIXELS * 8);
    let mut reader = open_reader()?;
    reader.limits(limits);
    reader
        .decode()
        .map_err(|e| format_error(path, e.to_string()))
}
