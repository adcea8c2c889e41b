//! The one 8-bit optimizer, generic over its update rule: Burn's `Optimizer`, the record
//! conversion and the module optimizer written once for the nine configs; the validation of the
//! quantization fields every config shares.

use burn::config::Config;
use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::{LearningRate, ModuleOptimizer, Optimizer};
use burn::tensor::{Device, Tensor};
use burn_8bit_ops::{BlockSize, MapFamily};

use crate::engine::{StateSettings, UpdateRule, step};
use crate::error::ConfigError;
use crate::state::Optim8bitState;
use crate::switch::{StateLayout, SwitchRecord};

/// How an 8-bit optimizer keeps its states, and how it writes `bf16` parameters: the settings
/// every config shares, as its `states` field.
///
/// ```
/// use burn_8bit_optim::{AdamW8bitConfig, Optim8bitConfig, StateConfig};
///
/// let states = StateConfig::new().with_block_size(128).with_min_8bit_size(1024);
/// let optimizer = AdamW8bitConfig::new().with_states(states).init();
/// # let _ = optimizer;
/// ```
#[derive(Config, Debug, PartialEq)]
pub struct StateConfig {
    /// Elements per quantization block: a power of two in 64..=4096.
    #[config(default = 256)]
    pub block_size: usize,
    /// Tensors with fewer elements keep `f32` states.
    #[config(default = 4096)]
    pub min_8bit_size: usize,
    /// Percentile clipping (bitsandbytes): each gradient is scaled down to this percentile
    /// (0–99) of its tensor's last 100 gradient norms; 100 = off.
    #[config(default = 100)]
    pub percentile_clipping: usize,
    /// Bits per code of quantized states: 8, or 4 for 4-bit states (Li, Chen, Zhu, *Memory
    /// Efficient Optimizers with 4-bit States*, 2023): signed states (first moments, momentum)
    /// in the 4-bit dynamic map, non-negative ones (second moments, accumulators) in the 4-bit
    /// linear map without zero, [`MapFamily::FourBit`]. The paper's block size for them is 128.
    /// Every rule takes them, since every state is either signed or non-negative; Adam and AdamW
    /// are the ones measured (docs/benchmarks.md).
    #[config(default = 8)]
    pub state_bits: u32,
    /// With 4-bit states, the paper's rank-1 normalisation of the second moment (the rule's
    /// first non-negative state): a tensor of rank ≥ 2 viewed as a `dim0 × rest` matrix keeps
    /// the largest value of each row and each column, and each element is scaled by the smaller
    /// of its two, where these norms take no more memory than the codes
    /// ([`Rank1Quantized::fits`](burn_8bit_ops::Rank1Quantized::fits)). Other tensors and states
    /// stay block-wise. `false`: block-wise everywhere, as torchao's `AdamW4bit`. 8-bit states
    /// and the whole-tensor ablation are always block-wise.
    #[config(default = true)]
    pub rank1_second_moment: bool,
    /// Ablation setting: the family of the states' 8-bit code maps, `Dynamic` (the paper's
    /// method) or `Linear` (its linear-quantization ablation, less precise for small values).
    /// `state_bits = 4` takes [`MapFamily::FourBit`], which may also be named here.
    #[config(default = "MapFamily::Dynamic")]
    pub map_family: MapFamily,
    /// Ablation setting: one absmax per tensor instead of one per block (the paper's ablation;
    /// two passes with `f32` temporaries instead of the fused step).
    #[config(default = false)]
    pub whole_tensor_block: bool,
    /// Round `bf16` parameters stochastically instead of to nearest, so that updates smaller
    /// than half a `bf16` unit still move them on average (Zamirai et al., *Revisiting BFloat16
    /// Training*, 2020). The random bits come from a counter-based generator keyed by
    /// (`rounding_seed`, step, element index): the same bits on every backend and every run. It
    /// applies where the parameter and its gradient are both `bf16` (Burn's autodiff gives
    /// gradients in the parameter's type); `f32` and `f16` parameters round to nearest.
    #[config(default = false)]
    pub stochastic_rounding: bool,
    /// The seed of `stochastic_rounding`'s random bits.
    #[config(default = 0)]
    pub rounding_seed: u64,
}

impl StateConfig {
    /// The same settings with `f32` states for every tensor (`min_8bit_size` = `usize::MAX`).
    pub fn f32_states(self) -> Self {
        self.with_min_8bit_size(usize::MAX)
    }

    /// The settings, validated.
    fn settings(&self) -> Result<StateSettings, ConfigError> {
        if self.percentile_clipping > 100 {
            return Err(ConfigError::OutOfRange {
                name: "states.percentile_clipping",
                value: self.percentile_clipping as f64,
                expected: "a percentile in 0..=99, or 100 for off",
            });
        }
        let map_family = match (self.state_bits, self.map_family) {
            (8, MapFamily::FourBit) => {
                return Err(ConfigError::Incompatible {
                    fields: "states.state_bits = 8 and states.map_family = FourBit",
                    reason: "the FourBit maps hold 4-bit codes",
                });
            }
            (8, family) => family,
            (4, MapFamily::Linear) => {
                return Err(ConfigError::Incompatible {
                    fields: "states.state_bits = 4 and states.map_family = Linear",
                    reason: "4-bit states take the FourBit maps; there is no 4-bit linear ablation",
                });
            }
            (4, _) => MapFamily::FourBit,
            (bits, _) => {
                return Err(ConfigError::OutOfRange {
                    name: "states.state_bits",
                    value: f64::from(bits),
                    expected: "8 or 4",
                });
            }
        };
        Ok(StateSettings {
            block_size: BlockSize::new(self.block_size)?,
            min_8bit_size: self.min_8bit_size,
            percentile: (self.percentile_clipping < 100).then_some(self.percentile_clipping),
            map_family,
            rank1: map_family == MapFamily::FourBit && self.rank1_second_moment && !self.whole_tensor_block,
            whole_tensor_block: self.whole_tensor_block,
            rounding_seed: self.stochastic_rounding.then_some(self.rounding_seed),
        })
    }
}

/// An optimizer with block-wise 8-bit states: the update rule `R` of one of the configs and how
/// its states are kept. Each config builds its own ([`Optim8bitConfig::build`] of
/// `AdamW8bitConfig` gives an [`AdamW8bit`](crate::AdamW8bit) = `Optim8bit<AdamWRule>`); every
/// one takes one fused op per tensor and step.
///
/// ```
/// use burn::optim::Optimizer;
/// use burn_8bit_optim::{AdamW8bit, AdamW8bitConfig, Optim8bitConfig};
///
/// let optimizer: AdamW8bit = AdamW8bitConfig::new().build();
/// # let _ = optimizer;
/// ```
#[derive(Clone, Debug)]
pub struct Optim8bit<R> {
    rule: R,
    settings: StateSettings,
}

impl<R: UpdateRule> Optim8bit<R> {
    /// The optimizer of `rule` keeping its states as `states` says, validated.
    pub(crate) fn new(rule: R, states: &StateConfig) -> Result<Self, ConfigError> {
        Ok(Self { rule, settings: states.settings()? })
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

/// What every 8-bit config builds: the optimizer for one tensor or parameter group
/// ([`build`](Self::build)), Burn's module optimizer ([`init`](Self::init)), each with a `try_`
/// twin that returns the first invalid value as a [`ConfigError`], and the config's 32-bit twin
/// ([`f32_states`](Self::f32_states)). Implemented by the nine configs; bring it into scope to
/// call these methods.
///
/// ```
/// use burn_8bit_optim::{Adam8bitConfig, AdamW8bitConfig, ConfigError, Optim8bitConfig};
///
/// let module_optimizer = AdamW8bitConfig::new().with_weight_decay(0.01).init();
/// let head_optimizer = AdamW8bitConfig::new().f32_states().build();
/// assert!(matches!(Adam8bitConfig::new().with_beta_1(1.0).try_init(), Err(ConfigError::OutOfRange { name: "beta_1", .. })));
/// # let _ = (module_optimizer, head_optimizer);
/// ```
pub trait Optim8bitConfig: Sized {
    /// The update rule of the optimizer this config builds.
    type Rule: UpdateRule;

    /// The optimizer, or the first invalid value as a typed error.
    fn try_build(&self) -> Result<Optim8bit<Self::Rule>, ConfigError>;

    /// The gradient clipping the module optimizer applies before each step (the config's
    /// `grad_clipping` field).
    fn grad_clipping(&self) -> Option<&GradientClippingConfig>;

    /// How the states are kept (the config's `states` field).
    fn states_mut(&mut self) -> &mut StateConfig;

    /// The optimizer for `ModuleOptimizer::with_group` or direct per-tensor use; panics with the
    /// [`ConfigError`] message on an invalid config.
    fn build(&self) -> Optim8bit<Self::Rule> {
        or_panic(self.try_build())
    }

    /// The module optimizer (with this config's gradient clipping), or the first invalid value
    /// as a typed error.
    fn try_init(&self) -> Result<ModuleOptimizer, ConfigError> {
        Ok(self.try_build()?.into_module(self.grad_clipping()))
    }

    /// The module optimizer; panics with the [`ConfigError`] message on an invalid config.
    fn init(&self) -> ModuleOptimizer {
        or_panic(self.try_init())
    }

    /// The same config with `f32` states for every tensor ([`StateConfig::f32_states`]): the
    /// 32-bit twin, e.g. for embeddings or to measure what 8-bit costs.
    fn f32_states(mut self) -> Self {
        let states = self.states_mut();
        *states = states.clone().f32_states();
        self
    }
}

/// The value of a `try_*` method; panics with the [`ConfigError`] message.
fn or_panic<T>(result: Result<T, ConfigError>) -> T {
    result.unwrap_or_else(|error| panic!("{error}"))
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
    fn the_state_settings_are_validated() {
        let valid = StateConfig::new().settings().unwrap();
        assert_eq!(valid.percentile, None);
        assert_eq!(StateConfig::new().with_percentile_clipping(5).settings().unwrap().percentile, Some(5));
        assert_rejects(StateConfig::new().with_percentile_clipping(101).settings(), "states.percentile_clipping");
        assert!(matches!(
            StateConfig::new().with_block_size(100).settings(),
            Err(ConfigError::BlockSize(QuantError::InvalidBlockSize(100)))
        ));
        assert_eq!(StateConfig::new().f32_states().min_8bit_size, usize::MAX);
        let stochastic = StateConfig::new().with_stochastic_rounding(true).with_rounding_seed(5);
        assert_eq!(stochastic.settings().unwrap().rounding_seed, Some(5));
        assert_eq!(StateConfig::new().with_rounding_seed(5).settings().unwrap().rounding_seed, None);
        assert_eq!(StateConfig::new().with_state_bits(4).settings().unwrap().map_family, MapFamily::FourBit);
        let four_bit = StateConfig::new().with_state_bits(4).with_map_family(MapFamily::FourBit);
        assert_eq!(four_bit.settings().unwrap().map_family, MapFamily::FourBit);
        assert_rejects(StateConfig::new().with_state_bits(2).settings(), "states.state_bits");
        for contradiction in [
            StateConfig::new().with_state_bits(4).with_map_family(MapFamily::Linear),
            StateConfig::new().with_map_family(MapFamily::FourBit),
        ] {
            assert!(matches!(contradiction.settings(), Err(ConfigError::Incompatible { .. })), "{contradiction:?}");
        }
    }

    #[test]
    fn bias_corrections_at_the_first_step() {
        let (correction1, correction2) = bias_corrections(0.9, 0.999, 1);
        assert_eq!(correction1, 1.0 - f64::from(0.9f32));
        assert_eq!(correction2, (1.0 - f64::from(0.999f32)).sqrt());
        assert_eq!(bias_corrections(0.9, 0.999, usize::MAX), (1.0, 1.0));
    }
}
