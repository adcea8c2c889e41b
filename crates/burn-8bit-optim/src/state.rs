//! The per-parameter state every 8-bit optimizer keeps, its record, and its decoded view.

use burn::optim::{RecordState, StateSink, StateSource};
use burn::tensor::{DType, Device, FloatDType, Int, Shape, Tensor, TensorData};
use burn::backend::Dispatch;
use burn_8bit_ops::{
    BlockQuantized, BlockSize, COUNT_WORDS, MapFamily, MapKind, PackedBlocks, Rank1Codes, Rank1Norms, Rank1Quantized,
    StateBuffer, StepRule, count_value, count_words,
};
use burn_pack::Scalar;

use crate::format::{FieldSource, RING_LEN, SlotData, StateFields};

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
    /// Every optimizer, in the order of their record codes.
    pub const ALL: [OptimizerKind; 9] = [
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

    /// The code records store for this optimizer (docs/algorithm.md §4). The codes are part of
    /// the record format: they never change, and a new optimizer takes a new one.
    pub fn code(self) -> u64 {
        match self {
            OptimizerKind::Adam => 1,
            OptimizerKind::AdamW => 2,
            OptimizerKind::Sgd => 3,
            OptimizerKind::RmsProp => 4,
            OptimizerKind::AdaGrad => 5,
            OptimizerKind::Lion => 6,
            OptimizerKind::AdEMAMix => 7,
            OptimizerKind::Lamb => 8,
            OptimizerKind::Lars => 9,
        }
    }

    /// The optimizer of [`OptimizerKind::code`]; `None` for an unknown code.
    pub fn from_code(code: u64) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.code() == code)
    }

    /// Whether this optimizer steps with `rule` (any of its flags).
    pub(crate) fn takes(self, rule: StepRule) -> bool {
        matches!(
            (self, rule),
            (OptimizerKind::Adam | OptimizerKind::AdamW, StepRule::Adam { .. })
                | (OptimizerKind::Sgd | OptimizerKind::Lars, StepRule::Momentum { .. })
                | (OptimizerKind::Sgd, StepRule::Sgd)
                | (OptimizerKind::RmsProp, StepRule::RmsProp { .. })
                | (OptimizerKind::AdaGrad, StepRule::AdaGrad)
                | (OptimizerKind::Lion, StepRule::Lion)
                | (OptimizerKind::AdEMAMix, StepRule::AdEMAMix)
                | (OptimizerKind::Lamb, StepRule::Lamb)
        )
    }
}

/// The slot of `rule`'s states that a parameter of `shape` keeps under rank-1 normalisation:
/// its second moment (the first non-negative state) when `rank1` asks for it, the states are
/// 4-bit and its shape takes them ([`Rank1Quantized::fits`]); `None` otherwise.
pub(crate) fn rank1_slot(rule: StepRule, layout: Option<(BlockSize, MapFamily)>, shape: &Shape, rank1: bool) -> Option<usize> {
    let (_, family) = layout?;
    if !rank1 || family != MapFamily::FourBit || !Rank1Quantized::fits(shape) {
        return None;
    }
    rule.second_moment_slot()
}

/// One state slot of one parameter: block-wise quantized, rank-1 quantized (a 4-bit second
/// moment), or `f32` for tensors smaller than `min_8bit_size`.
#[derive(Clone, Debug)]
pub enum StateSlot {
    /// Packed codes plus per-block absmax.
    Quantized(BlockQuantized),
    /// Packed codes plus row and column norms.
    Rank1(Rank1Quantized),
    /// A flat `f32` tensor.
    Full(Tensor<1>),
}

impl StateSlot {
    /// The slot as the fused op takes it; a rank-1 slot with its own norms as the next ones
    /// (what the passes that only read take; the step's come from the rank-1 norm pass).
    pub(crate) fn into_buffer(self) -> StateBuffer<Dispatch> {
        match self {
            StateSlot::Quantized(q) => {
                let (codes, absmax) = q.into_parts();
                StateBuffer::Blockwise(PackedBlocks { codes: codes.into_dispatch(), absmax: absmax.into_dispatch() })
            }
            StateSlot::Rank1(q) => {
                let (codes, rows, cols) = q.into_parts();
                let norms = || Rank1Norms { rows: rows.clone().into_dispatch(), cols: cols.clone().into_dispatch() };
                StateBuffer::Rank1 { state: Rank1Codes { codes: codes.into_dispatch(), norms: norms() }, next: norms() }
            }
            StateSlot::Full(values) => StateBuffer::Full(values.into_dispatch()),
        }
    }

    /// The slot of a fused op's state of a parameter of `shape` (codes in `map` with `block_size`).
    pub(crate) fn from_buffer(buffer: StateBuffer<Dispatch>, shape: &Shape, block_size: BlockSize, map: MapKind) -> Self {
        let len = shape.num_elements();
        match buffer {
            StateBuffer::Blockwise(packed) => StateSlot::Quantized(
                BlockQuantized::from_parts(
                    Tensor::from_dispatch(packed.codes),
                    Tensor::from_dispatch(packed.absmax),
                    [len].into(),
                    block_size,
                    map,
                )
                .expect("the fused step keeps the state's layout"),
            ),
            StateBuffer::Rank1 { state, .. } => StateSlot::Rank1(
                Rank1Quantized::from_parts(
                    Tensor::from_dispatch(state.codes),
                    Tensor::from_dispatch(state.norms.rows),
                    Tensor::from_dispatch(state.norms.cols),
                    shape.clone(),
                    map,
                )
                .expect("the fused step keeps the state's layout"),
            ),
            StateBuffer::Full(values) => StateSlot::Full(Tensor::from_dispatch(values)),
            StateBuffer::Absent => unreachable!("the fused step returns the states it was given"),
        }
    }

    pub(crate) fn decoded(&self) -> Tensor<1> {
        match self {
            StateSlot::Quantized(q) => q.dequantize_flat(),
            StateSlot::Rank1(q) => q.dequantize_flat(),
            StateSlot::Full(t) => t.clone(),
        }
    }

    fn size_bytes(&self) -> usize {
        match self {
            StateSlot::Quantized(q) => q.size_bytes(),
            StateSlot::Rank1(q) => q.size_bytes(),
            StateSlot::Full(t) => 4 * t.shape().num_elements(),
        }
    }

    fn to_device(self, device: &Device) -> Self {
        match self {
            StateSlot::Quantized(q) => StateSlot::Quantized(q.to_device(device)),
            StateSlot::Rank1(q) => StateSlot::Rank1(q.to_device(device)),
            StateSlot::Full(t) => StateSlot::Full(t.to_device(device)),
        }
    }

    fn device(&self) -> Device {
        match self {
            StateSlot::Quantized(q) => q.device(),
            StateSlot::Rank1(q) => q.device(),
            StateSlot::Full(t) => t.device(),
        }
    }

    /// The slot's data, read back to the host.
    fn to_record(&self) -> SlotData {
        match self {
            StateSlot::Quantized(q) => SlotData::Quantized {
                words: q.codes().to_data().convert::<u32>().try_into_vec::<u32>().expect("u32 codes"),
                absmax: q.absmax_values(),
            },
            StateSlot::Rank1(q) => SlotData::Rank1 {
                words: q.codes().to_data().convert::<u32>().try_into_vec::<u32>().expect("u32 codes"),
                rows: q.row_norms(),
                cols: q.col_norms(),
            },
            StateSlot::Full(t) => SlotData::Full(t.to_data().try_into_vec::<f32>().expect("f32 state")),
        }
    }
}

/// The optimizer state of one parameter tensor: step count, one [`StateSlot`] per state of the
/// update rule, and the on-device count of elements skipped for non-finite gradients.
///
/// A parameter without elements has no slots and no device buffers at all.
/// [`Optim8bitState::decoded`] gives the states as `f32` tensors of the parameter's shape, for
/// inspection and tests; [`Optim8bitState::skipped`] reads the skip count (a device → host read,
/// done only when asked).
#[derive(Clone, Debug)]
pub struct Optim8bitState<const D: usize> {
    pub(crate) kind: OptimizerKind,
    pub(crate) rule: StepRule,
    pub(crate) time: usize,
    pub(crate) shape: Shape,
    /// Block size and map family of 8-bit states; `None` for `f32` states.
    pub(crate) layout: Option<(BlockSize, MapFamily)>,
    pub(crate) slots: Vec<StateSlot>,
    /// The skip count as `[low, high]` `u32` words; `None` for a parameter without elements.
    pub(crate) skipped: Option<Tensor<1, Int>>,
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

fn skip_counter(count: u64, device: &Device) -> Tensor<1, Int> {
    Tensor::from_data(TensorData::new(count_words(count).to_vec(), [COUNT_WORDS]), (device, DType::U32))
}

impl<const D: usize> Optim8bitState<D> {
    /// Fresh zero states for a parameter of `shape`: quantized in blocks of the given size with
    /// maps of the given family (the second moment under rank-1 normalisation where `rank1` asks
    /// for it and it fits), or `f32` when `layout` is `None`. A parameter without elements
    /// gets no device buffers (Burn 0.22's fusion mishandles zero-length tensors; see
    /// docs/checkpoints.md).
    pub(crate) fn new(
        kind: OptimizerKind,
        rule: StepRule,
        shape: Shape,
        layout: Option<(BlockSize, MapFamily)>,
        rank1: bool,
        device: &Device,
    ) -> Self {
        let len = shape.num_elements();
        let family = layout.map_or(MapFamily::Dynamic, |(_, family)| family);
        let rank1_at = rank1_slot(rule, layout, &shape, rank1);
        let slots = match len {
            0 => Vec::new(),
            _ => rule
                .state_maps(family)
                .into_iter()
                .enumerate()
                .map(|(slot, map)| match layout {
                    Some(_) if rank1_at == Some(slot) => {
                        StateSlot::Rank1(Rank1Quantized::zeros(shape.clone(), map, device).expect("a fitting matrix"))
                    }
                    Some((block_size, _)) => {
                        StateSlot::Quantized(BlockQuantized::zeros([len].into(), map, block_size, device))
                    }
                    // Uploaded, not `Tensor::zeros`: under Burn 0.22's fusion a lazily filled
                    // constant is corrupted once any zero-length tensor was made on the device
                    // (docs/checkpoints.md), and the fused step then reads garbage states.
                    None => StateSlot::Full(Tensor::from_data(TensorData::new(vec![0f32; len], [len]), (device, DType::F32))),
                })
                .collect(),
        };
        Self {
            kind,
            rule,
            time: 0,
            shape,
            layout,
            slots,
            skipped: (len > 0).then(|| skip_counter(0, device)),
            gnorms: None,
        }
    }

    /// Percentile clipping's factor for this step's gradient, on the device (docs/algorithm.md
    /// §3.6): the squared norm of the gradient's finite elements (capped at `f32::MAX`, so no NaN
    /// or ∞ ever enters the ring) enters the ring (every slot on step 1, slot `t mod 100` after),
    /// the clip is the root of the ring's `percentile`-th smallest entry, and the factor is
    /// `clip / ‖g‖` when `‖g‖` exceeds it, else 1. Call after `time` was advanced.
    ///
    /// The squares are summed in `f64` where the backend has it: exactly squared, and summed by
    /// the CPU backends in an order that depends on the length alone, so the norm has the same
    /// bits on every machine and thread count (Flex's `f32` sum depends on the CPU's vector
    /// width and, past 4 Mi elements, on rayon's split). Backends without `f64` (wgpu) sum in
    /// `f32`.
    pub(crate) fn clip_scale(&mut self, grad: &Tensor<1>, percentile: usize) -> Tensor<1> {
        let wide = if grad.device().supports_dtype(DType::F64) { FloatDType::F64 } else { FloatDType::F32 };
        let grad = grad.clone().cast(wide);
        let not_finite = grad.clone().is_finite().bool_not();
        let norm2 = grad.square().mask_fill(not_finite, 0.0).sum().cast(FloatDType::F32).clamp_max(f32::MAX);
        let slot = self.time % RING_LEN;
        let ring = match self.gnorms.take() {
            Some(ring) if self.time > 1 => ring.slice_assign([slot..slot + 1], norm2.clone()),
            _ => norm2.clone().repeat_dim(0, RING_LEN),
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

    /// The state slots, in the rule's order (none for a parameter without elements).
    pub fn slots(&self) -> &[StateSlot] {
        &self.slots
    }

    /// Whether the states are 8-bit (`false`: `f32`, the tensor being under `min_8bit_size`).
    pub fn is_quantized(&self) -> bool {
        self.layout.is_some()
    }

    /// The block size of quantized states.
    pub fn block_size(&self) -> Option<BlockSize> {
        self.layout.map(|(block_size, _)| block_size)
    }

    /// Every state decoded to `f32`, with the parameter's shape.
    pub fn decoded(&self) -> Vec<DecodedState<D>> {
        let names = self.rule.state_names();
        if self.shape.num_elements() == 0 {
            // Burn's `reshape` reads a 0 in the target shape as "keep this dimension".
            let device = Device::default();
            return names
                .into_iter()
                .map(|name| DecodedState { name, values: Tensor::empty(self.shape.clone(), (&device, DType::F32)) })
                .collect();
        }
        names
            .into_iter()
            .zip(&self.slots)
            .map(|(name, slot)| DecodedState {
                name,
                values: slot.decoded().reshape(self.shape.clone()),
            })
            .collect()
    }

    /// Elements whose update was skipped so far because their gradient (or the update) was not
    /// finite: a 64-bit count. Reads two words back from the device.
    pub fn skipped(&self) -> u64 {
        self.skipped.as_ref().map_or(0, |words| {
            let words = words.clone().into_data().convert::<u32>().try_into_vec::<u32>().expect("u32 counter");
            count_value(words.try_into().expect("a two-word counter"))
        })
    }

    /// Bytes of device memory the state holds (codes, absmax or `f32` values, skip counter, and
    /// percentile clipping's ring of 100 norms when on).
    pub fn size_bytes(&self) -> usize {
        let ring = self.gnorms.as_ref().map_or(0, |ring| 4 * ring.shape().num_elements());
        let counter = self.skipped.as_ref().map_or(0, |_| 4 * COUNT_WORDS);
        self.slots.iter().map(StateSlot::size_bytes).sum::<usize>() + counter + ring
    }

    /// Moves every tensor of the state to `device`.
    pub fn to_device(self, device: &Device) -> Self {
        Self {
            slots: self.slots.into_iter().map(|s| s.to_device(device)).collect(),
            skipped: self.skipped.map(|words| words.to_device(device)),
            gnorms: self.gnorms.map(|ring| ring.to_device(device)),
            ..self
        }
    }

    /// The family of the quantized states' maps (dynamic for `f32` states).
    pub fn map_family(&self) -> MapFamily {
        self.layout.map_or(MapFamily::Dynamic, |(_, family)| family)
    }

    /// Each slot's map (the rule's dynamic maps for `f32` states).
    pub(crate) fn slot_maps(&self) -> Vec<MapKind> {
        let dynamic = self.rule.state_maps(MapFamily::Dynamic);
        self.slots
            .iter()
            .zip(dynamic)
            .map(|(slot, dynamic)| match slot {
                StateSlot::Quantized(q) => q.map(),
                StateSlot::Rank1(q) => q.map(),
                StateSlot::Full(_) => dynamic,
            })
            .collect()
    }

    /// The state with every slot decoded to `f32` (the whole-tensor ablation steps these).
    pub(crate) fn into_f32_slots(mut self) -> Self {
        self.slots = self.slots.iter().map(|slot| StateSlot::Full(slot.decoded())).collect();
        self
    }

    /// The state with every slot quantized with its map in `maps` against one absmax for the
    /// whole tensor (`max |s|`, repeated in every block of `block_size`): the whole-tensor
    /// ablation's encode.
    pub(crate) fn quantized_whole_tensor(mut self, maps: Vec<MapKind>, block_size: BlockSize) -> Self {
        self.slots = std::mem::take(&mut self.slots)
            .into_iter()
            .zip(maps)
            .map(|(slot, map)| StateSlot::Quantized(BlockQuantized::quantize_whole_tensor(slot.decoded(), map, block_size)))
            .collect();
        self
    }

    /// The state for `rule` with `layout` (block size and map family of 8-bit states, `None` for
    /// `f32` states), from a state of the same optimizer and shape written with other settings —
    /// a record of another block size, map family, precision (`min_8bit_size`, `f32_states()`,
    /// `keep_embeddings_32bit`) or rule flags (docs/checkpoints.md). Slots are matched by name and
    /// converted on the device: 8-bit states decoded, `f32` states quantized, 8-bit states of
    /// another layout re-quantized. A slot the new rule adds starts from zero, except AMSGrad's
    /// `max_moment_2`, which starts from `moment_2`. Unchanged settings return the state as is.
    pub(crate) fn adapted(mut self, rule: StepRule, layout: Option<(BlockSize, MapFamily)>, rank1: bool) -> Self {
        let len = self.shape.num_elements();
        let family = layout.map_or(MapFamily::Dynamic, |(_, family)| family);
        let maps = rule.state_maps(family);
        let rank1_at = rank1_slot(rule, layout, &self.shape, rank1);
        let unchanged = |slot: &StateSlot, index: usize, map: MapKind| match (slot, layout) {
            (StateSlot::Quantized(q), Some((block_size, _))) => {
                rank1_at != Some(index) && q.block_size() == block_size && q.map() == map
            }
            (StateSlot::Rank1(q), Some(_)) => rank1_at == Some(index) && q.map() == map,
            (StateSlot::Full(_), None) => true,
            _ => false,
        };
        let all_unchanged = self.slots.iter().zip(&maps).enumerate().all(|(index, (slot, &map))| unchanged(slot, index, map));
        if (rule == self.rule && all_unchanged) || len == 0 {
            return Self { rule, layout, ..self };
        }
        let mut old: Vec<(&'static str, StateSlot)> = self.rule.state_names().into_iter().zip(std::mem::take(&mut self.slots)).collect();
        let mut take = |name: &str| old.iter().position(|(n, _)| *n == name).map(|i| old.swap_remove(i).1);
        let device = self.skipped.as_ref().map_or_else(Device::default, |words| words.device());
        let names = rule.state_names();
        let mut decoded: Vec<Option<StateSlot>> = names.iter().map(|name| take(name)).collect();
        if let Some(i) = names.iter().position(|&n| n == "max_moment_2")
            && decoded[i].is_none()
        {
            let moment_2 = names.iter().position(|&n| n == "moment_2").and_then(|j| decoded[j].clone());
            decoded[i] = moment_2;
        }
        let shape = self.shape.clone();
        self.slots = decoded
            .into_iter()
            .zip(maps)
            .enumerate()
            .map(|(index, (slot, map))| match (slot, layout) {
                (Some(slot), _) if unchanged(&slot, index, map) => slot,
                (slot, Some(_)) if rank1_at == Some(index) => {
                    let values = slot.map_or_else(|| Tensor::zeros(shape.clone(), &device), |slot| slot.decoded().reshape(shape.clone()));
                    StateSlot::Rank1(Rank1Quantized::quantize::<D>(values, map).expect("a fitting matrix"))
                }
                (Some(slot), Some((block_size, _))) => StateSlot::Quantized(BlockQuantized::quantize(slot.decoded(), map, block_size)),
                (Some(slot), None) => StateSlot::Full(slot.decoded()),
                (None, Some((block_size, _))) => StateSlot::Quantized(BlockQuantized::zeros([len].into(), map, block_size, &device)),
                (None, None) => StateSlot::Full(Tensor::zeros([len], (&device, DType::F32))),
            })
            .collect();
        Self { rule, layout, ..self }
    }

    /// Whether every buffer of the state lives on `device` (trivially so without buffers).
    pub(crate) fn slot_devices_match(&self, device: &Device) -> bool {
        self.skipped.iter().all(|words| words.device() == *device) && self.slots.iter().all(|s| s.device() == *device)
    }

    /// The state as its record holds it (a device → host copy of every buffer).
    pub(crate) fn to_fields(&self) -> StateFields {
        StateFields {
            kind: self.kind,
            rule: self.rule,
            time: self.time,
            shape: self.shape.iter().copied().collect(),
            layout: self.layout,
            slots: self.slots.iter().map(StateSlot::to_record).collect(),
            skipped: self.skipped(),
            gnorms: self.gnorms.as_ref().map(|ring| ring.to_data().try_into_vec::<f32>().expect("f32 ring")),
        }
    }

    /// The state of validated record fields, on `device`; `None` when the record's rank is not `D`.
    pub(crate) fn from_fields(fields: StateFields, device: &Device) -> Option<Self> {
        if fields.shape.len() != D {
            return None;
        }
        let len = fields.len();
        let maps = fields.rule.state_maps(fields.layout.map_or(MapFamily::Dynamic, |(_, family)| family));
        let slots = fields
            .slots
            .into_iter()
            .zip(maps)
            .map(|(slot, map)| match (slot, fields.layout) {
                (SlotData::Rank1 { words, rows, cols }, Some(_)) => {
                    let (num_rows, num_cols) = (rows.len(), cols.len());
                    let codes = Tensor::<1, Int>::from_data(TensorData::new(words, [map.num_words(len)]), (device, DType::U32));
                    let rows = Tensor::<1>::from_data(TensorData::new(rows, [num_rows]), (device, DType::F32));
                    let cols = Tensor::<1>::from_data(TensorData::new(cols, [num_cols]), (device, DType::F32));
                    Rank1Quantized::from_parts(codes, rows, cols, Shape::from(fields.shape.clone()), map).ok().map(StateSlot::Rank1)
                }
                (SlotData::Quantized { words, absmax }, Some((block_size, _))) => {
                    let blocks = absmax.len();
                    let codes = Tensor::<1, Int>::from_data(TensorData::new(words, [map.num_words(len)]), (device, DType::U32));
                    let absmax = Tensor::<1>::from_data(TensorData::new(absmax, [blocks]), (device, DType::F32));
                    BlockQuantized::from_parts(codes, absmax, [len].into(), block_size, map)
                        .ok()
                        .map(StateSlot::Quantized)
                }
                (SlotData::Full(values), None) => {
                    Some(StateSlot::Full(Tensor::from_data(TensorData::new(values, [len]), (device, DType::F32))))
                }
                _ => None,
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Self {
            kind: fields.kind,
            rule: fields.rule,
            time: fields.time,
            shape: Shape::from(fields.shape),
            layout: fields.layout,
            slots,
            skipped: (len > 0).then(|| skip_counter(fields.skipped, device)),
            gnorms: fields
                .gnorms
                .map(|ring| Tensor::from_data(TensorData::new(ring, [RING_LEN]), (device, DType::F32))),
        })
    }
}

/// The entries under one parameter's prefix of a Burn `StateSource`.
struct Prefixed<'a> {
    prefix: &'a str,
    source: &'a mut StateSource,
}

impl FieldSource for Prefixed<'_> {
    fn scalar(&mut self, key: &str) -> Option<Scalar> {
        self.source.take_scalar(self.prefix, key)
    }

    fn tensor(&mut self, key: &str) -> Option<TensorData> {
        self.source.take_tensor(self.prefix, key)
    }
}

impl<const D: usize> RecordState for Optim8bitState<D> {
    fn state_flatten(&self, prefix: &str, out: &mut StateSink) {
        let (scalars, tensors) = self.to_fields().entries();
        for (key, value) in scalars {
            out.push_scalar(prefix, &key, value);
        }
        for (key, data) in tensors {
            out.push_tensor(prefix, &key, data);
        }
    }

    /// The state of a record that the record reader accepts (the one `load_record_checked` uses
    /// too, docs/algorithm.md §4); `None` for anything else, which Burn's `load_record` drops.
    fn state_unflatten(prefix: &str, src: &mut StateSource, device: &Device) -> Option<Self> {
        let (fields, _) = StateFields::read(&mut Prefixed { prefix, source: src }).ok()?;
        Self::from_fields(fields, device)
    }
}
