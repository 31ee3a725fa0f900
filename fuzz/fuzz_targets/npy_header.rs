//! `.npy` headers (`--init-noise`) from any bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(header) = atelier::engine::npy::parse_npy_header(data) {
        let _ = header.element_count();
    }
    let mut file = b"\x93NUMPY\x01\x00".to_vec();
    file.extend_from_slice(data);
    let _ = atelier::engine::npy::parse_npy_header(&file);
});
