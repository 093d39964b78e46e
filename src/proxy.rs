//! The PROXY protocol header (HAProxy's, v1 text and v2 binary), which a
//! load balancer sends first on each connection to say who the client
//! really is. Pure: bytes in, a verdict out; the connection core
//! ([`crate::conn`]) runs it before anything else (before TLS, too), and
//! the header's bytes are never uppercased nor answered.
//!
//! Parsing is `ppp`'s; what is ours is the streaming around it: the header
//! may arrive in pieces, must be the very first bytes (a listener that
//! expects one treats anything else as an error, at once, without waiting
//! for more), and is bounded ([`MAX_HEADER`]).

use std::net::SocketAddr;

/// Which header versions a listener accepts (`--proxy-protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Version {
    /// The text header: `PROXY TCP4 1.2.3.4 5.6.7.8 1111 2222\r\n`.
    V1,
    /// The binary header (HAProxy's `send-proxy-v2`).
    V2,
    /// Either.
    Any,
}

/// v2's 12-byte signature; v1 starts with `PROXY `.
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
const V1_PREFIX: &[u8] = b"PROXY ";
/// A v1 header is at most 107 bytes; a v2 header may carry TLVs up to 64K,
/// of which we accept this much (HAProxy's usual ones fit many times).
pub const MAX_HEADER: usize = 4096;

/// What the bytes so far amount to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed (all of these were taken).
    Incomplete,
    /// The header is complete; it took the first `consumed` bytes of the
    /// last input. `source` is the client's address, unless the header
    /// says LOCAL (a health check of the proxy's own) or UNKNOWN.
    Done {
        consumed: usize,
        source: Option<SocketAddr>,
        version: u8,
    },
    /// Not a valid header: the connection must end.
    Bad(String),
}

/// The header of one connection, as it arrives.
#[derive(Debug)]
pub struct Header {
    want: Version,
    /// Bytes of an incomplete header from earlier inputs.
    pending: Vec<u8>,
}

impl Header {
    pub fn new(want: Version) -> Header {
        Header {
            want,
            pending: Vec::new(),
        }
    }

    /// Takes the next input.
    pub fn push(&mut self, input: &[u8]) -> Parsed {
        let before = self.pending.len();
        // The usual case, a whole header in the first read, copies nothing.
        let parsed = if before == 0 {
            parse(self.want, input)
        } else {
            let room = MAX_HEADER + 1 - before.min(MAX_HEADER + 1);
            self.pending
                .extend_from_slice(&input[..input.len().min(room)]);
            parse(self.want, &self.pending)
        };
        match parsed {
            Step::Need => {
                if before == 0 {
                    self.pending
                        .extend_from_slice(&input[..input.len().min(MAX_HEADER + 1)]);
                }
                if self.pending.len() > MAX_HEADER {
                    return Parsed::Bad(format!("PROXY header longer than {MAX_HEADER} bytes"));
                }
                Parsed::Incomplete
            }
            Step::Done {
                len,
                source,
                version,
            } => {
                self.pending = Vec::new();
                Parsed::Done {
                    consumed: len - before,
                    source,
                    version,
                }
            }
            Step::Bad(why) => Parsed::Bad(why),
        }
    }

    /// The input ended: a header still incomplete is an error.
    pub fn at_end(&self) -> String {
        if self.pending.is_empty() {
            "closed before sending the PROXY header".to_string()
        } else {
            format!(
                "closed after {} bytes of an incomplete PROXY header",
                self.pending.len()
            )
        }
    }
}

enum Step {
    Need,
    Done {
        len: usize,
        source: Option<SocketAddr>,
        version: u8,
    },
    Bad(String),
}

/// Whether `input` can still become `prefix` (or starts with it).
fn could_be(prefix: &[u8], input: &[u8]) -> bool {
    let n = prefix.len().min(input.len());
    input[..n] == prefix[..n]
}

fn parse(want: Version, input: &[u8]) -> Step {
    let v1 = want != Version::V2 && could_be(V1_PREFIX, input);
    let v2 = want != Version::V1 && could_be(V2_SIGNATURE, input);
    if !v1 && !v2 {
        let shown: String = input
            .iter()
            .take(16)
            .map(|b| b.escape_ascii().to_string())
            .collect();
        let expected = match want {
            Version::V1 => "a PROXY v1 header",
            Version::V2 => "a PROXY v2 header",
            Version::Any => "a PROXY header",
        };
        return Step::Bad(format!(
            "expected {expected} (--proxy-protocol), got \"{shown}\""
        ));
    }
    if v2 { parse_v2(input) } else { parse_v1(input) }
}

/// A v1 header, its CRLF included, is at most this long.
const V1_MAX: usize = 107;

fn parse_v1(input: &[u8]) -> Step {
    // The line is parsed once whole: a piece of it ("... 4444 ") can look
    // like a complete line with a bad field.
    let Some(end) = input.windows(2).position(|w| w == b"\r\n") else {
        return if input.len() >= V1_MAX {
            Step::Bad(format!(
                "PROXY v1 header without CRLF in its first {V1_MAX} bytes"
            ))
        } else {
            Step::Need
        };
    };
    match ppp::v1::Header::try_from(&input[..end + 2]) {
        Ok(h) => Step::Done {
            len: h.header.len(),
            source: match h.addresses {
                ppp::v1::Addresses::Tcp4(a) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                ppp::v1::Addresses::Tcp6(a) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                ppp::v1::Addresses::Unknown => None,
            },
            version: 1,
        },
        Err(e) => Step::Bad(format!("malformed PROXY v1 header: {e}")),
    }
}

fn parse_v2(input: &[u8]) -> Step {
    use ppp::PartialResult;
    if input.len() >= 16 {
        let len = 16 + u16::from_be_bytes([input[14], input[15]]) as usize;
        if len > MAX_HEADER {
            return Step::Bad(format!(
                "PROXY v2 header of {len} bytes (at most {MAX_HEADER} accepted)"
            ));
        }
    }
    let r = ppp::v2::Header::try_from(input);
    if r.is_incomplete() {
        return Step::Need;
    }
    match r {
        Ok(h) => Step::Done {
            len: h.len(),
            source: match (h.command, h.addresses) {
                (ppp::v2::Command::Local, _) => None,
                (_, ppp::v2::Addresses::IPv4(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                (_, ppp::v2::Addresses::IPv6(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                _ => None,
            },
            version: 2,
        },
        Err(e) => Step::Bad(format!("malformed PROXY v2 header: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2_header(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
        ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (src, dst),
        )
        .build()
        .expect("header")
    }

    /// Every split of header + data: the header is found, the data after it
    /// is left exactly, whatever the cut.
    #[test]
    fn a_header_in_any_pieces() {
        let src: SocketAddr = "10.1.2.3:4444".parse().expect("addr");
        let dst: SocketAddr = "10.9.9.9:1060".parse().expect("addr");
        let v1 = b"PROXY TCP4 10.1.2.3 10.9.9.9 4444 1060\r\n".to_vec();
        for (want, header) in [
            (Version::V1, v1.clone()),
            (Version::Any, v1),
            (Version::V2, v2_header(src, dst)),
            (Version::Any, v2_header(src, dst)),
        ] {
            let mut all = header.clone();
            all.extend_from_slice(b"hello");
            for cut in 1..all.len() {
                let mut h = Header::new(want);
                let (a, b) = all.split_at(cut);
                let (consumed, source, input) = match h.push(a) {
                    Parsed::Done {
                        consumed, source, ..
                    } => (consumed, source, a),
                    Parsed::Incomplete => match h.push(b) {
                        Parsed::Done {
                            consumed, source, ..
                        } => (consumed, source, b),
                        other => panic!("cut {cut}: {other:?}"),
                    },
                    Parsed::Bad(why) => panic!("cut {cut}: {why}"),
                };
                assert_eq!(source, Some(src), "cut {cut}");
                let rest: Vec<u8> = input[consumed..]
                    .iter()
                    .chain(if input == a { b } else { &[][..] })
                    .copied()
                    .collect();
                assert_eq!(rest, b"hello", "cut {cut} of {want:?}");
            }
        }
    }

    #[test]
    fn anything_else_is_refused_at_once() {
        for (want, input) in [
            (Version::Any, &b"hello"[..]),
            (Version::V1, b"GET / HTTP/1.1\r\n"),
            (Version::V1, b"\r\n\r\n\0\r\nQUIT\n"),
            (Version::V2, b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"),
            (Version::Any, b"PROXY TCP4 1.2.3.4 5.6.7.8 x 2\r\n"),
            (Version::Any, b"PROXY TCP4 999.2.3.4 5.6.7.8 1 2\r\n"),
        ] {
            let mut h = Header::new(want);
            assert!(
                matches!(h.push(input), Parsed::Bad(_)),
                "{want:?} {input:?}"
            );
        }
        // A v1 line that never ends is bounded.
        let mut h = Header::new(Version::V1);
        let mut verdict = Parsed::Incomplete;
        for _ in 0..200 {
            verdict = h.push(b"PROXY ");
            if verdict != Parsed::Incomplete {
                break;
            }
        }
        assert!(matches!(verdict, Parsed::Bad(_)), "{verdict:?}");
    }

    #[test]
    fn local_and_unknown_name_no_client() {
        let mut h = Header::new(Version::Any);
        let r = h.push(b"PROXY UNKNOWN\r\nrest");
        assert_eq!(
            r,
            Parsed::Done {
                consumed: 15,
                source: None,
                version: 1
            }
        );
        let local = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Local,
            ppp::v2::Protocol::Unspecified,
            ppp::v2::Addresses::Unspecified,
        )
        .build()
        .expect("header");
        let mut h = Header::new(Version::V2);
        assert_eq!(
            h.push(&local),
            Parsed::Done {
                consumed: 16,
                source: None,
                version: 2
            }
        );
    }
}
