//! Conformance with the reference implementations: replays reference vectors (safetensors files
//! whose metadata describes the case, as `tests/data/bitsandbytes-0.50.2/README.md` and
//! `tests/data/torchao-0.18.0/README.md` explain) on any device and judges the result: 8-bit
//! cases against bitsandbytes, 4-bit cases against torchao.
//!
//! The `conformance` example is a command-line front end to [`run_case`]; the test suite calls
//! the same function, so the runner and `cargo test` apply one set of criteria. This crate is
//! not published: it serves the repository's examples, tests, benches and CI, so that the crates
//! users compile carry neither the runner nor its `safetensors` dependency. It also holds the
//! lists they share, each defined once: the compiled-in devices ([`devices`]) and the 8-bit
//! optimizers at their defaults ([`optimizers`]); and the fixtures more than one of them uses:
//! a seeded generator ([`rng`]) and a small regression task for `Learner` runs ([`regression`]).
//!
//! ```no_run
//! use burn::tensor::Device;
//! use burn_8bit_conformance::{VectorFile, run_case};
//!
//! let file = VectorFile::open(VectorFile::default_dirs()[0].join("maps.safetensors"))?;
//! let report = run_case(&file, &Device::default());
//! println!("{}", report.line());
//! # Ok::<(), burn_8bit_conformance::VectorError>(())
//! ```

pub mod devices;
pub mod optimizers;
pub mod regression;
pub mod rng;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use burn::optim::momentum::MomentumConfig;
use burn::tensor::{Device, Tensor};
use burn_8bit_ops::{BlockQuantized, BlockSize, CodeMap, MapKind};
use burn_8bit_optim::{
    AdEMAMix8bitConfig, AdaGrad8bitConfig, Adam8bitConfig, AdamW8bitConfig, Lion8bitConfig, Optim8bitConfig,
    OptimizerKind, RmsProp8bitConfig, Sgd8bitConfig, StateConfig, StateSlot,
};
use safetensors::{Dtype, SafeTensors};

use crate::optimizers::{State, TensorStep, tensor_step};

/// A reference vector file could not be read or lacks what its kind needs.
#[derive(Debug, thiserror::Error)]
pub enum VectorError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid safetensors.
    #[error("{0}")]
    Format(#[from] safetensors::SafeTensorError),
    /// A metadata entry or tensor is missing or has the wrong type.
    #[error("{0}")]
    Content(String),
}

/// One reference case: a safetensors file and its string metadata.
pub struct VectorFile {
    stem: String,
    bytes: Vec<u8>,
    metadata: HashMap<String, String>,
}

impl VectorFile {
    /// Reads a file; its stem names the case.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, VectorError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| VectorError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let (_, header) = SafeTensors::read_metadata(&bytes)?;
        let metadata = header.metadata().clone().unwrap_or_default();
        let stem = path.file_stem().unwrap_or_default().to_string_lossy().into_owned();
        Ok(Self {
            stem,
            bytes,
            metadata,
        })
    }

    /// Where the reference vectors are: the directories of `$BURN8BIT_VECTORS` when set (a
    /// list, separated as `PATH` is), else the repository's `tests/data/bitsandbytes-0.50.2` and
    /// `tests/data/torchao-0.18.0` (present in a checkout of the repository; the published
    /// package leaves test data out).
    pub fn default_dirs() -> Vec<PathBuf> {
        match std::env::var_os("BURN8BIT_VECTORS") {
            Some(dirs) => std::env::split_paths(&dirs).collect(),
            None => ["bitsandbytes-0.50.2", "torchao-0.18.0"]
                .map(|set| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data").join(set))
                .into(),
        }
    }

    /// Every `.safetensors` file of the directories, directory by directory in the order given,
    /// each in file-name order.
    pub fn list_all(dirs: &[PathBuf]) -> Result<Vec<PathBuf>, VectorError> {
        let mut files = Vec::new();
        for dir in dirs {
            files.extend(Self::list(dir)?);
        }
        Ok(files)
    }

    /// Every `.safetensors` file of a directory, in file-name order.
    pub fn list(dir: impl AsRef<Path>) -> Result<Vec<PathBuf>, VectorError> {
        let dir = dir.as_ref();
        let entries = std::fs::read_dir(dir).map_err(|source| VectorError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|path| path.extension().is_some_and(|ext| ext == "safetensors"))
            .collect();
        files.sort();
        Ok(files)
    }

    /// The file's stem (the case name).
    pub fn stem(&self) -> &str {
        &self.stem
    }

    /// The `kind` metadata entry.
    pub fn kind(&self) -> &str {
        self.metadata.get("kind").map_or("unknown", String::as_str)
    }

    /// A metadata entry parsed from its string form.
    pub fn meta<T: std::str::FromStr>(&self, key: &str) -> Result<T, VectorError> {
        let value = self
            .metadata
            .get(key)
            .ok_or_else(|| VectorError::Content(format!("metadata `{key}` missing")))?;
        value
            .parse()
            .map_err(|_| VectorError::Content(format!("metadata `{key}` = {value:?} unreadable")))
    }

    fn tensors(&self) -> Result<SafeTensors<'_>, VectorError> {
        Ok(SafeTensors::deserialize(&self.bytes)?)
    }

    /// Tensor names in the order their data lies in the file.
    pub fn tensor_names(&self) -> Result<Vec<String>, VectorError> {
        let (_, header) = SafeTensors::read_metadata(&self.bytes)?;
        Ok(header.offset_keys())
    }

    /// An `f32` tensor, flattened.
    pub fn f32s(&self, name: &str) -> Result<Vec<f32>, VectorError> {
        let tensors = self.tensors()?;
        let view = tensors.tensor(name)?;
        if view.dtype() != Dtype::F32 {
            return Err(VectorError::Content(format!("`{name}` is {:?}, not F32", view.dtype())));
        }
        Ok(view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    /// A `u8` tensor, flattened.
    pub fn u8s(&self, name: &str) -> Result<Vec<u8>, VectorError> {
        let tensors = self.tensors()?;
        let view = tensors.tensor(name)?;
        if view.dtype() != Dtype::U8 {
            return Err(VectorError::Content(format!("`{name}` is {:?}, not U8", view.dtype())));
        }
        Ok(view.data().to_vec())
    }
}

/// The verdict on one case.
pub struct CaseReport {
    /// The case name (file stem).
    pub case: String,
    /// The case kind from the metadata.
    pub kind: String,
    /// Whether every criterion held.
    pub passed: bool,
    /// The measured figures, in print order.
    pub figures: Vec<(String, String)>,
    /// FNV-1a 64 of what we produced (see [`fnv1a64`] and the runner's contract).
    pub hash: u64,
}

impl CaseReport {
    /// `<case> <kind> PASS|FAIL <key>=<value> … hash=<16 hex digits>`.
    pub fn line(&self) -> String {
        let mut line = format!(
            "{} {} {}",
            self.case,
            self.kind,
            if self.passed { "PASS" } else { "FAIL" }
        );
        for (key, value) in &self.figures {
            let _ = write!(line, " {key}={value}");
        }
        let _ = write!(line, " hash={:016x}", self.hash);
        line
    }

    /// A figure by name.
    pub fn figure(&self, key: &str) -> Option<&str> {
        self.figures.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

pub use burn_8bit_ops::fnv1a64;

/// Runs one case on `device`. Cases of an unknown kind, or of a kind this build cannot run yet,
/// fail (never pass) with a `reason` figure.
pub fn run_case(file: &VectorFile, device: &Device) -> CaseReport {
    let result = match file.kind() {
        "maps" => maps_case(file),
        "quantize" => quantize_case(file, device),
        "optimizer" => optimizer_case(file, device),
        other => Err(VectorError::Content(format!("unknown kind `{other}`"))),
    };
    let (passed, figures, hash) = result.unwrap_or_else(|error| {
        let reason = error.to_string().replace(char::is_whitespace, "_");
        (false, vec![("reason".to_string(), reason)], fnv1a64([]))
    });
    CaseReport {
        case: file.stem().to_string(),
        kind: file.kind().to_string(),
        passed,
        figures,
        hash,
    }
}

type Verdict = Result<(bool, Vec<(String, String)>, u64), VectorError>;

fn maps_case(file: &VectorFile) -> Verdict {
    let mut produced = Vec::new();
    let mut mismatched = 0usize;
    let mut unknown = 0usize;
    let names = file.tensor_names()?;
    for name in &names {
        let Some(kind) = MapKind::from_name(name) else {
            unknown += 1;
            continue;
        };
        let ours = kind.map();
        let reference = file.f32s(name)?;
        mismatched += ours
            .values()
            .iter()
            .zip(&reference)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count()
            + ours.values().len().abs_diff(reference.len());
        produced.extend(ours.values().iter().flat_map(|v| v.to_le_bytes()));
    }
    let passed = mismatched == 0 && unknown == 0 && !names.is_empty();
    let figures = vec![
        ("maps".into(), names.len().to_string()),
        ("unknown".into(), unknown.to_string()),
        ("mismatched_entries".into(), mismatched.to_string()),
    ];
    Ok((passed, figures, fnv1a64(produced)))
}

/// Measurements of one quantize case (see [`quantize_figures`]).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizeFigures {
    /// Blocks whose absmax differs in bits from the reference's.
    pub absmax_mismatches: usize,
    /// Elements where decoding the reference's codes differs in bits from its `dequantized`.
    pub decode_mismatches: usize,
    /// Elements whose code is not a nearest code.
    pub not_nearest: usize,
    /// Our mean |input − dequantized|.
    pub mean_abs_error: f64,
    /// The reference's mean |input − dequantized|.
    pub reference_mean_abs_error: f64,
    /// Share of elements where our code equals the reference's.
    pub identical: f64,
    /// The same share among elements where the reference's code is itself a nearest code
    /// (bitsandbytes' CPU encoder misses the nearest code below ~1.5e-5 · absmax, see its
    /// vectors' README).
    pub identical_where_reference_nearest: f64,
}

impl QuantizeFigures {
    /// The criteria of the conformance contract.
    pub fn passed(&self) -> bool {
        self.absmax_mismatches == 0
            && self.decode_mismatches == 0
            && self.not_nearest == 0
            && self.mean_abs_error <= self.reference_mean_abs_error
            && self.identical_where_reference_nearest >= 0.99
    }
}

fn quantize_case(file: &VectorFile, device: &Device) -> Verdict {
    let map_name: String = file.meta("map")?;
    let map = MapKind::from_name(&map_name)
        .ok_or_else(|| VectorError::Content(format!("unknown map `{map_name}`")))?;
    let block_size = BlockSize::new(file.meta("blocksize")?)
        .map_err(|error| VectorError::Content(error.to_string()))?;
    let input = file.f32s("input")?;
    let reference = Reference {
        codes: file.u8s("codes")?,
        absmax: file.f32s("absmax")?,
        dequantized: file.f32s("dequantized")?,
    };
    let n: usize = file.meta("n")?;
    if input.len() != n || reference.codes.len() != n || reference.dequantized.len() != n {
        return Err(VectorError::Content(format!("tensors disagree with n = {n}")));
    }
    let file_map = file.f32s("code")?;
    if file_map.iter().zip(map.map().values()).any(|(a, b)| a.to_bits() != b.to_bits()) {
        return Err(VectorError::Content(format!("`code` is not our {map_name} map")));
    }
    let tensor = Tensor::<1>::from_floats(input.as_slice(), device);
    let quantized = BlockQuantized::quantize(tensor, map, block_size);
    let ours = Produced {
        codes: quantized.unpacked_codes(),
        absmax: quantized.absmax_values(),
        dequantized: quantized.dequantize_flat().into_data().try_to_vec::<f32>().expect("f32"),
    };
    let figures = quantize_figures(&input, map, block_size, &ours, &reference);
    let hash = fnv1a64(
        ours.codes
            .iter()
            .copied()
            .chain(ours.absmax.iter().flat_map(|a| a.to_le_bytes())),
    );
    let printed = vec![
        ("absmax_mismatches".into(), figures.absmax_mismatches.to_string()),
        ("decode_mismatches".into(), figures.decode_mismatches.to_string()),
        ("not_nearest".into(), figures.not_nearest.to_string()),
        ("mean_abs_err".into(), format!("{:.6e}", figures.mean_abs_error)),
        ("ref_mean_abs_err".into(), format!("{:.6e}", figures.reference_mean_abs_error)),
        ("identical".into(), format!("{:.5}", figures.identical)),
        (
            "identical_where_ref_nearest".into(),
            format!("{:.5}", figures.identical_where_reference_nearest),
        ),
    ];
    Ok((figures.passed(), printed, hash))
}

/// What the reference (bitsandbytes or torchao) produced for a quantize case.
pub struct Reference {
    /// One code per element.
    pub codes: Vec<u8>,
    /// One absmax per block.
    pub absmax: Vec<f32>,
    /// `code[codes] * absmax[block]`.
    pub dequantized: Vec<f32>,
}

/// What we produced for a quantize case.
pub struct Produced {
    /// One code per element.
    pub codes: Vec<u8>,
    /// One absmax per block.
    pub absmax: Vec<f32>,
    /// Our decoded values.
    pub dequantized: Vec<f32>,
}

/// Compares our quantization of `input` with the reference's.
pub fn quantize_figures(
    input: &[f32],
    map: MapKind,
    block_size: BlockSize,
    ours: &Produced,
    reference: &Reference,
) -> QuantizeFigures {
    let values = map.map();
    let block = block_size.get();
    let absmax_mismatches = ours
        .absmax
        .iter()
        .zip(&reference.absmax)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count()
        + ours.absmax.len().abs_diff(reference.absmax.len());
    let mut decode_mismatches = 0;
    let mut not_nearest = 0;
    let mut identical = 0;
    let mut reference_nearest = 0;
    let mut identical_where_reference_nearest = 0;
    let (mut error, mut reference_error) = (0f64, 0f64);
    for (i, &x) in input.iter().enumerate() {
        let absmax = reference.absmax[i / block];
        let reference_code = reference.codes[i];
        let decoded = values.values()[reference_code as usize] * absmax;
        decode_mismatches += usize::from(decoded.to_bits() != reference.dequantized[i].to_bits());
        not_nearest += usize::from(!is_nearest(&values, x, ours.codes[i], ours.absmax[i / block]));
        let reference_nearest_here = is_nearest(&values, x, reference_code, absmax);
        let same = ours.codes[i] == reference_code;
        identical += usize::from(same);
        reference_nearest += usize::from(reference_nearest_here);
        identical_where_reference_nearest += usize::from(same && reference_nearest_here);
        error += (f64::from(x) - f64::from(ours.dequantized[i])).abs();
        reference_error += (f64::from(x) - f64::from(reference.dequantized[i])).abs();
    }
    let n = input.len().max(1) as f64;
    QuantizeFigures {
        absmax_mismatches,
        decode_mismatches,
        not_nearest,
        mean_abs_error: error / n,
        reference_mean_abs_error: reference_error / n,
        identical: identical as f64 / n,
        identical_where_reference_nearest: identical_where_reference_nearest as f64
            / reference_nearest.max(1) as f64,
    }
}

/// Whether `code` decodes to a value at least as close to `x` as any other code does, up to the
/// rounding of the `f32` thresholds (a few ulps of `x`).
pub fn is_nearest(map: &CodeMap, x: f32, code: u8, absmax: f32) -> bool {
    let distance = |k: usize| (f64::from(x) - f64::from(map.values()[k] * absmax)).abs();
    let best = (0..map.values().len()).map(distance).fold(f64::INFINITY, f64::min);
    distance(code as usize) <= best + 4.0 * f64::from(f32::EPSILON) * f64::from(x.abs())
}

/// A JSON array of numbers in a metadata string, e.g. `[0.9, 0.999]`.
fn meta_list(file: &VectorFile, key: &str) -> Result<Vec<f32>, VectorError> {
    let text: String = file.meta(key)?;
    text.trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .map(|item| {
            item.trim()
                .parse()
                .map_err(|_| VectorError::Content(format!("metadata `{key}` = {text:?} unreadable")))
        })
        .collect()
}

/// The trajectory of one optimizer over a case's gradients: the parameter after every step and
/// the final state.
struct Trajectory {
    params: Vec<Vec<f32>>,
    state: State,
}

fn replay(
    step: &TensorStep,
    file: &VectorFile,
    lr: f64,
    steps: usize,
    device: &Device,
) -> Result<Trajectory, VectorError> {
    let mut param = Tensor::<1>::from_floats(file.f32s("param0")?.as_slice(), device);
    let mut state = None;
    let mut params = Vec::with_capacity(steps);
    for t in 1..=steps {
        let grad = Tensor::<1>::from_floats(file.f32s(&format!("grad.{t}"))?.as_slice(), device);
        let (next, next_state) = step(lr, param, grad, state);
        params.push(next.clone().into_data().try_to_vec::<f32>().expect("f32 parameter"));
        param = next;
        state = next_state;
    }
    let state = state.ok_or_else(|| VectorError::Content("no steps".into()))?;
    Ok(Trajectory { params, state })
}

fn distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// The hash of a final state: every slot's codes and absmax or norms (quantized) or values (`f32`).
fn state_hash(state: &State) -> u64 {
    let mut bytes = Vec::new();
    for slot in state.slots() {
        match slot {
            StateSlot::Quantized(q) => {
                bytes.extend(q.unpacked_codes());
                bytes.extend(q.absmax_values().iter().flat_map(|a| a.to_le_bytes()));
            }
            StateSlot::Rank1(q) => {
                bytes.extend(q.unpacked_codes());
                bytes.extend(q.row_norms().iter().chain(&q.col_norms()).flat_map(|a| a.to_le_bytes()));
            }
            StateSlot::Full(values) => bytes.extend(
                values
                    .clone()
                    .into_data()
                    .try_to_vec::<f32>()
                    .expect("f32 state")
                    .iter()
                    .flat_map(|v| v.to_le_bytes()),
            ),
        }
    }
    fnv1a64(bytes)
}

/// The name the vectors give `kind` (bitsandbytes' optimizer names, which torchao's vectors
/// share), `None` for the optimizers without reference vectors (a new optimizer has none until
/// its vectors are generated).
fn bitsandbytes_name(kind: OptimizerKind) -> Option<&'static str> {
    match kind {
        OptimizerKind::Adam => Some("adam"),
        OptimizerKind::AdamW => Some("adamw"),
        OptimizerKind::Sgd => Some("momentum"),
        OptimizerKind::RmsProp => Some("rmsprop"),
        OptimizerKind::AdaGrad => Some("adagrad"),
        OptimizerKind::Lion => Some("lion"),
        OptimizerKind::AdEMAMix => Some("ademamix"),
        _ => None,
    }
}

/// Replays an optimizer case and judges it against the reference's own quantized run (8-bit
/// bitsandbytes, 4-bit torchao), both measured against its 32-bit twin:
/// `e(t) = ‖p_t − p32_t‖ / ‖p32_t − p0‖`. A quantized case passes when our states have the
/// reference's width and our `max_t e` ≤ 1.1 · the reference's + 1e-6; an `f32`-state case when
/// our `max_t e` ≤ 1e-4.
fn optimizer_case(file: &VectorFile, device: &Device) -> Verdict {
    let name: String = file.meta("optimizer")?;
    let lr: f64 = file.meta("lr")?;
    let steps: usize = file.meta("steps")?;
    let state_bits: u32 = file.meta("state_bits")?;
    let states = StateConfig::new()
        .with_block_size(file.meta("blocksize")?)
        .with_min_8bit_size(file.meta("min_8bit_size")?)
        .with_state_bits(if state_bits == 4 { 4 } else { 8 })
        // torchao's 4-bit states are block-wise: it leaves the paper's rank-1 norms out.
        .with_rank1_second_moment(false);
    let weight_decay: f32 = file.meta("weight_decay")?;
    let config_error = |error: burn_8bit_optim::ConfigError| VectorError::Content(error.to_string());
    let kind = OptimizerKind::ALL
        .into_iter()
        .find(|&kind| bitsandbytes_name(kind) == Some(name.as_str()))
        .ok_or_else(|| VectorError::Content(format!("unknown optimizer `{name}`")))?;
    let step = match kind {
        OptimizerKind::Adam | OptimizerKind::AdamW => {
            let betas = meta_list(file, "betas")?;
            let eps: f32 = file.meta("eps")?;
            if kind == OptimizerKind::Adam {
                let config = Adam8bitConfig::new()
                    .with_beta_1(betas[0])
                    .with_beta_2(betas[1])
                    .with_epsilon(eps)
                    .with_states(states);
                tensor_step(config.try_build().map_err(config_error)?)
            } else {
                let config = AdamW8bitConfig::new()
                    .with_beta_1(betas[0])
                    .with_beta_2(betas[1])
                    .with_epsilon(eps)
                    .with_weight_decay(weight_decay)
                    .with_states(states);
                tensor_step(config.try_build().map_err(config_error)?)
            }
        }
        OptimizerKind::Sgd => {
            let momentum: f64 = file.meta("momentum")?;
            let config = Sgd8bitConfig::new()
                .with_momentum(Some(MomentumConfig::new().with_momentum(momentum).with_dampening(0.0)))
                .with_states(states);
            tensor_step(config.try_build().map_err(config_error)?)
        }
        OptimizerKind::RmsProp => {
            let config = RmsProp8bitConfig::new()
                .with_alpha(file.meta("alpha")?)
                .with_epsilon(file.meta("eps")?)
                .with_momentum(0.0)
                .with_states(states);
            tensor_step(config.try_build().map_err(config_error)?)
        }
        OptimizerKind::AdaGrad => {
            let config = AdaGrad8bitConfig::new()
                .with_epsilon(file.meta("eps")?)
                .with_states(states);
            tensor_step(config.try_build().map_err(config_error)?)
        }
        OptimizerKind::Lion => {
            let betas = meta_list(file, "betas")?;
            let config = Lion8bitConfig::new()
                .with_beta_1(betas[0])
                .with_beta_2(betas[1])
                .with_weight_decay(weight_decay)
                .with_states(states);
            tensor_step(config.try_build().map_err(config_error)?)
        }
        OptimizerKind::AdEMAMix => {
            let betas = meta_list(file, "betas")?;
            let config = AdEMAMix8bitConfig::new()
                .with_beta_1(betas[0])
                .with_beta_2(betas[1])
                .with_beta_3(betas[2])
                .with_alpha(file.meta("alpha")?)
                .with_epsilon(file.meta("eps")?)
                .with_weight_decay(weight_decay)
                .with_states(states);
            tensor_step(config.try_build().map_err(config_error)?)
        }
        _ => return Err(VectorError::Content(format!("no reference vectors for {}", kind.name()))),
    };
    let trajectory = replay(&step, file, lr, steps, device)?;
    let param0 = file.f32s("param0")?;
    let (mut ours_max, mut reference_max) = (0f64, 0f64);
    for (t, ours) in (1..=steps).zip(&trajectory.params) {
        let reference32 = file.f32s(&format!("param32.{t}"))?;
        let reference8 = file.f32s(&format!("param.{t}"))?;
        let scale = distance(&reference32, &param0);
        ours_max = ours_max.max(distance(ours, &reference32) / scale);
        reference_max = reference_max.max(distance(&reference8, &reference32) / scale);
    }
    let quantized = trajectory.state.is_quantized();
    let bits = if quantized { trajectory.state.map_family().bits() } else { 32 };
    let passed = bits == state_bits
        && if quantized {
            ours_max <= 1.1 * reference_max + 1e-6
        } else {
            ours_max <= 1e-4
        };
    let figures = vec![
        ("state".into(), if quantized { format!("{bits}bit") } else { "f32".to_string() }),
        ("steps".into(), steps.to_string()),
        ("max_err".into(), format!("{ours_max:.4e}")),
        ("ref_max_err".into(), format!("{reference_max:.4e}")),
        ("skipped".into(), trajectory.state.skipped().to_string()),
    ];
    Ok((passed, figures, state_hash(&trajectory.state)))
}
