//! Routing of a batch of sparse keys: its distinct keys, grouped by the
//! shard that owns them, and where each came from in the batch.
//!
//! A batch is deduplicated because a shard refuses a request that names a
//! key twice (each row is updated once per push; repeated gradients are
//! summed by the client). One hash map of every key of a 1M-key batch missed
//! the cache on nearly every key and was a sixth of a sparse pull's time
//! (docs/PERFORMANCE.md); here the keys are first scattered into buckets by
//! shard and hash (two sequential passes), and each bucket, a few hundred
//! keys, is deduplicated with one small map that stays in cache.

use std::ops::Range;

use ps_common::partition::splitmix64;

/// Keys a bucket holds on average: its map stays in the L1/L2 cache.
const BUCKET_KEYS: usize = 256;

#[derive(Debug)]
pub(crate) struct SparsePlan {
    /// The distinct keys, shard after shard (`ranges[s]` are shard `s`'s);
    /// a key's index here is its "distinct index".
    pub keys: Vec<u64>,
    pub ranges: Vec<Range<usize>>,
    /// For each distinct key, the position of its first occurrence in the
    /// batch.
    pub first: Vec<usize>,
    /// Every later occurrence of a key: its position in the batch and the
    /// key's distinct index (the repeats of one key in batch order, so
    /// that their gradients are summed in a fixed order).
    pub repeats: Vec<(usize, usize)>,
}

impl SparsePlan {
    pub fn new(keys: &[u64], num_shards: u32) -> SparsePlan {
        let shards = num_shards.max(1) as usize;
        // Buckets per shard: a power of two, so a bucket is the top bits of
        // the key's hash (its shard is the hash modulo the shard count,
        // `partition::key_shard`).
        let per_shard = (keys.len() / shards / BUCKET_KEYS).max(1).next_power_of_two();
        let shift = 64 - per_shard.trailing_zeros();
        let bucket_of = |key: u64| {
            let h = splitmix64(key);
            let top = if shift == 64 { 0 } else { (h >> shift) as usize };
            (h % shards as u64) as usize * per_shard + top
        };

        // Counting sort of (key, position) by bucket, stable.
        let mut starts = vec![0usize; shards * per_shard + 1];
        for &k in keys {
            starts[bucket_of(k) + 1] += 1;
        }
        for b in 1..starts.len() {
            starts[b] += starts[b - 1];
        }
        let mut next = starts.clone();
        let (mut sorted, mut at) = (vec![0u64; keys.len()], vec![0usize; keys.len()]);
        for (p, &k) in keys.iter().enumerate() {
            let b = bucket_of(k);
            sorted[next[b]] = k;
            at[next[b]] = p;
            next[b] += 1;
        }

        let mut plan = SparsePlan {
            keys: Vec::with_capacity(keys.len()),
            ranges: Vec::with_capacity(shards),
            first: Vec::with_capacity(keys.len()),
            repeats: Vec::new(),
        };
        let most = starts.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        let mut seen: hashbrown::HashMap<u64, usize> = hashbrown::HashMap::with_capacity(most);
        for s in 0..shards {
            let from = plan.keys.len();
            for b in s * per_shard..(s + 1) * per_shard {
                seen.clear();
                for i in starts[b]..starts[b + 1] {
                    let (k, p) = (sorted[i], at[i]);
                    let next = plan.keys.len();
                    let u = *seen.entry(k).or_insert(next);
                    if u == next {
                        plan.keys.push(k);
                        plan.first.push(p);
                    } else {
                        plan.repeats.push((p, u));
                    }
                }
            }
            plan.ranges.push(from..plan.keys.len());
        }
        plan
    }

    /// Number of distinct keys.
    pub fn unique(&self) -> usize {
        self.keys.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ps_common::partition::key_shard;
    use proptest::prelude::*;

    proptest! {
        /// The plan accounts for every position once, sends each distinct
        /// key once to its owner, and maps every repeat to its own key.
        #[test]
        fn a_plan_covers_the_batch(
            keys in prop::collection::vec(0u64..300, 0..2000),
            shards in 1u32..5,
        ) {
            let plan = SparsePlan::new(&keys, shards);
            prop_assert_eq!(plan.ranges.len(), shards as usize);
            let mut seen = vec![0u32; keys.len()];
            for (s, r) in plan.ranges.iter().enumerate() {
                for u in r.clone() {
                    prop_assert_eq!(key_shard(plan.keys[u], shards) as usize, s);
                    prop_assert_eq!(keys[plan.first[u]], plan.keys[u]);
                    seen[plan.first[u]] += 1;
                }
            }
            prop_assert_eq!(plan.ranges.last().map_or(0, |r| r.end), plan.unique());
            let mut distinct = plan.keys.clone();
            distinct.sort_unstable();
            distinct.dedup();
            prop_assert_eq!(distinct.len(), plan.unique());
            for &(p, u) in &plan.repeats {
                prop_assert_eq!(keys[p], plan.keys[u]);
                prop_assert!(plan.first[u] < p, "a repeat comes after its first occurrence");
                seen[p] += 1;
            }
            prop_assert!(seen.iter().all(|&c| c == 1));
            let mut last = vec![0usize; plan.unique()];
            for &(p, u) in &plan.repeats {
                prop_assert!(p > last[u], "the repeats of one key come in batch order");
                last[u] = p;
            }
        }
    }
}
