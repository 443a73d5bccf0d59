//! Results: min/median/max per configuration, ratios against the reference, JSON and a PNG.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde::Serialize;

/// Spread of repeated measurements.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Stat {
    /// Smallest.
    pub min: f64,
    /// Median.
    pub median: f64,
    /// Largest.
    pub max: f64,
}

impl Stat {
    /// Of a non-empty list.
    pub fn of(v: &[f64]) -> Option<Stat> {
        if v.is_empty() {
            return None;
        }
        let mut s = v.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        let n = s.len();
        let median = if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        };
        Some(Stat {
            min: s[0],
            median,
            max: s[n - 1],
        })
    }
}

/// A summarized configuration; `metrics` holds a Stat per measured quantity.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// What ran (`nvme`, `ahci`, `fio`, `qsd-vhost-user-blk`, …).
    pub target: String,
    /// Its backend or variant.
    pub backend: String,
    /// The workload.
    pub workload: String,
    /// Quantity → spread over the repetitions.
    pub metrics: BTreeMap<String, Stat>,
    /// Median ratios against the reference row of the same workload.
    pub vs_reference: BTreeMap<String, f64>,
}

/// Group samples (as JSON objects with `target`, `backend`, `workload` and numeric fields)
/// into rows, with ratios against the row whose target is `reference`.
pub fn summarize(samples: &[serde_json::Value], reference: &str) -> Vec<Row> {
    let mut groups: BTreeMap<(String, String, String), Vec<&serde_json::Value>> = BTreeMap::new();
    let mut order = Vec::new();
    for s in samples {
        let key = (
            s["workload"].as_str().unwrap_or("").to_string(),
            s["target"].as_str().unwrap_or("").to_string(),
            s["backend"].as_str().unwrap_or("").to_string(),
        );
        if !groups.contains_key(&key) {
            order.push(key.clone());
        }
        groups.entry(key).or_default().push(s);
    }
    let mut rows: Vec<Row> = order
        .iter()
        .map(|key| {
            let ss = &groups[key];
            let mut metrics = BTreeMap::new();
            if let Some(obj) = ss[0].as_object() {
                for (k, v) in obj {
                    if v.is_number() && k != "rep" {
                        let vals: Vec<f64> = ss.iter().filter_map(|s| s[k].as_f64()).collect();
                        if let Some(st) = Stat::of(&vals) {
                            metrics.insert(k.clone(), st);
                        }
                    }
                }
            }
            Row {
                workload: key.0.clone(),
                target: key.1.clone(),
                backend: key.2.clone(),
                metrics,
                vs_reference: BTreeMap::new(),
            }
        })
        .collect();
    let refs: Vec<Row> = rows
        .iter()
        .filter(|r| r.target == reference)
        .cloned()
        .collect();
    for r in rows.iter_mut().filter(|r| r.target != reference) {
        if let Some(base) = refs.iter().find(|b| b.workload == r.workload) {
            for (k, st) in &r.metrics {
                if let Some(b) = base.metrics.get(k).filter(|b| b.median > 0.0) {
                    r.vs_reference.insert(k.clone(), st.median / b.median);
                }
            }
        }
    }
    rows
}

/// Print rows as a table.
pub fn print(rows: &[Row], metrics: &[&str]) {
    for r in rows {
        let mut line = format!("{:20} {:6} {:20}", r.workload, r.target, r.backend);
        for m in metrics {
            if let Some(s) = r.metrics.get(*m) {
                line += &format!("  {m} {:.2} [{:.2}..{:.2}]", s.median, s.min, s.max);
                if let Some(x) = r.vs_reference.get(*m) {
                    line += &format!(" ({x:.2}x)");
                }
            }
        }
        println!("{line}");
    }
}

/// Write `value` as pretty JSON.
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// A bar chart of `metric`'s median ratio to the reference, one group per workload and one bar
/// per configuration. Needs the DejaVu font (Debian fonts-dejavu-core).
pub fn chart(path: &Path, title: &str, rows: &[Row], metrics: &[(&str, &str)]) -> Result<()> {
    let font = std::fs::read(FONT)
        .with_context(|| format!("{FONT} (apt-get install fonts-dejavu-core)"))?;
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, font);
    let mut workloads: Vec<&str> = Vec::new();
    let mut series: Vec<String> = Vec::new();
    for r in rows.iter().filter(|r| !r.vs_reference.is_empty()) {
        if !workloads.contains(&r.workload.as_str()) {
            workloads.push(&r.workload);
        }
        let s = format!("{} {}", r.target, r.backend);
        if !series.contains(&s) {
            series.push(s);
        }
    }
    let root = BitMapBackend::new(path, (1200, 420 * metrics.len() as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((metrics.len(), 1));
    let colors = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
    ];
    for (area, (metric, label)) in areas.iter().zip(metrics) {
        let ymax = rows
            .iter()
            .filter_map(|r| r.vs_reference.get(*metric))
            .fold(1.2f64, |a, &b| a.max(b * 1.15));
        let nw = workloads.len().max(1);
        let ns = series.len().max(1);
        let mut c = ChartBuilder::on(area)
            .caption(format!("{title}: {label}"), ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..nw as f64, 0f64..ymax)?;
        c.configure_mesh()
            .disable_x_mesh()
            .x_labels(nw)
            .x_label_formatter(&|x| {
                let i = (*x - 0.5).round() as usize;
                workloads.get(i).map(|s| s.to_string()).unwrap_or_default()
            })
            .y_desc("ratio (1.0 = reference)")
            .draw()?;
        c.draw_series(std::iter::once(PathElement::new(
            vec![(0.0, 1.0), (nw as f64, 1.0)],
            BLACK.stroke_width(1),
        )))?;
        for (si, s) in series.iter().enumerate() {
            let color = colors[si % colors.len()];
            let bars: Vec<_> = rows
                .iter()
                .filter(|r| &format!("{} {}", r.target, r.backend) == s)
                .filter_map(|r| {
                    let wi = workloads.iter().position(|w| *w == r.workload)?;
                    let v = *r.vs_reference.get(*metric)?;
                    let x0 = wi as f64 + 0.1 + 0.8 * si as f64 / ns as f64;
                    let x1 = x0 + 0.8 / ns as f64;
                    Some(Rectangle::new([(x0, 0.0), (x1, v)], color.filled()))
                })
                .collect();
            c.draw_series(bars)?.label(s.clone()).legend(move |(x, y)| {
                Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled())
            });
        }
        c.configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
