//! Block-wise 4-bit optimizer states (`StateConfig::state_bits = 4`, the `FourBit` maps): their
//! memory, their records and conversions to and from 8-bit ones, and their agreement across
//! backends, on every backend compiled in.

mod common;

use burn::optim::{AdamWConfig, Optimizer};
use burn::tensor::{Device, Tensor};
use burn_8bit::optim::{StateSlot, SwitchRecord};
use burn_8bit::{
    AdamW8bitConfig, MapFamily, MapKind, Optim8bitConfig, OptimizerKind, StateConfig, StateReport,
    load_record_checked,
};
use common::{Rng, assert_agrees_with_first_backend, devices, distance, model, train, values, weights};

/// Block-wise 4-bit states (torchao's layout; `tests/rank1_states.rs` covers the rank-1 second
/// moment) at the paper's block size; the model's weight (7680 elements) is quantized, its bias
/// (80) keeps `f32` states.
fn four_bit() -> StateConfig {
    StateConfig::new().with_state_bits(4).with_block_size(128).with_min_8bit_size(1024).with_rank1_second_moment(false)
}

fn eight_bit() -> StateConfig {
    StateConfig::new().with_min_8bit_size(1024)
}

/// Bytes of state per element of the model's weight, as `StateReport` counts them.
fn weight_state_bytes_per_element(report: &StateReport) -> f64 {
    let weight = report.parameters.iter().find(|p| p.elements == Some(96 * 80)).expect("the weight's state");
    let expected_bits = if weight.bytes < 2 * 96 * 80 { 4 } else { 8 };
    assert_eq!(weight.state_bits, Some(expected_bits), "the report names the width its bytes show");
    weight.bytes as f64 / (96.0 * 80.0)
}

#[test]
fn four_bit_adamw_keeps_half_the_state_of_eight_bit() {
    let device = Device::flex().autodiff();
    let mut per_element = Vec::new();
    for states in [eight_bit(), four_bit()] {
        let mut optim = AdamW8bitConfig::new().with_states(states).init();
        train(model(&device), &mut optim, &device, 2, 5);
        let report = StateReport::of(&optim).unwrap();
        let bias = report.parameters.iter().find(|p| p.elements == Some(80)).expect("the bias's state");
        assert_eq!(bias.state_bits, Some(32), "a tensor under min_8bit_size keeps f32 states");
        per_element.push(weight_state_bytes_per_element(&report));
    }
    println!("bytes of state per element: 8-bit {:.4}, 4-bit {:.4}", per_element[0], per_element[1]);
    // Codes: 2 states × 1 byte or ½ byte; absmax: 2 states × 4 bytes per block of 256 or 128;
    // the step count and skip counter add a few bytes per tensor.
    let codes_and_absmax = [2.0 + 8.0 / 256.0, 1.0 + 8.0 / 128.0];
    for (measured, expected) in per_element.iter().zip(codes_and_absmax) {
        assert!(*measured >= expected && *measured < expected + 0.01, "{measured} vs {expected}");
    }
}

#[test]
fn four_bit_records_reload_bit_identically_and_convert_to_and_from_eight_bit() {
    let device = Device::flex().autodiff();
    let mut original = AdamW8bitConfig::new().with_states(four_bit()).init();
    let net = train(model(&device), &mut original, &device, 5, 5);
    let record = || original.to_record();
    let load = |states: StateConfig, record| {
        load_record_checked(AdamW8bitConfig::new().with_states(states).init(), record, &net, OptimizerKind::AdamW)
            .expect("the record loads")
            .optimizer
    };

    let mut reloaded = load(four_bit(), record());
    let mut as_eight_bit = load(eight_bit(), record());
    assert_eq!(StateReport::of(&reloaded).unwrap(), StateReport::of(&original).unwrap(), "the round trip keeps every bit");
    let continued = weights(&train(net.clone(), &mut original, &device, 5, 6));
    let resumed = weights(&train(net.clone(), &mut reloaded, &device, 5, 6));
    assert!(continued.iter().zip(&resumed).all(|(a, b)| a.to_bits() == b.to_bits()), "the reloaded run continues bit for bit");

    // Loading into an 8-bit optimizer re-quantizes the decoded moments; a restart from zero
    // state lands elsewhere.
    let mut fresh = AdamW8bitConfig::new().with_states(eight_bit()).init();
    let converted = weights(&train(net.clone(), &mut as_eight_bit, &device, 5, 6));
    let restarted = weights(&train(net.clone(), &mut fresh, &device, 5, 6));
    let (converted_gap, restart_gap) = (distance(&converted, &continued), distance(&restarted, &continued));
    println!("4 → 8 bits: ‖converted − continued‖ {converted_gap:.3e}, ‖restarted − continued‖ {restart_gap:.3e}");
    assert!(converted_gap < 0.5 * restart_gap, "{converted_gap} vs {restart_gap}");

    // And back: an 8-bit record loads into a 4-bit optimizer, which re-quantizes the states
    // with the 4-bit maps at its next step.
    let eight_bit_record = as_eight_bit.to_record();
    let mut back = load(four_bit(), eight_bit_record);
    assert!(weight_state_bytes_per_element(&StateReport::of(&back).unwrap()) > 2.0, "loaded as recorded");
    train(net, &mut back, &device, 1, 7);
    let stepped = weight_state_bytes_per_element(&StateReport::of(&back).unwrap());
    assert!(stepped < 1.1, "the converted states are 4-bit: {stepped} bytes per element");
}

/// A run of Burn's 32-bit AdamW continues on 4-bit states through its record, and goes back.
#[test]
fn burn_adamw_runs_switch_to_four_bit_states_and_back() {
    let device = Device::flex().autodiff();
    let mut burn = AdamWConfig::new().init();
    let halfway = train(model(&device), &mut burn, &device, 4, 1);
    let record = || burn.to_record();
    let stayed = weights(&train(halfway.clone(), &mut AdamWConfig::new().init().load_record(record()), &device, 2, 2));
    let restarted = weights(&train(halfway.clone(), &mut AdamWConfig::new().init(), &device, 2, 2));

    let four_bit_optim = || AdamW8bitConfig::new().with_states(four_bit());
    let imported = four_bit_optim().build().from_burn_record(record()).expect("Burn's AdamW record imports");
    let mut switched = load_record_checked(four_bit_optim().init(), imported, &halfway, OptimizerKind::AdamW)
        .expect("the imported record loads")
        .optimizer;
    let switched_model = train(halfway.clone(), &mut switched, &device, 2, 2);
    let per_element = weight_state_bytes_per_element(&StateReport::of(&switched).unwrap());
    assert!(per_element < 1.1, "the imported states are 4-bit: {per_element} bytes per element");
    let (off, reference) = (distance(&weights(&switched_model), &stayed), distance(&restarted, &stayed));
    println!("‖switched to 4-bit − stayed‖ {off:.3e}, ‖restart − stayed‖ {reference:.3e}");
    assert!(off < 0.2 * reference, "switching lost the state ({off} vs {reference})");

    let exported = four_bit_optim().build().to_burn_record(switched.to_record()).expect("the 4-bit record exports");
    let mut back = AdamWConfig::new().init().load_record(exported);
    train(switched_model, &mut back, &device, 1, 3);
}

#[test]
fn four_bit_states_use_the_four_bit_maps_and_agree_across_backends() {
    const LEN: usize = 5000;
    let mut reference = None;
    for (name, device) in devices() {
        let optim = AdamW8bitConfig::new().with_states(four_bit()).build();
        let mut rng = Rng::new(9);
        let mut p = Tensor::<1>::from_floats(rng.normals(LEN).as_slice(), &device);
        let mut state = None;
        for _ in 0..10 {
            let g = Tensor::<1>::from_floats(rng.normals(LEN).as_slice(), &device).mul_scalar(0.01);
            let (next, next_state) = optim.step(1e-3, p, g, state);
            p = next;
            state = next_state;
        }
        let state = state.expect("a state after a step");
        assert_eq!(state.map_family(), MapFamily::FourBit);
        let codes: Vec<Vec<u8>> = state
            .slots()
            .iter()
            .zip([MapKind::DynamicSigned4, MapKind::LinearUnsigned4])
            .map(|(slot, map)| match slot {
                StateSlot::Quantized(q) => {
                    assert_eq!(q.map(), map, "{name}");
                    assert_eq!(q.codes().dims()[0], LEN.div_ceil(8), "{name}: eight codes per word");
                    q.unpacked_codes()
                }
                StateSlot::Rank1(_) | StateSlot::Full(_) => panic!("{name}: expected a block-wise 4-bit state"),
            })
            .collect();
        assert!(codes.iter().flatten().all(|&code| code < 16), "{name}");
        assert_agrees_with_first_backend(&mut reference, name, (values(&p), codes));
    }
}
