//! 8-bit optimizers for [Burn](https://burn.dev): Adam, AdamW, SGD (with momentum), RMSprop,
//! Adagrad, Lion, AdEMAMix, LAMB and LARS whose states are block-wise quantized to 8 bits (Dettmers et al.,
//! *8-bit Optimizers via Block-wise Quantization*, ICLR 2022).
//!
//! Each config mirrors the Burn config of the same name (`AdamWConfig` → [`AdamW8bitConfig`]),
//! so switching is one line; each optimizer implements `burn::optim::Optimizer` and runs one
//! fused op per tensor and step (decode → update → new absmax → encode) on every backend:
//! CubeCL kernels on wgpu/CUDA/ROCm, the CPU twin on Flex and NdArray.
//!
//! ```
//! use burn::module::Module;
//! use burn::nn::LinearConfig;
//! use burn::optim::GradientsParams;
//! use burn::tensor::{Device, Tensor};
//! use burn_8bit_optim::{AdamW8bitConfig, Optim8bitConfig, StateConfig};
//!
//! let device = Device::default().autodiff();
//! let mut model = LinearConfig::new(64, 64).init(&device);
//! let mut optim = AdamW8bitConfig::new().with_states(StateConfig::new().with_min_8bit_size(1024)).init();
//! let mut losses = Vec::new();
//! for _ in 0..5 {
//!     let loss = model.forward(Tensor::<2>::ones([8, 64], &device)).powi_scalar(2).mean();
//!     losses.push(loss.clone().into_scalar::<f32>());
//!     let grads = GradientsParams::from_grads(loss.backward(), &model);
//!     model = optim.step(1e-2, model, grads);
//! }
//! assert!(losses[4] < losses[0]);
//! ```
//!
//! # Precision and memory
//!
//! The update arithmetic is `f32`. Parameters and gradients may be `f16` or `bf16` where the
//! backend has them: the fused op reads and writes them in their own type (the result is the
//! `f32` step between two casts, without the casts), and the parameter keeps its dtype. The
//! 8-bit step allocates nothing of the tensor's size: parameter, codes and absmax are updated in
//! place when their buffers are unshared. Tensors under `min_8bit_size` keep `f32` states and step through the same fused op.
//! Percentile clipping takes each gradient's norm with `square().sum()` (in `f64` where the
//! backend has it, so that the CPU backends give the same bits on every machine), which backends
//! without fusion (Flex, NdArray) compute through temporaries.
//!
//! # Per-parameter overrides
//!
//! Any group of parameters can get its own optimizer — other bits (`f32_states()`), block size
//! or hyper-parameters — through Burn's `ModuleOptimizer::with_group` (the equivalent of
//! bitsandbytes' `GlobalOptimManager`); the last group that matches a parameter wins:
//!
//! ```
//! use burn::module::{Module, ParamGroup};
//! use burn::nn::{Linear, LinearConfig};
//! use burn::tensor::Device;
//! use burn_8bit_optim::{AdamW8bitConfig, Optim8bitConfig, StateConfig};
//!
//! #[derive(Module, Debug)]
//! struct Net {
//!     encoder: Linear,
//!     head: Linear,
//! }
//!
//! let device = Device::default();
//! let net = Net {
//!     encoder: LinearConfig::new(512, 512).init(&device),
//!     head: LinearConfig::new(512, 10).init(&device),
//! };
//! let base = AdamW8bitConfig::new().with_weight_decay(0.01);
//! let optim = base
//!     .init()
//!     // The head keeps 32-bit state and no weight decay.
//!     .with_group(
//!         ParamGroup::ids_from_module(net.head.clone()),
//!         base.clone().with_weight_decay(0.0).f32_states().build(),
//!         None,
//!     )
//!     // The encoder's weights use smaller blocks.
//!     .with_group(ParamGroup::from_predicate("encoder"), base.clone().with_states(StateConfig::new().with_block_size(64)).build(), None);
//! # let _ = optim;
//! ```
//!
//! # Ablation settings
//!
//! Two fields of [`StateConfig`] reproduce the paper's ablations and should stay at their
//! defaults for training: `map_family` ([`MapFamily::Dynamic`], or [`MapFamily::Linear`] for evenly spaced
//! codes) and `whole_tensor_block` (`false`; `true` quantizes each state against one absmax for
//! the whole tensor, in two passes with `f32` temporaries instead of the fused step):
//!
//! ```
//! use burn_8bit_optim::{AdamW8bitConfig, MapFamily, Optim8bitConfig, StateConfig};
//!
//! let linear = AdamW8bitConfig::new().with_states(StateConfig::new().with_map_family(MapFamily::Linear)).init();
//! let one_block = AdamW8bitConfig::new().with_states(StateConfig::new().with_whole_tensor_block(true)).init();
//! # let _ = (linear, one_block);
//! ```
#![deny(missing_docs)]
#![deny(rustdoc::broken_intra_doc_links)]

mod adagrad;
mod adam;
mod adamw;
mod ademamix;
mod engine;
mod error;
mod format;
mod lamb;
mod lars;
mod lion;
mod optimizer;
mod record;
mod rmsprop;
mod sgd;
mod state;
mod switch;

pub use adagrad::{AdaGrad8bit, AdaGrad8bitConfig, AdaGradRule};
pub use adam::{Adam8bit, Adam8bitConfig, AdamRule};
pub use adamw::{AdamW8bit, AdamW8bitConfig, AdamWRule};
pub use ademamix::{AdEMAMix8bit, AdEMAMix8bitConfig, AdEMAMixRule};
pub use burn_8bit_ops::MapFamily;
pub use engine::{Trust, UpdateRule};
pub use error::{ConfigError, LoadError};
pub use lamb::{Lamb8bit, Lamb8bitConfig, LambRule};
pub use lars::{Lars8bit, Lars8bitConfig, LarsRule};
pub use lion::{Lion8bit, Lion8bitConfig, LionRule};
pub use format::RecordChecksum;
pub use optimizer::{Optim8bit, Optim8bitConfig, StateConfig};
pub use record::{CheckedLoad, ParamStateReport, StateReport, load_record_checked};
pub use rmsprop::{RmsProp8bit, RmsProp8bitConfig, RmsPropRule};
pub use sgd::{Sgd8bit, Sgd8bitConfig, SgdRule};
pub use switch::{StateLayout, SwitchGroups, SwitchRecord};
pub use state::{DecodedState, Optim8bitState, OptimizerKind, StateSlot};
