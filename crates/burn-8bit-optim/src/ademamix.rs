//! `AdEMAMix8bit`: AdEMAMix (Pagliardini et al., 2024) with 8-bit states, after bitsandbytes'
//! `AdEMAMix8bit` (Burn has no 32-bit AdEMAMix).

use burn::config::Config;
use burn::optim::grad_clipping::GradientClippingConfig;
use burn_8bit_ops::{StepRule, StepScalars};

use crate::engine::UpdateRule;
use crate::engine::sealed::Sealed;
use crate::error::{ConfigError, check_beta, check_non_negative, check_positive};
use crate::optimizer::{Optim8bit, Optim8bitConfig, StateConfig, bias_corrections, decay_factor};
use crate::state::OptimizerKind;

/// Configuration of [`AdEMAMix8bit`]: bitsandbytes' fields and defaults, plus the quantization
/// settings.
///
/// ```
/// use burn_8bit_optim::{AdEMAMix8bitConfig, Optim8bitConfig};
///
/// let optimizer = AdEMAMix8bitConfig::new()
///     .with_t_alpha(Some(10_000))
///     .with_t_beta3(Some(10_000))
///     .init();
/// # let _ = optimizer;
/// ```
#[derive(Config, Debug)]
pub struct AdEMAMix8bitConfig {
    /// Decay rate of the fast EMA.
    #[config(default = 0.9)]
    pub beta_1: f32,
    /// Decay rate of the second moment.
    #[config(default = 0.999)]
    pub beta_2: f32,
    /// Decay rate of the slow EMA (reached at `t_beta3` when scheduled).
    #[config(default = 0.9999)]
    pub beta_3: f32,
    /// Weight of the slow EMA (reached at `t_alpha` when scheduled).
    #[config(default = 5.0)]
    pub alpha: f32,
    /// Added to the root of the second moment.
    #[config(default = 1e-8)]
    pub epsilon: f32,
    /// Decoupled weight decay: `p *= 1 − lr·weight_decay`.
    #[config(default = 1e-2)]
    pub weight_decay: f32,
    /// Steps of the linear warm-up of α (none: α from the start).
    pub t_alpha: Option<usize>,
    /// Steps of the warm-up of β3 (none: β3 from the start).
    pub t_beta3: Option<usize>,
    /// Gradient clipping applied by the module optimizer before the step.
    pub grad_clipping: Option<GradientClippingConfig>,
    /// How the states are kept (block size, the size under which they stay `f32`, percentile
    /// clipping, the ablation settings) and whether `bf16` parameters round stochastically.
    #[config(default = "StateConfig::new()")]
    pub states: StateConfig,
}

/// The update rule of [`AdEMAMix8bit`], with the validated hyper-parameters of its config.
#[derive(Clone, Debug)]
pub struct AdEMAMixRule {
    beta_1: f32,
    beta_2: f32,
    beta_3: f32,
    alpha: f32,
    epsilon: f32,
    weight_decay: f32,
    t_alpha: Option<usize>,
    t_beta3: Option<usize>,
}

impl Optim8bitConfig for AdEMAMix8bitConfig {
    type Rule = AdEMAMixRule;

    fn try_build(&self) -> Result<AdEMAMix8bit, ConfigError> {
        check_beta("beta_1", self.beta_1.into())?;
        check_beta("beta_2", self.beta_2.into())?;
        check_beta("beta_3", self.beta_3.into())?;
        check_non_negative("alpha", self.alpha.into())?;
        check_positive("epsilon", self.epsilon.into())?;
        check_non_negative("weight_decay", self.weight_decay.into())?;
        for (name, steps) in [("t_alpha", self.t_alpha), ("t_beta3", self.t_beta3)] {
            if steps == Some(0) {
                return Err(ConfigError::OutOfRange {
                    name,
                    value: 0.0,
                    expected: "at least one step, or none",
                });
            }
        }
        Optim8bit::new(
            AdEMAMixRule {
                beta_1: self.beta_1,
                beta_2: self.beta_2,
                beta_3: self.beta_3,
                alpha: self.alpha,
                epsilon: self.epsilon,
                weight_decay: self.weight_decay,
                t_alpha: self.t_alpha,
                t_beta3: self.t_beta3,
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

impl AdEMAMixRule {
    /// α at step `time`: `min(t·α / t_alpha, α)`.
    fn alpha_at(&self, time: usize) -> f64 {
        let alpha = f64::from(self.alpha);
        match self.t_alpha {
            Some(steps) => (time as f64 * alpha / steps as f64).min(alpha),
            None => alpha,
        }
    }

    /// β3 at step `time`: the schedule that makes the slow EMA's half-life grow linearly.
    fn beta_3_at(&self, time: usize) -> f64 {
        let beta_3 = f64::from(self.beta_3);
        match self.t_beta3 {
            Some(steps) => {
                let s = time as f64 / steps as f64;
                let (ln_1, ln_3) = (f64::from(self.beta_1).ln(), beta_3.ln());
                ((ln_1 * ln_3) / ((1.0 - s) * ln_3 + s * ln_1)).exp().min(beta_3)
            }
            None => beta_3,
        }
    }
}

impl Sealed for AdEMAMixRule {}

impl UpdateRule for AdEMAMixRule {
    const KIND: OptimizerKind = OptimizerKind::AdEMAMix;

    fn step_rule(&self) -> StepRule {
        StepRule::AdEMAMix
    }

    fn scalars(&self, lr: f64, time: usize) -> StepScalars {
        let (correction1, correction2) = bias_corrections(self.beta_1, self.beta_2, time);
        StepScalars {
            lr: lr as f32,
            beta1: self.beta_1,
            beta2: self.beta_2,
            beta3: self.beta_3_at(time) as f32,
            alpha: self.alpha_at(time) as f32,
            eps: self.epsilon,
            correction1: correction1 as f32,
            correction2: correction2 as f32,
            decay_factor: decay_factor(lr, self.weight_decay),
            ..StepScalars::default()
        }
    }
}

/// AdEMAMix with 8-bit block-wise quantized fast EMA, slow EMA and second moment (Pagliardini,
/// Ablin and Grangier, *The AdEMAMix Optimizer: Better, Faster, Older*, ICLR 2025).
///
/// The states are quantized block-wise as in Dettmers et al., *8-bit Optimizers via Block-wise
/// Quantization*, ICLR 2022. Built by [`AdEMAMix8bitConfig`].
pub type AdEMAMix8bit = Optim8bit<AdEMAMixRule>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{assert_close, assert_rejects};

    #[test]
    fn invalid_values_are_rejected_by_name() {
        assert!(AdEMAMix8bitConfig::new().try_build().is_ok());
        assert_rejects(AdEMAMix8bitConfig::new().with_beta_3(1.0).try_build(), "beta_3");
        assert_rejects(AdEMAMix8bitConfig::new().with_alpha(-1.0).try_build(), "alpha");
        assert_rejects(AdEMAMix8bitConfig::new().with_epsilon(0.0).try_build(), "epsilon");
        assert_rejects(AdEMAMix8bitConfig::new().with_t_alpha(Some(0)).try_build(), "t_alpha");
        assert_rejects(AdEMAMix8bitConfig::new().with_t_beta3(Some(0)).try_build(), "t_beta3");
    }

    #[test]
    fn alpha_and_beta_3_warm_up_over_their_schedules() {
        let optimizer = AdEMAMix8bitConfig::new().with_t_alpha(Some(100)).with_t_beta3(Some(100)).build();
        assert_close(optimizer.rule().scalars(1e-3, 50).alpha, 2.5);
        assert_close(optimizer.rule().scalars(1e-3, 200).alpha, 5.0);
        // β3 starts near β1 and reaches its own value at the end of the schedule.
        let beta_3: Vec<f32> = [1, 50, 100].map(|time| optimizer.rule().scalars(1e-3, time).beta3).into();
        assert!(0.9 < beta_3[0] && beta_3[0] < beta_3[1] && beta_3[1] < beta_3[2], "{beta_3:?}");
        assert_close(beta_3[2], f64::from(0.9999f32));
        let first = optimizer.rule().scalars(1e-3, 1);
        assert_close(first.correction1, 1.0 - f64::from(0.9f32));
        assert_close(first.correction2, (1.0 - f64::from(0.999f32)).sqrt());
    }
}
