//! A first start on a fresh machine: no model chosen, no network. The window opens Atelier
//! Shapes (unpacked from the binary into a fresh data folder), says what it draws, and a prompt
//! makes the picture it asks for.
#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod window;

use atelier::demo_model::analyser::analyse;
use atelier::ui::settings::Settings;
use egui_kittest::kittest::Queryable;
use window::start_real_with;

#[test]
fn a_first_start_opens_the_bundled_model_and_it_draws_what_is_asked() {
    let data = tempfile::tempdir().unwrap();
    // SAFETY: the only test of this binary sets the variable before any thread starts.
    unsafe {
        std::env::set_var("XDG_DATA_HOME", data.path());
        std::env::set_var("HF_HUB_OFFLINE", "1");
    }
    let library = tempfile::tempdir().unwrap();
    let mut settings = Settings {
        library_dir: library.path().display().to_string(),
        device: "cpu".into(),
        seed: 4,
        seed_locked: true,
        scheduler: "dpmpp-2m".into(),
        ..Default::default()
    };
    assert!(settings.model.is_empty(), "a first start has no model");
    assert!(settings.choose_bundled_model_if_none());
    assert_eq!(
        (settings.width, settings.height, settings.steps),
        (128, 128, 20)
    );
    settings.steps = 10;
    let mut f = start_real_with(settings, library);
    assert!(
        data.path()
            .join("atelier/models/atelier-shapes/model_index.json")
            .is_file(),
        "unpacked into the data folder"
    );
    assert!(f.harness.query_by_label("About Atelier Shapes").is_some());
    assert!(
        f.harness
            .query_by_label_contains("draws circles, squares, triangles, stars and rings")
            .is_some()
    );
    f.type_prompt("a large red circle on a blue background");
    f.click("Generate");
    f.wait_for("the picture", |app| app.shown.is_some());
    let shown = f.app().shown.as_ref().unwrap().image.clone();
    assert_eq!(shown.dimensions(), (128, 128));
    let reading = analyse(&shown);
    assert_eq!(reading.background, "blue", "{reading:?}");
    let shape = reading.shape.unwrap();
    assert_eq!((shape.colour, shape.kind), ("red", "circle"), "{shape:?}");
}
