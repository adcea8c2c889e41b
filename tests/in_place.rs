//! The fused step writes parameters and states in place: on Flex and on wgpu under Burn's
//! Fusion, a step over unshared buffers copies none (`shared_buffer_copies` stays put), and a
//! clone kept across a step is copied, counted, and keeps its values. NdArray works on copies
//! of its buffers by design and is left out. Its own test binary: the count is per process.

mod common;

use burn::optim::Optimizer;
use burn::tensor::{Device, Distribution, Tensor};
use burn_8bit::{AdamW8bitConfig, Optim8bitConfig, StateConfig, shared_buffer_copies};

/// A fresh `len`-element parameter after two warm-up steps, its gradient and its state.
fn warmed_up<O: Optimizer>(optimizer: &O, len: usize, device: &Device) -> (Tensor<1>, Tensor<1>, Option<O::State<1>>) {
    let grad = Tensor::<1>::random([len], Distribution::Normal(0.0, 1e-2), device);
    let mut param = Tensor::<1>::random([len], Distribution::Normal(0.0, 1.0), device);
    let mut state = None;
    for _ in 0..2 {
        (param, state) = optimizer.step(1e-3, param, grad.clone(), state);
    }
    device.sync().expect("device sync");
    (param, grad, state)
}

#[test]
fn steps_write_in_place_unless_a_clone_is_kept() {
    let optimizer = AdamW8bitConfig::new().with_states(StateConfig::new().with_min_8bit_size(4096)).build();
    for (name, device) in common::devices() {
        if name == "ndarray" {
            continue;
        }
        // 8-bit states (and a partial last block), then `f32` states under `min_8bit_size`.
        for len in [10_000usize, 1_000] {
            let (mut param, grad, mut state) = warmed_up(&optimizer, len, &device);
            let before = shared_buffer_copies();
            for _ in 0..3 {
                (param, state) = optimizer.step(1e-3, param, grad.clone(), state);
            }
            device.sync().expect("device sync");
            assert_eq!(shared_buffer_copies(), before, "{name}, {len} elements: an unshared buffer was copied");

            let kept = param.clone();
            let kept_values = kept.to_data();
            (param, _) = optimizer.step(1e-3, param, grad.clone(), state);
            device.sync().expect("device sync");
            assert!(shared_buffer_copies() > before, "{name}, {len} elements: the kept clone was not copied");
            assert_eq!(kept.into_data(), kept_values, "{name}, {len} elements: the kept clone changed");
            assert_ne!(param.into_data(), kept_values, "{name}, {len} elements: the step did nothing");
        }
    }
}
