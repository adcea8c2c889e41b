//! Where the time of one training step of the `train` example goes: forward + backward, and the
//! optimizer step, for Burn's AdamW and AdamW8bit (with and without `keep_embeddings_32bit`) on
//! the same model, measured side by side in one run.
//!
//! ```text
//! cargo run --release --example bench_model_step -- [--device flex|ndarray|wgpu] [--steps N]
//! ```
//! Tensors under `min_8bit_size` (biases, layer norms) keep `f32` state and take the same fused
//! op as the 8-bit ones: one launch per tensor.

#[path = "common/mod.rs"]
mod common;
// The benchmark reads the training split only.
#[allow(dead_code)]
#[path = "train/data.rs"]
mod data;
#[path = "train/model.rs"]
mod model;

use std::time::Instant;

use burn::data::dataloader::batcher::Batcher;
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn_8bit::{AdamW8bitConfig, Optim8bitConfig};
use burn_8bit::nn::keep_embeddings_32bit;

use data::{Corpus, WindowBatcher, offsets};
use model::{Shape, TransformerLm};

type MakeOptimizer = fn(&TransformerLm) -> ModuleOptimizer;

const ARMS: [(&str, MakeOptimizer); 3] = [
    ("Burn AdamW (32-bit)", |_| AdamWConfig::new().init()),
    ("AdamW8bit", |_| AdamW8bitConfig::new().init()),
    ("AdamW8bit + keep_embeddings_32bit", |model| {
        let config = AdamW8bitConfig::new();
        keep_embeddings_32bit(config.init(), model, config.clone().f32_states().build())
    }),
];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let device = common::device_from_name(&flag("--device").unwrap_or_else(|| "flex".into()))
        .unwrap_or_else(|error| {
            eprintln!("{error}");
            std::process::exit(2);
        });
    let steps: usize = flag("--steps").map_or(30, |s| s.parse().ok().filter(|&n| n > 0).expect("--steps: a positive number"));
    let corpus = Corpus::load(None, 64).expect("the embedded text");
    let shape = Shape { vocab: corpus.vocab, context: 64, d_model: 128, layers: 2, heads: 4 };
    let batcher = WindowBatcher { tokens: corpus.train.clone(), context: 64 };
    let train_device = device.clone().autodiff();
    let warmup = 5;
    println!("| optimizer | forward + backward (ms) | optimizer step (ms) | optimizer step, median (ms) |");
    println!("|---|---:|---:|---:|");
    // Two rounds, so that each arm runs once early and once late in the process.
    for _round in 0..2 {
        for (name, make) in ARMS {
            train_device.seed(1);
            let mut model = TransformerLm::new(shape, true, &train_device);
            let mut optim = make(&model);
            let mut forward_backward = 0.0;
            // Each step's time: a shared machine's occasional stall shows in the mean, not in
            // the median.
            let mut step_times = Vec::with_capacity(steps);
            for i in 0..warmup + steps {
                let batch = batcher.batch(offsets(&corpus.train, 64, 32, i as u64), &train_device);
                let started = Instant::now();
                let loss = model.forward(batch).loss;
                let grads = GradientsParams::from_grads(loss.backward(), &model);
                device.sync().expect("device sync");
                let stepped = Instant::now();
                model = optim.step(1e-3, model, grads);
                device.sync().expect("device sync");
                if i >= warmup {
                    forward_backward += (stepped - started).as_secs_f64();
                    step_times.push(stepped.elapsed().as_secs_f64());
                }
            }
            let per_step = |total: f64| 1e3 * total / steps as f64;
            let step = step_times.iter().sum();
            step_times.sort_by(f64::total_cmp);
            let median = 1e3 * step_times[steps / 2];
            println!("| {name} | {:.1} | {:.2} | {median:.2} |", per_step(forward_backward), per_step(step));
        }
    }
}
