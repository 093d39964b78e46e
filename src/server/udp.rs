//! The UDP service (the seeds' server2.py): every datagram is uppercased and
//! sent back to its sender.
//!
//! UDP has no flow control, so there is no deadlock to avoid and nothing to
//! buffer: one receive buffer of the largest datagram, reused. An empty
//! datagram (the seed client's goodbye) is answered with an empty one and,
//! unlike server2.py, does not stop the server. A failed send (the sender
//! vanished, ICMP port unreachable) is counted and logged, never fatal.
//!
//! UDP's sender address is not checked by anyone: a datagram with a forged
//! source makes the server send its reply to a victim, and under `--utf8` a
//! reply can be three times the request. So replies go only to allowed
//! networks (`--udp-allow`), and each source gets at most so many replies
//! and reply bytes a second (`--udp-limit`, a token bucket per address;
//! sources on loopback, which cannot arrive from outside, are spared unless
//! the limit is given). What is refused is counted and logged, at most once
//! every ten seconds. [`UdpService`] holds these decisions for every model.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::os::fd::AsFd;

use tokio::net::UdpSocket;

use super::mmsg::{self, Batch, Reply};
use crate::lifecycle::Lifecycle;
use crate::transform::Mode;

pub use super::mmsg::MAX_DATAGRAM;

/// Who gets replies, and how many.
#[derive(Debug, Clone)]
pub struct UdpPolicy {
    /// Replies per second and per source address (0: no limit).
    pub datagrams: u32,
    /// Reply bytes per second and per source address (0: no limit).
    pub bytes: u64,
    /// Whether the limit applies to loopback sources too.
    pub loopback: bool,
    /// Source networks answered (empty: all).
    pub allow: Vec<ipnet::IpNet>,
    /// `--busy-poll`: how long to keep asking after the last datagram.
    pub busy_poll: Duration,
}

impl Default for UdpPolicy {
    fn default() -> Self {
        UdpPolicy {
            datagrams: 1000,
            bytes: 1 << 20,
            loopback: false,
            allow: Vec::new(),
            busy_poll: Duration::ZERO,
        }
    }
}

/// Sources remembered at once; past this, new sources are refused until
/// quiet ones are forgotten (so the table stays bounded under a flood of
/// forged addresses).
const MAX_SOURCES: usize = 65_536;
/// A source not heard from for this long is forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(10);

/// A source's tokens: one second's worth at most.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    datagrams: f64,
    bytes: f64,
    last: Instant,
}

/// Every source's tokens. One table per server, shared by every loop and
/// thread that answers on its UDP sockets: a source gets its share from
/// the server, not from each loop that happens to wake for it.
#[derive(Debug)]
pub struct Sources {
    buckets: HashMap<IpAddr, Bucket>,
    last_prune: Instant,
}

impl Sources {
    pub fn shared() -> Arc<Mutex<Sources>> {
        Arc::new(Mutex::new(Sources {
            buckets: HashMap::new(),
            last_prune: Instant::now(),
        }))
    }
}

/// The UDP service of one socket: the transform, the policy and the
/// counters, whatever loop waits on the socket.
#[derive(Debug)]
pub struct UdpService {
    mode: Mode,
    policy: UdpPolicy,
    sources: Arc<Mutex<Sources>>,
    /// Allocated at the first datagram (most event loops never get one).
    buf: Vec<u8>,
    scratch: Vec<u8>,
    /// recvmmsg/sendmmsg buffers, allocated at the first datagram.
    batch: Option<Box<Batch>>,
    /// `--busy-poll`: a server woken once per datagram pays a wake-up per
    /// round trip, which for a lone client is most of its time.
    spin: Duration,
    pub received: u64,
    pub answered: u64,
    pub failed: u64,
    pub refused: u64,
    refused_logged: Option<Instant>,
    refused_since_log: u64,
}

impl UdpService {
    pub fn new(mode: Mode, policy: UdpPolicy, sources: Arc<Mutex<Sources>>) -> Self {
        let spin = policy.busy_poll;
        UdpService {
            mode,
            policy,
            sources,
            buf: Vec::new(),
            scratch: Vec::new(),
            batch: None,
            spin,
            received: 0,
            answered: 0,
            failed: 0,
            refused: 0,
            refused_logged: None,
            refused_since_log: 0,
        }
    }

    /// The receive buffer: one byte more than the maximum lets us tell a
    /// full datagram from a truncated one.
    pub fn buf(&mut self) -> &mut [u8] {
        if self.buf.is_empty() {
            self.buf = vec![0u8; MAX_DATAGRAM + 1];
        }
        &mut self.buf
    }

    /// The reply to the `n` bytes just received from `peer`, or `None` when
    /// it is not answered (refused, or no valid reply; counted and logged).
    pub fn answer(&mut self, n: usize, peer: SocketAddr) -> Option<&[u8]> {
        let mut buf = std::mem::take(&mut self.buf);
        let mut scratch = std::mem::take(&mut self.scratch);
        let reply = self.answer_in(&mut buf[..n], peer, &mut scratch);
        (self.buf, self.scratch) = (buf, scratch);
        match reply? {
            Reply::InPlace(len) => Some(&self.buf[..len]),
            Reply::Out => Some(&self.scratch),
        }
    }

    /// Transforms `data` from `peer` in place (ASCII) or into `out`, and
    /// says where the reply is; `None` when it is not answered.
    fn answer_in(&mut self, data: &mut [u8], peer: SocketAddr, out: &mut Vec<u8>) -> Option<Reply> {
        self.received += 1;
        crate::metrics::global().datagram("received");
        if data.is_empty() {
            tracing::debug!("udp: empty datagram (goodbye) from {peer}");
        }
        let ip = canonical(peer.ip());
        if !self.policy.allow.is_empty() && !self.policy.allow.iter().any(|net| net.contains(&ip)) {
            self.refuse(peer, "not in --udp-allow");
            return None;
        }
        let mode = self.mode;
        let n = data.len();
        let len = match reply(mode, data, out) {
            Ok(r) => r.len(),
            Err(e) => {
                self.failed += 1;
                crate::metrics::global().datagram("failed");
                tracing::warn!("udp: datagram from {peer} not answered: {e}");
                return None;
            }
        };
        // The bytes a source pulls out are what it is charged: under --utf8
        // a reply may be three times its request.
        if !self.take_tokens(ip, len) {
            self.refuse(peer, "over --udp-limit");
            return None;
        }
        Some(match mode {
            Mode::Ascii => Reply::InPlace(n),
            Mode::Utf8 { .. } => Reply::Out,
        })
    }

    fn take_tokens(&mut self, ip: IpAddr, len: usize) -> bool {
        let p = &self.policy;
        if (p.datagrams == 0 && p.bytes == 0) || (ip.is_loopback() && !p.loopback) {
            return true;
        }
        let now = Instant::now();
        let mut sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        let Sources {
            buckets,
            last_prune,
        } = &mut *sources;
        if now.duration_since(*last_prune) >= FORGET_AFTER {
            *last_prune = now;
            buckets.retain(|_, b| now.duration_since(b.last) < FORGET_AFTER);
        }
        let (dg, by) = (p.datagrams as f64, p.bytes as f64);
        if !buckets.contains_key(&ip) && buckets.len() >= MAX_SOURCES {
            return false;
        }
        let b = buckets.entry(ip).or_insert(Bucket {
            datagrams: dg,
            bytes: by,
            last: now,
        });
        let secs = now.duration_since(b.last).as_secs_f64();
        b.last = now;
        b.datagrams = (b.datagrams + secs * dg).min(dg);
        b.bytes = (b.bytes + secs * by).min(by);
        let ok_dg = dg == 0.0 || b.datagrams >= 1.0;
        let ok_by = by == 0.0 || b.bytes >= len as f64;
        if ok_dg && ok_by {
            b.datagrams -= 1.0;
            b.bytes -= len as f64;
            true
        } else {
            false
        }
    }

    fn refuse(&mut self, peer: SocketAddr, why: &str) {
        self.refused += 1;
        crate::metrics::global().datagram("refused");
        self.refused_since_log += 1;
        if self
            .refused_logged
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
        {
            tracing::warn!(
                "udp: refused {} datagram(s) since the last report; the last from {peer}: {why}",
                self.refused_since_log
            );
            self.refused_logged = Some(Instant::now());
            self.refused_since_log = 0;
        }
    }

    /// Counts how sending a reply went.
    pub fn sent(&mut self, peer: SocketAddr, result: io::Result<usize>, len: usize) {
        match result {
            Ok(k) if k == len => {
                self.answered += 1;
                crate::metrics::global().datagram("answered");
            }
            Ok(k) => {
                {
                    self.failed += 1;
                    crate::metrics::global().datagram("failed");
                }
                tracing::warn!("udp: reply to {peer} truncated to {k} bytes");
            }
            Err(e) => {
                // A full send buffer (WouldBlock) drops the reply, as UDP may.
                {
                    self.failed += 1;
                    crate::metrics::global().datagram("failed");
                }
                tracing::debug!("udp: reply to {peer} failed: {e}");
            }
        }
    }

    pub fn log_totals(&self) {
        if self.answered + self.failed + self.refused > 0 {
            tracing::info!(
                "udp: {} datagrams answered, {} failed, {} refused",
                self.answered,
                self.failed,
                self.refused
            );
        }
    }
}

/// An IPv4 address seen on an IPv6 socket (`::ffff:a.b.c.d`) as itself, so
/// that IPv4 networks in `--udp-allow` match it.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The reply to one datagram, transformed on its own. A reply that would
/// not fit in a datagram (UTF-8 can grow up to 3x) is an error, never a
/// truncation; so is invalid UTF-8 in strict mode.
fn reply<'a>(mode: Mode, data: &'a mut [u8], scratch: &'a mut Vec<u8>) -> Result<&'a [u8], String> {
    let out: &[u8] = match mode {
        Mode::Ascii => {
            crate::transform::upper_in_place(data);
            data
        }
        Mode::Utf8 { .. } => {
            *scratch = crate::transform::apply(mode, data).map_err(|e| e.to_string())?;
            scratch
        }
    };
    if out.len() > MAX_DATAGRAM {
        return Err(format!(
            "the reply would be {} bytes, over the UDP maximum of {MAX_DATAGRAM}",
            out.len()
        ));
    }
    Ok(out)
}

/// A UDP socket on tokio (the `async` model).
pub async fn serve(sock: UdpSocket, mut svc: UdpService, life: std::sync::Arc<Lifecycle>) {
    let draining = life.until_draining();
    tokio::pin!(draining);
    loop {
        let (n, peer) = tokio::select! {
            r = sock.recv_from(svc.buf()) => match r {
                Ok(x) => x,
                Err(e) => {
                    // ICMP errors from an earlier send surface here on Linux.
                    svc.failed += 1;
                    tracing::debug!("udp receive: {e}");
                    continue;
                }
            },
            _ = &mut draining => break,
        };
        let Some(reply) = svc.answer(n, peer) else {
            continue;
        };
        let len = reply.len();
        let result = sock.send_to(reply, peer).await;
        svc.sent(peer, result, len);
    }
    svc.log_totals();
}

/// Answers the datagrams waiting on a non-blocking socket, at most about
/// `budget` of them, received and answered [`mmsg::SLOTS`] at a time;
/// returns true if it stopped because none were left.
pub fn answer_ready(sock: &std::net::UdpSocket, svc: &mut UdpService, budget: usize) -> bool {
    let mut batch = svc.batch.take().unwrap_or_default();
    let mut rounds = budget.div_ceil(mmsg::SLOTS).max(1);
    let drained = loop {
        if rounds == 0 {
            break false;
        }
        rounds -= 1;
        match batch.recv(sock.as_fd()) {
            Ok(0) => break true,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // ICMP errors from an earlier send surface here on Linux.
                svc.failed += 1;
                tracing::debug!("udp receive: {e}");
                continue;
            }
        }
        for i in 0..batch.len() {
            let reply = batch
                .datagram(i)
                .and_then(|(data, peer, out)| svc.answer_in(data, peer, out));
            batch.set_reply(i, reply);
        }
        batch.send(sock.as_fd(), |peer, result, len| {
            svc.sent(peer, result, len)
        });
    };
    svc.batch = Some(batch);
    drained
}

/// Answers until the socket is empty (an edge-triggered loop must), then,
/// with `--busy-poll`, keeps asking until a datagram-free `spin` has passed
/// or about a millisecond has been spent, so that other work on the same
/// loop waits at most that long.
pub fn answer_all(sock: &std::net::UdpSocket, svc: &mut UdpService) {
    while !answer_ready(sock, svc, 64) {}
    if svc.spin.is_zero() {
        return;
    }
    let start = Instant::now();
    let mut quiet_until = start + svc.spin;
    loop {
        let before = svc.received;
        while !answer_ready(sock, svc, 64) {}
        let now = Instant::now();
        if svc.received != before {
            quiet_until = now + svc.spin;
        }
        if now >= quiet_until || now.duration_since(start) >= SPIN_AT_MOST {
            return;
        }
        std::hint::spin_loop();
    }
}

/// The longest one [`answer_all`] busy-polls before it lets its loop go on.
const SPIN_AT_MOST: Duration = Duration::from_millis(1);

/// A UDP listener on a thread of its own, for the thread-based models:
/// waits in poll(2) for a datagram or the start of the drain.
pub fn serve_blocking(
    sock: std::net::UdpSocket,
    mut svc: UdpService,
    life: &Lifecycle,
) -> io::Result<()> {
    sock.set_nonblocking(true)?;
    loop {
        let ready = crate::lifecycle::wait_readable(&[sock.as_fd(), life.draining_fd()], None)?;
        if ready[1] {
            break;
        }
        answer_all(&sock, &mut svc);
    }
    svc.log_totals();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(policy: UdpPolicy, mode: Mode) -> UdpService {
        UdpService::new(mode, policy, Sources::shared())
    }

    fn ask(s: &mut UdpService, data: &[u8], peer: &str) -> Option<Vec<u8>> {
        s.buf()[..data.len()].copy_from_slice(data);
        s.answer(data.len(), peer.parse().unwrap())
            .map(|r| r.to_vec())
    }

    #[test]
    fn a_source_gets_its_share_and_no_more() {
        let mut s = svc(
            UdpPolicy {
                datagrams: 3,
                bytes: 0,
                ..UdpPolicy::default()
            },
            Mode::Ascii,
        );
        for _ in 0..3 {
            assert_eq!(
                ask(&mut s, b"hi", "192.0.2.1:5").as_deref(),
                Some(&b"HI"[..])
            );
        }
        assert_eq!(
            ask(&mut s, b"hi", "192.0.2.1:6"),
            None,
            "same address, other port"
        );
        assert!(
            ask(&mut s, b"hi", "192.0.2.2:5").is_some(),
            "another source has its own"
        );
        assert!(
            ask(&mut s, b"hi", "127.0.0.1:5").is_some(),
            "loopback is spared"
        );
        assert_eq!(s.refused, 1);
    }

    #[test]
    fn utf8_replies_are_charged_by_their_size() {
        let mut s = svc(
            UdpPolicy {
                datagrams: 0,
                bytes: 100,
                loopback: true,
                ..UdpPolicy::default()
            },
            Mode::Utf8 { strict: false },
        );
        // U+0390 (2 bytes) uppercases to 6 bytes: 20 of them pull 120.
        let amp = "\u{390}".repeat(20);
        assert_eq!(ask(&mut s, amp.as_bytes(), "127.0.0.1:9"), None);
        assert!(ask(&mut s, "\u{390}".repeat(10).as_bytes(), "127.0.0.1:9").is_some());
    }

    #[test]
    fn only_allowed_networks_are_answered() {
        let mut s = svc(
            UdpPolicy {
                allow: vec!["10.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()],
                ..UdpPolicy::default()
            },
            Mode::Ascii,
        );
        assert!(ask(&mut s, b"x", "10.1.2.3:1").is_some());
        assert!(
            ask(&mut s, b"x", "[::ffff:10.1.2.3]:1").is_some(),
            "v4-mapped"
        );
        assert!(ask(&mut s, b"x", "[::1]:1").is_some());
        assert_eq!(ask(&mut s, b"x", "127.0.0.1:1"), None);
        assert_eq!(s.refused, 1);
    }
}
