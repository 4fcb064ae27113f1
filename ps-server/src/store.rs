//! The shard's parameter store: tables of blocks in concurrent maps.
//!
//! A dense tensor is stored as the chunks this shard owns, each keeping its
//! values, its optimizer state and its update count. A chunk's values are
//! shared, copy on write, with the pull answers still being written
//! ([`Block`]), so a pull answers from them without a copy. A sparse table
//! is stored as the rows this shard owns, created on first touch, in slabs
//! under lock stripes ([`rows`]): no allocation of their own, and a request
//! takes each stripe's lock once for all its keys.
//!
//! Locking: a chunk's [`DashMap`] entry lock, or a row's stripe lock, is held
//! while it is read or updated, so each block (chunk or row) is updated
//! atomically. A push is
//! validated in full before anything is applied: a rejected push changes
//! nothing. Pushes carrying a `(worker, seq)` pair are applied at most once:
//! the worker's dedup lock is held from the seq check to the end of the apply,
//! so a duplicate that races the original waits and is then recognised.
//!
//! The store speaks in domain terms: keys are `u64`s, values and gradients
//! `f32` slices. It never sees protobuf types or wire bytes; [`crate::service`]
//! decodes requests and encodes answers at the edge. Reads hand each block's
//! values to a caller's closure while the block is locked, so the service
//! encodes straight from the block (a dense chunk's values uncompressed: no
//! copy, [`Store::pull_dense_as`]) and a checkpoint or another codec can
//! consume the same values without a wire format in between.

use std::cell::RefCell;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use ps_common::cache::{PREFETCH_AHEAD, prefetch};
use ps_common::compress::Codecs;
use ps_common::optim::Update;
use ps_common::partition::{self, ShardId};
use ps_common::spec::{LateGradients, Layout, TableSpec};

use crate::budget::{self, Budget, Limits};
use crate::error::{Error, Result};

mod rows;

use rows::{Grouped, NO_SLOT, Rows, STRIPES, Seen};

/// Identity and clock of a push, as the store needs it.
#[derive(Debug, Clone, Copy, Default)]
pub struct PushInfo {
    pub worker: u64,
    /// 0 means "unsequenced": applied every time it arrives.
    pub seq: u64,
    /// Observed staleness of this push (see `clock`); scales the learning
    /// rate of tables that are staleness-aware.
    pub staleness: u64,
    /// The clock of the read the gradient was computed on (delay
    /// compensation looks up that read).
    pub read_clock: u64,
    /// A late push (backup workers, see `clock`): dropped (validated and its
    /// seq recorded, nothing applied) or applied with the learning rate
    /// scaled by `1 / (1 + staleness)`.
    pub late: Option<LateGradients>,
}

impl PushInfo {
    /// The learning-rate factor of this push on a table of `spec`.
    fn lr_scale(&self, spec: &TableSpec) -> f32 {
        let weight = 1.0 / (1.0 + self.staleness as f32);
        let aware = if spec.optimizer.staleness_aware { weight } else { 1.0 };
        let late = if self.late == Some(LateGradients::Weight) { weight } else { 1.0 };
        aware * late
    }

    fn dropped(&self) -> bool {
        self.late == Some(LateGradients::Drop)
    }
}

/// Most workers whose reads a shard keeps for delay compensation; a
/// worker beyond them gets no compensation (its read counts as current).
pub const MAX_DC_WORKERS: usize = 1024;

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PushOutcome {
    /// Elements (dense) or rows (sparse) updated.
    pub applied: u64,
    /// The `(worker, seq)` had been applied before; nothing was done.
    pub duplicate: bool,
}

/// A chunk of a dense tensor, with its optimizer state.
///
/// The values are shared with the answers of the pulls that read them
/// while those are written to their sockets ([`Store::pull_dense_as`]): a
/// pull answers from the values themselves instead of a copy. An update
/// made while an answer still holds them copies them first (copy on write,
/// [`Arc::make_mut`]), so an answer always holds the values as they were
/// when it read them. Copying each pulled 4 MiB chunk into its answer took
/// about a third of a pull's time on loopback TCP (docs/PERFORMANCE.md,
/// twenty-fourth session); the copy is now made only when a push meets an
/// answer still being written.
struct Block {
    values: Arc<[f32]>,
    /// The rule's state arrays one after another, then DC-ASGD-a's mean
    /// square: `state_per_param` arrays of `values.len()` floats.
    state: Box<[f32]>,
    /// Updates applied so far (Adam's bias correction).
    step: u64,
}

impl Block {
    fn new(spec: &TableSpec, index: u64, len: usize) -> Block {
        let rule = spec.optimizer.rule;
        let mut values = vec![0.0f32; len];
        let mut state = vec![0.0f32; len * spec.optimizer.state_per_param()].into_boxed_slice();
        spec.init.fill(&spec.name, index, &mut values);
        // The rule's slots first; DC-ASGD-a's mean square (zeros) after them.
        rule.init_state(&values, &mut state[..len * rule.state_per_param()]);
        Block { values: values.into(), state, step: 0 }
    }

    /// A block from `data` = values ++ state, as a checkpoint holds it.
    fn from_data(data: &[f32], len: usize, step: u64) -> Block {
        let (values, state) = data.split_at(len);
        Block { values: values.into(), state: state.into(), step }
    }

    /// How many floats it holds: values and state.
    fn floats(&self) -> usize {
        self.values.len() + self.state.len()
    }

    /// Its values, then its state.
    #[cfg(test)]
    fn data(&self) -> Vec<f32> {
        [&self.values[..], &self.state[..]].concat()
    }

    /// Applies one update, unless it would make a value or an optimizer
    /// state non-finite: then the block keeps what it held and this returns
    /// false. The update goes a tile of [`TILE`] parameters at a time, while
    /// the tile is in the L1 cache: the rule keeps the tile's values and
    /// state as they were ([`Update::apply_saving`]) and checks what it writes
    /// as it goes. If a tile fails, it and the tiles before it are put back
    /// from what was kept. (A copy of the whole block first, then the
    /// update, then a check took three passes over it; a copy of each tile
    /// before its update cost a seventh of a push; docs/PERFORMANCE.md.)
    ///
    /// [`Update::apply_saving`]: ps_common::optim::Update::apply_saving
    fn apply(
        &mut self,
        spec: &TableSpec,
        len: usize,
        grad: &[f32],
        info: &PushInfo,
        read: Option<&[f32]>,
    ) -> bool {
        thread_local! {
            static BEFORE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
        }
        let arrays = 1 + spec.optimizer.state_per_param();
        debug_assert_eq!(self.floats(), arrays * len, "block length");
        let read = read.filter(|r| r.len() == len);
        let step = self.step + 1;
        let update = spec.optimizer.rule.at(step, info.lr_scale(spec));
        // Copied here if a pull's answer still holds them.
        let (values, state) = (Arc::make_mut(&mut self.values), &mut self.state[..]);
        BEFORE.with_borrow_mut(|before| {
            // Grown, never shrunk: the largest block this thread has applied.
            if before.len() < arrays * len {
                before.resize(arrays * len, 0.0);
            }
            for start in (0..len).step_by(TILE) {
                let end = (start + TILE).min(len);
                let saved = &mut before[arrays * start..arrays * end];
                if !apply_update(spec, &update, values, state, start..end, grad, read, saved) {
                    put_back(values, state, before, arrays, end);
                    return false;
                }
            }
            self.step = step;
            true
        })
    }
}

/// Puts back the first `end` parameters of a block's `values` and `state`
/// from `before`, where [`Block::apply`] kept them tile by tile (each
/// tile's values, then each array of its state).
fn put_back(values: &mut [f32], state: &mut [f32], before: &[f32], arrays: usize, end: usize) {
    let len = values.len();
    let mut from = before;
    for start in (0..end).step_by(TILE) {
        let tile_end = (start + TILE).min(end);
        for a in 0..arrays {
            let (kept, rest) = from.split_at(tile_end - start);
            let array = match a {
                0 => &mut values[..],
                _ => &mut state[(a - 1) * len..a * len],
            };
            array[start..tile_end].copy_from_slice(kept);
            from = rest;
        }
    }
}

/// Parameters a dense update handles at a time ([`Block::apply`]): with at
/// most four floats a parameter (Adam's two slots and DC-ASGD-a's mean
/// square beside the value) a tile's floats and their copy take 32 KiB, in
/// the 48 KiB L1 data cache of the machines measured.
const TILE: usize = 1024;

/// The index of the first value of `values` whose magnitude is not at most
/// `bound` (NaN never is; with `bound` = `f32::MAX`: the first non-finite
/// value). Checks 64 values at a time without branches, which the compiler
/// vectorizes: a branch per value made the check of a 1M-float push cost
/// about as much as its apply (docs/PERFORMANCE.md).
fn first_outside(values: &[f32], bound: f32) -> Option<usize> {
    const STRIDE: usize = 64;
    let inside = |v: &f32| v.abs() <= bound;
    values.chunks(STRIDE).enumerate().find_map(|(i, c)| {
        let all_in = c.iter().fold(true, |ok, v| ok & inside(v));
        if all_in { None } else { c.iter().position(|v| !inside(v)).map(|j| i * STRIDE + j) }
    })
}

/// Applies one gradient to the parameters `tile` of a block's `values` and
/// `state` (the optimizer state, array after array) as `update`
/// (the table's rule at the block's next step), after delay compensation if
/// the table has it and `read` is the pushing worker's read of the block.
/// `grad` and `read` cover the whole block. The tile's values and state as
/// they were are kept in `saved` (the tile's values, then its part of each
/// state array). Returns whether every value and state it wrote is finite.
#[allow(clippy::too_many_arguments)] // one update's inputs, passed as they are
fn apply_update(
    spec: &TableSpec,
    update: &Update,
    values: &mut [f32],
    state: &mut [f32],
    tile: std::ops::Range<usize>,
    grad: &[f32],
    read: Option<&[f32]>,
    saved: &mut [f32],
) -> bool {
    let rule = spec.optimizer.rule;
    let len = values.len();
    let (state, mean_square) = state.split_at_mut(len * rule.state_per_param());
    let [first, second] = rule.slots(state, len);
    // The tile of an array the rule uses; an unused one is empty.
    fn part(s: &mut [f32], tile: std::ops::Range<usize>) -> &mut [f32] {
        if s.is_empty() { s } else { &mut s[tile] }
    }
    let (values, slots) =
        (&mut values[tile.clone()], [part(first, tile.clone()), part(second, tile.clone())]);
    let (saved_values, rest) = saved.split_at_mut(values.len());
    let (saved_first, rest) = rest.split_at_mut(slots[0].len());
    let (saved_second, saved_mean_square) = rest.split_at_mut(slots[1].len());
    let saved = [saved_values, saved_first, saved_second];
    // DC-ASGD-a's mean square is kept here: the rule does not know it.
    let mean_square = part(mean_square, tile.clone());
    saved_mean_square.copy_from_slice(mean_square);
    let grad = &grad[tile.clone()];
    match (spec.optimizer.delay_compensation, read) {
        (Some(dc), Some(read)) => {
            let mut g = [0.0f32; TILE];
            let g = &mut g[..grad.len()];
            g.copy_from_slice(grad);
            let read = &read[tile];
            dc.compensate(g, values, read, mean_square);
            let finite = first_outside(mean_square, f32::MAX).is_none();
            update.apply_saving(values, g, slots, saved) & finite
        }
        _ => update.apply_saving(values, grad, slots, saved),
    }
}

/// A worker's last two reads of a chunk, by read clock.
#[derive(Default)]
struct Reads([Option<(u64, Box<[f32]>)>; 2]);

impl Reads {
    fn keep(&mut self, clock: u64, values: &[f32]) {
        if let Some((_, kept)) = self.0.iter_mut().flatten().find(|(c, _)| *c == clock) {
            kept.copy_from_slice(values);
            return;
        }
        // Replace the older (or an empty slot), reusing its buffer.
        let slot = if self.0[0].as_ref().map(|r| r.0) <= self.0[1].as_ref().map(|r| r.0) { 0 } else { 1 };
        match &mut self.0[slot] {
            Some((c, kept)) if kept.len() == values.len() => {
                *c = clock;
                kept.copy_from_slice(values);
            }
            other => *other = Some((clock, values.into())),
        }
    }

    fn at(&self, clock: u64) -> Option<&[f32]> {
        self.0.iter().flatten().find(|(c, _)| *c == clock).map(|(_, v)| &v[..])
    }
}

enum Blocks {
    Dense { len: usize, chunk_len: usize, num_chunks: usize, chunks: DashMap<u32, Block> },
    Sparse { dim: usize, rows: Rows },
}

struct Table {
    spec: TableSpec,
    blocks: Blocks,
    /// Delay compensation: (worker, chunk) -> the values that worker read
    /// at its last two read clocks (a pull for `c + 1` may overtake the push
    /// of `c`, which was computed on the read at `c`). Only for tables with
    /// `delay_compensation`.
    reads: DashMap<(u64, u32), Reads>,
}

impl Table {
    fn kind(&self) -> &'static str {
        match self.blocks {
            Blocks::Dense { .. } => "dense",
            Blocks::Sparse { .. } => "sparse",
        }
    }
}

/// Counters of one shard (read by the stats RPC and the run's metrics).
#[derive(Debug, Default)]
pub struct Counters {
    pub pulls: AtomicU64,
    pub pushes: AtomicU64,
    pub duplicate_pushes: AtomicU64,
    pub rejected: AtomicU64,
    pub values_pulled: AtomicU64,
    pub values_pushed: AtomicU64,
    /// Block updates not applied because they would have made a value or
    /// an optimizer state non-finite.
    pub nonfinite_updates: AtomicU64,
    /// Gradient values clipped to `limits.max_gradient` (clip mode).
    pub clipped_values: AtomicU64,
    /// Dense values an update copied first because a pull's answer still
    /// held them ([`Block`]).
    pub values_copied_on_write: AtomicU64,
}

/// Bytes a dense chunk costs beside its floats (see [`budget::BLOCK_OVERHEAD`];
/// a sparse row costs less: see [`rows`]).
pub use crate::budget::BLOCK_OVERHEAD;

/// One table's size on this shard (see [`Store::table_sizes`]).
#[derive(Debug, Clone, PartialEq)]
pub struct TableSize {
    pub name: String,
    /// `dense` or `sparse`.
    pub kind: &'static str,
    /// Dense chunks or sparse rows held here.
    pub blocks: u64,
    /// Estimated memory of the blocks, in bytes.
    pub bytes: u64,
}

/// One table as a checkpoint holds it: block `i` is `keys[i]` (chunk index
/// or row key), updated `steps[i]` times; `data` holds the blocks' values and
/// optimizer state end to end (each `len * (1 + state_per_param)` floats).
#[derive(Debug, Clone, PartialEq)]
pub struct TableCapture {
    pub spec: TableSpec,
    pub keys: Vec<u64>,
    pub steps: Vec<u64>,
    pub data: Vec<f32>,
}

/// Everything a shard's store holds (see [`Store::capture`]).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Capture {
    pub tables: Vec<TableCapture>,
    /// (worker, last applied seq).
    pub last_seq: Vec<(u64, u64)>,
}

pub struct Store {
    shard: ShardId,
    num_shards: u32,
    tables: DashMap<String, Arc<Table>>,
    /// worker -> last applied seq on this shard.
    last_seq: DashMap<u64, Arc<Mutex<u64>>>,
    /// Most values one pull may return: a pull is an amplifier (a few key
    /// bytes ask for rows of `dim` floats, and may create them), so its
    /// answer is bounded before anything is read or created.
    max_pull_values: usize,
    pub counters: Counters,
    /// What requests may make this store hold (`[limits]`).
    limits: Limits,
    /// The memory budget: every block, table and kept read is reserved
    /// here before it is allocated.
    pub budget: Budget,
    /// Tables held (checked against `limits.max_tables` at registration).
    table_count: AtomicUsize,
}

/// Keeps `values` as `worker`'s read of chunk `index` at `clock` (bounded:
/// at most [`MAX_DC_WORKERS`] workers per table).
/// A new worker's reads are reserved in `budget` first (over it, they are
/// not kept and the push gets no compensation).
fn keep_read(table: &Table, budget: &Budget, worker: u64, clock: u64, index: u32, values: &[f32]) {
    if let Some(mut kept) = table.reads.get_mut(&(worker, index)) {
        kept.keep(clock, values);
        return;
    }
    let chunks = match &table.blocks {
        Blocks::Dense { chunks, .. } => chunks.len().max(1),
        Blocks::Sparse { .. } => return,
    };
    if table.reads.len() / chunks < MAX_DC_WORKERS
        && budget.try_reserve(budget::reads_bytes(values.len())).is_ok()
    {
        table.reads.entry((worker, index)).or_default().keep(clock, values);
    }
}

/// The error of a key named twice in one request.
fn duplicate(name: &str, key: u64) -> Error {
    Error::Duplicate { what: format!("key {key} of `{name}`") }
}

/// A validated dense chunk reference: table, chunk index, chunk length.
type ChunkRef = (Arc<Table>, u32, usize);

impl Store {
    pub fn new(shard: ShardId, num_shards: u32) -> Store {
        assert!(shard < num_shards, "shard {shard} out of range 0..{num_shards}");
        Store {
            shard,
            num_shards,
            tables: DashMap::new(),
            last_seq: DashMap::new(),
            max_pull_values: usize::MAX,
            counters: Counters::default(),
            limits: Limits::default(),
            budget: Budget::default(),
            table_count: AtomicUsize::new(0),
        }
    }

    /// Applies `limits`; what the store holds already (a restored
    /// checkpoint) is charged to the new budget, and refused if over it.
    pub fn with_limits(mut self, limits: Limits) -> Result<Store> {
        let budget = Budget::new(limits.memory_bytes());
        let tables: u64 = self.tables.iter().map(|t| budget::table_bytes(&t.spec)).sum();
        let blocks: u64 = self.table_sizes().iter().map(|t| t.bytes).sum();
        budget.charge(tables + blocks)?;
        self.budget = budget;
        self.limits = limits;
        Ok(self)
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Bytes of the dense chunks of `spec` this shard owns (refused if the
    /// tensor has more chunks than `limits.max_chunks_per_table`).
    fn dense_bytes(&self, spec: &TableSpec, len: usize, chunk_len: usize) -> Result<u64> {
        let num_chunks = partition::num_chunks(len, chunk_len);
        let limit = self.limits.max_chunks_per_table;
        if num_chunks as u64 > limit {
            return Err(Error::LimitExceeded { what: "chunks of one tensor", got: num_chunks as u64, limit });
        }
        let owned = (0..num_chunks as u32)
            .filter(|&i| partition::chunk_shard(&spec.name, i, self.num_shards) == self.shard);
        Ok(owned
            .map(|i| budget::block_bytes(spec, partition::chunk_range(len, chunk_len, i as usize).len()))
            .sum())
    }

    /// Refuses pulls that would return more than `n` values.
    pub fn with_max_pull_values(mut self, n: usize) -> Store {
        self.max_pull_values = n;
        self
    }

    fn check_pull_size(&self, values: Option<usize>) -> Result<()> {
        match values {
            Some(n) if n <= self.max_pull_values => Ok(()),
            _ => Err(Error::TooLarge { what: "pull answer", values, limit: self.max_pull_values }),
        }
    }

    pub fn shard(&self) -> ShardId {
        self.shard
    }

    pub fn num_shards(&self) -> u32 {
        self.num_shards
    }

    /// Creates a table, or checks that the existing one has the same spec.
    /// Returns whether it was created.
    pub fn register(&self, spec: TableSpec, caller_shards: u32) -> Result<bool> {
        if caller_shards != self.num_shards {
            return Err(Error::ShardCountMismatch {
                caller: caller_shards,
                ours: self.num_shards,
                shard: self.shard,
            });
        }
        spec.validate()?;
        let entry = self.tables.entry(spec.name.clone());
        if let dashmap::Entry::Occupied(existing) = &entry {
            return if existing.get().spec == spec { Ok(false) } else { Err(Error::SpecConflict(spec.name)) };
        }
        let count = self.table_count.fetch_add(1, Ordering::Relaxed);
        let checked = self.limits.check_table(&spec, count).and_then(|()| {
            let blocks = match &spec.layout {
                Layout::Dense { shape, chunk_len } => {
                    self.dense_bytes(&spec, Layout::dense_len(shape).unwrap_or(0), *chunk_len as usize)?
                }
                Layout::Sparse { .. } => 0,
            };
            self.budget.try_reserve(budget::table_bytes(&spec).saturating_add(blocks))
        });
        if let Err(e) = checked {
            self.table_count.fetch_sub(1, Ordering::Relaxed);
            return Err(e);
        }
        let blocks = match &spec.layout {
            Layout::Dense { shape, chunk_len } => {
                // validate() guarantees the length fits.
                let len = Layout::dense_len(shape).unwrap_or(0);
                let chunk_len = *chunk_len as usize;
                let num_chunks = partition::num_chunks(len, chunk_len);
                let chunks = DashMap::new();
                for i in 0..num_chunks as u32 {
                    if partition::chunk_shard(&spec.name, i, self.num_shards) == self.shard {
                        let r = partition::chunk_range(len, chunk_len, i as usize);
                        chunks.insert(i, Block::new(&spec, u64::from(i), r.len()));
                    }
                }
                Blocks::Dense { len, chunk_len, num_chunks, chunks }
            }
            Layout::Sparse { dim } => {
                Blocks::Sparse { dim: *dim as usize, rows: Rows::new(&spec, *dim as usize) }
            }
        };
        entry.or_insert(Arc::new(Table { spec, blocks, reads: DashMap::new() }));
        Ok(true)
    }

    fn table(&self, name: &str) -> Result<Arc<Table>> {
        self.tables.get(name).map(|t| Arc::clone(&t)).ok_or_else(|| Error::UnknownTable(name.to_string()))
    }

    /// Checks that chunk `index` of `table` exists and is ours; returns its length.
    fn check_chunk(&self, table: &Table, index: u32) -> Result<usize> {
        let Blocks::Dense { len, chunk_len, num_chunks, .. } = &table.blocks else {
            return Err(Error::WrongKind {
                name: table.spec.name.clone(),
                expected: "dense",
                actual: table.kind(),
            });
        };
        if index as usize >= *num_chunks {
            return Err(Error::ChunkOutOfRange {
                tensor: table.spec.name.clone(),
                index,
                chunks: *num_chunks,
            });
        }
        let owner = partition::chunk_shard(&table.spec.name, index, self.num_shards);
        if owner != self.shard {
            return Err(Error::WrongShard {
                table: table.spec.name.clone(),
                what: format!("chunk {index}"),
                owner,
                this: self.shard,
            });
        }
        Ok(partition::chunk_range(*len, *chunk_len, index as usize).len())
    }

    /// The codecs of dense tensor `name` and the length of its chunk
    /// `index`, checked as a push or pull checks them (the service decodes
    /// compressed gradients to that length).
    pub fn dense_wire(&self, name: &str, index: u32) -> Result<(Codecs, usize)> {
        let table = self.table(name)?;
        let len = self.check_chunk(&table, index)?;
        Ok((table.spec.codecs, len))
    }

    /// The codecs of sparse table `name` and its row width.
    pub fn sparse_wire(&self, name: &str) -> Result<(Codecs, usize)> {
        let (table, dim) = self.sparse_table(name)?;
        Ok((table.spec.codecs, dim))
    }

    /// Refuses, before its keys are decoded, a pull of `keys` keys from
    /// sparse table `name` whose answer would be over the limit; returns the
    /// table's row width.
    pub fn check_sparse_pull(&self, name: &str, keys: usize) -> Result<usize> {
        let (_, dim) = self.sparse_table(name)?;
        self.check_pull_size(keys.checked_mul(dim))?;
        Ok(dim)
    }

    /// The codecs of table `name`, if it exists.
    pub fn codecs(&self, name: &str) -> Option<Codecs> {
        self.tables.get(name).map(|t| t.spec.codecs)
    }

    /// A push of `values` gradient values must fit the limit of one answer
    /// (a top-k encoding names its block's length: this bounds what a
    /// decoder allocates).
    pub fn check_push_size(&self, values: Option<usize>) -> Result<()> {
        match values {
            Some(n) if n <= self.max_pull_values => Ok(()),
            _ => Err(Error::TooLarge { what: "push gradient", values, limit: self.max_pull_values }),
        }
    }

    /// Checks that every chunk exists and is ours, without reading anything.
    fn resolve_chunks(&self, chunks: &[(&str, u32)]) -> Result<Vec<ChunkRef>> {
        chunks
            .iter()
            .map(|&(name, index)| {
                let table = self.table(name)?;
                let len = self.check_chunk(&table, index)?;
                Ok((table, index, len))
            })
            .collect()
    }

    /// Reads dense chunks: `visit` gets each chunk's values, in request order,
    /// while that chunk is locked. Every chunk is checked before the first
    /// is read, so on an error `visit` has not been called.
    pub fn pull_dense(&self, chunks: &[(&str, u32)], mut visit: impl FnMut(&[f32])) -> Result<()> {
        self.pull_dense_as(None, chunks, |v| visit(v))
    }

    /// As [`Store::pull_dense`], for training worker `reader` = (worker,
    /// read clock), a member of the clock set: of a table with delay
    /// compensation, the values read are kept as that worker's read of the
    /// chunk at that clock, under the chunk's lock.
    ///
    /// `visit` gets the chunk's values themselves: a clone of the `Arc` may
    /// be kept (an answer written from them without a copy), and the chunk's
    /// next update copies them first while it is ([`Block`]).
    pub fn pull_dense_as(
        &self,
        reader: Option<(u64, u64)>,
        chunks: &[(&str, u32)],
        mut visit: impl FnMut(&Arc<[f32]>),
    ) -> Result<()> {
        let resolved = self.resolve_chunks(chunks)?;
        self.check_pull_size(resolved.iter().try_fold(0usize, |n, (_, _, len)| n.checked_add(*len)))?;
        let mut seen = HashSet::with_capacity(chunks.len());
        if let Some((name, index)) = chunks.iter().find(|c| !seen.insert(**c)) {
            return Err(Error::Duplicate { what: format!("chunk {index} of `{name}`") });
        }
        let mut total = 0;
        for (table, index, len) in &resolved {
            let Blocks::Dense { chunks, .. } = &table.blocks else { unreachable!("checked by check_chunk") };
            let block = chunks.get(index).expect("owned chunks are created at registration");
            let values = &block.values;
            debug_assert_eq!(values.len(), *len, "chunk length");
            if let Some((worker, clock)) = reader
                && table.spec.optimizer.delay_compensation.is_some()
            {
                keep_read(table, &self.budget, worker, clock, *index, values);
            }
            visit(values);
            total += len;
        }
        self.counters.pulls.fetch_add(1, Ordering::Relaxed);
        self.counters.values_pulled.fetch_add(total as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Forgets what `worker` read (it left the job).
    pub fn forget_reads(&self, worker: u64) {
        for t in self.tables.iter() {
            t.reads.retain(|(w, _), kept| {
                if *w == worker {
                    let len = kept.0.iter().flatten().map(|(_, v)| v.len()).next().unwrap_or(0);
                    self.budget.release(budget::reads_bytes(len));
                }
                *w != worker
            });
        }
    }

    /// Validates a whole dense push without changing anything.
    fn validate_dense(&self, chunks: &[(&str, u32, &[f32])]) -> Result<Vec<ChunkRef>> {
        let mut seen = HashSet::with_capacity(chunks.len());
        let mut resolved = Vec::with_capacity(chunks.len());
        for &(name, index, grad) in chunks {
            let table = self.table(name)?;
            let len = self.check_chunk(&table, index)?;
            if !seen.insert((name, index)) {
                return Err(Error::Duplicate { what: format!("chunk {index} of `{name}`") });
            }
            if grad.len() != len {
                return Err(Error::DimMismatch {
                    tensor: name.to_string(),
                    index,
                    expected: len,
                    got: grad.len(),
                });
            }
            self.check_gradient(grad, || format!("chunk {index} of `{name}`"))?;
            resolved.push((table, index, len));
        }
        Ok(resolved)
    }

    /// Applies a dense push of `(tensor, chunk index, gradient)`: all chunks
    /// or, on any error, none.
    pub fn push_dense(&self, chunks: &[(&str, u32, &[f32])], info: PushInfo) -> Result<PushOutcome> {
        let resolved = self.validate_dense(chunks)?;
        self.exactly_once(info, || {
            if info.dropped() {
                return 0;
            }
            let mut applied = 0;
            for ((table, index, len), &(_, _, grad)) in resolved.iter().zip(chunks) {
                let Blocks::Dense { chunks, .. } = &table.blocks else { unreachable!("validated") };
                let mut block = chunks.get_mut(index).expect("owned chunks are created at registration");
                let reads = table.reads.get(&(info.worker, *index));
                let read = reads.as_deref().and_then(|r| r.at(info.read_clock));
                if Arc::strong_count(&block.values) > 1 {
                    self.counters.values_copied_on_write.fetch_add(*len as u64, Ordering::Relaxed);
                }
                if block.apply(&table.spec, *len, grad, &info, read) {
                    applied += *len as u64;
                } else {
                    self.counters.nonfinite_updates.fetch_add(1, Ordering::Relaxed);
                }
            }
            applied
        })
    }

    /// Runs `apply` unless `(worker, seq)` was applied before. The worker's
    /// lock is held across the check and the apply.
    /// A seq may lead the last applied one by at most `limits.max_seq_jump`,
    /// and the store keeps seqs of at most `limits.max_workers` workers.
    fn exactly_once(&self, info: PushInfo, apply: impl FnOnce() -> u64) -> Result<PushOutcome> {
        let applied = if info.seq == 0 {
            apply()
        } else {
            let max = self.limits.max_workers;
            if !self.last_seq.contains_key(&info.worker) && self.last_seq.len() >= max {
                let got = self.last_seq.len() as u64 + 1;
                return Err(Error::LimitExceeded { what: "workers with seqs", got, limit: max as u64 });
            }
            let lock = Arc::clone(&self.last_seq.entry(info.worker).or_default());
            let mut last = lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if info.seq <= *last {
                self.counters.duplicate_pushes.fetch_add(1, Ordering::Relaxed);
                return Ok(PushOutcome { applied: 0, duplicate: true });
            }
            self.limits.check_seq(info.seq, *last)?;
            let applied = apply();
            *last = info.seq;
            applied
        };
        self.counters.pushes.fetch_add(1, Ordering::Relaxed);
        self.counters.values_pushed.fetch_add(applied, Ordering::Relaxed);
        Ok(PushOutcome { applied, duplicate: false })
    }

    /// The last seq applied for `worker` on this shard (0 if none).
    pub fn last_seq(&self, worker: u64) -> u64 {
        self.last_seq.get(&worker).map(|l| *l.lock().unwrap_or_else(|p| p.into_inner())).unwrap_or(0)
    }

    /// Refuses a gradient with a value that is not finite or over
    /// `limits.max_gradient` in magnitude (one pass; `what` names the block).
    fn check_gradient(&self, grad: &[f32], what: impl Fn() -> String) -> Result<()> {
        let max = self.limits.max_gradient;
        match first_outside(grad, max).map(|i| grad[i]) {
            None => Ok(()),
            Some(g) if g.is_finite() => Err(Error::HugeGradient { what: what(), value: g, limit: max }),
            Some(_) => Err(Error::NonFinite { what: what() }),
        }
    }

    fn sparse_table(&self, name: &str) -> Result<(Arc<Table>, usize)> {
        let table = self.table(name)?;
        match table.blocks {
            Blocks::Sparse { dim, .. } => Ok((table, dim)),
            Blocks::Dense { .. } => {
                Err(Error::WrongKind { name: name.to_string(), expected: "sparse", actual: table.kind() })
            }
        }
    }

    fn check_keys(&self, table: &str, keys: &[u64]) -> Result<()> {
        for &key in keys {
            let owner = partition::key_shard(key, self.num_shards);
            if owner != self.shard {
                return Err(Error::WrongShard {
                    table: table.to_string(),
                    what: format!("key {key}"),
                    owner,
                    this: self.shard,
                });
            }
        }
        Ok(())
    }

    /// Reads rows: `visit` gets each key's position in `keys` and its `dim`
    /// values while that row is locked, stripe by stripe (not in request
    /// order); returns `dim`. Missing rows are created with the table's
    /// initializer, unless `read_only`, where they read as their initial
    /// values and stay missing. Every key is checked before the first row is
    /// read, so on an error `visit` has not been called.
    pub fn pull_sparse(
        &self,
        name: &str,
        keys: &[u64],
        read_only: bool,
        mut visit: impl FnMut(usize, &[f32]),
    ) -> Result<usize> {
        let (table, dim) = self.sparse_table(name)?;
        self.check_keys(name, keys)?;
        self.check_pull_size(keys.len().checked_mul(dim))?;
        let g = Rows::group(keys);
        let Blocks::Sparse { rows, .. } = &table.blocks else { unreachable!("checked") };
        // Each stripe under its read lock: its keys' slots (and the check
        // that none is named twice), then its rows, each asked for a few
        // rows ahead. Rows are created only once every stripe is checked.
        let (mut slots, mut seen) = (vec![NO_SLOT; keys.len()], Seen::default());
        let mut missing = false;
        for s in 0..STRIPES {
            let part = g.part(s);
            if part.is_empty() {
                continue;
            }
            let stripe = rows.read(s);
            let slots = &mut slots[part.clone()];
            missing |= stripe
                .locate(rows, &g.keys[part.clone()], slots, &mut seen)
                .map_err(|k| duplicate(name, k))?
                > 0;
            for (j, (&i, &slot)) in g.order[part].iter().zip(slots.iter()).enumerate() {
                if let Some(&ahead) = slots.get(j + PREFETCH_AHEAD).filter(|&&s| s != NO_SLOT) {
                    prefetch(&stripe.row(ahead, rows.width)[..dim]);
                }
                if slot != NO_SLOT {
                    visit(i as usize, &stripe.row(slot, rows.width)[..dim]);
                }
            }
        }
        if missing {
            self.pull_missing(&table, rows, &g, &slots, read_only, &mut visit)?;
        }
        self.counters.pulls.fetch_add(1, Ordering::Relaxed);
        self.counters.values_pulled.fetch_add((keys.len() * dim) as u64, Ordering::Relaxed);
        Ok(dim)
    }

    /// The rows of a pull's keys that had none ([`NO_SLOT`] in `slots`):
    /// read as their initial values (`read_only`) or created, stripe by
    /// stripe, each stripe's reserved from the budget together (one atomic
    /// update, not one a row). Over the budget, the pull is refused (rows of
    /// earlier stripes stay); rows another request created meanwhile are
    /// read, and what they leave of the reservation is given back.
    fn pull_missing(
        &self,
        table: &Table,
        rows: &Rows,
        g: &Grouped,
        slots: &[u32],
        read_only: bool,
        visit: &mut impl FnMut(usize, &[f32]),
    ) -> Result<()> {
        let dim = rows.dim;
        let row_bytes = budget::block_bytes(&table.spec, dim);
        let (mut missing, mut scratch) = (Vec::new(), Vec::new());
        for s in 0..STRIPES {
            missing.clear();
            let part = g.part(s);
            let (order, keys) = (&g.order[part.clone()], &g.keys[part.clone()]);
            missing.extend(
                (0..part.len())
                    .filter(|&j| slots[part.start + j] == NO_SLOT)
                    .map(|j| (order[j] as usize, keys[j])),
            );
            if missing.is_empty() {
                continue;
            }
            if read_only {
                for &(i, key) in &missing {
                    scratch.resize(dim, 0.0);
                    table.spec.init.fill(&table.spec.name, key, &mut scratch);
                    visit(i, &scratch);
                }
                continue;
            }
            let mut reserved = self.budget.reserve(row_bytes.saturating_mul(missing.len() as u64))?;
            let mut stripe = rows.write(s);
            for &(i, key) in &missing {
                let hash = rows.hash(key);
                let slot = match stripe.find(hash, key) {
                    Some(slot) => slot,
                    None => {
                        reserved.keep(row_bytes);
                        stripe.create_row(rows, &table.spec, hash, key, &mut scratch)
                    }
                };
                visit(i, &stripe.row(slot, rows.width)[..dim]);
            }
        }
        Ok(())
    }

    /// Checks a sparse push; returns its table, row width and keys grouped by
    /// stripe ([`Rows::group`]).
    fn validate_sparse(
        &self,
        name: &str,
        keys: &[u64],
        grads: &[f32],
    ) -> Result<(Arc<Table>, usize, Grouped)> {
        let (table, dim) = self.sparse_table(name)?;
        self.check_keys(name, keys)?;
        if grads.len() != keys.len() * dim {
            let (expected, got) = (keys.len() * dim, grads.len());
            return Err(ps_common::Error::LengthMismatch { what: "sparse gradient", expected, got }.into());
        }
        let grouped = Rows::group(keys);
        let max = self.limits.max_gradient;
        if let Some(i) = first_outside(grads, max) {
            self.check_gradient(&grads[i..=i], || format!("row of key {} of `{name}`", keys[i / dim]))?;
        }
        Ok((table, dim, grouped))
    }

    /// Applies a sparse push: `grads` holds `dim` values per key, in key
    /// order. All rows or, on any error, none.
    pub fn push_sparse(
        &self,
        name: &str,
        keys: &[u64],
        grads: &[f32],
        info: PushInfo,
    ) -> Result<PushOutcome> {
        let (table, dim, g) = self.validate_sparse(name, keys, grads)?;
        let Blocks::Sparse { rows, .. } = &table.blocks else { unreachable!("validated") };
        // Each key's slot, found under its stripe's read lock (rows never
        // move and are never removed, so a slot found stays valid); the
        // rows it would create are reserved before anything is applied, and
        // those a concurrent request creates first go back on drop.
        // The check that no key is named twice comes with it (`locate`).
        let (mut slots, mut seen) = (vec![NO_SLOT; keys.len()], Seen::default());
        let mut missing = 0u64;
        for s in 0..STRIPES {
            let part = g.part(s);
            if part.is_empty() {
                continue;
            }
            let found = rows.read(s).locate(rows, &g.keys[part.clone()], &mut slots[part], &mut seen);
            missing += found.map_err(|k| duplicate(name, k))? as u64;
        }
        let row_bytes = budget::block_bytes(&table.spec, dim);
        let mut reserved = self.budget.reserve(row_bytes.saturating_mul(missing))?;
        self.exactly_once(info, || {
            if info.dropped() {
                return 0;
            }
            let (mut scratch, mut before) = (Vec::new(), Vec::new());
            let lr_scale = info.lr_scale(&table.spec);
            let mut update = table.spec.optimizer.rule.at(1, lr_scale);
            let mut applied = 0;
            for s in 0..STRIPES {
                let part = g.part(s);
                if part.is_empty() {
                    continue;
                }
                let mut stripe = rows.write(s);
                let (slots, keys) = (&slots[part.clone()], &g.keys[part.clone()]);
                let part = &g.order[part];
                for (j, (&i, &slot)) in part.iter().zip(slots).enumerate() {
                    if let (Some(&ahead), Some(&slot)) =
                        (part.get(j + PREFETCH_AHEAD), slots.get(j + PREFETCH_AHEAD))
                    {
                        let ahead = ahead as usize;
                        prefetch(&grads[ahead * dim..(ahead + 1) * dim]);
                        if slot != NO_SLOT {
                            prefetch(stripe.row(slot, rows.width));
                        }
                    }
                    let (i, key) = (i as usize, keys[j]);
                    let slot = match slot {
                        NO_SLOT => {
                            let hash = rows.hash(key);
                            match stripe.find(hash, key) {
                                Some(slot) => slot,
                                None => {
                                    reserved.keep(row_bytes);
                                    stripe.create_row(rows, &table.spec, hash, key, &mut scratch)
                                }
                            }
                        }
                        slot => slot,
                    };
                    let (data, step) = stripe.row_mut(slot, rows.width);
                    // Rows of rules that read no update count keep none.
                    let next = step.as_deref().map_or(1, |s| *s + 1);
                    before.resize(data.len(), 0.0);
                    let grad = &grads[i * dim..(i + 1) * dim];
                    // An update that would make a value non-finite is undone.
                    // Rows pushed together mostly share their step: the
                    // update's constants are worked out again only when not.
                    if update.step() != next {
                        update = table.spec.optimizer.rule.at(next, lr_scale);
                    }
                    let (values, state) = data.split_at_mut(dim);
                    if apply_update(&table.spec, &update, values, state, 0..dim, grad, None, &mut before) {
                        if let Some(s) = step {
                            *s = next;
                        }
                        applied += 1;
                    } else {
                        data.copy_from_slice(&before);
                        self.counters.nonfinite_updates.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            applied
        })
    }

    /// The spec of every table, by name.
    pub fn specs(&self) -> Vec<TableSpec> {
        let mut specs: Vec<TableSpec> = self.tables.iter().map(|t| t.spec.clone()).collect();
        specs.sort_by(|a, b| a.name.cmp(&b.name));
        specs
    }

    /// (tables, dense chunks held, sparse rows held).
    pub fn sizes(&self) -> (u64, u64, u64) {
        let (mut chunks, mut rows) = (0, 0);
        for t in self.tables.iter() {
            match &t.blocks {
                Blocks::Dense { chunks: c, .. } => chunks += c.len() as u64,
                Blocks::Sparse { rows: r, .. } => rows += r.len() as u64,
            }
        }
        (self.tables.len() as u64, chunks, rows)
    }

    /// Blocks held and an estimate of their memory, per table, by name (for
    /// metrics): values and optimizer state, plus [`BLOCK_OVERHEAD`] per
    /// dense chunk and the row overhead of [`rows`] per sparse row.
    pub fn table_sizes(&self) -> Vec<TableSize> {
        let mut out: Vec<TableSize> = (self.tables.iter())
            .map(|t| {
                let (blocks, floats) = match &t.blocks {
                    Blocks::Dense { chunks, .. } => {
                        (chunks.len() as u64, chunks.iter().map(|c| c.floats() as u64).sum::<u64>())
                    }
                    Blocks::Sparse { rows, .. } => (rows.len() as u64, rows.len() as u64 * rows.width as u64),
                };
                let overhead = match &t.blocks {
                    Blocks::Dense { .. } => BLOCK_OVERHEAD,
                    Blocks::Sparse { rows, .. } => rows.overhead_per_row(),
                };
                TableSize {
                    name: t.spec.name.clone(),
                    kind: t.kind(),
                    blocks,
                    bytes: floats * 4 + blocks * overhead,
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Reads the rows of sparse table `name` with keys above `after` (all
    /// rows when `None`), at most `limit` of them, in key order: `visit` gets
    /// each key and row. Returns `dim` and whether no row is left above the
    /// last one visited. A page costs a pass over the table's keys.
    pub fn scan_sparse(
        &self,
        name: &str,
        after: Option<u64>,
        limit: usize,
        mut visit: impl FnMut(u64, &[f32]),
    ) -> Result<(usize, bool)> {
        let (table, dim) = self.sparse_table(name)?;
        // A page's answer holds a key (2 values' bytes) beside each row,
        // and 64 bytes of framing.
        let limit = limit.clamp(1, (self.max_pull_values.saturating_sub(16) / (dim + 2)).max(1));
        let Blocks::Sparse { rows, .. } = &table.blocks else { unreachable!("checked") };
        let mut keys = Vec::new();
        rows.for_each(|k, _, _| {
            if after.is_none_or(|a| k > a) {
                keys.push(k);
            }
        });
        let done = keys.len() <= limit;
        if !done {
            keys.select_nth_unstable(limit);
            keys.truncate(limit);
        }
        keys.sort_unstable();
        for k in keys {
            rows.get(k, |_, row| visit(k, &row[..dim]));
        }
        Ok((dim, done))
    }

    /// A copy of every table this shard holds, with optimizer state and step
    /// counts, and of the last seq applied per worker: what a checkpoint
    /// writes. Consistent only while no push is being applied (the caller
    /// holds the push gate); a read creating a sparse row meanwhile only adds
    /// a row at its initial values.
    pub fn capture(&self) -> Capture {
        let mut tables: Vec<TableCapture> = self
            .tables
            .iter()
            .map(|t| {
                let (mut keys, mut steps, mut data) = (Vec::new(), Vec::new(), Vec::new());
                let mut push = |key: u64, b: &Block| {
                    keys.push(key);
                    steps.push(b.step);
                    data.extend_from_slice(&b.values);
                    data.extend_from_slice(&b.state);
                };
                match &t.blocks {
                    Blocks::Dense { chunks, .. } => {
                        let mut order: Vec<u32> = chunks.iter().map(|b| *b.key()).collect();
                        order.sort_unstable();
                        for i in order {
                            if let Some(b) = chunks.get(&i) {
                                push(u64::from(i), &b);
                            }
                        }
                    }
                    Blocks::Sparse { rows, .. } => {
                        // In key order, so a checkpoint of the same state is the same file.
                        let mut order = Vec::with_capacity(rows.len());
                        rows.for_each(|k, _, _| order.push(k));
                        order.sort_unstable();
                        for k in order {
                            rows.get(k, |step, row| {
                                keys.push(k);
                                steps.push(step);
                                data.extend_from_slice(row);
                            });
                        }
                    }
                }
                TableCapture { spec: t.spec.clone(), keys, steps, data }
            })
            .collect();
        tables.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        let mut last_seq: Vec<(u64, u64)> =
            self.last_seq.iter().map(|e| (*e.key(), self.last_seq(*e.key()))).collect();
        last_seq.sort_unstable();
        Capture { tables, last_seq }
    }

    /// Rebuilds a shard's store from a capture, checking everything a file
    /// could get wrong: every spec valid, every block owned by this shard and
    /// of its exact length, every dense chunk present once, no key twice,
    /// every value finite. Nothing is kept from a capture that fails. The
    /// tables are registered under the shard's own `limits` (its budget,
    /// table count, chunk count), so what does not fit is refused before
    /// it is allocated, and a budget above the default one is honoured.
    pub fn restore(shard: ShardId, num_shards: u32, capture: Capture, limits: &Limits) -> Result<Store> {
        let store = Store::new(shard, num_shards).with_limits(limits.clone())?;
        let bad = |table: &str, reason: String| Error::BadCheckpoint(format!("table `{table}`: {reason}"));
        for t in capture.tables {
            let name = t.spec.name.clone();
            if !store.register(t.spec, num_shards)? {
                return Err(bad(&name, "appears twice".into()));
            }
            let table = store.table(&name)?;
            let width = 1 + table.spec.optimizer.state_per_param();
            if t.keys.len() != t.steps.len() {
                return Err(bad(&name, format!("{} keys but {} step counts", t.keys.len(), t.steps.len())));
            }
            if let Some(v) = t.data.iter().find(|v| !v.is_finite()) {
                return Err(bad(&name, format!("non-finite value {v}")));
            }
            let mut data = t.data.as_slice();
            let mut take = |n: usize| -> Result<Box<[f32]>> {
                if data.len() < n {
                    return Err(bad(&name, "fewer values than its blocks need".into()));
                }
                let (head, rest) = data.split_at(n);
                data = rest;
                Ok(head.into())
            };
            match &table.blocks {
                Blocks::Dense { chunks, .. } => {
                    if t.keys.len() != chunks.len() {
                        return Err(bad(
                            &name,
                            format!("{} chunks, this shard owns {}", t.keys.len(), chunks.len()),
                        ));
                    }
                    let mut seen = HashSet::new();
                    for (&key, &step) in t.keys.iter().zip(&t.steps) {
                        let index =
                            u32::try_from(key).map_err(|_| bad(&name, format!("chunk index {key}")))?;
                        let len = store.check_chunk(&table, index)?;
                        if !seen.insert(index) {
                            return Err(bad(&name, format!("chunk {index} twice")));
                        }
                        let data = take(len * width)?;
                        chunks.insert(index, Block::from_data(&data, len, step));
                    }
                }
                Blocks::Sparse { dim, rows } => {
                    store.check_keys(&name, &t.keys)?;
                    for (&key, &step) in t.keys.iter().zip(&t.steps) {
                        if !rows.insert(key, step, &take(dim * width)?) {
                            return Err(bad(&name, format!("key {key} twice")));
                        }
                    }
                }
            }
            if !data.is_empty() {
                return Err(bad(&name, format!("{} values left over", data.len())));
            }
        }
        for (worker, seq) in capture.last_seq {
            store.last_seq.insert(worker, Arc::new(Mutex::new(seq)));
        }
        Ok(store)
    }

    /// A copy of the values of every block of a table this shard holds, as
    /// (index or key, values): for checkpoints, export and tests.
    pub fn snapshot(&self, name: &str) -> Result<Vec<(u64, Vec<f32>)>> {
        let table = self.table(name)?;
        let mut out: Vec<(u64, Vec<f32>)> = match &table.blocks {
            Blocks::Dense { chunks, .. } => {
                chunks.iter().map(|b| (u64::from(*b.key()), b.values.to_vec())).collect()
            }
            Blocks::Sparse { dim, rows } => {
                let mut out = Vec::with_capacity(rows.len());
                rows.for_each(|k, _, row| out.push((k, row[..*dim].to_vec())));
                out
            }
        };
        out.sort_unstable_by_key(|(k, _)| *k);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ps_common::optim::Rule;
    use ps_common::spec::{Init, InitKind};

    fn sgd_dense(name: &str, len: u64, chunk_len: u32) -> TableSpec {
        let mut t = TableSpec::dense(name, &[len], Init::zeros(), Rule::sgd(0.5).into());
        t.layout = Layout::Dense { shape: vec![len], chunk_len };
        t
    }

    proptest::proptest! {
        /// The branch-free scan finds what a plain scan finds: the first
        /// value over the bound, NaN and infinities included.
        #[test]
        fn first_outside_is_the_first_value_over_the_bound(
            values in proptest::collection::vec(
                proptest::prop_oneof![
                    8 => -10.0f32..10.0,
                    1 => proptest::sample::select(vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e30, -1e30]),
                ],
                0..300,
            ),
            bound in proptest::sample::select(vec![5.0f32, 9.5, f32::MAX]),
        ) {
            let plain = values.iter().position(|v| !(v.is_finite() && v.abs() <= bound));
            proptest::prop_assert_eq!(first_outside(&values, bound), plain);
        }
    }

    /// Pulls dense chunks as one vector per chunk.
    fn pull(s: &Store, chunks: &[(&str, u32)]) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::new();
        s.pull_dense(chunks, |v| out.push(v.to_vec()))?;
        Ok(out)
    }

    /// Pulls sparse rows as one flat vector.
    fn pull_rows(s: &Store, name: &str, keys: &[u64], read_only: bool) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        let mut at = vec![usize::MAX; keys.len()];
        let dim = s.pull_sparse(name, keys, read_only, |i, row| {
            at[i] = out.len();
            out.extend_from_slice(row);
        })?;
        // Back in request order, each position visited once.
        Ok(at.iter().flat_map(|&a| out[a..a + dim].iter().copied()).collect())
    }

    #[test]
    fn register_is_idempotent_and_detects_conflicts() {
        let s = Store::new(0, 1);
        assert!(s.register(sgd_dense("w", 10, 4), 1).unwrap());
        assert!(!s.register(sgd_dense("w", 10, 4), 1).unwrap());
        assert!(matches!(s.register(sgd_dense("w", 11, 4), 1), Err(Error::SpecConflict(_))));
        assert!(matches!(s.register(sgd_dense("x", 11, 4), 2), Err(Error::ShardCountMismatch { .. })));
    }

    #[test]
    fn dense_push_applies_sgd_and_dedups() {
        let s = Store::new(0, 1);
        s.register(sgd_dense("w", 10, 4), 1).unwrap();
        let g = [1.0; 4];
        let info = PushInfo { worker: 1, seq: 1, ..PushInfo::default() };
        assert_eq!(
            s.push_dense(&[("w", 0, &g)], info).unwrap(),
            PushOutcome { applied: 4, duplicate: false }
        );
        assert_eq!(s.push_dense(&[("w", 0, &g)], info).unwrap(), PushOutcome { applied: 0, duplicate: true });
        assert_eq!(pull(&s, &[("w", 0), ("w", 2)]).unwrap(), vec![vec![-0.5; 4], vec![0.0; 2]]);
        assert_eq!(s.last_seq(1), 1);
    }

    #[test]
    fn a_rejected_dense_push_changes_nothing() {
        let s = Store::new(0, 1);
        s.register(sgd_dense("w", 10, 4), 1).unwrap();
        let info = PushInfo { worker: 1, seq: 1, ..PushInfo::default() };
        let (g, short, bad) = ([1.0; 4], [1.0; 3], [1.0, f32::NAN]);
        let check = |chunks: &[(&str, u32, &[f32])]| s.push_dense(chunks, info).unwrap_err();
        assert!(matches!(
            check(&[("w", 0, &g), ("w", 1, &short)]),
            Error::DimMismatch { expected: 4, got: 3, .. }
        ));
        assert!(matches!(check(&[("w", 0, &g), ("w", 2, &bad)]), Error::NonFinite { .. }));
        assert!(matches!(check(&[("w", 0, &g), ("w", 0, &g)]), Error::Duplicate { .. }));
        assert!(matches!(check(&[("w", 0, &g), ("w", 3, &g)]), Error::ChunkOutOfRange { chunks: 3, .. }));
        assert!(matches!(check(&[("w", 0, &g), ("v", 0, &g)]), Error::UnknownTable(_)));
        assert_eq!(
            pull(&s, &[("w", 0), ("w", 1), ("w", 2)]).unwrap(),
            vec![vec![0.0; 4], vec![0.0; 4], vec![0.0; 2]]
        );
        assert_eq!(s.last_seq(1), 0, "a rejected push does not consume its seq");
        let mut visited = 0;
        assert!(matches!(
            s.pull_dense(&[("w", 0), ("w", 3)], |_| visited += 1),
            Err(Error::ChunkOutOfRange { .. })
        ));
        assert_eq!(visited, 0, "a rejected pull reads nothing");
    }

    #[test]
    fn sparse_rows_are_created_on_first_touch_with_the_initializer() {
        let s = Store::new(0, 1);
        let init = Init { kind: InitKind::Constant { value: 2.0 }, seed: 0 };
        s.register(TableSpec::sparse("e", 3, init, Rule::sgd(1.0).into()), 1).unwrap();
        assert_eq!(s.pull_sparse("e", &[7, 9], true, |_, _| {}).unwrap(), 3);
        assert_eq!(pull_rows(&s, "e", &[7, 9], true).unwrap(), vec![2.0; 6]);
        assert_eq!(s.sizes(), (1, 0, 0), "a read-only pull creates nothing");
        assert_eq!(pull_rows(&s, "e", &[7, 9], false).unwrap(), vec![2.0; 6]);
        s.push_sparse("e", &[9], &[1.0, 1.0, 1.0], PushInfo::default()).unwrap();
        assert_eq!(pull_rows(&s, "e", &[9, 7], true).unwrap(), vec![1.0, 1.0, 1.0, 2.0, 2.0, 2.0]);
        assert_eq!(s.sizes(), (1, 0, 2));
    }

    #[test]
    fn pulls_over_the_size_limit_are_refused_before_anything_is_created() {
        let s = Store::new(0, 1).with_max_pull_values(10);
        s.register(TableSpec::sparse("e", 3, Init::zeros(), Rule::sgd(1.0).into()), 1).unwrap();
        s.register(TableSpec::dense("d", &[8], Init::zeros(), Rule::sgd(1.0).into()), 1).unwrap();
        assert_eq!(pull_rows(&s, "e", &[1, 2, 3], false).unwrap().len(), 9);
        let err = s.pull_sparse("e", &[4, 5, 6, 7], false, |_, _| panic!("nothing is read")).unwrap_err();
        assert!(matches!(err, Error::TooLarge { values: Some(12), limit: 10, .. }), "{err}");
        assert_eq!(s.sizes(), (2, 1, 3), "the refused pull created no row");
        // The check a caller makes before it decodes the keys agrees.
        assert!(s.check_sparse_pull("e", 3).is_ok());
        let err = s.check_sparse_pull("e", 4).unwrap_err();
        assert!(matches!(err, Error::TooLarge { values: Some(12), limit: 10, .. }), "{err}");
        assert!(s.check_sparse_pull("e", usize::MAX).is_err(), "an overflowing size is refused");
        assert!(matches!(s.check_sparse_pull("d", 1), Err(Error::WrongKind { .. })));
        // The same chunk asked for twice is counted twice.
        assert!(s.pull_dense(&[("d", 0)], |_| {}).is_ok());
        let err = s.pull_dense(&[("d", 0), ("d", 0)], |_| panic!("nothing is read")).unwrap_err();
        assert_eq!(tonic::Status::from(err).code(), tonic::Code::ResourceExhausted);
    }

    #[test]
    fn a_scan_pages_through_the_rows_in_key_order() {
        let s = Store::new(0, 1).with_max_pull_values(28);
        s.register(TableSpec::sparse("e", 2, Init::zeros(), Rule::sgd(1.0).into()), 1).unwrap();
        let keys = [40u64, 3, 17, 99, 5, 61, 8];
        for part in keys.chunks(3) {
            pull_rows(&s, "e", part, false).unwrap();
        }
        let (mut seen, mut after, mut pages) = (Vec::new(), None, 0);
        loop {
            // Asks for 10 rows; the pull limit (28 values, less 16 for framing,
            // 4 a row with its key) allows 3.
            let (dim, done) = s
                .scan_sparse("e", after, 10, |k, row| {
                    assert_eq!(row.len(), 2);
                    seen.push(k);
                })
                .unwrap();
            assert_eq!(dim, 2);
            pages += 1;
            after = seen.last().copied();
            if done {
                break;
            }
        }
        assert_eq!(seen, [3, 5, 8, 17, 40, 61, 99]);
        assert_eq!(pages, 3);
        assert!(matches!(s.scan_sparse("nope", None, 1, |_, _| {}), Err(Error::UnknownTable(_))));
    }

    #[test]
    fn a_rejected_sparse_push_changes_nothing() {
        let s = Store::new(0, 1);
        s.register(TableSpec::sparse("e", 2, Init::zeros(), Rule::sgd(1.0).into()), 1).unwrap();
        let check =
            |keys: &[u64], grads: &[f32]| s.push_sparse("e", keys, grads, PushInfo::default()).unwrap_err();
        assert!(matches!(
            check(&[1, 2], &[1.0; 3]),
            Error::Malformed(ps_common::Error::LengthMismatch { expected: 4, got: 3, .. })
        ));
        assert!(matches!(check(&[1, 1], &[1.0; 4]), Error::Duplicate { .. }));
        assert!(matches!(check(&[1, 2], &[1.0, 1.0, f32::INFINITY, 1.0]), Error::NonFinite { .. }));
        assert_eq!(s.sizes(), (1, 0, 0));
        let other = Store::new(0, 2);
        other.register(TableSpec::sparse("e", 2, Init::zeros(), Rule::sgd(1.0).into()), 2).unwrap();
        let theirs = (0..).find(|&k| partition::key_shard(k, 2) == 1).unwrap();
        let err = other.push_sparse("e", &[theirs], &[1.0; 2], PushInfo::default()).unwrap_err();
        assert!(matches!(err, Error::WrongShard { owner: 1, this: 0, .. }));
    }

    fn limited(limits: Limits) -> Store {
        Store::new(0, 1).with_limits(limits).unwrap()
    }

    #[test]
    fn rows_and_tables_beyond_the_budget_are_refused_before_they_are_allocated() {
        // Room for the table and 10 rows of width 4 (SGD: no state).
        let spec = TableSpec::sparse("e", 4, Init::zeros(), Rule::sgd(1.0).into());
        let row = budget::block_bytes(&spec, 4);
        let limits = Limits { memory_mib: 1, ..Limits::default() };
        let s = limited(limits);
        s.budget.try_reserve(s.budget.limit() - budget::table_bytes(&spec) - 10 * row).unwrap();
        s.register(spec, 1).unwrap();
        pull_rows(&s, "e", &[1, 2, 3, 4, 5, 6], false).unwrap();
        // A push creating 5 rows does not fit (4 left): nothing is applied.
        let err = s.push_sparse("e", &[7, 8, 9, 10, 11], &[1.0; 20], PushInfo::default()).unwrap_err();
        assert_eq!(tonic::Status::from(err).code(), tonic::Code::ResourceExhausted);
        assert_eq!(s.sizes(), (1, 0, 6));
        // Existing rows cost nothing more; 4 new ones fit exactly.
        s.push_sparse("e", &[1, 7, 8, 9, 10], &[1.0; 20], PushInfo::default()).unwrap();
        assert_eq!(s.budget.used(), s.budget.limit());
        assert!(matches!(s.pull_sparse("e", &[11], false, |_, _| {}), Err(Error::OverBudget { .. })));
        // Read-only pulls create nothing and are served.
        assert_eq!(pull_rows(&s, "e", &[11, 12], true).unwrap().len(), 8);
        // A dense table of more than the budget is refused whole.
        let big = TableSpec::dense("big", &[1 << 20], Init::zeros(), Rule::adam(1e-3).into());
        assert!(matches!(s.register(big, 1), Err(Error::OverBudget { .. })));
        assert_eq!(s.sizes(), (1, 0, 10));
    }

    #[test]
    fn table_count_and_name_limits_hold() {
        let s = limited(Limits { max_tables: 2, max_name_bytes: 8, ..Limits::default() });
        let t = |n: &str| TableSpec::sparse(n, 1, Init::zeros(), Rule::sgd(1.0).into());
        assert!(matches!(s.register(t("a-very-long-name"), 1), Err(Error::LimitExceeded { .. })));
        s.register(t("a"), 1).unwrap();
        s.register(t("b"), 1).unwrap();
        assert!(!s.register(t("b"), 1).unwrap(), "an existing table is not counted again");
        assert!(matches!(s.register(t("c"), 1), Err(Error::LimitExceeded { what: "tables", .. })));
        let chunky = Limits { max_chunks_per_table: 3, ..Limits::default() };
        let mut d = TableSpec::dense("d", &[10], Init::zeros(), Rule::sgd(1.0).into());
        d.layout = Layout::Dense { shape: vec![10], chunk_len: 3 };
        assert!(matches!(limited(chunky).register(d, 1), Err(Error::LimitExceeded { got: 4, .. })));
    }

    #[test]
    fn repeated_ids_in_a_pull_are_refused() {
        let s = Store::new(0, 1);
        s.register(TableSpec::sparse("e", 2, Init::zeros(), Rule::sgd(1.0).into()), 1).unwrap();
        s.register(sgd_dense("w", 10, 4), 1).unwrap();
        assert!(matches!(s.pull_sparse("e", &[3, 4, 3], false, |_, _| {}), Err(Error::Duplicate { .. })));
        assert!(matches!(s.pull_sparse("e", &[3, 3], true, |_, _| {}), Err(Error::Duplicate { .. })));
        assert!(matches!(s.pull_dense(&[("w", 1), ("w", 1)], |_| {}), Err(Error::Duplicate { .. })));
        assert_eq!(s.sizes(), (2, 3, 0));
    }

    /// The check of repeated keys goes with the lookup of their rows
    /// (`Stripe::locate`): a key named twice is refused whether its row
    /// exists or not, before any row is created or updated, and the
    /// lookup's scratch leaves nothing behind for the next stripe or call.
    #[test]
    fn a_key_named_twice_is_refused_with_or_without_its_row_and_changes_nothing() {
        let s = Store::new(0, 1);
        s.register(TableSpec::sparse("e", 2, Init::zeros(), Rule::sgd(1.0).into()), 1).unwrap();
        // Enough rows that every stripe has several pages.
        let keys: Vec<u64> = (0..20_000).collect();
        for _ in 0..3 {
            assert_eq!(
                s.pull_sparse("e", &keys, false, |_, _| {}).unwrap(),
                2,
                "distinct keys, again and again"
            );
        }
        let before = s.snapshot("e").unwrap();
        let old = |k: u64| keys.iter().copied().chain([k]).collect::<Vec<u64>>();
        let new = |k: u64| keys.iter().copied().chain([k, 99_999, k]).collect::<Vec<u64>>();
        for k in [0, 12_345, 19_999] {
            let (o, n) = (old(k), new(100_000 + k));
            assert!(matches!(s.pull_sparse("e", &o, false, |_, _| {}), Err(Error::Duplicate { .. })), "{k}");
            assert!(matches!(s.pull_sparse("e", &o, true, |_, _| {}), Err(Error::Duplicate { .. })), "{k}");
            assert!(matches!(s.pull_sparse("e", &n, false, |_, _| {}), Err(Error::Duplicate { .. })), "{k}");
            let push =
                |keys: &[u64]| s.push_sparse("e", keys, &vec![1.0; keys.len() * 2], PushInfo::default());
            assert!(matches!(push(&o), Err(Error::Duplicate { .. })), "{k}");
            assert!(matches!(push(&n), Err(Error::Duplicate { .. })), "{k}");
        }
        assert_eq!(s.snapshot("e").unwrap(), before, "no row created or updated");
        assert_eq!(s.sizes().2, 20_000);
        let g = vec![1.0; keys.len() * 2];
        s.push_sparse("e", &keys, &g, PushInfo::default()).unwrap();
        s.pull_sparse("e", &keys, false, |_, row| assert_eq!(row, [-1.0, -1.0])).unwrap();
    }

    #[test]
    fn a_refused_dense_update_leaves_values_state_and_step_as_they_were() {
        let s = limited(Limits { max_gradient: f32::MAX, ..Limits::default() });
        let len = 3000;
        let mut spec = TableSpec::dense("w", &[len as u64], Init::zeros(), Rule::adam(1e-3).into());
        spec.layout = Layout::Dense { shape: vec![len as u64], chunk_len: len as u32 };
        s.register(spec.clone(), 1).unwrap();
        let before = s.snapshot("w").unwrap();
        // Adam's v = (1 - beta2)·g² overflows for g = 1e20 in the last
        // position only (its value itself would not change: m / inf = 0).
        let mut grad = vec![0.5f32; len];
        grad[len - 1] = 1e20;
        let out = s.push_dense(&[("w", 0, &grad)], PushInfo::default()).unwrap();
        assert_eq!(out.applied, 0);
        assert_eq!(s.counters.nonfinite_updates.load(Ordering::Relaxed), 1);
        assert!(s.snapshot("w").unwrap() == before, "values changed");
        // The next update is the block's first, from the state it had: Adam's
        // step 1 from m = v = 0 everywhere, as if the refused one never came
        // (a v of inf left in the last tile would leave its last value as is).
        let good = vec![0.25f32; len];
        assert_eq!(s.push_dense(&[("w", 0, &good)], PushInfo::default()).unwrap().applied, len as u64);
        let mut expected = Block::new(&spec, 0, len);
        let mut saved = vec![0.0; expected.floats()];
        let first = spec.optimizer.rule.at(1, PushInfo::default().lr_scale(&spec));
        let values = Arc::make_mut(&mut expected.values);
        apply_update(&spec, &first, values, &mut expected.state, 0..len, &good, None, &mut saved);
        let after = s.snapshot("w").unwrap();
        assert!(after[0].1[..] == expected.values[..], "not the first step from the old state");
    }

    #[test]
    fn a_pull_answers_from_the_values_themselves_and_keeps_what_it_read_while_pushes_apply() {
        let s = Store::new(0, 1);
        s.register(TableSpec::dense("w", &[4], Init::zeros(), Rule::sgd(1.0).into()), 1).unwrap();
        let read = |s: &Store| {
            let mut held = None;
            s.pull_dense_as(None, &[("w", 0)], |v| held = Some(v.clone())).unwrap();
            held.unwrap()
        };
        let push = |s: &Store| s.push_dense(&[("w", 0, &[1.0; 4][..])], PushInfo::default()).unwrap();
        // Held by an answer being written: the push copies, the answer keeps
        // what it read.
        let answer = read(&s);
        push(&s);
        assert_eq!(&answer[..], &[0.0; 4], "an answer changed under its reader");
        let now = read(&s);
        assert_eq!(&now[..], &[-1.0; 4]);
        assert!(!Arc::ptr_eq(&answer, &now), "the push did not copy the values it shared");
        assert_eq!(s.counters.values_copied_on_write.load(Ordering::Relaxed), 4);
        // Held by no answer: updated where they are.
        let at = now.as_ptr();
        drop((answer, now));
        push(&s);
        let after = read(&s);
        assert_eq!(&after[..], &[-2.0; 4]);
        assert_eq!(after.as_ptr(), at, "values no answer held were copied");
        assert_eq!(s.counters.values_copied_on_write.load(Ordering::Relaxed), 4, "a copy counted");
    }

    #[test]
    fn a_block_updated_a_tile_at_a_time_matches_the_rule_on_the_whole_block_and_is_put_back_whole() {
        use ps_common::optim::DelayCompensation;
        let len = 2 * TILE + 37;
        let rules = [
            Rule::Sgd { lr: 0.1, weight_decay: 0.01 },
            Rule::Momentum { lr: 0.1, momentum: 0.9, dampening: 0.1, nesterov: true, weight_decay: 0.01 },
            Rule::Adagrad { lr: 0.1, eps: 1e-10, initial_accumulator: 0.1, weight_decay: 0.0 },
            Rule::Adam { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, decoupled: true },
            Rule::Ftrl { alpha: 0.1, beta: 1.0, l1: 0.01, l2: 0.1 },
        ];
        let dcs = [None, Some(DelayCompensation { lambda: 0.04, adaptive: false, momentum: 0.95 })]
            .into_iter()
            .chain([Some(DelayCompensation { lambda: 2.0, adaptive: true, momentum: 0.95 })]);
        let wave = |k: usize, t: usize| ((k * 7 + t * 13) % 23) as f32 * 0.01 - 0.1;
        for (rule, dc) in rules.into_iter().flat_map(|r| dcs.clone().map(move |dc| (r, dc))) {
            let optimizer = ps_common::spec::OptimizerConfig { delay_compensation: dc, ..rule.into() };
            let spec = TableSpec::dense("w", &[len as u64], Init::zeros(), optimizer);
            let mut block = Block::new(&spec, 0, len);
            let mut whole = block.data();
            let read: Vec<f32> = (0..len).map(|k| wave(k, 5)).collect();
            for t in 1..=3u64 {
                let grad: Vec<f32> = (0..len).map(|k| wave(k, t as usize)).collect();
                assert!(block.apply(&spec, len, &grad, &PushInfo::default(), Some(&read)));
                let (values, state) = whole.split_at_mut(len);
                let (state, mean_square) = state.split_at_mut(len * rule.state_per_param());
                let mut g = grad.clone();
                if let Some(dc) = dc {
                    dc.compensate(&mut g, values, &read, mean_square);
                }
                rule.apply(t, 1.0, values, &g, state);
                let same = block.data().iter().zip(&whole).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{rule:?} with {dc:?}, step {t}: tiles differ from the whole block");
            }
            assert_eq!(block.step, 3);
            // A gradient that overflows in the last tile: every tile, every
            // array (values, the rule's state, DC-ASGD-a's mean square) is
            // put back as it was.
            let mut grad: Vec<f32> = (0..len).map(|k| wave(k, 4)).collect();
            grad[len - 1] = f32::INFINITY;
            assert!(!block.apply(&spec, len, &grad, &PushInfo::default(), Some(&read)));
            let same = block.data().iter().zip(&whole).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{rule:?} with {dc:?}: a failed update was not put back whole");
            assert_eq!(block.step, 3);
        }
    }

    #[test]
    fn updates_that_would_be_non_finite_are_not_applied() {
        let s = Store::new(0, 1);
        // lr 1e30: a gradient of 1e10 (under max_gradient) overflows.
        s.register(TableSpec::sparse("e", 2, Init::zeros(), Rule::sgd(1e30).into()), 1).unwrap();
        let out = s.push_sparse("e", &[1, 2], &[1e10, 0.0, 1.0, 1.0], PushInfo::default()).unwrap();
        assert_eq!(out.applied, 1, "row 2 applied, row 1 kept");
        assert_eq!(pull_rows(&s, "e", &[1, 2], true).unwrap(), vec![0.0, 0.0, -1e30, -1e30]);
        assert_eq!(s.counters.nonfinite_updates.load(Ordering::Relaxed), 1);
        // Over max_gradient (1e15) or non-finite: the whole push is refused.
        let huge = s.push_sparse("e", &[3], &[1e38, 0.0], PushInfo::default()).unwrap_err();
        assert!(matches!(huge, Error::HugeGradient { .. }), "{huge}");
        let nan = s.push_sparse("e", &[3], &[f32::NAN, 0.0], PushInfo::default()).unwrap_err();
        assert!(matches!(nan, Error::NonFinite { .. }));
        s.register(sgd_dense("w", 4, 4), 1).unwrap();
        assert!(matches!(
            s.push_dense(&[("w", 0, &[-1e16; 4])], PushInfo::default()),
            Err(Error::HugeGradient { .. })
        ));
        assert!(s.snapshot("e").unwrap().iter().all(|(_, v)| v.iter().all(|x| x.is_finite())));
    }

    #[test]
    fn seq_jumps_and_too_many_workers_are_refused() {
        let s = limited(Limits { max_seq_jump: 10, max_workers: 2, ..Limits::default() });
        s.register(sgd_dense("w", 4, 4), 1).unwrap();
        let g = [1.0; 4];
        let push =
            |worker, seq| s.push_dense(&[("w", 0, &g)], PushInfo { worker, seq, ..PushInfo::default() });
        push(1, 10).unwrap();
        let err = push(1, u64::MAX).unwrap_err();
        assert_eq!(tonic::Status::from(err).code(), tonic::Code::OutOfRange);
        assert!(push(1, 21).is_err());
        push(1, 20).unwrap();
        push(2, 1).unwrap();
        assert!(matches!(push(3, 1), Err(Error::LimitExceeded { .. })));
        push(3, 0).unwrap();
        assert_eq!(s.last_seq(1), 20);
    }
}
