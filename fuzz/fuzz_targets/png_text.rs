//! The PNG text-chunk walker on any bytes (the gallery reads every PNG dropped in its folder).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.png");
    let _ = atelier::gallery::png_read::read_text_from(
        std::io::Cursor::new(data),
        data.len() as u64,
        path,
    );
    // The same bytes behind a valid signature reach the chunk loop every time.
    let mut png = vec![0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];
    png.extend_from_slice(data);
    let _ = atelier::gallery::png_read::read_text_from(
        std::io::Cursor::new(png.as_slice()),
        png.len() as u64,
        path,
    );
});
