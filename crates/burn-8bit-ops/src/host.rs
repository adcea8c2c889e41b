//! Block-wise codes in host memory, without a device: the form checkpoint records hold.
//!
//! The codes are those [`crate::BlockQuantized`] produces on every backend (the CPU twin
//! computes them here), for code that holds plain slices rather than tensors, such as the
//! conversion of a record between `f32` and 8-bit states.
//!
//! ```
//! use burn_8bit_ops::{BlockSize, MapKind, host};
//!
//! let values = [0.5, -2.0, 0.0];
//! let (words, absmax) = host::quantize(&values, MapKind::DynamicSigned, BlockSize::DEFAULT);
//! assert_eq!(absmax, [2.0]);
//! let decoded = host::dequantize(&words, &absmax, MapKind::DynamicSigned, BlockSize::DEFAULT, values.len())?;
//! assert_eq!(decoded[2], 0.0);
//! assert!(host::dequantize(&words, &[], MapKind::DynamicSigned, BlockSize::DEFAULT, 3).is_err());
//! # Ok::<(), burn_8bit_ops::QuantError>(())
//! ```

use crate::block::length_mismatch;
use crate::{BlockSize, MapKind, QuantError, cpu};

/// The packed codes (`map.num_words(values.len())` words) and the per-block absmax of `values`
/// quantized block-wise in `map`.
pub fn quantize(values: &[f32], map: MapKind, block_size: BlockSize) -> (Vec<u32>, Vec<f32>) {
    cpu::quantize(values, map, block_size.get())
}

/// The `len` values that `words` and `absmax` encode in `map`, or [`QuantError::Inconsistent`]
/// when their lengths do not describe `len` values at `block_size`.
pub fn dequantize(
    words: &[u32],
    absmax: &[f32],
    map: MapKind,
    block_size: BlockSize,
    len: usize,
) -> Result<Vec<f32>, QuantError> {
    if let Some(reason) = length_mismatch(words.len(), absmax.len(), len, block_size, map) {
        return Err(QuantError::Inconsistent { reason });
    }
    let mut values = vec![0.0; len];
    cpu::dequantize(words, absmax, map, block_size.get(), &mut values);
    Ok(values)
}

/// Rank-1 codes as plain vectors: packed code words, row maxima, column maxima.
pub type Rank1Parts = (Vec<u32>, Vec<f32>, Vec<f32>);

/// The packed codes (`map.num_words(values.len())` words), row maxima and column maxima of
/// `values`, a row-major matrix of `cols` columns, quantized with rank-1 normalisation in `map`
/// (docs/algorithm.md §2.4): element `(i, j)` is scaled by `min(rows[i], cols[j])`, the largest
/// magnitudes of its row and its column.
///
/// ```
/// use burn_8bit_ops::{MapKind, host};
///
/// let values = [1.0, 0.5, 0.25, 0.125, 2.0, 0.0625];
/// let (words, rows, cols) = host::rank1_quantize(&values, 3, MapKind::LinearUnsigned4)?;
/// assert_eq!((rows.as_slice(), cols.as_slice()), ([1.0, 2.0].as_slice(), [1.0, 2.0, 0.25].as_slice()));
/// let decoded = host::rank1_dequantize(&words, &rows, &cols, MapKind::LinearUnsigned4)?;
/// assert_eq!(decoded, [1.0, 0.5, 0.25, 0.125, 2.0, 0.0625]);
/// # Ok::<(), burn_8bit_ops::QuantError>(())
/// ```
///
/// [`QuantError::Inconsistent`] when `cols` is 0 or does not divide the length.
pub fn rank1_quantize(values: &[f32], cols: usize, map: MapKind) -> Result<Rank1Parts, QuantError> {
    if cols == 0 || !values.len().is_multiple_of(cols) {
        return Err(QuantError::Inconsistent { reason: format!("{} values are not rows of {cols} columns", values.len()) });
    }
    Ok(cpu::rank1_quantize(values, cols, map))
}

/// The values that rank-1 codes `words` with their row and column maxima encode in `map`
/// ([`rank1_quantize`]); [`QuantError::Inconsistent`] when the lengths disagree.
pub fn rank1_dequantize(words: &[u32], rows: &[f32], cols: &[f32], map: MapKind) -> Result<Vec<f32>, QuantError> {
    let len = rows.len() * cols.len();
    if words.len() != map.num_words(len) {
        return Err(QuantError::Inconsistent {
            reason: format!("{} code words for {} × {} elements, expected {}", words.len(), rows.len(), cols.len(), map.num_words(len)),
        });
    }
    Ok(cpu::rank1_dequantize(words, rows, cols, map))
}

/// The first `len` codes packed in `words` as `map` packs them ([`MapKind::codes_per_word`]),
/// one byte each.
///
/// ```
/// use burn_8bit_ops::{MapKind, host};
/// assert_eq!(host::unpack(&[0x0000_0321], MapKind::DynamicSigned4, 3), [1, 2, 3]);
/// assert_eq!(host::unpack(&[0x0000_0201], MapKind::DynamicSigned, 2), [1, 2]);
/// ```
pub fn unpack(words: &[u32], map: MapKind, len: usize) -> Vec<u8> {
    let (bits, per_word) = (map.bits() as usize, map.codes_per_word());
    let mask = (1u32 << bits) - 1;
    (0..len).map(|i| ((words[i / per_word] >> (bits * (i % per_word))) & mask) as u8).collect()
}
