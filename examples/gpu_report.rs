//! The kernels against the memory bandwidth of a device, measured in one run: a plain copy of
//! the bytes one Adam8bit step moves (the floor), one Adam8bit step, Burn's own AdamW step,
//! quantize and dequantize (into a new tensor, which includes allocating it, and into the
//! previous result's memory); then the reference vectors replayed on the same device.
//!
//! ```text
//! cargo run --release --features wgpu,ndarray --example gpu_report -- [--device wgpu|cuda|…] [--log2 N] [--reps N]
//! ```
//! Defaults: wgpu, 2^24 elements (use `--log2 28` on a datacenter GPU), 20 timed repetitions
//! after 3 warm-up ones. Bytes per parameter are counted from the kernels' code (see
//! docs/benchmarks.md): the fraction of the copy's bandwidth is what each kernel reaches of the
//! floor measured on the same device in the same run.

mod common;

use std::time::Instant;

use burn::optim::{AdamWConfig, Optimizer};
use burn::tensor::{Device, Distribution, Tensor};
use burn_8bit_conformance::{VectorFile, run_case};
use burn_8bit::ops::{BlockQuantized, BlockSize, MapKind};
use burn_8bit::{Adam8bitConfig, Optim8bitConfig};

struct Args {
    device: String,
    log2: u32,
    reps: usize,
}

fn args() -> Result<Args, String> {
    let mut args = Args { device: "wgpu".into(), log2: 24, reps: 20 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--device" => args.device = value()?,
            "--log2" => args.log2 = value()?.parse().map_err(|e| format!("--log2: {e}"))?,
            "--reps" => args.reps = value()?.parse().map_err(|e| format!("--reps: {e}"))?,
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(args)
}

/// Seconds per call of `f`, after three warm-up calls, the device synchronised around the timing.
fn seconds_per_call(device: &Device, reps: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    device.sync().expect("device sync");
    let start = Instant::now();
    for _ in 0..reps {
        f();
    }
    device.sync().expect("device sync");
    start.elapsed().as_secs_f64() / reps as f64
}

/// Bytes one Adam8bit step moves per parameter with block 256: parameter and gradient read
/// (8), parameter written (4), two code bytes read and written (4), two absmax read and written
/// per block (16 / 256).
const ADAM8BIT_BYTES: f64 = 16.0 + 16.0 / 256.0;
/// Burn's AdamW, fully fused: parameter, gradient and two moments read, three written.
const ADAMW_BYTES: f64 = 28.0;
/// Quantize: four bytes read, one code byte and an absmax per block written (and the reverse).
const QUANTIZE_BYTES: f64 = 5.0 + 4.0 / 256.0;

fn main() {
    let args = args().unwrap_or_else(|e| {
        eprintln!("gpu_report: {e}");
        std::process::exit(2)
    });
    let device = common::device_from_name(&args.device).unwrap_or_else(|e| {
        eprintln!("gpu_report: {e}");
        std::process::exit(2)
    });
    let n = 1usize << args.log2;
    println!("device {}, {n} elements (2^{}), {} timed repetitions", args.device, args.log2, args.reps);

    // The floor: reading and writing 16 bytes per parameter, as 2n f32 read and written back in
    // place (the tensor is unshared), so that no allocation or page fault is timed.
    let mut source = Some(Tensor::<1>::random([2 * n], Distribution::Normal(0.0, 1.0), &device));
    let copy = seconds_per_call(&device, args.reps, || {
        source = Some(source.take().expect("the copied tensor").add_scalar(1.0));
    });
    drop(source);
    let copy_rate = 16.0 * n as f64 / copy;

    let grad = Tensor::<1>::random([n], Distribution::Normal(0.0, 1e-2), &device);
    let mut param = Some(Tensor::<1>::random([n], Distribution::Normal(0.0, 1.0), &device));
    let adam8bit = Adam8bitConfig::new().build();
    let mut state = None;
    let step8 = seconds_per_call(&device, args.reps, || {
        let (p, s) = adam8bit.step(1e-3, param.take().expect("a parameter"), grad.clone(), state.take());
        (param, state) = (Some(p), s);
    });
    drop(state);
    let adamw = AdamWConfig::new().build();
    let mut state = None;
    let step32 = seconds_per_call(&device, args.reps, || {
        let (p, s) = adamw.step(1e-3, param.take().expect("a parameter"), grad.clone(), state.take());
        (param, state) = (Some(p), s);
    });
    drop(state);

    let values = param.take().expect("a parameter");
    let quantized = BlockQuantized::quantize(values.clone(), MapKind::DynamicSigned, BlockSize::DEFAULT);
    let quantize = seconds_per_call(&device, args.reps, || {
        let _ = BlockQuantized::quantize(values.clone(), MapKind::DynamicSigned, BlockSize::DEFAULT);
    });
    let dequantize = seconds_per_call(&device, args.reps, || {
        let _ = quantized.dequantize_flat();
    });
    let mut decoded = Some(quantized.dequantize_flat());
    let dequantize_into = seconds_per_call(&device, args.reps, || {
        let output = decoded.take().expect("the last decoded tensor");
        decoded = Some(quantized.dequantize_into(output).expect("an output of the quantized shape"));
    });

    println!("| kernel | bytes/param | time (ms) | GB/s | of the copy's bandwidth |");
    println!("|---|---:|---:|---:|---:|");
    let row = |name: &str, bytes: f64, seconds: f64| {
        let rate = bytes * n as f64 / seconds;
        println!(
            "| {name} | {bytes:.2} | {:.3} | {:.1} | {:.1} % |",
            seconds * 1e3,
            rate / 1e9,
            100.0 * rate / copy_rate
        );
    };
    row("copy (x + 1 over 2n f32, in place)", 16.0, copy);
    row("Adam8bit step", ADAM8BIT_BYTES, step8);
    row("Burn AdamW step", ADAMW_BYTES, step32);
    row("quantize", QUANTIZE_BYTES, quantize);
    row("dequantize (into a new tensor)", QUANTIZE_BYTES, dequantize);
    row("dequantize (into the last result)", QUANTIZE_BYTES, dequantize_into);
    println!("Adam8bit / Burn AdamW time: {:.3}", step8 / step32);
    println!("quantize / dequantize time: {:.3}", quantize / dequantize);

    let files = VectorFile::list_all(&VectorFile::default_dirs()).unwrap_or_else(|e| {
        eprintln!("gpu_report: {e}");
        std::process::exit(1)
    });
    let (mut passed, mut failed) = (0, 0);
    for path in files {
        let file = VectorFile::open(&path).unwrap_or_else(|e| {
            eprintln!("gpu_report: {e}");
            std::process::exit(1)
        });
        let report = run_case(&file, &device);
        if report.passed {
            passed += 1;
        } else {
            failed += 1;
        }
        println!("{}", report.line());
    }
    println!("conformance on {}: {passed} passed, {failed} failed", args.device);
    if failed > 0 {
        std::process::exit(1);
    }
}
