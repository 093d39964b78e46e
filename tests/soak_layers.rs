//! The soak over the layers around the bytes, on every model: TLS clients
//! (complete, half a handshake, dripping, a FIN without close_notify),
//! PROXY clients (complete, incomplete then closed, dripping), framed
//! clients (large complete messages, partial ones, never reading, and
//! `--utf8` replies three times longer than the request). Honest clients
//! must get every byte back, right; the others must be ended by the
//! server's own deadlines. Afterwards the server still runs, its
//! descriptors are back at their baseline, and its memory stayed within
//! `--max-buffered` plus a bound per connection.
//!
//! `UPCASE_SOAK_SECS` (default 1, as CI runs it) is the time per model and
//! layer; `UPCASE_SOAK_SEED` replays a run (every failure names it);
//! `UPCASE_SOAK_MODELS=epoll,uring` soaks only those models.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

fn seed() -> u64 {
    std::env::var("UPCASE_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
        | 1
}

fn secs() -> u64 {
    std::env::var("UPCASE_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

/// `--max-buffered` during the soak, and what memory may reach beyond the
/// baseline: the budget, and a bound per connection the clients hold.
const BUDGET: &str = "4M";
const RSS_GROWTH_LIMIT_KIB: u64 = 4 * 1024 + 64 * 1024;

/// Reads until the peer closes (or resets), within `limit`.
fn until_closed(s: &mut TcpStream, limit: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(start.elapsed()),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {}
            Err(_) => return Ok(start.elapsed()),
        }
        if start.elapsed() > limit {
            return Err(format!("still open after {limit:?}"));
        }
    }
}

fn tls_client_config() -> Arc<rustls::ClientConfig> {
    #[derive(Debug)]
    struct Any;
    impl rustls::client::danger::ServerCertVerifier for Any {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Any))
            .with_no_client_auth(),
    )
}

/// A TLS exchange of `text`; `notify`: end with close_notify (else only
/// the TCP half-close, which the server names a truncation but answers).
fn tls_exchange(
    addr: &str,
    cfg: &Arc<rustls::ClientConfig>,
    text: &[u8],
    notify: bool,
) -> Result<(), String> {
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").map_err(|e| e.to_string())?;
    let conn = rustls::ClientConnection::new(cfg.clone(), name).map_err(|e| e.to_string())?;
    let sock = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(SECS(20)))
        .map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    tls.write_all(text).map_err(|e| format!("write: {e}"))?;
    if notify {
        tls.conn.send_close_notify();
        tls.flush().map_err(|e| e.to_string())?;
    } else {
        tls.flush().map_err(|e| e.to_string())?;
        tls.sock
            .shutdown(Shutdown::Write)
            .map_err(|e| e.to_string())?;
    }
    let mut got = Vec::new();
    match tls.read_to_end(&mut got) {
        Ok(_) => {}
        Err(e) if got.len() == text.len() => return Err(format!("after the reply: {e}")),
        Err(e) => return Err(format!("read after {} bytes: {e}", got.len())),
    }
    if got != text.to_ascii_uppercase() {
        return Err(format!(
            "wrong reply: {} bytes for {}",
            got.len(),
            text.len()
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
enum Layer {
    Tls,
    Proxy,
    Framed,
    Utf8,
}

fn client(
    layer: Layer,
    addr: &str,
    rng: &mut Rng,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<(), String> {
    let drip_until_closed = |first: &[u8]| -> Result<(), String> {
        let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
        let start = Instant::now();
        for b in first.iter().cycle() {
            if s.write_all(&[*b]).is_err() {
                return Ok(()); // closed on us
            }
            if until_closed(&mut s, Duration::from_millis(150)).is_ok() {
                return Ok(());
            }
            if start.elapsed() > SECS(10) {
                return Err("a dripping client was never closed".into());
            }
        }
        Ok(())
    };
    match (layer, rng.below(4)) {
        (Layer::Tls, 0) => {
            let n = 1 + rng.below(200_000);
            let text: Vec<u8> = (0..n).map(|i| b'a' + (i % 26) as u8).collect();
            tls_exchange(addr, tls, &text, true)
        }
        (Layer::Tls, 1) => tls_exchange(addr, tls, b"a FIN without close_notify", false),
        (Layer::Tls, 2) => {
            // Half a handshake, then silence: closed at --handshake-timeout.
            let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
            s.write_all(&[0x16, 0x03, 0x01])
                .map_err(|e| e.to_string())?;
            until_closed(&mut s, SECS(10)).map(|_| ())
        }
        (Layer::Tls, _) => drip_until_closed(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]),
        (Layer::Proxy, 0 | 1) => {
            let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(SECS(20)))
                .map_err(|e| e.to_string())?;
            s.write_all(b"PROXY TCP4 192.0.2.9 192.0.2.1 4000 1060\r\nthrough a balancer")
                .map_err(|e| e.to_string())?;
            s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
            let mut got = Vec::new();
            s.read_to_end(&mut got).map_err(|e| e.to_string())?;
            (got == b"THROUGH A BALANCER")
                .then_some(())
                .ok_or(format!("got {got:?}"))
        }
        (Layer::Proxy, 2) => {
            // Half a header, then gone (a health check).
            let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
            s.write_all(b"PROXY TCP4 192.0")
                .map_err(|e| e.to_string())?;
            Ok(())
        }
        (Layer::Proxy, _) => drip_until_closed(b"PROXY TCP4 192.0.2.9 192.0.2.1 "),
        (Layer::Framed | Layer::Utf8, which) => {
            let unit: &[u8] = if matches!(layer, Layer::Utf8) {
                "ΐ".as_bytes()
            } else {
                b"abc"
            };
            let len = unit.len() * (1 + rng.below(300_000));
            let payload: Vec<u8> = unit.iter().copied().cycle().take(len).collect();
            let mut msg = (len as u32).to_be_bytes().to_vec();
            msg.extend_from_slice(&payload);
            let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
            match which {
                0 | 1 => {
                    // Honest: the whole message, and the whole reply.
                    let want = String::from_utf8_lossy(&payload)
                        .to_uppercase()
                        .into_bytes();
                    s.set_read_timeout(Some(SECS(30)))
                        .map_err(|e| e.to_string())?;
                    let mut w = s.try_clone().map_err(|e| e.to_string())?;
                    let writer = thread::spawn(move || w.write_all(&msg));
                    let mut got = vec![0u8; 4 + want.len()];
                    let r = s.read_exact(&mut got);
                    let _ = writer.join();
                    r.map_err(|e| format!("a framed reply of {} bytes: {e}", want.len()))?;
                    (got[4..] == want[..] && got[..4] == (want.len() as u32).to_be_bytes())
                        .then_some(())
                        .ok_or_else(|| "a wrong framed reply".to_string())
                }
                2 => {
                    // Part of a message, then gone.
                    let cut = 4 + rng.below(len);
                    let _ = s.write_all(&msg[..cut]);
                    Ok(())
                }
                _ => {
                    // Never reads: sends, then resets a moment later.
                    s.set_write_timeout(Some(Duration::from_millis(500)))
                        .map_err(|e| e.to_string())?;
                    let _ = s.write_all(&msg);
                    let _ = s.write_all(&msg);
                    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                    Ok(())
                }
            }
        }
    }
}

fn soak(model: &str, layer: Layer, certs: &(String, String), seed: u64, secs: u64) {
    let mut args: Vec<&str> = vec![
        "--model",
        model,
        "-q",
        "--idle-timeout",
        "2s",
        "--max-buffered",
        BUDGET,
    ];
    match layer {
        Layer::Tls => args.extend([
            "--cert",
            &certs.0,
            "--key",
            &certs.1,
            "--handshake-timeout",
            "1s",
            "tls://127.0.0.1:0",
        ]),
        Layer::Proxy => args.extend([
            "--proxy-protocol",
            "any",
            "--proxy-timeout",
            "1s",
            "tcp://127.0.0.1:0",
        ]),
        Layer::Framed => args.extend(["--framing", "length", "tcp://127.0.0.1:0"]),
        Layer::Utf8 => args.extend(["--framing", "length", "--utf8", "tcp://127.0.0.1:0"]),
    }
    let srv = Server::start(&args, 1);
    let pid = srv.pid();
    let addr = srv.hostport(0).to_string();
    let ctx = format!("model {model}, {layer:?}, UPCASE_SOAK_SEED={seed}");
    let tls = tls_client_config();
    let mut rng = Rng(seed);
    // Warm up with honest clients, so that what is allocated once is in
    // the baseline.
    for _ in 0..4 {
        let mut r = Rng(2); // picks the honest kinds first
        let _ = client(layer, &addr, &mut r, &tls);
    }
    let _ = client(layer, &addr, &mut rng, &tls);
    thread::sleep(Duration::from_millis(300));
    let (fds, rss) = (fd_count(pid), rss_kib(pid));
    let one_at_a_time = model == "iterative" || model == "pool";
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let done = Arc::new(AtomicU64::new(0));
    let max_rss = Arc::new(AtomicU64::new(rss));
    let workers = if one_at_a_time { 2 } else { 6 };
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let (addr, stop, failures, done, tls) = (
                addr.clone(),
                stop.clone(),
                failures.clone(),
                done.clone(),
                tls.clone(),
            );
            let mut rng = Rng(seed ^ (w as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Err(e) = client(layer, &addr, &mut rng, &tls) {
                        failures.lock().unwrap().push(format!("client {w}: {e}"));
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let end = Instant::now() + SECS(secs);
    while Instant::now() < end {
        max_rss.fetch_max(rss_kib(pid), Ordering::Relaxed);
        thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().expect("a soak client panicked");
    }
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{ctx}: {} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    let mut srv = srv;
    assert!(
        srv.child.try_wait().unwrap().is_none(),
        "{ctx}: the server exited"
    );
    let grew = max_rss.load(Ordering::Relaxed).saturating_sub(rss);
    // fork's connections live in its children, async's allocator may keep
    // what its tasks gave back (tests/robustness.rs says why).
    if model != "fork" && model != "async" {
        assert!(
            grew <= RSS_GROWTH_LIMIT_KIB,
            "{ctx}: memory grew by {grew} KiB"
        );
    }
    let back = eventually(SECS(10), || fd_count(pid) <= fds);
    assert!(
        back,
        "{ctx}: {} descriptors after, {fds} before",
        fd_count(pid)
    );
    eprintln!(
        "soak {model} {layer:?}: {} clients in {secs} s, RSS grew by at most {grew} KiB",
        done.load(Ordering::Relaxed)
    );
    let status = srv.signal_and_wait(libc::SIGTERM, SECS(15));
    assert_eq!(status.code(), Some(0), "{ctx}");
}

#[test]
fn soak_the_layers_on_every_model() {
    let (seed, secs) = (seed(), secs());
    eprintln!("soak of the layers: UPCASE_SOAK_SEED={seed} UPCASE_SOAK_SECS={secs}");
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).expect("a certificate");
    let dir = std::env::temp_dir().join(format!("upcase-soak-layers-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, signing_key.serialize_pem()).unwrap();
    let certs = (c.display().to_string(), k.display().to_string());
    let only = std::env::var("UPCASE_SOAK_MODELS").unwrap_or_default();
    for model in runnable(&ALL_MODELS) {
        if !only.is_empty() && !only.split(',').any(|m| m == model) {
            continue;
        }
        for layer in [Layer::Tls, Layer::Proxy, Layer::Framed, Layer::Utf8] {
            soak(model, layer, &certs, seed, secs);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
