//! The `async` model: a task per connection on tokio's multi-threaded
//! runtime, and the async driver it runs.
//!
//! This is lecture 3's asynchronous event loop grown up: each connection is
//! written as the seed's simple loop (read a block, uppercase, send it all),
//! and the runtime turns every wait into a yield to the event loop
//! (epoll underneath), with one loop per core. A connection that does not
//! read only parks its own task.
//!
//! Limits: a slot of `--max-conns` is taken before each accept, so beyond
//! the limit new clients wait in the kernel's backlog. The drain is the
//! lifecycle's: the accept loops stop when it starts, and the model returns
//! when the last connection is done.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};

use std::os::fd::AsFd;

use super::blocking::BlockBuf;
use super::readiness::{could_progress, poll_now};
use super::{AcceptBackoff, Config, udp};
use crate::conn::{Conn, Timeout};
use crate::lifecycle::{Lifecycle, Slot};
use crate::net::{self, Listener};

pub fn run(config: Config, listeners: Vec<Listener>, life: &Arc<Lifecycle>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.workers.max(1))
        .enable_all()
        .thread_name("upcase-worker")
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(serve(config, listeners, life.clone()))?;
    // Waiting for the last connections blocks: not on a runtime thread.
    life.finish_drain();
    rt.shutdown_timeout(Duration::from_millis(200));
    Ok(())
}

async fn serve(
    config: Config,
    listeners: Vec<Listener>,
    life: Arc<Lifecycle>,
) -> anyhow::Result<()> {
    let config = Arc::new(config);
    for listener in listeners {
        let (config, life) = (config.clone(), life.clone());
        match listener {
            Listener::Tcp(l) => {
                l.set_nonblocking(true)?;
                let l = Accepting::Tcp(TcpListener::from_std(l)?);
                tokio::spawn(accept_loop(l, config, life));
            }
            Listener::Unix(l, _) => {
                l.set_nonblocking(true)?;
                let l = Accepting::Unix(UnixListener::from_std(l)?);
                tokio::spawn(accept_loop(l, config, life));
            }
            Listener::Udp(u) => {
                u.set_nonblocking(true)?;
                let u = tokio::net::UdpSocket::from_std(u)?;
                tokio::spawn(udp::serve(u, config.udp_service(), life));
            }
        }
    }
    life.until_draining().await;
    Ok(())
}

enum Accepting {
    Tcp(TcpListener),
    Unix(UnixListener),
}

async fn accept_loop(listener: Accepting, config: Arc<Config>, life: Arc<Lifecycle>) {
    let draining = life.until_draining();
    tokio::pin!(draining);
    let mut backoff = AcceptBackoff::default();
    loop {
        // At --max-conns stop accepting: new clients wait in the backlog.
        while life.conns.is_full() {
            life.conns.warn_full();
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                _ = &mut draining => return,
            }
        }
        let accepted = tokio::select! {
            r = accept(&listener) => r,
            _ = &mut draining => return,
        };
        match accepted {
            Ok((conn, peer)) => {
                backoff.succeeded();
                // Another listener's loop may have taken the last slot
                // since: this client waits for the next one.
                while !life.conns.try_acquire() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                let slot = Slot(life.conns.clone());
                let config = config.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    handle(conn, peer, &config).await;
                });
            }
            Err(e) => {
                if let Some(pause) = backoff.failed(&e) {
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(listener: &Accepting) -> io::Result<(Stream, String)> {
    match listener {
        Accepting::Tcp(l) => {
            let (s, peer) = l.accept().await?;
            Ok((
                Stream::Tcp(s),
                format!("tcp://{}", crate::addr::HostPort::from(peer)),
            ))
        }
        Accepting::Unix(l) => {
            let (s, _) = l.accept().await?;
            use std::os::fd::AsRawFd;
            let name = net::unix_peer_name(s.as_raw_fd());
            Ok((Stream::Unix(s), name))
        }
    }
}

async fn handle(sock: Stream, peer: String, config: &Config) {
    let origin = match &sock {
        Stream::Tcp(s) => config.origin(peer, s.as_fd()),
        Stream::Unix(s) => config.origin(peer, s.as_fd()),
    };
    let mut conn = Conn::new(origin, config.protocol, config.limits(0), Instant::now());
    match sock {
        Stream::Tcp(mut s) => {
            if let Err(e) = net::tune_tcp(socket2::SockRef::from(&s), &config.sockopts) {
                tracing::warn!("setting socket options: {e}");
            }
            if let Err(e) = drive(&mut s, &mut conn, config.block).await {
                conn.on_error(&e);
            }
            super::end_connection(s.as_fd(), &conn);
        }
        Stream::Unix(mut s) => {
            if let Err(e) = drive(&mut s, &mut conn, config.block).await {
                conn.on_error(&e);
            }
            super::end_connection(s.as_fd(), &conn);
        }
    }
}

/// The async driver: the blocking driver's loop, where each read and write
/// waits at most until the core's deadline ([`Conn::wait_limit`]). When
/// one times out, the core decides ([`Conn::handle_wait_timeout`]): idle
/// only if the socket has nothing for it either, since the runtime's timer
/// can fire before its reactor has seen the bytes that arrived while the
/// server was stopped. An `Ok` return may be a connection the core ended.
async fn drive<S: AsyncRead + AsyncWrite + AsFd + Unpin>(
    s: &mut S,
    conn: &mut Conn,
    block: usize,
) -> io::Result<()> {
    let mut buf = BlockBuf::new(block, conn.limits().buffered.clone());
    while !conn.is_finished() {
        if conn.wants_shutdown() {
            s.shutdown().await?;
            conn.on_shutdown();
            break;
        }
        if conn.read_budget() == 0 {
            // The message it holds waits for room in --max-buffered.
            let Some(at) = conn.poll_timeout() else { break };
            tokio::time::sleep_until(at.into()).await;
            conn.handle_timeout(Instant::now(), |_| false);
            continue;
        }
        let n = loop {
            let limit = conn.wait_limit(Instant::now());
            let read = s.read(buf.space(conn.read_budget()));
            match within(limit, read).await {
                Some(r) => break r?,
                None => {
                    let fd = s.as_fd();
                    let waiting = |c: &Conn| could_progress(fd, c);
                    if conn.handle_wait_timeout(Instant::now(), waiting) == Timeout::Ended {
                        return Ok(());
                    }
                }
            }
        };
        let now = Instant::now();
        // The reply borrows the core: its deadline is read before.
        let write_limit = conn.limits().idle;
        let mut reply = if n == 0 {
            conn.on_input_end(now)?
        } else {
            conn.on_input(buf.filled(n), now)?
        };
        let len = reply.len();
        let mut stuck = false;
        while !reply.is_empty() {
            let k = match within(write_limit, s.write(reply)).await {
                Some(r) => r?,
                None if poll_now(s.as_fd(), libc::POLLOUT) => continue,
                None => {
                    stuck = true;
                    break;
                }
            };
            if k == 0 {
                return Err(io::Error::from(io::ErrorKind::WriteZero));
            }
            reply = &reply[k..];
        }
        if stuck {
            // The client took nothing for the whole wait: the core ends it.
            conn.handle_wait_timeout(Instant::now(), |_| false);
            return Ok(());
        }
        conn.on_written(len, Instant::now());
    }
    Ok(())
}

/// Runs `f`; `None` if it takes longer than `idle`.
async fn within<F: Future>(idle: Option<Duration>, f: F) -> Option<F::Output> {
    match idle {
        None => Some(f.await),
        Some(d) => tokio::time::timeout(d, f).await.ok(),
    }
}
