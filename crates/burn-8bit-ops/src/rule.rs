//! The few numeric rules every backend shares (docs/algorithm.md §2), stated once.

/// Clears the sign bit: `bits(|x|)`.
pub const ABS_MASK: u32 = 0x7fff_ffff;
/// Bits of +∞; any larger `bits(|x|)` is a NaN.
pub const INFINITY_BITS: u32 = 0x7f80_0000;
/// Bits of the canonical NaN stored as the absmax of a block that held a NaN.
pub const CANONICAL_NAN_BITS: u32 = 0x7fc0_0000;

/// The absmax of a block from the largest `bits(|x|)` in it; every NaN becomes the canonical one
/// so that all backends store the same bits.
pub fn absmax_from_bits(max_abs_bits: u32) -> f32 {
    if max_abs_bits > INFINITY_BITS {
        f32::from_bits(CANONICAL_NAN_BITS)
    } else {
        f32::from_bits(max_abs_bits)
    }
}
