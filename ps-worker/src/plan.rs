//! Routing of a batch of sparse keys: its distinct keys, grouped by the
//! shard that owns them, and where each came from in the batch.
//!
//! A batch is deduplicated because a shard refuses a request that names a
//! key twice (each row is updated once per push; repeated gradients are
//! summed by the client). One hash map of every key of a 1M-key batch missed
//! the cache on nearly every key and was a sixth of a sparse pull's time
//! (docs/PERFORMANCE.md). Here the keys are scattered into buckets by shard
//! and the top bits of their routing hash (two sequential passes), and each
//! bucket (a few thousand keys) is deduplicated with one small map that
//! stays in cache. A shard's distinct keys are laid out bucket by bucket:
//! there are at least as many buckets as the shard has lock stripes
//! (`partition::STRIPE_BITS`), so its request comes in the order its store
//! groups keys in, and the store reads the request and writes its answer
//! front to back. The caller's rows are visited out of order instead, on
//! the client, where each is asked for a few rows ahead.

use std::ops::Range;

use hashbrown::hash_map::Entry;
use ps_common::partition::{STRIPE_BITS, hash_shard, splitmix64};

use crate::error::{Error, Result};

/// Keys a bucket holds on average: its map stays in the L1/L2 cache.
const BUCKET_KEYS: usize = 4096;

#[derive(Debug)]
pub(crate) struct SparsePlan {
    /// The distinct keys, shard after shard (`ranges[s]` are shard `s`'s),
    /// each shard's in the order of the top bits of their routing hash (its
    /// store's stripe order), and in batch order among keys of one bucket;
    /// a key's index here is its "distinct index".
    pub keys: Vec<u64>,
    pub ranges: Vec<Range<usize>>,
    /// For each distinct key, the position of its first occurrence in the
    /// batch.
    pub first: Vec<u32>,
    /// Every later occurrence of a key: its position and the key's distinct
    /// index.
    pub repeats: Vec<(u32, u32)>,
}

/// Buckets per shard for a batch of `n` keys: a power of two, at least one
/// per stripe of a shard's store, so that bucket order is stripe order; a
/// key's bucket within its shard is the top bits of its hash.
fn buckets_per_shard(n: usize, shards: usize) -> usize {
    (n / shards / BUCKET_KEYS).max(1 << STRIPE_BITS).next_power_of_two()
}

impl SparsePlan {
    pub fn new(keys: &[u64], num_shards: u32) -> Result<SparsePlan> {
        let n = keys.len();
        if n >= u32::MAX as usize {
            return Err(Error::Config(format!("a batch of {n} keys; at most {} in one call", u32::MAX - 1)));
        }
        let shards = num_shards.max(1) as usize;
        let per_shard = buckets_per_shard(n, shards);
        let shift = 64 - per_shard.trailing_zeros();
        // The routing hash once: it gives the shard and, by its top bits,
        // the bucket within the shard.
        let bucket_of = |key: u64| {
            let hash = splitmix64(key);
            hash_shard(hash, shards as u32) as usize * per_shard + (hash >> shift) as usize
        };

        // Counting sort of (key, position) by bucket, stable. Each key's
        // bucket is hashed once and kept: the hash and the division by the
        // shard count were a third of the plan, done three times a key.
        let bucket: Vec<u32> = keys.iter().map(|&k| bucket_of(k) as u32).collect();
        let mut starts = vec![0usize; shards * per_shard + 1];
        for &b in &bucket {
            starts[b as usize + 1] += 1;
        }
        for b in 1..starts.len() {
            starts[b] += starts[b - 1];
        }
        let mut next = starts.clone();
        let (mut sorted, mut at) = (vec![0u64; n], vec![0u32; n]);
        for (p, (&k, &b)) in keys.iter().zip(&bucket).enumerate() {
            let b = b as usize;
            sorted[next[b]] = k;
            at[next[b]] = p as u32;
            next[b] += 1;
        }
        drop(bucket);

        // Bucket by bucket, in batch order within each (the sort is
        // stable): a key seen first takes the next distinct index, a repeat
        // is linked to it.
        let (mut unique, mut first, mut repeats) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::new());
        let mut ranges = Vec::with_capacity(shards);
        let most = starts.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        let mut seen: hashbrown::HashMap<u64, u32> = hashbrown::HashMap::with_capacity(most);
        for s in 0..shards {
            let start = unique.len();
            for b in s * per_shard..(s + 1) * per_shard {
                seen.clear();
                for i in starts[b]..starts[b + 1] {
                    match seen.entry(sorted[i]) {
                        Entry::Vacant(e) => {
                            e.insert(unique.len() as u32);
                            unique.push(sorted[i]);
                            first.push(at[i]);
                        }
                        Entry::Occupied(e) => repeats.push((at[i], *e.get())),
                    }
                }
            }
            ranges.push(start..unique.len());
        }
        Ok(SparsePlan { keys: unique, ranges, first, repeats })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use ps_common::partition::{hash_stripe, key_shard};

    /// The plan accounts for every position once, sends each distinct key
    /// once to its owner, and maps every repeat to its own key.
    fn check_plan(keys: &[u64], shards: u32) -> Result<(), TestCaseError> {
        let plan = SparsePlan::new(keys, shards).unwrap();
        prop_assert_eq!(plan.ranges.len(), shards as usize);
        let mut seen = vec![0u32; keys.len()];
        for (s, r) in plan.ranges.iter().enumerate() {
            for u in r.clone() {
                prop_assert_eq!(key_shard(plan.keys[u], shards) as usize, s);
                prop_assert_eq!(keys[plan.first[u] as usize], plan.keys[u]);
                seen[plan.first[u] as usize] += 1;
            }
            let order: Vec<(usize, u32)> = plan.keys[r.clone()]
                .iter()
                .zip(&plan.first[r.clone()])
                .map(|(&k, &p)| (hash_stripe(splitmix64(k)), p))
                .collect();
            prop_assert!(order.windows(2).all(|w| w[0].0 <= w[1].0), "in the store's stripe order");
        }
        prop_assert_eq!(plan.ranges.last().map_or(0, |r| r.end), plan.keys.len());
        let mut distinct = plan.keys.clone();
        distinct.sort_unstable();
        distinct.dedup();
        prop_assert_eq!(distinct.len(), plan.keys.len());
        for &(p, u) in &plan.repeats {
            let (p, u) = (p as usize, u as usize);
            prop_assert_eq!(keys[p], plan.keys[u]);
            prop_assert!((plan.first[u] as usize) < p, "a repeat comes after its first occurrence");
            seen[p] += 1;
        }
        prop_assert!(seen.iter().all(|&c| c == 1));
        Ok(())
    }

    proptest! {
        #[test]
        fn a_plan_covers_the_batch(
            keys in prop::collection::vec(0u64..300, 0..2000),
            shards in 1u32..5,
        ) {
            check_plan(&keys, shards)?;
        }
    }

    /// Batches large enough for several buckets per shard (one per 4096
    /// keys), with repeats across buckets' boundaries in the batch.
    #[test]
    fn a_large_batch_is_planned_over_several_buckets_per_shard() {
        let keys: Vec<u64> = (0..100_000u64).map(|i| splitmix64(i) % 60_000).collect();
        for shards in [1, 2, 3] {
            let per_shard = buckets_per_shard(keys.len(), shards as usize);
            assert!(per_shard >= 8, "{per_shard} buckets per shard");
            check_plan(&keys, shards).unwrap();
        }
    }
}
