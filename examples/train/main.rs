//! The main job: a small transformer language model with `StableEmbedding`, trained through
//! Burn's `Learner` with Burn's 32-bit `AdamW` and with `AdamW8bit`, side by side on the same
//! batches from the same initial weights. Prints a table (final losses, optimizer-state bytes,
//! time per step) and writes the loss curves as an SVG.
//!
//! ```text
//! cargo run --release --example train -- [--device flex|ndarray|wgpu|…] [--steps N] [--epochs N]
//!     [--data FILE] [--out DIR] [--seed N] [--ablation] [--state-bits 4]
//! ```
//!
//! The default text is the Jargon File 4.4.7 (public domain, shipped in `data/`); `--data` takes
//! any text file. `--ablation` adds the paper's ablation arms: linear instead of dynamic maps,
//! one absmax per tensor instead of per block, and Burn's plain `Embedding` instead of
//! `StableEmbedding` (with 32-bit and 8-bit state). `--state-bits 4` adds an arm of AdamW with
//! 4-bit states (block size 128, as Li, Chen, Zhu 2023 use).

mod data;
mod model;
mod plot;
mod progress;

#[path = "../common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use burn::data::dataloader::DataLoaderBuilder;
use burn::data::dataset::transform::{SamplerDataset, SamplerDatasetOptions};
use burn::data::dataset::{Dataset, DatasetError, InMemDataset};
use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::lr_scheduler::cosine::CosineAnnealingLrSchedulerConfig;
use burn::optim::{AdamWConfig, ModuleOptimizer, OptimizerRecord};
use burn::tensor::Device;
use burn::train::checkpoint::KeepLastNCheckpoints;
use burn::train::metric::LossMetric;
use burn::train::{Learner, SupervisedTraining};
use burn_8bit::nn::keep_embeddings_32bit;
use burn_8bit::{
    AdamW8bitConfig, MapFamily, Optim8bitConfig, OptimizerKind, StateConfig, StateReport, load_record_checked,
};

use data::{Corpus, WindowBatcher, offsets};
use model::{Shape, TransformerLm};
use progress::{Curves, ProgressRenderer};

const BATCH: usize = 32;
const CONTEXT: usize = 64;
const D_MODEL: usize = 128;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const LEARNING_RATE: f64 = 2e-3;
const WEIGHT_DECAY: f32 = 0.01;
/// Windows in the final validation (fixed, from the held-out chunks).
const VALID_WINDOWS: usize = 512;

/// Which optimizer an arm trains with.
#[derive(Clone, Copy, Debug)]
enum Optim {
    /// Burn's `AdamW`, 32-bit state.
    Burn32,
    /// `AdamW8bit` with the given map family and scaling (8-bit states).
    Bits8 { map_family: MapFamily, whole_tensor_block: bool },
    /// `AdamW8bit` with 4-bit states in blocks of 128.
    Bits4,
}

#[derive(Clone, Copy, Debug)]
struct Arm {
    name: &'static str,
    optim: Optim,
    stable_embedding: bool,
}

const DYNAMIC_BLOCKWISE: Optim = Optim::Bits8 { map_family: MapFamily::Dynamic, whole_tensor_block: false };

const MAIN_ARMS: [Arm; 2] = [
    Arm { name: "AdamW (32-bit)", optim: Optim::Burn32, stable_embedding: true },
    Arm { name: "AdamW8bit", optim: DYNAMIC_BLOCKWISE, stable_embedding: true },
];

const ABLATION_ARMS: [Arm; 5] = [
    Arm {
        name: "8-bit linear map",
        optim: Optim::Bits8 { map_family: MapFamily::Linear, whole_tensor_block: false },
        stable_embedding: true,
    },
    Arm {
        name: "8-bit one block/tensor",
        optim: Optim::Bits8 { map_family: MapFamily::Dynamic, whole_tensor_block: true },
        stable_embedding: true,
    },
    Arm {
        name: "8-bit linear, one block",
        optim: Optim::Bits8 { map_family: MapFamily::Linear, whole_tensor_block: true },
        stable_embedding: true,
    },
    Arm { name: "32-bit plain Embedding", optim: Optim::Burn32, stable_embedding: false },
    Arm { name: "8-bit plain Embedding", optim: DYNAMIC_BLOCKWISE, stable_embedding: false },
];

const FOUR_BIT_ARM: Arm = Arm { name: "AdamW 4-bit states", optim: Optim::Bits4, stable_embedding: true };

struct Options {
    device_name: String,
    steps: usize,
    epochs: usize,
    data: Option<String>,
    out: PathBuf,
    seed: u64,
    ablation: bool,
    four_bit: bool,
}

impl Options {
    fn parse() -> Result<Self, String> {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let mut options = Options {
            device_name: "flex".into(),
            steps: 600,
            epochs: 4,
            data: None,
            out: PathBuf::from("train-output"),
            seed: 1,
            ablation: false,
            four_bit: false,
        };
        let mut i = 0;
        while i < args.len() {
            let value = |i: usize| args.get(i + 1).cloned().ok_or(format!("{} needs a value", args[i]));
            let number = |i: usize| -> Result<u64, String> {
                value(i)?.parse().map_err(|e| format!("{}: {e}", args[i]))
            };
            match args[i].as_str() {
                "--device" => options.device_name = value(i)?,
                "--steps" => options.steps = number(i)? as usize,
                "--epochs" => options.epochs = number(i)? as usize,
                "--data" => options.data = Some(value(i)?),
                "--out" => options.out = PathBuf::from(value(i)?),
                "--seed" => options.seed = number(i)?,
                "--state-bits" => match number(i)? {
                    4 => options.four_bit = true,
                    8 => {}
                    other => return Err(format!("--state-bits takes 8 or 4, not {other}")),
                },
                "--ablation" => {
                    options.ablation = true;
                    i += 1;
                    continue;
                }
                other => return Err(format!("unknown argument `{other}`")),
            }
            i += 2;
        }
        if options.epochs == 0 || options.steps < options.epochs {
            return Err("need at least one epoch and one step per epoch".into());
        }
        Ok(options)
    }
}

/// Every window start of a token sequence (the population the sampler draws from).
struct WindowStarts(usize);

impl Dataset<usize> for WindowStarts {
    fn get(&self, index: usize) -> Result<usize, DatasetError> {
        Ok(index)
    }

    fn len(&self) -> usize {
        self.0
    }
}

/// What one arm produced.
struct Outcome {
    arm: Arm,
    curves: Curves,
    final_train: f64,
    final_valid: f64,
    state_bytes: u64,
    wall_seconds: f64,
}

fn optimizer(arm: &Arm, model: &TransformerLm) -> ModuleOptimizer {
    let clipping = Some(GradientClippingConfig::Norm(1.0));
    match arm.optim {
        Optim::Burn32 => AdamWConfig::new()
            .with_weight_decay(WEIGHT_DECAY)
            .with_grad_clipping(clipping)
            .init(),
        Optim::Bits8 { .. } | Optim::Bits4 => {
            let states = match arm.optim {
                Optim::Bits8 { map_family, whole_tensor_block } => {
                    StateConfig::new().with_map_family(map_family).with_whole_tensor_block(whole_tensor_block)
                }
                _ => StateConfig::new().with_state_bits(4).with_block_size(128),
            };
            let config = AdamW8bitConfig::new()
                .with_weight_decay(WEIGHT_DECAY)
                .with_grad_clipping(clipping)
                .with_states(states);
            if arm.stable_embedding {
                // The paper keeps the embedding's state in 32 bits alongside StableEmbedding.
                keep_embeddings_32bit(config.init(), model, config.clone().f32_states().build())
            } else {
                config.init()
            }
        }
    }
}

/// Bytes of optimizer state in the last checkpoint of a run.
fn state_bytes(arm: &Arm, dir: &Path, epochs: usize, model: &TransformerLm) -> Result<u64, String> {
    let path = dir.join("checkpoint").join(format!("optim-{epochs}.bpk"));
    let record = OptimizerRecord::load(&path).map_err(|e| format!("{}: {e:?}", path.display()))?;
    let optim = match arm.optim {
        Optim::Burn32 => optimizer(arm, model).load_record(record),
        Optim::Bits8 { .. } | Optim::Bits4 => {
            load_record_checked(optimizer(arm, model), record, model, OptimizerKind::AdamW)
                .map_err(|e| e.to_string())?
                .optimizer
        }
    };
    let report = StateReport::of(&optim).map_err(|e| e.to_string())?;
    Ok(report.total_bytes())
}

/// Mean loss of `model` over fixed validation windows.
fn validation_loss(model: &TransformerLm, corpus: &Corpus, device: &Device) -> f64 {
    let batcher = WindowBatcher { tokens: corpus.valid.clone(), context: CONTEXT };
    let windows = offsets(&corpus.valid, CONTEXT, VALID_WINDOWS, 7);
    let losses: Vec<f64> = windows
        .chunks(BATCH)
        .map(|chunk| {
            let batch = burn::data::dataloader::batcher::Batcher::batch(&batcher, chunk.to_vec(), device);
            model.forward(batch).loss.into_scalar::<f64>()
        })
        .collect();
    losses.iter().sum::<f64>() / losses.len() as f64
}

fn run(arm: Arm, options: &Options, corpus: &Corpus, device: &Device) -> Result<Outcome, String> {
    let shape = Shape { vocab: corpus.vocab, context: CONTEXT, d_model: D_MODEL, layers: LAYERS, heads: HEADS };
    let train_device = device.clone().autodiff();
    train_device.seed(options.seed);
    let model = TransformerLm::new(shape, arm.stable_embedding, &train_device);
    let optim = optimizer(&arm, &model);
    let schedule = CosineAnnealingLrSchedulerConfig::new(LEARNING_RATE, options.steps)
        .with_min_lr(LEARNING_RATE / 10.0)
        .init()?;
    let learner = Learner::new(model, optim, schedule);

    let steps_per_epoch = options.steps / options.epochs;
    let sampler = SamplerDatasetOptions::default()
        .with_replacement()
        .with_fixed_size(steps_per_epoch * BATCH)
        .with_seed(options.seed);
    let train_windows = SamplerDataset::new(WindowStarts(corpus.train.len() - CONTEXT - 1), sampler);
    let train = DataLoaderBuilder::new(WindowBatcher { tokens: corpus.train.clone(), context: CONTEXT })
        .batch_size(BATCH)
        .build(train_windows);
    let valid = DataLoaderBuilder::new(WindowBatcher { tokens: corpus.valid.clone(), context: CONTEXT })
        .batch_size(BATCH)
        .build(InMemDataset::new(offsets(&corpus.valid, CONTEXT, 4 * BATCH, 11)));

    let slug: String = arm.name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    let dir = options.out.join("runs").join(slug);
    let _ = std::fs::remove_dir_all(&dir);
    let curves = Arc::new(Mutex::new(Curves::default()));
    let renderer = ProgressRenderer::new(arm.name, steps_per_epoch * options.epochs, curves.clone());
    let started = Instant::now();
    let result = SupervisedTraining::new(&dir, train, valid)
        .num_epochs(options.epochs)
        .with_default_checkpointers()
        .with_checkpointing_strategy(KeepLastNCheckpoints::new(1))
        .metric_train_numeric(LossMetric::new())
        .metric_valid_numeric(LossMetric::new())
        .renderer(Box::new(renderer))
        .with_application_logger(None)
        .launch(learner);
    let wall_seconds = started.elapsed().as_secs_f64();

    let model = result.model;
    let curves = curves.lock().unwrap().clone();
    let tail = (curves.train_loss.len() / 10).max(1);
    let final_train = curves.train_loss[curves.train_loss.len() - tail..].iter().sum::<f64>() / tail as f64;
    let final_valid = validation_loss(&model, corpus, device);
    let state_bytes = state_bytes(&arm, &dir, options.epochs, &model)?;
    Ok(Outcome { arm, curves, final_train, final_valid, state_bytes, wall_seconds })
}

fn print_table(outcomes: &[Outcome]) {
    let reference = &outcomes[0];
    println!();
    println!(
        "| arm | final train loss | final valid loss | vs {} | optimizer state (bytes) | ms/step | wall (s) |",
        reference.arm.name
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for o in outcomes {
        let relative = 100.0 * (o.final_valid - reference.final_valid) / reference.final_valid;
        println!(
            "| {} | {:.4} | {:.4} | {:+.2} % | {} | {:.1} | {:.0} |",
            o.arm.name,
            o.final_train,
            o.final_valid,
            relative,
            o.state_bytes,
            1e3 * o.curves.seconds_per_step(),
            o.wall_seconds
        );
    }
}

fn main() {
    let options = Options::parse().unwrap_or_else(|error| {
        eprintln!("{error}");
        std::process::exit(2);
    });
    let device = common::device_from_name(&options.device_name).unwrap_or_else(|error| {
        eprintln!("{error}");
        std::process::exit(2);
    });
    let corpus = Corpus::load(options.data.as_deref(), CONTEXT).unwrap_or_else(|error| {
        eprintln!("{error}");
        std::process::exit(2);
    });
    println!(
        "{}: {} bytes ({} training, {} validation tokens, {} symbols); transformer {LAYERS}×{D_MODEL}, \
         {HEADS} heads, context {CONTEXT}, batch {BATCH}; {} steps in {} epochs on {}",
        options.data.as_deref().unwrap_or("the Jargon File 4.4.7 (embedded)"),
        corpus.bytes,
        corpus.train.len(),
        corpus.valid.len(),
        corpus.vocab,
        options.steps / options.epochs * options.epochs,
        options.epochs,
        options.device_name
    );
    let arms: Vec<Arm> = MAIN_ARMS
        .into_iter()
        .chain(options.four_bit.then_some(FOUR_BIT_ARM))
        .chain(options.ablation.then_some(ABLATION_ARMS).into_iter().flatten())
        .collect();
    let mut outcomes = Vec::new();
    for arm in arms {
        match run(arm, &options, &corpus, &device) {
            Ok(outcome) => outcomes.push(outcome),
            Err(error) => {
                eprintln!("{}: {error}", arm.name);
                std::process::exit(1);
            }
        }
    }
    print_table(&outcomes);
    std::fs::create_dir_all(&options.out).expect("output directory");
    let plot = options.out.join("loss.svg");
    let series: Vec<(String, Curves)> = outcomes.iter().map(|o| (o.arm.name.to_string(), o.curves.clone())).collect();
    let title = format!("Transformer LM on {}: loss", options.data.as_deref().unwrap_or("the Jargon File"));
    match plot::loss_curves(&plot, &title, &series) {
        Ok(()) => println!("\nloss curves: {}", plot.display()),
        Err(error) => {
            eprintln!("writing {}: {error}", plot.display());
            std::process::exit(1);
        }
    }
}
