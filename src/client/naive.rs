//! `upcase send --naive --bytes N`: tcp_deadlock.py's client, on purpose.
//!
//! It writes everything first, 16 bytes at a time, then half-closes, then
//! reads (42 bytes at a time, as the seed does). With a small N the server's
//! replies fit in the kernel buffers and it works. With a large N the
//! replies fill this socket's receive buffer and the server's send buffer;
//! the server stops reading; our send buffer fills; both sides wait forever.
//!
//! Instead of hanging, a [`Watchdog`] watches both byte counters. When
//! neither moves for `--stall`, it reads this socket's kernel queues
//! (SIOCOUTQ, SIOCINQ), prints the diagnosis and exits with code 3.

use std::io::{self, Read, Write};
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::Context;

use super::progress::Progress;
use super::stream::StreamReport;
use super::watchdog::{Counters, Watchdog, Why};
use super::{Outcome, SendConfig, mb_per_s};
use crate::net::{self, Stream};
use crate::pattern::{MESSAGE, Verifier};

/// The seed's read size.
const SEED_RECV: usize = 42;

pub fn run(cfg: &SendConfig, total: u64) -> anyhow::Result<Outcome> {
    let mut sock = net::connect(&cfg.endpoint, &cfg.sockopts)?;
    // The watchdog (--stall, capped by -w) judges silence here.
    sock.set_io_timeout(None)
        .context("clearing the read timeout")?;
    let probe = sock.try_clone().context("cloning the socket")?;
    let watchdog = Watchdog::start(probe, total, cfg.stall, cfg.json, Why::Naive)?;
    let counters = watchdog.counters.clone();
    let progress = Progress::new(total, cfg.progress);
    let start = Instant::now();

    let result = naive_exchange(&mut sock, total, &counters, &progress);
    watchdog.stop();
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
