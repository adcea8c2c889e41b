//! `Sgd8bit`: SGD with an 8-bit momentum buffer, the twin of Burn's `SgdConfig`.

use burn::config::Config;
use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn_8bit_ops::{StepRule, StepScalars};

use crate::engine::UpdateRule;
use crate::engine::sealed::Sealed;
use crate::error::{ConfigError, check_non_negative, check_range};
use crate::optimizer::{Optim8bit, Optim8bitConfig, StateConfig};
use crate::state::OptimizerKind;

/// Configuration of [`Sgd8bit`]: the fields and defaults of Burn's `SgdConfig` (no momentum
/// unless one is given), plus the quantization settings. Without momentum SGD keeps no state,
/// so there is nothing to quantize: the step is plain SGD through the same fused op.
///
/// ```
/// use burn::optim::momentum::MomentumConfig;
/// use burn_8bit_optim::{Optim8bitConfig, Sgd8bitConfig};
///
/// let momentum = MomentumConfig::new().with_dampening(0.0).with_nesterov(true);
/// let optimizer = Sgd8bitConfig::new().with_momentum(Some(momentum)).init();
/// # let _ = optimizer;
/// ```
#[derive(Config, Debug)]
pub struct Sgd8bitConfig {
    /// L2 weight decay, added to the gradient.
    pub weight_decay: Option<WeightDecayConfig>,
    /// Momentum μ, dampening and Nesterov (`MomentumConfig::new()`: 0.9, 0.1, false); `None`
    /// (the default, as in Burn) is plain SGD.
    pub momentum: Option<MomentumConfig>,
    /// Gradient clipping applied by the module optimizer before the step.
    pub gradient_clipping: Option<GradientClippingConfig>,
    /// How the states are kept (block size, the size under which they stay `f32`, percentile
    /// clipping, the ablation settings) and whether `bf16` parameters round stochastically.
    #[config(default = "StateConfig::new()")]
    pub states: StateConfig,
}

/// The update rule of [`Sgd8bit`], with the validated hyper-parameters of its config.
#[derive(Clone, Debug)]
pub struct SgdRule {
    momentum: Option<Momentum>,
    penalty: f32,
}

/// The momentum of [`Sgd8bit`], validated.
#[derive(Clone, Copy, Debug)]
struct Momentum {
    momentum: f32,
    dampening: f32,
    nesterov: bool,
}

impl Optim8bitConfig for Sgd8bitConfig {
    type Rule = SgdRule;

    fn try_build(&self) -> Result<Sgd8bit, ConfigError> {
        let momentum = match &self.momentum {
            Some(config) => {
                check_range("momentum.momentum", config.momentum, 0.0, 1.0, true, "a value in [0, 1]")?;
                check_range("momentum.dampening", config.dampening, 0.0, 1.0, true, "a value in [0, 1]")?;
                Some(Momentum {
                    momentum: config.momentum as f32,
                    dampening: config.dampening as f32,
                    nesterov: config.nesterov,
                })
            }
            None => None,
        };
        let penalty = self.weight_decay.as_ref().map_or(0.0, |wd| wd.penalty);
        check_non_negative("weight_decay.penalty", penalty.into())?;
        Optim8bit::new(
            SgdRule {
                momentum,
                penalty,
            },
            &self.states,
        )
    }

    fn grad_clipping(&self) -> Option<&GradientClippingConfig> {
        self.gradient_clipping.as_ref()
    }

    fn states_mut(&mut self) -> &mut StateConfig {
        &mut self.states
    }
}

impl Sealed for SgdRule {}

impl UpdateRule for SgdRule {
    const KIND: OptimizerKind = OptimizerKind::Sgd;

    fn step_rule(&self) -> StepRule {
        match self.momentum {
            Some(momentum) => StepRule::Momentum { nesterov: momentum.nesterov },
            None => StepRule::Sgd,
        }
    }

    fn scalars(&self, lr: f64, time: usize) -> StepScalars {
        let plain = StepScalars {
            lr: lr as f32,
            l2_penalty: self.penalty,
            ..StepScalars::default()
        };
        match self.momentum {
            Some(momentum) => StepScalars {
                beta1: momentum.momentum,
                beta3: 1.0 - momentum.dampening,
                first_step: u32::from(time == 1),
                ..plain
            },
            None => plain,
        }
    }
}

/// SGD with an 8-bit block-wise quantized momentum buffer, or none: plain SGD (momentum as in
/// Polyak 1964; Nesterov's as in Sutskever et al., *On the importance of initialization and
/// momentum in deep learning*, ICML 2013).
///
/// The states are quantized block-wise as in Dettmers et al., *8-bit Optimizers via Block-wise
/// Quantization*, ICLR 2022. Built by [`Sgd8bitConfig`].
pub type Sgd8bit = Optim8bit<SgdRule>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::assert_rejects;

    #[test]
    fn invalid_values_are_rejected_by_name() {
        assert!(Sgd8bitConfig::new().try_build().is_ok());
        let momentum = |momentum: f64, dampening: f64| {
            Sgd8bitConfig::new().with_momentum(Some(MomentumConfig::new().with_momentum(momentum).with_dampening(dampening)))
        };
        assert_rejects(momentum(1.5, 0.0).try_build(), "momentum.momentum");
        assert_rejects(momentum(0.9, -0.1).try_build(), "momentum.dampening");
        let negative = Some(WeightDecayConfig::new(-1.0));
        assert_rejects(Sgd8bitConfig::new().with_weight_decay(negative).try_build(), "weight_decay.penalty");
    }

    #[test]
    fn momentum_takes_its_state_and_dampening_from_the_second_step() {
        let plain = Sgd8bitConfig::new().build();
        assert_eq!(plain.rule().step_rule(), StepRule::Sgd);
        assert_eq!(plain.rule().scalars(0.5, 1).lr, 0.5);
        let config = MomentumConfig::new().with_momentum(0.8).with_dampening(0.25).with_nesterov(true);
        let optimizer = Sgd8bitConfig::new().with_momentum(Some(config)).build();
        assert_eq!(optimizer.rule().step_rule(), StepRule::Momentum { nesterov: true });
        let (first, second) = (optimizer.rule().scalars(0.5, 1), optimizer.rule().scalars(0.5, 2));
        assert_eq!((first.beta1, first.beta3, first.first_step), (0.8, 0.75, 1));
        assert_eq!(second.first_step, 0);
    }
}
