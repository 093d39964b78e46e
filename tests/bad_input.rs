//! Bad input gets a clear one-line error and a non-zero exit code.

mod common;

use common::*;

fn fails(args: &[&str], code: i32, needle: &str) {
    let r = upcase_run(args, b"", SECS(10));
    assert_eq!(r.code(), code, "{args:?}: {}", r.stderr);
    assert!(
        r.stderr.contains(needle),
        "{args:?}: expected {needle:?} in {:?}",
        r.stderr
    );
}

#[test]
fn port_in_use() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let ep = format!("tcp://{}", taken.local_addr().unwrap());
    fails(&["serve", &ep], 1, "address already in use");
    // Nothing was announced for the failed listener set.
    let r = upcase_run(&["serve", "tcp://127.0.0.1:0", &ep], b"", SECS(10));
    assert_eq!(r.code(), 1);
    assert_eq!(r.out(), "", "no listening line when a listener fails");
}

#[test]
fn malformed_addresses() {
    fails(&["send", "127.0.0.1"], 2, "missing port");
    fails(&["send", "127.0.0.1:99999"], 2, "0 to 65535");
    fails(&["send", "ftp://x:1"], 2, "unknown scheme");
    fails(&["send", "::1:80"], 2, "brackets");
    fails(&["serve", "unix:"], 2, "empty Unix socket path");
}

#[test]
fn refused_connection() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let ep = format!("127.0.0.1:{port}");
    fails(&["send", &ep], 1, "connection refused");
    fails(&["send", &ep, "--bytes", "1M"], 1, "connection refused");
    fails(&["chat", &ep], 1, "connection refused");
}

#[test]
fn missing_unix_path() {
    let path = sock_path("missing");
    fails(
        &["send", &format!("unix:{}", path.display())],
        1,
        "no such socket file",
    );
    fails(
        &["serve", "unix:/nonexistent-dir/x.sock"],
        1,
        "does not exist",
    );
    let long = format!("unix:/tmp/{}", "x".repeat(120));
    fails(&["serve", &long], 1, "too long");
}

#[test]
fn not_a_socket_is_never_replaced() {
    let path = sock_path("file");
    std::fs::write(&path, b"precious").unwrap();
    fails(
        &["serve", &format!("unix:{}", path.display())],
        1,
        "not a socket",
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn bad_sizes_and_flags() {
    fails(
        &["send", "127.0.0.1:1", "--bytes", "0"],
        2,
        "greater than zero",
    );
    fails(
        &["send", "127.0.0.1:1", "--bytes", "lots"],
        2,
        "invalid size",
    );
    fails(&["send", "127.0.0.1:1", "--naive"], 2, "--bytes");
    fails(
        &["send", "udp://127.0.0.1:1", "--bytes", "1K", "--naive"],
        2,
        "UDP",
    );
    fails(
        &["send", "udp://127.0.0.1:1", "--size", "70000"],
        2,
        "65507",
    );
    fails(&["serve", "--block", "0"], 2, "greater than zero");
    fails(&["serve", "--max-conns", "0"], 2, "max-conns");
    fails(&["serve", "--model", "nope"], 2, "invalid value");
    fails(
        &["send", "127.0.0.1:1", "--stall", "0"],
        2,
        "greater than zero",
    );
}
