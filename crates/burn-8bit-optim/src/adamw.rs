//! `AdamW8bit`: AdamW with block-wise 8-bit states, the twin of Burn's `AdamWConfig`.

use burn::config::Config;
use burn::optim::grad_clipping::GradientClippingConfig;
use burn_8bit_ops::{StepRule, StepScalars};

use crate::adam::adam_scalars;
use crate::engine::UpdateRule;
use crate::engine::sealed::Sealed;
use crate::error::{ConfigError, check_beta, check_non_negative, check_positive};
use crate::optimizer::{Optim8bit, Optim8bitConfig, StateConfig, decay_factor};
use crate::state::OptimizerKind;

/// Configuration of [`AdamW8bit`]: every field and default of Burn's `AdamWConfig`, plus the
/// quantization settings.
///
/// ```
/// use burn_8bit_optim::{AdamW8bitConfig, Optim8bitConfig};
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
    /// How the states are kept (block size, the size under which they stay `f32`, percentile
    /// clipping, the ablation settings) and whether `bf16` parameters round stochastically.
    #[config(default = "StateConfig::new()")]
    pub states: StateConfig,
}

/// The update rule of [`AdamW8bit`], with the validated hyper-parameters of its config.
#[derive(Clone, Debug)]
pub struct AdamWRule {
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    weight_decay: f32,
    cautious_weight_decay: bool,
    amsgrad: bool,
}

impl Optim8bitConfig for AdamW8bitConfig {
    type Rule = AdamWRule;

    fn try_build(&self) -> Result<AdamW8bit, ConfigError> {
        check_beta("beta_1", self.beta_1.into())?;
        check_beta("beta_2", self.beta_2.into())?;
        check_positive("epsilon", self.epsilon.into())?;
        check_non_negative("weight_decay", self.weight_decay.into())?;
        Optim8bit::new(
            AdamWRule {
                beta_1: self.beta_1,
                beta_2: self.beta_2,
                epsilon: self.epsilon,
                weight_decay: self.weight_decay,
                cautious_weight_decay: self.cautious_weight_decay,
                amsgrad: self.amsgrad,
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

impl Sealed for AdamWRule {}

impl UpdateRule for AdamWRule {
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
}

/// AdamW with 8-bit block-wise quantized moments (Loshchilov and Hutter, *Decoupled Weight Decay
/// Regularization*, ICLR 2019).
///
/// The states are quantized block-wise as in Dettmers et al., *8-bit Optimizers via Block-wise
/// Quantization*, ICLR 2022. Built by [`AdamW8bitConfig`].
pub type AdamW8bit = Optim8bit<AdamWRule>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{assert_close, assert_rejects};

    #[test]
    fn invalid_values_are_rejected_by_name() {
        assert!(AdamW8bitConfig::new().try_build().is_ok());
        assert_rejects(AdamW8bitConfig::new().with_beta_1(-0.5).try_build(), "beta_1");
        assert_rejects(AdamW8bitConfig::new().with_beta_2(1.0).try_build(), "beta_2");
        assert_rejects(AdamW8bitConfig::new().with_epsilon(-1e-8).try_build(), "epsilon");
        assert_rejects(AdamW8bitConfig::new().with_weight_decay(-0.1).try_build(), "weight_decay");
    }

    #[test]
    fn decoupled_weight_decay_scales_the_parameter() {
        let optimizer = AdamW8bitConfig::new().with_weight_decay(0.1).with_cautious_weight_decay(true).build();
        let scalars = optimizer.rule().scalars(1e-2, 2);
        assert_close(scalars.decay_factor, 1.0 - 1e-2 * 0.1);
        assert_eq!(scalars.l2_penalty, 0.0);
        // t = 2: lr·√(1 − β2²)/(1 − β1²), of the `f32` betas.
        let (beta_1, beta_2) = (f64::from(0.9f32), f64::from(0.999f32));
        assert_close(scalars.lr, 1e-2 * (1.0 - beta_2.powi(2)).sqrt() / (1.0 - beta_1.powi(2)));
        assert_eq!(optimizer.rule().step_rule(), StepRule::Adam { amsgrad: false, cautious: true });
    }
}
