//! One optimizer step over 16,777,216 `f32` parameters: every 8-bit optimizer and Burn's own
//! AdamW, side by side on the same device.
//!
//! ```text
//! cargo bench --bench optim_step                    # Flex
//! cargo bench --bench optim_step --features wgpu    # also the CubeCL kernels through wgpu
//! ```
//! criterion prints time per step and parameters/s; ns/param = 1e9 / (parameters/s).
//! `examples/bench_step.rs` prints the same figures as one table with the ratio to Burn's AdamW.

use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamWConfig, Optimizer};
use burn::tensor::{Device, Distribution, Tensor};
use burn_8bit::{
    AdEMAMix8bitConfig, AdaGrad8bitConfig, Adam8bitConfig, AdamW8bitConfig, Lamb8bitConfig,
    Lars8bitConfig, Lion8bitConfig, RmsProp8bitConfig, Sgd8bitConfig,
};
use criterion::{BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main};
use criterion::measurement::WallTime;

const LEN: usize = 16_777_216;

fn devices() -> Vec<(&'static str, Device)> {
    let mut devices = vec![("flex", Device::flex())];
    #[cfg(feature = "wgpu")]
    devices.push(("wgpu", Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)));
    devices
}

fn bench_optimizer<O: Optimizer>(group: &mut BenchmarkGroup<'_, WallTime>, name: &str, optimizer: O, device: &Device) {
    let grad = Tensor::<1>::random([LEN], Distribution::Normal(0.0, 1e-2), device);
    let param = Tensor::<1>::random([LEN], Distribution::Normal(0.0, 1.0), device);
    let (param, state) = optimizer.step(1e-3, param, grad.clone(), None);
    let mut slot = Some((param, state));
    device.sync().expect("device sync");
    // Each iteration waits for the device (a no-op on the eager CPU backends), so lazy backends
    // are timed to completion.
    group.bench_function(name, |b| {
        b.iter(|| {
            let (param, state) = slot.take().expect("parameter and state");
            let next = optimizer.step(1e-3, param, grad.clone(), state);
            device.sync().expect("device sync");
            slot = Some(next);
        })
    });
}

fn bench(c: &mut Criterion) {
    for (name, device) in devices() {
        let mut group = c.benchmark_group(format!("step_{name}"));
        group.throughput(Throughput::Elements(LEN as u64));
        group.sample_size(10);
        bench_optimizer(&mut group, "burn_adamw_f32", AdamWConfig::new().build(), &device);
        bench_optimizer(&mut group, "adam8bit", Adam8bitConfig::new().build(), &device);
        bench_optimizer(&mut group, "adamw8bit", AdamW8bitConfig::new().build(), &device);
        bench_optimizer(&mut group, "sgd8bit", Sgd8bitConfig::new().with_momentum(Some(MomentumConfig::new())).build(), &device);
        bench_optimizer(&mut group, "rmsprop8bit", RmsProp8bitConfig::new().build(), &device);
        bench_optimizer(&mut group, "adagrad8bit", AdaGrad8bitConfig::new().build(), &device);
        bench_optimizer(&mut group, "lion8bit", Lion8bitConfig::new().build(), &device);
        bench_optimizer(&mut group, "ademamix8bit", AdEMAMix8bitConfig::new().build(), &device);
        bench_optimizer(&mut group, "lamb8bit", Lamb8bitConfig::new().build(), &device);
        bench_optimizer(&mut group, "lars8bit", Lars8bitConfig::new().build(), &device);
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
