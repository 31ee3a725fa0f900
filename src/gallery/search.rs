//! Searching the library: the conditions an artist sets (text, model, sampler, date,
//! favourites, comparison), read a page at a time newest first, and the filters' choices.

use rusqlite::{OptionalExtension, params};

use super::library::{GalleryEntry, Library, Result};

/// What to show: every condition must hold; newest first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GalleryQuery {
    /// Words that must appear in the prompt or negative prompt (prefix match), empty for all.
    pub text: String,
    /// Only this model.
    pub model: Option<String>,
    /// Only this sampler id.
    pub scheduler: Option<String>,
    /// Only images made at or after this time (seconds since 1970).
    pub since_unix: Option<i64>,
    /// Only favourites.
    pub favourites_only: bool,
    /// Only the cells of this comparison.
    pub comparison: Option<String>,
    /// At most this many (0: no limit).
    pub limit: usize,
}

/// Rows read per page when a search loads everything.
pub const SEARCH_PAGE_ROWS: usize = 4096;

/// Where a page of search results ends, in newest-first order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageKey {
    /// The last row's creation time.
    pub created_unix: i64,
    /// The last row's id (ties of creation time are ordered by id).
    pub id: i64,
}

/// One page of search results.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchPage {
    /// The rows, newest first.
    pub entries: Vec<GalleryEntry>,
    /// Where the next page starts (none when the page is empty).
    pub last: Option<PageKey>,
}

/// What an artist typed in the search box, as conditions: words (anything with a letter or a
/// digit) go to FTS5, each as a prefix; symbols that the full-text index does not hold (emoji,
/// other pictographs) must appear in the prompt or negative prompt as typed. A query of only
/// punctuation is matched as typed too. Blank: no condition.
#[derive(Debug, Default, PartialEq)]
struct TextQuery {
    fts: Option<String>,
    substrings: Vec<String>,
}

fn text_query(text: &str) -> TextQuery {
    let is_word_char = |c: char| c.is_alphanumeric() || c == '\'' || c == '-' || c == '_';
    let words: Vec<String> = text
        .split(|c: char| !is_word_char(c))
        .filter(|w| w.chars().any(char::is_alphanumeric))
        .map(|w| format!("\"{}\"*", w.replace('"', "\"\"")))
        .collect();
    let mut substrings: Vec<String> = text
        .split(|c: char| c.is_alphanumeric() || c.is_whitespace() || c.is_ascii_punctuation())
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    if words.is_empty() && substrings.is_empty() && !text.trim().is_empty() {
        substrings.push(text.trim().to_string());
    }
    TextQuery {
        fts: (!words.is_empty()).then(|| words.join(" ")),
        substrings,
    }
}

impl Library {
    fn entry_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<GalleryEntry> {
        let json: String = row.get(2)?;
        Ok(GalleryEntry {
            id: row.get(0)?,
            file: row.get(1)?,
            metadata: serde_json::from_str(&json).unwrap_or_default(),
            favourite: row.get(3)?,
        })
    }

    /// The images matching `query`, newest first (at most `query.limit`, 0: all).
    pub fn search(&self, query: &GalleryQuery) -> Result<Vec<GalleryEntry>> {
        let mut entries = Vec::new();
        let mut after = None;
        loop {
            let wanted = match query.limit {
                0 => SEARCH_PAGE_ROWS,
                limit => (limit - entries.len()).min(SEARCH_PAGE_ROWS),
            };
            let page = self.search_page(query, after, wanted)?;
            let done = page.entries.len() < wanted;
            after = page.last;
            entries.extend(page.entries);
            if done || (query.limit > 0 && entries.len() >= query.limit) {
                return Ok(entries);
            }
        }
    }

    /// Up to `rows` images matching `query`, newest first, after the image whose place in that
    /// order is `after` (none: from the newest). Only the page's rows are read and parsed: the
    /// ordering runs on the index of creation times (or on the matching ids of a text search),
    /// so the first screenful of any search comes back in milliseconds at 100,000 images.
    pub fn search_page(
        &self,
        query: &GalleryQuery,
        after: Option<PageKey>,
        rows: usize,
    ) -> Result<SearchPage> {
        let from = "FROM images";
        let mut conditions: Vec<String> = Vec::new();
        let mut values: Vec<rusqlite::types::Value> = Vec::new();
        let text = text_query(&query.text);
        if let Some(fts) = text.fts {
            // The matches as a set of ids: the rows are then walked newest first on the index
            // of creation times until a page is full, instead of sorting every match.
            conditions.push(
                "images.id IN (SELECT rowid FROM images_fts WHERE images_fts MATCH ?)".into(),
            );
            values.push(fts.into());
        }
        for substring in text.substrings {
            conditions
                .push("instr(images.prompt || char(10) || images.negative_prompt, ?) > 0".into());
            values.push(substring.into());
        }
        if let Some(model) = &query.model {
            conditions.push("images.model = ?".into());
            values.push(model.clone().into());
        }
        if let Some(scheduler) = &query.scheduler {
            conditions.push("images.scheduler = ?".into());
            values.push(scheduler.clone().into());
        }
        if let Some(since) = query.since_unix {
            conditions.push("images.created_unix >= ?".into());
            values.push(since.into());
        }
        if query.favourites_only {
            conditions.push("images.favourite = 1".into());
        }
        if let Some(comparison) = &query.comparison {
            conditions.push("images.comparison = ?".into());
            values.push(comparison.clone().into());
        }
        if let Some(key) = after {
            // Keyset paging: rows saved meanwhile do not shift the pages.
            conditions.push(
                "(images.created_unix < ? OR (images.created_unix = ? AND images.id < ?))".into(),
            );
            values.push(key.created_unix.into());
            values.push(key.created_unix.into());
            values.push(key.id.into());
        }
        let filter = if conditions.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conditions.join(" AND "))
        };
        // The page's ids first, walking the index of creation times newest first until the
        // page is full (no sort of every match), then only their rows.
        let sql = format!(
            "SELECT images.id, images.file, images.metadata_json, images.favourite, \
             images.created_unix FROM images WHERE images.id IN (SELECT images.id {from} \
             INDEXED BY images_created{filter} \
             ORDER BY images.created_unix DESC, images.id DESC LIMIT ?) \
             ORDER BY images.created_unix DESC, images.id DESC"
        );
        values.push(i64::try_from(rows).unwrap_or(i64::MAX).into());
        let mut statement = self.db.prepare(&sql)?;
        let mut last = None;
        let entries = statement
            .query_map(rusqlite::params_from_iter(values), |row| {
                let entry = Self::entry_from_row(row)?;
                Ok((entry, row.get::<_, i64>(4)?))
            })?
            .map(|row| {
                row.map(|(entry, created_unix)| {
                    last = Some(PageKey {
                        created_unix,
                        id: entry.id,
                    });
                    entry
                })
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(SearchPage { entries, last })
    }

    /// One entry by id.
    pub fn get(&self, id: i64) -> Result<Option<GalleryEntry>> {
        Ok(self
            .db
            .query_row(
                "SELECT id, file, metadata_json, favourite FROM images WHERE id = ?1",
                params![id],
                Self::entry_from_row,
            )
            .optional()?)
    }

    /// Every image in the library.
    pub fn count(&self) -> Result<usize> {
        Ok(self
            .db
            .query_row("SELECT COUNT(*) FROM images", [], |row| {
                row.get::<_, i64>(0)
            })? as usize)
    }

    /// The distinct values of a column (for the filters).
    fn distinct(&self, column: &str) -> Result<Vec<String>> {
        let mut statement = self.db.prepare(&format!(
            "SELECT DISTINCT {column} FROM images WHERE {column} != '' ORDER BY {column}"
        ))?;
        let values = statement
            .query_map([], |row| row.get(0))?
            .collect::<std::result::Result<Vec<String>, _>>()?;
        Ok(values)
    }

    /// The models in the library.
    pub fn models(&self) -> Result<Vec<String>> {
        self.distinct("model")
    }

    /// The samplers in the library.
    pub fn schedulers(&self) -> Result<Vec<String>> {
        self.distinct("scheduler")
    }
}
