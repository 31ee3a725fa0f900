//! Textual inversion embeddings: `.safetensors` files of token vectors (kohya's `emb_params`,
//! A1111's `string_to_param.*` converted to safetensors, diffusers' single `{token: vectors}`,
//! SDXL's `clip_l`/`clip_g`). The file's stem in a prompt stands for its vectors, one token
//! position each (A1111's and diffusers' `load_textual_inversion` behaviour). A1111's `.pt`
//! files are pickles and are refused with the way out (convert to safetensors).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::error::{EngineError, Result};

/// One embedding file.
#[derive(Debug, Clone)]
pub struct TextualInversion {
    /// The word that triggers it: the file's stem.
    pub name: String,
    /// The file.
    pub path: PathBuf,
    /// Its vectors `(n, width)` for each text encoder it has vectors for, by the encoder's
    /// width: one entry for SD 1.x/2.x files, `clip_l` and `clip_g` for SDXL ones.
    pub vectors: Vec<Tensor>,
    /// A1111's short hash for `TI hashes` (SHA-256 of the file, 12 hex digits).
    pub hash: String,
}

impl TextualInversion {
    /// Reads an embedding file.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(refused) = super::checkpoint::refuse_pickle(path) {
            return Err(refused);
        }
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| EngineError::bad_file(path, e))?;
        let bad = |message: &str| EngineError::bad_file(path, message);
        let as_rows = |t: &Tensor| -> Result<Tensor> {
            let t = t.to_dtype(DType::F32)?;
            Ok(match t.rank() {
                1 => t.unsqueeze(0)?,
                2 => t,
                _ => t.reshape(((), t.dims()[t.rank() - 1]))?,
            })
        };
        let vectors = if let (Some(l), Some(g)) = (tensors.get("clip_l"), tensors.get("clip_g")) {
            vec![as_rows(l)?, as_rows(g)?]
        } else if let Some(params) = tensors.get("emb_params") {
            vec![as_rows(params)?]
        } else if let Some((_, params)) = tensors
            .iter()
            .find(|(k, _)| k.starts_with("string_to_param"))
        {
            vec![as_rows(params)?]
        } else if tensors.len() == 1 {
            let (_, only) = tensors.iter().next().ok_or_else(|| bad("empty"))?;
            vec![as_rows(only)?]
        } else {
            return Err(bad(
                "not an embedding: no emb_params, string_to_param, clip_l/clip_g or single tensor",
            ));
        };
        if vectors.iter().any(|v| v.dims()[0] == 0 || v.dims()[0] > 75) {
            return Err(bad("an embedding takes 1 to 75 token positions"));
        }
        Ok(Self {
            name: path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            path: path.to_path_buf(),
            vectors,
            hash: file_short_hash(path)?,
        })
    }

    /// Its vectors for text encoder `index` (of a model with `widths`, one per encoder), if
    /// it has them: an SDXL file's `clip_l`/`clip_g` go to the encoders in that order, a
    /// one-tensor file to a one-encoder model; the width must match.
    pub fn vectors_for(&self, index: usize, widths: &[usize]) -> Option<&Tensor> {
        let vectors = match (self.vectors.len(), widths.len()) {
            (n, m) if n == m => self.vectors.get(index)?,
            _ => return None,
        };
        (vectors.dims()[1] == *widths.get(index)?).then_some(vectors)
    }

    /// Token positions it takes.
    pub fn positions(&self) -> usize {
        self.vectors.first().map_or(0, |v| v.dims()[0])
    }
}

/// SHA-256 of a whole file, 12 hex digits (A1111's short hash of an embedding).
pub fn file_short_hash(path: &Path) -> Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let io = |e: std::io::Error| EngineError::bad_file(path, e);
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hasher = sha2::Sha256::new();
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        let read = file.read(&mut buffer).map_err(io)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hex::encode(hasher.finalize())[..12].to_string())
}

/// An embedding as one tokenizer sees it: its word and the placeholder ids its positions get
/// (ids past the vocabulary, which the text encoder reads from the embedding's vectors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddingTokens {
    /// The trigger word, lower case (CLIP's tokenizer lowercases the prompt).
    pub word: String,
    /// One id per position.
    pub ids: Vec<u32>,
}

/// Splits `text` at the embedding words (whole words, case-insensitive): `Ok(text)` pieces to
/// tokenize and `Err(index)` for embedding `index` of `embeddings`.
pub fn split_at_embeddings<'a>(
    text: &'a str,
    embeddings: &[EmbeddingTokens],
) -> Vec<std::result::Result<&'a str, usize>> {
    if embeddings.is_empty() {
        return vec![Ok(text)];
    }
    let lower = text.to_lowercase();
    // Lowercasing can change byte lengths (rare scripts): then match nothing rather than cut
    // the text at wrong places.
    if lower.len() != text.len() {
        return vec![Ok(text)];
    }
    let is_word = |c: char| c.is_alphanumeric() || c == '_' || c == '-';
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut at = 0;
    while at < text.len() {
        let boundary_before = text[..at].chars().next_back().is_none_or(|c| !is_word(c));
        let found = boundary_before
            .then(|| {
                embeddings.iter().enumerate().find(|(_, e)| {
                    lower[at..].starts_with(&e.word)
                        && text[at + e.word.len()..]
                            .chars()
                            .next()
                            .is_none_or(|c| !is_word(c))
                })
            })
            .flatten();
        match found {
            Some((index, embedding)) => {
                if start < at {
                    pieces.push(Ok(&text[start..at]));
                }
                pieces.push(Err(index));
                at += embedding.word.len();
                start = at;
            }
            None => {
                at += text[at..].chars().next().map_or(1, char::len_utf8);
            }
        }
    }
    if start < text.len() {
        pieces.push(Ok(&text[start..]));
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_split_out_whole_and_case_insensitive() {
        let embeddings = vec![
            EmbeddingTokens {
                word: "easynegative".into(),
                ids: vec![49408, 49409],
            },
            EmbeddingTokens {
                word: "ink".into(),
                ids: vec![49410],
            },
        ];
        let pieces = split_at_embeddings("EasyNegative, inky ink,ink_2 (ink)", &embeddings);
        assert_eq!(
            pieces,
            vec![
                Err(0),
                Ok(", inky "),
                Err(1),
                Ok(",ink_2 ("),
                Err(1),
                Ok(")")
            ]
        );
        assert_eq!(split_at_embeddings("plain", &[]), vec![Ok("plain")]);
    }
}

/// Embedding files read once and kept while they do not change on disk.
#[derive(Debug, Default)]
pub struct EmbeddingCache {
    files: super::file_cache::FileCache<TextualInversion>,
}

impl EmbeddingCache {
    /// Every embedding in `folders` (not their subfolders): `.safetensors` files that read as
    /// embeddings; the others, and pickles (`.pt`, `.bin`), are warnings.
    pub fn load_folders(
        &mut self,
        folders: &[PathBuf],
    ) -> (Vec<std::sync::Arc<TextualInversion>>, Vec<String>) {
        let mut found = Vec::new();
        let mut warnings = Vec::new();
        for folder in folders {
            let Ok(entries) = std::fs::read_dir(folder) else {
                warnings.push(format!(
                    "embeddings folder {} cannot be read",
                    folder.display()
                ));
                continue;
            };
            let mut paths: Vec<PathBuf> =
                entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
            paths.sort();
            for path in paths {
                let extension = path
                    .extension()
                    .and_then(|e| e.to_str())
                    .map(str::to_ascii_lowercase);
                match extension.as_deref() {
                    Some("safetensors") => match self.get(&path) {
                        Ok(embedding) => found.push(embedding),
                        Err(error) => warnings.push(error.to_string()),
                    },
                    Some("pt" | "bin") => warnings.push(format!(
                        "{} is a pickle (A1111's .pt embedding): Atelier reads .safetensors \
                         embeddings only; convert it once with a trusted tool",
                        path.display()
                    )),
                    _ => {}
                }
            }
        }
        (found, warnings)
    }

    fn get(&mut self, path: &Path) -> Result<std::sync::Arc<TextualInversion>> {
        self.files.get(path, TextualInversion::open)
    }
}

/// The warnings of embeddings left out (`(name, why)`) that `prompts` name: an embedding for
/// another family in the folder only matters when a prompt asks for it.
pub fn warnings_for_prompts(left_out: &[(String, String)], prompts: &[&str]) -> Vec<String> {
    left_out
        .iter()
        .filter(|(name, _)| {
            let word = EmbeddingTokens {
                word: name.to_lowercase(),
                ids: Vec::new(),
            };
            prompts.iter().any(|prompt| {
                split_at_embeddings(prompt, std::slice::from_ref(&word))
                    .iter()
                    .any(|piece| piece.is_err())
            })
        })
        .map(|(_, why)| why.clone())
        .collect()
}
