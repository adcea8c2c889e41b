//! What the nine optimizer files share: the quantization fields of every config, the Burn
//! `Optimizer` impl over the common engine and the `build`/`init` family of every config.

/// A config struct (`#[derive(Config)]`, its own fields as written) followed by the
/// quantization fields every 8-bit config shares, with their defaults and documentation.
macro_rules! config_8bit {
    ($(#[$meta:meta])* pub struct $name:ident { $($fields:tt)* }) => {
        $(#[$meta])*
        pub struct $name {
            $($fields)*
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
            /// Ablation setting: the family of the states' code maps. `Dynamic` is the paper's
            /// method; `Linear` reproduces its linear-quantization ablation (less precise for
            /// small values).
            #[config(default = "burn_8bit_ops::MapFamily::Dynamic")]
            pub map_family: burn_8bit_ops::MapFamily,
            /// Ablation setting: one absmax per tensor instead of one per block (the paper's
            /// ablation without block-wise scaling). Runs in two passes with `f32` temporaries —
            /// decode, update, re-encode against the new whole-tensor absmax — instead of the
            /// fused step.
            #[config(default = false)]
            pub whole_tensor_block: bool,
        }
    };
}

/// Implements `burn::optim::Optimizer` for an 8-bit optimizer through [`crate::engine::step`].
macro_rules! impl_optimizer {
    ($optimizer:ty) => {
        impl burn::optim::Optimizer for $optimizer {
            type State<const D: usize> = $crate::state::Optim8bitState<D>;

            fn step<const D: usize>(
                &self,
                lr: burn::optim::LearningRate,
                tensor: burn::tensor::Tensor<D>,
                grad: burn::tensor::Tensor<D>,
                state: Option<Self::State<D>>,
            ) -> (burn::tensor::Tensor<D>, Option<Self::State<D>>) {
                $crate::engine::step(self, lr, tensor, grad, state)
            }

            fn to_device<const D: usize>(
                state: Self::State<D>,
                device: &burn::tensor::Device,
            ) -> Self::State<D> {
                state.to_device(device)
            }
        }

        impl $crate::switch::SwitchRecord for $optimizer {
            fn state_layout(&self) -> $crate::switch::StateLayout {
                $crate::switch::StateLayout::of(self)
            }
        }
    };
}

/// `try_build`, `build`, `try_init` and `init` of a config whose `try_build` body is given, with
/// its gradient-clipping field named.
macro_rules! impl_config_builders {
    ($config:ty => $optimizer:ty, $clipping:ident) => {
        impl $config {
            /// The optimizer for `ModuleOptimizer::with_group` or direct per-tensor use; panics
            /// with the [`crate::ConfigError`] message on an invalid config.
            pub fn build(&self) -> $optimizer {
                self.try_build().unwrap_or_else(|error| panic!("{error}"))
            }

            /// The module optimizer (with this config's gradient clipping), or the first invalid
            /// value as a typed error.
            pub fn try_init(&self) -> Result<burn::optim::ModuleOptimizer, $crate::ConfigError> {
                let mut optim = burn::optim::ModuleOptimizer::from(self.try_build()?);
                if let Some(config) = &self.$clipping {
                    optim = optim.with_grad_clipping(config.init());
                }
                Ok(optim)
            }

            /// The module optimizer; panics with the [`crate::ConfigError`] message on an
            /// invalid config (see [`Self::try_init`]).
            pub fn init(&self) -> burn::optim::ModuleOptimizer {
                self.try_init().unwrap_or_else(|error| panic!("{error}"))
            }

            /// The same config with `f32` states for every tensor (`min_8bit_size` = `usize::MAX`):
            /// the 32-bit twin, e.g. for embeddings or to measure what 8-bit costs.
            pub fn f32_states(self) -> Self {
                self.with_min_8bit_size(usize::MAX)
            }

            /// Checks every value of the config.
            pub fn validate(&self) -> Result<(), $crate::ConfigError> {
                self.try_build().map(|_| ())
            }

            /// The quantization fields, validated.
            fn state_settings(&self) -> Result<$crate::engine::StateSettings, $crate::ConfigError> {
                $crate::optimizer::settings(
                    self.block_size,
                    self.min_8bit_size,
                    self.percentile_clipping,
                    self.map_family,
                    self.whole_tensor_block,
                )
            }
        }
    };
}

pub(crate) use {config_8bit, impl_config_builders, impl_optimizer};

use burn_8bit_ops::{BlockSize, MapFamily};

use crate::engine::StateSettings;
use crate::error::ConfigError;

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
