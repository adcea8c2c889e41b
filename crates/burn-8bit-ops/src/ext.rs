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
use crate::step::{StepRule, StepScalars};

/// The packed form of a block-quantized flat tensor, as a backend holds it.
#[derive(ExtensionType)]
#[extension_type(fusion: cfg(feature = "cube"))]
pub struct PackedBlocks<B: Backend> {
    /// `u32` words, four codes each (little-endian), `ceil(len / 4)` of them.
    pub codes: IntTensor<B>,
    /// `f32`, one per block.
    pub absmax: FloatTensor<B>,
}

/// What a one-state fused step reads and rewrites: the flat `f32` parameter, the running count
/// of skipped (non-finite) elements (a 64-bit count in two `u32` words) and the quantized state.
#[derive(ExtensionType)]
#[extension_type(fusion: cfg(feature = "cube"))]
pub struct OneState<B: Backend> {
    /// Flat `f32` parameter.
    pub param: FloatTensor<B>,
    /// `u32[2]`: elements skipped so far, a 64-bit count as `[low, high]` words.
    pub skipped: IntTensor<B>,
    /// State slot 0.
    #[extension_type]
    pub state1: PackedBlocks<B>,
}

/// What a two-state fused step reads and rewrites (see [`OneState`]).
#[derive(ExtensionType)]
#[extension_type(fusion: cfg(feature = "cube"))]
pub struct TwoStates<B: Backend> {
    /// Flat `f32` parameter.
    pub param: FloatTensor<B>,
    /// `u32[2]`: elements skipped so far, a 64-bit count as `[low, high]` words.
    pub skipped: IntTensor<B>,
    /// State slot 0.
    #[extension_type]
    pub state1: PackedBlocks<B>,
    /// State slot 1.
    #[extension_type]
    pub state2: PackedBlocks<B>,
}

/// What a three-state fused step reads and rewrites (see [`OneState`]).
#[derive(ExtensionType)]
#[extension_type(fusion: cfg(feature = "cube"))]
pub struct ThreeStates<B: Backend> {
    /// Flat `f32` parameter.
    pub param: FloatTensor<B>,
    /// `u32[2]`: elements skipped so far, a 64-bit count as `[low, high]` words.
    pub skipped: IntTensor<B>,
    /// State slot 0.
    #[extension_type]
    pub state1: PackedBlocks<B>,
    /// State slot 1.
    #[extension_type]
    pub state2: PackedBlocks<B>,
    /// State slot 2.
    #[extension_type]
    pub state3: PackedBlocks<B>,
}

/// The fused step's buffers in one backend-independent shape, so that each backend writes one
/// implementation for all three families.
pub(crate) struct StepBuffers<B: Backend> {
    pub param: FloatTensor<B>,
    pub skipped: IntTensor<B>,
    pub states: Vec<PackedBlocks<B>>,
}

impl<B: Backend> From<OneState<B>> for StepBuffers<B> {
    fn from(t: OneState<B>) -> Self {
        Self { param: t.param, skipped: t.skipped, states: vec![t.state1] }
    }
}

impl<B: Backend> From<TwoStates<B>> for StepBuffers<B> {
    fn from(t: TwoStates<B>) -> Self {
        Self { param: t.param, skipped: t.skipped, states: vec![t.state1, t.state2] }
    }
}

impl<B: Backend> From<ThreeStates<B>> for StepBuffers<B> {
    fn from(t: ThreeStates<B>) -> Self {
        Self { param: t.param, skipped: t.skipped, states: vec![t.state1, t.state2, t.state3] }
    }
}

impl<B: Backend> From<StepBuffers<B>> for OneState<B> {
    fn from(t: StepBuffers<B>) -> Self {
        let [state1] = <[_; 1]>::try_from(t.states).ok().expect("one state");
        Self { param: t.param, skipped: t.skipped, state1 }
    }
}

impl<B: Backend> From<StepBuffers<B>> for TwoStates<B> {
    fn from(t: StepBuffers<B>) -> Self {
        let [state1, state2] = <[_; 2]>::try_from(t.states).ok().expect("two states");
        Self { param: t.param, skipped: t.skipped, state1, state2 }
    }
}

impl<B: Backend> From<StepBuffers<B>> for ThreeStates<B> {
    fn from(t: StepBuffers<B>) -> Self {
        let [state1, state2, state3] = <[_; 3]>::try_from(t.states).ok().expect("three states");
        Self { param: t.param, skipped: t.skipped, state1, state2, state3 }
    }
}

/// Implements the fused-step and update-norm methods of [`BlockwiseOps`] for a backend through
/// its one `fused_step(StepBuffers, grad, grad_scale, update_scale, rule, scalars, block_size)`
/// and one `update_norms(StepBuffers, grad, grad_scale, rule, scalars, block_size)` function.
macro_rules! fused_step_families {
    ($step:path, $norms:path) => {
        fn update_norms_one_state(
            tensors: $crate::ext::OneState<Self>,
            grad: burn::backend::tensor::FloatTensor<Self>,
            grad_scale: burn::backend::tensor::FloatTensor<Self>,
            rule: $crate::step::StepRule,
            scalars: $crate::step::StepScalars,
            block_size: usize,
        ) -> burn::backend::tensor::FloatTensor<Self> {
            $norms(tensors.into(), grad, grad_scale, rule, scalars, block_size)
        }

        fn update_norms_two_states(
            tensors: $crate::ext::TwoStates<Self>,
            grad: burn::backend::tensor::FloatTensor<Self>,
            grad_scale: burn::backend::tensor::FloatTensor<Self>,
            rule: $crate::step::StepRule,
            scalars: $crate::step::StepScalars,
            block_size: usize,
        ) -> burn::backend::tensor::FloatTensor<Self> {
            $norms(tensors.into(), grad, grad_scale, rule, scalars, block_size)
        }

        fn fused_step_one_state(
            tensors: $crate::ext::OneState<Self>,
            grad: burn::backend::tensor::FloatTensor<Self>,
            grad_scale: burn::backend::tensor::FloatTensor<Self>,
            update_scale: burn::backend::tensor::FloatTensor<Self>,
            rule: $crate::step::StepRule,
            scalars: $crate::step::StepScalars,
            block_size: usize,
        ) -> $crate::ext::OneState<Self> {
            $step(tensors.into(), grad, grad_scale, update_scale, rule, scalars, block_size).into()
        }

        fn fused_step_two_states(
            tensors: $crate::ext::TwoStates<Self>,
            grad: burn::backend::tensor::FloatTensor<Self>,
            grad_scale: burn::backend::tensor::FloatTensor<Self>,
            update_scale: burn::backend::tensor::FloatTensor<Self>,
            rule: $crate::step::StepRule,
            scalars: $crate::step::StepScalars,
            block_size: usize,
        ) -> $crate::ext::TwoStates<Self> {
            $step(tensors.into(), grad, grad_scale, update_scale, rule, scalars, block_size).into()
        }

        fn fused_step_three_states(
            tensors: $crate::ext::ThreeStates<Self>,
            grad: burn::backend::tensor::FloatTensor<Self>,
            grad_scale: burn::backend::tensor::FloatTensor<Self>,
            update_scale: burn::backend::tensor::FloatTensor<Self>,
            rule: $crate::step::StepRule,
            scalars: $crate::step::StepScalars,
            block_size: usize,
        ) -> $crate::ext::ThreeStates<Self> {
            $step(tensors.into(), grad, grad_scale, update_scale, rule, scalars, block_size).into()
        }
    };
}
#[cfg(feature = "cube")]
pub(crate) use fused_step_families;

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
    /// Per-block absmax and packed codes of a flat `f32` tensor (docs/algorithm.md §2).
    #[fusion(meta = fusion_meta::quantize)]
    fn blockwise_quantize(
        input: FloatTensor<Self>,
        map: MapKind,
        block_size: usize,
    ) -> PackedBlocks<Self>;

    /// Packed codes of a flat `f32` tensor against the given per-block `absmax`
    /// (`f32[ceil(len / block_size)]`, non-negative; read by magnitude) instead of each block's
    /// own: [`BlockwiseOps::blockwise_quantize`] without its reduction, returning `absmax` as
    /// given. One absmax repeated over every block quantizes a whole tensor against its own
    /// absmax (an ablation setting of the optimizers).
    #[fusion(meta = fusion_meta::encode)]
    fn blockwise_encode(
        input: FloatTensor<Self>,
        absmax: FloatTensor<Self>,
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

    /// The fused optimizer step of a one-state rule, in place where the buffers are unshared:
    /// per block, decode → update (parameter included) → new absmax → encode
    /// (docs/algorithm.md §3.1). `grad` is flat `f32` of the parameter's length; every gradient element
    /// is multiplied by `grad_scale` (`f32`, one element, on the device: percentile clipping's
    /// factor, 1 otherwise) before the update, and the step size by `update_scale` (one element:
    /// LAMB's or LARS's trust ratio from [`BlockwiseOps::update_norms_one_state`], 1 otherwise).
    #[fusion(meta = fusion_meta::one_state)]
    fn fused_step_one_state(
        #[extension_type] tensors: OneState<Self>,
        grad: FloatTensor<Self>,
        grad_scale: FloatTensor<Self>,
        update_scale: FloatTensor<Self>,
        rule: StepRule,
        scalars: StepScalars,
        block_size: usize,
    ) -> OneState<Self>;

    /// The fused step of a two-state rule (see [`BlockwiseOps::fused_step_one_state`]).
    #[fusion(meta = fusion_meta::two_states)]
    fn fused_step_two_states(
        #[extension_type] tensors: TwoStates<Self>,
        grad: FloatTensor<Self>,
        grad_scale: FloatTensor<Self>,
        update_scale: FloatTensor<Self>,
        rule: StepRule,
        scalars: StepScalars,
        block_size: usize,
    ) -> TwoStates<Self>;

    /// The fused step of a three-state rule (see [`BlockwiseOps::fused_step_one_state`]).
    #[fusion(meta = fusion_meta::three_states)]
    fn fused_step_three_states(
        #[extension_type] tensors: ThreeStates<Self>,
        grad: FloatTensor<Self>,
        grad_scale: FloatTensor<Self>,
        update_scale: FloatTensor<Self>,
        rule: StepRule,
        scalars: StepScalars,
        block_size: usize,
    ) -> ThreeStates<Self>;

    /// The first pass of a two-pass rule (LAMB, LARS): per block, the sums of the squared update
    /// direction and of the squared parameter, `f32[2 · blocks]` as `[d₀, p₀, d₁, p₁, …]`; the
    /// tensors are read, not written.
    #[fusion(meta = fusion_meta::norms_one_state)]
    fn update_norms_one_state(
        #[extension_type] tensors: OneState<Self>,
        grad: FloatTensor<Self>,
        grad_scale: FloatTensor<Self>,
        rule: StepRule,
        scalars: StepScalars,
        block_size: usize,
    ) -> FloatTensor<Self>;

    /// [`BlockwiseOps::update_norms_one_state`] for a two-state rule.
    #[fusion(meta = fusion_meta::norms_two_states)]
    fn update_norms_two_states(
        #[extension_type] tensors: TwoStates<Self>,
        grad: FloatTensor<Self>,
        grad_scale: FloatTensor<Self>,
        rule: StepRule,
        scalars: StepScalars,
        block_size: usize,
    ) -> FloatTensor<Self>;
}

#[cfg(feature = "cube")]
mod fusion_meta {
    use burn::backend::fusion::custom::TensorSpec;
    use burn::tensor::DType;

    use super::{
        OneStateMetadata, PackedBlocksMetadata, ThreeStatesMetadata, TwoStatesMetadata,
    };
    use crate::block::num_words;
    use crate::map::MapKind;
    use crate::step::{StepRule, StepScalars};

    fn norms_spec(param: &TensorSpec, block_size: usize) -> TensorSpec {
        let blocks = param.shape.num_elements().div_ceil(block_size);
        TensorSpec::new([2 * blocks].into(), DType::F32)
    }

    pub fn norms_one_state(
        tensors: &OneStateMetadata,
        _grad: &TensorSpec,
        _grad_scale: &TensorSpec,
        _rule: &StepRule,
        _scalars: &StepScalars,
        block_size: &usize,
    ) -> TensorSpec {
        norms_spec(&tensors.param, *block_size)
    }

    pub fn norms_two_states(
        tensors: &TwoStatesMetadata,
        _grad: &TensorSpec,
        _grad_scale: &TensorSpec,
        _rule: &StepRule,
        _scalars: &StepScalars,
        block_size: &usize,
    ) -> TensorSpec {
        norms_spec(&tensors.param, *block_size)
    }

    pub fn one_state(
        tensors: &OneStateMetadata,
        _grad: &TensorSpec,
        _grad_scale: &TensorSpec,
        _update_scale: &TensorSpec,
        _rule: &StepRule,
        _scalars: &StepScalars,
        _block_size: &usize,
    ) -> OneStateMetadata {
        tensors.clone()
    }

    pub fn two_states(
        tensors: &TwoStatesMetadata,
        _grad: &TensorSpec,
        _grad_scale: &TensorSpec,
        _update_scale: &TensorSpec,
        _rule: &StepRule,
        _scalars: &StepScalars,
        _block_size: &usize,
    ) -> TwoStatesMetadata {
        tensors.clone()
    }

    pub fn three_states(
        tensors: &ThreeStatesMetadata,
        _grad: &TensorSpec,
        _grad_scale: &TensorSpec,
        _update_scale: &TensorSpec,
        _rule: &StepRule,
        _scalars: &StepScalars,
        _block_size: &usize,
    ) -> ThreeStatesMetadata {
        tensors.clone()
    }

    pub fn quantize(input: &TensorSpec, _map: &MapKind, block_size: &usize) -> PackedBlocksMetadata {
        let len = input.shape.num_elements();
        PackedBlocksMetadata {
            codes: TensorSpec::new([num_words(len)].into(), DType::U32),
            absmax: TensorSpec::new([len.div_ceil(*block_size)].into(), DType::F32),
        }
    }

    pub fn encode(
        input: &TensorSpec,
        absmax: &TensorSpec,
        _map: &MapKind,
        _block_size: &usize,
    ) -> PackedBlocksMetadata {
        PackedBlocksMetadata {
            codes: TensorSpec::new([num_words(input.shape.num_elements())].into(), DType::U32),
            absmax: absmax.clone(),
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

    use super::{BlockwiseOps, PackedBlocks, StepBuffers};
    use crate::cpu::{self, StateBuffers};
    use crate::rule;
    use crate::map::MapKind;
    use crate::step::{StepRule, StepScalars};

    /// A contiguous Flex tensor (copied only when strided).
    fn contiguous(tensor: FlexTensor) -> FlexTensor {
        if tensor.is_contiguous() && tensor.layout().contiguous_offsets().is_some() {
            tensor
        } else {
            tensor.to_contiguous()
        }
    }

    /// The elements of a contiguous tensor, mutably: in place when the buffer is unshared,
    /// copied first otherwise.
    fn elements_mut<E: burn::tensor::Element + bytemuck::Pod>(tensor: &mut FlexTensor) -> &mut [E] {
        let (start, end) = tensor.layout().contiguous_offsets().expect("contiguous");
        &mut tensor.storage_mut::<E>()[start..end]
    }

    fn scalar(tensor: FlexTensor) -> f32 {
        contiguous(tensor).as_slice::<f32>().expect("an f32 scalar")[0]
    }

    fn update_norms(
        buffers: StepBuffers<Flex>,
        grad: FlexTensor,
        grad_scale: FlexTensor,
        rule: StepRule,
        scalars: StepScalars,
        block_size: usize,
    ) -> FlexTensor {
        let param = contiguous(buffers.param);
        let grad = contiguous(grad);
        let states: Vec<(FlexTensor, FlexTensor)> = buffers
            .states
            .into_iter()
            .map(|state| (contiguous(state.codes), contiguous(state.absmax)))
            .collect();
        let views: Vec<(&[u32], &[f32], MapKind)> = states
            .iter()
            .zip(rule.state_maps(scalars.maps))
            .map(|((codes, absmax), map)| {
                (
                    codes.as_slice::<u32>().expect("u32 codes"),
                    absmax.as_slice::<f32>().expect("f32 absmax"),
                    map,
                )
            })
            .collect();
        flat(cpu::update_norms(
            rule,
            &scalars,
            scalar(grad_scale),
            param.as_slice::<f32>().expect("f32 parameter"),
            grad.as_slice::<f32>().expect("f32 gradient"),
            &views,
            block_size,
        ))
    }

    fn fused_step(
        buffers: StepBuffers<Flex>,
        grad: FlexTensor,
        grad_scale: FlexTensor,
        update_scale: FlexTensor,
        rule: StepRule,
        scalars: StepScalars,
        block_size: usize,
    ) -> StepBuffers<Flex> {
        let mut param = contiguous(buffers.param);
        let grad = contiguous(grad);
        let mut skipped = contiguous(buffers.skipped);
        let mut states: Vec<(FlexTensor, FlexTensor)> = buffers
            .states
            .into_iter()
            .map(|state| (contiguous(state.codes), contiguous(state.absmax)))
            .collect();
        let maps = rule.state_maps(scalars.maps);
        let mut views: Vec<StateBuffers<'_>> = states
            .iter_mut()
            .zip(maps)
            .map(|((codes, absmax), map)| StateBuffers {
                words: elements_mut(codes),
                absmax: elements_mut(absmax),
                map,
            })
            .collect();
        let grad_values = grad.as_slice::<f32>().expect("contiguous f32 gradient");
        let newly_skipped = cpu::fused_step(
            rule,
            &scalars,
            scalar(grad_scale),
            scalar(update_scale),
            elements_mut(&mut param),
            grad_values,
            &mut views,
            block_size,
        );
        drop(views);
        let count: &mut [u32; rule::COUNT_WORDS] =
            elements_mut::<u32>(&mut skipped).try_into().expect("a two-word skip counter");
        *count = rule::add_to_count(*count, newly_skipped);
        StepBuffers {
            param,
            skipped,
            states: states
                .into_iter()
                .map(|(codes, absmax)| PackedBlocks { codes, absmax })
                .collect(),
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

        fn blockwise_encode(
            input: FloatTensor<Self>,
            absmax: FloatTensor<Self>,
            map: MapKind,
            block_size: usize,
        ) -> PackedBlocks<Self> {
            let input = contiguous(input);
            let absmax = contiguous(absmax);
            let values = input.as_slice::<f32>().expect("contiguous f32 input");
            let scales = absmax.as_slice::<f32>().expect("contiguous f32 absmax");
            let codes = flat(cpu::encode(values, scales, map, block_size));
            PackedBlocks { codes, absmax }
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

        fused_step_families!(fused_step, update_norms);
    }
}

#[cfg(feature = "ndarray")]
mod ndarray {
    use burn::backend::{NdArray, TensorMetadata};
    use burn::backend::ndarray::NdArrayTensor;
    use burn::backend::tensor::{FloatTensor, IntTensor};
    use burn::tensor::TensorData;

    use super::{BlockwiseOps, PackedBlocks, StepBuffers};
    use crate::cpu::{self, StateBuffers};
    use crate::rule;
    use crate::map::MapKind;
    use crate::step::{StepRule, StepScalars};

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

    fn u32_values(tensor: &NdArrayTensor) -> Vec<u32> {
        let NdArrayTensor::U32(storage) = tensor else {
            panic!("expected a u32 tensor, got {:?}", tensor.dtype());
        };
        storage.view().iter().copied().collect()
    }

    /// NdArray shares buffers behind views it does not expose mutably: the step works on copies
    /// and returns fresh tensors.
    fn update_norms(
        buffers: StepBuffers<NdArray>,
        grad: NdArrayTensor,
        grad_scale: NdArrayTensor,
        rule: StepRule,
        scalars: StepScalars,
        block_size: usize,
    ) -> NdArrayTensor {
        let param = with_f32(&buffers.param, <[f32]>::to_vec);
        let grad = with_f32(&grad, <[f32]>::to_vec);
        let grad_scale = with_f32(&grad_scale, |scale| scale[0]);
        let states: Vec<(Vec<u32>, Vec<f32>)> = buffers
            .states
            .iter()
            .map(|state| (u32_values(&state.codes), with_f32(&state.absmax, <[f32]>::to_vec)))
            .collect();
        let views: Vec<(&[u32], &[f32], MapKind)> = states
            .iter()
            .zip(rule.state_maps(scalars.maps))
            .map(|((codes, absmax), map)| (codes.as_slice(), absmax.as_slice(), map))
            .collect();
        flat(cpu::update_norms(rule, &scalars, grad_scale, &param, &grad, &views, block_size))
    }

    fn fused_step(
        buffers: StepBuffers<NdArray>,
        grad: NdArrayTensor,
        grad_scale: NdArrayTensor,
        update_scale: NdArrayTensor,
        rule: StepRule,
        scalars: StepScalars,
        block_size: usize,
    ) -> StepBuffers<NdArray> {
        let mut param = with_f32(&buffers.param, <[f32]>::to_vec);
        let mut states: Vec<(Vec<u32>, Vec<f32>)> = buffers
            .states
            .iter()
            .map(|state| (u32_values(&state.codes), with_f32(&state.absmax, <[f32]>::to_vec)))
            .collect();
        let mut views: Vec<StateBuffers<'_>> = states
            .iter_mut()
            .zip(rule.state_maps(scalars.maps))
            .map(|((words, absmax), map)| StateBuffers { words, absmax, map })
            .collect();
        let grad_scale = with_f32(&grad_scale, |scale| scale[0]);
        let update_scale = with_f32(&update_scale, |scale| scale[0]);
        let newly_skipped = with_f32(&grad, |grad| {
            cpu::fused_step(rule, &scalars, grad_scale, update_scale, &mut param, grad, &mut views, block_size)
        });
        drop(views);
        let count = u32_values(&buffers.skipped).try_into().expect("a two-word skip counter");
        StepBuffers {
            param: flat(param),
            skipped: flat(rule::add_to_count(count, newly_skipped).to_vec()),
            states: states
                .into_iter()
                .map(|(codes, absmax)| PackedBlocks { codes: flat(codes), absmax: flat(absmax) })
                .collect(),
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

        fn blockwise_encode(
            input: FloatTensor<Self>,
            absmax: FloatTensor<Self>,
            map: MapKind,
            block_size: usize,
        ) -> PackedBlocks<Self> {
            let codes = with_f32(&input, |values| {
                with_f32(&absmax, |scales| cpu::encode(values, scales, map, block_size))
            });
            PackedBlocks { codes: flat(codes), absmax }
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

        fused_step_families!(fused_step, update_norms);
    }
}
