//! The loss curves of every arm in one SVG: training loss (moving average) as lines,
//! validation loss after each epoch as markers.

use std::path::Path;

use plotters::prelude::*;

use crate::progress::Curves;

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// Mean of the last `window` values at every step.
fn moving_average(values: &[f64], window: usize) -> Vec<f64> {
    let mut sum = 0.0;
    values
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            sum += v;
            if i >= window {
                sum -= values[i - window];
            }
            sum / (i + 1).min(window) as f64
        })
        .collect()
}

pub fn loss_curves(path: &Path, title: &str, arms: &[(String, Curves)]) -> Result<(), Box<dyn std::error::Error>> {
    let window = 25;
    let smoothed: Vec<Vec<f64>> = arms.iter().map(|(_, c)| moving_average(&c.train_loss, window)).collect();
    let steps = arms.iter().map(|(_, c)| c.train_loss.len()).max().unwrap_or(1).max(1);
    // The first steps (loss near ln(vocab)) would flatten the rest: start the axis after them.
    let skip = steps / 20;
    let values = smoothed
        .iter()
        .flat_map(|s| s.iter().skip(skip).copied())
        .chain(arms.iter().flat_map(|(_, c)| c.valid_loss.iter().map(|&(_, v)| v)));
    let (low, high) = values.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let margin = (high - low).max(1e-3) * 0.05;

    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(skip..steps, (low - margin)..(high + margin))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(format!("loss (train: mean of {window} steps; markers: validation)"))
        .draw()?;
    for (i, ((name, curves), smooth)) in arms.iter().zip(&smoothed).enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(
                smooth.iter().enumerate().skip(skip).map(|(step, &v)| (step + 1, v)),
                color.stroke_width(2),
            ))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(
            curves.valid_loss.iter().map(|&(step, v)| Circle::new((step, v), 5, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;
    root.present()?;
    Ok(())
}
