//! tls:// with rustls, against peers nobody here wrote: openssl s_client
//! (TLS 1.2 and 1.3) and Python's ssl module; certificates made by the
//! openssl command for each run (a CA and a leaf for 127.0.0.1).

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

/// A CA, and a server certificate it signed for 127.0.0.1 and localhost.
struct Certs {
    dir: PathBuf,
}

impl Certs {
    fn make() -> Certs {
        require("openssl", "openssl");
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("upcase-tls-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("ext.cnf"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n",
        )
        .unwrap();
        let steps: [&[&str]; 3] = [
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-subj",
                "/CN=upcase test CA",
                "-days",
                "1",
            ],
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "key.pem",
                "-out",
                "req.csr",
                "-subj",
                "/CN=localhost",
            ],
            &[
                "x509",
                "-req",
                "-in",
                "req.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "cert.pem",
                "-days",
                "1",
                "-extfile",
                "ext.cnf",
            ],
        ];
        for args in steps {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .unwrap();
            assert!(out.status.success(), "openssl {args:?}: {out:?}");
        }
        Certs { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn serve_tls(certs: &Certs, model: &str, extra: &[&str]) -> Server {
    let (cert, key) = (certs.path("cert.pem"), certs.path("key.pem"));
    let mut args = vec![
        "-q",
        "--model",
        model,
        "--cert",
        &cert,
        "--key",
        &key,
        "tls://127.0.0.1:0",
        "tcp://127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let srv = Server::start(&args, 2);
    assert!(
        srv.endpoints[0].starts_with("tls://"),
        "{:?}",
        srv.endpoints
    );
    assert!(
        srv.endpoints[1].starts_with("tcp://"),
        "{:?}",
        srv.endpoints
    );
    srv
}

#[test]
fn every_model_speaks_tls_and_plain_side_by_side() {
    let certs = Certs::make();
    let ca = certs.path("ca.pem");
    for model in runnable(&ALL_MODELS) {
        let srv = serve_tls(&certs, model, &[]);
        let r = upcase_run(
            &["send", srv.addr(0), "--ca", &ca],
            b"hello tls\n",
            SECS(20),
        );
        assert_eq!(
            (r.code(), r.out()),
            (0, "HELLO TLS\n".into()),
            "{model}: {}",
            r.stderr
        );
        let r = upcase_run(
            &["send", srv.addr(0), "--ca", &ca, "--bytes", "16M"],
            b"",
            SECS(60),
        );
        assert_eq!(r.code(), 0, "{model}: {}", r.stderr);
        assert_eq!(r.num("received"), 16 << 20, "{model}");
        assert_eq!(r.num("wrong"), 0, "{model}");
        // The plain listener beside it is still plain.
        let r = upcase_run(&["send", srv.addr(1)], b"plain\n", SECS(20));
        assert_eq!(
            (r.code(), r.out()),
            (0, "PLAIN\n".into()),
            "{model}: {}",
            r.stderr
        );
    }
}

#[test]
fn openssl_s_client_tls12_and_tls13() {
    let certs = Certs::make();
    let srv = serve_tls(&certs, "epoll", &[]);
    for version in ["-tls1_2", "-tls1_3"] {
        // s_client ends at the end of its input: the input stays open for a
        // second, the reply's time to come back.
        let mut c = Command::new("sh");
        c.arg("-c").arg(format!(
            "(printf 'hello openssl\\n'; sleep 1) | openssl s_client {version} -connect {} -CAfile {} -verify_return_error -brief -no_ign_eof",
            srv.hostport(0),
            certs.path("ca.pem")
        ));
        let out = run(c, b"", SECS(20));
        assert!(
            out.status.success(),
            "{version}: {:?} {} {}",
            out.status,
            out.out(),
            out.stderr
        );
        assert!(
            out.out().contains("HELLO OPENSSL"),
            "{version}: {}",
            out.out()
        );
        let want = if version == "-tls1_2" {
            "TLSv1.2"
        } else {
            "TLSv1.3"
        };
        assert!(
            out.stderr.contains(&format!("Protocol version: {want}")),
            "{version}: {}",
            out.stderr
        );
        assert!(out.stderr.contains("Verification: OK"), "{}", out.stderr);
    }
}

/// Python's ssl: a reply, then a clean shutdown both ways (our
/// close_notify answers the client's; a TCP close without it would make
/// unwrap() fail).
#[test]
fn python_ssl_and_close_notify() {
    let certs = Certs::make();
    let srv = serve_tls(&certs, "uring", &[]);
    let script = r#"
import socket, ssl, sys
host, port = sys.argv[1].rsplit(':', 1)
ctx = ssl.create_default_context(cafile=sys.argv[2])
raw = socket.create_connection((host, int(port)))
s = ctx.wrap_socket(raw, server_hostname=host, suppress_ragged_eofs=False)
s.sendall(b'hello python\n')
got = b''
while not got.endswith(b'\n'):
    got += s.recv(100)
print(s.version(), got.decode().strip())
s.unwrap()
print('closed cleanly')
"#;
    let mut c = Command::new("python3");
    c.args(["-c", script, srv.hostport(0), &certs.path("ca.pem")]);
    let out = run(c, b"", SECS(20));
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(
        out.out(),
        "TLSv1.3 HELLO PYTHON\nclosed cleanly\n",
        "{}",
        out.stderr
    );
}

/// Bytes that are not TLS end that connection with a log line; the server
/// goes on serving TLS clients.
#[test]
fn plain_bytes_on_a_tls_listener_end_only_that_connection() {
    let certs = Certs::make();
    let mut srv = serve_tls(&certs, "async", &[]);
    let plain = format!("tcp://{}", srv.hostport(0));
    let r = upcase_run(&["send", &plain], b"GET / HTTP/1.0\r\n\r\n", SECS(20));
    assert!(
        !r.out().contains("GET"),
        "plain bytes were answered: {}",
        r.out()
    );
    let r = upcase_run(
        &["send", srv.addr(0), "--ca", &certs.path("ca.pem")],
        b"still here\n",
        SECS(20),
    );
    assert_eq!(
        (r.code(), r.out()),
        (0, "STILL HERE\n".into()),
        "{}",
        r.stderr
    );
    srv.signal_and_wait(libc::SIGTERM, SECS(10));
    assert!(srv.logs().contains("TLS:"), "{}", srv.logs());
}

#[test]
fn tls_arguments_are_checked() {
    let certs = Certs::make();
    let (cert, key) = (certs.path("cert.pem"), certs.path("key.pem"));
    for (args, says) in [
        (
            vec!["serve", "tls://127.0.0.1:0"],
            "needs --cert FILE and --key FILE",
        ),
        (
            vec!["serve", "--cert", &cert, "--key", &key, "tcp://127.0.0.1:0"],
            "none is given",
        ),
        (
            vec![
                "serve",
                "--cert",
                "/nonexistent.pem",
                "--key",
                &key,
                "tls://127.0.0.1:0",
            ],
            "--cert /nonexistent.pem",
        ),
        (
            vec!["serve", "--cert", &key, "--key", &key, "tls://127.0.0.1:0"],
            "no PEM certificate",
        ),
        (vec!["send", "tls://127.0.0.1:1"], "needs --ca FILE"),
        (
            vec!["send", "127.0.0.1:1", "--insecure"],
            "for tls:// addresses",
        ),
    ] {
        let r = upcase_run(&args, b"", SECS(10));
        assert_eq!(r.code(), 2, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains(says), "{args:?}: {}", r.stderr);
    }
    // A server whose certificate the client does not trust: exit 1, saying why.
    let srv = serve_tls(&certs, "epoll", &[]);
    let r = upcase_run(&["send", srv.addr(0), "--ca", &cert], b"x\n", SECS(20));
    assert_eq!(r.code(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("certificate"), "{}", r.stderr);
}

/// bench over TLS runs rr on the threads engine, every reply verified.
#[test]
fn bench_rr_over_tls() {
    let certs = Certs::make();
    let srv = serve_tls(&certs, "epoll", &[]);
    let r = upcase_run(
        &[
            "bench",
            srv.addr(0),
            "--ca",
            &certs.path("ca.pem"),
            "--conns",
            "8",
            "--duration",
            "1s",
            "--json",
            "--no-intervals",
        ],
        b"",
        SECS(30),
    );
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(v["engine"], "threads", "{v}");
    assert_eq!(v["errors"], 0, "{v}");
    assert!(v["messages"].as_u64().unwrap() > 100, "{v}");
    assert_eq!(v["conns_served"], 8, "{v}");
    let r = upcase_run(
        &["bench", srv.addr(0), "--insecure", "--mode", "stream"],
        b"",
        SECS(10),
    );
    assert_eq!(r.code(), 2, "{}", r.stderr);
}

/// A client that starts a handshake and never completes it, dripping a
/// byte of its hello every 300 ms, is closed at `--handshake-timeout` on
/// every model, though each byte is progress for `--idle-timeout` (5 min).
/// The log names it with the scheme it used and the reason; the same
/// listener's other clients are served meanwhile.
#[test]
fn an_unfinished_handshake_is_closed_at_its_deadline_on_every_model() {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    let certs = Certs::make();
    let (cert, key) = (certs.path("cert.pem"), certs.path("key.pem"));
    // The start of a ClientHello record of 512 bytes, never finished.
    let hello = [
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    for model in runnable(&ALL_MODELS) {
        let args = [
            "--model",
            model,
            "--cert",
            &cert,
            "--key",
            &key,
            "--handshake-timeout",
            "1s",
            "tls://127.0.0.1:0",
        ];
        let srv = Server::start(&args, 1);
        let start = Instant::now();
        let mut s = std::net::TcpStream::connect(srv.hostport(0)).expect("connect");
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut closed = None;
        for b in hello.iter().cycle().take(40) {
            let _ = s.write_all(&[*b]);
            match s.read(&mut [0u8; 64]) {
                Ok(0) => closed = Some(start.elapsed()),
                Ok(n) => panic!("{model}: {n} bytes for half a hello"),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => closed = Some(start.elapsed()),
            }
            break;
        }
        let closed = closed.unwrap_or_else(|| panic!("{model}: still open after 12 s"));
        assert!(
            closed >= Duration::from_millis(900) && closed < Duration::from_secs(4),
            "{model}: closed after {closed:?}"
        );
        let why = "ended (tls handshake) after";
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !seen.iter().any(|l: &String| l.contains(why)) && Instant::now() < deadline {
            if let Ok(l) = srv.stderr.recv_timeout(Duration::from_millis(100)) {
                seen.push(l);
            }
        }
        let line = seen.iter().find(|l| l.contains(why));
        let line = line.unwrap_or_else(|| panic!("{model}: {seen:#?}"));
        assert!(
            line.contains("connection tls://127.0.0.1:"),
            "{model}: {line}"
        );
        assert!(
            line.contains("no complete TLS handshake within 1s (--handshake-timeout)"),
            "{model}: {line}"
        );
    }
}

/// A ClientHello too large for rustls (over 64 KiB, in 16 KiB records)
/// ends that connection with the same words on every model: uring called
/// it a drain cut, the others an error.
#[test]
fn an_oversized_client_hello_ends_alike_on_every_model() {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    let certs = Certs::make();
    let (cert, key) = (certs.path("cert.pem"), certs.path("key.pem"));
    let mut wire = Vec::new();
    for i in 0..6 {
        wire.extend_from_slice(&[0x16, 0x03, 0x01, 0x40, 0x00]);
        let mut body = vec![0x41u8; 0x4000];
        if i == 0 {
            // A client_hello that claims 983,040 bytes.
            body[..4].copy_from_slice(&[0x01, 0x0f, 0x00, 0x00]);
        }
        wire.extend_from_slice(&body);
    }
    let mut reasons = Vec::new();
    for model in runnable(&ALL_MODELS) {
        let args = [
            "--model",
            model,
            "--cert",
            &cert,
            "--key",
            &key,
            "tls://127.0.0.1:0",
        ];
        let srv = Server::start(&args, 1);
        let mut s = std::net::TcpStream::connect(srv.hostport(0)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(&wire);
        let _ = s.read_to_end(&mut Vec::new());
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut seen = Vec::new();
        let line = loop {
            if let Some(l) = seen
                .iter()
                .find(|l: &&String| l.contains("connection tls://"))
            {
                break l.clone();
            }
            assert!(Instant::now() < deadline, "{model}: {seen:#?}");
            if let Ok(l) = srv.stderr.recv_timeout(Duration::from_millis(100)) {
                seen.push(l);
            }
        };
        assert!(
            line.contains("ended (error)") && line.contains("TLS:"),
            "{model}: {line}"
        );
        reasons.push(line.split("bytes: ").nth(1).unwrap_or_default().to_string());
    }
    reasons.dedup();
    assert_eq!(
        reasons.len(),
        1,
        "the reason differs by model: {reasons:#?}"
    );
}
