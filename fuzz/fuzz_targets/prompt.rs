//! CLIP tokenization of any prompt (the SD 1.x fixture's tokenizer): plain, and as A1111 reads
//! it (emphasis, BREAK, chunks).
#![no_main]

use std::sync::OnceLock;

use atelier::engine::source::{ModelFiles, ModelSource};
use atelier::engine::tokenizer::ClipTokenizer;
use libfuzzer_sys::fuzz_target;

fn tokenizer() -> &'static ClipTokenizer {
    static TOKENIZER: OnceLock<ClipTokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let folder =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/sd1/model");
        let files = ModelFiles::new(ModelSource::Folder(folder), None);
        ClipTokenizer::load(&files, "tokenizer").expect("the fixture's tokenizer loads")
    })
}

fuzz_target!(|data: &[u8]| {
    let prompt = String::from_utf8_lossy(data);
    let tokens = tokenizer().tokenize(&prompt).expect("any text tokenizes");
    assert_eq!(tokens.ids.len(), tokenizer().max_length());
    let (chunks, count) = tokenizer().chunks(&prompt).expect("any text chunks");
    assert!(!chunks.is_empty());
    assert!(count <= chunks.len() * (tokenizer().max_length() - 2));
    for chunk in &chunks {
        assert_eq!(chunk.tokens.len(), tokenizer().max_length());
        assert_eq!(chunk.weights.len(), chunk.tokens.len());
    }
});
