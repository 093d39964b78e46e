//! The transforms against memcpy on the same blocks: the transform touches
//! every byte the service moves, so it should cost about what a copy does.
//! The UTF-8 mode is measured on ASCII text (where it should keep up with
//! the ASCII mode) and on mixed text.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use upcase::pattern::{MESSAGE, UTF8_MESSAGE};
use upcase::transform::{self, Mode, Transformer};

fn text(msg: &[u8], size: usize) -> Vec<u8> {
    msg.iter().copied().cycle().take(size).collect()
}

fn bench(c: &mut Criterion) {
    for size in [1024usize, 64 * 1024, 1024 * 1024] {
        let src = text(MESSAGE, size);
        let mut dst = vec![0u8; size];
        let mut g = c.benchmark_group(format!("{}K", size / 1024));
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function("memcpy", |b| {
            b.iter(|| dst.copy_from_slice(black_box(&src)))
        });
        g.bench_function("upper_into", |b| {
            b.iter(|| transform::upper_into(black_box(&src), &mut dst))
        });
        g.bench_function("upper_in_place", |b| {
            b.iter(|| transform::upper_in_place(black_box(&mut dst)))
        });
        g.finish();
    }

    // Per block as the server sees it: 256 KiB reads through a Transformer.
    let size = 256 * 1024;
    let ascii = text(MESSAGE, size);
    // Whole messages only, so blocks hold no cut characters.
    let n = size / UTF8_MESSAGE.len();
    let mixed = UTF8_MESSAGE.repeat(n).into_bytes();
    let mut g = c.benchmark_group("transformer-256K");
    for (name, mode, input) in [
        ("ascii-mode/ascii-text", Mode::Ascii, &ascii),
        ("utf8-mode/ascii-text", Mode::Utf8 { strict: false }, &ascii),
        ("utf8-mode/mixed-text", Mode::Utf8 { strict: false }, &mixed),
    ] {
        g.throughput(Throughput::Bytes(input.len() as u64));
        let mut t = Transformer::new(mode);
        let mut buf = input.clone();
        g.bench_function(name, |b| {
            b.iter(|| {
                buf.copy_from_slice(input);
                black_box(t.push(&mut buf).expect("valid").len())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
