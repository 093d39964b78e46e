//! The `iterative` model: one client at a time (tcp_deadlock.py's server).
//!
//! ```python
//! while True:
//!     sc, sockname = s.accept()
//!     while True:
//!         message = sc.recv(1024)
//!         if not message: break
//!         sc.sendall(message.upper())
//!     sc.close()
//! ```
//!
//! The same loop, keeping the contract (bounded blocks, half-close at end
//! of file). Other clients wait in the listen backlog until the current one
//! is done: a client that never reads blocks everyone. That is the lesson of
//! this model, so `--max-conns` means nothing here (it is always 1) and a
//! drain simply lets the current client finish (within `--drain-timeout`).
//! UDP listeners are answered on threads of their own.

use std::sync::Arc;

use super::Config;
use super::blocking;
use crate::lifecycle::{Lifecycle, Slot};
use crate::net::Listener;

pub fn run(config: Config, listeners: Vec<Listener>, life: &Arc<Lifecycle>) -> anyhow::Result<()> {
    let mut acceptor = blocking::Acceptor::new(blocking::start(listeners, &config, life)?);
    while let Some((conn, peer)) = acceptor.next_client(life) {
        if life.conns.try_acquire() {
            let _slot = Slot(life.conns.clone());
            blocking::serve(conn, peer, &config);
        }
    }
    life.finish_drain();
    Ok(())
}
