//! The fixed validation set of Atelier Shapes and its score: does the picture show what the
//! prompt asked for? (`assets/atelier-shapes-validation.json`, written by
//! `scripts/shapes_data.py`; read by `atelier shapes-check` and `tests/headless/demo_model.rs`.)

use serde::Deserialize;

use super::analyser::Reading;

/// One validation prompt and what its picture should show.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ValidationPrompt {
    /// The prompt, e.g. "a large red circle in the center on an orange background".
    pub prompt: String,
    /// The shape asked for.
    pub shape: String,
    /// Its colour.
    pub colour: String,
    /// The background's colour.
    pub background: String,
    /// Where the shape should be.
    pub position: String,
    /// The seed of its picture.
    pub seed: u64,
}

#[derive(Deserialize)]
struct ValidationFile {
    prompts: Vec<ValidationPrompt>,
}

/// The validation prompts (bundled in the binary).
pub fn validation_prompts() -> Vec<ValidationPrompt> {
    const TEXT: &str = include_str!("../../assets/atelier-shapes-validation.json");
    // The file is part of the build: a parse failure is caught by the tests, not by artists.
    serde_json::from_str::<ValidationFile>(TEXT)
        .map(|file| file.prompts)
        .unwrap_or_default()
}

/// Which of a prompt's requests its picture meets.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Checks {
    /// The shape has the colour asked for.
    pub colour: bool,
    /// The background has the colour asked for.
    pub background: bool,
    /// The shape is of the kind asked for.
    pub shape: bool,
    /// The shape is where it was asked to be.
    pub position: bool,
}

/// Checks a reading against its prompt.
pub fn check(prompt: &ValidationPrompt, reading: &Reading) -> Checks {
    let shape = reading.shape.as_ref();
    Checks {
        colour: shape.is_some_and(|s| s.colour == prompt.colour),
        background: reading.background == prompt.background,
        shape: shape.is_some_and(|s| s.kind == prompt.shape),
        position: shape.is_some_and(|s| s.position == prompt.position),
    }
}

/// Accuracy over a set of pictures, per request.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Accuracy {
    /// Pictures scored.
    pub count: usize,
    /// Pictures whose shape has the right colour.
    pub colour: usize,
    /// Pictures whose background has the right colour.
    pub background: usize,
    /// Pictures whose shape is of the right kind.
    pub shape: usize,
    /// Pictures whose shape is in the right place.
    pub position: usize,
}

impl Accuracy {
    /// Adds one picture's checks.
    pub fn add(&mut self, checks: Checks) {
        self.count += 1;
        self.colour += checks.colour as usize;
        self.background += checks.background as usize;
        self.shape += checks.shape as usize;
        self.position += checks.position as usize;
    }

    /// A count as a fraction of the pictures (0 when there are none).
    pub fn fraction(&self, hits: usize) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            hits as f64 / self.count as f64
        }
    }

    /// One line: "colour 95.0 %, background 100.0 %, shape 80.0 %, position 40.0 % (40 pictures)".
    pub fn summary(&self) -> String {
        format!(
            "colour {:.1} %, background {:.1} %, shape {:.1} %, position {:.1} % ({} pictures)",
            100.0 * self.fraction(self.colour),
            100.0 * self.fraction(self.background),
            100.0 * self.fraction(self.shape),
            100.0 * self.fraction(self.position),
            self.count
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo_model::analyser::{COLOURS, SHAPES};

    #[test]
    fn the_validation_set_covers_every_shape_colour_and_position() {
        let prompts = validation_prompts();
        assert_eq!(prompts.len(), 40);
        for shape in SHAPES {
            assert!(prompts.iter().any(|p| p.shape == shape), "{shape}");
        }
        for (colour, _) in COLOURS {
            assert!(prompts.iter().any(|p| p.colour == colour), "{colour}");
            assert!(prompts.iter().any(|p| p.background == colour), "{colour}");
        }
        let positions: std::collections::HashSet<_> =
            prompts.iter().map(|p| p.position.as_str()).collect();
        assert_eq!(positions.len(), 9);
        for prompt in &prompts {
            assert_ne!(prompt.colour, prompt.background);
            assert!(
                prompt.prompt.contains(&prompt.colour) && prompt.prompt.contains(&prompt.shape)
            );
        }
    }
}
