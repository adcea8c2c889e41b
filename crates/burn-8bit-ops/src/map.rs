//! Code maps: the sorted `f32` values a code stands for, 256 for 8-bit codes and 16 for 4-bit
//! codes (docs/algorithm.md §1).
//!
//! The maps are computed, not embedded, with the same `f32` arithmetic as bitsandbytes'
//! `create_dynamic_map` / `create_linear_map` and torchao's 4-bit maps (which build on
//! `torch.linspace`), so that they equal those tables bit for bit; the conformance tests check
//! this against their outputs.

use crate::error::QuantError;

/// Number of entries in an 8-bit code map, the widest; the kernels' tables of narrower maps are
/// padded to it.
pub const MAP_LEN: usize = 256;

/// Which family of values a [`CodeMap`] holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum MapKind {
    /// The dynamic (tree) map with a sign: first moments and every 1-state optimizer.
    DynamicSigned,
    /// The dynamic map without a sign: non-negative states such as Adam's second moment.
    DynamicUnsigned,
    /// 255 evenly spaced values in `[-1, 1]` plus an extra zero (ablations only).
    LinearSigned,
    /// 256 evenly spaced values in `[0, 1]` (ablations only).
    LinearUnsigned,
    /// The 4-bit dynamic map with a sign (bitsandbytes' `create_dynamic_map(True, 3, 4)`, as
    /// torchao builds it): 16 values, zero among them. First moments of 4-bit states.
    DynamicSigned4,
    /// The 4-bit linear map without zero, `1/16, 2/16, …, 16/16` (torchao's unsigned map): the
    /// second moment of 4-bit states, where a zero code would turn `1 / (√v + ε)` into `1 / ε`
    /// (Li, Chen, Zhu 2023, §4.1).
    LinearUnsigned4,
}

impl MapKind {
    /// Every kind: the 8-bit maps in the order bitsandbytes' `maps` vectors list them, then the
    /// 4-bit maps.
    pub const ALL: [MapKind; 6] = [
        MapKind::DynamicSigned,
        MapKind::DynamicUnsigned,
        MapKind::LinearSigned,
        MapKind::LinearUnsigned,
        MapKind::DynamicSigned4,
        MapKind::LinearUnsigned4,
    ];

    /// The snake-case name the reference vectors use (`dynamic_signed`, …, `linear_unsigned_4`).
    pub fn name(self) -> &'static str {
        match self {
            MapKind::DynamicSigned => "dynamic_signed",
            MapKind::DynamicUnsigned => "dynamic_unsigned",
            MapKind::LinearSigned => "linear_signed",
            MapKind::LinearUnsigned => "linear_unsigned",
            MapKind::DynamicSigned4 => "dynamic_signed_4",
            MapKind::LinearUnsigned4 => "linear_unsigned_4",
        }
    }

    /// Bits per code: 8, or 4 for [`MapKind::DynamicSigned4`] and [`MapKind::LinearUnsigned4`].
    ///
    /// ```
    /// use burn_8bit_ops::MapKind;
    /// assert_eq!(MapKind::DynamicSigned.bits(), 8);
    /// assert_eq!(MapKind::LinearUnsigned4.map().values().len(), 1 << MapKind::LinearUnsigned4.bits());
    /// ```
    pub fn bits(self) -> u32 {
        match self {
            MapKind::DynamicSigned4 | MapKind::LinearUnsigned4 => 4,
            _ => 8,
        }
    }

    /// Codes packed in one `u32` word: 4 of 8 bits, 8 of 4 bits. Code `i` of a tensor is bits
    /// `b·j .. b·j + b` of word `i / codes_per_word` (`j = i % codes_per_word`, `b` the bits),
    /// so the 8-bit layout is the words' little-endian bytes.
    pub fn codes_per_word(self) -> usize {
        (u32::BITS / self.bits()) as usize
    }

    /// Words needed to hold `len` codes of this map.
    ///
    /// ```
    /// use burn_8bit_ops::MapKind;
    /// assert_eq!(MapKind::DynamicSigned.num_words(9), 3);
    /// assert_eq!(MapKind::DynamicSigned4.num_words(9), 2);
    /// ```
    pub fn num_words(self, len: usize) -> usize {
        len.div_ceil(self.codes_per_word())
    }

    /// Parses the name returned by [`MapKind::name`].
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.name() == name)
    }

    /// The map of this kind.
    pub fn map(self) -> CodeMap {
        match self {
            MapKind::DynamicSigned => CodeMap::dynamic(true),
            MapKind::DynamicUnsigned => CodeMap::dynamic(false),
            MapKind::LinearSigned => CodeMap::linear(true),
            MapKind::LinearUnsigned => CodeMap::linear(false),
            MapKind::DynamicSigned4 => CodeMap::dynamic_general(true, 3, 4).expect("3 exponent bits fit in 4 bits"),
            MapKind::LinearUnsigned4 => CodeMap::linear_without_zero(4),
        }
    }
}

/// Which family of maps an optimizer's states use: the dynamic maps (the paper's choice and the
/// default), the linear maps as an ablation, or the 4-bit maps. Each state takes the signed or
/// unsigned member of the family by what it holds.
///
/// ```
/// use burn_8bit_ops::{MapFamily, MapKind};
/// assert_eq!(MapFamily::Dynamic.kind(true), MapKind::DynamicSigned);
/// assert_eq!(MapFamily::Linear.kind(false), MapKind::LinearUnsigned);
/// assert_eq!(MapFamily::FourBit.kind(false), MapKind::LinearUnsigned4);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum MapFamily {
    /// Dynamic (tree) maps: relative precision kept across seven decades.
    #[default]
    Dynamic,
    /// Linear maps: evenly spaced values (ablation; the paper finds them unstable at scale).
    Linear,
    /// 4-bit codes (Li, Chen, Zhu 2023): the signed 4-bit dynamic map for signed states and the
    /// linear map without zero for non-negative ones.
    FourBit,
}

impl MapFamily {
    /// The member of the family for signed or non-negative values.
    pub fn kind(self, signed: bool) -> MapKind {
        match (self, signed) {
            (MapFamily::Dynamic, true) => MapKind::DynamicSigned,
            (MapFamily::Dynamic, false) => MapKind::DynamicUnsigned,
            (MapFamily::Linear, true) => MapKind::LinearSigned,
            (MapFamily::Linear, false) => MapKind::LinearUnsigned,
            (MapFamily::FourBit, true) => MapKind::DynamicSigned4,
            (MapFamily::FourBit, false) => MapKind::LinearUnsigned4,
        }
    }

    /// The family a map belongs to.
    pub fn of(kind: MapKind) -> Self {
        match kind {
            MapKind::DynamicSigned | MapKind::DynamicUnsigned => MapFamily::Dynamic,
            MapKind::LinearSigned | MapKind::LinearUnsigned => MapFamily::Linear,
            MapKind::DynamicSigned4 | MapKind::LinearUnsigned4 => MapFamily::FourBit,
        }
    }

    /// Bits per code of every map of the family.
    pub fn bits(self) -> u32 {
        self.kind(true).bits()
    }

    /// A stable integer for records (0 dynamic, 1 linear, 2 four-bit).
    pub fn code(self) -> u64 {
        match self {
            MapFamily::Dynamic => 0,
            MapFamily::Linear => 1,
            MapFamily::FourBit => 2,
        }
    }

    /// The family of [`MapFamily::code`]; `None` for an unknown code.
    pub fn from_code(code: u64) -> Option<Self> {
        match code {
            0 => Some(MapFamily::Dynamic),
            1 => Some(MapFamily::Linear),
            2 => Some(MapFamily::FourBit),
            _ => None,
        }
    }
}

/// A sorted table of `2^bits` `f32` values (256 or 16); code `c` decodes to
/// `values()[c] * absmax`.
///
/// ```
/// use burn_8bit_ops::CodeMap;
/// let map = CodeMap::dynamic(true);
/// assert_eq!(map.values()[127], 0.0);
/// assert_eq!(map.values()[255], 1.0);
/// assert_eq!(map.zero_code(), 127);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct CodeMap {
    values: Vec<f32>,
}

impl CodeMap {
    /// The dynamic (tree) map of bitsandbytes with 8-bit codes and 7 exponent bits.
    pub fn dynamic(signed: bool) -> Self {
        Self::dynamic_general(signed, 7, 8).expect("7 exponent bits fit in 8 bits")
    }

    /// The general dynamic map: `2^total_bits` values, codes of `total_bits` bits of which up to
    /// `max_exponent_bits` select a decade. bitsandbytes pads the narrower maps with zeros to 256
    /// entries; this map, as torchao's, holds the `2^total_bits` values alone.
    pub fn dynamic_general(
        signed: bool,
        max_exponent_bits: u32,
        total_bits: u32,
    ) -> Result<Self, QuantError> {
        let valid = (2..=8).contains(&total_bits)
            && max_exponent_bits >= 1
            && max_exponent_bits < total_bits;
        if !valid {
            return Err(QuantError::InvalidMap {
                reason: format!(
                    "dynamic map needs 1 <= max_exponent_bits < total_bits <= 8, got \
                     max_exponent_bits = {max_exponent_bits}, total_bits = {total_bits}"
                ),
            });
        }
        let non_sign_bits = total_bits - 1;
        let mut values = Vec::with_capacity(1 << total_bits);
        let mut push_decade = |fraction_items: usize, decade: u32| {
            let boundaries = torch_linspace(0.1, 1.0, fraction_items);
            // bitsandbytes multiplies an f32 tensor by a Python float: torch rounds the scalar to
            // f32 first, then multiplies in f32.
            let scale = 10f64.powi(decade as i32 - (max_exponent_bits as i32 - 1)) as f32;
            for pair in boundaries.windows(2) {
                let mean = (pair[0] + pair[1]) / 2.0;
                values.push(scale * mean);
                if signed {
                    values.push(-scale * mean);
                }
            }
        };
        for decade in 0..max_exponent_bits {
            let shift = decade + non_sign_bits - max_exponent_bits + u32::from(!signed);
            push_decade((1usize << shift) + 1, decade);
        }
        let additional_items = (1usize << (non_sign_bits - max_exponent_bits)) - 1;
        if additional_items > 0 {
            push_decade(additional_items + 1, max_exponent_bits - 1);
        }
        values.push(0.0);
        values.push(1.0);
        values.resize(1 << total_bits, 0.0);
        Ok(Self::from_unsorted(values))
    }

    /// The linear map: signed gives `linspace(-1, 1, 255)` with an extra zero in the middle,
    /// unsigned gives `linspace(0, 1, 256)`.
    pub fn linear(signed: bool) -> Self {
        let values = if signed {
            let mut points = torch_linspace(-1.0, 1.0, MAP_LEN - 1);
            points.insert((MAP_LEN - 1) / 2, 0.0);
            points
        } else {
            torch_linspace(0.0, 1.0, MAP_LEN)
        };
        Self::from_unsorted(values)
    }

    /// The linear map without zero of `bits`-bit codes: `linspace(0, 1, 2^bits + 1)` without its
    /// first point, `1/2^bits … 1` (torchao's unsigned 4-bit map for `bits = 4`).
    ///
    /// # Panics
    /// Unless `bits` is in `1..=8`.
    pub fn linear_without_zero(bits: u32) -> Self {
        assert!((1..=8).contains(&bits), "codes of {bits} bits");
        Self::from_unsorted(torch_linspace(0.0, 1.0, (1 << bits) + 1).split_off(1))
    }

    fn from_unsorted(mut values: Vec<f32>) -> Self {
        values.sort_by(f32::total_cmp);
        Self { values }
    }

    /// The `2^bits` values, ascending.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Midpoints of consecutive values, `(v[k] + v[k + 1]) * 0.5` in `f32`: the encode thresholds
    /// (docs/algorithm.md §2). Code of `x` in a block with `absmax` is the number of `k` with
    /// `x > midpoints[k] * absmax`.
    pub fn midpoints(&self) -> Vec<f32> {
        self.values.windows(2).map(|pair| (pair[0] + pair[1]) * 0.5).collect()
    }

    /// The values padded to [`MAP_LEN`] by repeating the last: the decode table of the kernels and
    /// the CPU twin, whose codes never index the padding.
    pub(crate) fn padded_values(&self) -> [f32; MAP_LEN] {
        let last = *self.values.last().expect("a map has values");
        std::array::from_fn(|k| self.values.get(k).copied().unwrap_or(last))
    }

    /// The midpoints padded to `MAP_LEN - 1` with `+∞`: no finite value and not `+∞` either lies
    /// above a padding threshold, so counting the thresholds below `x` in the padded table gives
    /// the code of the narrower map.
    pub(crate) fn padded_midpoints(&self) -> [f32; MAP_LEN - 1] {
        let midpoints = self.midpoints();
        std::array::from_fn(|k| midpoints.get(k).copied().unwrap_or(f32::INFINITY))
    }

    /// The code that encodes 0.0 under the encode rule: what an all-zero block gets.
    pub fn zero_code(&self) -> u8 {
        self.midpoints().iter().filter(|&&mid| 0.0 > mid).count() as u8
    }
}

/// `torch.linspace(start, end, steps)` in `f32` as the PyTorch build behind bitsandbytes' tables
/// computes it: the first half forwards from `start`, the second half backwards from `end`, each
/// point one fused multiply-add (the compiler contracts PyTorch's `start + step * i`). Plain
/// multiply-then-add differs from bitsandbytes' tables in about 40 entries by one ulp.
fn torch_linspace(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - i - 1) as f32, end)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_signed_shape() {
        let map = CodeMap::dynamic(true);
        let v = map.values();
        assert_eq!(v[127], 0.0);
        assert_eq!(v[255], 1.0);
        assert_eq!(v[0], -0.99296875);
        assert!(v[..127].iter().all(|&x| x < 0.0));
        assert!(v[128..].iter().all(|&x| x > 0.0));
        assert_eq!(map.zero_code(), 127);
    }

    #[test]
    fn dynamic_unsigned_shape() {
        let map = CodeMap::dynamic(false);
        assert_eq!(map.values()[0], 0.0);
        assert_eq!(map.values()[255], 1.0);
        assert!(map.values()[1..].iter().all(|&x| x > 0.0));
        assert_eq!(map.zero_code(), 0);
    }

    #[test]
    fn four_bit_maps() {
        let signed = MapKind::DynamicSigned4.map();
        let mut distinct = signed.values().to_vec();
        distinct.dedup();
        assert_eq!(distinct.len(), 16);
        assert_eq!(signed.values()[7], 0.0);
        assert_eq!(signed.zero_code(), 7);
        let unsigned = MapKind::LinearUnsigned4.map();
        assert_eq!(unsigned.values().len(), 16);
        assert_eq!(unsigned.values()[0], 0.0625);
        assert_eq!(unsigned.values()[15], 1.0);
        assert_eq!(unsigned.zero_code(), 0);
        // The padded tables hold the 16 values and 15 thresholds first, then `+∞` thresholds.
        assert_eq!(&signed.padded_values()[..16], signed.values());
        assert_eq!(signed.padded_midpoints()[15], f32::INFINITY);
    }

    #[test]
    fn invalid_dynamic_parameters_are_errors() {
        assert!(CodeMap::dynamic_general(true, 8, 8).is_err());
        assert!(CodeMap::dynamic_general(true, 0, 8).is_err());
        assert!(CodeMap::dynamic_general(true, 3, 9).is_err());
    }

    #[test]
    fn linear_maps() {
        let signed = CodeMap::linear(true);
        assert_eq!(signed.values()[0], -1.0);
        assert_eq!(signed.values()[127], 0.0);
        // linspace's middle point is 1 − 127·step, not exactly 0, in bitsandbytes' table too.
        assert!(signed.values()[128] > 0.0 && signed.values()[128] < 1e-8);
        assert_eq!(signed.values()[255], 1.0);
        let unsigned = CodeMap::linear(false);
        assert_eq!(unsigned.values()[0], 0.0);
        assert_eq!(unsigned.values()[255], 1.0);
    }
}
