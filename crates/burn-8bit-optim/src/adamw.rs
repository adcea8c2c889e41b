//! `AdamW8bit`: AdamW with block-wise 8-bit states, the twin of Burn's `AdamWConfig`.

use burn::config::Config;
use burn::optim::grad_clipping::GradientClippingConfig;
use burn_8bit_ops::{StepRule, StepScalars};

use crate::adam::adam_scalars;
use crate::engine::{StateSettings, UpdateRule};
use crate::error::{ConfigError, check_beta, check_non_negative, check_positive};
use crate::optimizer::{config_8bit, decay_factor, impl_config_builders, impl_optimizer};
use crate::state::OptimizerKind;

config_8bit! {
    /// Configuration of [`AdamW8bit`]: every field and default of Burn's `AdamWConfig`, plus the
    /// quantization settings.
    ///
    /// ```
    /// use burn_8bit_optim::AdamW8bitConfig;
    ///
    /// let optimizer = AdamW8bitConfig::new().with_weight_decay(0.01).init();
    /// # let _ = optimizer;
    /// ```
    #[derive(Config, Debug)]
    pub struct AdamW8bitConfig {
        /// Decay rate of the first moment.
        #[config(default = 0.9)]
        pub beta_1: f32,
        /// Decay rate of the second moment.
        #[config(default = 0.999)]
        pub beta_2: f32,
        /// Added to the root of the second moment.
        #[config(default = 1e-5)]
        pub epsilon: f32,
        /// Decoupled weight decay: `p *= 1 − lr·weight_decay` before the update.
        #[config(default = 1e-4)]
        pub weight_decay: f32,
        /// Decay only where the parameter and the first moment have the same sign.
        #[config(default = false)]
        pub cautious_weight_decay: bool,
        /// Use the maximum of past second moments (AMSGrad); its state is 8-bit too.
        #[config(default = false)]
        pub amsgrad: bool,
        /// Gradient clipping applied by the module optimizer before the step.
        pub grad_clipping: Option<GradientClippingConfig>,
    }
}

/// AdamW with 8-bit block-wise quantized moments.
#[derive(Clone, Debug)]
pub struct AdamW8bit {
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    weight_decay: f32,
    cautious_weight_decay: bool,
    amsgrad: bool,
    settings: StateSettings,
}

impl AdamW8bitConfig {
    /// The optimizer, or the first invalid value as a typed error.
    pub fn try_build(&self) -> Result<AdamW8bit, ConfigError> {
        check_beta("beta_1", self.beta_1.into())?;
        check_beta("beta_2", self.beta_2.into())?;
        check_positive("epsilon", self.epsilon.into())?;
        check_non_negative("weight_decay", self.weight_decay.into())?;
        Ok(AdamW8bit {
            beta_1: self.beta_1,
            beta_2: self.beta_2,
            epsilon: self.epsilon,
            weight_decay: self.weight_decay,
            cautious_weight_decay: self.cautious_weight_decay,
            amsgrad: self.amsgrad,
            settings: self.state_settings()?,
        })
    }
}

impl_config_builders!(AdamW8bitConfig => AdamW8bit, grad_clipping);

impl UpdateRule for AdamW8bit {
    const KIND: OptimizerKind = OptimizerKind::AdamW;

    fn step_rule(&self) -> StepRule {
        StepRule::Adam {
            amsgrad: self.amsgrad,
            cautious: self.cautious_weight_decay,
        }
    }

    fn scalars(&self, lr: f64, time: usize) -> StepScalars {
        StepScalars {
            decay_factor: decay_factor(lr, self.weight_decay),
            ..adam_scalars(self.beta_1, self.beta_2, self.epsilon, lr, time)
        }
    }

    fn settings(&self) -> StateSettings {
        self.settings
    }
}

impl_optimizer!(AdamW8bit);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{assert_close, assert_rejects};

    #[test]
    fn invalid_values_are_rejected_by_name() {
        assert!(AdamW8bitConfig::new().validate().is_ok());
        assert_rejects(AdamW8bitConfig::new().with_beta_1(-0.5).try_build(), "beta_1");
        assert_rejects(AdamW8bitConfig::new().with_beta_2(1.0).try_build(), "beta_2");
        assert_rejects(AdamW8bitConfig::new().with_epsilon(-1e-8).try_build(), "epsilon");
        assert_rejects(AdamW8bitConfig::new().with_weight_decay(-0.1).try_build(), "weight_decay");
    }

    #[test]
    fn decoupled_weight_decay_scales_the_parameter() {
        let optimizer = AdamW8bitConfig::new().with_weight_decay(0.1).with_cautious_weight_decay(true).build();
        let scalars = optimizer.scalars(1e-2, 2);
        assert_close(scalars.decay_factor, 1.0 - 1e-2 * 0.1);
        assert_eq!(scalars.l2_penalty, 0.0);
        // t = 2: lr·√(1 − β2²)/(1 − β1²), of the `f32` betas.
        let (beta_1, beta_2) = (f64::from(0.9f32), f64::from(0.999f32));
        assert_close(scalars.lr, 1e-2 * (1.0 - beta_2.powi(2)).sqrt() / (1.0 - beta_1.powi(2)));
        assert_eq!(optimizer.step_rule(), StepRule::Adam { amsgrad: false, cautious: true });
    }
}
