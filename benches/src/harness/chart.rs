//! Each suite's headline as an SVG bar chart (plotters, SVG backend only): one panel per metric,
//! one horizontal bar per case with its min–max range as a whisker, our cases in a darker colour.

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use super::report::{fmt_count, fmt_sig, Headline, SuiteResult};
use super::stats::Spread;

/// One bar.
#[derive(Debug, Clone)]
pub struct Bar {
    /// Category label (`group · server`).
    pub label: String,
    /// The value and its range; `None` draws no bar (case not available).
    pub value: Option<Spread>,
    /// Draw in the highlight colour (our server).
    pub ours: bool,
}

/// One panel of bars sharing an axis.
#[derive(Debug, Clone)]
pub struct Panel {
    /// Caption, with the unit and which way is better.
    pub title: String,
    /// The bars, top to bottom.
    pub bars: Vec<Bar>,
}

/// The two panels of a suite: its headline metric and server CPU per unit.
pub fn suite_panels(r: &SuiteResult) -> Vec<Panel> {
    let h = r.headline.unwrap_or(Headline::Rps);
    let bars = |f: &dyn Fn(&super::report::CaseResult) -> Option<Spread>| -> Vec<Bar> {
        r.cases
            .iter()
            .map(|c| Bar {
                label: format!("{} · {}", c.group, c.server),
                value: if c.status == "ok" { f(c) } else { None },
                ours: c.server.starts_with("ours"),
            })
            .collect()
    };
    let mut panels = match h {
        Headline::Rps => vec![
            Panel {
                title: "requests/s (higher is better)".into(),
                bars: bars(&|c| c.rps),
            },
            Panel {
                title: "server CPU µs per request (lower is better)".into(),
                bars: bars(&|c| c.cpu_us_per_req),
            },
        ],
        Headline::Gbps => vec![
            Panel {
                title: "GB/s (higher is better)".into(),
                bars: bars(&|c| c.gbps),
            },
            Panel {
                title: "server CPU s per GB (lower is better)".into(),
                bars: bars(&|c| c.cpu_s_per_gb),
            },
        ],
    };
    if let Some(name) = &r.counter_name {
        panels.push(Panel {
            title: format!("{name} per run (lower is better)"),
            bars: bars(&|c| c.counter),
        });
    }
    panels
}

/// Axis and bar labels: `19.8k` for large values, three significant digits otherwise.
fn fmt_value(v: f64) -> String {
    if v >= 1e4 {
        fmt_count(v)
    } else {
        fmt_sig(v)
    }
}

/// Renders panels side by side as an SVG document.
pub fn svg(title: &str, panels: &[Panel]) -> Result<String> {
    let rows = panels
        .iter()
        .map(|p| p.bars.len())
        .max()
        .unwrap_or(0)
        .max(1);
    let label_w = panels
        .iter()
        .flat_map(|p| p.bars.iter().map(|b| b.label.chars().count()))
        .max()
        .unwrap_or(8) as u32
        * 7
        + 10;
    let panel_w = label_w + 300;
    let width = panel_w * panels.len().max(1) as u32;
    let height = 70 + 26 * rows as u32 + 40;
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("{e:?}"))?;
        let root = root
            .titled(title, ("sans-serif", 18))
            .map_err(|e| anyhow!("{e:?}"))?;
        let areas = root.split_evenly((1, panels.len().max(1)));
        for (panel, area) in panels.iter().zip(areas.iter()) {
            draw_panel(panel, area, label_w).map_err(|e| anyhow!("{e:?}"))?;
        }
        root.present().map_err(|e| anyhow!("{e:?}"))?;
    }
    Ok(out)
}

fn draw_panel<DB: DrawingBackend>(
    panel: &Panel,
    area: &DrawingArea<DB, plotters::coord::Shift>,
    label_w: u32,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let n = panel.bars.len().max(1);
    let xmax = panel
        .bars
        .iter()
        .filter_map(|b| b.value.map(|v| v.max))
        .fold(0.0_f64, f64::max)
        .max(f64::MIN_POSITIVE)
        * 1.25;
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, ("sans-serif", 14))
        .margin(8)
        .x_label_area_size(28)
        .y_label_area_size(label_w)
        .build_cartesian_2d(0.0..xmax, (0..n).into_segmented())?;
    // Bars are drawn top to bottom in case order; the axis counts from the bottom.
    let row = |i: usize| n - 1 - i;
    let labels: Vec<String> = panel.bars.iter().map(|b| b.label.clone()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n)
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) if *i < n => {
                labels.get(n - 1 - *i).cloned().unwrap_or_default()
            }
            _ => String::new(),
        })
        .x_label_formatter(&|v| fmt_value(*v))
        .x_labels(5)
        .draw()?;
    let ours = RGBColor(31, 90, 160);
    let peer = RGBColor(150, 170, 190);
    for (i, b) in panel.bars.iter().enumerate() {
        let Some(v) = b.value else {
            chart.draw_series(std::iter::once(Text::new(
                "n/a",
                (0.0, SegmentValue::CenterOf(row(i))),
                ("sans-serif", 12),
            )))?;
            continue;
        };
        let colour = if b.ours { ours } else { peer };
        let mut rect = Rectangle::new(
            [
                (0.0, SegmentValue::Exact(row(i))),
                (v.median, SegmentValue::Exact(row(i) + 1)),
            ],
            colour.filled(),
        );
        rect.set_margin(4, 4, 0, 0);
        chart.draw_series(std::iter::once(rect))?;
        if v.n > 1 && v.max > v.min {
            chart.draw_series(std::iter::once(PathElement::new(
                vec![
                    (v.min, SegmentValue::CenterOf(row(i))),
                    (v.max, SegmentValue::CenterOf(row(i))),
                ],
                BLACK.stroke_width(1),
            )))?;
        }
        chart.draw_series(std::iter::once(Text::new(
            format!(" {}", fmt_value(v.median)),
            (v.max.max(v.median), SegmentValue::CenterOf(row(i))),
            ("sans-serif", 12),
        )))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spread(m: f64) -> Option<Spread> {
        Some(Spread {
            median: m,
            min: m * 0.9,
            max: m * 1.1,
            n: 3,
        })
    }

    #[test]
    fn renders_svg_with_every_label() {
        let panels = vec![
            Panel {
                title: "requests/s".into(),
                bars: vec![
                    Bar {
                        label: "keep-alive · ours".into(),
                        value: spread(130_000.0),
                        ours: true,
                    },
                    Bar {
                        label: "keep-alive · node".into(),
                        value: spread(60_000.0),
                        ours: false,
                    },
                    Bar {
                        label: "close · gone".into(),
                        value: None,
                        ours: false,
                    },
                ],
            },
            Panel {
                title: "CPU".into(),
                bars: vec![],
            },
        ];
        let s = svg("hello", &panels).unwrap();
        assert!(s.starts_with("<svg"));
        assert!(s.trim_end().ends_with("</svg>"));
        for l in [
            "keep-alive · ours",
            "keep-alive · node",
            "close · gone",
            "n/a",
            "130.0k",
        ] {
            assert!(s.contains(l), "missing {l}");
        }
    }
}
