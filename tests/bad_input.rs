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
    // Nor when the metrics port is taken, with or without workers.
    let metrics = taken.local_addr().unwrap().to_string();
    for procs in [&[][..], &["--processes", "2"]] {
        let mut args = vec!["serve", "tcp://127.0.0.1:0", "--metrics", &metrics];
        args.extend_from_slice(procs);
        let r = upcase_run(&args, b"", SECS(10));
        assert_eq!(r.code(), 1, "{args:?}: {}", r.stderr);
        assert!(
            r.stderr.contains("--metrics: ") && r.stderr.contains("address already in use"),
            "{args:?}: {}",
            r.stderr
        );
        assert_eq!(r.out(), "", "{args:?}: announced, then failed");
    }
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
    for mode in ["stream", "rr", "crr", "hold"] {
        fails(
            &["bench", &ep, "--mode", mode, "--duration", "200ms"],
            1,
            "connection refused",
        );
    }
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

#[test]
fn errors_are_one_line_and_say_where_to_look() {
    for args in [
        &["serve", "--model", "nope"][..],
        &["send", "127.0.0.1:1", "--naive"],
        &["send"],
        &["bogus"],
    ] {
        let r = upcase_run(args, b"", SECS(10));
        assert_eq!(r.code(), 2, "{args:?}");
        assert_eq!(
            r.stderr.trim_end().lines().count(),
            1,
            "{args:?}: {:?}",
            r.stderr
        );
        assert!(r.stderr.contains("--help"), "{args:?}: {}", r.stderr);
    }
}

#[test]
fn negative_and_zero_sizes() {
    fails(&["send", "127.0.0.1:1", "--bytes", "-1"], 2, "invalid size");
    fails(
        &["send", "udp://127.0.0.1:1", "--bytes", "1K", "--size", "0"],
        2,
        "greater than zero",
    );
    fails(&["serve", "--rcvbuf", "0"], 2, "greater than zero");
    fails(&["serve", "--workers", "0"], 2, "--workers");
    fails(&["bench", "127.0.0.1:1", "--rate", "0"], 2, "--rate");
    fails(&["bench", "127.0.0.1:1", "--rate", "-5"], 2, "--rate");
    fails(&["serve", "--drain-timeout", "-2"], 2, "zero or more");
}

#[test]
fn conflicting_flags() {
    fails(&["-q", "-v", "serve"], 2, "cannot be used with");
    fails(
        &["send", "127.0.0.1:1", "--bytes", "1K", "--naive", "--utf8"],
        2,
        "cannot be used with",
    );
    fails(
        &["bench", "127.0.0.1:1", "--mode", "stream", "--rate", "10"],
        2,
        "not stream",
    );
    fails(&["bench"], 2, "<ADDR>");
    fails(
        &["bench", "127.0.0.1:1", "--models", "async"],
        2,
        "--compare",
    );
    fails(&["serve", "--utf8=maybe"], 2, "lenient, strict");
}

#[test]
fn privileged_port_without_privileges() {
    // As root this would bind; run as nobody, as an ordinary user would.
    let unpriv = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse::<u16>().ok())
        .unwrap_or(1024);
    if unpriv <= 80 {
        skip("this kernel lets anyone bind port 80");
        return;
    }
    let is_root = unsafe { libc::geteuid() } == 0;
    let mut cmd = if is_root {
        let mut c = std::process::Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            BIN,
        ]);
        c
    } else {
        upcase()
    };
    cmd.args(["serve", "tcp://127.0.0.1:80"]);
    let r = run(cmd, b"", SECS(10));
    assert_eq!(r.code(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("ports below 1024"), "{}", r.stderr);
    assert_eq!(r.stderr.trim_end().lines().count(), 1, "{}", r.stderr);
}

#[test]
fn unknown_congestion_control() {
    let why = "no such congestion control";
    fails(
        &["serve", "--congestion", "nosuch", "tcp://127.0.0.1:0"],
        1,
        why,
    );
    let srv = Server::start(&["-q", "tcp://127.0.0.1:0"], 1);
    fails(&["send", srv.addr(0), "--congestion", "nosuch"], 1, why);
    fails(
        &[
            "bench",
            srv.addr(0),
            "--congestion",
            "nosuch",
            "--duration",
            "200ms",
        ],
        1,
        why,
    );
}

/// Every duration flag is range-checked: exit 2 with one line, never a
/// panic (a backtrace, exit 101) at parse time or later.
#[test]
fn huge_durations_and_rates_are_refused() {
    for big in ["99999999999999999999", "1e19", "400d"] {
        for args in [
            &["serve", "--idle-timeout", big][..],
            &["serve", "--drain-timeout", big],
            &["serve", "--keepalive", big],
            &["send", "127.0.0.1:1", "--stall", big, "--bytes", "1K"],
            &["send", "udp://127.0.0.1:1", "--timeout", big],
            &["bench", "127.0.0.1:1", "--duration", big],
        ] {
            fails(args, 2, "at most 365 days");
        }
    }
    fails(
        &["bench", "127.0.0.1:1", "--rate", "1e-300"],
        2,
        "from 0.001 to 1e9",
    );
    fails(
        &["send", "udp://127.0.0.1:1", "--retries", "99"],
        2,
        "retries",
    );
}
