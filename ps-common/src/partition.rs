//! Which shard owns which key or chunk. This module is the only place that
//! decides it; servers and workers both call it, and a server rejects any key
//! or chunk that this module does not assign to it.
//!
//! The functions are fixed, written-down algorithms, so the mapping is the same
//! in every process, on every platform and in every release (changing one is a
//! breaking change of the wire protocol):
//!
//! - **Sparse keys**: `shard = splitmix64(key) mod num_shards`, where
//!   `splitmix64` is the finalizer of Steele, Lea and Flood's SplitMix64
//!   (multipliers `0xbf58476d1ce4e5b9` and `0x94d049bb133111eb`). It is a
//!   bijection on u64 with full avalanche, so sequential ids, hashed ids and
//!   Zipf-skewed ids all spread evenly (the skew of *access* stays, of course).
//! - **Dense chunks**: a tensor of `len` elements is cut into
//!   `ceil(len / chunk_len)` contiguous chunks; chunk `i` of tensor `t` lives on
//!   `(fnv1a64(t) + i) mod num_shards`. Consecutive chunks go round-robin, so a
//!   tensor's chunks differ by at most one between shards, and the FNV-1a offset
//!   of the name keeps small tensors from all landing on shard 0.

/// Index of a shard, `0..num_shards`.
pub type ShardId = u32;

/// The SplitMix64 finalizer: a fixed bijective mixer of 64-bit values.
pub const fn splitmix64(key: u64) -> u64 {
    let mut z = key.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// 64-bit FNV-1a of a name (offset basis 0xcbf29ce484222325, prime 0x100000001b3).
pub fn fnv1a64(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The shard that owns sparse key `key`.
pub fn key_shard(key: u64, num_shards: u32) -> ShardId {
    hash_shard(splitmix64(key), num_shards)
}

/// The shard that owns the key whose routing hash (`splitmix64`) is
/// `hash`: for a caller that uses the hash for more than the shard.
pub fn hash_shard(hash: u64, num_shards: u32) -> ShardId {
    debug_assert!(num_shards > 0);
    (hash % u64::from(num_shards.max(1))) as ShardId
}

/// A shard's store groups a request's sparse keys by the top
/// `STRIPE_BITS` bits of their routing hash ([`splitmix64`]): one group
/// per lock stripe. A client that sends each shard its keys in that order
/// lets the store read the request and write its answer front to back.
pub const STRIPE_BITS: u32 = 6;

/// The stripe of the key whose routing hash is `hash` (see [`STRIPE_BITS`]).
pub fn hash_stripe(hash: u64) -> usize {
    (hash >> (64 - STRIPE_BITS)) as usize
}

/// The shard that owns chunk `index` of dense tensor `tensor`.
pub fn chunk_shard(tensor: &str, index: u32, num_shards: u32) -> ShardId {
    debug_assert!(num_shards > 0);
    let n = u64::from(num_shards.max(1));
    ((fnv1a64(tensor) % n + u64::from(index) % n) % n) as ShardId
}

/// Number of chunks of a tensor of `len` elements (0 for an empty tensor).
pub fn num_chunks(len: usize, chunk_len: usize) -> usize {
    debug_assert!(chunk_len > 0);
    len.div_ceil(chunk_len.max(1))
}

/// The element range of chunk `index`.
pub fn chunk_range(len: usize, chunk_len: usize, index: usize) -> std::ops::Range<usize> {
    let start = (index * chunk_len).min(len);
    start..(start + chunk_len).min(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hashes_are_the_written_down_algorithms() {
        // Published test vectors: FNV-1a 64 of "" and "a"; SplitMix64's first
        // output for seed 0 is splitmix64(0) = 0xe220a8397b1dcdaf.
        assert_eq!(fnv1a64(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(splitmix64(0), 0xe220_a839_7b1d_cdaf);
    }

    #[test]
    fn mapping_is_stable_across_releases() {
        // Pinned values: if this test fails, the routing changed, which breaks
        // every deployed cluster and checkpoint. Do not update it casually.
        let keys: Vec<u32> = (0..8).map(|k| key_shard(k, 4)).collect();
        assert_eq!(keys, [3, 1, 2, 1, 2, 2, 0, 3]);
        let chunks: Vec<u32> = (0..4).map(|i| chunk_shard("fc1.weight", i, 3)).collect();
        assert_eq!(chunks, [0, 1, 2, 0]);
    }

    /// Largest relative deviation of any shard's count from the mean.
    fn imbalance(counts: &[usize]) -> f64 {
        let mean = counts.iter().sum::<usize>() as f64 / counts.len() as f64;
        counts.iter().map(|&c| (c as f64 - mean).abs() / mean).fold(0.0, f64::max)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Every key maps to a valid shard, the same one every time.
        #[test]
        fn key_mapping_is_total_and_deterministic(key in any::<u64>(), n in 1u32..64) {
            let s = key_shard(key, n);
            prop_assert!(s < n);
            prop_assert_eq!(s, key_shard(key, n));
        }

        /// 100,000 keys (random or sequential from a random start) over up to
        /// 16 shards: each shard holds within 8% of the mean. With a uniform
        /// hash the per-shard count has standard deviation sqrt(K/n * (1 -
        /// 1/n)), at most 1.2% of the mean for K = 100,000 and n = 16, so 8%
        /// is over 6 standard deviations: a failure means a biased mapping,
        /// not bad luck.
        #[test]
        fn keys_are_balanced(start in any::<u64>(), n in 1u32..=16, sequential in any::<bool>()) {
            let k = 100_000u64;
            let mut counts = vec![0usize; n as usize];
            for i in 0..k {
                let key = if sequential { start.wrapping_add(i) } else { splitmix64(start ^ i.rotate_left(17)) };
                counts[key_shard(key, n) as usize] += 1;
            }
            prop_assert!(imbalance(&counts) <= 0.08, "counts {:?}", counts);
        }

        /// The chunks of a tensor cover every element exactly once, in order,
        /// and each shard gets within one chunk of every other.
        #[test]
        fn chunks_cover_every_element_once(
            shape in proptest::collection::vec(1usize..40, 0..4),
            chunk_len in 1usize..500,
            n in 1u32..9,
            name in "[a-z.0-9]{1,12}",
        ) {
            let len: usize = shape.iter().product();
            let chunks = num_chunks(len, chunk_len);
            let mut covered = vec![0u8; len];
            let mut per_shard = vec![0usize; n as usize];
            for i in 0..chunks {
                let r = chunk_range(len, chunk_len, i);
                prop_assert!(!r.is_empty());
                for e in r { covered[e] += 1; }
                let s = chunk_shard(&name, i as u32, n);
                prop_assert!(s < n);
                per_shard[s as usize] += 1;
            }
            prop_assert!(covered.iter().all(|&c| c == 1));
            let (lo, hi) = (per_shard.iter().min().unwrap(), per_shard.iter().max().unwrap());
            prop_assert!(hi - lo <= 1, "per shard {:?}", per_shard);
        }
    }
}
