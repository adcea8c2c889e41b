//! Reading optimizer records: the state-memory report and the checked load.
//!
//! Burn's `ModuleOptimizer::load_record` silently drops any state it cannot restore (and
//! restarts those parameters from zero); [`load_record_checked`] refuses such a record with a
//! [`LoadError`] instead.

use std::collections::BTreeMap;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{ModuleOptimizer, OptimizerRecord};
use burn::tensor::{Bytes, Tensor, TensorData};
use burn_8bit_ops::fnv1a64;
use burn_pack::{Reader, Scalar};

use crate::error::LoadError;
use crate::format::{RecordChecksum, SlotData, StateFields, key};
use crate::state::OptimizerKind;

/// One parameter's optimizer state as a record holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamStateReport {
    /// The parameter's id.
    pub param_id: u64,
    /// The burn-8bit optimizer that wrote it; `None` for any other optimizer (e.g. Burn's own).
    pub optimizer: Option<OptimizerKind>,
    /// Elements of the parameter, when the record says (burn-8bit states always do).
    pub elements: Option<u64>,
    /// Bytes of state tensors.
    pub bytes: u64,
    /// Whether the states are quantized (8-bit or 4-bit codes).
    pub quantized: bool,
    /// Bits per element of the states: 8 or 4 for codes, 32 for `f32` states (burn-8bit states;
    /// `None` for states the reader refuses).
    pub state_bits: Option<u32>,
    /// Whether a state (the 4-bit second moment) is held under rank-1 normalisation: codes with
    /// row and column norms instead of block absmax.
    pub rank1: bool,
    /// FNV-1a 64 over the state's tensors (bytes, in name order) and step count: equal
    /// fingerprints mean equal states, whatever the parameter's id.
    pub fingerprint: u64,
    /// Whether the state's checksum was verified ([`RecordChecksum::Absent`] for records written
    /// before checksums existed, and for states of other optimizers).
    pub checksum: RecordChecksum,
    /// Steps the state has taken (burn-8bit states).
    pub steps: Option<u64>,
    /// Elements whose update was skipped for a non-finite gradient so far (burn-8bit states).
    pub skipped: Option<u64>,
}

impl ParamStateReport {
    /// The report of one parameter's entries; `read` is what the record reader made of them
    /// (`None` for states it refuses, e.g. Burn's own).
    fn new(param_id: u64, (scalars, tensors): &ParamRecord, read: Option<&(StateFields, RecordChecksum)>) -> Self {
        let scalar = |key: &str| scalars.get(key).and_then(|&value| u64::try_from(value).ok());
        let elements = scalar(key::RANK).and_then(|rank| (0..rank as usize).map(|axis| scalar(&key::dim(axis))).product());
        // Tensors in leaf-name order, then the step count.
        let time = scalar(key::TIME).unwrap_or(0).to_le_bytes();
        let content = tensors.values().flat_map(|data| data.as_bytes().iter().copied());
        Self {
            param_id,
            optimizer: scalar(key::KIND).and_then(OptimizerKind::from_code),
            elements,
            bytes: tensors.values().map(|data| data.as_bytes().len() as u64).sum(),
            quantized: scalar(key::BLOCK_SIZE).is_some_and(|size| size > 0),
            state_bits: read.map(|(fields, _)| fields.layout.map_or(32, |(_, family)| family.bits())),
            rank1: read.is_some_and(|(fields, _)| fields.slots.iter().any(|slot| matches!(slot, SlotData::Rank1 { .. }))),
            fingerprint: fnv1a64(content.chain(time)),
            checksum: read.map_or(RecordChecksum::Absent, |(_, checksum)| *checksum),
            steps: read.map(|(fields, _)| fields.time as u64),
            skipped: read.map(|(fields, _)| fields.skipped),
        }
    }
}

/// The optimizer-state memory of a [`ModuleOptimizer`], per parameter.
///
/// ```
/// use burn::module::Module;
/// use burn::nn::LinearConfig;
/// use burn::optim::GradientsParams;
/// use burn::tensor::{Device, Tensor};
/// use burn_8bit_optim::{Adam8bitConfig, Optim8bitConfig, StateConfig, StateReport};
///
/// let device = Device::default().autodiff();
/// let model = LinearConfig::new(128, 64).init(&device);
/// let mut optim = Adam8bitConfig::new().with_states(StateConfig::new().with_min_8bit_size(1024)).init();
/// let loss = model.forward(Tensor::<2>::ones([4, 128], &device)).sum();
/// let grads = GradientsParams::from_grads(loss.backward(), &model);
/// let _model = optim.step(1e-3, model, grads);
/// let report = StateReport::of(&optim)?;
/// assert!(report.total_bytes() < 3 * 128 * 64); // about 2 bytes per weight, not 8
/// # Ok::<(), burn_8bit_optim::LoadError>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StateReport {
    /// One entry per parameter with state, by id.
    pub parameters: Vec<ParamStateReport>,
}

impl StateReport {
    /// Reads the states of `optim` (a device → host copy of every state: call it when needed,
    /// not every step).
    pub fn of(optim: &ModuleOptimizer) -> Result<Self, LoadError> {
        Self::from_record(optim.to_record())
    }

    /// Reads the states of a record — `ModuleOptimizer::to_record`, or a checkpoint on disk read
    /// with `OptimizerRecord::load` (a `Learner`'s `checkpoint/optim-N.bpk`) — without loading
    /// it into an optimizer.
    pub fn from_record(record: OptimizerRecord) -> Result<Self, LoadError> {
        Ok(Self::of_entries(&read_entries(record_bytes(record)?)?))
    }

    fn of_entries(entries: &Entries) -> Self {
        let parameters = entries
            .params
            .iter()
            .map(|(&param_id, record)| {
                let read = StateFields::read(&mut record.clone()).ok();
                ParamStateReport::new(param_id, record, read.as_ref())
            })
            .collect();
        Self { parameters }
    }

    /// Bytes of state over all parameters.
    pub fn total_bytes(&self) -> u64 {
        self.parameters.iter().map(|p| p.bytes).sum()
    }

    /// Elements of all parameters with a burn-8bit state.
    pub fn total_elements(&self) -> u64 {
        self.parameters.iter().filter_map(|p| p.elements).sum()
    }

    /// Elements skipped for non-finite gradients so far, over all parameters: what
    /// `Optim8bitState::skipped` gives per tensor, for `ModuleOptimizer` and `Learner` users.
    pub fn total_skipped(&self) -> u64 {
        self.parameters.iter().filter_map(|p| p.skipped).sum()
    }
}

/// An optimizer loaded by [`load_record_checked`], with the report of the record it was loaded
/// from (which says, per parameter, whether its checksum was verified).
pub struct CheckedLoad {
    /// The optimizer with every state of the record.
    pub optimizer: ModuleOptimizer,
    /// The record's states, as [`StateReport::of`] would report them.
    pub report: StateReport,
}

/// Loads `record` into `optim` after checking it against `module` and the expected optimizer.
///
/// Every entry must belong to a parameter of `module` and be readable by the state reader
/// (docs/algorithm.md §4): each state is `expected`'s, has the parameter's exact shape and path,
/// every field present with its type, length and range, `f32` values and absmax finite (absmax
/// non-negative), and its checksum matches. A state written with other settings of the same
/// optimizer (block size, map family, `f32` or 8-bit precision, rule flags) is accepted and
/// converted at its next step, keeping its step count. Records written before checksums
/// existed load too; the returned report says [`RecordChecksum::Absent`] for them.
///
/// ```
/// use burn::nn::LinearConfig;
/// use burn::tensor::Device;
/// use burn_8bit_optim::{Adam8bitConfig, AdamW8bitConfig, LoadError, Optim8bitConfig, OptimizerKind};
/// use burn_8bit_optim::load_record_checked;
/// # use burn::module::Module;
/// # use burn::optim::GradientsParams;
/// # use burn::tensor::Tensor;
///
/// let device = Device::default().autodiff();
/// let model = LinearConfig::new(8, 8).init(&device);
/// let mut adam = Adam8bitConfig::new().init();
/// # let loss = model.forward(Tensor::<2>::ones([2, 8], &device)).sum();
/// # let grads = GradientsParams::from_grads(loss.backward(), &model);
/// # let model = adam.step(1e-3, model, grads);
/// // … train, then:
/// let record = adam.to_record();
/// let error = load_record_checked(AdamW8bitConfig::new().init(), record, &model, OptimizerKind::AdamW);
/// assert!(matches!(error, Err(LoadError::OptimizerMismatch { .. })));
/// ```
pub fn load_record_checked<M: Module>(
    optim: ModuleOptimizer,
    record: OptimizerRecord,
    module: &M,
    expected: OptimizerKind,
) -> Result<CheckedLoad, LoadError> {
    let bytes = record_bytes(record)?;
    let entries = read_entries(bytes.clone())?;
    if let Some(name) = entries.stray.first() {
        return Err(LoadError::Unreadable(format!("entry `{name}` belongs to no parameter")));
    }
    let mut params = ModuleParams::default();
    module.visit(&mut params);
    let mut report = StateReport::default();
    for (&param_id, record) in &entries.params {
        let (scalars, tensors) = record;
        let param = params.by_id.get(&param_id).ok_or(LoadError::UnknownParameter { param_id })?;
        let corrupt = |reason: String| LoadError::Corrupt { param_id, reason };
        let recorded_kind = scalars.get(key::KIND).and_then(|&code| u64::try_from(code).ok());
        match recorded_kind.map(|code| (code, OptimizerKind::from_code(code))) {
            Some((_, Some(kind))) if kind == expected => {}
            Some((code, None)) => return Err(corrupt(format!("unknown optimizer code {code}"))),
            recorded => {
                return Err(LoadError::OptimizerMismatch {
                    param_id,
                    recorded: recorded
                        .and_then(|(_, kind)| kind)
                        .map_or("not a burn-8bit optimizer", OptimizerKind::name)
                        .to_string(),
                    expected: expected.name().to_string(),
                });
            }
        }
        let mut source = (scalars.clone(), tensors.clone());
        let read = StateFields::read(&mut source).map_err(corrupt)?;
        let fields = &read.0;
        let burn_rank = source.0.remove(key::BURN_RANK).and_then(|rank| u64::try_from(rank).ok());
        if burn_rank != Some(fields.shape.len() as u64) {
            return Err(corrupt(format!("`{}` is {burn_rank:?}, the state has rank {}", key::BURN_RANK, fields.shape.len())));
        }
        if let Some(leaf) = source.0.keys().chain(source.1.keys()).next() {
            return Err(corrupt(format!("unexpected entry `{leaf}`")));
        }
        if fields.shape != param.shape {
            return Err(LoadError::ShapeMismatch { param_id, recorded: fields.shape.clone(), expected: param.shape.clone() });
        }
        match entries.paths.get(&param_id) {
            Some(path) if *path == param.path => {}
            Some(path) => return Err(corrupt(format!("recorded for `{path}`, the module has it at `{}`", param.path))),
            None => return Err(corrupt(format!("no module path is recorded (the module has it at `{}`)", param.path))),
        }
        report.parameters.push(ParamStateReport::new(param_id, record, Some(&read)));
    }
    if let Some(id) = entries.paths.keys().find(|id| !entries.params.contains_key(id)) {
        return Err(LoadError::Unreadable(format!("a path is recorded for parameter {id}, which has no state")));
    }
    let record = OptimizerRecord::from_bytes(bytes).map_err(|e| LoadError::Unreadable(e.to_string()))?;
    Ok(CheckedLoad { optimizer: optim.load_record(record), report })
}

/// What the checked load compares a record with: each float parameter's shape and module path.
#[derive(Default)]
struct ModuleParams {
    path: Vec<String>,
    by_id: BTreeMap<u64, ParamInfo>,
}

struct ParamInfo {
    shape: Vec<usize>,
    path: String,
}

impl ModuleVisitor for ModuleParams {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let info = ParamInfo { shape: param.lazy_shape().iter().copied().collect(), path: self.path.join(".") };
        self.by_id.insert(param.id.val(), info);
    }
}

/// Per parameter id: its scalars and its tensors by leaf name (keys are `"{id}.{leaf}"`).
pub(crate) type ParamRecord = (BTreeMap<String, Scalar>, BTreeMap<String, TensorData>);

/// A record's entries grouped by parameter id, plus what belongs to no parameter.
pub(crate) struct Entries {
    pub params: BTreeMap<u64, ParamRecord>,
    /// Each parameter's module path (Burn's group routing), by id.
    pub paths: BTreeMap<u64, String>,
    /// Names of entries that belong to no parameter: a key without an id, or a tensor whose
    /// parameter id differs from its key's.
    pub stray: Vec<String>,
}

/// A record's bytes, as [`read_entries`] reads them.
pub(crate) fn record_bytes(record: OptimizerRecord) -> Result<Bytes, LoadError> {
    record.into_bytes().map_err(|e| LoadError::Unreadable(e.to_string()))
}

/// Reads every entry of a record's bytes, grouped by parameter id: the one reader behind the
/// state report, the checked load and the switch between Burn's optimizers and ours.
pub(crate) fn read_entries(bytes: Bytes) -> Result<Entries, LoadError> {
    let unreadable = |e: &dyn std::fmt::Display| LoadError::Unreadable(e.to_string());
    let reader = Reader::from_bytes(bytes).map_err(|e| unreadable(&e))?;
    let mut stray = Vec::new();
    let mut paths = BTreeMap::new();
    for (name, path) in reader.metadata() {
        match name.parse::<u64>() {
            Ok(id) => {
                paths.insert(id, path.clone());
            }
            Err(_) => stray.push(name.clone()),
        }
    }
    let mut params: BTreeMap<u64, ParamRecord> = BTreeMap::new();
    for (name, value) in reader.scalars() {
        match split_key(name) {
            Some((id, leaf)) => {
                params.entry(id).or_default().0.insert(leaf.to_string(), *value);
            }
            None => stray.push(name.clone()),
        }
    }
    for tensor in reader.into_tensors().map_err(|e| unreadable(&e))? {
        let (name, dtype, shape, param_id, bytes) = tensor.into_parts().map_err(|e| unreadable(&e))?;
        match split_key(&name) {
            Some((id, leaf)) if param_id == Some(id) => {
                let data = TensorData::try_from_bytes(bytes, shape, dtype).map_err(|e| unreadable(&e))?;
                params.entry(id).or_default().1.insert(leaf.to_string(), data);
            }
            _ => stray.push(name),
        }
    }
    Ok(Entries { params, paths, stray })
}

/// A record key `"{param_id}.{leaf}"` split into the id and the leaf.
pub(crate) fn split_key(name: &str) -> Option<(u64, &str)> {
    let (id, leaf) = name.split_once('.')?;
    Some((id.parse().ok()?, leaf))
}
