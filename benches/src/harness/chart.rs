//! Each suite's headline as an SVG bar chart (plotters, SVG backend only): one panel per metric,
//! one horizontal bar per case with its min–max range as a whisker, our cases in a darker colour.

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use super::report::{fmt_count, fmt_sig, CaseResult, ChartMetric, Headline, SuiteResult};
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

/// The panels of a suite, as its results ask (`SuiteResult::chart`; headline and CPU if empty).
pub fn suite_panels(r: &SuiteResult) -> Vec<Panel> {
    let h = r.headline.unwrap_or(Headline::Rps);
    let bars = |f: &dyn Fn(&CaseResult) -> Option<Spread>| -> Vec<Bar> {
        r.cases
            .iter()
            .map(|c| Bar {
                label: format!("{} · {}", c.group, c.server),
                value: if c.status == "ok" { f(c) } else { None },
                ours: c.server.starts_with("ours"),
            })
            .collect()
    };
    let metrics = if r.chart.is_empty() {
        vec![ChartMetric::Headline, ChartMetric::CpuPerUnit]
    } else {
        r.chart.clone()
    };
    metrics
        .into_iter()
        .map(|m| match (m, h) {
            (ChartMetric::Headline, Headline::Rps) => Panel {
                title: "requests/s (higher is better)".into(),
                bars: bars(&|c| c.rps),
            },
            (ChartMetric::Headline, Headline::Gbps) => Panel {
                title: "GB/s (higher is better)".into(),
                bars: bars(&|c| c.gbps),
            },
            (ChartMetric::CpuPerUnit, Headline::Rps) => Panel {
                title: "server CPU µs per request (lower is better)".into(),
                bars: bars(&|c| c.cpu_us_per_req),
            },
            (ChartMetric::CpuPerUnit, Headline::Gbps) => Panel {
                title: "server CPU s per GB (lower is better)".into(),
                bars: bars(&|c| c.cpu_s_per_gb),
            },
            (ChartMetric::P99, _) => Panel {
                title: "p99 latency, ms (lower is better)".into(),
                bars: bars(&|c| c.p99_us.map(|s| scale(s, 1e-3))),
            },
            (ChartMetric::SuccessPct, _) => Panel {
                title: "answered 2xx, % (higher is better)".into(),
                bars: bars(&|c| c.success_pct),
            },
            (ChartMetric::Counter, _) => Panel {
                title: format!(
                    "{} per run (lower is better)",
                    r.counter_name.as_deref().unwrap_or("counter")
                ),
                bars: bars(&|c| c.counter),
            },
            (ChartMetric::PeakRss, _) => Panel {
                title: "peak RSS, MiB (lower is better)".into(),
                bars: bars(&|c| {
                    c.peak_rss_mib.map(|m| Spread {
                        median: m,
                        min: m,
                        max: m,
                        n: 1,
                    })
                }),
            },
        })
        .collect()
}

fn scale(s: Spread, k: f64) -> Spread {
    Spread {
        median: s.median * k,
        min: s.min * k,
        max: s.max * k,
        n: s.n,
    }
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
        // The label sits at the end of the bar it names (the whisker may reach further).
        chart.draw_series(std::iter::once(Text::new(
            format!(" {}", fmt_value(v.median)),
            (v.median, SegmentValue::Exact(row(i) + 1)),
            ("sans-serif", 11),
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
    fn suite_panels_follow_the_suite() {
        let ok = CaseResult {
            group: "g".into(),
            server: "ours".into(),
            status: "ok".into(),
            p99_us: spread(2_000.0),
            success_pct: spread(33.0),
            peak_rss_mib: Some(12.0),
            ..CaseResult::default()
        };
        let gone = CaseResult {
            group: "g".into(),
            server: "peer".into(),
            status: "not available: no flag".into(),
            p99_us: spread(1.0),
            ..CaseResult::default()
        };
        let mut r = SuiteResult {
            cases: vec![ok, gone],
            chart: vec![
                ChartMetric::SuccessPct,
                ChartMetric::P99,
                ChartMetric::PeakRss,
            ],
            ..SuiteResult::default()
        };
        let p = suite_panels(&r);
        assert_eq!(p.len(), 3);
        assert!(p[0].title.contains("2xx"));
        assert_eq!(p[1].bars[0].value.unwrap().median, 2.0, "p99 in ms");
        assert!(p[1].bars[0].ours && !p[1].bars[1].ours);
        assert!(
            p[1].bars[1].value.is_none(),
            "an unavailable case draws no bar"
        );
        assert_eq!(p[2].bars[0].value.unwrap().median, 12.0);
        r.chart.clear();
        let p = suite_panels(&r);
        assert_eq!(p.len(), 2);
        assert!(p[0].title.starts_with("requests/s"));
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
