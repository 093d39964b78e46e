//! The transform against memcpy on the same blocks: the transform touches
//! every byte the service moves, so it should cost about what a copy does.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use upcase::pattern::Pattern;
use upcase::transform;

fn bench(c: &mut Criterion) {
    for size in [1024usize, 64 * 1024, 1024 * 1024] {
        let src: Vec<u8> = Pattern::plain()
            .slice(0, 16)
            .iter()
            .copied()
            .cycle()
            .take(size)
            .collect();
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
}

criterion_group!(benches, bench);
criterion_main!(benches);
