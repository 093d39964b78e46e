//! Stall detection for the stream clients.
//!
//! A thread watches the sent and received byte counters. When neither
//! moves for `--stall`, it reads the socket's kernel queues (SIOCOUTQ, bytes
//! the peer has not taken; SIOCINQ, bytes we have not read), prints a
//! diagnosis and exits with code 3, instead of letting the client hang.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use super::exit;
use crate::net::{self, Stream};

/// Byte counters the client updates and the watchdog reads.
#[derive(Default)]
pub struct Counters {
    pub sent: AtomicU64,
    pub received: AtomicU64,
    done: AtomicBool,
}

/// Which client stalled, for the explanation.
#[derive(Debug, Clone, Copy)]
pub enum Why {
    /// The seeds' write-everything-then-read client: the deadlock.
    Naive,
    /// The concurrent client: the server stopped reading or answering.
    Server,
}

pub struct Watchdog {
    pub counters: Arc<Counters>,
    thread: JoinHandle<()>,
}

impl Watchdog {
    /// Starts watching; `probe` is a handle to the client's socket.
    pub fn start(
        probe: Stream,
        total: u64,
        stall: Duration,
        json: bool,
        why: Why,
    ) -> anyhow::Result<Self> {
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        let thread = thread::Builder::new()
            .name("upcase-watchdog".into())
            .spawn(move || watch(&c, &probe, total, stall, json, why))
            .context("starting the watchdog")?;
        Ok(Watchdog { counters, thread })
    }

    /// The transfer is over: stop watching.
    pub fn stop(self) {
        self.counters.done.store(true, Ordering::Relaxed);
        self.thread.thread().unpark();
        let _ = self.thread.join();
    }
}

/// What the watchdog prints when the client is stuck.
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

fn watch(counters: &Counters, probe: &Stream, total: u64, stall: Duration, json: bool, why: Why) {
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
            print_stall(&report, json, why);
            std::process::exit(exit::STALLED);
        }
    }
}

fn print_stall(r: &StallReport, json: bool, why: Why) {
    if json {
        println!("{}", serde_json::to_string(r).expect("plain struct"));
    }
    let q = |v: Option<usize>| v.map_or("unknown".to_string(), |n| format!("{n} bytes"));
    let what = match why {
        Why::Naive => "this is the deadlock",
        Why::Server => "the server stopped",
    };
    eprintln!(
        "upcase: stalled: neither direction moved for {:.1} s: {what}",
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
    match why {
        Why::Naive => {
            eprintln!(
                "  why: this client writes everything before it reads anything. The server's"
            );
            eprintln!(
                "       replies filled our receive buffer and its own send buffer, so it stopped"
            );
            eprintln!(
                "       reading, so our send buffer filled too: both sides' buffers are full and"
            );
            eprintln!("       nobody reads. Without --naive, upcase sends and receives at once.");
        }
        Why::Server => {
            eprintln!("  why: this client sends and reads at once, so the server is the one that");
            eprintln!(
                "       stopped: it takes no more data and sends no replies (hung, overloaded,"
            );
            eprintln!("       or busy with another client, as an iterative server is).");
        }
    }
}
