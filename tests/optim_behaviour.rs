//! The 8-bit optimizers' contract on every backend compiled in: cross-backend agreement,
//! non-finite gradients, checkpoints (resume, checked load, block-size change), memory, half
//! precision and config validation.

mod common;

use burn::nn::LinearConfig;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{ModuleOptimizer, Optimizer};
use burn::tensor::{DType, Device, FloatDType, Tensor, TensorData};
use burn_8bit::optim::{ConfigError, StateSlot};
use burn_8bit::{
    AdEMAMix8bitConfig, AdaGrad8bitConfig, Adam8bitConfig, AdamW8bitConfig, Lamb8bitConfig, Lars8bitConfig,
    Lion8bitConfig, LoadError, Optim8bitConfig, OptimizerKind, RmsProp8bitConfig, Sgd8bitConfig, StateConfig,
    StateReport, load_record_checked,
};
use burn_8bit_conformance::optimizers::{State, TensorStep, all_at_defaults, tensor_step};
use common::{Rng, devices, distance, model, train, values, weights};

/// Every 8-bit optimizer at its defaults (the one list, `OptimizerKind::ALL`), then the rule
/// variants the defaults leave out, as per-tensor steps.
fn optimizers() -> Vec<(&'static str, TensorStep)> {
    let mut all = all_at_defaults();
    all.extend([
        ("AdamW8bit cautious AMSGrad", tensor_step(AdamW8bitConfig::new().with_cautious_weight_decay(true).with_amsgrad(true).build())),
        ("Sgd8bit plain", tensor_step(Sgd8bitConfig::new().with_weight_decay(Some(WeightDecayConfig::new(0.01))).build())),
        ("Sgd8bit Nesterov", tensor_step(Sgd8bitConfig::new().with_momentum(Some(MomentumConfig::new().with_nesterov(true))).build())),
        ("RmsProp8bit centred", tensor_step(RmsProp8bitConfig::new().with_centered(true).build())),
        ("RmsProp8bit plain", tensor_step(RmsProp8bitConfig::new().with_momentum(0.0).build())),
        ("AdaGrad8bit lr_decay", tensor_step(AdaGrad8bitConfig::new().with_lr_decay(0.01).build())),
        ("Lion8bit weight decay", tensor_step(Lion8bitConfig::new().with_weight_decay(0.1).build())),
        ("AdEMAMix8bit schedules", tensor_step(AdEMAMix8bitConfig::new().with_t_alpha(Some(5)).with_t_beta3(Some(5)).build())),
        ("Lamb8bit weight decay", tensor_step(Lamb8bitConfig::new().with_weight_decay(0.01).build())),
        ("Lars8bit weight decay", tensor_step(Lars8bitConfig::new().with_weight_decay(1e-4).build())),
    ]);
    all
}

fn codes(state: &State) -> Vec<Vec<u8>> {
    state
        .slots()
        .iter()
        .map(|slot| match slot {
            StateSlot::Quantized(q) => q.unpacked_codes(),
            StateSlot::Rank1(_) | StateSlot::Full(_) => panic!("expected block-wise 8-bit states"),
        })
        .collect()
}

struct Run {
    params: Vec<Vec<f32>>,
    codes: Vec<Vec<Vec<u8>>>,
}

fn trajectory(
    step: &dyn Fn(f64, Tensor<1>, Tensor<1>, Option<State>) -> (Tensor<1>, Option<State>),
    device: &Device,
    len: usize,
    steps: usize,
) -> Run {
    let mut rng = Rng::new(42);
    let mut p = Tensor::<1>::from_floats(rng.normals(len).as_slice(), device);
    let mut state = None;
    let mut run = Run { params: vec![values(&p)], codes: Vec::new() };
    for _ in 0..steps {
        let g = Tensor::<1>::from_floats(rng.normals(len).iter().map(|x| x * 0.1).collect::<Vec<_>>().as_slice(), device);
        let (next, next_state) = step(1e-3, p, g, state);
        let next_state = next_state.unwrap();
        run.params.push(values(&next));
        run.codes.push(codes(&next_state));
        p = next;
        state = Some(next_state);
    }
    run
}

#[test]
fn trajectories_agree_across_backends() {
    let devices = devices();
    if devices.len() < 2 {
        common::skip("cross-backend optimizer trajectories: only one backend compiled in");
        return;
    }
    let (len, steps) = (10_000 + 77, 20);
    for (name, step) in optimizers() {
        let runs: Vec<(&str, Run)> = devices.iter().map(|(d, device)| (*d, trajectory(&*step, device, len, steps))).collect();
        let (base_name, base) = &runs[0];
        for (other_name, other) in &runs[1..] {
            let p0 = &base.params[0];
            let mut worst = 0f64;
            for t in 1..=steps {
                let moved = distance(&base.params[t], p0);
                worst = worst.max(distance(&base.params[t], &other.params[t]) / moved);
                for (slot, (a, b)) in base.codes[t - 1].iter().zip(&other.codes[t - 1]).enumerate() {
                    let same = a.iter().zip(b).filter(|(x, y)| x == y).count();
                    let far = a.iter().zip(b).filter(|(x, y)| x.abs_diff(**y) > 1).count();
                    let share = same as f64 / a.len() as f64;
                    assert!(share >= 0.999, "{name} {base_name}/{other_name} step {t} slot {slot}: {share} identical codes");
                    assert_eq!(far, 0, "{name} {base_name}/{other_name} step {t} slot {slot}: codes > 1 apart");
                }
            }
            println!("{name} {base_name}/{other_name}: max relative distance {worst:.3e}");
            assert!(worst <= 1e-3, "{name} {base_name}/{other_name}: {worst}");
        }
    }
}

#[test]
fn optimizers_are_deterministic_per_backend() {
    for (device_name, device) in devices() {
        for (name, step) in optimizers() {
            let a = trajectory(&*step, &device, 5000, 3);
            let b = trajectory(&*step, &device, 5000, 3);
            let bits = |run: &Run| run.params.last().unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a), bits(&b), "[{device_name}] {name}");
            assert_eq!(a.codes, b.codes, "[{device_name}] {name}");
        }
    }
}

/// Two replicas of one parameter that start as clones sharing its buffer (as data-parallel
/// replicas do), each with its own state and the same gradient tensor, stay bit-identical:
/// stepping one never writes into the parameter or gradient buffer the other still holds.
#[test]
fn replicas_sharing_a_buffer_step_identically() {
    let bits = |t: &Tensor<1>| values(t).into_iter().map(f32::to_bits).collect::<Vec<_>>();
    for (device_name, device) in devices() {
        for (name, step) in optimizers() {
            let mut rng = Rng::new(7);
            let first = Tensor::<1>::from_floats(rng.normals(5000).as_slice(), &device);
            let (mut a, mut b) = (first.clone(), first);
            let (mut state_a, mut state_b) = (None, None);
            for t in 0..3 {
                let g = Tensor::<1>::from_floats(rng.normals(5000).iter().map(|x| x * 0.1).collect::<Vec<_>>().as_slice(), &device);
                let (b_before, g_before) = (bits(&b), bits(&g));
                (a, state_a) = step(1e-3, a, g.clone(), state_a);
                assert_eq!(bits(&b), b_before, "[{device_name}] {name} step {t}: stepping one replica changed the other");
                assert_eq!(bits(&g), g_before, "[{device_name}] {name} step {t}: the step changed the shared gradient");
                (b, state_b) = step(1e-3, b, g, state_b);
                assert_eq!(bits(&a), bits(&b), "[{device_name}] {name} step {t}: the replicas differ");
                assert_eq!(codes(state_a.as_ref().unwrap()), codes(state_b.as_ref().unwrap()), "[{device_name}] {name} step {t}");
            }
        }
    }
}

/// Non-finite gradient elements leave their parameter and (decoded) states alone, never reach
/// a state, and are counted on the device; the 8-bit and the `f32` paths alike.
#[test]
fn non_finite_gradients_are_skipped_and_counted() {
    for (device_name, device) in devices() {
        for (name, step) in optimizers() {
            for len in [9_000usize, 1_000] {
                let mut rng = Rng::new(3);
                let p = Tensor::<1>::from_floats(rng.normals(len).as_slice(), &device);
                let g1 = Tensor::<1>::from_floats(rng.normals(len).as_slice(), &device);
                let (p, state) = step(1e-3, p, g1, None);
                let state = state.unwrap();
                let before: Vec<Vec<f32>> = state.decoded().iter().map(|d| values(&d.values)).collect();
                let p_before = values(&p);
                let mut g = rng.normals(len);
                let bad = [(5, f32::NAN), (700, f32::INFINITY), (len - 1, f32::NEG_INFINITY), (4100.min(len - 2), f32::from_bits(0x7f80_0001))];
                for &(i, x) in &bad {
                    g[i] = x;
                }
                let g = Tensor::<1>::from_data(TensorData::new(g, [len]), &device);
                let (p, state) = step(1e-3, p, g, Some(state));
                let state = state.unwrap();
                let label = format!("[{device_name}] {name} n={len}");
                assert_eq!(state.skipped(), bad.len() as u64, "{label}");
                let p_after = values(&p);
                for &(i, _) in &bad {
                    assert_eq!(p_after[i].to_bits(), p_before[i].to_bits(), "{label}: parameter {i} moved");
                }
                assert!(p_after.iter().all(|x| x.is_finite()), "{label}: non-finite parameter");
                for (slot, decoded) in state.decoded().iter().enumerate() {
                    let after = values(&decoded.values);
                    assert!(after.iter().all(|x| x.is_finite()), "{label}: non-finite state {}", decoded.name);
                    let scale = after.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-30);
                    for &(i, _) in &bad {
                        let drift = (after[i] - before[slot][i]).abs() / scale;
                        assert!(drift <= 0.02, "{label}: state {} at {i} moved by {drift} of absmax", decoded.name);
                    }
                }
            }
        }
    }
}

#[test]
fn adam_state_is_at_most_2_04_bytes_per_parameter() {
    for (device_name, device) in devices() {
        let len = 1 << 20;
        let p = Tensor::<1>::zeros([len], &device);
        let g = Tensor::<1>::ones([len], &device);
        let (_, state) = Adam8bitConfig::new().build().step(1e-3, p, g, None);
        let bytes = state.unwrap().size_bytes();
        let per_param = bytes as f64 / len as f64;
        println!("[{device_name}] Adam8bit: {bytes} bytes of state for {len} parameters = {per_param:.5} B/param");
        assert!(per_param <= 2.04, "[{device_name}] {per_param}");
    }
}

#[test]
fn small_tensors_keep_f32_state_and_large_ones_8_bit() {
    let device = Device::flex();
    let optimizer = Adam8bitConfig::new().build();
    let (_, small) = optimizer.step(1e-3, Tensor::<1>::ones([4095], &device), Tensor::ones([4095], &device), None);
    let (_, large) = optimizer.step(1e-3, Tensor::<1>::ones([4096], &device), Tensor::ones([4096], &device), None);
    assert!(!small.unwrap().is_quantized());
    assert!(large.unwrap().is_quantized());
}

#[test]
fn empty_tensors_step_without_change() {
    for (device_name, device) in devices() {
        for (name, step) in optimizers() {
            let (p, state) = step(1e-3, Tensor::<1>::zeros([0], &device), Tensor::zeros([0], &device), None);
            assert_eq!(p.dims(), [0], "[{device_name}] {name}");
            assert_eq!(state.unwrap().time(), 1);
        }
    }
}

/// f16 and bf16 parameters and gradients, read and written by the op in their own type, step
/// to the bits of the `f32` step between two casts: every optimizer, 8-bit and `f32` states,
/// three steps with a NaN and an infinite gradient element (those elements keep their bits).
#[test]
fn half_precision_parameters_step_as_f32_between_casts() {
    for (device_name, device) in devices() {
        for dtype in [FloatDType::F16, FloatDType::BF16] {
            if !device.supports_dtype(DType::from(dtype)) {
                common::skip(&format!("{device_name}: no {dtype:?}"));
                continue;
            }
            for (name, step) in optimizers() {
                // 8-bit states with a partial last block, then `f32` states (under 4096 elements).
                for len in [8192 + 37, 1000] {
                    let mut rng = Rng::new(9);
                    let mut p = Tensor::<1>::from_floats(rng.normals(len).as_slice(), &device).cast(dtype);
                    let (mut state, mut reference_state) = (None, None);
                    for t in 0..3 {
                        let mut g = rng.normals(len);
                        g[3] = f32::NAN;
                        g[len - 2] = f32::INFINITY;
                        let g = Tensor::<1>::from_floats(g.as_slice(), &device).cast(dtype);
                        let (expected, next_reference) =
                            step(1e-2, p.clone().cast(FloatDType::F32), g.clone().cast(FloatDType::F32), reference_state);
                        let (next, next_state) = step(1e-2, p.clone(), g, state);
                        assert_eq!(next.dtype(), DType::from(dtype), "[{device_name}] {name}");
                        let bits = |t: &Tensor<1>| values(t).iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        let got = bits(&next);
                        assert_eq!(got, bits(&expected.cast(dtype)), "[{device_name}] {name} {dtype:?} len {len} step {t}: differs from the f32 step between casts");
                        let before = bits(&p);
                        assert_eq!((got[3], got[len - 2]), (before[3], before[len - 2]), "[{device_name}] {name}: skipped elements changed");
                        let next_state = next_state.unwrap();
                        assert_eq!(next_state.is_quantized(), len > 4096, "[{device_name}] {name}");
                        (p, state, reference_state) = (next, Some(next_state), next_reference);
                    }
                }
            }
        }
    }
}

#[test]
fn invalid_configs_are_typed_errors() {
    assert!(matches!(Adam8bitConfig::new().with_beta_1(1.0).try_init(), Err(ConfigError::OutOfRange { name: "beta_1", .. })));
    assert!(matches!(Adam8bitConfig::new().with_beta_2(-0.1).try_build(), Err(ConfigError::OutOfRange { name: "beta_2", .. })));
    assert!(matches!(AdamW8bitConfig::new().with_epsilon(0.0).try_build(), Err(ConfigError::OutOfRange { name: "epsilon", .. })));
    assert!(matches!(AdamW8bitConfig::new().with_states(StateConfig::new().with_block_size(100)).try_build(), Err(ConfigError::BlockSize(_))));
    assert!(matches!(Lion8bitConfig::new().with_weight_decay(-1.0).try_build(), Err(ConfigError::OutOfRange { .. })));
    assert!(matches!(RmsProp8bitConfig::new().with_alpha(f32::NAN).try_build(), Err(ConfigError::OutOfRange { .. })));
    assert!(matches!(AdaGrad8bitConfig::new().with_lr_decay(-1.0).try_build(), Err(ConfigError::OutOfRange { .. })));
    assert!(matches!(AdEMAMix8bitConfig::new().with_t_alpha(Some(0)).try_build(), Err(ConfigError::OutOfRange { name: "t_alpha", .. })));
    assert!(matches!(Sgd8bitConfig::new().with_momentum(Some(MomentumConfig::new().with_momentum(2.0))).try_build(), Err(ConfigError::OutOfRange { .. })));
    let Err(panic) = std::panic::catch_unwind(|| Adam8bitConfig::new().with_states(StateConfig::new().with_block_size(8192)).init()) else {
        panic!("init accepted block size 8192");
    };
    let message = panic.downcast_ref::<String>().unwrap();
    assert!(message.contains("block size"), "{message}");
}

/// Save → load → continue equals an uninterrupted run: bit for bit on the CPU backends, codes
/// equal and parameters within 1e-6 on the kernels.
#[test]
fn resumed_training_matches_uninterrupted_training() {
    for (device_name, device) in devices() {
        let device = device.autodiff();
        let config = AdamW8bitConfig::new().with_states(StateConfig::new().with_min_8bit_size(1024));
        let start = model(&device);
        let mut uninterrupted = config.init();
        let straight = train(start.clone(), &mut uninterrupted, &device, 6, 1);
        let straight = train(straight, &mut uninterrupted, &device, 4, 2);

        let mut first = config.init();
        let halfway = train(start, &mut first, &device, 6, 1);
        let bytes = first.into_bytes().unwrap();
        let mut resumed = config.init().from_bytes(bytes).unwrap();
        let resumed_model = train(halfway, &mut resumed, &device, 4, 2);

        let (a, b) = (weights(&straight), weights(&resumed_model));
        if device_name == "wgpu" {
            let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(worst <= 1e-6, "[{device_name}] {worst}");
        } else {
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a), bits(&b), "[{device_name}]");
        }
        let fingerprints = |optim: &ModuleOptimizer| {
            let mut states: Vec<(u64, u64)> = StateReport::of(optim)
                .unwrap()
                .parameters
                .iter()
                .map(|p| (p.elements.unwrap(), p.fingerprint))
                .collect();
            states.sort();
            states
        };
        assert_eq!(fingerprints(&uninterrupted), fingerprints(&resumed), "[{device_name}] states differ");
    }
}

#[test]
fn checked_load_rejects_foreign_records_and_requantizes_other_block_sizes() {
    let device = Device::flex().autodiff();
    let trained_with = |optim: &mut ModuleOptimizer| train(model(&device), optim, &device, 2, 5);
    let mut adam = Adam8bitConfig::new().with_states(StateConfig::new().with_min_8bit_size(1024)).init();
    let net = trained_with(&mut adam);
    let record = || adam.to_record();

    let wrong_optimizer = load_record_checked(AdamW8bitConfig::new().init(), record(), &net, OptimizerKind::AdamW);
    assert!(matches!(wrong_optimizer, Err(LoadError::OptimizerMismatch { .. })), "{:?}", wrong_optimizer.err());

    let mut other_ids = net.clone();
    let mut wider = LinearConfig::new(96, 81).init(&device).weight;
    wider.id = net.weight.id;
    other_ids.weight = wider;
    let wrong_shape = load_record_checked(Adam8bitConfig::new().init(), record(), &other_ids, OptimizerKind::Adam);
    assert!(matches!(wrong_shape, Err(LoadError::ShapeMismatch { .. })), "{:?}", wrong_shape.err());

    let unknown = load_record_checked(Adam8bitConfig::new().init(), record(), &model(&device), OptimizerKind::Adam);
    assert!(matches!(unknown, Err(LoadError::UnknownParameter { .. })), "{:?}", unknown.err());

    let mut burn_adam = burn::optim::AdamConfig::new().init();
    let _ = train(net.clone(), &mut burn_adam, &device, 1, 5);
    let foreign = load_record_checked(Adam8bitConfig::new().init(), burn_adam.to_record(), &net, OptimizerKind::Adam);
    assert!(matches!(foreign, Err(LoadError::OptimizerMismatch { .. })), "{:?}", foreign.err());

    let mut reblocked = load_record_checked(
        Adam8bitConfig::new().with_states(StateConfig::new().with_min_8bit_size(1024).with_block_size(64)).init(),
        record(),
        &net,
        OptimizerKind::Adam,
    )
    .expect("another block size loads")
    .optimizer;
    let _ = train(net, &mut reblocked, &device, 1, 6);
    let report = StateReport::of(&reblocked).unwrap();
    let weight = report.parameters.iter().find(|p| p.elements == Some(96 * 80)).unwrap();
    // 2 states × (7680 codes + 7680/64 absmax · 4 bytes); the skip count is a scalar of the record.
    assert_eq!(weight.bytes, 2 * (7680 + 4 * 7680 / 64), "{report:?}");
}

#[test]
fn states_move_between_devices() {
    let devices = devices();
    let mut rng = Rng::new(1);
    let (a, b) = (&devices[0].1, &devices[devices.len() - 1].1);
    let optimizer = Adam8bitConfig::new().build();
    let p = Tensor::<1>::from_floats(rng.normals(6000).as_slice(), a);
    let g = Tensor::<1>::from_floats(rng.normals(6000).as_slice(), a);
    let (p, state) = optimizer.step(1e-3, p, g.clone(), None);
    let moved = <burn_8bit::Adam8bit as Optimizer>::to_device(state.clone().unwrap(), b);
    let (p_b, _) = optimizer.step(1e-3, p.clone().to_device(b), g.clone().to_device(b), Some(moved));
    let (p_a, _) = optimizer.step(1e-3, p, g, state);
    let worst = values(&p_a).iter().zip(values(&p_b)).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(worst <= 1e-6, "{worst}");
}

/// Percentile clipping equals feeding the unclipped optimizer gradients scaled on the host by
/// the ring rule of docs/algorithm.md §3.6, on the 8-bit and the `f32` path, on every backend.
#[test]
fn percentile_clipping_follows_the_ring_rule() {
    let percentile = 5;
    for (device_name, device) in devices() {
        for len in [9_000usize, 1_000] {
            let clipped = Adam8bitConfig::new().with_states(StateConfig::new().with_percentile_clipping(percentile)).build();
            let plain = Adam8bitConfig::new().build();
            let mut rng = Rng::new(21);
            let p0 = Tensor::<1>::from_floats(rng.normals(len).as_slice(), &device);
            let (mut p_clipped, mut p_reference, mut p_raw) = (p0.clone(), p0.clone(), p0);
            let (mut s_clipped, mut s_reference, mut s_raw) = (None, None, None);
            let mut ring = [0f64; 100];
            let mut clipped_steps = 0;
            for t in 1..=12usize {
                let spike = if t % 4 == 0 { 50.0 } else { 1.0 };
                let g: Vec<f32> = rng.normals(len).iter().map(|x| x * spike).collect();
                let norm2: f64 = g.iter().map(|&x| f64::from(x).powi(2)).sum();
                if t == 1 {
                    ring = [norm2; 100];
                } else {
                    ring[t % 100] = norm2;
                }
                let mut sorted = ring;
                sorted.sort_by(f64::total_cmp);
                let (clip, norm) = (sorted[percentile].sqrt(), norm2.sqrt());
                let factor = if norm > clip { clip / norm } else { 1.0 };
                clipped_steps += usize::from(factor < 1.0);
                let scaled: Vec<f32> = g.iter().map(|&x| x * factor as f32).collect();
                let tensor = |values: &[f32]| Tensor::<1>::from_floats(values, &device);
                (p_clipped, s_clipped) = clipped.step(1e-2, p_clipped, tensor(&g), s_clipped);
                (p_reference, s_reference) = plain.step(1e-2, p_reference, tensor(&scaled), s_reference);
                (p_raw, s_raw) = plain.step(1e-2, p_raw, tensor(&g), s_raw);
            }
            let (c, r, raw) = (values(&p_clipped), values(&p_reference), values(&p_raw));
            let label = format!("[{device_name}] n={len}");
            assert!(clipped_steps >= 3, "{label}: only {clipped_steps} steps clipped");
            let off = distance(&c, &r);
            let effect = distance(&c, &raw);
            println!("{label}: ‖clipped − host-scaled‖ = {off:.3e}, ‖clipped − unclipped‖ = {effect:.3e}");
            assert!(off <= 1e-3 * effect, "{label}: {off} vs {effect}");
            assert_eq!(s_clipped.unwrap().size_bytes(), s_reference.unwrap().size_bytes() + 400);
        }
    }
    assert!(matches!(
        Adam8bitConfig::new().with_states(StateConfig::new().with_percentile_clipping(101)).try_build(),
        Err(ConfigError::OutOfRange { name: "states.percentile_clipping", .. })
    ));
}
