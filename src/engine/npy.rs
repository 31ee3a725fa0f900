//! Reading float32 `.npy` files from the outside (`--init-noise`), bounded: the header is
//! checked against the file's real size before anything is allocated, so a 192-byte file that
//! claims 2^40 values is an error, not an abort.

use std::io::Read;
use std::path::Path;

use candle_core::{Device, Tensor};

use super::error::{EngineError, Result};

/// The largest header read (NumPy writes 128 bytes; version 2 allows 4 GiB, which nobody needs).
const MAX_HEADER_BYTES: usize = 1 << 16;

/// What a `.npy` header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpyHeader {
    /// The dtype string (`<f4`, ...).
    pub descr: String,
    /// Column-major data.
    pub fortran_order: bool,
    /// The array's shape.
    pub shape: Vec<usize>,
    /// Bytes before the data (magic, version, length field and header).
    pub data_offset: usize,
}

impl NpyHeader {
    /// Values in the array, `None` on overflow.
    pub fn element_count(&self) -> Option<usize> {
        self.shape
            .iter()
            .try_fold(1usize, |count, &d| count.checked_mul(d))
    }
}

fn field<'a>(dict: &'a str, key: &str) -> std::result::Result<&'a str, String> {
    let quoted = [format!("'{key}'"), format!("\"{key}\"")];
    let start = quoted
        .iter()
        .find_map(|q| dict.find(q.as_str()).map(|i| i + q.len()))
        .ok_or_else(|| format!("the header has no {key:?}"))?;
    let rest = dict[start..].trim_start();
    rest.strip_prefix(':')
        .map(str::trim_start)
        .ok_or_else(|| format!("the header's {key:?} has no value"))
}

/// Parses the start of a `.npy` file (`bytes` may hold more than the header).
pub fn parse_npy_header(bytes: &[u8]) -> std::result::Result<NpyHeader, String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("not a .npy file (no \\x93NUMPY magic)".into());
    }
    let (length, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err("truncated header".into());
            }
            let length = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
            (usize::try_from(length).unwrap_or(usize::MAX), 12)
        }
        version => return Err(format!("unknown .npy version {version}")),
    };
    if length > MAX_HEADER_BYTES {
        return Err(format!("header of {length} bytes is too large"));
    }
    let end = start + length;
    let header = bytes.get(start..end).ok_or("truncated header")?;
    let dict = std::str::from_utf8(header).map_err(|_| "the header is not text".to_string())?;

    let descr_value = field(dict, "descr")?;
    let quote = descr_value
        .chars()
        .next()
        .filter(|c| *c == '\'' || *c == '"')
        .ok_or("descr is not a string")?;
    let descr = descr_value[1..]
        .split(quote)
        .next()
        .ok_or("descr is not a string")?
        .to_string();

    let fortran_value = field(dict, "fortran_order")?;
    let fortran_order = if fortran_value.starts_with("False") {
        false
    } else if fortran_value.starts_with("True") {
        true
    } else {
        return Err("fortran_order is neither True nor False".into());
    };

    let shape_value = field(dict, "shape")?;
    let inner = shape_value
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or("shape is not a tuple")?;
    let shape = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.trim_end_matches('L')
                .parse::<usize>()
                .map_err(|_| format!("shape entry {s:?} is not a size"))
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(NpyHeader {
        descr,
        fortran_order,
        shape,
        data_offset: end,
    })
}

/// Reads a little-endian float32, C-order `.npy` file as a tensor on `device`, after checking
/// that its header describes exactly the data the file holds.
pub fn read_f32_npy(path: &Path, device: &Device) -> Result<Tensor> {
    let bad = |message: String| EngineError::bad_file(path, message);
    let metadata = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if !metadata.is_file() {
        return Err(bad("not a regular file".into()));
    }
    let mut file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let mut head = Vec::new();
    (&mut file)
        .take(MAX_HEADER_BYTES as u64 + 12)
        .read_to_end(&mut head)
        .map_err(|e| bad(e.to_string()))?;
    let header = parse_npy_header(&head).map_err(bad)?;
    if header.descr != "<f4" && header.descr != "=f4" {
        return Err(bad(format!(
            "holds {} values; float32 (<f4) is needed",
            header.descr
        )));
    }
    if header.fortran_order {
        return Err(bad("is in Fortran order; C order is needed".into()));
    }
    let count = header
        .element_count()
        .ok_or_else(|| bad(format!("shape {:?} is too large", header.shape)))?;
    let expected = (count as u64)
        .checked_mul(4)
        .and_then(|bytes| bytes.checked_add(header.data_offset as u64));
    if expected != Some(metadata.len()) {
        return Err(bad(format!(
            "the header says shape {:?} ({count} values) but the file holds {} bytes of data",
            header.shape,
            metadata.len().saturating_sub(header.data_offset as u64)
        )));
    }
    let mut data = vec![0u8; count * 4];
    let already = head
        .len()
        .saturating_sub(header.data_offset)
        .min(data.len());
    data[..already].copy_from_slice(&head[header.data_offset..header.data_offset + already]);
    file.read_exact(&mut data[already..])
        .map_err(|e| bad(e.to_string()))?;
    let values: Vec<f32> = data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok(Tensor::from_vec(values, header.shape, device)?)
}
