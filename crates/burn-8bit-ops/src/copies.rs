//! The count of buffers the block-wise ops copied before writing them because they were shared.

use std::sync::atomic::{AtomicU64, Ordering};

static SHARED_BUFFER_COPIES: AtomicU64 = AtomicU64::new(0);

/// How many buffers the block-wise ops of this process copied before writing them because
/// another tensor shared them.
///
/// The fused step writes a parameter and its states in place when their buffers are unshared,
/// on Flex and on the CubeCL backends (under Burn's Fusion too); a buffer shared with another
/// live tensor, such as a clone of the parameter kept across the step, is copied whole first,
/// so the step moves twice the memory it needs. A count that grows with every step means such
/// a clone is being kept somewhere. NdArray's ops always work on copies of its buffers (NdArray
/// shares them behind views) and add nothing here.
///
/// ```
/// let copies = burn_8bit_ops::shared_buffer_copies();
/// println!("{copies} shared buffers copied so far");
/// ```
pub fn shared_buffer_copies() -> u64 {
    SHARED_BUFFER_COPIES.load(Ordering::Relaxed)
}

/// Counts one copy of a shared buffer.
pub(crate) fn count_shared_copy() {
    SHARED_BUFFER_COPIES.fetch_add(1, Ordering::Relaxed);
}
