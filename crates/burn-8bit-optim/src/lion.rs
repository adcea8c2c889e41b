//! `Lion8bit`: Lion with an 8-bit momentum, the twin of Burn's `LionConfig`.

use burn::config::Config;
use burn::optim::grad_clipping::GradientClippingConfig;
use burn_8bit_ops::{StepRule, StepScalars};

use crate::engine::{StateSettings, UpdateRule};
use crate::error::{ConfigError, check_beta, check_non_negative};
use crate::optimizer::{config_8bit, decay_factor, impl_config_builders, impl_optimizer};
use crate::state::OptimizerKind;

config_8bit! {
    /// Configuration of [`Lion8bit`]: every field and default of Burn's `LionConfig`, plus the
    /// quantization settings.
    ///
    /// ```
    /// use burn_8bit_optim::Lion8bitConfig;
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
    }
}

/// Lion (sign of an interpolated momentum) with an 8-bit block-wise quantized momentum.
#[derive(Clone, Debug)]
pub struct Lion8bit {
    beta_1: f32,
    beta_2: f32,
    weight_decay: f32,
    settings: StateSettings,
}

impl Lion8bitConfig {
    /// The optimizer, or the first invalid value as a typed error.
    pub fn try_build(&self) -> Result<Lion8bit, ConfigError> {
        check_beta("beta_1", self.beta_1.into())?;
        check_beta("beta_2", self.beta_2.into())?;
        check_non_negative("weight_decay", self.weight_decay.into())?;
        Ok(Lion8bit {
            beta_1: self.beta_1,
            beta_2: self.beta_2,
            weight_decay: self.weight_decay,
            settings: self.state_settings()?,
        })
    }
}

impl_config_builders!(Lion8bitConfig => Lion8bit, grad_clipping);

impl UpdateRule for Lion8bit {
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

    fn settings(&self) -> StateSettings {
        self.settings
    }
}

impl_optimizer!(Lion8bit);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{assert_close, assert_rejects};

    #[test]
    fn invalid_values_are_rejected_by_name() {
        assert!(Lion8bitConfig::new().validate().is_ok());
        assert_rejects(Lion8bitConfig::new().with_beta_1(1.0).try_build(), "beta_1");
        assert_rejects(Lion8bitConfig::new().with_beta_2(1.5).try_build(), "beta_2");
        assert_rejects(Lion8bitConfig::new().with_weight_decay(-1.0).try_build(), "weight_decay");
    }

    #[test]
    fn weight_decay_is_decoupled() {
        let scalars = Lion8bitConfig::new().with_weight_decay(0.5).build().scalars(1e-2, 4);
        assert_close(scalars.decay_factor, 1.0 - 1e-2 * 0.5);
        assert_eq!((scalars.lr, scalars.beta1, scalars.beta2, scalars.l2_penalty), (1e-2, 0.9, 0.99, 0.0));
    }
}
