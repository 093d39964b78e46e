//! The transform: what the service does to the bytes. Pure, no I/O.
//!
//! The seeds call Python's `bytes.upper()`: `a`..=`z` become `A`..=`Z`, every
//! other byte is left alone, and the length never changes. That runs on every
//! byte the service moves, so it is written to vectorise: a branch-free
//! select per byte that LLVM turns into SIMD compares and masks (measured
//! against `memcpy` in `benches/transform.rs`).
//!
//! [`Transformer`] is the streaming interface every server model and client
//! calls. It is stateful so that a mode which must carry bytes from one
//! block to the next (UTF-8, where a block boundary can cut a character in
//! two) fits behind the same two calls: [`Transformer::push`] for each block
//! read, [`Transformer::finish`] at end of file.

/// Uppercases ASCII letters in place; other bytes are unchanged.
#[inline]
pub fn upper_in_place(buf: &mut [u8]) {
    for b in buf.iter_mut() {
        // 0x20 is the case bit; subtracting it only from a..=z keeps every
        // other byte (including non-ASCII) as it was.
        let is_lower = b.wrapping_sub(b'a') < 26;
        *b -= (is_lower as u8) << 5;
    }
}

/// Uppercases `src` into `dst` (same length), for callers that must keep the
/// original (the client's verifier). One pass, no separate copy.
#[inline]
pub fn upper_into(src: &[u8], dst: &mut [u8]) {
    assert_eq!(src.len(), dst.len(), "upper_into: lengths differ");
    for (d, &s) in dst.iter_mut().zip(src) {
        let is_lower = s.wrapping_sub(b'a') < 26;
        *d = s - ((is_lower as u8) << 5);
    }
}

/// Returns an uppercased copy: for tests, the chat client and UDP replies.
pub fn upper(src: &[u8]) -> Vec<u8> {
    let mut v = src.to_vec();
    upper_in_place(&mut v);
    v
}

/// Which transform a connection applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// The seeds' byte-wise ASCII uppercase; length-preserving.
    #[default]
    Ascii,
}

/// A streaming transform for one connection (or one datagram).
#[derive(Debug, Clone, Default)]
pub struct Transformer {
    mode: Mode,
}

impl Transformer {
    pub fn new(mode: Mode) -> Self {
        Transformer { mode }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Transforms one block just read and returns the bytes to send. The
    /// ASCII mode works in place and hands `block` back, so the hot path
    /// neither allocates nor copies.
    #[inline]
    pub fn push<'a>(&'a mut self, block: &'a mut [u8]) -> &'a [u8] {
        match self.mode {
            Mode::Ascii => {
                upper_in_place(block);
                block
            }
        }
    }

    /// Called at end of input: the bytes still owed (none in ASCII mode).
    pub fn finish(&mut self) -> &[u8] {
        match self.mode {
            Mode::Ascii => &[],
        }
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
                out.extend_from_slice(t.push(&mut buf[start..end]));
                start = end;
            }
            out.extend_from_slice(t.finish());
            prop_assert_eq!(&out, &expect);

            let mut dst = vec![0; data.len()];
            upper_into(&data, &mut dst);
            prop_assert_eq!(dst, expect);
        }
    }
}
