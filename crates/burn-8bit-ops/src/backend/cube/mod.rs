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
use launch::{SlotBinding, StepArgs, writable};

/// The kernels take `f32` floats.
fn f32_tensor(tensor: CubeTensor, what: &str) -> CubeTensor {
    assert_eq!(tensor.dtype, DType::F32, "blockwise ops take f32 {what}, got {:?}", tensor.dtype);
    tensor
}

/// A state's buffers contiguous (and writable, for the step) through `prepare`.
fn prepared(state: StateBuffer<CubeBackend>, prepare: fn(CubeTensor) -> CubeTensor) -> StateBuffer<CubeBackend> {
    match state {
        StateBuffer::Blockwise(packed) => StateBuffer::Blockwise(PackedBlocks {
            codes: prepare(packed.codes),
            absmax: prepare(f32_tensor(packed.absmax, "absmax")),
        }),
        StateBuffer::Full(values) => StateBuffer::Full(prepare(f32_tensor(values, "states"))),
        StateBuffer::Absent => StateBuffer::Absent,
    }
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
    assert_eq!(states.len(), rule.num_states(), "{rule:?} takes {} states", rule.num_states());
    let mut states = states.into_iter();
    // Slots past the rule's states are absent; their map is never read.
    let mut maps = rule.state_maps(family).into_iter();
    let slots = [(); 3].map(|()| SlotBinding {
        state: prepared(states.next().unwrap_or(StateBuffer::Absent), prepare),
        map: maps.next().unwrap_or(MapKind::DynamicSigned),
    });
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
        output: FloatTensor<Self>,
        map: MapKind,
        block_size: usize,
    ) -> FloatTensor<Self> {
        let codes = into_contiguous(codes);
        let absmax = into_contiguous(f32_tensor(absmax, "absmax"));
        let output = launch::overwritable(f32_tensor(output, "outputs"));
        launch::dequantize(&codes, &absmax, &output, map, block_size);
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
        let args = step_args(tensors, grad, grad_scale, update_scale, rule, family, writable);
        launch::fused_step(&args, rule, &scalars, block_size);
        let [state1, state2, state3] = args.slots.map(|slot| slot.state);
        StepTensors { param: args.param, skipped: args.skipped, state1, state2, state3 }
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
