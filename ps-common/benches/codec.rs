//! Wire codecs: f32 values and u64 keys to and from little-endian bytes,
//! each group beside a memcpy of the same bytes.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ps_common::codec;

/// 1M values: 4 MiB of f32, as in `ps-cluster bench`'s transport figures.
const N: usize = 1 << 20;

fn f32_values(c: &mut Criterion) {
    let values: Vec<f32> = (0..N).map(|i| i as f32 * 0.5).collect();
    let bytes = codec::encode_f32(&values);
    let mut out = vec![0.0f32; N];
    let mut copy = vec![0u8; N * 4];
    let mut group = c.benchmark_group("codec/f32_4mib");
    group.throughput(Throughput::Bytes((N * 4) as u64));
    group.bench_function("memcpy", |b| b.iter(|| copy.copy_from_slice(black_box(&bytes))));
    group.bench_function("encode", |b| b.iter(|| codec::encode_f32(black_box(&values))));
    group.bench_function("decode_into", |b| {
        b.iter(|| codec::decode_f32_into("values", black_box(&bytes), &mut out).unwrap())
    });
    group.bench_function("decode", |b| b.iter(|| codec::decode_f32("values", black_box(&bytes)).unwrap()));
    group.finish();
}

fn u64_keys(c: &mut Criterion) {
    let keys: Vec<u64> = (0..N as u64 / 2).map(|k| k.wrapping_mul(0x9e37_79b9_7f4a_7c15)).collect();
    let bytes = codec::encode_u64(&keys);
    let mut copy = vec![0u8; bytes.len()];
    let mut group = c.benchmark_group("codec/u64_4mib");
    group.throughput(Throughput::Bytes(bytes.len() as u64));
    group.bench_function("memcpy", |b| b.iter(|| copy.copy_from_slice(black_box(&bytes))));
    group.bench_function("encode", |b| b.iter(|| codec::encode_u64(black_box(&keys))));
    group.bench_function("decode", |b| b.iter(|| codec::decode_u64("keys", black_box(&bytes)).unwrap()));
    group.finish();
}

criterion_group!(benches, f32_values, u64_keys);
criterion_main!(benches);
