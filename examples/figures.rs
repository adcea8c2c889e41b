//! Draws the figures of `docs/quantization.md` from the library's own maps and quantizer:
//! `docs/figures/code-maps.svg` (the dynamic and linear maps) and
//! `docs/figures/blockwise-error.svg` (the error of block-wise vs whole-tensor quantization of
//! a tensor with an outlier).
//!
//! ```text
//! cargo run --release --example figures -- [--out docs/figures]
//! ```

use std::path::PathBuf;

use burn::tensor::{Device, Tensor};
use burn_8bit::{BlockQuantized, BlockSize, CodeMap, MapKind};
use plotters::prelude::*;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// The positive half of each signed map, by code, on a log axis: the dynamic map spreads its
/// codes over seven decades, the linear map spends most of them near the largest values.
fn code_maps(path: &PathBuf) -> Result<()> {
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Positive values of the signed 8-bit maps (× absmax)", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(128usize..256usize, (1e-9f64..1.5f64).log_scale())?;
    chart.configure_mesh().x_desc("code").y_desc("value").y_label_formatter(&|v| format!("{v:.0e}")).draw()?;
    for (kind, color, name) in [
        (MapKind::DynamicSigned, RGBColor(31, 119, 180), "dynamic (default)"),
        (MapKind::LinearSigned, RGBColor(214, 39, 40), "linear (ablation)"),
    ] {
        let map: CodeMap = kind.map();
        let points: Vec<(usize, f64)> = map
            .values()
            .iter()
            .enumerate()
            .filter(|&(_, &v)| v > 0.0)
            .map(|(code, &v)| (code, f64::from(v)))
            .collect();
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 2, color.filled())))?
            .label(name)
            .legend(move |(x, y)| Circle::new((x + 10, y), 4, color.filled()));
    }
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.8)).draw()?;
    root.present()?;
    Ok(())
}

/// Absolute decoding error per element of one tensor — small normal values plus one outlier
/// every 1024 elements — quantized block-wise (256) and against one absmax for the whole tensor.
fn blockwise_error(path: &PathBuf) -> Result<()> {
    let device = Device::default();
    let len = 2048;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let values: Vec<f32> = (0..len)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let u = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            if i % 1024 == 700 { 4.0 } else { 0.01 * u }
        })
        .collect();
    let x = Tensor::<1>::from_floats(values.as_slice(), &device);
    let block = BlockSize::new(256)?;
    let errors = |q: BlockQuantized| -> Result<Vec<f64>> {
        let decoded = q.dequantize_flat().into_data().try_to_vec::<f32>().map_err(|e| format!("{e:?}"))?;
        Ok(decoded.iter().zip(&values).map(|(d, v)| f64::from((d - v).abs()).max(1e-9)).collect())
    };
    let blockwise = errors(BlockQuantized::quantize(x.clone(), MapKind::DynamicSigned, block))?;
    let whole = errors(BlockQuantized::quantize_whole_tensor(x, MapKind::DynamicSigned, block))?;

    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("|decoded − original|: 2048 values ~ U(−0.005, 0.005) and 2 outliers of 4.0", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0usize..len, (1e-9f64..1e-1f64).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("element")
        .y_desc("absolute error")
        .y_label_formatter(&|v| format!("{v:.0e}"))
        .draw()?;
    for (series, color, name) in [
        (&whole, RGBColor(214, 39, 40), "one absmax per tensor"),
        (&blockwise, RGBColor(31, 119, 180), "block-wise, 256 per block (default)"),
    ] {
        chart
            .draw_series(LineSeries::new(series.iter().copied().enumerate(), color.stroke_width(1)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.8)).draw()?;
    root.present()?;
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map_or_else(|| PathBuf::from("docs/figures"), PathBuf::from);
    std::fs::create_dir_all(&out)?;
    let maps = out.join("code-maps.svg");
    let error = out.join("blockwise-error.svg");
    code_maps(&maps)?;
    blockwise_error(&error)?;
    println!("{}\n{}", maps.display(), error.display());
    Ok(())
}
