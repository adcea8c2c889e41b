//! `Adam8bit`: Adam with block-wise 8-bit states, the twin of Burn's `AdamConfig`.

use burn::config::Config;
use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::decay::WeightDecayConfig;
use burn_8bit_ops::{StepRule, StepScalars};

use crate::engine::UpdateRule;
use crate::engine::sealed::Sealed;
use crate::error::{ConfigError, check_beta, check_non_negative, check_positive};
use crate::optimizer::{Optim8bit, Optim8bitConfig, StateConfig, bias_corrections};
use crate::state::OptimizerKind;

/// Configuration of [`Adam8bit`]: every field and default of Burn's `AdamConfig`, plus the
/// quantization settings.
///
/// ```
/// use burn_8bit_optim::{Adam8bitConfig, Optim8bitConfig, StateConfig};
///
/// let optimizer = Adam8bitConfig::new().with_beta_2(0.995).with_states(StateConfig::new().with_block_size(128)).init();
/// # let _ = optimizer;
/// assert!(Adam8bitConfig::new().with_beta_1(1.0).try_init().is_err());
/// ```
#[derive(Config, Debug)]
pub struct Adam8bitConfig {
    /// Decay rate of the first moment.
    #[config(default = 0.9)]
    pub beta_1: f32,
    /// Decay rate of the second moment.
    #[config(default = 0.999)]
    pub beta_2: f32,
    /// Added to the root of the second moment.
    #[config(default = 1e-5)]
    pub epsilon: f32,
    /// Use the maximum of past second moments (AMSGrad); its state is 8-bit too.
    #[config(default = false)]
    pub amsgrad: bool,
    /// L2 weight decay, added to the gradient (`g += penalty·p`).
    pub weight_decay: Option<WeightDecayConfig>,
    /// Gradient clipping applied by the module optimizer before the step.
    pub grad_clipping: Option<GradientClippingConfig>,
    /// How the states are kept (block size, the size under which they stay `f32`, percentile
    /// clipping, the ablation settings) and whether `bf16` parameters round stochastically.
    #[config(default = "StateConfig::new()")]
    pub states: StateConfig,
}

/// The update rule of [`Adam8bit`], with the validated hyper-parameters of its config.
#[derive(Clone, Debug)]
pub struct AdamRule {
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    amsgrad: bool,
    penalty: f32,
}

impl Optim8bitConfig for Adam8bitConfig {
    type Rule = AdamRule;

    fn try_build(&self) -> Result<Adam8bit, ConfigError> {
        check_beta("beta_1", self.beta_1.into())?;
        check_beta("beta_2", self.beta_2.into())?;
        check_positive("epsilon", self.epsilon.into())?;
        let penalty = self.weight_decay.as_ref().map_or(0.0, |wd| wd.penalty);
        check_non_negative("weight_decay.penalty", penalty.into())?;
        Optim8bit::new(
            AdamRule {
                beta_1: self.beta_1,
                beta_2: self.beta_2,
                epsilon: self.epsilon,
                amsgrad: self.amsgrad,
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

/// Adam's scalars, shared with AdamW: the bias corrections folded into the step size and ε.
pub(crate) fn adam_scalars(beta_1: f32, beta_2: f32, epsilon: f32, lr: f64, time: usize) -> StepScalars {
    let (correction1, correction2) = bias_corrections(beta_1, beta_2, time);
    StepScalars {
        lr: (lr * correction2 / correction1) as f32,
        beta1: beta_1,
        beta2: beta_2,
        eps: (f64::from(epsilon) * correction2) as f32,
        ..StepScalars::default()
    }
}

impl Sealed for AdamRule {}

impl UpdateRule for AdamRule {
    const KIND: OptimizerKind = OptimizerKind::Adam;

    fn step_rule(&self) -> StepRule {
        StepRule::Adam {
            amsgrad: self.amsgrad,
            cautious: false,
        }
    }

    fn scalars(&self, lr: f64, time: usize) -> StepScalars {
        StepScalars {
            l2_penalty: self.penalty,
            ..adam_scalars(self.beta_1, self.beta_2, self.epsilon, lr, time)
        }
    }
}

/// Adam with 8-bit block-wise quantized moments (Kingma and Ba, *Adam: A Method for Stochastic
/// Optimization*, ICLR 2015).
///
/// The states are quantized block-wise as in Dettmers et al., *8-bit Optimizers via Block-wise
/// Quantization*, ICLR 2022. Built by [`Adam8bitConfig`].
pub type Adam8bit = Optim8bit<AdamRule>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{assert_close, assert_rejects};

    #[test]
    fn invalid_values_are_rejected_by_name() {
        assert!(Adam8bitConfig::new().try_build().is_ok());
        assert_rejects(Adam8bitConfig::new().with_beta_1(1.0).try_build(), "beta_1");
        assert_rejects(Adam8bitConfig::new().with_beta_2(-0.1).try_build(), "beta_2");
        assert_rejects(Adam8bitConfig::new().with_epsilon(0.0).try_build(), "epsilon");
        let negative = Some(WeightDecayConfig::new(-1.0));
        assert_rejects(Adam8bitConfig::new().with_weight_decay(negative).try_build(), "weight_decay.penalty");
    }

    #[test]
    fn bias_corrections_fold_into_the_step_size_and_epsilon() {
        let optimizer = Adam8bitConfig::new().with_weight_decay(Some(WeightDecayConfig::new(0.01))).build();
        let scalars = optimizer.rule().scalars(1e-3, 1);
        // lr·√(1 − β2)/(1 − β1) and ε·√(1 − β2) at t = 1, of the `f32` betas.
        let (beta_1, beta_2) = (f64::from(0.9f32), f64::from(0.999f32));
        assert_close(scalars.lr, 1e-3 * (1.0 - beta_2).sqrt() / (1.0 - beta_1));
        assert_close(scalars.eps, f64::from(1e-5f32) * (1.0 - beta_2).sqrt());
        assert_eq!((scalars.l2_penalty, scalars.decay_factor), (0.01, 1.0));
        assert_eq!(optimizer.rule().step_rule(), StepRule::Adam { amsgrad: false, cautious: false });
        let amsgrad = Adam8bitConfig::new().with_amsgrad(true).build();
        assert_eq!(amsgrad.rule().step_rule(), StepRule::Adam { amsgrad: true, cautious: false });
    }
}
