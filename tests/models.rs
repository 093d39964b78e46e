//! One conformance suite, run against every server model: the same tests,
//! parametrised over `--model`, each starting the real binary.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// `r#async` is spelled `async` on the command line.
const fn model_name(ident: &'static str) -> &'static str {
    match ident.as_bytes() {
        [b'r', b'#', ..] => "async",
        _ => ident,
    }
}

/// Runs `test` for `model` if the model can run here.
fn with(model: &str, test: impl FnOnce(&str)) {
    if model_available(model) {
        test(model)
    }
}

fn serve(model: &str, extra: &[&str], listeners: usize) -> Server {
    let mut args = vec!["--model", model, "-q"];
    args.extend_from_slice(extra);
    Server::start(&args, listeners)
}

fn stream_256m_and_seed_client(model: &str) {
    let srv = serve(model, &["tcp://127.0.0.1:0"], 1);
    let r = upcase_run(&["send", srv.addr(0), "--bytes", "256M"], b"", SECS(120));
    assert_eq!(r.code(), 0, "{model}: {}\n{}", r.out(), r.stderr);
    assert_eq!(
        (r.num("received"), r.num("wrong")),
        (256 << 20, 0),
        "{model}"
    );

    require("python3", "python3");
    let mut cmd = std::process::Command::new("python3");
    cmd.arg(peer("tcp_deadlock.py"))
        .args(["client", "127.0.0.1", &srv.port(0).to_string(), "32"]);
    let r = run(cmd, b"", SECS(20));
    assert!(
        // The server may answer the first 16 bytes before the next 16
        // arrive, so the first read holds one or two copies; the count
        // says all 32 came back.
        r.out()
            .contains("The first data received says b'CAPITALIZE THIS!")
            && r.out().contains("32 bytes received"),
        "{model}: exit {:?}\n{}\n{}",
        r.status,
        r.out(),
        r.stderr
    );
}

/// Opens `n` connections first, then has each do one verified
/// request/response and half-close, all at once.
fn concurrent_rr(model: &str, n: usize) {
    concurrent_rr_with(model, &[], n)
}

fn concurrent_rr_with(model: &str, extra: &[&str], n: usize) {
    let mut args = vec!["tcp://127.0.0.1:0"];
    args.extend_from_slice(extra);
    let srv = serve(model, &args, 1);
    let addr = srv.hostport(0).to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ok = rt.block_on(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut conns = Vec::with_capacity(n);
        for _ in 0..n {
            conns.push(
                tokio::net::TcpStream::connect(&addr)
                    .await
                    .expect("connect"),
            );
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (i, mut c) in conns.into_iter().enumerate() {
            tasks.spawn(async move {
                let msg = format!("request number {i:05} from a client\n").repeat(4);
                c.write_all(msg.as_bytes()).await?;
                c.shutdown().await?;
                let mut reply = Vec::new();
                c.read_to_end(&mut reply).await?;
                Ok::<bool, std::io::Error>(reply == msg.to_uppercase().as_bytes())
            });
        }
        let mut ok = 0;
        let work = async {
            while let Some(r) = tasks.join_next().await {
                if matches!(r, Ok(Ok(true))) {
                    ok += 1;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(60), work)
            .await
            .expect("1000 clients did not finish in 60 s");
        ok
    });
    assert_eq!(ok, n, "{model}: verified replies");
}

fn non_reader_does_not_delay_others(model: &str) {
    let srv = serve(model, &["tcp://127.0.0.1:0"], 1);
    let (hog, _) = start_hog(srv.hostport(0));
    let r = upcase_run(&["send", srv.addr(0), "--bytes", "64M"], b"", SECS(60));
    assert_eq!(r.code(), 0, "{model}: {}", r.stderr);
    assert_eq!(r.num("received"), 64 << 20, "{model}");
    drop(hog);
}

/// The iterative model serves one client at a time: while a client that
/// never reads holds it, the next client waits (the seed's lesson).
fn iterative_blocks_behind_a_non_reader() {
    let srv = serve("iterative", &["tcp://127.0.0.1:0"], 1);
    let (hog, _) = start_hog(srv.hostport(0));
    let mut c = TcpStream::connect(srv.hostport(0)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    c.write_all(b"anyone there?").unwrap();
    let mut buf = [0u8; 13];
    let err = c
        .read_exact(&mut buf)
        .expect_err("served while the hog held the server");
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{err}"
    );
    // Once the hog goes away, the waiting client is served.
    stop_hog(hog);
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c.read_exact(&mut buf).expect("served after the hog left");
    assert_eq!(&buf, b"ANYONE THERE?");
}

fn resets_leave_the_server_serving(model: &str) {
    let srv = serve(model, &["tcp://127.0.0.1:0"], 1);
    // Warm up (runtimes open descriptors lazily), then take the baseline.
    let r = upcase_run(&["send", srv.addr(0)], b"warm", SECS(10));
    assert_eq!(r.out(), "WARM");
    let before = fd_count(srv.pid());
    for _ in 0..20 {
        let mut c = TcpStream::connect(srv.hostport(0)).unwrap();
        let _ = c.write_all(&vec![b'a'; 1 << 20]);
        // SO_LINGER 0: close sends RST instead of FIN.
        socket2::SockRef::from(&c)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(c);
    }
    let r = upcase_run(&["send", srv.addr(0)], b"still serving", SECS(10));
    assert_eq!(r.out(), "STILL SERVING", "{model}: {}", r.stderr);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut now = fd_count(srv.pid());
    while now != before && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
        now = fd_count(srv.pid());
    }
    assert_eq!(now, before, "{model}: descriptors leaked after resets");
}

fn half_close_and_udp_and_unix(model: &str) {
    let path = sock_path(model);
    let unix = format!("unix:{}", path.display());
    let mut srv = serve(model, &["tcp://127.0.0.1:0", "udp://127.0.0.1:0", &unix], 3);
    let mut s = TcpStream::connect(srv.hostport(0)).unwrap();
    s.set_read_timeout(Some(SECS(10))).unwrap();
    let msg = b"half-close me! ".repeat(50_000);
    let writer = {
        let mut w = s.try_clone().unwrap();
        let msg = msg.clone();
        thread::spawn(move || {
            w.write_all(&msg).unwrap();
            w.shutdown(std::net::Shutdown::Write).unwrap();
        })
    };
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).expect("everything, then EOF");
    writer.join().unwrap();
    assert!(reply == msg.to_ascii_uppercase(), "{model}: reply differs");

    let r = upcase_run(&["send", srv.addr(1)], b"datagram\n", SECS(10));
    assert_eq!(r.out(), "DATAGRAM\n", "{model}: {}", r.stderr);
    let r = upcase_run(&["send", &unix, "--bytes", "8M"], b"", SECS(30));
    assert_eq!(r.code(), 0, "{model}: {}", r.stderr);

    let status = srv.signal_and_wait(libc::SIGTERM, SECS(15));
    assert_eq!(status.code(), Some(0), "{model}: {}", srv.logs());
    assert!(!path.exists(), "{model}: Unix socket file left behind");
}

macro_rules! conformance {
    ($($model:ident),* $(,)?) => {$(
        mod $model {
            const M: &str = super::model_name(stringify!($model));
            #[test]
            fn stream_256m_and_seed_client() { super::with(M, super::stream_256m_and_seed_client) }
            #[test]
            fn thousand_concurrent_request_response() { super::with(M, |m| super::concurrent_rr(m, 1000)) }
            #[test]
            fn resets_leave_the_server_serving() { super::with(M, super::resets_leave_the_server_serving) }
            #[test]
            fn half_close_udp_unix_and_sigterm() { super::with(M, super::half_close_and_udp_and_unix) }
        }
    )*};
}

conformance!(
    iterative, fork, threads, pool, select, epoll, r#async, uring
);

macro_rules! concurrent_models {
    ($($model:ident),* $(,)?) => {$(
        #[test]
        fn $model() { super::with(super::model_name(stringify!($model)), super::non_reader_does_not_delay_others) }
    )*};
}

mod non_reader_does_not_delay_others {
    concurrent_models!(fork, threads, pool, select, epoll, uring);
    #[test]
    fn r#async() {
        super::non_reader_does_not_delay_others("async")
    }
    #[test]
    fn iterative_blocks_instead() {
        super::iterative_blocks_behind_a_non_reader()
    }
}

#[test]
fn fork_model_runs_no_threads_and_leaves_no_zombies() {
    let srv = serve("fork", &["tcp://127.0.0.1:0"], 1);
    for i in 0..20 {
        let r = upcase_run(
            &["send", srv.addr(0)],
            format!("child {i}").as_bytes(),
            SECS(10),
        );
        assert_eq!(r.out(), format!("CHILD {i}"));
    }
    let tasks = std::fs::read_dir(format!("/proc/{}/task", srv.pid()))
        .unwrap()
        .count();
    assert_eq!(tasks, 1, "the fork model must be single-threaded");
    // Children exit after their client; the parent reaps them.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let zombies = children_of(srv.pid())
            .iter()
            .filter(|state| state.as_str() == "Z")
            .count();
        let alive = children_of(srv.pid()).len();
        if zombies == 0 && alive == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{alive} children, {zombies} zombies remain"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// States of the processes whose parent is `pid`.
fn children_of(pid: i32) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let (state, ppid) = (f.next(), f.next());
        if ppid == Some(&pid.to_string()) {
            out.push(state.unwrap_or("?").to_string());
        }
    }
    out
}

#[test]
fn max_conns_makes_new_clients_wait() {
    for model in ["threads", "select", "epoll", "async", "fork", "uring"] {
        if !model_available(model) {
            continue;
        }
        let srv = serve(model, &["tcp://127.0.0.1:0", "--max-conns", "1"], 1);
        let hog = start_hog(srv.hostport(0)).0;
        waits_until_a_slot_frees(model, &srv, vec![hog]);
    }
}

/// With `hogs` holding every slot of `--max-conns`, a new client is not
/// served; once they are gone, it is.
fn waits_until_a_slot_frees(model: &str, srv: &Server, hogs: Vec<TcpStream>) {
    let mut c = TcpStream::connect(srv.hostport(0)).expect("connect (backlog)");
    c.set_read_timeout(Some(Duration::from_millis(800)))
        .unwrap();
    c.write_all(b"wait").unwrap();
    let mut buf = [0u8; 4];
    assert!(
        c.read_exact(&mut buf).is_err(),
        "{model}: served beyond --max-conns with {} hogs",
        hogs.len()
    );
    for h in hogs {
        stop_hog(h);
    }
    c.set_read_timeout(Some(SECS(20))).unwrap();
    c.read_exact(&mut buf).expect("served once a slot is free");
    assert_eq!(&buf, b"WAIT", "{model}");
}

/// Several event loops share the listeners: every client is served, and
/// `--max-conns` counts over all of them.
#[test]
fn several_loops_share_the_clients_and_the_limit() {
    for model in ["epoll", "uring"] {
        if !model_available(model) {
            continue;
        }
        concurrent_rr_with(model, &["--workers", "3"], 300);

        let srv = serve(
            model,
            &["tcp://127.0.0.1:0", "--workers", "3", "--max-conns", "2"],
            1,
        );
        let hogs = vec![start_hog(srv.hostport(0)).0, start_hog(srv.hostport(0)).0];
        waits_until_a_slot_frees(model, &srv, hogs);
    }
}
