//! `atelier gallery list|search|rebuild|import|bench`: the gallery on the command line.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::gallery::library::{GalleryEntry, Library, SyncReport};
use crate::gallery::search::GalleryQuery;

/// Arguments of `atelier gallery`.
#[derive(Debug, Args)]
pub struct GalleryArgs {
    /// The library folder (default: the platform's data directory, or ATELIER_LIBRARY).
    #[arg(long, global = true)]
    pub library: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub action: GalleryAction,
}

/// `atelier gallery` actions.
#[derive(Debug, Subcommand)]
pub enum GalleryAction {
    /// List the newest images.
    List {
        /// How many (0: all).
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Favourites only.
        #[arg(long)]
        favourites: bool,
    },
    /// Full-text search over prompts and negative prompts (every word, as a prefix).
    Search {
        /// The words.
        text: String,
        /// Only this model.
        #[arg(long)]
        model: Option<String>,
        /// Only this sampler id (e.g. dpmpp-2m-karras).
        #[arg(long)]
        scheduler: Option<String>,
        /// How many (0: all).
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Rebuild the index from the PNGs in the folder.
    Rebuild,
    /// Copy PNGs made by Atelier, AUTOMATIC1111, ComfyUI or InvokeAI into the library.
    Import {
        /// The PNG files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Time indexing and searching a library of N generated images (in a temporary folder).
    Bench {
        /// Images in the library.
        #[arg(long, default_value_t = 10_000)]
        count: usize,
        /// Write the sample library here and keep it (to open it in the window).
        #[arg(long)]
        keep: Option<PathBuf>,
    },
}

fn open(library: &Option<PathBuf>) -> anyhow::Result<Library> {
    let root = match library {
        Some(root) => root.clone(),
        None => Library::default_root()
            .context("no data directory on this system; give the library folder with --library")?,
    };
    let (library, report) = Library::open_existing(&root)
        .with_context(|| format!("cannot open the library {}", root.display()))?;
    print_report(&report);
    Ok(library)
}

/// Everything a sync had to say, on stderr: every skipped file is named.
fn print_report(report: &SyncReport) {
    for line in report.messages(usize::MAX) {
        eprintln!("{line}");
    }
}

fn print_entries(library: &Library, entries: &[GalleryEntry]) {
    for entry in entries {
        let m = &entry.metadata;
        let date = jiff::Timestamp::from_second(m.created_unix)
            .map(|t| t.strftime("%Y-%m-%d %H:%M").to_string())
            .unwrap_or_default();
        println!(
            "{}{date}  {}  seed {}  {} steps  {}  {}x{}  {}\n    {}",
            if entry.favourite { "* " } else { "  " },
            m.model,
            m.seed.map_or("?".into(), |s| s.to_string()),
            m.steps.map_or("?".into(), |s| s.to_string()),
            m.scheduler,
            m.width,
            m.height,
            library.image_path(entry).display(),
            m.prompt.replace('\n', " ")
        );
    }
}

/// Runs `atelier gallery`.
pub fn run(args: GalleryArgs) -> anyhow::Result<()> {
    match args.action {
        GalleryAction::List { limit, favourites } => {
            let library = open(&args.library)?;
            let entries = library.search(&GalleryQuery {
                favourites_only: favourites,
                limit,
                ..Default::default()
            })?;
            print_entries(&library, &entries);
            eprintln!("{} of {} images", entries.len(), library.count()?);
        }
        GalleryAction::Search {
            text,
            model,
            scheduler,
            limit,
        } => {
            let library = open(&args.library)?;
            let started = Instant::now();
            let entries = library.search(&GalleryQuery {
                text,
                model,
                scheduler,
                limit,
                ..Default::default()
            })?;
            let ms = started.elapsed().as_secs_f64() * 1e3;
            print_entries(&library, &entries);
            eprintln!("{} matches in {ms:.1} ms", entries.len());
        }
        GalleryAction::Rebuild => {
            let mut library = open(&args.library)?;
            let report = library.rebuild()?;
            print_report(&report);
            eprintln!(
                "rebuilt {}: {} images indexed, {} skipped",
                library.root().display(),
                report.added,
                report.skipped.len()
            );
        }
        GalleryAction::Import { files } => {
            let mut library = open(&args.library)?;
            let mut failed = 0;
            for file in &files {
                match library.import(file) {
                    Ok(entry) => println!("{}", library.image_path(&entry).display()),
                    Err(error) => {
                        eprintln!("not imported: {error}");
                        failed += 1;
                    }
                }
            }
            eprintln!("imported {} of {}", files.len() - failed, files.len());
            if failed > 0 {
                anyhow::bail!("{failed} file(s) could not be imported");
            }
        }
        GalleryAction::Bench { count, keep } => bench(count, keep)?,
    }
    Ok(())
}

fn bench(count: usize, keep: Option<PathBuf>) -> anyhow::Result<()> {
    let dir = keep.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("atelier-gallery-bench-{}", std::process::id()))
    });
    std::fs::create_dir_all(&dir)?;
    let result = (|| -> anyhow::Result<()> {
        let started = Instant::now();
        crate::gallery::library::write_sample_library(&dir, count)?;
        eprintln!(
            "wrote {count} PNGs in {:.2} s",
            started.elapsed().as_secs_f64()
        );
        let started = Instant::now();
        let (library, report) = Library::open(&dir)?;
        println!(
            "index {} PNGs (first open): {:.2} s",
            report.added,
            started.elapsed().as_secs_f64()
        );
        drop(library);
        let started = Instant::now();
        let (library, report) = Library::open(&dir)?;
        println!(
            "reopen the indexed library ({} PNGs checked against the index, {} added): {:.3} s",
            library.count()?,
            report.added,
            started.elapsed().as_secs_f64()
        );
        let first_page = crate::gallery::worker::FIRST_PAGE_ROWS;
        let text = |text: &str| GalleryQuery {
            text: text.into(),
            ..Default::default()
        };
        let queries = [
            ("newest first, no search".to_string(), text("")),
            ("search \"dragon\"".into(), text("dragon")),
            ("search \"castle artist4\"".into(), text("castle artist4")),
            (
                "search \"portrait city light\"".into(),
                text("portrait city light"),
            ),
            ("search \"zzz-nothing\"".into(), text("zzz-nothing")),
            (
                "favourites only (none: every row checked)".into(),
                GalleryQuery {
                    favourites_only: true,
                    ..Default::default()
                },
            ),
            (
                "a model no image has (every row checked)".into(),
                GalleryQuery {
                    model: Some("no-such-model".into()),
                    ..Default::default()
                },
            ),
        ];
        for (name, query) in queries {
            let median = |mut times: Vec<f64>| {
                times.sort_by(f64::total_cmp);
                times[times.len() / 2]
            };
            let mut first_times = Vec::new();
            let mut first_rows = 0;
            for _ in 0..20 {
                let started = Instant::now();
                first_rows = library.search_page(&query, None, first_page)?.entries.len();
                first_times.push(started.elapsed().as_secs_f64() * 1e3);
            }
            let mut all_times = Vec::new();
            let mut hits = 0;
            for _ in 0..3 {
                let started = Instant::now();
                hits = library.search(&query)?.len();
                all_times.push(started.elapsed().as_secs_f64() * 1e3);
            }
            println!(
                "{name}: first page ({first_rows} rows) median {:.2} ms; all {hits} rows {:.1} ms",
                median(first_times),
                median(all_times)
            );
        }
        Ok(())
    })();
    if keep.is_none() {
        let _ = std::fs::remove_dir_all(Path::new(&dir));
    }
    result
}
