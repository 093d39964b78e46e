//! upcase against peers nobody here wrote: Python 3 ports of the seeds'
//! clients and servers (tests/peers/), OpenBSD netcat and socat.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn python(script: &str) -> Command {
    require("python3", "python3");
    let mut c = Command::new("python3");
    c.arg(peer(script));
    c
}

#[test]
fn seed_tcp_client_gets_capitalized_text() {
    let srv = Server::start(&["tcp://127.0.0.1:0", "tcp://[::1]:0"], 2);
    for i in 0..2 {
        let (host, port) = srv.hostport(i).rsplit_once(':').unwrap();
        let host = host.trim_matches(|c| c == '[' || c == ']');
        let mut cmd = python("tcp_deadlock.py");
        cmd.args(["client", host, port, "32"]);
        let r = run(cmd, b"", SECS(20));
        assert_eq!(r.code(), 0, "{}", r.stderr);
        assert!(
            // One or two copies: the server may answer the first 16 bytes
            // before the next arrive.
            r.out()
                .contains("The first data received says b'CAPITALIZE THIS!"),
            "{}",
            r.out()
        );
        assert!(r.out().contains("32 bytes received"), "{}", r.out());
    }
}

#[test]
fn seed_tcp_client_moderate_stream() {
    // 256 KiB: small enough that the seed's own write-then-read client
    // cannot deadlock on loopback buffers, large enough to span many blocks.
    let srv = Server::start(&["tcp://127.0.0.1:0"], 1);
    let mut cmd = python("tcp_deadlock.py");
    cmd.args(["client", "127.0.0.1", &srv.port(0).to_string(), "262144"]);
    let r = run(cmd, b"", SECS(30));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert!(r.out().contains("262144 bytes received"), "{}", r.out());
}

#[test]
fn seed_interactive_clients_tcp_and_udp() {
    let srv = Server::start(&["tcp://127.0.0.1:0", "udp://127.0.0.1:0"], 2);
    for (script, i) in [("client1.py", 0), ("client2.py", 1)] {
        let mut cmd = python(script);
        cmd.args(["127.0.0.1", &srv.port(i).to_string()]);
        let r = run(cmd, b"hello\nnetwork programming\n\n", SECS(20));
        assert_eq!(r.code(), 0, "{script}: {}", r.stderr);
        assert_eq!(
            r.out(),
            "Input: Output: HELLO\nInput: Output: NETWORK PROGRAMMING\nInput: ",
            "{script}"
        );
    }
    // client2.py said goodbye with an empty datagram; unlike server2.py,
    // upcase keeps serving.
    let r = upcase_run(&["send", srv.addr(1)], b"still up\n", SECS(10));
    assert_eq!(r.out(), "STILL UP\n");
}

/// Starts a Python seed server and returns it with its port.
fn seed_server(script: &str, args: &[&str]) -> (std::process::Child, u16) {
    let mut child = python(script)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn python server");
    // "Listening at ('127.0.0.1', 40123)"; the server prints it at once.
    let port = listening_port(&first_line(&mut child));
    (child, port)
}

#[test]
fn upcase_client_against_seed_tcp_server() {
    let (mut child, port) = seed_server("tcp_deadlock.py", &["server", "127.0.0.1", "0"]);
    let ep = format!("127.0.0.1:{port}");
    let r = upcase_run(&["send", &ep, "--bytes", "4M"], b"", SECS(60));
    let r2 = upcase_run(&["send", &ep], b"pipe mode too\n", SECS(20));
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(r.code(), 0, "{}\n{}", r.out(), r.stderr);
    assert_eq!((r.num("received"), r.num("wrong")), (4 << 20, 0));
    assert_eq!(r2.out(), "PIPE MODE TOO\n");
}

#[test]
fn upcase_udp_client_against_seed_udp_server() {
    let (mut child, port) = seed_server("server2.py", &["127.0.0.1", "0"]);
    let ep = format!("udp://127.0.0.1:{port}");
    let r = upcase_run(
        &["send", &ep, "--bytes", "64K", "--size", "1K"],
        b"",
        SECS(30),
    );
    let lines = upcase_run(&["send", &ep], b"a\nb\n", SECS(10));
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(r.code(), 0, "{}\n{}", r.out(), r.stderr);
    assert_eq!((r.num("answered"), r.num("lost")), (64, 0));
    assert_eq!(lines.out(), "A\nB\n");
}

#[test]
fn openbsd_netcat_over_tcp_and_unix() {
    require("nc", "netcat-openbsd");
    let path = sock_path("nc");
    let unix = format!("unix:{}", path.display());
    let srv = Server::start(&["tcp://127.0.0.1:0", &unix], 2);
    let input = b"nc speaks to upcase\n".repeat(1000);
    let expect = String::from_utf8(input.to_ascii_uppercase()).unwrap();

    let mut cmd = Command::new("nc");
    // -N: shutdown(SHUT_WR) on end of stdin, as upcase's client does.
    cmd.args(["-N", "127.0.0.1", &srv.port(0).to_string()]);
    let r = run(cmd, &input, SECS(20));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert_eq!(r.out(), expect);

    let mut cmd = Command::new("nc");
    cmd.args(["-N", "-U"]).arg(&path);
    let r = run(cmd, &input, SECS(20));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert_eq!(r.out(), expect);
}

#[test]
fn socat_over_tcp_unix_and_udp() {
    require("socat", "socat");
    let path = sock_path("socat");
    let unix = format!("unix:{}", path.display());
    let srv = Server::start(&["tcp://[::1]:0", &unix, "udp://127.0.0.1:0"], 3);
    let input = b"socat too: 0123456789 abcdefghijklmnopqrstuvwxyz\n".repeat(2000);
    let expect = input.to_ascii_uppercase();
    for target in [
        format!("TCP6:[::1]:{}", srv.port(0)),
        format!("UNIX-CONNECT:{}", path.display()),
    ] {
        let mut cmd = Command::new("socat");
        cmd.args(["-t", "5", "-", &target]);
        let start = Instant::now();
        let r = run(cmd, &input, SECS(20));
        assert_eq!(r.code(), 0, "{target}: {}", r.stderr);
        assert!(r.stdout == expect, "{target}: reply differs");
        assert!(start.elapsed() < Duration::from_secs(15));
    }
    let mut cmd = Command::new("socat");
    cmd.args(["-t", "1", "-", &format!("UDP:127.0.0.1:{}", srv.port(2))]);
    let r = run(cmd, b"one datagram", SECS(20));
    assert_eq!(r.out(), "ONE DATAGRAM");
}
