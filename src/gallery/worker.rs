//! The gallery's threads: one owns the library (saving, searching, importing, deleting), one
//! makes thumbnails. The window talks to them through channels and never waits.

use std::collections::VecDeque;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::Instant;

use image::RgbImage;
use sha2::{Digest, Sha256};

use super::library::{DeletedImage, GalleryEntry, Library, SyncReport, thumbnail};
use super::png_read::decode_rgb_bounded;
use super::record::ImageMetadata;
use super::search::{GalleryQuery, SEARCH_PAGE_ROWS};

/// Wakes the window when something arrives.
pub type Wake = Arc<dyn Fn() + Send + Sync>;

/// What the window asks of the library.
pub enum GalleryCommand {
    /// Open the library at this folder (creating it), replacing the current one.
    Open(PathBuf),
    /// Save a finished image; `weights` (the UNet weights file) is hashed for the metadata.
    Save {
        /// The pixels.
        image: RgbImage,
        /// Its parameters.
        metadata: Box<ImageMetadata>,
        /// The model's UNet weights, for the model hash.
        weights: Option<PathBuf>,
        /// The picture (and mask) the job worked on, kept with it.
        input: Option<crate::engine::pipeline::ImageJob>,
    },
    /// Run a search.
    Search(GalleryQuery),
    /// Mark or unmark a favourite.
    SetFavourite(i64, bool),
    /// Move an image to the trash.
    Delete(i64),
    /// Put the last deleted image back.
    UndoDelete,
    /// Import PNGs from other tools.
    Import(Vec<PathBuf>),
    /// Read every PNG again.
    Rebuild,
    /// Pick up PNGs added to (or removed from) the folder since it was opened.
    Sync,
    /// Load an image at full size.
    LoadImage(i64),
    /// Load every cell of a comparison (entries and pixels).
    LoadComparison(String),
}

/// What the library tells the window.
pub enum GalleryEvent {
    /// The library is open.
    Opened {
        /// Its folder.
        root: PathBuf,
        /// What the first sync did.
        report: SyncReport,
    },
    /// An image was saved.
    Saved(GalleryEntry),
    /// The first page of search results, newest first (a screenful and more: the rest
    /// follows in [`GalleryEvent::MoreResults`]).
    Results {
        /// The query they answer.
        query: GalleryQuery,
        /// The matches.
        entries: Vec<GalleryEntry>,
        /// Whether these are all the matches.
        complete: bool,
        /// How long the first page took.
        search_ms: f64,
    },
    /// The next page of a search's results.
    MoreResults {
        /// The query they answer.
        query: GalleryQuery,
        /// The matches, after those sent before.
        entries: Vec<GalleryEntry>,
        /// Whether the search has sent every match now.
        complete: bool,
    },
    /// The models and samplers in the library (for the filters), after each search's first
    /// page.
    Filters {
        /// Models in the library.
        models: Vec<String>,
        /// Samplers in the library.
        schedulers: Vec<String>,
    },
    /// The library changed: search again.
    Changed,
    /// An image went to the trash (undo possible).
    Deleted(GalleryEntry),
    /// A deleted image is back.
    Restored(GalleryEntry),
    /// An import finished.
    Imported {
        /// Images added.
        added: Vec<GalleryEntry>,
        /// Files refused, with the reason.
        failed: Vec<String>,
    },
    /// A full-size image.
    Image {
        /// Its entry id.
        id: i64,
        /// The pixels.
        image: RgbImage,
    },
    /// The cells of a comparison, with their pixels.
    Comparison {
        /// The cells' entries.
        entries: Vec<GalleryEntry>,
        /// Their images, by file.
        images: Vec<(String, RgbImage)>,
    },
    /// Something failed; the message says what.
    Failed(String),
}

/// A thumbnail made (or that could not be made).
pub struct ThumbnailReady {
    /// The file it belongs to.
    pub file: String,
    /// The pixels, or why not.
    pub image: Result<RgbImage, String>,
}

/// The window's side of the gallery threads.
pub struct GalleryHandle {
    commands: SyncSender<GalleryCommand>,
    /// Commands that found the channel full, sent first next time.
    pending: VecDeque<GalleryCommand>,
    events: Receiver<GalleryEvent>,
    thumbnail_requests: SyncSender<(PathBuf, String)>,
    thumbnails: Receiver<ThumbnailReady>,
}

/// Rows of a search's first page: more than any screenful of thumbnails.
pub const FIRST_PAGE_ROWS: usize = 240;

/// The thumbnail size on disk and in the grid.
pub const THUMBNAIL_SIDE: u32 = 256;

impl GalleryHandle {
    /// Starts the gallery threads (`atelier-gallery`, `atelier-thumbnails`).
    pub fn spawn(wake: Wake) -> std::io::Result<Self> {
        let (commands, command_rx) = sync_channel(64);
        let (event_tx, events) = sync_channel(64);
        let (thumbnail_requests, request_rx) = sync_channel::<(PathBuf, String)>(256);
        let (thumb_tx, thumbnails) = sync_channel(64);
        let gallery_wake = wake.clone();
        std::thread::Builder::new()
            .name("atelier-gallery".into())
            .spawn(move || GalleryThread::new(event_tx, gallery_wake).run(command_rx))?;
        std::thread::Builder::new()
            .name("atelier-thumbnails".into())
            .spawn(move || {
                while let Ok((root, file)) = request_rx.recv() {
                    let image = thumbnail(&root, &file, THUMBNAIL_SIDE).map_err(|e| e.to_string());
                    if thumb_tx.send(ThumbnailReady { file, image }).is_err() {
                        return;
                    }
                    wake();
                }
            })?;
        Ok(Self {
            commands,
            pending: VecDeque::new(),
            events,
            thumbnail_requests,
            thumbnails,
        })
    }

    /// Sends a command without waiting (a full channel keeps it for later, in order); false if
    /// the gallery thread is gone.
    pub fn send(&mut self, command: GalleryCommand) -> bool {
        self.pending.push_back(command);
        self.flush()
    }

    /// Sends what waits; false if the gallery thread is gone.
    fn flush(&mut self) -> bool {
        while let Some(command) = self.pending.pop_front() {
            match self.commands.try_send(command) {
                Ok(()) => {}
                Err(TrySendError::Full(command)) => {
                    self.pending.push_front(command);
                    return true;
                }
                Err(TrySendError::Disconnected(_)) => return false,
            }
        }
        true
    }

    /// The next event, if any (and sends what waits).
    pub fn try_recv(&mut self) -> Option<GalleryEvent> {
        self.flush();
        self.events.try_recv().ok()
    }

    /// Asks for the thumbnail of `file` in the library at `root`; false if the thumbnail
    /// thread is busy (ask again next frame).
    pub fn request_thumbnail(&self, root: &Path, file: &str) -> bool {
        self.thumbnail_requests
            .try_send((root.to_path_buf(), file.to_string()))
            .is_ok()
    }

    /// The next finished thumbnail, if any.
    pub fn try_thumbnail(&self) -> Option<ThumbnailReady> {
        self.thumbnails.try_recv().ok()
    }
}

/// First 10 hex digits of the SHA-256 of a file (AUTOMATIC1111's "Model hash").
pub fn file_hash(path: &Path) -> std::io::Result<String> {
    let mut file = std::io::BufReader::new(std::fs::File::open(path)?);
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hex::encode(hasher.finalize())[..10].to_string())
}

struct GalleryThread {
    library: Option<Library>,
    events: SyncSender<GalleryEvent>,
    wake: Wake,
    hashes: super::hash_cache::HashCache,
    last_deleted: Option<DeletedImage>,
}

impl GalleryThread {
    fn new(events: SyncSender<GalleryEvent>, wake: Wake) -> Self {
        Self {
            library: None,
            events,
            wake,
            hashes: super::hash_cache::HashCache::open_default(),
            last_deleted: None,
        }
    }

    fn emit(&self, event: GalleryEvent) {
        if self.events.send(event).is_ok() {
            (self.wake)();
        }
    }

    fn run(mut self, commands: Receiver<GalleryCommand>) {
        let mut next = None;
        loop {
            let command = match next.take() {
                Some(command) => command,
                None => match commands.recv() {
                    Ok(command) => command,
                    Err(_) => return,
                },
            };
            let result = match command {
                GalleryCommand::Search(query) => self.search(query, &commands, &mut next),
                other => self.handle(other),
            };
            if let Err(message) = result {
                self.emit(GalleryEvent::Failed(message));
            }
        }
    }

    /// Sends the first page of `query`'s results at once, then the filters, then the rest in
    /// pages. Other commands that arrive meanwhile are handled between pages; a newer search
    /// ends this one (it is left in `next`).
    fn search(
        &mut self,
        query: GalleryQuery,
        commands: &Receiver<GalleryCommand>,
        next: &mut Option<GalleryCommand>,
    ) -> Result<(), String> {
        let started = Instant::now();
        let first_rows = match query.limit {
            0 => FIRST_PAGE_ROWS,
            limit => limit.min(FIRST_PAGE_ROWS),
        };
        let page = self
            .library()?
            .search_page(&query, None, first_rows)
            .map_err(|e| e.to_string())?;
        let mut sent = page.entries.len();
        let mut complete = sent < first_rows || (query.limit > 0 && sent >= query.limit);
        let mut after = page.last;
        self.emit(GalleryEvent::Results {
            query: query.clone(),
            entries: page.entries,
            complete,
            search_ms: started.elapsed().as_secs_f64() * 1e3,
        });
        let library = self.library()?;
        let models = library.models().map_err(|e| e.to_string())?;
        let schedulers = library.schedulers().map_err(|e| e.to_string())?;
        self.emit(GalleryEvent::Filters { models, schedulers });
        while !complete {
            while let Ok(command) = commands.try_recv() {
                if matches!(command, GalleryCommand::Search(_)) {
                    *next = Some(command);
                    return Ok(());
                }
                if let Err(message) = self.handle(command) {
                    self.emit(GalleryEvent::Failed(message));
                }
            }
            let rows = match query.limit {
                0 => SEARCH_PAGE_ROWS,
                limit => (limit - sent).min(SEARCH_PAGE_ROWS),
            };
            let page = self
                .library()?
                .search_page(&query, after, rows)
                .map_err(|e| e.to_string())?;
            sent += page.entries.len();
            complete = page.entries.len() < rows || (query.limit > 0 && sent >= query.limit);
            after = page.last;
            self.emit(GalleryEvent::MoreResults {
                query: query.clone(),
                entries: page.entries,
                complete,
            });
        }
        Ok(())
    }

    fn library(&mut self) -> Result<&mut Library, String> {
        self.library
            .as_mut()
            .ok_or_else(|| "the gallery is not open".to_string())
    }

    fn handle(&mut self, command: GalleryCommand) -> Result<(), String> {
        match command {
            GalleryCommand::Open(root) => {
                let (library, report) = Library::open(&root).map_err(|e| e.to_string())?;
                // Images deleted in an earlier session cannot be undone any more.
                let _ = library.empty_trash();
                self.library = Some(library);
                self.last_deleted = None;
                self.emit(GalleryEvent::Opened { root, report });
            }
            GalleryCommand::Save {
                image,
                mut metadata,
                weights,
                input,
            } => {
                if let Some(input) = input {
                    let library = self.library()?;
                    let stored = library
                        .store_input(&image::DynamicImage::ImageRgb8(
                            input.image.as_ref().clone(),
                        ))
                        .map_err(|e| format!("the init image could not be kept: {e}"))?;
                    metadata.init_image = Some(stored);
                    if let Some(mask) = &input.mask {
                        let stored = library
                            .store_input(&image::DynamicImage::ImageLuma8(mask.as_ref().clone()))
                            .map_err(|e| format!("the mask could not be kept: {e}"))?;
                        metadata.mask_image = Some(stored);
                    }
                }
                if let Some(weights) = weights {
                    metadata.model_hash = self.hashes.hash(&weights).ok();
                }
                let entry = self
                    .library()?
                    .save(&image, &metadata)
                    .map_err(|e| format!("the image could not be saved to the gallery: {e}"))?;
                self.emit(GalleryEvent::Saved(entry));
            }
            GalleryCommand::Search(query) => {
                // `run` streams searches page by page; here every match goes at once.
                let started = Instant::now();
                let library = self.library()?;
                let entries = library.search(&query).map_err(|e| e.to_string())?;
                let search_ms = started.elapsed().as_secs_f64() * 1e3;
                let models = library.models().map_err(|e| e.to_string())?;
                let schedulers = library.schedulers().map_err(|e| e.to_string())?;
                self.emit(GalleryEvent::Results {
                    query,
                    entries,
                    complete: true,
                    search_ms,
                });
                self.emit(GalleryEvent::Filters { models, schedulers });
            }
            GalleryCommand::SetFavourite(id, favourite) => {
                self.library()?
                    .set_favourite(id, favourite)
                    .map_err(|e| e.to_string())?;
                self.emit(GalleryEvent::Changed);
            }
            GalleryCommand::Delete(id) => {
                let deleted = self.library()?.delete(id).map_err(|e| e.to_string())?;
                let entry = deleted.entry.clone();
                self.last_deleted = Some(deleted);
                self.emit(GalleryEvent::Deleted(entry));
            }
            GalleryCommand::UndoDelete => {
                let Some(deleted) = self.last_deleted.take() else {
                    return Ok(());
                };
                let entry = self
                    .library()?
                    .undo_delete(&deleted)
                    .map_err(|e| e.to_string())?;
                self.emit(GalleryEvent::Restored(entry));
            }
            GalleryCommand::Import(paths) => {
                let library = self.library()?;
                let mut added = Vec::new();
                let mut failed = Vec::new();
                for path in paths {
                    match library.import(&path) {
                        Ok(entry) => added.push(entry),
                        Err(e) => failed.push(e.to_string()),
                    }
                }
                self.emit(GalleryEvent::Imported { added, failed });
            }
            GalleryCommand::Sync => {
                let report = self.library()?.sync().map_err(|e| e.to_string())?;
                if report.added > 0 || report.removed > 0 {
                    self.emit(GalleryEvent::Changed);
                }
            }
            GalleryCommand::Rebuild => {
                self.library()?.rebuild().map_err(|e| e.to_string())?;
                self.emit(GalleryEvent::Changed);
            }
            GalleryCommand::LoadComparison(id) => {
                let library = self.library()?;
                let entries = library
                    .search(&GalleryQuery {
                        comparison: Some(id.clone()),
                        ..Default::default()
                    })
                    .map_err(|e| e.to_string())?;
                if entries.is_empty() {
                    return Err(format!(
                        "no cells of comparison {id} are left in the gallery"
                    ));
                }
                let mut images = Vec::new();
                for entry in &entries {
                    let path = library.image_path(entry);
                    // A missing or broken cell stays empty in the grid.
                    if let Ok(image) = decode_rgb_bounded(&path) {
                        images.push((entry.file.clone(), image));
                    }
                }
                self.emit(GalleryEvent::Comparison { entries, images });
            }
            GalleryCommand::LoadImage(id) => {
                let library = self.library()?;
                let entry = library
                    .get(id)
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("image {id} is no longer in the library"))?;
                let path = library.image_path(&entry);
                let image = decode_rgb_bounded(&path).map_err(|e| e.to_string())?;
                self.emit(GalleryEvent::Image { id, image });
            }
        }
        Ok(())
    }
}
