//! `--framing` through real sockets on every model: each mode's messages,
//! whatever the reads; overflow, malformed input and end of input inside a
//! message close only that connection, with one log line naming the peer,
//! the mode, the limit and the offset; an endless line is bounded by MAX
//! and by --idle-timeout; the seeds' tcp_sixteen.py client talks to
//! `--framing fixed:16`.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const ALL: [&str; 8] = ALL_MODELS;

fn models() -> Vec<&'static str> {
    runnable(&ALL)
}

fn serve(model: &str, framing: &str, extra: &[&str]) -> Server {
    let mut args = vec!["--model", model, "--framing", framing];
    args.extend_from_slice(extra);
    args.push("tcp://127.0.0.1:0");
    Server::start(&args, 1)
}

/// Sends `parts` as separate writes (with a pause between them, so they
/// travel as separate segments), half-closes, and returns everything the
/// server sent until it closed.
fn exchange(srv: &Server, parts: &[&[u8]]) -> Vec<u8> {
    let mut s = TcpStream::connect(srv.hostport(0)).unwrap();
    s.set_read_timeout(Some(SECS(10))).unwrap();
    for p in parts {
        s.write_all(p).unwrap();
        thread::sleep(Duration::from_millis(20));
    }
    let _ = s.shutdown(Shutdown::Write);
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    got
}

/// Waits for a log line containing every one of `needles`.
fn logged(srv: &Server, needles: &[&str]) -> String {
    let deadline = Instant::now() + SECS(5);
    let mut log = String::new();
    while Instant::now() < deadline {
        log.push_str(&srv.logs());
        if log.lines().any(|l| needles.iter().all(|n| l.contains(n))) {
            return log;
        }
        thread::sleep(Duration::from_millis(20));
    }
    panic!("no log line with {needles:?}:\n{log}");
}

fn length_msg(payload: &[u8]) -> Vec<u8> {
    let mut m = (payload.len() as u32).to_be_bytes().to_vec();
    m.extend_from_slice(payload);
    m
}

#[test]
fn line_framing_in_every_model() {
    for model in models() {
        let srv = serve(model, "line:16", &[]);
        // Two writes, one read or two: the replies are the same two lines.
        assert_eq!(
            exchange(&srv, &[b"start\n", b"connect\n"]),
            b"START\nCONNECT\n",
            "{model}"
        );
        // One line in three writes; a CRLF kept; a last line without \n
        // answered as it is.
        assert_eq!(
            exchange(&srv, &[b"con", b"nect\r", b"\nta", b"il"]),
            b"CONNECT\r\nTAIL",
            "{model}"
        );
        // A line over the limit: the lines before it are answered, it and
        // what follows are not, and the connection is closed.
        assert_eq!(
            exchange(&srv, &[b"ok\n", b"0123456789abcdefX\nnever\n"]),
            b"OK\n",
            "{model}"
        );
        logged(
            &srv,
            &[
                "framing error",
                "tcp://127.0.0.1:",
                "line:16",
                "byte offset 3",
            ],
        );
        // Others are served all along.
        assert_eq!(exchange(&srv, &[b"after\n"]), b"AFTER\n", "{model}");
    }
}

#[test]
fn length_framing_in_every_model() {
    for model in models() {
        let srv = serve(model, "length:100", &[]);
        let mut wire = length_msg(b"hello");
        wire.extend(length_msg(b""));
        wire.extend(length_msg(b"world"));
        let mut want = length_msg(b"HELLO");
        want.extend(length_msg(b""));
        want.extend(length_msg(b"WORLD"));
        // Cut in the middle of a header and of a payload.
        assert_eq!(
            exchange(&srv, &[&wire[..2], &wire[2..7], &wire[7..]]),
            want,
            "{model}"
        );
        // Over the limit: closed on the header, the payload never read.
        let mut over = length_msg(b"ok");
        over.extend_from_slice(&101u32.to_be_bytes());
        assert_eq!(exchange(&srv, &[&over]), length_msg(b"OK"), "{model}");
        logged(
            &srv,
            &["length:100", "length of 101 over the limit", "offset 6"],
        );
        // End of input inside a message.
        assert_eq!(exchange(&srv, &[&[0, 0, 0, 9, b'a']]), b"", "{model}");
        logged(&srv, &["end of input inside a message"]);
    }
}

#[test]
fn netstring_framing_in_every_model() {
    for model in models() {
        let srv = serve(model, "netstring", &[]);
        assert_eq!(
            exchange(&srv, &[b"5:hel", b"lo,0:,", b"3:abc,"]),
            b"5:HELLO,0:,3:ABC,",
            "{model}"
        );
        assert_eq!(exchange(&srv, &[b"2:ok,03:abc,"]), b"2:OK,", "{model}");
        logged(&srv, &["netstring:8388608", "leading zero", "offset 5"]);
        assert_eq!(exchange(&srv, &[b"3:abcd"]), b"", "{model}");
        logged(&srv, &["without its closing ','"]);
    }
}

#[test]
fn fixed_framing_and_the_seeds_tcp_sixteen_client() {
    require("python3", "python3");
    for model in models() {
        let srv = serve(model, "fixed:16", &[]);
        let out = Command::new("python3")
            .arg(peer("tcp_sixteen.py"))
            .args(["client", "127.0.0.1", &srv.port(0).to_string()])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("The server said b'HI THERE, SERVER'"),
            "{model}: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // A partial message at end of input is not answered.
        assert_eq!(
            exchange(&srv, &[b"Hi there, ", b"serverand a bit"]),
            b"HI THERE, SERVER",
            "{model}"
        );
        logged(
            &srv,
            &["fixed:16", "(9 of 16 bytes): not answered", "offset 16"],
        );
    }
}

#[test]
fn an_endless_line_is_bounded_by_max_and_by_the_idle_timeout() {
    for model in models() {
        let srv = serve(model, "line:1K", &["--idle-timeout", "500ms"]);
        // Past MAX: closed as a framing error, having answered nothing.
        let mut s = TcpStream::connect(srv.hostport(0)).unwrap();
        s.set_read_timeout(Some(SECS(5))).unwrap();
        let _ = s.write_all(&[b'a'; 4096]);
        let mut buf = [0u8; 16];
        assert!(matches!(s.read(&mut buf), Ok(0) | Err(_)), "{model}");
        logged(&srv, &["line:1024", "longer than 1024 bytes"]);
        // Under MAX but never ended: the idle timeout closes it.
        let mut s = TcpStream::connect(srv.hostport(0)).unwrap();
        s.set_read_timeout(Some(SECS(5))).unwrap();
        s.write_all(&[b'a'; 100]).unwrap();
        let start = Instant::now();
        assert!(matches!(s.read(&mut buf), Ok(0) | Err(_)), "{model}");
        assert!(start.elapsed() >= Duration::from_millis(400), "{model}");
        logged(&srv, &["--idle-timeout"]);
    }
}

#[test]
fn utf8_framing_answers_the_new_length_and_fixed_is_refused() {
    let srv = serve("epoll", "length", &["--utf8"]);
    assert_eq!(
        exchange(&srv, &[&length_msg("straße".as_bytes())]),
        length_msg(b"STRASSE")
    );
    let srv = serve("epoll", "netstring", &["--utf8"]);
    assert_eq!(exchange(&srv, &[b"3:\xc3\x9f!,"]), b"3:SS!,");
    let r = upcase_run(
        &[
            "serve",
            "--utf8",
            "--framing",
            "fixed:16",
            "tcp://127.0.0.1:0",
        ],
        b"",
        SECS(5),
    );
    assert_eq!(r.code(), 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("uppercasing UTF-8 can change"),
        "{}",
        r.stderr
    );
    let r = upcase_run(&["serve", "--framing", "lines"], b"", SECS(5));
    assert_eq!(r.code(), 2, "{}", r.stderr);
    assert!(r.stderr.contains("unknown framing"), "{}", r.stderr);
}

#[test]
fn send_and_chat_speak_each_framing() {
    for (framing, input, want) in [
        ("line", &b"start\nconnect\n"[..], &b"START\nCONNECT\n"[..]),
        ("fixed:4", b"abcdefgh", b"ABCDEFGH"),
        ("length", b"hello\nworld\n", b"HELLO\nWORLD\n"),
        ("netstring", b"hello\n\nworld", b"HELLO\n\nWORLD\n"),
    ] {
        let srv = serve("epoll", framing, &["-q"]);
        let r = upcase_run(
            &["send", "--framing", framing, srv.addr(0)],
            input,
            SECS(10),
        );
        assert_eq!(r.code(), 0, "{framing}: {}", r.stderr);
        assert_eq!(r.out().as_bytes(), want, "{framing}");
        // Verified messages of --size bytes.
        let r = upcase_run(
            &[
                "send",
                "--framing",
                framing,
                srv.addr(0),
                "--bytes",
                "1M",
                "--size",
                "100",
            ],
            b"",
            SECS(30),
        );
        assert_eq!(r.code(), 0, "{framing}: {} {}", r.out(), r.stderr);
        assert_eq!(r.num("wrong"), 0, "{framing}");
        let msgs = r.field("messages");
        let (got, of) = msgs.split_once(" of ").unwrap();
        assert_eq!(got, of, "{framing}: {msgs}");
    }
    // A partial fixed message is not sent, and says so.
    let srv = serve("epoll", "fixed:4", &["-q"]);
    let r = upcase_run(
        &["send", "--framing", "fixed:4", srv.addr(0)],
        b"abcdef",
        SECS(10),
    );
    assert_eq!(r.out(), "ABCD");
    assert!(
        r.stderr
            .contains("last 2 bytes of stdin are not a whole 4-byte message"),
        "{}",
        r.stderr
    );
    // chat: one reply per line typed.
    let srv = serve("epoll", "line", &["-q"]);
    let r = upcase_run(
        &["chat", "--framing", "line", srv.addr(0)],
        b"hello\nworld\n\n",
        SECS(10),
    );
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert_eq!(
        r.out(),
        "Input: Output: HELLO\nInput: Output: WORLD\nInput: \n"
    );
}

#[test]
fn a_wrong_framed_reply_is_caught() {
    // A stream server answers a length-framed request with the header
    // uppercased too: 0x61 ('a') in a length becomes 'A' (0x41).
    let srv = serve("epoll", "stream", &["-q"]);
    let r = upcase_run(
        &[
            "send",
            "--framing",
            "length",
            srv.addr(0),
            "--bytes",
            "97",
            "--size",
            "97",
        ],
        b"",
        SECS(10),
    );
    assert_eq!(r.code(), 4, "{} {}", r.out(), r.stderr);
}

#[test]
fn bench_pipelines_framed_messages_and_verifies_them() {
    for framing in ["line", "length", "netstring", "fixed:64"] {
        let srv = serve("epoll", framing, &["-q"]);
        for (workload, k) in [("rr", "1"), ("rr", "8"), ("crr", "4")] {
            let r = upcase_run(
                &[
                    "bench",
                    srv.addr(0),
                    "--mode",
                    workload,
                    "--framing",
                    framing,
                    "--size",
                    "64",
                    "--pipeline",
                    k,
                    "--conns",
                    "4",
                    "--duration",
                    "300ms",
                    "--no-intervals",
                ],
                b"",
                SECS(30),
            );
            assert_eq!(
                r.code(),
                0,
                "{framing} {workload} {k}: {} {}",
                r.out(),
                r.stderr
            );
            assert_eq!(r.num("errors"), 0, "{framing}");
            assert!(r.num("msgs/s") > 0, "{framing}");
        }
    }
    let r = upcase_run(&["bench", "127.0.0.1:1", "--pipeline", "4"], b"", SECS(5));
    assert_eq!(r.code(), 2);
    assert!(
        r.stderr.contains("--pipeline needs --framing"),
        "{}",
        r.stderr
    );
}

#[test]
fn send_fixed_16_talks_to_the_seeds_tcp_sixteen_server() {
    require("python3", "python3");
    let mut child = Command::new("python3")
        .arg(peer("tcp_sixteen.py"))
        .args(["server", "127.0.0.1", "0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let port = listening_port(&first_line(&mut child));
    let r = upcase_run(
        &[
            "send",
            "--framing",
            "fixed:16",
            &format!("127.0.0.1:{port}"),
        ],
        b"Hi there, server",
        SECS(10),
    );
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert_eq!(r.out(), "Farewell, client");
}
