//! `redis.svg`: throughput and latency of the Redis path against concurrency.

use std::path::Path;

use plotters::prelude::*;

use crate::BoxResult;
use crate::redis_path::Level;
use crate::stats;

/// One line of a panel.
struct Series {
    label: String,
    color: RGBColor,
    dashed: bool,
    points: Vec<(f64, f64)>,
}

/// Draws throughput (top) and p50/p99 latency in milliseconds (bottom) of the adapter and the raw baseline
/// at each concurrency level, with `redis-benchmark`'s figure as a flat line when known.
pub(crate) fn draw(path: &Path, levels: &[Level], redis_benchmark: Option<f64>) -> BoxResult<()> {
    let x = |level: &Level| level.concurrency as f64;
    let mut throughput = vec![
        Series {
            label: "adapter is_allowed".to_owned(),
            color: BLUE,
            dashed: false,
            points: levels
                .iter()
                .map(|l| (x(l), l.adapter_throughput()))
                .collect(),
        },
        Series {
            label: "raw EVALSHA (same process)".to_owned(),
            color: RED,
            dashed: false,
            points: levels.iter().map(|l| (x(l), l.raw_throughput())).collect(),
        },
    ];
    if let Some(rb) = redis_benchmark {
        throughput.push(Series {
            label: "redis-benchmark -c 64 -P 16".to_owned(),
            color: BLACK,
            dashed: true,
            points: vec![(1.0, rb), (64.0, rb)],
        });
    }
    let latency_of = |level: &Level, adapter: bool, q: f64| {
        let hist = if adapter {
            &level.adapter_latency
        } else {
            &level.raw_latency
        };
        (x(level), stats::quantile_us(hist, q) / 1_000.0)
    };
    let latency = [
        ("adapter p50", BLUE, false, true, 0.5),
        ("adapter p99", BLUE, true, true, 0.99),
        ("raw p50", RED, false, false, 0.5),
        ("raw p99", RED, true, false, 0.99),
    ]
    .map(|(label, color, dashed, adapter, q)| Series {
        label: label.to_owned(),
        color,
        dashed,
        points: levels.iter().map(|l| latency_of(l, adapter, q)).collect(),
    });

    let root = SVGBackend::new(path, (900, 760)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (top, bottom) = root.split_vertically(380);
    panel(
        &top,
        "Redis path: checks per second",
        "checks/s",
        &throughput,
    )?;
    panel(&bottom, "Redis path: latency per check", "ms", &latency)?;
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    caption: &str,
    y_desc: &str,
    series: &[Series],
) -> BoxResult<()>
where
    DB::ErrorType: 'static,
{
    let y_max = series
        .iter()
        .flat_map(|s| s.points.iter().map(|&(_, y)| y))
        .filter(|y| y.is_finite())
        .fold(0.0_f64, f64::max)
        * 1.15;
    let y_max = if y_max > 0.0 { y_max } else { 1.0 };
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(
            (0.8_f64..80.0_f64)
                .log_scale()
                .with_key_points(vec![1.0, 16.0, 64.0]),
            0.0..y_max,
        )
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("concurrent tasks")
        .y_desc(y_desc)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| {
            if *y >= 1e3 {
                format!("{:.0}k", y / 1e3)
            } else if y_max < 20.0 {
                format!("{y:.1}")
            } else {
                format!("{y:.0}")
            }
        })
        .max_light_lines(1)
        .draw()
        .map_err(|e| e.to_string())?;
    for s in series {
        let style = s.color.stroke_width(2);
        let color = s.color;
        let drawn = if s.dashed {
            chart.draw_series(DashedLineSeries::new(s.points.clone(), 6, 4, style))
        } else {
            chart.draw_series(LineSeries::new(s.points.clone(), style))
        }
        .map_err(|e| e.to_string())?;
        let dashed = s.dashed;
        drawn.label(s.label.clone()).legend(move |(x, y)| {
            let style = color.stroke_width(2);
            let (first, second) = if dashed {
                ((x, x + 8), (x + 12, x + 20))
            } else {
                ((x, x + 10), (x + 10, x + 20))
            };
            EmptyElement::at((0, 0))
                + PathElement::new(vec![(first.0, y), (first.1, y)], style)
                + PathElement::new(vec![(second.0, y), (second.1, y)], style)
        });
        chart
            .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(|e| e.to_string())?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    Ok(())
}
