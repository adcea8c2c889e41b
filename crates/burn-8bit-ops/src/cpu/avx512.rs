//! The block loops of the CPU twin that the compiler cannot vectorise, written with AVX-512
//! (F, BW, VL) intrinsics: all are table lookups, which the portable loops do lane by lane.
//! They produce exactly the portable loops' results; `cpu.rs` calls them at levels with
//! AVX-512 and its tests compare every level bit for bit.
//!
//! Gathers are the obvious tool and the slow one on the CPUs measured (AMD Zen 4: a 16-lane
//! gather from a 1 KiB table decoded slower than the scalar loop), so the decode table lives in
//! registers and is read by permutes, and the 8-bit encoder gathers only its guess. A 4-bit
//! map's 16 values and 15 thresholds each fit one register: its codes are decoded by one permute
//! and encoded by a four-step binary search of permutes, with no table in memory.

use std::arch::x86_64::*;

use super::settle;
use crate::encode::{BOUNDS, GUESS_SHIFT};
use crate::map::MAP_LEN;
use crate::rule;

/// `f32` lanes of a 512-bit register.
pub(super) const LANES: usize = 16;

/// Elements the encoder guesses before it settles the undecided ones: indices fit in a byte.
const CHUNK: usize = 256;

/// The first `len` lanes (all of them when `len >= LANES`).
#[inline(always)]
fn lane_mask(len: usize) -> __mmask16 {
    if len >= LANES { __mmask16::MAX } else { (1 << len) - 1 }
}

/// Decodes `codes` into `output` (as many elements): `values[code] * absmax` per element. With
/// `NARROW` every code is below 16 (4-bit codes), and one permute of the first 16 values looks
/// them up.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VL; `codes` is at least as long as `output`; with `NARROW`,
/// every code is below 16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn decode<const NARROW: bool>(codes: &[u8], absmax: f32, values: &[f32; MAP_LEN], output: &mut [f32]) {
    debug_assert!(codes.len() >= output.len());
    let scale = _mm512_set1_ps(absmax);
    // SAFETY: each load reads 16 of the 256 values.
    let table: [__m512; MAP_LEN / LANES] =
        std::array::from_fn(|part| unsafe { _mm512_loadu_ps(values.as_ptr().add(part * LANES)) });
    for start in (0..output.len()).step_by(LANES) {
        let whole = output.len() - start >= LANES;
        let mask = lane_mask(output.len() - start);
        // SAFETY: whole chunks lie inside both slices; in the last partial one, masked lanes are
        // neither read nor written. Whole chunks are stored unmasked: a masked store of every
        // chunk cost a third of the decode on Zen 4.
        unsafe {
            let codes = codes.as_ptr().add(start);
            let code = _mm512_cvtepu8_epi32(if whole { _mm_loadu_si128(codes.cast()) } else { _mm_maskz_loadu_epi8(mask, codes.cast()) });
            let value = if NARROW {
                _mm512_permutexvar_ps(code, table[0])
            } else {
                lookup(&table, code)
            };
            let value = _mm512_mul_ps(value, scale);
            let output = output.as_mut_ptr().add(start);
            if whole {
                _mm512_storeu_ps(output, value);
            } else {
                _mm512_mask_storeu_ps(output, mask, value);
            }
        }
    }
}

/// `table[index]` per lane, for indices below 256 and a table of 256 entries held in 16
/// registers: a two-register permute per pair of registers, then three blends on the index's
/// top bits.
#[inline]
#[target_feature(enable = "avx512f")]
fn lookup(table: &[__m512; MAP_LEN / LANES], index: __m512i) -> __m512 {
    let bit = |bit: i32| _mm512_test_epi32_mask(index, _mm512_set1_epi32(bit));
    let (bit5, bit6, bit7) = (bit(32), bit(64), bit(128));
    let pairs: [__m512; 8] =
        std::array::from_fn(|pair| _mm512_permutex2var_ps(table[2 * pair], index, table[2 * pair + 1]));
    let quarters: [__m512; 4] = std::array::from_fn(|q| _mm512_mask_blend_ps(bit5, pairs[2 * q], pairs[2 * q + 1]));
    let halves = [
        _mm512_mask_blend_ps(bit6, quarters[0], quarters[1]),
        _mm512_mask_blend_ps(bit6, quarters[2], quarters[3]),
    ];
    _mm512_mask_blend_ps(bit7, halves[0], halves[1])
}

/// Encodes `block` into `codes` (as many): per element the bucket's guess, gathered 16 at a time
/// from `marked` (the guess in each entry's low byte, a non-zero high byte where thresholds lie
/// near the bucket), then [`settle`] for just the elements whose bucket has thresholds near it.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VL; `marked` holds an entry for every 16-bit key plus one;
/// `codes` is as long as `block`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,popcnt")]
pub(super) unsafe fn encode(
    block: &[f32],
    inverse: f32,
    marked: &[u16],
    bounds: &[f32; BOUNDS],
    codes: &mut [u8],
) {
    debug_assert_eq!(marked.len(), (1 << (32 - GUESS_SHIFT)) + 1);
    debug_assert_eq!(block.len(), codes.len());
    let inverse = _mm512_set1_ps(inverse);
    let lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (block, codes) in block.chunks(CHUNK).zip(codes.chunks_mut(CHUNK)) {
        // Indices into the chunk of the undecided elements; 16 bytes of room for the last store.
        let mut undecided = [0u8; CHUNK + LANES];
        let mut count = 0;
        for start in (0..block.len()).step_by(LANES) {
            let mask = lane_mask(block.len() - start);
            // SAFETY: masked lanes are neither read nor written; the others lie inside `block`
            // and `codes`; a key is at most 0xffff, and the gather reads entries key and key + 1;
            // `count + 16` never passes the end of `undecided`.
            unsafe {
                let x = _mm512_maskz_loadu_ps(mask, block.as_ptr().add(start));
                let key = _mm512_srli_epi32::<{ GUESS_SHIFT }>(_mm512_castps_si512(_mm512_mul_ps(x, inverse)));
                let entry = _mm512_mask_i32gather_epi32::<2>(_mm512_setzero_si512(), mask, key, marked.as_ptr().cast());
                _mm512_mask_cvtepi32_storeu_epi8(codes.as_mut_ptr().add(start).cast(), mask, entry);
                let open = _mm512_mask_test_epi32_mask(mask, entry, _mm512_set1_epi32(0xff00));
                let index = _mm512_add_epi32(lane, _mm512_set1_epi32(start as i32));
                let packed = _mm512_cvtepi32_epi8(_mm512_maskz_compress_epi32(open, index));
                _mm_storeu_si128(undecided.as_mut_ptr().add(count).cast(), packed);
                count += open.count_ones() as usize;
            }
        }
        for &i in &undecided[..count] {
            let i = usize::from(i);
            codes[i] = settle(bounds, codes[i], block[i]);
        }
    }
}

/// Encodes `block` into `codes` (as many) under a 4-bit map of (padded) `midpoints` in a block of
/// `absmax` > 0: per element the number of thresholds `midpoint · absmax` below `x`, by a
/// four-step binary search over one register holding the 15 thresholds and `+∞` (the first
/// padding midpoint times `absmax`: the products of `block_bounds`, without building the 258
/// bounds of an 8-bit map for every block). Exact for every `x`, as the scalar search is: NaN
/// compares below every threshold (code 0), `+∞` above all 15.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VL; `midpoints[15]` is `+∞` (a 4-bit map's padding) and
/// `absmax` is positive; `codes` is as long as `block`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn encode_narrow(block: &[f32], midpoints: &[f32; MAP_LEN - 1], absmax: f32, codes: &mut [u8]) {
    debug_assert!(midpoints[LANES - 1] == f32::INFINITY && absmax > 0.0);
    debug_assert_eq!(block.len(), codes.len());
    // SAFETY: `midpoints` holds more than 16 values.
    let thresholds = _mm512_mul_ps(unsafe { _mm512_loadu_ps(midpoints.as_ptr()) }, _mm512_set1_ps(absmax));
    for start in (0..block.len()).step_by(LANES) {
        let mask = lane_mask(block.len() - start);
        // SAFETY: masked lanes are neither read nor written, the others lie inside both slices.
        unsafe {
            let x = _mm512_maskz_loadu_ps(mask, block.as_ptr().add(start));
            let mut code = _mm512_setzero_si512();
            for step in [8, 4, 2, 1] {
                // The threshold just below code `code + step`.
                let probe = _mm512_add_epi32(code, _mm512_set1_epi32(step - 1));
                let above = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, _mm512_permutexvar_ps(probe, thresholds));
                code = _mm512_mask_add_epi32(code, above, code, _mm512_set1_epi32(step));
            }
            _mm512_mask_cvtepi32_storeu_epi8(codes.as_mut_ptr().add(start).cast(), mask, code);
        }
    }
}

/// Decodes 4-bit `codes` into `output` (as many elements), each against its own scale, given by
/// its bits in `scales` (rank-1 normalisation): `values[code] · scale`, the canonical NaN where
/// the scale is not finite (`rule::decode_scaled`).
///
/// # Safety
/// The CPU has AVX-512 F, BW and VL; `codes` and `scales` are at least as long as `output`; every
/// code is below 16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn decode_scaled_narrow(codes: &[u8], scales: &[u32], values: &[f32; MAP_LEN], output: &mut [f32]) {
    debug_assert!(codes.len() >= output.len() && scales.len() >= output.len());
    // SAFETY: `values` holds more than 16 values.
    let table = unsafe { _mm512_loadu_ps(values.as_ptr()) };
    let infinity = _mm512_set1_epi32(rule::INFINITY_BITS as i32);
    let nan = _mm512_castsi512_ps(_mm512_set1_epi32(rule::CANONICAL_NAN_BITS as i32));
    for start in (0..output.len()).step_by(LANES) {
        let mask = lane_mask(output.len() - start);
        // SAFETY: masked lanes are neither read nor written, the others lie inside the slices.
        unsafe {
            let code = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, codes.as_ptr().add(start).cast()));
            let scale = _mm512_maskz_loadu_epi32(mask, scales.as_ptr().add(start).cast());
            let value = _mm512_mul_ps(_mm512_permutexvar_ps(code, table), _mm512_castsi512_ps(scale));
            let non_finite = _mm512_cmpge_epu32_mask(scale, infinity);
            _mm512_mask_storeu_ps(output.as_mut_ptr().add(start), mask, _mm512_mask_blend_ps(non_finite, value, nan));
        }
    }
}

/// Encodes `block` into `codes` (as many) under a 4-bit map of (padded) `midpoints`, each element
/// against its own scale, given by its bits in `scales` (rank-1 normalisation): the number of
/// thresholds `midpoint · scale` below `x`, by the four-step search of [`encode_narrow`] with a
/// scale per lane; `zero_code` where the scale is 0 or not finite (`rule::encode_scaled`).
///
/// # Safety
/// The CPU has AVX-512 F, BW and VL; `midpoints[15]` is `+∞` (a 4-bit map's padding); `scales`
/// and `codes` are as long as `block`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn encode_scaled_narrow(
    block: &[f32],
    scales: &[u32],
    midpoints: &[f32; MAP_LEN - 1],
    zero_code: u8,
    codes: &mut [u8],
) {
    debug_assert!(midpoints[LANES - 1] == f32::INFINITY);
    debug_assert!(block.len() == codes.len() && scales.len() >= block.len());
    // SAFETY: `midpoints` holds more than 16 values.
    let thresholds = unsafe { _mm512_loadu_ps(midpoints.as_ptr()) };
    let infinity = _mm512_set1_epi32(rule::INFINITY_BITS as i32);
    let zero = _mm512_set1_epi32(i32::from(zero_code));
    for start in (0..block.len()).step_by(LANES) {
        let mask = lane_mask(block.len() - start);
        // SAFETY: masked lanes are neither read nor written, the others lie inside the slices.
        unsafe {
            let x = _mm512_maskz_loadu_ps(mask, block.as_ptr().add(start));
            let scale_bits = _mm512_maskz_loadu_epi32(mask, scales.as_ptr().add(start).cast());
            let scale = _mm512_castsi512_ps(scale_bits);
            let mut code = _mm512_setzero_si512();
            for step in [8, 4, 2, 1] {
                let probe = _mm512_add_epi32(code, _mm512_set1_epi32(step - 1));
                let threshold = _mm512_mul_ps(_mm512_permutexvar_ps(probe, thresholds), scale);
                let above = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, threshold);
                code = _mm512_mask_add_epi32(code, above, code, _mm512_set1_epi32(step));
            }
            let degenerate = _mm512_cmpeq_epi32_mask(scale_bits, _mm512_setzero_si512())
                | _mm512_cmpge_epu32_mask(scale_bits, infinity);
            let code = _mm512_mask_blend_epi32(degenerate, code, zero);
            _mm512_mask_cvtepi32_storeu_epi8(codes.as_mut_ptr().add(start).cast(), mask, code);
        }
    }
}
