//! The mask painter: the picture to inpaint with the mask over it in red. A brush paints where
//! to repaint, an eraser takes it back; invert, clear and undo; the mouse wheel zooms around the
//! pointer and a right or middle drag pans. The mask keeps the picture's own resolution.

use egui::{Color32, Pos2, Rect, Sense, TextureHandle, TextureOptions, Ui, Vec2};
use image::{GrayImage, Luma};

use super::InitImageView;

/// Undo steps kept.
pub const UNDO_STEPS: usize = 32;
/// The largest brush radius, in picture pixels.
pub const MAX_BRUSH_RADIUS_PX: f32 = 256.0;

/// A mask at the picture's size (255: repaint), with its undo history.
pub struct MaskLayer {
    mask: GrayImage,
    undo: Vec<GrayImage>,
    /// Where it came from ("painted", or a file name).
    pub source: String,
    overlay: Option<TextureHandle>,
    overlay_stale: bool,
    /// The region a stroke changed since the overlay was last updated `(x0, y0, x1, y1)`,
    /// exclusive ends: only it is sent to the GPU again.
    dirty: Option<(u32, u32, u32, u32)>,
}

impl MaskLayer {
    /// An empty mask for a picture of `width` x `height`.
    pub fn blank(width: u32, height: u32) -> Self {
        Self::from_mask(GrayImage::new(width, height), "painted".into())
    }

    /// A mask read from somewhere (already at the picture's size).
    pub fn from_mask(mask: GrayImage, source: String) -> Self {
        Self {
            mask,
            undo: Vec::new(),
            source,
            overlay: None,
            overlay_stale: true,
            dirty: None,
        }
    }

    /// The pixels.
    pub fn mask(&self) -> &GrayImage {
        &self.mask
    }

    /// Whether nothing is marked to repaint.
    pub fn is_empty(&self) -> bool {
        !self.mask.pixels().any(|p| p[0] >= 128)
    }

    /// The share of the picture marked to repaint, 0 to 1.
    pub fn coverage(&self) -> f64 {
        let marked = self.mask.pixels().filter(|p| p[0] >= 128).count();
        marked as f64 / (self.mask.width() as f64 * self.mask.height() as f64).max(1.0)
    }

    /// Remembers the mask as it is, for [`MaskLayer::undo`] (call once per stroke or action).
    pub fn checkpoint(&mut self) {
        if self.undo.len() == UNDO_STEPS {
            self.undo.remove(0);
        }
        self.undo.push(self.mask.clone());
    }

    /// Steps that can be undone.
    pub fn undo_steps(&self) -> usize {
        self.undo.len()
    }

    /// Goes back one step; false when there is nothing to undo.
    pub fn undo(&mut self) -> bool {
        match self.undo.pop() {
            Some(previous) => {
                self.mask = previous;
                self.overlay_stale = true;
                true
            }
            None => false,
        }
    }

    /// Paints (or with `erase`, clears) a round brush of `radius` picture pixels along the
    /// segment `from`-`to` (picture coordinates; a dab when they are equal).
    pub fn paint(&mut self, from: Pos2, to: Pos2, radius: f32, erase: bool) {
        let radius = radius.max(0.5);
        let value = if erase { 0 } else { 255 };
        let (width, height) = self.mask.dimensions();
        let min_x = (from.x.min(to.x) - radius).floor().max(0.0) as u32;
        let min_y = (from.y.min(to.y) - radius).floor().max(0.0) as u32;
        let max_x = ((from.x.max(to.x) + radius).ceil().max(0.0) as u32).min(width);
        let max_y = ((from.y.max(to.y) + radius).ceil().max(0.0) as u32).min(height);
        if min_x >= max_x || min_y >= max_y {
            return;
        }
        self.dirty = Some(match self.dirty {
            Some((x0, y0, x1, y1)) => (x0.min(min_x), y0.min(min_y), x1.max(max_x), y1.max(max_y)),
            None => (min_x, min_y, max_x, max_y),
        });
        let segment = to - from;
        let length_sq = segment.length_sq();
        for y in min_y..max_y {
            for x in min_x..max_x {
                // The pixel's centre, and its distance to the segment.
                let p = Pos2::new(x as f32 + 0.5, y as f32 + 0.5);
                let t = if length_sq > 0.0 {
                    ((p - from).dot(segment) / length_sq).clamp(0.0, 1.0)
                } else {
                    0.0
                };
                if (from + segment * t).distance(p) <= radius {
                    self.mask.put_pixel(x, y, Luma([value]));
                }
            }
        }
    }

    /// Swaps what is repainted and what is kept.
    pub fn invert(&mut self) {
        self.checkpoint();
        for p in self.mask.pixels_mut() {
            p[0] = 255 - p[0];
        }
        self.overlay_stale = true;
    }

    /// Marks nothing.
    pub fn clear(&mut self) {
        self.checkpoint();
        for p in self.mask.pixels_mut() {
            p[0] = 0;
        }
        self.overlay_stale = true;
    }

    /// The overlay's size for a GPU whose textures are at most `max_side` pixels a side: the
    /// mask's own, or scaled down to fit (the mask itself keeps the picture's resolution).
    fn overlay_size(&self, max_side: usize) -> (u32, u32) {
        display_size(self.mask.dimensions(), max_side)
    }

    /// The overlay's pixels in `(x0, y0)..(x1, y1)` (overlay coordinates, `size` the overlay's
    /// size) as a translucent red layer, each from the mask pixel under it.
    fn overlay_pixels(
        &self,
        (x0, y0, x1, y1): (u32, u32, u32, u32),
        size: (u32, u32),
    ) -> egui::ColorImage {
        let (width, height) = self.mask.dimensions();
        let (sx, sy) = (width as f64 / size.0 as f64, height as f64 / size.1 as f64);
        let mut pixels = Vec::with_capacity(((x1 - x0) * (y1 - y0)) as usize);
        for y in y0..y1 {
            let my = (((y as f64 + 0.5) * sy) as u32).min(height - 1);
            for x in x0..x1 {
                let mx = (((x as f64 + 0.5) * sx) as u32).min(width - 1);
                let alpha = (self.mask.get_pixel(mx, my)[0] as u32 * 150 / 255) as u8;
                pixels.push(Color32::from_rgba_unmultiplied(230, 40, 40, alpha));
            }
        }
        egui::ColorImage::new([(x1 - x0) as usize, (y1 - y0) as usize], pixels)
    }

    /// The mask as a translucent red layer on the GPU: made whole after undo, invert or clear,
    /// and only the region a stroke touched after painting (a large picture stays smooth).
    fn overlay(&mut self, ctx: &egui::Context) -> egui::TextureId {
        let size = self.overlay_size(ctx.input(|input| input.max_texture_side));
        let whole = self.overlay_stale
            || self
                .overlay
                .as_ref()
                .is_none_or(|t| t.size() != [size.0 as usize, size.1 as usize]);
        let (width, height) = self.mask.dimensions();
        let region = if whole {
            Some((0, 0, size.0, size.1))
        } else {
            // The stroke's region in overlay pixels, grown to whole pixels.
            self.dirty.map(|(x0, y0, x1, y1)| {
                let (fx, fy) = (size.0 as f64 / width as f64, size.1 as f64 / height as f64);
                (
                    (x0 as f64 * fx).floor() as u32,
                    (y0 as f64 * fy).floor() as u32,
                    ((x1 as f64 * fx).ceil() as u32).min(size.0),
                    ((y1 as f64 * fy).ceil() as u32).min(size.1),
                )
            })
        };
        if let Some(region) = region.filter(|(x0, y0, x1, y1)| x0 < x1 && y0 < y1) {
            let image = self.overlay_pixels(region, size);
            match &mut self.overlay {
                Some(texture) if !whole => texture.set_partial(
                    [region.0 as usize, region.1 as usize],
                    image,
                    TextureOptions::NEAREST,
                ),
                Some(texture) => texture.set(image, TextureOptions::NEAREST),
                None => {
                    self.overlay =
                        Some(ctx.load_texture("mask-overlay", image, TextureOptions::NEAREST))
                }
            }
        }
        self.overlay_stale = false;
        self.dirty = None;
        self.overlay
            .as_ref()
            .map_or(egui::TextureId::default(), TextureHandle::id)
    }
}

/// `(width, height)` scaled down, keeping its aspect ratio, so that neither side exceeds
/// `max_side` (a GPU's largest texture); unchanged when it fits.
pub fn display_size((width, height): (u32, u32), max_side: usize) -> (u32, u32) {
    let max_side = max_side.max(1) as f64;
    let longest = width.max(height) as f64;
    if longest <= max_side {
        return (width, height);
    }
    let scale = max_side / longest;
    (
        ((width as f64 * scale).floor() as u32).max(1),
        ((height as f64 * scale).floor() as u32).max(1),
    )
}

/// The painter's tools and view.
#[derive(Debug, Clone)]
pub struct MaskEditorView {
    /// Whether the painter replaces the image in the centre.
    pub open: bool,
    /// The brush radius in picture pixels.
    pub brush_radius_px: f32,
    /// Erasing instead of painting.
    pub erasing: bool,
    /// Screen points per picture pixel (`None`: fit the picture to the space).
    pub zoom: Option<f32>,
    /// How far the picture is moved from the centre, in screen points.
    pub pan: Vec2,
    /// The previous pointer position of the stroke being painted, in picture coordinates.
    stroke_from: Option<Pos2>,
}

impl Default for MaskEditorView {
    fn default() -> Self {
        Self {
            open: false,
            brush_radius_px: 24.0,
            erasing: false,
            zoom: None,
            pan: Vec2::ZERO,
            stroke_from: None,
        }
    }
}

/// Where the picture sits on screen: its rectangle for a picture of `size` pixels drawn in
/// `space` with `view`'s zoom and pan.
fn picture_rect(space: Rect, size: Vec2, view: &MaskEditorView) -> Rect {
    let fit = (space.width() / size.x).min(space.height() / size.y);
    let zoom = view.zoom.unwrap_or(fit);
    Rect::from_center_size(space.center() + view.pan, size * zoom)
}

/// Draws the painter's toolbar and canvas over `init`'s picture and edits its mask. Returns
/// true when the artist pressed Done.
pub fn mask_editor_ui(ui: &mut Ui, init: &mut InitImageView, view: &mut MaskEditorView) -> bool {
    let (width, height) = init.image.dimensions();
    let mask = init
        .mask
        .get_or_insert_with(|| MaskLayer::blank(width, height));
    let mut done = false;
    // Shortcuts: Ctrl+Z undo, X brush/eraser, [ and ] brush size.
    let (undo, swap, smaller, larger) = ui.input_mut(|input| {
        (
            input.consume_key(egui::Modifiers::COMMAND, egui::Key::Z),
            input.consume_key(egui::Modifiers::NONE, egui::Key::X),
            input.consume_key(egui::Modifiers::NONE, egui::Key::OpenBracket),
            input.consume_key(egui::Modifiers::NONE, egui::Key::CloseBracket),
        )
    });
    if undo {
        mask.undo();
    }
    if swap {
        view.erasing = !view.erasing;
    }
    if smaller {
        view.brush_radius_px = (view.brush_radius_px / 1.25).max(1.0);
    }
    if larger {
        view.brush_radius_px = (view.brush_radius_px * 1.25).min(MAX_BRUSH_RADIUS_PX);
    }
    ui.horizontal_wrapped(|ui| {
        ui.selectable_value(&mut view.erasing, false, "Brush")
            .on_hover_text("Paint where to repaint (X swaps)");
        ui.selectable_value(&mut view.erasing, true, "Eraser")
            .on_hover_text("Take it back (X swaps)");
        let label = ui.label("Brush size");
        ui.add(
            egui::Slider::new(&mut view.brush_radius_px, 1.0..=MAX_BRUSH_RADIUS_PX)
                .logarithmic(true)
                .suffix(" px"),
        )
        .on_hover_text("Radius in picture pixels ([ and ] change it)")
        .labelled_by(label.id);
        ui.separator();
        if ui
            .add_enabled(mask.undo_steps() > 0, egui::Button::new("Undo"))
            .on_hover_text("Ctrl+Z")
            .clicked()
        {
            mask.undo();
        }
        if ui
            .button("Invert")
            .on_hover_text("Repaint everything but the mask")
            .clicked()
        {
            mask.invert();
        }
        if ui.button("Clear mask").clicked() {
            mask.clear();
        }
        ui.separator();
        if ui.button("-").on_hover_text("Zoom out (wheel)").clicked() {
            view.zoom = Some(view.zoom.unwrap_or(1.0) / 1.25);
        }
        if ui.button("+").on_hover_text("Zoom in (wheel)").clicked() {
            view.zoom = Some(view.zoom.unwrap_or(1.0) * 1.25);
        }
        if ui.button("1:1").clicked() {
            view.zoom = Some(1.0);
        }
        if ui.button("Fit").clicked() {
            view.zoom = None;
            view.pan = Vec2::ZERO;
        }
        ui.separator();
        ui.weak(format!("{:.0}% masked", mask.coverage() * 100.0));
        if ui
            .button("Done")
            .on_hover_text("Back to the image")
            .clicked()
        {
            done = true;
        }
    });
    let (space, response) = ui.allocate_exact_size(ui.available_size(), Sense::click_and_drag());
    response.widget_info(|| egui::WidgetInfo::labeled(egui::Role::Canvas, true, "Mask canvas"));
    let picture_size = Vec2::new(width as f32, height as f32);
    // Zoom around the pointer with the wheel (or a pinch).
    if let Some(pointer) = response.hover_pos() {
        let (scroll, pinch) = ui.input(|input| (input.smooth_scroll_delta.y, input.zoom_delta()));
        let factor = pinch * (scroll / 200.0).exp();
        if (factor - 1.0).abs() > 1e-4 {
            let before = picture_rect(space, picture_size, view);
            let zoom = before.width() / picture_size.x;
            let new_zoom = (zoom * factor).clamp(0.02, 64.0);
            // Keep the picture point under the pointer where it is.
            let anchor = (pointer - before.min) / zoom;
            let new_min = pointer - anchor * new_zoom;
            let new_center = new_min + picture_size * new_zoom / 2.0;
            view.zoom = Some(new_zoom);
            view.pan = new_center - space.center();
        }
    }
    if response.dragged_by(egui::PointerButton::Secondary)
        || response.dragged_by(egui::PointerButton::Middle)
    {
        view.pan += response.drag_delta();
    }
    let rect = picture_rect(space, picture_size, view);
    let to_picture = |screen: Pos2| -> Pos2 {
        let zoom = rect.width() / picture_size.x;
        ((screen - rect.min) / zoom).to_pos2()
    };
    let zoom = rect.width() / picture_size.x;
    let primary_down = ui.input(|input| input.pointer.primary_down());
    match response.interact_pointer_pos() {
        Some(pointer)
            if primary_down && (response.dragged() || response.is_pointer_button_down_on()) =>
        {
            let here = to_picture(pointer);
            let from = match view.stroke_from {
                Some(from) => from,
                None => {
                    mask.checkpoint();
                    here
                }
            };
            mask.paint(from, here, view.brush_radius_px, view.erasing);
            view.stroke_from = Some(here);
        }
        _ => view.stroke_from = None,
    }
    let painter = ui.painter_at(space);
    painter.rect_filled(space, 0.0, ui.visuals().extreme_bg_color);
    let uv = Rect::from_min_max(Pos2::ZERO, Pos2::new(1.0, 1.0));
    painter.image(init.texture.id(), rect, uv, Color32::WHITE);
    let overlay = mask.overlay(ui.ctx());
    painter.image(overlay, rect, uv, Color32::WHITE);
    if let Some(pointer) = response.hover_pos() {
        let color = if view.erasing {
            Color32::LIGHT_BLUE
        } else {
            Color32::from_rgb(255, 90, 90)
        };
        painter.circle_stroke(
            pointer,
            view.brush_radius_px * zoom,
            egui::Stroke::new(1.5, color),
        );
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stroke_paints_a_capsule_and_the_eraser_takes_it_back() {
        let mut layer = MaskLayer::blank(100, 50);
        assert!(layer.is_empty());
        layer.checkpoint();
        layer.paint(Pos2::new(10.0, 25.0), Pos2::new(90.0, 25.0), 5.0, false);
        assert_eq!(layer.mask().get_pixel(50, 25)[0], 255);
        assert_eq!(layer.mask().get_pixel(50, 29)[0], 255);
        assert_eq!(layer.mask().get_pixel(50, 31)[0], 0);
        // Round ends: beyond the segment's end by less than the radius only.
        assert_eq!(layer.mask().get_pixel(93, 25)[0], 255);
        assert_eq!(layer.mask().get_pixel(96, 25)[0], 0);
        layer.checkpoint();
        layer.paint(Pos2::new(50.0, 25.0), Pos2::new(50.0, 25.0), 3.0, true);
        assert_eq!(layer.mask().get_pixel(50, 25)[0], 0);
        assert_eq!(layer.mask().get_pixel(45, 25)[0], 255);
        assert!(layer.undo());
        assert_eq!(layer.mask().get_pixel(50, 25)[0], 255);
        assert!(layer.undo());
        assert!(layer.is_empty());
        assert!(!layer.undo());
    }

    #[test]
    fn strokes_off_the_picture_are_clipped() {
        let mut layer = MaskLayer::blank(20, 20);
        layer.paint(Pos2::new(-50.0, -50.0), Pos2::new(-40.0, -40.0), 5.0, false);
        assert!(layer.is_empty());
        layer.paint(Pos2::new(15.0, 15.0), Pos2::new(60.0, 60.0), 8.0, false);
        assert_eq!(layer.mask().get_pixel(19, 19)[0], 255);
    }

    #[test]
    fn a_stroke_on_a_large_picture_sends_only_its_region_again() {
        let ctx = egui::Context::default();
        let mut layer = MaskLayer::blank(4000, 3000);
        layer.overlay(&ctx);
        assert_eq!(layer.dirty, None);
        layer.paint(Pos2::new(100.0, 100.0), Pos2::new(140.0, 100.0), 8.0, false);
        layer.paint(Pos2::new(140.0, 100.0), Pos2::new(150.0, 120.0), 8.0, false);
        assert_eq!(layer.dirty, Some((92, 92, 158, 128)));
        // The test context's textures are at most 2048 a side: the overlay is 2048 x 1536 and
        // the stroke's region maps to it.
        assert_eq!(layer.overlay_size(2048), (2048, 1536));
        layer.overlay(&ctx);
        assert_eq!((layer.dirty, layer.overlay_stale), (None, false));
        // Invert changes every pixel: the whole layer is sent.
        layer.invert();
        assert!(layer.overlay_stale);
    }

    #[test]
    fn invert_clear_and_a_bounded_history() {
        let mut layer = MaskLayer::blank(10, 10);
        layer.invert();
        assert!((layer.coverage() - 1.0).abs() < 1e-9);
        layer.clear();
        assert!(layer.is_empty());
        for _ in 0..UNDO_STEPS + 10 {
            layer.checkpoint();
        }
        assert_eq!(layer.undo_steps(), UNDO_STEPS);
    }
}
