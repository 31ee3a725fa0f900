//! Storage of images and their metadata: a folder of PNGs, indexed in SQLite.

pub mod hash_cache;
pub mod import;
mod index;
pub mod library;
pub mod metadata;
pub mod png_read;
pub mod record;
pub mod search;
mod sync;
pub mod worker;
