//! The `f32`-state path for tensors under `min_8bit_size`: the rules of `burn_8bit_ops`'s fused
//! step written with tensor operations (a few thousand elements: launch-bound, not memory-bound).

use burn::tensor::{Bool, DType, Int, Tensor};
use burn_8bit_ops::{StepRule, StepScalars};

use crate::engine::{Trust, trust_scale};
use crate::state::{Optim8bitState, StateSlot};

pub(crate) fn step<const D: usize>(
    mut state: Optim8bitState<D>,
    param: Tensor<1>,
    grad: Tensor<1>,
    h: &StepScalars,
    trust: Option<Trust>,
) -> (Tensor<1>, Optim8bitState<D>) {
    let old: Vec<Tensor<1>> = state
        .slots
        .iter()
        .map(|slot| match slot {
            StateSlot::Full(t) => t.clone(),
            StateSlot::Quantized(_) => unreachable!("f32 path with 8-bit states"),
        })
        .collect();
    let finite_grad = grad.clone().is_finite();
    let g = grad.mask_fill(finite_grad.clone().bool_not(), 0.0);
    let g = g + param.clone() * h.penalty;
    let (decayed, direction, new) = update(state.rule, h, param.clone(), g, old.clone());
    let mut applied: Tensor<1, Bool> = finite_grad.bool_and(direction.clone().is_finite());
    for s in &new {
        applied = applied.bool_and(s.clone().is_finite());
    }
    let direction = direction.mask_fill(applied.clone().bool_not(), 0.0);
    let step = match trust {
        None => direction * h.lr,
        Some(trust) => {
            let direction_norm = direction.clone().square().sum().sqrt();
            let param_norm = param.clone().square().sum().sqrt();
            direction * (trust_scale(trust, direction_norm, param_norm) * h.lr)
        }
    };
    let updated = decayed - step;
    let rejected = applied.bool_and(updated.clone().is_finite()).bool_not();
    let param = updated.mask_where(rejected.clone(), param);
    state.slots = new
        .into_iter()
        .zip(old)
        .map(|(new, old)| StateSlot::Full(new.mask_where(rejected.clone(), old)))
        .collect();
    let newly_skipped = rejected.int().sum().cast(DType::U32);
    let counter = state.skipped.take().expect("a non-empty tensor has a skip counter");
    state.skipped = Some(add_to_counter(counter, newly_skipped));
    (param, state)
}

/// `[low, high] + n` on the device, the high word taking the carry: the tensor-op twin of
/// `burn_8bit_ops::add_to_count`, written without any intermediate that could overflow `u32`.
fn add_to_counter(counter: Tensor<1, Int>, n: Tensor<1, Int>) -> Tensor<1, Int> {
    let low = counter.clone().slice([0..1]);
    let high = counter.slice([1..2]);
    let room = low.clone().ones_like().mul_scalar(u32::MAX) - low.clone();
    let fits = n.clone().min_pair(room);
    let excess = n - fits.clone();
    let carry = excess.clone().greater_elem(0);
    let wrapped = excess.clamp_min(1).sub_scalar(1);
    let low = (low + fits).mask_where(carry.clone(), wrapped);
    let high = high + carry.int().cast(DType::U32);
    Tensor::cat(vec![low, high], 0)
}

/// The new states and the parameter's `(decayed, direction)`: `p_new = decayed − lr·direction`.
fn update(
    rule: StepRule,
    h: &StepScalars,
    p: Tensor<1>,
    g: Tensor<1>,
    mut s: Vec<Tensor<1>>,
) -> (Tensor<1>, Tensor<1>, Vec<Tensor<1>>) {
    let (decayed, direction) = match rule {
        StepRule::Adam { amsgrad, cautious } => {
            s[0] = s[0].clone() * h.beta1 + g.clone() * (1.0 - h.beta1);
            s[1] = s[1].clone() * h.beta2 + g.clone().square() * (1.0 - h.beta2);
            let mut v = s[1].clone();
            if amsgrad {
                s[2] = s[2].clone().max_pair(s[1].clone());
                v = s[2].clone();
            }
            let direction = s[0].clone() / (v.sqrt() + h.eps);
            let decayed = p.clone() * h.decay;
            let decayed = if cautious {
                let differ = p
                    .clone()
                    .greater_equal_elem(0.0)
                    .not_equal(s[0].clone().greater_equal_elem(0.0));
                decayed.mask_where(differ, p)
            } else {
                decayed
            };
            (decayed, direction)
        }
        StepRule::Momentum { nesterov } => {
            s[0] = if h.first_step != 0 {
                g.clone()
            } else {
                s[0].clone() * h.beta1 + g.clone() * h.beta3
            };
            let direction = if nesterov { g + s[0].clone() * h.beta1 } else { s[0].clone() };
            (p, direction)
        }
        StepRule::RmsProp { centered, momentum } => {
            s[0] = s[0].clone() * h.beta1 + g.clone().square() * (1.0 - h.beta1);
            let mut avg = s[0].clone();
            if centered {
                let slot = if momentum { 2 } else { 1 };
                s[slot] = s[slot].clone() * h.beta1 + g.clone() * (1.0 - h.beta1);
                avg = (s[0].clone() - s[slot].clone().square()).clamp_min(0.0);
            }
            let mut direction = g / (avg.sqrt() + h.eps);
            if momentum {
                s[1] = s[1].clone() * h.beta3 + direction;
                direction = s[1].clone();
            }
            (p, direction)
        }
        StepRule::AdaGrad => {
            s[0] = s[0].clone() + g.clone().square();
            (p, g / (s[0].clone().sqrt() + h.eps))
        }
        StepRule::Lion => {
            let sign = (s[0].clone() * h.beta1 + g.clone() * (1.0 - h.beta1)).sign();
            s[0] = s[0].clone() * h.beta2 + g * (1.0 - h.beta2);
            (p * h.decay, sign)
        }
        StepRule::AdEMAMix => {
            s[0] = s[0].clone() * h.beta1 + g.clone() * (1.0 - h.beta1);
            s[1] = s[1].clone() * h.beta3 + g.clone() * (1.0 - h.beta3);
            s[2] = s[2].clone() * h.beta2 + g.square() * (1.0 - h.beta2);
            let numerator = s[0].clone() / h.correction1 + s[1].clone() * h.alpha;
            (p * h.decay, numerator / (s[2].clone().sqrt() / h.correction2 + h.eps))
        }
        StepRule::Lamb => {
            s[0] = s[0].clone() * h.beta1 + g.clone() * (1.0 - h.beta1);
            s[1] = s[1].clone() * h.beta2 + g.square() * (1.0 - h.beta2);
            let direction = (s[0].clone() / h.correction1)
                / ((s[1].clone() / h.correction2).sqrt() + h.eps)
                + p.clone() * h.weight_decay;
            (p, direction)
        }
    };
    (decayed, direction, s)
}
