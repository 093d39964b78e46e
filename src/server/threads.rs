//! The `threads` model: a thread per connection (the seeds' ClientSocket
//! thread).
//!
//! ```python
//! while True:
//!     conn, addr = srv.accept()
//!     ClientSocket(conn, addr).start()   # create the thread and forget it
//! ```
//!
//! The seeds warn that a thread per client invites malicious behaviour: a
//! client can make the server create threads without end. Here a slot of
//! `--max-conns` must be free *before* accepting, so past the limit new
//! clients wait in the kernel's backlog and the thread count stays bounded; each
//! thread has a small stack, since it only runs the blocking driver.

use std::sync::Arc;

use super::Config;
use super::blocking;
use crate::lifecycle::Lifecycle;
use crate::net::Listener;

/// The blocking driver needs little stack; 8 MiB each would waste address space.
const STACK: usize = 256 * 1024;

pub fn run(config: Config, listeners: Vec<Listener>, life: &Arc<Lifecycle>) -> anyhow::Result<()> {
    let mut acceptor = blocking::Acceptor::new(blocking::start(listeners, &config, life)?);
    let config = Arc::new(config);
    while life.conns.wait_for_room(life) {
        let Some((conn, peer)) = acceptor.next_client(life) else {
            break;
        };
        let slot = life.conns.take();
        let cfg = config.clone();
        let spawned = std::thread::Builder::new()
            .name("upcase-conn".into())
            .stack_size(STACK)
            .spawn(move || {
                let _slot = slot;
                blocking::serve(conn, peer, &cfg);
            });
        if let Err(e) = spawned {
            // The connection (moved into the failed closure) is closed.
            tracing::warn!("cannot start a thread: {e}; pausing accepts for 100 ms");
            std::thread::sleep(super::AcceptBackoff::PAUSE);
        }
    }
    life.finish_drain();
    Ok(())
}
