//! Command-line flags, and their validation into plain configs.
//!
//! As in ripgrep, clap parses the raw flags here, each command turns them
//! into a validated config (`server::Config`, `client::SendConfig`), and the
//! work is done from that config alone. `--help` is generated from these
//! same definitions, so it cannot drift from what is accepted.

use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::addr::Endpoint;
use crate::bench::compare::CompareConfig;
use crate::bench::{BenchConfig, Engine, Workload};
use crate::client::{SendConfig, UdpRetry};
use crate::conn::Protocol;
use crate::framing::Framing;
use crate::net::SockOpts;
use crate::server::udp::UdpPolicy;
use crate::server::{self, Model};
use crate::transform::Mode;
use crate::units;

const ABOUT: &str = "The textbook uppercase service, built as real software.";

const LONG_ABOUT: &str = "\
The textbook uppercase service, built as real software.

A server reads a client's bytes in bounded blocks, uppercases them (a-z to \
A-Z, every other byte unchanged) and sends them back, over TCP, UDP and Unix \
sockets. The client streams any amount of data without deadlocking, and can \
reproduce the textbook's deadlock on request and diagnose it.

ADDRESSES (the same syntax for every command):
  HOST:PORT, tcp://HOST:PORT   TCP (IPv6 in brackets: [::1]:1060)
  udp://HOST:PORT              UDP
  unix:PATH                    Unix-domain stream socket
  Port 0 asks for any free port; serve prints the one it got.

EXIT CODES:
  0  success (everything sent came back, verified)
  1  error (cannot bind or connect, reset, I/O error)
  2  invalid arguments
  3  stalled: send --naive's deadlock, or a server that stopped, diagnosed
  4  the reply was wrong or incomplete, or UDP datagrams were lost
     (bench: a wrong reply or a connection that got none;
     bench --compare: 1 when a server it starts would not start)

SERVER MODELS (serve --model): iterative, fork, threads, pool, select,
epoll, async, uring: the seeds' designs and two beyond them, one connection
contract. The default is uring where io_uring is allowed, else epoll.";

const EXAMPLES: &str = "\
EXAMPLES:
  upcase serve                              # tcp and udp on 127.0.0.1:1060
  echo hello | upcase send 127.0.0.1:1060   # prints HELLO
  upcase send 127.0.0.1:1060 --bytes 1G     # stream a gigabyte, verified
  upcase send 127.0.0.1:1060 --bytes 256M --naive   # the deadlock, diagnosed
  upcase serve --model threads --utf8       # a thread per client, Unicode uppercase
  upcase bench --compare                    # every model side by side";

#[derive(Debug, Parser)]
#[command(name = "upcase", version, about = ABOUT, long_about = LONG_ABOUT, after_help = EXAMPLES)]
pub struct Cli {
    /// More logging on stderr (-v: per-connection progress, -vv: trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Less logging on stderr: warnings and errors only.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Serve(ServeArgs),
    Send(SendArgs),
    Chat(ChatArgs),
    Bench(BenchArgs),
    /// Print the man page (roff) on stdout: upcase man > upcase.1
    Man,
    /// Print shell completions on stdout: upcase completions bash > /etc/bash_completion.d/upcase
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Run the uppercase server.
#[derive(Debug, Args)]
#[command(
    long_about = "Run the uppercase server.\n\n\
Once every listener is bound, the --metrics port too, and the --pid-file \
written, prints one line per listener to stdout: \
`listening tcp://127.0.0.1:40123` (the real port when 0 was asked; \
`listening unix:/path` for Unix sockets). Logs go to stderr. \
SIGINT or SIGTERM drains: new connects are refused at once (the listeners \
are shut, Unix socket files removed), streams in progress finish (up to \
--drain-timeout, then what is left is cut and logged) and the exit is 0; \
a second signal stops at once.",
    after_help = "EXAMPLES:\n  \
upcase serve                                   # tcp://127.0.0.1:1060 and udp://127.0.0.1:1060\n  \
upcase serve tcp://127.0.0.1:0 udp://[::1]:0   # any free ports, printed on stdout\n  \
upcase serve unix:/tmp/upcase.sock --max-conns 100"
)]
pub struct ServeArgs {
    /// Addresses to listen on [default: tcp://127.0.0.1:1060 udp://127.0.0.1:1060].
    #[arg(value_name = "ADDR")]
    pub listeners: Vec<Endpoint>,
    /// How the server waits for many clients at once [default: uring where
    /// io_uring is allowed, else epoll].
    #[arg(long, value_enum)]
    pub model: Option<Model>,
    /// Largest block read from a connection at once (the seeds use 1K). Each
    /// connection's buffer starts at 4K and grows to this while reads fill it.
    #[arg(long, allow_negative_numbers = true, value_name = "SIZE", default_value = "256K", value_parser = units::parse_buffer_size)]
    pub block: usize,
    /// Connections served at once; more wait in the listen backlog
    /// [default: the open-file limit less 64].
    #[arg(long, allow_negative_numbers = true, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_conns: Option<u32>,
    /// After SIGTERM/SIGINT, how long streams in progress may finish.
    #[arg(long, allow_negative_numbers = true, value_name = "DURATION", default_value = "10s", value_parser = units::parse_duration)]
    pub drain_timeout: Duration,
    /// Close a connection that sends nothing and accepts nothing for this
    /// long (0: never).
    #[arg(long, allow_negative_numbers = true, value_name = "DURATION", default_value = "5m", value_parser = units::parse_duration)]
    pub idle_timeout: Duration,
    /// tls:// listeners: close a connection whose TLS handshake is not
    /// complete this long after the accept.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = units::parse_positive_duration)]
    pub handshake_timeout: Duration,
    /// tls:// listeners: the certificate chain to present (PEM).
    #[arg(long, value_name = "FILE", requires = "key")]
    pub cert: Option<std::path::PathBuf>,
    /// tls:// listeners: the certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<std::path::PathBuf>,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics (prints
    /// `listening http://HOST:PORT/metrics` after the other listeners; with
    /// --processes, the supervisor answers for every worker, each sample
    /// labelled worker="N").
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics: Option<crate::addr::HostPort>,
    /// Uppercase UTF-8 text fully, as Python's str.upper() (ß to SS, é to É),
    /// also across block boundaries; invalid bytes pass through, or with
    /// --utf8=strict reset the connection with a logged error.
    #[arg(long, value_enum, value_name = "STRICTNESS", num_args = 0..=1, require_equals = true, default_missing_value = "lenient")]
    pub utf8: Option<Utf8Arg>,
    /// Unsent output and grown read buffers of all connections together
    /// (all processes of the fork model too), at most: past it, a
    /// connection that holds unsent bytes reads nothing more and the others
    /// read 2K at a time, so memory stays bounded however many clients
    /// never read.
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = units::parse_buffer_size)]
    pub max_buffered: usize,
    /// UDP replies per source address and second, and reply bytes:
    /// DATAGRAMS[,BYTES] (0: no limit). Past it datagrams are dropped,
    /// counted and logged; a forged source cannot turn the server into a
    /// flood toward its victim. Loopback sources are spared unless this is
    /// given [default: 1000,1M].
    #[arg(long, value_name = "N[,BYTES]", value_parser = parse_udp_limit)]
    pub udp_limit: Option<(u32, u64)>,
    /// Answer UDP datagrams only from these networks (CIDR, repeatable:
    /// --udp-allow 10.0.0.0/8 --udp-allow ::1/128) [default: any].
    #[arg(long, value_name = "CIDR")]
    pub udp_allow: Vec<ipnet::IpNet>,
    /// UDP: after a datagram, keep asking for the next one for this long
    /// before sleeping (e.g. 50us). A lone client then no longer waits for
    /// the server to be woken on every round trip, at the price of CPU
    /// spent polling (at most a core, only while datagrams keep coming)
    /// [default: 0, off]. Models epoll, uring, threads, pool, iterative.
    #[arg(long, allow_negative_numbers = true, value_name = "DURATION", default_value = "0s", value_parser = parse_busy_poll)]
    pub busy_poll: Duration,
    /// How messages are found on a stream: stream (the request ends with
    /// the client's half-close), fixed:N (N-byte messages), line[:MAX]
    /// (up to \n, at most MAX bytes before it; default 64K), length[:MAX]
    /// (a 4-byte big-endian length, then the payload; default 8M) or
    /// netstring[:MAX] (L:payload,). Each message is answered in the same
    /// framing; malformed or oversized input closes that connection, with
    /// one log line naming the offset. UDP datagrams are messages already:
    /// this applies to TCP and Unix listeners.
    #[arg(long, value_name = "MODE", default_value = "stream")]
    pub framing: Framing,
    /// Threads of the pool model, event loops of epoll and uring, runtime
    /// threads of async [default: pool 16, epoll and uring half the cores,
    /// async one per core].
    #[arg(long, allow_negative_numbers = true, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub workers: Option<u32>,
    /// Every TCP, TLS and Unix connection starts with a PROXY protocol
    /// header of this version (HAProxy's send-proxy / send-proxy-v2): the
    /// client's address it names is the one logged. A missing, malformed
    /// or late header closes that connection, logged. Without this flag a
    /// PROXY header is data like any other (it is uppercased and echoed).
    #[arg(long, value_enum, value_name = "VERSION")]
    pub proxy_protocol: Option<crate::proxy::Version>,
    /// How long a connection may take to send its whole PROXY header.
    #[arg(long, value_name = "DURATION", default_value = "3s", value_parser = units::parse_positive_duration, requires = "proxy_protocol")]
    pub proxy_timeout: Duration,
    /// Run a supervisor and N worker processes sharing the listeners: a
    /// worker that dies is started again, SIGTERM drains them all, SIGUSR2
    /// restarts without refusing anyone (--max-conns is per worker).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub processes: Option<u32>,
    /// With --processes: how long a restarted server (SIGUSR2) may take to
    /// report its workers ready; past it, it is stopped and logged, and the
    /// running one serves on.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = units::parse_positive_duration)]
    pub restart_timeout: Duration,
    /// Write the server's pid (the supervisor's, with --processes) to PATH;
    /// removed at exit. After a restart (SIGUSR2) it still names the process
    /// you started, which stays in the foreground and relays signals.
    #[arg(long, value_name = "PATH")]
    pub pid_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub listen: ListenOpts,
    #[command(flatten)]
    pub sock: SockArgs,
}

/// Options of listening sockets.
#[derive(Debug, Args)]
pub struct ListenOpts {
    /// Set SO_REUSEADDR on listeners (the default, as the seeds do).
    #[arg(long, overrides_with = "no_reuseaddr")]
    pub reuseaddr: bool,
    /// Do not set SO_REUSEADDR.
    #[arg(long)]
    pub no_reuseaddr: bool,
    /// Set SO_REUSEPORT on TCP and UDP listeners: several servers share the
    /// port on purpose, and the kernel spreads clients among them. Without
    /// it a port another process holds is refused, for UDP as for TCP.
    #[arg(long)]
    pub reuseport: bool,
    /// listen(2) backlog: connections the kernel queues before accept.
    #[arg(long, allow_negative_numbers = true, value_name = "N", default_value_t = 1024, value_parser = clap::value_parser!(i32).range(1..))]
    pub backlog: i32,
    /// Permissions of Unix socket files, in octal (600: only this user may
    /// connect), set before the socket listens, whatever the umask
    /// [default: 666].
    #[arg(long, value_name = "OCTAL", value_parser = parse_unix_mode)]
    pub unix_mode: Option<u32>,
}

/// At most a second: longer is a core burnt for nothing.
fn parse_busy_poll(s: &str) -> Result<Duration, String> {
    let d = units::parse_duration(s)?;
    if d > Duration::from_secs(1) {
        return Err(format!(
            "{s} is too long to busy-poll: at most 1s (a few tens of microseconds is typical)"
        ));
    }
    Ok(d)
}

fn parse_udp_limit(s: &str) -> Result<(u32, u64), String> {
    let (n, bytes) = match s.split_once(',') {
        Some((n, b)) => (n, Some(b)),
        None => (s, None),
    };
    let n: u32 = n.trim().parse().map_err(|_| {
        format!("invalid --udp-limit '{s}': DATAGRAMS[,BYTES] per second, e.g. 1000,1M (0: none)")
    })?;
    let bytes = match bytes {
        Some(b) => units::parse_size(b)?,
        None => 0,
    };
    Ok((n, bytes))
}

fn parse_unix_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("invalid mode '{s}': octal permissions, 000 to 777 (e.g. 600, 660)"))
}

/// Options of every connection.
#[derive(Debug, Args)]
pub struct SockArgs {
    /// Set TCP_NODELAY (disable Nagle's algorithm).
    #[arg(long)]
    pub nodelay: bool,
    /// SO_RCVBUF in bytes (the kernel doubles it; without it, it autotunes).
    #[arg(long, allow_negative_numbers = true, value_name = "SIZE", value_parser = units::parse_buffer_size)]
    pub rcvbuf: Option<usize>,
    /// SO_SNDBUF in bytes.
    #[arg(long, allow_negative_numbers = true, value_name = "SIZE", value_parser = units::parse_buffer_size)]
    pub sndbuf: Option<usize>,
    /// Enable TCP keepalive, probing after this much idle time (e.g. 60s).
    #[arg(long, allow_negative_numbers = true, value_name = "DURATION", value_parser = units::parse_positive_duration)]
    pub keepalive: Option<Duration>,
    /// TCP congestion control for these sockets (TCP_CONGESTION: reno,
    /// cubic, bbr, ...) instead of the system's default, as iperf3 -C.
    #[arg(long, value_name = "ALGO")]
    pub congestion: Option<String>,
}

/// Send stdin (or a generated stream) to a server and print the reply.
#[derive(Debug, Args)]
#[command(
    long_about = "Send stdin (or a generated stream) to a server and print the reply.\n\n\
Like nc, but correct: sending and receiving run at once, the end of stdin \
becomes a half-close (shutdown(Write)), and it exits when the server closes.\n\n\
With --bytes N it sends N bytes of the seeds' repeated 16-byte \
`capitalize this!`, verifies every byte of the reply, writes no data to \
stdout and prints a summary (bytes sent, received, wrong, seconds, MB/s with \
MB = 10^6 bytes); progress bars go to stderr on a terminal.\n\n\
With --naive it behaves like the seeds' client on purpose: write everything \
in 16-byte writes, half-close, then read. When neither direction moves for \
--stall, it prints a diagnosis (bytes sent and received, this socket's kernel \
send and receive queues, and why) and exits with code 3.\n\n\
Over UDP each stdin line is one datagram (or, with --bytes N --size B, \
ceil(N/B) numbered datagrams); each request waits --rto, then is resent \
with the wait doubled, up to --retries times (at most -w in all), before it \
counts as lost; after --give-up-after lost in a row, send stops with the report.\n\n\
nc's habits work: `send HOST PORT`, socat's TCP:HOST:PORT, UDP:HOST:PORT and \
UNIX-CONNECT:PATH, and -w DURATION to bound connecting and each wait for the server.",
    after_help = "EXAMPLES:\n  \
echo hello | upcase send 127.0.0.1:1060          # HELLO\n  \
upcase send 127.0.0.1:1060 --bytes 1G            # stream 1 GiB, verified\n  \
upcase send 127.0.0.1:1060 --bytes 256M --naive  # reproduce the deadlock (exit 3)\n  \
printf 'one\\ntwo\\n' | upcase send udp://127.0.0.1:1060\n  \
upcase send udp://127.0.0.1:1060 --bytes 1M --size 1K --json"
)]
pub struct SendArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Send N bytes of the seeds' pattern and verify the reply (suffixes K, M, G: binary).
    #[arg(long, allow_negative_numbers = true, value_name = "N", value_parser = units::parse_nonzero_size)]
    pub bytes: Option<u64>,
    /// The seeds' deadlocking client: write everything, then read.
    #[arg(long, requires = "bytes", conflicts_with = "utf8")]
    pub naive: bool,
    /// The server runs --utf8: send UTF-8 text with --bytes (rounded up to
    /// whole messages) and verify replies by the Unicode mapping.
    #[arg(long, value_enum, value_name = "STRICTNESS", num_args = 0..=1, require_equals = true, default_missing_value = "lenient")]
    pub utf8: Option<Utf8Arg>,
    /// The server's --framing: stdin is sent as messages (lines; N-byte
    /// chunks; with length and netstring one message per line of stdin,
    /// each reply printed as a line). With --bytes, --size sets the
    /// message size and every reply message is verified.
    #[arg(long, value_name = "MODE", default_value = "stream")]
    pub framing: Framing,
    /// With --bytes: give up and diagnose when neither direction moves for
    /// this long [default: 2 with --naive, else 10].
    #[arg(long, allow_negative_numbers = true, value_name = "DURATION", value_parser = units::parse_positive_duration)]
    pub stall: Option<Duration>,
    /// UDP with --bytes: bytes per datagram (at most 65507).
    #[arg(long, allow_negative_numbers = true, value_name = "SIZE", default_value = "1K", value_parser = parse_datagram_size)]
    pub size: usize,
    #[command(flatten)]
    pub udp: UdpArgs,
    /// Print the summary as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress bars, even on a terminal.
    #[arg(long)]
    pub no_progress: bool,
    #[command(flatten)]
    pub sock: SockArgs,
}

/// Which server a client talks to, and how long and whom it trusts:
/// `send` and `chat` alike.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Server address.
    #[arg(value_name = "ADDR")]
    pub endpoint: String,
    /// nc's form: `HOST PORT` is `HOST:PORT`.
    #[arg(value_name = "PORT")]
    pub port: Option<String>,
    #[command(flatten)]
    pub wait: WaitArgs,
    #[command(flatten)]
    pub tls: TlsClientArgs,
}

impl ServerArgs {
    /// The endpoint, and the socket options with `-w` and the TLS trust.
    fn resolve(&self, sock: SockArgs) -> Result<(Endpoint, SockOpts), String> {
        let endpoint = crate::addr::join_host_port(&self.endpoint, self.port.as_deref())
            .map_err(|e| e.to_string())?;
        let mut opts = sock.into_opts().waiting(self.wait.timeout);
        opts.tls = self.tls.config(&endpoint)?;
        Ok((endpoint, opts))
    }
}

/// Whom a tls:// client trusts.
#[derive(Debug, Args)]
pub struct TlsClientArgs {
    /// tls://: trust the certificates in FILE (PEM: the server's own, or
    /// the authority that signed it).
    #[arg(long, value_name = "FILE")]
    pub ca: Option<std::path::PathBuf>,
    /// tls://: trust any server certificate (tests; the traffic is still
    /// encrypted, to whoever answers).
    #[arg(long, conflicts_with = "ca")]
    pub insecure: bool,
}

impl TlsClientArgs {
    fn config(
        &self,
        endpoint: &Endpoint,
    ) -> Result<Option<std::sync::Arc<rustls::ClientConfig>>, String> {
        match (endpoint.is_tls(), &self.ca, self.insecure) {
            (true, ca, insecure) => crate::tls::client_config(ca.as_deref(), insecure).map(Some),
            (false, None, false) => Ok(None),
            (false, _, _) => Err(format!(
                "--ca and --insecure are for tls:// addresses, not {endpoint}"
            )),
        }
    }
}

/// How long a client waits for the server (nc's -w).
#[derive(Debug, Args)]
pub struct WaitArgs {
    /// Give up when the server does not answer for this long: connecting,
    /// then each silence while waiting for it (TCP; with --bytes, the
    /// --stall limit too); over UDP, the most one datagram waits, resends
    /// included [default: no limit; UDP: what --rto and --retries give].
    #[arg(short = 'w', long, allow_negative_numbers = true, value_name = "DURATION", value_parser = units::parse_positive_duration)]
    pub timeout: Option<Duration>,
}

/// UDP retry options.
#[derive(Debug, Args)]
pub struct UdpArgs {
    /// UDP: wait this long for a reply before the first resend (each
    /// resend waits twice as long as the one before).
    #[arg(long, allow_negative_numbers = true, value_name = "DURATION", default_value = "100ms", value_parser = units::parse_positive_duration)]
    pub rto: Duration,
    /// UDP: resends (each waiting twice as long) before a request counts as lost.
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "N",
        default_value_t = 5,
        value_parser = clap::value_parser!(u32).range(0..=30)
    )]
    pub retries: u32,
    /// UDP: stop after this many datagrams in a row got no reply, with the
    /// loss report (0: never).
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "N",
        default_value_t = 3
    )]
    pub give_up_after: u32,
    /// UDP: stop sending after this long in all, with the report (what was
    /// not sent makes the run incomplete, exit 4).
    #[arg(long, allow_negative_numbers = true, value_name = "DURATION", value_parser = units::parse_positive_duration)]
    pub deadline: Option<Duration>,
}

/// The seeds' interactive client: `Input: ` prompts, `Output: ` replies.
#[derive(Debug, Args)]
#[command(
    long_about = "The seeds' interactive client (client1.py over TCP, client2.py over UDP).\n\n\
Prompts `Input: `, sends the line, prints `Output: ...` with the whole reply, \
and stops on an empty line (over UDP, sending the seeds' empty goodbye datagram).",
    after_help = "EXAMPLES:\n  upcase chat 127.0.0.1:1060\n  upcase chat udp://127.0.0.1:1060"
)]
pub struct ChatArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// The server runs --utf8: expect Unicode-uppercased replies.
    #[arg(long, value_enum, value_name = "STRICTNESS", num_args = 0..=1, require_equals = true, default_missing_value = "lenient")]
    pub utf8: Option<Utf8Arg>,
    /// The server's --framing. In stream mode each Output: shows what one
    /// read returned, as TCP delivered it; with line (or length, netstring)
    /// it shows one reply message per line typed.
    #[arg(long, value_name = "MODE", default_value = "stream")]
    pub framing: Framing,
    #[command(flatten)]
    pub udp: UdpArgs,
    #[command(flatten)]
    pub sock: SockArgs,
}

/// How strict `--utf8` is about invalid UTF-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Utf8Arg {
    /// Pass invalid bytes through unchanged.
    Lenient,
    /// Close the connection (log the offset) at the first invalid byte.
    Strict,
}

fn mode_of(utf8: Option<Utf8Arg>) -> Mode {
    match utf8 {
        None => Mode::Ascii,
        Some(u) => Mode::Utf8 {
            strict: u == Utf8Arg::Strict,
        },
    }
}

fn parse_datagram_size(s: &str) -> Result<usize, String> {
    let n = units::parse_nonzero_size(s)?;
    if n > crate::server::udp::MAX_DATAGRAM as u64 {
        return Err(format!(
            "invalid size '{s}': a UDP datagram holds at most {} bytes",
            crate::server::udp::MAX_DATAGRAM
        ));
    }
    Ok(n as usize)
}

impl SockArgs {
    fn into_opts(self) -> SockOpts {
        SockOpts {
            nodelay: self.nodelay,
            rcvbuf: self.rcvbuf,
            sndbuf: self.sndbuf,
            keepalive: self.keepalive,
            congestion: self.congestion,
            ..SockOpts::default()
        }
    }
}

impl ServeArgs {
    pub fn into_config(self) -> Result<server::Config, String> {
        let mode = mode_of(self.utf8);
        if let (Framing::Fixed(_), Mode::Utf8 { .. }) = (self.framing, mode) {
            return Err(
                "--framing fixed cannot go with --utf8: uppercasing UTF-8 can change a message's length; use line, length or netstring".into(),
            );
        }
        let mut sockopts = self.sock.into_opts();
        sockopts.reuseaddr = !self.listen.no_reuseaddr;
        sockopts.reuseport = self.listen.reuseport;
        sockopts.backlog = self.listen.backlog;
        sockopts.unix_mode = self.listen.unix_mode;
        let listeners_defaulted = self.listeners.is_empty();
        let listeners = if listeners_defaulted {
            server::default_listeners()
        } else {
            self.listeners
        };
        let model = self.model.unwrap_or_else(Model::default_here);
        if self.proxy_protocol.is_some() && listeners.iter().all(Endpoint::is_udp) {
            return Err(
                "--proxy-protocol applies to TCP, TLS and Unix listeners; only UDP is given".into(),
            );
        }
        if model == Model::Fork && self.metrics.is_some() {
            return Err("--metrics cannot count the fork model: its connections are served in child processes whose counters the parent never sees; use another model".into());
        }
        let tls_wanted = listeners.iter().any(Endpoint::is_tls);
        let tls = match (&self.cert, &self.key, tls_wanted) {
            (Some(cert), Some(key), true) => Some(crate::tls::server_config(cert, key)?),
            (None, _, true) => {
                return Err("a tls:// listener needs --cert FILE and --key FILE (PEM)".into());
            }
            (Some(_), _, false) => {
                return Err("--cert and --key are for tls:// listeners; none is given".into());
            }
            _ => None,
        };
        Ok(server::Config {
            listeners,
            model,
            sockopts,
            block: self.block,
            protocol: Protocol {
                mode,
                framing: self.framing,
            },
            max_conns: max_conns_for(model, self.max_conns),
            drain_timeout: self.drain_timeout,
            workers: self
                .workers
                .map_or_else(|| default_workers(model), |n| n as usize),
            idle_timeout: (!self.idle_timeout.is_zero()).then_some(self.idle_timeout),
            handshake_timeout: self.handshake_timeout,
            metrics: self.metrics,
            tls,
            tls_listeners: Vec::new(),
            processes: self.processes.map(|n| n as usize),
            pid_file: self.pid_file,
            restart_timeout: self.restart_timeout,
            proxy: self.proxy_protocol.map(|v| (v, self.proxy_timeout)),
            listeners_defaulted,
            buffered: crate::conn::Buffered::new(self.max_buffered),
            udp_sources: crate::server::udp::Sources::shared(),
            udp: {
                let mut p = UdpPolicy {
                    allow: self.udp_allow,
                    busy_poll: self.busy_poll,
                    ..UdpPolicy::default()
                };
                if let Some((datagrams, bytes)) = self.udp_limit {
                    (p.datagrams, p.bytes, p.loopback) = (datagrams, bytes, true);
                }
                p
            },
        })
    }
}

/// `--max-conns`, or its default: the open-file limit, and for threads
/// and fork what the machine can really hold (never more: past it the
/// server could not create the thread, or would abort).
fn max_conns_for(model: Model, asked: Option<u32>) -> usize {
    let fds = server::default_max_conns();
    let machine = server::machine_limit(model);
    match (asked, machine) {
        (Some(n), Some((cap, why))) if n as usize > cap => {
            tracing::warn!(
                "--max-conns {n}: the {} model can hold at most {cap} connections here ({why}); using {cap}",
                model.name()
            );
            cap
        }
        (Some(n), _) => n as usize,
        (None, Some((cap, why))) if cap < fds => {
            tracing::info!(
                "the {} model holds at most {cap} connections here ({why})",
                model.name()
            );
            cap
        }
        (None, _) => fds,
    }
}

/// Threads per model when `--workers` is not given. The event loops take
/// half the cores: upcase is most often measured or used with its clients
/// on the same machine, and measurement (docs/BENCHMARKS.md) shows that a
/// loop per core only makes server and clients fight for the CPU.
fn default_workers(model: Model) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    match model {
        Model::Pool => 16,
        Model::Epoll | Model::Uring => (cores / 2).max(1),
        _ => cores,
    }
}

impl UdpArgs {
    fn into_retry(self, wait: &WaitArgs) -> UdpRetry {
        UdpRetry {
            timeout: self.rto,
            retries: self.retries,
            total: wait.timeout,
            give_up_after: self.give_up_after,
            deadline: self.deadline,
        }
    }
}

impl SendArgs {
    pub fn into_config(self) -> Result<SendConfig, String> {
        let (endpoint, sockopts) = self.server.resolve(self.sock)?;
        if self.naive && endpoint.is_udp() {
            return Err("--naive is about TCP's deadlock; UDP has no flow control to deadlock (drop --naive)".into());
        }
        if self.naive && !self.framing.is_stream() {
            return Err("--naive streams the seeds' bytes; it takes no --framing".into());
        }
        if let (Framing::Fixed(_), Some(_)) = (self.framing, self.utf8) {
            return Err("--framing fixed cannot go with --utf8: uppercasing UTF-8 can change a message's length".into());
        }
        let stall = self
            .stall
            .unwrap_or(Duration::from_secs(if self.naive { 2 } else { 10 }));
        Ok(SendConfig {
            endpoint,
            sockopts,
            bytes: self.bytes,
            naive: self.naive,
            stall: self.server.wait.timeout.map_or(stall, |w| w.min(stall)),
            size: self.size,
            udp: self.udp.into_retry(&self.server.wait),
            json: self.json,
            progress: !self.no_progress,
            mode: mode_of(self.utf8),
            framing: self.framing,
        })
    }
}

impl ChatArgs {
    pub fn into_config(self) -> Result<SendConfig, String> {
        let (endpoint, sockopts) = self.server.resolve(self.sock)?;
        Ok(SendConfig {
            endpoint,
            sockopts,
            bytes: None,
            naive: false,
            stall: Duration::from_secs(2),
            size: 1024,
            udp: self.udp.into_retry(&self.server.wait),
            json: false,
            progress: false,
            mode: mode_of(self.utf8),
            framing: self.framing,
        })
    }
}

/// Load generator: measure a server (or compare all models) with verified replies.
#[derive(Debug, Args)]
#[command(
    long_about = "Load generator: measure a server, verifying every reply.\n\n\
Workloads (--mode): stream (each connection streams; MB/s), rr (request/response \
on open connections; messages/s and latency percentiles), crr (connect, one \
request/response, close; connections/s), udp (datagram request/response; \
datagrams/s, loss, latency), hold (hold --conns idle connections while \
--active connections run rr; with the server's pid, its memory per held \
connection). A wrong byte is an error, never a faster number. Without --rate \
the load is closed-loop; with --rate it is open-loop and latency counts from \
each request's scheduled time (no coordinated omission).\n\n\
Prints a line a second on stderr and a table on stdout (--json: one JSON object). \
With --compare, starts `upcase serve --model M` for each model (and each \
--server command) on port 0 and runs the same workloads against each.",
    after_help = "EXAMPLES:\n  \
upcase bench 127.0.0.1:1060 --mode stream --duration 5s\n  \
upcase bench 127.0.0.1:1060 --mode rr --conns 50 --size 512\n  \
upcase bench 127.0.0.1:1060 --mode rr --conns 50 --rate 50000\n  \
upcase bench --compare --workloads stream,rr --duration 3s\n  \
upcase bench --compare --models epoll,async --server 'python3 tests/peers/tcp_deadlock.py server 127.0.0.1 {port}'\n\n\
EXIT CODES:\n  \
0  every reply verified\n  \
1  an error: could not connect, or a --compare server would not start\n  \
2  invalid arguments\n  \
4  a wrong reply, or a connection that never got one (--compare: wrong replies only; \
iterative and pool serve some clients by design)"
)]
pub struct BenchArgs {
    /// Server address (not with --compare).
    #[arg(value_name = "ADDR", required_unless_present = "compare")]
    pub endpoint: Option<Endpoint>,
    /// Workload [default: rr; udp for a udp:// address].
    #[arg(long, value_enum)]
    pub mode: Option<Workload>,
    /// Connections [default: stream 1, rr 50, crr 50, udp 1, hold 10000].
    #[arg(long, allow_negative_numbers = true, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub conns: Option<u32>,
    /// hold: connections that run rr while the others are held idle.
    #[arg(long, allow_negative_numbers = true, value_name = "N", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub active: u32,
    /// Internal: hold --conns connections from source address FIRST on,
    /// for a parent `bench --mode hold` (see src/bench/hold.rs).
    #[arg(long, value_name = "FIRST", hide = true, requires = "mode")]
    pub hold_shard: Option<u32>,
    /// How long each workload runs.
    #[arg(long, allow_negative_numbers = true, value_name = "DURATION", default_value = "5s", value_parser = units::parse_positive_duration)]
    pub duration: Duration,
    /// Message size for rr, crr, udp and hold.
    #[arg(long, allow_negative_numbers = true, value_name = "SIZE", default_value = "512", value_parser = parse_datagram_size)]
    pub size: usize,
    /// Total requests per second, open loop (rr, crr, udp, hold).
    #[arg(long, allow_negative_numbers = true, value_name = "R")]
    pub rate: Option<f64>,
    /// How the load generator waits on its connections, for rr and hold:
    /// auto (io_uring where the kernel has it), epoll, uring, or threads
    /// (a blocking thread per connection, rr only: a client of another
    /// design; tls:// runs on it). Other workloads run on epoll.
    #[arg(long, value_enum, value_name = "ENGINE", default_value_t = Engine::Auto)]
    pub engine: Engine,
    #[command(flatten)]
    pub tls: TlsClientArgs,
    /// Pin the server (the one --compare starts, or --server-pid) and the
    /// load generator to separate CPUs: SERVER_CPUS:CLIENT_CPUS, e.g. 0:1.
    #[arg(long, value_name = "SERVER:CLIENT", value_parser = |s: &str| s.parse::<crate::bench::proc::Pin>())]
    pub pin: Option<crate::bench::proc::Pin>,
    /// Load-generator threads (each an event loop).
    #[arg(long, allow_negative_numbers = true, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub threads: u32,
    /// udp: wait this long for a reply before counting it lost.
    #[arg(long, allow_negative_numbers = true, value_name = "DURATION", default_value = "200ms", value_parser = units::parse_positive_duration)]
    pub timeout: Duration,
    /// The server's process id, to report its CPU and memory.
    #[arg(long, value_name = "PID")]
    pub server_pid: Option<i32>,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Send UTF-8 text and verify by the Unicode mapping (serve --utf8);
    /// rr sizes round up to whole messages. With --compare, the models run
    /// with --utf8 too.
    #[arg(long)]
    pub utf8: bool,
    /// The server's --framing, for rr and crr: each request is one message
    /// of --size bytes in it. With --compare, the models run with it too.
    #[arg(long, value_name = "MODE", default_value = "stream")]
    pub framing: Framing,
    /// rr and crr with --framing: send this many messages back to back and
    /// wait for all their replies, so the kernel's cost per system call is
    /// shared by K messages (msgs/s counts each; latency is per round).
    #[arg(long, value_name = "K", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub pipeline: u32,
    /// No per-second lines on stderr.
    #[arg(long)]
    pub no_intervals: bool,
    /// Compare server models side by side (and --server commands).
    #[arg(long)]
    pub compare: bool,
    /// With --compare: models to run [default: all].
    #[arg(long, value_enum, value_delimiter = ',', requires = "compare")]
    pub models: Vec<Model>,
    /// With --compare: an outside server, as 'COMMAND {port}' or 'NAME=COMMAND {port}'.
    #[arg(long = "server", value_name = "COMMAND", requires = "compare")]
    pub servers: Vec<String>,
    /// With --compare: workloads to run, in order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "stream,rr",
        requires = "compare"
    )]
    pub workloads: Vec<Workload>,
    /// With --compare: write compare.json and compare.svg here (with
    /// --sweep: sweep.json, sweep.md and sweep.svg).
    #[arg(long, value_name = "DIR", requires = "compare")]
    pub out: Option<std::path::PathBuf>,
    /// With --compare: for each server, measure its rr capacity, then offer
    /// 10 % to 120 % of it open loop and report p50/p99 against offered
    /// load (12 runs of --duration each per server).
    #[arg(long, requires = "compare")]
    pub sweep: bool,
    #[command(flatten)]
    pub sock: SockArgs,
}

impl BenchArgs {
    pub fn into_config(mut self) -> Result<BenchCommand, String> {
        if self.compare && self.endpoint.is_some() {
            return Err("--compare starts its own servers on free ports: drop the address, or drop --compare to measure the server at that address".into());
        }
        let udp_address = self.endpoint.as_ref().is_some_and(Endpoint::is_udp);
        let mode = match (self.mode, udp_address) {
            (None, true) => Workload::Udp,
            (None, false) => Workload::Rr,
            (Some(m), true) if m != Workload::Udp => {
                return Err(format!(
                    "a udp:// address runs the udp workload; --mode {} needs a TCP or Unix address",
                    m.name()
                ));
            }
            (Some(Workload::Udp), false) if self.endpoint.is_some() => {
                return Err("--mode udp needs a udp:// address".into());
            }
            (Some(m), _) => m,
        };
        self.mode = Some(mode);
        if let Some(r) = self.rate
            && !(r.is_finite() && (0.001..=1e9).contains(&r))
        {
            return Err(format!(
                "--rate {r}: must be a number of requests per second from 0.001 to 1e9"
            ));
        }
        if self.pipeline > 1 && self.framing.is_stream() {
            return Err("--pipeline needs --framing: on a plain stream there are no messages to keep in flight, only bytes".into());
        }
        if let (Framing::Fixed(_), true) = (self.framing, self.utf8) {
            return Err("--framing fixed cannot go with --utf8: uppercasing UTF-8 can change a message's length".into());
        }
        if self.rate.is_some() && mode == Workload::Stream && !self.compare {
            return Err("--rate applies to rr, crr, udp and hold, not stream".into());
        }
        if self.endpoint.as_ref().is_some_and(Endpoint::is_tls) && mode != Workload::Rr {
            return Err("over TLS, bench runs rr (on the threads engine); for a stream, `upcase send tls://HOST:PORT --bytes N`".into());
        }
        if self.engine == Engine::Threads && mode != Workload::Rr && !self.compare {
            return Err(format!(
                "--engine threads runs rr; {} runs on epoll",
                mode.name()
            ));
        }
        if self.engine == Engine::Uring
            && !self.compare
            && !matches!(mode, Workload::Rr | Workload::Hold)
        {
            return Err(format!(
                "--engine uring runs rr and hold; {} runs on epoll",
                mode.name()
            ));
        }
        let endpoint = self
            .endpoint
            .clone()
            .unwrap_or_else(|| "127.0.0.1:1".parse().expect("literal"));
        let conns = self.conns.map(|n| n as usize);
        let mut sockopts = self.sock.into_opts();
        if let Some(ep) = &self.endpoint {
            sockopts.tls = self.tls.config(ep)?;
        }
        let base = BenchConfig {
            endpoint,
            workload: mode,
            conns: conns.unwrap_or_else(|| mode.default_conns()),
            active: self.active as usize,
            duration: self.duration,
            size: self.size,
            rate: self.rate,
            threads: self.threads as usize,
            timeout: self.timeout,
            sockopts,
            server_pid: self.server_pid,
            intervals: !self.no_intervals && !self.compare,
            mode: if self.utf8 {
                Mode::Utf8 { strict: false }
            } else {
                Mode::Ascii
            },
            framing: self.framing,
            pipeline: self.pipeline as usize,
            engine: self.engine,
            pin: self.pin.clone(),
        };
        if let Some(first_source) = self.hold_shard {
            return Ok(BenchCommand::HoldShard(base, first_source as usize));
        }
        if !self.compare {
            return Ok(BenchCommand::One(base, self.json));
        }
        let models = if self.models.is_empty() {
            Model::ALL.to_vec()
        } else {
            self.models
        };
        let servers = self
            .servers
            .iter()
            .map(|s| match s.split_once('=') {
                Some((name, cmd)) if !name.contains(' ') => (name.to_string(), cmd.to_string()),
                _ => (
                    s.split_whitespace().next().unwrap_or("server").to_string(),
                    s.clone(),
                ),
            })
            .collect();
        Ok(BenchCommand::Compare(
            CompareConfig {
                models,
                servers,
                workloads: self.workloads,
                base,
                conns,
                out: self.out,
                sweep: self.sweep,
            },
            self.json,
        ))
    }
}

/// What `bench` was asked to do.
pub enum BenchCommand {
    One(BenchConfig, bool),
    /// A child of `bench --mode hold`, holding a share (see bench::hold).
    HoldShard(BenchConfig, usize),
    Compare(CompareConfig, bool),
}
