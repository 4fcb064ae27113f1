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

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use hashbrown::hash_map::Entry;
use ps_common::codec;
use ps_common::partition::{STRIPE_BITS, hash_shard, splitmix64};

use crate::error::{Error, Result};

/// Keys a bucket holds on average: its map stays in the L1/L2 cache.
const BUCKET_KEYS: usize = 4096;

#[derive(Debug)]
pub(crate) struct SparsePlan {
    /// The distinct keys, shard after shard (`ranges[s]` are shard `s`'s;
    /// what lies between two ranges is unused), each shard's in the order of
    /// the top bits of their routing hash (its store's stripe order), and in
    /// batch order among keys of one bucket; a key's index here is its
    /// "distinct index".
    pub keys: Vec<u64>,
    pub ranges: Vec<Range<usize>>,
    /// For each distinct key (at its distinct index), the position of its
    /// first occurrence in the batch.
    pub first: Vec<u32>,
    /// Every later occurrence of a key, shard by shard (`repeats[s]` are
    /// those of shard `s`'s keys): its position and the key's distinct
    /// index.
    pub repeats: Vec<Vec<(u32, u32)>>,
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

        // Shard by shard (on up to one thread each, for a large batch),
        // bucket by bucket, in batch order within each (the sort is
        // stable): a key seen first takes the next distinct index, a repeat
        // is linked to it. Shard `s`'s distinct keys are written from the
        // place its keys start in the sorted order: at most that many, so
        // the shards write apart, and the gaps they leave are not used.
        let region = |s: usize| starts[s * per_shard]..starts[(s + 1) * per_shard];
        let (mut unique, mut first) = (vec![0u64; n], vec![0u32; n]);
        let mut work = Vec::with_capacity(shards);
        let (mut rest_u, mut rest_f) = (&mut unique[..], &mut first[..]);
        for s in 0..shards {
            let (u, more_u) = std::mem::take(&mut rest_u).split_at_mut(region(s).len());
            let (f, more_f) = std::mem::take(&mut rest_f).split_at_mut(region(s).len());
            (rest_u, rest_f) = (more_u, more_f);
            work.push((s, u, f));
        }
        let dedup = |(s, unique, first): (usize, &mut [u64], &mut [u32])| {
            let base = region(s).start;
            let (mut d, mut repeats) = (0, Vec::new());
            let most =
                (s * per_shard..(s + 1) * per_shard).map(|b| starts[b + 1] - starts[b]).max().unwrap_or(0);
            let mut seen: hashbrown::HashMap<u64, u32> = hashbrown::HashMap::with_capacity(most);
            for b in s * per_shard..(s + 1) * per_shard {
                seen.clear();
                for i in starts[b]..starts[b + 1] {
                    match seen.entry(sorted[i]) {
                        Entry::Vacant(e) => {
                            e.insert((base + d) as u32);
                            unique[d] = sorted[i];
                            first[d] = at[i];
                            d += 1;
                        }
                        Entry::Occupied(e) => repeats.push((at[i], *e.get())),
                    }
                }
            }
            (base..base + d, repeats)
        };
        let (ranges, repeats) = in_parallel(work, n, dedup).into_iter().unzip();
        Ok(SparsePlan { keys: unique, ranges, first, repeats })
    }
}

/// Keys of a batch from which its per-shard work runs on several threads:
/// below it, a thread's start (tens of µs) costs more than it saves.
const PARALLEL_KEYS: usize = 1 << 16;

/// Threads [`in_parallel`] uses for the work of a batch of `keys` keys: one
/// per core from [`PARALLEL_KEYS`], else one.
pub(crate) fn threads(keys: usize) -> usize {
    if keys >= PARALLEL_KEYS { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { 1 }
}

/// `f` of each of `items` (the work of a batch of `keys` keys), in their
/// order: on up to [`threads`] threads, each taking a run of consecutive
/// items.
pub(crate) fn in_parallel<I: Send, T: Send>(items: Vec<I>, keys: usize, f: impl Fn(I) -> T + Sync) -> Vec<T> {
    let per_thread = items.len().div_ceil(threads(keys)).max(1);
    if items.len() <= per_thread {
        return items.into_iter().map(f).collect();
    }
    let mut groups: Vec<Vec<I>> = Vec::new();
    let mut items = items.into_iter().peekable();
    while items.peek().is_some() {
        groups.push(items.by_ref().take(per_thread).collect());
    }
    let f = &f;
    std::thread::scope(|scope| {
        let mut groups = groups.into_iter();
        let here = groups.next().unwrap_or_default();
        let others: Vec<_> =
            groups.map(|g| scope.spawn(move || g.into_iter().map(f).collect::<Vec<T>>())).collect();
        let mut out: Vec<T> = here.into_iter().map(f).collect();
        for h in others {
            // A panic on a helper thread is one of this thread's.
            out.extend(h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)));
        }
        out
    })
}

/// The plan of the last batch a client sent to each sparse table, kept with
/// the batch's keys and each shard's keys as sent: a push of the keys just
/// pulled (a training step's) takes them instead of planning again. The
/// batch is compared key by key, so another batch never takes a stale plan.
/// Holds about 30 bytes per key of each table's last batch.
#[derive(Default)]
pub(crate) struct PlanCache(Mutex<HashMap<String, Planned>>);

struct Planned {
    batch: Vec<u64>,
    plan: Arc<SparsePlan>,
    /// `plan.keys[plan.ranges[s]]`, encoded for the wire.
    sent: Vec<Bytes>,
}

impl PlanCache {
    /// The plan of `keys` of `table` on `num_shards` shards and each
    /// shard's keys encoded: the table's last batch's if `keys` are the
    /// same, else new (and kept).
    pub fn plan(&self, table: &str, keys: &[u64], num_shards: u32) -> Result<(Arc<SparsePlan>, Vec<Bytes>)> {
        if let Some(p) = self.0.lock().unwrap_or_else(|p| p.into_inner()).get(table)
            && p.sent.len() == num_shards as usize
            && p.batch == keys
        {
            return Ok((Arc::clone(&p.plan), p.sent.clone()));
        }
        let plan = Arc::new(SparsePlan::new(keys, num_shards)?);
        let sent: Vec<Bytes> = plan.ranges.iter().map(|r| codec::encode_u64(&plan.keys[r.clone()])).collect();
        let kept = Planned { batch: keys.to_vec(), plan: Arc::clone(&plan), sent: sent.clone() };
        self.0.lock().unwrap_or_else(|p| p.into_inner()).insert(table.to_string(), kept);
        Ok((plan, sent))
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
        prop_assert!(plan.ranges.windows(2).all(|w| w[0].end <= w[1].start), "shard after shard");
        let sent: Vec<u64> = plan.ranges.iter().flat_map(|r| plan.keys[r.clone()].iter().copied()).collect();
        let mut distinct = sent.clone();
        distinct.sort_unstable();
        distinct.dedup();
        prop_assert_eq!(distinct.len(), sent.len());
        for (s, repeats) in plan.repeats.iter().enumerate() {
            for &(_, u) in repeats {
                prop_assert!(plan.ranges[s].contains(&(u as usize)), "a repeat of one of its shard's keys");
            }
        }
        for &(p, u) in plan.repeats.iter().flatten() {
            let (p, u) = (p as usize, u as usize);
            prop_assert_eq!(keys[p], plan.keys[u]);
            prop_assert!((plan.first[u] as usize) < p, "a repeat comes after its first occurrence");
            seen[p] += 1;
        }
        prop_assert!(seen.iter().all(|&c| c == 1));
        Ok(())
    }

    /// The same batch of a table (another vector, equal keys) takes the
    /// kept plan, whatever other tables did in between; a batch that
    /// differs in one key, or the same keys on another number of shards,
    /// gets its own.
    #[test]
    fn only_the_same_batch_takes_the_kept_plan() {
        let cache = PlanCache::default();
        let keys: Vec<u64> = (0..10_000).map(|i| i * 7 % 3_001).collect();
        let (first, sent) = cache.plan("a", &keys, 2).unwrap();
        let (elsewhere, _) = cache.plan("b", &keys[..100], 2).unwrap();
        let (again, sent_again) = cache.plan("a", &keys.clone(), 2).unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        assert!(!Arc::ptr_eq(&first, &elsewhere));
        assert_eq!(sent, sent_again);
        let mut other = keys.clone();
        other[5_000] = 1 << 40;
        let (changed, sent_changed) = cache.plan("a", &other, 2).unwrap();
        assert!(!Arc::ptr_eq(&first, &changed));
        assert!(changed.keys.contains(&(1 << 40)) && !first.keys.contains(&(1 << 40)));
        assert_ne!(sent, sent_changed);
        let (three, sent_three) = cache.plan("a", &other, 3).unwrap();
        assert!(!Arc::ptr_eq(&changed, &three));
        assert_eq!((three.ranges.len(), sent_three.len()), (3, 3));
        for (r, bytes) in three.ranges.iter().zip(&sent_three) {
            assert_eq!(bytes, &codec::encode_u64(&three.keys[r.clone()]));
        }
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

    /// Batches large enough for several buckets per shard and for the
    /// shards' work on several threads, with repeats across buckets'
    /// boundaries in the batch.
    #[test]
    fn a_large_batch_is_planned_over_several_buckets_per_shard() {
        let keys: Vec<u64> = (0..100_000u64).map(|i| splitmix64(i) % 60_000).collect();
        for shards in [1, 2, 3] {
            let per_shard = buckets_per_shard(keys.len(), shards as usize);
            assert!(per_shard >= 8, "{per_shard} buckets per shard");
            assert!(keys.len() >= PARALLEL_KEYS);
            check_plan(&keys, shards).unwrap();
        }
    }

    #[test]
    fn work_in_parallel_comes_back_in_order() {
        for n in [0, 1, 2, 3, 7] {
            let items: Vec<usize> = (0..n).collect();
            assert_eq!(
                in_parallel(items.clone(), PARALLEL_KEYS, |i| i * 10),
                items.iter().map(|i| i * 10).collect::<Vec<_>>()
            );
            assert_eq!(
                in_parallel(items.clone(), 1, |i| i + 1),
                items.iter().map(|i| i + 1).collect::<Vec<_>>()
            );
        }
    }
}
