//! The rows of one sparse table: slabs of rows in lock stripes.
//!
//! A row used to be a `DashMap` entry holding a boxed slice of its own (one
//! heap allocation, 32 B of map slot and the allocator's rounding per row:
//! 141 B for a width-8 Adagrad row whose values and state are 64 B). Here a
//! table is [`STRIPES`] stripes, each behind its own `RwLock`; a stripe keeps
//! its rows end to end in pages (slabs) of up to [`PAGE_ROWS`] rows, each
//! row's key beside them, and an index from key to slot: a hashbrown
//! `HashTable<u32>` that holds only the 4-byte slot (the key is read from
//! the page), hashed with the table's seeded foldhash. A row costs its
//! floats, its 8-byte key, 5 bytes of index at hashbrown's load factor, and
//! its 8-byte update count only for the rules that read it (momentum's first
//! step, Adam's bias correction; SGD, Adagrad and FTRL rows carry none and
//! report 0).
//!
//! A request is served stripe by stripe: its keys are grouped by stripe
//! (a counting sort), and each stripe's lock is taken once for all of its
//! keys. Each row is read and updated under its stripe's lock, so every row
//! is still updated atomically (ARCHITECTURE.md, "Update semantics").
//!
//! Rows are created in one place, [`Stripe::create_row`].

use std::hash::BuildHasher;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use hashbrown::DefaultHashBuilder;
use hashbrown::HashTable;
use ps_common::optim::Rule;
use ps_common::partition::{self, splitmix64};
use ps_common::spec::TableSpec;

/// Lock stripes per table: enough that concurrent requests rarely meet on
/// one, few enough that an empty table costs a few KiB.
pub const STRIPES: usize = 1 << partition::STRIPE_BITS;
/// Rows of a stripe's largest page; its first page holds
/// [`FIRST_PAGE_ROWS`], and each next one twice as many, up to this. Large
/// pages, because jemalloc gives each large allocation a random offset
/// within an extra 4 KiB page (its `cache_oblivious` option): 6% of a
/// 64 KiB page (1024 rows of width 16), 4 B a row; 0.8% of 512 KiB.
pub const PAGE_ROWS: usize = 8192;
const FIRST_PAGE_ROWS: usize = 16;
const PAGE_SHIFT: u32 = PAGE_ROWS.trailing_zeros();

/// A key's slot not found yet ([`Stripe::locate`]). A real slot is below it
/// unless one stripe held 2^32 rows, which no memory budget allows.
pub const NO_SLOT: u32 = u32::MAX;

/// Whether `rule` reads the update count (momentum's first step, Adam's
/// bias correction); the rows of the others keep none.
pub fn keeps_steps(rule: &Rule) -> bool {
    matches!(rule, Rule::Momentum { .. } | Rule::Adam { .. })
}

/// Rows of up to `PAGE_ROWS` rows: `data` holds `width` floats per row
/// (values, then optimizer state), `keys` and `steps` one entry per row.
struct Page {
    keys: Vec<u64>,
    steps: Vec<u64>,
    data: Vec<f32>,
}

/// One lock stripe of a table's rows.
#[derive(Default)]
pub struct Stripe {
    /// Slot of every row, hashed by its key (slot `s` is row `s % PAGE_ROWS`
    /// of page `s / PAGE_ROWS`).
    index: HashTable<u32>,
    pages: Vec<Page>,
}

/// A request's keys grouped by stripe ([`Rows::group`]): stripe `s`'s are
/// at `part(s)` of `order` (their positions in the request, ascending) and
/// of `keys` (the keys themselves, so that a stripe's keys are read front to
/// back rather than one cache line each).
pub struct Grouped {
    pub order: Vec<u32>,
    pub keys: Vec<u64>,
    starts: [usize; STRIPES + 1],
}

impl Grouped {
    /// Where stripe `s`'s keys are in `order` and `keys`.
    pub fn part(&self, s: usize) -> std::ops::Range<usize> {
        self.starts[s]..self.starts[s + 1]
    }
}

/// Scratch of [`Stripe::locate`], reused from stripe to stripe: a bit per
/// slot of the stripe (all zero between calls) and the keys without a row.
#[derive(Default)]
pub struct Seen {
    slots: Vec<u64>,
    new: hashbrown::HashSet<u64>,
}

/// Where a row is: page and row within it.
fn place(slot: u32) -> (usize, usize) {
    ((slot >> PAGE_SHIFT) as usize, slot as usize & (PAGE_ROWS - 1))
}

impl Stripe {
    fn key(&self, slot: u32) -> u64 {
        let (p, r) = place(slot);
        self.pages[p].keys[r]
    }

    /// The slot of `key` (its hash `hash`), if the row exists.
    pub fn find(&self, hash: u64, key: u64) -> Option<u32> {
        self.index.find(hash, |&s| self.key(s) == key).copied()
    }

    /// Finds the slot of each of `keys` (keys of this stripe) into `slots`
    /// (one for each key), [`NO_SLOT`] where the key has no row yet, and
    /// returns how many have none; or `Err(key)` for a key named twice (a
    /// request names each key once). The check costs no set of every key:
    /// two found keys are the same when their slots are, which a bit per
    /// slot tells, and only keys without a row go into a set.
    pub fn locate(
        &self,
        rows: &Rows,
        keys: &[u64],
        slots: &mut [u32],
        seen: &mut Seen,
    ) -> Result<usize, u64> {
        debug_assert_eq!(keys.len(), slots.len());
        let words = self.pages.len() << (PAGE_SHIFT - 6);
        if seen.slots.len() < words {
            seen.slots.resize(words, 0);
        }
        seen.new.clear();
        let (mut missing, mut repeated) = (0, None);
        for (&key, out) in keys.iter().zip(slots.iter_mut()) {
            *out = NO_SLOT;
            match self.find(rows.hash(key), key) {
                Some(slot) => {
                    let (word, bit) = (slot as usize >> 6, 1u64 << (slot & 63));
                    if seen.slots[word] & bit != 0 {
                        repeated = Some(key);
                        break;
                    }
                    seen.slots[word] |= bit;
                    *out = slot;
                }
                None if seen.new.insert(key) => missing += 1,
                None => {
                    repeated = Some(key);
                    break;
                }
            }
        }
        // The bits go back to zero for the next stripe (only those set).
        for &slot in slots.iter().filter(|&&s| s != NO_SLOT) {
            seen.slots[slot as usize >> 6] = 0;
        }
        repeated.map_or(Ok(missing), Err)
    }

    /// Row `slot`'s floats (values, then state).
    pub fn row(&self, slot: u32, width: usize) -> &[f32] {
        let (p, r) = place(slot);
        &self.pages[p].data[r * width..(r + 1) * width]
    }

    /// Row `slot`'s update count (0 where none is kept).
    pub fn step(&self, slot: u32) -> u64 {
        let (p, r) = place(slot);
        self.pages[p].steps.get(r).copied().unwrap_or(0)
    }

    /// Row `slot`'s floats and, if kept, its update count.
    pub fn row_mut(&mut self, slot: u32, width: usize) -> (&mut [f32], Option<&mut u64>) {
        let (p, r) = place(slot);
        let page = &mut self.pages[p];
        (&mut page.data[r * width..(r + 1) * width], page.steps.get_mut(r))
    }

    /// Number of rows.
    fn len(&self) -> usize {
        self.index.len()
    }

    /// Every row: (key, update count, floats).
    fn rows(&self, width: usize) -> impl Iterator<Item = (u64, u64, &[f32])> {
        self.pages.iter().flat_map(move |p| {
            let steps = p.steps.iter().copied().chain(std::iter::repeat(0));
            p.keys.iter().copied().zip(steps).zip(p.data.chunks_exact(width)).map(|((k, s), d)| (k, s, d))
        })
    }

    /// Appends a row for `key` (which must be missing) holding `data` and
    /// `step`; returns its slot.
    fn push(&mut self, rows: &Rows, hash: u64, key: u64, step: u64, data: &[f32]) -> u32 {
        let full = (self.pages.last())
            .is_none_or(|p| p.keys.len() == p.keys.capacity() || p.keys.len() == PAGE_ROWS);
        if full {
            // Page sizes double from FIRST_PAGE_ROWS up to PAGE_ROWS, so a
            // small table stays small; capacities are exact, so a page never
            // moves once made.
            let cap = self.pages.last().map_or(FIRST_PAGE_ROWS, |p| (p.keys.capacity() * 2).min(PAGE_ROWS));
            self.pages.push(Page {
                keys: Vec::with_capacity(cap),
                steps: Vec::with_capacity(if rows.steps { cap } else { 0 }),
                data: Vec::with_capacity(cap * rows.width),
            });
        }
        let p = self.pages.len() - 1;
        let page = &mut self.pages[p];
        debug_assert!(p < 1 << (32 - PAGE_SHIFT), "more rows in one stripe than slots");
        let slot = ((p << PAGE_SHIFT) | page.keys.len()) as u32;
        page.keys.push(key);
        if rows.steps {
            page.steps.push(step);
        }
        page.data.extend_from_slice(data);
        let Stripe { index, pages } = self;
        index.insert_unique(hash, slot, |&s| {
            let (p, r) = place(s);
            rows.hasher.hash_one(pages[p].keys[r])
        });
        slot
    }

    /// Creates the row of `key` (missing) at its initial values: the
    /// table's initializer for the values, the rule's initial state. The
    /// one place a sparse row is created.
    pub fn create_row(
        &mut self,
        rows: &Rows,
        spec: &TableSpec,
        hash: u64,
        key: u64,
        scratch: &mut Vec<f32>,
    ) -> u32 {
        rows.initial(spec, key, scratch);
        self.push(rows, hash, key, 0, scratch)
    }
}

/// The rows of one sparse table (see the module documentation).
pub struct Rows {
    /// Row width in values (`dim`) and in floats (values and state).
    pub dim: usize,
    pub width: usize,
    /// Whether rows keep an update count ([`keeps_steps`]).
    steps: bool,
    hasher: DefaultHashBuilder,
    stripes: Box<[RwLock<Stripe>]>,
}

impl Rows {
    pub fn new(spec: &TableSpec, dim: usize) -> Rows {
        Rows {
            dim,
            width: dim * (1 + spec.optimizer.state_per_param()),
            steps: keeps_steps(&spec.optimizer.rule),
            hasher: DefaultHashBuilder::default(),
            stripes: (0..STRIPES).map(|_| RwLock::default()).collect(),
        }
    }

    /// The index hash of `key`.
    pub fn hash(&self, key: u64) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The stripe of `key`: from the routing hash's top bits (independent of
    /// the shard, which is the hash mod the shard count) rather than from
    /// the index hash, whose top bits hashbrown uses inside a stripe.
    fn stripe_of(key: u64) -> usize {
        partition::hash_stripe(splitmix64(key))
    }

    pub fn read(&self, i: usize) -> RwLockReadGuard<'_, Stripe> {
        self.stripes[i].read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn write(&self, i: usize) -> RwLockWriteGuard<'_, Stripe> {
        self.stripes[i].write().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the initial floats of row `key` (values from the table's
    /// initializer, the rule's initial state, DC-ASGD-a's zeros) to `out`.
    pub fn initial(&self, spec: &TableSpec, key: u64, out: &mut Vec<f32>) {
        out.clear();
        out.resize(self.width, 0.0);
        let rule = spec.optimizer.rule;
        let (values, state) = out.split_at_mut(self.dim);
        spec.init.fill(&spec.name, key, values);
        rule.init_state(values, &mut state[..self.dim * rule.state_per_param()]);
    }

    /// `keys` grouped by stripe (a counting sort: two passes over the keys).
    pub fn group(keys: &[u64]) -> Grouped {
        let stripe: Vec<u8> = keys.iter().map(|&k| Self::stripe_of(k) as u8).collect();
        let mut starts = [0usize; STRIPES + 1];
        for &s in &stripe {
            starts[s as usize + 1] += 1;
        }
        for s in 0..STRIPES {
            starts[s + 1] += starts[s];
        }
        let mut next = starts;
        let (mut order, mut sorted) = (vec![0u32; keys.len()], vec![0u64; keys.len()]);
        for (i, (&s, &k)) in stripe.iter().zip(keys).enumerate() {
            order[next[s as usize]] = i as u32;
            sorted[next[s as usize]] = k;
            next[s as usize] += 1;
        }
        Grouped { order, keys: sorted, starts }
    }

    /// Bytes a row costs beside its floats: its key, its index slot (4 B
    /// and a control byte at a load factor of about 5/8), its update count
    /// if kept.
    pub fn overhead_per_row(&self) -> u64 {
        8 + 8 + if self.steps { 8 } else { 0 }
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        (0..STRIPES).map(|s| self.read(s).len()).sum()
    }

    /// Every row as (key, update count, floats), stripe by stripe, each
    /// stripe under its read lock while `visit` runs.
    pub fn for_each(&self, mut visit: impl FnMut(u64, u64, &[f32])) {
        for s in 0..STRIPES {
            for (k, step, data) in self.read(s).rows(self.width) {
                visit(k, step, data);
            }
        }
    }

    /// Row `key`'s floats, if it exists, given to `visit` under its lock.
    pub fn get<T>(&self, key: u64, visit: impl FnOnce(u64, &[f32]) -> T) -> Option<T> {
        let stripe = self.read(Self::stripe_of(key));
        let slot = stripe.find(self.hash(key), key)?;
        Some(visit(stripe.step(slot), stripe.row(slot, self.width)))
    }

    /// Adds row `key` with `data` (`width` floats) and `step` (a
    /// checkpoint's); false if it exists.
    pub fn insert(&self, key: u64, step: u64, data: &[f32]) -> bool {
        debug_assert_eq!(data.len(), self.width);
        let hash = self.hash(key);
        let mut stripe = self.write(Self::stripe_of(key));
        if stripe.find(hash, key).is_some() {
            return false;
        }
        stripe.push(self, hash, key, step, data);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ps_common::spec::{Init, InitKind};

    fn spec(rule: Rule) -> TableSpec {
        let init = Init { kind: InitKind::Uniform { low: -1.0, high: 1.0 }, seed: 3 };
        TableSpec::sparse("e", 3, init, rule.into())
    }

    #[test]
    fn rows_are_found_where_they_were_put_across_pages() {
        let s = spec(Rule::adam(0.1));
        let rows = Rows::new(&s, 3);
        assert_eq!(rows.width, 9);
        // Enough keys that stripes fill several pages of growing sizes.
        let n = STRIPES as u64 * (PAGE_ROWS as u64 + 40);
        for k in 0..n {
            let data: Vec<f32> = (0..9).map(|i| (k * 10 + i) as f32).collect();
            assert!(rows.insert(k * 7919, k, &data));
        }
        assert!(!rows.insert(0, 5, &[0.0; 9]), "a key is inserted once");
        assert_eq!(rows.len(), n as usize);
        for k in (0..n).step_by(97) {
            let got = rows.get(k * 7919, |step, d| (step, d.to_vec())).unwrap();
            assert_eq!(got.0, k);
            assert_eq!(got.1[0], (k * 10) as f32);
            assert_eq!(got.1[8], (k * 10 + 8) as f32);
        }
        assert!(rows.get(3, |_, _| ()).is_none());
        let mut seen = 0;
        rows.for_each(|k, step, d| {
            assert_eq!(k, step * 7919);
            assert_eq!(d[0], (step * 10) as f32);
            seen += 1;
        });
        assert_eq!(seen, n);
    }

    #[test]
    fn rules_without_a_step_keep_none() {
        assert!(keeps_steps(&Rule::adam(0.1)));
        assert!(!keeps_steps(&Rule::sgd(0.1)));
        let rows = Rows::new(&spec(Rule::sgd(0.1)), 3);
        assert!(rows.insert(4, 9, &[1.0; 3]));
        assert_eq!(rows.get(4, |step, d| (step, d.to_vec())), Some((0, vec![1.0; 3])));
    }

    #[test]
    fn grouping_by_stripe_keeps_every_position_once_in_order() {
        let keys: Vec<u64> = (0..5000u64).map(|k| k.wrapping_mul(0x9e37_79b9_7f4a_7c15)).collect();
        let g = Rows::group(&keys);
        assert_eq!(g.part(STRIPES - 1).end, keys.len());
        let mut all = g.order.clone();
        all.sort_unstable();
        assert!(all.iter().enumerate().all(|(i, &o)| o as usize == i));
        for s in 0..STRIPES {
            let part = &g.order[g.part(s)];
            assert!(part.windows(2).all(|w| w[0] < w[1]));
            assert!(part.iter().all(|&i| Rows::stripe_of(keys[i as usize]) == s));
            assert!(part.iter().zip(&g.keys[g.part(s)]).all(|(&i, &k)| keys[i as usize] == k));
        }
    }
}
