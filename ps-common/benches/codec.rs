//! Wire codecs: f32 values and u64 keys to and from little-endian bytes,
//! and the lossy codecs of `compress` (per 1M gradient values, with error
//! feedback), each group beside a memcpy of the same bytes.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ps_common::codec;
use ps_common::compress::{self, Codec};

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

/// Each push codec on 1M values in chunks of 16384 (the reference run's
/// chunk length): encode alone, encode with error feedback, and decode.
fn lossy(c: &mut Criterion) {
    const CHUNK: usize = 16_384;
    let values: Vec<f32> = (0..N).map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-3).collect();
    let mut copy = vec![0u8; N * 4];
    let f32_bytes = codec::encode_f32(&values);
    let mut group = c.benchmark_group("codec/lossy_1m_values");
    group.throughput(Throughput::Elements(N as u64));
    group.bench_function("memcpy_f32", |b| b.iter(|| copy.copy_from_slice(black_box(&f32_bytes))));
    let codecs = [
        Codec::F32,
        Codec::F16,
        Codec::Bf16,
        Codec::Int8 { stochastic: false },
        Codec::Int8 { stochastic: true },
        Codec::TopK { ratio: 0.01 },
    ];
    for codec in codecs {
        let name = codec.to_string().replace([' ', '(', ')'], "_");
        let mut out = Vec::with_capacity(N * 4 + 64);
        group.bench_function(format!("{name}/encode"), |b| {
            b.iter(|| {
                out.clear();
                for chunk in values.chunks(CHUNK) {
                    compress::encode(codec, black_box(chunk), chunk.len(), 1, &mut out);
                }
            })
        });
        let mut residual = vec![0.0f32; N];
        group.bench_function(format!("{name}/encode_with_feedback"), |b| {
            b.iter(|| {
                out.clear();
                for (chunk, r) in values.chunks(CHUNK).zip(residual.chunks_mut(CHUNK)) {
                    compress::encode_with_feedback(codec, black_box(chunk), r, chunk.len(), 1, &mut out)
                        .unwrap();
                }
            })
        });
        let encoded: Vec<Vec<u8>> = values
            .chunks(CHUNK)
            .map(|chunk| {
                let mut e = Vec::new();
                compress::encode(codec, chunk, chunk.len(), 1, &mut e);
                e
            })
            .collect();
        let mut back = vec![0.0f32; N];
        group.bench_function(format!("{name}/decode"), |b| {
            b.iter(|| {
                for (e, o) in encoded.iter().zip(back.chunks_mut(CHUNK)) {
                    compress::decode_into(codec.kind(), "values", black_box(e), o.len(), o).unwrap();
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, f32_values, u64_keys, lossy);
criterion_main!(benches);
