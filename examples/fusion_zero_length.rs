//! A minimal reproduction, in plain Burn 0.22.1, of the upstream bug burn-8bit works around
//! (docs/checkpoints.md, "Parameters without elements"): on a fused backend (wgpu), creating a
//! zero-length tensor while an operation on a one-element tensor is still pending corrupts the
//! result.
//!
//! ```text
//! cargo run --example fusion_zero_length --features wgpu
//! ```
//! Prints `2·x + x` for `x = [0.5]` computed with and without a `Tensor::zeros([0])` created in
//! between; exits with status 1 when they differ (so a Burn upgrade that fixes it shows at once).

use std::process::ExitCode;

use burn::tensor::{Device, DeviceKind, Tensor};

fn twice_plus_once(device: &Device, create_empty: bool) -> Vec<f32> {
    let x = Tensor::<1>::from_floats([0.5], device);
    let doubled = x.clone() * 2.0;
    let empty = create_empty.then(|| Tensor::<1>::zeros([0], device));
    let sum = doubled + x;
    let values = sum.into_data().try_to_vec::<f32>().expect("f32 data");
    drop(empty);
    values
}

fn main() -> ExitCode {
    let device = Device::wgpu(DeviceKind::DefaultDevice);
    let expected = twice_plus_once(&device, false);
    let got = twice_plus_once(&device, true);
    println!("2·x + x for x = [0.5]: {expected:?} without a zero-length tensor, {got:?} with one");
    if got == expected {
        println!("not reproduced: this Burn handles zero-length tensors under fusion");
        ExitCode::SUCCESS
    } else {
        println!("reproduced: creating a zero-length tensor corrupted a pending fused operation");
        ExitCode::FAILURE
    }
}
