//! Block-wise quantize / dequantize throughput: 16,777,216 `f32` at block 256.
//!
//! ```text
//! cargo bench --bench quantize                    # Flex
//! cargo bench --bench quantize --features wgpu    # also the CubeCL kernels through wgpu
//! ```
//! criterion prints time per iteration and elements/s; ns/element = 1e9 / (elements/s).

use burn::tensor::{Distribution, Tensor};
use burn_8bit::{BlockQuantized, BlockSize, MapKind};
use burn_8bit_conformance::devices::all_compiled;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const LEN: usize = 16_777_216;

fn bench(c: &mut Criterion) {
    let block = BlockSize::new(256).expect("valid block size");
    for (name, device) in all_compiled() {
        let x = Tensor::<1>::random([LEN], Distribution::Normal(0.0, 1.0), &device);
        let quantized = BlockQuantized::quantize(x.clone(), MapKind::DynamicSigned, block);
        device.sync().expect("device sync");
        let mut group = c.benchmark_group(format!("blockwise_{name}"));
        group.throughput(Throughput::Elements(LEN as u64));
        group.sample_size(20);
        // Each iteration waits for the device (a no-op on the eager CPU backends), so lazy
        // backends are timed to completion.
        group.bench_function("quantize_16M_block256", |b| {
            b.iter(|| {
                let q = BlockQuantized::quantize(x.clone(), MapKind::DynamicSigned, block);
                device.sync().expect("device sync");
                q
            })
        });
        group.bench_function("dequantize_16M_block256", |b| {
            b.iter(|| {
                let y = quantized.dequantize_flat();
                device.sync().expect("device sync");
                y
            })
        });
        let mut decoded = Some(quantized.dequantize_flat());
        group.bench_function("dequantize_into_16M_block256", |b| {
            b.iter(|| {
                let output = decoded.take().expect("the last decoded tensor");
                decoded = Some(quantized.dequantize_into(output).expect("an output of the quantized shape"));
                device.sync().expect("device sync");
            })
        });
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
