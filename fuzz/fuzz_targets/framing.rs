//! The framing decoders never panic, never hold more than a message's limit
//! plus its header, and find the same messages (and the same error at the
//! same offset) however the input is cut into reads.
#![no_main]

use libfuzzer_sys::fuzz_target;
use upcase::framing::{Decoder, Framing};

fn run(framing: Framing, input: &[u8], step: usize) -> (Vec<Vec<u8>>, Option<String>) {
    let mut d = Decoder::new(framing);
    let mut msgs = Vec::new();
    for piece in input.chunks(step.max(1)) {
        let mut piece = piece.to_vec();
        if let Err(e) = d.decode(&mut piece, |m| msgs.push(m.to_vec())) {
            return (msgs, Some(e.to_string()));
        }
        assert!(d.held() <= 64 + 12, "held {} bytes", d.held());
    }
    match d.finish() {
        Ok(Some(tail)) => msgs.push(tail),
        Ok(None) => {}
        Err(e) => return (msgs, Some(e.to_string())),
    }
    (msgs, None)
}

fuzz_target!(|data: &[u8]| {
    let Some((&head, input)) = data.split_first() else { return };
    let framing = match head % 4 {
        0 => Framing::Fixed(1 + (head as usize >> 2) % 64),
        1 => Framing::Line(1 + (head as usize >> 2) % 64),
        2 => Framing::Length((head as usize >> 2) % 64),
        _ => Framing::Netstring((head as usize >> 2) % 64),
    };
    let whole = run(framing, input, input.len());
    for step in [1, 2, 3, 7] {
        assert_eq!(run(framing, input, step), whole);
    }
});
