//! The `--utf8` transform: full Unicode uppercase, streaming.
//!
//! Python 3's `str.upper()` maps `é` to `É`, `ß` to `SS` and `ﬁ` to `FI`;
//! the seeds' byte-wise transform leaves them alone. Rust's
//! [`char::to_uppercase`] applies the same full (unconditional) mappings of
//! Unicode's SpecialCasing, for the Unicode version in
//! [`char::UNICODE_VERSION`].
//!
//! A block boundary may cut a character in two. [`Utf8Upper`] keeps the
//! unfinished tail of a block (at most 3 bytes: a proper prefix of a 4-byte
//! character) and completes it with the next block, so the output is the
//! same as if the whole stream had been transformed at once, wherever the
//! cuts fall. Invalid UTF-8 is passed through byte for byte, split into the
//! same "maximal subparts" `std::str::from_utf8` reports (a rule that looks
//! at most 4 bytes ahead, so it too is unaffected by cuts); in strict mode it
//! is an error that names its offset in the stream. At end of input an
//! unfinished tail is handled as invalid.

use std::str;

/// An invalid sequence in strict mode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid UTF-8 at byte offset {offset}")]
pub struct InvalidUtf8 {
    /// Offset of the first invalid byte in the whole stream.
    pub offset: u64,
}

/// Streaming UTF-8 uppercase state for one stream.
#[derive(Debug, Clone, Default)]
pub struct Utf8Upper {
    strict: bool,
    /// The unfinished character at the end of the last block.
    tail: [u8; 4],
    tail_len: usize,
    /// Bytes consumed before the current block (for error offsets).
    consumed: u64,
    out: Vec<u8>,
}

impl Utf8Upper {
    pub fn new(strict: bool) -> Self {
        Utf8Upper {
            strict,
            ..Default::default()
        }
    }

    /// Transforms the next block. The ASCII-only block with nothing pending
    /// (most text) is uppercased in place and handed back: no copy.
    pub fn push<'a>(&'a mut self, block: &'a mut [u8]) -> Result<&'a [u8], InvalidUtf8> {
        // Uppercasing ASCII letters never changes other bytes, and the full
        // mapping agrees with it on ASCII, so this pass is never wasted: a
        // block that turns out not to be ASCII is decoded as it now is.
        if super::ascii::upper_in_place_is_ascii(block) && self.tail_len == 0 {
            self.consumed += block.len() as u64;
            return Ok(block);
        }
        self.out.clear();
        let mut rest: &[u8] = block;
        if self.tail_len > 0 {
            rest = self.finish_tail(rest)?;
        }
        let base = self.consumed;
        self.decode(rest, base)?;
        Ok(&self.out)
    }

    /// End of input: an unfinished character left over is invalid.
    pub fn finish(&mut self) -> Result<&[u8], InvalidUtf8> {
        self.out.clear();
        if self.tail_len > 0 {
            if self.strict {
                return Err(InvalidUtf8 {
                    offset: self.consumed,
                });
            }
            self.out.extend_from_slice(&self.tail[..self.tail_len]);
            self.consumed += self.tail_len as u64;
            self.tail_len = 0;
        }
        Ok(&self.out)
    }

    /// Completes the pending tail with the first bytes of `input`; returns
    /// the rest of `input` to decode.
    fn finish_tail<'b>(&mut self, input: &'b [u8]) -> Result<&'b [u8], InvalidUtf8> {
        let pend = self.tail_len;
        let take = input.len().min(4 - pend);
        let mut tmp = [0u8; 8];
        tmp[..pend].copy_from_slice(&self.tail[..pend]);
        tmp[pend..pend + take].copy_from_slice(&input[..take]);
        let unit = &tmp[..pend + take];
        let used = match str::from_utf8(unit) {
            Ok(s) => {
                // All of `unit` is valid: it holds the completed character
                // and maybe more; upper only the first character here.
                let c = s.chars().next().expect("non-empty");
                push_upper(&mut self.out, c);
                c.len_utf8()
            }
            Err(e) if e.valid_up_to() > 0 => {
                let s = str::from_utf8(&unit[..e.valid_up_to()]).expect("valid prefix");
                let c = s.chars().next().expect("non-empty");
                push_upper(&mut self.out, c);
                c.len_utf8()
            }
            Err(e) => match e.error_len() {
                Some(n) => {
                    if self.strict {
                        return Err(InvalidUtf8 {
                            offset: self.consumed,
                        });
                    }
                    self.out.extend_from_slice(&unit[..n]);
                    n
                }
                None => {
                    // Still unfinished: the whole input was too short.
                    self.tail[pend..pend + take].copy_from_slice(&input[..take]);
                    self.tail_len = pend + take;
                    return Ok(&input[take..]);
                }
            },
        };
        // A pending tail is a valid prefix, so its unit covers all of it.
        debug_assert!(used >= pend);
        self.tail_len = 0;
        self.consumed += used as u64;
        Ok(&input[used - pend..])
    }

    fn decode(&mut self, mut rest: &[u8], mut offset: u64) -> Result<(), InvalidUtf8> {
        while !rest.is_empty() {
            match str::from_utf8(rest) {
                Ok(s) => {
                    upper_str(&mut self.out, s);
                    offset += rest.len() as u64;
                    rest = &[];
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // SAFETY-free: from_utf8 just said this prefix is valid.
                    let s = str::from_utf8(&rest[..valid]).expect("valid prefix");
                    upper_str(&mut self.out, s);
                    match e.error_len() {
                        Some(n) => {
                            if self.strict {
                                return Err(InvalidUtf8 {
                                    offset: offset + valid as u64,
                                });
                            }
                            self.out.extend_from_slice(&rest[valid..valid + n]);
                            offset += (valid + n) as u64;
                            rest = &rest[valid + n..];
                        }
                        None => {
                            let t = &rest[valid..];
                            self.tail[..t.len()].copy_from_slice(t);
                            self.tail_len = t.len();
                            offset += valid as u64;
                            rest = &[];
                        }
                    }
                }
            }
        }
        self.consumed = offset;
        Ok(())
    }
}

/// Uppercases valid text into `out`: ASCII runs a block at a time, other
/// characters through the Unicode tables.
fn upper_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let run = bytes[i..]
            .iter()
            .position(|b| !b.is_ascii())
            .unwrap_or(bytes.len() - i);
        if run > 0 {
            let start = out.len();
            out.extend_from_slice(&bytes[i..i + run]);
            super::ascii::upper_in_place(&mut out[start..]);
            i += run;
            continue;
        }
        // A non-ASCII character starts at i (s is valid, i is a boundary).
        if let Some(&(len, ref up)) = two_byte_table().get(two_byte_index(&bytes[i..])) {
            // Latin, Greek, Cyrillic, Armenian, Hebrew, Arabic...: a table
            // lookup instead of a search of the case tables.
            out.extend_from_slice(&up[..len as usize]);
            i += 2;
            continue;
        }
        let c = s[i..].chars().next().expect("boundary");
        push_upper(out, c);
        i += c.len_utf8();
    }
}

/// Index of a two-byte character (U+0080..U+07FF) in [`two_byte_table`],
/// or an index past its end for any other sequence.
#[inline]
fn two_byte_index(b: &[u8]) -> usize {
    match b {
        [b0 @ 0xC2..=0xDF, b1, ..] => (((*b0 as usize) & 0x1F) << 6 | (*b1 as usize & 0x3F)) - 0x80,
        _ => usize::MAX,
    }
}

/// The uppercase (UTF-8, at most 6 bytes) of every two-byte character,
/// computed once from the same `char::to_uppercase`.
fn two_byte_table() -> &'static [(u8, [u8; 6])] {
    static TABLE: std::sync::OnceLock<Vec<(u8, [u8; 6])>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        (0x80u32..0x800)
            .map(|cp| {
                let mut v = Vec::with_capacity(6);
                push_upper(&mut v, char::from_u32(cp).expect("not a surrogate"));
                let mut a = [0u8; 6];
                a[..v.len()].copy_from_slice(&v);
                (v.len() as u8, a)
            })
            .collect()
    })
}

#[inline]
fn push_upper(out: &mut Vec<u8>, c: char) {
    let mut buf = [0u8; 4];
    for u in c.to_uppercase() {
        out.extend_from_slice(u.encode_utf8(&mut buf).as_bytes());
    }
}

/// Transforms a whole input at once (the reference the streaming form must
/// match, and what UDP uses per datagram).
pub fn upper_all(input: &[u8], strict: bool) -> Result<Vec<u8>, InvalidUtf8> {
    let mut t = Utf8Upper::new(strict);
    let mut buf = input.to_vec();
    let mut out = t.push(&mut buf)?.to_vec();
    out.extend_from_slice(t.finish()?);
    Ok(out)
}

impl From<InvalidUtf8> for std::io::Error {
    fn from(e: InvalidUtf8) -> Self {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn stream(input: &[u8], cuts: &[usize], strict: bool) -> Result<Vec<u8>, InvalidUtf8> {
        let mut t = Utf8Upper::new(strict);
        let mut out = Vec::new();
        let mut buf = input.to_vec();
        let mut start = 0;
        for &end in cuts.iter().chain(std::iter::once(&input.len())) {
            out.extend_from_slice(t.push(&mut buf[start..end])?);
            start = end;
        }
        out.extend_from_slice(t.finish()?);
        Ok(out)
    }

    #[test]
    fn special_cases_change_length() {
        assert_eq!(
            upper_all("straße ﬁne ŉ é ω".as_bytes(), true).unwrap(),
            "STRASSE FINE ʼN É Ω".as_bytes()
        );
    }

    #[test]
    fn every_cut_of_every_width() {
        let text = "aé€𝄞ß".as_bytes(); // 1-, 2-, 3-, 4-byte characters
        let whole = upper_all(text, true).unwrap();
        for i in 0..=text.len() {
            for j in i..=text.len() {
                assert_eq!(stream(text, &[i, j], true).unwrap(), whole, "cuts {i} {j}");
            }
        }
        // One byte at a time.
        let cuts: Vec<usize> = (1..text.len()).collect();
        assert_eq!(stream(text, &cuts, true).unwrap(), whole);
    }

    #[test]
    fn invalid_bytes_pass_through_or_fail_with_offset() {
        let cases: &[&[u8]] = &[
            b"ab\x80cd",         // stray continuation
            b"ab\xc0\xafcd",     // overlong
            b"ab\xed\xa0\x80cd", // surrogate
            b"ab\xe2\x82",       // truncated at the end
            b"ab\xf0\x9f\x98x",  // truncated in the middle
            b"\xff\xfe",         // never valid
        ];
        for &c in cases {
            let lenient = upper_all(c, false).unwrap();
            assert_eq!(lenient.len(), c.len(), "{c:?}: nothing dropped or added");
            // Invalid bytes are exactly where they were; ASCII uppercased.
            for (a, b) in c.iter().zip(&lenient) {
                assert!(a == b || a.to_ascii_uppercase() == *b, "{c:?}");
            }
            let err = upper_all(c, true).unwrap_err();
            assert_eq!(
                err.offset,
                c.iter().position(|b| !b.is_ascii()).unwrap() as u64,
                "{c:?}"
            );
            // The same at every cut.
            for i in 0..=c.len() {
                assert_eq!(stream(c, &[i], false).unwrap(), lenient, "{c:?} cut {i}");
                assert_eq!(stream(c, &[i], true).unwrap_err(), err, "{c:?} cut {i}");
            }
        }
    }

    #[test]
    fn the_pending_tail_is_at_most_three_bytes() {
        let mut t = Utf8Upper::new(false);
        let mut b = *b"x\xf0\x9f\x98";
        assert_eq!(t.push(&mut b).unwrap(), b"X");
        assert_eq!(t.tail_len, 3);
        let mut b = *b"\x80";
        assert_eq!(t.push(&mut b).unwrap(), "😀".as_bytes());
        assert_eq!(t.tail_len, 0);
    }

    proptest! {
        #[test]
        fn matches_to_uppercase_on_valid_text(s in "\\PC{0,200}", cuts in proptest::collection::vec(0usize..800, 0..6)) {
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(s.len())).collect();
            cuts.sort_unstable();
            let got = stream(s.as_bytes(), &cuts, true).unwrap();
            prop_assert_eq!(got, s.to_uppercase().into_bytes());
        }

        #[test]
        fn any_bytes_any_cuts_equal_the_whole(data in proptest::collection::vec(any::<u8>(), 0..300), cuts in proptest::collection::vec(0usize..300, 0..6)) {
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(data.len())).collect();
            cuts.sort_unstable();
            let whole = upper_all(&data, false).unwrap();
            prop_assert_eq!(stream(&data, &cuts, false).unwrap(), whole);
            let strict_whole = upper_all(&data, true);
            prop_assert_eq!(stream(&data, &cuts, true), strict_whole);
        }
    }
}
