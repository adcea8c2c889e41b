//! `Lion8bit`: Lion with an 8-bit momentum, the twin of Burn's `LionConfig`.

use burn::config::Config;
use burn::optim::grad_clipping::GradientClippingConfig;
use burn_8bit_ops::{StepRule, StepScalars};

use crate::engine::UpdateRule;
use crate::engine::sealed::Sealed;
use crate::error::{ConfigError, check_beta, check_non_negative};
use crate::optimizer::{Optim8bit, Optim8bitConfig, StateConfig, decay_factor};
use crate::state::OptimizerKind;

/// Configuration of [`Lion8bit`]: every field and default of Burn's `LionConfig`, plus the
/// quantization settings.
///
/// ```
/// use burn_8bit_optim::{Lion8bitConfig, Optim8bitConfig};
///
/// let optimizer = Lion8bitConfig::new().with_weight_decay(0.1).init();
/// # let _ = optimizer;
/// ```
#[derive(Config, Debug)]
pub struct Lion8bitConfig {
    /// Interpolation between momentum and gradient for the update's sign.
    #[config(default = 0.9)]
    pub beta_1: f32,
    /// Decay rate of the momentum.
    #[config(default = 0.99)]
    pub beta_2: f32,
    /// Decoupled weight decay: `p *= 1 − lr·weight_decay`.
    #[config(default = 0.0)]
    pub weight_decay: f32,
    /// Gradient clipping applied by the module optimizer before the step.
    pub grad_clipping: Option<GradientClippingConfig>,
    /// How the states are kept (block size, the size under which they stay `f32`, percentile
    /// clipping, the ablation settings) and whether `bf16` parameters round stochastically.
    #[config(default = "StateConfig::new()")]
    pub states: StateConfig,
}

/// The update rule of [`Lion8bit`], with the validated hyper-parameters of its config.
#[derive(Clone, Debug)]
pub struct LionRule {
    beta_1: f32,
    beta_2: f32,
    weight_decay: f32,
}

impl Optim8bitConfig for Lion8bitConfig {
    type Rule = LionRule;

    fn try_build(&self) -> Result<Lion8bit, ConfigError> {
        check_beta("beta_1", self.beta_1.into())?;
        check_beta("beta_2", self.beta_2.into())?;
        check_non_negative("weight_decay", self.weight_decay.into())?;
        Optim8bit::new(
            LionRule {
                beta_1: self.beta_1,
                beta_2: self.beta_2,
                weight_decay: self.weight_decay,
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

impl Sealed for LionRule {}

impl UpdateRule for LionRule {
    const KIND: OptimizerKind = OptimizerKind::Lion;

    fn step_rule(&self) -> StepRule {
        StepRule::Lion
    }

    fn scalars(&self, lr: f64, _time: usize) -> StepScalars {
        StepScalars {
            lr: lr as f32,
            beta1: self.beta_1,
            beta2: self.beta_2,
            decay_factor: decay_factor(lr, self.weight_decay),
            ..StepScalars::default()
        }
    }
}

/// Lion (the sign of an interpolated momentum) with an 8-bit block-wise quantized momentum (Chen et
/// al., *Symbolic Discovery of Optimization Algorithms*, NeurIPS 2023).
///
/// The states are quantized block-wise as in Dettmers et al., *8-bit Optimizers via Block-wise
/// Quantization*, ICLR 2022. Built by [`Lion8bitConfig`].
pub type Lion8bit = Optim8bit<LionRule>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{assert_close, assert_rejects};

    #[test]
    fn invalid_values_are_rejected_by_name() {
        assert!(Lion8bitConfig::new().try_build().is_ok());
        assert_rejects(Lion8bitConfig::new().with_beta_1(1.0).try_build(), "beta_1");
        assert_rejects(Lion8bitConfig::new().with_beta_2(1.5).try_build(), "beta_2");
        assert_rejects(Lion8bitConfig::new().with_weight_decay(-1.0).try_build(), "weight_decay");
    }

    #[test]
    fn weight_decay_is_decoupled() {
        let scalars = Lion8bitConfig::new().with_weight_decay(0.5).build().rule().scalars(1e-2, 4);
        assert_close(scalars.decay_factor, 1.0 - 1e-2 * 0.5);
        assert_eq!((scalars.lr, scalars.beta1, scalars.beta2, scalars.l2_penalty), (1e-2, 0.9, 0.99, 0.0));
    }
}
