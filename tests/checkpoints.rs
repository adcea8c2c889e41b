//! Checkpoints that cannot silently go wrong: the checked loader against damaged and edited
//! records (truncation, byte flips, field edits, other shapes and optimizers), golden records of
//! every optimizer, and the regressions of the adversarial run (shape checks, record fields,
//! absmax, the 64-bit skip count, empty shapes, percentile clipping after a NaN, empty
//! parameters on wgpu).

mod common;

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;

use burn::module::{Module, Param, ParamId};
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, ModuleOptimizer, Optimizer, OptimizerRecord};
use burn::tensor::{Bytes, DType, Device, Tensor};
use burn_8bit::{
    AdEMAMix8bitConfig, AdaGrad8bitConfig, Adam8bitConfig, AdamW8bitConfig, BlockQuantized, BlockSize,
    Lamb8bitConfig, Lars8bitConfig, Lion8bitConfig, LoadError, MapKind, Optim8bitConfig, OptimizerKind,
    RecordChecksum, RmsProp8bitConfig, Sgd8bitConfig, StateConfig, StateReport, load_record_checked,
};
use burn_pack::{Reader, Scalar, Writer};
use common::{Rng, devices, values};

/// A model with one 8-bit state (the `[16, 32]` weight, over `min_8bit_size` = 256) and one `f32`
/// state (the bias), with fixed parameter ids so that records are reproducible.
#[derive(Module, Debug)]
struct Golden {
    weight: Param<Tensor<2>>,
    bias: Param<Tensor<1>>,
}

const WEIGHT: u64 = 1;
const BIAS: u64 = 2;

fn golden_model(device: &Device) -> Golden {
    let mut rng = Rng::new(7);
    let weight = Tensor::<1>::from_floats(rng.normals(16 * 32).as_slice(), device).reshape([16, 32]);
    let bias = Tensor::<1>::from_floats(rng.normals(32).as_slice(), device);
    Golden {
        weight: Param::initialized(ParamId::from(WEIGHT), weight),
        bias: Param::initialized(ParamId::from(BIAS), bias),
    }
}

/// Deterministic gradients of step `step`; `nan_at` puts a NaN of the given bits at those
/// positions of both gradients.
fn gradients(step: u64, device: &Device, nan: Option<(u32, usize)>) -> GradientsParams {
    let mut rng = Rng::new(100 + step);
    let mut weight = rng.normals(16 * 32);
    let mut bias = rng.normals(32);
    if let Some((bits, count)) = nan {
        weight[..count].fill(f32::from_bits(bits));
        bias[..count].fill(f32::from_bits(bits));
    }
    let mut grads = GradientsParams::new();
    grads.register(ParamId::from(WEIGHT), Tensor::<1>::from_floats(weight.as_slice(), device).reshape([16, 32]));
    grads.register(ParamId::from(BIAS), Tensor::<1>::from_floats(bias.as_slice(), device));
    grads
}

fn run(model: Golden, optim: &mut ModuleOptimizer, device: &Device, steps: std::ops::Range<u64>) -> Golden {
    let inner = device.clone();
    steps.fold(model, |model, step| optim.step(1e-2, model, gradients(step, &inner, None)))
}

/// The state settings of every golden record: the weight (512 elements) in 8-bit, blocks of 64.
fn golden_states() -> StateConfig {
    StateConfig::new().with_min_8bit_size(256).with_block_size(64)
}

/// The optimizers of the golden records: every one, with its rule flags and percentile clipping
/// spread over them so that every record field occurs, and AdamW twice more with 4-bit states:
/// block-wise (torchao's layout) and with its second moment rank-1 (the weight, 16 × 32).
fn optimizers() -> Vec<(&'static str, OptimizerKind, fn() -> ModuleOptimizer)> {
    vec![
        ("adam", OptimizerKind::Adam, || Adam8bitConfig::new().with_amsgrad(true).with_states(golden_states()).init()),
        ("adamw", OptimizerKind::AdamW, || {
            AdamW8bitConfig::new()
                .with_cautious_weight_decay(true)
                .with_states(golden_states().with_percentile_clipping(5))
                .init()
        }),
        ("sgd", OptimizerKind::Sgd, || {
            Sgd8bitConfig::new()
                .with_momentum(Some(MomentumConfig { momentum: 0.9, dampening: 0.0, nesterov: true }))
                .with_states(golden_states())
                .init()
        }),
        ("rmsprop", OptimizerKind::RmsProp, || RmsProp8bitConfig::new().with_centered(true).with_states(golden_states()).init()),
        ("adagrad", OptimizerKind::AdaGrad, || AdaGrad8bitConfig::new().with_states(golden_states()).init()),
        ("lion", OptimizerKind::Lion, || Lion8bitConfig::new().with_states(golden_states()).init()),
        ("ademamix", OptimizerKind::AdEMAMix, || AdEMAMix8bitConfig::new().with_states(golden_states()).init()),
        ("lamb", OptimizerKind::Lamb, || Lamb8bitConfig::new().with_states(golden_states()).init()),
        ("lars", OptimizerKind::Lars, || Lars8bitConfig::new().with_states(golden_states()).init()),
        ("adamw4", OptimizerKind::AdamW, || {
            AdamW8bitConfig::new().with_states(golden_states().with_state_bits(4).with_rank1_second_moment(false)).init()
        }),
        ("adamw4-rank1", OptimizerKind::AdamW, || AdamW8bitConfig::new().with_states(golden_states().with_state_bits(4)).init()),
    ]
}

/// A new optimizer fails here until its golden record is added to [`optimizers`] and blessed.
#[test]
fn every_optimizer_has_a_golden_record() {
    let golden: Vec<OptimizerKind> = optimizers().iter().map(|(_, kind, _)| *kind).collect();
    for kind in OptimizerKind::ALL {
        assert!(golden.contains(&kind), "{} has no golden record (BURN8BIT_BLESS=1 writes it)", kind.name());
    }
}

/// Taken by every test here that runs on all devices: two of them make zero-length tensors on
/// purpose, and under Burn 0.22.1's fusion such a tensor can corrupt the pending operations of a
/// concurrent test on the same wgpu device (docs/checkpoints.md).
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static DEVICES: std::sync::Mutex<()> = std::sync::Mutex::new(());
    DEVICES.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn records_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/records")
}

fn record_bytes(optim: &ModuleOptimizer) -> Vec<u8> {
    optim.into_bytes().unwrap().to_vec()
}

fn record_of(bytes: &[u8]) -> Result<OptimizerRecord, String> {
    OptimizerRecord::from_bytes(Bytes::from_bytes_vec(bytes.to_vec())).map_err(|e| format!("{e:?}"))
}

/// Loads `bytes` with the checked loader into `optimizer` for the golden model.
fn checked(bytes: &[u8], optimizer: fn() -> ModuleOptimizer, kind: OptimizerKind) -> Result<ModuleOptimizer, String> {
    let model = golden_model(&Device::flex().autodiff());
    let record = record_of(bytes)?;
    load_record_checked(optimizer(), record, &model, kind).map(|loaded| loaded.optimizer).map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------------------------
// A burnpack record taken apart and put back together, for editing.

#[derive(Clone, PartialEq, Debug)]
struct Entry {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    param_id: Option<u64>,
    bytes: Vec<u8>,
}

#[derive(Clone, PartialEq, Debug)]
struct Pack {
    tensors: Vec<Entry>,
    scalars: BTreeMap<String, Scalar>,
    metadata: BTreeMap<String, String>,
}

fn unpack(bytes: &[u8]) -> Option<Pack> {
    let reader = Reader::from_bytes(Bytes::from_bytes_vec(bytes.to_vec())).ok()?;
    let scalars = reader.scalars().clone();
    let metadata = reader.metadata().clone();
    let mut tensors = Vec::new();
    for tensor in reader.into_tensors().ok()? {
        let (name, dtype, shape, param_id, bytes) = tensor.into_parts().ok()?;
        tensors.push(Entry { name, dtype, shape: shape.iter().copied().collect(), param_id, bytes: bytes.to_vec() });
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Some(Pack { tensors, scalars, metadata })
}

fn repack(pack: &Pack) -> Vec<u8> {
    let tensors = pack
        .tensors
        .iter()
        .map(|t| burn_pack::Tensor::new(t.name.clone(), t.dtype, t.shape.clone(), t.param_id, Bytes::from_bytes_vec(t.bytes.clone())))
        .collect();
    let mut writer = Writer::new(tensors);
    for (key, value) in &pack.scalars {
        writer = writer.with_scalar(key, *value);
    }
    for (key, value) in &pack.metadata {
        writer = writer.with_metadata(key, value);
    }
    writer.into_bytes().unwrap().to_vec()
}

fn edited(bytes: &[u8], edit: impl FnOnce(&mut Pack)) -> Vec<u8> {
    let mut pack = unpack(bytes).expect("a readable record");
    edit(&mut pack);
    repack(&pack)
}

fn tensor<'a>(pack: &'a mut Pack, name: &str) -> &'a mut Entry {
    pack.tensors.iter_mut().find(|t| t.name == name).unwrap_or_else(|| panic!("no tensor {name}"))
}

/// The record after three steps of AdamW8bit with percentile clipping (every kind of field).
fn adamw_record() -> Vec<u8> {
    let device = Device::flex().autodiff();
    let mut optim = optimizers()[1].2();
    let _ = run(golden_model(&device), &mut optim, &Device::flex(), 1..4);
    record_bytes(&optim)
}

fn adamw() -> ModuleOptimizer {
    optimizers()[1].2()
}

/// How a damaged record fared through `OptimizerRecord::from_bytes` and the checked loader.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// Refused: by Burn's reader or by the checked loader.
    Rejected,
    /// Accepted, and its content is the original's (the change hit padding).
    AcceptedIdentical,
    /// Accepted with different content: a silent acceptance.
    AcceptedChanged,
    /// Something panicked.
    Panicked,
}

fn outcome(original: &Pack, damaged: &[u8]) -> Outcome {
    let result = catch_unwind(AssertUnwindSafe(|| checked(damaged, adamw, OptimizerKind::AdamW).is_ok()));
    match result {
        Err(_) => Outcome::Panicked,
        Ok(false) => Outcome::Rejected,
        Ok(true) if unpack(damaged).as_ref() == Some(original) => Outcome::AcceptedIdentical,
        Ok(true) => Outcome::AcceptedChanged,
    }
}

fn assert_no_panic_and_no_silent_acceptance(what: &str, results: &[(String, Outcome)]) {
    let bad: Vec<_> = results.iter().filter(|(_, o)| matches!(o, Outcome::Panicked | Outcome::AcceptedChanged)).collect();
    let count = |o: Outcome| results.iter().filter(|(_, r)| *r == o).count();
    println!(
        "{what}: {} trials, {} rejected, {} accepted unchanged (padding), {} bad",
        results.len(),
        count(Outcome::Rejected),
        count(Outcome::AcceptedIdentical),
        bad.len()
    );
    assert!(bad.is_empty(), "{what}: {bad:?}");
}

// ---------------------------------------------------------------------------------------------
// The corruption suite.

#[test]
fn truncated_records_are_refused_at_every_offset() {
    let bytes = adamw_record();
    let original = unpack(&bytes).unwrap();
    let offsets: Vec<usize> = (0..bytes.len()).filter(|&i| i < 512 || i % 37 == 0).chain([bytes.len() - 1]).collect();
    let results: Vec<_> = offsets.iter().map(|&end| (format!("truncated at {end}"), outcome(&original, &bytes[..end]))).collect();
    assert!(results.len() >= 200);
    assert!(results.iter().all(|(_, o)| *o != Outcome::AcceptedIdentical), "a truncated record cannot be the original");
    assert_no_panic_and_no_silent_acceptance("truncation", &results);
}

#[test]
fn single_byte_flips_are_refused_or_harmless() {
    let bytes = adamw_record();
    let original = unpack(&bytes).unwrap();
    // The tensor data section starts at the first 256-byte boundary after the header and CBOR.
    let data_start = bytes.len() - original.tensors.iter().map(|t| t.bytes.len().next_multiple_of(256)).sum::<usize>();
    let mut rng = Rng::new(2026);
    for (region, range) in [("metadata", 0..data_start), ("data", data_start..bytes.len())] {
        let results: Vec<_> = (0..250)
            .map(|_| {
                let at = range.start + (rng.next_u64() as usize) % range.len();
                let mask = 1 + (rng.next_u64() % 255) as u8;
                let mut damaged = bytes.clone();
                damaged[at] ^= mask;
                (format!("byte {at} ^ {mask:#04x}"), outcome(&original, &damaged))
            })
            .collect();
        assert_no_panic_and_no_silent_acceptance(&format!("flips in {region}"), &results);
    }
    // Every flip in a tensor's own bytes (not padding) is caught by the checksum or the range checks.
    let weight_codes = original.tensors.iter().find(|t| t.name == format!("{WEIGHT}.state0.codes")).unwrap();
    assert!(!weight_codes.bytes.is_empty());
}

#[test]
fn every_field_edit_is_refused() {
    let bytes = adamw_record();
    let original = unpack(&bytes).unwrap();
    let mut results = Vec::new();
    let mut trial = |name: String, damaged: Vec<u8>| results.push((name, outcome(&original, &damaged)));
    for key in original.scalars.keys() {
        trial(format!("without scalar {key}"), edited(&bytes, |p| { let _ = p.scalars.remove(key); }));
        let value = original.scalars[key];
        let replacements = [
            Scalar::from(u64::try_from(value).map_or(0, |v| v.wrapping_add(1))),
            Scalar::from(u64::MAX),
            Scalar::from(9u64),
            Scalar::Float(1.5),
            Scalar::Int(-1),
        ];
        for replacement in replacements.into_iter().filter(|r| *r != value) {
            trial(format!("{key} = {replacement:?}"), edited(&bytes, |p| { let _ = p.scalars.insert(key.clone(), replacement); }));
        }
    }
    for (index, entry) in original.tensors.iter().enumerate() {
        let name = entry.name.clone();
        trial(format!("without tensor {name}"), edited(&bytes, |p| { let _ = p.tensors.remove(index); }));
        trial(format!("{name} without param id"), edited(&bytes, |p| p.tensors[index].param_id = None));
        trial(format!("{name} under another param id"), edited(&bytes, |p| p.tensors[index].param_id = Some(99)));
        trial(format!("{name} renamed"), edited(&bytes, |p| p.tensors[index].name = format!("{name}x")));
        for dtype in [DType::F32, DType::U32, DType::I32] {
            if dtype != entry.dtype {
                trial(format!("{name} as {dtype:?}"), edited(&bytes, |p| p.tensors[index].dtype = dtype));
            }
        }
        let len = entry.bytes.len() / 4;
        if len % 2 == 0 {
            trial(format!("{name} as rank 2"), edited(&bytes, |p| p.tensors[index].shape = vec![2, len / 2]));
        }
        if len > 1 {
            trial(format!("{name} one element short"), edited(&bytes, |p| {
                let t = &mut p.tensors[index];
                t.shape = vec![len - 1];
                t.bytes.truncate(4 * (len - 1));
            }));
        }
    }
    for key in original.metadata.keys() {
        trial(format!("without path {key}"), edited(&bytes, |p| { let _ = p.metadata.remove(key); }));
        trial(format!("path {key} changed"), edited(&bytes, |p| p.metadata.get_mut(key).unwrap().push('x')));
    }
    trial("a stray scalar".into(), edited(&bytes, |p| { let _ = p.scalars.insert("stray".into(), Scalar::from(1u64)); }));
    trial("an unknown leaf".into(), edited(&bytes, |p| { let _ = p.scalars.insert(format!("{WEIGHT}.extra"), Scalar::from(1u64)); }));
    assert!(results.len() > 100, "{}", results.len());
    assert!(results.iter().all(|(_, o)| *o != Outcome::AcceptedIdentical));
    assert_no_panic_and_no_silent_acceptance("field edits", &results);
}

#[test]
fn records_of_other_optimizers_and_shapes_are_refused() {
    let device = Device::flex().autodiff();
    for (name, kind, optimizer) in optimizers() {
        let mut optim = optimizer();
        let _ = run(golden_model(&device), &mut optim, &Device::flex(), 1..3);
        let bytes = record_bytes(&optim);
        assert!(checked(&bytes, optimizer, kind).is_ok(), "{name}");
        for (other, other_kind, other_optimizer) in optimizers() {
            if other_kind != kind {
                let error = load_record_checked(other_optimizer(), record_of(&bytes).unwrap(), &golden_model(&device), other_kind);
                assert!(matches!(error, Err(LoadError::OptimizerMismatch { .. })), "{name} as {other}: {:?}", error.err());
            }
        }
    }

    // D1: the element count is the same, the shape is not.
    let bytes = adamw_record();
    let transposed = Golden {
        weight: Param::initialized(ParamId::from(WEIGHT), Tensor::<2>::zeros([32, 16], &device)),
        bias: golden_model(&device).bias,
    };
    let error = load_record_checked(adamw(), record_of(&bytes).unwrap(), &transposed, OptimizerKind::AdamW).err();
    match error {
        Some(LoadError::ShapeMismatch { param_id, recorded, expected }) => {
            assert_eq!((param_id, recorded, expected), (WEIGHT, vec![16, 32], vec![32, 16]));
        }
        other => panic!("{other:?}"),
    }

    #[derive(Module, Debug)]
    struct Flat {
        weight: Param<Tensor<1>>,
        bias: Param<Tensor<1>>,
    }
    let flat = Flat {
        weight: Param::initialized(ParamId::from(WEIGHT), Tensor::<1>::zeros([512], &device)),
        bias: golden_model(&device).bias,
    };
    let error = load_record_checked(adamw(), record_of(&bytes).unwrap(), &flat, OptimizerKind::AdamW).err();
    assert!(matches!(error, Some(LoadError::Corrupt { .. } | LoadError::ShapeMismatch { .. })), "{error:?}");
}

#[test]
fn burns_plain_load_record_drops_what_it_cannot_restore() {
    let bytes = adamw_record();
    let damaged = edited(&bytes, |p| {
        p.tensors.retain(|t| t.name != format!("{WEIGHT}.state0.codes"));
    });
    let checked_error = checked(&damaged, adamw, OptimizerKind::AdamW).err().expect("the checked load refuses it");
    assert!(checked_error.contains("state0.codes"), "{checked_error}");
    let plain = adamw().load_record(record_of(&damaged).unwrap());
    let report = StateReport::of(&plain).unwrap();
    let ids: Vec<u64> = report.parameters.iter().map(|p| p.param_id).collect();
    assert_eq!(ids, [BIAS], "Burn keeps the intact state and drops the damaged one");
}

// ---------------------------------------------------------------------------------------------
// Golden records: the format cannot drift.

fn params_hash(model: &Golden) -> u64 {
    let weight = model.weight.val().inner().reshape([-1]);
    let bias = model.bias.val().inner();
    let bits: Vec<u8> = values(&weight).into_iter().chain(values(&bias)).flat_map(|v| v.to_le_bytes()).collect();
    burn_8bit::ops::fnv1a64(bits)
}

fn fingerprints(optim: &ModuleOptimizer) -> Vec<(u64, u64)> {
    StateReport::of(optim).unwrap().parameters.iter().map(|p| (p.param_id, p.fingerprint)).collect()
}

/// `<name>.bpk` is the record after steps 1–3; `<name>.expected` the parameters' hash and the
/// states' fingerprints after loading it and taking steps 4–5, one line per CPU backend (their
/// `f32` reductions, e.g. percentile clipping's gradient norm, sum in different orders).
#[test]
fn golden_records_load_and_continue_bit_identically() {
    let _alone = one_at_a_time();
    let bless = std::env::var_os("BURN8BIT_BLESS").is_some();
    for (name, kind, optimizer) in optimizers() {
        let record_path = records_dir().join(format!("{name}.bpk"));
        let expected_path = records_dir().join(format!("{name}.expected"));
        let flex = Device::flex().autodiff();
        let mut fresh = optimizer();
        let written = run(golden_model(&flex), &mut fresh, &Device::flex(), 1..4);
        if bless {
            std::fs::create_dir_all(records_dir()).unwrap();
            std::fs::write(&record_path, record_bytes(&fresh)).unwrap();
        }
        let golden = std::fs::read(&record_path).unwrap_or_else(|e| panic!("{}: {e}", record_path.display()));
        let golden_fingerprints = fingerprints(&checked(&golden, optimizer, kind).unwrap());
        assert_eq!(fingerprints(&fresh), golden_fingerprints, "{name}: today's writer differs from the golden record");

        let mut continued = Vec::new();
        for (device_name, device) in devices() {
            let mut loaded = load_record_checked(optimizer(), record_of(&golden).unwrap(), &golden_model(&flex), kind)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(loaded.report.parameters.iter().all(|p| p.checksum == RecordChecksum::Verified), "{name}");
            let model = written.clone().to_device(&device.clone().autodiff());
            let model = run(model, &mut loaded.optimizer, &device, 4..6);
            let state: Vec<String> = fingerprints(&loaded.optimizer).iter().map(|(id, f)| format!("{id}:{f:016x}")).collect();
            let summary = format!("{device_name}: params {:016x} states {}", params_hash(&model), state.join(" "));
            continued.push((device_name, summary, model));
        }
        let cpu_twins = |continued: &[(&str, String, Golden)]| -> String {
            let lines = continued.iter().filter(|(d, _, _)| matches!(*d, "flex" | "ndarray"));
            lines.map(|(_, summary, _)| format!("{summary}\n")).collect()
        };
        if bless {
            assert_eq!(cpu_twins(&continued).lines().count(), 2, "blessing needs both CPU backends: --features ndarray");
            std::fs::write(&expected_path, cpu_twins(&continued)).unwrap();
        }
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_else(|e| panic!("{}: {e}", expected_path.display()));
        for line in cpu_twins(&continued).lines() {
            assert!(expected.lines().any(|e| e == line), "{name}: {line}\nis not in {}:\n{expected}", expected_path.display());
        }
        let reference = &continued[0].2;
        for (device_name, _, model) in &continued {
            if !matches!(*device_name, "flex" | "ndarray") {
                let worst = values(&model.weight.val().inner().reshape([-1]))
                    .iter()
                    .zip(values(&reference.weight.val().inner().reshape([-1])))
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(worst <= 1e-5, "{name} on {device_name}: {worst}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The adversarial run's defects, on every backend they concern.

/// D3: absmax NaN, ±∞, negative or of another type is refused by the range checks, before the
/// checksum is even looked at.
#[test]
fn absmax_must_be_finite_non_negative_f32() {
    let bytes = adamw_record();
    let name = format!("{WEIGHT}.state0.absmax");
    for (what, value) in [("NaN", f32::NAN), ("+inf", f32::INFINITY), ("-inf", f32::NEG_INFINITY), ("negative", -0.5)] {
        let damaged = edited(&bytes, |p| tensor(p, &name).bytes[..4].copy_from_slice(&value.to_le_bytes()));
        let error = checked(&damaged, adamw, OptimizerKind::AdamW).err().unwrap_or_else(|| panic!("{what} accepted"));
        assert!(error.contains("absmax") && error.contains("finite"), "{what}: {error}");
    }
    let as_int = edited(&bytes, |p| tensor(p, &name).dtype = DType::I32);
    let error = checked(&as_int, adamw, OptimizerKind::AdamW).err().expect("an I32 absmax");
    assert!(error.contains("absmax"), "{error}");
}

/// A rank-1 state's norms are checked as absmax is (finite, non-negative, one per row and
/// column), and only the 4-bit second moment of a matrix may have them.
#[test]
fn rank1_norms_are_checked() {
    let device = Device::flex().autodiff();
    let rank1 = optimizers().into_iter().find(|(name, _, _)| *name == "adamw4-rank1").expect("listed").2;
    let mut optim = rank1();
    let _ = run(golden_model(&device), &mut optim, &Device::flex(), 1..4);
    let bytes = record_bytes(&optim);
    let (rows, cols) = (format!("{WEIGHT}.state1.rows"), format!("{WEIGHT}.state1.cols"));
    for (what, value) in [("NaN", f32::NAN), ("+inf", f32::INFINITY), ("negative", -0.5)] {
        for name in [&rows, &cols] {
            let damaged = edited(&bytes, |p| tensor(p, name).bytes[..4].copy_from_slice(&value.to_le_bytes()));
            let error = checked(&damaged, rank1, OptimizerKind::AdamW).err().unwrap_or_else(|| panic!("{what} {name} accepted"));
            let leaf = name.trim_start_matches(&format!("{WEIGHT}."));
            assert!(error.contains(leaf) && error.contains("finite"), "{what}: {error}");
        }
    }
    let short = edited(&bytes, |p| {
        let entry = tensor(p, &rows);
        entry.shape = vec![15];
        entry.bytes.truncate(60);
    });
    let error = checked(&short, rank1, OptimizerKind::AdamW).err().expect("15 row norms for 16 rows");
    assert!(error.contains("state1.rows") && error.contains("[16]"), "{error}");
    let no_cols = edited(&bytes, |p| p.tensors.retain(|t| t.name != cols));
    let error = checked(&no_cols, rank1, OptimizerKind::AdamW).err().expect("rows without columns");
    assert!(error.contains("state1.cols") && error.contains("missing"), "{error}");
    // Norms on the first moment, whose slot is never rank-1.
    let misplaced = edited(&bytes, |p| {
        for part in ["rows", "cols"] {
            let entry = tensor(p, &format!("{WEIGHT}.state1.{part}")).clone();
            p.tensors.push(Entry { name: format!("{WEIGHT}.state0.{part}"), ..entry });
        }
    });
    let error = checked(&misplaced, rank1, OptimizerKind::AdamW).err().expect("rank-1 norms on the first moment");
    assert!(error.contains("state0.rows") && error.contains("not a rank-1"), "{error}");
}

/// D2: what the state reader needs, checked: step count, map family, rank, shape.
#[test]
fn fields_the_state_reader_needs_are_checked() {
    let bytes = adamw_record();
    let cases: Vec<(&str, Box<dyn Fn(&mut Pack)>, &str)> = vec![
        ("no time", Box::new(|p| { let _ = p.scalars.remove(&format!("{WEIGHT}.time")); }), "time"),
        ("map family 7", Box::new(|p| { let _ = p.scalars.insert(format!("{WEIGHT}.map_family"), Scalar::from(7u64)); }), "map family"),
        ("__rank 3", Box::new(|p| { let _ = p.scalars.insert(format!("{WEIGHT}.__rank"), Scalar::from(3u64)); }), "__rank"),
        ("__rank 9", Box::new(|p| { let _ = p.scalars.insert(format!("{WEIGHT}.__rank"), Scalar::from(9u64)); }), "__rank"),
        ("no __rank", Box::new(|p| { let _ = p.scalars.remove(&format!("{WEIGHT}.__rank")); }), "__rank"),
        ("time u64::MAX", Box::new(|p| { let _ = p.scalars.insert(format!("{WEIGHT}.time"), Scalar::from(u64::MAX)); }), "step count"),
        ("dims overflow", Box::new(|p| { let _ = p.scalars.insert(format!("{WEIGHT}.dim0"), Scalar::from(u64::MAX / 2)); }), "too many"),
        ("codes as F32", Box::new(|p| tensor(p, &format!("{WEIGHT}.state0.codes")).dtype = DType::F32), "codes"),
        ("codes rank 2", Box::new(|p| tensor(p, &format!("{WEIGHT}.state0.codes")).shape = vec![2, 64]), "codes"),
        ("no param id", Box::new(|p| tensor(p, &format!("{WEIGHT}.state0.codes")).param_id = None), "belongs to no parameter"),
    ];
    for (what, edit, expected) in cases {
        let damaged = edited(&bytes, edit);
        let result = catch_unwind(AssertUnwindSafe(|| checked(&damaged, adamw, OptimizerKind::AdamW)));
        let error = result.unwrap_or_else(|_| panic!("{what}: panicked")).err().unwrap_or_else(|| panic!("{what}: accepted"));
        assert!(error.contains(expected), "{what}: {error}");
    }
}

/// A record as written before checksums (format 0): no `format` and `checksum`, the skip count
/// a `u32[1]` tensor.
fn legacy(bytes: &[u8], skipped: u32) -> Vec<u8> {
    edited(bytes, |p| {
        for id in [WEIGHT, BIAS] {
            p.scalars.remove(&format!("{id}.format"));
            p.scalars.remove(&format!("{id}.checksum"));
            p.scalars.remove(&format!("{id}.skipped"));
            p.tensors.push(Entry {
                name: format!("{id}.skipped"),
                dtype: DType::U32,
                shape: vec![1],
                param_id: Some(id),
                bytes: skipped.to_le_bytes().to_vec(),
            });
        }
    })
}

fn recorded_skips(optim: &ModuleOptimizer) -> Vec<u64> {
    let pack = unpack(&record_bytes(optim)).unwrap();
    [WEIGHT, BIAS].iter().map(|id| u64::try_from(pack.scalars[&format!("{id}.skipped")]).unwrap()).collect()
}

/// D4: the skip count is 64-bit on every backend, on the 8-bit (kernel and CPU twin) and the
/// `f32` path; and a record without a checksum still loads and says so.
#[test]
fn the_skip_count_carries_past_u32() {
    let _alone = one_at_a_time();
    let bytes = legacy(&adamw_record(), u32::MAX - 2);
    for (device_name, device) in devices() {
        let loaded = load_record_checked(adamw(), record_of(&bytes).unwrap(), &golden_model(&Device::flex().autodiff()), OptimizerKind::AdamW)
            .unwrap_or_else(|e| panic!("[{device_name}] the legacy record loads: {e}"));
        assert!(loaded.report.parameters.iter().all(|p| p.checksum == RecordChecksum::Absent), "[{device_name}]");
        let mut optim = loaded.optimizer;
        let model = golden_model(&device.clone().autodiff());
        let _ = optim.step(1e-2, model, gradients(4, &device, Some((0x7fc0_0000, 5))));
        assert_eq!(recorded_skips(&optim), [u64::from(u32::MAX) + 3; 2], "[{device_name}]");
        let report = StateReport::of(&optim).unwrap();
        assert_eq!(report.total_skipped(), 2 * (u64::from(u32::MAX) + 3), "[{device_name}] {report:?}");
    }
}


/// D5: shapes with a zero dimension decode to their own shape.
#[test]
fn empty_shapes_decode_to_their_shape() {
    let _alone = one_at_a_time();
    for (device_name, device) in devices() {
        for dims in [[5, 0, 1], [3, 0, 2], [0, 4, 4]] {
            let q = BlockQuantized::quantize(Tensor::<3>::zeros(dims, &device), MapKind::DynamicSigned, BlockSize::DEFAULT);
            assert_eq!(q.dequantize::<3>().unwrap().dims(), dims, "[{device_name}]");
            let p = Tensor::<3>::zeros(dims, &device);
            let (p, state) = Adam8bitConfig::new().build().step(1e-3, p.clone(), p, None);
            let state = state.unwrap();
            assert_eq!(p.dims(), dims);
            assert!(state.slots().is_empty(), "[{device_name}] an empty parameter holds no buffers");
            let decoded = state.decoded();
            assert_eq!(decoded.len(), 2);
            assert!(decoded.iter().all(|d| d.values.dims() == dims), "[{device_name}]");
        }
    }
}

/// D6: a negative NaN in the first gradient does not switch percentile clipping off: the ring
/// holds the norm of the finite elements, and the sign of the NaN does not matter.
#[test]
fn percentile_clipping_survives_a_nan_in_the_first_gradient() {
    let _alone = one_at_a_time();
    let len = 5000;
    for (device_name, device) in devices() {
        let trajectory = |nan_bits: u32, clipping: usize| {
            // Momentum's update is proportional to the gradient, so clipping shows in its size.
            let optimizer = Sgd8bitConfig::new().with_momentum(Some(MomentumConfig::new())).with_states(StateConfig::new().with_percentile_clipping(clipping)).build();
            let mut rng = Rng::new(3);
            let mut p = Tensor::<1>::from_floats(rng.normals(len).as_slice(), &device);
            let mut state = None;
            let mut updates = Vec::new();
            for step in 0..4 {
                let mut g = rng.normals(len);
                if step == 0 {
                    g[17] = f32::from_bits(nan_bits);
                }
                if step == 1 {
                    g.iter_mut().for_each(|x| *x *= 1000.0);
                }
                let before = values(&p);
                let (next, next_state) = optimizer.step(1e-3, p, Tensor::from_floats(g.as_slice(), &device), state);
                updates.push(common::distance(&before, &values(&next)));
                (p, state) = (next, next_state);
            }
            (values(&p), updates, state.unwrap().skipped())
        };
        let (negative, updates, skipped) = trajectory(0xffc0_0000, 5);
        let (positive, _, _) = trajectory(0x7fc0_0000, 5);
        let (_, unclipped, _) = trajectory(0xffc0_0000, 100);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&negative), bits(&positive), "[{device_name}] the NaN's sign changed the result");
        assert_eq!(skipped, 1, "[{device_name}]");
        // Step 2's gradient is 1000× larger: clipped, its update is the size of step 1's.
        assert!(updates[1] < 0.1 * unclipped[1], "[{device_name}] clipping off after a NaN: {updates:?} vs {unclipped:?}");
    }
}

/// Burn 0.22's fusion mishandles zero-length tensors (docs/checkpoints.md): an empty parameter's
/// state creates none, so a 1-element parameter beside it steps as it would alone.
#[test]
fn an_empty_parameter_leaves_its_neighbours_alone() {
    // The one-element parameter steps first, so its update is still pending (fused, not yet
    // run) when the empty parameter's state is made.
    #[derive(Module, Debug)]
    struct Pair {
        one: Param<Tensor<1>>,
        empty: Param<Tensor<1>>,
    }
    let step = |device: &Device, with_empty: bool| {
        let mut optim = AdamW8bitConfig::new().init();
        let ad = device.clone().autodiff();
        let mut model = Pair {
            one: Param::initialized(ParamId::from(11), Tensor::<1>::from_floats([0.5], &ad)),
            empty: Param::initialized(ParamId::from(10), Tensor::<1>::zeros([0], &ad)),
        };
        // Made before any step: creating it between fused operations would trigger the bug itself.
        let empty_grad = Tensor::<1>::zeros([0], device);
        for k in 0..5 {
            let mut grads = GradientsParams::new();
            grads.register(ParamId::from(11), Tensor::<1>::from_floats([0.1 * (k as f32 + 1.0)], device));
            if with_empty {
                grads.register(ParamId::from(10), empty_grad.clone());
            }
            model = optim.step(1e-2, model, grads);
        }
        values(&model.one.val().inner())
    };
    let _alone = one_at_a_time();
    for (device_name, device) in devices() {
        assert_eq!(step(&device, true), step(&device, false), "[{device_name}]");
    }
}

/// A record of the same optimizer written with other settings — precision, rule flags, block
/// size — converts at the next step instead of restarting (docs/checkpoints.md).
#[test]
fn records_of_other_settings_convert_instead_of_restarting() {
    type Make = fn() -> ModuleOptimizer;
    let cases: [(&str, OptimizerKind, Make, Make, [bool; 2], usize); 5] = [
        ("f32 → 8-bit", OptimizerKind::AdamW, || AdamW8bitConfig::new().f32_states().init(), || {
            AdamW8bitConfig::new().with_states(StateConfig::new().with_min_8bit_size(256)).init()
        }, [true, false], 2),
        ("8-bit → f32", OptimizerKind::AdamW, || AdamW8bitConfig::new().with_states(StateConfig::new().with_min_8bit_size(256)).init(), || {
            AdamW8bitConfig::new().f32_states().init()
        }, [false, false], 2),
        ("AMSGrad added", OptimizerKind::Adam, || Adam8bitConfig::new().with_states(StateConfig::new().with_min_8bit_size(256)).init(), || {
            Adam8bitConfig::new().with_states(StateConfig::new().with_min_8bit_size(256)).with_amsgrad(true).init()
        }, [true, false], 3),
        ("RMSprop centred", OptimizerKind::RmsProp, || RmsProp8bitConfig::new().with_states(StateConfig::new().with_min_8bit_size(256)).init(), || {
            RmsProp8bitConfig::new().with_states(StateConfig::new().with_min_8bit_size(256)).with_centered(true).init()
        }, [true, false], 3),
        ("block 64 → 256", OptimizerKind::Adam, || Adam8bitConfig::new().with_states(StateConfig::new().with_min_8bit_size(256).with_block_size(64)).init(), || {
            Adam8bitConfig::new().with_states(StateConfig::new().with_min_8bit_size(256)).init()
        }, [true, false], 2),
    ];
    let device = Device::flex().autodiff();
    for (what, kind, before, after, quantized, states) in cases {
        let mut first = before();
        let model = run(golden_model(&device), &mut first, &Device::flex(), 1..4);
        let mut second = load_record_checked(after(), first.to_record(), &model, kind).unwrap_or_else(|e| panic!("{what}: {e}")).optimizer;
        let _ = run(model, &mut second, &Device::flex(), 4..5);
        let report = StateReport::of(&second).unwrap();
        for (param, quantized) in report.parameters.iter().zip(quantized) {
            assert_eq!(param.steps, Some(4), "{what}: parameter {} restarted", param.param_id);
            assert_eq!(param.quantized, quantized, "{what}: parameter {}", param.param_id);
        }
        let weight = &report.parameters[0];
        let per_state = if quantized[0] { 512 + 4 * 512 / 256 } else { 4 * 512 };
        assert_eq!(weight.bytes as usize, states * per_state, "{what}: {report:?}");
    }
}

/// Plain SGD (Burn's default: no momentum) keeps no state besides its step and skip counts; its
/// record loads through the checked loader and the run continues as if uninterrupted.
#[test]
fn plain_sgd_records_load_and_continue() {
    let _alone = one_at_a_time();
    for (name, device) in devices() {
        let optimizer = || Sgd8bitConfig::new().with_weight_decay(Some(WeightDecayConfig::new(0.1))).init();
        let model = golden_model(&device.clone().autodiff());
        let mut first = optimizer();
        let halfway = run(model.clone(), &mut first, &device, 1..3);
        let loaded = load_record_checked(optimizer(), first.to_record(), &halfway, OptimizerKind::Sgd)
            .unwrap_or_else(|e| panic!("[{name}] {e}"));
        assert!(loaded.report.parameters.iter().all(|p| p.bytes == 0 && p.steps == Some(2)), "[{name}] {:?}", loaded.report);
        let mut resumed_optim = loaded.optimizer;
        let resumed = run(halfway, &mut resumed_optim, &device, 3..5);
        let mut uninterrupted_optim = optimizer();
        let uninterrupted = run(model, &mut uninterrupted_optim, &device, 1..5);
        assert_eq!(params_hash(&resumed), params_hash(&uninterrupted), "[{name}]");
    }
}
