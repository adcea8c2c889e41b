//! Block sizes and the arithmetic of cutting a flat tensor into blocks.

use crate::error::QuantError;
use crate::map::MapKind;

/// The number of consecutive elements that share one absmax: a power of two in `64..=4096`.
///
/// ```
/// use burn_8bit_ops::BlockSize;
/// let block = BlockSize::new(256).unwrap();
/// assert_eq!(block.num_blocks(1000), 4);
/// assert!(BlockSize::new(100).is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "usize", into = "usize")]
pub struct BlockSize(usize);

impl BlockSize {
    /// The smallest block size.
    pub const MIN: usize = 64;
    /// The largest block size.
    pub const MAX: usize = 4096;
    /// The default block size of optimizer states (bitsandbytes' since 0.44).
    pub const DEFAULT: BlockSize = BlockSize(256);

    /// A block size, or [`QuantError::InvalidBlockSize`] when `size` is not a power of two in
    /// `64..=4096`.
    pub fn new(size: usize) -> Result<Self, QuantError> {
        if (Self::MIN..=Self::MAX).contains(&size) && size.is_power_of_two() {
            Ok(Self(size))
        } else {
            Err(QuantError::InvalidBlockSize(size))
        }
    }

    /// Every valid block size, ascending.
    pub fn all() -> impl Iterator<Item = BlockSize> {
        (Self::MIN.trailing_zeros()..=Self::MAX.trailing_zeros()).map(|shift| Self(1 << shift))
    }

    /// The size in elements.
    pub fn get(self) -> usize {
        self.0
    }

    /// Blocks needed for `len` elements (the last one may be partial).
    pub fn num_blocks(self, len: usize) -> usize {
        len.div_ceil(self.0)
    }
}

impl Default for BlockSize {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl TryFrom<usize> for BlockSize {
    type Error = QuantError;
    fn try_from(size: usize) -> Result<Self, Self::Error> {
        Self::new(size)
    }
}

impl From<BlockSize> for usize {
    fn from(block: BlockSize) -> usize {
        block.0
    }
}

/// Why `words` code words of `map` and `absmax` values do not describe `len` elements in blocks
/// of `block_size`, or `None` when they do.
pub(crate) fn length_mismatch(
    words: usize,
    absmax: usize,
    len: usize,
    block_size: BlockSize,
    map: MapKind,
) -> Option<String> {
    let expected = map.num_words(len);
    if words != expected {
        return Some(format!("{words} code words for {len} {}-bit codes, expected {expected}", map.bits()));
    }
    let blocks = block_size.num_blocks(len);
    (absmax != blocks).then(|| {
        format!("{absmax} absmax values for {len} elements in blocks of {}, expected {blocks}", block_size.get())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_and_invalid_sizes() {
        let valid: Vec<usize> = BlockSize::all().map(BlockSize::get).collect();
        assert_eq!(valid, [64, 128, 256, 512, 1024, 2048, 4096]);
        for bad in [0, 1, 32, 63, 65, 100, 8192, usize::MAX] {
            assert_eq!(BlockSize::new(bad), Err(QuantError::InvalidBlockSize(bad)));
        }
    }

    #[test]
    fn block_and_word_counts() {
        let b = BlockSize::new(64).unwrap();
        assert_eq!(b.num_blocks(0), 0);
        assert_eq!(b.num_blocks(1), 1);
        assert_eq!(b.num_blocks(64), 1);
        assert_eq!(b.num_blocks(65), 2);
        assert_eq!(MapKind::DynamicSigned.num_words(0), 0);
        assert_eq!(MapKind::DynamicSigned.num_words(5), 2);
        assert_eq!(MapKind::DynamicSigned4.num_words(17), 3);
    }
}
