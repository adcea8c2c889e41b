//! [`BlockwiseOps`] for Flex: the CPU twin on Flex's own buffers, in place when unshared.

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::tensor::{DType, Element, TensorData, bf16, f16};
use bytemuck::Pod;

use crate::copies;
use crate::cpu::{self, ParamElement, Rank1Scales, StateMut, StateRef, StateSlice};
use crate::ext::{BlockwiseOps, PackedBlocks, ParamDType, Rank1Codes, Rank1Norms, Scale, StateBuffer, StepTensors};
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
fn elements_mut<E: Element + Pod>(tensor: &mut FlexTensor) -> &mut [E] {
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

fn elements<E: Element + Pod>(tensor: &FlexTensor) -> &[E] {
    tensor.as_slice::<E>().expect("a contiguous tensor of the kernel's element type")
}

fn scale(scale: Scale<Flex>) -> f32 {
    match scale {
        Scale::One => 1.0,
        Scale::Device(tensor) => elements::<f32>(&contiguous(tensor))[0],
    }
}

fn flat<E: Element>(values: Vec<E>) -> FlexTensor {
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
            StateBuffer::Rank1 { state, next } => StateBuffer::Rank1 {
                state: Rank1Codes { codes: contiguous(state.codes), norms: contiguous_norms(state.norms) },
                next: contiguous_norms(next),
            },
            StateBuffer::Full(values) => StateBuffer::Full(contiguous(values)),
            StateBuffer::Absent => StateBuffer::Absent,
        })
        .collect();
    (contiguous(param), contiguous(skipped), states)
}

fn contiguous_norms(norms: Rank1Norms<Flex>) -> Rank1Norms<Flex> {
    Rank1Norms { rows: contiguous(norms.rows), cols: contiguous(norms.cols) }
}

/// The scales of a rank-1 state: its norms, and the next ones.
fn rank1_scales<'a>(norms: &'a Rank1Norms<Flex>, next: &'a Rank1Norms<Flex>) -> Rank1Scales<'a> {
    Rank1Scales {
        rows: elements(&norms.rows),
        cols: elements(&norms.cols),
        next_rows: elements(&next.rows),
        next_cols: elements(&next.cols),
    }
}

fn state_mut(state: &mut StateBuffer<Flex>, map: MapKind) -> StateMut<'_> {
    match state {
        StateBuffer::Blockwise(packed) => StateSlice::Blockwise {
            words: elements_mut(&mut packed.codes),
            absmax: elements_mut(&mut packed.absmax),
            map,
        },
        StateBuffer::Rank1 { state, next } => StateSlice::Rank1 {
            words: elements_mut(&mut state.codes),
            norms: rank1_scales(&state.norms, next),
            offset: 0,
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
        StateBuffer::Rank1 { state, .. } => StateSlice::Rank1 {
            words: elements(&state.codes),
            norms: rank1_scales(&state.norms, &state.norms),
            offset: 0,
            map,
        },
        StateBuffer::Full(values) => StateSlice::Full(elements(values)),
        StateBuffer::Absent => unreachable!("absent slots are filtered out"),
    }
}

/// A pass that only reads (the update norms, the rank-1 norms): `pass` over the contiguous
/// parameter, gradient and state views, told the parameters' element type.
fn read_pass<R>(
    tensors: StepTensors<Flex>,
    grad: FlexTensor,
    rule: StepRule,
    family: MapFamily,
    pass: impl FnOnce(ParamDType, &FlexTensor, &FlexTensor, &[StateRef<'_>]) -> R,
) -> R {
    let (param, _, states) = contiguous_states(tensors);
    let grad = contiguous(grad);
    let views: Vec<StateRef<'_>> =
        states.iter().zip(rule.state_maps(family)).map(|(state, map)| state_ref(state, map)).collect();
    pass(ParamDType::of_step(param.dtype(), grad.dtype()), &param, &grad, &views)
}

/// One fused step's values besides its buffers, applied to parameters and gradients of the
/// parameter's element type.
struct StepRun<'a> {
    rule: StepRule,
    scalars: &'a StepScalars,
    grad_scale: f32,
    update_scale: f32,
    block_size: usize,
}

impl StepRun<'_> {
    /// The step over parameter and gradient elements of type `P`; the number of skipped elements.
    fn step<P: ParamElement + Element + Pod>(&self, param: &mut FlexTensor, grad: &FlexTensor, states: &mut [StateMut<'_>]) -> u64 {
        let (param, grad) = (elements_mut::<P>(param), elements::<P>(grad));
        cpu::fused_step(self.rule, self.scalars, self.grad_scale, self.update_scale, param, grad, states, self.block_size)
    }

    /// The update-norm pass over parameter and gradient elements of type `P`.
    fn norms<P: ParamElement + Element + Pod>(&self, param: &FlexTensor, grad: &FlexTensor, states: &[StateRef<'_>]) -> Vec<f32> {
        let (param, grad) = (elements::<P>(param), elements::<P>(grad));
        cpu::update_norms(self.rule, self.scalars, self.grad_scale, param, grad, states, self.block_size)
    }

    /// The rank-1 norm pass over parameter and gradient elements of type `P`.
    fn rank1<P: ParamElement + Element + Pod>(&self, param: &FlexTensor, grad: &FlexTensor, states: &[StateRef<'_>]) -> (Vec<f32>, Vec<f32>) {
        let (param, grad) = (elements::<P>(param), elements::<P>(grad));
        cpu::rank1_norms(self.rule, self.scalars, self.grad_scale, self.update_scale, param, grad, states, self.block_size)
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
        let run = StepRun {
            rule,
            scalars: &scalars,
            grad_scale: scale(grad_scale),
            update_scale: scale(update_scale),
            block_size,
        };
        let newly_skipped = match ParamDType::of_step(param.dtype(), grad.dtype()) {
            ParamDType::F32 => run.step::<f32>(&mut param, &grad, &mut views),
            ParamDType::F16 => run.step::<f16>(&mut param, &grad, &mut views),
            ParamDType::BF16 => run.step::<bf16>(&mut param, &grad, &mut views),
        };
        drop(views);
        let count: &mut [u32; rule::COUNT_WORDS] =
            elements_mut::<u32>(&mut skipped).try_into().expect("a two-word skip counter");
        *count = rule::add_to_count(*count, newly_skipped);
        StepTensors::new(param, skipped, states.into_iter().map(StateBuffer::after_step).collect())
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
        let run = StepRun { rule, scalars: &scalars, grad_scale: scale(grad_scale), update_scale: 1.0, block_size };
        read_pass(tensors, grad, rule, family, |dtype, param, grad, views| {
            flat(match dtype {
                ParamDType::F32 => run.norms::<f32>(param, grad, views),
                ParamDType::F16 => run.norms::<f16>(param, grad, views),
                ParamDType::BF16 => run.norms::<bf16>(param, grad, views),
            })
        })
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
        let update_scale = scale(update_scale);
        let run = StepRun { rule, scalars: &scalars, grad_scale: scale(grad_scale), update_scale, block_size };
        let (rows, cols) = read_pass(tensors, grad, rule, family, |dtype, param, grad, views| match dtype {
            ParamDType::F32 => run.rank1::<f32>(param, grad, views),
            ParamDType::F16 => run.rank1::<f16>(param, grad, views),
            ParamDType::BF16 => run.rank1::<bf16>(param, grad, views),
        });
        Rank1Norms { rows: flat(rows), cols: flat(cols) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One momentum step of `param` (any float type) over a gradient of its type, with an `f32`
    /// velocity of ones.
    fn momentum_step(param: FlexTensor, grad: FlexTensor) -> FlexTensor {
        let len = param.layout().shape().num_elements();
        let states = vec![StateBuffer::Full(flat(vec![1.0f32; len]))];
        let tensors = StepTensors::new(param, flat(vec![0u32; 2]), states);
        let scalars = StepScalars { lr: 0.1, beta1: 0.9, beta3: 1.0, ..StepScalars::default() };
        let rule = StepRule::Momentum { nesterov: false };
        let out = Flex::fused_step(tensors, grad, Scale::One, Scale::One, rule, MapFamily::Dynamic, scalars, 256);
        out.into_parts().0
    }

    /// A step over `H` parameters and gradients writes the parameter's buffer, as `H`, with the
    /// bits of the `f32` step of the widened values rounded back.
    fn steps_in_place_as_f32_between_casts<H: ParamElement + Element + Pod + PartialEq + std::fmt::Debug>(dtype: DType) {
        let len = 1000;
        let param: Vec<H> = (0..len).map(|i| H::from_f32((i as f32 - 500.0) / 7.0)).collect();
        let grad: Vec<H> = (0..len).map(|i| H::from_f32((i % 13) as f32 / 3.0 - 2.0)).collect();
        let widened = |values: &[H]| values.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
        let reference = momentum_step(flat(widened(&param)), flat(widened(&grad)));
        let rounded: Vec<H> = elements::<f32>(&reference).iter().map(|&x| H::from_f32(x)).collect();

        let param = flat(param);
        let address = elements::<H>(&param).as_ptr();
        let stepped = momentum_step(param, flat(grad));
        assert_eq!(stepped.dtype(), dtype);
        assert_eq!(elements::<H>(&stepped).as_ptr(), address, "an unshared {dtype:?} parameter is written in place");
        assert_eq!(elements::<H>(&stepped), rounded.as_slice(), "{dtype:?}: the f32 step between casts");
    }

    #[test]
    fn half_precision_parameters_step_in_place_in_their_own_type() {
        steps_in_place_as_f32_between_casts::<f16>(DType::F16);
        steps_in_place_as_f32_between_casts::<bf16>(DType::BF16);
    }

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
