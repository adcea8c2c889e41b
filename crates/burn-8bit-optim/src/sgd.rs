//! `Sgd8bit`: SGD with an 8-bit momentum buffer, the twin of Burn's `SgdConfig`.

use burn::config::Config;
use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn_8bit_ops::{StepRule, StepScalars};

use crate::engine::{StateSettings, UpdateRule};
use crate::error::{ConfigError, check_non_negative, check_range};
use crate::optimizer::{config_8bit, impl_config_builders, impl_optimizer};
use crate::state::OptimizerKind;

config_8bit! {
    /// Configuration of [`Sgd8bit`]: the fields of Burn's `SgdConfig`, except that momentum is
    /// required (plain SGD has no state to quantize), plus the quantization settings.
    ///
    /// ```
    /// use burn::optim::momentum::MomentumConfig;
    /// use burn_8bit_optim::Sgd8bitConfig;
    ///
    /// let momentum = MomentumConfig::new().with_dampening(0.0).with_nesterov(true);
    /// let optimizer = Sgd8bitConfig::new().with_momentum(momentum).init();
    /// # let _ = optimizer;
    /// ```
    #[derive(Config, Debug)]
    pub struct Sgd8bitConfig {
        /// L2 weight decay, added to the gradient.
        pub weight_decay: Option<WeightDecayConfig>,
        /// Momentum μ, dampening and Nesterov (Burn's defaults: 0.9, 0.1, false).
        #[config(default = "MomentumConfig::new()")]
        pub momentum: MomentumConfig,
        /// Gradient clipping applied by the module optimizer before the step.
        pub gradient_clipping: Option<GradientClippingConfig>,
    }
}

/// SGD with an 8-bit block-wise quantized momentum buffer.
#[derive(Clone, Debug)]
pub struct Sgd8bit {
    momentum: f32,
    dampening: f32,
    nesterov: bool,
    penalty: f32,
    settings: StateSettings,
}

impl Sgd8bitConfig {
    /// The optimizer, or the first invalid value as a typed error.
    pub fn try_build(&self) -> Result<Sgd8bit, ConfigError> {
        check_range("momentum.momentum", self.momentum.momentum, 0.0, 1.0, true, "a value in [0, 1]")?;
        check_range("momentum.dampening", self.momentum.dampening, 0.0, 1.0, true, "a value in [0, 1]")?;
        let penalty = self.weight_decay.as_ref().map_or(0.0, |wd| wd.penalty);
        check_non_negative("weight_decay.penalty", penalty.into())?;
        Ok(Sgd8bit {
            momentum: self.momentum.momentum as f32,
            dampening: self.momentum.dampening as f32,
            nesterov: self.momentum.nesterov,
            penalty,
            settings: self.state_settings()?,
        })
    }
}

impl_config_builders!(Sgd8bitConfig => Sgd8bit, gradient_clipping);

impl UpdateRule for Sgd8bit {
    const KIND: OptimizerKind = OptimizerKind::Sgd;

    fn step_rule(&self) -> StepRule {
        StepRule::Momentum {
            nesterov: self.nesterov,
        }
    }

    fn scalars(&self, lr: f64, time: usize) -> StepScalars {
        StepScalars {
            lr: lr as f32,
            beta1: self.momentum,
            beta3: 1.0 - self.dampening,
            penalty: self.penalty,
            first_step: u32::from(time == 1),
            ..StepScalars::default()
        }
    }

    fn settings(&self) -> StateSettings {
        self.settings
    }
}

impl_optimizer!(Sgd8bit);
