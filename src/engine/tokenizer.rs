//! CLIP's byte-level BPE tokenizer, from `tokenizer.json` or from `vocab.json` + `merges.txt`.

use std::path::Path;

use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::error::{EngineError, Result};
use super::prompt_syntax::{ChunkTokens, PromptChunk, chunk_prompt, parse_prompt_attention};
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
        let mut tokenizer = match files.optional(&format!("{folder}/tokenizer.json"))? {
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
        // transformers registers the pad token as a special token: SD 2.x's "!" pad token
        // means every "!" in a prompt is tokenized on its own.
        tokenizer
            .add_special_tokens([AddedToken::from(pad_token.as_str(), true)])
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        let id = |token: &str| {
            tokenizer.token_to_id(token).ok_or_else(|| {
                EngineError::Tokenizer(format!(
                    "{folder}: token {token:?} is not in the vocabulary"
                ))
            })
        };
        Ok(Self {
            bos_id: id(config.bos_token.as_deref().unwrap_or(BOS))?,
            eos_id: id(config.eos_token.as_deref().unwrap_or(EOS))?,
            pad_id: id(&pad_token)?,
            comma_id: tokenizer.token_to_id(",</w>"),
            // Room for the start and end tokens and one more; CLIP's 77 at most.
            max_length: config
                .model_max_length
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
        let ids = ChunkTokens {
            bos: self.bos_id,
            eos: self.eos_id,
            comma: self.comma_id,
            chunk_length: self.max_length - 2,
        };
        let (mut chunks, count) = chunk_prompt(&parse_prompt_attention(prompt), ids, |text| {
            self.prompt_tokens(text)
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
    let tokenizer_error =
        |e: Box<dyn std::error::Error + Send + Sync>| EngineError::Tokenizer(e.to_string());
    let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix("</w>".into())
        .unk_token(EOS.into())
        .fuse_unk(false)
        .build()
        .map_err(|e| EngineError::bad_file(vocab, e))?;
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
