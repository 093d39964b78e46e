//! `--proxy-protocol`: the PROXY header a load balancer sends first, on
//! every model; missing, malformed and late headers; and Debian's haproxy
//! in front of two upcase instances, each in a network namespace of its
//! own, sending PROXY v2 with health checks.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Everything the server logged, waiting until `needle` shows (or `within`).
fn logs_until(server: &Server, seen: &mut Vec<String>, needle: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if seen.iter().any(|l| l.contains(needle)) {
            return true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        if let Ok(l) = server
            .stderr
            .recv_timeout(left.min(Duration::from_millis(100)))
        {
            seen.push(l);
        }
    }
}

/// Sends `bytes`, half-closes, reads to the end.
fn exchange(port: u16, bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(SECS(10)))?;
    s.write_all(bytes)?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut got = Vec::new();
    s.read_to_end(&mut got)?;
    Ok(got)
}

#[test]
fn every_model_takes_the_client_from_the_header_and_refuses_the_rest() {
    for model in runnable(&ALL_MODELS) {
        let server = Server::start(
            &[
                "tcp://127.0.0.1:0",
                "--model",
                model,
                "--proxy-protocol",
                "any",
                "--proxy-timeout",
                "1s",
            ],
            1,
        );
        let port = server.port(0);
        let mut seen = Vec::new();
        let got =
            exchange(port, b"PROXY TCP4 192.0.2.7 192.0.2.1 5555 1060\r\nhello").expect("reply");
        assert_eq!(got, b"HELLO", "{model}");
        assert!(
            logs_until(
                &server,
                &mut seen,
                "tcp://192.0.2.7:5555 via tcp://127.0.0.1:",
                SECS(5)
            ),
            "{model}: {seen:#?}"
        );
        assert!(
            logs_until(
                &server,
                &mut seen,
                "completed tcp://192.0.2.7:5555",
                SECS(5)
            ),
            "{model}: {seen:#?}"
        );

        // No header: the connection ends without a reply, with a reason.
        let got = exchange(port, b"hello").unwrap_or_default();
        assert!(got.is_empty(), "{model}: {got:?}");
        assert!(
            logs_until(
                &server,
                &mut seen,
                "expected a PROXY header (--proxy-protocol), got \"hello\"",
                SECS(5)
            ),
            "{model}: {seen:#?}"
        );

        // Late: half a header, then silence.
        let start = Instant::now();
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(SECS(10))).expect("timeout");
        s.write_all(b"PROXY TCP4 192.0.2.8").expect("write");
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        let waited = start.elapsed();
        assert!(got.is_empty(), "{model}");
        assert!(
            waited >= Duration::from_millis(900) && waited < SECS(5),
            "{model}: closed after {waited:?}"
        );
        assert!(
            logs_until(
                &server,
                &mut seen,
                "no complete PROXY header within 1s (--proxy-timeout)",
                SECS(5)
            ),
            "{model}: {seen:#?}"
        );

        // The others are served meanwhile, as ever.
        let got = exchange(port, b"PROXY UNKNOWN\r\nstill here").expect("reply");
        assert_eq!(got, b"STILL HERE", "{model}");
    }
}

#[test]
fn without_the_flag_a_proxy_header_is_data() {
    let server = Server::start(&["tcp://127.0.0.1:0"], 1);
    let got = exchange(
        server.port(0),
        b"PROXY TCP4 192.0.2.7 192.0.2.1 5555 1060\r\nhello",
    )
    .expect("reply");
    assert_eq!(got, b"PROXY TCP4 192.0.2.7 192.0.2.1 5555 1060\r\nHELLO");
}

#[test]
fn proxy_flags_are_checked() {
    for (args, needle) in [
        (&["serve", "--proxy-timeout", "2s"][..], "--proxy-protocol"),
        (
            &["serve", "udp://127.0.0.1:0", "--proxy-protocol", "v2"][..],
            "only UDP is given",
        ),
        (&["serve", "--proxy-protocol", "v3"][..], "v3"),
        (
            &["serve", "--proxy-protocol", "v1", "--proxy-timeout", "0"][..],
            "--proxy-timeout",
        ),
    ] {
        let r = upcase_run(args, b"", SECS(10));
        assert_eq!(r.code(), 2, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains(needle), "{args:?}: {}", r.stderr);
    }
}

/// Network namespaces made by this test, deleted when it ends.
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

fn in_ns(ns: &str, program: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, program]);
    c
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// haproxy (TCP mode, PROXY v2, `option httpchk GET /healthz` on each
/// instance's --metrics port) in a namespace of its own,
/// linked by veth pairs to two upcase namespaces and a client namespace:
///
/// ```text
/// client 10.201.3.2 ── 10.201.3.1 haproxy 10.201.1.1 ── 10.201.1.2 upcase A
///                                         10.201.2.1 ── 10.201.2.2 upcase B
/// ```
#[test]
fn behind_haproxy_with_proxy_v2_in_network_namespaces() {
    require("haproxy", "haproxy");
    let tag = std::process::id() % 100_000;
    let names = ["h", "a", "b", "c"].map(|n| format!("upc{n}{tag}"));
    let [h, a, b, c] = names.clone();
    let mut made = Namespaces(Vec::new());
    for ns in &names {
        if !ip(&["netns", "add", ns]) {
            skip(&format!(
                "cannot create a network namespace here (ip netns add {ns})"
            ));
            return;
        }
        made.0.push(ns.clone());
        assert!(ip(&["-n", ns, "link", "set", "lo", "up"]));
    }
    for (peer, net) in [(&a, 1), (&b, 2), (&c, 3)] {
        let (hv, pv) = (format!("h{net}x{tag}"), format!("p{net}x{tag}"));
        assert!(ip(&[
            "-n", &h, "link", "add", &hv, "type", "veth", "peer", "name", &pv, "netns", peer
        ]));
        assert!(ip(&[
            "-n",
            &h,
            "addr",
            "add",
            &format!("10.201.{net}.1/24"),
            "dev",
            &hv
        ]));
        assert!(ip(&["-n", &h, "link", "set", &hv, "up"]));
        assert!(ip(&[
            "-n",
            peer,
            "addr",
            "add",
            &format!("10.201.{net}.2/24"),
            "dev",
            &pv
        ]));
        assert!(ip(&["-n", peer, "link", "set", &pv, "up"]));
    }
    let start_upcase = |ns: &str, addr: &str, metrics: &str| {
        let mut child = in_ns(ns, BIN)
            .args([
                "serve",
                addr,
                "--proxy-protocol",
                "v2",
                "--drain-timeout",
                "1s",
                "--metrics",
                metrics,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("upcase in a namespace");
        let line = first_line(&mut child);
        assert_eq!(line, format!("listening tcp://{addr}"));
        let logs = lines_of(child.stderr.take().expect("stderr"));
        (Killed(child), logs)
    };
    let (up_a, logs_a) = start_upcase(&a, "10.201.1.2:1060", "10.201.1.2:9100");
    let (up_b, logs_b) = start_upcase(&b, "10.201.2.2:1060", "10.201.2.2:9100");

    let cfg = std::env::temp_dir().join(format!("upcase-haproxy-{tag}.cfg"));
    std::fs::write(
        &cfg,
        "global\n  maxconn 1000\n\
         defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n  retries 3\n  option redispatch\n\
         frontend front\n  bind 10.201.3.1:1060\n  default_backend upcase\n\
         backend upcase\n  balance roundrobin\n  option httpchk GET /healthz\n  http-check expect status 200\n\
         \x20 server a 10.201.1.2:1060 send-proxy-v2 check port 9100 inter 200ms fall 2 rise 1\n\
         \x20 server b 10.201.2.2:1060 send-proxy-v2 check port 9100 inter 200ms fall 2 rise 1\n",
    )
    .expect("haproxy config");
    let mut haproxy = in_ns(&h, "haproxy")
        .args(["-db", "-f"])
        .arg(&cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("haproxy");
    let haproxy_logs = lines_of(haproxy.stderr.take().expect("stderr"));
    let _haproxy = Killed(haproxy);

    // The client, in its own namespace, through haproxy.
    let send = |text: &str| -> (bool, String) {
        let out = in_ns(&c, BIN)
            .args(["send", "10.201.3.1:1060", "-w", "5s"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut p| {
                p.stdin.take().expect("stdin").write_all(text.as_bytes())?;
                p.wait_with_output()
            })
            .expect("send");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let deadline = Instant::now() + SECS(10);
    loop {
        let (ok, out) = send("ready?\n");
        if ok && out == "READY?\n" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "haproxy never answered: {:?}",
            haproxy_logs.try_iter().collect::<Vec<_>>()
        );
        thread::sleep(Duration::from_millis(100));
    }
    for i in 0..6 {
        let (ok, out) = send(&format!("hello {i}\n"));
        assert!(ok && out == format!("HELLO {i}\n"), "{out:?}");
    }
    // Both instances served, and each saw the client's own address.
    let seen_a: Vec<String> = logs_a.try_iter().collect();
    let seen_b: Vec<String> = logs_b.try_iter().collect();
    for (name, seen) in [("a", &seen_a), ("b", &seen_b)] {
        assert!(
            seen.iter()
                .any(|l| l.contains("tcp://10.201.3.2:") && l.contains("(PROXY v2)")),
            "upcase {name} never saw the client's address: {seen:#?}"
        );
        assert!(
            !seen.iter().any(|l| l.contains("ended (proxy header)")),
            "health checks and clients all send the header: {seen:#?}"
        );
    }

    // A 256 MiB stream on one instance while the other is killed: the
    // stream loses nothing, and new connections all go to the survivor.
    let stream = in_ns(&c, BIN)
        .args([
            "send",
            "10.201.3.1:1060",
            "--bytes",
            "256M",
            "--json",
            "--no-progress",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("stream");
    let deadline = Instant::now() + SECS(10);
    let stream_on_a = loop {
        if logs_a.try_iter().any(|l| l.contains("(PROXY v2)")) {
            break true;
        }
        if logs_b.try_iter().any(|l| l.contains("(PROXY v2)")) {
            break false;
        }
        assert!(
            Instant::now() < deadline,
            "the stream reached neither instance"
        );
        thread::sleep(Duration::from_millis(10));
    };
    let (survivor_logs, victim, _survivor) = if stream_on_a {
        (&logs_a, up_b, up_a)
    } else {
        (&logs_b, up_a, up_b)
    };
    drop(victim); // SIGKILL, mid-stream
    let mut answered = 0;
    for i in 0..20 {
        let (ok, out) = send(&format!("after {i}\n"));
        if ok && out == format!("AFTER {i}\n") {
            answered += 1;
        }
    }
    let out = stream.wait_with_output().expect("stream");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the stream on the survivor failed: {report} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        report.contains("\"received\":268435456") && report.contains("\"wrong\":0"),
        "{report}"
    );
    // haproxy may try the dead one before its check marks it down (then it
    // redispatches, `option redispatch`): nearly all are answered.
    assert!(
        answered >= 18,
        "only {answered} of 20 answered after one instance died"
    );
    let served: usize = survivor_logs
        .try_iter()
        .filter(|l| l.contains("tcp://10.201.3.2:") && l.contains("(PROXY v2)"))
        .count();
    assert!(
        served >= answered,
        "the survivor served them: {served} < {answered}"
    );
    let _ = std::fs::remove_file(&cfg);
    drop(made);
}

/// Descriptors of the server and of its children (the fork model serves
/// each connection in a child).
fn fds_of_tree(pid: i32) -> usize {
    fd_count(pid) + child_pids(pid).into_iter().map(fd_count).sum::<usize>()
}

/// What a plain TCP health check does, 300 times: connect, then close
/// before sending a PROXY header. Every model ends each one at once (uring
/// left them all in CLOSE_WAIT, past any timeout, and 20 of them locked
/// out everyone at `--max-conns 20`), on TCP and Unix listeners alike.
#[test]
fn a_connection_closed_before_its_header_is_closed_at_once_on_every_model() {
    for model in runnable(&ALL_MODELS) {
        let path = sock_path("proxy-close");
        let unix = format!("unix:{}", path.display());
        let server = Server::start(
            &[
                "tcp://127.0.0.1:0",
                &unix,
                "--model",
                model,
                "--proxy-protocol",
                "any",
                "--proxy-timeout",
                "60s",
                "--max-conns",
                "20",
            ],
            2,
        );
        let port = server.port(0);
        // One whole exchange first: some models open descriptors lazily.
        let hello = b"PROXY UNKNOWN\r\nwarm";
        assert_eq!(exchange(port, hello).expect("reply"), b"WARM", "{model}");
        let base = fds_of_tree(server.pid());
        let start = Instant::now();
        for i in 0..300 {
            if i % 2 == 0 {
                drop(TcpStream::connect(("127.0.0.1", port)).expect("connect"));
            } else {
                drop(std::os::unix::net::UnixStream::connect(&path).expect("connect"));
            }
        }
        // Each one ended, with its reason (the backlog held them, so
        // counting descriptors alone could pass before any was accepted).
        let mut ended = 0;
        let deadline = Instant::now() + SECS(10);
        while ended < 300 && Instant::now() < deadline {
            if let Ok(l) = server.stderr.recv_timeout(Duration::from_millis(100)) {
                ended += usize::from(l.contains("ended (proxy header)"));
            }
        }
        assert_eq!(ended, 300, "{model}: connections ended with a reason");
        let settled = eventually(SECS(1), || fds_of_tree(server.pid()) <= base);
        let took = start.elapsed();
        assert!(
            settled,
            "{model}: {} descriptors after 300 closed clients, {base} before",
            fds_of_tree(server.pid())
        );
        eprintln!("{model}: 300 header-less closes settled in {took:?}");
        // And nobody is locked out.
        let got = exchange(port, b"PROXY UNKNOWN\r\nserved").expect("reply");
        assert_eq!(got, b"SERVED", "{model}");
    }
}
