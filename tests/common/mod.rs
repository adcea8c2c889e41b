//! Helpers shared by the integration tests: the devices to run on and the reference vectors.
#![allow(dead_code)]

use std::path::PathBuf;

use burn::nn::{Linear, LinearConfig};
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, FloatDType, Tensor};

/// Every `.safetensors` vector file (of `VectorFile::default_dirs`), set by set in name order;
/// fails loudly when there are none.
pub fn vector_files() -> Vec<PathBuf> {
    let dirs = burn_8bit_conformance::VectorFile::default_dirs();
    let files = burn_8bit_conformance::VectorFile::list_all(&dirs)
        .unwrap_or_else(|error| panic!("reference vectors not found ({error}); set BURN8BIT_VECTORS"));
    assert!(!files.is_empty(), "no vectors in {dirs:?}");
    files
}

/// The devices of every backend compiled in, by name (`burn_8bit_conformance::devices`; `cpu`
/// is cubecl-cpu: the CubeCL kernels JIT-compiled for the CPU). A wgpu device is listed only
/// when an adapter exists; without one the test prints a visible skip, or fails when
/// `BURN8BIT_REQUIRE_WGPU=1` (as CI sets).
pub fn devices() -> Vec<(&'static str, Device)> {
    use std::sync::OnceLock;
    static AVAILABLE: OnceLock<Vec<(&'static str, Device)>> = OnceLock::new();
    let available = AVAILABLE.get_or_init(|| {
        burn_8bit_conformance::devices::all_compiled()
            .into_iter()
            .filter(|(name, device)| {
                if burn_8bit_conformance::devices::has_adapter(name, device) {
                    return true;
                }
                if std::env::var("BURN8BIT_REQUIRE_WGPU").is_ok_and(|v| v == "1") {
                    panic!("BURN8BIT_REQUIRE_WGPU=1 but no {name} adapter is available");
                }
                skip(&format!("{name}: no adapter available (install mesa-vulkan-drivers for lavapipe)"));
                false
            })
            .collect()
    });
    available.clone()
}

/// Prints `SKIPPED <what>` once per process, straight to stderr so that the test harness's output
/// capture does not hide it.
pub fn skip(what: &str) {
    use std::io::Write as _;
    use std::sync::Mutex;
    static PRINTED: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut printed = PRINTED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if !printed.iter().any(|p| p == what) {
        let _ = writeln!(std::io::stderr(), "SKIPPED {what}");
        printed.push(what.to_string());
    }
}

pub use burn_8bit_conformance::rng::Rng;

/// The elements of a flat tensor as `f32` (cast first when it is `f16` or `bf16`).
pub fn values(t: &Tensor<1>) -> Vec<f32> {
    t.clone().cast(FloatDType::F32).into_data().try_to_vec::<f32>().unwrap()
}

/// Euclidean distance, accumulated in `f64`.
pub fn distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2)).sum::<f64>().sqrt()
}

/// The small model the checkpoint and switching tests train: one 96 → 80 linear layer.
pub fn model(device: &Device) -> Linear {
    LinearConfig::new(96, 80).init(device)
}

/// `steps` steps of `optim` at learning rate 1e-2 on the mean square of the model's output for
/// batches of 16 normal inputs drawn from `seed`.
pub fn train(model: Linear, optim: &mut ModuleOptimizer, device: &Device, steps: usize, seed: u64) -> Linear {
    let mut model = model;
    let mut rng = Rng::new(seed);
    for _ in 0..steps {
        let x = Tensor::<1>::from_floats(rng.normals(16 * 96).as_slice(), device).reshape([16, 96]);
        let loss = model.forward(x).powi_scalar(2).mean();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-2, model, grads);
    }
    model
}

/// The model's weight matrix, flat.
pub fn weights(model: &Linear) -> Vec<f32> {
    model.weight.val().inner().reshape([-1]).into_data().try_to_vec::<f32>().unwrap()
}

/// What a backend's run produced: its parameters and each state slot's codes.
pub type BackendRun = (Vec<f32>, Vec<Vec<u8>>);

/// Keeps the first backend's `run` in `first` and compares every later one with it: at most
/// 0.2 % of the codes may differ and no parameter by 1e-5 (the backends' `f32` arithmetic may
/// round an element apart, and a code with it).
pub fn assert_agrees_with_first_backend(first: &mut Option<BackendRun>, name: &str, run: BackendRun) {
    let Some((params, codes)) = first else {
        *first = Some(run);
        return;
    };
    let elements = params.len();
    let differing = run.1.iter().flatten().zip(codes.iter().flatten()).filter(|(a, b)| a != b).count();
    let drift = run.0.iter().zip(params.iter()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    println!("{name}: {differing} codes differ from the first backend, max |Δp| {drift:e}");
    assert!(differing <= 2 * elements / 1000, "{name}: {differing} codes differ");
    assert!(drift < 1e-5, "{name}: parameters drift by {drift}");
}
