//! The 8-bit optimizers against 32-bit references, the way bitsandbytes tests its own: each step
//! starts both from the 8-bit run's parameter and decoded states (re-synchronised), then the
//! 8-bit states must match the reference's within atol 3e-3 / rtol 1e-3 (fewer than 20 elements
//! off) and the parameters within a mean |Δp| of 6e-5. References are Burn's own optimizers
//! (AdEMAMix, which Burn lacks, is written here). Heavy shapes run on Flex.

mod common;

use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::{MomentumConfig, MomentumState};
use burn::optim::{
    AdaGradConfig, AdaGradState, AdamConfig, AdamState, AdamWConfig, AdamWState,
    AdaptiveMomentumState, LambConfig, LambState, LionConfig, LionState, LrDecayState, Optimizer, RmsPropConfig,
    RmsPropMomentumState, RmsPropState, SgdConfig, SgdState, SquareAvgState, CenteredState,
};
use burn::tensor::{Device, Tensor};
use burn_8bit::{
    AdEMAMix8bitConfig, AdaGrad8bitConfig, Adam8bitConfig, AdamW8bitConfig, Lamb8bitConfig, Lars8bitConfig,
    Lion8bitConfig, Optim8bitConfig, Optim8bitState, RmsProp8bitConfig, Sgd8bitConfig,
};
use common::Rng;

type State = Optim8bitState<2>;
type OursStep = Box<dyn Fn(f64, Tensor<2>, Tensor<2>, Option<State>) -> (Tensor<2>, Option<State>)>;
/// The reference step from the 8-bit run's parameter and state (`None` on step 1): the new
/// parameter and the new states in the 8-bit optimizer's slot order.
type ReferenceStep = Box<dyn Fn(f64, Tensor<2>, Tensor<2>, Option<&State>) -> (Tensor<2>, Vec<Tensor<2>>)>;

struct Case {
    name: &'static str,
    lr: f64,
    /// States of order 1e-2 and below are compared with the absolute tolerance; RMSprop's
    /// momentum buffer holds normalised gradients (order 10), where only the parameter is.
    compare_states: bool,
    ours: OursStep,
    reference: ReferenceStep,
}

fn ours<O: Optimizer<State<2> = State> + 'static>(optimizer: O) -> OursStep {
    Box::new(move |lr, p, g, s| optimizer.step(lr, p, g, s))
}

fn decoded(state: &State) -> Vec<Tensor<2>> {
    state.decoded().into_iter().map(|d| d.values).collect()
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "Adam8bit",
            compare_states: true,
            lr: 1e-3,
            ours: ours(Adam8bitConfig::new().with_weight_decay(Some(WeightDecayConfig::new(1e-2))).build()),
            reference: Box::new(|lr, p, g, s| {
                let reference = AdamConfig::new().with_weight_decay(Some(WeightDecayConfig::new(1e-2))).build();
                let state = s.map(|s| {
                    let d = decoded(s);
                    AdamState::new(AdaptiveMomentumState::new(s.time(), d[0].clone(), d[1].clone()))
                });
                let (p, s) = reference.step(lr, p, g, state);
                let m = s.unwrap().momentum;
                (p, vec![m.moment_1, m.moment_2])
            }),
        },
        Case {
            name: "AdamW8bit (AMSGrad)",
            compare_states: true,
            lr: 1e-3,
            ours: ours(AdamW8bitConfig::new().with_weight_decay(1e-2).with_amsgrad(true).build()),
            reference: Box::new(|lr, p, g, s| {
                let reference = AdamWConfig::new().with_weight_decay(1e-2).with_amsgrad(true).build();
                let state = s.map(|s| {
                    let d = decoded(s);
                    let mut momentum = AdaptiveMomentumState::new(s.time(), d[0].clone(), d[1].clone());
                    momentum.max_moment_2 = Some(d[2].clone());
                    AdamWState::new(momentum)
                });
                let (p, s) = reference.step(lr, p, g, state);
                let m = s.unwrap().momentum;
                (p, vec![m.moment_1, m.moment_2, m.max_moment_2.unwrap()])
            }),
        },
        Case {
            name: "Sgd8bit",
            compare_states: true,
            lr: 1e-2,
            ours: ours(Sgd8bitConfig::new().with_momentum(Some(MomentumConfig::new())).build()),
            reference: Box::new(|lr, p, g, s| {
                let reference = SgdConfig::new().with_momentum(Some(MomentumConfig::new())).build();
                let state = s.map(|s| SgdState::new(Some(MomentumState::new(decoded(s)[0].clone()))));
                let (p, _) = reference.step(lr, p.clone(), g.clone(), state.clone());
                // Burn's velocity is private; it is μ·v + (1 − dampening)·g, as its step shows.
                let velocity = match s {
                    None => g,
                    Some(s) => decoded(s)[0].clone() * 0.9 + g * 0.9,
                };
                (p, vec![velocity])
            }),
        },
        Case {
            name: "Sgd8bit (Burn's default: no momentum; L2 penalty)",
            compare_states: true,
            lr: 1e-2,
            ours: ours(Sgd8bitConfig::new().with_weight_decay(Some(WeightDecayConfig::new(1e-2))).build()),
            reference: Box::new(|lr, p, g, _| {
                let reference = SgdConfig::new().with_weight_decay(Some(WeightDecayConfig::new(1e-2))).build();
                let (p, _) = reference.step(lr, p, g, None);
                (p, Vec::new())
            }),
        },
        Case {
            name: "RmsProp8bit (bitsandbytes' settings: no momentum)",
            compare_states: true,
            lr: 1e-3,
            ours: ours(RmsProp8bitConfig::new().with_momentum(0.0).build()),
            reference: Box::new(|lr, p, g, s| {
                let reference = RmsPropConfig::new().with_momentum(0.0).build();
                let state = s.map(|s| {
                    let d = decoded(s);
                    RmsPropState::new(SquareAvgState::new(d[0].clone()), CenteredState::new(None, d[0].clone()), None)
                });
                let (p, s) = reference.step(lr, p, g, state);
                (p, vec![s.unwrap().square_avg.square_avg])
            }),
        },
        Case {
            name: "RmsProp8bit (centred)",
            compare_states: true,
            lr: 1e-3,
            ours: ours(RmsProp8bitConfig::new().with_momentum(0.0).with_centered(true).build()),
            reference: Box::new(|lr, p, g, s| {
                let reference = RmsPropConfig::new().with_momentum(0.0).with_centered(true).build();
                let state = s.map(|s| {
                    let d = decoded(s);
                    let avg = d[0].clone() - d[1].clone().square();
                    RmsPropState::new(SquareAvgState::new(d[0].clone()), CenteredState::new(Some(d[1].clone()), avg), None)
                });
                let (p, s) = reference.step(lr, p, g, state);
                let s = s.unwrap();
                (p, vec![s.square_avg.square_avg, s.centered.grad_avg.unwrap()])
            }),
        },
        Case {
            name: "RmsProp8bit (Burn's defaults: momentum 0.9)",
            compare_states: false,
            lr: 1e-3,
            ours: ours(RmsProp8bitConfig::new().build()),
            reference: Box::new(|lr, p, g, s| {
                let reference = RmsPropConfig::new().build();
                let state = s.map(|s| {
                    let d = decoded(s);
                    RmsPropState::new(
                        SquareAvgState::new(d[0].clone()),
                        CenteredState::new(None, d[0].clone()),
                        Some(RmsPropMomentumState::new(d[1].clone())),
                    )
                });
                let (p, s) = reference.step(lr, p, g, state);
                (p, vec![s.unwrap().square_avg.square_avg])
            }),
        },
        Case {
            name: "AdaGrad8bit",
            compare_states: true,
            lr: 1e-2,
            ours: ours(AdaGrad8bitConfig::new().build()),
            reference: Box::new(|lr, p, g, s| {
                let reference = AdaGradConfig::new().build();
                let state = s.map(|s| AdaGradState::new(LrDecayState::new(s.time(), decoded(s)[0].clone())));
                let sum = match s {
                    None => g.clone().square(),
                    Some(s) => decoded(s)[0].clone() + g.clone().square(),
                };
                let (p, _) = reference.step(lr, p, g, state);
                (p, vec![sum])
            }),
        },
        Case {
            name: "Lion8bit",
            compare_states: true,
            lr: 1e-4,
            ours: ours(Lion8bitConfig::new().with_weight_decay(0.1).build()),
            reference: Box::new(|lr, p, g, s| {
                let reference = LionConfig::new().with_weight_decay(0.1).build();
                let state = s.map(|s| LionState::new(decoded(s)[0].clone()));
                let (p, s) = reference.step(lr, p, g, state);
                (p, vec![s.unwrap().momentum])
            }),
        },
        Case {
            name: "Lamb8bit",
            compare_states: true,
            lr: 1e-3,
            ours: ours(Lamb8bitConfig::new().with_weight_decay(0.01).build()),
            reference: Box::new(|lr, p, g, s| {
                let reference = LambConfig::new().with_weight_decay(0.01).build();
                let state = s.map(|s| {
                    let d = decoded(s);
                    LambState { time: s.time(), moment_1: d[0].clone(), moment_2: d[1].clone() }
                });
                let (p, s) = reference.step(lr, p, g, state);
                let s = s.unwrap();
                (p, vec![s.moment_1, s.moment_2])
            }),
        },
        Case {
            name: "Lars8bit",
            compare_states: true,
            lr: 1e-1,
            ours: ours(Lars8bitConfig::new().with_weight_decay(1e-4).build()),
            reference: Box::new(|lr, p, g, s| lars_reference(lr, p, g, s)),
        },
        Case {
            name: "AdEMAMix8bit",
            compare_states: true,
            lr: 1e-3,
            ours: ours(AdEMAMix8bitConfig::new().build()),
            reference: Box::new(|lr, p, g, s| ademamix_reference(lr, p, g, s)),
        },
    ]
}

/// bitsandbytes' LARS in 32-bit tensor arithmetic (docs/algorithm.md §3.4), as `Lars8bitConfig`
/// above: momentum 0.9, dampening 0, L2 decay 1e-4, max_unorm 0.02.
fn lars_reference(lr: f64, p: Tensor<2>, g: Tensor<2>, s: Option<&State>) -> (Tensor<2>, Vec<Tensor<2>>) {
    let g = g + p.clone() * 1e-4;
    let m = match s {
        Some(s) => decoded(s)[0].clone() * 0.9 + g,
        None => g,
    };
    let (p_norm, m_norm) = (
        p.clone().square().sum().sqrt().into_scalar::<f32>(),
        m.clone().square().sum().sqrt().into_scalar::<f32>(),
    );
    let scale = if m_norm > 0.02 * p_norm { 0.02 * p_norm / m_norm } else { 1.0 };
    let p = p - m.clone() * (lr as f32 * scale);
    (p, vec![m])
}

/// AdEMAMix in 32-bit tensor arithmetic (docs/algorithm.md §3.4), defaults of `AdEMAMix8bitConfig`.
fn ademamix_reference(lr: f64, p: Tensor<2>, g: Tensor<2>, s: Option<&State>) -> (Tensor<2>, Vec<Tensor<2>>) {
    let (b1, b2, b3, alpha, eps, wd) = (0.9f64, 0.999f64, 0.9999f64, 5.0f64, 1e-8f64, 1e-2f64);
    let (time, m1, m2, nu) = match s {
        Some(s) => {
            let d = decoded(s);
            (s.time() + 1, d[0].clone(), d[1].clone(), d[2].clone())
        }
        None => (1, g.zeros_like(), g.zeros_like(), g.zeros_like()),
    };
    let m1 = m1 * b1 + g.clone() * (1.0 - b1);
    let m2 = m2 * b3 + g.clone() * (1.0 - b3);
    let nu = nu * b2 + g.square() * (1.0 - b2);
    let c1 = 1.0 - b1.powi(time as i32);
    let c2 = (1.0 - b2.powi(time as i32)).sqrt();
    let direction = (m1.clone() / c1 + m2.clone() * alpha) / (nu.clone().sqrt() / c2 + eps);
    let p = p * (1.0 - lr * wd) - direction * lr;
    (p, vec![m1, m2, nu])
}

/// Elements where `|a − b| > atol + rtol·|b|`.
fn mismatches(a: &Tensor<2>, b: &Tensor<2>, atol: f64, rtol: f64) -> usize {
    let bound = b.clone().abs() * rtol + atol;
    let off = (a.clone() - b.clone()).abs().greater(bound);
    off.int().sum().into_scalar::<i64>() as usize
}

fn run_against_reference(case: &Case, device: &Device, rows: usize, cols: usize, steps: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut p = Tensor::<1>::from_floats(
        rng.normals(rows * cols).iter().map(|x| x * 0.1).collect::<Vec<_>>().as_slice(),
        device,
    )
    .reshape([rows, cols]);
    let mut state: Option<State> = None;
    for step in 1..=steps {
        let g = Tensor::<1>::from_floats(
            rng.normals(rows * cols).iter().map(|x| x * 0.01).collect::<Vec<_>>().as_slice(),
            device,
        )
        .reshape([rows, cols]);
        let (p_ref, states_ref) = (case.reference)(case.lr, p.clone(), g.clone(), state.as_ref());
        let (p_new, state_new) = (case.ours)(case.lr, p, g, state);
        let state_new = state_new.expect("a state");
        assert!(state_new.is_quantized(), "{}: {rows}x{cols} should be 8-bit", case.name);
        let compared = if case.compare_states { states_ref.len() } else { 0 };
        for (ours, reference) in decoded(&state_new).iter().zip(&states_ref).take(compared) {
            let off = mismatches(ours, reference, 3e-3, 1e-3);
            assert!(off < 20, "{} {rows}x{cols} step {step}: {off} state elements off", case.name);
        }
        let mean_dp = (p_new.clone() - p_ref).abs().mean().into_scalar::<f32>();
        assert!(mean_dp < 6e-5, "{} {rows}x{cols} step {step}: mean |Δp| = {mean_dp}", case.name);
        p = p_new;
        state = Some(state_new);
    }
}

#[test]
fn eight_bit_optimizers_track_their_32_bit_references() {
    let device = Device::flex();
    for case in cases() {
        for cols in [32, 1024, 4097] {
            run_against_reference(&case, &device, 1024, cols, 50, 7 + cols as u64);
        }
    }
}

#[test]
fn every_backend_tracks_the_references_on_a_small_shape() {
    for (name, device) in common::devices() {
        for case in cases() {
            println!("[{name}] {}", case.name);
            run_against_reference(&case, &device, 64, 257, 10, 11);
        }
    }
}
