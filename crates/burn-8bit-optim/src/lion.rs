//! `Lion8bit`: Lion with an 8-bit momentum, the twin of Burn's `LionConfig`.

use burn::config::Config;
use burn::optim::grad_clipping::GradientClippingConfig;
use burn_8bit_ops::{MapFamily, StepRule, StepScalars};

use crate::engine::{StateSettings, UpdateRule};
use crate::error::{ConfigError, check_beta, check_non_negative};
use crate::optimizer::{impl_config_builders, impl_optimizer, settings};
use crate::state::OptimizerKind;

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
    /// Elements per quantization block: a power of two in 64..=4096.
    #[config(default = 256)]
    pub block_size: usize,
    /// Tensors with fewer elements keep `f32` states.
    #[config(default = 4096)]
    pub min_8bit_size: usize,
    /// Percentile clipping (bitsandbytes): each tensor's gradient is scaled down to the
    /// `percentile_clipping`-th percentile (0–99) of its last 100 gradient norms; 100 = off.
    #[config(default = 100)]
    pub percentile_clipping: usize,
    /// Ablation setting: the family of the states' code maps. `Dynamic` is the paper's method;
    /// `Linear` reproduces its linear-quantization ablation (less precise for small values).
    #[config(default = "MapFamily::Dynamic")]
    pub map_family: MapFamily,
    /// Ablation setting: one absmax per tensor instead of one per block (the paper's ablation
    /// without block-wise scaling). Runs in two passes with `f32` temporaries — decode, update,
    /// re-encode against the new whole-tensor absmax — instead of the fused step.
    #[config(default = false)]
    pub whole_tensor_block: bool,
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
            settings: settings(
                self.block_size,
                self.min_8bit_size,
                self.percentile_clipping,
                self.map_family,
                self.whole_tensor_block,
            )?,
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
            decay: (1.0 - lr * f64::from(self.weight_decay)) as f32,
            ..StepScalars::default()
        }
    }

    fn settings(&self) -> StateSettings {
        self.settings
    }
}

impl_optimizer!(Lion8bit);
