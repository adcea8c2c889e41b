//! Rank-1 normalised codes on the CPU (docs/algorithm.md §2.4): element `(i, j)` of a state
//! viewed as a row-major matrix is scaled by the smaller of row `i`'s and column `j`'s maximum,
//! so every element has its own scale. The scales of a run of elements are computed row segment
//! by row segment (a minimum against a contiguous slice of column norms, which vectorises), then
//! decoded and encoded by the rules of `rule.rs`, which the kernels follow too; at levels with
//! AVX-512 a 4-bit map's lookups are permutes (`avx512.rs`).

#[cfg(target_arch = "x86_64")]
use super::avx512;
use super::{Encoder, Level, SMALL_BLOCK, pack_nibbles, unpack_nibbles, with_code_bytes};
use crate::block::BlockSize;
use crate::rule;

/// Elements decoded or encoded at a time: the most a code buffer holds.
const CHUNK: usize = BlockSize::MAX;

/// `f` run on `len` zeroed scale slots on the stack (at most [`CHUNK`]): a buffer no larger than
/// a block's, since clearing 16 KiB for every block of 128 elements would cost more than the
/// block.
#[inline(always)]
fn with_scale_bits<R>(len: usize, f: impl FnOnce(&mut [u32]) -> R) -> R {
    if len <= SMALL_BLOCK {
        f(&mut [0u32; SMALL_BLOCK][..len])
    } else {
        f(&mut [0u32; CHUNK][..len])
    }
}

/// `f` on each chunk of a run of `len` elements whose scales are `scales`, at most [`CHUNK`] at a
/// time: the chunk's first element (relative to the run), its scale bits, and a zeroed code byte
/// per element, both on the stack.
#[inline(always)]
fn scaled_chunks(len: usize, scales: Scales<'_>, mut f: impl FnMut(usize, &[u32], &mut [u8])) {
    for start in (0..len).step_by(CHUNK) {
        let chunk = CHUNK.min(len - start);
        with_scale_bits(chunk, #[inline(always)] |scale_bits| {
            scales.advanced(start).fill(scale_bits);
            with_code_bytes(chunk, #[inline(always)] |codes| f(start, scale_bits, codes))
        });
    }
}

/// Where a run of consecutive elements of a row-major matrix lies: the matrix's norms and the
/// index of the run's first element.
#[derive(Clone, Copy)]
pub(super) struct Scales<'n> {
    rows: &'n [f32],
    cols: &'n [f32],
    index: usize,
}

impl<'n> Scales<'n> {
    /// The scales of element `index` and those after it, under the norms `rows` and `cols`.
    pub(super) fn new(rows: &'n [f32], cols: &'n [f32], index: usize) -> Self {
        Self { rows, cols, index }
    }

    /// The scale bits (`rule::rank1_scale_bits`) of the run's first `out.len()` elements.
    #[inline(always)]
    fn fill(self, out: &mut [u32]) {
        let num_cols = self.cols.len();
        let (mut row, mut col) = (self.index / num_cols, self.index % num_cols);
        let mut done = 0;
        while done < out.len() {
            let len = (num_cols - col).min(out.len() - done);
            let row_norm = self.rows[row];
            for (scale, &col_norm) in out[done..done + len].iter_mut().zip(&self.cols[col..col + len]) {
                *scale = rule::rank1_scale_bits(row_norm, col_norm);
            }
            done += len;
            col = 0;
            row += 1;
        }
    }

    /// The same matrix from `count` elements further on.
    fn advanced(self, count: usize) -> Self {
        Self { index: self.index + count, ..self }
    }
}

/// The row and column maxima of `values` (bits of `|x|`), a run of consecutive elements of a
/// row-major matrix of `cols.len()` columns from element `index` on, raised into `rows` (whose
/// first entry is row `first_row`) and `cols`, row segment by row segment.
#[inline(always)]
pub(super) fn raise_norms(values: &[f32], index: usize, first_row: usize, rows: &mut [u32], cols: &mut [u32]) {
    let num_cols = cols.len();
    let (mut row, mut col) = (index / num_cols - first_row, index % num_cols);
    let mut done = 0;
    while done < values.len() {
        let len = (num_cols - col).min(values.len() - done);
        let segment = &values[done..done + len];
        let mut row_max = rows[row];
        for (norm, x) in cols[col..col + len].iter_mut().zip(segment) {
            let bits = x.to_bits() & rule::ABS_MASK;
            row_max = row_max.max(bits);
            *norm = (*norm).max(bits);
        }
        rows[row] = row_max;
        done += len;
        col = 0;
        row += 1;
    }
}

impl Encoder {
    /// The codes of `codes.len()` elements packed in `words`, one byte each.
    #[inline(always)]
    fn unpack(&self, words: &[u32], codes: &mut [u8]) {
        if self.bits == 8 {
            let bytes = words.iter().flat_map(|word| word.to_le_bytes());
            for (code, byte) in codes.iter_mut().zip(bytes) {
                *code = byte;
            }
        } else {
            unpack_nibbles(words, codes);
        }
    }

    /// `codes` packed into `words`, the unused bits of a partial last word zero.
    #[inline(always)]
    fn pack(&self, codes: &[u8], words: &mut [u32]) {
        if self.bits == 8 {
            for (word, codes) in words.iter_mut().zip(codes.chunks(4)) {
                *word = codes.iter().rev().fold(0, |word, &code| word << 8 | u32::from(code));
            }
        } else {
            pack_nibbles(codes, words);
        }
    }

    /// Decodes the codes of `output.len()` elements packed in `words`, each against its scale.
    #[inline(always)]
    pub(super) fn decode_rank1(&self, level: Level, words: &[u32], scales: Scales<'_>, output: &mut [f32]) {
        let per_word = 32 / self.bits as usize;
        scaled_chunks(output.len(), scales, #[inline(always)] |start, scale_bits, codes| {
            let output = &mut output[start..start + codes.len()];
            self.unpack(&words[start / per_word..], codes);
            #[cfg(target_arch = "x86_64")]
            if level.has_avx512() && self.bits == 4 {
                // SAFETY: the level has AVX-512; 4-bit codes are below 16; `codes` and
                // `scale_bits` are as long as `output`.
                unsafe { avx512::decode_scaled_narrow(codes, scale_bits, &self.values, output) };
                return;
            }
            let _ = level;
            for ((out, &code), &scale) in output.iter_mut().zip(codes.iter()).zip(scale_bits) {
                *out = rule::decode_scaled(self.values[usize::from(code)], scale);
            }
        });
    }

    /// Encodes `values` into `words` (as many as their codes need), each against its scale.
    #[inline(always)]
    pub(super) fn encode_rank1(&self, level: Level, values: &[f32], scales: Scales<'_>, words: &mut [u32]) {
        let per_word = 32 / self.bits as usize;
        scaled_chunks(values.len(), scales, #[inline(always)] |start, scale_bits, codes| {
            let values = &values[start..start + codes.len()];
            #[cfg(target_arch = "x86_64")]
            if level.has_avx512() && self.bits == 4 {
                // SAFETY: the level has AVX-512; a 4-bit map's padding midpoints are +∞;
                // `scale_bits` and `codes` are as long as `values`.
                unsafe { avx512::encode_scaled_narrow(values, scale_bits, self.midpoints(), self.zero_code, codes) };
            } else {
                for ((code, &x), &scale) in codes.iter_mut().zip(values).zip(scale_bits) {
                    *code = rule::encode_scaled(self.midpoints(), self.bits, self.zero_code, x, scale);
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = level;
            self.pack(codes, &mut words[start / per_word..]);
        });
    }
}
