//! `upcase send --naive --bytes N`: tcp_deadlock.py's client, on purpose.
//!
//! It writes everything first, 16 bytes at a time, then half-closes, then
//! reads (42 bytes at a time, as the seed does). With a small N the server's
//! replies fit in the kernel buffers and it works. With a large N the
//! replies fill this socket's receive buffer and the server's send buffer;
//! the server stops reading; our send buffer fills; both sides wait forever.
//!
//! Instead of hanging, a watchdog thread watches both byte counters. When
//! neither moves for `--stall`, it reads this socket's kernel queues
//! (SIOCOUTQ, SIOCINQ), prints the diagnosis and exits with code 3.

use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use super::progress::Progress;
use super::stream::StreamReport;
use super::{Outcome, SendConfig, exit, mb_per_s};
use crate::net::{self, Stream};
use crate::pattern::{MESSAGE, Verifier};

/// The seed's read size.
const SEED_RECV: usize = 42;

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    received: AtomicU64,
    done: AtomicBool,
}

pub fn run(cfg: &SendConfig, total: u64) -> anyhow::Result<Outcome> {
    let mut sock = net::connect(&cfg.endpoint, &cfg.sockopts)?;
    let counters = Arc::new(Counters::default());
    let watchdog = {
        let counters = counters.clone();
        let probe = sock.try_clone().context("cloning the socket")?;
        let (stall, json) = (cfg.stall, cfg.json);
        thread::Builder::new()
            .name("upcase-watchdog".into())
            .spawn(move || watch(&counters, &probe, total, stall, json))
            .context("starting the watchdog")?
    };
    let progress = Progress::new(total, cfg.progress);
    let start = Instant::now();

    let result = naive_exchange(&mut sock, total, &counters, &progress);
    counters.done.store(true, Ordering::Relaxed);
    watchdog.thread().unpark();
    let _ = watchdog.join();
    progress.clear();
    let verifier = result.with_context(|| {
        format!(
            "talking to {} (sent {} bytes, received {} bytes)",
            cfg.endpoint,
            counters.sent.load(Ordering::Relaxed),
            counters.received.load(Ordering::Relaxed)
        )
    })?;
    let seconds = start.elapsed().as_secs_f64();
    let report = StreamReport {
        sent: counters.sent.load(Ordering::Relaxed),
        received: verifier.received(),
        wrong: verifier.wrong(),
        first_wrong: verifier.first_wrong(),
        seconds,
        mb_per_s: mb_per_s(verifier.received(), seconds),
    };
    report.print(cfg.json);
    Ok(report.outcome(total, total))
}

/// The seed's client: all the writes, the half-close, then all the reads.
fn naive_exchange(
    sock: &mut Stream,
    total: u64,
    counters: &Counters,
    progress: &Progress,
) -> io::Result<Verifier> {
    let mut sent = 0u64;
    while sent < total {
        let n = (total - sent).min(MESSAGE.len() as u64) as usize;
        sock.write_all(&MESSAGE[..n])?;
        sent += n as u64;
        counters.sent.store(sent, Ordering::Relaxed);
        progress.add_sent(n as u64);
    }
    sock.shutdown_write()?;

    let mut verifier = Verifier::new();
    let mut buf = [0u8; SEED_RECV];
    loop {
        let n = match sock.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if verifier.received() == 0 {
            eprintln!(
                "The first data received says {:?}",
                String::from_utf8_lossy(&buf[..n])
            );
        }
        verifier.check(&buf[..n]);
        counters
            .received
            .store(verifier.received(), Ordering::Relaxed);
        progress.add_received(n as u64);
    }
    Ok(verifier)
}

/// What the watchdog prints when the naive client is stuck.
#[derive(Debug, Serialize)]
pub struct StallReport {
    pub stalled: bool,
    pub stall_seconds: f64,
    pub total: u64,
    pub sent: u64,
    pub received: u64,
    /// SIOCOUTQ: bytes in our send queue the peer has not acknowledged.
    pub send_queue: Option<usize>,
    /// SIOCINQ: bytes in our receive queue we have not read.
    pub recv_queue: Option<usize>,
}

fn watch(counters: &Counters, probe: &Stream, total: u64, stall: Duration, json: bool) {
    let tick = (stall / 10).clamp(Duration::from_millis(10), Duration::from_millis(200));
    let mut last = (u64::MAX, u64::MAX);
    let mut since = Instant::now();
    while !counters.done.load(Ordering::Relaxed) {
        thread::park_timeout(tick);
        let now = (
            counters.sent.load(Ordering::Relaxed),
            counters.received.load(Ordering::Relaxed),
        );
        if now != last {
            last = now;
            since = Instant::now();
            continue;
        }
        if since.elapsed() >= stall && !counters.done.load(Ordering::Relaxed) {
            let queues = net::queue_sizes(probe.as_fd()).ok();
            let report = StallReport {
                stalled: true,
                stall_seconds: since.elapsed().as_secs_f64(),
                total,
                sent: now.0,
                received: now.1,
                send_queue: queues.map(|q| q.0),
                recv_queue: queues.map(|q| q.1),
            };
            print_stall(&report, json);
            std::process::exit(exit::STALLED);
        }
    }
}

fn print_stall(r: &StallReport, json: bool) {
    if json {
        println!("{}", serde_json::to_string(r).expect("plain struct"));
    }
    let q = |v: Option<usize>| v.map_or("unknown".to_string(), |n| format!("{n} bytes"));
    eprintln!(
        "upcase: stalled: neither direction moved for {:.1} s: this is the deadlock",
        r.stall_seconds
    );
    eprintln!("  bytes sent:     {} of {}", r.sent, r.total);
    eprintln!("  bytes received: {}", r.received);
    eprintln!(
        "  send queue:     {} (this socket's kernel send buffer, not yet taken by the server)",
        q(r.send_queue)
    );
    eprintln!(
        "  receive queue:  {} (this socket's kernel receive buffer, replies not yet read)",
        q(r.recv_queue)
    );
    eprintln!("  why: this client writes everything before it reads anything. The server's");
    eprintln!("       replies filled our receive buffer and its own send buffer, so it stopped");
    eprintln!("       reading, so our send buffer filled too: both sides' buffers are full and");
    eprintln!("       nobody reads. Without --naive, upcase sends and receives at once.");
}
