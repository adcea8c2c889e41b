//! [`BlockwiseOps`] for every CubeCL runtime: tensors in, kernels (`kernels.rs`) launched
//! through `launch.rs`, tensors out.

mod kernels;
mod launch;

use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::tensor::DType;
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;

use crate::ext::{BlockwiseOps, PackedBlocks, Scale, StateBuffer, StepTensors};
use crate::map::{MapFamily, MapKind};
use crate::step::{StepRule, StepScalars};
use kernels::SlotKind;
use launch::{SlotBinding, StepArgs, writable};

/// The kernels take `f32` floats.
fn f32_tensor(tensor: CubeTensor, what: &str) -> CubeTensor {
    assert_eq!(tensor.dtype, DType::F32, "blockwise ops take f32 {what}, got {:?}", tensor.dtype);
    tensor
}

/// The step's tensors as the kernels bind them; `prepare` makes each buffer contiguous (and
/// writable, for the step).
fn step_args(
    tensors: StepTensors<CubeBackend>,
    grad: CubeTensor,
    grad_scale: Scale<CubeBackend>,
    update_scale: Scale<CubeBackend>,
    rule: StepRule,
    family: MapFamily,
    prepare: fn(CubeTensor) -> CubeTensor,
) -> StepArgs {
    let (param, skipped, states) = tensors.into_parts();
    let maps = rule.state_maps(family);
    assert_eq!(states.len(), maps.len(), "{rule:?} takes {} states", maps.len());
    let mut slots = states.into_iter().zip(maps).map(|(state, map)| match state {
        StateBuffer::Blockwise(packed) => SlotBinding {
            kind: SlotKind::Blockwise,
            words: Some(prepare(packed.codes)),
            floats: Some(prepare(f32_tensor(packed.absmax, "absmax"))),
            map,
        },
        StateBuffer::Full(values) => SlotBinding {
            kind: SlotKind::Full,
            words: None,
            floats: Some(prepare(f32_tensor(values, "states"))),
            map,
        },
        StateBuffer::Absent => unreachable!("absent slots are not listed"),
    });
    let mut next = || {
        slots.next().unwrap_or(SlotBinding { kind: SlotKind::Absent, words: None, floats: None, map: MapKind::DynamicSigned })
    };
    let slots = [next(), next(), next()];
    let device_scale = |scale: Scale<CubeBackend>| match scale {
        Scale::One => None,
        Scale::Device(tensor) => Some(into_contiguous(f32_tensor(tensor, "scales"))),
    };
    StepArgs {
        param: prepare(f32_tensor(param, "parameters")),
        grad: into_contiguous(f32_tensor(grad, "gradients")),
        skipped: prepare(skipped),
        slots,
        grad_scale: device_scale(grad_scale),
        update_scale: device_scale(update_scale),
    }
}

impl BlockwiseOps for CubeBackend {
    fn blockwise_quantize(input: FloatTensor<Self>, map: MapKind, block_size: usize) -> PackedBlocks<Self> {
        let input = into_contiguous(f32_tensor(input, "inputs"));
        let absmax = launch::empty_f32(&input, input.meta.num_elements().div_ceil(block_size));
        let codes = launch::quantize(&input, &absmax, map, block_size, false);
        PackedBlocks { codes, absmax }
    }

    fn blockwise_encode(
        input: FloatTensor<Self>,
        absmax: FloatTensor<Self>,
        map: MapKind,
        block_size: usize,
    ) -> PackedBlocks<Self> {
        let input = into_contiguous(f32_tensor(input, "inputs"));
        let absmax = into_contiguous(f32_tensor(absmax, "absmax"));
        assert_eq!(absmax.meta.num_elements(), input.meta.num_elements().div_ceil(block_size), "one absmax per block");
        let codes = launch::quantize(&input, &absmax, map, block_size, true);
        PackedBlocks { codes, absmax }
    }

    fn blockwise_dequantize(
        codes: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        map: MapKind,
        block_size: usize,
        len: usize,
    ) -> FloatTensor<Self> {
        let codes = into_contiguous(codes);
        let absmax = into_contiguous(f32_tensor(absmax, "absmax"));
        launch::dequantize(&codes, &absmax, map, block_size, len)
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
        let args = step_args(tensors, grad, grad_scale, update_scale, rule, family, writable);
        launch::fused_step(&args, rule, &scalars, block_size);
        let states = args
            .slots
            .into_iter()
            .filter_map(|slot| match slot.kind {
                SlotKind::Blockwise => Some(StateBuffer::Blockwise(PackedBlocks {
                    codes: slot.words.expect("block-wise slots have codes"),
                    absmax: slot.floats.expect("block-wise slots have absmax"),
                })),
                SlotKind::Full => Some(StateBuffer::Full(slot.floats.expect("f32 slots have values"))),
                SlotKind::Absent => None,
            })
            .collect();
        StepTensors::new(args.param, args.skipped, states)
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
        let args = step_args(tensors, grad, grad_scale, Scale::One, rule, family, into_contiguous);
        launch::update_norms(&args, rule, &scalars, block_size)
    }
}
