//! The `pool` model: a fixed number of worker threads share the listening
//! sockets (the seeds' thread pool with its accept lock).
//!
//! ```python
//! class ClientSocket(threading.Thread):
//!     def run(self):
//!         while True:
//!             srv_lock.acquire()
//!             conn, addr = srv.accept()
//!             srv_lock.release()
//!             ...serve conn...
//! ```
//!
//! We keep the seed's lock, for a reason: a worker waits for a client in
//! poll(2) (on every listener and on the shutdown broadcast), and without
//! the lock every idle worker would wake for each new client and all but one
//! would find nothing to accept. With it, exactly one idle worker waits in
//! poll and the rest sleep on the lock. `--workers` threads (at most
//! `--max-conns`) is all the model ever creates, so a flood of clients
//! costs a backlog, never threads; when every worker is busy the new
//! clients wait, as the seed says, and we log it.

use std::sync::{Arc, Mutex};

use anyhow::Context;

use super::Config;
use super::blocking;
use super::shutdown::{Gauge, Shutdown, Slot, drain};
use crate::net::Listener;

pub fn run(config: Config, listeners: Vec<Listener>) -> anyhow::Result<()> {
    let shutdown = Shutdown::on_signals(config.drain_timeout)?;
    let acceptor = blocking::Acceptor::new(blocking::start(listeners, &config, &shutdown)?);
    let acceptor = Arc::new(Mutex::new(acceptor));
    let workers = config.workers.min(config.max_conns).max(1);
    let config = Arc::new(config);
    let gauge = Gauge::new(workers);
    tracing::info!("pool of {workers} workers");
    let mut handles = Vec::new();
    for i in 0..workers {
        let (acceptor, shutdown, gauge, config) = (
            acceptor.clone(),
            shutdown.clone(),
            gauge.clone(),
            config.clone(),
        );
        let h = std::thread::Builder::new()
            .name(format!("upcase-pool-{i}"))
            .spawn(move || worker(&acceptor, &shutdown, &gauge, &config))
            .context("starting the pool's workers")?;
        handles.push(h);
    }
    // Workers return once the drain starts and their client is done (the
    // signal thread ends the process if that takes past --drain-timeout).
    let _ = shutdown_wait(&shutdown);
    drain(&gauge, config.drain_timeout);
    for h in handles {
        let _ = h.join();
    }
    // Dropping the listeners removes Unix socket files.
    drop(acceptor);
    Ok(())
}

fn worker(
    acceptor: &Mutex<blocking::Acceptor>,
    shutdown: &Shutdown,
    gauge: &Arc<Gauge>,
    config: &Config,
) {
    loop {
        // The seed's accept lock: one idle worker at a time waits for a client.
        let next = acceptor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .next_client(shutdown);
        let Some((conn, peer)) = next else { return };
        if !gauge.try_acquire() {
            return; // cannot happen: one slot per worker
        }
        let _slot = Slot(gauge.clone());
        if gauge.active() == gauge.max() {
            gauge.warn_full(&format!(
                "all {} workers busy: new clients wait in the backlog",
                gauge.max()
            ));
        }
        blocking::serve(conn, peer, config);
    }
}

fn shutdown_wait(shutdown: &Shutdown) -> std::io::Result<()> {
    use super::shutdown::wait_readable;
    while !shutdown.is_draining() {
        wait_readable(&[shutdown.fd()], None)?;
    }
    Ok(())
}
