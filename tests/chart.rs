//! The loss chart as a person gets it: loss.png decodes, has the chart's size, and carries text
//! (title, tick values, axis labels) drawn from the embedded font; loss.svg names the same labels.
use qtune::train::chart::{write_loss_charts, SIZE};

/// (step, loss) points.
type Curve = Vec<(usize, f32)>;

fn curves() -> (Curve, Curve) {
    let train: Curve = (1..=200)
        .map(|s| {
            (
                s,
                3.0 * (-(s as f32) / 60.0).exp() + 0.5 + 0.1 * ((s * 7 % 11) as f32 / 11.0),
            )
        })
        .collect();
    let eval = vec![(0, 3.6), (50, 1.9), (100, 1.1), (150, 0.8), (200, 0.7)];
    (train, eval)
}

/// Pixels in a box that are neither white background nor one of the series' colours: dark grey
/// to black, as antialiased glyphs are.
fn dark_pixels(img: &image::RgbImage, x0: u32, y0: u32, x1: u32, y1: u32) -> usize {
    let mut n = 0;
    for y in y0..y1 {
        for x in x0..x1 {
            let p = img.get_pixel(x, y).0;
            if p.iter().all(|&c| c < 150) {
                n += 1;
            }
        }
    }
    n
}

#[test]
fn loss_png_decodes_with_its_size_and_has_text() {
    let dir = tempfile::tempdir().unwrap();
    let (train, eval) = curves();
    let title = "tiny-llama: QLoRA (nf4) r=8 lr=1e-3";
    write_loss_charts(dir.path(), title, &train, &eval).unwrap();
    let img = image::open(dir.path().join("loss.png")).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), SIZE);
    let (w, h) = SIZE;
    // Title band: glyphs across the top centre.
    let title_px = dark_pixels(&img, w / 4, 0, 3 * w / 4, 44);
    assert!(title_px > 300, "title band has {title_px} dark pixels");
    // Left label area: tick values and the rotated "loss" label.
    let y_labels = dark_pixels(&img, 0, 60, 76, h - 60);
    assert!(y_labels > 300, "y labels have {y_labels} dark pixels");
    // Bottom label area: tick values and "step".
    let x_labels = dark_pixels(&img, 90, h - 48, w - 20, h);
    assert!(x_labels > 150, "x labels have {x_labels} dark pixels");
    // The eval series is drawn in its own red: its markers are there.
    let red = img
        .pixels()
        .filter(|p| p.0[0] > 180 && p.0[1] < 90 && p.0[2] < 90)
        .count();
    assert!(red > 100, "{red} red pixels");
    // Both files are in place; the temporary names are gone.
    assert!(dir.path().join("loss.svg").is_file());
    assert!(!dir.path().join(".loss.tmp.png").exists());
}

#[test]
fn loss_svg_names_title_axes_and_legend() {
    let dir = tempfile::tempdir().unwrap();
    let (train, eval) = curves();
    write_loss_charts(dir.path(), "m: LoRA r=4 lr=2e-4", &train, &eval).unwrap();
    let svg = std::fs::read_to_string(dir.path().join("loss.svg")).unwrap();
    // plotters writes each label as <text ...>\nLABEL\n</text>
    for s in [
        "m: LoRA r=4 lr=2e-4",
        "step",
        "loss",
        "train",
        "smoothed train",
        "eval",
        "0.700",
    ] {
        assert!(
            svg.contains(&format!(">\n{s}\n</text>")),
            "loss.svg lacks {s}"
        );
    }
    assert!(svg.contains(&format!("width=\"{}\"", SIZE.0)));
}

#[test]
fn a_chart_with_only_train_points_or_one_point_still_draws() {
    let dir = tempfile::tempdir().unwrap();
    write_loss_charts(dir.path(), "t", &[(1, 2.0)], &[]).unwrap();
    write_loss_charts(dir.path(), "t", &[], &[(0, 2.0)]).unwrap();
    write_loss_charts(dir.path(), "t", &[], &[]).unwrap();
    let img = image::open(dir.path().join("loss.png")).unwrap();
    assert_eq!((img.width(), img.height()), SIZE);
}

#[test]
fn the_title_names_model_method_rank_and_learning_rate() {
    use qtune::train::chart::title;
    use qtune::train::config::TrainConfig;
    let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let cfg = TrainConfig {
        model: Some(base.join("assets/model")),
        rank: 8,
        lr: 1e-3,
        ..TrainConfig::default()
    };
    // the embedded default is stored NF4: QLoRA
    assert_eq!(title(&cfg), "assets/model: QLoRA (NF4 base) r=8 lr=1e-3");
    let cfg = TrainConfig {
        model: Some(base.join("tests/fixtures/llama/model")),
        quant: "q4_0".into(),
        rank: 16,
        lr: 2e-4,
        ..TrainConfig::default()
    };
    assert_eq!(
        title(&cfg),
        "llama/model: QLoRA (q4_0 at load) r=16 lr=2e-4"
    );
    let cfg = TrainConfig {
        model: Some(base.join("tests/fixtures/llama/model")),
        ..cfg
    };
    let cfg = TrainConfig {
        quant: "none".into(),
        ..cfg
    };
    assert_eq!(title(&cfg), "llama/model: LoRA r=16 lr=2e-4");
}
