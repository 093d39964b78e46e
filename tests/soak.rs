//! The randomized soak: every model under a seeded mix of honest and
//! hostile clients, connections coming and going, for a bounded time.
//!
//! Honest clients (verified streams, request/response over TCP and Unix,
//! slowloris senders that stay under the idle timeout, early half-closes,
//! UDP datagrams up to the maximum size) must get every byte back, right.
//! Hostile ones (clients that go idle past `--idle-timeout`, never read,
//! reset in the middle of a reply, floods of connections past the server's
//! --max-conns, UDP datagrams with a forged source) must be dealt with:
//! idle ones closed by the server, floods waiting in the backlog. Meanwhile the server is stopped and continued now and then.
//! Afterwards the server must still run, its descriptors, threads and child
//! processes must be back at their baseline, and its memory must have
//! stayed bounded.
//!
//! `UPCASE_SOAK_SECS` sets the time per model (default 3, as CI runs it;
//! minutes for a real soak), `UPCASE_SOAK_SEED` replays a failure: every
//! failure message names the seed. `UPCASE_SOAK_MODELS=epoll,uring` soaks
//! only those models.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream, UdpSocket};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const PATTERN: &[u8; 16] = b"capitalize this!";
const UPPER: &[u8; 16] = b"CAPITALIZE THIS!";
/// The server's idle timeout during the soak.
const IDLE: Duration = Duration::from_millis(1000);
/// Server memory may not pass this, whatever the clients do.
const RSS_LIMIT_KIB: u64 = 256 * 1024;

fn secs() -> u64 {
    std::env::var("UPCASE_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
}

fn seed() -> u64 {
    std::env::var("UPCASE_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        })
}

/// Where a soak client talks to.
struct Target {
    tcp: String,
    udp: String,
    unix: PathBuf,
    /// Reads of honest clients wait this long at most (the iterative and
    /// pool models make clients queue).
    patience: Duration,
    max_stream: usize,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Stream,
    Rr,
    UnixRr,
    Udp,
    Slowloris,
    EarlyHalfClose,
    Idle,
    NeverReads,
    ResetMidReply,
    /// Connections up to and past the server's --max-conns, held a moment.
    Flood,
    /// UDP datagrams whose source is forged (a raw socket; root only).
    Forged,
}

const KINDS: [Kind; 11] = [
    Kind::Stream,
    Kind::Rr,
    Kind::UnixRr,
    Kind::Udp,
    Kind::Slowloris,
    Kind::EarlyHalfClose,
    Kind::Idle,
    Kind::NeverReads,
    Kind::ResetMidReply,
    Kind::Flood,
    Kind::Forged,
];

/// The server's --max-conns in the soak: floods reach it.
const MAX_CONNS: usize = 48;

fn client(kind: Kind, t: &Target, rng: &mut Rng) -> Result<(), String> {
    match kind {
        Kind::Stream => {
            let n = 1 + rng.below(t.max_stream);
            let s = TcpStream::connect(&t.tcp).map_err(|e| format!("connect: {e}"))?;
            stream(s, n, t.patience)
        }
        Kind::Rr => {
            let s = TcpStream::connect(&t.tcp).map_err(|e| format!("connect: {e}"))?;
            s.set_read_timeout(Some(t.patience)).ok();
            rr(s, rng)
        }
        Kind::UnixRr => {
            let s = UnixStream::connect(&t.unix).map_err(|e| format!("unix connect: {e}"))?;
            s.set_read_timeout(Some(t.patience)).ok();
            rr(s, rng)
        }
        Kind::Udp => udp(&t.udp, rng),
        Kind::Slowloris => {
            let mut s = TcpStream::connect(&t.tcp).map_err(|e| format!("connect: {e}"))?;
            s.set_read_timeout(Some(t.patience)).ok();
            let k = 1 + rng.below(4);
            for i in 0..k {
                s.write_all(&[b'a' + i as u8]).map_err(|e| e.to_string())?;
                thread::sleep(IDLE / 5);
            }
            s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
            let mut got = Vec::new();
            s.read_to_end(&mut got)
                .map_err(|e| format!("slowloris read: {e}"))?;
            let want: Vec<u8> = (0..k).map(|i| b'A' + i as u8).collect();
            (got == want)
                .then_some(())
                .ok_or(format!("slowloris got {got:?}"))
        }
        Kind::EarlyHalfClose => {
            let mut s = TcpStream::connect(&t.tcp).map_err(|e| format!("connect: {e}"))?;
            s.set_read_timeout(Some(t.patience)).ok();
            s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
            let mut got = Vec::new();
            s.read_to_end(&mut got)
                .map_err(|e| format!("half-close read: {e}"))?;
            got.is_empty()
                .then_some(())
                .ok_or(format!("{} bytes for an empty request", got.len()))
        }
        Kind::Idle => {
            let mut s = TcpStream::connect(&t.tcp).map_err(|e| format!("connect: {e}"))?;
            s.set_read_timeout(Some(t.patience)).ok();
            let start = Instant::now();
            let mut b = [0u8; 1];
            match s.read(&mut b) {
                Ok(0) => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
                other => return Err(format!("an idle client was not closed: {other:?}")),
            }
            (start.elapsed() >= IDLE * 8 / 10)
                .then_some(())
                .ok_or(format!("idle client closed after {:?}", start.elapsed()))
        }
        Kind::NeverReads => {
            // Writes until the server stops taking bytes, then resets.
            let mut s = TcpStream::connect(&t.tcp).map_err(|e| format!("connect: {e}"))?;
            s.set_write_timeout(Some(Duration::from_millis(300))).ok();
            let block = vec![b'x'; 64 * 1024];
            for _ in 0..(1 + rng.below(256)) {
                if s.write_all(&block).is_err() {
                    break;
                }
            }
            reset(s);
            Ok(())
        }
        Kind::Flood => {
            let held: Vec<TcpStream> = (0..MAX_CONNS + rng.below(16))
                .filter_map(|_| TcpStream::connect(&t.tcp).ok())
                .collect();
            thread::sleep(Duration::from_millis(100 + rng.below(300) as u64));
            drop(held);
            Ok(())
        }
        Kind::Forged => {
            forged_datagrams(&t.udp, 1 + rng.below(20));
            Ok(())
        }
        Kind::ResetMidReply => {
            let mut s = TcpStream::connect(&t.tcp).map_err(|e| format!("connect: {e}"))?;
            s.set_write_timeout(Some(Duration::from_millis(500))).ok();
            s.set_read_timeout(Some(Duration::from_millis(500))).ok();
            let _ = s.write_all(&PATTERN.repeat(1 + rng.below(16384)));
            let mut b = vec![0u8; 1 + rng.below(4096)];
            let _ = s.read(&mut b);
            reset(s);
            Ok(())
        }
    }
}

/// Sends `n` datagrams to `udp` from a forged source, 127.0.0.99 (a raw
/// socket writing its own IP header). The replies go to an address where
/// nothing listens; the server must only count them and go on.
fn forged_datagrams(udp: &str, n: usize) {
    let dst: std::net::SocketAddrV4 = match udp.parse() {
        Ok(a) => a,
        Err(_) => return,
    };
    // SAFETY: a raw IPv4 socket (root only); closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return; // not root: counted as a skip by the test
    }
    let payload = b"forged source";
    let total = 20 + 8 + payload.len();
    let mut pkt = vec![0u8; total];
    pkt[0] = 0x45; // IPv4, 20-byte header
    pkt[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    pkt[8] = 64; // TTL
    pkt[9] = libc::IPPROTO_UDP as u8;
    pkt[12..16].copy_from_slice(&[127, 0, 0, 99]);
    pkt[16..20].copy_from_slice(&dst.ip().octets());
    pkt[20..22].copy_from_slice(&40000u16.to_be_bytes());
    pkt[22..24].copy_from_slice(&dst.port().to_be_bytes());
    pkt[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    pkt[28..].copy_from_slice(payload); // UDP checksum 0: none, valid over IPv4
    let to = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(dst.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    for _ in 0..n {
        // SAFETY: a valid buffer and address of the sizes given.
        unsafe {
            libc::sendto(
                fd,
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                (&to as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            );
        }
    }
    // SAFETY: closing the socket opened above.
    unsafe { libc::close(fd) };
}

/// Closes with a reset (SO_LINGER 0).
fn reset(s: TcpStream) {
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
}

/// Streams `n` bytes of the seeds' pattern and verifies every byte back.
fn stream(s: TcpStream, n: usize, patience: Duration) -> Result<(), String> {
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let writer = thread::spawn(move || -> std::io::Result<()> {
        let chunk = PATTERN.repeat(4096);
        let mut left = n;
        let mut at = 0;
        while left > 0 {
            let k = left.min(chunk.len() - at % 16);
            w.write_all(&chunk[at % 16..at % 16 + k])?;
            at += k;
            left -= k;
        }
        w.shutdown(Shutdown::Write)
    });
    let mut r = s;
    r.set_read_timeout(Some(patience)).ok();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0usize;
    let result = loop {
        match r.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(k) => {
                if let Some(i) = (0..k).find(|&i| buf[i] != UPPER[(got + i) % 16]) {
                    break Err(format!("stream of {n}: wrong byte at {}", got + i));
                }
                got += k;
            }
            Err(e) => break Err(format!("stream of {n}: read after {got}: {e}")),
        }
    };
    let w = writer.join().map_err(|_| "writer panicked".to_string())?;
    result?;
    w.map_err(|e| format!("stream of {n}: write: {e}"))?;
    (got == n)
        .then_some(())
        .ok_or(format!("stream of {n}: {got} bytes back"))
}

/// A few request/response rounds of random sizes, then a half-close.
fn rr<S: Read + Write>(mut s: S, rng: &mut Rng) -> Result<(), String> {
    for round in 0..(1 + rng.below(20)) {
        let len = 1 + rng.below(4096);
        let req: Vec<u8> = (0..len)
            .map(|i| b"abcxyz019 \n"[(i + round) % 11])
            .collect();
        s.write_all(&req).map_err(|e| format!("rr write: {e}"))?;
        let mut got = vec![0u8; len];
        s.read_exact(&mut got)
            .map_err(|e| format!("rr round {round} ({len} bytes): {e}"))?;
        if got != req.to_ascii_uppercase() {
            return Err(format!("rr round {round}: wrong reply"));
        }
    }
    Ok(())
}

fn udp(addr: &str, rng: &mut Rng) -> Result<(), String> {
    let sock = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    sock.connect(addr).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_millis(300))).ok();
    let mut buf = vec![0u8; 65536];
    for i in 0..(1 + rng.below(10)) {
        // Now and then the largest datagram there is.
        let len = if rng.below(10) == 0 {
            65507
        } else {
            rng.below(1400)
        };
        let req: Vec<u8> = (0..len).map(|k| b"udp-soak"[(k + i) % 8]).collect();
        let mut answered = false;
        for _ in 0..10 {
            sock.send(&req).map_err(|e| format!("udp send: {e}"))?;
            if let Ok(n) = sock.recv(&mut buf) {
                if buf[..n] != req.to_ascii_uppercase()[..] {
                    // A late reply to an earlier request: try again.
                    continue;
                }
                answered = true;
                break;
            }
        }
        if !answered {
            return Err(format!("udp datagram of {len} bytes never answered"));
        }
    }
    Ok(())
}

/// What the server looks like at rest.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
struct Rest {
    fds: usize,
    /// The server's own threads.
    threads: usize,
    children: usize,
}

/// The kernel's io_uring workers (`iou-wrk-*`) are threads of the process
/// that the kernel starts for operations it cannot complete inline and
/// keeps (the last idle one of a ring stays): they are counted apart, and
/// only bounded.
fn io_workers(pid: i32) -> usize {
    thread_names(pid)
        .iter()
        .filter(|n| n.starts_with("iou-wrk"))
        .count()
}

fn at_rest(pid: i32) -> Rest {
    Rest {
        fds: fd_count(pid),
        threads: thread_count(pid) - io_workers(pid),
        children: child_pids(pid).len(),
    }
}

fn thread_names(pid: i32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                .map(|n| n.trim().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn soak(model: &str, seed: u64, secs: u64) {
    let unix = sock_path("soak");
    let unix_ep = format!("unix:{}", unix.display());
    let srv = Server::start(
        &[
            "--model",
            model,
            "-q",
            "--idle-timeout",
            "1s",
            "--drain-timeout",
            "2s",
            "--max-conns",
            "48",
            "tcp://127.0.0.1:0",
            "udp://127.0.0.1:0",
            &unix_ep,
        ],
        3,
    );
    let pid = srv.pid();
    let one_at_a_time = model == "iterative" || model == "pool";
    let target = Arc::new(Target {
        tcp: srv.hostport(0).to_string(),
        udp: srv.hostport(1).to_string(),
        unix: unix.clone(),
        patience: if one_at_a_time { SECS(60) } else { SECS(30) },
        max_stream: if secs >= 30 { 256 << 20 } else { 16 << 20 },
    });
    let ctx = format!("model {model}, UPCASE_SOAK_SEED={seed} UPCASE_SOAK_SECS={secs}");

    // Warm up, so that what is allocated once is in the baseline.
    let mut rng = Rng(seed);
    for kind in [Kind::Rr, Kind::UnixRr, Kind::Udp, Kind::Stream] {
        client(kind, &target, &mut rng).unwrap_or_else(|e| panic!("{ctx}: warm-up: {e}"));
    }
    thread::sleep(Duration::from_millis(300));
    let rest = at_rest(pid);

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let done = Arc::new(AtomicU64::new(0));
    let workers = if one_at_a_time { 3 } else { 8 };
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let (target, stop, failures, done) =
                (target.clone(), stop.clone(), failures.clone(), done.clone());
            let mut rng = Rng(seed ^ (w as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let kind = KINDS[rng.below(KINDS.len())];
                    if let Err(e) = client(kind, &target, &mut rng) {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("worker {w}, {kind:?}: {e}"));
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    // The controller: watches memory and now and then stops the server.
    let mut max_rss = 0;
    let end = Instant::now() + SECS(secs);
    let mut next_stop = Instant::now() + Duration::from_millis(300 + rng.below(1500) as u64);
    while Instant::now() < end {
        let children: u64 = child_pids(pid).iter().map(|&c| rss_kib(c)).sum();
        max_rss = max_rss.max(rss_kib(pid) + children);
        if Instant::now() >= next_stop {
            let pause = Duration::from_millis(100 + rng.below(600) as u64);
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid, libc::SIGSTOP) };
            thread::sleep(pause);
            unsafe { libc::kill(pid, libc::SIGCONT) };
            next_stop = Instant::now() + Duration::from_millis(500 + rng.below(2000) as u64);
        }
        thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().expect("a soak worker panicked");
    }
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{ctx}: {} client(s) failed:\n{}\nserver log:\n{}",
        failures.len(),
        failures.join("\n"),
        srv.logs()
    );
    let mut srv = srv;
    assert!(
        srv.child.try_wait().unwrap().is_none(),
        "{ctx}: the server exited: {}",
        srv.logs()
    );
    assert!(
        max_rss <= RSS_LIMIT_KIB,
        "{ctx}: server memory reached {max_rss} KiB"
    );
    // Everything comes back: descriptors, threads, child processes.
    let deadline = Instant::now() + SECS(10);
    let mut now = at_rest(pid);
    while now != rest && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
        now = at_rest(pid);
    }
    assert_eq!(
        now,
        rest,
        "{ctx}: the server did not come back to rest; its threads: {:?}",
        thread_names(pid)
    );
    assert!(io_workers(pid) <= 4, "{ctx}: {:?}", thread_names(pid));
    let logs = srv.logs();
    assert!(!logs.contains("panicked"), "{ctx}: {logs}");
    eprintln!(
        "soak {model}: {} clients in {secs} s, max RSS {max_rss} KiB, at rest {rest:?}",
        done.load(Ordering::Relaxed)
    );
    // And it still drains as documented.
    let status = srv.signal_and_wait(libc::SIGTERM, SECS(10));
    assert_eq!(status.code(), Some(0), "{ctx}");
    assert!(!unix.exists(), "{ctx}: socket file left behind");
}

#[test]
fn soak_every_model() {
    let seed = seed();
    let secs = secs();
    eprintln!("soak: UPCASE_SOAK_SEED={seed} UPCASE_SOAK_SECS={secs}");
    if unsafe { libc::geteuid() } != 0 {
        skip("forged-source datagrams need root (a raw socket): sent none");
    }
    for model in ALL_MODELS {
        let only = std::env::var("UPCASE_SOAK_MODELS").unwrap_or_default();
        if !only.is_empty() && !only.split(',').any(|m| m == model) {
            continue;
        }
        if model_available(model) {
            soak(model, seed, secs);
        }
    }
}
