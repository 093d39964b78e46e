//! The transform: what the service does to the bytes. Pure, no I/O.
//!
//! Two modes: [`ascii`], the seeds' byte-wise `bytes.upper()` (the default),
//! and [`utf8`], Python 3's `str.upper()` on a stream of UTF-8.
//!
//! [`Transformer`] is the streaming interface every server model and client
//! calls. It is stateful so that the UTF-8 mode, which must carry an
//! unfinished character from one block to the next, fits behind the same two
//! calls: [`Transformer::push`] for each block read, [`Transformer::finish`]
//! at end of file.

pub mod ascii;
pub mod utf8;

pub use ascii::{upper, upper_in_place, upper_into};
pub use utf8::InvalidUtf8;

/// Which transform a connection applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// The seeds' byte-wise ASCII uppercase; length-preserving.
    #[default]
    Ascii,
    /// Full Unicode uppercase of UTF-8 text. Invalid sequences pass through,
    /// or with `strict` end the stream with an error.
    Utf8 { strict: bool },
}

/// A streaming transform for one connection (or one datagram).
#[derive(Debug, Clone)]
pub enum Transformer {
    Ascii,
    /// Boxed: its state is five times the size of a whole ASCII
    /// connection's, and most connections are ASCII.
    Utf8(Box<utf8::Utf8Upper>),
}

impl Transformer {
    pub fn new(mode: Mode) -> Self {
        match mode {
            Mode::Ascii => Transformer::Ascii,
            Mode::Utf8 { strict } => Transformer::Utf8(Box::new(utf8::Utf8Upper::new(strict))),
        }
    }

    /// Transforms one block just read and returns the bytes to send. The
    /// ASCII mode (and the UTF-8 mode on ASCII text) works in place and
    /// hands `block` back, so the hot path neither allocates nor copies.
    /// Only strict UTF-8 fails.
    #[inline]
    pub fn push<'a>(&'a mut self, block: &'a mut [u8]) -> Result<&'a [u8], InvalidUtf8> {
        match self {
            Transformer::Ascii => {
                upper_in_place(block);
                Ok(block)
            }
            Transformer::Utf8(u) => u.push(block),
        }
    }

    /// Called at end of input: the bytes still owed.
    pub fn finish(&mut self) -> Result<&[u8], InvalidUtf8> {
        match self {
            Transformer::Ascii => Ok(&[]),
            Transformer::Utf8(u) => u.finish(),
        }
    }
}

/// Transforms a whole input (a datagram, a chat line) at once.
pub fn apply(mode: Mode, input: &[u8]) -> Result<Vec<u8>, InvalidUtf8> {
    match mode {
        Mode::Ascii => Ok(upper(input)),
        Mode::Utf8 { strict } => utf8::upper_all(input, strict),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Trivially correct reference: the definition, byte by byte.
    fn reference(b: u8) -> u8 {
        if b.is_ascii_lowercase() { b - 32 } else { b }
    }

    #[test]
    fn seed_example() {
        assert_eq!(upper(b"capitalize this!"), b"CAPITALIZE THIS!");
    }

    #[test]
    fn every_byte_value() {
        let all: Vec<u8> = (0..=255).collect();
        let got = upper(&all);
        for (i, &b) in all.iter().enumerate() {
            assert_eq!(got[i], reference(b), "byte {b:#04x}");
        }
        // Non-ASCII bytes (UTF-8 pieces of é, ß, ω) pass through untouched.
        assert_eq!(upper("é ß ω".as_bytes()), "é ß ω".as_bytes());
    }

    proptest! {
        #[test]
        fn matches_reference_across_block_splits(
            data in proptest::collection::vec(any::<u8>(), 0..4096),
            cuts in proptest::collection::vec(0usize..4096, 0..8),
        ) {
            let expect: Vec<u8> = data.iter().map(|&b| reference(b)).collect();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(data.len())).collect();
            cuts.sort_unstable();
            let mut t = Transformer::new(Mode::Ascii);
            let mut out = Vec::new();
            let mut buf = data.clone();
            let mut start = 0;
            for end in cuts.into_iter().chain(std::iter::once(data.len())) {
                out.extend_from_slice(t.push(&mut buf[start..end]).unwrap());
                start = end;
            }
            out.extend_from_slice(t.finish().unwrap());
            prop_assert_eq!(&out, &expect);

            let mut dst = vec![0; data.len()];
            upper_into(&data, &mut dst);
            prop_assert_eq!(dst, expect);
        }
    }
}
