//! Shared test helpers: start the real `upcase` binary and real peers, with
//! every wait bounded so that a hang fails the test instead of the CI run.
#![allow(dead_code)] // each test file uses a different part

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_upcase");

pub fn upcase() -> Command {
    Command::new(BIN)
}

pub fn peer(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/peers")
        .join(name)
}

/// A unique path for a Unix socket in the system temp dir.
pub fn sock_path(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "upcase-test-{}-{}-{tag}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// A running `upcase serve`, killed on drop.
pub struct Server {
    pub child: Child,
    /// The endpoints from its `listening ...` lines, in order.
    pub endpoints: Vec<String>,
    pub stderr: mpsc::Receiver<String>,
}

impl Server {
    /// Starts `upcase serve ARGS` and waits (up to 10 s) for `listeners`
    /// `listening` lines.
    pub fn start(args: &[&str], listeners: usize) -> Server {
        let mut child = upcase()
            .arg("serve")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn upcase serve");
        let stderr = lines_of(child.stderr.take().expect("stderr"));
        let stdout = lines_of(child.stdout.take().expect("stdout"));
        let mut endpoints = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while endpoints.len() < listeners {
            let left = deadline.saturating_duration_since(Instant::now());
            match stdout.recv_timeout(left) {
                Ok(line) => {
                    let ep = line
                        .strip_prefix("listening ")
                        .unwrap_or_else(|| panic!("unexpected stdout line {line:?}"));
                    endpoints.push(ep.to_string());
                }
                Err(_) => {
                    let _ = child.kill();
                    let err: Vec<String> = stderr.try_iter().collect();
                    panic!("server did not announce {listeners} listeners: {err:?}");
                }
            }
        }
        Server {
            child,
            endpoints,
            stderr,
        }
    }

    pub fn addr(&self, i: usize) -> &str {
        &self.endpoints[i]
    }

    /// The TCP `HOST:PORT` of listener `i` (without the scheme).
    pub fn hostport(&self, i: usize) -> &str {
        let ep = &self.endpoints[i];
        ep.split_once("://").map_or(ep.as_str(), |(_, rest)| rest)
    }

    pub fn port(&self, i: usize) -> u16 {
        self.hostport(i)
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port")
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends `sig` and waits (up to `within`) for the exit status.
    pub fn signal_and_wait(&mut self, sig: i32, within: Duration) -> ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid(), sig) };
        wait_deadline(&mut self.child, within).expect("server did not exit in time")
    }

    /// Everything the server logged so far.
    pub fn logs(&self) -> String {
        self.stderr.try_iter().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The lines `r` produces, read on a thread of their own.
pub fn lines_of(r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

pub fn wait_deadline(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// What a finished command did.
#[derive(Debug)]
pub struct Run {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }

    pub fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// The value of a `key: value` summary line on stdout.
    pub fn field(&self, key: &str) -> String {
        let prefix = format!("{key}:");
        self.out()
            .lines()
            .find_map(|l| l.strip_prefix(&prefix).map(|v| v.trim().to_string()))
            .unwrap_or_else(|| panic!("no '{key}:' in {:?}", self.out()))
    }

    /// A summary field's leading number.
    pub fn num(&self, key: &str) -> u64 {
        self.field(key)
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("'{key}' is not a number in {:?}", self.out()))
    }
}

/// Runs `cmd` with `stdin` as input, killing it (and failing) after `limit`.
pub fn run(mut cmd: Command, stdin: &[u8], limit: Duration) -> Run {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let mut input = child.stdin.take().expect("stdin");
    let data = stdin.to_vec();
    let writer = thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let Some(status) = wait_deadline(&mut child, limit) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "{cmd:?} did not finish within {limit:?}; stderr: {}",
            err_t.join().unwrap_or_default()
        );
    };
    let _ = writer.join();
    Run {
        status,
        stdout: out_t.join().expect("stdout thread"),
        stderr: err_t.join().expect("stderr thread"),
        elapsed: start.elapsed(),
    }
}

/// `upcase ARGS` with `stdin`, bounded by `limit`.
pub fn upcase_run(args: &[&str], stdin: &[u8], limit: Duration) -> Run {
    let mut cmd = upcase();
    cmd.args(args);
    run(cmd, stdin, limit)
}

/// Fails with a clear message when a peer program is missing.
pub fn require(program: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{program} is not installed: install {package} (scripts/test.sh does it)"
    );
}

pub const SECS: fn(u64) -> Duration = Duration::from_secs;

/// Whether `upcase serve --model MODEL` can start here (the uring model
/// needs a kernel with io_uring enabled). Asked once per model.
pub fn model_available(model: &str) -> bool {
    if model != "uring" {
        return true;
    }
    static URING: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    URING.get_or_init(|| {
        let mut child = upcase()
            .args(["serve", "-q", "--model", "uring", "tcp://127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let lines = lines_of(child.stdout.take().expect("stdout"));
        let ok = lines
            .recv_timeout(Duration::from_secs(10))
            .is_ok_and(|l| l.starts_with("listening "));
        let _ = child.kill();
        let _ = child.wait();
        ok
    });
    if !*URING.get().unwrap_or(&false) {
        skip("the uring model: io_uring is not available on this machine");
    }
    *URING.get().unwrap_or(&false)
}

/// Records that the current test skipped part of its work, and why: on
/// stderr, and in the file `$UPCASE_SKIP_LOG` names, which scripts/test.sh
/// counts into its closing line. A skip is never a silent pass.
pub fn skip(why: &str) {
    let test = thread::current().name().unwrap_or("a test").to_string();
    let line = format!("SKIPPED {test}: {why}");
    eprintln!("{line}");
    if let Some(path) = std::env::var_os("UPCASE_SKIP_LOG") {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path);
        if let Ok(mut f) = f {
            let _ = writeln!(f, "{line}");
        }
    }
}

/// The first line `child` prints on stdout (waiting at most 10 s); the rest
/// of its output is drained in the background, so it never blocks on a full
/// pipe.
pub fn first_line(child: &mut Child) -> String {
    let lines = lines_of(child.stdout.take().expect("stdout piped"));
    let line = lines
        .recv_timeout(Duration::from_secs(10))
        .expect("the child printed no line within 10 s");
    thread::spawn(move || for _ in lines {});
    line
}

/// Whether `cond` comes true within `limit` (asked every 20 ms).
pub fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// Open descriptors of a process.
pub fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Times the threads of `pid` went to sleep (voluntary context switches,
/// summed over its live threads). Unlike all switches, these do not grow
/// when other work on the machine preempts the process.
pub fn sleeps(pid: i32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| status_field(&t.path().join("status"), "voluntary_ctxt_switches:"))
        .sum()
}

/// The first number after `key` in a /proc `status` file.
fn status_field(path: &std::path::Path, key: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    })
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: i32) -> u64 {
    status_field(format!("/proc/{pid}/status").as_ref(), "VmRSS:").unwrap_or(0)
}

/// A client that writes (up to 256 MiB) and never reads. Returns once its
/// writes are stuck (no progress for half a second), with the count of
/// bytes the kernel took from it; panics if it never gets stuck.
pub fn start_hog(hostport: &str) -> (std::net::TcpStream, Arc<AtomicU64>) {
    let hog = std::net::TcpStream::connect(hostport).expect("connect hog");
    let written = Arc::new(AtomicU64::new(0));
    let mut w = hog.try_clone().expect("clone");
    let count = written.clone();
    thread::spawn(move || {
        let block = vec![b'x'; 64 * 1024];
        for _ in 0..4096 {
            if w.write_all(&block).is_err() {
                break;
            }
            count.fetch_add(block.len() as u64, Ordering::Relaxed);
        }
    });
    let (mut last, mut still) = (u64::MAX, 0);
    for _ in 0..400 {
        thread::sleep(Duration::from_millis(50));
        let now = written.load(Ordering::Relaxed);
        still = if now == last { still + 1 } else { 0 };
        last = now;
        if still >= 10 {
            return (hog, written);
        }
    }
    panic!("the hog never got stuck: the server keeps reading from a client that never reads");
}

/// Ends a hog: wakes its blocked writer, then closes with a reset.
pub fn stop_hog(hog: std::net::TcpStream) {
    let _ = socket2::SockRef::from(&hog).set_linger(Some(Duration::ZERO));
    let _ = hog.shutdown(std::net::Shutdown::Both);
    drop(hog);
}

/// The port in a Python server's first line, "Listening at ('HOST', PORT)".
pub fn listening_port(line: &str) -> u16 {
    line.trim()
        .trim_end_matches(')')
        .rsplit(", ")
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected line {line:?}"))
}

/// A small deterministic PRNG (xorshift64*), so failures can be replayed
/// from their seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Threads of a process.
pub fn thread_count(pid: i32) -> usize {
    status_field(format!("/proc/{pid}/status").as_ref(), "Threads:").unwrap_or(0) as usize
}

/// The pids of a process's children.
pub fn child_pids(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Every server model, in the order the seeds build them.
pub const ALL_MODELS: [&str; 8] = [
    "iterative",
    "fork",
    "threads",
    "pool",
    "select",
    "epoll",
    "async",
    "uring",
];

/// The models of `list` that can run here (the others are counted as
/// skipped by [`model_available`]).
pub fn runnable<'a>(list: &[&'a str]) -> Vec<&'a str> {
    list.iter()
        .copied()
        .filter(|m| model_available(m))
        .collect()
}

/// GET /metrics at `at` (HOST:PORT): the body of a 200 answer.
pub fn scrape(at: &str) -> String {
    let mut c = std::net::TcpStream::connect(at).expect("connect to /metrics");
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    c.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}
