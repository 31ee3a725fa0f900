//! Log-log line plots drawn into a PNG (the sampler quality maps of `atelier schedulers`).

use ab_glyph::{FontRef, PxScale};
use image::{Rgb, RgbImage};
use imageproc::drawing::{draw_filled_circle_mut, draw_line_segment_mut, draw_text_mut, text_size};

/// Sixteen distinguishable colours (Tableau 20, dark and light pairs).
const PALETTE: [[u8; 3]; 16] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
    [174, 199, 232],
    [255, 187, 120],
    [152, 223, 138],
    [255, 152, 150],
    [197, 176, 213],
    [0, 0, 0],
];

/// One line of a plot.
pub struct Series {
    /// Its name in the legend.
    pub label: String,
    /// (x, y) points, both positive.
    pub points: Vec<(f64, f64)>,
}

/// What a log-log plot shows.
pub struct LogLogPlot {
    /// Above the plot.
    pub title: String,
    /// Under the x axis.
    pub x_label: String,
    /// x values with a grid line and a label.
    pub x_ticks: Vec<f64>,
    /// The x axis' range.
    pub x_range: (f64, f64),
    /// The lines, one colour each.
    pub series: Vec<Series>,
    /// A dashed horizontal line at this y, with its label.
    pub reference: Option<(f64, String)>,
}

/// Draws `plot`: y on a log scale by decades, x on a log scale, a legend on the right.
pub fn log_log_plot(plot: &LogLogPlot) -> RgbImage {
    let (width, height) = (1200u32, 760u32);
    let (left, right, top, bottom) = (90.0f32, 900.0f32, 50.0f32, 690.0f32);
    let mut image = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    let font = FontRef::try_from_slice(epaint_default_fonts::UBUNTU_LIGHT);
    let Ok(font) = font else {
        return image;
    };
    let black = Rgb([30, 30, 30]);
    let grey = Rgb([215, 215, 215]);
    let scale = PxScale::from(17.0);
    let values: Vec<f64> = plot
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .chain(plot.reference.as_ref().map(|r| r.0))
        .filter(|v| *v > 0.0)
        .collect();
    let low = values
        .iter()
        .fold(f64::INFINITY, |m, &e| m.min(e))
        .log10()
        .floor()
        .max(-6.0);
    let high = values
        .iter()
        .fold(f64::NEG_INFINITY, |m, &e| m.max(e))
        .log10()
        .ceil()
        .max(low + 1.0);
    let (x_low, x_high) = (plot.x_range.0.log10(), plot.x_range.1.log10());
    let to_x = |x: f64| left + ((x.log10() - x_low) / (x_high - x_low)) as f32 * (right - left);
    let to_y =
        |y: f64| bottom - ((y.max(1e-12).log10() - low) / (high - low)) as f32 * (bottom - top);
    // Grid and labels.
    let mut decade = low;
    while decade <= high {
        let y = to_y(10f64.powf(decade));
        draw_line_segment_mut(&mut image, (left, y), (right, y), grey);
        let label = format!("1e{decade}");
        let (w, h) = text_size(scale, &font, &label);
        draw_text_mut(
            &mut image,
            black,
            (left as i32) - w as i32 - 8,
            y as i32 - h as i32 / 2,
            scale,
            &font,
            &label,
        );
        decade += 1.0;
    }
    for &tick in &plot.x_ticks {
        let x = to_x(tick);
        draw_line_segment_mut(&mut image, (x, top), (x, bottom), grey);
        let label = tick.to_string();
        let (w, _) = text_size(scale, &font, &label);
        draw_text_mut(
            &mut image,
            black,
            x as i32 - w as i32 / 2,
            bottom as i32 + 8,
            scale,
            &font,
            &label,
        );
    }
    if let Some((value, label)) = &plot.reference {
        let y = to_y(*value);
        let mut x = left;
        while x < right {
            draw_line_segment_mut(&mut image, (x, y), ((x + 8.0).min(right), y), black);
            x += 16.0;
        }
        draw_text_mut(
            &mut image,
            black,
            left as i32 + 6,
            y as i32 + 4,
            scale,
            &font,
            label,
        );
    }
    draw_line_segment_mut(&mut image, (left, bottom), (right, bottom), black);
    draw_line_segment_mut(&mut image, (left, top), (left, bottom), black);
    draw_text_mut(
        &mut image,
        black,
        left as i32,
        14,
        PxScale::from(21.0),
        &font,
        &plot.title,
    );
    draw_text_mut(
        &mut image,
        black,
        (left + right) as i32 / 2 - 70,
        bottom as i32 + 34,
        scale,
        &font,
        &plot.x_label,
    );
    // One line per series; colour tells them apart.
    let mut legend_y = top as i32;
    for (i, series) in plot.series.iter().enumerate() {
        let colour = Rgb(PALETTE[i % PALETTE.len()]);
        let radius = 4;
        let points: Vec<(f32, f32)> = series
            .points
            .iter()
            .map(|&(x, y)| (to_x(x), to_y(y)))
            .collect();
        for pair in points.windows(2) {
            draw_line_segment_mut(&mut image, pair[0], pair[1], colour);
            draw_line_segment_mut(
                &mut image,
                (pair[0].0, pair[0].1 + 1.0),
                (pair[1].0, pair[1].1 + 1.0),
                colour,
            );
        }
        for &(x, y) in &points {
            draw_filled_circle_mut(&mut image, (x as i32, y as i32), radius, colour);
        }
        draw_filled_circle_mut(
            &mut image,
            (right as i32 + 30, legend_y + 9),
            radius,
            colour,
        );
        draw_text_mut(
            &mut image,
            black,
            right as i32 + 44,
            legend_y,
            scale,
            &font,
            &series.label,
        );
        legend_y += 26;
    }
    image
}
