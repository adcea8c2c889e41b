//! [`BlockwiseOps`] for Flex: the CPU twin on Flex's own buffers, in place when unshared.

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::tensor::{DType, TensorData};

use crate::copies;
use crate::cpu::{self, StateMut, StateRef, StateSlice};
use crate::ext::{BlockwiseOps, PackedBlocks, Scale, StateBuffer, StepTensors};
use crate::map::{MapFamily, MapKind};
use crate::rule;
use crate::step::{StepRule, StepScalars};

/// Whether the kernels can take `tensor`'s elements as one slice of its buffer.
fn is_contiguous(tensor: &FlexTensor) -> bool {
    tensor.is_contiguous() && tensor.layout().contiguous_offsets().is_some()
}

/// A contiguous Flex tensor (copied only when strided).
fn contiguous(tensor: FlexTensor) -> FlexTensor {
    if is_contiguous(&tensor) {
        tensor
    } else {
        tensor.to_contiguous()
    }
}

/// The elements of a contiguous tensor, mutably: in place when the buffer is unshared, copied
/// first otherwise (and counted by [`shared_buffer_copies`](crate::shared_buffer_copies)).
fn elements_mut<E: burn::tensor::Element + bytemuck::Pod>(tensor: &mut FlexTensor) -> &mut [E] {
    if !tensor.is_unique() {
        copies::count_shared_copy();
    }
    let (start, end) = tensor.layout().contiguous_offsets().expect("contiguous");
    &mut tensor.storage_mut::<E>()[start..end]
}

/// A contiguous `f32` tensor of `output`'s shape whose old values may be discarded: `output`
/// itself when its buffer is unshared and contiguous, fresh memory otherwise (never a copy of
/// values about to be overwritten).
fn overwritable(mut output: FlexTensor) -> FlexTensor {
    if is_contiguous(&output) && output.try_storage_mut::<f32>().is_some() {
        output
    } else {
        FlexTensor::empty(output.layout().shape().clone(), DType::F32)
    }
}

fn elements<E: burn::tensor::Element + bytemuck::Pod>(tensor: &FlexTensor) -> &[E] {
    tensor.as_slice::<E>().expect("a contiguous tensor of the kernel's element type")
}

fn scale(scale: Scale<Flex>) -> f32 {
    match scale {
        Scale::One => 1.0,
        Scale::Device(tensor) => elements::<f32>(&contiguous(tensor))[0],
    }
}

fn flat<E: burn::tensor::Element>(values: Vec<E>) -> FlexTensor {
    let len = values.len();
    FlexTensor::from_data(TensorData::new(values, [len]))
}

/// The present states with contiguous buffers, in slot order.
fn contiguous_states(tensors: StepTensors<Flex>) -> (FlexTensor, FlexTensor, Vec<StateBuffer<Flex>>) {
    let (param, skipped, states) = tensors.into_parts();
    let states = states
        .into_iter()
        .map(|state| match state {
            StateBuffer::Blockwise(packed) => StateBuffer::Blockwise(PackedBlocks {
                codes: contiguous(packed.codes),
                absmax: contiguous(packed.absmax),
            }),
            StateBuffer::Full(values) => StateBuffer::Full(contiguous(values)),
            StateBuffer::Absent => StateBuffer::Absent,
        })
        .collect();
    (contiguous(param), contiguous(skipped), states)
}

fn state_mut(state: &mut StateBuffer<Flex>, map: MapKind) -> StateMut<'_> {
    match state {
        StateBuffer::Blockwise(packed) => StateSlice::Blockwise {
            words: elements_mut(&mut packed.codes),
            absmax: elements_mut(&mut packed.absmax),
            map,
        },
        StateBuffer::Full(values) => StateSlice::Full(elements_mut(values)),
        StateBuffer::Absent => unreachable!("absent slots are filtered out"),
    }
}

fn state_ref(state: &StateBuffer<Flex>, map: MapKind) -> StateRef<'_> {
    match state {
        StateBuffer::Blockwise(packed) => StateSlice::Blockwise {
            words: elements(&packed.codes),
            absmax: elements(&packed.absmax),
            map,
        },
        StateBuffer::Full(values) => StateSlice::Full(elements(values)),
        StateBuffer::Absent => unreachable!("absent slots are filtered out"),
    }
}

impl BlockwiseOps for Flex {
    fn blockwise_quantize(input: FloatTensor<Self>, map: MapKind, block_size: usize) -> PackedBlocks<Self> {
        let input = contiguous(input);
        let (codes, absmax) = cpu::quantize(elements(&input), map, block_size);
        PackedBlocks { codes: flat(codes), absmax: flat(absmax) }
    }

    fn blockwise_encode(
        input: FloatTensor<Self>,
        absmax: FloatTensor<Self>,
        map: MapKind,
        block_size: usize,
    ) -> PackedBlocks<Self> {
        let input = contiguous(input);
        let absmax = contiguous(absmax);
        let codes = flat(cpu::encode(elements(&input), elements(&absmax), map, block_size));
        PackedBlocks { codes, absmax }
    }

    fn blockwise_dequantize(
        codes: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        output: FloatTensor<Self>,
        map: MapKind,
        block_size: usize,
    ) -> FloatTensor<Self> {
        let codes = contiguous(codes);
        let absmax = contiguous(absmax);
        let mut output = overwritable(output);
        cpu::dequantize(elements(&codes), elements(&absmax), map, block_size, elements_mut(&mut output));
        output
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
        let (mut param, mut skipped, mut states) = contiguous_states(tensors);
        let grad = contiguous(grad);
        let mut views: Vec<StateMut<'_>> = states
            .iter_mut()
            .zip(rule.state_maps(family))
            .map(|(state, map)| state_mut(state, map))
            .collect();
        let newly_skipped = cpu::fused_step(
            rule,
            &scalars,
            scale(grad_scale),
            scale(update_scale),
            elements_mut(&mut param),
            elements(&grad),
            &mut views,
            block_size,
        );
        drop(views);
        let count: &mut [u32; rule::COUNT_WORDS] =
            elements_mut::<u32>(&mut skipped).try_into().expect("a two-word skip counter");
        *count = rule::add_to_count(*count, newly_skipped);
        StepTensors::new(param, skipped, states)
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
        let (param, _, states) = contiguous_states(tensors);
        let grad = contiguous(grad);
        let views: Vec<StateRef<'_>> = states
            .iter()
            .zip(rule.state_maps(family))
            .map(|(state, map)| state_ref(state, map))
            .collect();
        flat(cpu::update_norms(
            rule,
            &scalars,
            scale(grad_scale),
            elements(&param),
            elements(&grad),
            &views,
            block_size,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dequantize_writes_into_an_unshared_output_and_spares_a_shared_one() {
        let input: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) / 77.0).collect();
        let map = MapKind::DynamicSigned;
        let packed = Flex::blockwise_quantize(flat(input), map, 256);
        let decode = |output| Flex::blockwise_dequantize(packed.codes.clone(), packed.absmax.clone(), output, map, 256);

        let output = flat(vec![7.0f32; 1000]);
        let address = elements::<f32>(&output).as_ptr();
        let decoded = decode(output);
        assert_eq!(elements::<f32>(&decoded).as_ptr(), address, "an unshared output is written in place");

        let shared = flat(vec![7.0f32; 1000]);
        let fresh = decode(shared.clone());
        assert_ne!(elements::<f32>(&fresh).as_ptr(), elements::<f32>(&shared).as_ptr());
        assert!(elements::<f32>(&shared).iter().all(|&v| v == 7.0), "a shared output keeps its values");
        assert_eq!(elements::<f32>(&fresh), elements::<f32>(&decoded));
    }
}
