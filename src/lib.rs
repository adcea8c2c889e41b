//! # burn-8bit
//!
//! 8-bit optimizer states for the [Burn](https://burn.dev) deep-learning framework, after
//! *8-bit Optimizers via Block-wise Quantization* (Dettmers et al., ICLR 2022) and its reference
//! implementation, bitsandbytes.
//!
//! This facade re-exports the layers of the project:
//! - [`ops`]: code maps and block-wise quantization ([`BlockQuantized`]), with CubeCL kernels and
//!   a CPU twin that produce identical codes;
//! - [`optim`]: the 8-bit optimizers ([`AdamW8bitConfig`], [`Adam8bitConfig`], [`Sgd8bitConfig`],
//!   [`RmsProp8bitConfig`], [`AdaGrad8bitConfig`], [`Lion8bitConfig`], [`Lamb8bitConfig`],
//!   [`AdEMAMix8bitConfig`], [`Lars8bitConfig`]), each the twin of Burn's 32-bit config of the
//!   same name (AdEMAMix and LARS follow bitsandbytes), with checkpoints ([`load_record_checked`],
//!   [`SwitchRecord`], [`SwitchGroups`]) and a state-memory report ([`StateReport`]);
//! - [`nn`]: [`nn::StableEmbedding`], the paper's embedding layer for stable 8-bit training,
//!   and [`nn::keep_embeddings_32bit`], which keeps its weight on 32-bit state.
//!
//! Backends are compiled in by Cargo feature (`flex` by default, `ndarray`, `wgpu`, `vulkan`,
//! `cuda`, `cpu`) and picked at run time by the [`burn::tensor::Device`] a tensor lives on.
//!
//! ```
//! use burn::tensor::{Device, Tensor};
//! use burn_8bit::{BlockQuantized, BlockSize, MapKind};
//!
//! let device = Device::default();
//! let x = Tensor::<2>::from_floats([[1.0, -0.5], [0.25, 0.0]], &device);
//! let q = BlockQuantized::quantize(x, MapKind::DynamicSigned, BlockSize::DEFAULT);
//! let y = q.dequantize::<2>()?;
//! assert_eq!(y.dims(), [2, 2]);
//! # Ok::<(), burn_8bit::QuantError>(())
//! ```
#![deny(missing_docs)]
#![deny(rustdoc::broken_intra_doc_links)]

pub use burn_8bit_ops as ops;
pub use burn_8bit_ops::{
    BlockQuantized, BlockSize, CodeMap, MapFamily, MapKind, QuantError, Rank1Quantized, shared_buffer_copies,
};
pub use burn_8bit_nn as nn;
pub use burn_8bit_optim as optim;
// Every public item of the optimizer layer, so that a new optimizer needs no entry here.
pub use burn_8bit_optim::*;
