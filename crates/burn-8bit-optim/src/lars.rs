//! `Lars8bit`: bitsandbytes' LARS (momentum SGD with an update-norm clip) with an 8-bit momentum.

use burn::config::Config;
use burn::optim::grad_clipping::GradientClippingConfig;
use burn_8bit_ops::{StepRule, StepScalars};

use crate::engine::{Trust, UpdateRule};
use crate::engine::sealed::Sealed;
use crate::error::{ConfigError, check_non_negative, check_positive, check_range};
use crate::optimizer::{Optim8bit, Optim8bitConfig, StateConfig};
use crate::state::OptimizerKind;

/// Configuration of [`Lars8bit`], after bitsandbytes' `LARS8bit` (Burn has no LARS): momentum
/// `m = μ·m + (1 − dampening)·g` (`m = g` on the first step), L2 weight decay, and the step
/// `p −= lr·s·m` with `s = min(1, max_unorm·‖p‖ / ‖m‖)`.
///
/// The step is two passes over the tensor: norms first, then the fused step with `s` as a
/// device scalar.
///
/// ```
/// use burn_8bit_optim::{Lars8bitConfig, Optim8bitConfig};
///
/// let optimizer = Lars8bitConfig::new().with_weight_decay(1e-4).init();
/// # let _ = optimizer;
/// ```
#[derive(Config, Debug)]
pub struct Lars8bitConfig {
    /// Momentum μ.
    #[config(default = 0.9)]
    pub momentum: f32,
    /// Dampening of the gradient in the momentum.
    #[config(default = 0.0)]
    pub dampening: f32,
    /// L2 weight decay, added to the gradient.
    #[config(default = 0.0)]
    pub weight_decay: f32,
    /// The largest update norm, relative to the parameter norm.
    #[config(default = 0.02)]
    pub max_unorm: f32,
    /// Gradient clipping applied by the module optimizer before the step.
    pub grad_clipping: Option<GradientClippingConfig>,
    /// How the states are kept (block size, the size under which they stay `f32`, percentile
    /// clipping, the ablation settings) and whether `bf16` parameters round stochastically.
    #[config(default = "StateConfig::new()")]
    pub states: StateConfig,
}

/// The update rule of [`Lars8bit`], with the validated hyper-parameters of its config.
#[derive(Clone, Debug)]
pub struct LarsRule {
    momentum: f32,
    dampening: f32,
    weight_decay: f32,
    max_unorm: f32,
}

impl Optim8bitConfig for Lars8bitConfig {
    type Rule = LarsRule;

    fn try_build(&self) -> Result<Lars8bit, ConfigError> {
        check_range("momentum", self.momentum.into(), 0.0, 1.0, false, "a value in [0, 1)")?;
        check_range("dampening", self.dampening.into(), 0.0, 1.0, true, "a value in [0, 1]")?;
        check_non_negative("weight_decay", self.weight_decay.into())?;
        check_positive("max_unorm", self.max_unorm.into())?;
        Optim8bit::new(
            LarsRule {
                momentum: self.momentum,
                dampening: self.dampening,
                weight_decay: self.weight_decay,
                max_unorm: self.max_unorm,
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

impl Sealed for LarsRule {}

impl UpdateRule for LarsRule {
    const KIND: OptimizerKind = OptimizerKind::Lars;

    fn step_rule(&self) -> StepRule {
        StepRule::Momentum { nesterov: false }
    }

    fn scalars(&self, lr: f64, time: usize) -> StepScalars {
        StepScalars {
            lr: lr as f32,
            beta1: self.momentum,
            beta3: 1.0 - self.dampening,
            l2_penalty: self.weight_decay,
            first_step: u32::from(time == 1),
            ..StepScalars::default()
        }
    }

    fn trust(&self) -> Option<Trust> {
        Some(Trust::Lars {
            max_unorm: self.max_unorm,
        })
    }
}

/// LARS with an 8-bit block-wise quantized momentum (You, Gitman and Ginsburg, *Large Batch
/// Training of Convolutional Networks*, arXiv:1708.03888, 2017).
///
/// The states are quantized block-wise as in Dettmers et al., *8-bit Optimizers via Block-wise
/// Quantization*, ICLR 2022. Built by [`Lars8bitConfig`].
pub type Lars8bit = Optim8bit<LarsRule>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::assert_rejects;

    #[test]
    fn invalid_values_are_rejected_by_name() {
        assert!(Lars8bitConfig::new().try_build().is_ok());
        assert_rejects(Lars8bitConfig::new().with_momentum(1.0).try_build(), "momentum");
        assert_rejects(Lars8bitConfig::new().with_dampening(1.5).try_build(), "dampening");
        assert_rejects(Lars8bitConfig::new().with_weight_decay(-1.0).try_build(), "weight_decay");
        assert_rejects(Lars8bitConfig::new().with_max_unorm(0.0).try_build(), "max_unorm");
    }

    #[test]
    fn momentum_with_a_clipped_trust_ratio() {
        let optimizer = Lars8bitConfig::new().with_weight_decay(1e-4).with_dampening(0.1).build();
        assert_eq!(optimizer.rule().trust(), Some(Trust::Lars { max_unorm: 0.02 }));
        assert_eq!(optimizer.rule().step_rule(), StepRule::Momentum { nesterov: false });
        let (first, later) = (optimizer.rule().scalars(0.1, 1), optimizer.rule().scalars(0.1, 2));
        assert_eq!((first.beta1, first.beta3, first.l2_penalty, first.first_step), (0.9, 0.9, 1e-4, 1));
        assert_eq!(later.first_step, 0);
    }
}
