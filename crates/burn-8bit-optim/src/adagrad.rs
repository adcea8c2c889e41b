//! `AdaGrad8bit`: Adagrad with an 8-bit sum of squares, the twin of Burn's `AdaGradConfig`.

use burn::config::Config;
use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::decay::WeightDecayConfig;
use burn_8bit_ops::{StepRule, StepScalars};

use crate::engine::UpdateRule;
use crate::engine::sealed::Sealed;
use crate::error::{ConfigError, check_non_negative, check_positive};
use crate::optimizer::{Optim8bit, Optim8bitConfig, StateConfig};
use crate::state::OptimizerKind;

/// Configuration of [`AdaGrad8bit`]: every field and default of Burn's `AdaGradConfig`, plus
/// the quantization settings. The step size at step `t` is `lr / (1 + (t − 1)·lr_decay)`.
///
/// ```
/// use burn_8bit_optim::{AdaGrad8bitConfig, Optim8bitConfig};
///
/// let optimizer = AdaGrad8bitConfig::new().with_lr_decay(1e-3).init();
/// # let _ = optimizer;
/// ```
#[derive(Config, Debug)]
pub struct AdaGrad8bitConfig {
    /// Learning-rate decay per step.
    #[config(default = 0.)]
    pub lr_decay: f64,
    /// Added to the root of the sum of squares.
    #[config(default = 1e-5)]
    pub epsilon: f32,
    /// L2 weight decay, added to the gradient.
    pub weight_decay: Option<WeightDecayConfig>,
    /// Gradient clipping applied by the module optimizer before the step.
    pub grad_clipping: Option<GradientClippingConfig>,
    /// How the states are kept (block size, the size under which they stay `f32`, percentile
    /// clipping, the ablation settings) and whether `bf16` parameters round stochastically.
    #[config(default = "StateConfig::new()")]
    pub states: StateConfig,
}

/// The update rule of [`AdaGrad8bit`], with the validated hyper-parameters of its config.
#[derive(Clone, Debug)]
pub struct AdaGradRule {
    lr_decay: f64,
    epsilon: f32,
    penalty: f32,
}

impl Optim8bitConfig for AdaGrad8bitConfig {
    type Rule = AdaGradRule;

    fn try_build(&self) -> Result<AdaGrad8bit, ConfigError> {
        check_non_negative("lr_decay", self.lr_decay)?;
        check_positive("epsilon", self.epsilon.into())?;
        let penalty = self.weight_decay.as_ref().map_or(0.0, |wd| wd.penalty);
        check_non_negative("weight_decay.penalty", penalty.into())?;
        Optim8bit::new(
            AdaGradRule {
                lr_decay: self.lr_decay,
                epsilon: self.epsilon,
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

impl Sealed for AdaGradRule {}

impl UpdateRule for AdaGradRule {
    const KIND: OptimizerKind = OptimizerKind::AdaGrad;

    fn step_rule(&self) -> StepRule {
        StepRule::AdaGrad
    }

    fn scalars(&self, lr: f64, time: usize) -> StepScalars {
        StepScalars {
            lr: (lr / (1.0 + (time as f64 - 1.0) * self.lr_decay)) as f32,
            eps: self.epsilon,
            l2_penalty: self.penalty,
            ..StepScalars::default()
        }
    }
}

/// Adagrad with an 8-bit block-wise quantized sum of squared gradients (Duchi, Hazan and Singer,
/// *Adaptive Subgradient Methods for Online Learning and Stochastic Optimization*, JMLR 2011).
///
/// The states are quantized block-wise as in Dettmers et al., *8-bit Optimizers via Block-wise
/// Quantization*, ICLR 2022. Built by [`AdaGrad8bitConfig`].
pub type AdaGrad8bit = Optim8bit<AdaGradRule>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{assert_close, assert_rejects};

    #[test]
    fn invalid_values_are_rejected_by_name() {
        assert!(AdaGrad8bitConfig::new().try_build().is_ok());
        assert_rejects(AdaGrad8bitConfig::new().with_lr_decay(-1.0).try_build(), "lr_decay");
        assert_rejects(AdaGrad8bitConfig::new().with_epsilon(0.0).try_build(), "epsilon");
        let negative = Some(WeightDecayConfig::new(-1.0));
        assert_rejects(AdaGrad8bitConfig::new().with_weight_decay(negative).try_build(), "weight_decay.penalty");
    }

    #[test]
    fn the_step_size_decays_with_the_step_count() {
        let optimizer = AdaGrad8bitConfig::new().with_lr_decay(0.5).build();
        assert_close(optimizer.rule().scalars(0.1, 1).lr, 0.1);
        // lr / (1 + (t − 1)·lr_decay) at t = 3.
        assert_close(optimizer.rule().scalars(0.1, 3).lr, 0.05);
        assert_eq!(optimizer.rule().step_rule(), StepRule::AdaGrad);
    }
}
