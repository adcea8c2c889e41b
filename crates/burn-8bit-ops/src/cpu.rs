//! The CPU twin of the block-wise kernels: the same rules as `cube.rs`, on plain slices, parallel
//! over groups of blocks. Flex and NdArray hand their own buffers to these functions.
//!
//! Every function here computes exactly what the CubeCL kernels compute: absmax from the bits of
//! `|x|`, codes by the scaled-midpoint rule, decoding by one `f32` product.

use std::sync::OnceLock;

use rayon::prelude::*;

use crate::block::CODES_PER_WORD;
use crate::map::{MAP_LEN, MapKind};
use crate::rule;
use crate::step::{StepRule, StepScalars, Updated, update_element};

/// Blocks handled by one rayon task: enough work (≥ 16 Ki elements) to amortise scheduling.
fn blocks_per_task(block_size: usize) -> usize {
    (16 * 1024 / block_size).max(1)
}

/// Block-wise quantization of `input` (any length): packed codes (`ceil(len / 4)` words, unused
/// bytes of the last word zero) and one absmax per block.
pub fn quantize(input: &[f32], map: MapKind, block_size: usize) -> (Vec<u32>, Vec<f32>) {
    let mut absmax = vec![0f32; input.len().div_ceil(block_size)];
    let words = encode_blocks(input, map, block_size, &mut absmax, Absmax::Measure);
    (words, absmax)
}

/// Packed codes of `input` against the given per-block `absmax` (taken by magnitude) instead of
/// each block's own: [`quantize`] without its reduction.
pub fn encode(input: &[f32], absmax: &[f32], map: MapKind, block_size: usize) -> Vec<u32> {
    let mut absmax = absmax.to_vec();
    encode_blocks(input, map, block_size, &mut absmax, Absmax::Given)
}

/// Where [`encode_blocks`] takes each block's absmax from.
#[derive(Clone, Copy, PartialEq)]
enum Absmax {
    /// Reduced from the block and written.
    Measure,
    /// Read (by magnitude).
    Given,
}

fn encode_blocks(input: &[f32], map: MapKind, block_size: usize, absmax: &mut [f32], source: Absmax) -> Vec<u32> {
    let encoder = Encoder::get(map);
    let mut words = vec![0u32; input.len().div_ceil(CODES_PER_WORD)];
    let group = blocks_per_task(block_size);
    input
        .par_chunks(group * block_size)
        .zip(words.par_chunks_mut(group * block_size / CODES_PER_WORD))
        .zip(absmax.par_chunks_mut(group))
        .for_each(|((input, words), absmax)| {
            let mut codes = vec![0u8; block_size];
            for ((block, words), absmax) in input
                .chunks(block_size)
                .zip(words.chunks_mut(block_size / CODES_PER_WORD))
                .zip(absmax.iter_mut())
            {
                let scale = match source {
                    Absmax::Measure => {
                        *absmax = block_absmax(block);
                        *absmax
                    }
                    Absmax::Given => rule::absmax_from_bits(absmax.to_bits() & rule::ABS_MASK),
                };
                let codes = &mut codes[..block.len()];
                encoder.encode_block(block, scale, codes);
                pack(codes, words);
            }
        });
    words
}

/// Decodes `len` elements from packed codes and per-block absmax.
pub fn dequantize(
    words: &[u32],
    absmax: &[f32],
    map: MapKind,
    block_size: usize,
    len: usize,
) -> Vec<f32> {
    let values = Encoder::get(map).values;
    let mut output = vec![0f32; len];
    let group = blocks_per_task(block_size);
    output
        .par_chunks_mut(group * block_size)
        .zip(words.par_chunks(group * block_size / CODES_PER_WORD))
        .zip(absmax.par_chunks(group))
        .for_each(|((output, words), absmax)| {
            for ((block, words), &absmax) in output
                .chunks_mut(block_size)
                .zip(words.chunks(block_size / CODES_PER_WORD))
                .zip(absmax)
            {
                decode_block(words, absmax, &values, block);
            }
        });
    output
}

/// One quantized optimizer state of a tensor: packed codes, per-block absmax and their map.
pub struct StateBuffers<'a> {
    /// Packed codes, `ceil(len / 4)` words.
    pub words: &'a mut [u32],
    /// One absmax per block.
    pub absmax: &'a mut [f32],
    /// The map the codes index.
    pub map: MapKind,
}

/// The fused optimizer step, in place: per block, decode every state, apply `rule` element by
/// element (parameter included), take each state's new absmax from its updated values, encode.
/// Every gradient element is multiplied by `grad_scale` first, and the step size by
/// `update_scale` (a trust ratio; 1 for rules without one). Returns the number of elements
/// skipped because their gradient or update was not finite (their parameter and states keep
/// their values).
///
/// Memory beyond the buffers is one block of `f32` per state per rayon task.
pub fn fused_step(
    rule: StepRule,
    scalars: &StepScalars,
    grad_scale: f32,
    update_scale: f32,
    param: &mut [f32],
    grad: &[f32],
    states: &mut [StateBuffers<'_>],
    block_size: usize,
) -> u64 {
    let lr = scalars.lr * update_scale;
    assert_eq!(param.len(), grad.len(), "parameter and gradient lengths differ");
    assert_eq!(states.len(), rule.num_states(), "{rule:?} takes {} states", rule.num_states());
    let group = blocks_per_task(block_size);
    let encoders: Vec<&Encoder> = states.iter().map(|state| Encoder::get(state.map)).collect();
    let mut state_chunks: Vec<_> = states
        .iter_mut()
        .map(|state| {
            state
                .words
                .chunks_mut(group * block_size / CODES_PER_WORD)
                .zip(state.absmax.chunks_mut(group))
        })
        .collect();
    let tasks: Vec<_> = param
        .chunks_mut(group * block_size)
        .zip(grad.chunks(group * block_size))
        .map(|(param, grad)| {
            let states: Vec<_> = state_chunks
                .iter_mut()
                .map(|chunks| chunks.next().expect("one chunk of each state per task"))
                .collect();
            (param, grad, states)
        })
        .collect();
    tasks
        .into_par_iter()
        .map(|(param, grad, mut states)| {
            u64::from(step_blocks(rule, scalars, lr, grad_scale, param, grad, &mut states, &encoders, block_size))
        })
        .sum()
}

#[allow(clippy::too_many_arguments)]
fn step_blocks(
    rule: StepRule,
    scalars: &StepScalars,
    lr: f32,
    grad_scale: f32,
    param: &mut [f32],
    grad: &[f32],
    states: &mut [(&mut [u32], &mut [f32])],
    encoders: &[&Encoder],
    block_size: usize,
) -> u32 {
    // Each arm instantiates the loop with the rule (and its number of states) as constants, so
    // the rule's `match` inside `update_element` folds away and the element loop can vectorize.
    macro_rules! with_rule {
        ($rule:expr) => {{
            const STATES: usize = $rule.num_states();
            step_blocks_with::<STATES>(
                |p, g, s: &mut [f32; 3]| update_element($rule, scalars, lr, p, g * grad_scale, s),
                param,
                grad,
                states,
                encoders,
                block_size,
            )
        }};
    }
    match rule {
        StepRule::Adam { amsgrad: false, cautious: false } => with_rule!(StepRule::Adam { amsgrad: false, cautious: false }),
        StepRule::Adam { amsgrad: false, cautious: true } => with_rule!(StepRule::Adam { amsgrad: false, cautious: true }),
        StepRule::Adam { amsgrad: true, cautious: false } => with_rule!(StepRule::Adam { amsgrad: true, cautious: false }),
        StepRule::Adam { amsgrad: true, cautious: true } => with_rule!(StepRule::Adam { amsgrad: true, cautious: true }),
        StepRule::Momentum { nesterov: false } => with_rule!(StepRule::Momentum { nesterov: false }),
        StepRule::Momentum { nesterov: true } => with_rule!(StepRule::Momentum { nesterov: true }),
        StepRule::RmsProp { centered: false, momentum: false } => with_rule!(StepRule::RmsProp { centered: false, momentum: false }),
        StepRule::RmsProp { centered: false, momentum: true } => with_rule!(StepRule::RmsProp { centered: false, momentum: true }),
        StepRule::RmsProp { centered: true, momentum: false } => with_rule!(StepRule::RmsProp { centered: true, momentum: false }),
        StepRule::RmsProp { centered: true, momentum: true } => with_rule!(StepRule::RmsProp { centered: true, momentum: true }),
        StepRule::AdaGrad => with_rule!(StepRule::AdaGrad),
        StepRule::Lion => with_rule!(StepRule::Lion),
        StepRule::AdEMAMix => with_rule!(StepRule::AdEMAMix),
        StepRule::Lamb => with_rule!(StepRule::Lamb),
    }
}

/// The per-block loop of [`fused_step`] for a rule of `N` states: states decoded into one block
/// of scratch each, updated in place while their new absmax is tracked, then encoded back.
fn step_blocks_with<const N: usize>(
    update: impl Fn(f32, f32, &mut [f32; 3]) -> Updated,
    param: &mut [f32],
    grad: &[f32],
    states: &mut [(&mut [u32], &mut [f32])],
    encoders: &[&Encoder],
    block_size: usize,
) -> u32 {
    debug_assert_eq!(states.len(), N);
    let mut scratch = vec![0f32; 3 * block_size];
    let mut codes = vec![0u8; block_size];
    let mut skipped = 0;
    let words_per_block = block_size / CODES_PER_WORD;
    for (block, (param, grad)) in param.chunks_mut(block_size).zip(grad.chunks(block_size)).enumerate() {
        let len = param.len();
        let words = block * words_per_block..block * words_per_block + len.div_ceil(CODES_PER_WORD);
        let (s0, rest) = scratch.split_at_mut(block_size);
        let (s1, s2) = rest.split_at_mut(block_size);
        let (s0, s1, s2) = (&mut s0[..len], &mut s1[..len], &mut s2[..len]);
        let grad = &grad[..len];
        for (slot, ((state_words, absmax), encoder)) in states.iter().zip(encoders).enumerate() {
            let target = match slot {
                0 => &mut *s0,
                1 => &mut *s1,
                _ => &mut *s2,
            };
            decode_block(&state_words[words.clone()], absmax[block], &encoder.values, target);
        }
        let mut max_bits = [0u32; 3];
        for i in 0..len {
            let mut s = [s0[i], s1[i], s2[i]];
            let updated = update(param[i], grad[i], &mut s);
            param[i] = updated.p;
            skipped += u32::from(!updated.applied);
            s0[i] = s[0];
            max_bits[0] = max_bits[0].max(s[0].to_bits() & rule::ABS_MASK);
            if N > 1 {
                s1[i] = s[1];
                max_bits[1] = max_bits[1].max(s[1].to_bits() & rule::ABS_MASK);
            }
            if N > 2 {
                s2[i] = s[2];
                max_bits[2] = max_bits[2].max(s[2].to_bits() & rule::ABS_MASK);
            }
        }
        let slots: [&[f32]; 3] = [s0, s1, s2];
        for (((slot, (state_words, absmax)), encoder), max) in
            slots.iter().zip(states.iter_mut()).zip(encoders).zip(max_bits)
        {
            absmax[block] = rule::absmax_from_bits(max);
            encoder.encode_block(slot, absmax[block], &mut codes[..len]);
            pack(&codes[..len], &mut state_words[words.clone()]);
        }
    }
    skipped
}

/// The first pass of LAMB and LARS: per block, the sums of `direction²` and `p²` of the update
/// `fused_step` would apply (states decoded, nothing written), as `[d₀, p₀, d₁, p₁, …]`.
/// Skipped elements contribute nothing to the direction's sum.
pub fn update_norms(
    rule: StepRule,
    scalars: &StepScalars,
    grad_scale: f32,
    param: &[f32],
    grad: &[f32],
    states: &[(&[u32], &[f32], MapKind)],
    block_size: usize,
) -> Vec<f32> {
    let num_blocks = param.len().div_ceil(block_size);
    let words_per_block = block_size / CODES_PER_WORD;
    let values: Vec<[f32; MAP_LEN]> = states.iter().map(|(_, _, map)| Encoder::get(*map).values).collect();
    let mut sums = vec![0f32; 2 * num_blocks];
    sums.par_chunks_mut(2).enumerate().for_each(|(block, sums)| {
        let start = block * block_size;
        let len = block_size.min(param.len() - start);
        let words = block * words_per_block..block * words_per_block + len.div_ceil(CODES_PER_WORD);
        let mut decoded = vec![[0f32; 3]; len];
        let mut scratch = vec![0f32; len];
        for (slot, ((codes, absmax, _), values)) in states.iter().zip(&values).enumerate() {
            decode_block(&codes[words.clone()], absmax[block], values, &mut scratch);
            for (element, &value) in decoded.iter_mut().zip(&scratch) {
                element[slot] = value;
            }
        }
        let (mut direction2, mut param2) = (0f32, 0f32);
        for i in 0..len {
            let p = param[start + i];
            let mut s = decoded[i];
            let updated = update_element(rule, scalars, scalars.lr, p, grad[start + i] * grad_scale, &mut s);
            direction2 += updated.direction * updated.direction;
            param2 += p * p;
        }
        sums[0] = direction2;
        sums[1] = param2;
    });
    sums
}

/// `max |x|` over a block computed on the bits of `|x|`, as the kernels do: for non-negative
/// floats the integer order is the float order, so a NaN (any payload) wins over +∞, which wins
/// over every finite value. The result is canonical: NaN is always [`f32::NAN`].
pub fn block_absmax(block: &[f32]) -> f32 {
    let bits = block
        .iter()
        .fold(0u32, |max, x| max.max(x.to_bits() & rule::ABS_MASK));
    rule::absmax_from_bits(bits)
}

/// Writes `codes` into words, four per word, little-endian; a partial last word is zero-padded.
fn pack(codes: &[u8], words: &mut [u32]) {
    for (word, chunk) in words.iter_mut().zip(codes.chunks(CODES_PER_WORD)) {
        let mut bytes = [0u8; CODES_PER_WORD];
        bytes[..chunk.len()].copy_from_slice(chunk);
        *word = u32::from_le_bytes(bytes);
    }
}

/// Decodes one block: `map[code] * absmax`, the product taken per element as on the GPU; a block
/// with a non-finite absmax decodes to the canonical NaN everywhere.
fn decode_block(words: &[u32], absmax: f32, values: &[f32; MAP_LEN], output: &mut [f32]) {
    if !absmax.is_finite() {
        output.fill(f32::from_bits(rule::CANONICAL_NAN_BITS));
        return;
    }
    let scaled: [f32; MAP_LEN] = std::array::from_fn(|k| values[k] * absmax);
    for (chunk, word) in output.chunks_mut(CODES_PER_WORD).zip(words) {
        for (out, code) in chunk.iter_mut().zip(word.to_le_bytes()) {
            *out = scaled[code as usize];
        }
    }
}

/// A guess bucket is the top 16 bits of `x / absmax` (sign, exponent, 7 mantissa bits): the key
/// needs no clamping, and the buckets a finite block can hit (|ratio| ≤ 1) span 8 KiB of the table.
const GUESS_SHIFT: u32 = 16;
const GUESS_LEN: usize = 1 << (32 - GUESS_SHIFT);
/// Most single-step corrections after a guess; buckets that would need more fall back to search.
const MAX_STEPS: usize = 4;

/// Encodes blocks by the scaled-midpoint rule, fast: a guess from the bits of `x / absmax`, a few
/// branch-free steps up against the exact thresholds `midpoint * absmax`, a check that the result
/// satisfies the rule, and a binary search in the rare case it does not. The guess only decides
/// speed: every code returned satisfies `threshold[c - 1] < x <= threshold[c]`.
struct Encoder {
    values: [f32; MAP_LEN],
    midpoints: [f32; MAP_LEN - 1],
    zero_code: u8,
    guess: Box<[u8; GUESS_LEN]>,
    steps: usize,
}

impl Encoder {
    fn get(map: MapKind) -> &'static Encoder {
        static ENCODERS: [OnceLock<Encoder>; 4] = [const { OnceLock::new() }; 4];
        let slot = MapKind::ALL.iter().position(|&kind| kind == map).expect("listed");
        ENCODERS[slot].get_or_init(|| Encoder::new(map))
    }

    fn new(kind: MapKind) -> Self {
        let map = kind.map();
        let midpoints = map.midpoints();
        let unit = Thresholds::new(&midpoints, 1.0);
        let mut guess = Box::new([0u8; GUESS_LEN]);
        let mut steps = 1;
        for (key, slot) in guess.iter_mut().enumerate() {
            let (low, high) = bucket_range(key);
            if !(low.is_finite() && high.is_finite()) {
                // Ratios of finite values to a finite absmax never land here.
                continue;
            }
            let first = unit.search(low);
            *slot = first as u8;
            steps = steps.max(unit.search(high) - first);
        }
        Self {
            values: *map.values(),
            midpoints,
            zero_code: map.zero_code(),
            guess,
            steps: steps.min(MAX_STEPS),
        }
    }

    fn encode_block(&self, block: &[f32], absmax: f32, codes: &mut [u8]) {
        if !(absmax > 0.0 && absmax.is_finite()) {
            codes.fill(self.zero_code);
            return;
        }
        let thresholds = Thresholds::new(&self.midpoints, absmax);
        match self.steps {
            1 => self.encode_with::<1>(block, absmax, &thresholds, codes),
            2 => self.encode_with::<2>(block, absmax, &thresholds, codes),
            3 => self.encode_with::<3>(block, absmax, &thresholds, codes),
            _ => self.encode_with::<MAX_STEPS>(block, absmax, &thresholds, codes),
        }
    }

    fn encode_with<const STEPS: usize>(
        &self,
        block: &[f32],
        absmax: f32,
        thresholds: &Thresholds,
        codes: &mut [u8],
    ) {
        let inverse = 1.0 / absmax;
        let bounds = &thresholds.0;
        for (code, &x) in codes.iter_mut().zip(block) {
            let key = ((x * inverse).to_bits() >> GUESS_SHIFT) as usize;
            let mut c = self.guess[key] as usize;
            for _ in 0..STEPS {
                c += usize::from(x > bounds[(c + 1).min(MAP_LEN)]);
            }
            let c = c.min(MAP_LEN - 1);
            let satisfied = bounds[c] < x && x <= bounds[c + 1];
            *code = if satisfied { c } else { thresholds.search(x) } as u8;
        }
    }
}

/// The encode thresholds of one block with a sentinel at each end: `[-∞, midpoint[0] * absmax,
/// …, midpoint[254] * absmax, +∞]`, so code `c` is right exactly when `t[c] < x <= t[c + 1]`.
struct Thresholds([f32; MAP_LEN + 1]);

impl Thresholds {
    fn new(midpoints: &[f32; MAP_LEN - 1], absmax: f32) -> Self {
        Self(std::array::from_fn(|k| match k {
            0 => f32::NEG_INFINITY,
            MAP_LEN => f32::INFINITY,
            _ => midpoints[k - 1] * absmax,
        }))
    }

    /// The code of `x`: the number of thresholds below it, by branch-free binary search.
    fn search(&self, x: f32) -> usize {
        let mut code = 0;
        let mut step = MAP_LEN / 2;
        while step > 0 {
            code += step * usize::from(x > self.0[code + step]);
            step /= 2;
        }
        code
    }
}

/// The smallest and largest ratio (signed) whose guess key is `key`.
fn bucket_range(key: usize) -> (f32, f32) {
    let first = f32::from_bits((key as u32) << GUESS_SHIFT);
    let last = f32::from_bits(((key as u32) << GUESS_SHIFT) | ((1 << GUESS_SHIFT) - 1));
    if first.is_sign_negative() {
        (last, first)
    } else {
        (first, last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference_code(x: f32, absmax: f32, midpoints: &[f32; MAP_LEN - 1]) -> u8 {
        midpoints.iter().filter(|&&mid| x > mid * absmax).count() as u8
    }

    #[test]
    fn fast_encoder_equals_the_rule_on_every_map() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for kind in MapKind::ALL {
            let encoder = Encoder::get(kind);
            let map = kind.map();
            let midpoints = map.midpoints();
            for absmax in [1.0f32, 3.7e-7, 1.0e30, 0.013, 65504.0] {
                let block: Vec<f32> = (0..4096)
                    .map(|i| {
                        let unit = (next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                        match i % 4 {
                            0 => unit * absmax,
                            1 => unit.powi(7) * absmax,
                            2 => map.values()[i % MAP_LEN] * absmax,
                            _ => midpoints[i % (MAP_LEN - 1)] * absmax,
                        }
                    })
                    .collect();
                let mut codes = vec![0u8; block.len()];
                encoder.encode_block(&block, absmax, &mut codes);
                for (&x, &code) in block.iter().zip(&codes) {
                    assert_eq!(code, reference_code(x, absmax, &midpoints), "{kind:?} x={x:e}");
                }
            }
        }
    }

    #[test]
    fn absmax_orders_nan_over_infinity_over_finite() {
        assert_eq!(block_absmax(&[1.0, -3.0, 2.0]), 3.0);
        assert_eq!(block_absmax(&[1.0, f32::NEG_INFINITY]), f32::INFINITY);
        let nan = block_absmax(&[f32::INFINITY, f32::from_bits(0xffc0_0001)]);
        assert_eq!(nan.to_bits(), f32::NAN.to_bits());
        assert_eq!(block_absmax(&[0.0, -0.0]).to_bits(), 0);
    }

    #[test]
    fn guess_buckets_cover_their_keys() {
        for key in [0usize, 1, 0x3f80, 0x3f7f, 0x8000, 0xbf80, 0xffff] {
            let (low, high) = bucket_range(key);
            assert!(low <= high || low.is_nan());
            assert_eq!((low.to_bits() >> GUESS_SHIFT) as usize, key);
            assert_eq!((high.to_bits() >> GUESS_SHIFT) as usize, key);
        }
    }

    #[test]
    fn pack_is_little_endian_and_zero_padded() {
        let mut words = [0u32; 2];
        pack(&[1, 2, 3, 4, 5], &mut words);
        assert_eq!(words, [0x0403_0201, 0x0000_0005]);
    }
}
