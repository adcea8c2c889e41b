//! Typed errors of the quantization layer.

/// What can go wrong when quantizing, dequantizing or choosing quantization parameters.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QuantError {
    /// The block size is not a power of two in `64..=4096`.
    #[error("invalid block size {0}: must be a power of two in 64..=4096")]
    InvalidBlockSize(usize),
    /// A code map could not be built from the given parameters or values.
    #[error("invalid code map: {reason}")]
    InvalidMap {
        /// Why the map was rejected.
        reason: String,
    },
    /// A quantized value's parts disagree (codes, absmax and shape do not describe one tensor).
    #[error("inconsistent quantized tensor: {reason}")]
    Inconsistent {
        /// Which parts disagree.
        reason: String,
    },
    /// The tensor handed to [`crate::BlockQuantized::dequantize_into`] cannot hold the decoded
    /// values: another shape, a dtype other than `f32`, or another device.
    #[error("dequantize output mismatch: {reason}")]
    OutputMismatch {
        /// What differs.
        reason: String,
    },
    /// A block holds NaN or an infinity (found by [`crate::BlockQuantized::check_finite`]).
    #[error("non-finite input: {blocks} block(s) hold NaN or an infinity, the first is block {first}")]
    NonFinite {
        /// How many blocks have a non-finite absmax.
        blocks: usize,
        /// Index of the first such block.
        first: usize,
    },
}
