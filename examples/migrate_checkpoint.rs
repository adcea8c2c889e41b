//! Moves a `Learner` run from Burn's 32-bit `AdamW` to `AdamW8bit` through its checkpoint on
//! disk, and resumes it.
//!
//! ```text
//! cargo run --example migrate_checkpoint [-- --dir DIR] [--device flex|ndarray|wgpu|…]
//! ```
//!
//! 1. Trains a small regression model for two epochs through `Learner` with Burn's `AdamW`
//!    (default checkpointers: `DIR/checkpoint/{model,optim,scheduler}-N.bpk`).
//! 2. Converts the optimizer checkpoint of epoch 2 to `AdamW8bit` with the run's own
//!    hyper-parameters (`SwitchRecord::from_burn_record`), keeps the original beside it as
//!    `optim-2.burn-adamw.bpk`, and writes the 8-bit record in its place.
//! 3. Resumes the run from epoch 2 (`SupervisedTraining::checkpoint(2)`) with `AdamW8bit` for
//!    two more epochs, and — from a copy of the untouched checkpoint — with Burn's `AdamW`.
//!
//! It prints the state bytes before and after, both runs' validation losses, and checks that the
//! 8-bit state continued the recorded step count instead of restarting from zero (exit status 1
//! otherwise).

mod common;

use std::error::Error;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataloader::{DataLoader, DataLoaderBuilder};
use burn::data::dataset::InMemDataset;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig, Relu};
use burn::optim::lr_scheduler::constant::ConstantLr;
use burn::optim::{AdamWConfig, ModuleOptimizer, OptimizerRecord};
use burn::tensor::{Device, Tensor};
use burn::train::logger::InMemoryMetricLogger;
use burn::train::metric::LossMetric;
use burn::train::{InferenceStep, Learner, RegressionOutput, SupervisedTraining, TrainOutput, TrainStep};
use burn_8bit::{
    AdamW8bitConfig, Optim8bitConfig, OptimizerKind, StateConfig, StateReport, SwitchRecord,
    load_record_checked,
};

const INPUTS: usize = 64;
const TRAIN_SAMPLES: usize = 2048;
const BATCH: usize = 32;
/// The run's hyper-parameters, shared by both optimizers.
const LR: f64 = 3e-3;
const WEIGHT_DECAY: f32 = 1e-2;

#[derive(Module, Debug)]
struct Regressor {
    hidden: Linear,
    output: Linear,
    activation: Relu,
}

impl Regressor {
    fn new(device: &Device) -> Self {
        Self {
            hidden: LinearConfig::new(INPUTS, 128).init(device),
            output: LinearConfig::new(128, 1).init(device),
            activation: Relu::new(),
        }
    }

    fn forward(&self, batch: &Batch) -> RegressionOutput {
        let hidden = self.activation.forward(self.hidden.forward(batch.inputs.clone()));
        let prediction = self.output.forward(hidden);
        let loss = (prediction.clone() - batch.targets.clone()).powi_scalar(2).mean();
        RegressionOutput::new(loss, prediction, batch.targets.clone())
    }
}

impl TrainStep for Regressor {
    type Input = Batch;
    type Output = RegressionOutput;

    fn step(&self, batch: Batch) -> TrainOutput<RegressionOutput> {
        let output = self.forward(&batch);
        TrainOutput::new(self, output.loss.backward(), output)
    }
}

impl InferenceStep for Regressor {
    type Input = Batch;
    type Output = RegressionOutput;

    fn step(&self, batch: Batch) -> RegressionOutput {
        self.forward(&batch)
    }
}

#[derive(Clone, Debug)]
struct Batch {
    inputs: Tensor<2>,
    targets: Tensor<2>,
}

#[derive(Clone, Debug)]
struct Sample {
    inputs: Vec<f32>,
    target: f32,
}

struct SampleBatcher;

impl Batcher<Sample, Batch> for SampleBatcher {
    fn batch(&self, items: Vec<Sample>, device: &Device) -> Batch {
        let n = items.len();
        let inputs: Vec<f32> = items.iter().flat_map(|s| s.inputs.clone()).collect();
        let targets: Vec<f32> = items.iter().map(|s| s.target).collect();
        Batch {
            inputs: Tensor::<1>::from_floats(inputs.as_slice(), device).reshape([n, INPUTS]),
            targets: Tensor::<1>::from_floats(targets.as_slice(), device).reshape([n, 1]),
        }
    }
}

/// Uniform values in [-1, 1) from a 64-bit LCG: the same data on every machine.
fn uniforms(seed: u64, n: usize) -> Vec<f32> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// A teacher network's outputs: `tanh(w · x)` with a fixed `w`.
fn samples(n: usize, seed: u64) -> Vec<Sample> {
    let teacher = uniforms(1, INPUTS);
    let inputs = uniforms(seed, n * INPUTS);
    inputs
        .chunks(INPUTS)
        .map(|x| Sample {
            inputs: x.to_vec(),
            target: x.iter().zip(&teacher).map(|(x, w)| x * w).sum::<f32>().tanh(),
        })
        .collect()
}

type Loaders = (Arc<dyn DataLoader<Batch>>, Arc<dyn DataLoader<Batch>>);

fn loaders() -> Loaders {
    let train = DataLoaderBuilder::new(SampleBatcher).batch_size(BATCH).build(InMemDataset::new(samples(TRAIN_SAMPLES, 2)));
    let valid = DataLoaderBuilder::new(SampleBatcher).batch_size(256).build(InMemDataset::new(samples(512, 3)));
    (train, valid)
}

/// Trains `learner` in `dir` up to `epochs`, from the checkpoint of `resume_from` if given.
fn run(dir: &Path, learner: Learner<Regressor>, epochs: usize, resume_from: Option<usize>) -> Regressor {
    let (train, valid) = loaders();
    let mut training = SupervisedTraining::new(dir, train, valid)
        .num_epochs(epochs)
        .with_default_checkpointers()
        .with_metric_logger(InMemoryMetricLogger::new())
        .metric_train_numeric(LossMetric::new())
        .metric_valid_numeric(LossMetric::new())
        .with_application_logger(None);
    if let Some(epoch) = resume_from {
        training = training.checkpoint(epoch);
    }
    training.launch(learner).model
}

fn valid_loss(model: &Regressor, device: &Device) -> f32 {
    let batch = SampleBatcher.batch(samples(512, 3), device);
    model.forward(&batch).loss.into_scalar::<f32>()
}

fn learner(optim: ModuleOptimizer, device: &Device) -> Learner<Regressor> {
    Learner::new(Regressor::new(device), optim, ConstantLr::new(LR))
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        std::fs::copy(entry.path(), to.join(entry.file_name()))?;
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| args.iter().position(|arg| arg == flag).and_then(|i| args.get(i + 1)).cloned();
    let device = common::device_from_name(&value("--device").unwrap_or_else(|| "flex".to_string()))?.autodiff();
    let dir = value("--dir").map(PathBuf::from).unwrap_or_else(|| {
        std::env::temp_dir().join(format!("burn-8bit-migrate-{}", std::process::id()))
    });
    let _ = std::fs::remove_dir_all(&dir);
    let reference_dir = dir.join("burn-adamw-reference");

    let burn_adamw = AdamWConfig::new().with_weight_decay(WEIGHT_DECAY);
    let adamw8bit = AdamW8bitConfig::new().with_weight_decay(WEIGHT_DECAY).with_states(StateConfig::new().with_min_8bit_size(1024));

    println!("1. two epochs with Burn's AdamW in {}", dir.display());
    let model = run(&dir, learner(burn_adamw.init(), &device), 2, None);
    println!("   validation loss after epoch 2: {:.5}", valid_loss(&model, &device));
    copy_dir(&dir.join("checkpoint"), &reference_dir.join("checkpoint"))?;

    println!("2. converting checkpoint/optim-2.bpk to AdamW8bit");
    let checkpoint = dir.join("checkpoint").join("optim-2.bpk");
    let burn_bytes = std::fs::metadata(&checkpoint)?.len();
    let record = adamw8bit.build().from_burn_record(OptimizerRecord::load(&checkpoint)?)?;
    std::fs::rename(&checkpoint, dir.join("checkpoint").join("optim-2.burn-adamw.bpk"))?;
    record.save(&checkpoint)?;
    let eight_bit_bytes = std::fs::metadata(&checkpoint)?.len();
    // The Learner resumes with Burn's unchecked `load_record`: check the record against the model first.
    let checked = load_record_checked(adamw8bit.init(), OptimizerRecord::load(&checkpoint)?, &model, OptimizerKind::AdamW)?;
    let steps_recorded = record_steps(&checked.report);
    println!(
        "   {} parameters: file {burn_bytes} → {eight_bit_bytes} bytes, step count {steps_recorded} kept",
        checked.report.parameters.len(),
    );

    println!("3. resuming from epoch 2 for two more epochs");
    let eight_bit = run(&dir, learner(adamw8bit.init(), &device), 4, Some(2));
    let reference = run(&reference_dir, learner(burn_adamw.init(), &device), 4, Some(2));
    let final_report = StateReport::from_record(OptimizerRecord::load(dir.join("checkpoint").join("optim-4.bpk"))?)?;
    let steps_final = record_steps(&final_report);
    println!("   validation loss after epoch 4: AdamW8bit {:.5}, Burn AdamW {:.5}", valid_loss(&eight_bit, &device), valid_loss(&reference, &device));
    println!("   AdamW8bit state: {} bytes, step {steps_final} (epoch 2 ended at step {steps_recorded})", final_report.total_bytes());
    let steps_per_epoch = TRAIN_SAMPLES.div_ceil(BATCH) as u64;
    if steps_recorded != 2 * steps_per_epoch || steps_final != 4 * steps_per_epoch {
        eprintln!("the migrated state did not continue the run's step count ({steps_per_epoch} steps per epoch)");
        std::process::exit(1);
    }
    if value("--dir").is_none() {
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
}

/// The step count every parameter's state agrees on (0 if they disagree or none has one).
fn record_steps(report: &StateReport) -> u64 {
    let steps: Vec<u64> = report.parameters.iter().filter_map(|p| p.steps).collect();
    match steps.first() {
        Some(&first) if steps.iter().all(|&s| s == first) => first,
        _ => 0,
    }
}
