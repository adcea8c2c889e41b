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

/// The skip counter of the fused step is a 64-bit count kept on the device as two `u32` words,
/// `[low, high]` (WGSL has no 64-bit integers): a `u32` would wrap after 4.3 billion skips.
pub const COUNT_WORDS: usize = 2;

/// The value of a count kept as `[low, high]` words.
pub fn count_value(words: [u32; COUNT_WORDS]) -> u64 {
    u64::from(words[0]) | (u64::from(words[1]) << 32)
}

/// The `[low, high]` words of a count.
pub fn count_words(count: u64) -> [u32; COUNT_WORDS] {
    [count as u32, (count >> 32) as u32]
}

/// `words + n`, the high word taking the low word's carry (the kernels add the carry with a
/// second atomic when their add of the low word wrapped). Saturates at `u64::MAX`.
pub fn add_to_count(words: [u32; COUNT_WORDS], n: u64) -> [u32; COUNT_WORDS] {
    count_words(count_value(words).saturating_add(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_count_carries_into_the_high_word() {
        let near_wrap = count_words(u64::from(u32::MAX) - 2);
        assert_eq!(near_wrap, [u32::MAX - 2, 0]);
        assert_eq!(add_to_count(near_wrap, 5), [2, 1]);
        assert_eq!(count_value(add_to_count(near_wrap, 5)), u64::from(u32::MAX) + 3);
        assert_eq!(count_value(add_to_count([u32::MAX, u32::MAX], 1)), u64::MAX);
    }
}
