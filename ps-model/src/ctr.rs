//! The CTR model's input: categorical slots hashed into one embedding table.
//!
//! Example `x` has one id per slot; the pair `(slot, id)` is hashed to the key
//! `splitmix64(slot << 48 | id) mod key_space` of the embedding table (the
//! hashing trick: distinct pairs may share a key). The `slots` rows of an
//! example, concatenated, are the input of a [`crate::Tower`].

use ps_common::partition::splitmix64;

/// Ids must stay below this so that `slot << 48 | id` is one-to-one.
pub const MAX_ID: u64 = 1 << 48;

/// The pair `(slot, id)` as one u64 (`id < MAX_ID`).
pub fn pair(slot: usize, id: u64) -> u64 {
    ((slot as u64) << 48) | id
}

/// The embedding key of `(slot, id)` in a table of `key_space` rows.
pub fn key(slot: usize, id: u64, key_space: u64) -> u64 {
    splitmix64(pair(slot, id)) % key_space.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_pinned_and_in_range() {
        // Pinned: a change here re-keys every trained CTR model.
        assert_eq!(key(0, 1, 1 << 24), splitmix64(1) % (1 << 24));
        assert_eq!(pair(3, 5), (3 << 48) | 5);
        assert!((0..26).all(|slot| key(slot, 12345, 1000) < 1000));
        assert_ne!(key(0, 7, u64::MAX), key(1, 7, u64::MAX));
    }
}
