//! Sockets as the seeds list them: binding listeners and connecting clients,
//! with the options users tune (SO_REUSEADDR, TCP_NODELAY, buffer sizes,
//! keepalive, backlog).
//!
//! Everything here returns `std` sockets, so that every server model (a
//! blocking loop, `fork()`, a readiness loop, tokio) starts from the same
//! bound listener and only differs in how it waits. Errors name the endpoint
//! and say what to do, because a port in use or a path that is too long is
//! the first thing a user runs into.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, TcpKeepalive, Type};

use crate::addr::{AddrError, Endpoint, HostPort};

/// Socket options shared by servers and clients.
#[derive(Debug, Clone)]
pub struct SockOpts {
    /// SO_REUSEADDR on TCP listeners (the seeds set it; on by default). On
    /// UDP it would let a second server share the port silently, so UDP
    /// never gets it.
    pub reuseaddr: bool,
    /// SO_REUSEPORT on listeners: sharing a port on purpose (`--reuseport`).
    pub reuseport: bool,
    /// TCP_NODELAY on connections (disables Nagle's algorithm).
    pub nodelay: bool,
    /// SO_RCVBUF, bytes (the kernel doubles it and autotunes without it).
    pub rcvbuf: Option<usize>,
    /// SO_SNDBUF, bytes.
    pub sndbuf: Option<usize>,
    /// SO_KEEPALIVE with this idle time before the first probe.
    pub keepalive: Option<Duration>,
    /// TCP_CONGESTION: the congestion control algorithm (reno, cubic, bbr,
    /// ...), else the system's default. Set on TCP listeners (accepted
    /// sockets inherit it) and on client sockets before they connect.
    pub congestion: Option<String>,
    /// listen(2) backlog.
    pub backlog: i32,
    /// Permissions of a Unix socket file (`--unix-mode`), else the umask's.
    pub unix_mode: Option<u32>,
    /// Clients: how long connecting, and each wait for the server to send,
    /// may take (`-w`); reads past it fail with `TimedOut`.
    pub wait: Option<Duration>,
    /// Clients of tls:// addresses: whom to trust (`--ca`, `--insecure`).
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl SockOpts {
    pub fn waiting(self, wait: Option<Duration>) -> SockOpts {
        SockOpts { wait, ..self }
    }
}

impl Default for SockOpts {
    fn default() -> Self {
        SockOpts {
            reuseaddr: true,
            reuseport: false,
            nodelay: false,
            rcvbuf: None,
            sndbuf: None,
            keepalive: None,
            congestion: None,
            backlog: 1024,
            unix_mode: None,
            wait: None,
            tls: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Addr(#[from] AddrError),
    #[error(
        "{0}: address already in use (another server listens there): choose another port, or port 0 for a free one"
    )]
    InUse(Endpoint),
    #[error(
        "{0}: permission denied: ports below 1024 need root or CAP_NET_BIND_SERVICE; use a port of 1024 or more"
    )]
    PrivilegedPort(Endpoint),
    #[error("{0}: cannot assign that address: it is not an address of this machine")]
    NotLocal(Endpoint),
    #[error(
        "{endpoint}: Unix socket path too long ({len} bytes, at most {max} fit): use a shorter path"
    )]
    UnixPathTooLong {
        endpoint: Endpoint,
        len: usize,
        max: usize,
    },
    #[error("{endpoint}: folder '{dir}' does not exist: create it first")]
    UnixDirMissing { endpoint: Endpoint, dir: PathBuf },
    #[error("{0}: a server is already listening on this socket file")]
    UnixInUse(Endpoint),
    #[error(
        "{endpoint}: the socket file exists and cannot be probed ({why}): it may be another server's; not replacing it (remove it yourself if it is stale)"
    )]
    UnixUnprobed { endpoint: Endpoint, why: String },
    #[error("{0}: the path exists and is not a socket: refusing to replace it")]
    NotASocket(Endpoint),
    #[error("{0}: no such socket file: is the server running?")]
    UnixMissing(Endpoint),
    #[error("{endpoint}: connection refused: is a server listening there?")]
    Refused { endpoint: Endpoint },
    #[error(
        "--congestion {name}: {why} (see /proc/sys/net/ipv4/tcp_available_congestion_control and tcp_allowed_congestion_control)"
    )]
    Congestion { name: String, why: &'static str },
    // The io::Error is part of the message, not a `source`: anyhow's
    // "{:#}" would print its text a second time.
    #[error("{endpoint}: {what}: {error}")]
    Io {
        endpoint: Endpoint,
        what: &'static str,
        error: io::Error,
    },
}

impl NetError {
    fn io(endpoint: &Endpoint, what: &'static str, source: io::Error) -> Self {
        NetError::Io {
            endpoint: endpoint.clone(),
            what,
            error: source,
        }
    }
}

/// A bound listener of any kind.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Udp(UdpSocket),
    Unix(UnixListener, UnixPathGuard),
}

impl Listener {
    /// The endpoint actually bound (the real port when 0 was asked).
    pub fn local_endpoint(&self) -> io::Result<Endpoint> {
        Ok(match self {
            Listener::Tcp(l) => Endpoint::Tcp(l.local_addr()?.into()),
            Listener::Udp(u) => Endpoint::Udp(u.local_addr()?.into()),
            Listener::Unix(_, guard) => Endpoint::Unix(guard.path.clone()),
        })
    }
}

/// Binds `endpoint` with `opts`: TCP and Unix listeners are listening, UDP
/// sockets are ready to receive. All sockets are returned in blocking mode.
pub fn bind(endpoint: &Endpoint, opts: &SockOpts) -> Result<Listener, NetError> {
    match endpoint {
        // TLS is spoken by the connection core; the socket is TCP's.
        Endpoint::Tcp(hp) | Endpoint::Tls(hp) => {
            let addr = first_addr(hp)?;
            let sock = new_socket(addr, Type::STREAM, Protocol::TCP, opts, endpoint)?;
            bind_addr(&sock, addr, endpoint)?;
            sock.listen(opts.backlog)
                .map_err(|e| NetError::io(endpoint, "listen", e))?;
            Ok(Listener::Tcp(sock.into()))
        }
        Endpoint::Udp(hp) => {
            let addr = first_addr(hp)?;
            let sock = new_socket(addr, Type::DGRAM, Protocol::UDP, opts, endpoint)?;
            bind_addr(&sock, addr, endpoint)?;
            Ok(Listener::Udp(sock.into()))
        }
        Endpoint::Unix(path) => bind_unix(endpoint, path, opts),
    }
}

fn first_addr(hp: &HostPort) -> Result<SocketAddr, NetError> {
    // A server binds one address per listener: the first the name gives.
    Ok(hp.resolve()?[0])
}

fn new_socket(
    addr: SocketAddr,
    ty: Type,
    proto: Protocol,
    opts: &SockOpts,
    endpoint: &Endpoint,
) -> Result<Socket, NetError> {
    let sock = Socket::new(Domain::for_address(addr), ty, Some(proto))
        .map_err(|e| NetError::io(endpoint, "socket", e))?;
    let set = |r: io::Result<()>, what| r.map_err(|e| NetError::io(endpoint, what, e));
    if addr.is_ipv6() {
        // [::] means IPv6 only, so that 0.0.0.0 can be bound beside it.
        set(sock.set_only_v6(true), "IPV6_V6ONLY")?;
    }
    set(
        sock.set_reuse_address(opts.reuseaddr && ty == Type::STREAM),
        "SO_REUSEADDR",
    )?;
    if opts.reuseport {
        set(sock.set_reuse_port(true), "SO_REUSEPORT")?;
    }
    if ty == Type::STREAM {
        set_congestion(&sock, opts)?;
    }
    if let Some(n) = opts.rcvbuf {
        set(sock.set_recv_buffer_size(n), "SO_RCVBUF")?;
    }
    if let Some(n) = opts.sndbuf {
        set(sock.set_send_buffer_size(n), "SO_SNDBUF")?;
    }
    Ok(sock)
}

/// Sets `--congestion` on a TCP socket, with an error that says what the
/// kernel offers when it refuses.
fn set_congestion(sock: &Socket, opts: &SockOpts) -> Result<(), NetError> {
    let Some(name) = &opts.congestion else {
        return Ok(());
    };
    sock.set_tcp_congestion(name.as_bytes())
        .map_err(|e| NetError::Congestion {
            name: name.clone(),
            why: match e.raw_os_error() {
                Some(libc::ENOENT) => "this kernel has no such congestion control",
                Some(libc::EPERM) => {
                    "only root may choose a congestion control not in the allowed list"
                }
                _ => "the kernel refused it",
            },
        })
}

fn bind_addr(sock: &Socket, addr: SocketAddr, endpoint: &Endpoint) -> Result<(), NetError> {
    sock.bind(&addr.into()).map_err(|e| match e.kind() {
        io::ErrorKind::AddrInUse => NetError::InUse(endpoint.clone()),
        io::ErrorKind::PermissionDenied if addr.port() < 1024 => {
            NetError::PrivilegedPort(endpoint.clone())
        }
        io::ErrorKind::AddrNotAvailable => NetError::NotLocal(endpoint.clone()),
        _ => NetError::io(endpoint, "bind", e),
    })
}

/// A Unix socket's mode without `--unix-mode`: any local user may connect,
/// as to a TCP port on loopback, whatever the umask (it gave 0777 under
/// `umask 000`, 0755 under 022).
pub const UNIX_MODE: u32 = 0o666;

/// Sets the mode of the socket file just bound at `path`, without following
/// a link: in a directory others can write, the name could be swapped for
/// a link to a file of root's between bind and chmod. The file is opened
/// O_PATH|O_NOFOLLOW (a link fails), checked to be a socket, and changed
/// through its descriptor.
fn set_socket_mode(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::other("a NUL in the path"))?;
    // SAFETY: open(2) with a valid NUL-terminated path; the descriptor is
    // owned at once below.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just opened, owned by nothing else.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let meta = std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    if !meta.file_type().is_socket() {
        return Err(io::Error::other(
            "the path is no longer the socket we bound",
        ));
    }
    use std::os::unix::fs::PermissionsExt;
    // chmod through /proc/self/fd acts on the file the O_PATH descriptor
    // holds (how glibc does fchmodat with AT_SYMLINK_NOFOLLOW).
    std::fs::set_permissions(
        format!("/proc/self/fd/{}", fd.as_raw_fd()),
        std::fs::Permissions::from_mode(mode),
    )
}

/// Longest path that fits in `sockaddr_un.sun_path` with its NUL.
const UNIX_PATH_MAX: usize = 107;

fn bind_unix(endpoint: &Endpoint, path: &Path, opts: &SockOpts) -> Result<Listener, NetError> {
    let len = path.as_os_str().len();
    if len > UNIX_PATH_MAX {
        return Err(NetError::UnixPathTooLong {
            endpoint: endpoint.clone(),
            len,
            max: UNIX_PATH_MAX,
        });
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.is_dir()
    {
        return Err(NetError::UnixDirMissing {
            endpoint: endpoint.clone(),
            dir: dir.to_path_buf(),
        });
    }
    // A socket file left by a server that died is replaced: the one proof
    // is a refused connect (nothing listens behind it). A live listener, a
    // file that is not a socket, or one we may not even probe (permission
    // denied: perhaps another user's server) is left alone.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(NetError::NotASocket(endpoint.clone()));
        }
        match UnixStream::connect(path) {
            Ok(_) => return Err(NetError::UnixInUse(endpoint.clone())),
            Err(e) if e.kind() != io::ErrorKind::ConnectionRefused => {
                return Err(NetError::UnixUnprobed {
                    endpoint: endpoint.clone(),
                    why: e.to_string(),
                });
            }
            Err(_) => {
                std::fs::remove_file(path)
                    .map_err(|e| NetError::io(endpoint, "removing stale socket", e))?;
                tracing::info!("removed stale socket file {}", path.display());
            }
        }
    }
    let sock = Socket::new(Domain::UNIX, Type::STREAM, None)
        .map_err(|e| NetError::io(endpoint, "socket", e))?;
    if let Some(n) = opts.rcvbuf {
        sock.set_recv_buffer_size(n)
            .map_err(|e| NetError::io(endpoint, "SO_RCVBUF", e))?;
    }
    if let Some(n) = opts.sndbuf {
        sock.set_send_buffer_size(n)
            .map_err(|e| NetError::io(endpoint, "SO_SNDBUF", e))?;
    }
    let addr = SockAddr::unix(path).map_err(|e| NetError::io(endpoint, "socket path", e))?;
    sock.bind(&addr).map_err(|e| match e.kind() {
        io::ErrorKind::AddrInUse => NetError::UnixInUse(endpoint.clone()),
        _ => NetError::io(endpoint, "bind", e),
    })?;
    let guard = UnixPathGuard::new(path.to_path_buf());
    set_socket_mode(path, opts.unix_mode.unwrap_or(UNIX_MODE))
        .map_err(|e| NetError::io(endpoint, "setting --unix-mode", e))?;
    // Only now can anyone connect: the mode is set before it is listening.
    sock.listen(opts.backlog)
        .map_err(|e| NetError::io(endpoint, "listen", e))?;
    Ok(Listener::Unix(sock.into(), guard))
}

/// Removes a Unix socket file when the listener goes away, but only if the
/// file is still the one we bound (another server may have replaced it).
#[derive(Debug)]
pub struct UnixPathGuard {
    path: PathBuf,
    ino: Option<(u64, u64)>,
}

impl UnixPathGuard {
    fn new(path: PathBuf) -> Self {
        let ino = std::fs::metadata(&path).ok().map(|m| (m.dev(), m.ino()));
        UnixPathGuard { path, ino }
    }

    /// A guard for a socket file this process did not bind but now answers
    /// for (a restart's inherited listener): removed at the end like ours.
    pub fn owned(path: PathBuf) -> Self {
        Self::new(path)
    }

    /// A guard that never removes the file (systemd's socket files).
    pub fn unowned(path: PathBuf) -> Self {
        UnixPathGuard { path, ino: None }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Never removes the file (another process answers for it now).
    pub fn disarm(&mut self) {
        self.ino = None;
    }

    /// Moves the duty to remove the file into the returned guard; this one
    /// keeps the path (for the `listening` line) and removes nothing.
    pub fn take(&mut self) -> UnixPathGuard {
        UnixPathGuard {
            path: self.path.clone(),
            ino: self.ino.take(),
        }
    }
}

impl Drop for UnixPathGuard {
    fn drop(&mut self) {
        let now = std::fs::metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if self.ino.is_some() && now == self.ino {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Sets the per-connection options on an accepted or connected TCP socket.
pub fn tune_tcp(sock: SockRef<'_>, opts: &SockOpts) -> io::Result<()> {
    if opts.nodelay {
        sock.set_tcp_nodelay(true)?;
    }
    if let Some(idle) = opts.keepalive {
        sock.set_tcp_keepalive(&TcpKeepalive::new().with_time(idle))?;
    }
    Ok(())
}

/// The address a connection was accepted on, as an endpoint
/// (`tcp://127.0.0.1:1060`, `unix:/path`): which listener it came through.
pub fn local_name(fd: std::os::fd::BorrowedFd<'_>) -> String {
    match SockRef::from(&fd).local_addr() {
        Ok(a) => match (a.as_socket(), a.as_pathname()) {
            (Some(ip), _) => format!("tcp://{}", HostPort::from(ip)),
            (None, Some(path)) => format!("unix:{}", path.display()),
            _ => "unix:(unnamed)".into(),
        },
        Err(_) => "unknown".into(),
    }
}

/// Makes the coming close(2) send a reset (RST) instead of a FIN, for a
/// connection whose input was refused. Unix sockets have no such thing;
/// their peer sees ECONNRESET only if unread input is left.
pub fn reset_on_close(fd: std::os::fd::BorrowedFd<'_>) {
    if let Err(e) = SockRef::from(&fd).set_linger(Some(Duration::ZERO)) {
        tracing::debug!("SO_LINGER: {e}");
    }
}

/// A connected stream of either kind, in blocking mode.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// Connects a TCP or Unix client with `opts`, trying each resolved address
/// in turn. UDP endpoints are handled by [`connect_udp`].
pub fn connect(endpoint: &Endpoint, opts: &SockOpts) -> Result<Stream, NetError> {
    match endpoint {
        Endpoint::Tls(hp) => {
            let tcp = connect(&Endpoint::Tcp(hp.clone()), opts).map_err(|e| match e {
                // Named as the user wrote it.
                NetError::Refused { .. } => NetError::Refused {
                    endpoint: endpoint.clone(),
                },
                e => e,
            })?;
            let Stream::Tcp(tcp) = tcp else {
                unreachable!("a TCP endpoint connects a TCP stream");
            };
            let config = opts.tls.clone().ok_or_else(|| {
                NetError::io(
                    endpoint,
                    "TLS",
                    io::Error::new(io::ErrorKind::InvalidInput, "no TLS client settings"),
                )
            })?;
            crate::tls::client(tcp, config, hp)
                .map(Stream::Unix)
                .map_err(|e| NetError::io(endpoint, "TLS", e))
        }
        Endpoint::Tcp(hp) => {
            let mut last = None;
            for addr in hp.resolve()? {
                match connect_tcp_addr(addr, opts) {
                    Ok(s) => return Ok(Stream::Tcp(s)),
                    // A refused --congestion is refused for every address.
                    Err(Attempt::Setup(e)) => return Err(e),
                    Err(Attempt::Connect(e)) => last = Some(e),
                }
            }
            let e = last.unwrap_or_else(|| io::Error::other("no address"));
            Err(match e.kind() {
                io::ErrorKind::ConnectionRefused => NetError::Refused {
                    endpoint: endpoint.clone(),
                },
                _ => NetError::io(endpoint, "connect", e),
            })
        }
        Endpoint::Unix(path) => {
            let sock = Socket::new(Domain::UNIX, Type::STREAM, None)
                .map_err(|e| NetError::io(endpoint, "socket", e))?;
            if let Some(n) = opts.rcvbuf {
                let _ = sock.set_recv_buffer_size(n);
            }
            if let Some(n) = opts.sndbuf {
                let _ = sock.set_send_buffer_size(n);
            }
            let addr =
                SockAddr::unix(path).map_err(|e| NetError::io(endpoint, "socket path", e))?;
            sock.connect(&addr).map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => NetError::UnixMissing(endpoint.clone()),
                io::ErrorKind::ConnectionRefused => NetError::Refused {
                    endpoint: endpoint.clone(),
                },
                _ => NetError::io(endpoint, "connect", e),
            })?;
            sock.set_read_timeout(opts.wait)
                .map_err(|e| NetError::io(endpoint, "SO_RCVTIMEO", e))?;
            Ok(Stream::Unix(sock.into()))
        }
        Endpoint::Udp(_) => Err(NetError::io(
            endpoint,
            "connect",
            io::Error::new(io::ErrorKind::InvalidInput, "UDP is not a stream"),
        )),
    }
}

/// Why one address of a name failed.
enum Attempt {
    /// An option the kernel refused: no other address will do better.
    Setup(NetError),
    Connect(io::Error),
}

impl From<io::Error> for Attempt {
    fn from(e: io::Error) -> Self {
        Attempt::Connect(e)
    }
}

fn connect_tcp_addr(addr: SocketAddr, opts: &SockOpts) -> Result<TcpStream, Attempt> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    set_congestion(&sock, opts).map_err(Attempt::Setup)?;
    // Buffer sizes must be set before connect to shape the window.
    if let Some(n) = opts.rcvbuf {
        sock.set_recv_buffer_size(n)?;
    }
    if let Some(n) = opts.sndbuf {
        sock.set_send_buffer_size(n)?;
    }
    match opts.wait {
        Some(t) => sock.connect_timeout(&addr.into(), t)?,
        None => sock.connect(&addr.into())?,
    }
    tune_tcp(SockRef::from(&sock), opts)?;
    sock.set_read_timeout(opts.wait)?;
    Ok(sock.into())
}

/// A UDP socket connected to the server (the seeds' `cli.connect()`), so
/// that `send`/`recv` talk to it alone and ICMP errors are reported.
pub fn connect_udp(endpoint: &Endpoint, opts: &SockOpts) -> Result<UdpSocket, NetError> {
    let Endpoint::Udp(hp) = endpoint else {
        return Err(NetError::io(
            endpoint,
            "connect",
            io::Error::new(io::ErrorKind::InvalidInput, "not a UDP endpoint"),
        ));
    };
    let addr = first_addr(hp)?;
    let local: SocketAddr = if addr.is_ipv6() {
        "[::]:0".parse().expect("literal")
    } else {
        "0.0.0.0:0".parse().expect("literal")
    };
    let sock = new_socket(local, Type::DGRAM, Protocol::UDP, opts, endpoint)?;
    sock.connect(&addr.into())
        .map_err(|e| NetError::io(endpoint, "connect", e))?;
    Ok(sock.into())
}

/// Bytes queued in this socket's kernel buffers: (send queue not yet
/// acknowledged by the peer, receive queue not yet read). SIOCOUTQ and
/// SIOCINQ; what the naive client reports when it stalls.
pub fn queue_sizes(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<(usize, usize)> {
    use std::os::fd::AsRawFd;
    let mut outq: libc::c_int = 0;
    let mut inq: libc::c_int = 0;
    // SAFETY: both ioctls write one c_int through a valid pointer to a live fd.
    unsafe {
        if libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut outq) < 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut inq) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((outq as usize, inq as usize))
}

impl Stream {
    /// Half-close: tell the peer we will send nothing more (SHUT_WR).
    pub fn shutdown_write(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Write),
        }
    }

    /// A second handle to the same socket, for a second thread.
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }
}

impl std::os::fd::AsFd for Stream {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

impl io::Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl io::Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Listener {
    /// Accepts one TCP or Unix connection, with a name for the logs. The
    /// accepted socket is blocking whatever the listener is (Linux does not
    /// inherit O_NONBLOCK through accept).
    pub fn accept(&self) -> io::Result<(Stream, String)> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept()?;
                Ok((Stream::Tcp(s), format!("tcp://{}", HostPort::from(peer))))
            }
            Listener::Unix(l, _) => {
                let (s, _) = l.accept()?;
                let name = unix_peer_name(s.as_raw_fd());
                Ok((Stream::Unix(s), name))
            }
            Listener::Udp(_) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "accept on a UDP socket",
            )),
        }
    }

    pub fn is_stream(&self) -> bool {
        !matches!(self, Listener::Udp(_))
    }

    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(on),
            Listener::Udp(u) => u.set_nonblocking(on),
            Listener::Unix(l, _) => l.set_nonblocking(on),
        }
    }
}

/// Unix clients are usually unnamed: name them by their descriptor.
pub fn unix_peer_name(fd: std::os::fd::RawFd) -> String {
    format!("unix client (fd {fd})")
}

impl std::os::fd::AsFd for Listener {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Udp(u) => u.as_fd(),
            Listener::Unix(l, _) => l.as_fd(),
        }
    }
}

impl Stream {
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_nonblocking(on),
            Stream::Unix(s) => s.set_nonblocking(on),
        }
    }

    /// Read and write timeouts (None: block for ever).
    pub fn set_io_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }

    /// Applies the per-connection options (TCP only).
    pub fn tune(&self, opts: &SockOpts) {
        if let Stream::Tcp(s) = self
            && let Err(e) = tune_tcp(SockRef::from(s), opts)
        {
            tracing::warn!("setting socket options: {e}");
        }
    }
}

/// A non-blocking stream registered with mio: what event loops (the `epoll`
/// model, the load generator) hold.
pub enum MioStream {
    Tcp(mio::net::TcpStream),
    Unix(mio::net::UnixStream),
}

impl io::Read for MioStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            MioStream::Tcp(s) => s.read(buf),
            MioStream::Unix(s) => s.read(buf),
        }
    }
}

impl io::Write for MioStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            MioStream::Tcp(s) => s.write(buf),
            MioStream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl std::os::fd::AsFd for MioStream {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            MioStream::Tcp(s) => s.as_fd(),
            MioStream::Unix(s) => s.as_fd(),
        }
    }
}

impl MioStream {
    pub fn shutdown_write(&self) -> io::Result<()> {
        match self {
            MioStream::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
            MioStream::Unix(s) => s.shutdown(std::net::Shutdown::Write),
        }
    }

    /// Registers for both readiness kinds once (edge-triggered), so no
    /// re-registration is ever needed.
    pub fn register(&mut self, r: &mio::Registry, t: mio::Token) -> io::Result<()> {
        let i = mio::Interest::READABLE | mio::Interest::WRITABLE;
        match self {
            MioStream::Tcp(s) => r.register(s, t, i),
            MioStream::Unix(s) => r.register(s, t, i),
        }
    }
}

/// Starts a non-blocking connect for an event loop: TCP returns at once
/// (the connection completes later; until then reads and writes say
/// EAGAIN, and a refusal shows up as the first read or write error), so a
/// server that never accepts cannot stall the caller. Unix connects, which
/// complete or fail at once, are made directly.
///
/// `source` binds the local address first (port chosen by the kernel).
pub fn connect_nonblocking(
    endpoint: &Endpoint,
    opts: &SockOpts,
    source: Option<std::net::IpAddr>,
) -> Result<MioStream, NetError> {
    match endpoint {
        Endpoint::Tcp(hp) => {
            let addr = first_addr(hp)?;
            let io_err = |what, e| NetError::io(endpoint, what, e);
            let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
                .map_err(|e| io_err("socket", e))?;
            sock.set_nonblocking(true)
                .map_err(|e| io_err("O_NONBLOCK", e))?;
            set_congestion(&sock, opts)?;
            if let Some(n) = opts.rcvbuf {
                sock.set_recv_buffer_size(n)
                    .map_err(|e| io_err("SO_RCVBUF", e))?;
            }
            if let Some(n) = opts.sndbuf {
                sock.set_send_buffer_size(n)
                    .map_err(|e| io_err("SO_SNDBUF", e))?;
            }
            if let Some(ip) = source {
                sock.bind(&SocketAddr::new(ip, 0).into())
                    .map_err(|e| io_err("bind source address", e))?;
            }
            match sock.connect(&addr.into()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                Err(e) => return Err(io_err("connect", e)),
            }
            tune_tcp(SockRef::from(&sock), opts).map_err(|e| io_err("socket options", e))?;
            Ok(MioStream::Tcp(mio::net::TcpStream::from_std(sock.into())))
        }
        _ => {
            let s = connect(endpoint, opts)?;
            s.set_nonblocking(true)
                .map_err(|e| NetError::io(endpoint, "O_NONBLOCK", e))?;
            Ok(match s {
                Stream::Tcp(t) => MioStream::Tcp(mio::net::TcpStream::from_std(t)),
                Stream::Unix(u) => MioStream::Unix(mio::net::UnixStream::from_std(u)),
            })
        }
    }
}
