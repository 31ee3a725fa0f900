//! A1111's extra networks in a prompt: `<lora:name:0.8>` (and `<lyco:…>`, `<hypernet:…>`)
//! are cut out of the text before it is encoded (A1111's `<(\w+):([^>]+)>`), and the LoRAs
//! they name are applied: `<lora:name>` at 1, `<lora:name:w>` at w for the text encoder and the
//! UNet, `<lora:name:te:unet>` each its own.

/// One `<kind:args>` tag.
#[derive(Debug, Clone, PartialEq)]
pub struct ExtraNetwork {
    /// `lora`, `lyco`, `hypernet`, ...
    pub kind: String,
    /// The arguments between the colons (the first is the name).
    pub args: Vec<String>,
}

/// A LoRA a prompt asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraTag {
    /// The file's stem.
    pub name: String,
    /// Multiplier of its text encoder part.
    pub text_encoder_weight: f64,
    /// Multiplier of its UNet part.
    pub unet_weight: f64,
}

/// The tag starting at byte `at` (a `<`): its kind, arguments and the byte after its `>`.
fn tag_at(prompt: &str, at: usize) -> Option<(ExtraNetwork, usize)> {
    let rest = prompt.get(at + 1..)?;
    let kind_end = rest.find(|c: char| !(c.is_alphanumeric() || c == '_'))?;
    if kind_end == 0 || !rest[kind_end..].starts_with(':') {
        return None;
    }
    let body = &rest[kind_end + 1..];
    let close = body.find('>')?;
    if close == 0 {
        return None;
    }
    let args = body[..close].split(':').map(str::to_string).collect();
    let end = at + 1 + kind_end + 1 + close + 1;
    Some((
        ExtraNetwork {
            kind: rest[..kind_end].to_string(),
            args,
        },
        end,
    ))
}

/// The prompt without its extra-network tags, and the tags in order.
pub fn extract(prompt: &str) -> (String, Vec<ExtraNetwork>) {
    let mut text = String::with_capacity(prompt.len());
    let mut tags = Vec::new();
    let mut copied_to = 0;
    let mut search_from = 0;
    while let Some(offset) = prompt[search_from..].find('<') {
        let at = search_from + offset;
        match tag_at(prompt, at) {
            Some((tag, end)) => {
                text.push_str(&prompt[copied_to..at]);
                tags.push(tag);
                copied_to = end;
                search_from = end;
            }
            None => search_from = at + 1,
        }
    }
    text.push_str(&prompt[copied_to..]);
    (text, tags)
}

/// The prompt as the text encoder reads it (tags cut out).
pub fn strip(prompt: &str) -> String {
    if prompt.contains('<') {
        extract(prompt).0
    } else {
        prompt.to_string()
    }
}

/// The LoRAs a prompt asks for (`lora` and `lyco` tags), or why a tag is malformed.
pub fn lora_tags(prompt: &str) -> Result<Vec<LoraTag>, String> {
    let (_, tags) = extract(prompt);
    let mut loras = Vec::new();
    for tag in tags {
        if tag.kind != "lora" && tag.kind != "lyco" {
            continue;
        }
        let name = tag.args[0].trim().to_string();
        if name.is_empty() {
            return Err(format!("<{}:…> names no LoRA", tag.kind));
        }
        let number = |i: usize, default: f64| -> Result<f64, String> {
            match tag.args.get(i).map(|a| a.trim()) {
                None | Some("") => Ok(default),
                Some(text) => text
                    .parse::<f64>()
                    .ok()
                    .filter(|w| w.is_finite())
                    .ok_or_else(|| format!("<{}:{name}:…>: {text:?} is not a weight", tag.kind)),
            }
        };
        let text_encoder_weight = number(1, 1.0)?;
        let unet_weight = number(2, text_encoder_weight)?;
        loras.push(LoraTag {
            name,
            text_encoder_weight,
            unet_weight,
        });
    }
    Ok(loras)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_cut_out_and_read() {
        let prompt = "masterpiece, (red scarf:1.3), <lora:inkStyle:0.7> BREAK <lora:x:1:-0.5>snow";
        assert_eq!(strip(prompt), "masterpiece, (red scarf:1.3),  BREAK snow");
        let tags = lora_tags(prompt).unwrap();
        assert_eq!(
            tags,
            vec![
                LoraTag {
                    name: "inkStyle".into(),
                    text_encoder_weight: 0.7,
                    unet_weight: 0.7
                },
                LoraTag {
                    name: "x".into(),
                    text_encoder_weight: 1.0,
                    unet_weight: -0.5
                },
            ]
        );
    }

    #[test]
    fn other_angle_brackets_stay_and_bad_weights_are_errors() {
        assert_eq!(strip("a < b > c <:x> <lora:>"), "a < b > c <:x> <lora:>");
        assert_eq!(strip("<hypernet:h:1>fox"), "fox");
        assert!(lora_tags("<hypernet:h:1>").unwrap().is_empty());
        assert_eq!(lora_tags("<lora:a>").unwrap()[0].unet_weight, 1.0);
        assert!(lora_tags("<lora:a:heavy>").is_err());
        assert!(lora_tags("<lora: :1>").is_err());
        assert_eq!(strip("ünï <lora:é:1> ✓"), "ünï  ✓");
    }
}
