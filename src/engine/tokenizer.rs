//! CLIP's byte-level BPE tokenizer, from `tokenizer.json` or from `vocab.json` + `merges.txt`.

use std::path::Path;

use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::error::{EngineError, Result};
use super::prompt_syntax::{
    ChunkTokens, PromptChunk, PromptToken, chunk_prompt, parse_prompt_attention,
};
use super::source::ModelFiles;

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";
/// The pre-tokenization pattern of transformers' CLIPTokenizer.
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A prompt turned into exactly `max_length` token ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedPrompt {
    /// Start token, prompt tokens, end token, then padding.
    pub ids: Vec<u32>,
    /// Prompt tokens that did not fit and were dropped.
    pub dropped_tokens: usize,
}

/// The CLIP tokenizer of one text encoder, padding as its own config says.
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    /// `,` as a word of its own (A1111 breaks long prompts after commas).
    comma_id: Option<u32>,
    max_length: usize,
}

impl ClipTokenizer {
    /// Loads the tokenizer in `folder` (e.g. `tokenizer_2`) of a model.
    pub fn load(files: &ModelFiles, folder: &str) -> Result<Self> {
        let config = read_tokenizer_config(files, folder)?;
        let tokenizer = match files.optional(&format!("{folder}/tokenizer.json"))? {
            Some(path) => {
                Tokenizer::from_file(&path).map_err(|e| EngineError::bad_file(&path, e))?
            }
            None => {
                let vocab =
                    files.required(&format!("{folder}/vocab.json"), "tokenizer vocabulary")?;
                let merges = files.required(&format!("{folder}/merges.txt"), "tokenizer merges")?;
                from_vocab_and_merges(&vocab, &merges)?
            }
        };
        let pad_token = config.pad_token.unwrap_or_else(|| EOS.to_string());
        Self::from_parts(
            tokenizer,
            folder,
            &pad_token,
            config.bos_token.as_deref().unwrap_or(BOS),
            config.eos_token.as_deref().unwrap_or(EOS),
            config.model_max_length,
        )
    }

    /// The tokenizer of a single-file checkpoint's text encoder, from the CLIP vocabulary that
    /// ships inside Atelier: `pad` is what pads after the end token (`<|endoftext|>` for OpenAI's
    /// CLIP ViT-L, `!` for OpenCLIP's ViT-H and bigG, as their diffusers repos configure them).
    pub fn bundled(pad: &str) -> Result<Self> {
        let tokenizer = from_bundled_vocabulary()?;
        Self::from_parts(
            tokenizer,
            "the bundled CLIP vocabulary",
            pad,
            BOS,
            EOS,
            None,
        )
    }

    fn from_parts(
        mut tokenizer: Tokenizer,
        what: &str,
        pad_token: &str,
        bos_token: &str,
        eos_token: &str,
        model_max_length: Option<usize>,
    ) -> Result<Self> {
        // transformers registers the pad token as a special token: SD 2.x's "!" pad token
        // means every "!" in a prompt is tokenized on its own.
        tokenizer
            .add_special_tokens([AddedToken::from(pad_token, true)])
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        let id = |token: &str| {
            tokenizer.token_to_id(token).ok_or_else(|| {
                EngineError::Tokenizer(format!("{what}: token {token:?} is not in the vocabulary"))
            })
        };
        Ok(Self {
            bos_id: id(bos_token)?,
            eos_id: id(eos_token)?,
            pad_id: id(pad_token)?,
            comma_id: tokenizer.token_to_id(",</w>"),
            // Room for the start and end tokens and one more; CLIP's 77 at most.
            max_length: model_max_length
                .filter(|&n| (3..=77).contains(&n))
                .unwrap_or(77),
            tokenizer,
        })
    }

    /// Tokens per prompt, special tokens included (77).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The prompt's tokens without start/end tokens, untruncated.
    pub fn prompt_tokens(&self, prompt: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(prompt, false)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The prompt as A1111 reads it: emphasis parsed, `BREAK`s honoured, in chunks of
    /// `max_length - 2` tokens, each with start and end tokens and padding as this tokenizer pads
    /// (after the end token); and the token count (for the prompt box).
    pub fn chunks(&self, prompt: &str) -> Result<(Vec<PromptChunk>, usize)> {
        self.chunks_with(prompt, &[])
    }

    /// [`ClipTokenizer::chunks`] with textual inversion: each embedding's word in the prompt
    /// becomes its placeholder ids (one per vector), which the text encoder reads from the
    /// embedding's vectors.
    pub fn chunks_with(
        &self,
        prompt: &str,
        embeddings: &[super::embeddings::EmbeddingTokens],
    ) -> Result<(Vec<PromptChunk>, usize)> {
        let ids = ChunkTokens {
            bos: self.bos_id,
            eos: self.eos_id,
            comma: self.comma_id,
            chunk_length: self.max_length - 2,
        };
        // `<lora:…>` and other extra-network tags are not text (A1111 cuts them out first).
        let prompt = super::extra_networks::strip(prompt);
        let (mut chunks, count) = chunk_prompt(&parse_prompt_attention(&prompt), ids, |text| {
            let mut tokens = Vec::new();
            for piece in super::embeddings::split_at_embeddings(text, embeddings) {
                match piece {
                    Ok(text) => {
                        tokens.extend(self.prompt_tokens(text)?.into_iter().map(PromptToken::Word))
                    }
                    Err(index) => {
                        tokens.push(PromptToken::Embedding(embeddings[index].ids.clone()))
                    }
                }
            }
            Ok::<_, EngineError>(tokens)
        })?;
        if self.pad_id != self.eos_id {
            // SD 2.x pads with its own token after the end token (A1111's `id_pad`).
            for chunk in &mut chunks {
                if let Some(end) = chunk.tokens.iter().position(|&t| t == self.eos_id) {
                    for token in &mut chunk.tokens[end + 1..] {
                        *token = self.pad_id;
                    }
                }
            }
        }
        Ok((chunks, count))
    }

    /// Start token, the prompt (truncated to fit), end token, padding to `max_length`.
    pub fn tokenize(&self, prompt: &str) -> Result<TokenizedPrompt> {
        let tokens = self.prompt_tokens(prompt)?;
        let room = self.max_length - 2;
        let kept = tokens.len().min(room);
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend_from_slice(&tokens[..kept]);
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        Ok(TokenizedPrompt {
            ids,
            dropped_tokens: tokens.len() - kept,
        })
    }
}

#[derive(Debug, Default, serde::Deserialize)]
struct TokenizerConfig {
    #[serde(default, deserialize_with = "token_content")]
    pad_token: Option<String>,
    #[serde(default, deserialize_with = "token_content")]
    bos_token: Option<String>,
    #[serde(default, deserialize_with = "token_content")]
    eos_token: Option<String>,
    #[serde(default)]
    model_max_length: Option<f64>,
}

/// Tokens are written either as strings or as `{"content": "...", ...}` objects.
fn token_content<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> std::result::Result<Option<String>, D::Error> {
    let value: Option<serde_json::Value> = serde::Deserialize::deserialize(deserializer)?;
    Ok(match value {
        Some(serde_json::Value::String(s)) => Some(s),
        Some(serde_json::Value::Object(map)) => map
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    })
}

fn read_tokenizer_config(files: &ModelFiles, folder: &str) -> Result<TokenizerConfigResolved> {
    let mut merged = TokenizerConfig::default();
    // special_tokens_map.json first, tokenizer_config.json wins where both speak.
    for name in ["special_tokens_map.json", "tokenizer_config.json"] {
        if let Some(path) = files.optional(&format!("{folder}/{name}"))? {
            let text =
                std::fs::read_to_string(&path).map_err(|e| EngineError::bad_file(&path, e))?;
            let config: TokenizerConfig =
                serde_json::from_str(&text).map_err(|e| EngineError::bad_file(&path, e))?;
            merged.pad_token = config.pad_token.or(merged.pad_token);
            merged.bos_token = config.bos_token.or(merged.bos_token);
            merged.eos_token = config.eos_token.or(merged.eos_token);
            merged.model_max_length = config.model_max_length.or(merged.model_max_length);
        }
    }
    Ok(TokenizerConfigResolved {
        pad_token: merged.pad_token,
        bos_token: merged.bos_token,
        eos_token: merged.eos_token,
        model_max_length: merged
            .model_max_length
            .filter(|n| n.is_finite() && *n > 0.0)
            .map(|n| n as usize),
    })
}

struct TokenizerConfigResolved {
    pad_token: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    model_max_length: Option<usize>,
}

/// Builds the pipeline transformers' `CLIPTokenizer` builds from the two files.
fn from_vocab_and_merges(vocab: &Path, merges: &Path) -> Result<Tokenizer> {
    let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix("</w>".into())
        .unk_token(EOS.into())
        .fuse_unk(false)
        .build()
        .map_err(|e| EngineError::bad_file(vocab, e))?;
    clip_pipeline(bpe)
}

/// CLIP's vocabulary and merges as OpenAI and OpenCLIP ship them (`bpe_simple_vocab_16e6.txt.gz`),
/// inside Atelier: a single-file checkpoint carries no tokenizer.
const BUNDLED_BPE_GZ: &[u8] = include_bytes!("../../assets/clip/bpe_simple_vocab_16e6.txt.gz");

/// Merges CLIP uses from the BPE file (its first line is a version header).
const CLIP_MERGES: usize = 49152 - 256 - 2;

/// GPT-2's reversible map from bytes to printable characters, in vocabulary order.
fn bytes_to_unicode() -> Vec<char> {
    let mut bytes: Vec<u32> = (u32::from('!')..=u32::from('~'))
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars = bytes.clone();
    let mut extra = 0;
    for b in 0..256 {
        if !bytes.contains(&b) {
            bytes.push(b);
            chars.push(256 + extra);
            extra += 1;
        }
    }
    chars.into_iter().filter_map(char::from_u32).collect()
}

/// A BPE vocabulary (token per id) and its merges (pairs, in priority order).
pub type VocabAndMerges = (Vec<String>, Vec<(String, String)>);

/// The vocabulary and merges of the bundled BPE file, ids as transformers' `vocab.json` numbers them.
pub fn bundled_vocab_and_merges() -> Result<VocabAndMerges> {
    use std::io::Read;
    let mut text = String::new();
    flate2::read::GzDecoder::new(BUNDLED_BPE_GZ)
        .read_to_string(&mut text)
        .map_err(|e| EngineError::Tokenizer(format!("the bundled CLIP vocabulary: {e}")))?;
    let merges: Vec<(String, String)> = text
        .lines()
        .skip(1)
        .take(CLIP_MERGES)
        .filter_map(|line| {
            let (left, right) = line.split_once(' ')?;
            Some((left.to_string(), right.to_string()))
        })
        .collect();
    if merges.len() != CLIP_MERGES {
        return Err(EngineError::Tokenizer(format!(
            "the bundled CLIP vocabulary has {} merges, not {CLIP_MERGES}",
            merges.len()
        )));
    }
    let bytes: Vec<String> = bytes_to_unicode().into_iter().map(String::from).collect();
    let mut vocab = bytes.clone();
    vocab.extend(bytes.iter().map(|b| format!("{b}</w>")));
    vocab.extend(merges.iter().map(|(left, right)| format!("{left}{right}")));
    vocab.extend([BOS.to_string(), EOS.to_string()]);
    Ok((vocab, merges))
}

fn from_bundled_vocabulary() -> Result<Tokenizer> {
    let (vocab, merges) = bundled_vocab_and_merges()?;
    let vocab: tokenizers::models::bpe::Vocab = vocab
        .into_iter()
        .enumerate()
        .map(|(id, token)| (token, id as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix("</w>".into())
        .unk_token(EOS.into())
        .fuse_unk(false)
        .build()
        .map_err(|e| EngineError::Tokenizer(format!("the bundled CLIP vocabulary: {e}")))?;
    clip_pipeline(bpe)
}

/// The normalizer, pre-tokenizer and special tokens of transformers' `CLIPTokenizer` around `bpe`.
fn clip_pipeline(bpe: BPE) -> Result<Tokenizer> {
    let tokenizer_error =
        |e: Box<dyn std::error::Error + Send + Sync>| EngineError::Tokenizer(e.to_string());
    let mut tokenizer = Tokenizer::new(bpe);
    let normalizer = NormalizerSequence::new(vec![
        NFC.into(),
        Replace::new(
            tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
            " ",
        )
        .map_err(tokenizer_error)?
        .into(),
        Lowercase.into(),
    ]);
    tokenizer
        .with_normalizer(Some(normalizer))
        .map_err(tokenizer_error)?;
    let split = Split::new(
        SplitPattern::Regex(CLIP_PATTERN.into()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(tokenizer_error)?;
    let pre_tokenizer =
        PreTokenizerSequence::new(vec![split.into(), ByteLevel::new(false, true, true).into()]);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    tokenizer
        .add_special_tokens([AddedToken::from(BOS, true), AddedToken::from(EOS, true)])
        .map_err(tokenizer_error)?;
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/sd1/model/tokenizer")
            .join(name)
    }

    #[test]
    fn the_bundled_vocabulary_is_transformers_clip_vocabulary() {
        let (vocab, merges) = bundled_vocab_and_merges().expect("bundled vocabulary");
        let text = std::fs::read_to_string(fixture("vocab.json")).expect("fixture vocab");
        let reference: std::collections::HashMap<String, u32> =
            serde_json::from_str(&text).expect("vocab json");
        assert_eq!(vocab.len(), reference.len());
        for (id, token) in vocab.iter().enumerate() {
            assert_eq!(reference.get(token), Some(&(id as u32)), "{token}");
        }
        let text = std::fs::read_to_string(fixture("merges.txt")).expect("fixture merges");
        let reference: Vec<&str> = text.lines().skip(1).filter(|l| !l.is_empty()).collect();
        assert_eq!(merges.len(), reference.len());
        for ((left, right), line) in merges.iter().zip(&reference) {
            assert_eq!(format!("{left} {right}"), *line);
        }
    }

    #[test]
    fn the_bundled_tokenizer_tokenizes_as_the_folder_one() {
        let bundled = ClipTokenizer::bundled(EOS).expect("bundled tokenizer");
        let folder = from_vocab_and_merges(&fixture("vocab.json"), &fixture("merges.txt"))
            .expect("folder tokenizer");
        for prompt in [
            "a photo of an astronaut riding a horse, 8k!!",
            "Ünïcödé café — naïve 東京 🐱",
        ] {
            let ids = folder
                .encode(prompt, false)
                .expect("encode")
                .get_ids()
                .to_vec();
            assert_eq!(
                bundled.prompt_tokens(prompt).expect("encode"),
                ids,
                "{prompt}"
            );
        }
        let open_clip = ClipTokenizer::bundled("!").expect("bundled tokenizer");
        let chunk = &open_clip.chunks("hi").expect("chunks").0[0];
        assert_eq!(chunk.tokens[3], open_clip.pad_id, "OpenCLIP pads with !");
        assert_eq!(open_clip.pad_id, 0);
    }
}
