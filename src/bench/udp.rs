//! The UDP workload: each of `--conns` connected sockets sends a numbered
//! datagram, waits for its verified reply (or `--timeout`, then counts it
//! lost), and sends the next; with `--rate`, on a fixed schedule instead.
//! Datagrams are numbered as `send --bytes` numbers them, so a late reply
//! to an earlier datagram is recognised and not counted as an answer.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};

use super::load::{Job, Live, ThreadResult};
use crate::client::udp::numbered;
use crate::net;
use crate::pattern::Pattern;

struct Sock {
    sock: mio::net::UdpSocket,
    seq: u64,
    expect: Vec<u8>,
    due: Instant,
    sent_at: Option<Instant>,
}

pub fn run(job: Job, timeout: Duration, live: Arc<Live>) -> (ThreadResult, u64) {
    let mut r = ThreadResult::new(job.conns);
    let mut lost = 0;
    if let Err(e) = drive(&job, timeout, &live, &mut r, &mut lost) {
        r.errors += 1;
        r.first_error.get_or_insert(e.to_string());
    }
    r.served = r.per_conn.iter().filter(|&&b| b > 0).count();
    (r, lost)
}

fn drive(
    job: &Job,
    timeout: Duration,
    live: &Live,
    r: &mut ThreadResult,
    lost: &mut u64,
) -> io::Result<()> {
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(1024);
    let body = Pattern::plain();
    let interval = job
        .per_conn_rate
        .map(|rate| Duration::from_secs_f64(1.0 / rate));
    let start = Instant::now();
    let mut socks = Vec::new();
    for i in 0..job.conns {
        let s = net::connect_udp(&job.endpoint, &job.sockopts).map_err(io::Error::other)?;
        s.set_nonblocking(true)?;
        let mut sock = mio::net::UdpSocket::from_std(s);
        poll.registry()
            .register(&mut sock, Token(i), Interest::READABLE)?;
        let offset = interval.map_or(Duration::ZERO, |iv| {
            iv.mul_f64((job.first + i) as f64 / job.total_conns.max(1) as f64)
        });
        socks.push(Sock {
            sock,
            seq: ((job.first + i) as u64) << 40,
            expect: Vec::new(),
            due: start + offset,
            sent_at: None,
        });
    }
    let mut buf = vec![0u8; 65_536];
    while Instant::now() < job.deadline && !live.stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let mut wake = job.deadline;
        for s in socks.iter_mut() {
            match s.sent_at {
                Some(t) if now.duration_since(t) >= timeout => {
                    *lost += 1;
                    s.sent_at = None;
                    s.seq += 1;
                    if interval.is_some() {
                        s.due += interval.unwrap_or_default();
                    }
                }
                Some(t) => {
                    wake = wake.min(t + timeout);
                    continue;
                }
                None => {}
            }
            if interval.is_some() && s.due > now {
                wake = wake.min(s.due);
                continue;
            }
            if interval.is_none() {
                s.due = now;
            }
            let d = numbered(s.seq, job.size, &body);
            s.expect = crate::client::udp::expected(job.mode, &d);
            match s.sock.send(&d) {
                Ok(_) => {
                    s.sent_at = Some(now);
                    wake = wake.min(now + timeout);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        let left = wake.saturating_duration_since(Instant::now());
        match poll.poll(&mut events, Some(left)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for ev in events.iter() {
            let i = ev.token().0;
            let s = &mut socks[i];
            loop {
                let n = match s.sock.recv(&mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        return Err(io::Error::new(
                            e.kind(),
                            "connection refused: no UDP server there",
                        ));
                    }
                    Err(e) => return Err(e),
                };
                if s.sent_at.is_none() || buf[..n] != s.expect[..] {
                    // Late (an earlier datagram, already counted lost) or wrong.
                    let h = n.min(16).min(s.expect.len());
                    if s.sent_at.is_some() && buf[..h] == s.expect[..h] {
                        r.errors += 1;
                        live.errors.fetch_add(1, Ordering::Relaxed);
                        r.first_error.get_or_insert("wrong UDP reply".into());
                    }
                    continue;
                }
                let lat = s.due.elapsed().as_nanos() as u64;
                let _ = r.hist.record(lat.max(1));
                r.messages += 1;
                r.bytes += n as u64;
                r.per_conn[i] += n as u64;
                live.messages.fetch_add(1, Ordering::Relaxed);
                live.bytes.fetch_add(n as u64, Ordering::Relaxed);
                s.sent_at = None;
                s.seq += 1;
                if let Some(iv) = interval {
                    s.due += iv;
                }
            }
        }
    }
    Ok(())
}
