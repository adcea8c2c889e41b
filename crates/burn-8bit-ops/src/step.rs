//! The update rules of the fused optimizer step (docs/algorithm.md §3.4), stated once: the
//! `#[cube]` function [`update_element`] is expanded into the kernels and, being plain Rust as
//! well, called element by element by the CPU twin.
//!
//! A rule is chosen at compile time of the kernel ([`StepRule`], a few variants), while every
//! hyper-parameter, learning rate and bias correction is a runtime scalar ([`StepScalars`], the
//! kernels' launch argument as it is): no kernel is compiled per step or per learning rate.

use cubecl::prelude::*;
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
    /// Plain SGD (Burn's `SgdConfig` without momentum): no state; the direction is the gradient
    /// (with any L2 penalty).
    Sgd,
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
    /// non-negative states); its length is the number of states (0 to 3).
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
            StepRule::Sgd => Vec::new(),
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

    /// The slot of the second moment (the first non-negative state: Adam's and LAMB's `v`,
    /// AdEMAMix's `ν`, RMSprop's square average, Adagrad's sum), the one state that 4-bit
    /// configs keep under rank-1 normalisation; `None` for rules without one.
    ///
    /// ```
    /// use burn_8bit_ops::StepRule;
    /// assert_eq!(StepRule::Adam { amsgrad: true, cautious: false }.second_moment_slot(), Some(1));
    /// assert_eq!(StepRule::Lion.second_moment_slot(), None);
    /// ```
    pub fn second_moment_slot(self) -> Option<usize> {
        let family = MapFamily::Dynamic;
        self.state_maps(family).iter().position(|&map| map == family.kind(false))
    }

    /// The number of state slots: the length of [`StepRule::state_maps`], usable in constants.
    pub const fn num_states(self) -> usize {
        match self {
            StepRule::Adam { amsgrad: true, .. } | StepRule::AdEMAMix => 3,
            StepRule::Adam { .. } | StepRule::Lamb => 2,
            StepRule::RmsProp { centered, momentum } => 1 + centered as usize + momentum as usize,
            StepRule::Momentum { .. } | StepRule::AdaGrad | StepRule::Lion => 1,
            StepRule::Sgd => 0,
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
            StepRule::Sgd => Vec::new(),
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
            StepRule::Sgd => (7, false, false),
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
            7 if !a && !b => StepRule::Sgd,
            _ => return None,
        };
        Some(rule)
    }
}

/// The runtime scalars of one step, computed on the host each step and passed to the kernels as
/// they are. Each rule reads the fields its documentation names; the others are ignored:
///
/// | rule | fields read |
/// |---|---|
/// | Adam | `lr` = lr·sqrt(1−β2^t)/(1−β1^t), `beta1`, `beta2`, `eps` = ε·sqrt(1−β2^t), `decay_factor`, `l2_penalty` |
/// | SGD | `lr`, `l2_penalty` |
/// | Momentum | `lr`, `beta1` = μ, `beta3` = 1 − dampening, `first_step`, `l2_penalty` |
/// | RMSprop | `lr`, `beta1` = α (smoothing), `beta3` = momentum μ, `eps`, `l2_penalty` |
/// | Adagrad | `lr` = lr / (1 + (t−1)·lr_decay), `eps`, `l2_penalty` |
/// | Lion | `lr`, `beta1`, `beta2`, `decay_factor` |
/// | AdEMAMix | `lr`, `beta1`, `beta2`, `beta3`, `alpha`, `eps`, `correction1`, `correction2`, `decay_factor` |
/// | LAMB | `lr`, `beta1`, `beta2`, `eps`, `correction1`, `correction2`, `direction_decay` |
///
/// Weight decay enters at one of three places, one field each: the parameter's multiplier
/// (`decay_factor`, decoupled), the gradient (`l2_penalty`, coupled) or the update direction
/// before LAMB's trust ratio (`direction_decay`). The bias corrections mean the same for every
/// rule that reads them. The default is the identity step with every rate and decay off (and
/// `decay_factor` = 1).
///
/// ```
/// use burn_8bit_ops::StepScalars;
/// let scalars = StepScalars { lr: 1e-3, beta1: 0.9, ..StepScalars::default() };
/// assert_eq!((scalars.decay_factor, scalars.l2_penalty), (1.0, 0.0));
/// ```
#[derive(CubeType, CubeLaunch, Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
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
    /// The first moment's bias correction `1 − β1^t` (AdEMAMix, LAMB).
    pub correction1: f32,
    /// The second moment's bias correction `sqrt(1 − β2^t)` (AdEMAMix, LAMB): the root of the
    /// second moment is divided by it.
    pub correction2: f32,
    /// Decoupled weight decay as the parameter's multiplier, `p *= 1 − lr·λ` (1 when off).
    pub decay_factor: f32,
    /// Coupled (L2) weight decay: `g += l2_penalty·p` (0 when off).
    pub l2_penalty: f32,
    /// 1 on the optimizer's first step for this tensor, else 0 (Momentum starts with `m = g`).
    pub first_step: u32,
    /// Weight decay added to the update direction, `direction += direction_decay·p`, before
    /// LAMB's trust ratio scales it (0 when off).
    pub direction_decay: f32,
    /// 1: a `bf16` parameter is written rounded stochastically, with random bits drawn from
    /// `rounding_key` and the element's index (docs/algorithm.md §3.8); 0: to nearest. `f32`
    /// and `f16` parameters are always rounded to nearest.
    pub stochastic_rounding: u32,
    /// This step's key for the rounding bits, [`rounding_key`](crate::rounding_key)`(seed,
    /// step)` (read only with `stochastic_rounding`).
    pub rounding_key: u32,
}

impl Default for StepScalars {
    fn default() -> Self {
        Self {
            lr: 0.0,
            beta1: 0.0,
            beta2: 0.0,
            beta3: 0.0,
            alpha: 0.0,
            eps: 0.0,
            correction1: 1.0,
            correction2: 1.0,
            decay_factor: 1.0,
            l2_penalty: 0.0,
            first_step: 0,
            direction_decay: 0.0,
            stochastic_rounding: 0,
            rounding_key: 0,
        }
    }
}

/// One element after [`update_element`], before the finiteness check (docs/algorithm.md §3.7):
/// the new parameter, the three state slots (slots past the rule's count are carried through)
/// and the update direction before the step size.
#[derive(CubeType, Clone, Copy, Debug)]
pub(crate) struct Updated {
    pub p: f32,
    pub s1: f32,
    pub s2: f32,
    pub s3: f32,
    pub direction: f32,
}

/// One element of the fused step: states `s1..s3` (slot order of [`StepRule::state_maps`]) and
/// the new parameter `decayed − lr·direction`, `lr` being the step size times any trust ratio.
/// The caller applies the result only when the gradient, the new parameter and every new state
/// are finite (docs/algorithm.md §3.7), deciding on the bits: WGSL compilers may assume that NaN
/// never occurs.
///
/// The kernels expand this function; the CPU twin calls it as plain Rust with the rule a
/// constant, so the `match` folds away there too.
// `decayed` and `direction` start as placeholders for the cube macro: every arm assigns both.
#[allow(unused_assignments, clippy::too_many_arguments)]
#[cube]
#[inline(always)]
pub(crate) fn update_element(
    h: &StepScalars,
    lr: f32,
    p: f32,
    g_raw: f32,
    s1: f32,
    s2: f32,
    s3: f32,
    #[comptime] rule: StepRule,
) -> Updated {
    let g = g_raw + h.l2_penalty * p;
    let mut n1 = s1;
    let mut n2 = s2;
    let mut n3 = s3;
    let mut decayed = p;
    let mut direction = 0.0f32;
    match comptime!(rule) {
        StepRule::Adam { amsgrad, cautious } => {
            n1 = h.beta1 * n1 + (1.0 - h.beta1) * g;
            n2 = h.beta2 * n2 + (1.0 - h.beta2) * (g * g);
            let mut v = n2;
            if comptime!(amsgrad) {
                n3 = select(n2 > n3, n2, n3);
                v = n3;
            }
            direction = n1 / (f32::sqrt(v) + h.eps);
            decayed = p * h.decay_factor;
            if comptime!(cautious) {
                let same_sign = (p >= 0.0) == (n1 >= 0.0);
                decayed = select(same_sign, decayed, p);
            }
        }
        StepRule::Sgd => {
            direction = g;
        }
        StepRule::Momentum { nesterov } => {
            n1 = select(h.first_step != 0, g, h.beta1 * n1 + h.beta3 * g);
            direction = n1;
            if comptime!(nesterov) {
                direction = g + h.beta1 * n1;
            }
        }
        StepRule::RmsProp { centered, momentum } => {
            n1 = h.beta1 * n1 + (1.0 - h.beta1) * (g * g);
            let mut avg = n1;
            if comptime!(centered) {
                // The gradient average is the last slot: 3 with momentum, else 2. Quantization
                // error can push the difference below zero, and sqrt of that is NaN.
                if comptime!(momentum) {
                    n3 = h.beta1 * n3 + (1.0 - h.beta1) * g;
                    let difference = n1 - n3 * n3;
                    avg = select(difference > 0.0, difference, 0.0);
                } else {
                    n2 = h.beta1 * n2 + (1.0 - h.beta1) * g;
                    let difference = n1 - n2 * n2;
                    avg = select(difference > 0.0, difference, 0.0);
                }
            }
            direction = g / (f32::sqrt(avg) + h.eps);
            if comptime!(momentum) {
                n2 = h.beta3 * n2 + direction;
                direction = n2;
            }
        }
        StepRule::AdaGrad => {
            n1 += g * g;
            direction = g / (f32::sqrt(n1) + h.eps);
        }
        StepRule::Lion => {
            let c = h.beta1 * n1 + (1.0 - h.beta1) * g;
            direction = select(c > 0.0, 1.0f32, select(c < 0.0, -1.0f32, 0.0f32));
            n1 = h.beta2 * n1 + (1.0 - h.beta2) * g;
            decayed = p * h.decay_factor;
        }
        StepRule::AdEMAMix => {
            n1 = h.beta1 * n1 + (1.0 - h.beta1) * g;
            n2 = h.beta3 * n2 + (1.0 - h.beta3) * g;
            n3 = h.beta2 * n3 + (1.0 - h.beta2) * (g * g);
            direction =
                (n1 / h.correction1 + h.alpha * n2) / (f32::sqrt(n3) / h.correction2 + h.eps);
            decayed = p * h.decay_factor;
        }
        StepRule::Lamb => {
            n1 = h.beta1 * n1 + (1.0 - h.beta1) * g;
            n2 = h.beta2 * n2 + (1.0 - h.beta2) * (g * g);
            direction = (n1 / h.correction1) / (f32::sqrt(n2) / h.correction2 + h.eps)
                + h.direction_decay * p;
        }
    }
    Updated {
        p: decayed - lr * direction,
        s1: n1,
        s2: n2,
        s3: n3,
        direction,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rule_counts_as_many_states_as_it_has_maps_and_names() {
        let rules: Vec<StepRule> = (0..64).filter_map(StepRule::from_code).collect();
        assert_eq!(rules.len(), 15);
        for rule in rules {
            for family in [MapFamily::Dynamic, MapFamily::Linear] {
                assert_eq!(rule.num_states(), rule.state_maps(family).len(), "{rule:?}");
            }
            assert_eq!(rule.num_states(), rule.state_names().len(), "{rule:?}");
            assert_eq!(StepRule::from_code(rule.code()), Some(rule));
        }
    }
}
