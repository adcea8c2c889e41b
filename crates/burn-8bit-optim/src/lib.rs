//! 8-bit optimizers for [Burn](https://burn.dev): Adam, AdamW, SGD with momentum, RMSprop,
//! Adagrad, Lion, AdEMAMix, LAMB and LARS whose states are block-wise quantized to 8 bits (Dettmers et al.,
//! *8-bit Optimizers via Block-wise StateSettings*, ICLR 2022).
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
//! use burn_8bit_optim::AdamW8bitConfig;
//!
//! let device = Device::default().autodiff();
//! let mut model = LinearConfig::new(64, 64).init(&device);
//! let mut optim = AdamW8bitConfig::new().with_min_8bit_size(1024).init();
//! let mut losses = Vec::new();
//! for _ in 0..5 {
//!     let loss = model.forward(Tensor::<2>::ones([8, 64], &device)).powi_scalar(2).mean();
//!     losses.push(loss.clone().into_scalar::<f32>());
//!     let grads = GradientsParams::from_grads(loss.backward(), &model);
//!     model = optim.step(1e-2, model, grads);
//! }
//! assert!(losses[4] < losses[0]);
//! ```
#![warn(missing_docs)]

mod adagrad;
mod adam;
mod adamw;
mod ademamix;
mod engine;
mod error;
mod full;
mod lamb;
mod lars;
mod lion;
mod optimizer;
mod record;
mod rmsprop;
mod sgd;
mod state;
mod switch;

pub use adagrad::{AdaGrad8bit, AdaGrad8bitConfig};
pub use adam::{Adam8bit, Adam8bitConfig};
pub use adamw::{AdamW8bit, AdamW8bitConfig};
pub use ademamix::{AdEMAMix8bit, AdEMAMix8bitConfig};
pub use engine::StateSettings;
pub use error::{ConfigError, LoadError};
pub use lamb::{Lamb8bit, Lamb8bitConfig};
pub use lars::{Lars8bit, Lars8bitConfig};
pub use lion::{Lion8bit, Lion8bitConfig};
pub use record::{ParamStateReport, StateReport, load_record_checked};
pub use rmsprop::{RmsProp8bit, RmsProp8bitConfig};
pub use sgd::{Sgd8bit, Sgd8bitConfig};
pub use switch::SwitchRecord;
pub use state::{DecodedState, Optim8bitState, OptimizerKind, StateSlot};
