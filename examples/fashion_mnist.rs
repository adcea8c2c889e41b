//! Fashion-MNIST, real data: an MLP classifier trained with Burn's 32-bit AdamW and with
//! AdamW8bit (and, with `--state-bits 4`, AdamW with 4-bit states in blocks of 128) over
//! several seeds; prints the test accuracy of each run, mean ± sd per arm, the optimizer-state
//! bytes and the time per step.
//!
//! ```text
//! sudo apt-get install dataset-fashion-mnist      # Debian/Ubuntu: the four .gz IDX files
//! cargo run --release --example fashion_mnist -- [--data DIR] [--device flex|ndarray|wgpu]
//!                                                [--epochs N] [--seeds N] [--state-bits 4]
//! ```
//! `--data` defaults to `/usr/share/datasets/fashion-mnist` (where the package puts them).

mod common;

use std::io::Read;
use std::path::Path;
use std::time::Instant;

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig, Relu};
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_8bit::{AdamW8bitConfig, Optim8bitConfig, StateConfig, StateReport};
use burn_8bit_conformance::rng::Rng;

const PIXELS: usize = 28 * 28;
const CLASSES: usize = 10;
const BATCH: usize = 128;

#[derive(Module, Debug)]
struct Mlp {
    hidden: Linear,
    output: Linear,
    activation: Relu,
}

impl Mlp {
    fn new(device: &Device) -> Self {
        Self {
            hidden: LinearConfig::new(PIXELS, 256).init(device),
            output: LinearConfig::new(256, CLASSES).init(device),
            activation: Relu::new(),
        }
    }

    fn forward(&self, images: Tensor<2>) -> Tensor<2> {
        self.output.forward(self.activation.forward(self.hidden.forward(images)))
    }
}

struct Split {
    images: Vec<f32>,
    labels: Vec<i64>,
}

impl Split {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn batch(&self, indices: &[usize], device: &Device) -> (Tensor<2>, Tensor<1, Int>) {
        let mut images = Vec::with_capacity(indices.len() * PIXELS);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            images.extend_from_slice(&self.images[i * PIXELS..(i + 1) * PIXELS]);
            labels.push(self.labels[i]);
        }
        (
            Tensor::from_data(TensorData::new(images, [indices.len(), PIXELS]), device),
            Tensor::from_data(TensorData::new(labels, [indices.len()]), device),
        )
    }
}

fn read_gz(path: &Path) -> Result<Vec<u8>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(file)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(bytes)
}

/// An IDX file: big-endian magic (type, rank), dimensions, then the bytes.
fn idx(bytes: &[u8], rank: usize) -> Result<(Vec<usize>, &[u8]), String> {
    let header = 4 + 4 * rank;
    if bytes.len() < header || bytes[2] != 0x08 || usize::from(bytes[3]) != rank {
        return Err("not an IDX file of unsigned bytes with the expected rank".into());
    }
    let dims: Vec<usize> = (0..rank)
        .map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().expect("4 bytes")) as usize)
        .collect();
    let data = &bytes[header..];
    if data.len() != dims.iter().product::<usize>() {
        return Err("IDX size does not match its dimensions".into());
    }
    Ok((dims, data))
}

fn load(dir: &Path, prefix: &str) -> Result<Split, String> {
    let images = read_gz(&dir.join(format!("{prefix}-images-idx3-ubyte.gz")))?;
    let labels = read_gz(&dir.join(format!("{prefix}-labels-idx1-ubyte.gz")))?;
    let (image_dims, pixels) = idx(&images, 3)?;
    let (label_dims, labels) = idx(&labels, 1)?;
    if image_dims[0] != label_dims[0] || image_dims[1] * image_dims[2] != PIXELS {
        return Err(format!("{prefix}: images {image_dims:?} and labels {label_dims:?} disagree"));
    }
    Ok(Split {
        images: pixels.iter().map(|&p| f32::from(p) / 255.0).collect(),
        labels: labels.iter().map(|&l| i64::from(l)).collect(),
    })
}

/// A permutation of `0..n` from a seed (Fisher–Yates).
fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = Rng::new(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

struct Run {
    accuracy: f64,
    state_bytes: u64,
    ms_per_step: f64,
}

fn run(train: &Split, test: &Split, mut optim: ModuleOptimizer, device: &Device, seed: u64, epochs: usize) -> Run {
    device.seed(seed);
    let mut model = Mlp::new(device);
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let mut steps = 0usize;
    let start = Instant::now();
    for epoch in 0..epochs {
        let order = shuffled(train.len(), seed * 1000 + epoch as u64);
        for indices in order.chunks(BATCH) {
            let (images, labels) = train.batch(indices, device);
            let loss = loss_fn.forward(model.forward(images), labels);
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(1e-3, model, grads);
            steps += 1;
        }
    }
    device.sync().expect("device sync");
    let ms_per_step = start.elapsed().as_secs_f64() * 1e3 / steps as f64;
    let model = model.valid();
    let inner = device.clone().inner();
    let mut correct = 0i64;
    let indices: Vec<usize> = (0..test.len()).collect();
    for chunk in indices.chunks(1000) {
        let (images, labels) = test.batch(chunk, &inner);
        let predicted = model.forward(images).argmax(1).reshape([chunk.len()]);
        correct += predicted.equal(labels).int().sum().into_scalar::<i64>();
    }
    Run {
        accuracy: 100.0 * correct as f64 / test.len() as f64,
        state_bytes: StateReport::of(&optim).map(|r| r.total_bytes()).unwrap_or(0),
        ms_per_step,
    }
}

fn mean_sd(values: &[f64]) -> (f64, f64) {
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (values.len().max(2) - 1) as f64;
    (mean, var.sqrt())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let data = flag("--data").unwrap_or_else(|| "/usr/share/datasets/fashion-mnist".into());
    let device_name = flag("--device").unwrap_or_else(|| "flex".into());
    let epochs: usize = flag("--epochs").map_or(5, |s| s.parse().expect("--epochs takes a number"));
    let seeds: u64 = flag("--seeds").map_or(3, |s| s.parse().expect("--seeds takes a number"));
    let device = common::device_from_name(&device_name).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2)
    });
    let (train, test) = match (load(Path::new(&data), "train"), load(Path::new(&data), "t10k")) {
        (Ok(train), Ok(test)) => (train, test),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("Fashion-MNIST not found ({e}); install it with `apt-get install dataset-fashion-mnist` or pass --data DIR");
            std::process::exit(2)
        }
    };
    let device = device.autodiff();
    println!(
        "Fashion-MNIST: {} train / {} test images; MLP 784-256-10; {epochs} epochs of batch {BATCH}; lr 1e-3; {device_name}",
        train.len(),
        test.len()
    );
    let mut arms: Vec<(&str, fn() -> ModuleOptimizer)> =
        vec![("Burn AdamW (32-bit)", || AdamWConfig::new().init()), ("AdamW8bit", || AdamW8bitConfig::new().init())];
    match flag("--state-bits").as_deref() {
        None | Some("8") => {}
        Some("4") => arms.push(("AdamW 4-bit states", || {
            AdamW8bitConfig::new().with_states(StateConfig::new().with_state_bits(4).with_block_size(128)).init()
        })),
        Some(other) => {
            eprintln!("--state-bits takes 8 or 4, not {other}");
            std::process::exit(2)
        }
    }
    print!("{:>5}", "seed");
    for (name, _) in &arms {
        print!(" {:>22}", format!("{name} acc %"));
    }
    println!();
    let mut runs: Vec<Vec<Run>> = arms.iter().map(|_| Vec::new()).collect();
    for seed in 1..=seeds {
        print!("{seed:>5}");
        for ((_, optim), runs) in arms.iter().zip(&mut runs) {
            let outcome = run(&train, &test, optim(), &device, seed, epochs);
            print!(" {:>22.2}", outcome.accuracy);
            runs.push(outcome);
        }
        println!();
    }
    println!("| optimizer | test accuracy % (mean ± sd, {seeds} seeds) | optimizer state bytes | ms/step |");
    println!("|---|---:|---:|---:|");
    let accuracy = |runs: &[Run]| mean_sd(&runs.iter().map(|r| r.accuracy).collect::<Vec<_>>());
    for ((name, _), runs) in arms.iter().zip(&runs) {
        let (mean, sd) = accuracy(runs);
        let ms = runs.iter().map(|r| r.ms_per_step).sum::<f64>() / runs.len() as f64;
        println!("| {name} | {mean:.2} ± {sd:.2} | {} | {ms:.2} |", runs[0].state_bytes);
    }
    let (full, _) = accuracy(&runs[0]);
    for ((name, _), runs) in arms.iter().zip(&runs).skip(1) {
        println!("{name} − 32-bit: {:+.2} percentage points", accuracy(runs).0 - full);
    }
}
