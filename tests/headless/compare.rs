//! Comparison plans, their grid image and its metadata, and rebuilding a comparison from its
//! cells in the gallery.
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use atelier::compare::{
    COMPARISON_KEYWORD, CellResult, ComparisonPlan, GridLayout, GridRecord, YAxis, from_cells,
    render_grid, save_grid,
};
use atelier::engine::pipeline::GenerationRequest;
use atelier::gallery::library::Library;
use atelier::gallery::metadata::read_png_text;
use atelier::gallery::record::{ComparisonRef, ImageMetadata};
use atelier::schedulers::{Sampler, SchedulerKind, SigmaSchedule};
use image::{Rgb, RgbImage};

fn sampler(id: &str) -> Sampler {
    Sampler::parse(id).unwrap()
}

fn base() -> GenerationRequest {
    GenerationRequest {
        prompt: "a red fox in the snow".into(),
        negative_prompt: "blurry".into(),
        seed: 42,
        steps: 20,
        guidance_scale: 7.0,
        width: 96,
        height: 64,
        eta: 0.3,
        ..Default::default()
    }
}

#[test]
fn a_plan_has_one_cell_per_sampler_and_row_with_only_those_changed() {
    let samplers = vec![
        sampler("euler"),
        sampler("dpmpp-2m-karras"),
        sampler("ddim"),
    ];
    let plan = ComparisonPlan::new(
        "t".into(),
        base(),
        samplers.clone(),
        YAxis::Steps(vec![10, 30]),
    )
    .unwrap();
    let cells = plan.cells();
    assert_eq!(cells.len(), 6);
    for cell in &cells {
        let s = samplers[cell.column];
        let expected = GenerationRequest {
            scheduler: s.kind,
            sigmas: s.sigmas,
            steps: [10, 30][cell.row],
            // eta is DDIM's alone.
            eta: if s.kind == SchedulerKind::Ddim {
                0.3
            } else {
                0.0
            },
            ..base()
        };
        assert_eq!(cell.request, expected, "cell {},{}", cell.row, cell.column);
    }
    assert_eq!(plan.column_label(1), "DPM++ 2M Karras");
    assert_eq!(plan.y.label(1), "30 steps");
}

#[test]
fn prompt_search_and_replace_and_other_axes() {
    let plan = ComparisonPlan::new(
        "t".into(),
        base(),
        vec![sampler("euler")],
        YAxis::parse("prompt", "fox, owl, snow leopard").unwrap(),
    )
    .unwrap();
    let prompts: Vec<String> = plan.cells().into_iter().map(|c| c.request.prompt).collect();
    assert_eq!(
        prompts,
        vec![
            "a red fox in the snow",
            "a red owl in the snow",
            "a red snow leopard in the snow"
        ]
    );
    let error = ComparisonPlan::new(
        "t".into(),
        base(),
        vec![sampler("euler")],
        YAxis::parse("prompt", "cat, dog").unwrap(),
    )
    .unwrap_err();
    assert!(error.contains("\"cat\" does not appear"), "{error}");
    assert!(ComparisonPlan::new("t".into(), base(), vec![], YAxis::None).is_err());
    let seeds = YAxis::parse("seed", "1, 2,3").unwrap();
    assert_eq!(seeds, YAxis::Seeds(vec![1, 2, 3]));
    assert_eq!(
        YAxis::parse("guidance", "4, 7.5").unwrap(),
        YAxis::Guidance(vec![4.0, 7.5])
    );
    assert!(
        YAxis::parse("steps", "10, ten")
            .unwrap_err()
            .contains("ten")
    );
    assert!(YAxis::parse("steps", "0").is_err());
    assert!(
        YAxis::parse("colour", "1")
            .unwrap_err()
            .contains("unknown axis")
    );
}

#[test]
fn the_grid_image_puts_each_cell_in_its_place_with_labels() {
    let plan = ComparisonPlan::new(
        "grid-test".into(),
        base(),
        vec![sampler("euler"), sampler("unipc")],
        YAxis::Guidance(vec![4.0, 8.0]),
    )
    .unwrap();
    let colours = [[200, 30, 30], [30, 200, 30], [30, 30, 200], [200, 200, 30]];
    let images: Vec<Option<RgbImage>> = colours
        .iter()
        .map(|&c| Some(RgbImage::from_pixel(96, 64, Rgb(c))))
        .collect();
    let mut images_missing_one = images.clone();
    images_missing_one[3] = None;
    let results: Vec<Option<CellResult>> = (0..4)
        .map(|i| {
            Some(CellResult {
                total_secs: 1.0 + i as f64,
                model_evaluations: 20,
            })
        })
        .collect();
    let grid = render_grid(&plan, &images_missing_one, &results);
    let layout = GridLayout::for_plan(&plan, 170, 64);
    assert_eq!(grid.dimensions(), layout.size(2, 2));
    for (index, colour) in colours.iter().enumerate().take(3) {
        let (x, y) = layout.cell_origin(index / 2, index % 2);
        // Images narrower than the slot are centred in it.
        let centre = grid.get_pixel(x + 170 / 2, y + 32);
        assert_eq!(centre.0, *colour, "cell {index}");
    }
    let (x, y) = layout.cell_origin(1, 1);
    assert_eq!(
        grid.get_pixel(x + 85, y + 32).0,
        [200, 200, 200],
        "a missing cell is grey"
    );
    // Text is drawn where the labels go: the title, the column labels, the row labels and the
    // captions under the cells hold dark pixels; the gaps do not.
    let dark_in = |x0: u32, y0: u32, w: u32, h: u32| {
        (x0..x0 + w)
            .flat_map(|x| (y0..y0 + h).map(move |y| (x, y)))
            .filter(|&(x, y)| grid.get_pixel(x, y).0.iter().all(|&v| v < 120))
            .count()
    };
    assert!(dark_in(12, 10, 200, 20) > 30, "title");
    let (column_1_x, _) = layout.cell_origin(0, 1);
    assert!(dark_in(column_1_x, 46, 60, 18) > 20, "column label");
    let (_, row_1_y) = layout.cell_origin(1, 0);
    assert!(dark_in(10, row_1_y + 20, 120, 24) > 20, "row label");
    let (caption_x, caption_y) = layout.cell_origin(0, 0);
    assert!(
        dark_in(caption_x, caption_y + 64 + 4, 100, 18) > 10,
        "caption"
    );
    assert_eq!(
        dark_in(layout.left - 4, 200.min(grid.height() - 1), 2, 1),
        0
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grid.png");
    let record = GridRecord {
        plan: plan.clone(),
        results: results.clone(),
    };
    save_grid(&path, &grid, &record, "sd-turbo").unwrap();
    let chunks = read_png_text(&path).unwrap();
    let back: GridRecord = serde_json::from_str(&chunks[COMPARISON_KEYWORD]).unwrap();
    assert_eq!(back, record);
    assert!(
        chunks["parameters"].contains("X/Y grid"),
        "{}",
        chunks["parameters"]
    );
    assert!(chunks["parameters"].contains("Euler, UniPC"));
}

#[test]
fn a_comparison_reopens_from_its_cells_in_the_gallery() {
    let dir = tempfile::tempdir().unwrap();
    let (mut library, _) = Library::open(dir.path()).unwrap();
    let plan = ComparisonPlan::new(
        "cmp-reopen".into(),
        base(),
        vec![
            sampler("euler"),
            Sampler {
                kind: SchedulerKind::Heun,
                sigmas: SigmaSchedule::Karras,
            },
        ],
        YAxis::Seeds(vec![1, 2]),
    )
    .unwrap();
    let plan_json = serde_json::to_string(&plan).unwrap();
    for cell in plan.cells() {
        let mut metadata = ImageMetadata::for_generation(
            &cell.request,
            "m",
            None,
            atelier::engine::pipeline::Timings {
                total_secs: 2.5,
                ..Default::default()
            },
            1_764_000_000,
        );
        metadata.comparison = Some(ComparisonRef {
            id: plan.id.clone(),
            row: cell.row,
            column: cell.column,
            plan_json: plan_json.clone(),
        });
        library
            .save(
                &RgbImage::from_pixel(8, 8, Rgb([cell.row as u8, cell.column as u8, 0])),
                &metadata,
            )
            .unwrap();
    }
    // An unrelated image does not join.
    library
        .save(&RgbImage::new(8, 8), &ImageMetadata::default())
        .unwrap();
    let cells = library
        .search(&atelier::gallery::search::GalleryQuery {
            comparison: Some("cmp-reopen".into()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(cells.len(), 4);
    let reopened_comparison = from_cells(&cells).unwrap();
    let (reopened, files, results) = (
        reopened_comparison.plan,
        reopened_comparison.files,
        reopened_comparison.results,
    );
    assert_eq!(reopened, plan);
    assert!(files.iter().all(Option::is_some));
    let heun = results[1].as_ref().unwrap();
    assert_eq!(heun.model_evaluations, 39, "Heun: 2n - 1 evaluations");
    assert_eq!(heun.total_secs, 2.5);
    // Each file holds the cell of its place.
    for (index, file) in files.iter().enumerate() {
        let image = image::open(dir.path().join(file.as_ref().unwrap()))
            .unwrap()
            .to_rgb8();
        assert_eq!(
            image.get_pixel(0, 0).0,
            [(index / 2) as u8, (index % 2) as u8, 0]
        );
    }
}
