//! Time per parameter of one optimizer step, every 8-bit optimizer and Adam with 4-bit states
//! (block size 128; block-wise on the flat tensor, and with its second moment rank-1 on the same
//! parameters as rows of 4096) next to Burn's own AdamW on the same device, and the peak memory
//! of a step beyond parameters, gradients and state.
//!
//! ```text
//! cargo run --release --example bench_step -- [--device flex|ndarray|wgpu] [--params N] [--steps N]
//!     [--dtype f32|f16|bf16]
//! ```
//! Defaults: Flex, 16,777,216 `f32` parameters (and gradients), 10 timed steps after 2 warm-up
//! steps. Peak memory is
//! the process's peak resident set during the timed steps (Linux, CPU backends), reset before
//! them through `/proc/self/clear_refs`.

mod common;

use std::time::Instant;

use burn::optim::{AdamWConfig, Optimizer, RecordState, StateSink};
use burn::tensor::{Device, Distribution, FloatDType, Tensor};
use burn_8bit::{Adam8bitConfig, Optim8bitConfig, StateConfig};
use burn_8bit_conformance::optimizers::{all_at_defaults, tensor_step};

struct Args {
    device: String,
    params: usize,
    steps: usize,
    dtype: FloatDType,
}

fn args() -> Result<Args, String> {
    let mut args = Args { device: "flex".into(), params: 16_777_216, steps: 10, dtype: FloatDType::F32 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--device" => args.device = value()?,
            "--params" => args.params = value()?.parse().map_err(|e| format!("--params: {e}"))?,
            "--steps" => args.steps = value()?.parse().map_err(|e| format!("--steps: {e}"))?,
            "--dtype" => {
                args.dtype = match value()?.as_str() {
                    "f32" => FloatDType::F32,
                    "f16" => FloatDType::F16,
                    "bf16" => FloatDType::BF16,
                    other => return Err(format!("--dtype: `{other}` is not f32, f16 or bf16")),
                }
            }
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(args)
}

/// Resident and peak resident memory of this process in bytes (Linux); `None` elsewhere.
fn memory() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Bytes of a state as its record holds them (tensors only).
fn state_bytes<S: RecordState>(state: &S) -> u64 {
    let mut sink = StateSink::default();
    state.state_flatten("p", &mut sink);
    sink.tensors.iter().map(|(_, data)| data.as_bytes().len() as u64).sum()
}

struct Row {
    name: &'static str,
    ns_per_param: f64,
    state_bytes: u64,
    peak_extra: Option<i64>,
}

/// `step` is one optimizer step of a flat tensor with its state `S`.
fn measure<S: RecordState>(
    name: &'static str,
    step: impl Fn(f64, Tensor<1>, Tensor<1>, Option<S>) -> (Tensor<1>, Option<S>),
    device: &Device,
    args: &Args,
) -> Row {
    let grad = Tensor::<1>::random([args.params], Distribution::Normal(0.0, 1e-2), device).cast(args.dtype);
    let mut param = Tensor::<1>::random([args.params], Distribution::Normal(0.0, 1.0), device).cast(args.dtype);
    let mut state = None;
    for _ in 0..2 {
        (param, state) = step(1e-3, param, grad.clone(), state);
    }
    device.sync().expect("device sync");
    let state_size = state.as_ref().map_or(0, state_bytes);
    reset_peak();
    let before = memory();
    let start = Instant::now();
    for _ in 0..args.steps {
        (param, state) = step(1e-3, param, grad.clone(), state);
        device.sync().expect("device sync");
    }
    let elapsed = start.elapsed();
    let peak_extra = match (before, memory()) {
        (Some((resident, _)), Some((_, peak))) => Some(peak as i64 - resident as i64),
        _ => None,
    };
    Row {
        name,
        ns_per_param: elapsed.as_nanos() as f64 / (args.steps * args.params) as f64,
        state_bytes: state_size,
        peak_extra,
    }
}

fn main() {
    let args = args().unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2)
    });
    let device = common::device_from_name(&args.device).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2)
    });
    println!(
        "{} {:?} parameters on {}, {} timed steps, {} rayon threads",
        args.params,
        args.dtype,
        args.device,
        args.steps,
        rayon_threads()
    );
    let burn_adamw = AdamWConfig::new().build();
    let mut rows = vec![measure("Burn AdamW (f32 state)", |lr, p, g, s| burn_adamw.step(lr, p, g, s), &device, &args)];
    rows.extend(all_at_defaults().into_iter().map(|(name, step)| measure(name, step, &device, &args)));
    let four_bit = Adam8bitConfig::new().with_states(StateConfig::new().with_state_bits(4).with_block_size(128));
    rows.push(measure("Adam, 4-bit states", tensor_step(four_bit.build()), &device, &args));
    // The same parameters as a matrix of 4096-element rows: its second moment is rank-1.
    let (matrix_rows, matrix_cols) = (args.params.div_ceil(4096), 4096.min(args.params));
    if matrix_rows * matrix_cols == args.params {
        let rank1 = four_bit.build();
        let step = move |lr, p: Tensor<1>, g: Tensor<1>, s| {
            let (p, s) = rank1.step(lr, p.reshape([matrix_rows, matrix_cols]), g.reshape([matrix_rows, matrix_cols]), s);
            (p.reshape([args.params]), s)
        };
        rows.push(measure("Adam, 4-bit rank-1 (rows of 4096)", step, &device, &args));
    }
    let element_bytes = match args.dtype {
        FloatDType::F16 | FloatDType::BF16 => 2,
        _ => 4,
    };
    let tensors = 2 * element_bytes * args.params as u64;
    println!("| optimizer | ns/param | state bytes/param | peak extra during a step |");
    println!("|---|---:|---:|---:|");
    for row in &rows {
        let extra = match row.peak_extra {
            Some(bytes) => format!(
                "{:.1} MiB ({:+.2} % of params+grads+state)",
                bytes as f64 / 1048576.0,
                100.0 * bytes as f64 / (tensors + row.state_bytes) as f64
            ),
            None => "n/a".into(),
        };
        println!(
            "| {} | {:.3} | {:.3} | {} |",
            row.name,
            row.ns_per_param,
            row.state_bytes as f64 / args.params as f64,
            extra
        );
    }
    let burn = rows[0].ns_per_param;
    let time = |name: &str| rows.iter().find(|row| row.name == name).expect("a measured row").ns_per_param;
    let (adam8, adam4) = (time("Adam8bit"), time("Adam, 4-bit states"));
    println!("Adam8bit / Burn AdamW time ratio: {:.3}", adam8 / burn);
    println!("Adam 4-bit / Adam8bit time ratio: {:.3}", adam4 / adam8);
    if let Some(row) = rows.iter().find(|row| row.name.contains("rank-1")) {
        println!("Adam 4-bit rank-1 / Adam8bit time ratio: {:.3}", row.ns_per_param / adam8);
    }
}

fn rayon_threads() -> String {
    std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| {
        std::thread::available_parallelism().map_or("?".into(), |n| n.to_string())
    })
}
