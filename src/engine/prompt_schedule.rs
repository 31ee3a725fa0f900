//! A1111's prompt editing: `[from:to:when]` (the prompt changes during sampling) and `[a|b]`
//! (alternates at every step), as `prompt_parser.get_learned_conditioning_prompt_schedules`
//! reads them. A prompt becomes a schedule: the prompt text to use up to each step.
//!
//! The grammar is A1111's: `[to:when]` and `[from:to:when]` (`when` a number: a step, or with
//! a decimal point a fraction of the steps), `[a|b|…]`, and emphasis brackets (`(…)`, `(…:w)`,
//! `[…]`) passed through as written, with any schedule inside them resolved. Stray brackets
//! and colons outside any construct are text; a prompt that does not parse (a `|` outside
//! brackets, say) is used as written at every step, as A1111 does.

/// Which pass of a job a schedule is for: `when` numbers are counted from the first pass; a
/// hires pass (A1111's new scheduling) reads integers past the first pass's steps and
/// fractions above 1 as its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulePass {
    /// A job's first (or only) pass, of this many steps.
    First {
        /// The pass's sampling steps.
        steps: usize,
    },
    /// A hires fix's second pass.
    Hires {
        /// The first pass's sampling steps.
        first_steps: usize,
        /// The hires pass's sampling steps.
        steps: usize,
    },
}

impl SchedulePass {
    fn steps(self) -> usize {
        match self {
            SchedulePass::First { steps } | SchedulePass::Hires { steps, .. } => steps,
        }
    }
}

/// A prompt's schedule: `(last step, text)` pairs in order; the text of the first pair whose
/// last step is at least the current step (counted from 0, as A1111's sampler counts) is used,
/// the last pair's after its step. One pair holding the prompt as written when it has no
/// prompt editing.
pub type PromptSchedule = Vec<(usize, String)>;

/// The text of `schedule` at `step` (counted from 0 within the pass).
pub fn text_at(schedule: &[(usize, String)], step: usize) -> &str {
    schedule
        .iter()
        .find(|(last, _)| step <= *last)
        .or(schedule.last())
        .map_or("", |(_, text)| text.as_str())
}

/// `prompt`'s schedule for `pass`.
pub fn prompt_schedule(prompt: &str, pass: SchedulePass) -> PromptSchedule {
    let steps = pass.steps();
    let chars: Vec<char> = prompt.chars().collect();
    let Some(nodes) = parse_top(&chars) else {
        return vec![(steps, prompt.to_string())];
    };
    if !nodes.iter().any(Node::is_dynamic) {
        return vec![(steps, prompt.to_string())];
    }
    let mut boundaries = vec![steps];
    for node in &nodes {
        node.collect_steps(pass, &mut boundaries);
    }
    boundaries.sort_unstable();
    boundaries.dedup();
    boundaries
        .into_iter()
        .map(|step| {
            let mut text = String::new();
            for node in &nodes {
                node.render(step, pass, &mut text);
            }
            (step, text)
        })
        .collect()
}

/// A1111's composable prompt (`get_multicond_prompt_list`): the prompt split at the word `AND`,
/// each part with the weight of a trailing `:number` (1 without one), its text without that
/// weight and without trailing whitespace. A prompt without `AND` is one part, and a trailing
/// `:number` weighs it too, as in A1111.
pub fn composable_parts(prompt: &str) -> Vec<(String, f64)> {
    split_at_and(prompt)
        .into_iter()
        .map(|part| {
            let trimmed = part.trim_end();
            match trailing_weight(trimmed) {
                Some((text, weight)) => (text.to_string(), weight),
                None => (trimmed.to_string(), 1.0),
            }
        })
        .collect()
}

/// `prompt` split at every `AND` that is a whole word (regex `\bAND\b`).
fn split_at_and(prompt: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut from = 0;
    for (at, _) in prompt.match_indices("AND") {
        if crate::engine::prompt_syntax::is_keyword_at(prompt, at, "AND") {
            parts.push(&prompt[from..at]);
            from = at + 3;
        }
    }
    parts.push(&prompt[from..]);
    parts
}

/// `text:number` at the end of `text` (whitespace allowed around the colon; the number as
/// A1111's `[-+]?(\d+\.?|\d*\.\d+)`): the text before it and the weight.
fn trailing_weight(text: &str) -> Option<(&str, f64)> {
    let colon = text.rfind(':')?;
    let number = text[colon + 1..].trim_start();
    let digits = number.strip_prefix(['+', '-']).unwrap_or(number);
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    let all_digits = |s: &str| s.chars().all(|c| c.is_ascii_digit());
    if !all_digits(whole) || !all_digits(fraction) || whole.len() + fraction.len() == 0 {
        return None;
    }
    Some((text[..colon].trim_end(), number.parse().ok()?))
}

/// A parsed piece of prompt.
#[derive(Debug, Clone, PartialEq)]
enum Node {
    /// Text as written (stray brackets, escapes and emphasis syntax included).
    Text(String),
    /// Emphasis brackets kept as written around their contents.
    Group {
        open: char,
        inner: Vec<Node>,
        close: char,
    },
    /// `[before:after:when]` or `[after:when]`.
    Scheduled {
        before: Vec<Node>,
        after: Vec<Node>,
        when: String,
    },
    /// `[a|b|…]`.
    Alternate(Vec<Vec<Node>>),
}

impl Node {
    fn is_dynamic(&self) -> bool {
        match self {
            Node::Text(_) => false,
            Node::Group { inner, .. } => inner.iter().any(Node::is_dynamic),
            Node::Scheduled { .. } | Node::Alternate(_) => true,
        }
    }

    fn collect_steps(&self, pass: SchedulePass, boundaries: &mut Vec<usize>) {
        let steps = pass.steps();
        match self {
            Node::Text(_) => {}
            Node::Group { inner, .. } => {
                inner.iter().for_each(|n| n.collect_steps(pass, boundaries))
            }
            Node::Scheduled {
                before,
                after,
                when,
            } => {
                if let Ok(step) = usize::try_from(when_step(when, pass))
                    && step >= 1
                {
                    boundaries.push(step);
                }
                before
                    .iter()
                    .chain(after)
                    .for_each(|n| n.collect_steps(pass, boundaries));
            }
            Node::Alternate(options) => {
                boundaries.extend(1..=steps);
                options
                    .iter()
                    .flatten()
                    .for_each(|n| n.collect_steps(pass, boundaries));
            }
        }
    }

    fn render(&self, step: usize, pass: SchedulePass, out: &mut String) {
        match self {
            Node::Text(text) => out.push_str(text),
            Node::Group { open, inner, close } => {
                out.push(*open);
                inner.iter().for_each(|n| n.render(step, pass, out));
                out.push(*close);
            }
            Node::Scheduled {
                before,
                after,
                when,
            } => {
                let chosen = if step as i64 <= when_step(when, pass) {
                    before
                } else {
                    after
                };
                chosen.iter().for_each(|n| n.render(step, pass, out));
            }
            Node::Alternate(options) => {
                let option = &options[(step.max(1) - 1) % options.len()];
                option.iter().for_each(|n| n.render(step, pass, out));
            }
        }
    }
}

/// The step a `when` number stands for in `pass` (A1111: a number with a decimal point is a
/// fraction of the steps, another a step; at most the pass's steps; truncated toward zero).
fn when_step(when: &str, pass: SchedulePass) -> i64 {
    let value: f64 = when.parse().unwrap_or(0.0);
    let (steps, int_offset, fraction_offset) = match pass {
        SchedulePass::First { steps } => (steps, 0.0, 0.0),
        SchedulePass::Hires { first_steps, steps } => (steps, first_steps as f64, 1.0),
    };
    let step = if when.contains('.') {
        (value - fraction_offset) * steps as f64
    } else {
        value - int_offset
    };
    (step.trunc() as i64).min(steps as i64)
}

/// Characters that end plain text.
fn is_special(c: char) -> bool {
    matches!(c, '\\' | '[' | ']' | '(' | ')' | ':' | '|')
}

/// The whole prompt: constructs, text, and stray brackets and colons; `None` where A1111's
/// parser fails (a `|` outside any construct, a lone trailing backslash).
fn parse_top(chars: &[char]) -> Option<Vec<Node>> {
    let mut nodes = Vec::new();
    let mut at = 0;
    loop {
        let (part, stop) = parse_prompt(chars, at, false);
        nodes.extend(part);
        match chars.get(stop) {
            None => return Some(nodes),
            // A backslash stops a prompt only at the very end.
            Some('|' | '\\') => return None,
            // A bracket that starts no construct, a colon: text here.
            Some(&stray) => {
                nodes.push(Node::Text(stray.to_string()));
                at = stop + 1;
            }
        }
    }
}

fn flush(text: &mut String, nodes: &mut Vec<Node>) {
    if !text.is_empty() {
        nodes.push(Node::Text(std::mem::take(text)));
    }
}

/// A prompt inside a construct, from `start`: text and nested constructs up to the first
/// special character that starts none (returned position). `bar_is_text`: a `|` is text (as
/// A1111's parser ends up reading it inside a schedule).
fn parse_prompt(chars: &[char], start: usize, bar_is_text: bool) -> (Vec<Node>, usize) {
    let mut nodes = Vec::new();
    let mut text = String::new();
    let mut i = start;
    while i < chars.len() {
        let c = chars[i];
        if c == '[' || c == '(' {
            match parse_construct(chars, i) {
                Some((node, next)) => {
                    flush(&mut text, &mut nodes);
                    nodes.push(node);
                    i = next;
                    continue;
                }
                None => break,
            }
        }
        if c == '\\' {
            match chars.get(i + 1) {
                Some(&escaped) => {
                    text.push(c);
                    text.push(escaped);
                    i += 2;
                    continue;
                }
                None => break,
            }
        }
        if is_special(c) && !(bar_is_text && c == '|') {
            break;
        }
        text.push(c);
        i += 1;
    }
    flush(&mut text, &mut nodes);
    (nodes, i)
}

/// A bracketed construct at `start` (`(` or `[`): the node and the position after it.
fn parse_construct(chars: &[char], start: usize) -> Option<(Node, usize)> {
    match chars[start] {
        '(' => {
            let (first, at) = parse_prompt(chars, start + 1, false);
            let mut inner = first;
            let at = match chars.get(at) {
                Some(')') => at,
                Some(':') => {
                    let (second, at) = parse_prompt(chars, at + 1, false);
                    inner.push(Node::Text(":".into()));
                    inner.extend(second);
                    (chars.get(at) == Some(&')')).then_some(at)?
                }
                _ => return None,
            };
            Some((
                Node::Group {
                    open: '(',
                    inner,
                    close: ')',
                },
                at + 1,
            ))
        }
        '[' => parse_scheduled(chars, start)
            .or_else(|| parse_alternate(chars, start))
            .or_else(|| {
                let (inner, at) = parse_prompt(chars, start + 1, false);
                (chars.get(at) == Some(&']')).then(|| {
                    (
                        Node::Group {
                            open: '[',
                            inner,
                            close: ']',
                        },
                        at + 1,
                    )
                })
            }),
        _ => None,
    }
}

/// `[after:when]` or `[before:after:when]` at `start`.
fn parse_scheduled(chars: &[char], start: usize) -> Option<(Node, usize)> {
    let (first, at) = parse_prompt(chars, start + 1, true);
    if chars.get(at) != Some(&':') {
        return None;
    }
    if let Some((when, next)) = parse_when(chars, at + 1) {
        return Some((
            Node::Scheduled {
                before: Vec::new(),
                after: first,
                when,
            },
            next,
        ));
    }
    let (second, at) = parse_prompt(chars, at + 1, true);
    if chars.get(at) != Some(&':') {
        return None;
    }
    let (when, next) = parse_when(chars, at + 1)?;
    Some((
        Node::Scheduled {
            before: first,
            after: second,
            when,
        },
        next,
    ))
}

/// `[a|b|…]` at `start` (options may be empty).
fn parse_alternate(chars: &[char], start: usize) -> Option<(Node, usize)> {
    let mut options = Vec::new();
    let mut at = start;
    loop {
        let (option, next) = parse_prompt(chars, at + 1, false);
        options.push(option);
        match chars.get(next) {
            Some('|') => at = next,
            Some(']') if options.len() > 1 => return Some((Node::Alternate(options), next + 1)),
            _ => return None,
        }
    }
}

/// `[whitespace] number [whitespace] ]` at `start`: the number as written and the position
/// after the bracket. Numbers as lark's SIGNED_NUMBER: an optional sign, digits with an
/// optional decimal point (`.5`, `2.`, `1.5`) and an optional exponent.
fn parse_when(chars: &[char], start: usize) -> Option<(String, usize)> {
    let mut i = start;
    while chars.get(i).is_some_and(|c| c.is_whitespace()) {
        i += 1;
    }
    let number_start = i;
    if matches!(chars.get(i), Some('+' | '-')) {
        i += 1;
    }
    let digits = |i: &mut usize| {
        let from = *i;
        while chars.get(*i).is_some_and(char::is_ascii_digit) {
            *i += 1;
        }
        *i - from
    };
    let whole = digits(&mut i);
    let mut fraction = 0;
    if chars.get(i) == Some(&'.') {
        i += 1;
        fraction = digits(&mut i);
    }
    if whole + fraction == 0 {
        return None;
    }
    if matches!(chars.get(i), Some('e' | 'E')) {
        let mut j = i + 1;
        if matches!(chars.get(j), Some('+' | '-')) {
            j += 1;
        }
        if digits(&mut j) > 0 {
            i = j;
        }
    }
    let number: String = chars[number_start..i].iter().collect();
    while chars.get(i).is_some_and(|c| c.is_whitespace()) {
        i += 1;
    }
    (chars.get(i) == Some(&']')).then_some((number, i + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(prompt: &str) -> Vec<(usize, String)> {
        prompt_schedule(prompt, SchedulePass::First { steps: 10 })
    }

    fn expect(prompt: &str, expected: &[(usize, &str)]) {
        let expected: Vec<(usize, String)> =
            expected.iter().map(|&(s, t)| (s, t.to_string())).collect();
        assert_eq!(g(prompt), expected, "{prompt:?}");
    }

    /// The examples in A1111's `get_learned_conditioning_prompt_schedules` docstring.
    #[test]
    fn a1111s_examples() {
        expect("test", &[(10, "test")]);
        expect("a [b:3]", &[(3, "a "), (10, "a b")]);
        expect("a [b: 3]", &[(3, "a "), (10, "a b")]);
        expect("a [[[b]]:2]", &[(2, "a "), (10, "a [[b]]")]);
        expect("[(a:2):3]", &[(3, ""), (10, "(a:2)")]);
        expect("a [b : c : 1] d", &[(1, "a b  d"), (10, "a  c  d")]);
        expect("a[b:[c:d:2]:1]e", &[(1, "abe"), (2, "ace"), (10, "ade")]);
        expect("a [unbalanced", &[(10, "a [unbalanced")]);
        expect("a [b:.5] c", &[(5, "a  c"), (10, "a b c")]);
        expect("a [{b|d{:.5] c", &[(5, "a  c"), (10, "a {b|d{ c")]);
        expect("((a][:b:c [d:3]", &[(3, "((a][:b:c "), (10, "((a][:b:c d")]);
        let alternating: Vec<(usize, &str)> = (1..=10)
            .map(|s| (s, if s % 2 == 1 { "a" } else { "(b:1.1)" }))
            .collect();
        expect("[a|(b:1.1)]", &alternating);
        let female: Vec<(usize, &str)> = (1..=10)
            .map(|s| (s, if s % 2 == 1 { "female" } else { "male" }))
            .collect();
        expect("[fe|]male", &female);
        let female: Vec<(usize, &str)> = (1..=10)
            .map(|s| (s, if s % 4 == 1 { "female" } else { "male" }))
            .collect();
        expect("[fe|||]male", &female);
        let hires = |p: &str| {
            prompt_schedule(
                p,
                SchedulePass::Hires {
                    first_steps: 10,
                    steps: 10,
                },
            )
        };
        assert_eq!(hires("a [b:.5] c"), vec![(10, "a b c".to_string())]);
        assert_eq!(
            hires("a [b:1.5] c"),
            vec![(5, "a  c".to_string()), (10, "a b c".to_string())]
        );
    }

    #[test]
    fn prompts_without_editing_stay_as_written() {
        for prompt in [
            "a (red:1.2) fox, [blurry], ((masterpiece)) BREAK snow",
            "a: b (c) ] [ d",
            "a | b",
            "escaped \\[x:3\\] brackets",
            "<lora:foo:0.8> a fox",
            "",
        ] {
            expect(prompt, &[(10, prompt)]);
        }
        // A `|` outside brackets fails A1111's parse: the schedule inside is not read.
        expect("a | [b:3]", &[(10, "a | [b:3]")]);
    }

    #[test]
    fn composable_prompts_split_at_and_with_weights() {
        let parts = |p: &str| composable_parts(p);
        assert_eq!(parts("a fox"), vec![("a fox".to_string(), 1.0)]);
        assert_eq!(parts("a fox  "), vec![("a fox".to_string(), 1.0)]);
        assert_eq!(
            parts("a cat :1.2 AND a dog: .5 AND snow"),
            vec![
                ("a cat".to_string(), 1.2),
                (" a dog".to_string(), 0.5),
                (" snow".to_string(), 1.0)
            ]
        );
        // A trailing weight without AND weighs the one prompt; a weight inside brackets or
        // followed by text is not one; `AND` inside a word is not a split.
        assert_eq!(parts("a fox:-2."), vec![("a fox".to_string(), -2.0)]);
        assert_eq!(parts("a (fox:1.2)"), vec![("a (fox:1.2)".to_string(), 1.0)]);
        assert_eq!(parts("time: 5pm"), vec![("time: 5pm".to_string(), 1.0)]);
        assert_eq!(
            parts("ANDROID and BRANDS"),
            vec![("ANDROID and BRANDS".to_string(), 1.0)]
        );
        assert_eq!(parts("x:."), vec![("x:.".to_string(), 1.0)]);
        assert_eq!(
            parts("AND a"),
            vec![(String::new(), 1.0), (" a".to_string(), 1.0)]
        );
    }

    #[test]
    fn when_numbers_and_steps() {
        // Past the last step, zero or negative: one text throughout.
        expect("a [b:20]", &[(10, "a ")]);
        expect("a [b:0]", &[(10, "a b")]);
        expect("a [b:-2]", &[(10, "a b")]);
        expect("[a:b:1e0]", &[(1, "a"), (10, "b")]);
        // With a decimal point, a fraction of the steps (truncated: 2.5 -> 2); `2.` is a
        // fraction too, at most the last step.
        expect("[a:b:0.25]", &[(2, "a"), (10, "b")]);
        expect("[a:b:2.]", &[(10, "a")]);
        // Emphasis around a schedule stays; a schedule inside emphasis is resolved.
        expect(
            "((fox:[1.2:1.5:4]))",
            &[(4, "((fox:1.2))"), (10, "((fox:1.5))")],
        );
        // Text at a step: the first pair whose step is at least it, counted from 0.
        let schedule = g("a [b:3]");
        assert_eq!(text_at(&schedule, 0), "a ");
        assert_eq!(text_at(&schedule, 3), "a ");
        assert_eq!(text_at(&schedule, 4), "a b");
        assert_eq!(text_at(&schedule, 99), "a b");
        assert_eq!(text_at(&g("[x|y]"), 0), "x");
        assert_eq!(text_at(&g("[x|y]"), 1), "x");
        assert_eq!(text_at(&g("[x|y]"), 2), "y");
    }
}
