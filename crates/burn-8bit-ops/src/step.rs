//! The update rules of the fused optimizer step (docs/algorithm.md §3.4), stated once for the CPU twin;
//! `cube.rs` spells the same arithmetic, in the same order, for the kernels.
//!
//! A rule is chosen at compile time of the kernel ([`StepRule`], a few variants), while every
//! hyper-parameter, learning rate and bias correction is a runtime scalar ([`StepScalars`]): no
//! kernel is compiled per step or per learning rate.

use serde::{Deserialize, Serialize};

use crate::map::{MapFamily, MapKind};

/// Which update a fused step applies. States are listed in slot order by [`StepRule::state_maps`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StepRule {
    /// Adam and AdamW: `m` (signed), `v` (unsigned), and `v_max` (unsigned) with AMSGrad.
    Adam {
        /// Keep the running maximum of `v` and divide by it (AMSGrad).
        amsgrad: bool,
        /// Apply the decoupled decay only where `sign(p) == sign(m)` (cautious weight decay).
        cautious: bool,
    },
    /// SGD with momentum: `m` (signed).
    Momentum {
        /// Nesterov's look-ahead: the update is `g + μ·m`.
        nesterov: bool,
    },
    /// RMSprop: the square average (unsigned), then the momentum buffer (signed) when momentum is
    /// on, then the gradient average (signed) when centred.
    RmsProp {
        /// Subtract the square of the running gradient mean from the square average.
        centered: bool,
        /// Keep a momentum buffer of the normalised gradient.
        momentum: bool,
    },
    /// Adagrad: the sum of squares (unsigned).
    AdaGrad,
    /// Lion: `m` (signed).
    Lion,
    /// AdEMAMix: the fast EMA `m1` (signed), the slow EMA `m2` (signed), `ν` (unsigned).
    AdEMAMix,
    /// LAMB (Burn's `Lamb`): `m` (signed), `v` (unsigned); the direction includes the weight
    /// decay and is scaled by the trust ratio computed in a first pass.
    Lamb,
}

impl StepRule {
    /// The map of each state slot in `family`, in order (signed for moments, unsigned for
    /// non-negative states); its length is the number of states (1 to 3).
    pub fn state_maps(self, family: MapFamily) -> Vec<MapKind> {
        let (signed, unsigned) = (family.kind(true), family.kind(false));
        match self {
            StepRule::Adam { amsgrad, .. } => {
                let mut maps = vec![signed, unsigned];
                if amsgrad {
                    maps.push(unsigned);
                }
                maps
            }
            StepRule::Momentum { .. } | StepRule::Lion => vec![signed],
            StepRule::RmsProp { centered, momentum } => {
                let mut maps = vec![unsigned];
                if momentum {
                    maps.push(signed);
                }
                if centered {
                    maps.push(signed);
                }
                maps
            }
            StepRule::AdaGrad => vec![unsigned],
            StepRule::AdEMAMix => vec![signed, signed, unsigned],
            StepRule::Lamb => vec![signed, unsigned],
        }
    }

    /// The number of state slots: the length of [`StepRule::state_maps`], usable in constants.
    pub const fn num_states(self) -> usize {
        match self {
            StepRule::Adam { amsgrad: true, .. } | StepRule::AdEMAMix => 3,
            StepRule::Adam { .. } | StepRule::Lamb => 2,
            StepRule::RmsProp { centered, momentum } => 1 + centered as usize + momentum as usize,
            StepRule::Momentum { .. } | StepRule::AdaGrad | StepRule::Lion => 1,
        }
    }

    /// A short name for each state slot, in slot order (for inspection and records).
    pub fn state_names(self) -> Vec<&'static str> {
        match self {
            StepRule::Adam { amsgrad, .. } => {
                let mut names = vec!["moment_1", "moment_2"];
                if amsgrad {
                    names.push("max_moment_2");
                }
                names
            }
            StepRule::Momentum { .. } => vec!["velocity"],
            StepRule::Lion => vec!["momentum"],
            StepRule::RmsProp { centered, momentum } => {
                let mut names = vec!["square_avg"];
                if momentum {
                    names.push("momentum_buffer");
                }
                if centered {
                    names.push("grad_avg");
                }
                names
            }
            StepRule::AdaGrad => vec!["sum"],
            StepRule::AdEMAMix => vec!["moment_fast", "moment_slow", "moment_2"],
            StepRule::Lamb => vec!["moment_1", "moment_2"],
        }
    }

    /// A stable integer for records: the variant in the high bits, its flags in the low two.
    pub fn code(self) -> u64 {
        let (variant, a, b) = match self {
            StepRule::Adam { amsgrad, cautious } => (0, amsgrad, cautious),
            StepRule::Momentum { nesterov } => (1, nesterov, false),
            StepRule::RmsProp { centered, momentum } => (2, centered, momentum),
            StepRule::AdaGrad => (3, false, false),
            StepRule::Lion => (4, false, false),
            StepRule::AdEMAMix => (5, false, false),
            StepRule::Lamb => (6, false, false),
        };
        (variant << 2) | u64::from(a) | (u64::from(b) << 1)
    }

    /// The rule of [`StepRule::code`]; `None` for an unknown code.
    pub fn from_code(code: u64) -> Option<Self> {
        let (a, b) = (code & 1 == 1, code & 2 == 2);
        let rule = match code >> 2 {
            0 => StepRule::Adam { amsgrad: a, cautious: b },
            1 if !b => StepRule::Momentum { nesterov: a },
            2 => StepRule::RmsProp { centered: a, momentum: b },
            3 if !a && !b => StepRule::AdaGrad,
            4 if !a && !b => StepRule::Lion,
            5 if !a && !b => StepRule::AdEMAMix,
            6 if !a && !b => StepRule::Lamb,
            _ => return None,
        };
        Some(rule)
    }
}

/// The runtime scalars of one step, computed on the host each step. Each rule reads the fields
/// its documentation names; the others are ignored:
///
/// | rule | fields read |
/// |---|---|
/// | Adam | `lr` = lr·sqrt(1−β2^t)/(1−β1^t), `beta1`, `beta2`, `eps` = ε·sqrt(1−β2^t), `decay`, `penalty` |
/// | Momentum | `lr`, `beta1` = μ, `beta3` = 1 − dampening, `first_step`, `penalty` |
/// | RMSprop | `lr`, `beta1` = α (smoothing), `beta3` = momentum μ, `eps`, `penalty` |
/// | Adagrad | `lr` = lr / (1 + (t−1)·lr_decay), `eps`, `penalty` |
/// | Lion | `lr`, `beta1`, `beta2`, `decay` |
/// | AdEMAMix | `lr`, `beta1`, `beta2`, `beta3`, `alpha`, `eps`, `correction1`, `correction2`, `decay` |
/// | LAMB | `lr`, `beta1`, `beta2`, `eps`, `correction1` = 1−β1^t, `correction2` = 1−β2^t, `weight_decay` |
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepScalars {
    /// The step size applied to the update direction: Adam `lr·sqrt(1−β2^t)/(1−β1^t)`, Adagrad the
    /// decayed rate, every other rule the learning rate.
    pub lr: f32,
    /// First decay rate (see the table).
    pub beta1: f32,
    /// Second decay rate (see the table).
    pub beta2: f32,
    /// Third rate (see the table).
    pub beta3: f32,
    /// AdEMAMix's α (after its schedule).
    pub alpha: f32,
    /// ε added to the root of the second moment (Adam: `ε·sqrt(1−β2^t)`).
    pub eps: f32,
    /// AdEMAMix's `1 − β1^t`.
    pub correction1: f32,
    /// AdEMAMix's `sqrt(1 − β2^t)`.
    pub correction2: f32,
    /// Decoupled weight decay as a multiplier of the parameter, `1 − lr·wd` (1 when off).
    pub decay: f32,
    /// Coupled (L2) weight decay: `g += penalty·p` (0 when off).
    pub penalty: f32,
    /// 1 on the optimizer's first step for this tensor, else 0 (Momentum starts with `m = g`).
    pub first_step: u32,
    /// LAMB's weight decay, added to the direction as `weight_decay·p`.
    pub weight_decay: f32,
    /// The family of the states' maps (read from a table at run time, like the scalars).
    pub maps: MapFamily,
}

/// `true` for finite `x`, decided on the bits (as the kernels do: WGSL compilers may assume NaN
/// never occurs).
#[inline(always)]
pub(crate) fn is_finite_bits(x: f32) -> bool {
    x.to_bits() & crate::rule::ABS_MASK < crate::rule::INFINITY_BITS
}

/// One element of the fused step: the states `s` updated in place, the new parameter
/// `decayed − lr·direction` (`lr` being the step size times any trust ratio), and whether the
/// update was applied. It is not (parameter and states keep their values) when the gradient, a
/// new state or the new parameter is not finite. The update is computed either way and then
/// selected, branch-free as in the kernels, in the kernels' order of operations.
#[inline(always)]
pub(crate) fn update_element(
    rule: StepRule,
    h: &StepScalars,
    lr: f32,
    p: f32,
    g: f32,
    s: &mut [f32; 3],
) -> Updated {
    let g_raw = g;
    let g = g + h.penalty * p;
    let mut n = *s;
    let (decayed, direction) = match rule {
        StepRule::Adam { amsgrad, cautious } => {
            n[0] = h.beta1 * n[0] + (1.0 - h.beta1) * g;
            n[1] = h.beta2 * n[1] + (1.0 - h.beta2) * (g * g);
            let mut v = n[1];
            if amsgrad {
                n[2] = if n[1] > n[2] { n[1] } else { n[2] };
                v = n[2];
            }
            let direction = n[0] / (v.sqrt() + h.eps);
            let decayed = if cautious && (p >= 0.0) != (n[0] >= 0.0) {
                p
            } else {
                p * h.decay
            };
            (decayed, direction)
        }
        StepRule::Momentum { nesterov } => {
            n[0] = if h.first_step != 0 {
                g
            } else {
                h.beta1 * n[0] + h.beta3 * g
            };
            (p, if nesterov { g + h.beta1 * n[0] } else { n[0] })
        }
        StepRule::RmsProp { centered, momentum } => {
            n[0] = h.beta1 * n[0] + (1.0 - h.beta1) * (g * g);
            let centered_slot = if momentum { 2 } else { 1 };
            let mut avg = n[0];
            if centered {
                n[centered_slot] = h.beta1 * n[centered_slot] + (1.0 - h.beta1) * g;
                // Quantization error can push the difference below zero, and sqrt of that is NaN.
                let difference = n[0] - n[centered_slot] * n[centered_slot];
                avg = if difference > 0.0 { difference } else { 0.0 };
            }
            let mut direction = g / (avg.sqrt() + h.eps);
            if momentum {
                n[1] = h.beta3 * n[1] + direction;
                direction = n[1];
            }
            (p, direction)
        }
        StepRule::AdaGrad => {
            n[0] += g * g;
            (p, g / (n[0].sqrt() + h.eps))
        }
        StepRule::Lion => {
            let c = h.beta1 * n[0] + (1.0 - h.beta1) * g;
            let sign = if c > 0.0 {
                1.0
            } else if c < 0.0 {
                -1.0
            } else {
                0.0
            };
            n[0] = h.beta2 * n[0] + (1.0 - h.beta2) * g;
            (p * h.decay, sign)
        }
        StepRule::AdEMAMix => {
            n[0] = h.beta1 * n[0] + (1.0 - h.beta1) * g;
            n[1] = h.beta3 * n[1] + (1.0 - h.beta3) * g;
            n[2] = h.beta2 * n[2] + (1.0 - h.beta2) * (g * g);
            let direction =
                (n[0] / h.correction1 + h.alpha * n[1]) / (n[2].sqrt() / h.correction2 + h.eps);
            (p * h.decay, direction)
        }
        StepRule::Lamb => {
            n[0] = h.beta1 * n[0] + (1.0 - h.beta1) * g;
            n[1] = h.beta2 * n[1] + (1.0 - h.beta2) * (g * g);
            let direction =
                (n[0] / h.correction1) / ((n[1] / h.correction2).sqrt() + h.eps) + h.weight_decay * p;
            (p, direction)
        }
    };
    let p_new = decayed - lr * direction;
    let applied = is_finite_bits(g_raw)
        & is_finite_bits(p_new)
        & is_finite_bits(n[0])
        & is_finite_bits(n[1])
        & is_finite_bits(n[2]);
    for (state, updated) in s.iter_mut().zip(n) {
        *state = if applied { updated } else { *state };
    }
    Updated {
        p: if applied { p_new } else { p },
        direction: if applied { direction } else { 0.0 },
        applied,
    }
}

/// One element after [`update_element`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Updated {
    /// The new parameter (the old one when not applied).
    pub p: f32,
    /// The update direction before the step size (0 when not applied): what LAMB's and LARS's
    /// trust ratios take the norm of.
    pub direction: f32,
    /// Whether the update was applied.
    pub applied: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rule_counts_as_many_states_as_it_has_maps_and_names() {
        let rules: Vec<StepRule> = (0..64).filter_map(StepRule::from_code).collect();
        assert_eq!(rules.len(), 14);
        for rule in rules {
            for family in [MapFamily::Dynamic, MapFamily::Linear] {
                assert_eq!(rule.num_states(), rule.state_maps(family).len(), "{rule:?}");
            }
            assert_eq!(rule.num_states(), rule.state_names().len(), "{rule:?}");
            assert_eq!(StepRule::from_code(rule.code()), Some(rule));
        }
    }
}
