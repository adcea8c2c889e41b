//! Switching a run between Burn's 32-bit optimizer and its 8-bit twin: records converted both
//! ways, so a checkpoint of one continues with the other.

use std::collections::BTreeMap;

use burn::module::{ParamGroup, ParamId};
use burn::optim::OptimizerRecord;
use burn::tensor::{Bytes, Shape, TensorData};
use burn_8bit_ops::{MapFamily, StepRule, host};
use burn_pack::{Scalar, Writer};

use crate::engine::{StateSettings, UpdateRule};
use crate::error::LoadError;
use crate::format::{SlotData, StateFields, key};
use crate::record::{Entries, read_entries, record_bytes};
use crate::state::{OptimizerKind, rank1_slot};

/// Converts optimizer records between a Burn 32-bit optimizer and this 8-bit optimizer (its
/// twin: `AdamConfig` ↔ `Adam8bitConfig`, `AdamWConfig` ↔ `AdamW8bitConfig`, `SgdConfig` ↔
/// `Sgd8bitConfig`, `RmsPropConfig` ↔ `RmsProp8bitConfig`, `AdaGradConfig` ↔
/// `AdaGrad8bitConfig`, `LionConfig` ↔ `Lion8bitConfig`, `LambConfig` ↔ `Lamb8bitConfig`).
///
/// Importing quantizes Burn's `f32` states with this optimizer's block size (or keeps them `f32`
/// under `min_8bit_size`); exporting decodes them. The step count carries over. For a
/// `ModuleOptimizer` with groups (other settings for some parameters), convert with
/// [`SwitchGroups`], given the same groups.
///
/// ```
/// use burn::module::Module;
/// use burn::nn::LinearConfig;
/// use burn::optim::{AdamWConfig, GradientsParams};
/// use burn::tensor::{Device, Tensor};
/// use burn_8bit_optim::{AdamW8bitConfig, Optim8bitConfig, StateConfig, SwitchRecord};
///
/// let device = Device::default().autodiff();
/// let model = LinearConfig::new(64, 64).init(&device);
/// let mut burn_adamw = AdamWConfig::new().init();
/// let loss = model.forward(Tensor::<2>::ones([2, 64], &device)).sum();
/// let model = burn_adamw.step(1e-3, model.clone(), GradientsParams::from_grads(loss.backward(), &model));
///
/// // Continue the same run with 8-bit state:
/// let config = AdamW8bitConfig::new().with_states(StateConfig::new().with_min_8bit_size(1024));
/// let record = config.build().from_burn_record(burn_adamw.to_record())?;
/// let optim = config.init().load_record(record);
/// # let _ = (optim, model);
/// # Ok::<(), burn_8bit_optim::LoadError>(())
/// ```
pub trait SwitchRecord {
    /// The record of Burn's 32-bit twin, as this optimizer's record.
    fn from_burn_record(&self, record: OptimizerRecord) -> Result<OptimizerRecord, LoadError> {
        SwitchGroups::new(self).from_burn_record(record)
    }

    /// This optimizer's record, as the record of Burn's 32-bit twin.
    fn to_burn_record(&self, record: OptimizerRecord) -> Result<OptimizerRecord, LoadError> {
        SwitchGroups::new(self).to_burn_record(record)
    }

    /// How this optimizer keeps each parameter's state: what a converted record must hold.
    fn state_layout(&self) -> StateLayout;
}

/// How an 8-bit optimizer keeps each parameter's state (its kind, rule and state settings), as
/// [`SwitchRecord::state_layout`] reports it; opaque outside this crate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StateLayout {
    kind: OptimizerKind,
    rule: StepRule,
    settings: StateSettings,
}

impl StateLayout {
    pub(crate) fn of<R: UpdateRule>(rule: &R, settings: StateSettings) -> Self {
        Self {
            kind: R::KIND,
            rule: rule.step_rule(),
            settings,
        }
    }
}

/// Record conversion for a `ModuleOptimizer` with groups: each parameter is converted with the
/// settings of the optimizer that steps it — the last group that matches it, as in
/// `ModuleOptimizer::with_group` — so that, say, embeddings kept on `f32` state stay `f32`.
///
/// ```
/// use burn::module::{Module, ParamGroup};
/// use burn::nn::{Linear, LinearConfig};
/// use burn::optim::{AdamWConfig, GradientsParams};
/// use burn::tensor::{Device, Tensor};
/// use burn_8bit_optim::{AdamW8bitConfig, Optim8bitConfig, StateConfig, SwitchGroups};
///
/// #[derive(Module, Debug)]
/// struct Net {
///     encoder: Linear,
///     head: Linear,
/// }
///
/// let device = Device::default().autodiff();
/// let net = Net { encoder: LinearConfig::new(128, 128).init(&device), head: LinearConfig::new(128, 64).init(&device) };
/// let mut burn_adamw = AdamWConfig::new().init();
/// let loss = net.head.forward(net.encoder.forward(Tensor::<2>::ones([2, 128], &device))).sum();
/// let net = burn_adamw.step(1e-3, net.clone(), GradientsParams::from_grads(loss.backward(), &net));
///
/// // The 8-bit run keeps the head on f32 state; its converted record must say so too.
/// let config = AdamW8bitConfig::new().with_states(StateConfig::new().with_min_8bit_size(1024));
/// let head = ParamGroup::ids_from_module(net.head.clone());
/// let head_optimizer = config.clone().f32_states().build();
/// let record = SwitchGroups::new(&config.build())
///     .with_group(head.clone(), &head_optimizer)
///     .from_burn_record(burn_adamw.to_record())?;
/// let optim = config.init().with_group(head, head_optimizer, None).load_record(record);
/// # let _ = optim;
/// # Ok::<(), burn_8bit_optim::LoadError>(())
/// ```
#[derive(Clone, Debug)]
pub struct SwitchGroups {
    groups: Vec<(ParamGroup, StateLayout)>,
}

impl SwitchGroups {
    /// Every parameter converted for `optimizer` (the module optimizer's first, global optimizer).
    pub fn new<O: SwitchRecord + ?Sized>(optimizer: &O) -> Self {
        Self {
            groups: vec![(ParamGroup::all(), optimizer.state_layout())],
        }
    }

    /// The parameters of `group` converted for `optimizer` instead (later groups win).
    pub fn with_group<O: SwitchRecord + ?Sized>(mut self, group: ParamGroup, optimizer: &O) -> Self {
        self.groups.push((group, optimizer.state_layout()));
        self
    }

    fn layout(&self, param_id: u64, path: Option<&str>) -> StateLayout {
        let id = ParamId::from(param_id);
        self.groups
            .iter()
            .rev()
            .find(|(group, _)| group.matches(&id, path))
            .map(|(_, layout)| *layout)
            .expect("the first group matches every parameter")
    }

    /// The record of Burn's 32-bit twins, as the record of the grouped 8-bit optimizers.
    pub fn from_burn_record(&self, record: OptimizerRecord) -> Result<OptimizerRecord, LoadError> {
        let mut entries = read_entries(record_bytes(record)?)?;
        let mut stateless = Vec::new();
        for (&param_id, (scalars, tensors)) in entries.params.iter_mut() {
            let target = self.layout(param_id, entries.paths.get(&param_id).map(String::as_str));
            match from_burn(target, param_id, scalars, tensors)? {
                Some(fields) => replace_entries(scalars, tensors, fields.entries()),
                None => stateless.push(param_id),
            }
        }
        for param_id in stateless {
            entries.params.remove(&param_id);
            entries.paths.remove(&param_id);
        }
        write(entries)
    }

    /// The record of the grouped 8-bit optimizers, as the record of their Burn 32-bit twins.
    pub fn to_burn_record(&self, record: OptimizerRecord) -> Result<OptimizerRecord, LoadError> {
        let mut entries = read_entries(record_bytes(record)?)?;
        for (&param_id, (scalars, tensors)) in entries.params.iter_mut() {
            let target = self.layout(param_id, entries.paths.get(&param_id).map(String::as_str));
            let converted = to_burn(target, param_id, scalars, tensors)?;
            replace_entries(scalars, tensors, converted);
        }
        write(entries)
    }
}

/// Where Burn's optimizer keeps the step count and each state, in our slot order.
struct BurnLayout {
    time: Option<&'static str>,
    slots: Vec<&'static str>,
    /// RMSprop's `centered.avg`, which Burn stores although it derives it from the others.
    centered_avg: bool,
}

fn burn_layout(kind: OptimizerKind, rule: StepRule) -> Result<BurnLayout, LoadError> {
    let layout = |time, slots| BurnLayout { time, slots, centered_avg: false };
    Ok(match (kind, rule) {
        (OptimizerKind::Adam | OptimizerKind::AdamW, StepRule::Adam { amsgrad, .. }) => {
            let mut slots = vec!["momentum.moment_1", "momentum.moment_2"];
            if amsgrad {
                slots.push("momentum.max_moment_2");
            }
            layout(Some("momentum.time"), slots)
        }
        (OptimizerKind::Sgd, StepRule::Sgd) => layout(None, Vec::new()),
        (OptimizerKind::Sgd, _) => layout(None, vec!["momentum.velocity"]),
        (OptimizerKind::RmsProp, StepRule::RmsProp { centered, momentum }) => {
            let mut slots = vec!["square_avg.square_avg"];
            if momentum {
                slots.push("momentum.buf");
            }
            if centered {
                slots.push("centered.grad_avg");
            }
            BurnLayout { time: None, slots, centered_avg: true }
        }
        (OptimizerKind::AdaGrad, _) => layout(Some("lr_decay.time"), vec!["lr_decay.sum"]),
        (OptimizerKind::Lion, _) => layout(None, vec!["momentum"]),
        (OptimizerKind::Lamb, _) => layout(Some("time"), vec!["moment_1", "moment_2"]),
        (other, _) => {
            return Err(LoadError::Unreadable(format!("{} has no 32-bit twin in Burn", other.name())));
        }
    })
}

fn write(entries: Entries) -> Result<OptimizerRecord, LoadError> {
    let mut tensors = Vec::new();
    let mut scalars = Vec::new();
    for (id, (param_scalars, param_tensors)) in entries.params {
        for (leaf, value) in param_scalars {
            scalars.push((format!("{id}.{leaf}"), value));
        }
        for (leaf, data) in param_tensors {
            let (bytes, shape, dtype) = data.into_parts();
            tensors.push(burn_pack::Tensor::new(format!("{id}.{leaf}"), dtype, shape, Some(id), bytes));
        }
    }
    let mut writer = Writer::new(tensors);
    for (key, value) in scalars {
        writer = writer.with_scalar(&key, value);
    }
    for (id, path) in &entries.paths {
        writer = writer.with_metadata(&id.to_string(), path);
    }
    let bytes: Bytes = writer.into_bytes().map_err(|e| LoadError::Unreadable(e.to_string()))?;
    OptimizerRecord::from_bytes(bytes).map_err(|e| LoadError::Unreadable(e.to_string()))
}

fn f32_values(data: &TensorData, param_id: u64, name: &str) -> Result<Vec<f32>, LoadError> {
    data.clone().convert::<f32>().try_into_vec::<f32>().map_err(|e| LoadError::Corrupt {
        param_id,
        reason: format!("{name}: {e:?}"),
    })
}

/// Replaces a parameter's entries with `fields`' (Burn's `__rank` kept).
fn replace_entries(scalars: &mut BTreeMap<String, Scalar>, tensors: &mut BTreeMap<String, TensorData>, fields: (Vec<(String, Scalar)>, Vec<(String, TensorData)>)) {
    let rank = scalars.remove(key::BURN_RANK);
    scalars.clear();
    scalars.extend(rank.map(|rank| (key::BURN_RANK.to_string(), rank)));
    scalars.extend(fields.0);
    *tensors = fields.1.into_iter().collect();
}

/// One parameter's entries of a Burn twin's record as the fields of `target`'s state; `None`
/// for a rule without state (plain SGD), whose fresh state equals any converted one.
fn from_burn(
    target: StateLayout,
    param_id: u64,
    scalars: &BTreeMap<String, Scalar>,
    tensors: &BTreeMap<String, TensorData>,
) -> Result<Option<StateFields>, LoadError> {
    let StateLayout { kind, rule, settings } = target;
    let layout = burn_layout(kind, rule)?;
    let missing = |name: &str| LoadError::Corrupt {
        param_id,
        reason: format!("not a record of {}'s 32-bit twin: `{name}` is missing", kind.name()),
    };
    let Some(first) = layout.slots.first() else {
        return match tensors.keys().next() {
            Some(name) => Err(LoadError::Corrupt {
                param_id,
                reason: format!("the record keeps `{name}`, which {} without momentum has no place for", kind.name()),
            }),
            None => Ok(None),
        };
    };
    let shape: Vec<usize> = tensors.get(*first).ok_or_else(|| missing(first))?.shape().iter().copied().collect();
    let len: usize = shape.iter().product();
    let time = match layout.time {
        Some(key) => u64::try_from(*scalars.get(key).ok_or_else(|| missing(key))?).map_err(|_| missing(key))?,
        // Burn's optimizers without a step count have taken at least one step.
        None => 1,
    };
    let block_size = (len >= settings.min_8bit_size).then_some(settings.block_size);
    let state_layout = block_size.map(|size| (size, settings.map_family));
    let rank1_at = rank1_slot(rule, state_layout, &Shape::from(shape.clone()), settings.rank1);
    let mut slots = Vec::new();
    for (index, (key, map)) in layout.slots.iter().zip(rule.state_maps(settings.map_family)).enumerate() {
        let values = f32_values(tensors.get(*key).ok_or_else(|| missing(key))?, param_id, key)?;
        if len == 0 {
            continue;
        }
        slots.push(match block_size {
            Some(_) if rank1_at == Some(index) => {
                let cols = len / shape[0];
                let (words, rows, cols) = host::rank1_quantize(&values, cols, map).expect("a fitting matrix");
                SlotData::Rank1 { words, rows, cols }
            }
            Some(block_size) => {
                let (words, absmax) = host::quantize(&values, map, block_size);
                SlotData::Quantized { words, absmax }
            }
            None => SlotData::Full(values),
        });
    }
    Ok(Some(StateFields {
        kind,
        rule,
        time: usize::try_from(time).map_err(|_| missing("a step count in range"))?,
        shape,
        layout: state_layout,
        slots,
        skipped: 0,
        gnorms: None,
    }))
}

/// One parameter's entries of `target`'s record as the entries of its Burn twin's state.
fn to_burn(
    target: StateLayout,
    param_id: u64,
    scalars: &BTreeMap<String, Scalar>,
    tensors: &BTreeMap<String, TensorData>,
) -> Result<(Vec<(String, Scalar)>, Vec<(String, TensorData)>), LoadError> {
    let kind = scalars.get(key::KIND).and_then(|&code| u64::try_from(code).ok()).and_then(OptimizerKind::from_code);
    if kind != Some(target.kind) {
        return Err(LoadError::OptimizerMismatch {
            param_id,
            recorded: kind.map_or("not a burn-8bit optimizer", OptimizerKind::name).to_string(),
            expected: target.kind.name().to_string(),
        });
    }
    let (fields, _) = StateFields::read(&mut (scalars.clone(), tensors.clone()))
        .map_err(|reason| LoadError::Corrupt { param_id, reason })?;
    let layout = burn_layout(target.kind, fields.rule)?;
    let len = fields.len();
    let family = fields.layout.map_or(MapFamily::Dynamic, |(_, family)| family);
    let decoded: Vec<Vec<f32>> = match len {
        0 => vec![Vec::new(); fields.rule.num_states()],
        _ => fields
            .slots
            .iter()
            .zip(fields.rule.state_maps(family))
            .map(|(slot, map)| match slot {
                SlotData::Quantized { words, absmax } => {
                    let (block_size, _) = fields.layout.expect("8-bit slots come with their layout");
                    host::dequantize(words, absmax, map, block_size, len)
                        .map_err(|error| LoadError::Corrupt { param_id, reason: error.to_string() })
                }
                SlotData::Rank1 { words, rows, cols } => host::rank1_dequantize(words, rows, cols, map)
                    .map_err(|error| LoadError::Corrupt { param_id, reason: error.to_string() }),
                SlotData::Full(values) => Ok(values.clone()),
            })
            .collect::<Result<_, _>>()?,
    };
    let dims = fields.shape.clone();
    let mut converted = BTreeMap::new();
    for (key, values) in layout.slots.iter().zip(&decoded) {
        converted.insert(key.to_string(), TensorData::new(values.clone(), dims.clone()));
    }
    if layout.centered_avg {
        let centered = matches!(fields.rule, StepRule::RmsProp { centered: true, .. });
        let avg: Vec<f32> = match centered {
            true => decoded[0].iter().zip(decoded.last().expect("grad_avg")).map(|(s, m)| s - m * m).collect(),
            false => decoded[0].clone(),
        };
        converted.insert("centered.avg".to_string(), TensorData::new(avg, dims.clone()));
    }
    let time_entry = layout.time.map(|key| (key.to_string(), Scalar::from(fields.time)));
    Ok((time_entry.into_iter().collect(), converted.into_iter().collect()))
}
