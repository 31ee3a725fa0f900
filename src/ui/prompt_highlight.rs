//! The prompt box's highlighting of A1111's syntax: emphasis and prompt-editing brackets,
//! weights, `BREAK` and `AND`, and escaped brackets left plain (they are text).

use egui::text::{LayoutJob, TextFormat};
use egui::{Color32, FontId};

use crate::engine::prompt_syntax::{is_break_at, is_keyword_at, weight_close};

/// What a stretch of the prompt is, for its colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptSpan {
    /// Words.
    Text,
    /// `(`, `)`, `[`, `]`, and `|` between alternatives.
    Bracket,
    /// `:1.3` before a closing bracket.
    Weight,
    /// `BREAK`.
    Break,
    /// `AND` between the parts of a composable prompt.
    And,
}

/// Splits `prompt` into stretches of one kind, in order (their texts joined give the prompt).
pub fn prompt_spans<'a>(prompt: &'a str) -> Vec<(PromptSpan, &'a str)> {
    let mut spans: Vec<(PromptSpan, &'a str)> = Vec::new();
    let push = |spans: &mut Vec<(PromptSpan, &'a str)>, kind, start: usize, end: usize| {
        if start < end {
            spans.push((kind, &prompt[start..end]));
        }
    };
    let bytes = prompt.as_bytes();
    let mut text_start = 0;
    let mut i = 0;
    while i < bytes.len() {
        let special = match bytes[i] {
            b'\\' => {
                // An escaped character is text: skip it.
                i += prompt[i + 1..]
                    .chars()
                    .next()
                    .map_or(1, |c| 1 + c.len_utf8());
                continue;
            }
            b'(' | b')' | b'[' | b']' | b'|' => Some((PromptSpan::Bracket, i + 1)),
            b':' => weight_end(prompt, i).map(|end| (PromptSpan::Weight, end)),
            b'B' if is_break_at(prompt, i) => Some((PromptSpan::Break, i + "BREAK".len())),
            b'A' if is_keyword_at(prompt, i, "AND") => Some((PromptSpan::And, i + "AND".len())),
            _ => None,
        };
        match special {
            Some((kind, end)) => {
                push(&mut spans, PromptSpan::Text, text_start, i);
                push(&mut spans, kind, i, end);
                i = end;
                text_start = end;
            }
            None => i += prompt[i..].chars().next().map_or(1, char::len_utf8),
        }
    }
    push(&mut spans, PromptSpan::Text, text_start, prompt.len());
    spans
}

/// The end of `:number` (spaces allowed) when a `)` follows it, as the prompt parser reads a
/// weight: the closing bracket is left for its own span.
fn weight_end(prompt: &str, colon: usize) -> Option<usize> {
    let (_, length) = weight_close(&prompt[colon..])?;
    let close = colon + length - 1;
    Some(colon + prompt[colon..close].trim_end().len())
}

/// The prompt laid out with its syntax coloured, wrapped at `wrap_width`.
pub fn prompt_layout_job(prompt: &str, style: &egui::Style, wrap_width: f32) -> LayoutJob {
    let font = FontId::proportional(style.text_styles[&egui::TextStyle::Body].size);
    let text_color = style.visuals.widgets.inactive.text_color();
    let accent = if style.visuals.dark_mode {
        Color32::from_rgb(255, 190, 90)
    } else {
        Color32::from_rgb(180, 90, 0)
    };
    let break_color = if style.visuals.dark_mode {
        Color32::from_rgb(120, 200, 255)
    } else {
        Color32::from_rgb(0, 90, 180)
    };
    let mut job = LayoutJob::default();
    for (kind, text) in prompt_spans(prompt) {
        let color = match kind {
            PromptSpan::Text => text_color,
            PromptSpan::Bracket | PromptSpan::Weight => accent,
            PromptSpan::Break | PromptSpan::And => break_color,
        };
        job.append(text, 0.0, TextFormat::simple(font.clone(), color));
    }
    job.wrap.max_width = wrap_width;
    job
}

#[cfg(test)]
mod tests {
    use super::*;
    use PromptSpan::*;

    #[test]
    fn brackets_weights_and_break_are_marked_escapes_are_not() {
        assert_eq!(
            prompt_spans("a (red scarf: 1.3) BREAK \\(x\\) [y]"),
            vec![
                (Text, "a "),
                (Bracket, "("),
                (Text, "red scarf"),
                (Weight, ": 1.3"),
                (Bracket, ")"),
                (Text, " "),
                (Break, "BREAK"),
                (Text, " \\(x\\) "),
                (Bracket, "["),
                (Text, "y"),
                (Bracket, "]"),
            ]
        );
        assert_eq!(prompt_spans("time: 5pm"), vec![(Text, "time: 5pm")]);
        assert_eq!(prompt_spans("BREAKING 東京"), vec![(Text, "BREAKING 東京")]);
        assert_eq!(
            prompt_spans("[a|b] AND c"),
            vec![
                (Bracket, "["),
                (Text, "a"),
                (Bracket, "|"),
                (Text, "b"),
                (Bracket, "]"),
                (Text, " "),
                (And, "AND"),
                (Text, " c"),
            ]
        );
        assert_eq!(prompt_spans("BRANDS"), vec![(Text, "BRANDS")]);
        let joined: String = prompt_spans("(a:1.2)[b]").iter().map(|(_, t)| *t).collect();
        assert_eq!(joined, "(a:1.2)[b]");
    }
}
