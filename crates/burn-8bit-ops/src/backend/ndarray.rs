//! [`BlockwiseOps`] for NdArray: the CPU twin on copies of NdArray's buffers (it shares them
//! behind views it does not expose mutably), returning fresh tensors.

// Burn deprecates its NdArray backend in favour of Flex; burn-8bit still supports it.
#![allow(deprecated)]

use std::borrow::Cow;

use burn::backend::ndarray::NdArrayTensor;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{NdArray, TensorMetadata};
use burn::tensor::TensorData;

use crate::cpu::{self, StateRef, StateSlice};
use crate::ext::{BlockwiseOps, PackedBlocks, Scale, StateBuffer, StepTensors};
use crate::map::{MapFamily, MapKind};
use crate::rule;
use crate::step::{StepRule, StepScalars};

/// A state copied out of NdArray's buffers.
type OwnedState = StateSlice<Vec<u32>, Vec<f32>>;

fn flat<E: burn::tensor::Element>(values: Vec<E>) -> NdArrayTensor {
    let len = values.len();
    NdArrayTensor::from_data(TensorData::new(values, [len]))
}

/// The elements of an `f32` tensor in row-major order, borrowed when already standard-layout.
fn f32_values(tensor: &NdArrayTensor) -> Cow<'_, [f32]> {
    match tensor {
        NdArrayTensor::F32(storage) => {
            let view = storage.view();
            match view.to_slice() {
                Some(values) => Cow::Borrowed(values),
                None => Cow::Owned(view.iter().copied().collect()),
            }
        }
        other => panic!("blockwise ops take f32 tensors, got {:?}", other.dtype()),
    }
}

fn u32_values(tensor: &NdArrayTensor) -> Cow<'_, [u32]> {
    match tensor {
        NdArrayTensor::U32(storage) => {
            let view = storage.view();
            match view.to_slice() {
                Some(values) => Cow::Borrowed(values),
                None => Cow::Owned(view.iter().copied().collect()),
            }
        }
        other => panic!("packed codes are u32, got {:?}", other.dtype()),
    }
}

fn scale(scale: &Scale<NdArray>) -> f32 {
    match scale {
        Scale::One => 1.0,
        Scale::Device(tensor) => f32_values(tensor)[0],
    }
}

fn owned_states(states: &[StateBuffer<NdArray>], rule: StepRule, family: MapFamily) -> Vec<OwnedState> {
    states
        .iter()
        .zip(rule.state_maps(family))
        .map(|(state, map)| match state {
            StateBuffer::Blockwise(packed) => StateSlice::Blockwise {
                words: u32_values(&packed.codes).into_owned(),
                absmax: f32_values(&packed.absmax).into_owned(),
                map,
            },
            StateBuffer::Full(values) => StateSlice::Full(f32_values(values).into_owned()),
            StateBuffer::Absent => unreachable!("absent slots are filtered out"),
        })
        .collect()
}

impl BlockwiseOps for NdArray {
    fn blockwise_quantize(input: FloatTensor<Self>, map: MapKind, block_size: usize) -> PackedBlocks<Self> {
        let (codes, absmax) = cpu::quantize(&f32_values(&input), map, block_size);
        PackedBlocks { codes: flat(codes), absmax: flat(absmax) }
    }

    fn blockwise_encode(
        input: FloatTensor<Self>,
        absmax: FloatTensor<Self>,
        map: MapKind,
        block_size: usize,
    ) -> PackedBlocks<Self> {
        let codes = cpu::encode(&f32_values(&input), &f32_values(&absmax), map, block_size);
        PackedBlocks { codes: flat(codes), absmax }
    }

    fn blockwise_dequantize(
        codes: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        output: FloatTensor<Self>,
        map: MapKind,
        block_size: usize,
    ) -> FloatTensor<Self> {
        let mut values = vec![0f32; output.shape().num_elements()];
        cpu::dequantize(&u32_values(&codes), &f32_values(&absmax), map, block_size, &mut values);
        flat(values)
    }

    fn fused_step(
        tensors: StepTensors<Self>,
        grad: FloatTensor<Self>,
        grad_scale: Scale<Self>,
        update_scale: Scale<Self>,
        rule: StepRule,
        family: MapFamily,
        scalars: StepScalars,
        block_size: usize,
    ) -> StepTensors<Self> {
        let (param, skipped, states) = tensors.into_parts();
        let mut param = f32_values(&param).into_owned();
        let mut states = owned_states(&states, rule, family);
        let mut views: Vec<_> = states.iter_mut().map(StateSlice::borrow_mut).collect();
        let newly_skipped = cpu::fused_step(
            rule,
            &scalars,
            scale(&grad_scale),
            scale(&update_scale),
            &mut param,
            &f32_values(&grad),
            &mut views,
            block_size,
        );
        drop(views);
        let count = u32_values(&skipped).as_ref().try_into().expect("a two-word skip counter");
        let states = states
            .into_iter()
            .map(|state| match state {
                StateSlice::Blockwise { words, absmax, .. } => {
                    StateBuffer::Blockwise(PackedBlocks { codes: flat(words), absmax: flat(absmax) })
                }
                StateSlice::Full(values) => StateBuffer::Full(flat(values)),
            })
            .collect();
        StepTensors::new(flat(param), flat(rule::add_to_count(count, newly_skipped).to_vec()), states)
    }

    fn update_norms(
        tensors: StepTensors<Self>,
        grad: FloatTensor<Self>,
        grad_scale: Scale<Self>,
        rule: StepRule,
        family: MapFamily,
        scalars: StepScalars,
        block_size: usize,
    ) -> FloatTensor<Self> {
        let (param, _, states) = tensors.into_parts();
        let states = owned_states(&states, rule, family);
        let views: Vec<StateRef<'_>> = states.iter().map(StateSlice::borrow).collect();
        flat(cpu::update_norms(
            rule,
            &scalars,
            scale(&grad_scale),
            &f32_values(&param),
            &f32_values(&grad),
            &views,
            block_size,
        ))
    }
}
