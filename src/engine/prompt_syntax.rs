//! Prompts as AUTOMATIC1111 reads them: emphasis `(word)`, `[word]`, `(word:1.3)`, escapes, and
//! `BREAK`; then the tokens packed into 75-token chunks (a comma near a chunk's end moves what
//! follows it to the next chunk), each chunk with its own start and end tokens and every token's
//! weight. The text encoders encode each chunk on its own (see the pipeline's `prompt`).
//!
//! Follows A1111's `prompt_parser.parse_prompt_attention` and `sd_hijack_clip.tokenize_line`
//! with its default settings ("Original" emphasis, comma backtrack of 20 tokens).

/// The multiplier of `(...)`.
const ROUND_MULTIPLIER: f64 = 1.1;
/// The multiplier of `[...]`.
const SQUARE_MULTIPLIER: f64 = 1.0 / 1.1;
/// How far back a comma may pull the words after it into the next chunk (A1111's
/// `comma_padding_backtrack` default).
pub const COMMA_BACKTRACK: usize = 20;

/// A piece of a parsed prompt: text with its weight, or A1111's `BREAK` (weight -1, as A1111
/// marks it: two `BREAK`s in a row merge into text, as they do there).
#[derive(Debug, Clone, PartialEq)]
pub struct WeightedText {
    /// The text (escapes resolved).
    pub text: String,
    /// Its weight; -1 for `BREAK`.
    pub weight: f64,
}

impl WeightedText {
    /// Whether this piece starts a new chunk.
    pub fn is_break(&self) -> bool {
        self.text == "BREAK" && self.weight == -1.0
    }
}

/// One lexical token of A1111's attention grammar.
enum Lexeme<'a> {
    /// `\(`, `\)`, `\[`, `\]`, `\\` or a lone `\`: the text after the backslash.
    Escaped(&'a str),
    Open,
    OpenSquare,
    /// `:` number `)` (spaces allowed around the number).
    WeightClose(&'a str, f64),
    Close,
    CloseSquare,
    /// A run of other characters, or a lone `:`.
    Text(&'a str),
}

/// The next lexeme of `text` at byte `at` and where the one after starts, trying the
/// alternatives of A1111's `re_attention` in its order.
fn next_lexeme(text: &str, at: usize) -> (Lexeme<'_>, usize) {
    let rest = &text[at..];
    let first = rest.chars().next().unwrap_or(' ');
    match first {
        '\\' => {
            let second = rest[1..].chars().next();
            match second {
                Some(c @ ('(' | ')' | '[' | ']' | '\\')) => {
                    let end = at + 1 + c.len_utf8();
                    (Lexeme::Escaped(&text[at + 1..end]), end)
                }
                _ => (Lexeme::Escaped(""), at + 1),
            }
        }
        '(' => (Lexeme::Open, at + 1),
        '[' => (Lexeme::OpenSquare, at + 1),
        ':' => match weight_close(rest) {
            Some((weight, length)) => (Lexeme::WeightClose(&rest[..length], weight), at + length),
            None => (Lexeme::Text(":"), at + 1),
        },
        ')' => (Lexeme::Close, at + 1),
        ']' => (Lexeme::CloseSquare, at + 1),
        _ => {
            let length = rest
                .find(['\\', '(', ')', '[', ']', ':'])
                .unwrap_or(rest.len());
            (Lexeme::Text(&rest[..length]), at + length)
        }
    }
}

/// `:\s*([+-]?[.\d]+)\s*\)` at the start of `text`: the weight and the match's length in bytes
/// (the closing bracket included). A number Python's `float` would refuse (`1.2.3`) is no
/// weight: the text stays text.
pub fn weight_close(text: &str) -> Option<(f64, usize)> {
    let bytes = text.as_bytes();
    let is_space = |b: u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c);
    let mut i = 1;
    while i < bytes.len() && is_space(bytes[i]) {
        i += 1;
    }
    let number_start = i;
    if i < bytes.len() && (bytes[i] == b'+' || bytes[i] == b'-') {
        i += 1;
    }
    let digits_start = i;
    while i < bytes.len() && (bytes[i] == b'.' || bytes[i].is_ascii_digit()) {
        i += 1;
    }
    if i == digits_start {
        return None;
    }
    let number = &text[number_start..i];
    while i < bytes.len() && is_space(bytes[i]) {
        i += 1;
    }
    if bytes.get(i) != Some(&b')') {
        return None;
    }
    let weight = number.parse::<f64>().ok()?;
    Some((weight, i + 1))
}

/// Splits on `BREAK` as a word, with the whitespace around it (`\s*\bBREAK\b\s*`).
fn split_breaks(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut part_start = 0;
    let mut search = 0;
    while let Some(found) = text[search..].find("BREAK") {
        let at = search + found;
        let end = at + "BREAK".len();
        if is_break_at(text, at) {
            // The whitespace before it (back to the part's start) and after it go too.
            let cut_start = text[part_start..at]
                .trim_end_matches(char::is_whitespace)
                .len()
                + part_start;
            let cut_end = end + (text[end..].len() - text[end..].trim_start().len());
            parts.push(&text[part_start..cut_start]);
            part_start = cut_end;
            search = cut_end;
        } else {
            search = at + 1;
        }
    }
    parts.push(&text[part_start..]);
    parts
}

/// Whether `BREAK` at byte `at` of `text` is a word of its own (`\bBREAK\b`).
pub fn is_break_at(text: &str, at: usize) -> bool {
    is_keyword_at(text, at, "BREAK")
}

/// Whether `keyword` starts at byte `at` of `text` as a whole word (regex `\bKEYWORD\b`, as
/// A1111 finds `BREAK` and `AND`).
pub fn is_keyword_at(text: &str, at: usize, keyword: &str) -> bool {
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    let end = at + keyword.len();
    text[at..].starts_with(keyword)
        && text[..at].chars().next_back().is_none_or(|c| !is_word(c))
        && text[end..].chars().next().is_none_or(|c| !is_word(c))
}

/// A1111's `parse_prompt_attention`: the prompt as pieces of text with weights, runs of equal
/// weight merged; `BREAK` as its own piece.
pub fn parse_prompt_attention(prompt: &str) -> Vec<WeightedText> {
    let mut pieces: Vec<WeightedText> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let multiply = |pieces: &mut Vec<WeightedText>, from: usize, by: f64| {
        for piece in &mut pieces[from..] {
            piece.weight *= by;
        }
    };
    let mut at = 0;
    while at < prompt.len() {
        let (lexeme, next) = next_lexeme(prompt, at);
        at = next;
        match lexeme {
            Lexeme::Escaped(text) => pieces.push(WeightedText {
                text: text.to_string(),
                weight: 1.0,
            }),
            Lexeme::Open => round.push(pieces.len()),
            Lexeme::OpenSquare => square.push(pieces.len()),
            Lexeme::WeightClose(_, weight) if !round.is_empty() => {
                let from = round.pop().unwrap_or_default();
                multiply(&mut pieces, from, weight);
            }
            Lexeme::Close if !round.is_empty() => {
                let from = round.pop().unwrap_or_default();
                multiply(&mut pieces, from, ROUND_MULTIPLIER);
            }
            Lexeme::CloseSquare if !square.is_empty() => {
                let from = square.pop().unwrap_or_default();
                multiply(&mut pieces, from, SQUARE_MULTIPLIER);
            }
            other => {
                let text = match other {
                    Lexeme::WeightClose(text, _) | Lexeme::Text(text) => text,
                    Lexeme::Close => ")",
                    Lexeme::CloseSquare => "]",
                    _ => "",
                };
                for (i, part) in split_breaks(text).into_iter().enumerate() {
                    if i > 0 {
                        pieces.push(WeightedText {
                            text: "BREAK".into(),
                            weight: -1.0,
                        });
                    }
                    pieces.push(WeightedText {
                        text: part.to_string(),
                        weight: 1.0,
                    });
                }
            }
        }
    }
    // Brackets left open close at the end.
    for from in round {
        multiply(&mut pieces, from, ROUND_MULTIPLIER);
    }
    for from in square {
        multiply(&mut pieces, from, SQUARE_MULTIPLIER);
    }
    if pieces.is_empty() {
        pieces.push(WeightedText {
            text: String::new(),
            weight: 1.0,
        });
    }
    let mut merged: Vec<WeightedText> = Vec::with_capacity(pieces.len());
    for piece in pieces {
        match merged.last_mut() {
            Some(last) if last.weight == piece.weight => last.text.push_str(&piece.text),
            _ => merged.push(piece),
        }
    }
    merged
}

/// One chunk of a prompt: start token, 75 tokens (padded with the end token), end token, and
/// each position's weight (1 for the special tokens and padding).
#[derive(Debug, Clone, PartialEq)]
pub struct PromptChunk {
    /// The token ids, `chunk_length + 2` of them.
    pub tokens: Vec<u32>,
    /// Each token's weight.
    pub weights: Vec<f32>,
}

/// The ids a tokenizer gives the chunker.
#[derive(Debug, Clone, Copy)]
pub struct ChunkTokens {
    /// The start token.
    pub bos: u32,
    /// The end token (also the padding inside a chunk, as A1111 pads).
    pub eos: u32,
    /// `,` as a whole word, if the vocabulary has it.
    pub comma: Option<u32>,
    /// Prompt tokens per chunk (75 for CLIP).
    pub chunk_length: usize,
}

/// What the chunker packs: a token of text, or a textual-inversion embedding's ids (one per
/// vector), which stay together in one chunk as A1111 keeps them.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptToken {
    /// One token of text.
    Word(u32),
    /// An embedding's placeholder ids.
    Embedding(Vec<u32>),
}

/// A1111's `tokenize_line`: the parsed prompt's pieces tokenized one by one (`tokenize`), packed
/// into chunks. Returns the chunks and the token count the prompt box shows (a multiple of the
/// chunk length for all but the last chunk).
pub fn chunk_prompt<E>(
    pieces: &[WeightedText],
    ids: ChunkTokens,
    mut tokenize: impl FnMut(&str) -> Result<Vec<PromptToken>, E>,
) -> Result<(Vec<PromptChunk>, usize), E> {
    let length = ids.chunk_length;
    let mut chunker = Chunker {
        ids,
        chunks: Vec::new(),
        tokens: Vec::new(),
        weights: Vec::new(),
        token_count: 0,
        last_comma: None,
    };
    for piece in pieces {
        if piece.is_break() {
            chunker.next_chunk(false);
            continue;
        }
        let weight = piece.weight as f32;
        for unit in tokenize(&piece.text)? {
            let token = match &unit {
                PromptToken::Word(token) => *token,
                PromptToken::Embedding(group) => match group.first() {
                    Some(&first) => first,
                    None => continue,
                },
            };
            let filled = chunker.tokens.len();
            if matches!(unit, PromptToken::Word(_)) && Some(token) == ids.comma {
                chunker.last_comma = Some(filled);
            } else if COMMA_BACKTRACK != 0
                && filled == length
                && let Some(comma) = chunker.last_comma
                && filled - comma <= COMMA_BACKTRACK
            {
                // Move the words after the comma to the next chunk.
                let moved_tokens = chunker.tokens.split_off(comma + 1);
                let moved_weights = chunker.weights.split_off(comma + 1);
                chunker.next_chunk(false);
                chunker.tokens = moved_tokens;
                chunker.weights = moved_weights;
            }
            if chunker.tokens.len() == length {
                chunker.next_chunk(false);
            }
            let group = match unit {
                PromptToken::Word(token) => vec![token],
                PromptToken::Embedding(group) => {
                    // An embedding that would not fit starts the next chunk.
                    if chunker.tokens.len() + group.len() > length && !chunker.tokens.is_empty() {
                        chunker.next_chunk(false);
                    }
                    group
                }
            };
            for token in group {
                // Only an embedding longer than a whole chunk is split.
                if chunker.tokens.len() == length {
                    chunker.next_chunk(false);
                }
                chunker.tokens.push(token);
                chunker.weights.push(weight);
            }
        }
    }
    if !chunker.tokens.is_empty() || chunker.chunks.is_empty() {
        chunker.next_chunk(true);
    }
    Ok((chunker.chunks, chunker.token_count))
}

/// [`chunk_prompt`]'s state: the chunks so far and the one being filled.
struct Chunker {
    ids: ChunkTokens,
    chunks: Vec<PromptChunk>,
    /// The chunk being filled: its tokens and their weights.
    tokens: Vec<u32>,
    weights: Vec<f32>,
    /// The count the prompt box shows.
    token_count: usize,
    /// Where the last comma of the chunk being filled is.
    last_comma: Option<usize>,
}

impl Chunker {
    /// Closes the chunk being filled (start and end tokens, padded with the end token) and
    /// starts the next one (A1111's `next_chunk`).
    fn next_chunk(&mut self, is_last: bool) {
        let length = self.ids.chunk_length;
        self.token_count += if is_last { self.tokens.len() } else { length };
        let pad = length.saturating_sub(self.tokens.len());
        let mut tokens = Vec::with_capacity(length + 2);
        tokens.push(self.ids.bos);
        tokens.append(&mut self.tokens);
        tokens.extend(std::iter::repeat_n(self.ids.eos, pad));
        tokens.push(self.ids.eos);
        let mut weights = Vec::with_capacity(length + 2);
        weights.push(1.0);
        weights.append(&mut self.weights);
        weights.extend(std::iter::repeat_n(1.0, pad));
        weights.push(1.0);
        self.chunks.push(PromptChunk { tokens, weights });
        self.last_comma = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(prompt: &str) -> Vec<(String, f64)> {
        parse_prompt_attention(prompt)
            .into_iter()
            .map(|p| (p.text, p.weight))
            .collect()
    }

    fn close(a: &[(String, f64)], b: &[(&str, f64)]) {
        assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
        for ((ta, wa), (tb, wb)) in a.iter().zip(b) {
            assert_eq!(ta, tb);
            assert!((wa - wb).abs() < 1e-12, "{ta}: {wa} vs {wb}");
        }
    }

    #[test]
    fn a1111s_own_examples() {
        // The doctests of A1111's prompt_parser.parse_prompt_attention.
        close(&parsed("normal text"), &[("normal text", 1.0)]);
        close(
            &parsed("an (important) word"),
            &[("an ", 1.0), ("important", 1.1), (" word", 1.0)],
        );
        close(&parsed("(unbalanced"), &[("unbalanced", 1.1)]);
        close(&parsed("\\(literal\\]"), &[("(literal]", 1.0)]);
        close(
            &parsed("(unnecessary)(parens)"),
            &[("unnecessaryparens", 1.1)],
        );
        close(
            &parsed("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."),
            &[
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ],
        );
    }

    #[test]
    fn break_weights_colons_and_stray_brackets() {
        close(
            &parsed("a cat  BREAK  a dog"),
            &[("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)],
        );
        // Not a word of its own: text.
        close(&parsed("BREAKING news"), &[("BREAKING news", 1.0)]);
        // Spaces inside the weight; a weight with no open bracket is text.
        close(&parsed("(red scarf: 1.3 )"), &[("red scarf", 1.3)]);
        close(&parsed("red:1.3) scarf"), &[("red:1.3) scarf", 1.0)]);
        close(&parsed("time: 5pm"), &[("time: 5pm", 1.0)]);
        close(&parsed("a ] b ) c"), &[("a ] b ) c", 1.0)]);
        close(&parsed("(a:1.2.3)"), &[("a:1.2.3", 1.1)]);
        close(&parsed(""), &[("", 1.0)]);
        close(&parsed("[[a]]"), &[("a", 1.0 / 1.1 / 1.1)]);
        close(&parsed("a \\ b"), &[("a  b", 1.0)]);
    }

    #[test]
    fn chunks_of_75_with_breaks_and_the_comma_backtrack() {
        let ids = ChunkTokens {
            bos: 1000,
            eos: 1001,
            comma: Some(7),
            chunk_length: 75,
        };
        // One token per character: "x" is 5, "," is 7.
        let tokenize = |text: &str| -> Result<Vec<PromptToken>, ()> {
            Ok(text
                .chars()
                .filter(|c| !c.is_whitespace())
                .map(|c| PromptToken::Word(if c == ',' { 7 } else { 5 }))
                .collect())
        };
        let (chunks, count) =
            chunk_prompt(&parse_prompt_attention("x x (x)"), ids, tokenize).unwrap();
        assert_eq!((chunks.len(), count), (1, 3));
        assert_eq!(chunks[0].tokens.len(), 77);
        assert_eq!(&chunks[0].tokens[..5], &[1000, 5, 5, 5, 1001]);
        assert_eq!(&chunks[0].weights[..5], &[1.0, 1.0, 1.0, 1.1, 1.0]);
        // 80 tokens: two chunks.
        let (chunks, count) =
            chunk_prompt(&parse_prompt_attention(&"x".repeat(80)), ids, tokenize).unwrap();
        assert_eq!((chunks.len(), count), (2, 80));
        // A comma 10 tokens before the 75th: what follows it moves to the next chunk.
        let prompt = format!("{},{}", "x".repeat(65), "x".repeat(20));
        let (chunks, _) = chunk_prompt(&parse_prompt_attention(&prompt), ids, tokenize).unwrap();
        assert_eq!(chunks[0].tokens[66], 7);
        assert_eq!(chunks[0].tokens[67], 1001, "padded after the comma");
        assert_eq!(&chunks[1].tokens[1..21], &[5; 20]);
        // BREAK starts a new chunk; an empty prompt is one chunk of padding.
        let (chunks, count) =
            chunk_prompt(&parse_prompt_attention("x BREAK x"), ids, tokenize).unwrap();
        assert_eq!((chunks.len(), count), (2, 76));
        let (chunks, _) = chunk_prompt(&parse_prompt_attention(""), ids, tokenize).unwrap();
        assert_eq!(chunks.len(), 1);
        assert!(chunks[0].tokens[1..].iter().all(|&t| t == 1001));
    }

    #[test]
    fn an_embedding_is_never_split_across_chunks() {
        let ids = ChunkTokens {
            bos: 1000,
            eos: 1001,
            comma: Some(7),
            chunk_length: 75,
        };
        // "x" is 5, "," is 7, "E" an embedding of `vectors` vectors (ids 2000...).
        let with_vectors = |vectors: u32| {
            move |text: &str| -> Result<Vec<PromptToken>, ()> {
                Ok(text
                    .chars()
                    .filter(|c| !c.is_whitespace())
                    .map(|c| match c {
                        'E' => PromptToken::Embedding((2000..2000 + vectors).collect()),
                        ',' => PromptToken::Word(7),
                        _ => PromptToken::Word(5),
                    })
                    .collect())
            }
        };
        // 70 tokens, then 8 vectors: the embedding moves whole to the second chunk, after
        // which the first is padded (A1111's `len(chunk.tokens) + emb_len > chunk_length`).
        let prompt = format!("{}E (x)", "x".repeat(70));
        let (chunks, count) =
            chunk_prompt(&parse_prompt_attention(&prompt), ids, with_vectors(8)).unwrap();
        assert_eq!((chunks.len(), count), (2, 75 + 9));
        assert_eq!(chunks[0].tokens[70], 5);
        assert!(chunks[0].tokens[71..].iter().all(|&t| t == 1001));
        assert_eq!(
            &chunks[1].tokens[1..9],
            &(2000..2008).collect::<Vec<_>>()[..]
        );
        assert_eq!(chunks[1].tokens[9], 5);
        assert_eq!(chunks[1].weights[9], 1.1);
        // 5 vectors fill the first chunk exactly: nothing moves.
        let (chunks, count) =
            chunk_prompt(&parse_prompt_attention(&prompt), ids, with_vectors(5)).unwrap();
        assert_eq!((chunks.len(), count), (2, 76));
        assert_eq!(&chunks[0].tokens[71..76], &[2000, 2001, 2002, 2003, 2004]);
        assert_eq!(chunks[1].tokens[1], 5);
        // The comma backtrack still applies before an embedding that reaches a full chunk.
        let prompt = format!("{},{}E", "x".repeat(64), "x".repeat(10));
        let (chunks, _) =
            chunk_prompt(&parse_prompt_attention(&prompt), ids, with_vectors(3)).unwrap();
        assert_eq!(chunks[0].tokens[65], 7);
        assert_eq!(chunks[0].tokens[66], 1001, "padded after the comma");
        assert_eq!(&chunks[1].tokens[1..11], &[5; 10]);
        assert_eq!(&chunks[1].tokens[11..14], &[2000, 2001, 2002]);
        // An embedding longer than a chunk starts one and is split where it must be.
        let (chunks, _) =
            chunk_prompt(&parse_prompt_attention("xE"), ids, with_vectors(80)).unwrap();
        assert_eq!(chunks.len(), 3);
        assert_eq!(&chunks[0].tokens[1..3], &[5, 1001]);
        assert_eq!(chunks[1].tokens[1], 2000);
        assert_eq!(chunks[1].tokens[75], 2074);
        assert_eq!(
            &chunks[2].tokens[1..7],
            &[2075, 2076, 2077, 2078, 2079, 1001]
        );
    }
}
