//! `upcase bench`: every workload against the real server, verification
//! that catches a wrong server, and the side-by-side comparison.

mod common;

use std::process::{Command, Stdio};

use common::*;

fn bench_json(args: &[&str]) -> (Run, serde_json::Value) {
    let mut all = vec!["bench", "--json", "--no-intervals"];
    all.extend_from_slice(args);
    let r = upcase_run(&all, b"", SECS(60));
    let v = serde_json::from_slice(&r.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", r.out(), r.stderr));
    (r, v)
}

#[test]
fn every_workload_runs_and_verifies() {
    let srv = Server::start(&["-q", "tcp://127.0.0.1:0", "udp://127.0.0.1:0"], 2);
    let pid = srv.pid().to_string();
    for (mode, ep) in [
        ("stream", srv.addr(0)),
        ("rr", srv.addr(0)),
        ("crr", srv.addr(0)),
        ("udp", srv.addr(1)),
    ] {
        let (r, v) = bench_json(&[ep, "--mode", mode, "--duration", "1s", "--server-pid", &pid]);
        assert_eq!(r.code(), 0, "{mode}: {}", r.stderr);
        assert_eq!(v["errors"], 0, "{mode}: {v}");
        assert!(v["bytes"].as_u64().unwrap() > 0, "{mode}: {v}");
        if mode != "stream" {
            assert!(v["messages"].as_u64().unwrap() > 0, "{mode}: {v}");
            let lat = &v["latency_us"];
            assert!(
                lat["p50"].as_f64().unwrap() <= lat["p99"].as_f64().unwrap(),
                "{v}"
            );
        }
        assert!(
            v["server_cpu"].as_f64().is_some(),
            "{mode}: server CPU measured"
        );
    }
}

#[test]
fn open_loop_rate_is_kept() {
    let srv = Server::start(&["-q", "tcp://127.0.0.1:0"], 1);
    let (r, v) = bench_json(&[
        srv.addr(0),
        "--mode",
        "rr",
        "--conns",
        "4",
        "--rate",
        "2000",
        "--duration",
        "1s",
    ]);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let n = v["messages"].as_u64().unwrap();
    // 2000/s for one second: the schedule, not the server, sets the count.
    assert!(
        (1500..=2100).contains(&n),
        "{n} messages at --rate 2000 for 1 s"
    );
}

#[test]
fn hold_reports_memory_per_held_connection() {
    let srv = Server::start(&["-q", "--model", "epoll", "tcp://127.0.0.1:0"], 1);
    let pid = srv.pid().to_string();
    let (r, v) = bench_json(&[
        srv.addr(0),
        "--mode",
        "hold",
        "--conns",
        "500",
        "--active",
        "2",
        "--duration",
        "1s",
        "--server-pid",
        &pid,
    ]);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert_eq!(v["held"], 500);
    assert!(v["messages"].as_u64().unwrap() > 0);
    assert!(v["server_bytes_per_held_conn"].as_f64().is_some(), "{v}");
}

/// Starts tests/peers/wrong_server.py in `mode` at byte `at`.
fn wrong_server(mode: &str, at: u64) -> (std::process::Child, String) {
    require("python3", "python3");
    let mut child = Command::new("python3")
        .arg(peer("wrong_server.py"))
        .args(["127.0.0.1", "0", mode, &at.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn wrong_server.py");
    let port = listening_port(&first_line(&mut child));
    (child, format!("127.0.0.1:{port}"))
}

#[test]
fn a_wrong_byte_is_an_error_never_a_faster_number() {
    let (mut child, ep) = wrong_server("wrong", 100_000);
    let (r, v) = bench_json(&[&ep, "--mode", "stream", "--duration", "1s"]);
    let send = upcase_run(&["send", &ep, "--bytes", "1M"], b"", SECS(30));
    let _ = child.kill();
    assert_eq!(r.code(), 4, "{}", r.stderr);
    assert!(v["errors"].as_u64().unwrap() >= 1, "{v}");
    assert!(
        v["first_error"].as_str().unwrap().contains("wrong reply"),
        "{v}"
    );
    assert_eq!(send.code(), 4, "{}", send.stderr);
    assert_eq!(send.num("wrong"), 1);
    assert!(
        send.stderr.contains("first at offset 100000"),
        "{}",
        send.stderr
    );
}

#[test]
fn a_truncated_reply_is_reported() {
    let (mut child, ep) = wrong_server("truncate", 5000);
    let send = upcase_run(&["send", &ep, "--bytes", "1M"], b"", SECS(30));
    let _ = child.kill();
    // The server closed mid-stream. Depending on which packet wins, the
    // client sees a reset (an error, exit 1) or a clean end of file (an
    // incomplete reply, exit 4); never success, and either way it says how
    // far the reply got.
    assert!(matches!(send.code(), 1 | 4), "{}", send.stderr);
    assert!(
        send.stderr.contains("reset by peer") || send.stderr.contains("incomplete"),
        "{}",
        send.stderr
    );
    let got: u64 = send
        .stderr
        .split("received ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no byte count in {}", send.stderr));
    assert!(got <= 5000, "received {got} of a reply cut at 5000");

    // A server that closes cleanly after part of the reply: incomplete (4).
    let (mut child, ep) = wrong_server("short", 5000);
    let r = upcase_run(&["send", &ep, "--bytes", "1M"], b"", SECS(30));
    let _ = child.kill();
    assert_eq!(r.code(), 4, "{}", r.stderr);
    assert_eq!((r.num("sent"), r.num("received")), (1 << 20, 5000));
    assert!(r.stderr.contains("incomplete"), "{}", r.stderr);
}

#[test]
fn compare_two_models_and_write_the_results() {
    let dir = std::env::temp_dir().join(format!("upcase-compare-{}", std::process::id()));
    let r = upcase_run(
        &[
            "bench",
            "--compare",
            "--models",
            "select,async",
            "--workloads",
            "stream,rr",
            "--duration",
            "1s",
            "--out",
            dir.to_str().unwrap(),
        ],
        b"",
        SECS(120),
    );
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let table = r.out();
    assert!(
        table.contains("| select |") && table.contains("| async |"),
        "{table}"
    );
    let rows: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("compare.json")).unwrap()).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 2);
    for row in rows.as_array().unwrap() {
        for rep in row["reports"].as_array().unwrap() {
            assert_eq!(rep["errors"], 0, "{rep}");
            // The server's service demand, from /proc: per MB for the
            // stream, per message for rr; the kernel's share is never 0.
            let d = &rep["service_demand"];
            let per = if rep["workload"] == "stream" {
                "MB"
            } else {
                "message"
            };
            assert_eq!(d["per"], per, "{rep}");
            assert!(d["sys_us"].as_f64().unwrap() > 0.0, "{rep}");
            assert!(d["user_us"].as_f64().unwrap() >= 0.0, "{rep}");
            assert!(d["ctx_switches"].as_f64().unwrap() >= 0.0, "{rep}");
        }
    }
    let svg = std::fs::read_to_string(dir.join("compare.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("select") && svg.contains("async"));
    // Axis titles, a legend, and numbers a reader takes in at a glance.
    for text in ["messages/s", "MB/s", "\nserver\n", "upcase model"] {
        assert!(svg.contains(text), "no {text:?} in the chart");
    }
    assert!(!svg.contains("0000.0<"), "raw axis numbers in the chart");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The engines that can run rr here: epoll always, uring where the kernel
/// has it (the uring model's probe says the same).
fn engines() -> Vec<&'static str> {
    let mut e = vec!["epoll", "threads"];
    if model_available("uring") {
        e.push("uring");
    } else {
        eprintln!("io_uring unavailable here: testing the epoll engine only");
    }
    e
}

#[test]
fn every_engine_verifies_rr_and_says_which_ran() {
    let srv = Server::start(&["-q", "tcp://127.0.0.1:0"], 1);
    let utf8 = Server::start(&["-q", "--utf8", "tcp://127.0.0.1:0"], 1);
    for engine in engines() {
        // 512 B, replies spanning several 16 KiB receive blocks, and UTF-8
        // (the reply is longer than the request).
        for (ep, extra) in [
            (srv.addr(0), vec![]),
            (srv.addr(0), vec!["--size", "60000", "--conns", "4"]),
            (utf8.addr(0), vec!["--utf8"]),
        ] {
            let mut args = vec![
                ep,
                "--mode",
                "rr",
                "--duration",
                "500ms",
                "--engine",
                engine,
            ];
            args.extend(extra.iter().copied());
            let (r, v) = bench_json(&args);
            assert_eq!(r.code(), 0, "{engine} {extra:?}: {}", r.stderr);
            assert_eq!(v["engine"], engine, "{v}");
            assert_eq!(v["errors"], 0, "{engine} {extra:?}: {v}");
            let (n, bytes) = (
                v["messages"].as_u64().unwrap(),
                v["bytes"].as_u64().unwrap(),
            );
            assert!(n > 0, "{v}");
            if extra.is_empty() {
                assert_eq!(bytes, n * 512, "whole replies only: {v}");
            }
            assert_eq!(v["conns_served"], v["conns"], "{v}");
        }
    }
    // auto picks one of them; stream has only epoll.
    let (r, v) = bench_json(&[srv.addr(0), "--mode", "rr", "--duration", "300ms"]);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert!(engines().contains(&v["engine"].as_str().unwrap()), "{v}");
    let r = upcase_run(
        &[
            "bench",
            srv.addr(0),
            "--mode",
            "stream",
            "--engine",
            "uring",
        ],
        b"",
        SECS(10),
    );
    assert_eq!(r.code(), 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("--engine uring runs rr and hold"),
        "{}",
        r.stderr
    );
}

#[test]
fn every_engine_catches_a_wrong_long_or_cut_reply() {
    for engine in engines() {
        for (mode, expect) in [("wrong", "wrong reply"), ("extra", ""), ("truncate", "")] {
            let (mut child, ep) = wrong_server(mode, 2000);
            let (r, v) = bench_json(&[
                &ep,
                "--mode",
                "rr",
                "--conns",
                "3",
                "--duration",
                "500ms",
                "--engine",
                engine,
            ]);
            let _ = child.kill();
            assert_eq!(r.code(), 4, "{engine} {mode}: {}", r.stderr);
            // Each connection fails at its fourth message (bytes 1536..2048)
            // and is dropped: three errors, three messages each before it.
            assert_eq!(v["errors"], 3, "{engine} {mode}: {v}");
            assert_eq!(v["messages"], 9, "{engine} {mode}: {v}");
            let first = v["first_error"].as_str().unwrap();
            assert!(first.contains(expect), "{engine} {mode}: {first}");
        }
    }
}

/// The answers to mistakes and misbehaving servers: each one quick, with the
/// exit code `bench --help` documents.
#[test]
fn bench_edge_cases_have_their_exit_codes() {
    // An address with --compare is an argument error.
    let r = upcase_run(&["bench", "127.0.0.1:1060", "--compare"], b"", SECS(10));
    assert_eq!(r.code(), 2, "{}", r.stderr);
    assert!(r.stderr.contains("drop the address"), "{}", r.stderr);

    // A udp:// address runs the udp workload.
    let srv = Server::start(&["-q", "udp://127.0.0.1:0"], 1);
    let (r, v) = bench_json(&[srv.addr(0), "--duration", "1s"]);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert_eq!(v["workload"], "udp", "{v}");
    assert!(v["messages"].as_u64().unwrap() > 100, "{v}");
    let r = upcase_run(&["bench", srv.addr(0), "--mode", "stream"], b"", SECS(10));
    assert_eq!(r.code(), 2, "{}", r.stderr);

    // A server that accepts and never answers: exit 4, not 0.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let _mute = std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in l.incoming().take(5) {
            held.push(c);
        }
        std::thread::sleep(SECS(20));
    });
    let r = upcase_run(
        &[
            "bench",
            &addr,
            "--conns",
            "5",
            "--duration",
            "1s",
            "--no-intervals",
        ],
        b"",
        SECS(30),
    );
    assert_eq!(r.code(), 4, "{}\n{}", r.out(), r.stderr);
    assert!(
        r.out().contains("only 0 of 5 connections got a reply"),
        "{}",
        r.out()
    );
}

/// A --server command that never listens fails the comparison (exit 1) and
/// is not left running; a killed comparison takes its servers with it.
#[test]
fn compare_leaves_no_server_behind() {
    let marker = format!("1000{}.25", std::process::id() % 1000);
    let never = format!("never=sleep {marker} {{port}}");
    let r = upcase_run(
        &[
            "bench",
            "--compare",
            "--models",
            "select",
            "--workloads",
            "rr",
            "--duration",
            "1s",
            "--server",
            &never,
        ],
        b"",
        SECS(60),
    );
    assert_eq!(r.code(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("did not listen"), "{}", r.stderr);
    assert!(
        r.out().contains("| select |"),
        "the others still ran: {}",
        r.out()
    );
    assert!(
        pids_running(&marker).is_empty(),
        "the server that never listened is still running"
    );

    // SIGKILL the comparison while a server runs: the server goes too.
    let mut bench = upcase()
        .args([
            "bench",
            "--compare",
            "--models",
            "epoll",
            "--workloads",
            "rr",
            "--duration",
            "20s",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + SECS(10);
    let server = loop {
        if let Some(&pid) = child_pids(bench.id() as i32).first() {
            break pid;
        }
        assert!(std::time::Instant::now() < deadline, "no server started");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    bench.kill().unwrap();
    bench.wait().unwrap();
    let deadline = std::time::Instant::now() + SECS(10);
    while std::path::Path::new(&format!("/proc/{server}")).exists()
        && std::fs::read_to_string(format!("/proc/{server}/stat"))
            .is_ok_and(|s| !s.contains(") Z "))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "server {server} outlived its bench"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Processes whose command line contains `needle`.
fn pids_running(needle: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .collect()
}

/// --pin puts the server's threads and the load generator on the CPUs
/// given; the server's affinity is seen from /proc.
#[test]
fn pin_puts_server_and_client_on_their_cpus() {
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        skip("--pin needs two CPUs");
        return;
    }
    let srv = Server::start(&["-q", "--model", "epoll", "tcp://127.0.0.1:0"], 1);
    let pid = srv.pid().to_string();
    let (r, v) = bench_json(&[
        srv.addr(0),
        "--pin",
        "0:1",
        "--server-pid",
        &pid,
        "--duration",
        "1s",
    ]);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert_eq!(v["errors"], 0, "{v}");
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    for t in tasks.flatten() {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap();
        let cpus = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap()
            .trim()
            .to_string();
        assert_eq!(cpus, "0", "thread {:?}", t.file_name());
    }
    let r = upcase_run(&["bench", srv.addr(0), "--pin", "1-0:1"], b"", SECS(10));
    assert_eq!(r.code(), 2, "{}", r.stderr);
}

/// --sweep: capacity, then 10 % to 120 % of it open loop; the light loads
/// are met, every point is verified, and the chart has its axes.
#[test]
fn sweep_draws_latency_against_offered_load() {
    let dir = std::env::temp_dir().join(format!("upcase-sweep-{}", std::process::id()));
    let r = upcase_run(
        &[
            "bench",
            "--compare",
            "--sweep",
            "--models",
            "epoll",
            "--conns",
            "10",
            "--duration",
            "300ms",
            "--out",
            dir.to_str().unwrap(),
        ],
        b"",
        SECS(120),
    );
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let points: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("sweep.json")).unwrap()).unwrap();
    let points = points.as_array().unwrap();
    assert_eq!(points.len(), 12, "{points:?}");
    for p in points {
        assert_eq!(p["server"], "epoll");
        assert_eq!(p["errors"], 0, "{p}");
        let (f, offered, achieved) = (
            p["fraction"].as_f64().unwrap(),
            p["offered"].as_f64().unwrap(),
            p["achieved"].as_f64().unwrap(),
        );
        if f <= 0.5 {
            // Half the capacity is always met (within the schedule's ramp).
            assert!(achieved > offered * 0.8, "{p}");
        }
        assert!(
            p["p99_us"].as_f64().unwrap() >= p["p50_us"].as_f64().unwrap(),
            "{p}"
        );
    }
    let svg = std::fs::read_to_string(dir.join("sweep.svg")).unwrap();
    for text in ["offered load, messages/s", "latency, us (log)", "epoll"] {
        assert!(svg.contains(text), "no {text:?} in the chart");
    }
    assert!(r.out().contains("| epoll | 120 |"), "{}", r.out());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Past what one process may hold (its open-file limit, lowered here to
/// 500), `hold` shards itself: children of its own hold the rest, each
/// from its own loopback source address, and none outlives the run.
#[test]
fn hold_shards_itself_over_processes_and_source_addresses() {
    let srv = Server::start(&["-q", "--model", "epoll", "tcp://127.0.0.1:0"], 1);
    let pid = srv.pid().to_string();
    let port = srv.addr(0).rsplit(':').next().unwrap().to_string();
    let mut cmd = Command::new("bash");
    cmd.args([
        "-c",
        "ulimit -Sn 500 && ulimit -Hn 500 && exec \"$@\"",
        "bash",
        BIN,
    ])
    .args([
        "bench",
        srv.addr(0),
        "--mode",
        "hold",
        "--conns",
        "1000",
        "--active",
        "2",
    ])
    .args([
        "--duration",
        "2s",
        "--json",
        "--no-intervals",
        "--server-pid",
        &pid,
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn bench");
    let bench_pid = child.id() as i32;
    // While the rr part runs, the held connections are all up: look at
    // who holds them and where they come from.
    let (mut pids, mut sources) = (
        std::collections::BTreeSet::new(),
        std::collections::BTreeSet::new(),
    );
    let mut established = 0;
    let deadline = std::time::Instant::now() + SECS(30);
    while std::time::Instant::now() < deadline {
        let out = Command::new("ss")
            .args([
                "-Htnp",
                "state",
                "established",
                &format!("( dport = :{port} )"),
            ])
            .output()
            .expect("ss");
        let text = String::from_utf8_lossy(&out.stdout);
        // ss names a socket's process from a scan of /proc made before
        // its dump: a socket opened in between shows no pid, so only a
        // snapshot in which every socket has one is taken.
        established = text.lines().filter(|l| l.contains("pid=")).count();
        if established >= 1000 && established == text.lines().count() {
            for l in text.lines() {
                let cols: Vec<&str> = l.split_whitespace().collect();
                if let Some((ip, _)) = cols.get(2).and_then(|a| a.rsplit_once(':')) {
                    sources.insert(ip.to_string());
                }
                if let Some(p) = l.split("pid=").nth(1).and_then(|s| s.split(',').next()) {
                    pids.insert(p.to_string());
                }
            }
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let out = child.wait_with_output().expect("bench");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(established >= 1000, "only {established} connections seen");
    assert_eq!(v["held"], 1000, "{v}");
    assert!(v["messages"].as_u64().unwrap() > 0, "{v}");
    // 500 descriptors, less a margin of 200: 300 a process, so four
    // processes, each from its own source address.
    assert_eq!(pids.len(), 4, "client processes {pids:?}");
    assert_eq!(sources.len(), 4, "source addresses {sources:?}");
    assert!(
        pids.contains(&bench_pid.to_string()),
        "{pids:?} without the bench itself ({bench_pid})"
    );
    let left: Vec<_> = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|c| c.split(|&b| b == 0).any(|a| a == b"--hold-shard"))
        .collect();
    assert!(left.is_empty(), "{} shard(s) left behind", left.len());
}
