//! Signals as a terminal sends them: the server runs in a pseudo-terminal
//! of its own (tests/peers/pty_run.py), so a ^C reaches its whole
//! foreground process group from the kernel, as Ctrl-C does, and closing
//! the terminal sends SIGHUP. One Ctrl-C is one drain, whichever processes
//! receive it; a hangup drains too, and removes what the server created.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

/// A server in a terminal: its merged output a line at a time, and the
/// keys to press.
struct InTerminal {
    child: Child,
    keys: ChildStdin,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl InTerminal {
    fn start(args: &[&str]) -> InTerminal {
        require("python3", "python3");
        let mut child = Command::new("python3")
            .arg(peer("pty_run.py"))
            .arg(BIN)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 pty_run.py");
        let keys = child.stdin.take().expect("stdin");
        let out = BufReader::new(child.stdout.take().expect("stdout"));
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in out.lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        InTerminal {
            child,
            keys,
            lines,
            seen: Vec::new(),
        }
    }

    /// The first line containing `needle` not matched yet (within `within`).
    fn wait_for(&mut self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        let mut from = 0;
        loop {
            if let Some(i) = self.seen[from..].iter().position(|l| l.contains(needle)) {
                let l = self.seen.remove(from + i);
                return l;
            }
            from = self.seen.len();
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(100)))
            {
                Ok(l) => self.seen.push(l),
                Err(_) if left.is_zero() => panic!(
                    "no line with {needle:?} within {within:?}:\n{}",
                    self.seen.join("\n")
                ),
                Err(_) => {}
            }
        }
    }

    /// Waits until the server serves: its `listening tcp://` line, and,
    /// with `--processes`, every worker ready. Returns its HOST:PORT.
    fn serving(&mut self, processes: bool) -> String {
        let listening = self.wait_for("listening tcp://", SECS(10));
        let hostport = listening
            .trim_start_matches("listening tcp://")
            .trim()
            .to_string();
        if processes {
            self.wait_for("workers ready", SECS(10));
        }
        hostport
    }

    fn press(&mut self, key: &str) {
        writeln!(self.keys, "{key}").expect("press a key");
        self.keys.flush().expect("flush");
    }

    /// Everything printed up to the end, and how the server ended.
    fn finish(&mut self, within: Duration) -> (String, Vec<String>) {
        let exit = self.wait_for("EXIT ", within);
        let _ = self.child.wait();
        self.seen.extend(self.lines.try_iter());
        (exit, std::mem::take(&mut self.seen))
    }
}

impl Drop for InTerminal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client in the middle of a request: it was answered once, and its
/// connection stays open until `finish`.
fn open_client(hostport: &str) -> TcpStream {
    let mut s = TcpStream::connect(hostport).expect("connect");
    s.set_read_timeout(Some(SECS(20))).unwrap();
    s.write_all(b"hello ").unwrap();
    let mut got = [0u8; 6];
    s.read_exact(&mut got).expect("served before the signal");
    assert_eq!(&got, b"HELLO ");
    s
}

/// The rest of the request, after the signal: the drain lets it finish.
fn finish_client(mut s: TcpStream) -> Result<Vec<u8>, String> {
    s.write_all(b"world").map_err(|e| e.to_string())?;
    s.shutdown(std::net::Shutdown::Write)
        .map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    s.read_to_end(&mut got).map_err(|e| e.to_string())?;
    Ok(got)
}

/// One Ctrl-C at the terminal of `serve --processes 2`, with a client in
/// the middle of its request: every worker drains once, the client
/// finishes, and nothing says "second signal" (each worker got one Ctrl-C
/// twice, from the terminal and from the supervisor, and cut the client).
/// A single server, the same. A second Ctrl-C, later, still cuts.
#[test]
fn one_ctrl_c_in_a_terminal_is_one_drain() {
    for processes in [Some("2"), None] {
        let mut args = vec!["serve", "tcp://127.0.0.1:0", "--drain-timeout", "30s"];
        if let Some(n) = processes {
            args.extend(["--processes", n]);
        }
        let mut term = InTerminal::start(&args);
        let hostport = term.serving(processes.is_some());
        let client = open_client(&hostport);
        term.press("ctrl-c");
        term.wait_for("no new connections", SECS(5));
        let got = finish_client(client);
        assert_eq!(got.as_deref(), Ok(&b"WORLD"[..]), "{processes:?}");
        let (exit, lines) = term.finish(SECS(20));
        assert_eq!(exit, "EXIT 0", "{processes:?}:\n{}", lines.join("\n"));
        assert!(
            !lines.iter().any(|l| l.contains("second signal")),
            "{processes:?}: one Ctrl-C was taken for two:\n{}",
            lines.join("\n")
        );

        // A second Ctrl-C, after the first was taken, stops at once.
        let mut term = InTerminal::start(&args);
        let hostport = term.serving(processes.is_some());
        let client = open_client(&hostport);
        term.press("ctrl-c");
        term.wait_for("no new connections", SECS(5));
        if processes.is_some() {
            // Both workers took the first one.
            term.wait_for("no new connections", SECS(5));
        }
        term.press("ctrl-c");
        let (exit, lines) = term.finish(SECS(10));
        assert_eq!(exit, "EXIT 0", "{processes:?}:\n{}", lines.join("\n"));
        assert!(
            lines.iter().any(|l| l.contains("second signal")),
            "{processes:?}:\n{}",
            lines.join("\n")
        );
        assert!(finish_client(client).map_or(true, |got| got != b"WORLD"));
    }
}

/// Closing the terminal (SIGHUP) drains the server as a stop signal does:
/// the client in the middle of its request finishes, the server exits 0,
/// and the pid file and the Unix socket file it made are gone (it died by
/// SIGHUP's default action, leaving both, and the port refused connects).
#[test]
fn a_hangup_drains_and_removes_the_files() {
    for processes in [Some("2"), None] {
        let dir = std::env::temp_dir().join(format!(
            "upcase-hup-{}-{}",
            std::process::id(),
            processes.is_some()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let (pid_file, sock) = (dir.join("upcase.pid"), dir.join("upcase.sock"));
        let unix = format!("unix:{}", sock.display());
        let pid_arg = pid_file.display().to_string();
        let mut args = vec![
            "serve",
            "tcp://127.0.0.1:0",
            &unix,
            "--pid-file",
            &pid_arg,
            "--drain-timeout",
            "30s",
        ];
        if let Some(n) = processes {
            args.extend(["--processes", n]);
        }
        let mut term = InTerminal::start(&args);
        let hostport = term.serving(processes.is_some());
        assert!(pid_file.exists() && sock.exists());
        let client = open_client(&hostport);
        term.press("hangup");
        // The terminal is gone: what the server says is no longer seen;
        // the client and the files tell.
        let got = finish_client(client);
        assert_eq!(got.as_deref(), Ok(&b"WORLD"[..]), "{processes:?}");
        let (exit, _) = term.finish(SECS(20));
        assert_eq!(exit, "EXIT 0", "{processes:?}");
        assert!(!pid_file.exists(), "{processes:?}: pid file left behind");
        assert!(!sock.exists(), "{processes:?}: socket file left behind");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// SIGUSR2 to `serve --processes 2` in a terminal, twice: the process the
/// terminal runs stays (the prompt does not come back, and the pid file
/// still names it), relaying signals to the generation that serves; one
/// Ctrl-C after the restarts drains it all, a client finishing meanwhile.
#[test]
fn a_restart_keeps_the_foreground_and_ctrl_c_still_drains() {
    let dir = std::env::temp_dir().join(format!("upcase-fg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pid_file = dir.join("upcase.pid");
    let pid_arg = pid_file.display().to_string();
    let mut term = InTerminal::start(&[
        "serve",
        "tcp://127.0.0.1:0",
        "--processes",
        "2",
        "--pid-file",
        &pid_arg,
        "--drain-timeout",
        "30s",
    ]);
    let hostport = term.serving(true);
    let first: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    for generation in 2..=3 {
        // SAFETY: kill(2) on the server (a grandchild of this test).
        unsafe { libc::kill(first, libc::SIGUSR2) };
        term.wait_for(&format!("generation {generation}: "), SECS(10));
        term.wait_for("is ready: draining the old workers", SECS(20));
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        assert_eq!(
            pid.trim(),
            first.to_string(),
            "the pid file still names the first"
        );
        assert!(
            !term.seen.iter().any(|l| l.starts_with("EXIT")),
            "the terminal got its prompt back: {:?}",
            term.seen
        );
    }
    let client = open_client(&hostport);
    term.press("ctrl-c");
    let got = finish_client(client);
    assert_eq!(got.as_deref(), Ok(&b"WORLD"[..]));
    let (exit, lines) = term.finish(SECS(30));
    assert_eq!(exit, "EXIT 0", "{}", lines.join("\n"));
    assert!(
        !lines.iter().any(|l| l.contains("second signal")),
        "{}",
        lines.join("\n")
    );
    assert!(!pid_file.exists(), "pid file left behind");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A new binary that never gets ready is stopped at `--restart-timeout`,
/// with a line; the running server serves on, and the next SIGUSR2, with a
/// good binary back in place, restarts.
#[test]
fn a_restart_that_hangs_is_stopped_at_its_timeout() {
    let dir = std::env::temp_dir().join(format!("upcase-hang-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("upcase");
    std::fs::copy(BIN, &exe).unwrap();
    let pid_file = dir.join("upcase.pid");
    let mut server = upcase_at(&exe)
        .args([
            "serve",
            "tcp://127.0.0.1:0",
            "--processes",
            "1",
            "--restart-timeout",
            "1s",
        ])
        .arg("--pid-file")
        .arg(&pid_file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = common::lines_of(server.stderr.take().unwrap());
    let first = first_line(&mut server);
    let hostport = first.trim_start_matches("listening tcp://").to_string();
    let wait = |needle: &str| {
        let deadline = Instant::now() + SECS(15);
        loop {
            match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => {}
                Err(_) => panic!("no line with {needle:?}"),
            }
        }
    };
    wait("all 1 workers ready");
    // The next "binary": a script that never says it is ready.
    let hang = dir.join("hang");
    std::fs::write(&hang, "#!/bin/sh\nexec sleep 600\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&hang, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&hang, &exe).unwrap();
    let start = Instant::now();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(server.id() as i32, libc::SIGUSR2) };
    let line = wait("restart failed");
    let took = start.elapsed();
    assert!(
        line.contains("was not ready within 1s (--restart-timeout)"),
        "{line}"
    );
    assert!(took < SECS(5), "stopped after {took:?}");
    let c = open_client(&hostport);
    c.shutdown(std::net::Shutdown::Write).unwrap();
    // A good binary again: the next SIGUSR2 restarts.
    let good = dir.join("good");
    std::fs::copy(BIN, &good).unwrap();
    std::fs::rename(&good, &exe).unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(server.id() as i32, libc::SIGUSR2) };
    wait("is ready: draining the old workers");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    let status = wait_deadline(&mut server, SECS(20)).expect("exits");
    assert!(status.success());
    let _ = std::fs::remove_dir_all(&dir);
}

fn upcase_at(exe: &std::path::Path) -> Command {
    Command::new(exe)
}

/// A small random source (xorshift), seeded from the clock and printed,
/// so that a failing run can be told apart from the others.
struct Dice(u64);

impl Dice {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Fresh connections, one every 5 ms, each asked one line and checked:
/// answered, wrong, refused, or reset and other failures.
fn prober(
    hostport: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<[u64; 4]> {
    std::thread::spawn(move || {
        let mut counts = [0u64; 4];
        let mut i = 0u64;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            i += 1;
            let msg = format!("probe {i}\n");
            let r = TcpStream::connect(&hostport).and_then(|mut s| {
                s.set_read_timeout(Some(SECS(10)))?;
                s.write_all(msg.as_bytes())?;
                s.shutdown(std::net::Shutdown::Write)?;
                let mut got = Vec::new();
                s.read_to_end(&mut got)?;
                Ok(got)
            });
            let slot = match r {
                Ok(got) if got == msg.to_uppercase().as_bytes() => 0,
                Ok(_) => 1,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => 2,
                Err(_) => 3,
            };
            counts[slot] += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        counts
    })
}

/// A verified stream of `size`, through `upcase send`.
fn stream(hostport: &str, size: &str) -> Child {
    Command::new(BIN)
        .args(["send", hostport, "--bytes", size, "--json", "--no-progress"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("send")
}

/// The soak reaches the supervisor, in a terminal: `serve --processes 2`
/// in a pty; a worker killed (SIGKILL) at a random instant while fresh
/// connections come; then, under rr on 50 connections, two verified
/// streams and fresh connections, two SIGUSR2 at random instants (sent to
/// the pid file's process, the one the terminal runs); then one Ctrl-C
/// (round 1) or the terminal closing (round 2) while the streams still
/// run. Nothing is refused, reset or wrong through the restarts, the
/// streams finish verified through the drain, and no process is left.
#[test]
fn the_supervisor_soak_in_a_terminal() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    eprintln!("soak seed {seed}");
    let mut dice = Dice(seed);
    for end in ["ctrl-c", "hangup"] {
        let dir = std::env::temp_dir().join(format!("upcase-soak-{}-{end}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pid_file = dir.join("upcase.pid");
        let pid_arg = pid_file.display().to_string();
        let mut term = InTerminal::start(&[
            "serve",
            "tcp://127.0.0.1:0",
            "--processes",
            "2",
            "--pid-file",
            &pid_arg,
            "--drain-timeout",
            "60s",
        ]);
        let hostport = term.serving(true);
        let keeper: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let mut pids = vec![keeper];
        pids.extend(child_pids(keeper));

        // A worker killed at a random instant: replaced, nobody refused.
        let stop = Arc::new(AtomicBool::new(false));
        let probes = prober(hostport.clone(), stop.clone());
        std::thread::sleep(Duration::from_millis(dice.below(300)));
        let victim = child_pids(keeper)[dice.below(2) as usize];
        // SAFETY: kill(2) on a worker this test started (a grandchild).
        unsafe { libc::kill(victim, libc::SIGKILL) };
        term.wait_for("starting another", SECS(10));
        stop.store(true, Ordering::SeqCst);
        let [ok, wrong, refused, failed] = probes.join().unwrap();
        eprintln!(
            "{end}: a worker killed: {ok} answered, {wrong} wrong, {refused} refused, {failed} reset"
        );
        assert_eq!((wrong, refused), (0, 0), "{end}");
        assert!(
            failed <= 2,
            "{end}: {failed} fresh connections failed beside one killed worker"
        );

        // Two restarts under load.
        let bench = Command::new(BIN)
            .args([
                "bench",
                &hostport,
                "--mode",
                "rr",
                "--conns",
                "50",
                "--duration",
                "3s",
                "--json",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("bench");
        let mut streams = [stream(&hostport, "4G"), stream(&hostport, "4G")];
        let stop = Arc::new(AtomicBool::new(false));
        let probes = prober(hostport.clone(), stop.clone());
        for _ in 0..2 {
            std::thread::sleep(Duration::from_millis(200 + dice.below(800)));
            // SAFETY: kill(2) on the process the terminal runs.
            unsafe { libc::kill(keeper, libc::SIGUSR2) };
            let line = term.wait_for("SIGUSR2: restarting; new server pid", SECS(10));
            pids.push(
                line.rsplit("new server pid ")
                    .next()
                    .unwrap()
                    .split(' ')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap(),
            );
            term.wait_for("is ready: draining the old workers", SECS(20));
        }
        let bench = bench.wait_with_output().expect("bench");
        stop.store(true, Ordering::SeqCst);
        let [ok, wrong, refused, failed] = probes.join().unwrap();
        let report: serde_json::Value = serde_json::from_slice(&bench.stdout).expect("bench json");
        eprintln!(
            "{end}: through two restarts: rr {} messages, {} errors; fresh connections {ok} answered, {wrong} wrong, {refused} refused, {failed} reset",
            report["messages"], report["errors"]
        );
        assert_eq!(report["errors"], 0, "{end}: {report}");
        assert_eq!((wrong, refused, failed), (0, 0, 0), "{end}");

        // The end, as a terminal gives it, while the streams still run.
        for w in child_pids(keeper) {
            pids.push(w);
            pids.extend(child_pids(w));
        }
        let running = streams
            .iter_mut()
            .filter_map(|s| s.try_wait().ok())
            .filter(Option::is_none)
            .count();
        eprintln!("{end}: {running} of 2 streams still running at the signal");
        term.press(end);
        for s in streams {
            let out = s.wait_with_output().expect("stream");
            let sent: serde_json::Value = serde_json::from_slice(&out.stdout)
                .unwrap_or_else(|_| panic!("{end}: {}", String::from_utf8_lossy(&out.stderr)));
            assert!(out.status.success(), "{end}: a stream was cut: {sent}");
            assert_eq!(
                (sent["received"].as_u64(), sent["wrong"].as_u64()),
                (Some(4 << 30), Some(0))
            );
        }
        let (exit, lines) = term.finish(SECS(60));
        assert_eq!(exit, "EXIT 0", "{end}");
        assert!(
            !lines.iter().any(|l| l.contains("second signal")),
            "{end}: {}",
            lines.join("\n")
        );
        let left: Vec<i32> = pids
            .iter()
            .copied()
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/stat"))
                    .is_ok_and(|s| !s.contains(") Z "))
            })
            .collect();
        assert!(left.is_empty(), "{end}: processes left behind: {left:?}");
        assert!(!pid_file.exists(), "{end}: pid file left behind");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
