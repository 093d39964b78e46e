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
    /// `--sweep`: latency against offered load instead of the workloads.
    pub sweep: bool,
}

/// One server's results.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub server: String,
    pub reports: Vec<Report>,
}

/// What a comparison measured, and the servers that would not start.
pub struct Comparison {
    pub rows: Vec<Row>,
    pub failed: Vec<String>,
}

pub fn run(cfg: &CompareConfig) -> anyhow::Result<Comparison> {
    let mut rows = Vec::new();
    let failed = each_server(cfg, |name, server| {
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
        rows.push(Row {
            server: name.to_string(),
            reports,
        });
    });
    Ok(Comparison { rows, failed })
}

/// Starts each server of the comparison in turn (the models, then the
/// --server commands; a model this machine cannot run is skipped), hands
/// it to `measure`, and stops it. Returns those that would not start.
pub(super) fn each_server(
    cfg: &CompareConfig,
    mut measure: impl FnMut(&str, &Running),
) -> Vec<String> {
    let mut failed = Vec::new();
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
        if let Target::Model(m) = target
            && !m.runs_here()
        {
            // Not a failure: this machine does not allow io_uring.
            eprintln!("   {name}: not available on this machine, skipped");
            continue;
        }
        let pin = cfg.base.pin.as_ref().map(|p| p.server.as_slice());
        match Running::start(&target, cfg.base.mode, cfg.base.framing, pin) {
            Ok(server) => measure(&name, &server),
            Err(e) => {
                eprintln!("   {name}: cannot start: {e:#}");
                failed.push(name);
            }
        }
    }
    failed
}

enum Target {
    Model(Model),
    Command(String),
}

pub(super) struct Running {
    child: Child,
    pub(super) tcp: Endpoint,
    pub(super) udp: Option<Endpoint>,
}

impl Running {
    fn start(
        target: &Target,
        mode: crate::transform::Mode,
        framing: crate::framing::Framing,
        pin: Option<&[usize]>,
    ) -> anyhow::Result<Running> {
        match target {
            Target::Model(m) => {
                // /proc/self/exe still runs this very binary if its file
                // was replaced meanwhile (a rebuild during a long compare).
                let exe = match std::path::Path::new("/proc/self/exe") {
                    p if p.exists() => p.to_path_buf(),
                    _ => std::env::current_exe().context("finding the upcase binary")?,
                };
                let mut child = Command::new(exe);
                child
                    .args(["serve", "--model", m.name(), "-q"])
                    .args(match mode {
                        crate::transform::Mode::Ascii => None,
                        crate::transform::Mode::Utf8 { .. } => Some("--utf8"),
                    })
                    .args(["--framing".to_string(), framing.to_string()])
                    .args(["tcp://127.0.0.1:0", "udp://127.0.0.1:0"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::inherit());
                let mut child = Running::spawn(child, "upcase serve", pin)?;
                let out = child.child.stdout.take().context("server stdout")?;
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
                child.tcp = eps[0].clone();
                child.udp = Some(eps[1].clone());
                Ok(child)
            }
            Target::Command(cmd) => {
                let port = std::net::TcpListener::bind("127.0.0.1:0")?
                    .local_addr()?
                    .port();
                let cmd = cmd.replace("{port}", &port.to_string());
                let mut sh = Command::new("sh");
                sh.args(["-c", &format!("exec {cmd}")])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::inherit());
                let mut child = Running::spawn(sh, &cmd, pin)?;
                child.tcp = format!("127.0.0.1:{port}").parse()?;
                let deadline = Instant::now() + Duration::from_secs(10);
                while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                    if let Ok(Some(status)) = child.child.try_wait() {
                        bail!("{cmd} exited ({status}) without listening on port {port}");
                    }
                    if Instant::now() > deadline {
                        // `child` is stopped as it drops.
                        bail!("{cmd} did not listen on port {port} within 10 s");
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Ok(child)
            }
        }
    }

    pub(super) fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Starts `cmd` so that it cannot outlive us: it gets SIGTERM when this
    /// process dies, however it dies, and is stopped when dropped.
    fn spawn(mut cmd: Command, what: &str, pin: Option<&[usize]>) -> anyhow::Result<Running> {
        use std::os::unix::process::CommandExt;
        let cpus = pin.map(<[usize]>::to_vec);
        // SAFETY: prctl and sched_setaffinity are async-signal-safe system
        // calls; the CPU list was built before fork and is only read.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(cpus) = &cpus {
                    super::proc::pin_self(cpus)?;
                }
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("spawning {what}"))?;
        Ok(Running {
            child,
            tcp: "127.0.0.1:1".parse().expect("literal"),
            udp: None,
        })
    }

    fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: signalling our own child, not yet reaped.
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

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
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
        head.push(format!(
            "{n} srv cores (user+sys us, ctx switches, per unit)"
        ));
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
                    r.and_then(|r| r.service_demand.as_ref()),
                ) {
                    (Some(c), Some(d)) => format!(
                        "{c:.2} ({:.1}+{:.1} us, {:.2} cs /{})",
                        d.user_us,
                        d.sys_us,
                        d.ctx_switches,
                        if d.per == "MB" { "MB" } else { "msg" }
                    ),
                    (Some(c), None) => format!("{c:.2}"),
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
    write_files(dir, "compare", &rows, table(rows, workloads), |svg| {
        chart(svg, rows, workloads)
    })
}

/// Writes STEM.json (`value`), STEM.md (`md`) and STEM.svg (by `draw`)
/// into `dir`, and says where: what --compare and --sweep leave behind.
pub(super) fn write_files(
    dir: &std::path::Path,
    stem: &str,
    value: &impl Serialize,
    md: String,
    draw: impl FnOnce(&std::path::Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = dir.join(format!("{stem}.json"));
    std::fs::write(&json, serde_json::to_string_pretty(value)?)
        .with_context(|| format!("writing {}", json.display()))?;
    let md_path = dir.join(format!("{stem}.md"));
    std::fs::write(&md_path, md).with_context(|| format!("writing {}", md_path.display()))?;
    let svg = dir.join(format!("{stem}.svg"));
    draw(&svg).with_context(|| format!("drawing {}", svg.display()))?;
    eprintln!(
        "wrote {}, {} and {}",
        json.display(),
        md_path.display(),
        svg.display()
    );
    Ok(())
}

/// "300k", "1.2M": axis numbers a reader takes in at a glance.
pub(super) fn human(v: f64) -> String {
    match v.abs() {
        a if a >= 1e6 => format!("{:.1}M", v / 1e6),
        a if a >= 1e4 => format!("{:.0}k", v / 1e3),
        a if a >= 1e3 => format!("{:.1}k", v / 1e3),
        _ => format!("{v:.0}"),
    }
}

/// One server's bar in a panel.
struct Bar {
    server: String,
    value: f64,
    p99: Option<f64>,
    kind: Kind,
    /// "k/N served" when only some connections got replies.
    served: Option<String>,
}

/// What kind of bar a server gets, for its colour and the legend.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Model,
    Outside,
    Partial,
}

/// Draws the comparison as an SVG: one panel per workload, a bar per
/// server for its throughput, and its p99 latency written on the bar.
pub fn chart(path: &std::path::Path, rows: &[Row], workloads: &[Workload]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    use plotters::style::text_anchor::{HPos, Pos, VPos};

    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing {}: {e}", path.display());
    let panels: Vec<Workload> = workloads.to_vec();
    let height = 340 * panels.len().max(1) as u32;
    let root = SVGBackend::new(path, (960, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let areas = root.split_evenly((panels.len().max(1), 1));
    for (area, w) in areas.iter().zip(&panels) {
        let bars: Vec<Bar> = rows
            .iter()
            .filter_map(|row| {
                let r = row.reports.iter().find(|r| r.workload == *w)?;
                let value = if *w == Workload::Stream {
                    r.mb_per_s
                } else {
                    r.msgs_per_s
                };
                let outside = !Model::ALL.iter().any(|m| m.name() == row.server);
                let partial = r.unserved() > 0;
                let kind = match (partial, outside) {
                    (true, _) => Kind::Partial,
                    (false, true) => Kind::Outside,
                    (false, false) => Kind::Model,
                };
                let served = partial.then(|| format!("{}/{} served", r.conns_served, r.conns));
                Some(Bar {
                    server: row.server.clone(),
                    value,
                    p99: r.latency_us.as_ref().map(|l| l.p99),
                    kind,
                    served,
                })
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
        let top = bars.iter().map(|b| b.value).fold(0.0, f64::max).max(1.0) * 1.2;
        let mut chart = ChartBuilder::on(area)
            .caption(
                if bars.iter().any(|b| b.p99.is_some()) {
                    format!(
                        "{}: {unit}, higher is better (p99 latency above each bar)",
                        w.name()
                    )
                } else {
                    format!("{}: {unit}, higher is better", w.name())
                },
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d((0..bars.len() - 1).into_segmented(), 0.0..top)
            .map_err(|e| err(&e))?;
        let names: Vec<String> = bars.iter().map(|b| b.server.clone()).collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(bars.len())
            .x_desc("server")
            .y_desc(unit)
            .y_label_formatter(&|v| human(*v))
            .x_label_formatter(&|x| match x {
                SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .draw()
            .map_err(|e| err(&e))?;
        for (kind, color, label) in [
            (Kind::Model, RGBColor(40, 100, 180), "upcase model"),
            (
                Kind::Outside,
                RGBColor(160, 160, 160),
                "outside server (--server)",
            ),
            (
                Kind::Partial,
                RGBColor(230, 140, 40),
                "served only some clients (k/N on the bar)",
            ),
        ] {
            if !bars.iter().any(|b| b.kind == kind) {
                continue;
            }
            chart
                .draw_series(bars.iter().enumerate().filter(|(_, b)| b.kind == kind).map(
                    |(i, b)| {
                        let mut bar = Rectangle::new(
                            [
                                (SegmentValue::Exact(i), 0.0),
                                (SegmentValue::Exact(i + 1), b.value),
                            ],
                            color.filled(),
                        );
                        bar.set_margin(0, 0, 10, 10);
                        bar
                    },
                ))
                .map_err(|e| err(&e))?
                .label(label)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                });
        }
        chart
            .draw_series(bars.iter().enumerate().filter_map(|(i, b)| {
                let label = match (b.p99, &b.served) {
                    (Some(p), Some(s)) => format!("{p:.0} us, {s}"),
                    (Some(p), None) => format!("{p:.0} us"),
                    (None, Some(s)) => s.clone(),
                    (None, None) => return None,
                };
                let style = ("sans-serif", 12)
                    .into_font()
                    .into_text_style(area)
                    .pos(Pos::new(HPos::Center, VPos::Bottom));
                Some(Text::new(
                    label,
                    (SegmentValue::CenterOf(i), b.value + top * 0.01),
                    style,
                ))
            }))
            .map_err(|e| err(&e))?;
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
