//! The per-parameter state every 8-bit optimizer keeps, its record, and its decoded view.

use burn::optim::{RecordState, StateSink, StateSource};
use burn::tensor::{DType, Device, Int, Shape, Tensor, TensorData};
use burn_8bit_ops::{BlockQuantized, BlockSize, MapFamily, MapKind, StepRule};
use burn_pack::Scalar;

/// Which optimizer wrote a state; recorded so that a checkpoint of one optimizer is never read
/// as another's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OptimizerKind {
    /// [`crate::Adam8bit`].
    Adam,
    /// [`crate::AdamW8bit`].
    AdamW,
    /// [`crate::Sgd8bit`].
    Sgd,
    /// [`crate::RmsProp8bit`].
    RmsProp,
    /// [`crate::AdaGrad8bit`].
    AdaGrad,
    /// [`crate::Lion8bit`].
    Lion,
    /// [`crate::AdEMAMix8bit`].
    AdEMAMix,
    /// [`crate::Lamb8bit`].
    Lamb,
    /// [`crate::Lars8bit`].
    Lars,
}

impl OptimizerKind {
    const ALL: [OptimizerKind; 9] = [
        OptimizerKind::Adam,
        OptimizerKind::AdamW,
        OptimizerKind::Sgd,
        OptimizerKind::RmsProp,
        OptimizerKind::AdaGrad,
        OptimizerKind::Lion,
        OptimizerKind::AdEMAMix,
        OptimizerKind::Lamb,
        OptimizerKind::Lars,
    ];

    /// The optimizer's type name, e.g. `"AdamW8bit"`.
    pub fn name(self) -> &'static str {
        match self {
            OptimizerKind::Adam => "Adam8bit",
            OptimizerKind::AdamW => "AdamW8bit",
            OptimizerKind::Sgd => "Sgd8bit",
            OptimizerKind::RmsProp => "RmsProp8bit",
            OptimizerKind::AdaGrad => "AdaGrad8bit",
            OptimizerKind::Lion => "Lion8bit",
            OptimizerKind::AdEMAMix => "AdEMAMix8bit",
            OptimizerKind::Lamb => "Lamb8bit",
            OptimizerKind::Lars => "Lars8bit",
        }
    }

    pub(crate) fn code(self) -> u64 {
        Self::ALL.iter().position(|&k| k == self).expect("listed") as u64 + 1
    }

    pub(crate) fn from_code(code: u64) -> Option<Self> {
        Self::ALL.get(usize::try_from(code).ok()?.checked_sub(1)?).copied()
    }
}

/// One state slot of one parameter: block-wise quantized, or `f32` for tensors smaller than
/// `min_8bit_size`.
#[derive(Clone, Debug)]
pub enum StateSlot {
    /// Packed 8-bit codes plus per-block absmax.
    Quantized(BlockQuantized),
    /// A flat `f32` tensor.
    Full(Tensor<1>),
}

impl StateSlot {
    pub(crate) fn decoded(&self) -> Tensor<1> {
        match self {
            StateSlot::Quantized(q) => q.dequantize_flat(),
            StateSlot::Full(t) => t.clone(),
        }
    }

    fn size_bytes(&self) -> usize {
        match self {
            StateSlot::Quantized(q) => q.size_bytes(),
            StateSlot::Full(t) => 4 * t.shape().num_elements(),
        }
    }

    fn to_device(self, device: &Device) -> Self {
        match self {
            StateSlot::Quantized(q) => StateSlot::Quantized(q.to_device(device)),
            StateSlot::Full(t) => StateSlot::Full(t.to_device(device)),
        }
    }

    fn device(&self) -> Device {
        match self {
            StateSlot::Quantized(q) => q.device(),
            StateSlot::Full(t) => t.device(),
        }
    }
}

/// The optimizer state of one parameter tensor: step count, one [`StateSlot`] per state of the
/// update rule, and the on-device count of elements skipped for non-finite gradients.
///
/// [`Optim8bitState::decoded`] gives the states as `f32` tensors of the parameter's shape, for
/// inspection and tests; [`Optim8bitState::skipped`] reads the skip count (a device → host read,
/// done only when asked).
#[derive(Clone, Debug)]
pub struct Optim8bitState<const D: usize> {
    pub(crate) kind: OptimizerKind,
    pub(crate) rule: StepRule,
    pub(crate) time: usize,
    pub(crate) shape: Shape,
    pub(crate) slots: Vec<StateSlot>,
    pub(crate) skipped: Tensor<1, Int>,
    /// Percentile clipping's ring of the last 100 squared gradient norms (when on).
    pub(crate) gnorms: Option<Tensor<1>>,
}

/// One decoded state: its name (e.g. `"moment_1"`) and values with the parameter's shape.
#[derive(Clone, Debug)]
pub struct DecodedState<const D: usize> {
    /// The state's name, as [`StepRule::state_names`] gives it.
    pub name: &'static str,
    /// The decoded `f32` values.
    pub values: Tensor<D>,
}

impl<const D: usize> Optim8bitState<D> {
    /// Fresh zero states for a parameter of `shape`: quantized in blocks of the given size with
    /// maps of the given family, or `f32` when `layout` is `None`.
    pub(crate) fn new(
        kind: OptimizerKind,
        rule: StepRule,
        shape: Shape,
        layout: Option<(BlockSize, MapFamily)>,
        device: &Device,
    ) -> Self {
        let len = shape.num_elements();
        let family = layout.map_or(MapFamily::Dynamic, |(_, family)| family);
        let slots = rule
            .state_maps(family)
            .into_iter()
            .map(|map| match layout {
                Some((block_size, _)) => StateSlot::Quantized(BlockQuantized::zeros(
                    [len].into(),
                    map,
                    block_size,
                    device,
                )),
                None => StateSlot::Full(Tensor::zeros([len], (device, DType::F32))),
            })
            .collect();
        Self {
            kind,
            rule,
            time: 0,
            shape,
            slots,
            skipped: Tensor::from_data(TensorData::new(vec![0u32], [1]), (device, DType::U32)),
            gnorms: None,
        }
    }

    /// Percentile clipping's factor for this step's gradient, on the device (docs/algorithm.md §3.6):
    /// the squared norm enters the ring (every slot on step 1, slot `t mod 100` after), the clip
    /// is the root of the ring's `percentile`-th smallest entry, and the factor is
    /// `clip / ‖g‖` when `‖g‖` exceeds it, else 1. Call after `time` was advanced.
    pub(crate) fn clip_scale(&mut self, grad: &Tensor<1>, percentile: usize) -> Tensor<1> {
        let norm2 = grad.clone().square().sum();
        let slot = self.time % 100;
        let ring = match self.gnorms.take() {
            Some(ring) if self.time > 1 => ring.slice_assign([slot..slot + 1], norm2.clone()),
            _ => norm2.clone().repeat_dim(0, 100),
        };
        let clip = ring.clone().sort(0).slice([percentile..percentile + 1]).sqrt();
        let norm = norm2.sqrt();
        let exceeds = norm.clone().greater(clip.clone());
        let scale = norm.ones_like().mask_where(exceeds, clip / norm);
        self.gnorms = Some(ring);
        scale
    }

    /// The optimizer that owns this state.
    pub fn kind(&self) -> OptimizerKind {
        self.kind
    }

    /// The update rule (and so the meaning of each slot).
    pub fn rule(&self) -> StepRule {
        self.rule
    }

    /// Steps taken.
    pub fn time(&self) -> usize {
        self.time
    }

    /// The state slots, in the rule's order.
    pub fn slots(&self) -> &[StateSlot] {
        &self.slots
    }

    /// Whether the states are 8-bit (`false`: `f32`, the tensor being under `min_8bit_size`).
    pub fn is_quantized(&self) -> bool {
        matches!(self.slots.first(), Some(StateSlot::Quantized(_)))
    }

    /// The block size of quantized states.
    pub fn block_size(&self) -> Option<BlockSize> {
        match self.slots.first() {
            Some(StateSlot::Quantized(q)) => Some(q.block_size()),
            _ => None,
        }
    }

    /// Every state decoded to `f32`, with the parameter's shape.
    pub fn decoded(&self) -> Vec<DecodedState<D>> {
        self.rule
            .state_names()
            .into_iter()
            .zip(&self.slots)
            .map(|(name, slot)| DecodedState {
                name,
                values: slot.decoded().reshape(self.shape.clone()),
            })
            .collect()
    }

    /// Elements whose update was skipped so far because their gradient (or the update) was not
    /// finite. Reads one number back from the device.
    pub fn skipped(&self) -> u64 {
        let values = self.skipped.clone().into_data().convert::<u32>();
        u64::from(values.as_slice::<u32>().map(|v| v[0]).unwrap_or(0))
    }

    /// Bytes of device memory the state holds (codes, absmax or `f32` values, skip counter, and
    /// percentile clipping's ring of 100 norms when on).
    pub fn size_bytes(&self) -> usize {
        let ring = self.gnorms.as_ref().map_or(0, |ring| 4 * ring.shape().num_elements());
        self.slots.iter().map(StateSlot::size_bytes).sum::<usize>() + 4 + ring
    }

    pub(crate) fn device(&self) -> Device {
        self.skipped.device()
    }

    /// Moves every tensor of the state to `device`.
    pub fn to_device(self, device: &Device) -> Self {
        Self {
            slots: self.slots.into_iter().map(|s| s.to_device(device)).collect(),
            skipped: self.skipped.to_device(device),
            gnorms: self.gnorms.map(|ring| ring.to_device(device)),
            ..self
        }
    }

    /// The family of the quantized states' maps (dynamic for `f32` states).
    pub fn map_family(&self) -> MapFamily {
        match self.slots.first() {
            Some(StateSlot::Quantized(q)) => MapFamily::of(q.map()),
            _ => MapFamily::Dynamic,
        }
    }

    /// Each slot's map (the rule's dynamic maps for `f32` states).
    pub(crate) fn slot_maps(&self) -> Vec<MapKind> {
        let dynamic = self.rule.state_maps(MapFamily::Dynamic);
        self.slots
            .iter()
            .zip(dynamic)
            .map(|(slot, dynamic)| match slot {
                StateSlot::Quantized(q) => q.map(),
                StateSlot::Full(_) => dynamic,
            })
            .collect()
    }

    /// Re-quantizes 8-bit states whose block size or map family differs from the optimizer's
    /// (after loading a record written with other settings), on the device.
    pub(crate) fn with_layout(mut self, block_size: BlockSize, family: MapFamily) -> Self {
        let maps = self.rule.state_maps(family);
        for (slot, map) in self.slots.iter_mut().zip(maps) {
            if let StateSlot::Quantized(q) = slot
                && (q.block_size() != block_size || q.map() != map)
            {
                *q = BlockQuantized::quantize(q.dequantize_flat(), map, block_size);
            }
        }
        self
    }

    pub(crate) fn slot_devices_match(&self, device: &Device) -> bool {
        self.device() == *device && self.slots.iter().all(|s| s.device() == *device)
    }
}

pub(crate) const KIND: &str = "kind";
pub(crate) const RULE: &str = "rule";
pub(crate) const TIME: &str = "time";
pub(crate) const BLOCK_SIZE: &str = "block_size";
pub(crate) const RANK: &str = "rank";
pub(crate) const SKIPPED: &str = "skipped";
pub(crate) const MAP_FAMILY: &str = "map_family";
const GNORMS: &str = "gnorms";

pub(crate) fn dim_key(axis: usize) -> String {
    format!("dim{axis}")
}

pub(crate) fn slot_key(slot: usize, part: &str) -> String {
    format!("state{slot}.{part}")
}

impl<const D: usize> RecordState for Optim8bitState<D> {
    fn state_flatten(&self, prefix: &str, out: &mut StateSink) {
        out.push_scalar(prefix, KIND, Scalar::from(self.kind.code()));
        out.push_scalar(prefix, RULE, Scalar::from(self.rule.code()));
        out.push_scalar(prefix, TIME, Scalar::from(self.time));
        out.push_scalar(prefix, RANK, Scalar::from(self.shape.num_dims()));
        for (axis, &dim) in self.shape.iter().enumerate() {
            out.push_scalar(prefix, &dim_key(axis), Scalar::from(dim));
        }
        out.push_scalar(
            prefix,
            BLOCK_SIZE,
            Scalar::from(self.block_size().map_or(0, BlockSize::get)),
        );
        out.push_scalar(prefix, MAP_FAMILY, Scalar::from(self.map_family().code()));
        for (slot, state) in self.slots.iter().enumerate() {
            match state {
                StateSlot::Quantized(q) => {
                    out.push_tensor(prefix, &slot_key(slot, "codes"), q.codes().to_data());
                    out.push_tensor(prefix, &slot_key(slot, "absmax"), q.absmax().to_data());
                }
                StateSlot::Full(t) => out.push_tensor(prefix, &slot_key(slot, "values"), t.to_data()),
            }
        }
        out.push_tensor(prefix, SKIPPED, self.skipped.to_data());
        if let Some(ring) = &self.gnorms {
            out.push_tensor(prefix, GNORMS, ring.to_data());
        }
    }

    fn state_unflatten(prefix: &str, src: &mut StateSource, device: &Device) -> Option<Self> {
        let scalar = |src: &mut StateSource, key: &str| -> Option<u64> {
            u64::try_from(src.take_scalar(prefix, key)?).ok()
        };
        let kind = OptimizerKind::from_code(scalar(&mut *src, KIND)?)?;
        let rule = StepRule::from_code(scalar(&mut *src, RULE)?)?;
        let time = usize::try_from(scalar(&mut *src, TIME)?).ok()?;
        let rank = usize::try_from(scalar(&mut *src, RANK)?).ok()?;
        if rank != D {
            return None;
        }
        let dims = (0..rank)
            .map(|axis| scalar(&mut *src, &dim_key(axis)).and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<Vec<usize>>>()?;
        let shape = Shape::from(dims);
        let len = shape.num_elements();
        let block_size = match scalar(&mut *src, BLOCK_SIZE)? {
            0 => None,
            size => Some(BlockSize::new(usize::try_from(size).ok()?).ok()?),
        };
        // Records written before the ablation settings hold dynamic maps and no family.
        let family = match src.take_scalar(prefix, MAP_FAMILY) {
            Some(code) => MapFamily::from_code(u64::try_from(code).ok()?)?,
            None => MapFamily::Dynamic,
        };
        let mut slots = Vec::new();
        for (slot, map) in rule.state_maps(family).into_iter().enumerate() {
            let state = match block_size {
                Some(block_size) => {
                    let codes = src.take_tensor(prefix, &slot_key(slot, "codes"))?;
                    let absmax = src.take_tensor(prefix, &slot_key(slot, "absmax"))?;
                    let codes = Tensor::<1, Int>::from_data(codes, (device, DType::U32));
                    let absmax = Tensor::<1>::from_data(absmax, (device, DType::F32));
                    StateSlot::Quantized(
                        BlockQuantized::from_parts(codes, absmax, [len].into(), block_size, map)
                            .ok()?,
                    )
                }
                None => {
                    let values = src.take_tensor(prefix, &slot_key(slot, "values"))?;
                    if values.num_elements() != len {
                        return None;
                    }
                    StateSlot::Full(Tensor::from_data(values, (device, DType::F32)))
                }
            };
            slots.push(state);
        }
        let skipped = src.take_tensor(prefix, SKIPPED)?;
        let gnorms = src
            .take_tensor(prefix, GNORMS)
            .map(|ring| Tensor::from_data(ring, (device, DType::F32)));
        Some(Self {
            kind,
            rule,
            time,
            shape,
            slots,
            skipped: Tensor::from_data(skipped, (device, DType::U32)),
            gnorms,
        })
    }
}
