//! `serve --processes N`: a supervisor and workers on shared listeners; a
//! worker killed mid-load, a drain of all, a restart (SIGUSR2) that refuses
//! no one, systemd's socket activation and readiness, bad input.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// The server's log lines, kept as they arrive.
struct Log {
    lines: Vec<String>,
    /// Lines before this were matched already.
    cursor: usize,
}

impl Log {
    fn new() -> Log {
        Log {
            lines: Vec::new(),
            cursor: 0,
        }
    }

    /// Waits (at most `within`) for a line containing `needle`, after the
    /// last line found; returns it.
    fn wait_for(&mut self, server: &Server, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        let mut seen = self.cursor;
        loop {
            if let Some(i) = self.lines[seen..].iter().position(|l| l.contains(needle)) {
                self.cursor = seen + i + 1;
                return self.lines[seen + i].clone();
            }
            seen = self.lines.len();
            let left = deadline.saturating_duration_since(Instant::now());
            match server
                .stderr
                .recv_timeout(left.min(Duration::from_millis(100)))
            {
                Ok(l) => self.lines.push(l),
                Err(_) if Instant::now() >= deadline => {
                    panic!(
                        "no log line with {needle:?} within {within:?}:\n{}",
                        self.lines.join("\n")
                    )
                }
                Err(_) => {}
            }
        }
    }

    fn drain(&mut self, server: &Server) -> &[String] {
        self.lines.extend(server.stderr.try_iter());
        &self.lines
    }
}

fn pid_in(line: &str, after: &str) -> i32 {
    let rest = &line[line.find(after).expect("marker") + after.len()..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid after {after:?} in {line:?}"))
}

fn alive(pid: i32) -> bool {
    // A zombie is not alive: it has exited and waits to be reaped.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

fn wait_gone(pid: i32, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if !alive(pid) {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    false
}

/// One request on a held connection: `msg` out, its uppercase back.
fn ask(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    s.write_all(msg)?;
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got)?;
    Ok(got)
}

fn held(port: u16, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            s.set_read_timeout(Some(SECS(10))).expect("timeout");
            let msg = format!("hello {i}\n");
            assert_eq!(
                ask(&mut s, msg.as_bytes()).expect("first reply"),
                msg.to_uppercase().as_bytes()
            );
            s
        })
        .collect()
}

/// Established server-side connections on `port`, by the pid that holds them
/// (from `ss -tnp`, iproute2).
fn conns_by_pid(port: u16) -> std::collections::HashMap<i32, usize> {
    let out = Command::new("ss")
        .args([
            "-tnpH",
            "state",
            "established",
            &format!("( sport = :{port} )"),
        ])
        .output()
        .expect("ss (iproute2)");
    let mut map = std::collections::HashMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(i) = line.find("pid=") {
            *map.entry(pid_in(&line[i..], "pid=")).or_insert(0) += 1;
        }
    }
    map
}

#[test]
fn bad_input_is_refused_with_a_clear_error() {
    let r = upcase_run(&["serve", "--processes", "0"], b"", SECS(10));
    assert_eq!(r.code(), 2, "{}", r.stderr);
    assert!(r.stderr.contains("--processes"), "{}", r.stderr);

    for procs in [&["--processes", "2"][..], &[]] {
        let mut args = vec![
            "serve",
            "tcp://127.0.0.1:0",
            "--pid-file",
            "/nonexistent-dir/upcase.pid",
        ];
        args.extend_from_slice(procs);
        let r = upcase_run(&args, b"", SECS(10));
        assert_eq!(r.code(), 1, "{args:?}: {}", r.stderr);
        assert!(
            r.stderr
                .contains("--pid-file /nonexistent-dir/upcase.pid: cannot write it"),
            "{}",
            r.stderr
        );
        assert_eq!(r.out(), "", "{args:?}: announced, then failed");
    }

    // Inherited descriptors that are not listeners.
    let r = run(
        {
            let mut c = upcase();
            c.args(["serve", "tcp://127.0.0.1:0"])
                .env("UPCASE_LISTEN_FDS", "0 x");
            c
        },
        b"",
        SECS(10),
    );
    assert_eq!(r.code(), 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("not a list of descriptor numbers"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_killed_worker_is_replaced_and_the_others_lose_nothing() {
    let pidfile = sock_path("pid").with_extension("pid");
    let pidfile_s = pidfile.to_str().expect("utf-8");
    let mut server = Server::start(
        &[
            "tcp://127.0.0.1:0",
            "--processes",
            "3",
            "--model",
            "epoll",
            "--pid-file",
            pidfile_s,
        ],
        1,
    );
    let mut log = Log::new();
    log.wait_for(&server, "all 3 workers ready", SECS(10));
    let sup = server.pid();
    let written: i32 = std::fs::read_to_string(&pidfile)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    assert_eq!(written, sup, "the pid file names the supervisor");
    let workers = child_pids(sup);
    assert_eq!(workers.len(), 3, "three worker processes: {workers:?}");

    let port = server.port(0);
    let mut conns = held(port, 24);
    let by_pid = conns_by_pid(port);
    assert_eq!(
        by_pid.values().sum::<usize>(),
        24,
        "ss sees every connection: {by_pid:?}"
    );
    assert!(
        by_pid.keys().all(|p| workers.contains(p)),
        "served by the workers: {by_pid:?}"
    );
    // The victim: the busiest worker, unless it holds them all.
    let victim = *by_pid
        .iter()
        .filter(|(_, n)| **n < 24)
        .max_by_key(|(_, n)| **n)
        .map(|(p, _)| p)
        .unwrap_or_else(|| {
            workers
                .iter()
                .find(|w| !by_pid.contains_key(w))
                .expect("an idle worker")
        });
    let lost = by_pid.get(&victim).copied().unwrap_or(0);
    // SAFETY: kill(2) on a worker of our server.
    unsafe { libc::kill(victim, libc::SIGKILL) };
    let line = log.wait_for(
        &server,
        &format!("(pid {victim}) was killed by signal 9"),
        SECS(10),
    );
    assert!(line.contains("starting another"), "{line}");

    // New connections keep succeeding at once.
    for i in 0..50 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect after the kill");
        s.set_read_timeout(Some(SECS(10))).expect("timeout");
        assert_eq!(
            ask(&mut s, format!("new {i}").as_bytes()).expect("reply"),
            format!("NEW {i}").as_bytes()
        );
    }
    // Every held connection of the other workers still answers, byte for byte.
    let mut failed = 0;
    for (i, s) in conns.iter_mut().enumerate() {
        let msg = format!("again {i}\n");
        match ask(s, msg.as_bytes()) {
            Ok(got) => assert_eq!(got, msg.to_uppercase().as_bytes()),
            Err(_) => failed += 1,
        }
    }
    assert_eq!(
        failed, lost,
        "exactly the killed worker's connections are lost"
    );
    log.wait_for(&server, "started worker", SECS(10));
    let deadline = Instant::now() + SECS(10);
    while child_pids(sup).len() < 3 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    let now = child_pids(sup);
    assert_eq!(now.len(), 3, "three workers again: {now:?}");
    assert!(!now.contains(&victim));
    drop(conns);
    let status = server.signal_and_wait(libc::SIGTERM, SECS(15));
    assert!(status.success(), "{status:?}");
    assert!(!pidfile.exists(), "the pid file is removed at exit");
}

#[test]
fn sigterm_drains_every_worker() {
    let mut server = Server::start(
        &[
            "tcp://127.0.0.1:0",
            "--processes",
            "2",
            "--model",
            "threads",
        ],
        1,
    );
    let mut log = Log::new();
    log.wait_for(&server, "all 2 workers ready", SECS(10));
    let port = server.port(0);
    let workers = child_pids(server.pid());
    let mut conns = held(port, 10);
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(server.pid(), libc::SIGTERM) };
    log.wait_for(&server, "the workers drain", SECS(10));
    // The drain is seen: new connects are refused, the held ones served.
    let deadline = Instant::now() + SECS(5);
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            _ if Instant::now() > deadline => panic!("connects still accepted during the drain"),
            _ => thread::sleep(Duration::from_millis(20)),
        }
    }
    for (i, s) in conns.iter_mut().enumerate() {
        let msg = format!("draining {i}\n");
        assert_eq!(
            ask(s, msg.as_bytes()).expect("served during the drain"),
            msg.to_uppercase().as_bytes()
        );
    }
    assert!(
        workers.iter().all(|w| alive(*w)),
        "the workers wait for their clients"
    );
    drop(conns);
    let status = wait_deadline(&mut server.child, SECS(15)).expect("supervisor exits");
    assert!(status.success(), "{status:?}");
    assert!(workers.iter().all(|w| !alive(*w)));
    let lines = log.drain(&server).to_vec();
    let accepted: u64 = lines
        .iter()
        .filter(|l| l.contains(") accepted "))
        .map(|l| {
            let rest = &l[l.find(") accepted ").expect("marker") + 11..];
            rest.split(' ')
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .expect("count")
        })
        .sum();
    assert_eq!(
        accepted, 10,
        "each worker logs its accepted count: {lines:#?}"
    );
}

/// `serve --processes 2 --model epoll` on one TCP listener with a pid
/// file (named after `tag`) and `extra` arguments, once both workers are
/// ready; `announced` is how many `listening` lines that prints.
fn two_epoll_workers(
    tag: &str,
    extra: &[&str],
    announced: usize,
) -> (Server, Log, std::path::PathBuf) {
    let pidfile = sock_path(tag).with_extension("pid");
    let pidfile_s = pidfile.to_str().expect("utf-8").to_string();
    let mut args = vec![
        "tcp://127.0.0.1:0",
        "--processes",
        "2",
        "--model",
        "epoll",
        "--pid-file",
        &pidfile_s,
    ];
    args.extend_from_slice(extra);
    let server = Server::start(&args, announced);
    let mut log = Log::new();
    log.wait_for(&server, "all 2 workers ready", SECS(10));
    (server, log, pidfile)
}

/// The restart goal: rr on 50 connections for 10 s, a verified 4 GiB
/// stream and a stream of fresh connections, all through two restarts:
/// nothing refused, nothing reset, no wrong byte.
#[test]
fn sigusr2_restarts_without_refusing_anyone() {
    let (mut server, mut log, pidfile) = two_epoll_workers("pid", &["--drain-timeout", "120s"], 1);
    let port = server.port(0);
    let hostport = server.hostport(0).to_string();
    let first = server.pid();

    let bench = upcase()
        .args([
            "bench",
            &hostport,
            "--mode",
            "rr",
            "--conns",
            "50",
            "--size",
            "512",
            "--duration",
            "10s",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("bench");
    let stream = upcase()
        .args([
            "send",
            &hostport,
            "--bytes",
            "4G",
            "--json",
            "--no-progress",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("send");
    // Fresh connections all along, each checked.
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new([
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
    ]);
    let prober = {
        let (stop, counts) = (stop.clone(), counts.clone());
        thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let msg = format!("probe {i}\n");
                let r = TcpStream::connect(("127.0.0.1", port)).and_then(|mut s| {
                    s.set_read_timeout(Some(SECS(10)))?;
                    ask(&mut s, msg.as_bytes())
                });
                let slot = match r {
                    Ok(got) if got == msg.to_uppercase().as_bytes() => 0,
                    Ok(_) => 1,
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => 2,
                    Err(_) => 3,
                };
                counts[slot].fetch_add(1, Ordering::Relaxed);
                thread::sleep(Duration::from_millis(10));
            }
        })
    };

    thread::sleep(SECS(2));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(first, libc::SIGUSR2) };
    let line = log.wait_for(&server, "is ready: draining the old workers", SECS(30));
    let second = pid_in(&line, "new server pid ");
    // The process the user started stays the one the pid file names.
    assert_eq!(
        std::fs::read_to_string(&pidfile).expect("pid file").trim(),
        first.to_string()
    );

    thread::sleep(SECS(2));
    // Restarted again through the first: it relays SIGUSR2 to the second.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(first, libc::SIGUSR2) };
    let line = log.wait_for(&server, "SIGUSR2: restarting; new server pid", SECS(30));
    let third = pid_in(&line, "new server pid ");
    log.wait_for(
        &server,
        &format!("new server pid {third} is ready"),
        SECS(30),
    );
    assert_eq!(
        std::fs::read_to_string(&pidfile).expect("pid file").trim(),
        first.to_string()
    );

    let bench = bench.wait_with_output().expect("bench");
    let stream = stream.wait_with_output().expect("send");
    stop.store(true, Ordering::SeqCst);
    prober.join().expect("prober");
    let report: serde_json::Value = serde_json::from_slice(&bench.stdout).expect("bench json");
    assert!(
        bench.status.success(),
        "bench: {}",
        String::from_utf8_lossy(&bench.stderr)
    );
    assert_eq!(report["errors"], 0, "{report}");
    assert!(report["messages"].as_u64().unwrap_or(0) > 1000, "{report}");
    let sent: serde_json::Value = serde_json::from_slice(&stream.stdout).expect("send json");
    assert!(
        stream.status.success(),
        "send: {}",
        String::from_utf8_lossy(&stream.stderr)
    );
    assert_eq!(sent["received"], 4u64 << 30, "{sent}");
    assert_eq!(sent["wrong"], 0, "{sent}");
    let [ok, wrong, refused, other] = [0, 1, 2, 3].map(|i| counts[i].load(Ordering::Relaxed));
    eprintln!(
        "through two restarts: rr on 50 connections {} messages, {} errors; 4 GiB stream {} bytes back, {} wrong; fresh connections {ok} answered, {wrong} wrong, {refused} refused, {other} reset or failed",
        report["messages"], report["errors"], sent["received"], sent["wrong"]
    );
    assert!(ok > 100, "{ok}");
    assert_eq!((wrong, refused, other), (0, 0, 0));

    // The second retired; the third serves; the first is still the one
    // in the foreground, and its SIGTERM stops the service.
    assert!(wait_gone(second, SECS(30)), "the second server retired");
    log.wait_for(
        &server,
        &format!("pid {second} handed over to pid {third}: relaying to it"),
        SECS(10),
    );
    assert!(
        server.child.try_wait().expect("wait").is_none(),
        "the first stays"
    );
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(first, libc::SIGTERM) };
    assert!(
        wait_deadline(&mut server.child, SECS(30)).is_some_and(|s| s.success()),
        "the first ends, with success, once the last generation has drained"
    );
    assert!(wait_gone(third, SECS(5)), "the last server stopped");
    assert!(
        !pidfile.exists(),
        "the first removes the pid file: {:#?}",
        log.drain(&server)
    );
}

/// systemd's socket activation, with Debian's systemd-socket-activate, and
/// the readiness message a Type=notify unit waits for (on a datagram
/// socket of ours, as systemd's would be).
#[test]
fn socket_activation_and_readiness() {
    require("systemd-socket-activate", "systemd");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let path = sock_path("activated");
    let notify_path = sock_path("notify");
    let notify = UnixDatagram::bind(&notify_path).expect("notify socket");
    notify.set_read_timeout(Some(SECS(20))).expect("timeout");
    let mut child = Command::new("systemd-socket-activate")
        .args([
            "-l",
            &format!("127.0.0.1:{port}"),
            "-l",
            path.to_str().expect("utf-8"),
        ])
        // It passes on only the variables named with -E.
        .arg("-E")
        .arg(format!("NOTIFY_SOCKET={}", notify_path.display()))
        .arg(BIN)
        .args(["serve", "--processes", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("systemd-socket-activate");
    let errs = lines_of(child.stderr.take().expect("stderr"));
    // Whatever happens below, the server and its workers do not outlive the
    // test (SIGTERM drains the workers too).
    struct Stop(i32);
    impl Drop for Stop {
        fn drop(&mut self) {
            // SAFETY: kill(2) on our own child's pid (harmless once reaped).
            unsafe { libc::kill(self.0, libc::SIGTERM) };
        }
    }
    let _stop = Stop(child.id() as i32);
    // systemd-socket-activate starts the server at the first connection.
    let deadline = Instant::now() + SECS(10);
    let mut s = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("systemd-socket-activate is not listening: {e}"),
        }
    };
    s.set_read_timeout(Some(SECS(10))).expect("timeout");
    assert_eq!(ask(&mut s, b"activated").expect("reply"), b"ACTIVATED");
    let mut u = std::os::unix::net::UnixStream::connect(&path).expect("unix");
    u.write_all(b"unix too").expect("write");
    let mut got = [0u8; 8];
    u.read_exact(&mut got).expect("read");
    assert_eq!(&got, b"UNIX TOO");
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("READY=1 on NOTIFY_SOCKET");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(
        msg.contains("READY=1") && msg.contains(&format!("MAINPID={}", child.id())),
        "{msg:?}"
    );
    let out = first_line(&mut child);
    assert_eq!(out, format!("listening tcp://127.0.0.1:{port}"));
    // SAFETY: kill(2) on our own child (systemd-socket-activate exec'd upcase).
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    drop((s, u));
    let status = wait_deadline(&mut child, SECS(15)).expect("exits");
    let logs: Vec<String> = errs.try_iter().collect();
    assert!(status.success(), "{status:?} {logs:#?}");
    assert!(
        logs.iter().any(|l| l.contains("handed over by systemd")),
        "{logs:#?}"
    );
    // systemd's socket file is systemd's: left in place.
    assert!(path.exists());
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&notify_path);
}

/// The unit files in contrib/ are valid for systemd (systemd-analyze).
#[test]
fn contrib_units_verify() {
    require("systemd-analyze", "systemd");
    let dir = std::env::temp_dir().join(format!("upcase-units-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib");
    for name in ["upcase.socket", "upcase.service"] {
        let text = std::fs::read_to_string(root.join(name)).expect("unit file");
        std::fs::write(dir.join(name), text.replace("/usr/local/bin/upcase", BIN)).expect("write");
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.join("upcase.socket"))
        .arg(dir.join("upcase.service"))
        .output()
        .expect("systemd-analyze");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.trim().is_empty(), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Per worker label, the sum of the samples of `name`.
fn by_worker(text: &str, name: &str) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    for l in text.lines().filter(|l| l.starts_with(&format!("{name}{{"))) {
        let worker = l
            .split("worker=\"")
            .nth(1)
            .and_then(|w| w.split('"').next())
            .unwrap_or_else(|| panic!("no worker label: {l}"))
            .to_string();
        let v: u64 = l.rsplit(' ').next().unwrap().parse().unwrap();
        *out.entry(worker).or_default() += v;
    }
    out
}

/// `--metrics` with `--processes`: the supervisor answers for every
/// worker, each sample labelled with its worker; the counts add up to what
/// the clients did; a killed worker comes back (at zero); after a restart
/// (SIGUSR2) the same port answers for the new workers; promtool accepts
/// the text.
#[test]
fn metrics_answer_for_every_worker() {
    let (mut server, mut log, pidfile) =
        two_epoll_workers("metrics", &["--metrics", "127.0.0.1:0"], 2);
    let at = server.endpoints[1]
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .to_string();
    let port = server.port(0);
    for i in 0..20u8 {
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(SECS(10))).unwrap();
        c.write_all(&[b'a' + i; 1000]).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back).unwrap();
        assert_eq!(back, vec![b'A' + i; 1000]);
    }
    let accepted = "upcase_connections_accepted_total";
    let deadline = Instant::now() + SECS(10);
    let text = loop {
        let text = scrape(&at);
        if by_worker(&text, accepted).values().sum::<u64>() == 20 || Instant::now() > deadline {
            break text;
        }
        thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        by_worker(&text, accepted).values().sum::<u64>(),
        20,
        "{text}"
    );
    assert_eq!(
        by_worker(&text, "upcase_received_bytes_total")
            .values()
            .sum::<u64>(),
        20_000,
        "{text}"
    );
    let draining = by_worker(&text, "upcase_draining");
    assert_eq!(draining.keys().collect::<Vec<_>>(), ["1", "2"], "{text}");
    // The supervisor's own samples: its workers, wanted and ready.
    assert_eq!(
        sample(&text, "upcase_workers{state=\"wanted\"}"),
        Some(2),
        "{text}"
    );
    assert_eq!(
        sample(&text, "upcase_workers{state=\"ready\"}"),
        Some(2),
        "{text}"
    );
    assert_eq!(
        sample(&text, "upcase_worker_restarts_total"),
        Some(0),
        "{text}"
    );
    assert_eq!(
        text.matches("# TYPE upcase_connections_accepted_total ")
            .count(),
        1,
        "{text}"
    );
    if Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        let mut check = Command::new("promtool");
        check.args(["check", "metrics"]);
        let out = run(check, scrape(&at).as_bytes(), SECS(20));
        assert!(
            out.status.success(),
            "promtool: {}{}",
            out.out(),
            out.stderr
        );
    } else {
        skip(
            "promtool is not installed (Debian's prometheus package; scripts/test.sh installs it)",
        );
    }

    // A killed worker is replaced; the scrape answers for both again, the
    // new one from zero.
    let sup = server.pid();
    let before = by_worker(&text, accepted);
    let victim = *child_pids(sup).first().expect("a worker");
    // SAFETY: kill(2) on a child of our child.
    unsafe { libc::kill(victim, libc::SIGKILL) };
    log.wait_for(&server, "started worker", SECS(10));
    let deadline = Instant::now() + SECS(10);
    loop {
        let now = by_worker(&scrape(&at), "upcase_draining");
        if now.len() == 2 && child_pids(sup).len() == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the scrape lost a worker: {now:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
    let text = scrape(&at);
    let after = by_worker(&text, accepted);
    assert_eq!(
        sample(&text, "upcase_worker_restarts_total"),
        Some(1),
        "{text}"
    );
    assert!(
        eventually(SECS(10), || sample(
            &scrape(&at),
            "upcase_workers{state=\"ready\"}"
        ) == Some(2)),
        "the new worker is not counted ready: {}",
        scrape(&at)
    );
    assert!(
        after.values().sum::<u64>() < before.values().sum::<u64>()
            || before.values().any(|&v| v == 0),
        "the killed worker's count should be gone: {before:?} then {after:?}"
    );

    // A restart hands the port to the next supervisor.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(sup, libc::SIGUSR2) };
    // The first stays in the foreground (and in the pid file), and stops
    // answering scrapes: the next one does, on the same port.
    let line = log.wait_for(&server, "is ready: draining the old workers", SECS(30));
    let next = pid_in(&line, "new server pid ");
    log.wait_for(
        &server,
        "metrics: no longer answered by this process",
        SECS(10),
    );
    assert_ne!(next, sup);
    assert_eq!(
        std::fs::read_to_string(&pidfile).expect("pid file").trim(),
        sup.to_string()
    );
    let text = scrape(&at);
    assert_eq!(by_worker(&text, "upcase_draining").len(), 2, "{text}");
    assert_eq!(
        by_worker(&text, accepted).values().sum::<u64>(),
        0,
        "{text}"
    );
    // SIGTERM to the first is relayed: the whole service stops.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(sup, libc::SIGTERM) };
    let status = wait_deadline(&mut server.child, SECS(30)).expect("the first supervisor exits");
    assert!(status.success(), "{status:?}");
    assert!(wait_gone(next, SECS(20)), "the new supervisor did not stop");
}

/// The value of the sample named exactly `name` (labels included).
fn sample(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// After a restart the first supervisor is the one in the foreground; if
/// it is killed outright (SIGKILL, which it cannot relay), the generation
/// that serves drains and ends rather than serve on with no one to stop it.
#[test]
fn a_killed_keeper_takes_the_service_down_with_a_drain() {
    let (mut server, mut log, _pidfile) = two_epoll_workers("keeper", &[], 1);
    let first = server.pid();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(first, libc::SIGUSR2) };
    let line = log.wait_for(&server, "is ready: draining the old workers", SECS(30));
    let second = pid_in(&line, "new server pid ");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(first, libc::SIGKILL) };
    let _ = server.child.wait();
    log.wait_for(
        &server,
        "the supervisor in the foreground died: stopping",
        SECS(10),
    );
    assert!(
        wait_gone(second, SECS(15)),
        "the second supervisor serves on"
    );
}
