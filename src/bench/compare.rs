//! `upcase bench --compare`: the same workloads against every server model
//! (each started as `upcase serve --model M` on port 0) and against outside
//! servers (`--server 'COMMAND {port}'`), one after the other, in one table.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use super::{BenchConfig, Report, Workload};
use crate::addr::Endpoint;
use crate::server::Model;

#[derive(Debug, Clone)]
pub struct CompareConfig {
    pub models: Vec<Model>,
    /// (name, command with `{port}`).
    pub servers: Vec<(String, String)>,
    pub workloads: Vec<Workload>,
    /// Template for every run: duration, size, rate, threads, ...
    pub base: BenchConfig,
    /// Connections per workload; `None`: each workload's default.
    pub conns: Option<usize>,
    pub out: Option<PathBuf>,
}

/// One server's results.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub server: String,
    pub reports: Vec<Report>,
}

pub fn run(cfg: &CompareConfig) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let mut targets: Vec<(String, Target)> = cfg
        .models
        .iter()
        .map(|m| (m.name().to_string(), Target::Model(*m)))
        .collect();
    targets.extend(
        cfg.servers
            .iter()
            .map(|(name, cmd)| (name.clone(), Target::Command(cmd.clone()))),
    );
    for (name, target) in targets {
        eprintln!("== {name}");
        let server = match Running::start(&target, cfg.base.mode, cfg.base.framing) {
            Ok(s) => s,
            Err(e) => {
                // A model this machine cannot run (io_uring) is skipped.
                eprintln!("   {name}: cannot start, skipped: {e:#}");
                continue;
            }
        };
        let mut reports = Vec::new();
        for &w in &cfg.workloads {
            let endpoint = match (w, &server.udp) {
                (Workload::Udp, Some(u)) => u.clone(),
                (Workload::Udp, None) => {
                    eprintln!("   {name}: no UDP listener, skipping udp");
                    continue;
                }
                _ => server.tcp.clone(),
            };
            let bc = BenchConfig {
                endpoint,
                workload: w,
                conns: cfg.conns.unwrap_or_else(|| w.default_conns()),
                server_pid: Some(server.pid()),
                ..cfg.base.clone()
            };
            // One failed workload is reported; the comparison goes on.
            match super::run(&bc) {
                Ok(r) => {
                    eprintln!("   {}", summary(&r));
                    reports.push(r);
                }
                Err(e) => eprintln!("   {name}: {} failed: {e:#}", w.name()),
            }
        }
        server.stop();
        rows.push(Row {
            server: name,
            reports,
        });
    }
    Ok(rows)
}

enum Target {
    Model(Model),
    Command(String),
}

struct Running {
    child: Child,
    tcp: Endpoint,
    udp: Option<Endpoint>,
}

impl Running {
    fn start(
        target: &Target,
        mode: crate::transform::Mode,
        framing: crate::framing::Framing,
    ) -> anyhow::Result<Running> {
        match target {
            Target::Model(m) => {
                // /proc/self/exe still runs this very binary if its file
                // was replaced meanwhile (a rebuild during a long compare).
                let exe = match std::path::Path::new("/proc/self/exe") {
                    p if p.exists() => p.to_path_buf(),
                    _ => std::env::current_exe().context("finding the upcase binary")?,
                };
                let mut child = Command::new(exe)
                    .args(["serve", "--model", m.name(), "-q"])
                    .args(match mode {
                        crate::transform::Mode::Ascii => None,
                        crate::transform::Mode::Utf8 { .. } => Some("--utf8"),
                    })
                    .args(["--framing".to_string(), framing.to_string()])
                    .args(["tcp://127.0.0.1:0", "udp://127.0.0.1:0"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::inherit())
                    .spawn()
                    .context("spawning upcase serve")?;
                let out = child.stdout.take().context("server stdout")?;
                let mut lines = BufReader::new(out).lines();
                let mut eps = Vec::new();
                while eps.len() < 2 {
                    let line = lines
                        .next()
                        .context("the server exited before listening")??;
                    let ep = line
                        .strip_prefix("listening ")
                        .with_context(|| format!("unexpected server output {line:?}"))?;
                    eps.push(ep.parse::<Endpoint>()?);
                }
                Ok(Running {
                    child,
                    tcp: eps[0].clone(),
                    udp: Some(eps[1].clone()),
                })
            }
            Target::Command(cmd) => {
                let port = std::net::TcpListener::bind("127.0.0.1:0")?
                    .local_addr()?
                    .port();
                let cmd = cmd.replace("{port}", &port.to_string());
                let child = Command::new("sh")
                    .args(["-c", &format!("exec {cmd}")])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::inherit())
                    .spawn()
                    .with_context(|| format!("spawning {cmd}"))?;
                let tcp: Endpoint = format!("127.0.0.1:{port}").parse()?;
                let deadline = Instant::now() + Duration::from_secs(10);
                while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                    if Instant::now() > deadline {
                        bail!("{cmd} did not listen on port {port} within 10 s");
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Ok(Running {
                    child,
                    tcp,
                    udp: None,
                })
            }
        }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn stop(mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn summary(r: &Report) -> String {
    let p99 = r
        .latency_us
        .as_ref()
        .map_or(String::new(), |l| format!(", p99 {:.0} us", l.p99));
    format!(
        "{}: {:.1} MB/s, {:.0} msg/s{p99}, errors {}",
        r.workload.name(),
        r.mb_per_s,
        r.msgs_per_s,
        r.errors
    )
}

/// The side-by-side table (Markdown, so it pastes into docs as it is).
pub fn table(rows: &[Row], workloads: &[Workload]) -> String {
    let mut head = vec!["server".to_string()];
    for w in workloads {
        let n = w.name();
        match w {
            Workload::Stream => head.push(format!("{n} MB/s")),
            Workload::Rr | Workload::Hold => {
                head.push(format!("{n} msg/s"));
                head.push(format!("{n} p99 us"));
            }
            Workload::Crr => {
                head.push(format!("{n} conn/s"));
                head.push(format!("{n} p99 us"));
            }
            Workload::Udp => {
                head.push(format!("{n} dgram/s"));
                head.push(format!("{n} lost"));
            }
        }
        if *w == Workload::Hold {
            head.push("hold B/conn".into());
        }
        head.push(format!("{n} srv cpu"));
    }
    let mut out = format!("| {} |\n|{}\n", head.join(" | "), "---|".repeat(head.len()));
    for row in rows {
        let mut cells = vec![row.server.clone()];
        for w in workloads {
            let r = row.reports.iter().find(|r| r.workload == *w);
            let p99 = |r: &Report| {
                r.latency_us
                    .as_ref()
                    .map_or("-".into(), |l| format!("{:.0}", l.p99))
            };
            let bad = |r: &Report, s: String| {
                let s = if r.conns_served < r.conns && r.workload != Workload::Hold {
                    format!("{s} ({}/{} served)", r.conns_served, r.conns)
                } else {
                    s
                };
                if r.errors > 0 {
                    format!("{s} ({} errors)", r.errors)
                } else {
                    s
                }
            };
            match (w, r) {
                (_, None) => {
                    let n = match w {
                        Workload::Stream => 2,
                        Workload::Hold => 4,
                        _ => 3,
                    };
                    cells.extend(std::iter::repeat_n("-".to_string(), n));
                    continue;
                }
                (Workload::Stream, Some(r)) => cells.push(bad(r, format!("{:.0}", r.mb_per_s))),
                (Workload::Udp, Some(r)) => {
                    cells.push(bad(r, format!("{:.0}", r.msgs_per_s)));
                    cells.push(r.lost.to_string());
                }
                (_, Some(r)) => {
                    cells.push(bad(r, format!("{:.0}", r.msgs_per_s)));
                    cells.push(p99(r));
                }
            }
            if let (Workload::Hold, Some(r)) = (w, r) {
                cells.push(
                    r.server_bytes_per_held_conn
                        .map_or("-".into(), |b| format!("{b:.0}")),
                );
            }
            // For message workloads, also the server's CPU per message: what
            // a server saves shows here even when the client is the limit.
            cells.push(
                match (
                    r.and_then(|r| r.server_cpu),
                    r.and_then(|r| r.server_us_per_msg),
                ) {
                    (Some(c), Some(us)) if *w != Workload::Stream => {
                        format!("{c:.2} ({us:.1} us/msg)")
                    }
                    (Some(c), _) => format!("{c:.2}"),
                    _ => "-".into(),
                },
            );
        }
        out.push_str(&format!("| {} |\n", cells.join(" | ")));
    }
    out
}

/// Writes compare.json, the table as compare.md, and compare.svg into `dir`.
pub fn write_out(
    dir: &std::path::Path,
    rows: &[Row],
    workloads: &[Workload],
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = dir.join("compare.json");
    std::fs::write(&json, serde_json::to_string_pretty(rows)?)
        .with_context(|| format!("writing {}", json.display()))?;
    let md = dir.join("compare.md");
    std::fs::write(&md, table(rows, workloads))
        .with_context(|| format!("writing {}", md.display()))?;
    let svg = dir.join("compare.svg");
    chart(&svg, rows, workloads).with_context(|| format!("drawing {}", svg.display()))?;
    eprintln!(
        "wrote {}, {} and {}",
        json.display(),
        md.display(),
        svg.display()
    );
    Ok(())
}

/// Draws the comparison as an SVG: one panel per workload, a bar per
/// server for its throughput, and its p99 latency written on the bar.
pub fn chart(path: &std::path::Path, rows: &[Row], workloads: &[Workload]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    use plotters::style::text_anchor::{HPos, Pos, VPos};

    let panels: Vec<Workload> = workloads.to_vec();
    let height = 320 * panels.len().max(1) as u32;
    let root = SVGBackend::new(path, (960, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let areas = root.split_evenly((panels.len().max(1), 1));
    for (area, w) in areas.iter().zip(&panels) {
        let bars: Vec<(String, f64, Option<f64>)> = rows
            .iter()
            .filter_map(|row| {
                let r = row.reports.iter().find(|r| r.workload == *w)?;
                let value = if *w == Workload::Stream {
                    r.mb_per_s
                } else {
                    r.msgs_per_s
                };
                Some((
                    row.server.clone(),
                    value,
                    r.latency_us.as_ref().map(|l| l.p99),
                ))
            })
            .collect();
        if bars.is_empty() {
            continue;
        }
        let unit = match w {
            Workload::Stream => "MB/s",
            Workload::Crr => "connections/s",
            Workload::Udp => "datagrams/s",
            _ => "messages/s",
        };
        let top = bars.iter().map(|b| b.1).fold(0.0, f64::max).max(1.0) * 1.15;
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!("{} ({unit}; p99 latency on the bars)", w.name()),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(70)
            .build_cartesian_2d((0..bars.len() - 1).into_segmented(), 0.0..top)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let names: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(bars.len())
            .x_label_formatter(&|x| match x {
                SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .draw_series(bars.iter().enumerate().map(|(i, b)| {
                let color = if b.0.starts_with("baseline") || b.0.starts_with("python") {
                    RGBColor(160, 160, 160)
                } else {
                    RGBColor(40, 100, 180)
                };
                let mut bar = Rectangle::new(
                    [
                        (SegmentValue::Exact(i), 0.0),
                        (SegmentValue::Exact(i + 1), b.1),
                    ],
                    color.filled(),
                );
                bar.set_margin(0, 0, 10, 10);
                bar
            }))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .draw_series(bars.iter().enumerate().filter_map(|(i, b)| {
                let label = b.2.map(|p| format!("{p:.0} us"))?;
                let style = ("sans-serif", 12)
                    .into_font()
                    .into_text_style(area)
                    .pos(Pos::new(HPos::Center, VPos::Bottom));
                Some(Text::new(
                    label,
                    (SegmentValue::CenterOf(i), b.1 + top * 0.01),
                    style,
                ))
            }))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}
