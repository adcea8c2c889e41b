//! Rank-1 normalised codes on the CPU (docs/algorithm.md §2.4): element `(i, j)` of a state
//! viewed as a row-major matrix is scaled by the smaller of row `i`'s and column `j`'s maximum,
//! so every element has its own scale. Scalar loops by the rules of `rule.rs`, which the kernels
//! follow too.

use super::{Encoder, NIBBLES, unpack_nibbles, with_code_bytes};
use crate::block::BlockSize;
use crate::rule;

/// Elements decoded or encoded at a time: the most a code buffer holds.
const CHUNK: usize = BlockSize::MAX;

/// The scale bits of consecutive elements of a row-major matrix, from one element on.
pub(super) struct Scales<'n> {
    rows: &'n [f32],
    cols: &'n [f32],
    row: usize,
    col: usize,
}

impl<'n> Scales<'n> {
    /// The scales of element `index` and those after it, under the norms `rows` and `cols`.
    pub(super) fn new(rows: &'n [f32], cols: &'n [f32], index: usize) -> Self {
        Self { rows, cols, row: index / cols.len(), col: index % cols.len() }
    }
}

impl Iterator for Scales<'_> {
    type Item = u32;

    #[inline(always)]
    fn next(&mut self) -> Option<u32> {
        let bits = rule::rank1_scale_bits(*self.rows.get(self.row)?, self.cols[self.col]);
        self.col += 1;
        if self.col == self.cols.len() {
            self.col = 0;
            self.row += 1;
        }
        Some(bits)
    }
}

impl Encoder {
    /// The codes of `codes.len()` elements packed in `words`, one byte each.
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
    fn pack(&self, codes: &[u8], words: &mut [u32]) {
        let per_word = if self.bits == 8 { 4 } else { NIBBLES };
        for (word, codes) in words.iter_mut().zip(codes.chunks(per_word)) {
            *word = codes
                .iter()
                .enumerate()
                .fold(0, |word, (j, &code)| word | u32::from(code) << (self.bits as usize * j));
        }
    }

    /// Decodes the codes of `output.len()` elements packed in `words`, each against its scale.
    pub(super) fn decode_rank1(&self, words: &[u32], mut scales: Scales<'_>, output: &mut [f32]) {
        let per_word = 32 / self.bits as usize;
        for (words, output) in words.chunks(CHUNK / per_word).zip(output.chunks_mut(CHUNK)) {
            with_code_bytes(output.len(), |codes| {
                self.unpack(words, codes);
                for ((out, &code), scale) in output.iter_mut().zip(codes.iter()).zip(&mut scales) {
                    *out = rule::decode_scaled(self.values[usize::from(code)], scale);
                }
            });
        }
    }

    /// Encodes `values` into `words` (as many as their codes need), each against its scale.
    pub(super) fn encode_rank1(&self, values: &[f32], mut scales: Scales<'_>, words: &mut [u32]) {
        let per_word = 32 / self.bits as usize;
        for (values, words) in values.chunks(CHUNK).zip(words.chunks_mut(CHUNK / per_word)) {
            with_code_bytes(values.len(), |codes| {
                for ((code, &x), scale) in codes.iter_mut().zip(values).zip(&mut scales) {
                    *code = rule::encode_scaled(&self.midpoints, self.bits, self.zero_code, x, scale);
                }
                self.pack(codes, words);
            });
        }
    }
}
