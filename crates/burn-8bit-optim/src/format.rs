//! The state record's format (docs/algorithm.md §4), stated once: every key, the format version,
//! the checksum, and the one reader that validates a parameter's entries. `state_flatten`, the
//! record switch, `state_unflatten` and the checked load all go through [`StateFields`].

use std::collections::BTreeMap;

use burn::tensor::{DType, TensorData};
use burn::tensor::Shape;
use burn_8bit_ops::{BlockSize, MapFamily, Rank1Quantized, StepRule};
use burn_pack::Scalar;
use xxhash_rust::xxh3::Xxh3;

use crate::state::OptimizerKind;

/// The version this crate writes. 0 is a record without a `format` key (written before the
/// checksum existed); it still loads, unverified.
pub(crate) const FORMAT_VERSION: u64 = 1;

/// Entries of percentile clipping's ring of squared gradient norms.
pub(crate) const RING_LEN: usize = 100;

/// The record keys of one parameter's state, each defined here only.
pub(crate) mod key {
    /// The record format version (absent: 0).
    pub const FORMAT: &str = "format";
    /// The optimizer ([`crate::OptimizerKind`]'s code).
    pub const KIND: &str = "kind";
    /// The update rule (`StepRule::code`).
    pub const RULE: &str = "rule";
    /// Steps taken.
    pub const TIME: &str = "time";
    /// The parameter's rank; its dimensions follow as `dim0`, `dim1`, ….
    pub const RANK: &str = "rank";
    /// The states' block size, 0 for `f32` states.
    pub const BLOCK_SIZE: &str = "block_size";
    /// The states' map family (`MapFamily::code`).
    pub const MAP_FAMILY: &str = "map_family";
    /// Elements skipped for non-finite values (a scalar since format 1, a `u32[1]` tensor before).
    pub const SKIPPED: &str = "skipped";
    /// Percentile clipping's ring, `f32[100]`, present only when clipping is on.
    pub const GNORMS: &str = "gnorms";
    /// xxh3-64 of every other field (format 1).
    pub const CHECKSUM: &str = "checksum";
    /// The parameter's rank as Burn's `ModuleOptimizer` records it for every parameter.
    pub const BURN_RANK: &str = "__rank";

    /// The key of dimension `axis`.
    pub fn dim(axis: usize) -> String {
        format!("dim{axis}")
    }

    /// The key of a part (`codes`, `absmax`, `rows`, `cols` or `values`) of state slot `slot`.
    pub fn slot(slot: usize, part: &str) -> String {
        format!("state{slot}.{part}")
    }
}

/// One state slot as the record holds it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum SlotData {
    /// Packed codes and one absmax per block.
    Quantized { words: Vec<u32>, absmax: Vec<f32> },
    /// Packed codes and the row and column norms of rank-1 normalisation.
    Rank1 { words: Vec<u32>, rows: Vec<f32>, cols: Vec<f32> },
    /// `f32` values, one per element.
    Full(Vec<f32>),
}

/// One parameter's state as the record holds it, validated: what the state reader needs and
/// nothing else.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct StateFields {
    pub kind: OptimizerKind,
    pub rule: StepRule,
    pub time: usize,
    pub shape: Vec<usize>,
    /// Block size and map family of 8-bit states; `None` for `f32` states.
    pub layout: Option<(BlockSize, MapFamily)>,
    /// One per state of the rule; none for a parameter without elements.
    pub slots: Vec<SlotData>,
    pub skipped: u64,
    pub gnorms: Option<Vec<f32>>,
}

/// Whether a record's checksum was verified: records written before format 1 have none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordChecksum {
    /// The checksum was present and matched every field.
    Verified,
    /// The record predates checksums (format 0), or is not a burn-8bit state.
    Absent,
}

/// Where [`StateFields::read`] takes entries from; each entry is taken once.
pub(crate) trait FieldSource {
    fn scalar(&mut self, key: &str) -> Option<Scalar>;
    fn tensor(&mut self, key: &str) -> Option<TensorData>;
}

/// A parameter's entries by leaf name, as the record readers group them; what the reader takes
/// is removed, so the rest are entries it does not know.
impl FieldSource for (BTreeMap<String, Scalar>, BTreeMap<String, TensorData>) {
    fn scalar(&mut self, key: &str) -> Option<Scalar> {
        self.0.remove(key)
    }

    fn tensor(&mut self, key: &str) -> Option<TensorData> {
        self.1.remove(key)
    }
}

fn uint(source: &mut impl FieldSource, key: &str) -> Result<Option<u64>, String> {
    match source.scalar(key) {
        None => Ok(None),
        Some(value) => u64::try_from(value).map(Some).map_err(|_| format!("`{key}` = {value:?} is not a count")),
    }
}

fn required(source: &mut impl FieldSource, key: &str) -> Result<u64, String> {
    uint(source, key)?.ok_or_else(|| format!("`{key}` is missing"))
}

/// The bytes of tensor `key`, which must be rank 1 with `len` elements of one of `dtypes` (all
/// of four bytes).
fn tensor_bytes(source: &mut impl FieldSource, key: &str, dtypes: &[DType], len: usize) -> Result<Vec<u8>, String> {
    let data = source.tensor(key).ok_or_else(|| format!("`{key}` is missing"))?;
    rank1_bytes(data, key, dtypes, len)
}

fn rank1_bytes(data: TensorData, key: &str, dtypes: &[DType], len: usize) -> Result<Vec<u8>, String> {
    if !dtypes.contains(&data.dtype()) {
        return Err(format!("`{key}` is {:?}, expected {:?}", data.dtype(), dtypes[0]));
    }
    let shape: Vec<usize> = data.shape().iter().copied().collect();
    if shape != [len] {
        return Err(format!("`{key}` has shape {shape:?}, expected [{len}]"));
    }
    let bytes = data.as_bytes();
    if bytes.len() != 4 * len {
        return Err(format!("`{key}` holds {} bytes for {len} elements", bytes.len()));
    }
    Ok(bytes.to_vec())
}

fn words_of(bytes: &[u8]) -> Vec<u32> {
    bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

fn floats_of(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

/// `f32` values that must be finite and, with `non_negative`, carry no sign bit.
fn checked_floats(bytes: &[u8], key: &str, non_negative: bool) -> Result<Vec<f32>, String> {
    let values = floats_of(bytes);
    match values.iter().position(|v| !v.is_finite() || (non_negative && v.is_sign_negative())) {
        None => Ok(values),
        Some(i) => Err(format!("`{key}`[{i}] = {} is not a finite{} value", values[i], if non_negative { " non-negative" } else { "" })),
    }
}

/// The `rows × cols` matrix of slot `slot` of `rule`'s states for a parameter of `shape` when
/// that slot may be rank-1: the second moment of 4-bit states, rank ≥ 2.
fn rank1_matrix(rule: StepRule, family: MapFamily, shape: &[usize], slot: usize) -> Option<(usize, usize)> {
    let matrix = Rank1Quantized::matrix(&Shape::from(shape.to_vec()))?;
    (family == MapFamily::FourBit && rule.second_moment_slot() == Some(slot)).then_some(matrix)
}

impl StateFields {
    /// Number of elements of the parameter.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Every entry of the record, checksum included: `(scalars, tensors)` by leaf name.
    pub fn entries(&self) -> (Vec<(String, Scalar)>, Vec<(String, TensorData)>) {
        let block_size = self.layout.map_or(0, |(size, _)| size.get());
        let family = self.layout.map_or(MapFamily::Dynamic, |(_, family)| family);
        let mut scalars = vec![
            (key::FORMAT.to_string(), Scalar::from(FORMAT_VERSION)),
            (key::KIND.to_string(), Scalar::from(self.kind.code())),
            (key::RULE.to_string(), Scalar::from(self.rule.code())),
            (key::TIME.to_string(), Scalar::from(self.time)),
            (key::RANK.to_string(), Scalar::from(self.shape.len())),
            (key::BLOCK_SIZE.to_string(), Scalar::from(block_size)),
            (key::MAP_FAMILY.to_string(), Scalar::from(family.code())),
            (key::SKIPPED.to_string(), Scalar::from(self.skipped)),
            (key::CHECKSUM.to_string(), Scalar::from(self.checksum())),
        ];
        scalars.extend(self.shape.iter().enumerate().map(|(axis, &dim)| (key::dim(axis), Scalar::from(dim))));
        let mut tensors = Vec::new();
        for (slot, data) in self.slots.iter().enumerate() {
            match data {
                SlotData::Quantized { words, absmax } => {
                    tensors.push((key::slot(slot, "codes"), TensorData::new(words.clone(), [words.len()])));
                    tensors.push((key::slot(slot, "absmax"), TensorData::new(absmax.clone(), [absmax.len()])));
                }
                SlotData::Rank1 { words, rows, cols } => {
                    tensors.push((key::slot(slot, "codes"), TensorData::new(words.clone(), [words.len()])));
                    tensors.push((key::slot(slot, "rows"), TensorData::new(rows.clone(), [rows.len()])));
                    tensors.push((key::slot(slot, "cols"), TensorData::new(cols.clone(), [cols.len()])));
                }
                SlotData::Full(values) => {
                    tensors.push((key::slot(slot, "values"), TensorData::new(values.clone(), [values.len()])));
                }
            }
        }
        if let Some(ring) = &self.gnorms {
            tensors.push((key::GNORMS.to_string(), TensorData::new(ring.clone(), [ring.len()])));
        }
        (scalars, tensors)
    }

    /// xxh3-64 over every field in a fixed order (docs/algorithm.md §4): a changed byte anywhere
    /// in the state changes it.
    pub fn checksum(&self) -> u64 {
        let mut hash = Xxh3::new();
        let block_size = self.layout.map_or(0, |(size, _)| size.get() as u64);
        let family = self.layout.map_or(MapFamily::Dynamic, |(_, family)| family).code();
        let header = [
            FORMAT_VERSION,
            self.kind.code(),
            self.rule.code(),
            self.time as u64,
            self.shape.len() as u64,
        ];
        for value in header.into_iter().chain(self.shape.iter().map(|&d| d as u64)) {
            hash.update(&value.to_le_bytes());
        }
        for value in [block_size, family, self.skipped, self.slots.len() as u64] {
            hash.update(&value.to_le_bytes());
        }
        for slot in &self.slots {
            match slot {
                SlotData::Quantized { words, absmax } => {
                    words.iter().for_each(|w| hash.update(&w.to_le_bytes()));
                    absmax.iter().for_each(|a| hash.update(&a.to_le_bytes()));
                }
                SlotData::Rank1 { words, rows, cols } => {
                    hash.update(b"rank-1");
                    words.iter().for_each(|w| hash.update(&w.to_le_bytes()));
                    rows.iter().chain(cols).for_each(|v| hash.update(&v.to_le_bytes()));
                }
                SlotData::Full(values) => values.iter().for_each(|v| hash.update(&v.to_le_bytes())),
            }
        }
        match &self.gnorms {
            Some(ring) => ring.iter().for_each(|v| hash.update(&v.to_le_bytes())),
            None => hash.update(b"no ring"),
        }
        hash.digest()
    }

    /// Reads and validates one parameter's state: every field present with its type, rank,
    /// length and range, `f32` values and absmax finite (absmax non-negative), and the checksum
    /// (format 1). The error says what is wrong.
    pub fn read(source: &mut impl FieldSource) -> Result<(Self, RecordChecksum), String> {
        let format = uint(source, key::FORMAT)?.unwrap_or(0);
        if format > FORMAT_VERSION {
            return Err(format!("record format {format} is newer than this burn-8bit reads ({FORMAT_VERSION})"));
        }
        let kind_code = required(source, key::KIND)?;
        let kind = OptimizerKind::from_code(kind_code).ok_or_else(|| format!("unknown optimizer code {kind_code}"))?;
        let rule_code = required(source, key::RULE)?;
        let rule = StepRule::from_code(rule_code).ok_or_else(|| format!("unknown update rule code {rule_code}"))?;
        if !kind.takes(rule) {
            return Err(format!("update rule {rule:?} is not {}'s", kind.name()));
        }
        let time = required(source, key::TIME)?;
        let time = usize::try_from(time)
            .ok()
            .filter(|&t| t < usize::MAX)
            .ok_or_else(|| format!("step count {time} is out of range"))?;
        let rank = required(source, key::RANK)?;
        if !(1..=8).contains(&rank) {
            return Err(format!("rank {rank} is out of range (1 to 8)"));
        }
        let shape = (0..rank as usize)
            .map(|axis| {
                let dim = required(source, &key::dim(axis))?;
                usize::try_from(dim).map_err(|_| format!("dimension {dim} is out of range"))
            })
            .collect::<Result<Vec<usize>, String>>()?;
        let len = shape
            .iter()
            .try_fold(1usize, |len, &dim| len.checked_mul(dim))
            .filter(|&len| len <= isize::MAX as usize / 4)
            .ok_or_else(|| format!("shape {shape:?} has too many elements"))?;
        let block_size = required(source, key::BLOCK_SIZE)?;
        let family = match uint(source, key::MAP_FAMILY)? {
            Some(code) => MapFamily::from_code(code).ok_or_else(|| format!("unknown map family code {code}"))?,
            None if format == 0 => MapFamily::Dynamic,
            None => return Err(format!("`{}` is missing", key::MAP_FAMILY)),
        };
        let layout = match block_size {
            0 if family != MapFamily::Dynamic => return Err("`f32` states record a map family".into()),
            0 => None,
            size => {
                let size = usize::try_from(size).ok().and_then(|size| BlockSize::new(size).ok());
                Some((size.ok_or_else(|| format!("block size {block_size} is not a power of two in 64..=4096"))?, family))
            }
        };
        // An empty parameter has no slot tensors; version 0 wrote zero-length ones: read and drop them.
        let recorded_slots = if len > 0 || format == 0 { rule.num_states() } else { 0 };
        let mut slots = Vec::new();
        for slot in 0..recorded_slots {
            let slot_data = match layout {
                Some((size, _)) => {
                    let codes_key = key::slot(slot, "codes");
                    // Every map of a family packs codes of one width.
                    let map = family.kind(true);
                    let words = words_of(&tensor_bytes(source, &codes_key, &[DType::U32], map.num_words(len))?);
                    let used = len % map.codes_per_word();
                    if used > 0 && words.last().is_some_and(|&w| w >> (map.bits() as usize * used) != 0) {
                        return Err(format!("`{codes_key}` has codes past the last element"));
                    }
                    let rows_key = key::slot(slot, "rows");
                    match source.tensor(&rows_key) {
                        Some(rows) => {
                            let Some((num_rows, num_cols)) = rank1_matrix(rule, family, &shape, slot) else {
                                return Err(format!("`{rows_key}`: slot {slot} of a {shape:?} parameter is not a rank-1 second moment"));
                            };
                            let rows = checked_floats(&rank1_bytes(rows, &rows_key, &[DType::F32], num_rows)?, &rows_key, true)?;
                            let cols_key = key::slot(slot, "cols");
                            let cols = tensor_bytes(source, &cols_key, &[DType::F32], num_cols)?;
                            SlotData::Rank1 { words, rows, cols: checked_floats(&cols, &cols_key, true)? }
                        }
                        None => {
                            let absmax_key = key::slot(slot, "absmax");
                            let absmax = tensor_bytes(source, &absmax_key, &[DType::F32], size.num_blocks(len))?;
                            SlotData::Quantized { words, absmax: checked_floats(&absmax, &absmax_key, true)? }
                        }
                    }
                }
                None => {
                    let values_key = key::slot(slot, "values");
                    let values = tensor_bytes(source, &values_key, &[DType::F32], len)?;
                    SlotData::Full(checked_floats(&values, &values_key, false)?)
                }
            };
            if len > 0 {
                slots.push(slot_data);
            }
        }
        let skipped = if format == 0 {
            let bytes = tensor_bytes(source, key::SKIPPED, &[DType::U32], 1)?;
            u64::from(words_of(&bytes)[0])
        } else {
            required(source, key::SKIPPED)?
        };
        let gnorms = match source.tensor(key::GNORMS) {
            None => None,
            Some(data) => {
                let bytes = rank1_bytes(data, key::GNORMS, &[DType::F32], RING_LEN)?;
                Some(checked_floats(&bytes, key::GNORMS, true)?)
            }
        };
        let fields = Self { kind, rule, time, shape, layout, slots, skipped, gnorms };
        let checksum = if format == 0 {
            RecordChecksum::Absent
        } else {
            let recorded = required(source, key::CHECKSUM)?;
            if recorded != fields.checksum() {
                return Err("checksum mismatch: the state's bytes were changed after it was written".into());
            }
            RecordChecksum::Verified
        };
        Ok((fields, checksum))
    }
}
