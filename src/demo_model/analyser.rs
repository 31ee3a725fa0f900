//! Reads back what a picture of Atelier Shapes shows: the background's colour, and the largest
//! shape's colour, kind and position. This is how the validation measures that a prompt steers
//! the picture (`atelier shapes-check`, `tests/headless/demo_model.rs`).
//!
//! The background is the median colour of the picture's border; the shape is the largest
//! connected region that differs from it; its colour is the median of its inside, named by the
//! nearest of the training colours in CIELAB; its kind is the template (drawn with the training
//! script's signed distance fields) that overlaps its outline best; its position is the third of
//! the picture its centroid falls in, across and down.

use std::sync::OnceLock;

use image::RgbImage;

/// The named colours of the training set, as `scripts/shapes_data.py` draws them (sRGB).
pub const COLOURS: [(&str, [u8; 3]); 11] = [
    ("red", [220, 30, 35]),
    ("orange", [245, 135, 20]),
    ("yellow", [245, 220, 35]),
    ("green", [40, 165, 60]),
    ("blue", [35, 75, 215]),
    ("purple", [130, 50, 180]),
    ("pink", [245, 135, 190]),
    ("brown", [115, 70, 35]),
    ("black", [15, 15, 15]),
    ("white", [245, 245, 245]),
    ("gray", [128, 128, 128]),
];

/// The shapes of the training set.
pub const SHAPES: [&str; 5] = ["circle", "square", "triangle", "star", "ring"];

/// A pixel belongs to a shape when its colour is this far from the background's (sRGB, 0-255).
const FOREGROUND_DISTANCE: f64 = 55.0;
/// Regions smaller than this fraction of the picture are noise, not shapes.
const MIN_SHAPE_FRACTION: f64 = 0.004;
/// Side of the canvas that outlines are compared on.
const CANVAS: usize = 32;

/// What the analyser read from a picture.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// The background's colour name.
    pub background: &'static str,
    /// The largest shape, if the picture has one.
    pub shape: Option<ShapeReading>,
}

/// The largest shape of a picture.
#[derive(Debug, Clone, PartialEq)]
pub struct ShapeReading {
    /// Its colour name.
    pub colour: &'static str,
    /// circle, square, triangle, star or ring.
    pub kind: &'static str,
    /// center, left, right, top, bottom, top left, top right, bottom left or bottom right.
    pub position: &'static str,
    /// How much of the picture it covers (0-1).
    pub area_fraction: f64,
    /// How well the best template overlaps its outline (intersection over union, 0-1).
    pub template_overlap: f64,
}

/// Reads a picture.
pub fn analyse(picture: &RgbImage) -> Reading {
    let (width, height) = (picture.width() as usize, picture.height() as usize);
    let background_rgb = border_median(picture);
    let background = nearest_colour(background_rgb);
    if width == 0 || height == 0 {
        return Reading {
            background,
            shape: None,
        };
    }
    let foreground: Vec<bool> = picture
        .pixels()
        .map(|p| rgb_distance(p.0, background_rgb) > FOREGROUND_DISTANCE)
        .collect();
    let shape = largest_region(&foreground, width, height)
        .filter(|region| region.len() as f64 >= MIN_SHAPE_FRACTION * (width * height) as f64)
        .map(|region| read_shape(picture, &foreground, &region, width, height));
    Reading { background, shape }
}

fn read_shape(
    picture: &RgbImage,
    foreground: &[bool],
    region: &[usize],
    width: usize,
    height: usize,
) -> ShapeReading {
    let mut in_region = vec![false; width * height];
    for &index in region {
        in_region[index] = true;
    }
    // The colour of the inside (pixels whose four neighbours are in the region too), so that
    // antialiased edges, which mix in the background, do not count.
    let inside: Vec<[u8; 3]> = region
        .iter()
        .filter(|&&index| {
            let (x, y) = (index % width, index / width);
            x > 0
                && y > 0
                && x + 1 < width
                && y + 1 < height
                && in_region[index - 1]
                && in_region[index + 1]
                && in_region[index - width]
                && in_region[index + width]
        })
        .map(|&index| {
            picture.as_raw()[index * 3..index * 3 + 3]
                .try_into()
                .unwrap_or([0; 3])
        })
        .collect();
    let colour_pixels: Vec<[u8; 3]> = if inside.is_empty() {
        region
            .iter()
            .map(|&index| {
                picture.as_raw()[index * 3..index * 3 + 3]
                    .try_into()
                    .unwrap_or([0; 3])
            })
            .collect()
    } else {
        inside
    };
    let colour = nearest_colour(median_rgb(&colour_pixels));

    let (mut sum_x, mut sum_y) = (0.0, 0.0);
    let (mut min_x, mut min_y, mut max_x, mut max_y) = (usize::MAX, usize::MAX, 0, 0);
    for &index in region {
        let (x, y) = (index % width, index / width);
        sum_x += x as f64 + 0.5;
        sum_y += y as f64 + 0.5;
        min_x = min_x.min(x);
        max_x = max_x.max(x);
        min_y = min_y.min(y);
        max_y = max_y.max(y);
    }
    let count = region.len() as f64;
    let position = position_name(sum_x / count / width as f64, sum_y / count / height as f64);

    // The region's outline on the comparison canvas (holes of a ring stay holes: the region is
    // one connected set of foreground pixels, and `foreground` is false inside the hole).
    let bounds = Bounds {
        min_x: min_x as f64,
        min_y: min_y as f64,
        max_x: (max_x + 1) as f64,
        max_y: (max_y + 1) as f64,
    };
    let outline = canvas_of(&bounds, |x, y| {
        let (px, py) = (x.floor(), y.floor());
        if px < 0.0 || py < 0.0 || px >= width as f64 || py >= height as f64 {
            return false;
        }
        let index = py as usize * width + px as usize;
        in_region[index] && foreground[index]
    });
    let (kind, template_overlap) = templates()
        .iter()
        .map(|(kind, template)| (*kind, overlap(&outline, template)))
        .fold(("circle", f64::MIN), |best, candidate| {
            if candidate.1 > best.1 {
                candidate
            } else {
                best
            }
        });
    ShapeReading {
        colour,
        kind,
        position,
        area_fraction: count / (width * height) as f64,
        template_overlap,
    }
}

/// The position name of a centroid given as fractions of the picture (x right, y down).
pub fn position_name(x: f64, y: f64) -> &'static str {
    let column = if x < 0.375 {
        0
    } else if x > 0.625 {
        2
    } else {
        1
    };
    let row = if y < 0.375 {
        0
    } else if y > 0.625 {
        2
    } else {
        1
    };
    [
        ["top left", "top", "top right"],
        ["left", "center", "right"],
        ["bottom left", "bottom", "bottom right"],
    ][row][column]
}

struct Bounds {
    min_x: f64,
    min_y: f64,
    max_x: f64,
    max_y: f64,
}

/// Samples `inside(x, y)` on a CANVAS x CANVAS grid that holds `bounds` centred, aspect kept,
/// with one cell of margin.
fn canvas_of(bounds: &Bounds, inside: impl Fn(f64, f64) -> bool) -> Vec<bool> {
    let side = (bounds.max_x - bounds.min_x).max(bounds.max_y - bounds.min_y);
    let cell = side / (CANVAS - 2) as f64;
    let centre_x = (bounds.min_x + bounds.max_x) / 2.0;
    let centre_y = (bounds.min_y + bounds.max_y) / 2.0;
    let half = CANVAS as f64 / 2.0;
    (0..CANVAS * CANVAS)
        .map(|i| {
            let (column, row) = ((i % CANVAS) as f64, (i / CANVAS) as f64);
            inside(
                centre_x + (column + 0.5 - half) * cell,
                centre_y + (row + 0.5 - half) * cell,
            )
        })
        .collect()
}

fn overlap(a: &[bool], b: &[bool]) -> f64 {
    let both = a.iter().zip(b).filter(|(x, y)| **x && **y).count();
    let either = a.iter().zip(b).filter(|(x, y)| **x || **y).count();
    if either == 0 {
        0.0
    } else {
        both as f64 / either as f64
    }
}

/// Each shape's outline on the canvas, upright and turned a little either way (the training
/// pictures turn shapes by up to 0.18 radians).
fn templates() -> &'static [(&'static str, Vec<bool>)] {
    static TEMPLATES: OnceLock<Vec<(&'static str, Vec<bool>)>> = OnceLock::new();
    TEMPLATES.get_or_init(|| {
        let mut templates = Vec::new();
        for (index, kind) in SHAPES.iter().enumerate() {
            for rotation in [-0.15_f64, 0.0, 0.15] {
                let (sin, cos) = rotation.sin_cos();
                // Picture coordinates (y down) around the centre, in radii.
                let inside = |x: f64, y: f64| {
                    let (dx, dy) = (x, -y);
                    let (rx, ry) = (cos * dx - sin * dy, sin * dx + cos * dy);
                    shape_distance(index, rx, ry) < 0.0
                };
                let samples = 256;
                let extent = 1.4;
                let step = 2.0 * extent / samples as f64;
                let mut bounds = Bounds {
                    min_x: f64::MAX,
                    min_y: f64::MAX,
                    max_x: f64::MIN,
                    max_y: f64::MIN,
                };
                for row in 0..samples {
                    for column in 0..samples {
                        let x = -extent + (column as f64 + 0.5) * step;
                        let y = -extent + (row as f64 + 0.5) * step;
                        if inside(x, y) {
                            bounds.min_x = bounds.min_x.min(x - step / 2.0);
                            bounds.max_x = bounds.max_x.max(x + step / 2.0);
                            bounds.min_y = bounds.min_y.min(y - step / 2.0);
                            bounds.max_y = bounds.max_y.max(y + step / 2.0);
                        }
                    }
                }
                templates.push((*kind, canvas_of(&bounds, inside)));
            }
        }
        templates
    })
}

/// Signed distance (in radii, y up) to shape `index` of [`SHAPES`], as the training script
/// draws it (`sdf` in scripts/shapes_data.py).
pub fn shape_distance(index: usize, px: f64, py: f64) -> f64 {
    let radius = (px * px + py * py).sqrt();
    match index {
        0 => radius - 1.0,
        1 => px.abs().max(py.abs()) - 0.84,
        2 => {
            let k = 3f64.sqrt();
            let side = 1.05;
            let mut x = px.abs() - side;
            let mut y = py + 0.28 + side / k;
            if x + k * y > 0.0 {
                (x, y) = ((x - k * y) / 2.0, (-k * x - y) / 2.0);
            }
            x -= x.clamp(-2.0 * side, 0.0);
            -(x * x + y * y).sqrt() * y.signum()
        }
        3 => {
            let (k1x, k1y) = (0.809_016_994_375, -0.587_785_252_292);
            let mut x = px.abs();
            let mut y = py;
            let dot1 = (k1x * x + k1y * y).max(0.0);
            x -= 2.0 * dot1 * k1x;
            y -= 2.0 * dot1 * k1y;
            let dot2 = (-k1x * x + k1y * y).max(0.0);
            x += 2.0 * dot2 * k1x;
            y -= 2.0 * dot2 * k1y;
            x = x.abs();
            let outer = 1.08;
            y -= outer;
            let (bax, bay) = (0.45 * -k1y, 0.45 * k1x - 1.0);
            let h = ((x * bax + y * bay) / (bax * bax + bay * bay)).clamp(0.0, outer);
            let (dx, dy) = (x - bax * h, y - bay * h);
            (dx * dx + dy * dy).sqrt() * (y * bax - x * bay).signum()
        }
        _ => (radius - 0.72).abs() - 0.28,
    }
}

/// The largest 4-connected region of `mask`, as pixel indices.
fn largest_region(mask: &[bool], width: usize, height: usize) -> Option<Vec<usize>> {
    let mut seen = vec![false; mask.len()];
    let mut best: Option<Vec<usize>> = None;
    let mut stack = Vec::new();
    for start in 0..mask.len() {
        if !mask[start] || seen[start] {
            continue;
        }
        let mut region = Vec::new();
        seen[start] = true;
        stack.push(start);
        while let Some(index) = stack.pop() {
            region.push(index);
            let (x, y) = (index % width, index / width);
            let mut visit = |next: usize| {
                if mask[next] && !seen[next] {
                    seen[next] = true;
                    stack.push(next);
                }
            };
            if x > 0 {
                visit(index - 1);
            }
            if x + 1 < width {
                visit(index + 1);
            }
            if y > 0 {
                visit(index - width);
            }
            if y + 1 < height {
                visit(index + width);
            }
        }
        if best.as_ref().is_none_or(|b| region.len() > b.len()) {
            best = Some(region);
        }
    }
    best
}

/// The per-channel median of the picture's border (a band of 1/32 of its side, at least 2).
fn border_median(picture: &RgbImage) -> [u8; 3] {
    let (width, height) = (picture.width(), picture.height());
    let band = (width.min(height) / 32).max(2);
    let pixels: Vec<[u8; 3]> = picture
        .enumerate_pixels()
        .filter(|(x, y, _)| *x < band || *y < band || *x + band >= width || *y + band >= height)
        .map(|(_, _, p)| p.0)
        .collect();
    median_rgb(&pixels)
}

fn median_rgb(pixels: &[[u8; 3]]) -> [u8; 3] {
    let mut median = [0u8; 3];
    for (channel, value) in median.iter_mut().enumerate() {
        let mut values: Vec<u8> = pixels.iter().map(|p| p[channel]).collect();
        values.sort_unstable();
        *value = values.get(values.len() / 2).copied().unwrap_or(0);
    }
    median
}

fn rgb_distance(a: [u8; 3], b: [u8; 3]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - y as f64).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// The training colour nearest to `rgb` in CIELAB.
pub fn nearest_colour(rgb: [u8; 3]) -> &'static str {
    let lab = to_lab(rgb);
    COLOURS
        .iter()
        .map(|(name, colour)| {
            let other = to_lab(*colour);
            let distance: f64 = lab.iter().zip(other).map(|(a, b)| (a - b).powi(2)).sum();
            (*name, distance)
        })
        .fold(("black", f64::MAX), |best, candidate| {
            if candidate.1 < best.1 {
                candidate
            } else {
                best
            }
        })
        .0
}

/// sRGB (D65) to CIELAB.
fn to_lab(rgb: [u8; 3]) -> [f64; 3] {
    let linear = rgb.map(|c| {
        let c = c as f64 / 255.0;
        if c <= 0.04045 {
            c / 12.92
        } else {
            ((c + 0.055) / 1.055).powf(2.4)
        }
    });
    let [r, g, b] = linear;
    let x = (0.4124 * r + 0.3576 * g + 0.1805 * b) / 0.95047;
    let y = 0.2126 * r + 0.7152 * g + 0.0722 * b;
    let z = (0.0193 * r + 0.1192 * g + 0.9505 * b) / 1.08883;
    let f = |t: f64| {
        if t > 216.0 / 24389.0 {
            t.cbrt()
        } else {
            (24389.0 / 27.0 * t + 16.0) / 116.0
        }
    };
    let (fx, fy, fz) = (f(x), f(y), f(z));
    [116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Draws one shape the way the training script does (no jitter, no antialiasing).
    fn drawn(
        kind: usize,
        colour: [u8; 3],
        background: [u8; 3],
        centre: (f64, f64),
        radius: f64,
    ) -> RgbImage {
        let size = 128;
        RgbImage::from_fn(size, size, |x, y| {
            let px = ((x as f64 + 0.5) / size as f64 - centre.0) / radius;
            let py = -((y as f64 + 0.5) / size as f64 - centre.1) / radius;
            image::Rgb(if shape_distance(kind, px, py) < 0.0 {
                colour
            } else {
                background
            })
        })
    }

    #[test]
    fn drawn_shapes_are_read_back() {
        let positions = [
            ((0.5, 0.5), "center"),
            ((0.25, 0.5), "left"),
            ((0.75, 0.25), "top right"),
            ((0.5, 0.75), "bottom"),
            ((0.25, 0.75), "bottom left"),
        ];
        for (kind, name) in SHAPES.iter().enumerate() {
            for (index, (centre, position)) in positions.iter().enumerate() {
                let (colour_name, colour) = COLOURS[(kind + index) % COLOURS.len()];
                let (background_name, background) = COLOURS[(kind + index + 3) % COLOURS.len()];
                let radius = if index % 2 == 0 { 0.19 } else { 0.1 };
                let reading = analyse(&drawn(kind, colour, background, *centre, radius));
                let shape = reading.shape.expect("a shape");
                assert_eq!(reading.background, background_name);
                assert_eq!(shape.colour, colour_name, "{name} at {position}");
                assert_eq!(shape.kind, *name, "{name} at {position}: {shape:?}");
                assert_eq!(shape.position, *position);
            }
        }
    }

    #[test]
    fn a_plain_picture_has_no_shape() {
        let picture = RgbImage::from_pixel(64, 64, image::Rgb([35, 75, 215]));
        let reading = analyse(&picture);
        assert_eq!(reading.background, "blue");
        assert!(reading.shape.is_none());
    }

    #[test]
    fn colours_are_named_by_the_nearest_training_colour() {
        for (name, colour) in COLOURS {
            assert_eq!(nearest_colour(colour), name);
        }
        assert_eq!(nearest_colour([200, 40, 40]), "red");
        assert_eq!(nearest_colour([100, 100, 110]), "gray");
    }
}
