//! Routing of a batch of sparse keys: its distinct keys, grouped by the
//! shard that owns them, and where each came from in the batch.
//!
//! A batch is deduplicated because a shard refuses a request that names a
//! key twice (each row is updated once per push; repeated gradients are
//! summed by the client). One hash map of every key of a 1M-key batch missed
//! the cache on nearly every key and was a sixth of a sparse pull's time
//! (docs/PERFORMANCE.md). Here the keys are scattered into buckets by shard
//! and hash (two sequential passes), each bucket (a few hundred keys) is
//! deduplicated with one small map that stays in cache, and a last pass in
//! batch order lays out each shard's distinct keys in the order they first
//! appear, so that rows are read from and written to the caller's buffers
//! front to back.

use std::ops::Range;

use ps_common::partition::{hash_shard, splitmix64};

use crate::error::{Error, Result};

/// Keys a bucket holds on average: its map stays in the L1/L2 cache.
const BUCKET_KEYS: usize = 4096;
/// In `link`: a first occurrence (not yet given its distinct index).
const FIRST: u32 = u32::MAX;

#[derive(Debug)]
pub(crate) struct SparsePlan {
    /// The distinct keys, shard after shard (`ranges[s]` are shard `s`'s),
    /// each shard's in the order they first appear in the batch; a key's
    /// index here is its "distinct index".
    pub keys: Vec<u64>,
    pub ranges: Vec<Range<usize>>,
    /// For each distinct key, the position of its first occurrence in the
    /// batch (increasing within each shard's range).
    pub first: Vec<u32>,
    /// Every later occurrence of a key, in batch order: its position and
    /// the key's distinct index.
    pub repeats: Vec<(u32, u32)>,
}

/// Buckets per shard for a batch of `n` keys: a power of two, so a key's
/// bucket within its shard is the top bits of its hash.
fn buckets_per_shard(n: usize, shards: usize) -> usize {
    (n / shards / BUCKET_KEYS).max(1).next_power_of_two()
}

impl SparsePlan {
    pub fn new(keys: &[u64], num_shards: u32) -> Result<SparsePlan> {
        let n = keys.len();
        if n >= FIRST as usize {
            return Err(Error::Config(format!("a batch of {n} keys; at most {} in one call", FIRST - 1)));
        }
        let shards = num_shards.max(1) as usize;
        let per_shard = buckets_per_shard(n, shards);
        let shift = 64 - per_shard.trailing_zeros();
        // The routing hash once: it gives the shard and, by its top bits,
        // the bucket within the shard.
        let bucket_of = |key: u64| {
            let hash = splitmix64(key);
            let top = hash.checked_shr(shift).unwrap_or(0) as usize;
            hash_shard(hash, shards as u32) as usize * per_shard + top
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

        // Per bucket: each repeat is linked to its key's first occurrence;
        // each shard's distinct keys are counted.
        let mut link = vec![FIRST; n];
        let mut distinct = vec![0usize; shards];
        let most = starts.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        let mut seen: hashbrown::HashMap<u64, u32> = hashbrown::HashMap::with_capacity(most);
        for b in 0..shards * per_shard {
            seen.clear();
            for i in starts[b]..starts[b + 1] {
                let p = at[i];
                let first = *seen.entry(sorted[i]).or_insert(p);
                if first != p {
                    link[p as usize] = first;
                }
            }
            distinct[b / per_shard] += seen.len();
        }
        drop((sorted, at));

        // In batch order: a first occurrence takes the next distinct index of
        // its shard (kept in `link` for its repeats, which come later).
        let mut ranges = Vec::with_capacity(shards);
        let mut start = 0;
        for d in distinct {
            ranges.push(start..start + d);
            start += d;
        }
        let mut next: Vec<usize> = ranges.iter().map(|r| r.start).collect();
        let (mut unique, mut first) = (vec![0u64; start], vec![0u32; start]);
        let mut repeats = Vec::new();
        for (p, (&k, &b)) in keys.iter().zip(&bucket).enumerate() {
            match link[p] {
                FIRST => {
                    // Its shard: the bucket over a power of two, a shift.
                    let s = b as usize >> per_shard.trailing_zeros();
                    let u = next[s];
                    next[s] += 1;
                    unique[u] = k;
                    first[u] = p as u32;
                    link[p] = u as u32;
                }
                f => repeats.push((p as u32, link[f as usize])),
            }
        }
        Ok(SparsePlan { keys: unique, ranges, first, repeats })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use ps_common::partition::key_shard;

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
            prop_assert!(plan.first[r.clone()].windows(2).all(|w| w[0] < w[1]), "in batch order");
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
        prop_assert!(plan.repeats.windows(2).all(|w| w[0].0 < w[1].0), "repeats in batch order");
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
