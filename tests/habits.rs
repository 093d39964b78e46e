//! What users bring from nc and socat, and the client's answers to servers
//! that misbehave: every case ends quickly, with the documented exit code
//! and a message that says what happened.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::thread;
use std::time::Duration;

use common::*;

const SECS: fn(u64) -> Duration = Duration::from_secs;

#[test]
fn nc_and_socat_spellings_reach_the_server() {
    let srv = Server::start(&["-q", "tcp://127.0.0.1:0", "udp://127.0.0.1:0"], 2);
    let port = srv.port(0).to_string();
    let tcp = format!("TCP:127.0.0.1:{port}");
    for args in [
        vec!["send", "127.0.0.1", port.as_str()],
        vec!["send", tcp.as_str()],
    ] {
        let r = upcase_run(&args, b"hello\n", SECS(10));
        assert_eq!(
            (r.code(), r.out()),
            (0, "HELLO\n".into()),
            "{args:?}: {}",
            r.stderr
        );
    }
    let udp = format!("UDP:127.0.0.1:{}", srv.port(1));
    let r = upcase_run(&["send", &udp], b"datagram\n", SECS(10));
    assert_eq!(
        (r.code(), r.out()),
        (0, "DATAGRAM\n".into()),
        "{}",
        r.stderr
    );

    let path = sock_path("socat");
    let listen = format!("UNIX-LISTEN:{}", path.display());
    let usrv = Server::start(&["-q", &listen], 1);
    let connect = format!("UNIX-CONNECT:{}", path.display());
    let r = upcase_run(&["send", &connect], b"unix\n", SECS(10));
    assert_eq!((r.code(), r.out()), (0, "UNIX\n".into()), "{}", r.stderr);
    drop(usrv);
}

#[test]
fn address_mistakes_get_the_form_to_write() {
    for (args, says) in [
        (&["serve", "1060"][..], "did you mean 127.0.0.1:1060"),
        (&["serve", ":1060"], "did you mean 127.0.0.1:1060"),
        (&["serve", "TCP-LISTEN:1060,fork"], "write 0.0.0.0:1060"),
        (&["serve", "UDP-LISTEN:1060"], "write udp://0.0.0.0:1060"),
        (
            &["send", "TCP:127.0.0.1:1060,crlf"],
            "write 'tcp://127.0.0.1:1060'",
        ),
        (&["send", "127.0.0.1:1060", "7"], "an address and a port"),
    ] {
        let r = upcase_run(args, b"", SECS(10));
        assert_eq!(r.code(), 2, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains(says), "{args:?}: {}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{args:?}: {}", r.stderr);
    }
}

#[test]
fn a_udp_port_in_use_is_refused_unless_shared_on_purpose() {
    let first = Server::start(&["-q", "udp://127.0.0.1:0"], 1);
    let taken = first.addr(0).to_string();
    let r = upcase_run(&["serve", &taken], b"", SECS(10));
    assert_eq!(r.code(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("address already in use"), "{}", r.stderr);
    assert!(r.out().is_empty(), "no listening line: {}", r.out());
    drop(first);

    // Both with --reuseport: the second one listens too.
    let a = Server::start(&["-q", "--reuseport", "udp://127.0.0.1:0"], 1);
    let b = Server::start(&["-q", "--reuseport", a.addr(0)], 1);
    assert_eq!(a.addr(0), b.addr(0));
}

#[test]
fn strict_utf8_resets_and_the_client_says_so() {
    let srv = Server::start(&["-q", "--utf8=strict", "tcp://127.0.0.1:0"], 1);
    let r = upcase_run(&["send", srv.addr(0)], b"abc\xff\xfedef", SECS(10));
    assert_eq!(r.code(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("reset"), "{}", r.stderr);
    // Valid input on the same server is still answered.
    let r = upcase_run(&["send", srv.addr(0)], "straße".as_bytes(), SECS(10));
    assert_eq!((r.code(), r.out()), (0, "STRASSE".into()), "{}", r.stderr);
}

/// A server that accepts and then says nothing: `-w` ends the wait.
#[test]
fn w_bounds_the_wait_for_a_silent_server() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let held = thread::spawn(move || {
        let (c, _) = l.accept().unwrap();
        thread::sleep(SECS(8));
        drop(c);
    });
    let r = upcase_run(&["send", "-w", "500ms", &addr], b"hi\n", SECS(10));
    assert_eq!(r.code(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("sent nothing for 500ms"), "{}", r.stderr);
    assert!(r.elapsed < SECS(4), "took {:?}", r.elapsed);
    drop(held);
}

/// A UDP port that is bound but never answers: `send` gives up after three
/// lost datagrams in a row, with the loss report, instead of 6 s a datagram.
#[test]
fn udp_send_gives_up_on_a_silent_server() {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let ep = format!("udp://{}", sock.local_addr().unwrap());
    let r = upcase_run(
        &["send", &ep, "--bytes", "1M", "--size", "1K", "-w", "300ms"],
        b"",
        SECS(20),
    );
    assert_eq!(r.code(), 4, "{}", r.stderr);
    assert!(
        r.stderr.contains("3 datagrams in a row got no reply"),
        "{}",
        r.stderr
    );
    assert_eq!(r.num("sent"), 3, "{}", r.out());
    assert_eq!(r.num("lost"), 3, "{}", r.out());
    assert!(r.elapsed < SECS(5), "took {:?}", r.elapsed);
}

/// A server that answers correctly, then keeps sending: `--bytes N` fails
/// (exit 4) as soon as more than N bytes came back, instead of reading
/// forever.
#[test]
fn more_reply_than_request_is_wrong() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = c.read(&mut buf) {
            if n == 0 {
                break;
            }
            if c.write_all(&buf[..n].to_ascii_uppercase()).is_err() {
                break;
            }
        }
        // Keep sending: a client that waited for the end would hang.
        while c.write_all(&[b'X'; 4096]).is_ok() {}
    });
    let r = upcase_run(&["send", &addr, "--bytes", "1M"], b"", SECS(20));
    assert_eq!(r.code(), 4, "{}", r.stderr);
    assert!(
        r.stderr.contains("sent more than it was sent"),
        "{}",
        r.stderr
    );
}

/// A server that resets while we are still sending: an error (exit 1), not
/// a "wrong reply" (4).
#[test]
fn a_reset_while_sending_is_an_error() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut buf = vec![0u8; 1024];
        let _ = c.read(&mut buf);
        socket2::SockRef::from(&c)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
    });
    let r = upcase_run(&["send", &addr, "--bytes", "64M"], b"", SECS(20));
    assert_eq!(r.code(), 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("reset") || r.stderr.contains("Broken pipe"),
        "{}",
        r.stderr
    );
}

/// The man page and completions are made from the same definitions as
/// --help: every command and a flag added this round are in them.
#[test]
fn man_page_and_completions_cover_every_command() {
    let man = upcase_run(&["man"], b"", SECS(10));
    assert_eq!(man.code(), 0, "{}", man.stderr);
    let page = man.out();
    assert!(
        page.starts_with(".ie") || page.contains(".TH upcase"),
        "{}",
        &page[..200.min(page.len())]
    );
    for section in ["UPCASE-SERVE", "UPCASE-SEND", "UPCASE-CHAT", "UPCASE-BENCH"] {
        assert!(page.contains(section), "no {section} in the man page");
    }
    assert!(page.contains("give\\-up\\-after") || page.contains("give-up-after"));
    for shell in ["bash", "zsh", "fish"] {
        let c = upcase_run(&["completions", shell], b"", SECS(10));
        assert_eq!(c.code(), 0, "{shell}: {}", c.stderr);
        assert!(c.out().contains("give-up-after"), "{shell}");
        assert!(c.out().contains("reuseport"), "{shell}");
    }
    let bad = upcase_run(&["completions", "tcsh"], b"", SECS(10));
    assert_eq!(bad.code(), 2, "{}", bad.stderr);
}

/// A UDP server that answers, slowly: --deadline bounds the whole run, and
/// what was not sent makes it incomplete (exit 4), with the report.
#[test]
fn udp_send_keeps_its_deadline() {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let ep = format!("udp://{}", sock.local_addr().unwrap());
    thread::spawn(move || {
        let mut buf = vec![0u8; 2048];
        sock.set_read_timeout(Some(SECS(10))).unwrap();
        while let Ok((n, peer)) = sock.recv_from(&mut buf) {
            thread::sleep(Duration::from_millis(50));
            let _ = sock.send_to(&buf[..n].to_ascii_uppercase(), peer);
        }
    });
    let r = upcase_run(
        &[
            "send",
            &ep,
            "--bytes",
            "100K",
            "--size",
            "1K",
            "--deadline",
            "500ms",
        ],
        b"",
        SECS(20),
    );
    assert_eq!(r.code(), 4, "{}", r.stderr);
    assert!(r.stderr.contains("--deadline reached"), "{}", r.stderr);
    let sent = r.num("sent");
    assert!((1..100).contains(&sent), "sent {sent}: {}", r.out());
    assert_eq!(r.num("answered"), sent, "{}", r.out());
    assert!(r.elapsed < SECS(3), "took {:?}", r.elapsed);
}

/// `send ... | head -1`: the reader closes the pipe after one line; upcase
/// stops quietly with success, as cat and nc do (it printed "writing to
/// stdout: Broken pipe" and exited 1).
#[test]
fn a_closed_stdout_ends_send_quietly() {
    let srv = Server::start(&["-q", "tcp://127.0.0.1:0"], 1);
    let script = format!(
        "yes hello | head -c 5000000 | {BIN} send {} | head -1; echo \"rc=${{PIPESTATUS[2]}}\"",
        srv.addr(0)
    );
    let out = std::process::Command::new("bash")
        .args(["-c", &script])
        .output()
        .expect("bash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stdout, "HELLO\nrc=0\n", "{stderr}");
    assert!(!stderr.contains("Broken pipe"), "{stderr}");
}
