//! Code maps and block-wise 8-bit and 4-bit quantization for [Burn](https://burn.dev), the layer under
//! burn-8bit's optimizers (Dettmers et al., *8-bit Optimizers via Block-wise Quantization*, 2022).
//!
//! - [`CodeMap`] / [`MapKind`]: the dynamic and linear maps of bitsandbytes and the 4-bit maps of
//!   torchao, bit for bit.
//! - [`BlockQuantized`]: quantize any tensor into packed codes plus per-block absmax, and back.
//! - [`Rank1Quantized`]: rank-1 normalised codes of a non-negative matrix (the 4-bit second moment).
//! - [`host`]: the same codes on plain slices, without a device (what records hold).
//! - [`BlockwiseOps`]: the backend-extension trait, implemented by CubeCL kernels (`wgpu`, `cuda`,
//!   `cpu` features) and by a native CPU twin (`flex`, `ndarray`) with bit-identical results.
//!
//! ```
//! use burn::tensor::{Device, Tensor};
//! use burn_8bit_ops::{BlockQuantized, BlockSize, MapKind};
//!
//! let x = Tensor::<1>::from_floats([0.1, -0.7, 0.0, 3.0], &Device::default());
//! let q = BlockQuantized::quantize(x, MapKind::DynamicSigned, BlockSize::DEFAULT);
//! assert_eq!(q.unpacked_codes()[2], 127); // 0.0 gets the zero code
//! assert_eq!(q.absmax_values(), [3.0]);
//! ```
#![deny(missing_docs)]
#![deny(rustdoc::broken_intra_doc_links)]

mod backend;
mod block;
mod copies;
pub mod cpu;
mod encode;
mod error;
mod ext;
pub mod host;
mod map;
mod quantized;
mod rank1;
mod rule;
mod step;

pub use block::BlockSize;
pub use copies::shared_buffer_copies;
pub use error::QuantError;
pub use ext::{BlockwiseOps, PackedBlocks, ParamDType, Rank1Codes, Rank1Norms, Scale, StateBuffer, StepTensors};
pub use map::{CodeMap, MAP_LEN, MapFamily, MapKind};
pub use quantized::BlockQuantized;
pub use rank1::Rank1Quantized;
pub use rule::{COUNT_WORDS, add_to_count, count_value, count_words, rounding_key};
pub use step::{StepRule, StepScalars};

/// FNV-1a, 64-bit, over `bytes`: the fingerprint of codes and states in conformance reports and
/// state reports.
pub fn fnv1a64(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
