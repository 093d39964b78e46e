//! `serve --metrics`: scraped during load and during a drain, the counters
//! add up to what the clients did, on every model that can count; the text
//! passes Prometheus's own checker.

mod common;

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use common::*;

/// Every model but fork, whose connections live in child processes.
fn models() -> Vec<&'static str> {
    let countable: Vec<&str> = ALL_MODELS.into_iter().filter(|m| *m != "fork").collect();
    runnable(&countable)
}

/// The value of the sample `name` whose labels contain every one of `labels`
/// (0 when there is none yet).
fn value(text: &str, name: &str, labels: &[&str]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + SECS(10);
    while !ok() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn counters_add_up_to_what_the_clients_did() {
    for model in models() {
        let mut srv = Server::start(
            &[
                "-q",
                "--model",
                model,
                "--idle-timeout",
                "1s",
                "--metrics",
                "127.0.0.1:0",
                "tcp://127.0.0.1:0",
                "udp://127.0.0.1:0",
            ],
            3,
        );
        let at = srv.endpoints[2]
            .strip_prefix("http://")
            .and_then(|s| s.strip_suffix("/metrics"))
            .unwrap_or_else(|| panic!("{model}: {:?}", srv.endpoints))
            .to_string();
        let tcp = format!("listener=\"{}\"", srv.addr(0));
        let m = format!("model=\"{model}\"");

        // 20 clients, 1000 bytes each, one after another (iterative serves
        // one at a time), every reply checked.
        for _ in 0..20 {
            let mut c = TcpStream::connect(srv.hostport(0)).unwrap();
            c.write_all(&[b'a'; 1000]).unwrap();
            c.shutdown(std::net::Shutdown::Write).unwrap();
            let mut reply = Vec::new();
            c.read_to_end(&mut reply).unwrap();
            assert_eq!(reply, vec![b'A'; 1000], "{model}");
        }
        let u = UdpSocket::bind("127.0.0.1:0").unwrap();
        u.set_read_timeout(Some(SECS(5))).unwrap();
        for _ in 0..5 {
            u.send_to(b"dgram", srv.hostport(1)).unwrap();
            let mut b = [0u8; 16];
            let n = u.recv(&mut b).unwrap();
            assert_eq!(&b[..n], b"DGRAM", "{model}");
        }
        // One client that says nothing: open now, closed as idle in 1 s.
        let silent = TcpStream::connect(srv.hostport(0)).unwrap();
        let text = {
            let mut t = String::new();
            wait_for(&format!("{model}: the silent client shows as open"), || {
                t = scrape(&at);
                value(&t, "upcase_connections_open", &[&tcp]) == 1
            });
            t
        };
        assert_eq!(value(&text, "upcase_draining", &[&m]), 0, "{text}");
        wait_for(
            &format!("{model}: the silent client is closed as idle"),
            || {
                value(
                    &scrape(&at),
                    "upcase_connections_closed_total",
                    &["reason=\"idle\""],
                ) == 1
            },
        );
        let text = scrape(&at);
        let count = |name: &str, extra: &[&str]| {
            let mut labels = vec![m.as_str()];
            labels.extend_from_slice(extra);
            value(&text, name, &labels)
        };
        assert_eq!(
            count("upcase_connections_accepted_total", &[&tcp]),
            21,
            "{text}"
        );
        assert_eq!(count("upcase_connections_open", &[&tcp]), 0, "{text}");
        assert_eq!(
            count(
                "upcase_connections_closed_total",
                &[&tcp, "reason=\"done\""]
            ),
            20,
            "{text}"
        );
        assert_eq!(
            count("upcase_received_bytes_total", &[&tcp]),
            20_000,
            "{text}"
        );
        assert_eq!(count("upcase_sent_bytes_total", &[&tcp]), 20_000, "{text}");
        assert_eq!(
            count("upcase_datagrams_total", &["outcome=\"received\""]),
            5,
            "{text}"
        );
        assert_eq!(
            count("upcase_datagrams_total", &["outcome=\"answered\""]),
            5,
            "{text}"
        );
        drop(silent);

        // A drain that waits for a client: the metrics say so meanwhile.
        let mut held = TcpStream::connect(srv.hostport(0)).unwrap();
        held.write_all(b"x").unwrap();
        let mut one = [0u8; 1];
        held.read_exact(&mut one).unwrap();
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(srv.pid(), libc::SIGTERM) };
        wait_for(&format!("{model}: draining shows"), || {
            value(&scrape(&at), "upcase_draining", &[&m]) == 1
        });
        held.shutdown(std::net::Shutdown::Write).unwrap();
        let status = srv.signal_and_wait(0, SECS(10));
        assert!(status.success(), "{model}: {status:?}");
    }
}

/// Prometheus's own checker (promtool, from Debian's prometheus package)
/// accepts what a scrape returns, once every metric has samples.
#[test]
fn promtool_accepts_the_text() {
    let have = std::process::Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        skip(
            "promtool is not installed (Debian's prometheus package; scripts/test.sh installs it)",
        );
        return;
    }
    let srv = Server::start(
        &[
            "-q",
            "--metrics",
            "127.0.0.1:0",
            "tcp://127.0.0.1:0",
            "udp://127.0.0.1:0",
        ],
        3,
    );
    let at = srv.endpoints[2]
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .to_string();
    let r = upcase_run(&["send", srv.addr(0)], b"hello\n", SECS(10));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let r = upcase_run(&["send", srv.addr(1)], b"hello\n", SECS(10));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let text = scrape(&at);
    let mut check = std::process::Command::new("promtool");
    check.args(["check", "metrics"]);
    let out = run(check, text.as_bytes(), SECS(20));
    assert!(
        out.status.success(),
        "promtool: {}{}\n{text}",
        out.out(),
        out.stderr
    );
}

#[test]
fn metrics_refuse_what_they_cannot_count() {
    let r = upcase_run(
        &[
            "serve",
            "--model",
            "fork",
            "--metrics",
            "127.0.0.1:0",
            "tcp://127.0.0.1:0",
        ],
        b"",
        SECS(10),
    );
    assert_eq!(r.code(), 2, "{}", r.stderr);
    assert!(r.stderr.contains("fork"), "{}", r.stderr);
    let r = upcase_run(
        &["serve", "--metrics", "9100", "tcp://127.0.0.1:0"],
        b"",
        SECS(10),
    );
    assert_eq!(r.code(), 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("did you mean 127.0.0.1:9100"),
        "{}",
        r.stderr
    );
}

/// One GET on a connection of its own; the status line and the body.
fn get(at: &str, path: &str) -> (String, String) {
    let mut c = std::net::TcpStream::connect(at).expect("connect to the metrics port");
    c.set_read_timeout(Some(SECS(10))).unwrap();
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    c.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    (
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    )
}

/// Ten silent connections and one that drips a header byte every 300 ms
/// hold the metrics port, and every scrape still answers at once (the
/// hand-written reader served one connection at a time with a 2 s timeout
/// per read: 10 silent ones delayed a scrape by 19 s, the dripper by 15).
/// `/healthz` says 200 while serving and 503 once draining, for HAProxy's
/// `option httpchk` and Kubernetes probes.
#[test]
fn no_client_stalls_a_scrape_and_healthz_tells_a_drain() {
    let mut server = Server::start(
        &[
            "tcp://127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
            "--drain-timeout",
            "30s",
        ],
        2,
    );
    let at = server.hostport(1).trim_end_matches("/metrics").to_string();
    let silent: Vec<std::net::TcpStream> = (0..10)
        .map(|_| std::net::TcpStream::connect(&at).unwrap())
        .collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let dripper = {
        let (at, stop) = (at.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut c = std::net::TcpStream::connect(&at).unwrap();
            for b in b"GET /metrics HTTP/1.1\r\nHost: x\r\n"
                .iter()
                .cycle()
                .take(100)
            {
                if stop.load(std::sync::atomic::Ordering::Relaxed) || c.write_all(&[*b]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(300));
            }
        })
    };
    let mut slowest = Duration::ZERO;
    for _ in 0..5 {
        let start = std::time::Instant::now();
        let (status, body) = get(&at, "/metrics");
        slowest = slowest.max(start.elapsed());
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        assert!(body.contains("upcase_draining"), "{body}");
    }
    eprintln!("slowest of 5 scrapes beside 11 stalling clients: {slowest:?}");
    assert!(
        slowest < Duration::from_millis(500),
        "a scrape took {slowest:?}"
    );
    assert_eq!(
        get(&at, "/healthz"),
        ("HTTP/1.1 200 OK".into(), "ok\n".into())
    );
    assert!(get(&at, "/nothing").0.starts_with("HTTP/1.1 404"));

    // A client in the middle of its request keeps the drain going.
    let mut client = std::net::TcpStream::connect(server.hostport(0)).unwrap();
    client.write_all(b"abc").unwrap();
    let mut back = [0u8; 3];
    client.set_read_timeout(Some(SECS(10))).unwrap();
    client.read_exact(&mut back).unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(server.pid(), libc::SIGTERM) };
    let draining = eventually(SECS(5), || {
        get(&at, "/healthz").0.starts_with("HTTP/1.1 503")
    });
    assert!(
        draining,
        "/healthz still says {:?} while draining",
        get(&at, "/healthz")
    );
    assert_eq!(get(&at, "/healthz").1, "draining\n");
    client.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    let status = server.signal_and_wait(0, SECS(10));
    assert!(status.success());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = dripper.join();
    drop(silent);
}
