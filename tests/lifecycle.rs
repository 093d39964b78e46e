//! One lifecycle for every model, observed from outside: a signal right
//! after the `listening` line drains; a drain refuses new connects at once,
//! lets the stream in progress finish verified, and only then exits 0; the
//! drain deadline cuts what is left, says so and removes the socket file;
//! a second signal does the same at once; a stopped server does not call
//! clients idle whose bytes were waiting.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const ALL: [&str; 8] = ALL_MODELS;

fn kill(pid: i32, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(pid, sig) };
}

/// Waits until the server logged a line containing `needle`; returns the
/// log so far. Panics after `limit`.
fn wait_log(srv: &Server, log: &mut String, needle: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !log.contains(needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        match srv.stderr.recv_timeout(left) {
            Ok(line) => {
                log.push_str(&line);
                log.push('\n');
            }
            Err(_) => panic!("no log line with {needle:?} within {limit:?}; log:\n{log}"),
        }
    }
}

#[test]
fn a_signal_right_after_the_listening_line_drains() {
    for model in runnable(&ALL) {
        for _ in 0..3 {
            let mut child = upcase()
                .args(["serve", "-q", "--model", model, "tcp://127.0.0.1:0"])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn");
            let line = first_line(&mut child);
            assert!(line.starts_with("listening "), "{line}");
            kill(child.id() as i32, libc::SIGTERM);
            let status = wait_deadline(&mut child, SECS(5)).expect("exits after SIGTERM");
            assert_eq!(
                status.code(),
                Some(0),
                "{model}: killed by the signal instead of draining ({status:?})"
            );
        }
    }
}

/// A verified stream that pauses when told to, so the test can look at the
/// server in the middle of it.
struct PausedStream {
    /// Says () once the first reply came back: the server has accepted.
    served: mpsc::Receiver<()>,
    /// Send () to let the writer go on.
    go: mpsc::Sender<()>,
    /// Bytes read and verified, when the reader is done.
    done: thread::JoinHandle<std::io::Result<u64>>,
}

const CHUNK: usize = 64 * 1024;

/// Streams `total` bytes of the seeds' pattern through `addr`, verifying the
/// reply; writes `first` bytes, then waits for a go before the rest.
fn paused_stream(hostport: &str, first: usize, total: usize) -> PausedStream {
    let s = TcpStream::connect(hostport).expect("connect");
    let mut r = s.try_clone().unwrap();
    let mut w = s;
    let (go, wait) = mpsc::channel::<()>();
    thread::spawn(move || {
        let chunk = b"capitalize this!".repeat(CHUNK / 16);
        let mut sent = 0;
        while sent < total {
            if sent == first {
                let _ = wait.recv();
            }
            if w.write_all(&chunk).is_err() {
                return;
            }
            sent += CHUNK;
        }
        let _ = w.shutdown(std::net::Shutdown::Write);
    });
    let (tell, served) = mpsc::channel::<()>();
    let done = thread::spawn(move || {
        r.set_read_timeout(Some(SECS(30)))?;
        let expect = b"CAPITALIZE THIS!";
        let mut buf = vec![0u8; CHUNK];
        let mut got: u64 = 0;
        loop {
            let n = r.read(&mut buf)?;
            if n == 0 {
                return Ok(got);
            }
            for (i, b) in buf[..n].iter().enumerate() {
                if *b != expect[(got as usize + i) % 16] {
                    return Err(std::io::Error::other(format!(
                        "wrong byte at {}",
                        got as usize + i
                    )));
                }
            }
            if got == 0 {
                let _ = tell.send(());
            }
            got += n as u64;
        }
    });
    PausedStream { served, go, done }
}

#[test]
fn a_drain_refuses_new_connects_and_finishes_the_stream_in_progress() {
    for model in runnable(&ALL) {
        let path = sock_path("drain");
        let unix = format!("unix:{}", path.display());
        let mut srv = Server::start(&["--model", model, "tcp://127.0.0.1:0", &unix], 2);
        let total = 64 << 20;
        let stream = paused_stream(srv.hostport(0), 4 << 20, total);
        // Signal once the server serves it, not after a pause that a slow
        // machine may outlast (a connection still in the backlog is reset
        // by the drain, by design).
        stream
            .served
            .recv_timeout(SECS(10))
            .expect("the stream is served");
        kill(srv.pid(), libc::SIGTERM);
        let mut log = String::new();
        wait_log(&srv, &mut log, "no new connections", SECS(5));
        // Listeners are shut at once: refused, not accepted and reset later.
        let e = TcpStream::connect(srv.hostport(0)).expect_err("connect during the drain");
        assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{model}: {e}");
        assert!(!path.exists(), "{model}: the socket file is still there");
        let e = UnixStream::connect(&path).expect_err("unix connect during the drain");
        assert!(
            matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused),
            "{model}: {e}"
        );
        assert!(
            srv.child.try_wait().unwrap().is_none(),
            "{model}: exited with a stream in progress"
        );
        // The stream goes on to the end, verified.
        stream.go.send(()).unwrap();
        let got = stream.done.join().unwrap();
        assert_eq!(got.ok(), Some(total as u64), "{model}: the stream was cut");
        let status = wait_deadline(&mut srv.child, SECS(10)).expect("exits after the drain");
        assert_eq!(status.code(), Some(0), "{model}");
        wait_log(&srv, &mut log, "all connections finished", SECS(2));
    }
}

#[test]
fn the_drain_deadline_cuts_what_is_left_and_removes_the_socket_file() {
    for model in runnable(&ALL) {
        let path = sock_path("deadline");
        let unix = format!("unix:{}", path.display());
        let mut srv = Server::start(
            &[
                "--model",
                model,
                "--drain-timeout",
                "700ms",
                "tcp://127.0.0.1:0",
                &unix,
            ],
            2,
        );
        let mut s = TcpStream::connect(srv.hostport(0)).unwrap();
        s.write_all(b"never finished").unwrap();
        let mut buf = [0u8; 14];
        s.read_exact(&mut buf).unwrap();
        let start = Instant::now();
        kill(srv.pid(), libc::SIGTERM);
        thread::sleep(Duration::from_millis(400));
        assert!(
            srv.child.try_wait().unwrap().is_none(),
            "{model}: did not wait for the connection"
        );
        let status = wait_deadline(&mut srv.child, SECS(5)).expect("exits at the deadline");
        assert_eq!(status.code(), Some(0), "{model}");
        assert!(start.elapsed() >= Duration::from_millis(650), "{model}");
        let mut log = String::new();
        wait_log(&srv, &mut log, "cutting 1 unfinished connection", SECS(2));
        assert!(!path.exists(), "{model}: socket file left behind");
        // The client sees the end, not a hang.
        s.set_read_timeout(Some(SECS(5))).unwrap();
        assert!(matches!(s.read(&mut buf), Ok(0) | Err(_)));
    }
}

#[test]
fn a_second_signal_stops_at_once_and_removes_the_socket_file() {
    for model in runnable(&ALL) {
        let path = sock_path("second");
        let unix = format!("unix:{}", path.display());
        let mut srv = Server::start(&["--model", model, "--drain-timeout", "60s", &unix], 1);
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(b"a client that never finishes").unwrap();
        let mut back = [0u8; 28];
        s.set_read_timeout(Some(SECS(10))).unwrap();
        s.read_exact(&mut back).unwrap(); // served: accepted, not in the backlog
        assert_eq!(&back, b"A CLIENT THAT NEVER FINISHES");
        kill(srv.pid(), libc::SIGTERM);
        let mut log = String::new();
        wait_log(&srv, &mut log, "no new connections", SECS(5));
        assert!(srv.child.try_wait().unwrap().is_none(), "{model}");
        let start = Instant::now();
        kill(srv.pid(), libc::SIGTERM);
        let status = wait_deadline(&mut srv.child, SECS(5)).expect("exits at the second signal");
        assert_eq!(status.code(), Some(0), "{model}");
        assert!(start.elapsed() < SECS(3), "{model}");
        wait_log(&srv, &mut log, "second signal", SECS(2));
        assert!(!path.exists(), "{model}: socket file left behind");
    }
}

/// Clients whose requests arrived while the server was stopped are not
/// idle: the server was, they were not. A silent client still is.
#[test]
fn a_stopped_server_does_not_call_waiting_clients_idle() {
    for model in runnable(&["threads", "select", "epoll", "async", "uring", "fork"]) {
        let srv = Server::start(
            &[
                "--model",
                model,
                "-q",
                "--idle-timeout",
                "1500ms",
                "tcp://127.0.0.1:0",
            ],
            1,
        );
        let mut clients: Vec<TcpStream> = (0..20)
            .map(|_| TcpStream::connect(srv.hostport(0)).unwrap())
            .collect();
        for c in &mut clients {
            c.set_read_timeout(Some(SECS(5))).unwrap();
            c.write_all(b"first").unwrap();
            let mut buf = [0u8; 5];
            c.read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"FIRST");
        }
        let mut silent = TcpStream::connect(srv.hostport(0)).unwrap();
        kill(srv.pid(), libc::SIGSTOP);
        for c in &mut clients {
            c.write_all(b"again").unwrap();
        }
        thread::sleep(Duration::from_millis(3000));
        kill(srv.pid(), libc::SIGCONT);
        for (i, c) in clients.iter_mut().enumerate() {
            let mut buf = [0u8; 5];
            c.read_exact(&mut buf)
                .unwrap_or_else(|e| panic!("{model}: client {i} was closed: {e}"));
            assert_eq!(&buf, b"AGAIN", "{model}");
        }
        silent.set_read_timeout(Some(SECS(6))).unwrap();
        let mut buf = [0u8; 1];
        assert!(
            matches!(silent.read(&mut buf), Ok(0)),
            "{model}: the silent client was not closed as idle"
        );
    }
}

/// The idle sweep closes silent clients while another client is being
/// served; the server goes on (the select model used to panic here).
#[test]
fn idle_clients_close_while_others_are_served() {
    for model in runnable(&ALL) {
        if model == "iterative" || model == "pool" {
            continue; // one (or a few) at a time by design
        }
        let mut srv = Server::start(
            &[
                "--model",
                model,
                "-q",
                "--idle-timeout",
                "500ms",
                "tcp://127.0.0.1:0",
            ],
            1,
        );
        let silent: Vec<TcpStream> = (0..20)
            .map(|_| TcpStream::connect(srv.hostport(0)).unwrap())
            .collect();
        let mut rr = TcpStream::connect(srv.hostport(0)).unwrap();
        rr.set_read_timeout(Some(SECS(5))).unwrap();
        let until = Instant::now() + Duration::from_millis(1500);
        let mut n = 0;
        while Instant::now() < until {
            rr.write_all(b"ping").unwrap();
            let mut buf = [0u8; 4];
            rr.read_exact(&mut buf)
                .unwrap_or_else(|e| panic!("{model}: request {n}: {e}"));
            assert_eq!(&buf, b"PING");
            n += 1;
            thread::sleep(Duration::from_millis(50));
        }
        for mut s in silent {
            s.set_read_timeout(Some(SECS(5))).unwrap();
            let mut buf = [0u8; 1];
            assert!(matches!(s.read(&mut buf), Ok(0)), "{model}: not closed");
        }
        assert!(
            srv.child.try_wait().unwrap().is_none(),
            "{model}: the server died: {}",
            srv.logs()
        );
    }
}
