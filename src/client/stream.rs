//! `upcase send --bytes N`: stream N bytes of the seeds' message and verify
//! every byte of the reply, without ever deadlocking.
//!
//! The fix for tcp_deadlock.py's client is to send and receive at once: one
//! thread writes the pattern and then half-closes, while this thread reads
//! and verifies. Whatever the size, the reader keeps the server's replies
//! flowing, so the server keeps reading, so the writer keeps writing.

use std::io::{self, Read, Write};
use std::sync::atomic::Ordering;
use std::thread;
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;

use super::progress::Progress;
use super::watchdog::{Counters, Watchdog, Why};
use super::{Outcome, SendConfig, mb_per_s};
use crate::net::{self, Stream};
use crate::pattern::{Pattern, Verifier};

const WRITE_CHUNK: usize = 128 * 1024;
const READ_BUF: usize = 256 * 1024;

/// What a `--bytes` run did; printed as text or `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct StreamReport {
    pub sent: u64,
    pub received: u64,
    pub wrong: u64,
    pub first_wrong: Option<u64>,
    pub seconds: f64,
    pub mb_per_s: f64,
}

impl StreamReport {
    pub fn print(&self, json: bool) {
        if json {
            println!("{}", serde_json::to_string(self).expect("plain struct"));
        } else {
            println!("sent:      {} bytes", self.sent);
            println!("received:  {} bytes", self.received);
            println!("wrong:     {} bytes", self.wrong);
            println!("seconds:   {:.3}", self.seconds);
            println!("MB/s:      {:.1}", self.mb_per_s);
        }
    }

    /// Success means every byte sent came back, uppercased, and no more.
    pub fn outcome(&self, total: u64, expect: u64) -> Outcome {
        if self.received > expect {
            eprintln!(
                "upcase: the server sent more than it was sent: over {expect} bytes back for {total}"
            );
            Outcome::Mismatch
        } else if self.wrong > 0 {
            eprintln!(
                "upcase: the reply was wrong: {} wrong byte(s), the first at offset {}",
                self.wrong,
                self.first_wrong.unwrap_or(0)
            );
            Outcome::Mismatch
        } else if self.received != expect || self.sent != total {
            eprintln!(
                "upcase: the reply was incomplete: sent {} of {total} and received {} of {expect} bytes",
                self.sent, self.received
            );
            Outcome::Mismatch
        } else {
            Outcome::Ok
        }
    }
}

pub fn run(cfg: &SendConfig, total: u64) -> anyhow::Result<Outcome> {
    let (request, reply) = Pattern::pair(cfg.mode);
    // UTF-8 text is sent in whole messages, so no character is cut at the
    // end; the seeds' ASCII stream may stop anywhere.
    let (total, expect) = match cfg.mode {
        crate::transform::Mode::Ascii => (total, total),
        crate::transform::Mode::Utf8 { .. } => {
            let n = total.div_ceil(request.period() as u64);
            (n * request.period() as u64, n * reply.period() as u64)
        }
    };
    let mut reader = net::connect(&cfg.endpoint, &cfg.sockopts)?;
    // The watchdog (--stall, capped by -w) judges silence here.
    reader
        .set_io_timeout(None)
        .context("clearing the read timeout")?;
    let writer = reader.try_clone().context("cloning the socket")?;
    let probe = reader.try_clone().context("cloning the socket")?;
    let watchdog = Watchdog::start(probe, total, cfg.stall, cfg.json, Why::Server)?;
    let counters = watchdog.counters.clone();
    let progress = Progress::new(total, cfg.progress);
    let start = Instant::now();

    let sender = {
        let (progress, counters) = (progress.clone(), counters.clone());
        thread::Builder::new()
            .name("upcase-send".into())
            .spawn(move || send_pattern(writer, &request, total, &progress, &counters))
            .context("starting the sender thread")?
    };

    let mut verifier = Verifier::against(reply);
    let mut buf = vec![0u8; READ_BUF];
    let read_result = loop {
        match reader.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                verifier.check(&buf[..n]);
                progress.add_received(n as u64);
                counters.received.fetch_add(n as u64, Ordering::Relaxed);
                if verifier.received() > expect {
                    // More than was sent: wrong whatever comes next.
                    break Ok(());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => break Err(e),
        }
    };
    let seconds = start.elapsed().as_secs_f64();
    if verifier.received() != expect {
        // The server stopped early (or sent too much): unblock a writer
        // stuck on a full buffer.
        let _ = shutdown_both(&reader);
    }
    let (sent, send_result) = sender
        .join()
        .map_err(|_| anyhow::anyhow!("the sender thread panicked"))?;
    watchdog.stop();
    progress.clear();

    let report = StreamReport {
        sent,
        received: verifier.received(),
        wrong: verifier.wrong(),
        first_wrong: verifier.first_wrong(),
        seconds,
        mb_per_s: mb_per_s(verifier.received(), seconds),
    };
    if let Err(e) = read_result {
        return Err(e).with_context(|| {
            format!(
                "receiving from {} (sent {sent} bytes, received {} bytes before the error)",
                cfg.endpoint,
                verifier.received()
            )
        });
    }
    report.print(cfg.json);
    if let Err(e) = send_result
        && verifier.received() <= expect
    {
        // A reset or an early close: an error (exit 1), after the summary
        // that shows how far it got.
        let received = verifier.received();
        return Err(e).with_context(|| {
            format!(
                "sending to {} (sent {sent} bytes, received {received} bytes before the error)",
                cfg.endpoint
            )
        });
    }
    Ok(report.outcome(total, expect))
}

/// Writes `total` bytes of the pattern, then half-closes.
fn send_pattern(
    mut w: Stream,
    pattern: &Pattern,
    total: u64,
    progress: &Progress,
    counters: &Counters,
) -> (u64, io::Result<()>) {
    let mut sent = 0u64;
    while sent < total {
        let want = (total - sent).min(WRITE_CHUNK as u64) as usize;
        match w.write(pattern.slice(sent, want)) {
            Ok(n) => {
                sent += n as u64;
                progress.add_sent(n as u64);
                counters.sent.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return (sent, Err(e)),
        }
    }
    (sent, w.shutdown_write())
}

fn shutdown_both(s: &Stream) -> io::Result<()> {
    match s {
        Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
    }
}
