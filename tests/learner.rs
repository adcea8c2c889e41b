//! AdamW8bit inside Burn's `Learner` + `SupervisedTraining` with the default checkpointers:
//! training, checkpoints that hold the 8-bit state, and resuming from them.

mod common;

use std::path::{Path, PathBuf};

use burn::data::dataloader::batcher::Batcher;
use burn::module::Module;
use burn::optim::lr_scheduler::constant::ConstantLr;
use burn::optim::{GradientsParams, ModuleOptimizer, OptimizerRecord};
use burn::tensor::{Bytes, Device};
use burn::train::checkpoint::KeepLastNCheckpoints;
use burn::train::logger::InMemoryMetricLogger;
use burn::train::metric::LossMetric;
use burn::train::{ExecutionStrategy, Learner, MultiDeviceOptim, SupervisedTraining};
use burn_8bit::{
    AdamW8bitConfig, Optim8bitConfig, OptimizerKind, StateConfig, StateReport, load_record_checked,
};
use burn_8bit_conformance::regression::{self, Batch, INPUTS, Regressor, SampleBatcher, loaders, samples};

/// AdamW8bit with the hidden weight (6144 elements) in 8-bit and the rest in `f32`.
fn optimizer() -> ModuleOptimizer {
    AdamW8bitConfig::new().with_states(StateConfig::new().with_min_8bit_size(1024)).init()
}

/// The untrained model: 96 hidden units, weights of seed 4.
fn regressor(device: &Device) -> Regressor {
    Regressor::new(96, 4, device)
}

fn learner(device: &Device) -> Learner<Regressor> {
    Learner::new(regressor(device), optimizer(), ConstantLr::new(3e-3))
}

/// A supervised run over [`loaders`] in `dir`: `epochs` epochs, Burn's default checkpointers
/// keeping the last `keep`, the loss as the only metric, no log files.
fn training(dir: &Path, epochs: usize, keep: usize) -> SupervisedTraining<Regressor> {
    let (train, valid) = loaders(samples(512, 2), samples(128, 3), 32);
    SupervisedTraining::new(dir, train, valid)
        .num_epochs(epochs)
        .with_default_checkpointers()
        .with_checkpointing_strategy(KeepLastNCheckpoints::new(keep))
        .with_metric_logger(InMemoryMetricLogger::new())
        .metric_train_numeric(LossMetric::new())
        .metric_valid_numeric(LossMetric::new())
        .with_application_logger(None)
}

fn scratch_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("burn-8bit-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn valid_loss(model: &Regressor, device: &Device) -> f32 {
    regression::valid_loss(model, &samples(128, 3), device)
}

#[test]
fn adamw8bit_trains_checkpoints_and_resumes_in_the_learner() {
    let device = Device::flex().autodiff();
    let dir = scratch_dir("learner");
    let untrained = valid_loss(&regressor(&device), &device);

    let first = training(&dir, 2, 2).launch(learner(&device));
    let after_two = valid_loss(&first.model, &device);
    println!("one device: validation loss {untrained} → {after_two} after two epochs");
    assert!(after_two < 0.5 * untrained, "training did not learn: {untrained} → {after_two}");

    let optim_checkpoint = dir.join("checkpoint").join("optim-2.bpk");
    let record = OptimizerRecord::load(&optim_checkpoint).expect("optimizer checkpoint");
    let loaded = load_record_checked(AdamW8bitConfig::new().init(), record, &first.model, OptimizerKind::AdamW)
        .expect("the checkpoint holds AdamW8bit state for this model")
        .optimizer;
    let report = StateReport::of(&loaded).unwrap();
    let on_disk = StateReport::from_record(OptimizerRecord::load(&optim_checkpoint).unwrap()).unwrap();
    assert_eq!(on_disk, report, "the checkpoint on disk reports what the loaded optimizer holds");
    assert_eq!(on_disk.total_skipped(), 0);
    let hidden = report.parameters.iter().find(|p| p.elements == Some((INPUTS * 96) as u64)).expect("hidden weight state");
    assert!(hidden.quantized && hidden.optimizer == Some(OptimizerKind::AdamW), "{hidden:?}");

    let resumed = training(&dir, 4, 4).checkpoint(2).launch(learner(&device));
    let after_four = valid_loss(&resumed.model, &device);
    assert!(after_four < after_two, "resuming did not continue: {after_two} → {after_four}");
    assert!(dir.join("checkpoint").join("optim-4.bpk").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Burn's `MultiDevice(.., OptimSharded)` puts each parameter's optimizer state on one of the
/// devices: the 8-bit step must run there (CubeCL kernel on wgpu, CPU twin on Flex/NdArray).
#[test]
fn adamw8bit_trains_with_state_sharded_across_devices_and_resumes_on_one() {
    let devices: Vec<Device> = common::devices().into_iter().map(|(_, d)| d.autodiff()).collect();
    if devices.len() < 2 {
        common::skip("multi-device training: only one backend compiled in");
        return;
    }
    let main = devices[0].clone();
    let dir = scratch_dir("sharded");
    let untrained = valid_loss(&regressor(&main), &main);
    let result = training(&dir, 6, 1)
        .with_training_strategy(ExecutionStrategy::MultiDevice(devices.clone(), MultiDeviceOptim::OptimSharded).into())
        .launch(learner(&main));
    let model = result.model.fork(&main);
    let trained = valid_loss(&model, &main);
    println!("{} devices: validation loss {untrained} → {trained}", devices.len());
    assert!(trained < 0.5 * untrained, "sharded training did not learn: {untrained} → {trained}");

    // The checkpoint of the sharded run, its states saved from every device, is complete (the
    // checked loader refuses a missing or damaged state), holds the 8-bit state, and resumes in
    // the Learner on one device. The validation loss has reached its floor (≈ 0.35) by then, so
    // the resumed run is only asked not to lose what was learned.
    let optim_checkpoint = dir.join("checkpoint").join("optim-6.bpk");
    let loaded = load_record_checked(optimizer(), OptimizerRecord::load(&optim_checkpoint).unwrap(), &model, OptimizerKind::AdamW)
        .expect("the sharded checkpoint holds AdamW8bit state for every parameter");
    let hidden = loaded.report.parameters.iter().find(|p| p.elements == Some((INPUTS * 96) as u64)).expect("hidden weight state");
    assert!(hidden.quantized, "{hidden:?}");
    let resumed = training(&dir, 8, 1).checkpoint(6).launch(learner(&main));
    let continued = valid_loss(&resumed.model, &main);
    println!("resumed on one device: validation loss {trained} → {continued}");
    assert!(continued < 1.1 * trained, "the sharded checkpoint did not continue on one device: {trained} → {continued}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The gradient of the mean square loss on `batch`, as the replica holding `model` computes it.
fn gradient(model: &Regressor, batch: &Batch) -> GradientsParams {
    GradientsParams::from_grads(model.forward(batch).loss.backward(), model)
}

/// What DDP's all-reduce (`ReduceOperation::Mean`) hands every replica: the mean of the shards'
/// gradients, computed afresh for the replica holding `model`.
fn all_reduce(shards: &[GradientsParams], model: &Regressor) -> GradientsParams {
    let count = shards.len() as f32;
    let mut reduced = GradientsParams::new();
    for layer in [&model.hidden, &model.output] {
        let weight = layer.weight.id;
        let sum = shards.iter().map(|g| g.get::<2>(weight).expect("weight gradient")).reduce(|a, b| a + b);
        reduced.register(weight, sum.unwrap().div_scalar(count));
        let bias = layer.bias.as_ref().expect("bias").id;
        let sum = shards.iter().map(|g| g.get::<1>(bias).expect("bias gradient")).reduce(|a, b| a + b);
        reduced.register(bias, sum.unwrap().div_scalar(count));
    }
    reduced
}

/// Every parameter's bits, layer by layer.
fn parameter_bits(model: &Regressor) -> Vec<u32> {
    let mut bits = Vec::new();
    for layer in [&model.hidden, &model.output] {
        let weight = layer.weight.val().reshape([-1]);
        let bias = layer.bias.as_ref().expect("bias").val();
        for tensor in [weight, bias] {
            bits.extend(tensor.into_data().try_to_vec::<f32>().unwrap().into_iter().map(f32::to_bits));
        }
    }
    bits
}

/// The batch of `rank`'s shard at `step`: each step draws two shards of 32 samples.
fn shard(step: u64, rank: u64, device: &Device) -> Batch {
    SampleBatcher.batch(samples(32, 100 + 2 * step + rank), device)
}

/// Burn's `DistributedDataParallel` keeps a replica of the model and of the optimizer on every
/// device, all-reduces the gradients and lets each replica step on its own: the replicas stay
/// identical only because the 8-bit step gives the same bits for the same inputs and never writes
/// into a buffer that another replica shares (the replicas start as clones, sharing every
/// buffer). Burn 0.22.1 runs DDP's all-reduce on CUDA and Remote devices only, so here the
/// all-reduce is done by hand, for two replicas on one device of each backend compiled in; one
/// replica's checkpoint then loads into a fresh optimizer and continues alone, bit for bit with
/// the other replica.
#[test]
fn data_parallel_replicas_stay_identical_and_a_replica_checkpoint_continues_alone() {
    const RANKS: u64 = 2;
    const LR: f64 = 3e-3;
    for (name, device) in common::devices() {
        let device = device.autodiff();
        let first = regressor(&device);
        let initial = parameter_bits(&first);
        let mut replicas = vec![first.clone(), first];
        let mut optimizers = vec![optimizer(), optimizer()];
        for step in 0..8 {
            let shards: Vec<GradientsParams> =
                (0..RANKS).map(|rank| gradient(&replicas[rank as usize], &shard(step, rank, &device))).collect();
            for (replica, optim) in replicas.iter_mut().zip(&mut optimizers) {
                let reduced = all_reduce(&shards, replica);
                *replica = optim.step(LR, replica.clone(), reduced);
            }
            assert_eq!(
                parameter_bits(&replicas[0]),
                parameter_bits(&replicas[1]),
                "{name}: the replicas differ after step {step}"
            );
        }

        assert_ne!(parameter_bits(&replicas[0]), initial, "{name}: the replicas did not train");

        let checkpoint = optimizers[1].into_bytes().expect("the replica's optimizer record");
        let record = OptimizerRecord::from_bytes(Bytes::from_bytes_vec(checkpoint.to_vec())).expect("record");
        let mut alone = load_record_checked(optimizer(), record, &replicas[1], OptimizerKind::AdamW)
            .expect("the replica's checkpoint holds AdamW8bit state for this model")
            .optimizer;
        assert!(StateReport::of(&alone).unwrap().parameters.iter().any(|p| p.quantized), "{name}: no 8-bit state");
        let (mut single, mut ddp) = (replicas[1].clone(), replicas.swap_remove(0));
        for step in 8..12 {
            let full = |model: &Regressor| {
                let shards: Vec<GradientsParams> = (0..RANKS).map(|rank| gradient(model, &shard(step, rank, &device))).collect();
                all_reduce(&shards, model)
            };
            let (single_grads, ddp_grads) = (full(&single), full(&ddp));
            single = alone.step(LR, single, single_grads);
            ddp = optimizers[0].step(LR, ddp, ddp_grads);
            assert_eq!(
                parameter_bits(&single),
                parameter_bits(&ddp),
                "{name}: the checkpoint continued differently at step {step}"
            );
        }
        println!("{name}: two replicas identical for 8 steps; the checkpoint continued alone for 4");
    }
}
