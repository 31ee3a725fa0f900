//! GroupNorm statistics shared across the tiles of one tiled VAE pass.
//!
//! A tile normalised with its own mean and variance comes out lighter or darker than its
//! neighbours (the seams of a plain tiled decode). While a [`SharedStatistics`] session is open
//! on a thread, every GroupNorm adds its input's per-group sums to a tally (the `k`-th GroupNorm
//! call of a tile to the `k`-th tally), and, once [`SharedStatistics::next_pass`] has turned
//! the tallies into whole-image statistics, normalises with those instead of its own. A pass
//! over all tiles to collect, then passes that apply what the previous one collected, converge
//! on the statistics of the whole image.

use std::cell::RefCell;

use candle_core::{D, DType, Tensor};

use super::error::Result;
use super::nn::Activation;

/// Per-(batch item, group) sums of one GroupNorm call over every tile.
#[derive(Debug, Clone, Default)]
struct Tally {
    sums: Vec<f64>,
    squares: Vec<f64>,
    count: f64,
}

/// Mean and variance per (batch item, group).
#[derive(Debug, Clone)]
struct Statistics {
    means: Vec<f32>,
    variances: Vec<f32>,
}

/// The part of a tile that its statistics count, as fractions of its height and width: the
/// tiles' counted parts cover the image once, each around its tile's middle (away from the
/// zero padding at its edges).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CountedPart {
    /// First row, as a fraction of the tile's height.
    pub top: f64,
    /// End row (exclusive).
    pub bottom: f64,
    /// First column, as a fraction of the tile's width.
    pub left: f64,
    /// End column (exclusive).
    pub right: f64,
}

impl CountedPart {
    /// The whole tile.
    pub const WHOLE: CountedPart = CountedPart {
        top: 0.0,
        bottom: 1.0,
        left: 0.0,
        right: 1.0,
    };
}

#[derive(Debug)]
struct Session {
    tallies: Vec<Tally>,
    applied: Vec<Statistics>,
    call: usize,
    counted: CountedPart,
    /// Whether GroupNorms add to the tallies (not in the last pass: it only applies).
    collecting: bool,
}

thread_local! {
    static SESSION: RefCell<Option<Session>> = const { RefCell::new(None) };
}

/// An open session on this thread; closed when dropped.
pub struct SharedStatistics {
    _not_send: std::marker::PhantomData<*const ()>,
}

impl SharedStatistics {
    /// Opens a session: GroupNorms on this thread collect (and apply nothing yet).
    pub fn open() -> Self {
        SESSION.with(|session| {
            *session.borrow_mut() = Some(Session {
                tallies: Vec::new(),
                applied: Vec::new(),
                call: 0,
                counted: CountedPart::WHOLE,
                collecting: true,
            })
        });
        Self {
            _not_send: std::marker::PhantomData,
        }
    }

    /// Starts a tile, whose `counted` part adds to the statistics: its GroupNorm calls count
    /// from the first again.
    pub fn start_tile(&self, counted: CountedPart) {
        SESSION.with(|session| {
            if let Some(session) = session.borrow_mut().as_mut() {
                session.call = 0;
                session.counted = counted;
            }
        });
    }

    /// Ends a pass over all tiles: what it collected is applied from now on; the next pass
    /// collects again when `collect` is set (each GroupNorm waits for its sums: the last pass
    /// should not).
    pub fn next_pass(&self, collect: bool) {
        SESSION.with(|session| {
            if let Some(session) = session.borrow_mut().as_mut() {
                session.collecting = collect;
                session.applied = session
                    .tallies
                    .drain(..)
                    .map(|tally| {
                        let count = tally.count.max(1.0);
                        let means: Vec<f64> = tally.sums.iter().map(|s| s / count).collect();
                        let variances = tally
                            .squares
                            .iter()
                            .zip(&means)
                            .map(|(square, mean)| (square / count - mean * mean).max(0.0) as f32)
                            .collect();
                        Statistics {
                            means: means.into_iter().map(|m| m as f32).collect(),
                            variances,
                        }
                    })
                    .collect();
            }
        });
    }
}

impl Drop for SharedStatistics {
    fn drop(&mut self) {
        SESSION.with(|session| *session.borrow_mut() = None);
    }
}

/// What a GroupNorm call normalises with, besides the statistics.
#[derive(Clone, Copy)]
pub(crate) struct NormParts<'a> {
    /// Channel groups.
    pub groups: usize,
    /// Added to the variance.
    pub eps: f64,
    /// Per-channel scale.
    pub weight: &'a Tensor,
    /// Per-channel shift.
    pub bias: &'a Tensor,
    /// Applied after (SiLU in the VAE's resnets).
    pub activation: Option<Activation>,
}

/// Called by every GroupNorm: `None` when no session is open or nothing is applied yet (then
/// it normalises as usual), else `xs` normalised with the shared statistics. Adds `xs`'s sums
/// to the session's tally unless the session only applies.
pub(crate) fn intercept(xs: &Tensor, parts: &NormParts<'_>) -> Result<Option<Tensor>> {
    let groups = parts.groups;
    let Some((counted, collecting)) =
        SESSION.with(|session| session.borrow().as_ref().map(|s| (s.counted, s.collecting)))
    else {
        return Ok(None);
    };
    if !collecting {
        let applied = SESSION.with(|session| {
            let mut session = session.borrow_mut();
            let session = session.as_mut()?;
            let call = session.call;
            session.call += 1;
            session.applied.get(call).cloned()
        });
        return match applied {
            Some(stats) => normalise(xs, parts, stats).map(Some),
            None => Ok(None),
        };
    }
    let dims = xs.dims().to_vec();
    let batch = dims[0];
    let xs32 = xs.to_dtype(DType::F32)?;
    let grouped = xs32.reshape((batch, groups, ()))?;
    let part = match dims.as_slice() {
        &[_, _, height, width] => {
            let span = |from: f64, to: f64, size: usize| {
                let start = ((from * size as f64).round() as usize).min(size.saturating_sub(1));
                let end = ((to * size as f64).round() as usize).clamp(start + 1, size);
                (start, end - start)
            };
            let (top, rows) = span(counted.top, counted.bottom, height);
            let (left, columns) = span(counted.left, counted.right, width);
            xs32.narrow(2, top, rows)?
                .narrow(3, left, columns)?
                .reshape((batch, groups, ()))?
        }
        _ => grouped.clone(),
    };
    let per_group = part.dim(2)? as f64;
    let sums: Vec<f32> = part.sum(D::Minus1)?.flatten_all()?.to_vec1()?;
    let squares: Vec<f32> = part.sqr()?.sum(D::Minus1)?.flatten_all()?.to_vec1()?;
    let applied = SESSION.with(|session| {
        let mut session = session.borrow_mut();
        let session = session.as_mut()?;
        let call = session.call;
        session.call += 1;
        if session.tallies.len() <= call {
            session.tallies.resize(call + 1, Tally::default());
        }
        let tally = &mut session.tallies[call];
        if tally.sums.len() != sums.len() {
            tally.sums = vec![0.0; sums.len()];
            tally.squares = vec![0.0; sums.len()];
        }
        for (total, value) in tally.sums.iter_mut().zip(&sums) {
            *total += *value as f64;
        }
        for (total, value) in tally.squares.iter_mut().zip(&squares) {
            *total += *value as f64;
        }
        tally.count += per_group;
        session
            .applied
            .get(call)
            .filter(|stats| stats.means.len() == sums.len())
            .cloned()
    });
    match applied {
        Some(stats) => normalise(xs, parts, stats).map(Some),
        None => Ok(None),
    }
}

/// `xs` normalised with `stats` (per batch item and group), then the affine weights and
/// `activation`, in `xs`'s precision.
fn normalise(xs: &Tensor, parts: &NormParts<'_>, stats: Statistics) -> Result<Tensor> {
    let NormParts {
        groups,
        eps,
        weight,
        bias,
        activation,
    } = *parts;
    let dims = xs.dims().to_vec();
    let batch = dims[0];
    let channels = dims[1];
    let grouped = xs.to_dtype(DType::F32)?.reshape((batch, groups, ()))?;
    let device = xs.device();
    let means = Tensor::from_vec(stats.means, (batch, groups, 1), device)?;
    let inverse_std: Vec<f32> = stats
        .variances
        .iter()
        .map(|v| 1.0 / (v + eps as f32).sqrt())
        .collect();
    let inverse_std = Tensor::from_vec(inverse_std, (batch, groups, 1), device)?;
    let normalised = grouped
        .broadcast_sub(&means)?
        .broadcast_mul(&inverse_std)?
        .reshape(dims.as_slice())?;
    let mut affine_shape = vec![1usize; dims.len()];
    affine_shape[1] = channels;
    let weight = weight
        .to_dtype(DType::F32)?
        .reshape(affine_shape.as_slice())?;
    let bias = bias
        .to_dtype(DType::F32)?
        .reshape(affine_shape.as_slice())?;
    let out = normalised.broadcast_mul(&weight)?.broadcast_add(&bias)?;
    let out = match activation {
        Some(activation) => activation.apply(&out)?,
        None => out,
    };
    Ok(out.to_dtype(xs.dtype())?)
}
