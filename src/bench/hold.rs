//! `bench --mode hold`: many idle connections held open while a few others
//! run rr, to see what the idle ones cost the server.
//!
//! Two limits of one client stand between it and 100,000 connections, and
//! this module works around both instead of asking the user to:
//! - **Descriptors.** A process may hold its open-file limit (20,000 here).
//!   Past it, the held connections are split into shards of at most that,
//!   and each shard beyond the first is held by a child: this binary run
//!   again with the hidden `--hold-shard`, which connects, says `held N` on
//!   stdout, and holds until its standard input closes (the parent exits,
//!   or is killed: the child also gets SIGTERM with PR_SET_PDEATHSIG).
//! - **Ephemeral ports.** One source address reaches one destination about
//!   14,000 times (see [`ports_per_source`]); each further batch binds the
//!   next loopback source address, and each shard starts at its own, so no
//!   two shards compete for the same ports.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::{BenchConfig, Report, Workload, proc, run_load};
use crate::addr::Endpoint;
use crate::net::SockOpts;

/// Descriptors a shard leaves free for everything else it opens.
const MARGIN: usize = 200;

/// Holds `cfg.conns` idle connections open (sharded over processes when
/// one cannot hold them), then runs rr on `cfg.active` others.
pub fn run(cfg: &BenchConfig) -> anyhow::Result<Report> {
    let Endpoint::Tcp(hp) = &cfg.endpoint else {
        anyhow::bail!("hold needs a TCP address");
    };
    let addr = hp.resolve()?[0];
    let before = cfg.server_pid.and_then(proc::rss_bytes);
    let per_shard = shard_size();
    let shards = cfg.conns.div_ceil(per_shard).max(1);
    let sources_per_shard = per_shard.div_ceil(ports_per_source());
    if shards > 1 && !(addr.ip().is_loopback() && addr.is_ipv4()) && cfg.intervals {
        eprintln!(
            "hold: {shards} processes toward {addr}: without loopback source addresses to spread them, ephemeral ports may run out"
        );
    }
    // The children connect while this process does its own share.
    let mut children = Vec::new();
    for k in 1..shards {
        let n = per_shard.min(cfg.conns - k * per_shard);
        children.push(spawn_shard(cfg, n, k * sources_per_shard)?);
    }
    let mine = per_shard.min(cfg.conns);
    let held = open_idle(&cfg.endpoint, &cfg.sockopts, mine, 0, cfg.intervals)?;
    let mut total = held.len();
    for c in &mut children {
        total += c.wait_held()?;
    }
    // Let the server accept them all before measuring its memory.
    std::thread::sleep(Duration::from_millis(500));
    let after = cfg.server_pid.and_then(proc::rss_bytes);
    if cfg.intervals {
        eprintln!("holding {total} idle connections from {shards} process(es)");
    }
    let rr = BenchConfig {
        workload: Workload::Rr,
        conns: cfg.active,
        ..cfg.clone()
    };
    let mut report = run_load(&rr)?;
    report.workload = Workload::Hold;
    report.held = Some(total);
    report.server_bytes_per_held_conn = match (before, after) {
        (Some(b), Some(a)) if total > 0 => Some(a.saturating_sub(b) as f64 / total as f64),
        _ => None,
    };
    drop(held);
    drop(children);
    Ok(report)
}

/// `--hold-shard FIRST_SOURCE`: a child's part. Connects, reports, holds
/// until standard input closes.
pub fn shard(cfg: &BenchConfig, first_source: usize) -> anyhow::Result<()> {
    use std::io::Write;
    let held = open_idle(&cfg.endpoint, &cfg.sockopts, cfg.conns, first_source, false)?;
    println!("held {}", held.len());
    std::io::stdout().flush()?;
    // EOF (or an error) when the parent is done or gone.
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    Ok(())
}

/// Connections one process may hold: its open-file limit (raised to the
/// hard limit), less a margin.
fn shard_size() -> usize {
    (crate::server::raise_fd_limit() as usize)
        .saturating_sub(MARGIN)
        .max(100)
}

/// A child holding a shard.
struct Shard {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
    asked: usize,
}

fn spawn_shard(cfg: &BenchConfig, n: usize, first_source: usize) -> anyhow::Result<Shard> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("finding this program to run a hold shard")?;
    let mut cmd = Command::new(exe);
    cmd.arg("bench")
        .arg(cfg.endpoint.to_string())
        .args(["--mode", "hold", "--quiet", "--conns"])
        .arg(n.to_string())
        .arg("--hold-shard")
        .arg(first_source.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    if let Some(b) = cfg.sockopts.rcvbuf {
        cmd.arg("--rcvbuf").arg(b.to_string());
    }
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork
    // and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting a hold shard")?;
    let out = child.stdout.take().context("a hold shard's stdout")?;
    Ok(Shard {
        child,
        out: BufReader::new(out),
        asked: n,
    })
}

impl Shard {
    /// Waits for the child's `held N` line. The child's wait is bounded:
    /// each of its connects gives up after 2 s and ends its ramp.
    fn wait_held(&mut self) -> anyhow::Result<usize> {
        let mut line = String::new();
        if self.out.read_line(&mut line)? == 0 {
            let status = self.child.wait()?;
            anyhow::bail!(
                "a hold shard of {} connections ended early ({status})",
                self.asked
            );
        }
        line.trim()
            .strip_prefix("held ")
            .and_then(|k| k.parse().ok())
            .with_context(|| format!("a hold shard said {line:?}"))
    }
}

impl Drop for Shard {
    fn drop(&mut self) {
        // Closing its stdin lets it go; kill in case it is still connecting.
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connections per source address toward one destination before moving to
/// the next loopback address. connect(2) picks ephemeral ports of one
/// parity only (Linux 4.6+ leaves the other half to bind), so half of
/// `ip_local_port_range`, less a margin for other programs, measured: the
/// default range 32768-60999 gave 14,118 per pair, then EADDRNOTAVAIL.
fn ports_per_source() -> usize {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|n| n.parse::<usize>().ok());
            Some((it.next()??, it.next()??))
        });
    match range {
        Some((lo, hi)) if hi > lo => (hi - lo).div_ceil(2).saturating_sub(500).max(1000),
        _ => 10_000,
    }
}

/// IP_BIND_ADDRESS_NO_PORT: the source port is chosen at connect(2), for
/// the whole address pair, not at bind(2) for the source address alone;
/// there the TIME_WAIT sockets of a run a minute ago would take the ports
/// (measured: a second 100,000 run failed at 2,646 with EADDRNOTAVAIL).
fn port_at_connect(sock: &socket2::Socket) {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads one c_int through a valid pointer, with its
    // size; the descriptor is open for the call (borrowed from `sock`).
    let _ = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

/// Opens `n` idle connections. Toward an IPv4 loopback server, connection
/// `i` comes from source address number `first_source + i / per_source`
/// (127.0.0.1, 127.0.0.2, ...), so ephemeral ports never run out.
fn open_idle(
    endpoint: &Endpoint,
    opts: &SockOpts,
    n: usize,
    first_source: usize,
    show: bool,
) -> anyhow::Result<Vec<std::net::TcpStream>> {
    let Endpoint::Tcp(hp) = endpoint else {
        anyhow::bail!("hold needs a TCP address");
    };
    let addr = hp.resolve()?[0];
    let per_source = ports_per_source();
    let mut held = Vec::with_capacity(n);
    let mut last_shown = Instant::now();
    for i in 0..n {
        // Thousands of connects take a while: a line a second says how far.
        if show && last_shown.elapsed() >= Duration::from_secs(1) {
            eprintln!("connecting: {i} of {n} held");
            last_shown = Instant::now();
        }
        let sock = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            None,
        )
        .context("socket (is the open-file limit high enough? ulimit -n)")?;
        let source = first_source + i / per_source;
        if let std::net::IpAddr::V4(ip) = addr.ip()
            && ip.is_loopback()
            && source > 0
        {
            let k = source.min(250) as u8;
            let src = std::net::SocketAddr::from(([127, 0, 0, 1 + k], 0));
            port_at_connect(&sock);
            sock.bind(&src.into())
                .with_context(|| format!("binding source address {src}"))?;
        }
        if let Some(b) = opts.rcvbuf {
            let _ = sock.set_recv_buffer_size(b);
        }
        // A server that stops accepting (the iterative model, a full
        // backlog) ends the ramp instead of hanging it.
        if let Err(e) = sock.connect_timeout(&addr.into(), Duration::from_secs(2)) {
            if i == 0 {
                return Err(e).with_context(|| format!("connecting to {endpoint}"));
            }
            eprintln!(
                "holding {i} of {n} connections: connection {} failed: {e}",
                i + 1
            );
            break;
        }
        held.push(sock.into());
    }
    Ok(held)
}
