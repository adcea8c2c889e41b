//! The backend-extension trait: the block-wise operations every supported backend implements.
//!
//! `Cube` (wgpu, CUDA, ROCm, Metal, cubecl-cpu) runs the CubeCL kernels of `cube.rs`; `Flex` and
//! `NdArray` run the CPU twin of `cpu.rs`; `Fusion` (Burn's default wrapper around `Cube`) defers
//! to `Cube` lazily. Users call these through the typed API of [`crate::BlockQuantized`].

// Burn deprecates its NdArray backend in favour of Flex; burn-8bit still supports it.
#![allow(deprecated)]

use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, ExtensionType, backend_extension};

use crate::map::MapKind;

/// The packed form of a block-quantized flat tensor, as a backend holds it.
#[derive(ExtensionType)]
#[extension_type(fusion: cfg(feature = "cube"))]
pub struct PackedBlocks<B: Backend> {
    /// `u32` words, four codes each (little-endian), `ceil(len / 4)` of them.
    pub codes: IntTensor<B>,
    /// `f32`, one per block.
    pub absmax: FloatTensor<B>,
}

/// Block-wise 8-bit quantization on a backend's own buffers.
///
/// Inputs are flat `f32` tensors; `block_size` is a validated [`crate::BlockSize`] value.
#[backend_extension(
    Cube: cfg(feature = "cube"),
    Flex: cfg(feature = "flex"),
    NdArray: cfg(feature = "ndarray"),
    Fusion: cfg(feature = "cube")
)]
pub trait BlockwiseOps: Backend {
    /// Per-block absmax and packed codes of a flat `f32` tensor (ALGORITHM.md §2).
    #[fusion(meta = fusion_meta::quantize)]
    fn blockwise_quantize(
        input: FloatTensor<Self>,
        map: MapKind,
        block_size: usize,
    ) -> PackedBlocks<Self>;

    /// The flat `f32` tensor of `len` elements that packed codes and absmax stand for.
    #[fusion(meta = fusion_meta::dequantize)]
    fn blockwise_dequantize(
        codes: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        map: MapKind,
        block_size: usize,
        len: usize,
    ) -> FloatTensor<Self>;
}

#[cfg(feature = "cube")]
mod fusion_meta {
    use burn::backend::fusion::custom::TensorSpec;
    use burn::tensor::DType;

    use super::PackedBlocksMetadata;
    use crate::block::num_words;
    use crate::map::MapKind;

    pub fn quantize(input: &TensorSpec, _map: &MapKind, block_size: &usize) -> PackedBlocksMetadata {
        let len = input.shape.num_elements();
        PackedBlocksMetadata {
            codes: TensorSpec::new([num_words(len)].into(), DType::U32),
            absmax: TensorSpec::new([len.div_ceil(*block_size)].into(), DType::F32),
        }
    }

    pub fn dequantize(
        _codes: &TensorSpec,
        _absmax: &TensorSpec,
        _map: &MapKind,
        _block_size: &usize,
        len: &usize,
    ) -> TensorSpec {
        TensorSpec::new([*len].into(), DType::F32)
    }
}

#[cfg(feature = "flex")]
mod flex {
    use burn::backend::Flex;
    use burn::backend::flex::FlexTensor;
    use burn::backend::tensor::{FloatTensor, IntTensor};
    use burn::tensor::TensorData;

    use super::{BlockwiseOps, PackedBlocks};
    use crate::cpu;
    use crate::map::MapKind;

    /// A contiguous `f32` view of a Flex tensor (copied only when strided).
    fn contiguous(tensor: FlexTensor) -> FlexTensor {
        if tensor.as_slice::<f32>().is_some() {
            tensor
        } else {
            tensor.to_contiguous()
        }
    }

    fn flat<E: burn::tensor::Element>(values: Vec<E>) -> FlexTensor {
        let len = values.len();
        FlexTensor::from_data(TensorData::new(values, [len]))
    }

    impl BlockwiseOps for Flex {
        fn blockwise_quantize(
            input: FloatTensor<Self>,
            map: MapKind,
            block_size: usize,
        ) -> PackedBlocks<Self> {
            let input = contiguous(input);
            let values = input.as_slice::<f32>().expect("contiguous f32 input");
            let (codes, absmax) = cpu::quantize(values, map, block_size);
            PackedBlocks {
                codes: flat(codes),
                absmax: flat(absmax),
            }
        }

        fn blockwise_dequantize(
            codes: IntTensor<Self>,
            absmax: FloatTensor<Self>,
            map: MapKind,
            block_size: usize,
            len: usize,
        ) -> FloatTensor<Self> {
            let codes = codes.to_contiguous();
            let absmax = contiguous(absmax);
            let words = codes.as_slice::<u32>().expect("contiguous u32 codes");
            let absmax = absmax.as_slice::<f32>().expect("contiguous f32 absmax");
            flat(cpu::dequantize(words, absmax, map, block_size, len))
        }
    }
}

#[cfg(feature = "ndarray")]
mod ndarray {
    use burn::backend::{NdArray, TensorMetadata};
    use burn::backend::ndarray::NdArrayTensor;
    use burn::backend::tensor::{FloatTensor, IntTensor};
    use burn::tensor::TensorData;

    use super::{BlockwiseOps, PackedBlocks};
    use crate::cpu;
    use crate::map::MapKind;

    fn flat<E: burn::tensor::Element>(values: Vec<E>) -> NdArrayTensor {
        let len = values.len();
        NdArrayTensor::from_data(TensorData::new(values, [len]))
    }

    /// Runs `f` on the elements of an `f32` tensor in row-major order, borrowing the buffer when
    /// it is already standard-layout.
    fn with_f32<R>(tensor: &NdArrayTensor, f: impl FnOnce(&[f32]) -> R) -> R {
        match tensor {
            NdArrayTensor::F32(storage) => {
                let view = storage.view();
                match view.as_slice() {
                    Some(values) => f(values),
                    None => f(&view.iter().copied().collect::<Vec<_>>()),
                }
            }
            other => panic!("blockwise ops take f32 tensors, got {:?}", other.dtype()),
        }
    }

    impl BlockwiseOps for NdArray {
        fn blockwise_quantize(
            input: FloatTensor<Self>,
            map: MapKind,
            block_size: usize,
        ) -> PackedBlocks<Self> {
            let (codes, absmax) = with_f32(&input, |values| cpu::quantize(values, map, block_size));
            PackedBlocks {
                codes: flat(codes),
                absmax: flat(absmax),
            }
        }

        fn blockwise_dequantize(
            codes: IntTensor<Self>,
            absmax: FloatTensor<Self>,
            map: MapKind,
            block_size: usize,
            len: usize,
        ) -> FloatTensor<Self> {
            let NdArrayTensor::U32(codes) = codes else {
                panic!("packed codes are u32, got {:?}", codes.dtype());
            };
            let codes = codes.view();
            let words: std::borrow::Cow<'_, [u32]> = match codes.as_slice() {
                Some(words) => words.into(),
                None => codes.iter().copied().collect::<Vec<_>>().into(),
            };
            with_f32(&absmax, |absmax| {
                flat(cpu::dequantize(&words, absmax, map, block_size, len))
            })
        }
    }
}
