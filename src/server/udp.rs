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

use crate::lifecycle::Lifecycle;
use crate::transform::Mode;

/// Largest UDP payload over IPv4 (65,535 − 8 UDP − 20 IP header bytes).
pub const MAX_DATAGRAM: usize = 65_507;

pub async fn serve(sock: UdpSocket, mode: Mode, life: std::sync::Arc<Lifecycle>) {
    let draining = life.until_draining();
    tokio::pin!(draining);
    // One byte more than the maximum lets us tell a full datagram from a
    // truncated one (IPv6 jumbograms aside, nothing larger arrives).
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    let mut scratch = Vec::new();
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
            _ = &mut draining => break,
        };
        if n == 0 {
            tracing::debug!("udp: empty datagram (goodbye) from {peer}");
        }
        let reply = match reply(mode, &mut buf[..n], &mut scratch) {
            Ok(r) => r,
            Err(e) => {
                failed += 1;
                tracing::warn!("udp: datagram from {peer} not answered: {e}");
                continue;
            }
        };
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

/// The reply to one datagram, transformed on its own. A reply that would
/// not fit in a datagram (UTF-8 can grow up to 3x) is an error, never a
/// truncation; so is invalid UTF-8 in strict mode.
pub fn reply<'a>(
    mode: Mode,
    data: &'a mut [u8],
    scratch: &'a mut Vec<u8>,
) -> Result<&'a [u8], String> {
    let out: &[u8] = match mode {
        Mode::Ascii => {
            crate::transform::upper_in_place(data);
            data
        }
        Mode::Utf8 { .. } => {
            *scratch = crate::transform::apply(mode, data).map_err(|e| e.to_string())?;
            scratch
        }
    };
    if out.len() > MAX_DATAGRAM {
        return Err(format!(
            "the reply would be {} bytes, over the UDP maximum of {MAX_DATAGRAM}",
            out.len()
        ));
    }
    Ok(out)
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

/// The buffers and counters of one UDP listener outside tokio.
#[derive(Debug, Default)]
pub struct UdpState {
    /// Allocated at the first datagram (most event loops never get one).
    buf: Vec<u8>,
    scratch: Vec<u8>,
    pub answered: u64,
    pub failed: u64,
}

impl UdpState {
    pub fn log_totals(&self) {
        tracing::info!(
            "udp: {} datagrams answered, {} failed",
            self.answered,
            self.failed
        );
    }
}

/// Answers the datagrams waiting on a non-blocking socket, at most `budget`
/// of them; returns true if it stopped because none were left.
pub fn answer_ready(
    sock: &std::net::UdpSocket,
    st: &mut UdpState,
    mode: Mode,
    budget: usize,
) -> bool {
    if st.buf.is_empty() {
        st.buf = vec![0u8; MAX_DATAGRAM + 1];
    }
    for _ in 0..budget {
        let (n, peer) = match sock.recv_from(&mut st.buf) {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                st.failed += 1;
                tracing::debug!("udp receive: {e}");
                continue;
            }
        };
        let reply = match reply(mode, &mut st.buf[..n], &mut st.scratch) {
            Ok(r) => r,
            Err(e) => {
                st.failed += 1;
                tracing::warn!("udp: datagram from {peer} not answered: {e}");
                continue;
            }
        };
        match sock.send_to(reply, peer) {
            Ok(k) if k == reply.len() => st.answered += 1,
            Ok(k) => {
                st.failed += 1;
                tracing::warn!("udp: reply to {peer} truncated to {k} bytes");
            }
            Err(e) => {
                // A full send buffer (WouldBlock) drops the reply, as UDP may.
                st.failed += 1;
                tracing::debug!("udp: reply to {peer} failed: {e}");
            }
        }
    }
    false
}

/// A UDP listener on a thread of its own, for the thread-based models:
/// waits in poll(2) for a datagram or the start of the drain.
pub fn serve_blocking(sock: std::net::UdpSocket, mode: Mode, life: &Lifecycle) -> io::Result<()> {
    use std::os::fd::AsFd;
    sock.set_nonblocking(true)?;
    let mut st = UdpState::default();
    loop {
        let ready = crate::lifecycle::wait_readable(&[sock.as_fd(), life.draining_fd()], None)?;
        if ready[1] {
            break;
        }
        answer_ready(&sock, &mut st, mode, 64);
    }
    st.log_totals();
    Ok(())
}
