//! [`BlockwiseOps`] for every CubeCL runtime: tensors in, kernels (`kernels.rs`) launched
//! through `launch.rs`, tensors out.

mod kernels;
mod launch;

use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::tensor::DType;
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;

use crate::ext::{BlockwiseOps, PackedBlocks, ParamDType, Rank1Codes, Rank1Norms, Scale, StateBuffer, StepTensors};
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
        StateBuffer::Rank1 { state, next } => {
            let norms = |norms: Rank1Norms<CubeBackend>| Rank1Norms {
                rows: into_contiguous(f32_tensor(norms.rows, "norms")),
                cols: into_contiguous(f32_tensor(norms.cols, "norms")),
            };
            StateBuffer::Rank1 {
                state: Rank1Codes { codes: prepare(state.codes), norms: norms(state.norms) },
                next: norms(next),
            }
        }
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
        param_type: ParamDType::of_step(param.dtype, grad.dtype),
        param: prepare(param),
        grad: into_contiguous(grad),
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
        let [state1, state2, state3] = args.slots.map(|slot| slot.state.after_step());
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
        let args = step_args(tensors, grad, grad_scale, update_scale, rule, family, into_contiguous);
        let (rows, cols) = launch::rank1_norms(&args, rule, &scalars, block_size);
        Rank1Norms { rows, cols }
    }
}

#[cfg(all(test, feature = "wgpu"))]
mod tests {
    use burn::tensor::{DType, Device, DeviceKind, Distribution, FloatDType, Tensor, TensorData};

    use std::sync::atomic::Ordering;

    use super::launch::tests::FORCED_MAX_UNITS;
    use crate::{
        BlockQuantized, BlockSize, BlockwiseOps, COUNT_WORDS, MapFamily, MapKind, PackedBlocks, Rank1Codes, Rank1Norms,
        Rank1Quantized, Scale, StateBuffer, StepRule, StepScalars, StepTensors,
    };
    use burn::backend::Dispatch;

    const ADAM: StepRule = StepRule::Adam { amsgrad: false, cautious: false };

    /// The wgpu device, or `None` (a visible skip) without an adapter unless CI requires one.
    fn wgpu_device() -> Option<Device> {
        let device = Device::wgpu(DeviceKind::DefaultDevice);
        let probe = device.clone();
        if std::panic::catch_unwind(move || Tensor::<1>::from_floats([1.0], &probe).into_data()).is_ok() {
            return Some(device);
        }
        if std::env::var("BURN8BIT_REQUIRE_WGPU").is_ok_and(|value| value == "1") {
            panic!("BURN8BIT_REQUIRE_WGPU=1 but no wgpu adapter is available");
        }
        eprintln!("SKIPPED: wgpu: no adapter available");
        None
    }

    /// `f`'s result with at most `max_units` units per cube (0: the device's limit); `f` reads
    /// its results back, so every kernel it queued has run before the limit is lifted.
    fn with_max_units<R>(max_units: u32, f: impl FnOnce() -> R) -> R {
        FORCED_MAX_UNITS.store(max_units, Ordering::SeqCst);
        let result = f();
        FORCED_MAX_UNITS.store(0, Ordering::SeqCst);
        result
    }

    /// Codes, absmax and decoded values of `x` in `map`.
    fn quantized(x: &Tensor<1>, map: MapKind, block_size: BlockSize) -> (TensorData, TensorData, TensorData) {
        let q = BlockQuantized::quantize(x.clone(), map, block_size);
        let decoded = q.dequantize::<1>().expect("same shape").into_data();
        (q.codes().to_data(), q.absmax().to_data(), decoded)
    }

    /// Parameter, codes and absmax of both states (maps of `family`) after three Adam steps from
    /// `param`, its new values rounded stochastically with `rounding_seed` when given.
    fn adam_steps(
        param: &TensorData,
        grad: &TensorData,
        block_size: BlockSize,
        family: MapFamily,
        rounding_seed: Option<u64>,
        device: &Device,
    ) -> Vec<TensorData> {
        let len = param.shape().num_elements();
        let dtype = FloatDType::from(param.dtype());
        let mut param = Tensor::<1>::from_data(param.clone(), device).cast(dtype);
        let grad = Tensor::<1>::from_data(grad.clone(), device).cast(dtype);
        let mut skipped = Tensor::<1, burn::tensor::Int>::from_data(TensorData::new(vec![0u32; COUNT_WORDS], [COUNT_WORDS]), (device, DType::U32));
        let zeros = |map| BlockQuantized::zeros([len].into(), map, block_size, device).into_parts();
        let mut states: Vec<_> =
            ADAM.state_maps(family).into_iter().map(zeros).collect();
        for step in 1..=3u32 {
            let scalars = StepScalars {
                lr: 1e-3,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                first_step: u32::from(step == 1),
                stochastic_rounding: u32::from(rounding_seed.is_some()),
                rounding_key: rounding_seed.map_or(0, |seed| crate::rounding_key(seed, u64::from(step))),
                ..StepScalars::default()
            };
            let buffers = states
                .iter()
                .map(|(codes, absmax)| StateBuffer::Blockwise(PackedBlocks { codes: codes.clone().into_dispatch(), absmax: absmax.clone().into_dispatch() }))
                .collect();
            let out = Dispatch::fused_step(
                StepTensors::new(param.into_dispatch(), skipped.into_dispatch(), buffers),
                grad.clone().into_dispatch(),
                Scale::One,
                Scale::One,
                ADAM,
                family,
                scalars,
                block_size.get(),
            );
            let (new_param, new_skipped, buffers) = out.into_parts();
            param = Tensor::from_dispatch(new_param);
            skipped = Tensor::from_dispatch(new_skipped);
            states = buffers
                .into_iter()
                .map(|buffer| match buffer {
                    StateBuffer::Blockwise(packed) => (Tensor::from_dispatch(packed.codes), Tensor::from_dispatch(packed.absmax)),
                    _ => unreachable!("block-wise states stay block-wise"),
                })
                .collect();
        }
        let mut out = vec![param.into_data()];
        for (codes, absmax) in states {
            out.extend([codes.into_data(), absmax.into_data()]);
        }
        out
    }

    #[test]
    fn few_units_per_cube_compute_the_same_bits() {
        let Some(device) = wgpu_device() else { return };
        for block_size in [64, 256, 4096].map(|size| BlockSize::new(size).expect("valid")) {
            let len = 3 * block_size.get() + 5;
            let x = Tensor::<1>::random([len], Distribution::Normal(0.0, 1.0), &device);
            for family in [MapFamily::Dynamic, MapFamily::FourBit] {
                let map = family.kind(true);
                let many = with_max_units(0, || quantized(&x, map, block_size));
                let few = with_max_units(2, || quantized(&x, map, block_size));
                assert_eq!(many, few, "quantize, {map:?}, block {block_size:?}");
                let param = x.to_data();
                let grad = x.clone().mul_scalar(1e-2).flip([0]).to_data();
                let steps = |max| with_max_units(max, || adam_steps(&param, &grad, block_size, family, None, &device));
                assert_eq!(steps(0), steps(2), "Adam step, {family:?}, block {block_size:?}");
            }
        }
    }

    /// Adam over 4-bit states (eight codes per word) on the kernels and on the CPU twin: the same
    /// parameters, codes and absmax, at the smallest, the paper's and the default block size.
    #[cfg(feature = "flex")]
    #[test]
    fn four_bit_states_step_to_the_cpu_twins_bits() {
        let Some(device) = wgpu_device() else { return };
        for block_size in [64, 128, 256].map(|size| BlockSize::new(size).expect("valid")) {
            let len = 2 * 65_536 + 3 * block_size.get() + 5;
            let spread = |offset: f32| -> TensorData {
                TensorData::new((0..len).map(|i| ((i as f32 * 0.618_034 + offset).fract() - 0.5) * 4.0).collect::<Vec<_>>(), [len])
            };
            let (param, grad) = (spread(0.1), spread(0.7));
            let on_kernel = adam_steps(&param, &grad, block_size, MapFamily::FourBit, None, &device);
            let on_cpu = adam_steps(&param, &grad, block_size, MapFamily::FourBit, None, &Device::flex());
            assert_eq!(on_kernel, on_cpu, "block {block_size:?}");
            assert_eq!(on_cpu[1].shape().num_elements(), len.div_ceil(8), "eight codes per word");
        }
    }

    /// The step kernel reads and writes the parameter and gradient in vectors where the length
    /// allows and one element at a time where it does not: either way the CPU twin's bits, for
    /// `f32` and `f16` parameters, 8- and 4-bit codes.
    #[cfg(feature = "flex")]
    #[test]
    fn vector_and_element_parameter_access_step_to_the_cpu_twins_bits() {
        let Some(device) = wgpu_device() else { return };
        let block_size = BlockSize::new(256).expect("valid");
        for len in [4096 + 512, 4096 + 511, 4096 + 510, 4096 + 260] {
            let spread = |offset: f32| -> TensorData {
                TensorData::new((0..len).map(|i| ((i as f32 * 0.618_034 + offset).fract() - 0.5) * 4.0).collect::<Vec<_>>(), [len])
            };
            for dtype in [DType::F32, DType::F16] {
                if !device.supports_dtype(dtype) {
                    eprintln!("SKIPPED: wgpu: no {dtype:?}");
                    continue;
                }
                let (param, grad) = (spread(0.1).convert_dtype(dtype), spread(0.7).convert_dtype(dtype));
                for family in [MapFamily::Dynamic, MapFamily::FourBit] {
                    let on_kernel = adam_steps(&param, &grad, block_size, family, None, &device);
                    let on_cpu = adam_steps(&param, &grad, block_size, family, None, &Device::flex());
                    assert_eq!(on_kernel, on_cpu, "len {len}, {dtype:?}, {family:?}");
                }
            }
        }
    }

    /// Parameter, the first moment's codes and absmax (block-wise) and the second moment's codes
    /// and norms (rank-1, `rows` × `len / rows`) after three 4-bit Adam steps from `param`, each
    /// step the rank-1 norm pass and then the fused step.
    fn adam_rank1_steps(param: &TensorData, grad: &TensorData, rows: usize, block_size: BlockSize, device: &Device) -> Vec<TensorData> {
        let len = param.shape().num_elements();
        let family = MapFamily::FourBit;
        let [signed, unsigned] = [family.kind(true), family.kind(false)];
        let mut param = Tensor::<1>::from_data(param.clone(), device);
        let grad = Tensor::<1>::from_data(grad.clone(), device);
        let mut skipped = Tensor::<1, burn::tensor::Int>::from_data(TensorData::new(vec![0u32; COUNT_WORDS], [COUNT_WORDS]), (device, DType::U32));
        let (mut m_codes, mut m_absmax) = BlockQuantized::zeros([len].into(), signed, block_size, device).into_parts();
        let (mut v_codes, mut v_rows, mut v_cols) =
            Rank1Quantized::zeros([rows, len / rows].into(), unsigned, device).expect("a matrix").into_parts();
        for step in 1..=3u32 {
            let scalars =
                StepScalars { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, first_step: u32::from(step == 1), ..StepScalars::default() };
            let tensors = |next: Rank1Norms<Dispatch>| {
                let m = StateBuffer::Blockwise(PackedBlocks { codes: m_codes.clone().into_dispatch(), absmax: m_absmax.clone().into_dispatch() });
                let norms = Rank1Norms { rows: v_rows.clone().into_dispatch(), cols: v_cols.clone().into_dispatch() };
                let v = StateBuffer::Rank1 { state: Rank1Codes { codes: v_codes.clone().into_dispatch(), norms }, next };
                StepTensors::new(param.clone().into_dispatch(), skipped.clone().into_dispatch(), vec![m, v])
            };
            let unused = Rank1Norms { rows: v_rows.clone().into_dispatch(), cols: v_cols.clone().into_dispatch() };
            let next = Dispatch::rank1_norms(
                tensors(unused),
                grad.clone().into_dispatch(),
                Scale::One,
                Scale::One,
                ADAM,
                family,
                scalars,
                block_size.get(),
            );
            let out = Dispatch::fused_step(tensors(next), grad.clone().into_dispatch(), Scale::One, Scale::One, ADAM, family, scalars, block_size.get());
            let (new_param, new_skipped, mut buffers) = out.into_parts();
            param = Tensor::from_dispatch(new_param);
            skipped = Tensor::from_dispatch(new_skipped);
            let (StateBuffer::Rank1 { state, .. }, StateBuffer::Blockwise(m)) = (buffers.remove(1), buffers.remove(0)) else {
                unreachable!("the states keep their kinds")
            };
            (m_codes, m_absmax) = (Tensor::from_dispatch(m.codes), Tensor::from_dispatch(m.absmax));
            (v_codes, v_rows, v_cols) =
                (Tensor::from_dispatch(state.codes), Tensor::from_dispatch(state.norms.rows), Tensor::from_dispatch(state.norms.cols));
        }
        [param.into_data(), m_codes.into_data(), m_absmax.into_data(), v_codes.into_data(), v_rows.into_data(), v_cols.into_data()].into()
    }

    /// Adam with a rank-1 second moment on the kernels and on the CPU twin: the same parameters,
    /// codes and norms, for matrices whose rows end inside a block and on its edge, and with two
    /// units per cube.
    #[cfg(feature = "flex")]
    #[test]
    fn rank1_states_step_to_the_cpu_twins_bits() {
        let Some(device) = wgpu_device() else { return };
        let block_size = BlockSize::new(128).expect("valid");
        for (rows, cols) in [(96, 1000), (256, 128), (7, 4099)] {
            let len = rows * cols;
            let spread = |offset: f32, scale: f32| -> TensorData {
                TensorData::new((0..len).map(|i| ((i as f32 * 0.618_034 + offset).fract() - 0.5) * scale * (1.0 + (i % cols) as f32 / 64.0)).collect::<Vec<_>>(), [len])
            };
            let (param, grad) = (spread(0.1, 4.0), spread(0.7, 0.5));
            let on_cpu = adam_rank1_steps(&param, &grad, rows, block_size, &Device::flex());
            let on_kernel = adam_rank1_steps(&param, &grad, rows, block_size, &device);
            assert_eq!(on_kernel, on_cpu, "{rows} × {cols}");
            let few_units = with_max_units(2, || adam_rank1_steps(&param, &grad, rows, block_size, &device));
            assert_eq!(few_units, on_cpu, "{rows} × {cols}, two units per cube");
            assert_ne!(on_cpu[5], TensorData::new(vec![0f32; cols], [cols]), "the column norms were written");
            assert_ne!(on_cpu[3], TensorData::new(vec![0u32; len / 8], [len / 8]), "the codes were written");
        }
    }

    /// Stochastic rounding, whose `bf16` parameters wgpu cannot hold, run by the kernel on `f32`
    /// parameters (forced): from parameters and gradients that are `bf16` values, the kernel's
    /// `f32` results must be the CPU twin's `bf16` results, bit for bit, and its states the same.
    #[cfg(feature = "flex")]
    #[test]
    fn the_kernels_round_stochastically_as_the_cpu_twin_does() {
        use burn::tensor::bf16;
        use super::launch::tests::FORCED_STOCHASTIC_F32;

        let Some(device) = wgpu_device() else { return };
        let block_size = BlockSize::DEFAULT;
        let len = 2 * 65_536 + 3 * block_size.get() + 5;
        // bf16 values in [-2, 2), spread by the golden ratio: the same on every run.
        let spread = |offset: f32| -> Vec<bf16> {
            (0..len).map(|i| bf16::from_f32(((i as f32 * 0.618_034 + offset).fract() - 0.5) * 4.0)).collect()
        };
        let (param, grad) = (spread(0.1), spread(0.7));
        let as_f32 = |values: &[bf16]| TensorData::new(values.iter().map(|x| x.to_f32()).collect::<Vec<_>>(), [len]);
        let as_bf16 = |values: &[bf16]| TensorData::new(values.to_vec(), [len]);
        let dynamic = MapFamily::Dynamic;
        let on_cpu = adam_steps(&as_bf16(&param), &as_bf16(&grad), block_size, dynamic, Some(5), &Device::flex());
        FORCED_STOCHASTIC_F32.store(true, Ordering::SeqCst);
        let on_kernel = adam_steps(&as_f32(&param), &as_f32(&grad), block_size, dynamic, Some(5), &device);
        FORCED_STOCHASTIC_F32.store(false, Ordering::SeqCst);
        let nearest = adam_steps(&as_bf16(&param), &as_bf16(&grad), block_size, dynamic, None, &Device::flex());
        let cpu_param = on_cpu[0].clone().convert::<f32>();
        assert_eq!(cpu_param, on_kernel[0], "the kernel's rounded parameters differ from the CPU twin's");
        assert_eq!(on_cpu[1..], on_kernel[1..], "the states differ");
        assert_ne!(cpu_param, nearest[0].clone().convert::<f32>(), "stochastic rounding changed nothing");
    }
}
