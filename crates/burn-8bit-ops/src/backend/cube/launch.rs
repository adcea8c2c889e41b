//! Launching the kernels: the grid of one cube per block, the buffers each kernel binds, and the
//! device-resident tables they read (uploaded once per device, not per call).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use burn::tensor::DType;
use burn_cubecl::{CubeBackend, CubeDevice};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::{empty_device_dtype, zeros_client};
use burn_cubecl::tensor::CubeTensor;
use cubecl::ir::FloatKind;
use cubecl::prelude::*;
use cubecl::server::Handle;

use super::kernels::{self, Pass, SlotKind, SlotMapsLaunch, StepLayout};
use crate::copies;
use crate::ext::{ParamDType, Rank1Norms, StateBuffer};
use crate::encode::{self, TABLE_STRIDE};
use crate::map::MapKind;
use crate::rule;
use crate::step::{StepRule, StepScalars};

/// Most units per cube: within every device's limit (WebGPU guarantees 256).
const MAX_UNITS: usize = 256;

/// Most codes in one word: eight 4-bit codes.
const MAX_CODES_PER_WORD: usize = 8;

/// Units per cube for a block of codes of `code_bits` bits: one per word, at most
/// [`MAX_UNITS`] and the device's `max_units_per_cube` (each then owns several words;
/// cubecl-cpu allows one unit per core), a power of two so that every unit owns as many words
/// as the next.
pub fn units_per_block(block_size: usize, code_bits: u32, max_units_per_cube: u32) -> usize {
    let device_max = 1usize << (max_units_per_cube.max(1).ilog2());
    (block_size / (32 / code_bits) as usize).min(MAX_UNITS).min(device_max)
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
    if len as u64 > u64::from(u32::MAX) - MAX_UNITS as u64 * MAX_CODES_PER_WORD as u64 {
        AddressType::U64
    } else {
        AddressType::U32
    }
}

/// The device's limit on units per cube; in this crate's tests, the one a test forced (as
/// cubecl-cpu's one unit per core), so that the kernels' loop over many words per unit runs on
/// the adapter the tests have.
fn max_units_per_cube(device_max: u32) -> u32 {
    #[cfg(test)]
    match tests::FORCED_MAX_UNITS.load(std::sync::atomic::Ordering::SeqCst) {
        0 => {}
        forced => return forced,
    }
    device_max
}

/// How one kernel over the blocks of a `len`-element tensor is launched.
pub struct BlockLaunch {
    pub client: Client,
    pub len: usize,
    pub num_blocks: usize,
    pub units: usize,
    pub count: CubeCount,
    pub dim: CubeDim,
    pub address: AddressType,
}

impl BlockLaunch {
    /// The launch over `len` elements in blocks of `block_size`, with codes of `code_bits` bits.
    pub fn new(tensor: &CubeTensor, len: usize, block_size: usize, code_bits: u32) -> Self {
        let client = tensor.client.clone();
        let num_blocks = len.div_ceil(block_size);
        let hardware = &client.properties().hardware;
        let max = hardware.max_cube_count;
        let (x, y, z) = block_grid(num_blocks as u64, (max.0, max.1, max.2))
            .unwrap_or_else(|| panic!("{num_blocks} blocks exceed the device's grid {max:?}"));
        let units = units_per_block(block_size, code_bits, max_units_per_cube(hardware.max_units_per_cube));
        Self {
            client,
            len,
            num_blocks,
            units,
            count: CubeCount::Static(x, y, z),
            dim: CubeDim::new_1d(units as u32),
            address: address_type(len),
        }
    }
}

/// Buffers every kernel on a device reads, made once per device: the tables of every map, a
/// `1.0` for an absent scale, and spares bound where a slot holds no words or floats, a step
/// writes no sums or has no rank-1 norms (the kernels never touch them).
pub struct DeviceTables {
    pub tables: Handle,
    pub one: Handle,
    pub spare_words: [Handle; 3],
    pub spare_floats: [Handle; 3],
    pub spare_sums: Handle,
    pub spare_norms: [Handle; 4],
}

impl DeviceTables {
    /// The tables of `tensor`'s device.
    pub fn of(tensor: &CubeTensor) -> Arc<DeviceTables> {
        static CACHE: OnceLock<Mutex<HashMap<CubeDevice, Arc<DeviceTables>>>> = OnceLock::new();
        let mut cache = CACHE.get_or_init(Default::default).lock().expect("the table cache is never poisoned");
        cache
            .entry(tensor.device.clone())
            .or_insert_with(|| {
                let client = &tensor.client;
                let tables: Vec<u32> = MapKind::ALL.into_iter().flat_map(encode::kernel_table).collect();
                let word = || client.create_from_slice(u32::as_bytes(&[0]));
                let float = || client.create_from_slice(f32::as_bytes(&[0.0]));
                Arc::new(DeviceTables {
                    tables: client.create_from_slice(u32::as_bytes(&tables)),
                    one: client.create_from_slice(f32::as_bytes(&[1.0])),
                    spare_words: [word(), word(), word()],
                    spare_floats: [float(), float(), float()],
                    spare_sums: float(),
                    spare_norms: [float(), float(), float(), float()],
                })
            })
            .clone()
    }

    /// The offset of `map`'s table.
    pub fn table(map: MapKind) -> u32 {
        let index = MapKind::ALL.iter().position(|&kind| kind == map).expect("listed");
        (index * TABLE_STRIDE) as u32
    }

    /// Length of the tables buffer in words.
    pub fn len() -> usize {
        MapKind::ALL.len() * TABLE_STRIDE
    }
}

/// A contiguous tensor whose buffer this op may write: the input itself when unshared, else a copy.
/// A buffer larger than the tensor (allocations are rounded up, e.g. the 8-byte skip counter)
/// is written in place too: the kernels touch its first elements only.
pub fn writable(tensor: CubeTensor) -> CubeTensor {
    let tensor = into_contiguous(tensor);
    if tensor.can_mut() {
        tensor
    } else {
        copies::count_shared_copy();
        tensor.copy()
    }
}

/// An `f32` buffer of `output`'s length whose old values may be discarded: `output` itself when
/// it is contiguous and its buffer unshared, a fresh buffer otherwise (never a copy of values
/// about to be overwritten).
pub fn overwritable(output: CubeTensor) -> CubeTensor {
    if !output.meta.is_tiled() && output.is_contiguous() && output.is_contiguous_buffer() && output.can_mut() {
        output
    } else {
        empty_f32(&output, output.meta.num_elements())
    }
}

/// An `f32` buffer of `len` elements on `like`'s device.
pub fn empty_f32(like: &CubeTensor, len: usize) -> CubeTensor {
    empty_device_dtype(like.client.clone(), like.device.clone(), [len].into(), DType::F32)
}

/// Runs the quantize kernel into fresh codes: each block's absmax reduced and written into
/// `absmax`, or, with `given_absmax`, read from it.
pub fn quantize(input: &CubeTensor, absmax: &CubeTensor, map: MapKind, block_size: usize, given_absmax: bool) -> CubeTensor {
    let len = input.meta.num_elements();
    let launch = BlockLaunch::new(input, len, block_size, map.bits());
    let device = DeviceTables::of(input);
    let words = map.num_words(len);
    let codes = empty_device_dtype(input.client.clone(), input.device.clone(), [words].into(), DType::U32);
    let lanes = vector_lanes(&launch.client, size_of::<f32>(), len, map.bits());
    // SAFETY: every handle is a live buffer of at least the stated length in elements (vectors
    // of `lanes` for the input), of the element type the kernel declares.
    unsafe {
        kernels::quantize_kernel::launch_unchecked(
            &launch.client,
            launch.count,
            launch.dim,
            launch.address,
            lanes,
            BufferArg::from_raw_parts(input.handle.clone(), len / lanes),
            BufferArg::from_raw_parts(device.tables.clone(), DeviceTables::len()),
            BufferArg::from_raw_parts(codes.handle.clone(), words),
            BufferArg::from_raw_parts(absmax.handle.clone(), launch.num_blocks),
            len,
            launch.num_blocks,
            DeviceTables::table(map),
            u32::from(map.map().zero_code()),
            given_absmax,
            block_size,
            launch.units,
            map.bits(),
        );
    }
    codes
}

/// Runs the dequantize kernel into `output`, a contiguous `f32` tensor of the decoded length.
pub fn dequantize(codes: &CubeTensor, absmax: &CubeTensor, output: &CubeTensor, map: MapKind, block_size: usize) {
    let len = output.meta.num_elements();
    let launch = BlockLaunch::new(codes, len, block_size, map.bits());
    let device = DeviceTables::of(codes);
    let lanes = vector_lanes(&launch.client, size_of::<f32>(), len, map.bits());
    // SAFETY: as in `quantize`.
    unsafe {
        kernels::dequantize_kernel::launch_unchecked(
            &launch.client,
            launch.count,
            launch.dim,
            launch.address,
            lanes,
            BufferArg::from_raw_parts(codes.handle.clone(), map.num_words(len)),
            BufferArg::from_raw_parts(absmax.handle.clone(), launch.num_blocks),
            BufferArg::from_raw_parts(device.tables.clone(), DeviceTables::len()),
            BufferArg::from_raw_parts(output.handle.clone(), len / lanes),
            len,
            launch.num_blocks,
            DeviceTables::table(map),
            block_size,
            launch.units,
            map.bits(),
        );
    }
}

/// One state slot as a kernel binds it: its buffers (none for an absent slot) and its map, whose
/// table offset and zero code the kernel takes.
pub struct SlotBinding {
    pub state: StateBuffer<CubeBackend>,
    pub map: MapKind,
}

impl SlotBinding {
    /// How the slot is held, as the kernel is compiled for it.
    pub fn kind(&self) -> SlotKind {
        match self.state {
            StateBuffer::Absent => SlotKind::Absent,
            StateBuffer::Blockwise(_) => SlotKind::Blockwise,
            StateBuffer::Rank1 { .. } => SlotKind::Rank1,
            StateBuffer::Full(_) => SlotKind::Full,
        }
    }

    /// The words and floats arguments of slot `index` of a kernel over `launch`: codes and absmax
    /// of a block-wise state, a spare and the values of an `f32` one, two spares for no state.
    fn args(&self, index: usize, device: &DeviceTables, launch: &BlockLaunch) -> (BufferArg, BufferArg) {
        let (words, floats) = match &self.state {
            StateBuffer::Blockwise(packed) => {
                (Some((&packed.codes, self.map.num_words(launch.len))), Some((&packed.absmax, launch.num_blocks)))
            }
            StateBuffer::Rank1 { state, .. } => (Some((&state.codes, self.map.num_words(launch.len))), None),
            StateBuffer::Full(values) => (None, Some((values, launch.len))),
            StateBuffer::Absent => (None, None),
        };
        // SAFETY: every handle is a live buffer of at least the stated length in elements, of
        // the element type the kernel declares; spares are one element and never accessed.
        unsafe {
            let words = match words {
                Some((tensor, len)) => BufferArg::from_raw_parts(tensor.handle.clone(), len),
                None => BufferArg::from_raw_parts(device.spare_words[index].clone(), 1),
            };
            let floats = match floats {
                Some((tensor, len)) => BufferArg::from_raw_parts(tensor.handle.clone(), len),
                None => BufferArg::from_raw_parts(device.spare_floats[index].clone(), 1),
            };
            (words, floats)
        }
    }
}

/// Each slot's table offset and zero code, as the kernels take them.
fn slot_maps(slots: &[SlotBinding; 3]) -> SlotMapsLaunch {
    let table = |slot: &SlotBinding| DeviceTables::table(slot.map);
    let zero = |slot: &SlotBinding| u32::from(slot.map.map().zero_code());
    SlotMapsLaunch::new(
        table(&slots[0]),
        table(&slots[1]),
        table(&slots[2]),
        zero(&slots[0]),
        zero(&slots[1]),
        zero(&slots[2]),
    )
}

/// A device scalar, or the device's `1.0` when absent.
fn scale_arg(scale: &Option<CubeTensor>, device: &DeviceTables) -> BufferArg {
    let handle = scale.as_ref().map_or_else(|| device.one.clone(), |tensor| tensor.handle.clone());
    // SAFETY: a live one-element `f32` buffer.
    unsafe { BufferArg::from_raw_parts(handle, 1) }
}

/// The tensors of one fused step, contiguous, and writable where the step writes.
pub struct StepArgs {
    /// The float type `param` and `grad` share.
    pub param_type: ParamDType,
    pub param: CubeTensor,
    pub grad: CubeTensor,
    pub skipped: CubeTensor,
    pub slots: [SlotBinding; 3],
    pub grad_scale: Option<CubeTensor>,
    pub update_scale: Option<CubeTensor>,
}

impl StepArgs {
    /// The norms and next norms of the rank-1 slot, if one is.
    fn rank1_state(&self) -> Option<(&Rank1Norms<CubeBackend>, &Rank1Norms<CubeBackend>)> {
        self.slots.iter().find_map(|slot| match &slot.state {
            StateBuffer::Rank1 { state, next } => Some((&state.norms, next)),
            _ => None,
        })
    }

    /// Bits per code of the block-wise and rank-1 slots (8 when there are none).
    ///
    /// # Panics
    /// When two block-wise slots differ: a step's states come from one map family.
    fn code_bits(&self) -> u32 {
        let coded = |slot: &&SlotBinding| matches!(slot.kind(), SlotKind::Blockwise | SlotKind::Rank1);
        let mut bits = self.slots.iter().filter(coded).map(|slot| slot.map.bits());
        let first = bits.next().unwrap_or(8);
        assert!(bits.all(|other| other == first), "the block-wise states of one step have codes of one width");
        first
    }
}

/// Runs the fused step kernel; the buffers of `args` are rewritten in place.
pub fn fused_step(args: &StepArgs, rule: StepRule, scalars: &StepScalars, block_size: usize) {
    launch_step(args, PassOutput::Step, rule, scalars, block_size);
}

/// Runs the update-norm pass: `f32[2 · blocks]` of per-block sums; nothing of `args` is written.
pub fn update_norms(args: &StepArgs, rule: StepRule, scalars: &StepScalars, block_size: usize) -> CubeTensor {
    let num_blocks = args.param.meta.num_elements().div_ceil(block_size);
    let sums = empty_f32(&args.param, 2 * num_blocks);
    launch_step(args, PassOutput::Sums(&sums), rule, scalars, block_size);
    sums
}

/// Runs the rank-1 norm pass: the row and column maxima of the rank-1 slot's stored values, in
/// fresh zeroed buffers of its norms' lengths; nothing of `args` is written.
pub fn rank1_norms(args: &StepArgs, rule: StepRule, scalars: &StepScalars, block_size: usize) -> (CubeTensor, CubeTensor) {
    let norms = &args.rank1_state().expect("a step with a rank-1 state").0;
    let zeros = |like: &CubeTensor| {
        zeros_client(like.client.clone(), like.device.clone(), [like.meta.num_elements()].into(), DType::F32)
    };
    let (rows, cols) = (zeros(&norms.rows), zeros(&norms.cols));
    launch_step(args, PassOutput::Rank1Norms(&rows, &cols), rule, scalars, block_size);
    (rows, cols)
}

/// What a launch of the step kernel computes, with the buffers it writes besides the step's.
enum PassOutput<'a> {
    /// The fused step.
    Step,
    /// The update-norm pass, into these sums.
    Sums(&'a CubeTensor),
    /// The rank-1 norm pass, into these zeroed row and column maxima.
    Rank1Norms(&'a CubeTensor, &'a CubeTensor),
}

/// Launches the step kernel for the pass of `output` over the buffers of `args`.
fn launch_step(args: &StepArgs, output: PassOutput<'_>, rule: StepRule, scalars: &StepScalars, block_size: usize) {
    let len = args.param.meta.num_elements();
    if len == 0 {
        return;
    }
    let code_bits = args.code_bits();
    let launch = BlockLaunch::new(&args.param, len, block_size, code_bits);
    let device = DeviceTables::of(&args.param);
    let (words1, floats1) = args.slots[0].args(0, &device, &launch);
    let (words2, floats2) = args.slots[1].args(1, &device, &launch);
    let (words3, floats3) = args.slots[2].args(2, &device, &launch);
    let pass = match output {
        PassOutput::Step => Pass::Step,
        PassOutput::Sums(_) => Pass::Norms,
        PassOutput::Rank1Norms(..) => Pass::Rank1Norms,
    };
    let layout = StepLayout {
        pass,
        rule,
        slots: [args.slots[0].kind(), args.slots[1].kind(), args.slots[2].kind()],
        grad_scaled: args.grad_scale.is_some(),
        update_scaled: args.update_scale.is_some(),
        block_size,
        units: launch.units,
        stochastic_bf16: rounds_stochastically(args.param_type, scalars),
        code_bits,
    };
    let param_elem = param_elem_type(args.param_type);
    let lanes = vector_lanes(&launch.client, param_elem.size(), len, code_bits);
    let rank1 = args.rank1_state();
    let columns = rank1.map_or(1, |(norms, _)| norms.cols.meta.num_elements());
    let (next_rows, next_cols) = match (&output, rank1) {
        (PassOutput::Rank1Norms(rows, cols), _) => (Some(*rows), Some(*cols)),
        (PassOutput::Step, Some((_, next))) => (Some(&next.rows), Some(&next.cols)),
        _ => (None, None),
    };
    // SAFETY: every handle is a live buffer of at least the stated length in elements, of the
    // element type the kernel declares (the next norms' `f32` bits are read as `u32`: the
    // maxima are taken on the bits); spares are never accessed.
    unsafe {
        let sums = match output {
            PassOutput::Sums(sums) => BufferArg::from_raw_parts(sums.handle.clone(), 2 * launch.num_blocks),
            _ => BufferArg::from_raw_parts(device.spare_sums.clone(), 1),
        };
        let floats = |tensor: Option<&CubeTensor>, spare: usize| match tensor {
            Some(tensor) => BufferArg::from_raw_parts(tensor.handle.clone(), tensor.meta.num_elements()),
            None => BufferArg::from_raw_parts(device.spare_norms[spare].clone(), 1),
        };
        kernels::fused_step_kernel::launch_unchecked(
            &launch.client,
            launch.count.clone(),
            launch.dim,
            launch.address,
            lanes,
            BufferArg::from_raw_parts(args.param.handle.clone(), len / lanes),
            BufferArg::from_raw_parts(args.grad.handle.clone(), len / lanes),
            words1,
            floats1,
            words2,
            floats2,
            words3,
            floats3,
            BufferArg::from_raw_parts(device.tables.clone(), DeviceTables::len()),
            scale_arg(&args.grad_scale, &device),
            scale_arg(&args.update_scale, &device),
            BufferArg::from_raw_parts(args.skipped.handle.clone(), rule::COUNT_WORDS),
            sums,
            floats(rank1.map(|(norms, _)| &norms.rows), 0),
            floats(rank1.map(|(norms, _)| &norms.cols), 1),
            floats(next_rows, 2),
            floats(next_cols, 3),
            columns,
            len,
            launch.num_blocks,
            scalars_arg(scalars),
            slot_maps(&args.slots),
            layout,
            param_elem,
        );
    }
}

/// Elements per vector in which a kernel reads or writes a float stream of `len` elements of
/// `element_size` bytes (the parameter and gradient of a step, quantize's input, dequantize's
/// output): the widest the device loads well that divides both the length (a vector is in the
/// tensor or past its end, never across it) and a word's codes (a unit owns whole words).
fn vector_lanes(client: &Client, element_size: usize, len: usize, code_bits: u32) -> usize {
    let per_word = (32 / code_bits) as usize;
    client
        .io_optimized_vector_sizes(element_size)
        .find(|&lanes| per_word % lanes == 0 && len % lanes == 0)
        .unwrap_or(1)
}

/// Whether the step kernel rounds the parameter stochastically: a `bf16` parameter, when the
/// scalars ask for it. A test forces it on `f32` parameters too (the kernel then writes each
/// rounded `bf16` value as an `f32`), to compare the kernels' rounding with the CPU twin's on a
/// runtime without `bf16` (wgpu).
fn rounds_stochastically(param_type: ParamDType, scalars: &StepScalars) -> bool {
    let rounded_type = param_type == ParamDType::BF16;
    #[cfg(test)]
    let rounded_type = rounded_type || tests::FORCED_STOCHASTIC_F32.load(std::sync::atomic::Ordering::SeqCst);
    rounded_type && scalars.stochastic_rounding != 0
}

/// The kernels' element type for parameters and gradients of `param_type`.
fn param_elem_type(param_type: ParamDType) -> ElemType {
    ElemType::Float(match param_type {
        ParamDType::F32 => FloatKind::F32,
        ParamDType::F16 => FloatKind::F16,
        ParamDType::BF16 => FloatKind::BF16,
    })
}

/// The step scalars as the kernels' launch argument.
fn scalars_arg(s: &StepScalars) -> crate::step::StepScalarsLaunch {
    crate::step::StepScalarsLaunch::new(
        s.lr,
        s.beta1,
        s.beta2,
        s.beta3,
        s.alpha,
        s.eps,
        s.correction1,
        s.correction2,
        s.decay_factor,
        s.l2_penalty,
        s.first_step,
        s.direction_decay,
        s.stochastic_rounding,
        s.rounding_key,
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU32};

    use super::*;

    /// A limit on units per cube forced on every launch (0: none). Process-wide, because
    /// kernels are launched on the device's own thread; the tests that launch kernels give the
    /// same bits whatever the limit.
    pub(crate) static FORCED_MAX_UNITS: AtomicU32 = AtomicU32::new(0);

    /// Stochastic rounding forced on `f32` parameters (see `rounds_stochastically`); only steps
    /// whose scalars ask for rounding are affected.
    pub(crate) static FORCED_STOCHASTIC_F32: AtomicBool = AtomicBool::new(false);

    #[test]
    fn units_own_whole_words() {
        for block in [64usize, 128, 256, 512, 1024, 2048, 4096] {
            for code_bits in [8u32, 4] {
                for device_max in [1u32, 2, 3, 16, 100, 256, 1024] {
                    let units = units_per_block(block, code_bits, device_max);
                    assert!(units <= MAX_UNITS && units <= device_max as usize && units.is_power_of_two());
                    assert_eq!((block / (32 / code_bits) as usize) % units, 0);
                }
            }
        }
        assert_eq!(units_per_block(256, 8, 1024), 64);
        assert_eq!(units_per_block(256, 4, 1024), 32);
        assert_eq!(units_per_block(4096, 8, 1024), MAX_UNITS);
        assert_eq!(units_per_block(256, 8, 2), 2);
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
