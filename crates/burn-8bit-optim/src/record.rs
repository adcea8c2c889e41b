//! Reading optimizer records: the state-memory report and the checked load.
//!
//! Burn's `ModuleOptimizer::load_record` silently drops any state it cannot restore (and
//! restarts those parameters from zero); [`load_record_checked`] refuses such a record with a
//! [`LoadError`] instead.

use std::collections::BTreeMap;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{ModuleOptimizer, OptimizerRecord};
use burn::tensor::{Bytes, Tensor, TensorData};
use burn_8bit_ops::{BlockSize, StepRule, fnv1a64, num_words};
use burn_pack::{Reader, Scalar};

use crate::error::LoadError;
use crate::state::{KIND, OptimizerKind, RANK, dim_key};

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
    /// Whether the states are 8-bit.
    pub quantized: bool,
    /// FNV-1a 64 over the state's tensors (bytes, in name order) and step count: equal
    /// fingerprints mean equal states, whatever the parameter's id.
    pub fingerprint: u64,
}

/// The optimizer-state memory of a [`ModuleOptimizer`], per parameter.
///
/// ```
/// use burn::module::Module;
/// use burn::nn::LinearConfig;
/// use burn::optim::GradientsParams;
/// use burn::tensor::{Device, Tensor};
/// use burn_8bit_optim::{Adam8bitConfig, StateReport};
///
/// let device = Device::default().autodiff();
/// let model = LinearConfig::new(128, 64).init(&device);
/// let mut optim = Adam8bitConfig::new().with_min_8bit_size(1024).init();
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
        let bytes = optim.into_bytes().map_err(|e| LoadError::Unreadable(e.to_string()))?;
        Ok(Self::from_parsed(&ParsedRecord::parse(bytes)?))
    }

    fn from_parsed(record: &ParsedRecord) -> Self {
        let parameters = record
            .params
            .iter()
            .map(|(&param_id, param)| ParamStateReport {
                param_id,
                optimizer: param.kind(),
                elements: param.elements(),
                bytes: param.tensors.values().map(|t| t.bytes).sum(),
                quantized: param.scalar("block_size").is_some_and(|b| b > 0),
                fingerprint: param.fingerprint,
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
}

/// Loads `record` into `optim` after checking it against `module` and the expected optimizer:
/// every state must be `expected`'s, for a parameter of `module` with the same number of
/// elements, and complete. A state written with another block size is accepted and is
/// re-quantized to the optimizer's block size at its next step.
///
/// ```
/// use burn::nn::LinearConfig;
/// use burn::tensor::Device;
/// use burn_8bit_optim::{Adam8bitConfig, AdamW8bitConfig, LoadError, OptimizerKind};
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
) -> Result<ModuleOptimizer, LoadError> {
    let bytes = record.into_bytes().map_err(|e| LoadError::Unreadable(e.to_string()))?;
    let parsed = ParsedRecord::parse(bytes.clone())?;
    let mut shapes = ParamElements::default();
    module.visit(&mut shapes);
    for (&param_id, param) in &parsed.params {
        let expected_elements =
            *shapes.elements.get(&param_id).ok_or(LoadError::UnknownParameter { param_id })?;
        match param.kind() {
            Some(kind) if kind == expected => {}
            recorded => {
                return Err(LoadError::OptimizerMismatch {
                    param_id,
                    recorded: recorded.map_or("not a burn-8bit optimizer", OptimizerKind::name).to_string(),
                    expected: expected.name().to_string(),
                });
            }
        }
        let elements = param.elements().ok_or_else(|| corrupt(param_id, "no shape"))?;
        if elements != expected_elements {
            return Err(LoadError::ShapeMismatch {
                param_id,
                recorded: elements,
                expected: expected_elements,
            });
        }
        param.check_complete(param_id, elements)?;
    }
    let record = OptimizerRecord::from_bytes(bytes).map_err(|e| LoadError::Unreadable(e.to_string()))?;
    Ok(optim.load_record(record))
}

fn corrupt(param_id: u64, reason: impl Into<String>) -> LoadError {
    LoadError::Corrupt {
        param_id,
        reason: reason.into(),
    }
}

#[derive(Default)]
struct ParamElements {
    elements: BTreeMap<u64, u64>,
}

impl ModuleVisitor for ParamElements {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.elements.insert(param.id.val(), param.lazy_shape().num_elements() as u64);
    }
}

struct TensorInfo {
    elements: u64,
    bytes: u64,
}

#[derive(Default)]
struct ParamEntries {
    scalars: BTreeMap<String, Scalar>,
    tensors: BTreeMap<String, TensorInfo>,
    fingerprint: u64,
}

impl ParamEntries {
    fn scalar(&self, key: &str) -> Option<u64> {
        u64::try_from(*self.scalars.get(key)?).ok()
    }

    fn kind(&self) -> Option<OptimizerKind> {
        OptimizerKind::from_code(self.scalar(KIND)?)
    }

    fn elements(&self) -> Option<u64> {
        let rank = self.scalar(RANK)?;
        (0..rank as usize).map(|axis| self.scalar(&dim_key(axis))).product()
    }

    fn check_complete(&self, param_id: u64, elements: u64) -> Result<(), LoadError> {
        let rule = self
            .scalar("rule")
            .and_then(StepRule::from_code)
            .ok_or_else(|| corrupt(param_id, "unknown update rule"))?;
        let block_size = self.scalar("block_size").ok_or_else(|| corrupt(param_id, "no block size"))?;
        let len = elements as usize;
        let expect = |name: String, count: u64| match self.tensors.get(&name) {
            Some(tensor) if tensor.elements == count => Ok(()),
            Some(tensor) => Err(corrupt(param_id, format!("{name} has {} elements, expected {count}", tensor.elements))),
            None => Err(corrupt(param_id, format!("{name} is missing"))),
        };
        for slot in 0..rule.num_states() {
            if block_size == 0 {
                expect(format!("state{slot}.values"), elements)?;
            } else {
                let block_size = BlockSize::new(block_size as usize)
                    .map_err(|e| corrupt(param_id, e.to_string()))?;
                expect(format!("state{slot}.codes"), num_words(len) as u64)?;
                expect(format!("state{slot}.absmax"), block_size.num_blocks(len) as u64)?;
            }
        }
        expect("skipped".to_string(), 1)?;
        match self.tensors.get("gnorms") {
            Some(ring) if ring.elements != 100 => {
                Err(corrupt(param_id, format!("gnorms has {} entries, expected 100", ring.elements)))
            }
            _ => Ok(()),
        }
    }
}

/// Per parameter id: its scalars and its tensors by leaf name (keys are `"{id}.{leaf}"`).
pub(crate) type ParamRecord = (BTreeMap<String, Scalar>, BTreeMap<String, TensorData>);

/// A record's entries grouped by parameter id, plus what belongs to no parameter.
pub(crate) struct Entries {
    pub params: BTreeMap<u64, ParamRecord>,
    pub metadata: BTreeMap<String, String>,
}

/// Reads every entry of a record's bytes, grouped by parameter id: the one reader behind the
/// state report, the checked load and the switch between Burn's optimizers and ours.
pub(crate) fn read_entries(bytes: Bytes) -> Result<Entries, LoadError> {
    let unreadable = |e: &dyn std::fmt::Display| LoadError::Unreadable(e.to_string());
    let reader = Reader::from_bytes(bytes).map_err(|e| unreadable(&e))?;
    let metadata = reader.metadata().clone();
    let mut params: BTreeMap<u64, ParamRecord> = BTreeMap::new();
    for (name, value) in reader.scalars() {
        if let Some((id, leaf)) = split_key(name) {
            params.entry(id).or_default().0.insert(leaf.to_string(), *value);
        }
    }
    for tensor in reader.into_tensors().map_err(|e| unreadable(&e))? {
        let (name, dtype, shape, _, bytes) = tensor.into_parts().map_err(|e| unreadable(&e))?;
        if let Some((id, leaf)) = split_key(&name) {
            params.entry(id).or_default().1.insert(leaf.to_string(), TensorData::from_bytes(bytes, shape, dtype));
        }
    }
    Ok(Entries { params, metadata })
}

/// A record's entries as the report and the checked load need them: scalars, tensor sizes and
/// a content fingerprint per parameter id.
struct ParsedRecord {
    params: BTreeMap<u64, ParamEntries>,
}

impl ParsedRecord {
    fn parse(bytes: Bytes) -> Result<Self, LoadError> {
        let params = read_entries(bytes)?
            .params
            .into_iter()
            .map(|(id, (mut scalars, tensors))| {
                scalars.remove("__rank");
                let mut param = ParamEntries { scalars, ..ParamEntries::default() };
                // Tensors in leaf-name order, then the step count.
                let time = param.scalar("time").unwrap_or(0).to_le_bytes();
                let content = tensors.values().flat_map(|data| data.as_bytes().iter().copied());
                param.fingerprint = fnv1a64(content.chain(time));
                param.tensors = tensors
                    .into_iter()
                    .map(|(leaf, data)| {
                        let info = TensorInfo { elements: data.num_elements() as u64, bytes: data.as_bytes().len() as u64 };
                        (leaf, info)
                    })
                    .collect();
                (id, param)
            })
            .collect();
        Ok(Self { params })
    }
}

/// A record key `"{param_id}.{leaf}"` split into the id and the leaf.
pub(crate) fn split_key(name: &str) -> Option<(u64, &str)> {
    let (id, leaf) = name.split_once('.')?;
    Some((id.parse().ok()?, leaf))
}
