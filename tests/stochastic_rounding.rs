//! `bf16` parameters rounded stochastically by the fused op (`StateConfig::stochastic_rounding`):
//! the same bits on every backend, always one of the two `bf16` neighbours of the `f32` step, and
//! a run that keeps moving where rounding to nearest stalls.

mod common;

use burn::optim::Optimizer;
use burn::tensor::{DType, Device, FloatDType, Tensor};
use burn_8bit::{AdamW8bitConfig, Optim8bitConfig, Sgd8bitConfig, StateConfig};
use common::{Rng, devices, values};

fn bits(t: &Tensor<1>) -> Vec<u32> {
    values(t).iter().map(|x| x.to_bits()).collect()
}

/// The devices of the compiled-in backends that hold `bf16` tensors.
fn bf16_devices() -> Vec<(&'static str, Device)> {
    devices()
        .into_iter()
        .filter(|(name, device)| {
            let supported = device.supports_dtype(DType::BF16);
            if !supported {
                common::skip(&format!("{name}: no bf16"));
            }
            supported
        })
        .collect()
}

fn rounding(seed: u64) -> StateConfig {
    StateConfig::new().with_stochastic_rounding(true).with_rounding_seed(seed)
}

/// Three AdamW8bit steps of `bf16` parameters (8-bit states with a partial last block, then
/// `f32` states), with a NaN and an infinite gradient element: per step the parameter bits of
/// each backend, and of the `f32` step between two casts for reference.
fn adamw_runs(device: &Device, states: StateConfig, len: usize) -> Vec<(Vec<u32>, Vec<u32>)> {
    let optimizer = AdamW8bitConfig::new().with_states(states).build();
    let reference = AdamW8bitConfig::new().build();
    let mut rng = Rng::new(21);
    let mut p = Tensor::<1>::from_floats(rng.normals(len).as_slice(), device).cast(FloatDType::BF16);
    let (mut state, mut reference_state) = (None, None);
    let mut steps = Vec::new();
    for _ in 0..3 {
        let mut g = rng.normals(len);
        g[3] = f32::NAN;
        g[len - 2] = f32::INFINITY;
        let g = Tensor::<1>::from_floats(g.as_slice(), device).cast(FloatDType::BF16);
        let (expected, next_reference) =
            reference.step(1e-2, p.clone().cast(FloatDType::F32), g.clone().cast(FloatDType::F32), reference_state);
        let (next, next_state) = optimizer.step(1e-2, p, g, state);
        assert_eq!(next.dtype(), DType::BF16);
        steps.push((bits(&next), bits(&expected)));
        (p, state, reference_state) = (next, next_state, next_reference);
    }
    steps
}

#[test]
fn stochastic_rounding_writes_a_neighbour_of_the_f32_step_with_the_same_bits_on_every_backend() {
    let devices = bf16_devices();
    for len in [3 * 65_536 + 37, 1000] {
        let mut first: Option<(&str, Vec<(Vec<u32>, Vec<u32>)>)> = None;
        for (name, device) in &devices {
            let runs = adamw_runs(device, rounding(7), len);
            let mut rounded_up = 0usize;
            for (step, (got, f32_step)) in runs.iter().enumerate() {
                for (i, (&got, &exact)) in got.iter().zip(f32_step).enumerate() {
                    // The f32 step's value truncated to bf16 (towards zero) and the next bf16
                    // away from zero: stochastic rounding writes one of them.
                    let toward_zero = exact & 0xffff_0000;
                    let away = toward_zero + 0x1_0000;
                    let written = got;
                    assert!(
                        written == toward_zero || (written == away && exact != toward_zero),
                        "[{name}] len {len} step {step} element {i}: {written:#010x} is not a rounding of {exact:#010x}"
                    );
                    rounded_up += usize::from(written == away);
                }
            }
            assert!(rounded_up > 0, "[{name}] len {len}: never rounded away from zero");
            // The skipped elements keep their bits.
            assert_eq!(runs[2].0[3], runs[0].0[3]);
            match &first {
                None => first = Some((name, runs)),
                Some((first_name, first_runs)) => {
                    assert!(&runs == first_runs, "len {len}: {name} rounds differently from {first_name}");
                }
            }
        }
        if let Some((_, runs)) = &first {
            let (device_name, device) = &devices[0];
            assert_eq!(&adamw_runs(device, rounding(7), len), runs, "[{device_name}] not reproducible");
            assert_ne!(&adamw_runs(device, rounding(8), len), runs, "[{device_name}] the seed changes nothing");
        }
    }
}

/// Least squares from a start near the solution, with steps smaller than half a `bf16` unit of
/// the weights: rounded to nearest, the `bf16` weights never move; rounded stochastically they
/// follow the `f32` run. Returns the distance of each `bf16` run's weights to the `f32` run's.
fn least_squares(device: &Device) -> (f64, f64) {
    const FEATURES: usize = 32;
    const SAMPLES: usize = 256;
    const STEPS: usize = 300;
    let mut rng = Rng::new(5);
    let inputs = rng.normals(SAMPLES * FEATURES);
    // Weights in [2, 4), where a bf16 unit is 2^-6: the first steps move them by about 3e-3.
    let solution: Vec<f32> = rng.uniforms(FEATURES).iter().map(|u| 2.0 + 2.0 * u).collect();
    let start: Vec<f32> = solution.iter().zip(rng.normals(FEATURES)).map(|(w, n)| w + 0.3 * n).collect();
    let targets: Vec<f64> = inputs
        .chunks(FEATURES)
        .map(|x| x.iter().zip(&solution).map(|(x, w)| f64::from(x * w)).sum())
        .collect();
    let gradient = |w: &[f32]| -> Vec<f32> {
        let mut g = vec![0f64; FEATURES];
        for (x, y) in inputs.chunks(FEATURES).zip(&targets) {
            let residual = x.iter().zip(w).map(|(x, w)| f64::from(x * w)).sum::<f64>() - y;
            for (g, x) in g.iter_mut().zip(x) {
                *g += residual * f64::from(*x) / SAMPLES as f64;
            }
        }
        g.into_iter().map(|g| g as f32).collect()
    };
    let run = |dtype: FloatDType, states: StateConfig| -> Vec<f32> {
        let optimizer = Sgd8bitConfig::new().with_states(states).build();
        let mut w = Tensor::<1>::from_floats(start.as_slice(), device).cast(dtype);
        let mut state = None;
        for _ in 0..STEPS {
            let g = Tensor::<1>::from_floats(gradient(&values(&w)).as_slice(), device).cast(dtype);
            (w, state) = optimizer.step(1e-2, w, g, state);
        }
        values(&w)
    };
    let exact = run(FloatDType::F32, StateConfig::new());
    let distance = |w: Vec<f32>| w.iter().zip(&exact).map(|(a, b)| f64::from(a - b).powi(2)).sum::<f64>().sqrt();
    let start_distance = distance(start.clone());
    let nearest = distance(run(FloatDType::BF16, StateConfig::new()));
    let stochastic = distance(run(FloatDType::BF16, rounding(3)));
    println!("distance to the f32 run after {STEPS} steps: start {start_distance:.4}, bf16 to nearest {nearest:.4}, bf16 stochastic {stochastic:.4}");
    (nearest, stochastic)
}

#[test]
fn bf16_with_stochastic_rounding_tracks_the_f32_run_where_rounding_to_nearest_stalls() {
    for (name, device) in bf16_devices() {
        let (nearest, stochastic) = least_squares(&device);
        assert!(stochastic < 0.25 * nearest, "[{name}] stochastic rounding {stochastic} is not well below rounding to nearest {nearest}");
    }
}
