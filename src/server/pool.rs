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
//! poll(2) (on every listener and on the lifecycle's drain descriptor), and without
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
use crate::lifecycle::{Lifecycle, Slot};
use crate::net::Listener;

pub fn run(config: Config, listeners: Vec<Listener>, life: &Arc<Lifecycle>) -> anyhow::Result<()> {
    let acceptor = blocking::Acceptor::new(blocking::start(listeners, &config, life)?);
    let acceptor = Arc::new(Mutex::new(acceptor));
    let workers = life.conns.max();
    let config = Arc::new(config);
    tracing::info!("pool of {workers} workers");
    let mut handles = Vec::new();
    for i in 0..workers {
        let (acceptor, life, config) = (acceptor.clone(), life.clone(), config.clone());
        let h = std::thread::Builder::new()
            .name(format!("upcase-pool-{i}"))
            .spawn(move || worker(&acceptor, &life, &config))
            .context("starting the pool's workers")?;
        handles.push(h);
    }
    // Workers return once the drain starts and their client is done (the
    // lifecycle ends the process if that takes past --drain-timeout).
    life.wait_draining();
    life.finish_drain();
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

fn worker(acceptor: &Mutex<blocking::Acceptor>, life: &Lifecycle, config: &Config) {
    loop {
        // The seed's accept lock: one idle worker at a time waits for a client.
        let next = acceptor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .next_client(life);
        let Some((conn, peer)) = next else { return };
        if !life.conns.try_acquire() {
            return; // cannot happen: one slot per worker
        }
        let _slot = Slot(life.conns.clone());
        if life.conns.is_full() {
            life.conns.warn_full();
        }
        blocking::serve(conn, peer, config);
    }
}
