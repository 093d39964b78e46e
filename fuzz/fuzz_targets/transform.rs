//! The transforms on arbitrary bytes, cut into arbitrary blocks, against
//! trivially correct references: ASCII byte by byte; UTF-8 streamed equals
//! UTF-8 applied to the whole input, in both strictness modes, and on valid
//! text equals `str::to_uppercase`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use upcase::transform::{self, Mode, Transformer};

fn streamed(mode: Mode, data: &[u8], cuts: &[usize]) -> Result<Vec<u8>, transform::InvalidUtf8> {
    let mut t = Transformer::new(mode);
    let mut buf = data.to_vec();
    let mut out = Vec::new();
    let mut start = 0;
    for &end in cuts.iter().chain(std::iter::once(&data.len())) {
        out.extend_from_slice(t.push(&mut buf[start..end])?);
        start = end;
    }
    out.extend_from_slice(t.finish()?);
    Ok(out)
}

fuzz_target!(|input: &[u8]| {
    // The first bytes choose the cuts, the rest is the data.
    let (head, data) = input.split_at(input.len().min(4));
    let mut cuts: Vec<usize> = head.iter().map(|&b| (b as usize * data.len()) / 255).collect();
    cuts.sort_unstable();

    let reference: Vec<u8> = data.iter().map(|b| b.to_ascii_uppercase()).collect();
    assert_eq!(streamed(Mode::Ascii, data, &cuts).unwrap(), reference);

    for strict in [false, true] {
        let mode = Mode::Utf8 { strict };
        assert_eq!(streamed(mode, data, &cuts), transform::apply(mode, data));
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let mode = Mode::Utf8 { strict: true };
        assert_eq!(streamed(mode, data, &cuts).unwrap(), s.to_uppercase().into_bytes());
    } else {
        let lenient = transform::apply(Mode::Utf8 { strict: false }, data).unwrap();
        // Nothing is dropped: every invalid byte is still there.
        assert!(lenient.len() >= data.iter().filter(|b| !b.is_ascii()).count() / 4);
    }
});
