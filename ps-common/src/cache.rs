//! Asking for memory before it is read or written: loops over a request's
//! rows in an order no hardware prefetcher can guess (a sparse store's rows
//! by slot, a client's rows by their place in the batch) ask for the row a
//! few iterations ahead, so that the misses to memory overlap instead of
//! coming one after another.

/// How many rows ahead such a loop asks for the memory it will touch:
/// enough misses in flight to cover memory's latency.
pub const PREFETCH_AHEAD: usize = 8;

/// Starts loading `floats` into the cache without waiting for them.
#[inline]
pub fn prefetch(floats: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in floats.chunks(16) {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        // SAFETY: SSE is part of every x86_64 target; a prefetch changes
        // nothing the program sees and cannot fault, and the address is
        // inside a live slice.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = floats;
}
