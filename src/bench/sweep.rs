//! `bench --compare --sweep`: latency against offered load.
//!
//! A model's peak rate says little about how it behaves below the peak,
//! where servers spend their lives. For each server this measures its
//! capacity (closed-loop rr), then offers it 10 % to 120 % of that as an
//! open-loop rate and records what it achieved and its p50 and p99 latency,
//! counted from each request's scheduled time (no coordinated omission).
//! The chart shows each model's knee: where p99 leaves the floor.

use std::path::Path;

use serde::Serialize;

use super::compare::{CompareConfig, each_server};
use super::{BenchConfig, Workload};

/// The offered loads, as fractions of the measured capacity.
pub const FRACTIONS: [f64; 12] = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2];

/// One point of one server's curve.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    pub server: String,
    pub fraction: f64,
    pub offered: f64,
    pub achieved: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub errors: u64,
}

/// Sweeps every server; returns the points and the servers that would not
/// start.
pub fn run(cfg: &CompareConfig) -> (Vec<Point>, Vec<String>) {
    let mut points = Vec::new();
    let failed = each_server(cfg, |name, server| {
        let base = BenchConfig {
            endpoint: server.tcp.clone(),
            workload: Workload::Rr,
            conns: cfg.conns.unwrap_or_else(|| Workload::Rr.default_conns()),
            server_pid: Some(server.pid()),
            rate: None,
            ..cfg.base.clone()
        };
        let capacity = match super::run(&base) {
            Ok(r) if r.errors == 0 && r.msgs_per_s > 0.0 => r.msgs_per_s,
            Ok(r) => {
                eprintln!(
                    "   {name}: no clean capacity run ({} errors), skipped",
                    r.errors
                );
                return;
            }
            Err(e) => {
                eprintln!("   {name}: capacity run failed: {e:#}");
                return;
            }
        };
        eprintln!("   capacity {capacity:.0} msg/s");
        for f in FRACTIONS {
            let bc = BenchConfig {
                rate: Some(capacity * f),
                ..base.clone()
            };
            match super::run(&bc) {
                Ok(r) => {
                    let (p50, p99) = r.latency_us.as_ref().map_or((0.0, 0.0), |l| (l.p50, l.p99));
                    eprintln!(
                        "   {:>4.0} %: offered {:.0}, achieved {:.0} msg/s, p50 {p50:.0} us, p99 {p99:.0} us",
                        f * 100.0,
                        capacity * f,
                        r.msgs_per_s
                    );
                    points.push(Point {
                        server: name.to_string(),
                        fraction: f,
                        offered: capacity * f,
                        achieved: r.msgs_per_s,
                        p50_us: p50,
                        p99_us: p99,
                        errors: r.errors,
                    });
                }
                Err(e) => eprintln!("   {name}: {:.0} % failed: {e:#}", f * 100.0),
            }
        }
    });
    (points, failed)
}

/// The points as a Markdown table.
pub fn table(points: &[Point]) -> String {
    let mut out = String::from(
        "| server | offered % | offered msg/s | achieved msg/s | p50 us | p99 us | errors |\n|---|---|---|---|---|---|---|\n",
    );
    for p in points {
        out.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} |\n",
            p.server,
            p.fraction * 100.0,
            p.offered,
            p.achieved,
            p.p50_us,
            p.p99_us,
            p.errors
        ));
    }
    out
}

/// Writes sweep.json, sweep.md and sweep.svg into `dir`.
pub fn write_out(dir: &Path, points: &[Point]) -> anyhow::Result<()> {
    super::compare::write_files(dir, "sweep", &points, table(points), |svg| {
        chart(svg, points)
    })
}

/// p99 (solid, with dots) and p50 (thin) latency against offered load, a
/// curve per server, latency on a log axis.
fn chart(path: &Path, points: &[Point]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("{e}");
    let mut servers: Vec<&str> = Vec::new();
    for p in points {
        if !servers.contains(&p.server.as_str()) {
            servers.push(&p.server);
        }
    }
    let x_max = points.iter().map(|p| p.offered).fold(1.0, f64::max) * 1.05;
    let lat = |p: &Point| [p.p50_us, p.p99_us];
    let y_max = points.iter().flat_map(lat).fold(10.0, f64::max) * 2.0;
    let y_min = points
        .iter()
        .flat_map(lat)
        .filter(|v| *v > 0.0)
        .fold(f64::MAX, f64::min)
        .min(y_max / 10.0)
        / 2.0;
    let root = SVGBackend::new(path, (960, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "rr latency against offered load (open loop; p99 thick with dots, p50 thin)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max, (y_min.max(0.1)..y_max).log_scale())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("offered load, messages/s")
        .y_desc("latency, us (log)")
        .x_label_formatter(&|v| super::compare::human(*v))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, server) in servers.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let mine: Vec<&Point> = points.iter().filter(|p| p.server == *server).collect();
        chart
            .draw_series(LineSeries::new(
                mine.iter().map(|p| (p.offered, p.p99_us.max(y_min))),
                color.stroke_width(3),
            ))
            .map_err(|e| err(&e))?
            .label(*server)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color.stroke_width(3)));
        chart
            .draw_series(
                mine.iter()
                    .map(|p| Circle::new((p.offered, p.p99_us.max(y_min)), 3, color.filled())),
            )
            .map_err(|e| err(&e))?;
        chart
            .draw_series(LineSeries::new(
                mine.iter().map(|p| (p.offered, p.p50_us.max(y_min))),
                color.stroke_width(1),
            ))
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
