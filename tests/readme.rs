//! The console examples of the README and of docs/, executed: what a
//! newcomer reads is what the binary does.
//!
//! Every ```` ```console ```` block is run, one `$ ` command after another,
//! through bash, with `upcase` on PATH. What a block needs comes from an
//! HTML comment on the line before it (invisible on the rendered page):
//!
//! - `<!-- test: server ARGS -->`: `upcase ARGS` runs in the background
//!   for the block (it must print its `listening` lines first);
//! - `<!-- test: first-lines -->`: each command is a server that runs until
//!   stopped: its first lines are compared, then it is killed;
//! - `; typed PROMPT` after either: what follows PROMPT on an output line
//!   was typed by the user, so it is fed on stdin instead of expected.
//!
//! A command ending in `&` runs in the background until the block ends.
//! The README's ports (1060, 1061, 1062) and socket path are replaced by
//! free ones, so the examples never collide with a server the reader runs.
//!
//! Output is compared line by line, after stdout and stderr are merged as a
//! terminal shows them and runs of spaces are squeezed. Numbers are
//! wildcards (rates, times, ports and queue sizes vary), except on the
//! lines that state a result: `sent:`, `received:`, `wrong:`, `lost:`,
//! `answered:`, `errors:` and `exit N` keep their exact numbers.

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

/// One console block of the README.
struct Block {
    /// Where it is, for the messages: `README.md line 88`.
    file: String,
    line: usize,
    setup: Option<String>,
    steps: Vec<(String, Vec<String>)>,
}

fn blocks(file: &str, text: &str) -> Vec<Block> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim() != "```console" {
            i += 1;
            continue;
        }
        let setup = i
            .checked_sub(1)
            .and_then(|p| lines[p].trim().strip_prefix("<!-- test:"))
            .and_then(|a| a.strip_suffix("-->"))
            .map(|a| a.trim().to_string());
        let mut block = Block {
            file: file.to_string(),
            line: i + 1,
            setup,
            steps: Vec::new(),
        };
        i += 1;
        while i < lines.len() && !lines[i].starts_with("```") {
            match lines[i].strip_prefix("$ ") {
                Some(cmd) => block.steps.push((cmd.to_string(), Vec::new())),
                None => {
                    if let Some(step) = block.steps.last_mut() {
                        step.1.push(lines[i].to_string());
                    }
                }
            }
            i += 1;
        }
        out.push(block);
    }
    out
}

/// The README's fixed names, and what the test uses instead.
struct Names(Vec<(String, String)>);

impl Names {
    fn new() -> Names {
        let mut pairs = Vec::new();
        for readme in ["1060", "1061", "1062"] {
            pairs.push((readme.to_string(), free_port().to_string()));
        }
        let sock = sock_path("readme");
        pairs.push(("/tmp/upcase.sock".into(), sock.display().to_string()));
        let pid = sock.with_extension("pid");
        pairs.push(("/tmp/upcase.pid".into(), pid.display().to_string()));
        Names(pairs)
    }

    fn apply(&self, s: &str) -> String {
        self.0
            .iter()
            .fold(s.to_string(), |s, (from, to)| s.replace(from, to))
    }
}

/// A port free for both TCP and UDP on 127.0.0.1.
fn free_port() -> u16 {
    loop {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// `bash -c CMD` with `upcase` on PATH, in the repository; with `merged`,
/// stderr goes where stdout goes, as on a terminal.
fn bash(cmd: &str, merged: bool) -> Command {
    let bin_dir = Path::new(BIN).parent().expect("the binary's folder");
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let redirect = if merged {
        "exec 2>&1"
    } else {
        "exec 2>/dev/null"
    };
    let mut c = Command::new("bash");
    c.arg("-c")
        .arg(format!("{redirect}; {cmd}"))
        .env("PATH", path)
        .env_remove("UPCASE_LOG")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .process_group(0);
    c
}

/// Starts a server in the background and waits until it serves (its log
/// says so after every listener is bound). Returns it and what it printed.
fn background(cmd: &str) -> (Child, Vec<String>, mpsc::Receiver<String>) {
    let mut child = bash(cmd, true)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn bash");
    let lines = lines_of(child.stdout.take().expect("stdout"));
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let Ok(l) = lines.recv_timeout(left) else {
            break;
        };
        let serving = l.contains("serving with");
        seen.push(l);
        if serving {
            break;
        }
    }
    // The receiver is kept: dropping it would close the pipe the server
    // still logs to.
    (child, seen, lines)
}

/// The first `n` lines a long-running command prints on stdout (what the
/// README shows; its logs go to stderr), then it is killed.
fn first_lines(cmd: &str, n: usize) -> Vec<String> {
    let mut child = bash(cmd, false)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn bash");
    let rx: mpsc::Receiver<String> = lines_of(child.stdout.take().expect("stdout"));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while got.len() < n {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            break;
        };
        match rx.recv_timeout(left) {
            Ok(l) => got.push(l),
            Err(_) => break,
        }
    }
    stop(&mut child);
    got
}

fn stop(child: &mut Child) {
    // Every descendant first: a supervisor's workers and its restarted
    // generations run in process groups of their own.
    for pid in descendants(child.id() as i32) {
        // SAFETY: plain kill(2) on a process this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    // SAFETY: plain kill(2) on our own child's process group.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    let _ = child.kill();
    let _ = child.wait();
}

/// The children of `pid`, their children, and so on.
fn descendants(pid: i32) -> Vec<i32> {
    let mut all = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let kids = child_pids(p);
        all.extend(&kids);
        todo.extend(kids);
    }
    all
}

/// `upcase serve` with no address binds the seeds' port 1060, which the
/// reader's own server may hold: then that example cannot run here.
fn port_taken(cmd: &str) -> bool {
    cmd.trim() == "upcase serve" && std::net::TcpListener::bind("127.0.0.1:1060").is_err()
}

const EXACT: [&str; 7] = [
    "sent:",
    "received:",
    "wrong:",
    "lost:",
    "answered:",
    "errors:",
    "exit ",
];

/// Whether `actual` is what the README shows as `expected`.
fn same_line(expected: &str, actual: &str) -> bool {
    let squeeze = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    let (e, a) = (squeeze(expected), squeeze(actual));
    if EXACT.iter().any(|k| e.starts_with(k)) {
        return e == a;
    }
    // Numbers are wildcards: compare the text between them.
    let shape = |s: &str| {
        let mut out = String::new();
        let mut in_number = false;
        for ch in s.chars() {
            let digit = ch.is_ascii_digit() || (in_number && ch == '.');
            if digit && !in_number {
                out.push('#');
            } else if !digit {
                out.push(ch);
            }
            in_number = digit;
        }
        out
    };
    shape(&e) == shape(&a)
}

fn check(block: &Block, step: &str, expected: &[String], actual: &[String]) {
    let diff = || {
        format!(
            "{} line {}: `$ {step}`\n--- documented\n{}\n--- actual\n{}\n",
            block.file,
            block.line,
            expected.join("\n"),
            actual.join("\n")
        )
    };
    assert_eq!(expected.len(), actual.len(), "{}", diff());
    for (e, a) in expected.iter().zip(actual) {
        assert!(same_line(e, a), "{}", diff());
    }
}

#[test]
fn readme_console_examples_are_true() {
    // The README, and every page under docs/.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut pages = vec![root.join("README.md")];
    let mut docs: Vec<_> = std::fs::read_dir(root.join("docs"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    docs.retain(|p| p.extension().is_some_and(|e| e == "md"));
    docs.sort();
    pages.extend(docs);
    let mut all = Vec::new();
    for page in &pages {
        let text = std::fs::read_to_string(page).expect("a documentation page");
        let name = page
            .strip_prefix(root)
            .unwrap_or(page)
            .display()
            .to_string();
        all.extend(blocks(&name, &text));
    }
    assert!(all.len() >= 10, "found only {} console blocks", all.len());
    let mut ran = 0;
    for block in &all {
        let names = Names::new();
        let setup = block.setup.as_deref().map(|s| names.apply(s));
        let (setup, typed) = match setup.as_deref().map(|s| s.split_once("; typed ")) {
            Some(Some((s, p))) => (Some(s.to_string()), Some(p.to_string())),
            _ => (setup, None),
        };
        let mut held = Vec::new();
        if let Some(args) = setup.as_deref().and_then(|s| s.strip_prefix("server ")) {
            let (child, seen, logs) = background(&format!("exec upcase {args}"));
            assert!(
                seen.iter().any(|l| l.starts_with("listening ")),
                "{} line {}: `upcase {args}` did not start: {seen:?}",
                block.file,
                block.line
            );
            held.push((child, logs));
        }
        for (cmd, expected) in &block.steps {
            let cmd = names.apply(cmd);
            let mut expected: Vec<String> = expected.iter().map(|l| names.apply(l)).collect();
            if let Some(bg) = cmd.strip_suffix('&') {
                let (child, _, logs) = background(bg);
                held.push((child, logs));
                continue;
            }
            if setup.as_deref() == Some("first-lines") {
                let got = first_lines(&cmd, expected.len());
                if got.is_empty() && port_taken(&cmd) {
                    skip(&format!(
                        "{} line {}: `{cmd}` needs a port another program holds",
                        block.file, block.line
                    ));
                    continue;
                }
                check(block, &cmd, &expected, &got);
                ran += 1;
                continue;
            }
            let mut input = String::new();
            if let Some(prompt) = &typed {
                // "Input: hello" shows what was typed after the prompt; the
                // program itself prints the prompt with no newline.
                let mut joined = String::new();
                for l in &expected {
                    match l.strip_prefix(prompt.as_str()) {
                        Some(rest) => {
                            input.push_str(rest.trim_start());
                            input.push('\n');
                            joined.push_str(prompt);
                            joined.push(' ');
                        }
                        None => {
                            joined.push_str(l);
                            joined.push('\n');
                        }
                    }
                }
                expected = joined.lines().map(str::to_string).collect();
            }
            let out = run(bash(&cmd, true), input.as_bytes(), Duration::from_secs(60));
            let actual: Vec<String> = out.out().lines().map(str::to_string).collect();
            check(block, &cmd, &expected, &actual);
            ran += 1;
        }
        for (mut child, _) in held {
            stop(&mut child);
        }
    }
    eprintln!("ran {ran} README commands");
}
