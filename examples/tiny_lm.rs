//! A small character-level language model with `StableEmbedding`, trained side by side with
//! Burn's 32-bit AdamW and with AdamW8bit (embedding on 32-bit state, as the paper prescribes);
//! prints both loss curves and the optimizer-state bytes.
//!
//! ```text
//! cargo run --release --example tiny_lm -- [--device flex|ndarray|wgpu] [--steps N] [--text FILE]
//! ```
//! The default text is this repository's README and benchmark notes (English prose that ships
//! with the code); `--text` takes any UTF-8 file.

mod common;

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig, Relu};
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_8bit::nn::{StableEmbedding, StableEmbeddingConfig, keep_embeddings_32bit};
use burn_8bit::{AdamW8bitConfig, StateReport};

const CONTEXT: usize = 16;
const D_MODEL: usize = 64;
const HIDDEN: usize = 512;
const BATCH: usize = 64;

#[derive(Module, Debug)]
struct CharLm {
    embedding: StableEmbedding,
    hidden: Linear,
    output: Linear,
    activation: Relu,
}

impl CharLm {
    fn new(vocab: usize, device: &Device) -> Self {
        Self {
            embedding: StableEmbeddingConfig::new(vocab, D_MODEL).init(device),
            hidden: LinearConfig::new(CONTEXT * D_MODEL, HIDDEN).init(device),
            output: LinearConfig::new(HIDDEN, vocab).init(device),
            activation: Relu::new(),
        }
    }

    /// Mean cross-entropy of the next character after each `[batch, CONTEXT]` window.
    fn loss(&self, windows: Tensor<2, Int>, targets: Tensor<1, Int>) -> Tensor<1> {
        let [batch, _] = windows.dims();
        let x = self.embedding.forward(windows).reshape([batch, CONTEXT * D_MODEL]);
        let logits = self.output.forward(self.activation.forward(self.hidden.forward(x)));
        CrossEntropyLossConfig::new().init(&logits.device()).forward(logits, targets)
    }
}

struct Corpus {
    tokens: Vec<i64>,
    vocab: usize,
}

impl Corpus {
    fn load(path: Option<&str>) -> Result<Self, String> {
        let text = match path {
            Some(path) => std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?,
            None => [include_str!("../README.md"), include_str!("../docs/benchmarks.md")].concat(),
        };
        let mut alphabet: Vec<char> = text.chars().collect();
        alphabet.sort_unstable();
        alphabet.dedup();
        let tokens = text
            .chars()
            .map(|c| alphabet.binary_search(&c).expect("in the alphabet") as i64)
            .collect::<Vec<_>>();
        if tokens.len() <= CONTEXT + 1 {
            return Err("the text is too short".into());
        }
        Ok(Self { tokens, vocab: alphabet.len() })
    }

    /// A deterministic batch of windows and next characters for `step`.
    fn batch(&self, step: usize, device: &Device) -> (Tensor<2, Int>, Tensor<1, Int>) {
        let span = self.tokens.len() - CONTEXT - 1;
        let mut windows = Vec::with_capacity(BATCH * CONTEXT);
        let mut targets = Vec::with_capacity(BATCH);
        for b in 0..BATCH {
            let start = (step * 7919 + b * 104_729) % span;
            windows.extend_from_slice(&self.tokens[start..start + CONTEXT]);
            targets.push(self.tokens[start + CONTEXT]);
        }
        (
            Tensor::from_data(TensorData::new(windows, [BATCH, CONTEXT]), device),
            Tensor::from_data(TensorData::new(targets, [BATCH]), device),
        )
    }
}

fn train(corpus: &Corpus, mut optim: ModuleOptimizer, model: CharLm, device: &Device, steps: usize) -> (Vec<f32>, u64) {
    let mut model = model;
    let mut losses = Vec::with_capacity(steps);
    for step in 0..steps {
        let (windows, targets) = corpus.batch(step, device);
        let loss = model.loss(windows, targets);
        losses.push(loss.clone().into_scalar::<f32>());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(3e-3, model, grads);
    }
    let state_bytes = StateReport::of(&optim).map(|r| r.total_bytes()).unwrap_or(0);
    (losses, state_bytes)
}

fn mean(values: &[f32]) -> f32 {
    values.iter().sum::<f32>() / values.len() as f32
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let device_name = flag("--device").unwrap_or_else(|| "flex".into());
    let steps: usize = flag("--steps").map_or(600, |s| s.parse().expect("--steps takes a number"));
    let device = common::device_from_name(&device_name).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2)
    });
    let corpus = Corpus::load(flag("--text").as_deref()).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2)
    });
    let device = device.autodiff();
    println!(
        "{} characters, vocabulary {}, context {CONTEXT}, {steps} steps of {BATCH} on {device_name}",
        corpus.tokens.len(),
        corpus.vocab
    );

    device.seed(7);
    let model = CharLm::new(corpus.vocab, &device);
    let (losses32, bytes32) = train(&corpus, AdamWConfig::new().with_weight_decay(0.01).init(), model.clone(), &device, steps);
    let config = AdamW8bitConfig::new().with_weight_decay(0.01);
    let optim8 = keep_embeddings_32bit(config.init(), &model, config.clone().f32_states().build());
    let (losses8, bytes8) = train(&corpus, optim8, model, &device, steps);

    println!("{:>6} {:>14} {:>14}", "steps", "AdamW (32-bit)", "AdamW8bit");
    let window = (steps / 12).max(1);
    for start in (0..steps).step_by(window) {
        let end = (start + window).min(steps);
        println!(
            "{:>6} {:>14.4} {:>14.4}",
            format!("{}-{}", start + 1, end),
            mean(&losses32[start..end]),
            mean(&losses8[start..end])
        );
    }
    let tail = (steps / 10).max(1);
    let (final32, final8) = (mean(&losses32[steps - tail..]), mean(&losses8[steps - tail..]));
    println!(
        "final (mean of the last {tail} steps): 32-bit {final32:.4}, 8-bit {final8:.4} ({:+.2} %)",
        100.0 * (final8 - final32) / final32
    );
    println!("optimizer state: 32-bit {bytes32} bytes, 8-bit {bytes8} bytes ({:.1} %)", 100.0 * bytes8 as f64 / bytes32 as f64);
    let finite = losses8.iter().all(|l| l.is_finite());
    println!("8-bit run stable (every loss finite): {finite}");
}
