//! The step every 8-bit optimizer shares: state bookkeeping around one fused op per tensor.

use burn::backend::Dispatch;
use burn::tensor::{DType, FloatDType, Tensor};
use burn_8bit_ops::{
    BlockQuantized, BlockSize, BlockwiseOps, MapFamily, OneState, PackedBlocks, StepRule,
    StepScalars, ThreeStates, TwoStates,
};

use crate::full;
use crate::state::{OptimizerKind, Optim8bitState, StateSlot};

/// What every 8-bit config shares: how states are kept and gradients clipped.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StateSettings {
    /// Elements per quantization block.
    pub block_size: BlockSize,
    /// Tensors with fewer elements keep `f32` states.
    pub min_8bit_size: usize,
    /// Percentile clipping's percentile (0–99), `None` when off.
    pub percentile: Option<usize>,
    /// The family of the states' maps.
    pub map_family: MapFamily,
    /// One absmax per tensor (ablation) instead of one per block.
    pub whole_tensor_block: bool,
}

/// What distinguishes one 8-bit optimizer from another; the rest is [`step`].
pub(crate) trait UpdateRule: Clone + Send + Sync + 'static {
    /// The optimizer, recorded with its states.
    const KIND: OptimizerKind;

    /// The fused update this optimizer applies.
    fn step_rule(&self) -> StepRule;

    /// The runtime scalars of step `time` (≥ 1) at learning rate `lr`.
    fn scalars(&self, lr: f64, time: usize) -> StepScalars;

    /// How states are kept and gradients clipped.
    fn settings(&self) -> StateSettings;

    /// The trust ratio of a two-pass rule (LAMB, LARS), `None` for the single-pass ones.
    fn trust(&self) -> Option<Trust> {
        None
    }
}

/// How a two-pass rule scales its step from the norms of the update direction and parameter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Trust {
    /// Burn's `Lamb`: `‖p‖ / ‖u‖`, or 1 when either norm is 0.
    Lamb,
    /// bitsandbytes' LARS: `min(1, max_unorm·‖p‖ / ‖u‖)` (1 when `‖u‖` is 0).
    Lars {
        /// The largest update norm relative to the parameter norm.
        max_unorm: f32,
    },
}

/// The step's scale factor `[1]` from the norms `[1]` of the direction and the parameter, on
/// the device.
pub(crate) fn trust_scale(trust: Trust, direction_norm: Tensor<1>, param_norm: Tensor<1>) -> Tensor<1> {
    let ones = param_norm.ones_like();
    match trust {
        Trust::Lamb => {
            let valid = param_norm
                .clone()
                .greater_elem(0.0)
                .bool_and(direction_norm.clone().greater_elem(0.0));
            let ratio = param_norm / direction_norm.clamp_min(f32::MIN_POSITIVE);
            ones.mask_where(valid, ratio)
        }
        Trust::Lars { max_unorm } => {
            let limit = param_norm * max_unorm;
            let exceeds = direction_norm.clone().greater(limit.clone());
            let ratio = limit / direction_norm.clamp_min(f32::MIN_POSITIVE);
            ones.mask_where(exceeds, ratio)
        }
    }
}

/// One optimizer step of one parameter tensor (Burn's `Optimizer::step` contract).
///
/// A state written by another optimizer or for another shape is replaced by fresh zero states
/// (`load_record_checked` refuses such records); a state of this optimizer written with other
/// settings — block size, map family, precision, rule flags — is converted on the device
/// (`Optim8bitState::adapted`); a state on another device is moved to the parameter's.
pub(crate) fn step<R: UpdateRule, const D: usize>(
    rule: &R,
    lr: f64,
    tensor: Tensor<D>,
    grad: Tensor<D>,
    state: Option<Optim8bitState<D>>,
) -> (Tensor<D>, Option<Optim8bitState<D>>) {
    let device = tensor.device();
    let shape = tensor.shape();
    let len = shape.num_elements();
    let settings = rule.settings();
    let block_size = (len >= settings.min_8bit_size).then_some(settings.block_size);
    let step_rule = rule.step_rule();
    let layout = block_size.map(|size| (size, settings.map_family));
    let mut state = match state {
        Some(state) if state.kind == R::KIND && state.shape == shape => {
            let state = if state.slot_devices_match(&device) {
                state
            } else {
                state.to_device(&device)
            };
            state.adapted(step_rule, layout)
        }
        _ => Optim8bitState::new(R::KIND, step_rule, shape.clone(), layout, &device),
    };
    state.time = state.time.saturating_add(1);
    if len == 0 {
        return (tensor, Some(state));
    }
    let scalars = StepScalars {
        maps: settings.map_family,
        ..rule.scalars(lr, state.time)
    };
    let dtype = tensor.dtype();
    let param = tensor.cast(FloatDType::F32).reshape([len]);
    let grad = grad.cast(FloatDType::F32).reshape([len]);
    let grad_scale = match settings.percentile {
        Some(percentile) => state.clip_scale(&grad, percentile),
        None => Tensor::ones([1], (&device, DType::F32)),
    };
    let (param, state) = match block_size {
        Some(block_size) if settings.whole_tensor_block => {
            whole_tensor(state, param, grad * grad_scale, &scalars, block_size, rule.trust())
        }
        Some(block_size) => fused(state, param, grad, grad_scale, scalars, block_size, rule.trust()),
        None => full::step(state, param, grad * grad_scale, &scalars, rule.trust()),
    };
    let param = param.reshape(shape);
    let param = if dtype == DType::F32 {
        param
    } else {
        param.cast(FloatDType::from(dtype))
    };
    (param, Some(state))
}

/// The whole-tensor ablation: decode every state, update with the `f32` rules, re-encode each
/// state against its own new absmax (`max |s|`, repeated in every block). Two passes and O(n)
/// `f32` temporaries, unlike the fused path: an experiment, not a production path.
fn whole_tensor<const D: usize>(
    mut state: Optim8bitState<D>,
    param: Tensor<1>,
    grad: Tensor<1>,
    scalars: &StepScalars,
    block_size: BlockSize,
    trust: Option<Trust>,
) -> (Tensor<1>, Optim8bitState<D>) {
    let maps = state.slot_maps();
    state.slots = state.slots.iter().map(|slot| StateSlot::Full(slot.decoded())).collect();
    let (param, mut state) = full::step(state, param, grad, scalars, trust);
    state.slots = std::mem::take(&mut state.slots)
        .into_iter()
        .zip(maps)
        .map(|(slot, map)| {
            StateSlot::Quantized(BlockQuantized::quantize_whole_tensor(slot.decoded(), map, block_size))
        })
        .collect();
    (param, state)
}

/// The 8-bit path: one fused op (by number of states) over the flat parameter.
fn fused<const D: usize>(
    mut state: Optim8bitState<D>,
    param: Tensor<1>,
    grad: Tensor<1>,
    grad_scale: Tensor<1>,
    scalars: StepScalars,
    block_size: BlockSize,
    trust: Option<Trust>,
) -> (Tensor<1>, Optim8bitState<D>) {
    let update_scale = match trust {
        Some(trust) => {
            let sums = update_norms(&state, &param, &grad, &grad_scale, scalars, block_size);
            let num_blocks = block_size.num_blocks(param.shape().num_elements());
            let totals = sums.reshape([num_blocks, 2]).sum_dim(0);
            let direction_norm = totals.clone().slice([0..1, 0..1]).reshape([1]).sqrt();
            let param_norm = totals.slice([0..1, 1..2]).reshape([1]).sqrt();
            trust_scale(trust, direction_norm, param_norm)
        }
        None => grad_scale.ones_like(),
    };
    let len = param.shape().num_elements();
    let maps = state.slot_maps();
    let mut packed: Vec<PackedBlocks<Dispatch>> = std::mem::take(&mut state.slots)
        .into_iter()
        .map(|slot| match slot {
            StateSlot::Quantized(q) => {
                let (codes, absmax) = q.into_parts();
                PackedBlocks {
                    codes: codes.into_dispatch(),
                    absmax: absmax.into_dispatch(),
                }
            }
            StateSlot::Full(_) => unreachable!("8-bit path with f32 states"),
        })
        .collect();
    let param = param.into_dispatch();
    let skipped = state.skipped.take().expect("a non-empty tensor has a skip counter").into_dispatch();
    let grad = grad.into_dispatch();
    let grad_scale = grad_scale.into_dispatch();
    let update_scale = update_scale.into_dispatch();
    let (rule, size) = (state.rule, block_size.get());
    let (param, skipped) = match packed.len() {
        1 => {
            let out = Dispatch::fused_step_one_state(
                OneState { param, skipped, state1: packed.remove(0) },
                grad,
                grad_scale,
                update_scale,
                rule,
                scalars,
                size,
            );
            packed = vec![out.state1];
            (out.param, out.skipped)
        }
        2 => {
            let state2 = packed.remove(1);
            let out = Dispatch::fused_step_two_states(
                TwoStates { param, skipped, state1: packed.remove(0), state2 },
                grad,
                grad_scale,
                update_scale,
                rule,
                scalars,
                size,
            );
            packed = vec![out.state1, out.state2];
            (out.param, out.skipped)
        }
        3 => {
            let state3 = packed.remove(2);
            let state2 = packed.remove(1);
            let out = Dispatch::fused_step_three_states(
                ThreeStates { param, skipped, state1: packed.remove(0), state2, state3 },
                grad,
                grad_scale,
                update_scale,
                rule,
                scalars,
                size,
            );
            packed = vec![out.state1, out.state2, out.state3];
            (out.param, out.skipped)
        }
        n => unreachable!("rules have 1 to 3 states, not {n}"),
    };
    state.skipped = Some(Tensor::from_dispatch(skipped));
    state.slots = packed
        .into_iter()
        .zip(maps)
        .map(|(blocks, map)| {
            StateSlot::Quantized(
                BlockQuantized::from_parts(
                    Tensor::from_dispatch(blocks.codes),
                    Tensor::from_dispatch(blocks.absmax),
                    [len].into(),
                    block_size,
                    map,
                )
                .expect("the fused step keeps the state's layout"),
            )
        })
        .collect();
    (Tensor::from_dispatch(param), state)
}

/// The first pass of a two-pass rule: per-block sums of the squared direction and parameter,
/// `[2 · blocks]`, from clones of the state's handles (nothing is written).
fn update_norms<const D: usize>(
    state: &Optim8bitState<D>,
    param: &Tensor<1>,
    grad: &Tensor<1>,
    grad_scale: &Tensor<1>,
    scalars: StepScalars,
    block_size: BlockSize,
) -> Tensor<1> {
    let mut packed: Vec<PackedBlocks<Dispatch>> = state
        .slots
        .iter()
        .map(|slot| match slot {
            StateSlot::Quantized(q) => PackedBlocks {
                codes: q.codes().clone().into_dispatch(),
                absmax: q.absmax().clone().into_dispatch(),
            },
            StateSlot::Full(_) => unreachable!("8-bit path with f32 states"),
        })
        .collect();
    let param = param.clone().into_dispatch();
    let skipped = state.skipped.clone().expect("a non-empty tensor has a skip counter").into_dispatch();
    let (grad, grad_scale) = (grad.clone().into_dispatch(), grad_scale.clone().into_dispatch());
    let (rule, size) = (state.rule, block_size.get());
    let sums = match packed.len() {
        1 => Dispatch::update_norms_one_state(
            OneState { param, skipped, state1: packed.remove(0) },
            grad,
            grad_scale,
            rule,
            scalars,
            size,
        ),
        2 => {
            let state2 = packed.remove(1);
            Dispatch::update_norms_two_states(
                TwoStates { param, skipped, state1: packed.remove(0), state2 },
                grad,
                grad_scale,
                rule,
                scalars,
                size,
            )
        }
        n => unreachable!("two-pass rules have 1 or 2 states, not {n}"),
    };
    Tensor::from_dispatch(sums)
}
