//! `Lamb8bit`: LAMB with block-wise 8-bit states, the twin of Burn's `LambConfig`.

use burn::config::Config;
use burn::optim::grad_clipping::GradientClippingConfig;
use burn_8bit_ops::{StepRule, StepScalars};

use crate::engine::{Trust, UpdateRule};
use crate::engine::sealed::Sealed;
use crate::error::{ConfigError, check_beta, check_non_negative, check_positive};
use crate::optimizer::{Optim8bit, Optim8bitConfig, StateConfig, bias_corrections};
use crate::state::OptimizerKind;

/// Configuration of [`Lamb8bit`]: every field and default of Burn's `LambConfig`, plus the
/// 8-bit settings.
///
/// The step is two passes over the tensor: the first computes the norms of the parameter and
/// of the update direction (states decoded, nothing written), the second is the fused step with
/// the trust ratio `‖p‖ / ‖u‖` as a device scalar.
///
/// ```
/// use burn_8bit_optim::{Lamb8bitConfig, Optim8bitConfig};
///
/// let optimizer = Lamb8bitConfig::new().with_weight_decay(0.01).init();
/// # let _ = optimizer;
/// ```
#[derive(Config, Debug)]
pub struct Lamb8bitConfig {
    /// Decay rate of the first moment.
    #[config(default = 0.9)]
    pub beta_1: f32,
    /// Decay rate of the second moment.
    #[config(default = 0.999)]
    pub beta_2: f32,
    /// Added to the root of the bias-corrected second moment.
    #[config(default = 1e-6)]
    pub epsilon: f32,
    /// Weight decay added to the update direction (`u += weight_decay·p`).
    #[config(default = 0.0)]
    pub weight_decay: f32,
    /// Scale the update by the trust ratio `‖p‖ / ‖u‖` (1 when either norm is 0).
    #[config(default = true)]
    pub use_trust_ratio: bool,
    /// Gradient clipping applied by the module optimizer before the step.
    pub grad_clipping: Option<GradientClippingConfig>,
    /// How the states are kept (block size, the size under which they stay `f32`, percentile
    /// clipping, the ablation settings) and whether `bf16` parameters round stochastically.
    #[config(default = "StateConfig::new()")]
    pub states: StateConfig,
}

/// The update rule of [`Lamb8bit`], with the validated hyper-parameters of its config.
#[derive(Clone, Debug)]
pub struct LambRule {
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    weight_decay: f32,
    use_trust_ratio: bool,
}

impl Optim8bitConfig for Lamb8bitConfig {
    type Rule = LambRule;

    fn try_build(&self) -> Result<Lamb8bit, ConfigError> {
        check_beta("beta_1", self.beta_1.into())?;
        check_beta("beta_2", self.beta_2.into())?;
        check_positive("epsilon", self.epsilon.into())?;
        check_non_negative("weight_decay", self.weight_decay.into())?;
        Optim8bit::new(
            LambRule {
                beta_1: self.beta_1,
                beta_2: self.beta_2,
                epsilon: self.epsilon,
                weight_decay: self.weight_decay,
                use_trust_ratio: self.use_trust_ratio,
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

impl Sealed for LambRule {}

impl UpdateRule for LambRule {
    const KIND: OptimizerKind = OptimizerKind::Lamb;

    fn step_rule(&self) -> StepRule {
        StepRule::Lamb
    }

    fn scalars(&self, lr: f64, time: usize) -> StepScalars {
        let (correction1, correction2) = bias_corrections(self.beta_1, self.beta_2, time);
        StepScalars {
            lr: lr as f32,
            beta1: self.beta_1,
            beta2: self.beta_2,
            eps: self.epsilon,
            correction1: correction1 as f32,
            correction2: correction2 as f32,
            direction_decay: self.weight_decay,
            ..StepScalars::default()
        }
    }

    fn trust(&self) -> Option<Trust> {
        self.use_trust_ratio.then_some(Trust::Lamb)
    }
}

/// LAMB with 8-bit block-wise quantized moments (You et al., *Large Batch Optimization for Deep
/// Learning: Training BERT in 76 minutes*, ICLR 2020).
///
/// The states are quantized block-wise as in Dettmers et al., *8-bit Optimizers via Block-wise
/// Quantization*, ICLR 2022. Built by [`Lamb8bitConfig`].
pub type Lamb8bit = Optim8bit<LambRule>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{assert_close, assert_rejects};

    #[test]
    fn invalid_values_are_rejected_by_name() {
        assert!(Lamb8bitConfig::new().try_build().is_ok());
        assert_rejects(Lamb8bitConfig::new().with_beta_1(1.0).try_build(), "beta_1");
        assert_rejects(Lamb8bitConfig::new().with_epsilon(0.0).try_build(), "epsilon");
        assert_rejects(Lamb8bitConfig::new().with_weight_decay(-0.1).try_build(), "weight_decay");
    }

    #[test]
    fn the_trust_ratio_is_optional() {
        let optimizer = Lamb8bitConfig::new().with_weight_decay(0.01).build();
        assert_eq!(optimizer.rule().trust(), Some(Trust::Lamb));
        assert_eq!(Lamb8bitConfig::new().with_use_trust_ratio(false).build().rule().trust(), None);
        let scalars = optimizer.rule().scalars(1e-3, 1);
        // The bias corrections of every rule: 1 − β1^t and sqrt(1 − β2^t), in f64.
        assert_close(scalars.correction1, 1.0 - f64::from(0.9f32));
        assert_close(scalars.correction2, (1.0 - f64::from(0.999f32)).sqrt());
        assert_eq!(scalars.direction_decay, 0.01);
    }
}
