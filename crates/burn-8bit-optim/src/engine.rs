//! The step every 8-bit optimizer shares: state bookkeeping around one fused op per tensor,
//! whether its states are 8-bit or `f32`.

use burn::backend::Dispatch;
use burn::tensor::{DType, FloatDType, Tensor};
use burn_8bit_ops::{
    BlockSize, BlockwiseOps, MapFamily, ParamDType, Rank1Norms, Scale, StateBuffer, StepRule, StepScalars, StepTensors,
    rounding_key,
};

use crate::state::{OptimizerKind, Optim8bitState, StateSlot};

/// What every 8-bit config shares, validated: how states are kept, gradients clipped by
/// percentile and `bf16` parameters rounded.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct StateSettings {
    /// Elements per quantization block.
    pub block_size: BlockSize,
    /// Tensors with fewer elements keep `f32` states.
    pub min_8bit_size: usize,
    /// Percentile clipping's percentile (0–99), `None` when off.
    pub percentile: Option<usize>,
    /// The family of the states' maps.
    pub map_family: MapFamily,
    /// Second moments under rank-1 normalisation where they fit (4-bit states only).
    pub rank1: bool,
    /// One absmax per tensor (ablation) instead of one per block.
    pub whole_tensor_block: bool,
    /// The seed of stochastic rounding for `bf16` parameters, `None` when they round to nearest.
    pub rounding_seed: Option<u64>,
}

impl StateSettings {
    /// The rule's scalars for step `time`, with this step's stochastic-rounding key when it is on.
    fn scalars<R: UpdateRule>(&self, rule: &R, lr: f64, time: usize) -> StepScalars {
        let scalars = rule.scalars(lr, time);
        match self.rounding_seed {
            Some(seed) => StepScalars {
                stochastic_rounding: 1,
                rounding_key: rounding_key(seed, time as u64),
                ..scalars
            },
            None => scalars,
        }
    }
}

/// What distinguishes one 8-bit optimizer from another: the rule of [`Optim8bit`], built by
/// each config's `try_build`; the rest is the step every optimizer shares.
///
/// Sealed: the rules are the nine of this crate (`AdamWRule`, …), each the validated
/// hyper-parameters of its config.
///
/// [`Optim8bit`]: crate::Optim8bit
pub trait UpdateRule: sealed::Sealed + Clone + std::fmt::Debug + Send + Sync + 'static {
    /// The optimizer, recorded with its states.
    const KIND: OptimizerKind;

    /// The fused update this optimizer applies.
    fn step_rule(&self) -> StepRule;

    /// The runtime scalars of step `time` (≥ 1) at learning rate `lr`.
    fn scalars(&self, lr: f64, time: usize) -> StepScalars;

    /// The trust ratio of a two-pass rule (LAMB, LARS), `None` for the single-pass ones.
    fn trust(&self) -> Option<Trust> {
        None
    }
}

pub(crate) mod sealed {
    /// Keeps [`UpdateRule`](super::UpdateRule) to this crate's rules.
    pub trait Sealed {}
}

/// How a two-pass rule (LAMB, LARS) scales its step from the norms of the update direction and
/// of the parameter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Trust {
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

/// One optimizer step of one parameter tensor (Burn's `Optimizer::step` contract): one fused op
/// over the flat parameter whatever its states are held in (two for LAMB and LARS).
///
/// A state written by another optimizer or for another shape is replaced by fresh zero states
/// (`load_record_checked` refuses such records); a state of this optimizer written with other
/// settings — block size, map family, precision, rule flags — is converted on the device
/// (`Optim8bitState::adapted`); a state on another device is moved to the parameter's.
pub(crate) fn step<R: UpdateRule, const D: usize>(
    rule: &R,
    settings: StateSettings,
    lr: f64,
    tensor: Tensor<D>,
    grad: Tensor<D>,
    state: Option<Optim8bitState<D>>,
) -> (Tensor<D>, Option<Optim8bitState<D>>) {
    let device = tensor.device();
    let shape = tensor.shape();
    let len = shape.num_elements();
    let quantized = len >= settings.min_8bit_size;
    let step_rule = rule.step_rule();
    let layout = quantized.then_some((settings.block_size, settings.map_family));
    let mut state = match state {
        Some(state) if state.kind == R::KIND && state.shape == shape => {
            let state = if state.slot_devices_match(&device) {
                state
            } else {
                state.to_device(&device)
            };
            state.adapted(step_rule, layout, settings.rank1)
        }
        _ => Optim8bitState::new(R::KIND, step_rule, shape.clone(), layout, settings.rank1, &device),
    };
    state.time = state.time.saturating_add(1);
    if len == 0 {
        return (tensor, Some(state));
    }
    let step = FusedStep {
        scalars: settings.scalars(rule, lr, state.time),
        family: settings.map_family,
        block_size: settings.block_size,
        trust: rule.trust(),
    };
    let dtype = tensor.dtype();
    // The op reads and writes f32, f16 and bf16 parameters itself; anything else (f64, or a
    // gradient of another type than its parameter) steps as f32 between two casts.
    let native = ParamDType::of(dtype).is_some() && grad.dtype() == dtype;
    let step_dtype = if native { dtype } else { DType::F32 };
    let param = tensor.cast(FloatDType::from(step_dtype)).reshape([len]);
    let grad = grad.cast(FloatDType::from(step_dtype)).reshape([len]);
    let grad_scale = settings.percentile.map(|percentile| state.clip_scale(&grad, percentile));
    let (param, state) = if quantized && settings.whole_tensor_block {
        // The whole-tensor ablation: decode every state, step the `f32` states, re-encode each
        // state against its own new absmax (`max |s|`, repeated in every block). Two passes and
        // O(n) `f32` temporaries, unlike the fused path: an experiment, not a production path.
        let maps = state.slot_maps();
        let (param, state) = step.apply(state.into_f32_slots(), param, grad, grad_scale);
        (param, state.quantized_whole_tensor(maps, settings.block_size))
    } else {
        step.apply(state, param, grad, grad_scale)
    };
    (param.reshape(shape).cast(FloatDType::from(dtype)), Some(state))
}

/// What one step of one tensor applies, whatever its states are held in.
struct FusedStep {
    scalars: StepScalars,
    family: MapFamily,
    /// Elements per block of quantized states; for `f32` states, the elements one cube (or
    /// rayon block) steps.
    block_size: BlockSize,
    trust: Option<Trust>,
}

impl FusedStep {
    /// The fused op over the flat parameter, after the update-norm pass of a two-pass rule.
    fn apply<const D: usize>(
        &self,
        mut state: Optim8bitState<D>,
        param: Tensor<1>,
        grad: Tensor<1>,
        grad_scale: Option<Tensor<1>>,
    ) -> (Tensor<1>, Optim8bitState<D>) {
        let update_scale = self.trust.map(|trust| {
            let sums = self.update_norms(&state, &param, &grad, grad_scale.as_ref());
            let num_blocks = self.block_size.num_blocks(param.shape().num_elements());
            let totals = sums.reshape([num_blocks, 2]).sum_dim(0);
            let direction_norm = totals.clone().slice([0..1, 0..1]).reshape([1]).sqrt();
            let param_norm = totals.slice([0..1, 1..2]).reshape([1]).sqrt();
            trust_scale(trust, direction_norm, param_norm)
        });
        let maps = state.slot_maps();
        let mut next = self.rank1_norms(&state, &param, &grad, grad_scale.as_ref(), update_scale.as_ref());
        let buffers = std::mem::take(&mut state.slots)
            .into_iter()
            .map(StateSlot::into_buffer)
            .map(|buffer| match buffer {
                StateBuffer::Rank1 { state, next: own } => StateBuffer::Rank1 { state, next: next.take().unwrap_or(own) },
                buffer => buffer,
            })
            .collect();
        let skipped = state.skipped.take().expect("a non-empty tensor has a skip counter");
        let out = Dispatch::fused_step(
            StepTensors::new(param.into_dispatch(), skipped.into_dispatch(), buffers),
            grad.into_dispatch(),
            device_scale(grad_scale),
            device_scale(update_scale),
            state.rule,
            self.family,
            self.scalars,
            self.block_size.get(),
        );
        let (param, skipped, buffers) = out.into_parts();
        state.skipped = Some(Tensor::from_dispatch(skipped));
        state.slots = buffers
            .into_iter()
            .zip(maps)
            .map(|(buffer, map)| StateSlot::from_buffer(buffer, &state.shape, self.block_size, map))
            .collect();
        (Tensor::from_dispatch(param), state)
    }

    /// The first pass over a rank-1 state: the norms of its new values under the step's scales,
    /// from clones of the state's handles (nothing is written); `None` without a rank-1 state.
    fn rank1_norms<const D: usize>(
        &self,
        state: &Optim8bitState<D>,
        param: &Tensor<1>,
        grad: &Tensor<1>,
        grad_scale: Option<&Tensor<1>>,
        update_scale: Option<&Tensor<1>>,
    ) -> Option<Rank1Norms<Dispatch>> {
        if !state.slots.iter().any(|slot| matches!(slot, StateSlot::Rank1(_))) {
            return None;
        }
        let buffers = state.slots.iter().cloned().map(StateSlot::into_buffer).collect();
        let skipped = state.skipped.clone().expect("a non-empty tensor has a skip counter");
        Some(Dispatch::rank1_norms(
            StepTensors::new(param.clone().into_dispatch(), skipped.into_dispatch(), buffers),
            grad.clone().into_dispatch(),
            device_scale(grad_scale.cloned()),
            device_scale(update_scale.cloned()),
            state.rule,
            self.family,
            self.scalars,
            self.block_size.get(),
        ))
    }

    /// The first pass of a two-pass rule: per-block sums of the squared direction and
    /// parameter, `[2 · blocks]`, from clones of the state's handles (nothing is written).
    fn update_norms<const D: usize>(
        &self,
        state: &Optim8bitState<D>,
        param: &Tensor<1>,
        grad: &Tensor<1>,
        grad_scale: Option<&Tensor<1>>,
    ) -> Tensor<1> {
        let buffers = state.slots.iter().cloned().map(StateSlot::into_buffer).collect();
        let skipped = state.skipped.clone().expect("a non-empty tensor has a skip counter");
        Tensor::from_dispatch(Dispatch::update_norms(
            StepTensors::new(param.clone().into_dispatch(), skipped.into_dispatch(), buffers),
            grad.clone().into_dispatch(),
            device_scale(grad_scale.cloned()),
            state.rule,
            self.family,
            self.scalars,
            self.block_size.get(),
        ))
    }
}

/// A factor on the device, or exactly one.
fn device_scale(scale: Option<Tensor<1>>) -> Scale<Dispatch> {
    match scale {
        Some(scale) => Scale::Device(scale.into_dispatch()),
        None => Scale::One,
    }
}
