//! safetensors headers (every weights file, memory-mapped by candle) from any bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(tensors) = safetensors::SafeTensors::deserialize(data) {
        for (_, view) in tensors.tensors() {
            let _ = view.data().len();
        }
    }
});
