//! Storage of images and their metadata.

pub mod metadata;
