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

/// The scale of element `(i, j)` of a rank-1 normalised state (docs/algorithm.md §2.4): the
/// smaller of its row's maximum and its column's, compared on the bits of their magnitudes (so a
/// NaN norm loses to any other), as bits.
pub fn rank1_scale_bits(row: f32, col: f32) -> u32 {
    (row.to_bits() & ABS_MASK).min(col.to_bits() & ABS_MASK)
}

/// A code's value times the scale of bits `scale_bits`; the canonical NaN when the scale is not
/// finite, as a block of non-finite absmax decodes.
pub fn decode_scaled(value: f32, scale_bits: u32) -> f32 {
    if scale_bits >= INFINITY_BITS {
        f32::from_bits(CANONICAL_NAN_BITS)
    } else {
        value * f32::from_bits(scale_bits)
    }
}

/// The code of `x` under a scale of bits `scale_bits` by the encode rule (docs/algorithm.md
/// §2.2): the number of thresholds `midpoints[k] · scale` below `x`, found by binary search over
/// the `2^bits − 1` thresholds of a map of `bits`-bit codes (a 4-bit map's padding thresholds are
/// `+∞`); `zero_code` when the scale is 0 or not finite.
pub fn encode_scaled(midpoints: &[f32], bits: u32, zero_code: u8, x: f32, scale_bits: u32) -> u8 {
    if scale_bits == 0 || scale_bits >= INFINITY_BITS {
        return zero_code;
    }
    let scale = f32::from_bits(scale_bits);
    let mut code = 0;
    let mut step = 1 << (bits - 1);
    while step > 0 {
        code += step * usize::from(x > midpoints[code + step - 1] * scale);
        step /= 2;
    }
    code as u8
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

/// The two multipliers of the integer hash behind stochastic rounding (Wellons' `lowbias32`:
/// `x ^= x >> 16; x *= M0; x ^= x >> 15; x *= M1; x ^= x >> 16`, a bijection of `u32` whose
/// output bits each depend on every input bit). The kernels hash with the same constants.
pub const HASH_MULTIPLIERS: [u32; 2] = [0x7feb_352d, 0x846c_a68b];

/// `lowbias32(x)` (see [`HASH_MULTIPLIERS`]).
pub fn hash(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(HASH_MULTIPLIERS[0]);
    x ^= x >> 15;
    x = x.wrapping_mul(HASH_MULTIPLIERS[1]);
    x ^ (x >> 16)
}

/// The key of one step's stochastic-rounding bits (`StepScalars::rounding_key`): a hash of the
/// seed (both halves) and the step number, computed on the host once per step and handed to the
/// op as a runtime scalar, so no kernel is compiled per step.
///
/// ```
/// assert_ne!(burn_8bit_ops::rounding_key(0, 1), burn_8bit_ops::rounding_key(0, 2));
/// ```
pub fn rounding_key(seed: u64, step: u64) -> u32 {
    hash(hash(hash(step as u32 ^ hash((step >> 32) as u32)) ^ seed as u32) ^ (seed >> 32) as u32)
}

/// The random bits of element `index` under `key`: a counter-based generator, so that every
/// backend and every split of the tensor into blocks draws the same bits.
pub fn random_bits(key: u32, index: u32) -> u32 {
    hash(index ^ key)
}

/// `x` (finite) rounded to `bf16` stochastically with the top 16 bits of `random`, as an `f32`
/// whose low 16 bits are zero: away from zero with probability (low 16 bits of `x`) / 2^16,
/// else towards zero. Unbiased: the expected result is `x`. Values already in `bf16` are kept.
pub fn round_to_bf16_stochastically(x: f32, random: u32) -> f32 {
    // Only a NaN's bits can wrap; the step never writes a non-finite result.
    f32::from_bits(x.to_bits().wrapping_add(random >> 16) & BF16_MASK)
}

/// The bits an `f32` keeps when it holds a `bf16`.
pub const BF16_MASK: u32 = 0xffff_0000;

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

    #[test]
    fn stochastic_rounding_keeps_bf16_values_and_is_unbiased() {
        for exact in [0.0f32, -0.0, 1.0, -3.5, f32::from_bits(0x3f81_0000)] {
            for index in 0..64 {
                assert_eq!(round_to_bf16_stochastically(exact, random_bits(7, index)).to_bits(), exact.to_bits());
            }
        }
        // A quarter of the way from 1.0 to the next bf16 (1 + 2^-7), and the same below zero.
        for x in [f32::from_bits(0x3f80_4000), f32::from_bits(0xbf80_4000)] {
            let (down, up) = (f32::from_bits(x.to_bits() & BF16_MASK), f32::from_bits((x.to_bits() & BF16_MASK) + 0x1_0000));
            let draws = 1 << 16;
            let rounded: Vec<f32> = (0..draws).map(|index| round_to_bf16_stochastically(x, random_bits(rounding_key(3, 9), index))).collect();
            assert!(rounded.iter().all(|&r| r == down || r == up), "{x}: not a neighbour");
            let away = rounded.iter().filter(|&&r| r == up).count() as f64 / f64::from(draws);
            assert!((away - 0.25).abs() < 0.01, "{x}: rounded away {away} of the time, not 1/4");
            let mean = rounded.iter().map(|&r| f64::from(r)).sum::<f64>() / f64::from(draws);
            assert!((mean - f64::from(x)).abs() < 1e-4 * f64::from(x.abs()), "{x}: mean {mean}");
        }
    }

    #[test]
    fn rounding_keys_differ_by_seed_and_step() {
        let keys: Vec<u32> = [(0, 0), (0, 1), (1, 0), (1 << 32, 0), (0, 1 << 32)]
            .into_iter()
            .map(|(seed, step)| rounding_key(seed, step))
            .collect();
        for (i, a) in keys.iter().enumerate() {
            assert!(keys[i + 1..].iter().all(|b| a != b), "{keys:?}");
        }
    }
}
