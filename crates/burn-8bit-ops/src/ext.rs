//! The backend-extension trait: the block-wise operations every supported backend implements,
//! and the values they exchange.
//!
//! `Cube` (wgpu, CUDA, ROCm, Metal, cubecl-cpu) runs the CubeCL kernels of `backend/cube`;
//! `Flex` and `NdArray` run the CPU twin of `cpu.rs` through `backend/{flex,ndarray}.rs`;
//! `Fusion` (Burn's default wrapper around `Cube`) defers to `Cube` lazily. Users call these
//! through the typed API of [`crate::BlockQuantized`] and the optimizers of `burn-8bit-optim`.

// Burn deprecates its NdArray backend in favour of Flex; burn-8bit still supports it.
#![allow(deprecated)]

use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, ExtensionType, backend_extension};
use burn::tensor::DType;

use crate::map::{MapFamily, MapKind};
use crate::step::{StepRule, StepScalars};

/// The packed form of a block-quantized flat tensor, as a backend holds it.
#[derive(ExtensionType)]
#[extension_type(fusion: cfg(feature = "cube"))]
pub struct PackedBlocks<B: Backend> {
    /// `u32` words of packed codes, `map.num_words(len)` of them ([`MapKind::codes_per_word`]).
    pub codes: IntTensor<B>,
    /// `f32`, one per block.
    pub absmax: FloatTensor<B>,
}

/// The scales of a rank-1 normalised state (docs/algorithm.md §2.4): the flat state viewed as a
/// matrix of `rows.len()` rows and `cols.len()` columns (row-major), the largest value of each
/// row and of each column. Element `(i, j)` is scaled by the smaller of `rows[i]` and `cols[j]`.
#[derive(ExtensionType)]
#[extension_type(fusion: cfg(feature = "cube"))]
pub struct Rank1Norms<B: Backend> {
    /// `f32`, one per row.
    pub rows: FloatTensor<B>,
    /// `f32`, one per column.
    pub cols: FloatTensor<B>,
}

/// A non-negative state quantized with rank-1 normalisation: packed codes
/// (`map.num_words(rows · cols)` words) and the norms they were written against.
#[derive(ExtensionType)]
#[extension_type(fusion: cfg(feature = "cube"))]
pub struct Rank1Codes<B: Backend> {
    /// `u32` words of packed codes.
    pub codes: IntTensor<B>,
    /// The row and column maxima the codes are scaled by.
    #[extension_type]
    pub norms: Rank1Norms<B>,
}

/// One optimizer state of a parameter, as the fused step reads and rewrites it.
#[derive(ExtensionType)]
#[extension_type(fusion: cfg(feature = "cube"))]
pub enum StateBuffer<B: Backend> {
    /// No state in this slot: the rule keeps fewer than three.
    Absent,
    /// Block-wise codes (8 or 4 bits) and absmax, in the map of the slot
    /// ([`StepRule::state_maps`] of the step's family).
    Blockwise(#[extension_type] PackedBlocks<B>),
    /// Codes under rank-1 normalisation, in the map of the slot (an unsigned map: the state is
    /// non-negative), and the norms of the step's new values from
    /// [`BlockwiseOps::rank1_norms`]. The fused step decodes against `state.norms` and encodes
    /// against `next`, and returns the two swapped: `state` then holds the new codes and the
    /// norms they were written against, `next` the old norms. Passes that only read (the
    /// update norms, the rank-1 norms) ignore `next`. At most one slot of a step is rank-1.
    Rank1 {
        /// The codes and the norms they were written against.
        #[extension_type]
        state: Rank1Codes<B>,
        /// The norms the step encodes against.
        #[extension_type]
        next: Rank1Norms<B>,
    },
    /// Plain flat `f32` values, one per parameter element (small tensors, `f32` configs).
    Full(FloatTensor<B>),
}

/// Everything one fused step reads and rewrites: the flat parameter, the running count of
/// skipped (non-finite) elements and the rule's states in slot order, unused slots
/// [`StateBuffer::Absent`].
///
/// One step of SGD with momentum over an `f32` state (the optimizers of `burn-8bit-optim` build
/// these from their state records):
///
/// ```
/// use burn::backend::Dispatch;
/// use burn::tensor::{DType, Device, Int, Tensor, TensorData};
/// use burn_8bit_ops::{BlockwiseOps, MapFamily, Scale, StateBuffer, StepRule, StepScalars, StepTensors};
///
/// let device = Device::default();
/// let param = Tensor::<1>::from_floats([1.0, 2.0], &device);
/// let velocity = Tensor::<1>::from_floats([0.0, 0.0], &device);
/// let skipped = Tensor::<1, Int>::from_data(TensorData::new(vec![0u32, 0], [2]), (&device, DType::U32));
/// let grad = Tensor::<1>::from_floats([0.5, -0.5], &device);
/// let states = vec![StateBuffer::Full(velocity.into_dispatch())];
/// let tensors = StepTensors::new(param.into_dispatch(), skipped.into_dispatch(), states);
/// // The first step of momentum SGD: the velocity is the gradient.
/// let scalars = StepScalars { lr: 0.1, beta1: 0.9, beta3: 1.0, first_step: 1, ..StepScalars::default() };
/// let rule = StepRule::Momentum { nesterov: false };
/// let out = Dispatch::fused_step(tensors, grad.into_dispatch(), Scale::One, Scale::One, rule, MapFamily::Dynamic, scalars, 256);
/// let (param, _, states) = out.into_parts();
/// assert_eq!(Tensor::<1>::from_dispatch(param).into_data().to_vec::<f32>().unwrap(), [0.95, 2.05]);
/// assert_eq!(states.len(), 1);
/// ```
#[derive(ExtensionType)]
#[extension_type(fusion: cfg(feature = "cube"))]
pub struct StepTensors<B: Backend> {
    /// The flat parameter: `f32`, `f16` or `bf16`, read and written in its own type (the
    /// step's arithmetic is `f32`).
    pub param: FloatTensor<B>,
    /// `u32[2]`: elements skipped so far, a 64-bit count as `[low, high]` words.
    pub skipped: IntTensor<B>,
    /// State slot 0.
    #[extension_type]
    pub state1: StateBuffer<B>,
    /// State slot 1.
    #[extension_type]
    pub state2: StateBuffer<B>,
    /// State slot 2.
    #[extension_type]
    pub state3: StateBuffer<B>,
}

impl<B: Backend> StateBuffer<B> {
    /// This state as the fused step returns it once it wrote the new codes: a rank-1 state with
    /// `next` as the norms of its codes and its old norms as `next` (see
    /// [`StateBuffer::Rank1`]); any other state as it is.
    pub(crate) fn after_step(self) -> Self {
        match self {
            StateBuffer::Rank1 { state, next } => {
                StateBuffer::Rank1 { state: Rank1Codes { codes: state.codes, norms: next }, next: state.norms }
            }
            other => other,
        }
    }
}

impl<B: Backend> StepTensors<B> {
    /// The step's tensors from up to three states in slot order.
    ///
    /// # Panics
    /// With more than three states: no rule keeps more.
    pub fn new(param: FloatTensor<B>, skipped: IntTensor<B>, states: Vec<StateBuffer<B>>) -> Self {
        assert!(states.len() <= 3, "a fused step keeps at most three states, not {}", states.len());
        let mut states = states.into_iter();
        let mut next = || states.next().unwrap_or(StateBuffer::Absent);
        let (state1, state2, state3) = (next(), next(), next());
        Self { param, skipped, state1, state2, state3 }
    }

    /// The parameter, the skip counter and the present states in slot order.
    pub fn into_parts(self) -> (FloatTensor<B>, IntTensor<B>, Vec<StateBuffer<B>>) {
        let states = [self.state1, self.state2, self.state3]
            .into_iter()
            .filter(|state| !matches!(state, StateBuffer::Absent))
            .collect();
        (self.param, self.skipped, states)
    }
}

/// The float types in which the fused step reads and writes parameters and gradients (its
/// arithmetic is `f32` whatever they are): the one list the backends and the optimizers use.
///
/// ```
/// use burn::tensor::DType;
/// use burn_8bit_ops::ParamDType;
///
/// assert_eq!(ParamDType::of(DType::BF16), Some(ParamDType::BF16));
/// assert_eq!(ParamDType::of(DType::F64), None); // stepped as f32 between two casts
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamDType {
    /// `f32`.
    F32,
    /// `f16`.
    F16,
    /// `bf16`.
    BF16,
}

impl ParamDType {
    /// The step's type for tensors of `dtype`, `None` where the step does not take it.
    pub fn of(dtype: DType) -> Option<Self> {
        match dtype {
            DType::F32 => Some(Self::F32),
            DType::F16 => Some(Self::F16),
            DType::BF16 => Some(Self::BF16),
            _ => None,
        }
    }

    /// The type a step's parameter and gradient share.
    ///
    /// # Panics
    /// When their dtypes differ or the step does not take it.
    pub(crate) fn of_step(param: DType, grad: DType) -> Self {
        assert_eq!(grad, param, "the gradient's dtype differs from the parameter's");
        Self::of(param).unwrap_or_else(|| panic!("the fused step takes f32, f16 or bf16 parameters, got {param:?}"))
    }
}

/// A factor a step multiplies by: one `f32` element on the device, or exactly 1 (nothing
/// uploaded, nothing read).
#[derive(ExtensionType)]
#[extension_type(fusion: cfg(feature = "cube"))]
pub enum Scale<B: Backend> {
    /// Multiply by one.
    One,
    /// Multiply by the single `f32` element of this tensor.
    Device(FloatTensor<B>),
}

/// Block-wise quantization (8-bit and 4-bit codes) and the fused optimizer step on a backend's own buffers.
///
/// Inputs are flat `f32` tensors; `block_size` is a validated [`crate::BlockSize`] value.
#[backend_extension(
    Cube: cfg(feature = "cube"),
    Flex: cfg(feature = "flex"),
    NdArray: cfg(feature = "ndarray"),
    Fusion: cfg(feature = "cube")
)]
pub trait BlockwiseOps: Backend {
    /// Per-block absmax and packed codes of a flat `f32` tensor (docs/algorithm.md §2).
    #[fusion(meta = fusion_meta::quantize)]
    fn blockwise_quantize(
        input: FloatTensor<Self>,
        map: MapKind,
        block_size: usize,
    ) -> PackedBlocks<Self>;

    /// Packed codes of a flat `f32` tensor against the given per-block `absmax`
    /// (`f32[ceil(len / block_size)]`, non-negative; read by magnitude) instead of each block's
    /// own: [`BlockwiseOps::blockwise_quantize`] without its reduction, returning `absmax` as
    /// given. One absmax repeated over every block quantizes a whole tensor against its own
    /// absmax (an ablation setting of the optimizers).
    #[fusion(meta = fusion_meta::encode)]
    fn blockwise_encode(
        input: FloatTensor<Self>,
        absmax: FloatTensor<Self>,
        map: MapKind,
        block_size: usize,
    ) -> PackedBlocks<Self>;

    /// The flat `f32` tensor that packed codes and absmax stand for, decoded into `output` (flat
    /// `f32`, as many elements as were quantized), whose values are discarded: its buffer is
    /// written in place when it is contiguous and unshared, so a caller that decodes repeatedly
    /// can hand the last result back and skip an allocation; fresh memory otherwise. NdArray
    /// always returns fresh memory (it does not expose its buffers mutably).
    #[fusion(meta = fusion_meta::dequantize)]
    fn blockwise_dequantize(
        codes: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        output: FloatTensor<Self>,
        map: MapKind,
        block_size: usize,
    ) -> FloatTensor<Self>;

    /// The fused optimizer step of any rule, in place where the buffers are unshared: per block,
    /// decode → update (parameter included) → new absmax → encode, in one pass over the data
    /// (docs/algorithm.md §3.1). `Full` states are read and written as they are. `grad` is flat,
    /// of the parameter's length and float type (`f32`, `f16` or `bf16`: the backend's half types
    /// are read and written inside the op, with no cast pass around it; NdArray has none);
    /// every gradient element is multiplied by `grad_scale`
    /// (percentile clipping's factor) before the update, and the step size by `update_scale`
    /// (LAMB's or LARS's trust ratio from [`BlockwiseOps::update_norms`]). Blockwise states use
    /// the maps of `family` ([`StepRule::state_maps`]).
    #[allow(clippy::too_many_arguments)]
    #[fusion(meta = fusion_meta::fused_step)]
    fn fused_step(
        #[extension_type] tensors: StepTensors<Self>,
        grad: FloatTensor<Self>,
        #[extension_type] grad_scale: Scale<Self>,
        #[extension_type] update_scale: Scale<Self>,
        rule: StepRule,
        family: MapFamily,
        scalars: StepScalars,
        block_size: usize,
    ) -> StepTensors<Self>;

    /// The first pass of a two-pass rule (LAMB, LARS): per block, the sums of the squared update
    /// direction and of the squared parameter, `f32[2 · blocks]` as `[d₀, p₀, d₁, p₁, …]`; the
    /// tensors are read, not written.
    #[fusion(meta = fusion_meta::update_norms)]
    fn update_norms(
        #[extension_type] tensors: StepTensors<Self>,
        grad: FloatTensor<Self>,
        #[extension_type] grad_scale: Scale<Self>,
        rule: StepRule,
        family: MapFamily,
        scalars: StepScalars,
        block_size: usize,
    ) -> FloatTensor<Self>;

    /// The first pass of a step over a rank-1 state: the row and column maxima of the values the
    /// fused step will store in the step's [`StateBuffer::Rank1`] slot (its new values, or its
    /// old decoded values where the update is skipped), as [`Rank1Norms`] of the slot's shape.
    /// `grad_scale` and `update_scale` are the step's: they decide which elements it skips.
    /// Nothing is written. The maxima are taken on the bits, as block absmax is, and are exact:
    /// the same on every backend.
    ///
    /// # Panics
    /// When no slot is rank-1.
    #[allow(clippy::too_many_arguments)]
    #[fusion(meta = fusion_meta::rank1_norms)]
    fn rank1_norms(
        #[extension_type] tensors: StepTensors<Self>,
        grad: FloatTensor<Self>,
        #[extension_type] grad_scale: Scale<Self>,
        #[extension_type] update_scale: Scale<Self>,
        rule: StepRule,
        family: MapFamily,
        scalars: StepScalars,
        block_size: usize,
    ) -> Rank1Norms<Self>;
}

#[cfg(feature = "cube")]
mod fusion_meta {
    use burn::backend::fusion::custom::TensorSpec;
    use burn::tensor::DType;

    use super::{PackedBlocksMetadata, Rank1NormsMetadata, ScaleMetadata, StateBufferMetadata, StepTensorsMetadata};
    use crate::map::{MapFamily, MapKind};
    use crate::step::{StepRule, StepScalars};

    pub fn update_norms(
        tensors: &StepTensorsMetadata,
        _grad: &TensorSpec,
        _grad_scale: &ScaleMetadata,
        _rule: &StepRule,
        _family: &MapFamily,
        _scalars: &StepScalars,
        block_size: &usize,
    ) -> TensorSpec {
        let blocks = tensors.param.shape.num_elements().div_ceil(*block_size);
        TensorSpec::new([2 * blocks].into(), DType::F32)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn rank1_norms(
        tensors: &StepTensorsMetadata,
        _grad: &TensorSpec,
        _grad_scale: &ScaleMetadata,
        _update_scale: &ScaleMetadata,
        _rule: &StepRule,
        _family: &MapFamily,
        _scalars: &StepScalars,
        _block_size: &usize,
    ) -> Rank1NormsMetadata {
        [&tensors.state1, &tensors.state2, &tensors.state3]
            .into_iter()
            .find_map(|state| match state {
                StateBufferMetadata::Rank1 { state, .. } => Some(state.norms.clone()),
                _ => None,
            })
            .expect("a step with a rank-1 state")
    }

    #[allow(clippy::too_many_arguments)]
    pub fn fused_step(
        tensors: &StepTensorsMetadata,
        _grad: &TensorSpec,
        _grad_scale: &ScaleMetadata,
        _update_scale: &ScaleMetadata,
        _rule: &StepRule,
        _family: &MapFamily,
        _scalars: &StepScalars,
        _block_size: &usize,
    ) -> StepTensorsMetadata {
        tensors.clone()
    }

    pub fn quantize(input: &TensorSpec, map: &MapKind, block_size: &usize) -> PackedBlocksMetadata {
        let len = input.shape.num_elements();
        PackedBlocksMetadata {
            codes: TensorSpec::new([map.num_words(len)].into(), DType::U32),
            absmax: TensorSpec::new([len.div_ceil(*block_size)].into(), DType::F32),
        }
    }

    pub fn encode(
        input: &TensorSpec,
        absmax: &TensorSpec,
        map: &MapKind,
        _block_size: &usize,
    ) -> PackedBlocksMetadata {
        PackedBlocksMetadata {
            codes: TensorSpec::new([map.num_words(input.shape.num_elements())].into(), DType::U32),
            absmax: absmax.clone(),
        }
    }

    pub fn dequantize(
        _codes: &TensorSpec,
        _absmax: &TensorSpec,
        output: &TensorSpec,
        _map: &MapKind,
        _block_size: &usize,
    ) -> TensorSpec {
        output.clone()
    }
}
