//! Moves a `Learner` run from Burn's 32-bit `AdamW` to `AdamW8bit` through its checkpoint on
//! disk, and resumes it.
//!
//! ```text
//! cargo run --example migrate_checkpoint [-- --dir DIR] [--device flex|ndarray|wgpu|…]
//! ```
//!
//! 1. Trains a small regression model (`burn_8bit_conformance::regression`, the task of the
//!    repository's `Learner` tests) for two epochs through `Learner` with Burn's `AdamW`
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

use burn::optim::lr_scheduler::constant::ConstantLr;
use burn::optim::{AdamWConfig, ModuleOptimizer, OptimizerRecord};
use burn::tensor::Device;
use burn::train::logger::InMemoryMetricLogger;
use burn::train::metric::LossMetric;
use burn::train::{Learner, SupervisedTraining};
use burn_8bit::{
    AdamW8bitConfig, Optim8bitConfig, OptimizerKind, StateConfig, StateReport, SwitchRecord, load_record_checked,
};
use burn_8bit_conformance::regression::{self, Regressor, loaders, samples};

const TRAIN_SAMPLES: usize = 2048;
const BATCH: usize = 32;
/// The run's hyper-parameters, shared by both optimizers.
const LR: f64 = 3e-3;
const WEIGHT_DECAY: f32 = 1e-2;

/// Trains `learner` in `dir` up to `epochs`, from the checkpoint of `resume_from` if given.
fn run(dir: &Path, learner: Learner<Regressor>, epochs: usize, resume_from: Option<usize>) -> Regressor {
    let (train, valid) = loaders(samples(TRAIN_SAMPLES, 2), samples(512, 3), BATCH);
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
    regression::valid_loss(model, &samples(512, 3), device)
}

fn learner(optim: ModuleOptimizer, device: &Device) -> Learner<Regressor> {
    Learner::new(Regressor::new(128, 4, device), optim, ConstantLr::new(LR))
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
