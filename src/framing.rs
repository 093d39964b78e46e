//! Message framing: where one message ends on a TCP stream. Pure, no I/O.
//!
//! The seeds ask what `pay1` and `pay2` hold on the server after two sends,
//! and answer "it depends": TCP carries a stream, not messages, so two
//! writes may arrive as one read and one write as two. The ways to restore
//! boundaries, as the lecture lists them, are the modes here:
//!
//! - `stream`: no messages; the request ends with the client's half-close
//!   (whois, tcp_deadlock.py). The default.
//! - `fixed:N`: every message is N bytes (tcp_sixteen.py's 16).
//! - `line[:MAX]`: a separator; a message is the bytes up to and including
//!   `\n` (SMTP's lines), at most MAX bytes before its ending.
//! - `length[:MAX]`: an advertised length, a 4-byte big-endian header then
//!   that many bytes (DNS over TCP, HTTP's Content-Length).
//! - `netstring[:MAX]`: D. J. Bernstein's `L:payload,`.
//!
//! [`Decoder`] finds the messages in the bytes of one connection, however
//! they were cut into reads; the caller transforms each payload and
//! [`encode`]s the reply in the same framing. Every limit holds as bytes
//! arrive: memory for a message is never reserved from an advertised
//! length, and no message may exceed its MAX.

use std::fmt;

/// Default MAX of `line` (bytes before the line ending).
pub const LINE_MAX: usize = 65536;
/// Default MAX of `length` and `netstring` (as tokio-util's
/// LengthDelimitedCodec).
pub const LENGTH_MAX: usize = 8 << 20;

/// How a connection's bytes are cut into messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Framing {
    #[default]
    Stream,
    Fixed(usize),
    Line(usize),
    Length(usize),
    Netstring(usize),
}

impl Framing {
    pub fn is_stream(self) -> bool {
        self == Framing::Stream
    }
}

impl fmt::Display for Framing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Framing::Stream => write!(f, "stream"),
            Framing::Fixed(n) => write!(f, "fixed:{n}"),
            Framing::Line(m) => write!(f, "line:{m}"),
            Framing::Length(m) => write!(f, "length:{m}"),
            Framing::Netstring(m) => write!(f, "netstring:{m}"),
        }
    }
}

impl std::str::FromStr for Framing {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (name, arg) = match s.split_once(':') {
            Some((n, a)) => (n, Some(a)),
            None => (s, None),
        };
        let size = |a: &str, lo: usize, hi: usize| -> Result<usize, String> {
            let n = crate::units::parse_size(a).map_err(|e| format!("{name}:{a}: {e}"))?;
            let n = usize::try_from(n).map_err(|_| format!("{name}:{a}: too large"))?;
            if n < lo || n > hi {
                return Err(format!("{name}:{a}: expected {lo} to {hi} bytes"));
            }
            Ok(n)
        };
        match (name, arg) {
            ("stream", None) => Ok(Framing::Stream),
            ("fixed", Some(a)) => Ok(Framing::Fixed(size(a, 1, 65536)?)),
            ("fixed", None) => Err("fixed needs a size: fixed:N (1 to 65536)".into()),
            ("line", a) => Ok(Framing::Line(
                a.map_or(Ok(LINE_MAX), |a| size(a, 1, 1 << 30))?,
            )),
            ("length", a) => {
                Ok(Framing::Length(a.map_or(Ok(LENGTH_MAX), |a| {
                    size(a, 0, u32::MAX as usize)
                })?))
            }
            ("netstring", a) => {
                Ok(Framing::Netstring(a.map_or(Ok(LENGTH_MAX), |a| {
                    size(a, 0, 9_999_999_999u64 as usize)
                })?))
            }
            _ => Err(format!(
                "unknown framing '{s}': expected stream, fixed:N, line[:MAX], length[:MAX] or netstring[:MAX]"
            )),
        }
    }
}

/// Malformed or oversized input: the connection is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{framing}: {what} at byte offset {offset}")]
pub struct FrameError {
    pub framing: Framing,
    pub what: String,
    /// Where in the connection's input the bad message starts.
    pub offset: u64,
}

/// One message found: its frame (header, payload, trailer) as it arrived.
struct Frame {
    /// Bytes of the whole frame.
    total: usize,
    /// Where the payload starts and how long it is.
    start: usize,
    len: usize,
}

/// Where the first message in `buf` ends: `Ok(None)` if more bytes are
/// needed (and may come without breaking a limit), `Err(what)` if the input
/// cannot be a valid message.
fn next_frame(framing: Framing, buf: &[u8]) -> Result<Option<Frame>, String> {
    match framing {
        Framing::Stream => Ok((!buf.is_empty()).then_some(Frame {
            total: buf.len(),
            start: 0,
            len: buf.len(),
        })),
        Framing::Fixed(n) => Ok((buf.len() >= n).then_some(Frame {
            total: n,
            start: 0,
            len: n,
        })),
        Framing::Line(max) => {
            let window = &buf[..buf.len().min(max + 2)];
            match window.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    let content = if i > 0 && buf[i - 1] == b'\r' {
                        i - 1
                    } else {
                        i
                    };
                    if content > max {
                        return Err(format!("a line longer than {max} bytes"));
                    }
                    Ok(Some(Frame {
                        total: i + 1,
                        start: 0,
                        len: i + 1,
                    }))
                }
                // Still room for the line and its ending?
                None if buf.len() > max + 1 || (buf.len() == max + 1 && buf[max] != b'\r') => {
                    Err(format!("a line longer than {max} bytes"))
                }
                None => Ok(None),
            }
        }
        Framing::Length(max) => {
            let Some(h) = buf.get(..4) else {
                return Ok(None);
            };
            let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
            if len > max {
                return Err(format!("a length of {len} over the limit of {max}"));
            }
            Ok((buf.len() >= 4 + len).then_some(Frame {
                total: 4 + len,
                start: 4,
                len,
            }))
        }
        Framing::Netstring(max) => {
            let digits = buf.iter().take_while(|b| b.is_ascii_digit()).count();
            // The leading zero first: it shows at the second digit, so the
            // same bytes give the same error however reads cut them.
            if digits > 1 && buf[0] == b'0' {
                return Err("a netstring length with a leading zero".into());
            }
            if digits > 10 {
                return Err("a netstring length of more than 10 digits".into());
            }
            let Some(&sep) = buf.get(digits) else {
                return Ok(None);
            };
            if sep != b':' {
                return Err(format!(
                    "{:?} where a netstring length or ':' belongs",
                    sep as char
                ));
            }
            if digits == 0 {
                return Err("a netstring without a length".into());
            }
            let len: usize = std::str::from_utf8(&buf[..digits])
                .ok()
                .and_then(|d| d.parse().ok())
                .ok_or("a netstring length that does not fit")?;
            if len > max {
                return Err(format!("a length of {len} over the limit of {max}"));
            }
            let start = digits + 1;
            match buf.get(start + len) {
                None => Ok(None),
                Some(b',') => Ok(Some(Frame {
                    total: start + len + 1,
                    start,
                    len,
                })),
                Some(_) => Err("a netstring without its closing ','".into()),
            }
        }
    }
}

/// The messages of one connection, found as its bytes arrive.
#[derive(Debug)]
pub struct Decoder {
    framing: Framing,
    /// The start of a message that has not arrived whole yet.
    partial: Vec<u8>,
    /// Bytes of input before `partial` (for error offsets).
    offset: u64,
}

impl Decoder {
    pub fn new(framing: Framing) -> Decoder {
        Decoder {
            framing,
            partial: Vec::new(),
            offset: 0,
        }
    }

    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// Bytes held of a message not yet complete.
    pub fn held(&self) -> usize {
        self.partial.len()
    }

    /// The most bytes the message being held can reach when whole, from
    /// what is known of it so far (its header, else the mode's MAX); 0 when
    /// none is held. What the connection core charges to `--max-buffered`
    /// before it lets the message grow, so that every message it lets
    /// grow can complete: nothing is allocated from an advertised length.
    pub fn bound(&self) -> usize {
        let buf = &self.partial[..];
        if buf.is_empty() {
            return 0;
        }
        let whole = match self.framing {
            Framing::Stream => buf.len(),
            Framing::Fixed(n) => n,
            Framing::Line(max) => max + 2,
            Framing::Length(max) => match buf.get(..4) {
                Some(h) => 4 + u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize,
                None => 4 + max,
            },
            Framing::Netstring(max) => {
                let digits = buf.iter().take_while(|b| b.is_ascii_digit()).count();
                let len: Option<usize> = (buf.get(digits) == Some(&b':'))
                    .then(|| std::str::from_utf8(&buf[..digits]).ok()?.parse().ok())
                    .flatten();
                match len {
                    Some(len) => digits + 1 + len.min(max) + 1,
                    None => 10 + 1 + max + 1,
                }
            }
        };
        whole.max(buf.len())
    }

    /// Feeds `input`; calls `each(payload)` for every message it completes,
    /// in order (the payload may be changed in place). On an error, the
    /// messages before the bad one have been passed to `each`; nothing
    /// after it is.
    ///
    /// A message inside one read is handed over where it lies; only a
    /// message cut by a read is copied (once per read), and what is held
    /// never exceeds the message limit plus its header.
    pub fn decode(
        &mut self,
        input: &mut [u8],
        mut each: impl FnMut(&mut [u8]),
    ) -> Result<(), FrameError> {
        if self.partial.is_empty() {
            let at = self.frames(input, &mut each)?;
            self.partial.extend_from_slice(&input[at..]);
            return Ok(());
        }
        let mut buf = std::mem::take(&mut self.partial);
        buf.extend_from_slice(input);
        let at = self.frames(&mut buf, &mut each)?;
        buf.drain(..at);
        if buf.capacity() > 64 * 1024 && buf.capacity() > 2 * buf.len() {
            // A connection idle after a large message costs what one idle
            // from connect costs (a small buffer is kept: pipelined
            // messages cut by reads would allocate it again and again).
            buf.shrink_to(buf.len());
        }
        self.partial = buf;
        Ok(())
    }

    /// Passes every whole message at the front of `buf` to `each`; returns
    /// how many bytes they took.
    fn frames(
        &mut self,
        buf: &mut [u8],
        each: &mut impl FnMut(&mut [u8]),
    ) -> Result<usize, FrameError> {
        let mut at = 0;
        loop {
            match next_frame(self.framing, &buf[at..]) {
                Ok(Some(f)) => {
                    each(&mut buf[at + f.start..at + f.start + f.len]);
                    at += f.total;
                    self.offset += f.total as u64;
                }
                Ok(None) => return Ok(at),
                Err(what) => return Err(self.error(what)),
            }
        }
    }

    fn error(&self, what: String) -> FrameError {
        FrameError {
            framing: self.framing,
            what,
            offset: self.offset,
        }
    }

    /// At end of input: a trailing line is a message (`Ok(Some)`); part of
    /// any other message is an error; nothing held is `Ok(None)`.
    pub fn finish(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        if self.partial.is_empty() {
            return Ok(None);
        }
        let held = std::mem::take(&mut self.partial);
        match self.framing {
            Framing::Line(_) | Framing::Stream => Ok(Some(held)),
            Framing::Fixed(n) => Err(self.error(format!(
                "end of input inside a message ({} of {n} bytes): not answered",
                held.len()
            ))),
            _ => Err(self.error(format!(
                "end of input inside a message ({} bytes of it)",
                held.len()
            ))),
        }
    }
}

/// Appends the reply to one message: `payload` (already transformed) in
/// `framing`'s wire format.
pub fn encode(framing: Framing, payload: &[u8], out: &mut Vec<u8>) {
    match framing {
        Framing::Length(_) => {
            out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            out.extend_from_slice(payload);
        }
        Framing::Netstring(_) => {
            out.extend_from_slice(payload.len().to_string().as_bytes());
            out.push(b':');
            out.extend_from_slice(payload);
            out.push(b',');
        }
        Framing::Stream | Framing::Fixed(_) | Framing::Line(_) => out.extend_from_slice(payload),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Decodes `input` fed in pieces cut at `cuts`; the messages, and the
    /// error if any.
    fn run(framing: Framing, input: &[u8], cuts: &[usize]) -> (Vec<Vec<u8>>, Option<FrameError>) {
        let mut d = Decoder::new(framing);
        let mut msgs = Vec::new();
        let mut start = 0;
        let mut cuts: Vec<usize> = cuts.iter().map(|&c| c.min(input.len())).collect();
        cuts.sort_unstable();
        cuts.push(input.len());
        for end in cuts {
            let mut piece = input[start..end].to_vec();
            start = end;
            if let Err(e) = d.decode(&mut piece, |m| msgs.push(m.to_vec())) {
                return (msgs, Some(e));
            }
            assert!(d.held() <= max_held(framing), "held {}", d.held());
        }
        match d.finish() {
            Ok(Some(tail)) => msgs.push(tail),
            Ok(None) => {}
            Err(e) => return (msgs, Some(e)),
        }
        (msgs, None)
    }

    fn max_held(f: Framing) -> usize {
        match f {
            Framing::Stream => usize::MAX,
            Framing::Fixed(n) => n,
            Framing::Line(m) => m + 2,
            Framing::Length(m) => m + 4,
            Framing::Netstring(m) => m + 12,
        }
    }

    fn msgs(v: &[&[u8]]) -> Vec<Vec<u8>> {
        v.iter().map(|m| m.to_vec()).collect()
    }

    #[test]
    fn parses_the_modes_and_their_limits() {
        let ok = [
            ("stream", Framing::Stream),
            ("fixed:16", Framing::Fixed(16)),
            ("line", Framing::Line(LINE_MAX)),
            ("line:80", Framing::Line(80)),
            ("length", Framing::Length(LENGTH_MAX)),
            ("length:1K", Framing::Length(1024)),
            ("netstring:0", Framing::Netstring(0)),
        ];
        for (s, f) in ok {
            assert_eq!(s.parse::<Framing>(), Ok(f), "{s}");
            assert_eq!(f.to_string().parse::<Framing>(), Ok(f));
        }
        for bad in [
            "fixed",
            "fixed:0",
            "fixed:65537",
            "line:0",
            "lines",
            "stream:1",
            "",
        ] {
            assert!(bad.parse::<Framing>().is_err(), "{bad}");
        }
    }

    #[test]
    fn start_and_connect_as_the_lecture_has_them() {
        // Two writes may arrive as one read, one message as two reads.
        let f = Framing::Line(LINE_MAX);
        assert_eq!(
            run(f, b"start\nconnect\n", &[]).0,
            msgs(&[b"start\n", b"connect\n"])
        );
        assert_eq!(
            run(f, b"start\nconnect\n", &[3, 9]).0,
            msgs(&[b"start\n", b"connect\n"])
        );
    }

    #[test]
    fn line_edges() {
        let f = Framing::Line(4);
        assert_eq!(
            run(f, b"abcd\r\nx", &[]).0,
            msgs(&[b"abcd\r\n", b"x"]),
            "ending kept, tail answered"
        );
        let (got, e) = run(f, b"ok\nabcde\nnever\n", &[1]);
        assert_eq!(
            got,
            msgs(&[b"ok\n"]),
            "lines before the long one are answered"
        );
        let e = e.expect("too long");
        assert_eq!(e.offset, 3);
        assert!(
            e.to_string()
                .contains("line:4: a line longer than 4 bytes at byte offset 3"),
            "{e}"
        );
        // Never more held than the limit, however the line trickles in.
        let endless = vec![b'a'; 100];
        let (got, e) = run(f, &endless, &(0..100).collect::<Vec<_>>());
        assert!(got.is_empty() && e.is_some());
    }

    #[test]
    fn length_edges() {
        let f = Framing::Length(8);
        let mut input = vec![0, 0, 0, 0];
        input.extend_from_slice(&[0, 0, 0, 3]);
        input.extend_from_slice(b"abc");
        assert_eq!(
            run(f, &input, &[2, 5]).0,
            msgs(&[b"", b"abc"]),
            "L = 0 is a message"
        );
        // Over the limit: closed on the header alone, payload never read.
        let (got, e) = run(f, &[0, 0, 0, 9], &[]);
        assert!(got.is_empty());
        assert!(e.unwrap().what.contains("length of 9 over the limit of 8"));
        let (_, e) = run(Framing::Length(LENGTH_MAX), &[0xff, 0xff, 0xff, 0xff], &[]);
        assert!(e.is_some(), "4 GiB is refused from the header alone");
        let (_, e) = run(f, &[0, 0, 0, 5, b'a'], &[]);
        assert!(e.unwrap().what.contains("end of input inside a message"));
    }

    #[test]
    fn netstring_edges() {
        let f = Framing::Netstring(10);
        assert_eq!(run(f, b"0:,3:abc,", &[4]).0, msgs(&[b"", b"abc"]));
        for bad in [
            &b"03:abc,"[..],
            b"3:abcd",
            b"x:",
            b":abc,",
            b"12345678901:",
            b"11:aaaaaaaaaaa,",
        ] {
            let (got, e) = run(f, bad, &[]);
            assert!(
                got.is_empty() && e.is_some(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let (_, e) = run(f, b"3:ab", &[]);
        assert!(e.unwrap().what.contains("end of input"));
    }

    /// `cargo fuzz run framing` found this in 4 s: one write gave "more
    /// than 10 digits", the same bytes cut after the second gave "leading
    /// zero". The same input gives the same error however it is cut.
    #[test]
    fn a_netstring_error_does_not_depend_on_the_cut() {
        let f = Framing::Netstring(54);
        let input = [b"0".as_slice(), &[b'2'; 20]].concat();
        let whole = run(f, &input, &[]);
        assert!(
            whole.1.as_ref().unwrap().what.contains("leading zero"),
            "{whole:?}"
        );
        for cut in 1..input.len() {
            assert_eq!(run(f, &input, &[cut]), whole, "cut at {cut}");
        }
    }

    /// What a held message may grow to, from what is known of it.
    #[test]
    fn the_bound_of_a_held_message() {
        let bound = |f: Framing, held: &[u8]| {
            let mut d = Decoder::new(f);
            d.decode(&mut held.to_vec(), |_| {}).unwrap();
            (d.held(), d.bound())
        };
        assert_eq!(bound(Framing::Length(100), b""), (0, 0));
        assert_eq!(bound(Framing::Length(100), b"\0\0"), (2, 104));
        assert_eq!(bound(Framing::Length(100), b"\0\0\0\x0aab"), (6, 14));
        assert_eq!(bound(Framing::Line(10), b"abc"), (3, 12));
        assert_eq!(bound(Framing::Fixed(16), b"abc"), (3, 16));
        assert_eq!(bound(Framing::Netstring(50), b"12"), (2, 62));
        assert_eq!(bound(Framing::Netstring(50), b"12:ab"), (5, 16));
        // A message completed gives its memory back.
        let mut d = Decoder::new(Framing::Length(1 << 20));
        let mut big = vec![0u8; 4 + (1 << 20)];
        big[1] = 0x10;
        d.decode(&mut big[..1000].to_vec(), |_| {}).unwrap();
        d.decode(&mut big[1000..].to_vec(), |_| {}).unwrap();
        assert_eq!((d.held(), d.bound(), d.partial.capacity()), (0, 0, 0));
    }

    #[test]
    fn fixed_edges() {
        let f = Framing::Fixed(16);
        let (got, e) = run(f, b"Hi there, serverHi again", &[3]);
        assert_eq!(got, msgs(&[b"Hi there, server"]));
        let e = e.expect("partial at end of input");
        assert!(
            e.to_string()
                .contains("(8 of 16 bytes): not answered at byte offset 16"),
            "{e}"
        );
    }

    fn framing() -> impl Strategy<Value = Framing> {
        prop_oneof![
            (1usize..40).prop_map(Framing::Fixed),
            (1usize..40).prop_map(Framing::Line),
            (0usize..40).prop_map(Framing::Length),
            (0usize..40).prop_map(Framing::Netstring),
        ]
    }

    proptest! {
        /// Any input, cut anywhere, gives what it gives whole: the same
        /// messages and the same error at the same offset.
        #[test]
        fn every_cut_decodes_as_whole(
            f in framing(),
            input in proptest::collection::vec(
                prop_oneof![Just(b'\n'), Just(b':'), Just(b','), Just(0u8), Just(b'3'), any::<u8>()],
                0..300,
            ),
            cuts in proptest::collection::vec(0usize..300, 0..12),
        ) {
            prop_assert_eq!(run(f, &input, &cuts), run(f, &input, &[]));
        }

        /// Encoded messages decode to themselves, cut anywhere.
        #[test]
        fn encode_then_decode(
            f in framing(),
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..8),
            cuts in proptest::collection::vec(0usize..400, 0..12),
        ) {
            let payloads: Vec<Vec<u8>> = payloads.into_iter().map(|mut p| {
                match f {
                    Framing::Fixed(n) => p.resize(n, b'.'),
                    Framing::Line(max) => {
                        p.retain(|&b| b != b'\n');
                        p.truncate(max);
                        p.push(b'\n');
                    }
                    Framing::Length(max) | Framing::Netstring(max) => p.truncate(max),
                    Framing::Stream => {}
                }
                p
            }).collect();
            let mut wire = Vec::new();
            for p in &payloads {
                encode(f, p, &mut wire);
            }
            let (got, e) = run(f, &wire, &cuts);
            prop_assert!(e.is_none(), "{:?}", e);
            prop_assert_eq!(got, payloads);
        }
    }
}
