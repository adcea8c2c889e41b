//! Switching a run between Burn's 32-bit optimizer and its 8-bit twin: records converted both
//! ways, so a checkpoint of one continues with the other.

use std::collections::BTreeMap;

use burn::optim::OptimizerRecord;
use burn::tensor::{Bytes, TensorData};
use burn_8bit_ops::{MapFamily, StepRule, cpu};
use burn_pack::{Scalar, Writer};

use crate::engine::UpdateRule;
use crate::error::LoadError;
use crate::format::{SlotData, StateFields, key};
use crate::record::{Entries, read_entries};
use crate::state::OptimizerKind;

/// Converts optimizer records between a Burn 32-bit optimizer and this 8-bit optimizer (its
/// twin: `AdamConfig` ↔ `Adam8bitConfig`, `AdamWConfig` ↔ `AdamW8bitConfig`, `SgdConfig` with
/// momentum ↔ `Sgd8bitConfig`, `RmsPropConfig` ↔ `RmsProp8bitConfig`, `AdaGradConfig` ↔
/// `AdaGrad8bitConfig`, `LionConfig` ↔ `Lion8bitConfig`, `LambConfig` ↔ `Lamb8bitConfig`).
///
/// Importing quantizes Burn's `f32` states with this optimizer's block size (or keeps them `f32`
/// under `min_8bit_size`); exporting decodes them. The step count carries over.
///
/// ```
/// use burn::module::Module;
/// use burn::nn::LinearConfig;
/// use burn::optim::{AdamWConfig, GradientsParams};
/// use burn::tensor::{Device, Tensor};
/// use burn_8bit_optim::{AdamW8bitConfig, SwitchRecord};
///
/// let device = Device::default().autodiff();
/// let model = LinearConfig::new(64, 64).init(&device);
/// let mut burn_adamw = AdamWConfig::new().init();
/// let loss = model.forward(Tensor::<2>::ones([2, 64], &device)).sum();
/// let model = burn_adamw.step(1e-3, model.clone(), GradientsParams::from_grads(loss.backward(), &model));
///
/// // Continue the same run with 8-bit state:
/// let config = AdamW8bitConfig::new().with_min_8bit_size(1024);
/// let record = config.build().from_burn_record(burn_adamw.to_record())?;
/// let optim = config.init().load_record(record);
/// # let _ = (optim, model);
/// # Ok::<(), burn_8bit_optim::LoadError>(())
/// ```
pub trait SwitchRecord {
    /// The record of Burn's 32-bit twin, as this optimizer's record.
    fn from_burn_record(&self, record: OptimizerRecord) -> Result<OptimizerRecord, LoadError>;

    /// This optimizer's record, as the record of Burn's 32-bit twin.
    fn to_burn_record(&self, record: OptimizerRecord) -> Result<OptimizerRecord, LoadError>;
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

pub(crate) fn from_burn<R: UpdateRule>(optimizer: &R, record: OptimizerRecord) -> Result<OptimizerRecord, LoadError> {
    let rule = optimizer.step_rule();
    let layout = burn_layout(R::KIND, rule)?;
    let settings = optimizer.settings();
    let mut entries = read_entries(record.into_bytes().map_err(|e| LoadError::Unreadable(e.to_string()))?)?;
    for (&param_id, (scalars, tensors)) in entries.params.iter_mut() {
        let missing = |name: &str| LoadError::Corrupt {
            param_id,
            reason: format!("not a record of {}'s 32-bit twin: `{name}` is missing", R::KIND.name()),
        };
        let first = tensors.get(layout.slots[0]).ok_or_else(|| missing(layout.slots[0]))?;
        let shape: Vec<usize> = first.shape().iter().copied().collect();
        let len: usize = shape.iter().product();
        let time = match layout.time {
            Some(key) => u64::try_from(*scalars.get(key).ok_or_else(|| missing(key))?)
                .map_err(|_| missing(key))?,
            // Burn's optimizers without a step count have taken at least one step.
            None => 1,
        };
        let block_size = (len >= settings.min_8bit_size).then_some(settings.block_size);
        let mut slots = Vec::new();
        for (key, map) in layout.slots.iter().zip(rule.state_maps(settings.map_family)) {
            let values = f32_values(tensors.get(*key).ok_or_else(|| missing(key))?, param_id, key)?;
            if len == 0 {
                continue;
            }
            slots.push(match block_size {
                Some(block_size) => {
                    let (words, absmax) = cpu::quantize(&values, map, block_size.get());
                    SlotData::Quantized { words, absmax }
                }
                None => SlotData::Full(values),
            });
        }
        let fields = StateFields {
            kind: R::KIND,
            rule,
            time: usize::try_from(time).map_err(|_| missing("a step count in range"))?,
            shape,
            layout: block_size.map(|size| (size, settings.map_family)),
            slots,
            skipped: 0,
            gnorms: None,
        };
        replace_entries(scalars, tensors, fields.entries());
    }
    write(entries)
}

pub(crate) fn to_burn<R: UpdateRule>(record: OptimizerRecord) -> Result<OptimizerRecord, LoadError> {
    let mut entries = read_entries(record.into_bytes().map_err(|e| LoadError::Unreadable(e.to_string()))?)?;
    for (&param_id, (scalars, tensors)) in entries.params.iter_mut() {
        let kind = scalars.get(key::KIND).and_then(|&code| u64::try_from(code).ok()).and_then(OptimizerKind::from_code);
        if kind != Some(R::KIND) {
            return Err(LoadError::OptimizerMismatch {
                param_id,
                recorded: kind.map_or("not a burn-8bit optimizer", OptimizerKind::name).to_string(),
                expected: R::KIND.name().to_string(),
            });
        }
        let (fields, _) = StateFields::read(&mut (scalars.clone(), tensors.clone()))
            .map_err(|reason| LoadError::Corrupt { param_id, reason })?;
        let layout = burn_layout(R::KIND, fields.rule)?;
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
                        let mut values = vec![0.0; len];
                        cpu::dequantize(words, absmax, map, block_size.get(), &mut values);
                        values
                    }
                    SlotData::Full(values) => values.clone(),
                })
                .collect(),
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
        replace_entries(scalars, tensors, (time_entry.into_iter().collect(), converted.into_iter().collect()));
    }
    write(entries)
}
