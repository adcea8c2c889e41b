//! The CubeCL kernels of the block-wise operations, one source for wgpu (Vulkan, Metal, DX12),
//! CUDA, ROCm and cubecl-cpu. Their CPU twin is `cpu.rs`: the same rules, so the same bits.
//!
//! One cube handles one block. Each unit owns whole `u32` words (four codes), strided across
//! the block so that neighbouring units touch neighbouring words. The absmax is reduced in
//! shared memory (lavapipe and cubecl-cpu have no plane operations), the 255 thresholds
//! `midpoint * absmax` are scaled once per block into shared memory, and each code is found by
//! an 8-step binary search over them. The tensor length and block count are runtime scalars: a
//! kernel is compiled once per (block size, cube size), never per length.

use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::tensor::DType;
use burn_cubecl::CubeBackend;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use cubecl::prelude::*;

use crate::block::{CODES_PER_WORD, num_words};
use crate::ext::{BlockwiseOps, PackedBlocks, StepBuffers, fused_step_families};
use crate::map::{MAP_LEN, MapKind};
use crate::rule::{self, ABS_MASK, CANONICAL_NAN_BITS, INFINITY_BITS};
use crate::step::{StepRule, StepScalars};

/// Most units per cube: within every device's limit (WebGPU guarantees 256).
const MAX_UNITS: usize = 256;

/// Units per cube for a block: one per word, at most [`MAX_UNITS`] (each then owns several).
pub fn units_per_block(block_size: usize) -> usize {
    (block_size / CODES_PER_WORD).min(MAX_UNITS)
}

/// A grid of one cube per block that fits the device's `max_cube_count` (x, y, z): cubes are
/// numbered linearly (`CUBE_POS`) and those past the last block exit at once.
///
/// `None` when even the full grid cannot hold that many blocks.
pub fn block_grid(num_blocks: u64, max_cube_count: (u32, u32, u32)) -> Option<(u32, u32, u32)> {
    let (max_x, max_y, max_z) = (
        u64::from(max_cube_count.0),
        u64::from(max_cube_count.1),
        u64::from(max_cube_count.2),
    );
    let x = num_blocks.clamp(1, max_x);
    let y = num_blocks.div_ceil(x).clamp(1, max_y);
    let z = num_blocks.div_ceil(x * y).max(1);
    (z <= max_z).then_some((x as u32, y as u32, z as u32))
}

/// 64-bit addressing once an index can pass `u32::MAX`.
pub fn address_type(len: usize) -> AddressType {
    if len as u64 > u64::from(u32::MAX) - MAX_UNITS as u64 * CODES_PER_WORD as u64 {
        AddressType::U64
    } else {
        AddressType::U32
    }
}

fn grid(client: &Client, num_blocks: usize) -> CubeCount {
    let max = client.properties().hardware.max_cube_count;
    let (x, y, z) = block_grid(num_blocks as u64, (max.0, max.1, max.2))
        .unwrap_or_else(|| panic!("{num_blocks} blocks exceed the device's grid {max:?}"));
    CubeCount::Static(x, y, z)
}

#[cube(launch_unchecked, address_type = "dynamic")]
fn quantize_kernel(
    input: &[f32],
    midpoints: &[f32],
    codes: &mut [u32],
    absmax: &mut [f32],
    len: usize,
    num_blocks: usize,
    zero_code: u32,
    #[comptime] given_absmax: bool,
    #[comptime] block_size: usize,
    #[comptime] units: usize,
) {
    let block = CUBE_POS;
    if block >= num_blocks {
        terminate!();
    }
    let words_per_block = comptime![block_size / 4];
    let words_per_unit = comptime![block_size / 4 / units];
    let first_word = block * words_per_block + UNIT_POS as usize;
    let total_words = len.div_ceil(4);

    let max_bits = if given_absmax {
        u32::reinterpret(absmax[block]) & ABS_MASK
    } else {
        let mut local_max = 0u32;
        #[unroll]
        for j in 0..words_per_unit {
            let word = first_word + j * units;
            #[unroll]
            for e in 0..4usize {
                let i = word * 4 + e;
                if i < len {
                    let bits = u32::reinterpret(input[i]) & ABS_MASK;
                    local_max = select(bits > local_max, bits, local_max);
                }
            }
        }
        let mut shared_max = Shared::<[u32]>::new_slice(units);
        shared_max[UNIT_POS as usize] = local_max;
        sync_cube();
        reduce_max(&mut shared_max, 0usize, units)
    };
    let absmax_bits = select(max_bits > INFINITY_BITS, CANONICAL_NAN_BITS, max_bits);
    let scale = f32::reinterpret(absmax_bits);
    if !given_absmax {
        if UNIT_POS == 0 {
            absmax[block] = scale;
        }
    }

    let mut thresholds = Shared::<[f32]>::new_slice(255usize);
    let mut k = UNIT_POS as usize;
    while k < 255 {
        thresholds[k] = midpoints[k] * scale;
        k += units;
    }
    sync_cube();

    let degenerate = max_bits == 0 || max_bits >= INFINITY_BITS;
    #[unroll]
    for j in 0..words_per_unit {
        let word = first_word + j * units;
        if word < total_words {
            let mut packed = 0u32;
            #[unroll]
            for e in 0..4usize {
                let i = word * 4 + e;
                let mut code = 0u32;
                if i < len {
                    if degenerate {
                        code = zero_code;
                    } else {
                        let x = input[i];
                        #[unroll]
                        for s in 0..8u32 {
                            let step = comptime![128u32 >> s];
                            let threshold = thresholds[(code + step - 1) as usize];
                            code += select(x > threshold, step, 0u32);
                        }
                    }
                }
                packed |= code << (8 * e as u32);
            }
            codes[word] = packed;
        }
    }
}

#[cube(launch_unchecked, address_type = "dynamic")]
fn dequantize_kernel(
    codes: &[u32],
    absmax: &[f32],
    map: &[f32],
    output: &mut [f32],
    len: usize,
    num_blocks: usize,
    #[comptime] block_size: usize,
    #[comptime] units: usize,
) {
    let block = CUBE_POS;
    if block >= num_blocks {
        terminate!();
    }
    let words_per_block = comptime![block_size / 4];
    let words_per_unit = comptime![block_size / 4 / units];
    let first_word = block * words_per_block + UNIT_POS as usize;
    let total_words = len.div_ceil(4);
    let scale = absmax[block];
    let non_finite = (u32::reinterpret(scale) & ABS_MASK) >= INFINITY_BITS;
    let nan = f32::reinterpret(CANONICAL_NAN_BITS);
    #[unroll]
    for j in 0..words_per_unit {
        let word = first_word + j * units;
        if word < total_words {
            let packed = codes[word];
            #[unroll]
            for e in 0..4usize {
                let i = word * 4 + e;
                if i < len {
                    let code = (packed >> (8 * e as u32)) & 0xff;
                    output[i] = select(non_finite, nan, map[code as usize] * scale);
                }
            }
        }
    }
}


/// The runtime scalars of a step inside a kernel (see [`StepScalars`]), one launch argument
/// shared by the fused step and the update-norm pass.
#[derive(CubeLaunch, CubeType)]
struct Hyper {
    lr: f32,
    beta1: f32,
    beta2: f32,
    beta3: f32,
    alpha: f32,
    eps: f32,
    correction1: f32,
    correction2: f32,
    decay: f32,
    penalty: f32,
    first_step: u32,
    weight_decay: f32,
}

/// One element after the update: parameter, three state slots, the update direction and
/// whether it was applied.
#[derive(CubeType, Clone, Copy)]
struct Updated {
    p: f32,
    s1: f32,
    s2: f32,
    s3: f32,
    direction: f32,
    applied: bool,
}

#[cube]
fn is_finite(x: f32) -> bool {
    (u32::reinterpret(x) & ABS_MASK) < INFINITY_BITS
}

/// `step::update_element`, operation for operation.
// `decayed` and `direction` start as placeholders for the macro's benefit: every rule's arm
// assigns both.
#[allow(unused_assignments)]
#[cube]
fn update_element(
    h: &Hyper,
    lr: f32,
    p: f32,
    g_raw: f32,
    s1: f32,
    s2: f32,
    s3: f32,
    #[comptime] rule: StepRule,
) -> Updated {
    let g = g_raw + h.penalty * p;
    let mut n1 = s1;
    let mut n2 = s2;
    let mut n3 = s3;
    let mut decayed = p;
    let mut direction = 0.0f32;
    match comptime!(rule) {
        StepRule::Adam { amsgrad, cautious } => {
            n1 = h.beta1 * n1 + (1.0 - h.beta1) * g;
            n2 = h.beta2 * n2 + (1.0 - h.beta2) * (g * g);
            let mut v = n2;
            if comptime!(amsgrad) {
                n3 = select(n2 > n3, n2, n3);
                v = n3;
            }
            direction = n1 / (f32::sqrt(v) + h.eps);
            decayed = p * h.decay;
            if comptime!(cautious) {
                let same_sign = (p >= 0.0) == (n1 >= 0.0);
                decayed = select(same_sign, decayed, p);
            }
        }
        StepRule::Momentum { nesterov } => {
            n1 = select(h.first_step != 0, g, h.beta1 * n1 + h.beta3 * g);
            direction = n1;
            if comptime!(nesterov) {
                direction = g + h.beta1 * n1;
            }
        }
        StepRule::RmsProp { centered, momentum } => {
            n1 = h.beta1 * n1 + (1.0 - h.beta1) * (g * g);
            let mut avg = n1;
            if comptime!(centered) {
                if comptime!(momentum) {
                    n3 = h.beta1 * n3 + (1.0 - h.beta1) * g;
                    let difference = n1 - n3 * n3;
                    avg = select(difference > 0.0, difference, 0.0);
                } else {
                    n2 = h.beta1 * n2 + (1.0 - h.beta1) * g;
                    let difference = n1 - n2 * n2;
                    avg = select(difference > 0.0, difference, 0.0);
                }
            }
            direction = g / (f32::sqrt(avg) + h.eps);
            if comptime!(momentum) {
                n2 = h.beta3 * n2 + direction;
                direction = n2;
            }
        }
        StepRule::AdaGrad => {
            n1 = n1 + g * g;
            direction = g / (f32::sqrt(n1) + h.eps);
        }
        StepRule::Lion => {
            let c = h.beta1 * n1 + (1.0 - h.beta1) * g;
            direction = select(c > 0.0, 1.0f32, select(c < 0.0, -1.0f32, 0.0f32));
            n1 = h.beta2 * n1 + (1.0 - h.beta2) * g;
            decayed = p * h.decay;
        }
        StepRule::AdEMAMix => {
            n1 = h.beta1 * n1 + (1.0 - h.beta1) * g;
            n2 = h.beta3 * n2 + (1.0 - h.beta3) * g;
            n3 = h.beta2 * n3 + (1.0 - h.beta2) * (g * g);
            direction =
                (n1 / h.correction1 + h.alpha * n2) / (f32::sqrt(n3) / h.correction2 + h.eps);
            decayed = p * h.decay;
        }
        StepRule::Lamb => {
            n1 = h.beta1 * n1 + (1.0 - h.beta1) * g;
            n2 = h.beta2 * n2 + (1.0 - h.beta2) * (g * g);
            direction = (n1 / h.correction1) / (f32::sqrt(n2 / h.correction2) + h.eps)
                + h.weight_decay * p;
        }
    }
    let p_new = decayed - lr * direction;
    let applied = is_finite(g_raw)
        && is_finite(p_new)
        && is_finite(n1)
        && is_finite(n2)
        && is_finite(n3);
    Updated {
        p: select(applied, p_new, p),
        s1: select(applied, n1, s1),
        s2: select(applied, n2, s2),
        s3: select(applied, n3, s3),
        direction: select(applied, direction, 0.0f32),
        applied,
    }
}

/// Table offsets in the step's lookup buffer: per state slot, 256 map values then 255 midpoints.
const TABLE_STRIDE: usize = 2 * MAP_LEN - 1;

#[cube]
fn decode_code(tables: &[f32], #[comptime] slot: usize, word: u32, #[comptime] e: usize, scale: f32) -> f32 {
    let code = (word >> comptime![8 * e as u32]) & 0xff;
    tables[comptime![slot * TABLE_STRIDE] + code as usize] * scale
}

#[cube]
fn encode_code(thresholds: &[f32], #[comptime] slot: usize, x: f32, degenerate: bool, zero_code: u32) -> u32 {
    let mut code = 0u32;
    if degenerate {
        code = zero_code;
    } else {
        #[unroll]
        for s in 0..8u32 {
            let step = comptime![128u32 >> s];
            let threshold = thresholds[comptime![slot * 255] + (code + step - 1) as usize];
            code += select(x > threshold, step, 0u32);
        }
    }
    code
}

#[cube]
fn reduce_max(shared: &mut [u32], #[comptime] slot: usize, #[comptime] units: usize) -> u32 {
    let levels = comptime![units.trailing_zeros() as usize];
    let base = comptime![slot * units];
    #[unroll]
    for level in 0..levels {
        let stride = comptime![units >> (level + 1)];
        if (UNIT_POS as usize) < stride {
            let other = shared[base + UNIT_POS as usize + stride];
            let mine = shared[base + UNIT_POS as usize];
            shared[base + UNIT_POS as usize] = select(other > mine, other, mine);
        }
        sync_cube();
    }
    shared[base]
}

/// The fused step: one cube per block. Pass 1 updates every owned element in registers to find
/// each state's new absmax (reduced in shared memory); pass 2 recomputes the same update (the
/// same operations on the same inputs, hence the same bits), writes the parameter and encodes
/// the states against thresholds scaled by the new absmax. Nothing of O(n) is written but the
/// parameter, codes and absmax; state slots past `num_states` are not touched.
#[cube(launch_unchecked, address_type = "dynamic")]
fn fused_step_kernel(
    param: &mut [f32],
    grad: &[f32],
    codes1: &mut [u32],
    absmax1: &mut [f32],
    codes2: &mut [u32],
    absmax2: &mut [f32],
    codes3: &mut [u32],
    absmax3: &mut [f32],
    tables: &[f32],
    grad_scale: &[f32],
    update_scale: &[f32],
    skipped: &mut [Atomic<u32>],
    len: usize,
    num_blocks: usize,
    h: &Hyper,
    zero_code1: u32,
    zero_code2: u32,
    zero_code3: u32,
    #[comptime] rule: StepRule,
    #[comptime] num_states: usize,
    #[comptime] block_size: usize,
    #[comptime] units: usize,
) {
    let block = CUBE_POS;
    if block >= num_blocks {
        terminate!();
    }
    let words_per_block = comptime![block_size / 4];
    let words_per_unit = comptime![block_size / 4 / units];
    let first_word = block * words_per_block + UNIT_POS as usize;
    let total_words = len.div_ceil(4);
    let scale = grad_scale[0];
    let lr = h.lr * update_scale[0];

    let old1 = absmax1[block];
    let mut old2 = 0.0f32;
    let mut old3 = 0.0f32;
    if comptime![num_states > 1] {
        old2 = absmax2[block];
    }
    if comptime![num_states > 2] {
        old3 = absmax3[block];
    }

    let mut max1 = 0u32;
    let mut max2 = 0u32;
    let mut max3 = 0u32;
    let mut local_skipped = 0u32;
    #[unroll]
    for j in 0..words_per_unit {
        let word = first_word + j * units;
        if word < total_words {
            let w1 = codes1[word];
            let mut w2 = 0u32;
            let mut w3 = 0u32;
            if comptime![num_states > 1] {
                w2 = codes2[word];
            }
            if comptime![num_states > 2] {
                w3 = codes3[word];
            }
            #[unroll]
            for e in 0..4usize {
                let i = word * 4 + e;
                if i < len {
                    let s1 = decode_code(tables, 0usize, w1, e, old1);
                    let mut s2 = 0.0f32;
                    let mut s3 = 0.0f32;
                    if comptime![num_states > 1] {
                        s2 = decode_code(tables, 1usize, w2, e, old2);
                    }
                    if comptime![num_states > 2] {
                        s3 = decode_code(tables, 2usize, w3, e, old3);
                    }
                    let u = update_element(h, lr, param[i], grad[i] * scale, s1, s2, s3, rule);
                    local_skipped += select(u.applied, 0u32, 1u32);
                    let b1 = u32::reinterpret(u.s1) & ABS_MASK;
                    let b2 = u32::reinterpret(u.s2) & ABS_MASK;
                    let b3 = u32::reinterpret(u.s3) & ABS_MASK;
                    max1 = select(b1 > max1, b1, max1);
                    max2 = select(b2 > max2, b2, max2);
                    max3 = select(b3 > max3, b3, max3);
                }
            }
        }
    }
    if local_skipped > 0 {
        // A 64-bit count in [low, high] words (rule::add_to_count): the add that wraps the low
        // word carries into the high one.
        let before = skipped[0].fetch_add(local_skipped);
        if before > 0xFFFF_FFFFu32 - local_skipped {
            skipped[1].fetch_add(1u32);
        }
    }

    let mut shared_max = Shared::<[u32]>::new_slice(comptime![3 * units]);
    shared_max[UNIT_POS as usize] = max1;
    shared_max[comptime![units] + UNIT_POS as usize] = max2;
    shared_max[comptime![2 * units] + UNIT_POS as usize] = max3;
    sync_cube();
    let new1 = reduce_max(&mut shared_max, 0usize, units);
    let new2 = reduce_max(&mut shared_max, 1usize, units);
    let new3 = reduce_max(&mut shared_max, 2usize, units);
    let scale1 = f32::reinterpret(new1);
    let scale2 = f32::reinterpret(new2);
    let scale3 = f32::reinterpret(new3);
    if UNIT_POS == 0 {
        absmax1[block] = scale1;
        if comptime![num_states > 1] {
            absmax2[block] = scale2;
        }
        if comptime![num_states > 2] {
            absmax3[block] = scale3;
        }
    }

    let mut thresholds = Shared::<[f32]>::new_slice(comptime![3usize * 255]);
    let mut k = UNIT_POS as usize;
    while k < 255 {
        thresholds[k] = tables[MAP_LEN + k] * scale1;
        if comptime![num_states > 1] {
            thresholds[255 + k] = tables[comptime![TABLE_STRIDE + MAP_LEN] + k] * scale2;
        }
        if comptime![num_states > 2] {
            thresholds[510 + k] = tables[comptime![2 * TABLE_STRIDE + MAP_LEN] + k] * scale3;
        }
        k += units;
    }
    sync_cube();

    let degenerate1 = new1 == 0;
    let degenerate2 = new2 == 0;
    let degenerate3 = new3 == 0;
    #[unroll]
    for j in 0..words_per_unit {
        let word = first_word + j * units;
        if word < total_words {
            let w1 = codes1[word];
            let mut w2 = 0u32;
            let mut w3 = 0u32;
            if comptime![num_states > 1] {
                w2 = codes2[word];
            }
            if comptime![num_states > 2] {
                w3 = codes3[word];
            }
            let mut packed1 = 0u32;
            let mut packed2 = 0u32;
            let mut packed3 = 0u32;
            #[unroll]
            for e in 0..4usize {
                let i = word * 4 + e;
                if i < len {
                    let s1 = decode_code(tables, 0usize, w1, e, old1);
                    let mut s2 = 0.0f32;
                    let mut s3 = 0.0f32;
                    if comptime![num_states > 1] {
                        s2 = decode_code(tables, 1usize, w2, e, old2);
                    }
                    if comptime![num_states > 2] {
                        s3 = decode_code(tables, 2usize, w3, e, old3);
                    }
                    let u = update_element(h, lr, param[i], grad[i] * scale, s1, s2, s3, rule);
                    param[i] = u.p;
                    let shift = comptime![8 * e as u32];
                    packed1 |= encode_code(&thresholds, 0usize, u.s1, degenerate1, zero_code1) << shift;
                    if comptime![num_states > 1] {
                        packed2 |= encode_code(&thresholds, 1usize, u.s2, degenerate2, zero_code2) << shift;
                    }
                    if comptime![num_states > 2] {
                        packed3 |= encode_code(&thresholds, 2usize, u.s3, degenerate3, zero_code3) << shift;
                    }
                }
            }
            codes1[word] = packed1;
            if comptime![num_states > 1] {
                codes2[word] = packed2;
            }
            if comptime![num_states > 2] {
                codes3[word] = packed3;
            }
        }
    }
}

/// The first pass of LAMB and LARS: one cube per block sums `direction²` and `p²` of the update
/// the fused step would apply (states decoded, nothing written) and writes them to
/// `sums[2·block]`, `sums[2·block + 1]`. At most two states.
#[cube(launch_unchecked, address_type = "dynamic")]
fn update_norms_kernel(
    param: &[f32],
    grad: &[f32],
    codes1: &[u32],
    absmax1: &[f32],
    codes2: &[u32],
    absmax2: &[f32],
    tables: &[f32],
    grad_scale: &[f32],
    sums: &mut [f32],
    len: usize,
    num_blocks: usize,
    h: &Hyper,
    #[comptime] rule: StepRule,
    #[comptime] num_states: usize,
    #[comptime] block_size: usize,
    #[comptime] units: usize,
) {
    let block = CUBE_POS;
    if block >= num_blocks {
        terminate!();
    }
    let words_per_block = comptime![block_size / 4];
    let words_per_unit = comptime![block_size / 4 / units];
    let first_word = block * words_per_block + UNIT_POS as usize;
    let total_words = len.div_ceil(4);
    let scale = grad_scale[0];
    let old1 = absmax1[block];
    let mut old2 = 0.0f32;
    if comptime![num_states > 1] {
        old2 = absmax2[block];
    }
    let mut direction2 = 0.0f32;
    let mut param2 = 0.0f32;
    #[unroll]
    for j in 0..words_per_unit {
        let word = first_word + j * units;
        if word < total_words {
            let w1 = codes1[word];
            let mut w2 = 0u32;
            if comptime![num_states > 1] {
                w2 = codes2[word];
            }
            #[unroll]
            for e in 0..4usize {
                let i = word * 4 + e;
                if i < len {
                    let s1 = decode_code(tables, 0usize, w1, e, old1);
                    let mut s2 = 0.0f32;
                    if comptime![num_states > 1] {
                        s2 = decode_code(tables, 1usize, w2, e, old2);
                    }
                    let p = param[i];
                    let u = update_element(h, h.lr, p, grad[i] * scale, s1, s2, 0.0f32, rule);
                    direction2 += u.direction * u.direction;
                    param2 += p * p;
                }
            }
        }
    }
    let mut shared = Shared::<[f32]>::new_slice(comptime![2 * units]);
    shared[UNIT_POS as usize] = direction2;
    shared[comptime![units] + UNIT_POS as usize] = param2;
    sync_cube();
    let levels = comptime![units.trailing_zeros() as usize];
    #[unroll]
    for level in 0..levels {
        let stride = comptime![units >> (level + 1)];
        if (UNIT_POS as usize) < stride {
            let me = UNIT_POS as usize;
            shared[me] = shared[me] + shared[me + stride];
            shared[comptime![units] + me] =
                shared[comptime![units] + me] + shared[comptime![units] + me + stride];
        }
        sync_cube();
    }
    if UNIT_POS == 0 {
        sums[2 * block] = shared[0];
        sums[2 * block + 1] = shared[comptime![units]];
    }
}

/// The step scalars as the kernels' launch argument.
fn hyper_arg(s: &StepScalars) -> HyperLaunch {
    HyperLaunch::new(
        s.lr,
        s.beta1,
        s.beta2,
        s.beta3,
        s.alpha,
        s.eps,
        s.correction1,
        s.correction2,
        s.decay,
        s.penalty,
        s.first_step,
        s.weight_decay,
    )
}

fn upload(client: &Client, values: &[f32]) -> cubecl::server::Handle {
    client.create_from_slice(f32::as_bytes(values))
}

/// A contiguous tensor whose buffer this op may write: the input itself when unshared, else a copy.
fn writable(tensor: CubeTensor) -> CubeTensor {
    let tensor = into_contiguous(tensor);
    if tensor.can_mut() && tensor.is_contiguous_buffer() {
        tensor
    } else {
        tensor.copy()
    }
}

/// The 511-entry lookup table of each state's map (values, then midpoints), slot after slot.
fn step_tables(maps: &[MapKind]) -> Vec<f32> {
    let mut tables = Vec::with_capacity(3 * TABLE_STRIDE);
    for slot in 0..3 {
        let map = maps.get(slot).copied().unwrap_or(MapKind::DynamicSigned).map();
        tables.extend_from_slice(map.values());
        tables.extend_from_slice(&map.midpoints());
    }
    tables
}

fn update_norms(
    buffers: StepBuffers<CubeBackend>,
    grad: CubeTensor,
    grad_scale: CubeTensor,
    rule: StepRule,
    scalars: StepScalars,
    block_size: usize,
) -> CubeTensor {
    let param = into_contiguous(buffers.param);
    let grad = into_contiguous(grad);
    let grad_scale = into_contiguous(grad_scale);
    let states: Vec<(CubeTensor, CubeTensor)> = buffers
        .states
        .into_iter()
        .map(|state| (into_contiguous(state.codes), into_contiguous(state.absmax)))
        .collect();
    let maps = rule.state_maps(scalars.maps);
    assert!(maps.len() <= 2 && states.len() == maps.len(), "{rule:?}: the first pass takes 1 or 2 states");
    let len = param.meta.num_elements();
    let num_blocks = len.div_ceil(block_size);
    let client = param.client.clone();
    let words = num_words(len);
    let sums = empty_device_dtype(client.clone(), param.device.clone(), [2 * num_blocks].into(), DType::F32);
    let unused = || client.create_from_slice(u32::as_bytes(&[0]));
    // SAFETY (for the raw buffer arguments below): every handle is a live buffer of at least the
    // stated length in elements, of the element type the kernel declares.
    let slot = |k: usize| -> (BufferArg, BufferArg) {
        unsafe {
            match states.get(k) {
                Some((codes, absmax)) => (
                    BufferArg::from_raw_parts(codes.handle.clone(), words),
                    BufferArg::from_raw_parts(absmax.handle.clone(), num_blocks),
                ),
                None => (BufferArg::from_raw_parts(unused(), 1), BufferArg::from_raw_parts(unused(), 1)),
            }
        }
    };
    let (codes1, absmax1) = slot(0);
    let (codes2, absmax2) = slot(1);
    let tables = upload(&client, &step_tables(&maps));
    let units = units_per_block(block_size);
    if len > 0 {
        unsafe {
            update_norms_kernel::launch_unchecked(
                &client,
                grid(&client, num_blocks),
                CubeDim::new_1d(units as u32),
                address_type(len),
                BufferArg::from_raw_parts(param.handle.clone(), len),
                BufferArg::from_raw_parts(grad.handle.clone(), len),
                codes1,
                absmax1,
                codes2,
                absmax2,
                BufferArg::from_raw_parts(tables, 3 * TABLE_STRIDE),
                BufferArg::from_raw_parts(grad_scale.handle.clone(), 1),
                BufferArg::from_raw_parts(sums.handle.clone(), 2 * num_blocks),
                len,
                num_blocks,
                hyper_arg(&scalars),
                rule,
                maps.len(),
                block_size,
                units,
            );
        }
    }
    sums
}

fn fused_step(
    buffers: StepBuffers<CubeBackend>,
    grad: CubeTensor,
    grad_scale: CubeTensor,
    update_scale: CubeTensor,
    rule: StepRule,
    scalars: StepScalars,
    block_size: usize,
) -> StepBuffers<CubeBackend> {
    let param = writable(buffers.param);
    assert_eq!(param.dtype, DType::F32, "the fused step takes f32 parameters");
    let grad = into_contiguous(grad);
    let grad_scale = into_contiguous(grad_scale);
    let update_scale = into_contiguous(update_scale);
    let skipped = writable(buffers.skipped);
    let states: Vec<PackedBlocks<CubeBackend>> = buffers
        .states
        .into_iter()
        .map(|state| PackedBlocks {
            codes: writable(state.codes),
            absmax: writable(state.absmax),
        })
        .collect();
    let maps = rule.state_maps(scalars.maps);
    assert_eq!(states.len(), maps.len(), "{rule:?} takes {} states", maps.len());
    let len = param.meta.num_elements();
    let num_blocks = len.div_ceil(block_size);
    let client = param.client.clone();
    let words = num_words(len);
    let unused = || client.create_from_slice(u32::as_bytes(&[0]));
    // SAFETY (for the raw buffer arguments below): every handle is a live buffer of at least the
    // stated length in elements, of the element type the kernel declares.
    let slot = |k: usize| -> (BufferArg, BufferArg, u32) {
        unsafe { match states.get(k) {
            Some(state) => (
                BufferArg::from_raw_parts(state.codes.handle.clone(), words),
                BufferArg::from_raw_parts(state.absmax.handle.clone(), num_blocks),
                u32::from(maps[k].map().zero_code()),
            ),
            None => (
                BufferArg::from_raw_parts(unused(), 1),
                BufferArg::from_raw_parts(unused(), 1),
                0,
            ),
        } }
    };
    let (codes1, absmax1, zero_code1) = slot(0);
    let (codes2, absmax2, zero_code2) = slot(1);
    let (codes3, absmax3, zero_code3) = slot(2);
    let tables = upload(&client, &step_tables(&maps));
    let units = units_per_block(block_size);
    if len > 0 {
        unsafe {
            fused_step_kernel::launch_unchecked(
                &client,
                grid(&client, num_blocks),
                CubeDim::new_1d(units as u32),
                address_type(len),
                BufferArg::from_raw_parts(param.handle.clone(), len),
                BufferArg::from_raw_parts(grad.handle.clone(), len),
                codes1,
                absmax1,
                codes2,
                absmax2,
                codes3,
                absmax3,
                BufferArg::from_raw_parts(tables, 3 * TABLE_STRIDE),
                BufferArg::from_raw_parts(grad_scale.handle.clone(), 1),
                BufferArg::from_raw_parts(update_scale.handle.clone(), 1),
                BufferArg::from_raw_parts(skipped.handle.clone(), rule::COUNT_WORDS),
                len,
                num_blocks,
                hyper_arg(&scalars),
                zero_code1,
                zero_code2,
                zero_code3,
                rule,
                maps.len(),
                block_size,
                units,
            );
        }
    }
    StepBuffers { param, skipped, states }
}

/// Launches the quantize kernel: each block's absmax reduced and written, or, with
/// `given_absmax`, read from `absmax` (`blockwise_encode`).
fn launch_quantize(input: &CubeTensor, absmax: &CubeTensor, map: MapKind, block_size: usize, given_absmax: bool) -> CubeTensor {
    let len = input.meta.num_elements();
    let num_blocks = len.div_ceil(block_size);
    let client = input.client.clone();
    let codes = empty_device_dtype(client.clone(), input.device.clone(), [num_words(len)].into(), DType::U32);
    let code_map = map.map();
    let midpoints = upload(&client, &code_map.midpoints());
    let units = units_per_block(block_size);
    // SAFETY: every handle is a live buffer of at least the stated length in elements, of the
    // element type the kernel declares.
    unsafe {
        quantize_kernel::launch_unchecked(
            &client,
            grid(&client, num_blocks),
            CubeDim::new_1d(units as u32),
            address_type(len),
            BufferArg::from_raw_parts(input.handle.clone(), len),
            BufferArg::from_raw_parts(midpoints, MAP_LEN - 1),
            BufferArg::from_raw_parts(codes.handle.clone(), num_words(len)),
            BufferArg::from_raw_parts(absmax.handle.clone(), num_blocks),
            len,
            num_blocks,
            u32::from(code_map.zero_code()),
            given_absmax,
            block_size,
            units,
        );
    }
    codes
}

impl BlockwiseOps for CubeBackend {
    fn blockwise_quantize(
        input: FloatTensor<Self>,
        map: MapKind,
        block_size: usize,
    ) -> PackedBlocks<Self> {
        let input = into_contiguous(input);
        assert_eq!(input.dtype, DType::F32, "blockwise ops take f32 tensors");
        let num_blocks = input.meta.num_elements().div_ceil(block_size);
        let absmax =
            empty_device_dtype(input.client.clone(), input.device.clone(), [num_blocks].into(), DType::F32);
        let codes = launch_quantize(&input, &absmax, map, block_size, false);
        PackedBlocks { codes, absmax }
    }

    fn blockwise_encode(
        input: FloatTensor<Self>,
        absmax: FloatTensor<Self>,
        map: MapKind,
        block_size: usize,
    ) -> PackedBlocks<Self> {
        let input = into_contiguous(input);
        let absmax = into_contiguous(absmax);
        assert_eq!(input.dtype, DType::F32, "blockwise ops take f32 tensors");
        assert_eq!(absmax.meta.num_elements(), input.meta.num_elements().div_ceil(block_size), "one absmax per block");
        let codes = launch_quantize(&input, &absmax, map, block_size, true);
        PackedBlocks { codes, absmax }
    }

    fn blockwise_dequantize(
        codes: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        map: MapKind,
        block_size: usize,
        len: usize,
    ) -> FloatTensor<Self> {
        let codes = into_contiguous(codes);
        let absmax = into_contiguous(absmax);
        let num_blocks = len.div_ceil(block_size);
        let client = codes.client.clone();
        let output =
            empty_device_dtype(client.clone(), codes.device.clone(), [len].into(), DType::F32);
        let values = upload(&client, map.map().values());
        let units = units_per_block(block_size);
        unsafe {
            dequantize_kernel::launch_unchecked(
                &client,
                grid(&client, num_blocks),
                CubeDim::new_1d(units as u32),
                address_type(len),
                BufferArg::from_raw_parts(codes.handle.clone(), num_words(len)),
                BufferArg::from_raw_parts(absmax.handle.clone(), num_blocks),
                BufferArg::from_raw_parts(values, MAP_LEN),
                BufferArg::from_raw_parts(output.handle.clone(), len),
                len,
                num_blocks,
                block_size,
                units,
            );
        }
        output
    }

    fused_step_families!(fused_step, update_norms);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_own_whole_words() {
        for block in [64usize, 128, 256, 512, 1024, 2048, 4096] {
            let units = units_per_block(block);
            assert!(units <= MAX_UNITS && units.is_power_of_two());
            assert_eq!((block / CODES_PER_WORD) % units, 0);
        }
    }

    #[test]
    fn grids_hold_billions_of_elements_within_device_limits() {
        let webgpu = (65_535, 65_535, 65_535);
        for len in [1u64, 1 << 20, (1 << 31) + 7, 1 << 34, 3 << 36] {
            for block in [64u64, 256, 4096] {
                let blocks = len.div_ceil(block);
                let (x, y, z) = block_grid(blocks, webgpu).expect("fits");
                assert!(x <= 65_535 && y <= 65_535 && z <= 65_535);
                let cubes = u64::from(x) * u64::from(y) * u64::from(z);
                assert!(cubes >= blocks, "len {len} block {block}: {cubes} < {blocks}");
                assert!(cubes - blocks < u64::from(x) * u64::from(y), "few idle cubes");
            }
        }
        assert_eq!(block_grid(0, webgpu), Some((1, 1, 1)));
        assert_eq!(block_grid(u64::MAX, (16, 16, 16)), None);
    }

    #[test]
    fn long_tensors_use_64_bit_addresses() {
        assert_eq!(address_type(1 << 20), AddressType::U32);
        assert_eq!(address_type((1usize << 31) + 7), AddressType::U32);
        assert_eq!(address_type(1usize << 32), AddressType::U64);
        assert_eq!(address_type(3usize << 36), AddressType::U64);
    }
}
