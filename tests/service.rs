//! The service end to end: the real `upcase` binary as server and client,
//! over TCP (IPv4 and IPv6), UDP and Unix sockets on loopback.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering;

use common::*;

#[test]
fn pipe_over_tcp_ipv4_ipv6_and_unix_with_several_listeners() {
    let path = sock_path("multi");
    let unix = format!("unix:{}", path.display());
    let srv = Server::start(&["tcp://127.0.0.1:0", "[::1]:0", &unix], 3);
    assert!(
        srv.addr(0).starts_with("tcp://127.0.0.1:"),
        "{:?}",
        srv.endpoints
    );
    assert_ne!(srv.port(0), 0, "the real port is printed, not 0");
    assert!(
        srv.addr(1).starts_with("tcp://[::1]:"),
        "{:?}",
        srv.endpoints
    );
    assert_eq!(srv.addr(2), unix);
    for ep in &srv.endpoints {
        let r = upcase_run(&["send", ep], b"hello, World! 123\n", SECS(10));
        assert_eq!(r.code(), 0, "{ep}: {}", r.stderr);
        assert_eq!(r.out(), "HELLO, WORLD! 123\n", "{ep}");
    }
}

#[test]
fn pipe_preserves_every_byte_value_and_large_input() {
    let srv = Server::start(&["tcp://127.0.0.1:0"], 1);
    // 8 MiB of every byte value: far more than the kernel buffers hold, so a
    // client that wrote before reading would deadlock.
    let input: Vec<u8> = (0..8 << 20)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let r = upcase_run(&["send", srv.addr(0)], &input, SECS(30));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let expect: Vec<u8> = input.iter().map(|b| b.to_ascii_uppercase()).collect();
    assert!(
        r.stdout == expect,
        "reply differs from the uppercased input"
    );
}

#[test]
fn empty_input_gets_an_empty_reply() {
    let srv = Server::start(&["tcp://127.0.0.1:0"], 1);
    let r = upcase_run(&["send", srv.addr(0)], b"", SECS(10));
    assert_eq!((r.code(), r.stdout.len()), (0, 0), "{}", r.stderr);
}

#[test]
fn streams_one_gibibyte_verified() {
    let srv = Server::start(&["tcp://127.0.0.1:0", "-q"], 1);
    let r = upcase_run(&["send", srv.addr(0), "--bytes", "1G"], b"", SECS(120));
    assert_eq!(r.code(), 0, "{}\n{}", r.out(), r.stderr);
    assert_eq!(r.num("sent"), 1 << 30);
    assert_eq!(r.num("received"), 1 << 30);
    assert_eq!(r.num("wrong"), 0);
    eprintln!("1 GiB: {} MB/s", r.field("MB/s"));
}

#[test]
fn stream_json_summary_over_unix() {
    let path = sock_path("json");
    let unix = format!("unix:{}", path.display());
    let srv = Server::start(&[&unix], 1);
    let r = upcase_run(
        &["send", srv.addr(0), "--bytes", "3M", "--json"],
        b"",
        SECS(30),
    );
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).expect("one JSON object");
    assert_eq!(v["sent"], 3 << 20);
    assert_eq!(v["received"], 3 << 20);
    assert_eq!(v["wrong"], 0);
    assert!(v["mb_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn naive_client_small_size_completes() {
    let srv = Server::start(&["tcp://127.0.0.1:0"], 1);
    let r = upcase_run(
        &["send", srv.addr(0), "--bytes", "32", "--naive"],
        b"",
        SECS(10),
    );
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert_eq!(
        (r.num("sent"), r.num("received"), r.num("wrong")),
        (32, 32, 0)
    );
    assert!(
        // One or two copies in the first read: the server may answer the
        // first 16 bytes before the next arrive. The counts above say 32.
        r.stderr
            .contains("The first data received says \"CAPITALIZE THIS!"),
        "{}",
        r.stderr
    );
}

#[test]
fn naive_client_large_size_stalls_and_is_diagnosed() {
    let srv = Server::start(&["tcp://127.0.0.1:0"], 1);
    let r = upcase_run(
        &[
            "send",
            srv.addr(0),
            "--bytes",
            "256M",
            "--naive",
            "--stall",
            "1.5",
        ],
        b"",
        SECS(60),
    );
    assert_eq!(r.code(), 3, "expected the stall exit code: {}", r.stderr);
    assert!(r.stderr.contains("stalled"), "{}", r.stderr);
    assert!(r.stderr.contains("nobody reads"), "{}", r.stderr);
    let field = |k: &str| -> u64 {
        r.stderr
            .lines()
            .find_map(|l| l.trim().strip_prefix(k))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {}", r.stderr))
    };
    let sent = field("bytes sent:");
    assert!(sent > 0 && sent < 256 << 20, "sent {sent}");
    assert_eq!(
        field("bytes received:"),
        0,
        "the naive client reads nothing before the end"
    );
    // The kernel queues are what the diagnosis is about: ours hold data.
    assert!(
        field("send queue:") > 0 || field("receive queue:") > 0,
        "{}",
        r.stderr
    );
    // Well bounded: stall detection, not a hang.
    assert!(r.elapsed < SECS(45), "took {:?}", r.elapsed);
    // The server survives and serves the next client.
    let ok = upcase_run(&["send", srv.addr(0)], b"still here", SECS(10));
    assert_eq!(ok.out(), "STILL HERE");
}

#[test]
fn a_client_that_never_reads_does_not_block_others() {
    let srv = Server::start(&["tcp://127.0.0.1:0", "-q"], 1);
    let (hog, written) = start_hog(srv.hostport(0));

    let r = upcase_run(&["send", srv.addr(0), "--bytes", "64M"], b"", SECS(60));
    assert_eq!(
        r.code(),
        0,
        "second client failed while the hog hung on: {}",
        r.stderr
    );
    assert_eq!(r.num("received"), 64 << 20);

    // Backpressure, not buffering: the server's memory stays small.
    let rss_kb = rss_kib(srv.pid());
    assert!(
        rss_kb < 64 * 1024,
        "server RSS {rss_kb} KiB while a client never reads"
    );
    // Only kernel buffers (a few MB, autotuned) ever took the hog's bytes.
    let hog_total = written.load(Ordering::Relaxed);
    assert!(
        hog_total < 128 << 20,
        "the server took {hog_total} bytes from a client that never reads"
    );
    drop(hog);
}

#[test]
fn half_close_gets_the_whole_reply_then_eof() {
    let srv = Server::start(&["tcp://127.0.0.1:0"], 1);
    let mut s = TcpStream::connect(srv.hostport(0)).expect("connect");
    s.set_read_timeout(Some(SECS(10))).unwrap();
    let msg = b"capitalize this!".repeat(10_000);
    s.write_all(&msg).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).expect("read to EOF");
    assert_eq!(reply, b"CAPITALIZE THIS!".repeat(10_000));
}

#[test]
fn udp_lines_and_verified_datagrams() {
    let srv = Server::start(&["udp://127.0.0.1:0", "udp://[::1]:0"], 2);
    for ep in &srv.endpoints {
        let r = upcase_run(&["send", ep], b"one\ntwo words\n\nlast", SECS(10));
        assert_eq!(r.code(), 0, "{}", r.stderr);
        assert_eq!(r.out(), "ONE\nTWO WORDS\n\nLAST\n");
    }
    let r = upcase_run(
        &["send", srv.addr(0), "--bytes", "1M", "--size", "4K"],
        b"",
        SECS(60),
    );
    assert_eq!(r.code(), 0, "{}\n{}", r.out(), r.stderr);
    assert_eq!(r.num("sent"), 256);
    assert_eq!(r.num("answered"), 256);
    assert_eq!((r.num("lost"), r.num("wrong")), (0, 0));
    // The largest datagram there is.
    let r = upcase_run(
        &[
            "send",
            srv.addr(0),
            "--bytes",
            "65507",
            "--size",
            "65507",
            "--json",
        ],
        b"",
        SECS(10),
    );
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(
        (v["answered"].as_u64(), v["lost"].as_u64()),
        (Some(1), Some(0))
    );
}

#[test]
fn udp_without_a_server_is_reported() {
    // Bind a UDP port and close it, so that nothing listens there.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ep = format!("udp://127.0.0.1:{port}");
    let r = upcase_run(
        &["send", &ep, "--rto", "50ms", "--retries", "1"],
        b"hi\n",
        SECS(10),
    );
    assert_ne!(r.code(), 0);
    assert!(
        r.stderr.contains("refused") || r.stderr.contains("no reply"),
        "{}",
        r.stderr
    );
}

#[test]
fn chat_over_tcp_and_udp() {
    let srv = Server::start(&["tcp://127.0.0.1:0", "udp://127.0.0.1:0"], 2);
    for ep in &srv.endpoints {
        let r = upcase_run(
            &["chat", ep],
            b"hello\nworld of sockets\n\nignored\n",
            SECS(10),
        );
        assert_eq!(r.code(), 0, "{ep}: {}", r.stderr);
        assert_eq!(
            r.out(),
            "Input: Output: HELLO\nInput: Output: WORLD OF SOCKETS\nInput: \n",
            "{ep}"
        );
    }
    // A reply longer than one recv(1024) is read whole.
    let long = "x".repeat(5000);
    let r = upcase_run(
        &["chat", srv.addr(0)],
        format!("{long}\n").as_bytes(),
        SECS(10),
    );
    assert_eq!(
        r.out(),
        format!("Input: Output: {}\nInput: \n", long.to_uppercase())
    );
}

#[test]
fn sigterm_and_sigint_exit_zero_and_remove_the_unix_socket() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let path = sock_path("term");
        let unix = format!("unix:{}", path.display());
        let mut srv = Server::start(&[&unix, "tcp://127.0.0.1:0"], 2);
        assert!(path.exists());
        let r = upcase_run(&["send", srv.addr(1)], b"x", SECS(10));
        assert_eq!(r.out(), "X");
        let status = srv.signal_and_wait(sig, SECS(10));
        assert_eq!(status.code(), Some(0), "signal {sig}: {}", srv.logs());
        assert!(!path.exists(), "socket file left behind");
    }
}

#[test]
fn unix_socket_stale_file_is_replaced_live_one_is_an_error() {
    let path = sock_path("stale");
    // A stale socket file: bound, then its listener gone.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let unix = format!("unix:{}", path.display());
    let srv = Server::start(&[&unix], 1);
    let r = upcase_run(&["send", &unix], b"abc", SECS(10));
    assert_eq!(r.out(), "ABC");
    // A second server on the same live socket refuses to steal it.
    let r = upcase_run(&["serve", &unix], b"", SECS(10));
    assert_eq!(r.code(), 1);
    assert!(r.stderr.contains("already listening"), "{}", r.stderr);
    drop(srv);
}

/// Another user's socket, which we may not even probe, is never taken:
/// only a refused connect proves a socket file stale. --unix-mode sets who
/// may connect.
#[test]
fn a_socket_we_may_not_probe_is_never_replaced() {
    let dir = std::env::temp_dir().join(format!("upcase-test-{}-shared", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A shared folder anyone may write in (not sticky): the old check
    // would have let any user delete the file.
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let path = dir.join("s.sock");
    let unix = format!("unix:{}", path.display());
    let srv = Server::start(&["--unix-mode", "600", &unix], 1);
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    if unsafe { libc::geteuid() } != 0 {
        skip("needs root to run a second server as another user");
        return;
    }
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        BIN,
    ]);
    cmd.args(["serve", &unix]);
    let r = run(cmd, b"", SECS(10));
    assert_eq!(r.code(), 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("cannot be probed") && r.stderr.contains("not replacing it"),
        "{}",
        r.stderr
    );
    assert!(
        path.exists(),
        "the running server's socket file was removed"
    );
    let r = upcase_run(&["send", &unix], b"still here", SECS(10));
    assert_eq!(r.out(), "STILL HERE");
    drop(srv);
    let _ = std::fs::remove_dir_all(&dir);
    let r = upcase_run(&["serve", "--unix-mode", "999", &unix], b"", SECS(10));
    assert_eq!(r.code(), 2, "{}", r.stderr);
}

#[test]
fn default_listeners_are_the_seeds_port() {
    // Only checks the help text: port 1060 may be taken on a shared machine.
    let r = upcase_run(&["serve", "--help"], b"", SECS(10));
    assert!(r.out().contains("tcp://127.0.0.1:1060"), "{}", r.out());
    assert!(r.out().contains("udp://127.0.0.1:1060"), "{}", r.out());
}

#[test]
fn socket_options_reach_the_accepted_sockets() {
    require("ss", "iproute2");
    let srv = Server::start(
        &[
            "--keepalive",
            "30s",
            "--rcvbuf",
            "64K",
            "--sndbuf",
            "64K",
            "--nodelay",
            "--congestion",
            "reno",
            "--backlog",
            "16",
            "tcp://127.0.0.1:0",
        ],
        1,
    );
    let c = TcpStream::connect(srv.hostport(0)).unwrap();
    // Ask the kernel about the server's side of this connection.
    let port = srv.port(0).to_string();
    let ok = (0..50).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(20));
        let out = std::process::Command::new("ss")
            .args([
                "-tnoim",
                "state",
                "established",
                &format!("( sport = :{port} )"),
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        // SO_KEEPALIVE arms the keepalive timer; the kernel doubles SO_RCVBUF
        // and SO_SNDBUF (64K -> 131072); the accepted socket inherits the
        // listener's congestion control.
        text.contains("timer:(keepalive")
            && text.contains("rb131072")
            && text.contains("tb131072")
            && text.contains(" reno ")
    });
    assert!(
        ok,
        "keepalive, buffer sizes and congestion control not seen on the server's socket"
    );
    // The service works with them.
    drop(c);
    let r = upcase_run(&["send", srv.addr(0)], b"tuned", SECS(10));
    assert_eq!(r.out(), "TUNED");
}

#[test]
fn the_open_file_limit_is_raised_to_the_hard_limit() {
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -Sn 256 && exec {BIN} serve -q tcp://127.0.0.1:0"
        ))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let line = first_line(&mut child);
    assert!(line.starts_with("listening "), "{line}");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let nums: Vec<&str> = line
        .split_whitespace()
        .filter(|w| w.parse::<u64>().is_ok())
        .collect();
    assert_eq!(nums.len(), 2, "{line}");
    assert_eq!(
        nums[0], nums[1],
        "soft limit (started at 256) raised to the hard limit: {line}"
    );
}

/// `--busy-poll`: the server keeps asking for the next datagram instead of
/// sleeping, so a lone client's round trips no longer each wake it. Seen
/// in the server's sleeps (voluntary context switches) per datagram, on
/// every model that polls: about 1 without, far fewer with. Involuntary
/// switches are left out: on a busy machine they grow whatever the server
/// does. Replies are verified both ways,
/// and datagrams arriving many at a time (16 sockets) go through the
/// recvmmsg/sendmmsg batches.
#[test]
fn udp_busy_poll_keeps_the_server_awake() {
    for model in runnable(&["epoll", "uring", "threads"]) {
        let mut switches = Vec::new();
        for poll in ["0s", "2ms"] {
            let srv = Server::start(
                &[
                    "-q",
                    "--model",
                    model,
                    "--busy-poll",
                    poll,
                    "udp://127.0.0.1:0",
                ],
                1,
            );
            let pid = srv.pid().to_string();
            for conns in ["1", "16"] {
                let slept = sleeps(srv.pid());
                let r = upcase_run(
                    &["bench", srv.addr(0), "--conns", conns, "--duration", "1s"]
                        .into_iter()
                        .chain(["--json", "--no-intervals", "--server-pid", &pid])
                        .collect::<Vec<_>>(),
                    b"",
                    SECS(30),
                );
                assert_eq!(r.code(), 0, "{model} {poll}: {}", r.stderr);
                let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
                assert_eq!(v["errors"], 0, "{model} {poll}: {v}");
                assert!(v["messages"].as_u64().unwrap() > 100, "{model} {poll}: {v}");
                if conns == "1" {
                    let messages = v["messages"].as_f64().unwrap();
                    switches.push((sleeps(srv.pid()) - slept) as f64 / messages);
                }
            }
        }
        assert!(
            // Idle, about 1 and 0.02; with both cores busy elsewhere, about
            // 0.5 and 0.01 (datagrams queue up while the server waits for
            // a core, so fewer of them find it asleep).
            switches[0] > 0.2 && switches[1] < 0.1 && switches[0] > 4.0 * switches[1],
            "{model}: sleeps per datagram without and with --busy-poll: {switches:?}"
        );
    }
    let r = upcase_run(&["serve", "--busy-poll", "2s"], b"", SECS(10));
    assert_eq!(r.code(), 2, "{}", r.stderr);
    assert!(r.stderr.contains("at most 1s"), "{}", r.stderr);
}
