//! Routing rates: sparse keys to shards, and dense chunks to shards.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ps_common::partition::{chunk_range, chunk_shard, key_shard, num_chunks};

const KEYS: usize = 1 << 20;
const SHARDS: u32 = 8;

fn keys(c: &mut Criterion) {
    // Sequential ids: the worst case for a weak hash, the common one in data.
    let keys: Vec<u64> = (0..KEYS as u64).collect();
    let mut counts = [0u32; SHARDS as usize];
    let mut group = c.benchmark_group("partition/key_shard_1m");
    group.throughput(Throughput::Elements(KEYS as u64));
    group.bench_function("8_shards", |b| {
        b.iter(|| {
            for &k in black_box(&keys) {
                counts[key_shard(k, SHARDS) as usize] += 1;
            }
        })
    });
    group.finish();
    black_box(counts);
}

fn chunks(c: &mut Criterion) {
    // A 64M-float tensor in chunks of 1024: 65,536 chunks to route and cut.
    let (len, chunk_len) = (1usize << 26, 1usize << 10);
    let n = num_chunks(len, chunk_len);
    let mut group = c.benchmark_group("partition/chunk_routing_64k_chunks");
    group.throughput(Throughput::Elements(n as u64));
    group.bench_function("8_shards", |b| {
        b.iter(|| {
            let mut loads = [0usize; SHARDS as usize];
            for i in 0..n {
                let shard = chunk_shard(black_box("layer0.weight"), i as u32, SHARDS);
                loads[shard as usize] += chunk_range(len, chunk_len, i).len();
            }
            loads
        })
    });
    group.finish();
}

criterion_group!(benches, keys, chunks);
criterion_main!(benches);
