//! One optimizer step over 16,777,216 `f32` parameters: every 8-bit optimizer and Burn's own
//! AdamW, side by side on the same device.
//!
//! ```text
//! cargo bench --bench optim_step                    # Flex
//! cargo bench --bench optim_step --features wgpu    # also the CubeCL kernels through wgpu
//! ```
//! criterion prints time per step and parameters/s; ns/param = 1e9 / (parameters/s).
//! `examples/bench_step.rs` prints the same figures as one table with the ratio to Burn's AdamW.

use burn::optim::{AdamWConfig, Optimizer};
use burn::tensor::{Device, Distribution, Tensor};
use burn_8bit_conformance::devices::all_compiled;
use burn_8bit_conformance::optimizers::all_at_defaults;
use criterion::{BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main};
use criterion::measurement::WallTime;

const LEN: usize = 16_777_216;

/// `step` is one optimizer step of a flat tensor with its state `S`.
fn bench_step<S>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    step: impl Fn(f64, Tensor<1>, Tensor<1>, Option<S>) -> (Tensor<1>, Option<S>),
    device: &Device,
) {
    let grad = Tensor::<1>::random([LEN], Distribution::Normal(0.0, 1e-2), device);
    let param = Tensor::<1>::random([LEN], Distribution::Normal(0.0, 1.0), device);
    let (param, state) = step(1e-3, param, grad.clone(), None);
    let mut slot = Some((param, state));
    device.sync().expect("device sync");
    // Each iteration waits for the device (a no-op on the eager CPU backends), so lazy backends
    // are timed to completion.
    group.bench_function(name, |b| {
        b.iter(|| {
            let (param, state) = slot.take().expect("parameter and state");
            let next = step(1e-3, param, grad.clone(), state);
            device.sync().expect("device sync");
            slot = Some(next);
        })
    });
}

fn bench(c: &mut Criterion) {
    for (name, device) in all_compiled() {
        let mut group = c.benchmark_group(format!("step_{name}"));
        group.throughput(Throughput::Elements(LEN as u64));
        group.sample_size(10);
        let burn_adamw = AdamWConfig::new().build();
        bench_step(&mut group, "burn_adamw_f32", |lr, p, g, s| burn_adamw.step(lr, p, g, s), &device);
        for (optimizer, step) in all_at_defaults() {
            bench_step(&mut group, &optimizer.to_lowercase(), step, &device);
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
