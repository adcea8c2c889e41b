//! [`BlockwiseOps`] for NdArray: the CPU twin on copies of NdArray's buffers (it shares them
//! behind views it does not expose mutably), returning fresh tensors.

// Burn deprecates its NdArray backend in favour of Flex; burn-8bit still supports it.
#![allow(deprecated)]

use std::borrow::Cow;

use burn::backend::ndarray::NdArrayTensor;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{NdArray, TensorMetadata};
use burn::tensor::TensorData;

use crate::cpu::{self, Rank1Scales, StateRef, StateSlice};
use crate::ext::{BlockwiseOps, PackedBlocks, Rank1Codes, Rank1Norms, Scale, StateBuffer, StepTensors};
use crate::map::{MapFamily, MapKind};
use crate::rule;
use crate::step::{StepRule, StepScalars};

/// A state copied out of NdArray's buffers (rank-1 norms borrowed from [`NormValues`]).
type OwnedState<'n> = StateSlice<'n, Vec<u32>, Vec<f32>>;

/// The values of a rank-1 state's norms and next norms, borrowed from NdArray's buffers where
/// they are standard-layout.
type NormValues<'a> = [Cow<'a, [f32]>; 4];

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

/// Each state's rank-1 norm values (`None` for other states).
fn norm_values(states: &[StateBuffer<NdArray>]) -> Vec<Option<NormValues<'_>>> {
    states
        .iter()
        .map(|state| match state {
            StateBuffer::Rank1 { state, next } => Some([
                f32_values(&state.norms.rows),
                f32_values(&state.norms.cols),
                f32_values(&next.rows),
                f32_values(&next.cols),
            ]),
            _ => None,
        })
        .collect()
}

fn owned_states<'n>(
    states: &[StateBuffer<NdArray>],
    norms: &'n [Option<NormValues<'_>>],
    rule: StepRule,
    family: MapFamily,
) -> Vec<OwnedState<'n>> {
    states
        .iter()
        .zip(norms)
        .zip(rule.state_maps(family))
        .map(|((state, norms), map)| match state {
            StateBuffer::Blockwise(packed) => StateSlice::Blockwise {
                words: u32_values(&packed.codes).into_owned(),
                absmax: f32_values(&packed.absmax).into_owned(),
                map,
            },
            StateBuffer::Rank1 { state, .. } => {
                let [rows, cols, next_rows, next_cols] = norms.as_ref().expect("the norms of a rank-1 state");
                StateSlice::Rank1 {
                    words: u32_values(&state.codes).into_owned(),
                    norms: Rank1Scales { rows, cols, next_rows, next_cols },
                    offset: 0,
                    map,
                }
            }
            StateBuffer::Full(values) => StateSlice::Full(f32_values(values).into_owned()),
            StateBuffer::Absent => unreachable!("absent slots are filtered out"),
        })
        .collect()
}

fn clone_norms(norms: &Rank1Norms<NdArray>) -> Rank1Norms<NdArray> {
    Rank1Norms { rows: norms.rows.clone(), cols: norms.cols.clone() }
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
        let (param, skipped, buffers) = tensors.into_parts();
        let mut param = f32_values(&param).into_owned();
        let norms = norm_values(&buffers);
        let mut states = owned_states(&buffers, &norms, rule, family);
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
            .zip(&buffers)
            .map(|(state, given)| match (state, given) {
                (StateSlice::Blockwise { words, absmax, .. }, _) => {
                    StateBuffer::Blockwise(PackedBlocks { codes: flat(words), absmax: flat(absmax) })
                }
                (StateSlice::Rank1 { words, .. }, StateBuffer::Rank1 { state, next }) => StateBuffer::Rank1 {
                    state: Rank1Codes { codes: flat(words), norms: clone_norms(&state.norms) },
                    next: clone_norms(next),
                },
                (StateSlice::Full(values), _) => StateBuffer::Full(flat(values)),
                (StateSlice::Rank1 { .. }, _) => unreachable!("a rank-1 view of a rank-1 state"),
            })
            .map(StateBuffer::after_step)
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
        let (param, _, buffers) = tensors.into_parts();
        let norms = norm_values(&buffers);
        let states = owned_states(&buffers, &norms, rule, family);
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

    fn rank1_norms(
        tensors: StepTensors<Self>,
        grad: FloatTensor<Self>,
        grad_scale: Scale<Self>,
        update_scale: Scale<Self>,
        rule: StepRule,
        family: MapFamily,
        scalars: StepScalars,
        block_size: usize,
    ) -> Rank1Norms<Self> {
        let (param, _, buffers) = tensors.into_parts();
        let norms = norm_values(&buffers);
        let states = owned_states(&buffers, &norms, rule, family);
        let views: Vec<StateRef<'_>> = states.iter().map(StateSlice::borrow).collect();
        let (rows, cols) = cpu::rank1_norms(
            rule,
            &scalars,
            scale(&grad_scale),
            scale(&update_scale),
            &f32_values(&param),
            &f32_values(&grad),
            &views,
            block_size,
        );
        Rank1Norms { rows: flat(rows), cols: flat(cols) }
    }
}
