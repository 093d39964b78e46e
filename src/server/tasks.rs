//! The `async` model: a task per connection on tokio's multi-threaded
//! runtime.
//!
//! This is lecture 3's asynchronous event loop grown up: each connection is
//! written as the seed's simple loop (read a block, uppercase, send it all),
//! and the runtime turns every wait into a yield to the event loop
//! (epoll underneath), with one loop per core. A connection that does not
//! read only parks its own task.
//!
//! Limits: a semaphore of `--max-conns` permits is taken before each
//! accept, so beyond the limit new clients wait in the kernel's backlog.
//! Shutdown: the first SIGINT/SIGTERM stops the accept loops and lets
//! streams in progress finish for up to `--drain-timeout`; a second signal
//! ends at once. Draining is complete when every permit is back.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use socket2::SockRef;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Semaphore, watch};

use super::shutdown::FULL_LOG_EVERY;
use super::{AcceptBackoff, Config, udp};
use crate::net::{self, Listener, SockOpts};
use crate::relay::{ConnLog, relay_async};
use crate::transform::Transformer;

/// Where the server is in its life; sent to every loop on a watch channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Running,
    /// Stop accepting; let streams in progress finish.
    Draining,
    /// Stop everything now.
    Stopping,
}

pub fn run(config: Config, listeners: Vec<Listener>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.workers.max(1))
        .enable_all()
        .thread_name("upcase-worker")
        .build()
        .context("starting the tokio runtime")?;
    let result = rt.block_on(serve(config, listeners));
    // Connections still open after the drain are dropped (closed) here.
    rt.shutdown_timeout(Duration::from_millis(200));
    result
}

async fn serve(config: Config, listeners: Vec<Listener>) -> anyhow::Result<()> {
    let (phase_tx, phase) = watch::channel(Phase::Running);
    tokio::spawn(watch_signals(phase_tx)?);

    let max = config
        .max_conns
        .min(Semaphore::MAX_PERMITS)
        .min(u32::MAX as usize);
    let permits = Arc::new(Semaphore::new(max));
    let config = Arc::new(config);
    let active = Arc::new(AtomicUsize::new(0));
    for listener in listeners {
        let ctx = Ctx {
            config: config.clone(),
            permits: permits.clone(),
            phase: phase.clone(),
            active: active.clone(),
        };
        match listener {
            Listener::Tcp(l) => {
                l.set_nonblocking(true)?;
                tokio::spawn(accept_loop(Accepting::Tcp(TcpListener::from_std(l)?), ctx));
            }
            Listener::Unix(l, guard) => {
                l.set_nonblocking(true)?;
                let l = UnixListener::from_std(l)?;
                tokio::spawn(async move {
                    accept_loop(Accepting::Unix(l), ctx).await;
                    drop(guard); // removes the socket file once we stop accepting
                });
            }
            Listener::Udp(u) => {
                u.set_nonblocking(true)?;
                let u = tokio::net::UdpSocket::from_std(u)?;
                tokio::spawn(udp::serve(u, config.mode, phase.clone()));
            }
        }
    }

    let mut phase_rx = phase.clone();
    let _ = phase_rx.wait_for(|p| *p != Phase::Running).await;
    // Accept loops hold a permit while they wait; once they see the phase
    // change they give it back, so count connections by the spawned tasks.
    let open = active.load(Ordering::Relaxed);
    if open == 0 || *phase_rx.borrow() == Phase::Stopping {
        tracing::info!("shutting down");
        return Ok(());
    }
    tracing::info!(
        "shutting down: {open} connection(s) may finish within {:?} (signal again to stop now)",
        config.drain_timeout
    );
    tokio::select! {
        _ = permits.acquire_many(max as u32) => tracing::info!("all connections finished"),
        _ = tokio::time::sleep(config.drain_timeout) => {
            let open = active.load(Ordering::Relaxed);
            tracing::warn!("drain timeout: closing {open} unfinished connection(s)");
        }
        _ = phase_rx.wait_for(|p| *p == Phase::Stopping) => {
            let open = active.load(Ordering::Relaxed);
            tracing::warn!("second signal: closing {open} connection(s) now");
        }
    }
    Ok(())
}

/// First SIGINT/SIGTERM: drain. Second: stop.
fn watch_signals(
    tx: watch::Sender<Phase>,
) -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    Ok(async move {
        for next in [Phase::Draining, Phase::Stopping] {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
            let _ = tx.send(next);
        }
    })
}

struct Ctx {
    config: Arc<Config>,
    permits: Arc<Semaphore>,
    phase: watch::Receiver<Phase>,
    /// Connections being served, for the shutdown log.
    active: Arc<AtomicUsize>,
}

enum Accepting {
    Tcp(TcpListener),
    Unix(UnixListener),
}

async fn accept_loop(listener: Accepting, ctx: Ctx) {
    let mut stop = ctx.phase.clone();
    let stopping = async move {
        let _ = stop.wait_for(|p| *p != Phase::Running).await;
    };
    tokio::pin!(stopping);
    let mut backoff = AcceptBackoff::default();
    let mut last_full_log: Option<std::time::Instant> = None;
    loop {
        let permit = match ctx.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if last_full_log.is_none_or(|t| t.elapsed() >= FULL_LOG_EVERY) {
                    last_full_log = Some(std::time::Instant::now());
                    tracing::warn!(
                        "at --max-conns {}: new connections wait in the backlog",
                        ctx.config.max_conns
                    );
                }
                tokio::select! {
                    p = ctx.permits.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                    _ = &mut stopping => return,
                }
            }
        };
        let accepted = tokio::select! {
            r = accept(&listener) => r,
            _ = &mut stopping => return,
        };
        match accepted {
            Ok((conn, peer)) => {
                backoff.succeeded();
                let config = ctx.config.clone();
                let active = ctx.active.clone();
                active.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    handle(conn, peer, &config).await;
                    active.fetch_sub(1, Ordering::Relaxed);
                    drop(permit);
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

enum Conn {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(listener: &Accepting) -> io::Result<(Conn, String)> {
    match listener {
        Accepting::Tcp(l) => {
            let (s, peer) = l.accept().await?;
            Ok((
                Conn::Tcp(s),
                format!("tcp://{}", crate::addr::HostPort::from(peer)),
            ))
        }
        Accepting::Unix(l) => {
            let (s, _) = l.accept().await?;
            use std::os::fd::AsRawFd;
            let name = net::unix_peer_name(s.as_raw_fd());
            Ok((Conn::Unix(s), name))
        }
    }
}

async fn handle(conn: Conn, peer: String, config: &Config) {
    let mut log = ConnLog::new(peer);
    let t = Transformer::new(config.mode);
    let result = match conn {
        Conn::Tcp(mut s) => {
            tune(&s, &config.sockopts);
            relay_async(&mut s, t, config.block, config.idle_timeout, &mut log).await
        }
        Conn::Unix(mut s) => {
            relay_async(&mut s, t, config.block, config.idle_timeout, &mut log).await
        }
    };
    log.finish(&result);
}

fn tune(s: &tokio::net::TcpStream, opts: &SockOpts) {
    if let Err(e) = net::tune_tcp(SockRef::from(s), opts) {
        tracing::warn!("setting socket options: {e}");
    }
}
