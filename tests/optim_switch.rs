//! Switching a run between Burn's 32-bit optimizers and their 8-bit twins through records.

mod common;

use burn::optim::momentum::MomentumConfig;
use burn::optim::{
    AdaGradConfig, AdamConfig, AdamWConfig, LambConfig, LionConfig, ModuleOptimizer,
    OptimizerRecord, RmsPropConfig, SgdConfig,
};
use burn::tensor::Device;
use burn_8bit::optim::SwitchRecord;
use burn_8bit::{
    AdaGrad8bitConfig, Adam8bitConfig, AdamW8bitConfig, Lamb8bitConfig, Lars8bitConfig, Lion8bitConfig,
    LoadError, Optim8bitConfig, OptimizerKind, RmsProp8bitConfig, Sgd8bitConfig, StateConfig, StateReport,
    load_record_checked,
};
use common::{distance, model, train, weights};

struct Pair {
    name: &'static str,
    kind: OptimizerKind,
    burn: Box<dyn Fn() -> ModuleOptimizer>,
    eight: Box<dyn Fn() -> ModuleOptimizer>,
    import: Box<dyn Fn(OptimizerRecord) -> Result<OptimizerRecord, LoadError>>,
    export: Box<dyn Fn(OptimizerRecord) -> Result<OptimizerRecord, LoadError>>,
}

macro_rules! pair {
    ($name:expr, $kind:expr, $burn:expr, $eight:expr) => {
        Pair {
            name: $name,
            kind: $kind,
            burn: Box::new(|| $burn.init()),
            eight: Box::new(|| $eight.with_states(StateConfig::new().with_min_8bit_size(1024)).init()),
            import: Box::new(|record| $eight.with_states(StateConfig::new().with_min_8bit_size(1024)).build().from_burn_record(record)),
            export: Box::new(|record| $eight.with_states(StateConfig::new().with_min_8bit_size(1024)).build().to_burn_record(record)),
        }
    };
}

fn pairs() -> Vec<Pair> {
    vec![
        pair!("Adam", OptimizerKind::Adam, AdamConfig::new(), Adam8bitConfig::new()),
        pair!("AdamW (AMSGrad)", OptimizerKind::AdamW, AdamWConfig::new().with_amsgrad(true), AdamW8bitConfig::new().with_amsgrad(true)),
        pair!("SGD (momentum)", OptimizerKind::Sgd, SgdConfig::new().with_momentum(Some(MomentumConfig::new())), Sgd8bitConfig::new().with_momentum(Some(MomentumConfig::new()))),
        pair!("RMSprop (centred)", OptimizerKind::RmsProp, RmsPropConfig::new().with_centered(true), RmsProp8bitConfig::new().with_centered(true)),
        pair!("Adagrad", OptimizerKind::AdaGrad, AdaGradConfig::new(), AdaGrad8bitConfig::new()),
        pair!("Lion", OptimizerKind::Lion, LionConfig::new(), Lion8bitConfig::new()),
        pair!("LAMB", OptimizerKind::Lamb, LambConfig::new(), Lamb8bitConfig::new()),
    ]
}

/// A new optimizer with a Burn twin fails here until it has a pair above.
#[test]
fn every_optimizer_with_a_burn_twin_has_a_pair() {
    let paired: Vec<OptimizerKind> = pairs().iter().map(|pair| pair.kind).collect();
    for kind in OptimizerKind::ALL.into_iter().filter(|&kind| burn_8bit_conformance::optimizers::burn_twin(kind).is_some()) {
        assert!(paired.contains(&kind), "{} has a Burn twin but no switching pair", kind.name());
    }
}

/// A run started with Burn's optimizer continues with the 8-bit twin (and back) close to the
/// run that never switched, and far from a restart with fresh state (within a fifth of the
/// restart's distance: Lion's sign update turns a few quantization-flipped signs into full
/// steps, the others stay within a hundredth).
#[test]
fn runs_switch_between_32_and_8_bit_state_without_restarting() {
    let device = Device::flex().autodiff();
    for pair in pairs() {
        let start = model(&device);
        let mut burn = (pair.burn)();
        let halfway = train(start, &mut burn, &device, 4, 1);
        let record = || burn.to_record();

        let mut stayed = (pair.burn)().load_record(record());
        let stayed = weights(&train(halfway.clone(), &mut stayed, &device, 2, 2));
        let mut restarted = (pair.burn)();
        let restarted = weights(&train(halfway.clone(), &mut restarted, &device, 2, 2));

        let imported = (pair.import)(record()).unwrap_or_else(|e| panic!("{}: {e}", pair.name));
        let mut eight = load_record_checked((pair.eight)(), imported, &halfway, pair.kind)
            .unwrap_or_else(|e| panic!("{}: {e}", pair.name))
            .optimizer;
        let report = StateReport::of(&eight).unwrap();
        assert!(report.parameters.iter().any(|p| p.quantized), "{}: no 8-bit state after import", pair.name);
        let switched_model = train(halfway.clone(), &mut eight, &device, 2, 2);
        let switched = weights(&switched_model);

        let exported = (pair.export)(eight.to_record()).unwrap_or_else(|e| panic!("{}: {e}", pair.name));
        let mut back = (pair.burn)().load_record(exported);
        let _ = train(switched_model, &mut back, &device, 1, 3);

        let mut round_trip = (pair.burn)().load_record((pair.export)((pair.import)(record()).unwrap()).unwrap());
        let round_trip = weights(&train(halfway.clone(), &mut round_trip, &device, 2, 2));

        let reference = distance(&stayed, &restarted);
        let off = distance(&switched, &stayed);
        let off_round_trip = distance(&round_trip, &stayed);
        println!(
            "{}: ‖switched − stayed‖ = {off:.3e}, ‖round trip − stayed‖ = {off_round_trip:.3e}, ‖restart − stayed‖ = {reference:.3e}",
            pair.name
        );
        assert!(off < 0.2 * reference, "{}: switching lost the state ({off} vs {reference})", pair.name);
        assert!(off_round_trip < 0.2 * reference, "{}: the round trip lost the state", pair.name);
    }
}

#[test]
fn optimizers_without_a_burn_twin_and_foreign_records_are_errors() {
    let device = Device::flex().autodiff();
    let mut burn = AdamConfig::new().init();
    let _ = train(model(&device), &mut burn, &device, 1, 1);
    assert!(Lars8bitConfig::new().build().from_burn_record(burn.to_record()).is_err());
    assert!(matches!(Sgd8bitConfig::new().with_momentum(Some(MomentumConfig::new())).build().from_burn_record(burn.to_record()), Err(LoadError::Corrupt { .. })));
    assert!(matches!(Adam8bitConfig::new().build().to_burn_record(burn.to_record()), Err(LoadError::Corrupt { .. } | LoadError::OptimizerMismatch { .. })));
}
