//! 4-bit second moments under rank-1 normalisation (`StateConfig::rank1_second_moment`, on by
//! default with 4-bit states): their memory, their records and conversions, and their agreement
//! across backends, on every backend compiled in.

mod common;

use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer, Optimizer};
use burn::tensor::{Device, Tensor};
use burn_8bit::optim::{StateSlot, SwitchRecord};
use burn_8bit::{
    AdEMAMix8bitConfig, AdaGrad8bitConfig, Adam8bitConfig, AdamW8bitConfig, Lamb8bitConfig, Optim8bit, Optim8bitConfig,
    OptimizerKind, RmsProp8bitConfig, StateConfig, StateReport, UpdateRule, load_record_checked,
};
use common::{BackendRun, Rng, assert_agrees_with_first_backend, devices, distance, values};

/// 4-bit states at the paper's block size, with the second moment rank-1 where its shape takes
/// it (the default) or block-wise everywhere (torchao's variant).
fn four_bit(rank1: bool) -> StateConfig {
    StateConfig::new().with_state_bits(4).with_block_size(128).with_rank1_second_moment(rank1)
}

/// `steps` steps of `optim` at learning rate 1e-2 on the mean square of a linear layer's output
/// for batches of 8 normal inputs drawn from `seed`.
fn train(model: Linear, optim: &mut ModuleOptimizer, device: &Device, steps: usize, seed: u64) -> Linear {
    let inputs = model.weight.dims()[0];
    let mut model = model;
    let mut rng = Rng::new(seed);
    for _ in 0..steps {
        let x = Tensor::<1>::from_floats(rng.normals(8 * inputs).as_slice(), device).reshape([8, inputs]);
        let loss = model.forward(x).powi_scalar(2).mean();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-2, model, grads);
    }
    model
}

fn weights(model: &Linear) -> Vec<f32> {
    model.weight.val().inner().reshape([-1]).into_data().try_to_vec::<f32>().unwrap()
}

/// The weight's entry of a state report: bytes per element and whether it is rank-1.
fn weight_state(report: &StateReport, elements: u64) -> (f64, bool) {
    let weight = report.parameters.iter().find(|p| p.elements == Some(elements)).expect("the weight's state");
    assert_eq!(weight.state_bits, Some(4));
    (weight.bytes as f64 / elements as f64, weight.rank1)
}

/// The memory target: AdamW with 4-bit states keeps at most 1.04 bytes per parameter of
/// a 1024 × 1024 weight (rank-1 norms: 4 · 2048 bytes where block-wise absmax of the second
/// moment takes 4 · 8192).
#[test]
fn rank1_adamw_keeps_at_most_1_04_bytes_of_state_per_parameter() {
    let device = Device::flex().autodiff();
    let elements = 1024 * 1024;
    let mut measured = Vec::new();
    for rank1 in [true, false] {
        let mut optim = AdamW8bitConfig::new().with_states(four_bit(rank1)).init();
        train(LinearConfig::new(1024, 1024).init(&device), &mut optim, &device, 2, 1);
        let (bytes, is_rank1) = weight_state(&StateReport::of(&optim).unwrap(), elements);
        assert_eq!(is_rank1, rank1, "the report says how the second moment is held");
        measured.push(bytes);
    }
    println!("bytes of state per parameter: rank-1 {:.4}, block-wise {:.4}", measured[0], measured[1]);
    // Codes: ½ + ½ byte; the first moment's absmax 4 / 128; the second moment's norms
    // 4 · 2048 / 2^20 (rank-1) or 4 / 128 (block-wise).
    assert_eq!(measured[0], 1.0 + 4.0 / 128.0 + 4.0 * 2048.0 / elements as f64);
    assert_eq!(measured[1], 1.0 + 8.0 / 128.0);
    assert!(measured[0] <= 1.04, "{} bytes per parameter", measured[0]);
}

/// A 512 × 256 weight, whose second moment is rank-1.
fn model(device: &Device) -> Linear {
    LinearConfig::new(512, 256).init(device)
}

#[test]
fn rank1_records_reload_bit_identically_and_convert_to_every_other_layout() {
    let device = Device::flex().autodiff();
    let elements = 512 * 256;
    let mut original = AdamW8bitConfig::new().with_states(four_bit(true)).init();
    let net = train(model(&device), &mut original, &device, 5, 5);
    assert!(weight_state(&StateReport::of(&original).unwrap(), elements).1, "the weight's second moment is rank-1");
    let load = |states: StateConfig, record| {
        load_record_checked(AdamW8bitConfig::new().with_states(states).init(), record, &net, OptimizerKind::AdamW)
            .expect("the record loads")
            .optimizer
    };
    let mut reloaded = load(four_bit(true), original.to_record());
    // Into block-wise 4-bit and 8-bit states: the decoded moments are re-quantized at the next step.
    let converted_layouts = [("block-wise 4-bit", four_bit(false)), ("8-bit", StateConfig::new())];
    let mut converted: Vec<_> = converted_layouts.into_iter().map(|(name, states)| (name, load(states, original.to_record()))).collect();

    assert_eq!(StateReport::of(&reloaded).unwrap(), StateReport::of(&original).unwrap(), "the round trip keeps every bit");
    let continued = weights(&train(net.clone(), &mut original, &device, 5, 6));
    let resumed = weights(&train(net.clone(), &mut reloaded, &device, 5, 6));
    assert!(continued.iter().zip(&resumed).all(|(a, b)| a.to_bits() == b.to_bits()), "the reloaded run continues bit for bit");

    let mut fresh = AdamW8bitConfig::new().with_states(four_bit(true)).init();
    let restart_gap = distance(&weights(&train(net.clone(), &mut fresh, &device, 5, 6)), &continued);
    for (name, optim) in &mut converted {
        let gap = distance(&weights(&train(net.clone(), optim, &device, 5, 6)), &continued);
        println!("rank-1 → {name}: ‖converted − continued‖ {gap:.3e}, ‖restarted − continued‖ {restart_gap:.3e}");
        assert!(gap < 0.5 * restart_gap, "{name}: {gap} vs {restart_gap}");
        // And back: the converted record loads into a rank-1 optimizer, which re-quantizes its
        // second moment under rank-1 norms at the next step.
        let mut back = load(four_bit(true), optim.to_record());
        train(net.clone(), &mut back, &device, 1, 7);
        let (bytes, rank1) = weight_state(&StateReport::of(&back).unwrap(), elements);
        let rank1_bytes = 1.0 + 4.0 / 128.0 + 4.0 * (512.0 + 256.0) / elements as f64;
        assert!(rank1 && bytes == rank1_bytes, "{name} → rank-1: {bytes} bytes per element, rank-1 {rank1}");
    }
}

/// A run of Burn's 32-bit AdamW continues on rank-1 states through its record, and goes back.
#[test]
fn burn_adamw_runs_switch_to_rank1_states_and_back() {
    let device = Device::flex().autodiff();
    let mut burn = AdamWConfig::new().init();
    let halfway = train(model(&device), &mut burn, &device, 4, 1);
    let record = || burn.to_record();
    let stayed = weights(&train(halfway.clone(), &mut AdamWConfig::new().init().load_record(record()), &device, 2, 2));
    let restarted = weights(&train(halfway.clone(), &mut AdamWConfig::new().init(), &device, 2, 2));

    let rank1_optim = || AdamW8bitConfig::new().with_states(four_bit(true));
    let imported = rank1_optim().build().from_burn_record(record()).expect("Burn's AdamW record imports");
    let mut switched = load_record_checked(rank1_optim().init(), imported, &halfway, OptimizerKind::AdamW)
        .expect("the imported record loads")
        .optimizer;
    assert!(weight_state(&StateReport::of(&switched).unwrap(), 512 * 256).1, "imported as rank-1");
    let switched_model = train(halfway.clone(), &mut switched, &device, 2, 2);
    let (off, reference) = (distance(&weights(&switched_model), &stayed), distance(&restarted, &stayed));
    println!("‖switched to rank-1 − stayed‖ {off:.3e}, ‖restart − stayed‖ {reference:.3e}");
    assert!(off < 0.2 * reference, "switching lost the state ({off} vs {reference})");

    let exported = rank1_optim().build().to_burn_record(switched.to_record()).expect("the rank-1 record exports");
    let mut back = AdamWConfig::new().init().load_record(exported);
    train(switched_model, &mut back, &device, 1, 3);
}

/// Parameter and every slot's codes after ten steps of `optim` on a 256 × 384 parameter of
/// `device`, and whether each slot is rank-1.
fn ten_steps<R: UpdateRule>(optim: &Optim8bit<R>, device: &Device) -> (BackendRun, Vec<bool>) {
    const ROWS: usize = 256;
    const COLS: usize = 384;
    let mut rng = Rng::new(9);
    let mut p = Tensor::<1>::from_floats(rng.normals(ROWS * COLS).as_slice(), device).reshape([ROWS, COLS]);
    let mut state = None;
    for _ in 0..10 {
        let g = Tensor::<1>::from_floats(rng.normals(ROWS * COLS).as_slice(), device).reshape([ROWS, COLS]).mul_scalar(0.01);
        let (next, next_state) = optim.step(1e-3, p, g, state);
        p = next;
        state = next_state;
    }
    let state = state.expect("a state after a step");
    let (codes, rank1) = state
        .slots()
        .iter()
        .map(|slot| match slot {
            StateSlot::Quantized(q) => (q.unpacked_codes(), false),
            StateSlot::Rank1(q) => {
                assert_eq!((q.row_norms().len(), q.col_norms().len()), (ROWS, COLS));
                (q.unpacked_codes(), true)
            }
            StateSlot::Full(_) => panic!("expected 4-bit states"),
        })
        .unzip();
    ((values(&p.reshape([-1])), codes), rank1)
}

/// Every rule with a non-negative state keeps its first such state rank-1 and steps it alike on
/// every backend: Adam (with AMSGrad, whose running maximum stays block-wise), AdamW, RMSprop
/// (centred), Adagrad, AdEMAMix (its third state) and LAMB (whose trust ratio's first pass reads
/// the rank-1 state).
#[test]
fn rank1_states_agree_across_backends_for_every_rule_with_a_second_moment() {
    let cases: Vec<(&str, Vec<bool>, Box<dyn Fn(&Device) -> (BackendRun, Vec<bool>)>)> = vec![
        ("AdamW", vec![false, true], Box::new(|device| ten_steps(&AdamW8bitConfig::new().with_states(four_bit(true)).build(), device))),
        ("Adam amsgrad", vec![false, true, false], Box::new(|device| ten_steps(&Adam8bitConfig::new().with_amsgrad(true).with_states(four_bit(true)).build(), device))),
        ("RMSprop centred", vec![true, false, false], Box::new(|device| ten_steps(&RmsProp8bitConfig::new().with_centered(true).with_states(four_bit(true)).build(), device))),
        ("Adagrad", vec![true], Box::new(|device| ten_steps(&AdaGrad8bitConfig::new().with_states(four_bit(true)).build(), device))),
        ("AdEMAMix", vec![false, false, true], Box::new(|device| ten_steps(&AdEMAMix8bitConfig::new().with_states(four_bit(true)).build(), device))),
        ("LAMB", vec![false, true], Box::new(|device| ten_steps(&Lamb8bitConfig::new().with_states(four_bit(true)).build(), device))),
    ];
    for (rule, expected_rank1, run) in cases {
        let mut reference = None;
        for (name, device) in devices() {
            let (result, rank1) = run(&device);
            assert_eq!(rank1, expected_rank1, "{rule} on {name}: which slots are rank-1");
            assert_agrees_with_first_backend(&mut reference, &format!("{rule} on {name}"), result);
        }
    }
}
