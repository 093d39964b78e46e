//! The second load engine: a blocking thread per connection, for rr.
//!
//! The event-loop engines (epoll, io_uring) share one design: one thread
//! drives many connections and a short read means "drained". A speed claim
//! measured with one design only may be that design's artefact, so this one
//! is built the other way, as the simplest client would be: each
//! connection is a thread that writes its request, blocks until the whole
//! reply is there, verifies it and goes again. It costs a context switch
//! per message on each side, which is the point: the server's ranking must
//! hold under it too. It also speaks TLS (rustls on the blocking socket),
//! which is how `bench tls://` runs.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::load::{Job, Live, ThreadResult, early_eof};
use crate::addr::{Endpoint, Host, HostPort};
use crate::net::{self, Stream};

/// Runs `job`'s connections, a thread each, and merges what they measured.
pub fn run(job: Job, live: Arc<Live>) -> ThreadResult {
    let job = Arc::new(job);
    let handles: Vec<_> = (0..job.conns)
        .map(|i| {
            let (job, live) = (job.clone(), live.clone());
            std::thread::Builder::new()
                .name(format!("upcase-bench-conn-{i}"))
                .stack_size(256 * 1024)
                .spawn(move || one(&job, &live, i))
        })
        .collect();
    let mut total = ThreadResult::new(job.conns);
    for (i, h) in handles.into_iter().enumerate() {
        let r = match h {
            Ok(h) => h
                .join()
                .unwrap_or_else(|_| failed("a connection thread panicked")),
            Err(e) => failed(&format!("starting a connection thread: {e}")),
        };
        let _ = total.hist.add(&r.hist);
        total.bytes += r.bytes;
        total.messages += r.messages;
        total.errors += r.errors;
        total.per_conn[i] = r.per_conn.first().copied().unwrap_or(0);
        total.served += r.served;
        if total.first_error.is_none() {
            total.first_error = r.first_error;
        }
    }
    total
}

fn failed(why: &str) -> ThreadResult {
    let mut r = ThreadResult::new(1);
    r.errors = 1;
    r.first_error = Some(why.to_string());
    r
}

/// One connection: request, whole reply, verify, again, until the deadline.
fn one(job: &Job, live: &Live, i: usize) -> ThreadResult {
    let mut r = ThreadResult::new(1);
    let mut sock = match open(job) {
        Ok(s) => s,
        Err(e) => {
            r.errors += 1;
            r.first_error = Some(format!("connecting: {e}"));
            return r;
        }
    };
    let start = Instant::now();
    let mut due = job.first_due(start, i);
    let interval = job.interval();
    let mut buf = vec![0u8; job.reply_size.clamp(1, 256 * 1024)];
    let request = job.request.slice(0, job.size).to_vec();
    let (mut total, mut messages) = (0u64, 0u64);
    let result = (|| -> io::Result<()> {
        while Instant::now() < job.deadline && !live.stop.load(Ordering::Relaxed) {
            match interval {
                Some(_) => {
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep((due - now).min(job.deadline - now));
                        continue;
                    }
                }
                None => due = Instant::now(),
            }
            sock.write_all(&request)?;
            let mut got = 0u64;
            while got < job.reply_size as u64 {
                let want = (job.reply_size - got as usize).min(buf.len());
                let n = match sock.read(&mut buf[..want]) {
                    Ok(0) => return Err(early_eof(got)),
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    // The run is over while this reply was awaited (a
                    // server that serves others first): not an error.
                    Err(e) if net_timeout(&e) && Instant::now() >= job.deadline => {
                        uncount(&mut r, &mut total, got);
                        return Ok(());
                    }
                    Err(e) => return Err(e),
                };
                r.received((&mut got, &mut total), &buf[..n], &job.reply, live)?;
            }
            if Instant::now() > job.deadline {
                // Completed after the run: like the event-loop engines,
                // which stop at the deadline, it is not counted.
                uncount(&mut r, &mut total, got);
                break;
            }
            let _ = r.hist.record((due.elapsed().as_nanos() as u64).max(1));
            r.messages += job.per_round;
            messages += 1;
            live.messages.fetch_add(job.per_round, Ordering::Relaxed);
            if let Some(iv) = interval {
                due += iv;
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        r.errors += 1;
        r.first_error = Some(e.to_string());
    }
    r.per_conn[0] = total;
    r.served = usize::from(messages > 0);
    r
}

/// A blocking connection: TCP or Unix as `send` makes them, or TLS with
/// rustls on the thread's own socket (no helper thread in the path).
enum Conn {
    Plain(Stream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

fn open(job: &Job) -> io::Result<Conn> {
    let conn = match &job.endpoint {
        Endpoint::Tls(hp) => {
            let config = job.sockopts.tls.clone().ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "no TLS client settings")
            })?;
            let Stream::Tcp(tcp) = net::connect(&Endpoint::Tcp(hp.clone()), &job.sockopts)
                .map_err(io::Error::other)?
            else {
                unreachable!("a TCP endpoint connects a TCP stream");
            };
            let session = rustls::ClientConnection::new(config, server_name(hp)?)
                .map_err(io::Error::other)?;
            Conn::Tls(Box::new(rustls::StreamOwned::new(session, tcp)))
        }
        ep => Conn::Plain(net::connect(ep, &job.sockopts).map_err(io::Error::other)?),
    };
    // A server that stops answering cannot hold the thread past the run:
    // a read still waiting at the deadline gives up just after it.
    let left = job.deadline.saturating_duration_since(Instant::now()) + Duration::from_millis(50);
    match &conn {
        Conn::Plain(s) => s.set_io_timeout(Some(left))?,
        Conn::Tls(s) => s.sock.set_read_timeout(Some(left))?,
    }
    Ok(conn)
}

/// Takes back the bytes of a reply that will not count: a message is
/// whole or is not there, and bytes = messages x reply size.
fn uncount(r: &mut ThreadResult, total: &mut u64, got: u64) {
    r.bytes -= got;
    *total -= got;
}

fn net_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn server_name(hp: &HostPort) -> io::Result<rustls::pki_types::ServerName<'static>> {
    Ok(match &hp.host {
        Host::Ip(ip) => rustls::pki_types::ServerName::IpAddress((*ip).into()),
        Host::Name(n) => rustls::pki_types::ServerName::try_from(n.clone())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
    })
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}
