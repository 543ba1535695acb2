//! `--plot`: an SVG with host wakeups per second per policy (median, with the range over the rounds)
//! and the lateness distribution per policy.

use std::path::Path;

use plotters::prelude::*;

use super::Comparison;

const COLORS: [RGBColor; 6] = [
    RGBColor(0x4c, 0x72, 0xb0),
    RGBColor(0xdd, 0x84, 0x52),
    RGBColor(0x55, 0xa8, 0x68),
    RGBColor(0xc4, 0x4e, 0x52),
    RGBColor(0x81, 0x72, 0xb3),
    RGBColor(0x93, 0x78, 0x60),
];

/// Why the plot could not be drawn or written (plotters reports its errors as boxed errors).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PlotError(String);

pub fn write_svg(cmp: &Comparison, path: &Path) -> Result<(), PlotError> {
    let err = |e: &dyn std::fmt::Display| PlotError(e.to_string());
    let root = SVGBackend::new(path, (960, 720)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (top, bottom) = root.split_vertically(340);
    wakeups_chart(cmp, &top).map_err(|e| err(&e))?;
    lateness_chart(cmp, &bottom).map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

fn wakeups_chart(cmp: &Comparison, area: &Area) -> Result<(), Box<dyn std::error::Error>> {
    let n = cmp.summary.len();
    let top = cmp
        .summary
        .iter()
        .map(|s| s.host_wakeups_per_s.max)
        .fold(1.0, f64::max)
        * 1.15;
    let c = &cmp.config;
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!(
                "host wakeups of halted vCPUs per second ({} vCPUs, {}, K={})",
                c.vcpus, c.workload, cmp.repeat
            ),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..n as f64, 0f64..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        // Each bar carries its policy's name and value; numeric x labels would mean nothing here.
        .x_labels(0)
        .y_desc("wakeups / s")
        .draw()?;
    for (i, s) in cmp.summary.iter().enumerate() {
        let x = i as f64;
        let color = COLORS[i % COLORS.len()];
        chart.draw_series(std::iter::once(Rectangle::new(
            [(x + 0.2, 0.0), (x + 0.8, s.host_wakeups_per_s.median)],
            color.filled(),
        )))?;
        // The range over the rounds.
        chart.draw_series(std::iter::once(PathElement::new(
            vec![
                (x + 0.5, s.host_wakeups_per_s.min),
                (x + 0.5, s.host_wakeups_per_s.max),
            ],
            BLACK.stroke_width(2),
        )))?;
        chart.draw_series(std::iter::once(Text::new(
            format!("{}: {:.0}", s.policy, s.host_wakeups_per_s.median),
            (x + 0.2, s.host_wakeups_per_s.max + top * 0.06),
            ("sans-serif", 14),
        )))?;
    }
    Ok(())
}

fn lateness_chart(cmp: &Comparison, area: &Area) -> Result<(), Box<dyn std::error::Error>> {
    let buckets = cmp
        .summary
        .iter()
        .map(|s| s.lateness_histogram.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(
            "timer lateness: share of timers per bucket",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..(buckets - 1).max(1) as f64, 0f64..1f64)?;
    chart
        .configure_mesh()
        .x_labels(buckets)
        .x_label_formatter(&|x| {
            let us = 1u64 << (x.round() as u32).min(40);
            if us >= 1000 {
                format!("<={} ms", us / 1000)
            } else {
                format!("<={us} us")
            }
        })
        .y_desc("share of timers fired")
        .draw()?;
    for (i, s) in cmp.summary.iter().enumerate() {
        let total: u64 = s.lateness_histogram.iter().map(|[_, n]| n).sum();
        if total == 0 {
            continue;
        }
        let color = COLORS[i % COLORS.len()];
        let points: Vec<(f64, f64)> = s
            .lateness_histogram
            .iter()
            .enumerate()
            .map(|(b, [_, n])| (b as f64, *n as f64 / total as f64))
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(s.policy.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;
    Ok(())
}
