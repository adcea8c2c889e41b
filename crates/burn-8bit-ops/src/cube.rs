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
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use cubecl::prelude::*;

use crate::block::{CODES_PER_WORD, num_words};
use crate::ext::{BlockwiseOps, PackedBlocks};
use crate::map::{MAP_LEN, MapKind};
use crate::rule::{ABS_MASK, CANONICAL_NAN_BITS, INFINITY_BITS};

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
    let levels = comptime![units.trailing_zeros() as usize];
    #[unroll]
    for level in 0..levels {
        let stride = comptime![units >> (level + 1)];
        if (UNIT_POS as usize) < stride {
            let other = shared_max[UNIT_POS as usize + stride];
            let mine = shared_max[UNIT_POS as usize];
            shared_max[UNIT_POS as usize] = select(other > mine, other, mine);
        }
        sync_cube();
    }
    let max_bits = shared_max[0];
    let absmax_bits = select(max_bits > INFINITY_BITS, CANONICAL_NAN_BITS, max_bits);
    let scale = f32::reinterpret(absmax_bits);
    if UNIT_POS == 0 {
        absmax[block] = scale;
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

fn upload(client: &Client, values: &[f32]) -> cubecl::server::Handle {
    client.create_from_slice(f32::as_bytes(values))
}

impl BlockwiseOps for CubeBackend {
    fn blockwise_quantize(
        input: FloatTensor<Self>,
        map: MapKind,
        block_size: usize,
    ) -> PackedBlocks<Self> {
        let input = into_contiguous(input);
        assert_eq!(input.dtype, DType::F32, "blockwise ops take f32 tensors");
        let len = input.meta.num_elements();
        let num_blocks = len.div_ceil(block_size);
        let client = input.client.clone();
        let codes = empty_device_dtype(
            client.clone(),
            input.device.clone(),
            [num_words(len)].into(),
            DType::U32,
        );
        let absmax = empty_device_dtype(
            client.clone(),
            input.device.clone(),
            [num_blocks].into(),
            DType::F32,
        );
        let code_map = map.map();
        let midpoints = upload(&client, &code_map.midpoints());
        let units = units_per_block(block_size);
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
                block_size,
                units,
            );
        }
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
