//! The UDP service (the seeds' server2.py): every datagram is uppercased and
//! sent back to its sender.
//!
//! UDP has no flow control, so there is no deadlock to avoid and nothing to
//! buffer: one receive buffer of the largest datagram, reused. An empty
//! datagram (the seed client's goodbye) is answered with an empty one and,
//! unlike server2.py, does not stop the server. A failed send (the sender
//! vanished, ICMP port unreachable) is counted and logged, never fatal.

use std::io;

use tokio::net::UdpSocket;
use tokio::sync::watch;

use super::tasks::Phase;
use crate::transform::{Mode, Transformer};

/// Largest UDP payload over IPv4 (65,535 − 8 UDP − 20 IP header bytes).
pub const MAX_DATAGRAM: usize = 65_507;

pub async fn serve(sock: UdpSocket, mode: Mode, mut phase: watch::Receiver<Phase>) {
    // One byte more than the maximum lets us tell a full datagram from a
    // truncated one (IPv6 jumbograms aside, nothing larger arrives).
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    let mut answered: u64 = 0;
    let mut failed: u64 = 0;
    loop {
        let (n, peer) = tokio::select! {
            r = sock.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    // ICMP errors from an earlier send surface here on Linux.
                    failed += 1;
                    tracing::debug!("udp receive: {e}");
                    continue;
                }
            },
            _ = phase.wait_for(|p| *p != Phase::Running) => break,
        };
        if n == 0 {
            tracing::debug!("udp: empty datagram (goodbye) from {peer}");
        }
        let mut t = Transformer::new(mode);
        let reply = t.push(&mut buf[..n]);
        match send(&sock, reply, peer).await {
            Ok(()) => answered += 1,
            Err(e) => {
                failed += 1;
                tracing::warn!("udp: reply to {peer} failed: {e}");
            }
        }
    }
    tracing::info!("udp: {answered} datagrams answered, {failed} failed");
}

async fn send(sock: &UdpSocket, data: &[u8], peer: std::net::SocketAddr) -> io::Result<()> {
    let n = sock.send_to(data, peer).await?;
    if n != data.len() {
        return Err(io::Error::other(format!(
            "sent {n} of {} bytes",
            data.len()
        )));
    }
    Ok(())
}
