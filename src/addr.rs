//! One address syntax for every command.
//!
//! `serve`, `send`, `chat` (and later `bench`) all take the same strings:
//!
//! | written                      | meaning                                  |
//! |------------------------------|------------------------------------------|
//! | `HOST:PORT`, `tcp://HOST:PORT` | TCP stream                            |
//! | `udp://HOST:PORT`            | UDP datagrams                            |
//! | `unix:PATH`                  | Unix-domain stream socket                |
//!
//! socat's spellings are accepted too, since they are what people paste:
//! `TCP:HOST:PORT` (and `TCP4:`, `TCP6:`), `UDP:HOST:PORT`,
//! `UNIX-CONNECT:PATH`, `UNIX-LISTEN:PATH`. Its listening forms
//! (`TCP-LISTEN:PORT`) and options (`,fork`) are answered with the form to
//! write instead, and so is a bare port: guessing the host to listen on
//! (every interface, or this host only) is the user's call, not ours.
//!
//! `HOST` is an IPv4 address, a bracketed IPv6 address (`[::1]`) or a name
//! that is resolved when the endpoint is used. Port 0 asks the kernel for an
//! ephemeral port. Parsing is pure (no I/O), so it can be tested and fuzzed
//! on its own; resolution happens in [`HostPort::resolve`].

use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::str::FromStr;

/// Where to listen or connect.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Tcp(HostPort),
    /// TCP carrying TLS (`tls://HOST:PORT`).
    Tls(HostPort),
    Udp(HostPort),
    Unix(PathBuf),
}

/// A host (literal address or name) and a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    pub host: Host,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    Ip(IpAddr),
    Name(String),
}

/// Why an address string was rejected. Each message names what is wrong and
/// shows the accepted forms, since this is what a user sees first.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    #[error("empty address: expected HOST:PORT, tcp://HOST:PORT, udp://HOST:PORT or unix:PATH")]
    Empty,
    #[error("unknown scheme '{0}://': expected tcp://, tls://, udp:// or unix:")]
    UnknownScheme(String),
    #[error("missing port in '{0}': expected HOST:PORT, e.g. 127.0.0.1:1060 or [::1]:1060")]
    MissingPort(String),
    #[error("invalid port '{port}' in '{addr}': expected a number from 0 to 65535")]
    BadPort { addr: String, port: String },
    #[error(
        "missing host in '{addr}': did you mean 127.0.0.1:{port} (this host only) or 0.0.0.0:{port} (every interface)?"
    )]
    MissingHost { addr: String, port: String },
    #[error(
        "'{addr}' is socat's listening form: write {scheme}{ip}:{port} (every interface) or {scheme}{local}:{port} (this host only)"
    )]
    SocatListen {
        addr: String,
        scheme: &'static str,
        ip: &'static str,
        local: &'static str,
        port: String,
    },
    #[error(
        "socat's options ('{options}') are not part of an upcase address: write '{without}'; see --help for upcase's own flags"
    )]
    SocatOptions { options: String, without: String },
    #[error("invalid IPv6 address '{0}': write it in brackets, e.g. [::1]:1060")]
    BadIpv6(String),
    #[error("invalid host '{0}': a host name may contain letters, digits, '-', '_' and '.'")]
    BadHost(String),
    #[error(
        "'{addr} {port}': an address and a port: write HOST PORT (nc's form) or one address, e.g. 127.0.0.1:1060"
    )]
    ExtraPort { addr: String, port: String },
    #[error("empty Unix socket path: expected unix:PATH, e.g. unix:/tmp/upcase.sock")]
    EmptyPath,
    #[error("cannot resolve host '{host}': {reason}")]
    Resolve { host: String, reason: String },
}

impl Endpoint {
    pub fn is_udp(&self) -> bool {
        matches!(self, Endpoint::Udp(_))
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Endpoint::Tls(_))
    }
}

impl FromStr for Endpoint {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Self, AddrError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(AddrError::Empty);
        }
        if !s.contains("://")
            && let Some(e) = socat_form(s)
        {
            return e;
        }
        if s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(AddrError::MissingHost {
                addr: s.to_string(),
                port: s.to_string(),
            });
        }
        if s.get(..5).is_some_and(|p| p.eq_ignore_ascii_case("unix:")) {
            // unix:PATH, and the URL form unix:///abs/path.
            let rest = &s[5..];
            let path = match rest.strip_prefix("//") {
                Some(abs) if abs.starts_with('/') => abs,
                _ => rest,
            };
            if path.is_empty() {
                return Err(AddrError::EmptyPath);
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        if let Some((scheme, rest)) = s.split_once("://") {
            return match scheme.to_ascii_lowercase().as_str() {
                "tcp" => Ok(Endpoint::Tcp(rest.parse()?)),
                "tls" => Ok(Endpoint::Tls(rest.parse()?)),
                "udp" => Ok(Endpoint::Udp(rest.parse()?)),
                _ => Err(AddrError::UnknownScheme(scheme.to_string())),
            };
        }
        Ok(Endpoint::Tcp(s.parse()?))
    }
}

impl FromStr for HostPort {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Self, AddrError> {
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(AddrError::MissingHost {
                addr: s.to_string(),
                port: s.to_string(),
            });
        }
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (inside, after) = rest
                .split_once(']')
                .ok_or_else(|| AddrError::BadIpv6(s.to_string()))?;
            let ip: std::net::Ipv6Addr = inside
                .parse()
                .map_err(|_| AddrError::BadIpv6(inside.to_string()))?;
            let port = after
                .strip_prefix(':')
                .ok_or_else(|| AddrError::MissingPort(s.to_string()))?;
            (Host::Ip(IpAddr::V6(ip)), port)
        } else {
            let (host, port) = s
                .rsplit_once(':')
                .ok_or_else(|| AddrError::MissingPort(s.to_string()))?;
            if host.contains(':') {
                // More than one colon without brackets: an IPv6 literal.
                return Err(AddrError::BadIpv6(s.to_string()));
            }
            if host.is_empty() {
                return Err(AddrError::MissingHost {
                    addr: s.to_string(),
                    port: port.to_string(),
                });
            }
            let host = match host.parse::<IpAddr>() {
                Ok(ip) => Host::Ip(ip),
                Err(_) if valid_hostname(host) => Host::Name(host.to_string()),
                Err(_) => return Err(AddrError::BadHost(host.to_string())),
            };
            (host, port)
        };
        if port.is_empty() {
            return Err(AddrError::MissingPort(s.to_string()));
        }
        let port = port.parse::<u16>().map_err(|_| AddrError::BadPort {
            addr: s.to_string(),
            port: port.to_string(),
        })?;
        Ok(HostPort { host, port })
    }
}

/// socat's `WORD:REST` addresses, or `None` when `s` is not one of them.
fn socat_form(s: &str) -> Option<Result<Endpoint, AddrError>> {
    let (word, rest) = s.split_once(':')?;
    let word = word.to_ascii_lowercase();
    // "udp:1060" is a host named udp; socat's forms have HOST:PORT after the word.
    let kind = match word.as_str() {
        "tcp" | "tcp4" | "tcp6" | "tcp-connect" => "tcp",
        "udp" | "udp4" | "udp6" | "udp-connect" | "udp-sendto" => "udp",
        "unix-connect" | "unix-listen" | "unix-client" => "unix",
        "tcp-listen" | "tcp4-listen" | "tcp6-listen" => "tcp-listen",
        "udp-listen" | "udp4-listen" | "udp6-listen" | "udp-recvfrom" => "udp-listen",
        _ => return None,
    };
    if let Some((head, options)) = s.split_once(',') {
        return Some(socat_form(head)?.and_then(|e| {
            Err(AddrError::SocatOptions {
                options: options.to_string(),
                without: e.to_string(),
            })
        }));
    }
    let v6 = word.contains('6');
    Some(match kind {
        "tcp" if rest.contains(':') => rest.parse().map(Endpoint::Tcp),
        "udp" if rest.contains(':') => rest.parse().map(Endpoint::Udp),
        "tcp" | "udp" => return None,
        "unix" if rest.is_empty() => Err(AddrError::EmptyPath),
        "unix" => Ok(Endpoint::Unix(PathBuf::from(rest))),
        _ => Err(AddrError::SocatListen {
            addr: s.to_string(),
            ip: if v6 { "[::]" } else { "0.0.0.0" },
            local: if v6 { "[::1]" } else { "127.0.0.1" },
            port: rest.to_string(),
            scheme: if kind == "udp-listen" { "udp://" } else { "" },
        }),
    })
}

/// nc's two-argument form, `HOST PORT`, as one address (`HOST:PORT`, with
/// brackets for an IPv6 literal); with no `port`, `addr` as it is.
pub fn join_host_port(addr: &str, port: Option<&str>) -> Result<Endpoint, AddrError> {
    let Some(port) = port else {
        return addr.parse();
    };
    if addr.contains("://") || addr.starts_with('[') || addr.matches(':').count() == 1 {
        // Already has a port or a scheme: the second word is one too many.
        return Err(AddrError::ExtraPort {
            addr: addr.to_string(),
            port: port.to_string(),
        });
    }
    if addr.contains(':') {
        format!("[{addr}]:{port}").parse()
    } else {
        format!("{addr}:{port}").parse()
    }
}

fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

impl HostPort {
    /// All socket addresses this names, literal addresses without a lookup.
    pub fn resolve(&self) -> Result<Vec<SocketAddr>, AddrError> {
        match &self.host {
            Host::Ip(ip) => Ok(vec![SocketAddr::new(*ip, self.port)]),
            Host::Name(name) => {
                let addrs: Vec<SocketAddr> = (name.as_str(), self.port)
                    .to_socket_addrs()
                    .map_err(|e| AddrError::Resolve {
                        host: name.clone(),
                        reason: e.to_string(),
                    })?
                    .collect();
                if addrs.is_empty() {
                    return Err(AddrError::Resolve {
                        host: name.clone(),
                        reason: "no addresses found".into(),
                    });
                }
                Ok(addrs)
            }
        }
    }
}

impl From<SocketAddr> for HostPort {
    fn from(a: SocketAddr) -> Self {
        HostPort {
            host: Host::Ip(a.ip()),
            port: a.port(),
        }
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            Host::Ip(IpAddr::V4(ip)) => write!(f, "{ip}:{}", self.port),
            Host::Name(n) => write!(f, "{n}:{}", self.port),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(hp) => write!(f, "tcp://{hp}"),
            Endpoint::Tls(hp) => write!(f, "tls://{hp}"),
            Endpoint::Udp(hp) => write!(f, "udp://{hp}"),
            // A path that itself starts with // is written in the URL form,
            // so that it parses back to the same path.
            Endpoint::Unix(p) if p.as_os_str().as_encoded_bytes().starts_with(b"//") => {
                write!(f, "unix://{}", p.display())
            }
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(s: &str) -> Endpoint {
        s.parse().unwrap()
    }

    #[test]
    fn parses_every_form() {
        assert_eq!(tcp("127.0.0.1:1060").to_string(), "tcp://127.0.0.1:1060");
        assert_eq!(tcp("tcp://127.0.0.1:0").to_string(), "tcp://127.0.0.1:0");
        assert_eq!(tcp("[::1]:1060").to_string(), "tcp://[::1]:1060");
        assert_eq!(tcp("udp://[::1]:7").to_string(), "udp://[::1]:7");
        assert_eq!(
            tcp("tls://127.0.0.1:443").to_string(),
            "tls://127.0.0.1:443"
        );
        assert_eq!(tcp("UDP://localhost:7").to_string(), "udp://localhost:7");
        assert_eq!(tcp("unix:/tmp/x.sock").to_string(), "unix:/tmp/x.sock");
        assert_eq!(tcp("unix:rel.sock").to_string(), "unix:rel.sock");
        assert_eq!(tcp("unix:///tmp/x").to_string(), "unix:/tmp/x");
        assert_eq!(tcp("UNIX:/tmp/x").to_string(), "unix:/tmp/x");
        // Found by the fuzzer: paths that start with // round-trip too.
        for weird in ["unix://x", "unix:////x", "unix://///a", "unix:////"] {
            let e = tcp(weird);
            assert_eq!(tcp(&e.to_string()), e, "{weird}");
        }
        assert_eq!(tcp("0.0.0.0:1060").to_string(), "tcp://0.0.0.0:1060");
    }

    #[test]
    fn rejects_with_reasons() {
        let err = |s: &str| s.parse::<Endpoint>().unwrap_err();
        assert_eq!(err(""), AddrError::Empty);
        assert!(matches!(err("127.0.0.1"), AddrError::MissingPort(_)));
        assert!(matches!(err("127.0.0.1:"), AddrError::MissingPort(_)));
        assert!(matches!(err(":80"), AddrError::MissingHost { .. }));
        assert_eq!(
            err("1060").to_string(),
            "missing host in '1060': did you mean 127.0.0.1:1060 (this host only) or 0.0.0.0:1060 (every interface)?"
        );
        assert!(matches!(err("1.2.3.4:70000"), AddrError::BadPort { .. }));
        assert!(matches!(err("1.2.3.4:-1"), AddrError::BadPort { .. }));
        assert!(matches!(err("::1:80"), AddrError::BadIpv6(_)));
        assert!(matches!(err("[::1"), AddrError::BadIpv6(_)));
        assert!(matches!(err("[zz]:1"), AddrError::BadIpv6(_)));
        assert!(matches!(err("[::1]80"), AddrError::MissingPort(_)));
        assert!(matches!(err("sctp://a:1"), AddrError::UnknownScheme(_)));
        assert!(matches!(err("bad host:1"), AddrError::BadHost(_)));
        assert_eq!(err("unix:"), AddrError::EmptyPath);
        let msg = err("1.2.3.4:http").to_string();
        assert!(
            msg.contains("'http'") && msg.contains("0 to 65535"),
            "{msg}"
        );
    }

    #[test]
    fn takes_socat_and_nc_spellings() {
        assert_eq!(
            tcp("TCP:127.0.0.1:1060").to_string(),
            "tcp://127.0.0.1:1060"
        );
        assert_eq!(tcp("tcp6:[::1]:7").to_string(), "tcp://[::1]:7");
        assert_eq!(tcp("UDP:127.0.0.1:7").to_string(), "udp://127.0.0.1:7");
        assert_eq!(tcp("UNIX-CONNECT:/tmp/a").to_string(), "unix:/tmp/a");
        assert_eq!(tcp("unix-listen:/tmp/a").to_string(), "unix:/tmp/a");
        // A host that happens to be called "udp" is still a host.
        assert_eq!(tcp("udp:1060").to_string(), "tcp://udp:1060");
        let err = |s: &str| s.parse::<Endpoint>().unwrap_err().to_string();
        assert_eq!(
            err("TCP-LISTEN:1060"),
            "'TCP-LISTEN:1060' is socat's listening form: write 0.0.0.0:1060 (every interface) or 127.0.0.1:1060 (this host only)"
        );
        assert!(
            err("udp6-listen:7").contains("write udp://[::]:7 (every interface) or udp://[::1]:7")
        );
        assert!(err("TCP:127.0.0.1:1060,fork").contains("write 'tcp://127.0.0.1:1060'"));
        assert!(err("TCP-LISTEN:1060,fork").contains("write 0.0.0.0:1060"));
        let join = |a: &str, p| join_host_port(a, p).map(|e| e.to_string());
        assert_eq!(
            join("127.0.0.1", Some("1060")).unwrap(),
            "tcp://127.0.0.1:1060"
        );
        assert_eq!(join("::1", Some("7")).unwrap(), "tcp://[::1]:7");
        assert_eq!(
            join("localhost", None).unwrap_err().to_string(),
            err("localhost")
        );
        assert!(matches!(
            join_host_port("127.0.0.1:1", Some("2")),
            Err(AddrError::ExtraPort { .. })
        ));
    }

    #[test]
    fn resolves_literals_without_lookup() {
        let hp: HostPort = "[::1]:5".parse().unwrap();
        assert_eq!(hp.resolve().unwrap(), vec!["[::1]:5".parse().unwrap()]);
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in ".{0,64}") {
            let _ = s.parse::<Endpoint>();
        }

        #[test]
        fn display_round_trips(a in proptest::prelude::any::<SocketAddr>(), udp: bool) {
            let hp = HostPort::from(a);
            let e = if udp { Endpoint::Udp(hp) } else { Endpoint::Tcp(hp) };
            // Scoped IPv6 addresses print a %scope that we do not parse.
            if let SocketAddr::V6(v6) = a { proptest::prop_assume!(v6.scope_id() == 0); }
            proptest::prop_assert_eq!(e.to_string().parse::<Endpoint>().unwrap(), e);
        }
    }
}
