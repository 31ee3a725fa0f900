//! The window's tests (egui_kittest, a fake or a real engine), in one test binary. The first
//! start (`tests/first_start.rs`) has its own, since it sets process-wide environment variables.

#[path = "../window/mod.rs"]
mod window;

mod ui;
mod ui_modes;
