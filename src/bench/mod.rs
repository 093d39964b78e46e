//! `upcase bench`: a load generator that verifies every reply.
//!
//! The workloads ([`Workload`]) run on `--threads` event loops
//! ([`load`], [`udp`]); this module splits the connections among them,
//! prints an interval line every second on stderr (as iperf3 does), and
//! gathers one [`Report`]: throughput, latency percentiles from an
//! hdrhistogram, the client's CPU use and, when the server's process is
//! known, the server's CPU and memory. [`compare`] runs the same workloads
//! against every server model side by side.

pub mod compare;
pub mod hold;
pub mod load;
pub mod proc;
pub mod sweep;
mod threads;
pub mod udp;
mod uring;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::addr::Endpoint;
use crate::net::{MioStream, SockOpts};
use load::{Job, Live, ThreadResult};

/// What the load generator does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Each connection streams without pause; MB/s.
    Stream,
    /// Request/response on open connections; messages/s and latency.
    Rr,
    /// Connect, one request/response, close; connections/s and latency.
    Crr,
    /// Datagram request/response; datagrams/s, loss and latency.
    Udp,
    /// Hold --conns idle connections while --active connections run rr.
    Hold,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Stream => "stream",
            Workload::Rr => "rr",
            Workload::Crr => "crr",
            Workload::Udp => "udp",
            Workload::Hold => "hold",
        }
    }

    /// Connections used when none are given.
    pub fn default_conns(self) -> usize {
        match self {
            Workload::Stream | Workload::Udp => 1,
            Workload::Rr | Workload::Crr => 50,
            Workload::Hold => 10_000,
        }
    }
}

/// How the load generator waits on its connections (rr and hold).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// io_uring where the kernel has it, else epoll.
    #[default]
    Auto,
    /// One mio (epoll) loop per thread.
    Epoll,
    /// One io_uring per thread: multishot receives, batched sends.
    Uring,
    /// A blocking thread per connection (rr only): a client of another
    /// design, to check that a ranking is not the engine's artefact; the
    /// one that speaks TLS.
    Threads,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Auto => "auto",
            Engine::Epoll => "epoll",
            Engine::Uring => "uring",
            Engine::Threads => "threads",
        }
    }

    /// The engine a workload runs on here: only rr (and hold, which runs
    /// rr) has an io_uring engine.
    pub fn resolve(self, workload: Workload, tls: bool) -> anyhow::Result<Engine> {
        let rr = matches!(workload, Workload::Rr | Workload::Hold);
        if tls {
            if workload != Workload::Rr {
                anyhow::bail!(
                    "over TLS, bench runs rr (on --engine threads); for a stream, `upcase send tls://... --bytes N`"
                );
            }
            return Ok(Engine::Threads);
        }
        Ok(match self {
            Engine::Threads if workload != Workload::Rr => {
                anyhow::bail!("--engine threads runs rr")
            }
            Engine::Threads => Engine::Threads,
            // With --compare, the other workloads run on epoll.
            Engine::Uring if !rr => Engine::Epoll,
            Engine::Uring if !uring::available() => {
                anyhow::bail!(
                    "--engine uring: this kernel does not offer io_uring with buffer rings"
                )
            }
            Engine::Auto if rr && uring::available() => Engine::Uring,
            Engine::Auto | Engine::Epoll => Engine::Epoll,
            Engine::Uring => Engine::Uring,
        })
    }
}

/// Everything one bench run needs, validated.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub endpoint: Endpoint,
    pub workload: Workload,
    pub conns: usize,
    /// hold: connections running rr while the others are held.
    pub active: usize,
    pub duration: Duration,
    pub size: usize,
    /// Total requests per second (open loop), or closed loop.
    pub rate: Option<f64>,
    pub threads: usize,
    /// UDP: how long to wait for a reply before counting it lost.
    pub timeout: Duration,
    pub sockopts: SockOpts,
    /// The server's process, for its CPU and memory (optional).
    pub server_pid: Option<i32>,
    /// Print a line a second on stderr.
    pub intervals: bool,
    /// The server's transform (`--utf8` sends UTF-8 text).
    pub mode: crate::transform::Mode,
    /// The server's `--framing`, for rr and crr: each request is one
    /// message in it (or `pipeline` of them, back to back).
    pub framing: crate::framing::Framing,
    pub pipeline: usize,
    pub engine: Engine,
    /// `--pin`: the CPUs of the server (given by --server-pid, or started
    /// by --compare) and of the load generator.
    pub pin: Option<proc::Pin>,
}

/// Latency percentiles, in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

/// The result of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub workload: Workload,
    /// The load generator's engine (epoll or uring).
    pub engine: Engine,
    pub endpoint: String,
    pub conns: usize,
    pub size: usize,
    pub rate: Option<f64>,
    pub seconds: f64,
    pub bytes: u64,
    pub messages: u64,
    pub errors: u64,
    pub lost: u64,
    pub mb_per_s: f64,
    pub msgs_per_s: f64,
    /// stream: slowest and fastest connection, MB/s.
    pub conn_mb_per_s_min: Option<f64>,
    pub conn_mb_per_s_max: Option<f64>,
    pub latency_us: Option<Latency>,
    /// CPU time over wall time: 1.0 is one core busy.
    pub client_cpu: f64,
    pub server_cpu: Option<f64>,
    /// Server CPU time per message, in microseconds (message workloads).
    pub server_us_per_msg: Option<f64>,
    /// The server's service demand: its CPU (user and system apart) and
    /// context switches per message, or per MB for streams.
    pub service_demand: Option<ServiceDemand>,
    /// Connections that completed at least one message (rr, crr, udp): a
    /// server that serves only some clients shows here, not in msgs/s.
    pub conns_served: usize,
    /// hold: connections held idle, and the server's memory for each.
    pub held: Option<usize>,
    pub server_bytes_per_held_conn: Option<f64>,
    pub first_error: Option<String>,
}

/// What serving one unit of work cost the server (its threads and
/// children included): on a machine where the kernel does most of the
/// work, a better measure of a design than its rate on shared cores.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceDemand {
    /// "message", or "MB" for streams.
    pub per: &'static str,
    pub user_us: f64,
    pub sys_us: f64,
    pub ctx_switches: f64,
}

impl ServiceDemand {
    fn of(used: proc::Usage, units: f64, per: &'static str) -> Option<ServiceDemand> {
        (units > 0.0).then(|| ServiceDemand {
            per,
            user_us: used.user * 1e6 / units,
            sys_us: used.sys * 1e6 / units,
            ctx_switches: used.ctx_switches as f64 / units,
        })
    }
}

/// Runs one workload against one server.
pub fn run(cfg: &BenchConfig) -> anyhow::Result<Report> {
    probe(cfg)?;
    if let Some(pin) = &cfg.pin {
        // Load threads start after this and inherit it.
        proc::pin_self(&pin.client).context("--pin: the load generator's CPUs")?;
        if let Some(pid) = cfg.server_pid {
            proc::pin_pid(pid, &pin.server).context("--pin: the server's CPUs")?;
        }
    }
    if cfg.workload == Workload::Hold {
        return hold::run(cfg);
    }
    run_load(cfg)
}

/// One round of framed requests, and the replies they must get.
fn framed_round(cfg: &BenchConfig) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    use crate::framing::encode;
    let payload = crate::client::framed::message(cfg.framing, cfg.size);
    let up = crate::transform::apply(cfg.mode, &payload).context("the request pattern")?;
    let (mut req, mut rep) = (Vec::new(), Vec::new());
    for _ in 0..cfg.pipeline.max(1) {
        encode(cfg.framing, &payload, &mut req);
        encode(cfg.framing, &up, &mut rep);
    }
    Ok((req, rep))
}

/// The load itself, once the server answered the probe.
fn run_load(cfg: &BenchConfig) -> anyhow::Result<Report> {
    let engine = cfg.engine.resolve(cfg.workload, cfg.endpoint.is_tls())?;
    let live = Arc::new(Live::default());
    let threads = cfg.threads.clamp(1, cfg.conns.max(1));
    let per_conn_rate = cfg.rate.map(|r| r / cfg.conns as f64);
    let (request, reply) = crate::pattern::Pattern::pair(cfg.mode);
    // UTF-8 requests are whole messages, so no character is cut.
    let (mut req_size, mut reply_size) = match cfg.mode {
        crate::transform::Mode::Utf8 { .. } if cfg.workload != Workload::Udp => {
            let n = cfg.size.div_ceil(request.period());
            (n * request.period(), n * reply.period())
        }
        _ => (cfg.size, cfg.size),
    };
    let (mut request, mut reply) = (request, reply);
    if !cfg.framing.is_stream() && cfg.workload != Workload::Udp {
        // A round is `pipeline` messages of --size, back to back.
        let (req, rep) = framed_round(cfg)?;
        (req_size, reply_size) = (req.len(), rep.len());
        request = crate::pattern::Pattern::repeat(&req);
        reply = crate::pattern::Pattern::repeat(&rep);
    }
    let per_round = if cfg.framing.is_stream() {
        1
    } else {
        cfg.pipeline.max(1) as u64
    };
    let client_before = proc::self_cpu();
    let server_before = cfg.server_pid.and_then(proc::usage);
    let start = Instant::now();
    let deadline = start + cfg.duration;

    let mut handles = Vec::new();
    let mut first = 0;
    for t in 0..threads {
        let n = cfg.conns / threads + usize::from(t < cfg.conns % threads);
        let job = Job {
            workload: cfg.workload,
            endpoint: cfg.endpoint.clone(),
            sockopts: cfg.sockopts.clone(),
            conns: n,
            first,
            total_conns: cfg.conns,
            size: req_size,
            reply_size,
            request: request.clone(),
            reply: reply.clone(),
            mode: cfg.mode,
            per_round,
            per_conn_rate,
            deadline,
        };
        first += n;
        let (live, timeout) = (live.clone(), cfg.timeout);
        let h = std::thread::Builder::new()
            .name(format!("upcase-bench-{t}"))
            .spawn(move || match job.workload {
                Workload::Udp => udp::run(job, timeout, live),
                _ if engine == Engine::Uring => (uring::run(job, live), 0),
                _ if engine == Engine::Threads => (threads::run(job, live), 0),
                _ => (load::run(job, live), 0),
            })
            .context("starting load threads")?;
        handles.push(h);
    }
    if cfg.intervals {
        intervals(&live, start, deadline, cfg.workload);
    }
    let mut results: Vec<(ThreadResult, u64)> = Vec::new();
    for h in handles {
        results.push(
            h.join()
                .map_err(|_| anyhow::anyhow!("a load thread panicked"))?,
        );
    }
    // The measured span ends at the deadline, not after the graceful close.
    let seconds = deadline
        .min(Instant::now())
        .duration_since(start)
        .as_secs_f64();
    let client_cpu = (proc::self_cpu() - client_before) / seconds;
    let server_used = match (server_before, cfg.server_pid.and_then(proc::usage)) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let server_cpu = server_used.map(|u| (u.user + u.sys) / seconds);
    let mut report = summarise(cfg, results, seconds, client_cpu, server_cpu);
    report.engine = engine;
    report.service_demand = server_used.and_then(|u| {
        if report.workload == Workload::Stream {
            ServiceDemand::of(u, report.bytes as f64 / 1e6, "MB")
        } else {
            ServiceDemand::of(u, report.messages as f64, "message")
        }
    });
    Ok(report)
}

fn summarise(
    cfg: &BenchConfig,
    results: Vec<(ThreadResult, u64)>,
    seconds: f64,
    client_cpu: f64,
    server_cpu: Option<f64>,
) -> Report {
    let mut hist = load::new_hist();
    let (mut bytes, mut messages, mut errors, mut lost, mut served) = (0, 0, 0, 0, 0);
    let mut per_conn = Vec::new();
    let mut first_error = None;
    for (r, l) in results {
        let _ = hist.add(&r.hist);
        served += r.served;
        bytes += r.bytes;
        messages += r.messages;
        errors += r.errors;
        lost += l;
        per_conn.extend(r.per_conn);
        if first_error.is_none() {
            first_error = r.first_error;
        }
    }
    let mbps = |b: u64| b as f64 / 1e6 / seconds;
    let stream = cfg.workload == Workload::Stream;
    let us = |ns: u64| ns as f64 / 1000.0;
    let latency_us = (!stream && !hist.is_empty()).then(|| Latency {
        p50: us(hist.value_at_quantile(0.50)),
        p90: us(hist.value_at_quantile(0.90)),
        p99: us(hist.value_at_quantile(0.99)),
        p999: us(hist.value_at_quantile(0.999)),
        max: us(hist.max()),
        mean: hist.mean() / 1000.0,
    });
    Report {
        workload: cfg.workload,
        engine: Engine::Epoll,
        endpoint: cfg.endpoint.to_string(),
        conns: cfg.conns,
        size: cfg.size,
        rate: cfg.rate,
        seconds,
        bytes,
        messages,
        errors,
        lost,
        mb_per_s: mbps(bytes),
        msgs_per_s: messages as f64 / seconds,
        conn_mb_per_s_min: stream
            .then(|| per_conn.iter().copied().min().map(mbps))
            .flatten(),
        conn_mb_per_s_max: stream
            .then(|| per_conn.iter().copied().max().map(mbps))
            .flatten(),
        latency_us,
        conns_served: if stream {
            per_conn.iter().filter(|&&b| b > 0).count()
        } else {
            served
        },
        client_cpu,
        server_cpu,
        server_us_per_msg: server_cpu
            .filter(|_| !stream && messages > 0)
            .map(|c| c * seconds * 1e6 / messages as f64),
        service_demand: None,
        held: None,
        server_bytes_per_held_conn: None,
        first_error,
    }
}

/// One line a second on stderr, until the deadline.
fn intervals(live: &Live, start: Instant, deadline: Instant, workload: Workload) {
    let (mut last_b, mut last_m, mut last_t) = (0u64, 0u64, start);
    while Instant::now() < deadline {
        let next = (last_t + Duration::from_secs(1)).min(deadline);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        let now = Instant::now();
        let (b, m) = (
            live.bytes.load(Ordering::Relaxed),
            live.messages.load(Ordering::Relaxed),
        );
        let dt = now.duration_since(last_t).as_secs_f64().max(1e-9);
        let t0 = last_t.duration_since(start).as_secs_f64();
        let t1 = now.duration_since(start).as_secs_f64();
        let errors = live.errors.load(Ordering::Relaxed);
        match workload {
            Workload::Stream => eprintln!(
                "[{t0:5.1}-{t1:5.1} s] {:10.1} MB/s   errors {errors}",
                (b - last_b) as f64 / 1e6 / dt
            ),
            _ => eprintln!(
                "[{t0:5.1}-{t1:5.1} s] {:10.0} msg/s {:8.1} MB/s   errors {errors}",
                (m - last_m) as f64 / dt,
                (b - last_b) as f64 / 1e6 / dt
            ),
        }
        (last_b, last_m, last_t) = (b, m, now);
    }
}

/// One connection first, closed at once: a wrong address, a server that is
/// not there or a socket option the kernel refuses is then one clear error
/// (exit 1), not a report of every connection failing.
/// Waits at most a second for the handshake: a server that is there but
/// slow to accept is the run's to measure.
fn probe(cfg: &BenchConfig) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    if cfg.workload == Workload::Udp {
        return Ok(()); // no handshake to try; lost datagrams are reported
    }
    // TLS is spoken over TCP: the probe is TCP's.
    let endpoint = match &cfg.endpoint {
        Endpoint::Tls(hp) => Endpoint::Tcp(hp.clone()),
        e => e.clone(),
    };
    let sock = crate::net::connect_nonblocking(&endpoint, &cfg.sockopts, None)?;
    let fd = match &sock {
        MioStream::Tcp(t) => t.as_raw_fd(),
        MioStream::Unix(u) => u.as_raw_fd(),
    };
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd, for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, 1000) };
    let error = match &sock {
        MioStream::Tcp(t) => t.take_error(),
        MioStream::Unix(u) => u.take_error(),
    };
    match error {
        Ok(None) => Ok(()),
        Ok(Some(e)) | Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            Err(crate::net::NetError::Refused {
                endpoint: cfg.endpoint.clone(),
            }
            .into())
        }
        Ok(Some(e)) | Err(e) => {
            Err(anyhow::Error::new(e).context(format!("connecting to {}", cfg.endpoint)))
        }
    }
}

impl Report {
    /// The final table on stdout.
    /// Connections that never got a reply (a hold run's idle ones aside).
    pub fn unserved(&self) -> usize {
        if self.workload == Workload::Hold {
            0
        } else {
            self.conns.saturating_sub(self.conns_served)
        }
    }

    pub fn print(&self) {
        println!(
            "workload:    {} ({} conns, {} B)",
            self.workload.name(),
            self.conns,
            self.size
        );
        println!("endpoint:    {}", self.endpoint);
        if self.workload != Workload::Udp {
            println!("engine:      {}", self.engine.name());
        }
        if let Some(r) = self.rate {
            println!("rate:        {r:.0}/s (open loop)");
        }
        println!("seconds:     {:.2}", self.seconds);
        println!("MB/s:        {:.1}", self.mb_per_s);
        if let (Some(lo), Some(hi)) = (self.conn_mb_per_s_min, self.conn_mb_per_s_max) {
            println!("per conn:    {lo:.1} .. {hi:.1} MB/s");
        }
        if self.workload != Workload::Stream {
            println!("msgs/s:      {:.0}", self.msgs_per_s);
        }
        if self.unserved() > 0 {
            println!(
                "served:      only {} of {} connections got a reply",
                self.conns_served, self.conns
            );
        }
        if let Some(l) = &self.latency_us {
            println!(
                "latency us:  p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}",
                l.p50, l.p90, l.p99, l.p999, l.max
            );
        }
        if self.workload == Workload::Udp {
            println!("lost:        {}", self.lost);
        }
        if let Some(h) = self.held {
            println!("held:        {h} idle connections");
        }
        if let Some(b) = self.server_bytes_per_held_conn {
            println!("server mem:  {b:.0} bytes per held connection");
        }
        println!("errors:      {}", self.errors);
        print!("cpu:         client {:.2} cores", self.client_cpu);
        match (self.server_cpu, self.server_us_per_msg) {
            (Some(s), Some(us)) => println!(", server {s:.2} cores ({us:.2} us per message)"),
            (Some(s), None) => println!(", server {s:.2} cores"),
            _ => println!(),
        }
        if let Some(d) = &self.service_demand {
            println!(
                "demand:      per {}: server user {:.2} us, system {:.2} us, {:.2} context switches",
                d.per, d.user_us, d.sys_us, d.ctx_switches
            );
        }
        if let Some(e) = &self.first_error {
            println!("first error: {e}");
        }
    }
}
