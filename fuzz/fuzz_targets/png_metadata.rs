//! Generation metadata of A1111, ComfyUI, InvokeAI and Atelier from any text chunks.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = atelier::gallery::metadata::A1111Parameters::parse(&text);
    // Up to four chunks, separated by NUL, as the keywords the importers read.
    let mut chunks = BTreeMap::new();
    for (key, value) in ["parameters", "prompt", "invokeai_metadata", "atelier"]
        .iter()
        .zip(text.split('\0'))
    {
        chunks.insert(key.to_string(), value.to_string());
    }
    let _ = atelier::gallery::record::ImageMetadata::from_chunks(&chunks);
});
