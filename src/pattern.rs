//! The test stream: the seeds' 16-byte message repeated, and its verifier.
//!
//! tcp_deadlock.py sends `capitalize this!` over and over. Byte `i` of the
//! stream is `MESSAGE[i % 16]`, so any position can be generated or checked
//! without state beyond the offset; both sides slice one precomputed buffer,
//! and checking a block is a `memcmp`. In `--utf8` mode the message is
//! [`UTF8_MESSAGE`], whose uppercase form is longer: the reply stream is
//! the uppercased message repeated, with a period of its own.

use crate::transform::{self, Mode};

/// The seeds' 16-byte message.
pub const MESSAGE: &[u8; 16] = b"capitalize this!";

/// The message of `--utf8` streams: Latin, German, French, Greek, a
/// ligature and a letter whose uppercase has two characters.
pub const UTF8_MESSAGE: &str = "capitalize this: straße, élan, ωμέγα, ﬁne ŉ! ";

/// Largest slice [`Pattern::slice`] hands out at once.
pub const MAX_SLICE: usize = 256 * 1024;

/// A precomputed run of a repeated message (or of its uppercase form).
#[derive(Clone)]
pub struct Pattern {
    buf: Vec<u8>,
    period: usize,
}

impl Pattern {
    /// `msg` repeated.
    pub fn repeat(msg: &[u8]) -> Self {
        assert!(!msg.is_empty());
        Pattern {
            buf: msg
                .iter()
                .copied()
                .cycle()
                .take(MAX_SLICE + msg.len())
                .collect(),
            period: msg.len(),
        }
    }

    /// The stream the client sends.
    pub fn plain() -> Self {
        Self::repeat(MESSAGE)
    }

    /// The stream the server must send back.
    pub fn upper() -> Self {
        Self::repeat(&transform::upper(MESSAGE))
    }

    /// The request and expected reply streams for a transform mode.
    pub fn pair(mode: Mode) -> (Pattern, Pattern) {
        match mode {
            Mode::Ascii => (Self::plain(), Self::upper()),
            Mode::Utf8 { .. } => {
                let up = transform::apply(mode, UTF8_MESSAGE.as_bytes()).expect("valid text");
                (Self::repeat(UTF8_MESSAGE.as_bytes()), Self::repeat(&up))
            }
        }
    }

    /// Bytes in one repetition.
    pub fn period(&self) -> usize {
        self.period
    }

    /// The stream's bytes from `offset`, at most `max` (and [`MAX_SLICE`]) long.
    pub fn slice(&self, offset: u64, max: usize) -> &[u8] {
        let start = (offset % self.period as u64) as usize;
        &self.buf[start..start + max.min(MAX_SLICE)]
    }
}

/// Checks a received stream against the expected one, block by block.
pub struct Verifier {
    expected: Pattern,
    received: u64,
    wrong: u64,
    first_wrong: Option<u64>,
}

impl Verifier {
    /// Verifies replies to the seeds' stream.
    pub fn new() -> Self {
        Self::against(Pattern::upper())
    }

    /// Verifies a reply that must be `expected`.
    pub fn against(expected: Pattern) -> Self {
        Verifier {
            expected,
            received: 0,
            wrong: 0,
            first_wrong: None,
        }
    }

    /// Checks the next bytes of the reply.
    pub fn check(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let want = self.expected.slice(self.received, data.len());
            let (now, rest) = data.split_at(want.len());
            if now != want {
                for (i, (a, b)) in now.iter().zip(want).enumerate() {
                    if a != b {
                        self.wrong += 1;
                        self.first_wrong.get_or_insert(self.received + i as u64);
                    }
                }
            }
            self.received += now.len() as u64;
            data = rest;
        }
    }

    pub fn received(&self) -> u64 {
        self.received
    }

    /// Bytes that differ from what was expected at their position.
    pub fn wrong(&self) -> u64 {
        self.wrong
    }

    /// Offset of the first wrong byte, if any.
    pub fn first_wrong(&self) -> Option<u64> {
        self.first_wrong
    }
}

impl Default for Verifier {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_follow_the_period() {
        let p = Pattern::plain();
        assert_eq!(p.slice(0, 32), b"capitalize this!capitalize this!");
        assert_eq!(p.slice(3, 5), b"itali");
        assert_eq!(p.slice(17, 4), b"apit");
        assert_eq!(p.slice(0, usize::MAX).len(), MAX_SLICE);
    }

    #[test]
    fn verifier_counts_wrong_bytes_at_any_split() {
        let mut reply = Pattern::upper().slice(0, 1000).to_vec();
        reply[5] = b'x';
        reply[700] = b'?';
        for split in [1, 7, 16, 333, 999] {
            let mut v = Verifier::new();
            for block in reply.chunks(split) {
                v.check(block);
            }
            assert_eq!(
                (v.received(), v.wrong(), v.first_wrong()),
                (1000, 2, Some(5))
            );
        }
    }

    #[test]
    fn utf8_pair_has_its_own_periods() {
        let (req, rep) = Pattern::pair(Mode::Utf8 { strict: true });
        assert_eq!(req.period(), UTF8_MESSAGE.len());
        let up = std::str::from_utf8(rep.slice(0, rep.period())).unwrap();
        assert_eq!(up, "CAPITALIZE THIS: STRASSE, ÉLAN, ΩΜΈΓΑ, FINE ʼN! ");
    }

    #[test]
    fn plain_stream_is_not_a_valid_reply() {
        let mut v = Verifier::new();
        v.check(Pattern::plain().slice(0, 16));
        assert_eq!(v.wrong(), 14); // every lowercase letter of the message
    }
}
