//! The seeds' transform, Python's `bytes.upper()`: `a`..=`z` become
//! `A`..=`Z`, every other byte is left alone, the length never changes.
//!
//! It runs on every byte the service moves, so it is written to vectorise:
//! a branch-free select per byte that LLVM turns into SIMD compares and
//! masks (measured against `memcpy` in `benches/transform.rs`).

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

/// Uppercases in place and tells whether every byte was ASCII, in one pass
/// (the UTF-8 mode's fast path: ASCII text costs it no second scan).
#[inline]
pub fn upper_in_place_is_ascii(buf: &mut [u8]) -> bool {
    let mut seen = 0u8;
    for b in buf.iter_mut() {
        seen |= *b;
        let is_lower = b.wrapping_sub(b'a') < 26;
        *b -= (is_lower as u8) << 5;
    }
    seen < 0x80
}

/// Uppercases `src` into `dst` (same length), for callers that must keep the
/// original. One pass, no separate copy.
#[inline]
pub fn upper_into(src: &[u8], dst: &mut [u8]) {
    assert_eq!(src.len(), dst.len(), "upper_into: lengths differ");
    for (d, &s) in dst.iter_mut().zip(src) {
        let is_lower = s.wrapping_sub(b'a') < 26;
        *d = s - ((is_lower as u8) << 5);
    }
}

/// Returns an uppercased copy.
pub fn upper(src: &[u8]) -> Vec<u8> {
    let mut v = src.to_vec();
    upper_in_place(&mut v);
    v
}
