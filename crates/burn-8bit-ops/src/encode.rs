//! The encode rule of the kernels in O(1) (docs/algorithm.md §2): a first guess of the code from
//! the bits of `x / absmax`, a few steps up against the exact thresholds `midpoint · absmax`, a
//! check that the result satisfies the rule, and the 8-step binary search only when it does not.
//! The guess decides speed only: every code returned satisfies the encode rule, so the codes are
//! those of the search (and of the CPU twin's encoder).
//!
//! The functions here are `#[cube]` functions the kernels expand; being plain Rust as well, the
//! tests run the very same code against the reference rule.

use cubecl::prelude::*;

use crate::map::{MAP_LEN, MapKind};

/// Mantissa bits of the ratio in a guess key.
const MANTISSA_BITS: u32 = 6;
/// Binary exponents of `|x / absmax|` with their own buckets, down from `[1, 2)`; smaller ratios
/// share one bucket (they all take the zero code of every map).
const EXPONENTS: u32 = 32;
/// The smallest biased exponent with its own buckets.
const LOWEST_EXPONENT: u32 = 128 - EXPONENTS;
/// Guess keys of one sign.
const KEYS_PER_SIGN: u32 = (EXPONENTS + 1) << MANTISSA_BITS;
/// Guess keys of both signs.
const KEYS: usize = 2 * KEYS_PER_SIGN as usize;
/// Guess codes packed four per `u32` word.
pub(crate) const GUESS_WORDS: usize = KEYS / 4;
/// Offset of the midpoints in a map's kernel table (after the 256 values).
pub(crate) const MIDPOINTS: usize = MAP_LEN;
/// Offset of the packed guess codes in a map's kernel table.
pub(crate) const GUESSES: usize = 2 * MAP_LEN - 1;
/// `u32` words of one map's kernel table: values, midpoints (as `f32` bits) and guesses.
pub(crate) const TABLE_STRIDE: usize = GUESSES + GUESS_WORDS;

/// The guess bucket of a ratio's bits: sign, exponent clamped to the bucketed range, and the top
/// [`MANTISSA_BITS`] of the mantissa.
#[cube]
pub(crate) fn guess_key(ratio_bits: u32) -> u32 {
    let sign = ratio_bits >> 31;
    let exponent = (ratio_bits >> 23) & 0xff;
    let mantissa = (ratio_bits >> comptime![23 - MANTISSA_BITS]) & comptime![(1u32 << MANTISSA_BITS) - 1];
    let below = exponent < LOWEST_EXPONENT;
    // `|x / absmax|` rounds to at most 1; anything larger (or NaN) takes the top bucket.
    let above = exponent > 127;
    let bucket = select(below, 0u32, select(above, EXPONENTS, select(below, LOWEST_EXPONENT, exponent) + 1 - LOWEST_EXPONENT));
    let fraction = select(below, 0u32, select(above, comptime![(1u32 << MANTISSA_BITS) - 1], mantissa));
    sign * KEYS_PER_SIGN + (bucket << MANTISSA_BITS) + fraction
}

/// The code of `x` under `thresholds[base..base + 255]` (`midpoint · absmax`, ascending), its
/// guess read from `table[guesses + …]`; `ratio_bits` are the bits of `x / absmax` as the
/// caller computed them. `steps` is [`guess_steps`].
#[allow(clippy::too_many_arguments)]
#[cube]
pub(crate) fn encode_code(
    thresholds: &[f32],
    base: usize,
    table: &[u32],
    guesses: usize,
    x: f32,
    ratio_bits: u32,
    #[comptime] steps: u32,
) -> u32 {
    let key = guess_key(ratio_bits);
    let mut code = (table[guesses + (key / 4) as usize] >> ((key % 4) * 8)) & 0xff;
    #[unroll]
    for _step in 0..steps {
        let above = x > thresholds[base + select(code < 255, code, 254u32) as usize];
        code += select(code < 255 && above, 1u32, 0u32);
    }
    let low_ok = code == 0 || thresholds[base + (select(code > 0, code, 1u32) - 1) as usize] < x;
    let high_ok = code == 255 || x <= thresholds[base + select(code < 255, code, 254u32) as usize];
    if !(low_ok && high_ok) {
        code = 0u32;
        #[unroll]
        for s in 0..8u32 {
            let step = comptime![128u32 >> s];
            code += select(x > thresholds[base + (code + step - 1) as usize], step, 0u32);
        }
    }
    code
}

/// The reference rule: the number of thresholds below `x`.
fn search(midpoints: &[f32; MAP_LEN - 1], x: f32) -> u32 {
    midpoints.iter().filter(|&&midpoint| x > midpoint).count() as u32
}

/// The smallest and largest ratio of a guess key.
fn key_range(key: u32) -> (f32, f32) {
    let (sign, rest) = (key / KEYS_PER_SIGN, key % KEYS_PER_SIGN);
    let (bucket, fraction) = (rest >> MANTISSA_BITS, rest & ((1 << MANTISSA_BITS) - 1));
    let top = (1 << MANTISSA_BITS) - 1;
    let (low, high) = if bucket == 0 {
        (0.0, f32::from_bits(LOWEST_EXPONENT << 23))
    } else {
        let exponent = LOWEST_EXPONENT + bucket - 1;
        let low = f32::from_bits((exponent << 23) | (fraction << (23 - MANTISSA_BITS)));
        let high = if bucket == EXPONENTS && fraction == top {
            f32::INFINITY
        } else {
            f32::from_bits((exponent << 23) + ((fraction + 1) << (23 - MANTISSA_BITS)) - 1)
        };
        (low, high)
    };
    if sign == 1 { (-high, -low) } else { (low, high) }
}

/// The number of single steps up that reach the right code from any guess of `kind`'s table.
fn steps_of(kind: MapKind) -> u32 {
    let midpoints = kind.map().midpoints();
    (0..KEYS as u32)
        .map(|key| {
            let (low, high) = key_range(key);
            search(&midpoints, high) - search(&midpoints, low)
        })
        .max()
        .unwrap_or(0)
}

/// Steps up after a guess, the same for every map so that one kernel serves them all: the most
/// any map needs.
pub(crate) fn guess_steps() -> u32 {
    MapKind::ALL.into_iter().map(steps_of).max().unwrap_or(0)
}

/// A map's kernel table: its values and midpoints as `f32` bits, then its guess codes.
pub(crate) fn kernel_table(kind: MapKind) -> Vec<u32> {
    let map = kind.map();
    let midpoints = map.midpoints();
    let mut table = Vec::with_capacity(TABLE_STRIDE);
    table.extend(map.values().iter().map(|value| value.to_bits()));
    table.extend(midpoints.iter().map(|midpoint| midpoint.to_bits()));
    let guesses: Vec<u8> = (0..KEYS as u32).map(|key| search(&midpoints, key_range(key).0) as u8).collect();
    table.extend(guesses.chunks(4).map(|bytes| u32::from_le_bytes(bytes.try_into().expect("four guesses"))));
    debug_assert_eq!(table.len(), TABLE_STRIDE);
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_fall_in_their_bucket() {
        for key in 0..KEYS as u32 {
            let (low, high) = key_range(key);
            assert!(low <= high, "key {key}: {low} > {high}");
            if key % KEYS_PER_SIGN >= 1 << MANTISSA_BITS && high.is_finite() {
                assert_eq!(guess_key(low.to_bits()), key, "low of {key}");
                assert_eq!(guess_key(high.to_bits()), key, "high of {key}");
            }
        }
        assert_eq!(guess_key(1e-30f32.to_bits()), 0);
        assert_eq!(guess_key((-1e-30f32).to_bits()), KEYS_PER_SIGN);
        assert_eq!(guess_key(1.5f32.to_bits()), KEYS_PER_SIGN - (1 << (MANTISSA_BITS - 1)));
        assert_eq!(guess_key(2.5f32.to_bits()), KEYS_PER_SIGN - 1);
    }

    #[test]
    fn guesses_need_few_steps() {
        for kind in MapKind::ALL {
            assert!(steps_of(kind) <= 2, "{kind:?} needs {} steps", steps_of(kind));
        }
    }

    #[test]
    fn the_kernel_encoder_equals_the_rule_on_every_map() {
        let steps = guess_steps();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for kind in MapKind::ALL {
            let table = kernel_table(kind);
            let map = kind.map();
            let midpoints = map.midpoints();
            for absmax in [1.0f32, 3.7e-7, 1.0e30, 0.013, 65504.0] {
                let thresholds: Vec<f32> = midpoints.iter().map(|m| m * absmax).collect();
                let inverse = 1.0 / absmax;
                for i in 0..20_000usize {
                    let unit = (next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                    let x = match i % 5 {
                        0 => unit * absmax,
                        1 => unit.powi(9) * absmax,
                        2 => map.values()[i % MAP_LEN] * absmax,
                        3 => thresholds[i % (MAP_LEN - 1)],
                        _ => f32::from_bits(thresholds[i % (MAP_LEN - 1)].to_bits() + 1),
                    };
                    let expected = thresholds.iter().filter(|&&t| x > t).count() as u32;
                    let code = encode_code(&thresholds, 0, &table, GUESSES, x, (x * inverse).to_bits(), steps);
                    assert_eq!(code, expected, "{kind:?} absmax {absmax:e} x {x:e}");
                }
            }
        }
    }
}
