//! Switching a run between Burn's 32-bit optimizer and its 8-bit twin: records converted both
//! ways, so a checkpoint of one continues with the other.

use std::collections::BTreeMap;

use burn::optim::OptimizerRecord;
use burn::tensor::{Bytes, DType, Shape, TensorData};
use burn_8bit_ops::{MapFamily, MapKind, StepRule, cpu, num_words};
use burn_pack::{Scalar, Writer};

use crate::engine::UpdateRule;
use crate::error::LoadError;
use crate::record::{Entries, read_entries};
use crate::state::{BLOCK_SIZE, KIND, MAP_FAMILY, OptimizerKind, RANK, RULE, SKIPPED, TIME, dim_key, slot_key};

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
    for (key, value) in &entries.metadata {
        writer = writer.with_metadata(key, value);
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
        let shape: Shape = first.shape().clone();
        let len = shape.num_elements();
        let time = match layout.time {
            Some(key) => u64::try_from(*scalars.get(key).ok_or_else(|| missing(key))?)
                .map_err(|_| missing(key))?,
            // Burn's optimizers without a step count have taken at least one step.
            None => 1,
        };
        let block_size = (len >= settings.min_8bit_size).then_some(settings.block_size);
        let mut converted = BTreeMap::new();
        for (slot, (key, map)) in layout.slots.iter().zip(rule.state_maps(settings.map_family)).enumerate() {
            let values = f32_values(tensors.get(*key).ok_or_else(|| missing(key))?, param_id, key)?;
            match block_size {
                Some(block_size) => {
                    let (words, absmax) = cpu::quantize(&values, map, block_size.get());
                    converted.insert(slot_key(slot, "codes"), TensorData::new(words, [num_words(len)]));
                    converted.insert(slot_key(slot, "absmax"), TensorData::new(absmax.clone(), [absmax.len()]));
                }
                None => {
                    converted.insert(slot_key(slot, "values"), TensorData::new(values, [len]));
                }
            }
        }
        converted.insert(SKIPPED.to_string(), TensorData::new(vec![0u32], [1]));
        let rank = scalars.get("__rank").copied();
        scalars.clear();
        if let Some(rank) = rank {
            scalars.insert("__rank".to_string(), rank);
        }
        scalars.insert(KIND.to_string(), Scalar::from(R::KIND.code()));
        scalars.insert(RULE.to_string(), Scalar::from(rule.code()));
        scalars.insert(TIME.to_string(), Scalar::from(time));
        scalars.insert(RANK.to_string(), Scalar::from(shape.num_dims()));
        for (axis, &dim) in shape.iter().enumerate() {
            scalars.insert(dim_key(axis), Scalar::from(dim));
        }
        scalars.insert(BLOCK_SIZE.to_string(), Scalar::from(block_size.map_or(0, |b| b.get())));
        scalars.insert(MAP_FAMILY.to_string(), Scalar::from(settings.map_family.code()));
        *tensors = converted;
    }
    write(entries)
}

pub(crate) fn to_burn<R: UpdateRule>(record: OptimizerRecord) -> Result<OptimizerRecord, LoadError> {
    let mut entries = read_entries(record.into_bytes().map_err(|e| LoadError::Unreadable(e.to_string()))?)?;
    for (&param_id, (scalars, tensors)) in entries.params.iter_mut() {
        let scalar = |key: &str| -> Result<u64, LoadError> {
            scalars
                .get(key)
                .and_then(|v| u64::try_from(*v).ok())
                .ok_or_else(|| LoadError::Corrupt { param_id, reason: format!("`{key}` is missing") })
        };
        let kind = OptimizerKind::from_code(scalar(KIND)?);
        if kind != Some(R::KIND) {
            return Err(LoadError::OptimizerMismatch {
                param_id,
                recorded: kind.map_or("not a burn-8bit optimizer", OptimizerKind::name).to_string(),
                expected: R::KIND.name().to_string(),
            });
        }
        let rule = StepRule::from_code(scalar(RULE)?)
            .ok_or_else(|| LoadError::Corrupt { param_id, reason: "unknown update rule".into() })?;
        let layout = burn_layout(R::KIND, rule)?;
        let rank = scalar(RANK)? as usize;
        let dims = (0..rank).map(|axis| scalar(&dim_key(axis)).map(|d| d as usize)).collect::<Result<Vec<_>, _>>()?;
        let len: usize = dims.iter().product();
        let time = scalar(TIME)?;
        let block_size = scalar(BLOCK_SIZE)? as usize;
        let family = match scalars.get(MAP_FAMILY) {
            None => Some(MapFamily::Dynamic),
            Some(&code) => u64::try_from(code).ok().and_then(MapFamily::from_code),
        }
        .ok_or_else(|| LoadError::Corrupt { param_id, reason: "unknown map family".into() })?;
        let mut decoded = Vec::new();
        for (slot, map) in rule.state_maps(family).into_iter().enumerate() {
            let values = if block_size == 0 {
                let key = slot_key(slot, "values");
                f32_values(tensors.get(&key).ok_or_else(|| LoadError::Corrupt { param_id, reason: format!("`{key}` is missing") })?, param_id, &key)?
            } else {
                decode(tensors, slot, map, block_size, len, param_id)?
            };
            decoded.push(values);
        }
        let mut converted = BTreeMap::new();
        for (key, values) in layout.slots.iter().zip(&decoded) {
            converted.insert(key.to_string(), TensorData::new(values.clone(), dims.clone()));
        }
        if layout.centered_avg {
            let centered = matches!(rule, StepRule::RmsProp { centered: true, .. });
            let avg: Vec<f32> = match centered {
                true => decoded[0].iter().zip(decoded.last().expect("grad_avg")).map(|(s, m)| s - m * m).collect(),
                false => decoded[0].clone(),
            };
            converted.insert("centered.avg".to_string(), TensorData::new(avg, dims.clone()));
        }
        let rank_scalar = scalars.get("__rank").copied();
        scalars.clear();
        if let Some(rank) = rank_scalar {
            scalars.insert("__rank".to_string(), rank);
        }
        if let Some(key) = layout.time {
            scalars.insert(key.to_string(), Scalar::from(time));
        }
        *tensors = converted;
    }
    write(entries)
}

fn decode(
    tensors: &BTreeMap<String, TensorData>,
    slot: usize,
    map: MapKind,
    block_size: usize,
    len: usize,
    param_id: u64,
) -> Result<Vec<f32>, LoadError> {
    let corrupt = |reason: String| LoadError::Corrupt { param_id, reason };
    let codes_key = slot_key(slot, "codes");
    let absmax_key = slot_key(slot, "absmax");
    let codes = tensors.get(&codes_key).ok_or_else(|| corrupt(format!("`{codes_key}` is missing")))?;
    let absmax = tensors.get(&absmax_key).ok_or_else(|| corrupt(format!("`{absmax_key}` is missing")))?;
    if codes.dtype() != DType::U32 && codes.dtype() != DType::I32 {
        return Err(corrupt(format!("`{codes_key}` is {:?}", codes.dtype())));
    }
    let words: Vec<u32> = codes
        .as_bytes()
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let absmax = f32_values(absmax, param_id, &absmax_key)?;
    if words.len() != num_words(len) || absmax.len() != len.div_ceil(block_size) {
        return Err(corrupt(format!("state {slot} does not fit {len} elements")));
    }
    Ok(cpu::dequantize(&words, &absmax, map, block_size, len))
}
