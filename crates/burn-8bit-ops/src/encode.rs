//! The encode rule in O(1) (docs/algorithm.md §2), one table for the kernels and the CPU twin:
//! the top 16 bits of `x / absmax` name a bucket, the bucket names `g`, the number of thresholds
//! certainly below every `x` in it, and two comparisons against the exact thresholds
//! `midpoint · absmax` count the ones that may be. A block whose absmax lies outside the range
//! where that bound holds takes the 8-step binary search. Every code returned satisfies
//! `t[c] < x <= t[c + 1]`, so the codes are the rule's on every backend.
//!
//! [`encode_code`] is a `#[cube]` function the kernels expand; being plain Rust as well, the
//! tests run the very same code against the reference rule. The CPU twin runs the same
//! arithmetic in its own vectorised loop (`cpu::Encoder`) over the same [`GuessTable`].

use std::ops::RangeInclusive;
use std::sync::OnceLock;

use cubecl::prelude::*;

use crate::map::{MAP_LEN, MapKind};

/// A bucket is the top 16 bits of the ratio's bits (sign, exponent, 7 mantissa bits): the key
/// needs no clamping.
pub(crate) const GUESS_SHIFT: u32 = 16;
/// Buckets of a guess table.
pub(crate) const GUESS_LEN: usize = 1 << (32 - GUESS_SHIFT);
/// Thresholds each bucket compares `x` with.
pub(crate) const COMPARISONS: usize = 2;
/// Bounds of one block: `[-∞, midpoint[0] · absmax, …, midpoint[254] · absmax, +∞, +∞]`, so
/// code `c` is right exactly when `t[c] < x <= t[c + 1]`, and the comparisons past the last
/// midpoint read `+∞`.
pub(crate) const BOUNDS: usize = MAP_LEN + COMPARISONS;

/// Offset of the midpoints (as `f32` bits) in a map's kernel table, after the 256 values.
#[cfg(any(feature = "cube", test))]
pub(crate) const MIDPOINTS: usize = MAP_LEN;
/// Offset of the settled absmax range (low and high, as `f32` bits) in a map's kernel table.
#[cfg(any(feature = "cube", test))]
pub(crate) const SETTLED: usize = MIDPOINTS + MAP_LEN - 1;
/// Offset of the guesses, packed four per `u32` word, in a map's kernel table.
#[cfg(any(feature = "cube", test))]
pub(crate) const GUESSES: usize = SETTLED + 2;
/// `u32` words of one map's kernel table.
#[cfg(any(feature = "cube", test))]
pub(crate) const TABLE_STRIDE: usize = GUESSES + GUESS_LEN / 4;

/// A map's guesses and the absmax range they serve.
pub(crate) struct GuessTable {
    /// Per bucket: `g`.
    pub(crate) guess: Box<[u8; GUESS_LEN]>,
    /// Per bucket: how many thresholds above `g` may lie below some `x` of the bucket (at most
    /// [`COMPARISONS`]); where none, `g` is the code of every `x` of the bucket. Only the
    /// AVX-512 encoder skips the comparisons where it can.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) undecided: Box<[u8; GUESS_LEN]>,
    /// The absmax for which the ratio and every threshold are normal floats (or zero), so the
    /// rounding bound of [`GuessTable::new`] holds.
    pub(crate) settled_absmax: RangeInclusive<f32>,
}

impl GuessTable {
    /// The table of `kind`, built once per process.
    pub(crate) fn get(kind: MapKind) -> &'static GuessTable {
        static TABLES: [OnceLock<GuessTable>; MapKind::ALL.len()] = [const { OnceLock::new() }; MapKind::ALL.len()];
        let slot = MapKind::ALL.iter().position(|&listed| listed == kind).expect("listed");
        TABLES[slot].get_or_init(|| GuessTable::new(kind))
    }

    fn new(kind: MapKind) -> Self {
        // A 4-bit map's padding thresholds are `+∞`: never near a bucket, never below a ratio.
        let midpoints = kind.map().padded_midpoints();
        // The ratio `x * (1 / absmax)` lies within 3 units in the last place of `x / absmax`
        // (2^-149 when subnormal) when the reciprocal is within 2.5 of its own — IEEE division
        // on the CPU and CUDA, the bound WGSL and Vulkan state for `1 / y` — and a threshold
        // within half a unit of `midpoint · absmax`. A midpoint further than `margin` from a
        // bucket therefore compares with every `x` of the bucket as it compares with the bucket;
        // only the ones nearer need comparing.
        let margin = |midpoint: f32| midpoint.abs() * 2f32.powi(-20) + 2f32.powi(-120);
        let mut guess = Box::new([0u8; GUESS_LEN]);
        let mut undecided = Box::new([0u8; GUESS_LEN]);
        for (key, (guess, undecided)) in guess.iter_mut().zip(undecided.iter_mut()).enumerate() {
            let (low, high) = bucket_range(key);
            *guess = if low.is_finite() && high.is_finite() {
                let certainly_below = midpoints.partition_point(|&m| m + margin(m) < low);
                let possibly_below = midpoints.partition_point(|&m| m - margin(m) < high);
                assert!(
                    possibly_below - certainly_below <= COMPARISONS,
                    "{kind:?}: more than {COMPARISONS} thresholds near the ratios of bucket {key:#06x}"
                );
                *undecided = (possibly_below - certainly_below) as u8;
                certainly_below as u8
            } else if low == f32::INFINITY {
                // +∞, or a finite `x` above `absmax · 2^128`: above every finite threshold.
                midpoints.partition_point(|m| m.is_finite()) as u8
            } else {
                // -∞, below every threshold, and NaN, which compares below every threshold:
                // a NaN `x` makes the ratio a quiet NaN (IEEE 754), never the +∞ key.
                0
            };
        }
        let smallest = midpoints.iter().map(|m| m.abs()).filter(|&m| m > 0.0).fold(1.0, f32::min);
        Self { guess, undecided, settled_absmax: (2.0 * f32::MIN_POSITIVE / smallest)..=2f32.powi(125) }
    }
}

/// The smallest and largest ratio (signed) whose bucket is `key`.
pub(crate) fn bucket_range(key: usize) -> (f32, f32) {
    let first = f32::from_bits((key as u32) << GUESS_SHIFT);
    let last = f32::from_bits(((key as u32) << GUESS_SHIFT) | ((1 << GUESS_SHIFT) - 1));
    if first.is_sign_negative() { (last, first) } else { (first, last) }
}

/// The code of `x` under `bounds[base..base + BOUNDS]` (see [`BOUNDS`]). `ratio_bits` are the
/// bits of `x * (1 / absmax)` and `settled` says whether the absmax lies in the table's
/// settled range; the guesses are read from `table[guesses + …]`.
#[allow(clippy::too_many_arguments)]
#[cube]
pub(crate) fn encode_code(
    bounds: &[f32],
    base: usize,
    table: &[u32],
    guesses: usize,
    x: f32,
    ratio_bits: u32,
    settled: bool,
) -> u32 {
    let mut code = 0u32;
    if settled {
        let key = ratio_bits >> GUESS_SHIFT;
        let below = (table[guesses + (key / 4) as usize] >> ((key % 4) * 8)) & 0xff;
        let first = base + below as usize;
        code = below + select(x > bounds[first + 1], 1u32, 0u32) + select(x > bounds[first + 2], 1u32, 0u32);
    } else {
        #[unroll]
        for s in 0..8u32 {
            let step = comptime![128u32 >> s];
            code += select(x > bounds[base + (code + step) as usize], step, 0u32);
        }
    }
    code
}

/// A map's kernel table: its values and midpoints as `f32` bits, the settled absmax range, then
/// its guesses. Built for the CubeCL kernels (and the test that checks their encoder).
#[cfg(any(feature = "cube", test))]
pub(crate) fn kernel_table(kind: MapKind) -> Vec<u32> {
    let map = kind.map();
    let guesses = GuessTable::get(kind);
    let mut table = Vec::with_capacity(TABLE_STRIDE);
    table.extend(map.padded_values().iter().map(|value| value.to_bits()));
    table.extend(map.padded_midpoints().iter().map(|midpoint| midpoint.to_bits()));
    table.extend([guesses.settled_absmax.start().to_bits(), guesses.settled_absmax.end().to_bits()]);
    table.extend(guesses.guess.chunks(4).map(|bytes| u32::from_le_bytes(bytes.try_into().expect("four guesses"))));
    debug_assert_eq!(table.len(), TABLE_STRIDE);
    table
}

/// The bounds of a block whose absmax is 1 (see [`BOUNDS`]), from a map's padded midpoints
/// (`CodeMap::padded_midpoints`: a 4-bit map's 240 padding bounds are `+∞`).
pub(crate) fn unit_bounds(midpoints: &[f32; MAP_LEN - 1]) -> [f32; BOUNDS] {
    let mut bounds = [f32::INFINITY; BOUNDS];
    bounds[0] = f32::NEG_INFINITY;
    bounds[1..MAP_LEN].copy_from_slice(midpoints);
    bounds
}

/// The bounds of one block: each of [`unit_bounds`] times `absmax`, which is positive, so the
/// infinities stay infinite and every threshold is `midpoint · absmax`. One multiplication over
/// the whole array, which vectorises: a loop over the midpoints alone, from index 1, compiled to
/// 255 scalar products and a copy of the 1 KiB result for every block and state. Inlined into
/// the CPU twin's per-level loops, as their other helpers are, so that it runs with that level's
/// instructions.
#[inline(always)]
pub(crate) fn block_bounds(unit: &[f32; BOUNDS], absmax: f32) -> [f32; BOUNDS] {
    debug_assert!(absmax > 0.0, "bounds of a block of absmax {absmax}");
    unit.map(|bound| bound * absmax)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_their_keys() {
        for key in [0usize, 1, 0x3f80, 0x3f7f, 0x8000, 0xbf80, 0xffff] {
            let (low, high) = bucket_range(key);
            assert!(low <= high || low.is_nan());
            assert_eq!((low.to_bits() >> GUESS_SHIFT) as usize, key);
            assert_eq!((high.to_bits() >> GUESS_SHIFT) as usize, key);
        }
    }

    /// An xorshift64 stream from `state`.
    fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        }
    }

    #[test]
    fn a_bucket_without_undecided_thresholds_guesses_the_code() {
        let mut next = xorshift(0x2545_f491_4f6c_dd1du64);
        for kind in MapKind::ALL {
            let table = GuessTable::get(kind);
            let unit = unit_bounds(&kind.map().padded_midpoints());
            let mut decided = 0;
            for absmax in [1.0f32, 3.7e-7, 0.013, 65504.0] {
                let thresholds = &block_bounds(&unit, absmax)[1..MAP_LEN];
                for _ in 0..200_000 {
                    // Ratios spread over every binade of the maps, both signs.
                    let ratio = f32::from_bits(0x3380_0000 + (next() >> 40) as u32 % 0x0c00_0000)
                        * if next() & 1 == 0 { 1.0 } else { -1.0 };
                    let x = ratio * absmax;
                    let key = ((x * (1.0 / absmax)).to_bits() >> GUESS_SHIFT) as usize;
                    if table.undecided[key] == 0 {
                        decided += 1;
                        let code = thresholds.iter().filter(|&&t| x > t).count();
                        assert_eq!(usize::from(table.guess[key]), code, "{kind:?} absmax {absmax:e} x {x:e}");
                    }
                }
            }
            assert!(decided > 100_000, "{kind:?}: most ratios lie in decided buckets ({decided})");
        }
    }

    #[test]
    fn the_kernel_encoder_equals_the_rule_on_every_map() {
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15u64);
        for kind in MapKind::ALL {
            let table = kernel_table(kind);
            let map = kind.map();
            let midpoints = map.padded_midpoints();
            let settled_range = f32::from_bits(table[SETTLED])..=f32::from_bits(table[SETTLED + 1]);
            // Inside the settled range and outside it on both sides.
            for absmax in [1.0f32, 3.7e-7, 1.0e30, 0.013, 65504.0, 1.0e-36, 1.0e38] {
                let bounds = block_bounds(&unit_bounds(&midpoints), absmax);
                let thresholds = &bounds[1..MAP_LEN];
                let inverse = 1.0 / absmax;
                let settled = settled_range.contains(&absmax);
                for i in 0..20_000usize {
                    let unit = (next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                    let threshold = thresholds[i % (MAP_LEN - 1)];
                    let x = match i % 8 {
                        0 => unit * absmax,
                        1 => unit.powi(9) * absmax,
                        2 => map.values()[i % map.values().len()] * absmax,
                        3 => threshold,
                        4 => threshold.next_up(),
                        5 => threshold.next_down(),
                        6 => unit * 1e-40,
                        _ => [unit * absmax * 3.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -f32::NAN][i / 8 % 5],
                    };
                    let expected = thresholds.iter().filter(|&&t| x > t).count() as u32;
                    let code = encode_code(&bounds, 0, &table, GUESSES, x, (x * inverse).to_bits(), settled);
                    assert_eq!(code, expected, "{kind:?} absmax {absmax:e} x {x:e}");
                }
            }
        }
    }
}
