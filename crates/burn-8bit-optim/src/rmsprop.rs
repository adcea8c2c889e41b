//! `RmsProp8bit`: RMSprop with 8-bit states, the twin of Burn's `RmsPropConfig`.

use burn::config::Config;
use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::decay::WeightDecayConfig;
use burn_8bit_ops::{StepRule, StepScalars};

use crate::engine::UpdateRule;
use crate::engine::sealed::Sealed;
use crate::error::{ConfigError, check_beta, check_non_negative, check_positive};
use crate::optimizer::{Optim8bit, Optim8bitConfig, StateConfig};
use crate::state::OptimizerKind;

/// Configuration of [`RmsProp8bit`]: every field and default of Burn's `RmsPropConfig`, plus
/// the quantization settings. The square average uses the unsigned map (all 256 codes for
/// values ≥ 0), the momentum buffer and the centred mean the signed one.
///
/// ```
/// use burn_8bit_optim::{Optim8bitConfig, RmsProp8bitConfig};
///
/// let optimizer = RmsProp8bitConfig::new().with_momentum(0.0).with_centered(true).init();
/// # let _ = optimizer;
/// ```
#[derive(Config, Debug)]
pub struct RmsProp8bitConfig {
    /// Smoothing constant of the square average.
    #[config(default = 0.99)]
    pub alpha: f32,
    /// Momentum of the normalised gradient (0 = no momentum buffer).
    #[config(default = 0.9)]
    pub momentum: f32,
    /// Added to the root of the square average.
    #[config(default = 1e-5)]
    pub epsilon: f32,
    /// Normalise by the variance estimate `E[g²] − E[g]²` (clamped at 0) instead of `E[g²]`.
    #[config(default = false)]
    pub centered: bool,
    /// L2 weight decay, added to the gradient.
    pub weight_decay: Option<WeightDecayConfig>,
    /// Gradient clipping applied by the module optimizer before the step.
    pub grad_clipping: Option<GradientClippingConfig>,
    /// How the states are kept (block size, the size under which they stay `f32`, percentile
    /// clipping, the ablation settings) and whether `bf16` parameters round stochastically.
    #[config(default = "StateConfig::new()")]
    pub states: StateConfig,
}

/// The update rule of [`RmsProp8bit`], with the validated hyper-parameters of its config.
#[derive(Clone, Debug)]
pub struct RmsPropRule {
    alpha: f32,
    momentum: f32,
    epsilon: f32,
    centered: bool,
    penalty: f32,
}

impl Optim8bitConfig for RmsProp8bitConfig {
    type Rule = RmsPropRule;

    fn try_build(&self) -> Result<RmsProp8bit, ConfigError> {
        check_beta("alpha", self.alpha.into())?;
        check_beta("momentum", self.momentum.into())?;
        check_positive("epsilon", self.epsilon.into())?;
        let penalty = self.weight_decay.as_ref().map_or(0.0, |wd| wd.penalty);
        check_non_negative("weight_decay.penalty", penalty.into())?;
        Optim8bit::new(
            RmsPropRule {
                alpha: self.alpha,
                momentum: self.momentum,
                epsilon: self.epsilon,
                centered: self.centered,
                penalty,
            },
            &self.states,
        )
    }

    fn grad_clipping(&self) -> Option<&GradientClippingConfig> {
        self.grad_clipping.as_ref()
    }

    fn states_mut(&mut self) -> &mut StateConfig {
        &mut self.states
    }
}

impl Sealed for RmsPropRule {}

impl UpdateRule for RmsPropRule {
    const KIND: OptimizerKind = OptimizerKind::RmsProp;

    fn step_rule(&self) -> StepRule {
        StepRule::RmsProp {
            centered: self.centered,
            momentum: self.momentum > 0.0,
        }
    }

    fn scalars(&self, lr: f64, _time: usize) -> StepScalars {
        StepScalars {
            lr: lr as f32,
            beta1: self.alpha,
            beta3: self.momentum,
            eps: self.epsilon,
            l2_penalty: self.penalty,
            ..StepScalars::default()
        }
    }
}

/// RMSprop with 8-bit block-wise quantized states (Tieleman and Hinton, *Neural Networks for
/// Machine Learning*, lecture 6.5, 2012).
///
/// The states are quantized block-wise as in Dettmers et al., *8-bit Optimizers via Block-wise
/// Quantization*, ICLR 2022. Built by [`RmsProp8bitConfig`].
pub type RmsProp8bit = Optim8bit<RmsPropRule>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::assert_rejects;

    #[test]
    fn invalid_values_are_rejected_by_name() {
        assert!(RmsProp8bitConfig::new().try_build().is_ok());
        assert_rejects(RmsProp8bitConfig::new().with_alpha(1.0).try_build(), "alpha");
        assert_rejects(RmsProp8bitConfig::new().with_momentum(-0.1).try_build(), "momentum");
        assert_rejects(RmsProp8bitConfig::new().with_epsilon(0.0).try_build(), "epsilon");
        let negative = Some(WeightDecayConfig::new(-1.0));
        assert_rejects(RmsProp8bitConfig::new().with_weight_decay(negative).try_build(), "weight_decay.penalty");
    }

    #[test]
    fn the_rule_keeps_only_the_states_it_uses() {
        let plain = RmsProp8bitConfig::new().with_momentum(0.0).build();
        assert_eq!(plain.rule().step_rule(), StepRule::RmsProp { centered: false, momentum: false });
        let full = RmsProp8bitConfig::new().with_centered(true).build();
        assert_eq!(full.rule().step_rule(), StepRule::RmsProp { centered: true, momentum: true });
        let scalars = full.rule().scalars(0.01, 7);
        assert_eq!((scalars.lr, scalars.beta1, scalars.beta3, scalars.eps), (0.01, 0.99, 0.9, 1e-5));
    }
}
