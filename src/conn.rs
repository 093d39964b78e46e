//! The connection core: the whole contract of one connection, with no
//! socket in it.
//!
//! Every server model moves bytes through this one state machine and
//! differs only in how it waits; that is why it owns no socket, no buffer
//! of the driver's and no clock. A driver tells it what happened ("these
//! bytes arrived", "n bytes were written", "end of input", "the write side
//! is shut") with the time, and asks it what to do next ([`Conn::read_budget`],
//! [`Conn::wants_write`], [`Conn::wants_shutdown`], [`Conn::is_finished`]).
//! Because it is pure it is tested against an in-memory peer that splits
//! every read and write at every size (the tests below), the way quinn-proto
//! is tested without a network.
//!
//! The contract, as the seeds teach it:
//! 0. (Behind a load balancer, `--proxy-protocol`: the PROXY header comes
//!    first, before TLS; it names the client and is not answered.)
//! 1. Read at most one block (`--block`) at a time.
//! 2. Transform it (ASCII or UTF-8 uppercase).
//! 3. Do not read more while the reply is unsent beyond the read-ahead
//!    (zero for the blocking and readiness drivers: write everything before
//!    reading again). A client that never reads therefore stops the server
//!    from reading *it*: TCP's flow control reaches the client, and memory
//!    per connection stays bounded. This is the seeds' deadlock seen from
//!    the server's side.
//! 4. At end of input (the client's half-close), send what the transform
//!    still owes, then shut the write side.
//! 5. A connection that could have moved bytes for `--idle-timeout` and did
//!    not is closed; a drain that runs out of time cuts it.
//!
//! Output storage is the driver's: the core hands back the bytes to send
//! (the driver's own read buffer, transformed in place, whenever it can) and
//! counts what is unsent, so the uring driver can send from the very block
//! the kernel filled and the readiness drivers from their shared buffer.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::framing::{self, Decoder, Framing};
use crate::transform::{self, Mode, Transformer};

/// What the service does with a connection's bytes: how it finds messages
/// (`--framing`) and what it does to each (`--utf8`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Protocol {
    pub mode: Mode,
    pub framing: Framing,
}

/// How a connection is bounded; the same for every connection of a server.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest read at once (`--block`).
    pub block: usize,
    /// Unsent reply bytes allowed before reading stops: 0 for "write all
    /// before reading again"; the uring driver reads a few blocks ahead.
    pub read_ahead: usize,
    /// `--idle-timeout`: close after this long without progress.
    pub idle: Option<Duration>,
    /// `--handshake-timeout`: a tls:// connection's handshake must be
    /// complete this long after the accept.
    pub handshake: Duration,
    /// `--max-buffered`: unsent output of all connections together.
    pub buffered: Arc<Buffered>,
}

/// The unsent output of every connection of a server, against one budget
/// (`--max-buffered`). Each connection's unsent bytes are bounded by its
/// read-ahead and block, but clients that never read could add those up
/// without end; past the budget, a connection that holds unsent bytes
/// reads nothing more, and one that holds none reads small pieces
/// ([`PRESSED_READ`]), so memory stays bounded whatever the number of
/// non-readers, while honest clients, whose replies leave at once, go on.
#[derive(Debug)]
pub struct Buffered {
    held: Held,
    max: usize,
    warned: Mutex<Option<Instant>>,
    /// Connections of this process waiting for room (see
    /// [`Conn::poll_timeout`]): while there are any, the event loops look
    /// at their deadlines every [`ROOM_RETRY`].
    waiting: AtomicUsize,
}

/// The count itself: this process's, or one in memory shared with the
/// children it forks (the fork model), so that they spend one budget.
#[derive(Debug)]
enum Held {
    Own(AtomicUsize),
    Shared(&'static AtomicUsize),
}

/// The largest read of a connection while the server is over its budget.
pub const PRESSED_READ: usize = 2048;

impl Buffered {
    pub fn new(max: usize) -> Arc<Buffered> {
        Arc::new(Buffered {
            held: Held::Own(AtomicUsize::new(0)),
            max,
            warned: Mutex::new(None),
            waiting: AtomicUsize::new(0),
        })
    }

    /// The same budget, counted in memory that the processes this one
    /// forks share with it: each child of the fork model otherwise gets a
    /// copy of the count, and with it a whole budget of its own.
    pub fn new_shared(max: usize) -> io::Result<Arc<Buffered>> {
        // SAFETY: an anonymous mapping asks nothing of its arguments but a
        // valid length; failure is MAP_FAILED, checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                std::mem::size_of::<AtomicUsize>(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the mapping is page-aligned (so aligned for an
        // AtomicUsize), zero-filled (an AtomicUsize of 0), never unmapped
        // (so it lives for 'static), and only ever accessed through this
        // atomic, by this process and the children that inherit it.
        let held: &'static AtomicUsize = unsafe { &*(p as *const AtomicUsize) };
        Ok(Arc::new(Buffered {
            held: Held::Shared(held),
            max,
            warned: Mutex::new(None),
            waiting: AtomicUsize::new(0),
        }))
    }

    /// `--max-buffered`.
    pub fn max(&self) -> usize {
        self.max
    }

    fn count(&self) -> &AtomicUsize {
        match &self.held {
            Held::Own(a) => a,
            Held::Shared(a) => a,
        }
    }

    /// No budget (for tests and clients).
    pub fn unlimited() -> Arc<Buffered> {
        Self::new(usize::MAX)
    }

    pub fn held(&self) -> usize {
        self.count().load(Ordering::Relaxed)
    }

    /// How many connections of this process wait for room in the budget.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    fn over(&self) -> bool {
        let over = self.held() >= self.max;
        if over {
            let mut w = self.warned.lock().unwrap_or_else(|e| e.into_inner());
            if w.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                *w = Some(Instant::now());
                tracing::warn!(
                    "unsent output of all connections reached --max-buffered ({} bytes): connections that hold some read nothing more until it drains, the others read at most {PRESSED_READ} bytes at a time",
                    self.max
                );
            }
        }
        over
    }

    /// Charges `n` bytes of a buffer that grows (a driver's read buffer),
    /// if the budget has room for them: buffers a connection keeps count
    /// as much as unsent bytes, or thousands of clients would each grow
    /// one to `--block` while their replies still leave.
    pub fn try_charge(&self, n: usize) -> bool {
        self.count()
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                held.checked_add(n).filter(|&after| after <= self.max)
            })
            .is_ok()
    }

    /// Gives back what [`Buffered::try_charge`] took.
    pub fn release(&self, n: usize) {
        self.sub(n);
    }

    #[inline]
    fn add(&self, n: usize) {
        if n > 0 {
            self.count().fetch_add(n, Ordering::Relaxed);
        }
    }

    #[inline]
    fn sub(&self, n: usize) {
        if n > 0 {
            self.count().fetch_sub(n, Ordering::Relaxed);
        }
    }
}

/// Why a connection ended; what the logs say and metrics will count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The reply was sent and the write side shut: the contract kept.
    Done,
    /// The peer reset or the socket failed.
    Error,
    /// No progress for `--idle-timeout`.
    Idle,
    /// Invalid input (`--utf8=strict`).
    Invalid,
    /// A malformed or oversized message (`--framing`).
    Framing,
    /// A missing, malformed or late PROXY header (`--proxy-protocol`).
    Proxy,
    /// Still open when the drain ran out of time.
    Cut,
    /// TLS: no complete handshake within `--handshake-timeout`, or a
    /// session that could not be set up (the connection is closed, never
    /// served in plaintext).
    Handshake,
    /// TLS: the TCP FIN came without the client's close_notify, so the
    /// request may have been cut by someone on the path.
    Truncated,
}

impl End {
    pub fn as_str(self) -> &'static str {
        match self {
            End::Done => "done",
            End::Error => "error",
            End::Idle => "idle",
            End::Invalid => "invalid input",
            End::Framing => "framing error",
            End::Proxy => "proxy header",
            End::Cut => "drain cut",
            End::Handshake => "tls handshake",
            End::Truncated => "tls truncated",
        }
    }
}

/// How the bytes of a connection become the reply.
enum Shape {
    /// A stream: every block transformed as it comes (in place when it can).
    Stream(Transformer),
    /// Messages: each one found, transformed whole and encoded. Boxed, so
    /// that a stream connection does not carry a decoder's room.
    Framed(Box<Framed>),
}

struct Framed {
    decoder: Decoder,
    mode: Mode,
    /// The reply to one read is built here.
    out: Vec<u8>,
    /// What the message being held has charged to `--max-buffered`: its
    /// bound (all it may grow to, and its reply), once the budget had room
    /// for it; else only the bytes it holds.
    charged: usize,
    /// Waiting for room in the budget before the held message may grow:
    /// when to ask again. The connection reads nothing meanwhile.
    room_at: Option<Instant>,
}

/// How often a connection waiting for room in `--max-buffered` asks again.
pub const ROOM_RETRY: Duration = Duration::from_millis(10);

/// How a connection ended early, and why (for the log). Boxed: most
/// connections never have one.
type Stop = Option<Box<(End, String)>>;

fn stop(end: End, why: String) -> Stop {
    Some(Box::new((end, why)))
}

/// The state of one connection.
pub struct Conn {
    shape: Shape,
    /// Shared by the connections of a loop (one pointer each).
    limits: Arc<Limits>,
    /// Reply bytes handed to the driver and not yet reported written.
    unsent: usize,
    input_ended: bool,
    write_shut: bool,
    /// Set once the connection is over for a reason other than `Done`.
    failed: Stop,
    /// Why it must end once the reply so far is sent (a framing error: the
    /// messages before the bad one are still answered).
    end_after_reply: Stop,
    last_progress: Instant,
    started: Instant,
    /// `-v`: the connection's age, in whole seconds, at its last "so far"
    /// line (one a second).
    reported_at: u32,
    verbose: bool,
    /// `-vv`: each read's size and first bytes (the lesson of framing).
    trace: bool,
    /// Boxed, not a `String`: its spare capacity would be paid per
    /// connection.
    peer: Box<str>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    metrics: crate::metrics::ConnMetrics,
    /// A tls:// connection: the bytes on the wire are TLS records, and the
    /// contract above applies to what is inside them.
    tls: Option<Box<TlsLayer>>,
    /// Until the PROXY header is complete (`--proxy-protocol`): it comes
    /// first, before TLS, and is neither answered nor counted as input.
    proxy: Option<Box<ProxyWait>>,
}

/// What a connection's clock guards (see [`Conn::poll_timeout`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Deadline {
    Proxy,
    Handshake,
    Idle,
    /// Not an end: a held message waits for room in `--max-buffered`.
    Room,
}

/// What [`Conn::handle_timeout`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timeout {
    /// No deadline has passed.
    Pending,
    /// Idle by the clock, but its bytes wait in the socket; or room came
    /// in the budget for the message it holds: drive it.
    Progress,
    /// A deadline passed: the connection is over ([`Conn::is_finished`]).
    Ended,
}

/// A PROXY header being awaited, and by when.
struct ProxyWait {
    header: crate::proxy::Header,
    deadline: Instant,
    timeout: Duration,
}

/// rustls's server side, as sans-I/O as this core: records in, records out.
struct TlsLayer {
    session: rustls::ServerConnection,
    /// Records to send: the reply, encrypted, and handshake messages;
    /// given back once they are written.
    out: Vec<u8>,
}

/// The most plaintext one TLS record carries.
const TLS_PLAIN: usize = 16 * 1024;

/// Who connected (a name for the logs), on which listener (a label for
/// the metrics), whether that listener speaks TLS, and whether a PROXY
/// header must come first (which versions, within how long).
pub struct Origin {
    pub peer: String,
    pub listener: String,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub proxy: Option<(crate::proxy::Version, Duration)>,
}

impl From<&str> for Origin {
    fn from(peer: &str) -> Origin {
        Origin {
            peer: peer.to_string(),
            listener: String::new(),
            tls: None,
            proxy: None,
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // What was never sent leaves the budget with the connection, and
        // so does what its held message was charged.
        self.limits.buffered.sub(self.unsent);
        if let Shape::Framed(framed) = &mut self.shape {
            self.limits.buffered.sub(framed.charged);
            framed.stop_waiting(&self.limits.buffered);
        }
        crate::metrics::global().conn_ended(&self.metrics, self.end().as_str());
    }
}

/// A stream transform's output; or the end of the connection, when strict
/// UTF-8 found an invalid byte.
fn checked<'a>(
    failed: &mut Stop,
    out: Result<&'a [u8], transform::InvalidUtf8>,
) -> io::Result<&'a [u8]> {
    out.map_err(|e| {
        let e = io::Error::from(e);
        *failed = stop(End::Invalid, e.to_string());
        e
    })
}

/// Encrypts `plain` into records in `out`: rustls holds a bounded amount at
/// a time, so its records are moved out as it fills.
fn tls_send(
    session: &mut rustls::ServerConnection,
    out: &mut Vec<u8>,
    mut plain: &[u8],
) -> io::Result<()> {
    use io::Write;
    while !plain.is_empty() {
        let n = session.writer().write(plain)?;
        plain = &plain[n..];
        while session.wants_write() {
            session.write_tls(out)?;
        }
    }
    Ok(())
}

/// Moves every record rustls has ready into `out`.
fn tls_flush(tls: &mut TlsLayer) -> io::Result<()> {
    while tls.session.wants_write() {
        tls.session.write_tls(&mut tls.out)?;
    }
    Ok(())
}

/// What ends a connection once the reply so far is sent, and what ends it
/// at once: the parts of [`Conn`] the transform may set.
struct Ending<'a> {
    failed: &'a mut Stop,
    input_ended: &'a mut bool,
    after_reply: &'a mut Stop,
    /// What a held message is charged to, and when.
    budget: &'a Buffered,
    now: Instant,
}

impl Shape {
    /// The reply to `buf` (in place when the transform keeps the length).
    fn reply<'a>(&'a mut self, buf: &'a mut [u8], end: Ending<'_>) -> io::Result<&'a [u8]> {
        match self {
            Shape::Stream(t) => checked(end.failed, t.push(buf)),
            Shape::Framed(framed) => {
                let Framed {
                    decoder, mode, out, ..
                } = &mut **framed;
                out.clear();
                let framing = decoder.framing();
                let mut invalid = None;
                let decoded = decoder.decode(buf, |msg| {
                    if invalid.is_none() {
                        invalid = reply_to(framing, *mode, msg, out).err();
                    }
                });
                let stop = match (decoded, invalid) {
                    (_, Some(e)) => stop(End::Invalid, e.to_string()),
                    (Err(e), None) => stop(End::Framing, e.to_string()),
                    (Ok(()), None) => None,
                };
                if stop.is_some() {
                    // Answer what came before, read nothing more, then close.
                    *end.input_ended = true;
                    *end.after_reply = stop;
                }
                framed.charge_held(end.budget, end.now);
                Ok(&framed.out)
            }
        }
    }

    /// What the transform still owes at the end of input.
    fn finish(&mut self, end: Ending<'_>) -> io::Result<&[u8]> {
        match self {
            Shape::Stream(t) => checked(end.failed, t.finish()),
            Shape::Framed(framed) => {
                let Framed {
                    decoder, mode, out, ..
                } = &mut **framed;
                out.clear();
                let framing = decoder.framing();
                match decoder.finish() {
                    Ok(Some(mut tail)) => {
                        if let Err(e) = reply_to(framing, *mode, &mut tail, out) {
                            *end.after_reply = stop(End::Invalid, e.to_string());
                        }
                    }
                    Ok(None) => {}
                    Err(e) => *end.after_reply = stop(End::Framing, e.to_string()),
                }
                framed.charge_held(end.budget, end.now);
                Ok(&framed.out)
            }
        }
    }
}

impl Framed {
    /// Charges the message being held to the budget: its bound (all it
    /// may grow to, and as much again per byte for a UTF-8 reply, which
    /// may be three times longer), so that every message let grow can
    /// complete and be answered within the budget. When the budget has no
    /// room for that, only the bytes held are charged (they exist) and the
    /// connection waits, reading nothing, and asks again every
    /// [`ROOM_RETRY`]: it keeps its place and goes on when others finish.
    /// Nothing held: everything is given back.
    fn charge_held(&mut self, budget: &Buffered, now: Instant) {
        let held = self.decoder.held();
        let factor = if matches!(self.mode, Mode::Ascii) {
            1
        } else {
            3
        };
        // A message larger than the whole budget is let grow once the
        // budget is empty, rather than never.
        let want = (self.decoder.bound() * factor).min(budget.max()).max(held);
        if want <= self.charged {
            budget.sub(self.charged - want);
            self.charged = want;
            self.stop_waiting(budget);
        } else if budget.try_charge(want - self.charged) {
            self.charged = want;
            self.stop_waiting(budget);
        } else {
            budget.add(held.saturating_sub(self.charged));
            self.charged = self.charged.max(held);
            if self.room_at.is_none() {
                budget.waiting.fetch_add(1, Ordering::Relaxed);
            }
            self.room_at = Some(now + ROOM_RETRY);
        }
    }

    fn stop_waiting(&mut self, budget: &Buffered) {
        if self.room_at.take().is_some() {
            budget.waiting.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Appends the reply to one message: its payload transformed whole (a
/// message is the unit, so no character spans two), in the same framing.
fn reply_to(
    framing: Framing,
    mode: Mode,
    msg: &mut [u8],
    out: &mut Vec<u8>,
) -> Result<(), transform::InvalidUtf8> {
    match mode {
        Mode::Ascii => {
            transform::upper_in_place(msg);
            framing::encode(framing, msg, out);
        }
        Mode::Utf8 { .. } => framing::encode(framing, &transform::apply(mode, msg)?, out),
    }
    Ok(())
}

impl Conn {
    /// A new connection from `peer` (a name for the logs), accepted at `now`.
    pub fn new(
        origin: Origin,
        protocol: Protocol,
        limits: impl Into<Arc<Limits>>,
        now: Instant,
    ) -> Conn {
        let Origin {
            peer,
            listener,
            tls,
            proxy,
        } = origin;
        // The logs name the scheme the client used.
        let peer = match &tls {
            Some(_) => peer.replacen("tcp://", "tls://", 1),
            None => peer,
        };
        tracing::info!("connection from {peer}");
        let mut failed = None;
        let tls = match tls.map(rustls::ServerConnection::new) {
            None => None,
            Some(Ok(session)) => Some(Box::new(TlsLayer {
                session,
                out: Vec::new(),
            })),
            // Fail closed: a tls:// client is never answered in plaintext.
            Some(Err(e)) => {
                failed = stop(End::Handshake, format!("TLS session not set up: {e}"));
                None
            }
        };
        let metrics = crate::metrics::global().conn_started(&listener);
        let shape = match protocol.framing {
            Framing::Stream => Shape::Stream(Transformer::new(protocol.mode)),
            f => Shape::Framed(Box::new(Framed {
                decoder: Decoder::new(f),
                mode: protocol.mode,
                out: Vec::new(),
                charged: 0,
                room_at: None,
            })),
        };
        Conn {
            shape,
            limits: limits.into(),
            unsent: 0,
            input_ended: false,
            write_shut: false,
            failed,
            end_after_reply: None,
            last_progress: now,
            started: now,
            reported_at: 0,
            verbose: tracing::enabled!(tracing::Level::DEBUG),
            trace: tracing::enabled!(tracing::Level::TRACE),
            peer: peer.into_boxed_str(),
            bytes_in: 0,
            bytes_out: 0,
            metrics,
            tls,
            proxy: proxy.map(|(want, timeout)| {
                Box::new(ProxyWait {
                    header: crate::proxy::Header::new(want),
                    deadline: now.checked_add(timeout).unwrap_or(now),
                    timeout,
                })
            }),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// How many bytes the driver may read now; 0 means "do not read" (the
    /// reply is unsent past the read-ahead, input ended, or it is over).
    #[inline]
    pub fn read_budget(&self) -> usize {
        if self.input_ended || self.is_finished() || self.unsent > self.limits.read_ahead {
            0
        } else if let Shape::Framed(f) = &self.shape
            && f.charged > 0
        {
            // A held message: waiting for room, or charged all it may grow
            // to (so it reads whole blocks whatever the budget).
            if f.room_at.is_some() {
                0
            } else {
                self.limits.block
            }
        } else if self.limits.buffered.over() {
            if self.unsent > 0 {
                0
            } else {
                self.limits.block.min(PRESSED_READ)
            }
        } else {
            self.limits.block
        }
    }

    /// Reply bytes the driver holds and must write before anything else.
    #[inline]
    pub fn unsent(&self) -> usize {
        self.unsent
    }

    #[inline]
    pub fn wants_write(&self) -> bool {
        self.unsent > 0 && !self.is_finished()
    }

    /// Input ended and every reply byte is written: shut the write side now.
    #[inline]
    pub fn wants_shutdown(&self) -> bool {
        self.input_ended && self.unsent == 0 && !self.is_finished()
    }

    /// Nothing more to do: the write side is shut, or the connection failed.
    #[inline]
    pub fn is_finished(&self) -> bool {
        self.write_shut || self.failed.is_some()
    }

    pub fn input_ended(&self) -> bool {
        self.input_ended
    }

    /// `buf` just arrived. Returns the reply to send: `buf` itself,
    /// transformed in place, whenever the transform keeps the length (the
    /// hot path allocates and copies nothing), else bytes the core holds
    /// until the next call. The driver must write all of them, in order,
    /// reporting each write with [`Conn::on_written`].
    #[inline]
    pub fn on_input<'a>(&'a mut self, mut buf: &'a mut [u8], now: Instant) -> io::Result<&'a [u8]> {
        if self.input_ended || self.is_finished() {
            // Read ahead before reading stopped (the uring driver): what
            // follows a framing error is never answered.
            return Ok(&buf[..0]);
        }
        if self.proxy.is_some() {
            self.last_progress = now;
            let consumed = self.proxy_input(buf)?;
            buf = &mut buf[consumed..];
            if buf.is_empty() {
                return Ok(buf);
            }
        }
        let n = buf.len();
        self.bytes_in += n as u64;
        self.metrics.bytes_in.inc_by(n as u64);
        if n > 0 {
            self.last_progress = now;
        }
        if self.verbose {
            let age = now.saturating_duration_since(self.started).as_secs();
            if age > u64::from(self.reported_at) {
                self.reported_at = u32::try_from(age).unwrap_or(u32::MAX);
                tracing::debug!("{}: {} bytes processed so far", self.peer, self.bytes_in);
            }
        }
        if self.trace {
            let shown = &buf[..n.min(32)];
            let more = if n > 32 { "..." } else { "" };
            tracing::trace!(
                "{}: read {n} bytes: \"{}{more}\"",
                self.peer,
                shown.escape_ascii()
            );
        }
        if self.tls.is_some() {
            return self.tls_input(buf);
        }
        let ending = Ending {
            failed: &mut self.failed,
            input_ended: &mut self.input_ended,
            after_reply: &mut self.end_after_reply,
            budget: &self.limits.buffered,
            now,
        };
        let out = self.shape.reply(buf, ending)?;
        self.unsent += out.len();
        self.limits.buffered.add(out.len());
        Ok(out)
    }

    /// Takes PROXY header bytes from the start of `buf`; returns how many
    /// (all of them while the header is incomplete). A bad header ends the
    /// connection.
    fn proxy_input(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(wait) = &mut self.proxy else {
            return Ok(0);
        };
        match wait.header.push(buf) {
            crate::proxy::Parsed::Incomplete => Ok(buf.len()),
            crate::proxy::Parsed::Done {
                consumed,
                source,
                version,
            } => {
                self.proxy = None;
                if let Some(client) = source {
                    let scheme = if self.tls.is_some() { "tls" } else { "tcp" };
                    let client = format!("{scheme}://{}", crate::addr::HostPort::from(client));
                    tracing::info!("{client} via {} (PROXY v{version})", self.peer);
                    self.peer = client.into_boxed_str();
                }
                Ok(consumed)
            }
            crate::proxy::Parsed::Bad(why) => {
                self.proxy = None;
                self.failed = stop(End::Proxy, why.clone());
                Err(io::Error::new(io::ErrorKind::InvalidData, why))
            }
        }
    }

    /// The peer half-closed (a read returned 0). Returns what the transform
    /// still owes, to be written like any reply.
    pub fn on_input_end(&mut self, now: Instant) -> io::Result<&[u8]> {
        if let Some(wait) = self.proxy.take() {
            self.input_ended = true;
            self.failed = stop(End::Proxy, wait.header.at_end());
            return Ok(&[]);
        }
        self.input_ended = true;
        self.last_progress = now;
        if self.tls.is_some() {
            // The TCP FIN, with or without the client's close_notify.
            return self.tls_end();
        }
        let ending = Ending {
            failed: &mut self.failed,
            input_ended: &mut self.input_ended,
            after_reply: &mut self.end_after_reply,
            budget: &self.limits.buffered,
            now,
        };
        let out = self.shape.finish(ending)?;
        self.unsent += out.len();
        self.limits.buffered.add(out.len());
        Ok(out)
    }

    /// TLS records arrived: decrypt, answer what is inside by the same
    /// contract, encrypt the reply. A close_notify is the client's
    /// half-close; a protocol error sends rustls's alert, then ends.
    fn tls_input(&mut self, mut records: &[u8]) -> io::Result<&[u8]> {
        self.through_tls(|conn, tls| {
            let mut closed = false;
            while !records.is_empty() && !closed {
                if tls.session.read_tls(&mut records)? == 0 {
                    break;
                }
                if let Err(e) = tls.session.process_new_packets() {
                    conn.input_ended = true;
                    conn.end_after_reply = stop(End::Error, format!("TLS: {e}"));
                    return Ok(());
                }
                closed = conn.tls_decrypt(tls)?;
            }
            if closed {
                conn.input_ended = true;
                conn.tls_finish(tls)?;
            }
            Ok(())
        })
    }

    /// Runs `step` on the TLS session, then hands back every record it
    /// produced, counted as unsent like any reply.
    fn through_tls(
        &mut self,
        step: impl FnOnce(&mut Conn, &mut TlsLayer) -> io::Result<()>,
    ) -> io::Result<&[u8]> {
        let Some(mut tls) = self.tls.take() else {
            return Ok(&[]);
        };
        tls.out.clear();
        let result = step(self, &mut tls).and_then(|()| tls_flush(&mut tls));
        self.tls = Some(tls);
        if let Err(e) = &result
            && self.failed.is_none()
        {
            // Named here, so that every driver logs the same reason (uring
            // logged an oversized ClientHello as a drain cut).
            self.failed = stop(End::Error, format!("TLS: {e}"));
        }
        result?;
        let out = self.tls.as_ref().map_or(&[][..], |t| &t.out[..]);
        self.unsent += out.len();
        self.limits.buffered.add(out.len());
        Ok(out)
    }

    /// Answers every plaintext byte rustls holds; true once the client
    /// sent close_notify.
    fn tls_decrypt(&mut self, tls: &mut TlsLayer) -> io::Result<bool> {
        use io::Read;
        // One record's plaintext at most, on the stack: a TLS connection
        // holds no buffer of ours between reads.
        let mut plain = [0u8; TLS_PLAIN];
        loop {
            let n = match tls.session.reader().read(&mut plain) {
                Ok(0) => return Ok(true),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            };
            let ending = Ending {
                failed: &mut self.failed,
                input_ended: &mut self.input_ended,
                after_reply: &mut self.end_after_reply,
                budget: &self.limits.buffered,
                now: self.last_progress,
            };
            let reply = self.shape.reply(&mut plain[..n], ending)?;
            tls_send(&mut tls.session, &mut tls.out, reply)?;
            if self.input_ended {
                return Ok(false);
            }
        }
    }

    /// The end of the client's input: what the transform owes, then our
    /// close_notify, so that the client can tell a whole reply from a cut.
    fn tls_finish(&mut self, tls: &mut TlsLayer) -> io::Result<()> {
        let ending = Ending {
            failed: &mut self.failed,
            input_ended: &mut self.input_ended,
            after_reply: &mut self.end_after_reply,
            budget: &self.limits.buffered,
            now: self.last_progress,
        };
        let tail = self.shape.finish(ending)?;
        tls_send(&mut tls.session, &mut tls.out, tail)?;
        tls.session.send_close_notify();
        Ok(())
    }

    /// The TCP FIN arrived.
    ///
    /// A client's close_notify ends its input before any FIN can be read
    /// (reading stops), so a FIN that gets here came without one: during
    /// the handshake, the client left; after it, the request may have been
    /// cut on the path. What came is answered (it was authenticated), the
    /// end is named a truncation, and logged and counted as such.
    fn tls_end(&mut self) -> io::Result<&[u8]> {
        if self
            .tls
            .as_ref()
            .is_some_and(|t| t.session.is_handshaking())
        {
            self.failed = stop(End::Handshake, "closed during the TLS handshake".into());
            return Ok(&[]);
        }
        self.end_after_reply.get_or_insert_with(|| {
            Box::new((
                End::Truncated,
                "TCP FIN without the client's TLS close_notify: the request may be cut".into(),
            ))
        });
        self.through_tls(|conn, tls| conn.tls_finish(tls))
    }

    /// `n` reply bytes were written.
    #[inline]
    pub fn on_written(&mut self, n: usize, now: Instant) {
        debug_assert!(n <= self.unsent, "wrote {n} of {} unsent", self.unsent);
        let n = n.min(self.unsent);
        self.unsent -= n;
        self.limits.buffered.sub(n);
        self.bytes_out += n as u64;
        self.metrics.bytes_out.inc_by(n as u64);
        if n > 0 {
            self.last_progress = now;
        }
        if let Shape::Framed(framed) = &mut self.shape
            && self.unsent == 0
            && framed.out.capacity() > 64 * 1024
        {
            // A large reply is sent: give its memory back.
            framed.out = Vec::new();
        }
        if let Some(tls) = &mut self.tls
            && self.unsent == 0
        {
            // No records in flight: a TLS connection holds no buffer.
            tls.out = Vec::new();
        }
    }

    /// The write side was shut after the whole reply: the contract is kept,
    /// unless a framing error made this the end.
    pub fn on_shutdown(&mut self) {
        self.write_shut = true;
        if let Some(stop) = self.end_after_reply.take() {
            self.failed.get_or_insert(stop);
        }
    }

    /// The socket failed (a reset, a write error): the connection is over.
    pub fn on_error(&mut self, e: &io::Error) {
        if self.failed.is_none() {
            self.failed = stop(End::Error, e.to_string());
        }
    }

    /// The connection's next deadline and what it guards: the PROXY
    /// header's and the TLS handshake's are fixed, counted from the accept;
    /// idle moves with every byte. `None` once it is finished.
    fn deadline(&self) -> Option<(Instant, Deadline)> {
        if self.is_finished() {
            return None;
        }
        let proxy = self.proxy.as_ref().map(|w| (w.deadline, Deadline::Proxy));
        let handshake = (self.tls.as_ref())
            .filter(|t| t.session.is_handshaking())
            .map(|_| {
                let at = self.started.checked_add(self.limits.handshake);
                (at.unwrap_or(self.started), Deadline::Handshake)
            });
        let idle = (self.limits.idle)
            .and_then(|d| self.last_progress.checked_add(d))
            .map(|at| (at, Deadline::Idle));
        let room = match &self.shape {
            Shape::Framed(f) => f.room_at.map(|at| (at, Deadline::Room)),
            Shape::Stream(_) => None,
        };
        [proxy, handshake, idle, room]
            .into_iter()
            .flatten()
            .min_by_key(|d| d.0)
    }

    /// When the driver must call [`Conn::handle_timeout`] if nothing else
    /// happens first (quinn-proto's `poll_timeout`). Every deadline of a
    /// connection is here; a driver keeps no clock of its own.
    #[inline]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadline().map(|d| d.0)
    }

    /// How long the next read or write may wait, for the drivers whose
    /// timers are per operation (blocking, async): until the deadline.
    pub fn wait_limit(&self, now: Instant) -> Option<Duration> {
        self.poll_timeout().map(|at| {
            at.saturating_duration_since(now)
                .max(Duration::from_millis(1))
        })
    }

    /// Whether a fixed deadline (the PROXY header, the TLS handshake) is
    /// running: a driver with per-operation timers sets them again before
    /// each wait, since they count from the accept, not from the last byte.
    pub fn in_setup(&self) -> bool {
        self.proxy.is_some() || (self.tls.as_ref()).is_some_and(|t| t.session.is_handshaking())
    }

    /// Time is `now`: ends the connection if a deadline has passed. Idle is
    /// decided last, by `waiting` (the driver's look at its socket): a
    /// connection whose bytes already wait in its socket is not idle,
    /// however long the server was away (stopped, or starved of CPU); it
    /// counts as progress, and the driver drives it. The fixed deadlines do
    /// not ask: a client that drips its header is late whatever it sends.
    pub fn handle_timeout(&mut self, now: Instant, waiting: impl FnOnce(&Conn) -> bool) -> Timeout {
        if let Shape::Framed(f) = &mut self.shape
            && f.room_at.is_some_and(|at| now >= at)
        {
            f.charge_held(&self.limits.buffered, now);
            if f.room_at.is_none() {
                return Timeout::Progress; // room: it may read again
            }
        }
        let Some((at, what)) = self.deadline() else {
            return Timeout::Pending;
        };
        if now < at {
            return Timeout::Pending;
        }
        let why = match what {
            Deadline::Room => return Timeout::Pending, // asked again above
            Deadline::Proxy => (
                End::Proxy,
                format!(
                    "no complete PROXY header within {} (--proxy-timeout)",
                    humantime::format_duration(
                        self.proxy.as_ref().map_or(Duration::ZERO, |w| w.timeout)
                    )
                ),
            ),
            Deadline::Handshake => (
                End::Handshake,
                format!(
                    "no complete TLS handshake within {} (--handshake-timeout)",
                    humantime::format_duration(self.limits.handshake)
                ),
            ),
            Deadline::Idle if waiting(self) => {
                self.last_progress = now;
                return Timeout::Progress;
            }
            Deadline::Idle => (
                End::Idle,
                format!(
                    "idle for {}: closed (--idle-timeout)",
                    humantime::format_duration(self.limits.idle.unwrap_or_default())
                ),
            ),
        };
        self.proxy = None;
        self.failed = stop(why.0, why.1);
        Timeout::Ended
    }

    /// A read or write of a per-operation driver waited all of
    /// [`Conn::wait_limit`] and timed out: the deadline is reached, even if
    /// the clock read now is a hair before it.
    pub fn handle_wait_timeout(
        &mut self,
        now: Instant,
        waiting: impl FnOnce(&Conn) -> bool,
    ) -> Timeout {
        let at = self.poll_timeout().map_or(now, |at| at.max(now));
        self.handle_timeout(at, waiting)
    }

    /// How it ended: `Done` unless it failed, was idle or was cut.
    pub fn end(&self) -> End {
        match &self.failed {
            Some(stopped) => stopped.0,
            None if self.write_shut => End::Done,
            None => End::Cut,
        }
    }

    /// The input was refused (`--utf8=strict`): the driver closes with a
    /// reset, so that the client cannot take a FIN for a complete reply.
    pub fn resets(&self) -> bool {
        self.end() == End::Invalid
    }

    /// Logs how the connection ended (once, when the driver drops it).
    pub fn log_end(&self, now: Instant) {
        let secs = now.duration_since(self.started).as_secs_f64();
        match (&self.failed, self.write_shut) {
            (None, true) => tracing::info!(
                "completed {}: {} bytes in {:.3} s",
                self.peer,
                self.bytes_in,
                secs
            ),
            (Some(stopped), _) => tracing::warn!(
                "connection {} ended ({}) after {} bytes: {}",
                self.peer,
                stopped.0.as_str(),
                self.bytes_in,
                stopped.1
            ),
            (None, false) => tracing::warn!(
                "connection {} cut after {} bytes with {} unsent",
                self.peer,
                self.bytes_in,
                self.unsent
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The core against an in-memory peer: input cut into reads of every
    //! size, output taken in writes of every size, with the backpressure
    //! bound and the half-close order checked at each step.

    use super::*;
    use crate::transform::{self, Mode};
    use proptest::prelude::*;

    const T0: fn() -> Instant = Instant::now;

    fn proto(mode: Mode) -> Protocol {
        Protocol {
            mode,
            framing: Framing::Stream,
        }
    }

    /// A held connection's memory is mostly this struct (#16: 100,000
    /// held connections at under 256 bytes each, the driver's part
    /// included): what is rare (framing, UTF-8 state, TLS, PROXY, an early
    /// end) is boxed, what is common to a loop's connections is shared.
    #[test]
    fn a_connection_is_small() {
        let size = std::mem::size_of::<Conn>();
        println!("Conn: {size} bytes");
        assert!(size <= 144, "Conn grew to {size} bytes");
    }

    fn limits(block: usize, read_ahead: usize) -> Limits {
        Limits {
            block,
            read_ahead,
            idle: Some(Duration::from_secs(5)),
            handshake: Duration::from_secs(10),
            buffered: Buffered::unlimited(),
        }
    }

    /// A certificate for 127.0.0.1, and a client that trusts it.
    fn tls_pair() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
        // A directory per call: the tests run in parallel, and each removes
        // its own.
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("upcase-core-tls-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, signing_key.serialize_pem()).unwrap();
        let server = crate::tls::server_config(&c, &k).unwrap();
        let client = crate::tls::client_config(Some(&c), false).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        (server, client)
    }

    /// A PROXY header cut anywhere, then data: the header is neither
    /// answered nor counted, the data after it is, and the peer named in
    /// the logs becomes the header's client.
    #[test]
    fn proxy_header_at_every_cut() {
        let header = b"PROXY TCP4 10.1.2.3 10.9.9.9 4444 1060\r\n";
        let mut all = header.to_vec();
        all.extend_from_slice(b"hello, proxy");
        let now = Instant::now();
        for cut in 1..all.len() {
            let origin = Origin {
                proxy: Some((crate::proxy::Version::Any, Duration::from_secs(3))),
                ..Origin::from("tcp://127.0.0.1:9")
            };
            let mut c = Conn::new(origin, proto(Mode::Ascii), limits(4096, 0), now);
            let mut reply = Vec::new();
            for piece in [&all[..cut], &all[cut..]] {
                let mut buf = piece.to_vec();
                let out = c.on_input(&mut buf, now).unwrap().to_vec();
                c.on_written(out.len(), now);
                reply.extend_from_slice(&out);
            }
            assert_eq!(reply, b"HELLO, PROXY", "cut {cut}");
            assert_eq!(c.bytes_in, 12, "cut {cut}");
            assert_eq!(&*c.peer, "tcp://10.1.2.3:4444");
        }
    }

    #[test]
    fn a_missing_late_or_cut_proxy_header_ends_the_connection() {
        let now = Instant::now();
        let new = || {
            let origin = Origin {
                proxy: Some((crate::proxy::Version::V2, Duration::from_secs(3))),
                ..Origin::from("tcp://127.0.0.1:9")
            };
            Conn::new(origin, proto(Mode::Ascii), limits(4096, 0), now)
        };
        // Data where the header should be.
        let mut c = new();
        assert!(c.on_input(&mut b"hello".to_vec(), now).is_err());
        assert_eq!(c.end(), End::Proxy);
        assert!(c.is_finished());
        // Late: the deadline is 3 s after the accept, however idle is set.
        let mut c = new();
        assert_eq!(c.poll_timeout(), Some(now + Duration::from_secs(3)));
        assert!(c.in_setup());
        let early = now + Duration::from_millis(2999);
        assert_eq!(c.handle_timeout(early, |_| false), Timeout::Pending);
        // A byte waiting in the socket does not save a late header.
        let late = now + Duration::from_secs(3);
        assert_eq!(c.handle_timeout(late, |_| true), Timeout::Ended);
        assert_eq!(c.end(), End::Proxy);
        assert!(c.is_finished() && c.poll_timeout().is_none());
        // Closed halfway through the header.
        let mut c = new();
        let mut start = b"\r\n\r\n\0".to_vec();
        assert!(c.on_input(&mut start, now).unwrap().is_empty());
        assert!(c.on_input_end(now).unwrap().is_empty());
        assert_eq!(c.end(), End::Proxy);
    }

    /// TLS through the core, with the network in memory: the records cut
    /// into reads of `cut` bytes, the reply taken whole. The client gets
    /// the uppercased text and then our close_notify.
    #[test]
    fn tls_in_memory_at_every_cut() {
        use std::io::{Read, Write};
        let (server, client) = tls_pair();
        let text = b"hello tls, in memory!".repeat(50);
        for cut in [1, 2, 5, 64, 1000, 1 << 16] {
            let now = T0();
            let origin = Origin {
                peer: "mem".into(),
                listener: "tls://mem".into(),
                tls: Some(server.clone()),
                proxy: None,
            };
            let mut c = Conn::new(origin, proto(Mode::Ascii), limits(4096, 0), now);
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
            let mut peer = rustls::ClientConnection::new(client.clone(), name).unwrap();
            peer.writer().write_all(&text).unwrap();
            let (mut reply, mut peer_done, mut closing) = (Vec::new(), false, false);
            for _ in 0..10_000 {
                if !closing && !peer.is_handshaking() {
                    // The end of input, once there is a session to end.
                    peer.send_close_notify();
                    closing = true;
                }
                // Client to server, `cut` bytes per read.
                let mut wire = Vec::new();
                while peer.wants_write() {
                    peer.write_tls(&mut wire).unwrap();
                }
                for chunk in wire.chunks(cut) {
                    let mut buf = chunk.to_vec();
                    let out = c
                        .on_input(&mut buf, now)
                        .unwrap_or_else(|e| panic!("cut {cut}: {e}"))
                        .to_vec();
                    c.on_written(out.len(), now);
                    let mut rd = &out[..];
                    while !rd.is_empty() {
                        peer.read_tls(&mut rd).unwrap();
                        if let Err(e) = peer.process_new_packets() {
                            panic!("cut {cut}: {e}");
                        }
                    }
                }
                loop {
                    let mut b = [0u8; 4096];
                    match peer.reader().read(&mut b) {
                        Ok(0) => {
                            peer_done = true;
                            break;
                        }
                        Ok(n) => reply.extend_from_slice(&b[..n]),
                        Err(_) => break,
                    }
                }
                if peer_done {
                    break;
                }
            }
            assert!(peer_done, "cut {cut}: no close_notify from the server");
            assert_eq!(reply, text.to_ascii_uppercase(), "cut {cut}");
            assert!(c.wants_shutdown(), "cut {cut}: the write side is next");
            c.on_shutdown();
            assert_eq!(c.end(), End::Done, "cut {cut}");
        }
    }

    fn tls_origin(server: &Arc<rustls::ServerConfig>) -> Origin {
        Origin {
            tls: Some(server.clone()),
            ..Origin::from("tcp://127.0.0.1:7")
        }
    }

    /// The handshake has a deadline of its own, counted from the accept,
    /// that bytes do not move; once it is complete only idle is left.
    #[test]
    fn a_tls_handshake_must_end_within_its_timeout() {
        let (server, client) = tls_pair();
        let now = T0();
        let s = Duration::from_secs(1);
        let mut c = Conn::new(
            tls_origin(&server),
            proto(Mode::Ascii),
            limits(4096, 0),
            now,
        );
        assert_eq!(&*c.peer, "tls://127.0.0.1:7", "the logs name the scheme");
        assert!(c.in_setup());
        assert_eq!(
            c.poll_timeout(),
            Some(now + 5 * s),
            "idle (5 s) comes first"
        );
        // A client that drips its hello: each byte moves idle, not the handshake.
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut peer = rustls::ClientConnection::new(client.clone(), name).unwrap();
        let mut hello = Vec::new();
        peer.write_tls(&mut hello).unwrap();
        for (i, b) in hello.iter().take(9).enumerate() {
            let at = now + s * (i as u32 + 1);
            assert!(c.on_input(&mut [*b], at).unwrap().is_empty());
        }
        assert_eq!(
            c.poll_timeout(),
            Some(now + 10 * s),
            "the handshake's deadline"
        );
        assert_eq!(c.handle_timeout(now + 10 * s, |_| true), Timeout::Ended);
        assert_eq!(c.end(), End::Handshake);

        // Complete: the deadline is gone, idle is what is left.
        let mut c = Conn::new(
            tls_origin(&server),
            proto(Mode::Ascii),
            limits(4096, 0),
            now,
        );
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut peer = rustls::ClientConnection::new(client, name).unwrap();
        for _ in 0..10 {
            let mut wire = Vec::new();
            while peer.wants_write() {
                peer.write_tls(&mut wire).unwrap();
            }
            let out = c.on_input(&mut wire, now).unwrap().to_vec();
            c.on_written(out.len(), now);
            peer.read_tls(&mut &out[..]).unwrap();
            peer.process_new_packets().unwrap();
        }
        assert!(!peer.is_handshaking() && !c.in_setup());
        assert_eq!(c.poll_timeout(), Some(now + 5 * s));
        // A TCP FIN without close_notify: answered, but named a truncation.
        assert!(!c.on_input_end(now).unwrap().is_empty(), "our close_notify");
        c.on_shutdown();
        assert_eq!(c.end(), End::Truncated);
    }

    /// A message being held is charged all it may grow to before it may
    /// grow; one that finds no room waits, reading nothing, and asks again
    /// until the others' replies are taken. Everything goes back at the end.
    #[test]
    fn a_held_message_is_charged_and_waits_for_room() {
        let now = T0();
        let ms = Duration::from_millis(1);
        let budget = Buffered::new(100);
        let lim = Limits {
            buffered: budget.clone(),
            ..limits(4096, 0)
        };
        let framed = Protocol {
            mode: Mode::Ascii,
            framing: Framing::Length(1000),
        };
        let new = || Conn::new("t".into(), framed, lim.clone(), now);
        let (mut a, mut b) = (new(), new());
        let mut start = [&60u32.to_be_bytes()[..], &[b'a'; 10]].concat();
        assert!(a.on_input(&mut start.clone(), now).unwrap().is_empty());
        assert_eq!(budget.held(), 64, "a's whole message, before it grows");
        assert_eq!(a.read_budget(), 4096);
        assert!(b.on_input(&mut start, now).unwrap().is_empty());
        assert_eq!(budget.held(), 78, "b holds 14 bytes and may not grow");
        assert_eq!((b.read_budget(), budget.waiting()), (0, 1));
        assert_eq!(b.poll_timeout(), Some(now + 10 * ms));
        assert_eq!(b.handle_timeout(now + 10 * ms, |_| false), Timeout::Pending);
        // a completes: its reply is charged as unsent, its hold is released.
        let reply = a.on_input(&mut [b'a'; 50], now).unwrap().len();
        assert_eq!((reply, budget.held()), (64, 78));
        assert_eq!(b.handle_timeout(now + 20 * ms, |_| false), Timeout::Pending);
        a.on_written(reply, now);
        assert_eq!(budget.held(), 14);
        assert_eq!(
            b.handle_timeout(now + 30 * ms, |_| false),
            Timeout::Progress
        );
        assert_eq!((b.read_budget(), budget.waiting()), (4096, 0));
        assert_eq!(budget.held(), 64);
        let mut rest = [b'a'; 50];
        let reply = b.on_input(&mut rest, now).unwrap();
        assert_eq!(&reply[4..], &[b'A'; 60][..]);
        drop((a, b));
        assert_eq!(budget.held(), 0, "all given back");
    }

    /// A TLS session that cannot be set up closes the connection: a tls://
    /// client is never answered in plaintext.
    #[test]
    fn tls_fails_closed() {
        let (server, _) = tls_pair();
        let mut bad = (*server).clone();
        bad.max_fragment_size = Some(1); // rustls refuses it per connection
        let now = T0();
        let mut c = Conn::new(
            tls_origin(&Arc::new(bad)),
            proto(Mode::Ascii),
            limits(64, 0),
            now,
        );
        assert!(c.is_finished());
        assert_eq!(c.end(), End::Handshake);
        assert_eq!(c.read_budget(), 0);
        assert!(c.on_input(&mut b"hello".to_vec(), now).unwrap().is_empty());
        // Gone during the handshake: named so, nothing sent.
        let mut c = Conn::new(tls_origin(&server), proto(Mode::Ascii), limits(64, 0), now);
        assert!(c.on_input_end(now).unwrap().is_empty());
        assert_eq!(c.end(), End::Handshake);
    }

    /// Runs a connection to its end. `reads[i % len]` bounds the i-th read,
    /// `writes[j % len]` the j-th write (0: the peer is not reading now).
    /// Returns the output and whether the half-close came after all of it.
    fn run(mode: Mode, input: &[u8], lim: Limits, reads: &[usize], writes: &[usize]) -> Vec<u8> {
        let now = T0();
        let mut c = Conn::new("test".into(), proto(mode), lim.clone(), now);
        let mut pos = 0;
        let mut pending: Vec<u8> = Vec::new(); // the driver's unsent output
        let mut out = Vec::new();
        let (mut r, mut w) = (0, 0);
        let max_growth = if mode == Mode::Ascii { 1 } else { 3 };
        for _round in 0..1_000_000 {
            if c.is_finished() {
                assert!(pending.is_empty(), "shut with output unsent");
                assert_eq!(c.end(), End::Done);
                return out;
            }
            if c.wants_shutdown() {
                assert!(pending.is_empty());
                c.on_shutdown();
                continue;
            }
            // The peer takes some output.
            if !pending.is_empty() {
                let k = writes[w % writes.len()].min(pending.len());
                w += 1;
                out.extend(pending.drain(..k));
                c.on_written(k, now);
                assert_eq!(c.unsent(), pending.len());
            }
            let budget = c.read_budget();
            if budget == 0 {
                // Backpressure: the bound holds while reading is stopped.
                assert!(
                    c.input_ended() || pending.len() > lim.read_ahead,
                    "reading stopped without cause"
                );
                continue;
            }
            assert!(pending.len() <= lim.read_ahead);
            if pos == input.len() {
                let tail = c.on_input_end(now).unwrap().to_vec();
                pending.extend_from_slice(&tail);
                continue;
            }
            let n = reads[r % reads.len()]
                .clamp(1, budget)
                .min(input.len() - pos);
            r += 1;
            let mut buf = input[pos..pos + n].to_vec();
            pos += n;
            let reply = c.on_input(&mut buf, now).unwrap();
            assert!(reply.len() <= n * max_growth + 3);
            pending.extend_from_slice(reply);
            assert_eq!(c.unsent(), pending.len());
            // Never more unsent than the read-ahead plus one block's reply.
            assert!(pending.len() <= lim.read_ahead + lim.block * max_growth + 3);
        }
        panic!("no progress");
    }

    #[test]
    fn every_read_and_write_size() {
        let input = b"capitalize this! hello, world\n".repeat(7);
        let expect = transform::upper(&input);
        for read in 1..=input.len() {
            for write in [1, 2, 3, 7, 16, 64, 1000] {
                let got = run(Mode::Ascii, &input, limits(64, 0), &[read], &[0, write, 0]);
                assert_eq!(got, expect, "reads of {read}, writes of {write}");
            }
        }
    }

    #[test]
    fn read_ahead_lets_reading_run_ahead_of_writes_boundedly() {
        let input = b"x".repeat(10_000);
        let got = run(Mode::Ascii, &input, limits(100, 350), &[100], &[0, 0, 0, 7]);
        assert_eq!(got, transform::upper(&input));
    }

    #[test]
    fn utf8_split_everywhere_matches_whole() {
        let input = "straße ﬁne ωμέγα ǅ ΐ".repeat(3).into_bytes();
        let expect = transform::apply(Mode::Utf8 { strict: false }, &input).unwrap();
        for read in 1..=input.len() {
            let got = run(
                Mode::Utf8 { strict: false },
                &input,
                limits(16, 0),
                &[read, 1],
                &[5, 0],
            );
            assert_eq!(got, expect, "reads of {read}");
        }
    }

    #[test]
    fn half_close_waits_for_every_byte() {
        let now = T0();
        let mut c = Conn::new("t".into(), proto(Mode::Ascii), limits(8, 0), now);
        let mut buf = *b"abc";
        assert_eq!(c.on_input(&mut buf, now).unwrap(), b"ABC");
        assert_eq!(c.read_budget(), 0, "reply unsent: no reading");
        assert!(c.on_input_end(now).unwrap().is_empty());
        assert!(!c.wants_shutdown(), "3 bytes still unsent");
        c.on_written(2, now);
        assert!(!c.wants_shutdown());
        c.on_written(1, now);
        assert!(c.wants_shutdown());
        c.on_shutdown();
        assert!(c.is_finished());
        assert_eq!((c.end(), c.bytes_in, c.bytes_out), (End::Done, 3, 3));
    }

    #[test]
    fn strict_utf8_fails_with_the_offset() {
        let now = T0();
        let mut c = Conn::new(
            "t".into(),
            proto(Mode::Utf8 { strict: true }),
            limits(8, 0),
            now,
        );
        let mut buf = *b"ok\xff";
        let e = c.on_input(&mut buf, now).unwrap_err();
        assert!(e.to_string().contains("offset 2"), "{e}");
        assert!(c.is_finished());
        assert_eq!(c.end(), End::Invalid);
        assert_eq!(c.read_budget(), 0);
    }

    #[test]
    fn idle_counts_from_the_last_progress() {
        let t = T0();
        let s = Duration::from_secs(1);
        let mut c = Conn::new("t".into(), proto(Mode::Ascii), limits(8, 0), t);
        assert_eq!(c.poll_timeout(), Some(t + 5 * s));
        assert!(!c.in_setup());
        assert_eq!(c.handle_timeout(t + 4 * s, |_| false), Timeout::Pending);
        let mut buf = *b"a";
        c.on_input(&mut buf, t + 3 * s).unwrap();
        assert_eq!(c.poll_timeout(), Some(t + 8 * s), "the read moved it");
        assert_eq!(c.handle_timeout(t + 7 * s, |_| false), Timeout::Pending);
        c.on_written(0, t + 7 * s);
        assert_eq!(
            c.poll_timeout(),
            Some(t + 8 * s),
            "a write of nothing is no progress"
        );
        // Bytes waiting in the socket at the deadline are progress.
        assert_eq!(c.handle_timeout(t + 8 * s, |_| true), Timeout::Progress);
        assert_eq!(c.poll_timeout(), Some(t + 13 * s));
        assert_eq!(c.wait_limit(t + 10 * s), Some(3 * s));
        // A per-operation timer that fired a hair early still ends it.
        let early = t + 13 * s - Duration::from_millis(1);
        assert_eq!(c.handle_wait_timeout(early, |_| false), Timeout::Ended);
        assert_eq!(c.end(), End::Idle);
        assert!(c.is_finished() && c.poll_timeout().is_none());
        let mut none = Conn::new(
            "t".into(),
            proto(Mode::Ascii),
            Limits {
                idle: None,
                handshake: Duration::from_secs(10),
                ..limits(8, 0)
            },
            t,
        );
        assert_eq!(none.poll_timeout(), None);
        assert_eq!(
            none.handle_timeout(t + 1000 * s, |_| false),
            Timeout::Pending
        );
        none.on_error(&io::ErrorKind::ConnectionReset.into());
        assert_eq!(none.end(), End::Error);
    }

    /// What a forked child charges, its parent sees (the fork model's
    /// children spend one budget).
    #[test]
    fn a_budget_in_shared_memory_is_one_across_fork() {
        let buffered = Buffered::new_shared(100).unwrap();
        assert!(buffered.try_charge(10));
        // SAFETY: the child only does an atomic add and _exit, both fine
        // after fork in a multi-threaded process.
        match unsafe { libc::fork() } {
            0 => {
                let ok = buffered.try_charge(30);
                // SAFETY: ends the child at once, running none of the
                // harness's state it copied.
                unsafe { libc::_exit(if ok { 0 } else { 1 }) }
            }
            pid => {
                assert!(pid > 0, "fork: {}", io::Error::last_os_error());
                let mut status = 0;
                // SAFETY: waits for our own child.
                unsafe { libc::waitpid(pid, &mut status, 0) };
                assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
            }
        }
        assert_eq!(buffered.held(), 40, "the child's charge is seen here");
        assert!(!buffered.try_charge(61), "one budget: 40 + 61 > 100");
        assert_eq!(Buffered::new(100).held(), 0);
    }

    #[test]
    fn a_shared_budget_stops_those_who_hold_and_slows_the_rest() {
        let now = T0();
        let buffered = Buffered::new(10);
        let lim = Limits {
            buffered: buffered.clone(),
            ..limits(4096, 0)
        };
        let mut a = Conn::new("a".into(), proto(Mode::Ascii), lim.clone(), now);
        let mut b = Conn::new("b".into(), proto(Mode::Ascii), lim.clone(), now);
        let c = Conn::new("c".into(), proto(Mode::Ascii), lim.clone(), now);
        assert_eq!(c.read_budget(), 4096, "under the budget: whole blocks");
        a.on_input(&mut [b'x'; 8], now).unwrap();
        b.on_input(&mut [b'y'; 3], now).unwrap();
        assert_eq!(buffered.held(), 11);
        assert_eq!(a.read_budget(), 0);
        assert_eq!(b.read_budget(), 0, "holds unsent bytes: reads nothing more");
        assert_eq!(c.read_budget(), PRESSED_READ, "holds none: small reads");
        a.on_written(8, now);
        assert_eq!(buffered.held(), 3);
        assert_eq!(c.read_budget(), 4096, "drained: whole blocks again");
        drop(b);
        assert_eq!(
            buffered.held(),
            0,
            "a closed connection's unsent bytes leave the budget"
        );
    }

    #[test]
    fn unfinished_is_a_cut() {
        let c = Conn::new("t".into(), proto(Mode::Ascii), limits(8, 0), T0());
        assert_eq!(c.end(), End::Cut);
    }

    proptest! {
        #[test]
        fn any_input_any_splits(
            input in proptest::collection::vec(any::<u8>(), 0..3000),
            reads in proptest::collection::vec(1usize..300, 1..6),
            writes in proptest::collection::vec(0usize..300, 1..6),
            block in 1usize..256,
            ahead in 0usize..600,
            utf8 in any::<bool>(),
        ) {
            let writes = if writes.iter().all(|&w| w == 0) { vec![1] } else { writes };
            let mode = if utf8 { Mode::Utf8 { strict: false } } else { Mode::Ascii };
            let got = run(mode, &input, limits(block, ahead), &reads, &writes);
            prop_assert_eq!(got, transform::apply(mode, &input).unwrap());
        }
    }
}
