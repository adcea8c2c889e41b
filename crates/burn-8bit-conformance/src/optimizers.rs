//! The 8-bit optimizers the tests, benches and examples run, built from the one list of them,
//! [`OptimizerKind::ALL`]. Adding an optimizer is its own file in `burn-8bit-optim`, its
//! `OptimizerKind` variant, and the match arms the compiler then asks for (here and in the
//! conformance runner); `tests/checkpoints.rs` and `tests/optim_switch.rs` fail until it has a
//! golden record and, where Burn has a twin, a switching pair.

use burn::optim::Optimizer;
use burn::optim::momentum::MomentumConfig;
use burn::tensor::Tensor;
use burn_8bit_optim::{
    AdEMAMix8bitConfig, AdaGrad8bitConfig, Adam8bitConfig, AdamW8bitConfig, Lamb8bitConfig, Lars8bitConfig,
    Lion8bitConfig, Optim8bitConfig, Optim8bitState, OptimizerKind, RmsProp8bitConfig, Sgd8bitConfig,
};

/// The state of a flat tensor.
pub type State = Optim8bitState<1>;

/// One step of one flat tensor, `(lr, parameter, gradient, state) → (parameter, state)`: every
/// 8-bit optimizer, whatever its type.
pub type TensorStep = Box<dyn Fn(f64, Tensor<1>, Tensor<1>, Option<State>) -> (Tensor<1>, Option<State>)>;

/// `optimizer` as a [`TensorStep`].
pub fn tensor_step<O: Optimizer<State<1> = State> + 'static>(optimizer: O) -> TensorStep {
    Box::new(move |lr, param, grad, state| optimizer.step(lr, param, grad, state))
}

/// The optimizer of `kind` with its config's defaults, except SGD, which takes Burn's
/// `MomentumConfig::new()` (without momentum it keeps no state to quantize).
pub fn at_defaults(kind: OptimizerKind) -> TensorStep {
    match kind {
        OptimizerKind::Adam => tensor_step(Adam8bitConfig::new().build()),
        OptimizerKind::AdamW => tensor_step(AdamW8bitConfig::new().build()),
        OptimizerKind::Sgd => tensor_step(Sgd8bitConfig::new().with_momentum(Some(MomentumConfig::new())).build()),
        OptimizerKind::RmsProp => tensor_step(RmsProp8bitConfig::new().build()),
        OptimizerKind::AdaGrad => tensor_step(AdaGrad8bitConfig::new().build()),
        OptimizerKind::Lion => tensor_step(Lion8bitConfig::new().build()),
        OptimizerKind::AdEMAMix => tensor_step(AdEMAMix8bitConfig::new().build()),
        OptimizerKind::Lamb => tensor_step(Lamb8bitConfig::new().build()),
        OptimizerKind::Lars => tensor_step(Lars8bitConfig::new().build()),
    }
}

/// Every 8-bit optimizer at [`at_defaults`], with its type name (`"AdamW8bit"`).
pub fn all_at_defaults() -> Vec<(&'static str, TensorStep)> {
    OptimizerKind::ALL.into_iter().map(|kind| (kind.name(), at_defaults(kind))).collect()
}

/// The Burn config that `kind`'s config mirrors (field names, types and defaults), `None` where
/// Burn has no such optimizer.
pub fn burn_twin(kind: OptimizerKind) -> Option<&'static str> {
    match kind {
        OptimizerKind::Adam => Some("AdamConfig"),
        OptimizerKind::AdamW => Some("AdamWConfig"),
        OptimizerKind::Sgd => Some("SgdConfig"),
        OptimizerKind::RmsProp => Some("RmsPropConfig"),
        OptimizerKind::AdaGrad => Some("AdaGradConfig"),
        OptimizerKind::Lion => Some("LionConfig"),
        OptimizerKind::Lamb => Some("LambConfig"),
        OptimizerKind::AdEMAMix | OptimizerKind::Lars => None,
    }
}
