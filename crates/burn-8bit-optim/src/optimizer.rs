//! The one 8-bit optimizer, generic over its update rule: Burn's `Optimizer`, the record
//! conversion and the module optimizer written once for the nine configs; the validation of the
//! quantization fields every config shares.

use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::{LearningRate, ModuleOptimizer, Optimizer};
use burn::tensor::{Device, Tensor};
use burn_8bit_ops::{BlockSize, MapFamily};

use crate::engine::{StateSettings, UpdateRule, step};
use crate::error::ConfigError;
use crate::state::Optim8bitState;
use crate::switch::{StateLayout, SwitchRecord};

/// An optimizer with block-wise 8-bit states: the update rule `R` of one of the configs and how
/// its states are kept. Each config builds its own (`AdamW8bitConfig::build` gives an
/// [`AdamW8bit`](crate::AdamW8bit) = `Optim8bit<AdamWRule>`); every one takes one fused op per
/// tensor and step.
///
/// ```
/// use burn::optim::Optimizer;
/// use burn_8bit_optim::{AdamW8bit, AdamW8bitConfig};
///
/// let optimizer: AdamW8bit = AdamW8bitConfig::new().with_block_size(128).build();
/// # let _ = optimizer;
/// ```
#[derive(Clone, Debug)]
pub struct Optim8bit<R> {
    rule: R,
    settings: StateSettings,
}

impl<R: UpdateRule> Optim8bit<R> {
    /// The optimizer of `rule` with the shared fields of its config, validated.
    pub(crate) fn new(
        rule: R,
        block_size: usize,
        min_8bit_size: usize,
        percentile_clipping: usize,
        map_family: MapFamily,
        whole_tensor_block: bool,
    ) -> Result<Self, ConfigError> {
        let settings = settings(block_size, min_8bit_size, percentile_clipping, map_family, whole_tensor_block)?;
        Ok(Self { rule, settings })
    }

    /// The update rule, with its validated hyper-parameters (for the rules' unit tests).
    #[cfg(test)]
    pub(crate) fn rule(&self) -> &R {
        &self.rule
    }

    /// The module optimizer of this optimizer, with gradient clipping when given.
    pub(crate) fn into_module(self, clipping: Option<&GradientClippingConfig>) -> ModuleOptimizer {
        let optim = ModuleOptimizer::from(self);
        match clipping {
            Some(config) => optim.with_grad_clipping(config.init()),
            None => optim,
        }
    }
}

impl<R: UpdateRule> Optimizer for Optim8bit<R> {
    type State<const D: usize> = Optim8bitState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        step(&self.rule, self.settings, lr, tensor, grad, state)
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        state.to_device(device)
    }
}

impl<R: UpdateRule> SwitchRecord for Optim8bit<R> {
    fn state_layout(&self) -> StateLayout {
        StateLayout::of(&self.rule, self.settings)
    }
}

/// The value of a config's `try_*` method; panics with the [`ConfigError`] message (the
/// `build`/`init` of every config).
pub(crate) fn or_panic<T>(result: Result<T, ConfigError>) -> T {
    result.unwrap_or_else(|error| panic!("{error}"))
}

/// The quantization fields every config shares, validated.
pub(crate) fn settings(
    block_size: usize,
    min_8bit_size: usize,
    percentile_clipping: usize,
    map_family: MapFamily,
    whole_tensor_block: bool,
) -> Result<StateSettings, ConfigError> {
    if percentile_clipping > 100 {
        return Err(ConfigError::OutOfRange {
            name: "percentile_clipping",
            value: percentile_clipping as f64,
            expected: "a percentile in 0..=99, or 100 for off",
        });
    }
    Ok(StateSettings {
        block_size: BlockSize::new(block_size)?,
        min_8bit_size,
        percentile: (percentile_clipping < 100).then_some(percentile_clipping),
        map_family,
        whole_tensor_block,
    })
}

/// Decoupled weight decay as the parameter's multiplier, `1 − lr·weight_decay`.
pub(crate) fn decay_factor(lr: f64, weight_decay: f32) -> f32 {
    (1.0 - lr * f64::from(weight_decay)) as f32
}

/// `(1 − β1^t, sqrt(1 − β2^t))` in `f64`, the bias corrections of every rule that has them.
pub(crate) fn bias_corrections(beta_1: f32, beta_2: f32, time: usize) -> (f64, f64) {
    let t = i32::try_from(time).unwrap_or(i32::MAX);
    (1.0 - f64::from(beta_1).powi(t), (1.0 - f64::from(beta_2).powi(t)).sqrt())
}

#[cfg(test)]
mod tests {
    use burn_8bit_ops::QuantError;

    use super::*;
    use crate::error::assert_rejects;

    #[test]
    fn the_shared_fields_are_validated() {
        let valid = settings(256, 4096, 100, MapFamily::Dynamic, false).unwrap();
        assert_eq!(valid.percentile, None);
        assert_eq!(settings(256, 4096, 5, MapFamily::Dynamic, false).unwrap().percentile, Some(5));
        assert_rejects(settings(256, 4096, 101, MapFamily::Dynamic, false), "percentile_clipping");
        assert!(matches!(
            settings(100, 4096, 100, MapFamily::Dynamic, false),
            Err(ConfigError::BlockSize(QuantError::InvalidBlockSize(100)))
        ));
    }

    #[test]
    fn bias_corrections_at_the_first_step() {
        let (correction1, correction2) = bias_corrections(0.9, 0.999, 1);
        assert_eq!(correction1, 1.0 - f64::from(0.9f32));
        assert_eq!(correction2, (1.0 - f64::from(0.999f32)).sqrt());
        assert_eq!(bias_corrections(0.9, 0.999, usize::MAX), (1.0, 1.0));
    }
}
