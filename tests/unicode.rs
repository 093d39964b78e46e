//! `--utf8` against a real Python's `str.upper()`: random text over all of
//! Unicode and over mixed scripts, cut at random places, through the real
//! server reading tiny blocks; invalid sequences at every position.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;

use common::*;

fn python(args: &[&str], stdin: &[u8]) -> Vec<u8> {
    require("python3", "python3");
    let mut cmd = Command::new("python3");
    cmd.arg(peer("unicode_upper.py")).args(args);
    let r = run(cmd, stdin, SECS(120));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    r.stdout
}

/// Characters both Unicode versions agree on: assigned in Python's version,
/// with an uppercase form made only of characters Python's version assigns.
fn shared_chars() -> Vec<char> {
    let ranges = String::from_utf8(python(&["assigned"], b"")).unwrap();
    let mut assigned = vec![false; 0x110000];
    for line in ranges.lines() {
        let (a, b) = line.split_once(' ').unwrap();
        let (a, b): (usize, usize) = (a.parse().unwrap(), b.parse().unwrap());
        assigned[a..=b].iter_mut().for_each(|x| *x = true);
    }
    (0..0x110000u32)
        .filter_map(char::from_u32)
        .filter(|&c| assigned[c as usize] && c.to_uppercase().all(|u| assigned[u as usize]))
        .collect()
}

/// Python's uppercase of each case, in one Python process.
fn python_upper(cases: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut framed = Vec::new();
    for c in cases {
        framed.extend_from_slice(&(c.len() as u32).to_be_bytes());
        framed.extend_from_slice(c);
    }
    let out = python(&["upper"], &framed);
    let mut res = Vec::new();
    let mut pos = 0;
    while pos < out.len() {
        let n = u32::from_be_bytes(out[pos..pos + 4].try_into().unwrap()) as usize;
        res.push(out[pos + 4..pos + 4 + n].to_vec());
        pos += 4 + n;
    }
    assert_eq!(res.len(), cases.len());
    res
}

/// Sends `data` in random pieces and returns the whole reply.
fn through(hostport: &str, data: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut s = TcpStream::connect(hostport).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(SECS(20))).unwrap();
    let mut w = s.try_clone().unwrap();
    let data = data.to_vec();
    let seed = rng.next();
    let writer = std::thread::spawn(move || {
        let mut r = Rng(seed | 1);
        let mut i = 0;
        while i < data.len() {
            let n = (1 + r.below(9)).min(data.len() - i);
            w.write_all(&data[i..i + n]).unwrap();
            i += n;
        }
        w.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).unwrap();
    writer.join().unwrap();
    reply
}

#[test]
fn random_text_matches_python_str_upper_at_any_cut() {
    let pool = shared_chars();
    // Mixed scripts: ASCII, Latin, Greek, Cyrillic, Armenian, Georgian,
    // ligatures, Deseret, Adlam, and the length-changing special cases.
    let mixed: Vec<char> = pool
        .iter()
        .copied()
        .filter(|&c| {
            matches!(c as u32, 0x20..=0x7E | 0xC0..=0x24F | 0x370..=0x3FF | 0x400..=0x52F
                | 0x531..=0x587 | 0x10A0..=0x10FF | 0x1F00..=0x1FFF | 0xFB00..=0xFB17
                | 0x10400..=0x1044F | 0x1E900..=0x1E95F)
        })
        .collect();
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    let mut cases = Vec::new();
    for i in 0..120 {
        let from = if i % 2 == 0 { &pool } else { &mixed };
        let len = 1 + rng.below(300);
        let s: String = (0..len).map(|_| from[rng.below(from.len())]).collect();
        cases.push(s.into_bytes());
    }
    let expect = python_upper(&cases);
    for block in ["1", "2", "3", "5", "64K"] {
        let srv = Server::start(&["-q", "--utf8", "--block", block, "tcp://127.0.0.1:0"], 1);
        for (i, (case, want)) in cases.iter().zip(&expect).enumerate() {
            let got = through(srv.hostport(0), case, &mut rng);
            assert!(
                got == *want,
                "block {block}, case {i}: {:?}\n got {:?}\nwant {:?}",
                String::from_utf8_lossy(case),
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(want)
            );
        }
    }
}

#[test]
fn invalid_sequences_at_every_position_pass_through() {
    let base = "aé€𝄞ßz ŉﬁ".as_bytes();
    let invalid: &[&[u8]] = &[
        b"\x80",
        b"\xbf\xbf",
        b"\xc0\xaf",
        b"\xe0\x80\xaf",
        b"\xed\xa0\x80",
        b"\xf4\x90\x80\x80",
        b"\xf0\x9f\x98",
        b"\xe2\x82",
        b"\xff",
    ];
    let mut cases = Vec::new();
    for bad in invalid {
        for i in 0..=base.len() {
            let mut c = base[..i].to_vec();
            c.extend_from_slice(bad);
            c.extend_from_slice(&base[i..]);
            cases.push(c);
        }
    }
    let expect = python_upper(&cases);
    let srv = Server::start(&["-q", "--utf8", "--block", "3", "tcp://127.0.0.1:0"], 1);
    let mut rng = Rng(42);
    for (case, want) in cases.iter().zip(&expect) {
        let got = through(srv.hostport(0), case, &mut rng);
        assert_eq!(&got, want, "case {case:?}");
    }
}

#[test]
fn strict_mode_closes_with_the_offset_logged() {
    let srv = Server::start(&["--utf8=strict", "tcp://127.0.0.1:0"], 1);
    let mut s = TcpStream::connect(srv.hostport(0)).unwrap();
    s.set_read_timeout(Some(SECS(10))).unwrap();
    s.write_all("straße\u{20}".as_bytes()).unwrap();
    s.write_all(b"\xffmore").unwrap();
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    assert!(
        "STRASSE ".as_bytes().starts_with(&reply),
        "nothing past the invalid byte: {reply:?}"
    );
    // The server logs the offset and goes on serving.
    let r = upcase_run(
        &["send", srv.addr(0), "--utf8"],
        "ok ß".as_bytes(),
        SECS(10),
    );
    assert_eq!(r.out(), "OK SS");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let logs = srv.logs();
    assert!(logs.contains("invalid UTF-8 at byte offset 8"), "{logs}");
}

#[test]
fn utf8_stream_chat_and_udp() {
    let srv = Server::start(
        &["-q", "--utf8", "tcp://127.0.0.1:0", "udp://127.0.0.1:0"],
        2,
    );
    let r = upcase_run(
        &["send", srv.addr(0), "--utf8", "--bytes", "8M"],
        b"",
        SECS(60),
    );
    assert_eq!(r.code(), 0, "{}\n{}", r.out(), r.stderr);
    assert_eq!(r.num("wrong"), 0);
    assert!(r.num("sent") >= 8 << 20);
    let r = upcase_run(
        &["chat", srv.addr(0), "--utf8"],
        "große ﬁsh\n\n".as_bytes(),
        SECS(10),
    );
    assert_eq!(r.out(), "Input: Output: GROSSE FISH\nInput: \n");
    let r = upcase_run(
        &["send", srv.addr(1), "--utf8"],
        "ωμέγα\n".as_bytes(),
        SECS(10),
    );
    assert_eq!(r.out(), "ΩΜΈΓΑ\n");
    // A datagram whose uppercase would not fit in a datagram is refused,
    // not truncated: 20,000 × ΐ (2 bytes) grows to 120,000 bytes.
    let big = "ΐ".repeat(20_000);
    let r = upcase_run(
        &[
            "send",
            srv.addr(1),
            "--utf8",
            "--rto",
            "100ms",
            "--retries",
            "0",
        ],
        format!("{big}\n").as_bytes(),
        SECS(10),
    );
    assert_eq!(r.code(), 4, "{}", r.stderr);
    assert!(r.stderr.contains("no reply"), "{}", r.stderr);
}
