//! The CPU twin of the block-wise kernels: the same rules as `backend/cube/kernels.rs`, on plain
//! slices, parallel over groups of blocks (the calling thread and its helpers, `helpers.rs`).
//! Flex and NdArray hand their own buffers to these functions.
//!
//! Every function here computes exactly what the CubeCL kernels compute: absmax from the bits of
//! `|x|`, codes by the scaled-midpoint rule, decoding by one `f32` product.

use std::sync::OnceLock;

use burn::tensor::{bf16, f16};
use macerator::Arch;

use helpers::run_tasks;

use crate::block::BlockSize;
use crate::encode::{BOUNDS, GUESS_SHIFT, GuessTable, block_bounds, unit_bounds};
use crate::map::{MAP_LEN, MapKind};
use crate::rule;
use crate::step::{StepRule, StepScalars, update_element};

#[cfg(target_arch = "x86_64")]
mod avx512;
mod helpers;
mod rank1;

/// The instruction set the element loops are compiled for: each `#[inline(always)]` loop below
/// is inlined into one function per level (macerator's, Burn's own SIMD dispatch) with that
/// level's target features on, so the compiler vectorises it (AVX2/AVX-512 on x86-64, NEON on
/// aarch64, plain scalar code elsewhere). Every level runs the same scalar IEEE operations (no
/// fused multiply-add: Rust never contracts `a * b + c`), so every level writes the same bits.
/// The two table lookups the compiler leaves scalar, decode and the encoder's guess, are
/// written with AVX-512 intrinsics for the x86-64 level that has it (`avx512.rs`).
#[derive(Clone, Copy, Debug)]
struct Level(Arch);

impl Level {
    /// The best level this CPU has, detected once.
    fn detected() -> Self {
        static DETECTED: OnceLock<Arch> = OnceLock::new();
        Self(*DETECTED.get_or_init(Arch::detect))
    }

    /// The level to run at: the detected one, or in tests the one forced on this thread.
    fn current() -> Self {
        #[cfg(test)]
        if let Some(level) = tests::FORCED_LEVEL.get() {
            return level;
        }
        Self::detected()
    }

    /// Whether this level has AVX-512 (F, BW and VL), which the loops of `avx512.rs` need.
    #[inline(always)]
    fn has_avx512(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        return matches!(self.0, Arch::V4);
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// `f`, run with this level's target features enabled.
    #[inline(always)]
    fn run<R>(self, f: impl FnOnce() -> R) -> R {
        // SAFETY: a `Level` holds the detected `Arch` or, in tests, one it implies, so every
        // feature the dispatch enables is present.
        unsafe { self.0.dispatch(f) }
    }
}

/// Fewest elements of one task of [`run_tasks`], about 7 µs of an Adam step on one Zen 4 core:
/// claiming a task (an atomic add and an uncontended lock) costs nothing beside it.
const MIN_TASK_ELEMENTS: usize = 2 * 1024;
/// Most elements of one task: 64 Ki, a few hundred µs.
const MAX_TASK_ELEMENTS: usize = 64 * 1024;
/// Tasks per thread between the two bounds, so that the threads finish a tensor at about the
/// same time and a helper that wakes late still finds work.
const TASKS_PER_THREAD: usize = 8;

/// Blocks handled by one task over a tensor of `len` elements.
fn blocks_per_task(block_size: usize, len: usize) -> usize {
    let per_task = len / (rayon::current_num_threads() * TASKS_PER_THREAD);
    (per_task.clamp(MIN_TASK_ELEMENTS, MAX_TASK_ELEMENTS) / block_size).max(1)
}

/// The element types of the parameters and gradients the fused step reads and writes in their
/// own type: `f32`, `f16` and `bf16`. The step's arithmetic is `f32`: an element is widened
/// exactly on reading, and the new parameter rounded to nearest (ties to even) on writing, as
/// Burn's casts round; so a half-precision step writes the bits of an `f32` step between two
/// casts, without the cast passes or their buffers. With `StepScalars::stochastic_rounding` a
/// `bf16` parameter is rounded stochastically instead (docs/algorithm.md §3.8).
pub trait ParamElement: Copy + Send + Sync + 'static {
    /// The exact `f32` value.
    fn to_f32(self) -> f32;
    /// `x` rounded to the nearest value of this type (ties to even).
    fn from_f32(x: f32) -> Self;
    /// Whether the step rounds this type stochastically when asked
    /// (`StepScalars::stochastic_rounding`): `bf16` only.
    const ROUNDS_STOCHASTICALLY: bool = false;
}

impl ParamElement for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

/// `half`'s conversions, which use F16C where the CPU has it (a branch-free software form
/// measured no faster in the step).
impl ParamElement for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }

    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

/// `half`'s conversions written on the bits without branches, so that the element loops
/// vectorise (with `half`'s branches an Adam8bit step of bf16 parameters took 4–5× as long):
/// the same results, except that widening leaves a signalling NaN signalling.
impl ParamElement for bf16 {
    const ROUNDS_STOCHASTICALLY: bool = true;

    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }

    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        let bits = x.to_bits();
        // Adding just under half a unit, plus the kept part's lowest bit, rounds to nearest
        // with ties to even; a carry into the exponent is the correct rounding up (to ∞ past
        // the largest finite value). Only a NaN's bits can wrap, and a NaN takes the other arm.
        let nearest = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16;
        let quiet_nan = (bits >> 16) | 0x0040;
        let is_nan = bits & rule::ABS_MASK > rule::INFINITY_BITS;
        bf16::from_bits((if is_nan { quiet_nan } else { nearest }) as u16)
    }
}

/// Block-wise quantization of `input` (any length): packed codes (`map.num_words(len)` words,
/// unused bits of the last word zero) and one absmax per block.
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
    let level = Level::current();
    let encoder = Encoder::get(map);
    let per_word = map.codes_per_word();
    let mut words = vec![0u32; map.num_words(input.len())];
    let group = blocks_per_task(block_size, input.len());
    let tasks: Vec<_> = input
        .chunks(group * block_size)
        .zip(words.chunks_mut(group * block_size / per_word))
        .zip(absmax.chunks_mut(group))
        .collect();
    run_tasks(tasks, |((input, words), absmax)| {
        level.run(
            #[inline(always)]
            || {
                for ((block, words), absmax) in input
                    .chunks(block_size)
                    .zip(words.chunks_mut(block_size / per_word))
                    .zip(absmax.iter_mut())
                {
                    let scale = match source {
                        Absmax::Measure => {
                            *absmax = block_absmax(block);
                            *absmax
                        }
                        Absmax::Given => rule::absmax_from_bits(absmax.to_bits() & rule::ABS_MASK),
                    };
                    encoder.encode_into(level, block, scale, words);
                }
            },
        )
    });
    words
}

/// Rank-1 quantization of `values`, a row-major matrix of `cols` columns (see
/// [`crate::host::rank1_quantize`]): packed codes, row maxima, column maxima.
pub fn rank1_quantize(values: &[f32], cols: usize, map: MapKind) -> (Vec<u32>, Vec<f32>, Vec<f32>) {
    let (mut rows_bits, mut cols_bits) = (vec![0u32; values.len() / cols], vec![0u32; cols]);
    let level = Level::current();
    level.run(
        #[inline(always)]
        || rank1::raise_norms(values, 0, 0, &mut rows_bits, &mut cols_bits),
    );
    let rows: Vec<f32> = rows_bits.into_iter().map(rule::absmax_from_bits).collect();
    let cols: Vec<f32> = cols_bits.into_iter().map(rule::absmax_from_bits).collect();
    let mut words = vec![0u32; map.num_words(values.len())];
    level.run(
        #[inline(always)]
        || Encoder::get(map).encode_rank1(level, values, rank1::Scales::new(&rows, &cols, 0), &mut words),
    );
    (words, rows, cols)
}

/// The values of rank-1 codes under their row and column maxima (see
/// [`crate::host::rank1_dequantize`]).
pub fn rank1_dequantize(words: &[u32], rows: &[f32], cols: &[f32], map: MapKind) -> Vec<f32> {
    let mut values = vec![0f32; rows.len() * cols.len()];
    if !values.is_empty() {
        let level = Level::current();
        level.run(
            #[inline(always)]
            || Encoder::get(map).decode_rank1(level, words, rank1::Scales::new(rows, cols, 0), &mut values),
        );
    }
    values
}

/// Decodes `output.len()` elements from packed codes and per-block absmax into `output`.
pub fn dequantize(words: &[u32], absmax: &[f32], map: MapKind, block_size: usize, output: &mut [f32]) {
    let level = Level::current();
    let encoder = Encoder::get(map);
    let per_word = map.codes_per_word();
    let group = blocks_per_task(block_size, output.len());
    let tasks: Vec<_> = output
        .chunks_mut(group * block_size)
        .zip(words.chunks(group * block_size / per_word))
        .zip(absmax.chunks(group))
        .collect();
    run_tasks(tasks, |((output, words), absmax)| {
        level.run(
            #[inline(always)]
            || {
                for ((block, words), &absmax) in output
                    .chunks_mut(block_size)
                    .zip(words.chunks(block_size / per_word))
                    .zip(absmax)
                {
                    encoder.decode_into(level, words, absmax, block);
                }
            },
        )
    });
}

/// One optimizer state of a tensor on the CPU: block-wise codes with their absmax and map, codes
/// under rank-1 normalisation, or plain `f32` values. `W` and `F` are slices of words and
/// floats, shared or mutable; rank-1 norms are always shared (`'n`).
pub enum StateSlice<'n, W, F> {
    /// Packed codes (`map.num_words(len)` words) and one absmax per block, in `map`.
    Blockwise {
        /// Packed codes.
        words: W,
        /// One absmax per block.
        absmax: F,
        /// The map the codes index.
        map: MapKind,
    },
    /// Packed codes (`map.num_words(len)` words) under rank-1 normalisation, in `map`.
    Rank1 {
        /// Packed codes of the elements from `offset` on.
        words: W,
        /// The norms the codes are decoded against and those new codes are encoded against.
        norms: Rank1Scales<'n>,
        /// The index in the whole state of the first element of `words`: the element's row and
        /// column follow from it.
        offset: usize,
        /// The map the codes index.
        map: MapKind,
    },
    /// One `f32` per element.
    Full(F),
}

/// The scales of a rank-1 state (see [`crate::Rank1Norms`]): `rows` and `cols` its codes are
/// decoded against, `next_rows` and `next_cols` a step encodes against (passes that only read
/// may give the same slices twice).
#[derive(Clone, Copy, Debug)]
pub struct Rank1Scales<'n> {
    /// The row maxima of the stored codes.
    pub rows: &'n [f32],
    /// The column maxima of the stored codes.
    pub cols: &'n [f32],
    /// The row maxima of the step's new values.
    pub next_rows: &'n [f32],
    /// The column maxima of the step's new values.
    pub next_cols: &'n [f32],
}

/// A state the fused step rewrites.
pub type StateMut<'a> = StateSlice<'a, &'a mut [u32], &'a mut [f32]>;
/// A state the update-norm pass reads.
pub type StateRef<'a> = StateSlice<'a, &'a [u32], &'a [f32]>;

impl<W: AsRef<[u32]>, F: AsRef<[f32]>> StateSlice<'_, W, F> {
    /// Writes block `block` (`output.len()` elements) of this state into `output`.
    #[inline(always)]
    fn read_block(&self, level: Level, block: usize, block_size: usize, output: &mut [f32]) {
        let start = block * block_size;
        match self {
            StateSlice::Blockwise { words, absmax, map } => {
                let first = start / map.codes_per_word();
                let words = &words.as_ref()[first..first + map.num_words(output.len())];
                Encoder::get(*map).decode_into(level, words, absmax.as_ref()[block], output);
            }
            StateSlice::Rank1 { words, norms, offset, map } => {
                let first = start / map.codes_per_word();
                let words = &words.as_ref()[first..first + map.num_words(output.len())];
                let scales = rank1::Scales::new(norms.rows, norms.cols, offset + start);
                Encoder::get(*map).decode_rank1(level, words, scales, output);
            }
            StateSlice::Full(values) => output.copy_from_slice(&values.as_ref()[start..start + output.len()]),
        }
    }
}

impl<'n, W, F> StateSlice<'n, W, F> {
    /// This state, writable.
    pub fn borrow_mut(&mut self) -> StateSlice<'n, &mut [u32], &mut [f32]>
    where
        W: AsMut<[u32]>,
        F: AsMut<[f32]>,
    {
        match self {
            StateSlice::Blockwise { words, absmax, map } => {
                StateSlice::Blockwise { words: words.as_mut(), absmax: absmax.as_mut(), map: *map }
            }
            StateSlice::Rank1 { words, norms, offset, map } => {
                StateSlice::Rank1 { words: words.as_mut(), norms: *norms, offset: *offset, map: *map }
            }
            StateSlice::Full(values) => StateSlice::Full(values.as_mut()),
        }
    }

    /// This state, read-only.
    pub fn borrow(&self) -> StateSlice<'n, &[u32], &[f32]>
    where
        W: AsRef<[u32]>,
        F: AsRef<[f32]>,
    {
        match self {
            StateSlice::Blockwise { words, absmax, map } => {
                StateSlice::Blockwise { words: words.as_ref(), absmax: absmax.as_ref(), map: *map }
            }
            StateSlice::Rank1 { words, norms, offset, map } => {
                StateSlice::Rank1 { words: words.as_ref(), norms: *norms, offset: *offset, map: *map }
            }
            StateSlice::Full(values) => StateSlice::Full(values.as_ref()),
        }
    }
}

impl StateMut<'_> {
    /// Stores `values` as block `block` of this state: the block's new absmax (`max_bits`, the
    /// largest `bits(|x|)` in it) and codes, codes against the next rank-1 norms, or the values
    /// themselves.
    #[inline(always)]
    fn write_block(&mut self, level: Level, block: usize, block_size: usize, values: &[f32], max_bits: u32) {
        let start = block * block_size;
        match self {
            StateSlice::Blockwise { words, absmax, map } => {
                let scale = rule::absmax_from_bits(max_bits);
                absmax[block] = scale;
                let first = start / map.codes_per_word();
                let words = &mut words[first..first + map.num_words(values.len())];
                Encoder::get(*map).encode_into(level, values, scale, words);
            }
            StateSlice::Rank1 { words, norms, offset, map } => {
                let first = start / map.codes_per_word();
                let words = &mut words[first..first + map.num_words(values.len())];
                let scales = rank1::Scales::new(norms.next_rows, norms.next_cols, *offset + start);
                Encoder::get(*map).encode_rank1(level, values, scales, words);
            }
            StateSlice::Full(target) => target[start..start + values.len()].copy_from_slice(values),
        }
    }

    /// This state cut into consecutive parts of `group` blocks each, one per task.
    fn split(&mut self, group: usize, block_size: usize) -> Vec<StateMut<'_>> {
        match self {
            StateSlice::Blockwise { words, absmax, map } => words
                .chunks_mut(group * block_size / map.codes_per_word())
                .zip(absmax.chunks_mut(group))
                .map(|(words, absmax)| StateSlice::Blockwise { words, absmax, map: *map })
                .collect(),
            StateSlice::Rank1 { words, norms, offset, map } => words
                .chunks_mut(group * block_size / map.codes_per_word())
                .enumerate()
                .map(|(part, words)| StateSlice::Rank1 {
                    words,
                    norms: *norms,
                    offset: *offset + part * group * block_size,
                    map: *map,
                })
                .collect(),
            StateSlice::Full(values) => values.chunks_mut(group * block_size).map(StateSlice::Full).collect(),
        }
    }
}

/// The fused optimizer step, in place: per block, read every state, apply `rule` element by
/// element (parameter included), then store each state (its new absmax and codes, or its `f32`
/// values). Every gradient element is multiplied by `grad_scale` first, and the step size by
/// `update_scale` (a trust ratio; 1 for rules without one). Returns the number of elements
/// skipped because their gradient or update was not finite (their parameter and states keep
/// their bits). `param` and `grad` are of one [`ParamElement`] type; the arithmetic is `f32`.
///
/// Memory beyond the buffers is one block of `f32` per state per task.
#[allow(clippy::too_many_arguments)]
pub fn fused_step<P: ParamElement>(
    rule: StepRule,
    scalars: &StepScalars,
    grad_scale: f32,
    update_scale: f32,
    param: &mut [P],
    grad: &[P],
    states: &mut [StateMut<'_>],
    block_size: usize,
) -> u64 {
    let level = Level::current();
    let lr = scalars.lr * update_scale;
    assert_eq!(param.len(), grad.len(), "parameter and gradient lengths differ");
    assert_eq!(states.len(), rule.num_states(), "{rule:?} takes {} states", rule.num_states());
    let group = blocks_per_task(block_size, param.len());
    let mut state_parts: Vec<_> = states.iter_mut().map(|state| state.split(group, block_size).into_iter()).collect();
    let tasks: Vec<_> = param
        .chunks_mut(group * block_size)
        .zip(grad.chunks(group * block_size))
        .enumerate()
        .map(|(task, (param, grad))| {
            let states: Vec<StateMut<'_>> = state_parts
                .iter_mut()
                .map(|parts| parts.next().expect("one part of each state per task"))
                .collect();
            (task * group * block_size, param, grad, states)
        })
        .collect();
    let step = Step { level, scalars, lr, grad_scale };
    let skipped = run_tasks(tasks, |(first_index, param, grad, mut states)| {
        level.run(
            #[inline(always)]
            || step.blocks(rule, first_index, param, grad, &mut states, block_size),
        )
    });
    skipped.into_iter().map(u64::from).sum()
}

/// The per-step values every element of [`fused_step`] shares.
#[derive(Clone, Copy)]
struct Step<'a> {
    level: Level,
    scalars: &'a StepScalars,
    lr: f32,
    grad_scale: f32,
}

/// Calls `$body` with `$rule` bound to a constant equal to `rule`, so that the rule's `match`
/// inside [`update_element`] folds away and each element loop is compiled for one rule.
macro_rules! with_constant_rule {
    ($value:expr, |$rule:ident| $body:expr) => {
        match $value {
            StepRule::Adam { amsgrad: false, cautious: false } => { const $rule: StepRule = StepRule::Adam { amsgrad: false, cautious: false }; $body }
            StepRule::Adam { amsgrad: false, cautious: true } => { const $rule: StepRule = StepRule::Adam { amsgrad: false, cautious: true }; $body }
            StepRule::Adam { amsgrad: true, cautious: false } => { const $rule: StepRule = StepRule::Adam { amsgrad: true, cautious: false }; $body }
            StepRule::Adam { amsgrad: true, cautious: true } => { const $rule: StepRule = StepRule::Adam { amsgrad: true, cautious: true }; $body }
            StepRule::Sgd => { const $rule: StepRule = StepRule::Sgd; $body }
            StepRule::Momentum { nesterov: false } => { const $rule: StepRule = StepRule::Momentum { nesterov: false }; $body }
            StepRule::Momentum { nesterov: true } => { const $rule: StepRule = StepRule::Momentum { nesterov: true }; $body }
            StepRule::RmsProp { centered: false, momentum: false } => { const $rule: StepRule = StepRule::RmsProp { centered: false, momentum: false }; $body }
            StepRule::RmsProp { centered: false, momentum: true } => { const $rule: StepRule = StepRule::RmsProp { centered: false, momentum: true }; $body }
            StepRule::RmsProp { centered: true, momentum: false } => { const $rule: StepRule = StepRule::RmsProp { centered: true, momentum: false }; $body }
            StepRule::RmsProp { centered: true, momentum: true } => { const $rule: StepRule = StepRule::RmsProp { centered: true, momentum: true }; $body }
            StepRule::AdaGrad => { const $rule: StepRule = StepRule::AdaGrad; $body }
            StepRule::Lion => { const $rule: StepRule = StepRule::Lion; $body }
            StepRule::AdEMAMix => { const $rule: StepRule = StepRule::AdEMAMix; $body }
            StepRule::Lamb => { const $rule: StepRule = StepRule::Lamb; $body }
        }
    };
}

/// `x` is finite, decided on the bits as the kernels decide it (docs/algorithm.md §3.7).
#[inline(always)]
fn finite(x: f32) -> bool {
    x.to_bits() & rule::ABS_MASK < rule::INFINITY_BITS
}

/// One element of the step: the update, applied only when everything it produces is finite.
/// Returns the new parameter and states, the direction (0 when skipped) and whether it applied.
#[inline(always)]
fn step_element(step: Step<'_>, rule: StepRule, lr: f32, p: f32, g: f32, s: [f32; 3]) -> ([f32; 4], f32, bool) {
    let g = g * step.grad_scale;
    let u = update_element(step.scalars, lr, p, g, s[0], s[1], s[2], rule);
    let applied = finite(g) & finite(u.p) & finite(u.s1) & finite(u.s2) & finite(u.s3);
    if applied {
        ([u.p, u.s1, u.s2, u.s3], u.direction, true)
    } else {
        ([p, s[0], s[1], s[2]], 0.0, false)
    }
}

impl Step<'_> {
    /// The blocks of one task, whose first element is element `first_index` of the tensor.
    #[inline(always)]
    fn blocks<P: ParamElement>(
        self,
        rule: StepRule,
        first_index: usize,
        param: &mut [P],
        grad: &[P],
        states: &mut [StateMut<'_>],
        block_size: usize,
    ) -> u32 {
        if P::ROUNDS_STOCHASTICALLY && self.scalars.stochastic_rounding != 0 {
            with_constant_rule!(rule, |RULE| self.blocks_with::<P, { RULE.num_states() }, true>(
                RULE, first_index, param, grad, states, block_size
            ))
        } else {
            with_constant_rule!(rule, |RULE| self.blocks_with::<P, { RULE.num_states() }, false>(
                RULE, first_index, param, grad, states, block_size
            ))
        }
    }

    /// The per-block loop of [`fused_step`] for a rule of `N` states: states read into one block
    /// of scratch each, updated in place while their new absmax is tracked, then stored. With
    /// `STOCHASTIC` the new parameter is rounded to `bf16` stochastically before it is written.
    #[inline(always)]
    fn blocks_with<P: ParamElement, const N: usize, const STOCHASTIC: bool>(
        self,
        rule: StepRule,
        first_index: usize,
        param: &mut [P],
        grad: &[P],
        states: &mut [StateMut<'_>],
        block_size: usize,
    ) -> u32 {
        debug_assert_eq!(states.len(), N);
        // A local copy: the loop's stores cannot alias it, so its fields stay in registers.
        let scalars = *self.scalars;
        let step = Step { scalars: &scalars, ..self };
        let mut scratch = Scratch::new(block_size);
        let mut skipped = 0u32;
        for (block, start) in (0..param.len()).step_by(block_size).enumerate() {
            prefetch_ahead(param, block, block_size);
            prefetch_ahead(grad, block, block_size);
            let end = param.len().min(start + block_size);
            let (param, grad) = (&mut param[start..end], &grad[start..end]);
            let len = param.len();
            let [s0, s1, s2] = scratch.read(self.level, states, block, block_size, len);
            let (grad, s0, s1, s2) = (&grad[..len], &mut s0[..len], &mut s1[..len], &mut s2[..len]);
            let mut max_bits = [0u32; 3];
            for i in 0..len {
                let old = param[i];
                let ([p, a, b, c], _, applied) =
                    step_element(step, rule, step.lr, old.to_f32(), grad[i].to_f32(), [s0[i], s1[i], s2[i]]);
                let p = if STOCHASTIC {
                    // The index wraps past 2^32 elements, as the kernels' does.
                    let index = (first_index + start + i) as u32;
                    rule::round_to_bf16_stochastically(p, rule::random_bits(scalars.rounding_key, index))
                } else {
                    p
                };
                param[i] = if applied { P::from_f32(p) } else { old };
                // At most one per element of a slice: no overflow to check.
                skipped = skipped.wrapping_add(u32::from(!applied));
                s0[i] = a;
                max_bits[0] = max_bits[0].max(a.to_bits() & rule::ABS_MASK);
                if N > 1 {
                    s1[i] = b;
                    max_bits[1] = max_bits[1].max(b.to_bits() & rule::ABS_MASK);
                }
                if N > 2 {
                    s2[i] = c;
                    max_bits[2] = max_bits[2].max(c.to_bits() & rule::ABS_MASK);
                }
            }
            for ((state, values), max) in states.iter_mut().zip([&*s0, &*s1, &*s2]).zip(max_bits) {
                state.write_block(self.level, block, block_size, values, max);
            }
        }
        skipped
    }
}

/// How many blocks ahead the fused step asks for its parameters and gradients: a block's decode
/// and encode run from the cache, and without a prefetch the update loop waited on memory for
/// most of its time (Zen 4, one thread). Quantize, one plain stream, gained nothing from it.
const PREFETCH_BLOCKS: usize = 2;

/// Asks the CPU to start loading block `block + PREFETCH_BLOCKS` of `data`, if there is one,
/// into the cache (no effect on other architectures).
#[inline(always)]
fn prefetch_ahead<T>(data: &[T], block: usize, block_size: usize) {
    let start = (block + PREFETCH_BLOCKS) * block_size;
    let Some(ahead) = data.get(start..data.len().min(start + block_size)) else { return };
    #[cfg(target_arch = "x86_64")]
    for line in ahead.chunks((64 / size_of::<T>()).max(1)) {
        // SAFETY: a prefetch reads nothing the program sees; the address lies inside `data`.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(line.as_ptr().cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = ahead;
}

/// One block of `f32` per state slot, in which a block's states are updated.
struct Scratch(Vec<f32>);

impl Scratch {
    fn new(block_size: usize) -> Self {
        Self(vec![0f32; 3 * block_size])
    }

    /// The first `len` values of each slot, `states` read into them (block `block`).
    #[inline(always)]
    fn read<W: AsRef<[u32]>, F: AsRef<[f32]>>(
        &mut self,
        level: Level,
        states: &[StateSlice<W, F>],
        block: usize,
        block_size: usize,
        len: usize,
    ) -> [&mut [f32]; 3] {
        let (s0, rest) = self.0.split_at_mut(block_size);
        let (s1, s2) = rest.split_at_mut(block_size);
        let mut slots = [&mut s0[..len], &mut s1[..len], &mut s2[..len]];
        for (state, slot) in states.iter().zip(slots.iter_mut()) {
            state.read_block(level, block, block_size, slot);
        }
        slots
    }
}

/// Lanes of a block's norm sums: independent chains of additions that fill one vector
/// register, where a single running sum is one chain of dependent additions (the norm pass took
/// 2.2 ns/element with one, 1.0–1.15 with 16 lanes, on one Zen 4 thread).
const SUM_LANES: usize = 16;

/// The sum of `terms`: element `i` is added into lane `i % SUM_LANES`, then the lanes are
/// added in a fixed order, halving them each round, so every level adds in the same order.
#[inline(always)]
fn lane_sum(terms: &[f32]) -> f32 {
    let mut lanes = [0f32; SUM_LANES];
    let mut chunks = terms.chunks_exact(SUM_LANES);
    for chunk in &mut chunks {
        for (lane, &term) in lanes.iter_mut().zip(chunk) {
            *lane += term;
        }
    }
    for (lane, &term) in lanes.iter_mut().zip(chunks.remainder()) {
        *lane += term;
    }
    let mut width = SUM_LANES;
    while width > 1 {
        width /= 2;
        for lane in 0..width {
            lanes[lane] += lanes[lane + width];
        }
    }
    lanes[0]
}

/// The first pass of LAMB and LARS: per block, the sums of `direction²` and `p²` of the update
/// `fused_step` would apply (states read, nothing written), as `[d₀, p₀, d₁, p₁, …]`.
/// Skipped elements contribute nothing to the direction's sum. Each sum runs over
/// 16 partial sums (one vector register of `f32`), added in a fixed order.
pub fn update_norms<P: ParamElement>(
    rule: StepRule,
    scalars: &StepScalars,
    grad_scale: f32,
    param: &[P],
    grad: &[P],
    states: &[StateRef<'_>],
    block_size: usize,
) -> Vec<f32> {
    let level = Level::current();
    let num_blocks = param.len().div_ceil(block_size);
    let step = Step { level, scalars, lr: scalars.lr, grad_scale };
    let mut sums = vec![0f32; 2 * num_blocks];
    let group = blocks_per_task(block_size, param.len());
    let tasks: Vec<_> = sums.chunks_mut(2 * group).enumerate().collect();
    run_tasks(tasks, |(task, sums)| {
        level.run(
            #[inline(always)]
            || {
                // A local copy, as in `Step::blocks_with`: the loop's stores cannot alias it.
                let scalars = *step.scalars;
                let step = Step { scalars: &scalars, ..step };
                let mut scratch = Scratch::new(block_size);
                let (mut direction2, mut param2) = (vec![0f32; block_size], vec![0f32; block_size]);
                for (offset, sums) in sums.chunks_mut(2).enumerate() {
                    let block = task * group + offset;
                    let start = block * block_size;
                    let len = block_size.min(param.len() - start);
                    let [s0, s1, s2] = scratch.read(level, states, block, block_size, len);
                    let (param, grad) = (&param[start..start + len], &grad[start..start + len]);
                    // Every slice cut to `len`, so the loop below has no bounds checks and vectorises.
                    let (s0, s1, s2) = (&s0[..len], &s1[..len], &s2[..len]);
                    let (direction2, param2) = (&mut direction2[..len], &mut param2[..len]);
                    with_constant_rule!(rule, |RULE| {
                        for i in 0..len {
                            let p = param[i].to_f32();
                            let (_, direction, _) =
                                step_element(step, RULE, step.lr, p, grad[i].to_f32(), [s0[i], s1[i], s2[i]]);
                            direction2[i] = direction * direction;
                            param2[i] = p * p;
                        }
                    });
                    sums[0] = lane_sum(direction2);
                    sums[1] = lane_sum(param2);
                }
            },
        )
    });
    sums
}

/// The first pass of a step over a rank-1 state: the row and column maxima (`rows`, `cols`, on
/// the bits of `|x|`, NaN canonical) of the values [`fused_step`] will store in the one
/// [`StateSlice::Rank1`] slot of `states` — the new values, or the old decoded ones where the
/// update is skipped, which `grad_scale` and `update_scale` decide as in the step. Nothing is
/// written. Each task reduces its own rows and every column, and
/// the tasks' maxima are merged; a maximum does not depend on the order, so neither does the
/// result.
///
/// # Panics
/// When no state is rank-1, or its norms do not cover the parameter.
#[allow(clippy::too_many_arguments)]
pub fn rank1_norms<P: ParamElement>(
    rule: StepRule,
    scalars: &StepScalars,
    grad_scale: f32,
    update_scale: f32,
    param: &[P],
    grad: &[P],
    states: &[StateRef<'_>],
    block_size: usize,
) -> (Vec<f32>, Vec<f32>) {
    let level = Level::current();
    let (slot, norms) = states
        .iter()
        .enumerate()
        .find_map(|(slot, state)| match state {
            StateSlice::Rank1 { norms, .. } => Some((slot, *norms)),
            _ => None,
        })
        .expect("a step with a rank-1 state");
    let (num_rows, num_cols) = (norms.rows.len(), norms.cols.len());
    assert_eq!(num_rows * num_cols, param.len(), "rank-1 norms of {num_rows} × {num_cols} for {} elements", param.len());
    let step = Step { level, scalars, lr: scalars.lr * update_scale, grad_scale };
    let num_blocks = param.len().div_ceil(block_size);
    let group = blocks_per_task(block_size, param.len());
    let tasks: Vec<usize> = (0..num_blocks.div_ceil(group)).collect();
    let parts = run_tasks(tasks, |task| {
        level.run(
            #[inline(always)]
            || {
                // A local copy, as in `Step::blocks_with`: the loop's stores cannot alias it.
                let scalars = *step.scalars;
                let step = Step { scalars: &scalars, ..step };
                let blocks = task * group..((task + 1) * group).min(num_blocks);
                let first_row = blocks.start * block_size / num_cols;
                let last_row = ((blocks.end * block_size).min(param.len()) - 1) / num_cols;
                let (mut rows, mut cols) = (vec![0u32; last_row + 1 - first_row], vec![0u32; num_cols]);
                let mut scratch = Scratch::new(block_size);
                let mut stored = vec![0f32; block_size];
                for block in blocks {
                    let start = block * block_size;
                    let len = block_size.min(param.len() - start);
                    let [s0, s1, s2] = scratch.read(level, states, block, block_size, len);
                    let (param, grad) = (&param[start..start + len], &grad[start..start + len]);
                    let (s0, s1, s2, stored) = (&s0[..len], &s1[..len], &s2[..len], &mut stored[..len]);
                    let states = [s0, s1, s2];
                    with_constant_rule!(rule, |RULE| match slot {
                        0 => stored_values::<P, 1>(step, RULE, param, grad, states, stored),
                        1 => stored_values::<P, 2>(step, RULE, param, grad, states, stored),
                        _ => stored_values::<P, 3>(step, RULE, param, grad, states, stored),
                    });
                    rank1::raise_norms(stored, start, first_row, &mut rows, &mut cols);
                }
                (first_row, rows, cols)
            },
        )
    });
    let (mut rows, mut cols) = (vec![0u32; num_rows], vec![0u32; num_cols]);
    for (first_row, part_rows, part_cols) in parts {
        for (all, part) in rows[first_row..].iter_mut().zip(part_rows) {
            *all = (*all).max(part);
        }
        for (all, part) in cols.iter_mut().zip(part_cols) {
            *all = (*all).max(part);
        }
    }
    let canonical = |bits: Vec<u32>| bits.into_iter().map(rule::absmax_from_bits).collect();
    (canonical(rows), canonical(cols))
}

/// The value each element of a block stores in state slot `OUT − 1` after the step: output `OUT`
/// of [`step_element`] (a constant, so that the loop vectorises).
#[inline(always)]
fn stored_values<P: ParamElement, const OUT: usize>(
    step: Step<'_>,
    rule: StepRule,
    param: &[P],
    grad: &[P],
    [s0, s1, s2]: [&[f32]; 3],
    stored: &mut [f32],
) {
    for (i, stored) in stored.iter_mut().enumerate() {
        let (out, _, _) = step_element(step, rule, step.lr, param[i].to_f32(), grad[i].to_f32(), [s0[i], s1[i], s2[i]]);
        *stored = out[OUT];
    }
}

/// `max |x|` over a block computed on the bits of `|x|`, as the kernels do: for non-negative
/// floats the integer order is the float order, so a NaN (any payload) wins over +∞, which wins
/// over every finite value. The result is canonical: NaN is always [`f32::NAN`].
#[inline(always)]
pub fn block_absmax(block: &[f32]) -> f32 {
    let bits = block
        .iter()
        .fold(0u32, |max, x| max.max(x.to_bits() & rule::ABS_MASK));
    rule::absmax_from_bits(bits)
}

/// Decodes one block of codes (one byte each; all below 16 with `NARROW`): `values[code] *
/// absmax`, the product taken per element as on the GPU; a block with a non-finite absmax
/// decodes to the canonical NaN everywhere.
#[inline(always)]
fn decode_block<const NARROW: bool>(
    level: Level,
    codes: &[u8],
    absmax: f32,
    values: &[f32; MAP_LEN],
    output: &mut [f32],
) {
    if !absmax.is_finite() {
        output.fill(f32::from_bits(rule::CANONICAL_NAN_BITS));
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if level.has_avx512() {
        // SAFETY: the level has AVX-512; `codes` hold a code for every element of `output`,
        // below 16 where the caller says `NARROW`.
        unsafe { avx512::decode::<NARROW>(codes, absmax, values, output) };
        return;
    }
    for (out, &code) in output.iter_mut().zip(codes) {
        *out = values[usize::from(code)] * absmax;
    }
}

/// Blocks up to this many elements unpack their codes into a buffer of this size: clearing a
/// 4 KiB buffer for every block of 128 codes cost more than the codes.
const SMALL_BLOCK: usize = 256;

/// `f` run on `len` zeroed bytes on the stack (at most [`BlockSize::MAX`]).
#[inline(always)]
fn with_code_bytes<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    if len <= SMALL_BLOCK {
        f(&mut [0u8; SMALL_BLOCK][..len])
    } else {
        f(&mut [0u8; BlockSize::MAX][..len])
    }
}

/// Eight 4-bit codes per word, the first in the lowest bits.
const NIBBLES: usize = 8;

/// The 4-bit codes packed in `words`, one byte each, into `codes` (as many as it holds): whole
/// words in chunks of a length the compiler knows, then the partial last one.
#[inline(always)]
fn unpack_nibbles(words: &[u32], codes: &mut [u8]) {
    #[inline(always)]
    fn unpack_word(word: u32, codes: &mut [u8]) {
        for (j, code) in codes.iter_mut().enumerate() {
            *code = ((word >> (4 * j)) & 0xf) as u8;
        }
    }
    let whole = codes.len() / NIBBLES;
    let mut chunks = codes.chunks_exact_mut(NIBBLES);
    for (codes, &word) in (&mut chunks).zip(words) {
        unpack_word(word, codes);
    }
    if let Some(&word) = words.get(whole) {
        unpack_word(word, chunks.into_remainder());
    }
}

/// `codes` (each below 16) packed eight per word into `words`, the unused bits of a partial last
/// word zero.
#[inline(always)]
fn pack_nibbles(codes: &[u8], words: &mut [u32]) {
    for (word, codes) in words.iter_mut().zip(codes.chunks(NIBBLES)) {
        *word = codes.iter().enumerate().fold(0, |word, (j, &code)| word | u32::from(code) << (4 * j));
    }
}

/// Encodes blocks by the scaled-midpoint rule in O(1) and without branches, by the guesses of
/// [`GuessTable`]: `g` from the bucket of `x / absmax`, then two comparisons against the exact
/// thresholds `t[g + 1]`, `t[g + 2]`. Blocks whose absmax lies outside the table's settled range
/// are binary-searched instead. Every code returned satisfies `t[c] < x <= t[c + 1]` (0 for NaN,
/// as the search gives): the kernels' `encode::encode_code`, as a loop the compiler vectorises.
/// At levels with AVX-512 the guesses are gathered 16 at a time and only the elements whose
/// bucket has thresholds near it are compared (`avx512::encode`).
struct Encoder {
    /// Bits per code of the map.
    bits: u32,
    /// The map's values, padded (`CodeMap::padded_values`).
    values: [f32; MAP_LEN],
    /// The bounds of a block of absmax 1 (`encode::unit_bounds`), which each block scales; the
    /// map's padded thresholds lie between its two ends ([`Encoder::midpoints`]).
    unit_bounds: [f32; BOUNDS],
    zero_code: u8,
    guesses: &'static GuessTable,
    /// Per bucket, the guess in the low byte and in the high byte the number of thresholds that
    /// may lie among the bucket's ratios (0 where the guess is the code), then one entry of
    /// padding: AVX-512 gathers entries two at a time.
    #[cfg(target_arch = "x86_64")]
    marked: Box<[u16]>,
}

impl Encoder {
    fn get(map: MapKind) -> &'static Encoder {
        static ENCODERS: [OnceLock<Encoder>; MapKind::ALL.len()] = [const { OnceLock::new() }; MapKind::ALL.len()];
        let slot = MapKind::ALL.iter().position(|&kind| kind == map).expect("listed");
        ENCODERS[slot].get_or_init(|| {
            let table = map.map();
            let guesses = GuessTable::get(map);
            Encoder {
                bits: map.bits(),
                values: table.padded_values(),
                unit_bounds: unit_bounds(&table.padded_midpoints()),
                zero_code: table.zero_code(),
                guesses,
                #[cfg(target_arch = "x86_64")]
                marked: guesses
                    .guess
                    .iter()
                    .zip(guesses.undecided.iter())
                    .map(|(&guess, &undecided)| u16::from(guess) | u16::from(undecided) << 8)
                    .chain([0])
                    .collect(),
            }
        })
    }

    /// The map's thresholds, padded with `+∞` (`CodeMap::padded_midpoints`): the padding never
    /// counts, so 4-bit maps take the 8-bit path unchanged.
    #[inline(always)]
    fn midpoints(&self) -> &[f32; MAP_LEN - 1] {
        self.unit_bounds[1..MAP_LEN].try_into().expect("a map's 255 padded midpoints")
    }

    /// Decodes the codes of `output.len()` elements packed in `words` into `output`.
    #[inline(always)]
    fn decode_into(&self, level: Level, words: &[u32], absmax: f32, output: &mut [f32]) {
        match self.bits {
            // Code `i` is byte `i` of the words in memory where memory is little-endian.
            8 if cfg!(target_endian = "little") => {
                decode_block::<false>(level, &bytemuck::cast_slice(words)[..output.len()], absmax, &self.values, output);
            }
            8 => {
                let codes: Vec<u8> = words.iter().flat_map(|word| word.to_le_bytes()).take(output.len()).collect();
                decode_block::<false>(level, &codes, absmax, &self.values, output);
            }
            _ => with_code_bytes(output.len(), |codes| {
                unpack_nibbles(words, codes);
                decode_block::<true>(level, codes, absmax, &self.values, output);
            }),
        }
    }

    /// Encodes `block` into `words` (as many as its codes need), packed as
    /// [`MapKind::codes_per_word`] says, the unused bits of a partial last word zero.
    #[inline(always)]
    fn encode_into(&self, level: Level, block: &[f32], absmax: f32, words: &mut [u32]) {
        if self.bits != 8 {
            with_code_bytes(block.len(), |codes| {
                self.encode_block(level, block, absmax, codes);
                pack_nibbles(codes, words);
            });
            return;
        }
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(words);
        let (codes, padding) = bytes.split_at_mut(block.len());
        self.encode_block(level, block, absmax, codes);
        padding.fill(0);
        // Code `i` is byte `i` in memory, which is the little-endian order only on
        // little-endian targets; elsewhere each word is swapped (this loop is empty on x86-64
        // and aarch64).
        for word in words.iter_mut() {
            *word = u32::from_le(*word);
        }
    }

    #[inline(always)]
    fn encode_block(&self, level: Level, block: &[f32], absmax: f32, codes: &mut [u8]) {
        if !(absmax > 0.0 && absmax.is_finite()) {
            codes.fill(self.zero_code);
            return;
        }
        // A 4-bit map's 15 thresholds fit in one register.
        #[cfg(target_arch = "x86_64")]
        if level.has_avx512() && (1 << self.bits) - 1 < avx512::LANES {
            // SAFETY: the level has AVX-512; a 4-bit map's midpoints past its 15 are +∞.
            unsafe { avx512::encode_narrow(block, self.midpoints(), absmax, codes) };
            return;
        }
        let bounds = block_bounds(&self.unit_bounds, absmax);
        if !self.guesses.settled_absmax.contains(&absmax) {
            for (code, &x) in codes.iter_mut().zip(block) {
                *code = search(&bounds, x) as u8;
            }
            return;
        }
        let inverse = 1.0 / absmax;
        #[cfg(target_arch = "x86_64")]
        if level.has_avx512() {
            // SAFETY: the level has AVX-512; `marked` has an entry per key plus one.
            unsafe { avx512::encode(block, inverse, &self.marked, &bounds, codes) };
            return;
        }
        let guess = &self.guesses.guess;
        for (code, &x) in codes.iter_mut().zip(block) {
            *code = settle(&bounds, guess[((x * inverse).to_bits() >> GUESS_SHIFT) as usize], x);
        }
    }
}

/// The code of `x` from its bucket's guess `below`: the two thresholds above it that may lie
/// below `x`, counted (see [`GuessTable`]).
#[inline(always)]
fn settle(bounds: &[f32; BOUNDS], below: u8, x: f32) -> u8 {
    let below = usize::from(below);
    (below + usize::from(x > bounds[below + 1]) + usize::from(x > bounds[below + 2])) as u8
}

/// The code of `x` under a block's `bounds`: the number of thresholds below it, by branch-free
/// binary search.
#[inline(always)]
fn search(bounds: &[f32; BOUNDS], x: f32) -> usize {
    let mut code = 0;
    let mut step = MAP_LEN / 2;
    while step > 0 {
        code += step * usize::from(x > bounds[code + step]);
        step /= 2;
    }
    code
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;
    use crate::map::MapFamily;

    thread_local! {
        /// The level [`Level::current`] returns on this thread, when set.
        pub(super) static FORCED_LEVEL: Cell<Option<Level>> = const { Cell::new(None) };
    }

    /// Every level this CPU can run: the detected one and each it implies.
    fn available_levels() -> Vec<Level> {
        // In order: each level implies the ones before it.
        #[cfg(target_arch = "x86_64")]
        let order = [Arch::Scalar, Arch::V2, Arch::V3, Arch::V4];
        #[cfg(target_arch = "aarch64")]
        let order = [Arch::Scalar, Arch::NeonFma];
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        let order = [Arch::Scalar];
        let detected = std::mem::discriminant(&Level::detected().0);
        let top = order
            .iter()
            .position(|arch| std::mem::discriminant(arch) == detected)
            .unwrap_or(order.len() - 1);
        order[..=top].iter().copied().map(Level).collect()
    }

    /// `f` run with every available level forced, the scalar level first.
    fn at_every_level<R>(f: impl Fn() -> R) -> Vec<(Level, R)> {
        available_levels()
            .into_iter()
            .map(|level| {
                FORCED_LEVEL.set(Some(level));
                let result = f();
                FORCED_LEVEL.set(None);
                (level, result)
            })
            .collect()
    }

    /// The next value in [-1, 1) of an xorshift64 stream.
    fn next_unit(state: &mut u64) -> f32 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        (*state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }

    fn random_values(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed | 1;
        (0..len)
            .map(|i| {
                let unit = next_unit(&mut state);
                match i % 97 {
                    0 => 0.0,
                    1 => unit * 1e-30,
                    2 => unit.powi(9),
                    _ => unit * (1.0 + (i % 7) as f32),
                }
            })
            .collect()
    }

    #[test]
    fn every_simd_level_quantizes_to_the_same_bits() {
        let input = random_values(40_000 + 37, 7);
        for kind in MapKind::ALL {
            for block_size in [64, 256, 4096] {
                let runs = at_every_level(|| {
                    let (words, absmax) = quantize(&input, kind, block_size);
                    let mut decoded = vec![f32::NAN; input.len()];
                    dequantize(&words, &absmax, kind, block_size, &mut decoded);
                    let bits: Vec<u32> = decoded.iter().map(|x| x.to_bits()).collect();
                    (words, absmax.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), bits)
                });
                let (_, scalar) = &runs[0];
                for (level, run) in &runs[1..] {
                    assert!(run == scalar, "{level:?} differs from scalar ({kind:?}, block {block_size})");
                }
            }
        }
    }

    /// `len` random gradient elements, NaN at index 5 and +∞ at `infinite`.
    fn gradient_with_two_non_finite(len: usize, infinite: usize) -> Vec<f32> {
        let mut grad = random_values(len, 11);
        grad[5] = f32::NAN;
        grad[infinite] = f32::INFINITY;
        grad
    }

    /// Step scalars with every rate, correction and decay on, so that every rule reads a value
    /// of its own in each field it takes.
    fn every_rate() -> StepScalars {
        StepScalars {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            beta3: 0.5,
            alpha: 5.0,
            eps: 1e-8,
            correction1: 0.1,
            correction2: 0.0447,
            decay_factor: 0.99,
            l2_penalty: 0.01,
            direction_decay: 0.01,
            ..StepScalars::default()
        }
    }

    #[test]
    fn every_simd_level_steps_every_rule_to_the_same_bits() {
        let len = 3 * 4096 + 129;
        let grad = gradient_with_two_non_finite(len, 700);
        let scalars = every_rate();
        let rules: Vec<StepRule> = (0..64).filter_map(StepRule::from_code).collect();
        for rule in rules {
            for (family, quantized) in
                [(MapFamily::Dynamic, true), (MapFamily::Linear, true), (MapFamily::FourBit, true), (MapFamily::Dynamic, false)]
            {
                let block_size = 256;
                let runs = at_every_level(|| {
                    let mut param = random_values(len, 3);
                    let mut full: Vec<Vec<f32>> = (0..rule.num_states())
                        .map(|slot| random_values(len, 20 + slot as u64).iter().map(|x| x.abs() * 0.1).collect())
                        .collect();
                    let mut packed: Vec<(Vec<u32>, Vec<f32>)> = full
                        .iter()
                        .zip(rule.state_maps(family))
                        .map(|(values, map)| quantize(values, map, block_size))
                        .collect();
                    let mut outputs = Vec::new();
                    for _ in 0..3 {
                        let mut states: Vec<StateMut<'_>> = if quantized {
                            packed
                                .iter_mut()
                                .zip(rule.state_maps(family))
                                .map(|((words, absmax), map)| StateSlice::Blockwise { words: words.as_mut_slice(), absmax: absmax.as_mut_slice(), map })
                                .collect()
                        } else {
                            full.iter_mut().map(|values| StateSlice::Full(values.as_mut_slice())).collect()
                        };
                        let refs: Vec<StateRef<'_>> = states.iter().map(|state| state.borrow()).collect();
                        let norms = update_norms(rule, &scalars, 0.5, &param, &grad, &refs, block_size);
                        drop(refs);
                        let skipped = fused_step(rule, &scalars, 0.5, 0.7, &mut param, &grad, &mut states, block_size);
                        outputs.push((skipped, norms.iter().map(|x| x.to_bits()).collect::<Vec<_>>()));
                    }
                    let bits = |values: &[f32]| values.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    let states: Vec<_> = if quantized {
                        packed.iter().map(|(words, absmax)| (words.clone(), bits(absmax))).collect()
                    } else {
                        full.iter().map(|values| (Vec::new(), bits(values))).collect()
                    };
                    (outputs, bits(&param), states)
                });
                let (_, scalar) = &runs[0];
                assert!(scalar.0.iter().all(|(skipped, _)| *skipped == 2), "{rule:?}: the two non-finite gradients skip");
                for (level, run) in &runs[1..] {
                    assert!(run == scalar, "{level:?} differs from scalar ({rule:?}, {family:?}, quantized {quantized})");
                }
            }
        }
    }

    /// Rank-1 codes and decoded values at every level are the rule's (`rule::encode_scaled`,
    /// `rule::decode_scaled`) element by element, for scales of every kind: normal, tiny, zero,
    /// infinite and NaN norms, and values on and off the thresholds.
    #[test]
    fn rank1_codes_follow_the_rule_at_every_level() {
        let (num_rows, num_cols) = (23, 301);
        let mut rows: Vec<f32> = random_values(num_rows, 5).iter().map(|x| x.abs() * 3.0).collect();
        let mut cols: Vec<f32> = random_values(num_cols, 6).iter().map(|x| x.abs() * 2.0).collect();
        (rows[3], rows[4], rows[5]) = (0.0, f32::INFINITY, f32::NAN);
        (cols[7], cols[8], cols[9], cols[10]) = (0.0, f32::INFINITY, f32::NAN, 1e-40);
        let len = num_rows * num_cols;
        let mut values: Vec<f32> = random_values(len, 7).iter().map(|x| x.abs() * 2.5).collect();
        values[11] = f32::NAN;
        for kind in [MapKind::LinearUnsigned4, MapKind::DynamicUnsigned] {
            let map = kind.map();
            let midpoints = map.padded_midpoints();
            // Some values exactly on a threshold of their element's scale.
            for i in (0..len).step_by(17) {
                let scale = f32::from_bits(rule::rank1_scale_bits(rows[i / num_cols], cols[i % num_cols]));
                values[i] = midpoints[i % ((1 << kind.bits()) - 1)] * scale;
            }
            let scale_of = |i: usize| rule::rank1_scale_bits(rows[i / num_cols], cols[i % num_cols]);
            let codes: Vec<u8> = (0..len)
                .map(|i| rule::encode_scaled(&midpoints, kind.bits(), map.zero_code(), values[i], scale_of(i)))
                .collect();
            let decoded: Vec<u32> = (0..len)
                .map(|i| rule::decode_scaled(map.padded_values()[usize::from(codes[i])], scale_of(i)).to_bits())
                .collect();
            for (level, (words, got)) in at_every_level(|| {
                let encoder = Encoder::get(kind);
                let mut words = vec![0u32; kind.num_words(len)];
                let level = Level::current();
                encoder.encode_rank1(level, &values, rank1::Scales::new(&rows, &cols, 0), &mut words);
                let mut got = vec![0f32; len];
                encoder.decode_rank1(level, &words, rank1::Scales::new(&rows, &cols, 0), &mut got);
                (words, got.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
            }) {
                assert_eq!(crate::host::unpack(&words, kind, len), codes, "{kind:?} at {level:?}: codes");
                assert_eq!(got, decoded, "{kind:?} at {level:?}: decoded values");
            }
        }
    }

    /// A step over a rank-1 state, at every level, is its reference spelled out on the host:
    /// decode every state, update each element (skipping the non-finite ones), quantize each
    /// state anew — block-wise states against their blocks' new absmax, the rank-1 state against
    /// the row and column maxima of its new values. For every rule with a non-negative state
    /// (its first is rank-1), on matrices whose rows end inside blocks.
    #[test]
    fn a_rank1_step_is_decode_update_and_requantize() {
        let (rows, cols, block_size) = (37, 1000, 256);
        let len = rows * cols;
        let grad = gradient_with_two_non_finite(len, cols + 3);
        let scalars = every_rate();
        let family = MapFamily::FourBit;
        let rules = (0..64).filter_map(StepRule::from_code).filter(|rule| rule.second_moment_slot().is_some());
        for rule in rules {
            let maps = rule.state_maps(family);
            let rank1_slot = rule.second_moment_slot().expect("a second moment");
            let param0 = random_values(len, 3);
            let values: Vec<Vec<f32>> = (0..maps.len())
                .map(|slot| random_values(len, 20 + slot as u64).iter().map(|x| x.abs() * 0.1).collect())
                .collect();
            // (words, absmax or rows, cols): the states as stored.
            let stored: Vec<(Vec<u32>, Vec<f32>, Vec<f32>)> = values
                .iter()
                .zip(&maps)
                .enumerate()
                .map(|(slot, (values, &map))| match slot == rank1_slot {
                    true => rank1_quantize(values, cols, map),
                    false => {
                        let (words, absmax) = quantize(values, map, block_size);
                        (words, absmax, Vec::new())
                    }
                })
                .collect();

            let mut expected_param = param0.clone();
            let mut decoded: Vec<Vec<f32>> = stored
                .iter()
                .zip(&maps)
                .enumerate()
                .map(|(slot, ((words, first, second), &map))| {
                    let mut values = vec![0f32; len];
                    if slot == rank1_slot {
                        values = rank1_dequantize(words, first, second, map);
                    } else {
                        dequantize(words, first, map, block_size, &mut values);
                    }
                    values
                })
                .collect();
            let step = Step { level: Level::detected(), scalars: &scalars, lr: scalars.lr * 0.7, grad_scale: 0.5 };
            for i in 0..len {
                let old: [f32; 3] = std::array::from_fn(|slot| decoded.get(slot).map_or(0.0, |values| values[i]));
                let ([p, a, b, c], _, _) = step_element(step, rule, step.lr, expected_param[i], grad[i], old);
                expected_param[i] = p;
                for (values, new) in decoded.iter_mut().zip([a, b, c]) {
                    values[i] = new;
                }
            }
            let expected: Vec<(Vec<u32>, Vec<f32>, Vec<f32>)> = decoded
                .iter()
                .zip(&maps)
                .enumerate()
                .map(|(slot, (values, &map))| match slot == rank1_slot {
                    true => rank1_quantize(values, cols, map),
                    false => {
                        let (words, absmax) = quantize(values, map, block_size);
                        (words, absmax, Vec::new())
                    }
                })
                .collect();

            for (level, (param, states)) in at_every_level(|| {
                let mut param = param0.clone();
                let mut states = stored.clone();
                let (next_rows, next_cols) = {
                    let refs: Vec<StateRef<'_>> = states
                        .iter()
                        .zip(&maps)
                        .enumerate()
                        .map(|(slot, ((words, first, second), &map))| match slot == rank1_slot {
                            true => StateSlice::Rank1 {
                                words: words.as_slice(),
                                norms: Rank1Scales { rows: first, cols: second, next_rows: first, next_cols: second },
                                offset: 0,
                                map,
                            },
                            false => StateSlice::Blockwise { words: words.as_slice(), absmax: first.as_slice(), map },
                        })
                        .collect();
                    rank1_norms(rule, &scalars, 0.5, 0.7, &param, &grad, &refs, block_size)
                };
                let mut views: Vec<StateMut<'_>> = states
                    .iter_mut()
                    .zip(&maps)
                    .enumerate()
                    .map(|(slot, ((words, first, second), &map))| match slot == rank1_slot {
                        true => StateSlice::Rank1 {
                            words: words.as_mut_slice(),
                            norms: Rank1Scales { rows: first, cols: second, next_rows: &next_rows, next_cols: &next_cols },
                            offset: 0,
                            map,
                        },
                        false => StateSlice::Blockwise { words: words.as_mut_slice(), absmax: first.as_mut_slice(), map },
                    })
                    .collect();
                assert_eq!(fused_step(rule, &scalars, 0.5, 0.7, &mut param, &grad, &mut views, block_size), 2);
                drop(views);
                states[rank1_slot].1 = next_rows.clone();
                states[rank1_slot].2 = next_cols.clone();
                (param, states)
            }) {
                let bits = |values: &[f32]| values.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&param), bits(&expected_param), "{rule:?} at {level:?}: parameters");
                for (slot, (got, want)) in states.iter().zip(&expected).enumerate() {
                    assert_eq!(got.0, want.0, "{rule:?} at {level:?}: codes of slot {slot}");
                    assert_eq!(bits(&got.1), bits(&want.1), "{rule:?} at {level:?}: absmax or rows of slot {slot}");
                    assert_eq!(bits(&got.2), bits(&want.2), "{rule:?} at {level:?}: columns of slot {slot}");
                }
            }
        }
    }

    /// Three Adam steps of `P` parameters at every level, rounded stochastically where `P`
    /// allows it and `stochastic` asks for it: the parameter's widened bits and the states'
    /// codes and absmax are those of the scalar level.
    fn every_level_steps_to_the_same_bits<P: ParamElement>(stochastic: bool) {
        let len = 3 * 4096 + 129;
        let rule = StepRule::Adam { amsgrad: false, cautious: false };
        let scalars = StepScalars {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            correction1: 0.1,
            correction2: 0.0447,
            decay_factor: 0.99,
            stochastic_rounding: u32::from(stochastic),
            rounding_key: rule::rounding_key(1, 2),
            ..StepScalars::default()
        };
        let grad: Vec<P> = random_values(len, 11).into_iter().map(P::from_f32).collect();
        let runs = at_every_level(|| {
            let mut param: Vec<P> = random_values(len, 3).into_iter().map(P::from_f32).collect();
            let mut packed: Vec<_> = rule
                .state_maps(MapFamily::Dynamic)
                .into_iter()
                .map(|map| (quantize(&random_values(len, 5), map, 256), map))
                .collect();
            for _ in 0..3 {
                let mut states: Vec<StateMut<'_>> = packed
                    .iter_mut()
                    .map(|((words, absmax), map)| StateSlice::Blockwise { words: words.as_mut_slice(), absmax: absmax.as_mut_slice(), map: *map })
                    .collect();
                fused_step(rule, &scalars, 1.0, 1.0, &mut param, &grad, &mut states, 256);
            }
            let param: Vec<u32> = param.iter().map(|x| x.to_f32().to_bits()).collect();
            let states: Vec<_> = packed.into_iter().map(|((words, absmax), _)| (words, absmax.iter().map(|x| x.to_bits()).collect::<Vec<_>>())).collect();
            (param, states)
        });
        let (_, scalar) = &runs[0];
        for (level, run) in &runs[1..] {
            assert!(run == scalar, "{level:?} differs from scalar ({})", std::any::type_name::<P>());
        }
    }

    #[test]
    fn every_simd_level_steps_half_precision_parameters_to_the_same_bits() {
        every_level_steps_to_the_same_bits::<f16>(false);
        every_level_steps_to_the_same_bits::<bf16>(false);
        every_level_steps_to_the_same_bits::<bf16>(true);
    }

    fn reference_code(x: f32, absmax: f32, midpoints: &[f32]) -> u8 {
        midpoints.iter().filter(|&&mid| x > mid * absmax).count() as u8
    }

    #[test]
    fn fast_encoder_equals_the_rule_on_every_map() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for kind in MapKind::ALL {
            let encoder = Encoder::get(kind);
            let map = kind.map();
            let midpoints = map.midpoints();
            // Inside the absmax range the guess table serves, and outside it on both sides.
            for absmax in [1.0f32, 3.7e-7, 1.0e30, 0.013, 65504.0, 1.0e-36, 1.0e38] {
                // Not a multiple of 16 lanes: the last vector is partial.
                let block: Vec<f32> = (0..4096 + 13)
                    .map(|i| {
                        let unit = next_unit(&mut state);
                        // Thresholds and their neighbours: where rounding the ratio could mislead.
                        let threshold = midpoints[i % midpoints.len()] * absmax;
                        match i % 8 {
                            0 => unit * absmax,
                            1 => unit.powi(7) * absmax,
                            2 => map.values()[i % map.values().len()] * absmax,
                            3 => threshold,
                            4 => threshold.next_up(),
                            5 => threshold.next_down(),
                            6 => unit * 1e-40,
                            // Beyond the absmax, as `encode` may be given, and every kind of NaN.
                            _ => {
                                let special = [
                                    unit * absmax * 3.0,
                                    f32::INFINITY,
                                    f32::NEG_INFINITY,
                                    f32::NAN,
                                    -f32::NAN,
                                    f32::from_bits(0x7f80_0001),
                                    f32::from_bits(0xff80_0001),
                                    f32::from_bits(0x7fbf_ffff),
                                ];
                                special[(i / 8) % special.len()]
                            }
                        }
                    })
                    .collect();
                for level in available_levels() {
                    let mut codes = vec![0u8; block.len()];
                    level.run(|| encoder.encode_block(level, &block, absmax, &mut codes));
                    for (&x, &code) in block.iter().zip(&codes) {
                        assert_eq!(code, reference_code(x, absmax, &midpoints), "{kind:?} {level:?} x={x:e}");
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_conversions_equal_halfs() {
        let ties = [0x0000u32, 0x0001, 0x7fff, 0x8000, 0x8001, 0xffff];
        let sampled = (0..=u32::MAX).step_by(65_521);
        let around_ties = (0..=u32::MAX >> 16).step_by(7).flat_map(|high| ties.map(|low| high << 16 | low));
        let specials = [0x7f7f_ffffu32, 0x7f80_0000, 0x7f80_0001, 0x7fc0_0000, 0xff7f_8000, 0x0000_8000, 0x8000_0000];
        for bits in sampled.chain(around_ties).chain(specials) {
            let x = f32::from_bits(bits);
            let ours = <bf16 as ParamElement>::from_f32(x);
            assert_eq!(ours.to_bits(), bf16::from_f32(x).to_bits(), "{bits:#010x}");
            let widened = <bf16 as ParamElement>::to_f32(ours);
            if !x.is_nan() {
                assert_eq!(widened.to_bits(), ours.to_f32().to_bits(), "{bits:#010x}");
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
    fn four_bit_codes_are_packed_from_the_low_nibble_up_and_zero_padded() {
        let map = MapKind::DynamicSigned4;
        let input: Vec<f32> = (0..19).map(|i| i as f32 / 9.0 - 1.0).collect();
        let (words, absmax) = quantize(&input, map, 64);
        assert_eq!(words.len(), 3);
        let midpoints = map.map().midpoints();
        let codes: Vec<u32> = input.iter().map(|&x| u32::from(reference_code(x, absmax[0], &midpoints))).collect();
        for (i, &code) in codes.iter().enumerate() {
            assert_eq!((words[i / 8] >> (4 * (i % 8))) & 15, code, "element {i}");
        }
        assert_eq!(words[2] >> 12, 0, "the unused nibbles of the last word are zero");
        let mut decoded = vec![0.0; input.len()];
        dequantize(&words, &absmax, map, 64, &mut decoded);
        for (&out, &code) in decoded.iter().zip(&codes) {
            assert_eq!(out, map.map().values()[code as usize] * absmax[0]);
        }
    }

    #[test]
    fn codes_are_packed_little_endian_and_zero_padded() {
        let encoder = Encoder::get(MapKind::LinearSigned);
        let level = Level::current();
        let block = [-1.0, -0.5, 0.0, 0.5, 1.0];
        let mut codes = [0u8; 5];
        encoder.encode_block(level, &block, 1.0, &mut codes);
        let mut words = [u32::MAX; 2];
        encoder.encode_into(level, &block, 1.0, &mut words);
        assert_eq!(words, [u32::from_le_bytes([codes[0], codes[1], codes[2], codes[3]]), u32::from(codes[4])]);
    }
}
