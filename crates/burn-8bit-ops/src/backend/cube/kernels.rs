//! The CubeCL kernels of the block-wise operations, one source for wgpu (Vulkan, Metal, DX12),
//! CUDA, ROCm and cubecl-cpu. Their CPU twin is `cpu.rs`: the same rules, so the same bits.
//!
//! One cube handles one block. Each unit owns whole `u32` words (four 8-bit or eight 4-bit
//! codes, the kernel's comptime `code_bits`), strided across
//! the block so that neighbouring units touch neighbouring words, and keeps its elements in
//! registers from the read to the write: every buffer is read once and written once. The float
//! streams (parameter and gradient, quantize's input, dequantize's output) move in vectors of
//! up to a word's elements, as wide as the launch found to divide the length. The
//! absmax is reduced in shared memory (one barrier per level for every state at once), the
//! decode values and the thresholds `midpoint · absmax` sit in shared memory, and codes are
//! found in O(1) by `encode::encode_code`. The tensor length, block count, hyper-parameters and
//! table offsets are runtime scalars: a kernel is compiled once per (rule, slot kinds, block
//! size), never per length or per step.

use cubecl::prelude::*;

use crate::encode::{BOUNDS, GUESSES, MIDPOINTS, SETTLED, encode_code};
use crate::map::MAP_LEN;
use crate::rule::{ABS_MASK, BF16_MASK, CANONICAL_NAN_BITS, HASH_MULTIPLIERS, INFINITY_BITS};
use crate::step::{StepRule, StepScalars, update_element};

/// How a state slot is held, known when the kernel is compiled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SlotKind {
    /// The rule has no state here.
    Absent,
    /// Packed codes in the slot's words buffer, absmax in its floats buffer.
    Blockwise,
    /// Plain `f32` values in the slot's floats buffer.
    Full,
    /// Packed codes in the slot's words buffer under rank-1 normalisation: the norms they are
    /// decoded against in the kernel's `rank1_rows` and `rank1_cols`, those they are encoded
    /// against in `next_rows` and `next_cols` (at most one slot).
    Rank1,
}

/// What a step kernel computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pass {
    /// The fused step: parameter and states rewritten.
    Step,
    /// The first pass of LAMB and LARS: per block, the sums of `direction²` and `p²` of the
    /// update the step would apply into `sums[2·block]` and `sums[2·block + 1]`; nothing else is
    /// written.
    Norms,
    /// The first pass of a step over a rank-1 state: the row and column maxima of the values
    /// the step will store in the rank-1 slot, raised into `next_rows` and `next_cols` (zero
    /// before the pass) by atomic maxima on their bits, one per element for the columns and one
    /// per run of a row within a unit's word for the rows; nothing else is written.
    Rank1Norms,
}

/// What a step kernel is compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StepLayout {
    /// The fused step or its update-norm pass.
    pub pass: Pass,
    /// The update rule.
    pub rule: StepRule,
    /// How each of the three slots is held.
    pub slots: [SlotKind; 3],
    /// Whether the gradient is multiplied by a device scalar.
    pub grad_scaled: bool,
    /// Whether the step size is multiplied by a device scalar.
    pub update_scaled: bool,
    /// Elements per block.
    pub block_size: usize,
    /// Units per cube.
    pub units: usize,
    /// Whether the (`bf16`) parameter is rounded stochastically (`StepScalars::stochastic_rounding`).
    pub stochastic_bf16: bool,
    /// Bits per code of every block-wise slot (8 or 4; 8 when none is block-wise): a unit owns
    /// the elements of whole words of codes, `32 / code_bits` per word.
    pub code_bits: u32,
}

/// Each block-wise slot's table offset (in the tables buffer) and zero code.
#[derive(CubeLaunch, CubeType)]
pub struct SlotMaps {
    pub table1: u32,
    pub table2: u32,
    pub table3: u32,
    pub zero1: u32,
    pub zero2: u32,
    pub zero3: u32,
}

/// Words per unit up to which a unit's loop over its words is unrolled (its elements then live
/// in registers): every GPU launch stays within it (64–256 units per block), while a device
/// with few units per cube (cubecl-cpu: one per core) keeps a loop instead of thousands of
/// copies of the element code.
const MAX_UNROLLED_WORDS: usize = 4;

/// The bits of `-∞`, the first bound of every block.
const NEG_INFINITY_BITS: u32 = 0xff80_0000;

#[cube]
fn is_finite(x: f32) -> bool {
    (u32::reinterpret(x) & ABS_MASK) < INFINITY_BITS
}

#[cube]
fn abs_bits(x: f32) -> u32 {
    u32::reinterpret(x) & ABS_MASK
}

/// `rule::random_bits`: the integer hash of `index ^ key` with `rule::HASH_MULTIPLIERS`. A copy,
/// because the CPU twin's multiplies must say `wrapping_mul` (a `#[cube]` function is plain Rust
/// too, where `*` would panic on overflow in debug builds) and `#[cube]` code has no such method;
/// `the_kernels_round_stochastically_as_the_cpu_twin_does` (`backend/cube/mod.rs`) compares the
/// two on wgpu.
#[cube]
fn random_bits(key: u32, index: u32) -> u32 {
    let mut x = index ^ key;
    x ^= x >> 16u32;
    x *= comptime![HASH_MULTIPLIERS[0]];
    x ^= x >> 15u32;
    x *= comptime![HASH_MULTIPLIERS[1]];
    x ^ (x >> 16u32)
}

/// `rule::round_to_bf16_stochastically` (the add wraps, as `wrapping_add` does there).
#[cube]
fn round_to_bf16_stochastically(x: f32, random: u32) -> f32 {
    f32::reinterpret((u32::reinterpret(x) + (random >> 16u32)) & BF16_MASK)
}

/// The absmax of the largest `bits(|x|)`, NaN made canonical (`rule::absmax_from_bits`).
#[cube]
fn absmax_from_bits(bits: u32) -> f32 {
    f32::reinterpret(select(bits > INFINITY_BITS, CANONICAL_NAN_BITS, bits))
}

/// Copies the 256 decode values of the map at `table` into `values[slot · 256 …]`.
#[cube]
fn stage_values(tables: &[u32], table: u32, values: &mut [f32], #[comptime] slot: usize, #[comptime] units: usize) {
    let mut k = UNIT_POS as usize;
    while k < MAP_LEN {
        values[comptime![slot * MAP_LEN] + k] = f32::reinterpret(tables[table as usize + k]);
        k += units;
    }
}

/// Writes the bounds of a block of absmax `scale` under the map at `table` (`encode::BOUNDS`:
/// `-∞`, every `midpoint · scale`, `+∞`, `+∞`) into `bounds[slot · BOUNDS …]`.
#[cube]
fn stage_bounds(
    tables: &[u32],
    table: u32,
    scale: f32,
    bounds: &mut [f32],
    #[comptime] slot: usize,
    #[comptime] units: usize,
) {
    let mut k = UNIT_POS as usize;
    while k < BOUNDS {
        let inside = k > 0 && k < MAP_LEN;
        let midpoint = f32::reinterpret(tables[table as usize + MIDPOINTS + select(inside, k, 1usize) - 1]);
        let infinity = f32::reinterpret(select(k == 0, NEG_INFINITY_BITS, INFINITY_BITS));
        bounds[comptime![slot * BOUNDS] + k] = select(inside, midpoint * scale, infinity);
        k += units;
    }
}

/// The maximum over the cube of each active slot's value, `shared` holding `3 · units` words.
#[cube]
fn cube_max(
    shared: &mut [u32],
    values: (u32, u32, u32),
    #[comptime] active: (bool, bool, bool),
    #[comptime] units: usize,
) -> (u32, u32, u32) {
    let me = UNIT_POS as usize;
    let (a, b, c) = values;
    if comptime![active.0] {
        shared[me] = a;
    }
    if comptime![active.1] {
        shared[comptime![units] + me] = b;
    }
    if comptime![active.2] {
        shared[comptime![2 * units] + me] = c;
    }
    sync_cube();
    #[unroll]
    for level in 0..comptime![units.trailing_zeros() as usize] {
        let stride = comptime![units >> (level + 1)];
        if me < stride {
            if comptime![active.0] {
                shared[me] = max(shared[me], shared[me + stride]);
            }
            if comptime![active.1] {
                let at = comptime![units] + me;
                shared[at] = max(shared[at], shared[at + stride]);
            }
            if comptime![active.2] {
                let at = comptime![2 * units] + me;
                shared[at] = max(shared[at], shared[at + stride]);
            }
        }
        sync_cube();
    }
    (shared[0], shared[comptime![units]], shared[comptime![2 * units]])
}

#[cube]
fn max(a: u32, b: u32) -> u32 {
    select(a > b, a, b)
}

/// The code of `x` in a block of absmax `scale`, or the zero code when the block is degenerate
/// (absmax 0 or not finite).
#[allow(clippy::too_many_arguments)]
#[cube]
fn encode_in_block(
    bounds: &[f32],
    tables: &[u32],
    table: u32,
    zero_code: u32,
    scale_bits: u32,
    x: f32,
    #[comptime] slot: usize,
) -> u32 {
    let degenerate = scale_bits == 0 || scale_bits >= INFINITY_BITS;
    // A positive float's bits order as the float does.
    let settled = scale_bits >= tables[table as usize + SETTLED] && scale_bits <= tables[table as usize + SETTLED + 1];
    let inverse = 1.0f32 / f32::reinterpret(scale_bits);
    let code = encode_code(
        bounds,
        comptime![slot * BOUNDS],
        tables,
        table as usize + GUESSES,
        x,
        u32::reinterpret(x * inverse),
        settled,
    );
    select(degenerate, zero_code, code)
}

/// The scale bits of element `i` of a rank-1 state of `columns` columns under the norms `rows`
/// and `cols` (`rule::rank1_scale_bits`).
#[cube]
fn rank1_scale_bits(rows: &[f32], cols: &[f32], i: usize, columns: usize) -> u32 {
    let row = abs_bits(rows[i / columns]);
    let col = abs_bits(cols[i % columns]);
    select(row < col, row, col)
}

/// A code's `value` times the scale of bits `scale_bits`, the canonical NaN when the scale is
/// not finite (`rule::decode_scaled`).
#[cube]
fn decode_scaled(value: f32, scale_bits: u32) -> f32 {
    select(scale_bits >= INFINITY_BITS, f32::reinterpret(CANONICAL_NAN_BITS), value * f32::reinterpret(scale_bits))
}

/// The code of `x` under a scale of bits `scale_bits` by binary search over the thresholds of
/// the map at `table` (`rule::encode_scaled`): `code_bits` comparisons against
/// `midpoint · scale`; `zero_code` when the scale is 0 or not finite.
#[cube]
fn encode_scaled(tables: &[u32], table: u32, zero_code: u32, x: f32, scale_bits: u32, #[comptime] code_bits: u32) -> u32 {
    let scale = f32::reinterpret(scale_bits);
    let mut code = 0u32;
    #[unroll]
    for s in 0..code_bits {
        let step = comptime![(1u32 << (code_bits - 1)) >> s];
        let midpoint = f32::reinterpret(tables[table as usize + MIDPOINTS + (code + step - 1) as usize]);
        code += select(x > midpoint * scale, step, 0u32);
    }
    select(scale_bits == 0 || scale_bits >= INFINITY_BITS, zero_code, code)
}

/// Sums `direction2` and `param2` over the cube into `sums[2·block]` and `sums[2·block + 1]`.
#[cube]
fn write_norms(sums: &mut [f32], direction2: f32, param2: f32, #[comptime] units: usize) {
    let mut shared = Shared::<[f32]>::new_slice(comptime![2 * units]);
    let me = UNIT_POS as usize;
    shared[me] = direction2;
    shared[comptime![units] + me] = param2;
    sync_cube();
    #[unroll]
    for level in 0..comptime![units.trailing_zeros() as usize] {
        let stride = comptime![units >> (level + 1)];
        if me < stride {
            shared[me] += shared[me + stride];
            let at = comptime![units] + me;
            shared[at] += shared[at + stride];
        }
        sync_cube();
    }
    if UNIT_POS == 0 {
        sums[2 * CUBE_POS] = shared[0];
        sums[2 * CUBE_POS + 1] = shared[comptime![units]];
    }
}

/// Block-wise quantization: per block, the absmax reduced from the block (or read from `absmax`
/// with `given_absmax`), then every code.
#[cube(launch_unchecked, address_type = "dynamic")]
pub fn quantize_kernel<N: Size>(
    input: &[Vector<f32, N>],
    tables: &[u32],
    codes: &mut [u32],
    absmax: &mut [f32],
    len: usize,
    num_blocks: usize,
    table: u32,
    zero_code: u32,
    #[comptime] given_absmax: bool,
    #[comptime] block_size: usize,
    #[comptime] units: usize,
    #[comptime] code_bits: u32,
) {
    let block = CUBE_POS;
    if block >= num_blocks {
        terminate!();
    }
    let per_word = comptime![(32 / code_bits) as usize];
    let words_per_unit = comptime![block_size / per_word / units];
    let first_word = block * comptime![block_size / per_word] + UNIT_POS as usize;
    let total_words = len.div_ceil(per_word);
    let lanes = input.vector_size().comptime();
    let mut x = Array::<f32>::new(comptime![block_size / units]);
    let mut local_max = 0u32;
    #[unroll(words_per_unit <= MAX_UNROLLED_WORDS)]
    for j in 0..words_per_unit {
        let word = first_word + j * units;
        #[unroll]
        for v in 0..comptime![per_word / lanes] {
            let vector = word * comptime![per_word / lanes] + v;
            // `lanes` divides the length: a vector's elements are all in the tensor or all past it.
            let inside = vector * lanes < len;
            let mut loaded = Vector::<f32, N>::empty();
            if inside {
                loaded = input[vector];
            }
            #[unroll]
            for l in 0..lanes {
                let k = j * per_word + comptime![v * lanes + l];
                x[k] = 0.0;
                if inside {
                    x[k] = loaded.extract(l);
                    local_max = max(local_max, abs_bits(x[k]));
                }
            }
        }
    }
    let scale_bits = if comptime![given_absmax] {
        abs_bits(absmax[block])
    } else {
        let mut shared_max = Shared::<[u32]>::new_slice(comptime![3 * units]);
        let (reduced, _, _) = cube_max(&mut shared_max, (local_max, 0u32, 0u32), comptime![(true, false, false)], units);
        reduced
    };
    let scale = absmax_from_bits(scale_bits);
    if comptime![!given_absmax] {
        if UNIT_POS == 0 {
            absmax[block] = scale;
        }
    }
    let mut bounds = Shared::<[f32]>::new_slice(BOUNDS);
    stage_bounds(tables, table, scale, &mut bounds, 0usize, units);
    sync_cube();
    let canonical_bits = u32::reinterpret(scale);
    #[unroll(words_per_unit <= MAX_UNROLLED_WORDS)]
    for j in 0..words_per_unit {
        let word = first_word + j * units;
        if word < total_words {
            let mut packed = 0u32;
            #[unroll]
            for e in 0..per_word {
                let i = word * per_word + e;
                if i < len {
                    let code = encode_in_block(&bounds, tables, table, zero_code, canonical_bits, x[j * per_word + e], 0usize);
                    packed |= code << comptime![code_bits * e as u32];
                }
            }
            codes[word] = packed;
        }
    }
}

/// Dequantization: `values[code] · absmax`, the canonical NaN for a block whose absmax is not
/// finite.
#[cube(launch_unchecked, address_type = "dynamic")]
pub fn dequantize_kernel<N: Size>(
    codes: &[u32],
    absmax: &[f32],
    tables: &[u32],
    output: &mut [Vector<f32, N>],
    len: usize,
    num_blocks: usize,
    table: u32,
    #[comptime] block_size: usize,
    #[comptime] units: usize,
    #[comptime] code_bits: u32,
) {
    let block = CUBE_POS;
    if block >= num_blocks {
        terminate!();
    }
    let mut values = Shared::<[f32]>::new_slice(MAP_LEN);
    stage_values(tables, table, &mut values, 0usize, units);
    sync_cube();
    let per_word = comptime![(32 / code_bits) as usize];
    let lanes = output.vector_size().comptime();
    let mask = comptime![(1u32 << code_bits) - 1];
    let words_per_unit = comptime![block_size / per_word / units];
    let first_word = block * comptime![block_size / per_word] + UNIT_POS as usize;
    let total_words = len.div_ceil(per_word);
    let scale = absmax[block];
    let non_finite = abs_bits(scale) >= INFINITY_BITS;
    let nan = f32::reinterpret(CANONICAL_NAN_BITS);
    #[unroll(words_per_unit <= MAX_UNROLLED_WORDS)]
    for j in 0..words_per_unit {
        let word = first_word + j * units;
        if word < total_words {
            let packed = codes[word];
            #[unroll]
            for v in 0..comptime![per_word / lanes] {
                let vector = word * comptime![per_word / lanes] + v;
                if vector * lanes < len {
                    let mut decoded = Vector::<f32, N>::empty();
                    #[unroll]
                    for l in 0..lanes {
                        let code = (packed >> comptime![code_bits * (v * lanes + l) as u32]) & mask;
                        decoded.insert(l, select(non_finite, nan, values[code as usize] * scale));
                    }
                    output[vector] = decoded;
                }
            }
        }
    }
}

/// The fused optimizer step in one pass: each unit reads its elements' parameter, gradient and
/// states once, keeps the updated states in registers while the cube reduces each block-wise
/// state's new absmax, then writes the parameter, `Full` states, codes and absmax once. With
/// [`Pass::Norms`] the same update is computed and only its norms are written, to `sums`.
/// Parameters and gradients are read and written in their own float type `P` (`f32`, `f16`,
/// `bf16`: `dtype`); the arithmetic is `f32`.
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked, address_type = "dynamic")]
pub fn fused_step_kernel<P: Float, N: Size>(
    param: &mut [Vector<P, N>],
    grad: &[Vector<P, N>],
    words1: &mut [u32],
    floats1: &mut [f32],
    words2: &mut [u32],
    floats2: &mut [f32],
    words3: &mut [u32],
    floats3: &mut [f32],
    tables: &[u32],
    grad_scale: &[f32],
    update_scale: &[f32],
    skipped: &mut [Atomic<u32>],
    sums: &mut [f32],
    rank1_rows: &[f32],
    rank1_cols: &[f32],
    next_rows: &mut [Atomic<u32>],
    next_cols: &mut [Atomic<u32>],
    columns: usize,
    len: usize,
    num_blocks: usize,
    h: &StepScalars,
    maps: &SlotMaps,
    #[comptime] layout: StepLayout,
    #[define(P)] _dtype: ElemType,
) {
    let block = CUBE_POS;
    if block >= num_blocks {
        terminate!();
    }
    let step = comptime![layout.pass == Pass::Step];
    let norms = comptime![layout.pass == Pass::Norms];
    let units = comptime![layout.units];
    let code_bits = comptime![layout.code_bits];
    let per_word = comptime![(32 / layout.code_bits) as usize];
    let lanes = param.vector_size().comptime();
    let mask = comptime![(1u32 << layout.code_bits) - 1];
    let words_per_unit = comptime![layout.block_size / per_word / layout.units];
    let q1 = comptime![layout.slots[0] == SlotKind::Blockwise];
    let q2 = comptime![layout.slots[1] == SlotKind::Blockwise];
    let q3 = comptime![layout.slots[2] == SlotKind::Blockwise];
    let f1 = comptime![layout.slots[0] == SlotKind::Full];
    let f2 = comptime![layout.slots[1] == SlotKind::Full];
    let f3 = comptime![layout.slots[2] == SlotKind::Full];
    let r1 = comptime![layout.slots[0] == SlotKind::Rank1];
    let r2 = comptime![layout.slots[1] == SlotKind::Rank1];
    let r3 = comptime![layout.slots[2] == SlotKind::Rank1];
    let coded1 = comptime![q1 || r1];
    let coded2 = comptime![q2 || r2];
    let coded3 = comptime![q3 || r3];
    let first_word = block * comptime![layout.block_size / per_word] + UNIT_POS as usize;
    let total_words = len.div_ceil(per_word);

    let mut values = Shared::<[f32]>::new_slice(comptime![3 * MAP_LEN]);
    if coded1 {
        stage_values(tables, maps.table1, &mut values, 0usize, units);
    }
    if coded2 {
        stage_values(tables, maps.table2, &mut values, 1usize, units);
    }
    if coded3 {
        stage_values(tables, maps.table3, &mut values, 2usize, units);
    }
    if comptime![coded1 || coded2 || coded3] {
        sync_cube();
    }
    let mut g_scale = 1.0f32;
    if comptime![layout.grad_scaled] {
        g_scale = grad_scale[0];
    }
    let mut lr = h.lr;
    if comptime![layout.update_scaled] {
        lr = h.lr * update_scale[0];
    }
    let mut old1 = 0.0f32;
    let mut old2 = 0.0f32;
    let mut old3 = 0.0f32;
    if q1 {
        old1 = floats1[block];
    }
    if q2 {
        old2 = floats2[block];
    }
    if q3 {
        old3 = floats3[block];
    }

    let mut n1 = Array::<f32>::new(comptime![layout.block_size / layout.units]);
    let mut n2 = Array::<f32>::new(comptime![layout.block_size / layout.units]);
    let mut n3 = Array::<f32>::new(comptime![layout.block_size / layout.units]);
    let mut max1 = 0u32;
    let mut max2 = 0u32;
    let mut max3 = 0u32;
    let mut local_skipped = 0u32;
    let mut direction2 = 0.0f32;
    let mut run_row = 0usize;
    let mut run_max = 0u32;
    let mut run_open = false;
    let mut param2 = 0.0f32;
    #[unroll(words_per_unit <= MAX_UNROLLED_WORDS)]
    for j in 0..words_per_unit {
        let word = first_word + j * units;
        let mut w1 = 0u32;
        let mut w2 = 0u32;
        let mut w3 = 0u32;
        if word < total_words {
            if coded1 {
                w1 = words1[word];
            }
            if coded2 {
                w2 = words2[word];
            }
            if coded3 {
                w3 = words3[word];
            }
        }
        // The parameter and gradient in vectors of `lanes` elements, a word's worth or a part
        // of it. `lanes` divides the length: a vector's elements are all in the tensor or all
        // past it.
        #[unroll]
        for v in 0..comptime![per_word / lanes] {
            let vector = word * comptime![per_word / lanes] + v;
            let inside = vector * lanes < len;
            let mut loaded = Vector::<P, N>::empty();
            let mut gradient = Vector::<P, N>::empty();
            if inside {
                loaded = param[vector];
                gradient = grad[vector];
            }
            let mut new_param = loaded;
            #[unroll]
            for l in 0..lanes {
                let e = comptime![v * lanes + l];
                let i = word * per_word + e;
                let k = j * per_word + e;
                let shift = comptime![code_bits * e as u32];
                if inside {
                    let mut s1 = 0.0f32;
                    let mut s2 = 0.0f32;
                    let mut s3 = 0.0f32;
                    if q1 {
                        s1 = values[((w1 >> shift) & mask) as usize] * old1;
                    }
                    if f1 {
                        s1 = floats1[i];
                    }
                    if r1 {
                        let bits = rank1_scale_bits(rank1_rows, rank1_cols, i, columns);
                        s1 = decode_scaled(values[((w1 >> shift) & mask) as usize], bits);
                    }
                    if q2 {
                        s2 = values[comptime![MAP_LEN] + ((w2 >> shift) & mask) as usize] * old2;
                    }
                    if f2 {
                        s2 = floats2[i];
                    }
                    if r2 {
                        let bits = rank1_scale_bits(rank1_rows, rank1_cols, i, columns);
                        s2 = decode_scaled(values[comptime![MAP_LEN] + ((w2 >> shift) & mask) as usize], bits);
                    }
                    if q3 {
                        s3 = values[comptime![2 * MAP_LEN] + ((w3 >> shift) & mask) as usize] * old3;
                    }
                    if f3 {
                        s3 = floats3[i];
                    }
                    if r3 {
                        let bits = rank1_scale_bits(rank1_rows, rank1_cols, i, columns);
                        s3 = decode_scaled(values[comptime![2 * MAP_LEN] + ((w3 >> shift) & mask) as usize], bits);
                    }
                    let stored = loaded.extract(l);
                    let p = f32::cast_from(stored);
                    let g = f32::cast_from(gradient.extract(l)) * g_scale;
                    let u = update_element(h, lr, p, g, s1, s2, s3, comptime![layout.rule]);
                    let applied = is_finite(g) && is_finite(u.p) && is_finite(u.s1) && is_finite(u.s2) && is_finite(u.s3);
                    if comptime![step] {
                        let mut written = u.p;
                        if comptime![layout.stochastic_bf16] {
                            written = round_to_bf16_stochastically(u.p, random_bits(h.rounding_key, u32::cast_from(i)));
                        }
                        new_param.insert(l, select(applied, P::cast_from(written), stored));
                        local_skipped += select(applied, 0u32, 1u32);
                        let a = select(applied, u.s1, s1);
                        let b = select(applied, u.s2, s2);
                        let c = select(applied, u.s3, s3);
                        if coded1 {
                            n1[k] = a;
                        }
                        if q1 {
                            max1 = max(max1, abs_bits(a));
                        }
                        if f1 {
                            floats1[i] = a;
                        }
                        if coded2 {
                            n2[k] = b;
                        }
                        if q2 {
                            max2 = max(max2, abs_bits(b));
                        }
                        if f2 {
                            floats2[i] = b;
                        }
                        if coded3 {
                            n3[k] = c;
                        }
                        if q3 {
                            max3 = max(max3, abs_bits(c));
                        }
                        if f3 {
                            floats3[i] = c;
                        }
                    } else if comptime![norms] {
                        let direction = select(applied, u.direction, 0.0f32);
                        direction2 += direction * direction;
                        param2 += p * p;
                    } else {
                        let mut kept = 0.0f32;
                        if r1 {
                            kept = select(applied, u.s1, s1);
                        }
                        if r2 {
                            kept = select(applied, u.s2, s2);
                        }
                        if r3 {
                            kept = select(applied, u.s3, s3);
                        }
                        let bits = abs_bits(kept);
                        // A word's elements are consecutive, mostly of one row: one atomic per row
                        // run instead of one per element on the same address.
                        let row = i / columns;
                        if run_open && row != run_row {
                            next_rows[run_row].fetch_max(run_max);
                            run_max = 0u32;
                        }
                        run_row = row;
                        run_open = true;
                        run_max = max(run_max, bits);
                        next_cols[i % columns].fetch_max(bits);
                    }
                }
            }
            if comptime![step] {
                if inside {
                    param[vector] = new_param;
                }
            }
        }
        if comptime![!step && !norms] {
            if run_open {
                next_rows[run_row].fetch_max(run_max);
                run_open = false;
                run_max = 0u32;
            }
        }
    }
    if comptime![norms] {
        write_norms(sums, direction2, param2, units);
    }
    if local_skipped > 0 {
        // A 64-bit count in [low, high] words (rule::add_to_count): the add that wraps the low
        // word carries into the high one.
        let before = skipped[0].fetch_add(local_skipped);
        if before > 0xFFFF_FFFFu32 - local_skipped {
            skipped[1].fetch_add(1u32);
        }
    }

    if comptime![step && (coded1 || coded2 || coded3)] {
        let mut new1 = 0u32;
        let mut new2 = 0u32;
        let mut new3 = 0u32;
        if comptime![q1 || q2 || q3] {
            let mut shared_max = Shared::<[u32]>::new_slice(comptime![3 * layout.units]);
            let (a, b, c) = cube_max(&mut shared_max, (max1, max2, max3), comptime![(q1, q2, q3)], units);
            new1 = a;
            new2 = b;
            new3 = c;
        }
        let scale1 = absmax_from_bits(new1);
        let scale2 = absmax_from_bits(new2);
        let scale3 = absmax_from_bits(new3);
        let mut bounds = Shared::<[f32]>::new_slice(comptime![3 * BOUNDS]);
        if q1 {
            stage_bounds(tables, maps.table1, scale1, &mut bounds, 0usize, units);
        }
        if q2 {
            stage_bounds(tables, maps.table2, scale2, &mut bounds, 1usize, units);
        }
        if q3 {
            stage_bounds(tables, maps.table3, scale3, &mut bounds, 2usize, units);
        }
        if UNIT_POS == 0 {
            if q1 {
                floats1[block] = scale1;
            }
            if q2 {
                floats2[block] = scale2;
            }
            if q3 {
                floats3[block] = scale3;
            }
        }
        if comptime![q1 || q2 || q3] {
            sync_cube();
        }
        let bits1 = u32::reinterpret(scale1);
        let bits2 = u32::reinterpret(scale2);
        let bits3 = u32::reinterpret(scale3);
        #[unroll(words_per_unit <= MAX_UNROLLED_WORDS)]
        for j in 0..words_per_unit {
            let word = first_word + j * units;
            if word < total_words {
                let mut packed1 = 0u32;
                let mut packed2 = 0u32;
                let mut packed3 = 0u32;
                #[unroll]
                for e in 0..per_word {
                    let i = word * per_word + e;
                    let k = j * per_word + e;
                    let shift = comptime![code_bits * e as u32];
                    if i < len {
                        if q1 {
                            packed1 |= encode_in_block(&bounds, tables, maps.table1, maps.zero1, bits1, n1[k], 0usize) << shift;
                        }
                        if q2 {
                            packed2 |= encode_in_block(&bounds, tables, maps.table2, maps.zero2, bits2, n2[k], 1usize) << shift;
                        }
                        if q3 {
                            packed3 |= encode_in_block(&bounds, tables, maps.table3, maps.zero3, bits3, n3[k], 2usize) << shift;
                        }
                        if comptime![r1 || r2 || r3] {
                            let row = next_rows[i / columns].load();
                            let col = next_cols[i % columns].load();
                            let scale_bits = select(row < col, row, col);
                            if r1 {
                                packed1 |= encode_scaled(tables, maps.table1, maps.zero1, n1[k], scale_bits, code_bits) << shift;
                            }
                            if r2 {
                                packed2 |= encode_scaled(tables, maps.table2, maps.zero2, n2[k], scale_bits, code_bits) << shift;
                            }
                            if r3 {
                                packed3 |= encode_scaled(tables, maps.table3, maps.zero3, n3[k], scale_bits, code_bits) << shift;
                            }
                        }
                    }
                }
                if coded1 {
                    words1[word] = packed1;
                }
                if coded2 {
                    words2[word] = packed2;
                }
                if coded3 {
                    words3[word] = packed3;
                }
            }
        }
    }
}
