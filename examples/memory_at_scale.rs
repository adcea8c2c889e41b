//! Training memory of real architectures — weights, gradients and AdamW state, 32-bit against
//! 8-bit and 4-bit — computed from `StateReport` rather than by hand: one tensor of each distinct layer
//! shape takes one optimizer step, its state is measured, and the sizes are multiplied by how
//! many such tensors the model has.
//!
//! ```text
//! cargo run --release --example memory_at_scale [-- --models gpt2,gpt-1.3b,llama-7b]
//! ```
//!
//! Memory holds one tensor at a time: the largest is the 7B model's 131 M-element embedding,
//! whose parameter, gradient and `f32` state take 4 + 4 + 8 bytes per element (2.1 GB).

use burn::module::{Module, Param, ParamId};
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor};
use burn_8bit::{AdamW8bitConfig, Optim8bitConfig, StateConfig, StateReport};

/// A tensor shape and how many tensors of that shape the model has.
struct Layer {
    shape: Vec<usize>,
    count: u64,
    /// A token embedding: the paper keeps its state in 32 bits (`keep_embeddings_32bit`).
    embedding: bool,
}

fn layer(shape: &[usize], count: u64) -> Layer {
    Layer { shape: shape.to_vec(), count, embedding: false }
}

fn embedding(shape: &[usize]) -> Layer {
    Layer { shape: shape.to_vec(), count: 1, embedding: true }
}

/// A GPT-2-style decoder: learned positions, tied output head, biases and two layer norms per
/// block, `d_ff = 4 d`.
fn gpt(vocab: usize, context: usize, d: usize, blocks: u64) -> Vec<Layer> {
    vec![
        embedding(&[vocab, d]),
        layer(&[context, d], 1),
        layer(&[d, 3 * d], blocks),
        layer(&[3 * d], blocks),
        layer(&[d, d], blocks),
        layer(&[d, 4 * d], blocks),
        layer(&[4 * d], blocks),
        layer(&[4 * d, d], blocks),
        // Attention and MLP output biases, two layer norms (γ, β) per block, the final norm.
        layer(&[d], 6 * blocks + 2),
    ]
}

/// Llama 2 7B: RMSNorm, SwiGLU MLP, untied head, no biases.
fn llama_7b() -> Vec<Layer> {
    let (vocab, d, ff, blocks) = (32_000, 4096, 11_008, 32);
    vec![
        embedding(&[vocab, d]),
        layer(&[d, vocab], 1),
        layer(&[d, d], 4 * blocks),
        layer(&[d, ff], 2 * blocks),
        layer(&[ff, d], blocks),
        layer(&[d], 2 * blocks + 1),
    ]
}

fn model(name: &str) -> Result<(&'static str, Vec<Layer>), String> {
    Ok(match name {
        "gpt2" => ("GPT-2 small", gpt(50_257, 1024, 768, 12)),
        "gpt-1.3b" => ("GPT 1.3B (GPT-3 XL shape)", gpt(50_257, 2048, 2048, 24)),
        "llama-7b" => ("Llama 2 7B", llama_7b()),
        other => return Err(format!("unknown model `{other}`: gpt2, gpt-1.3b, llama-7b")),
    })
}

/// One parameter of a given shape, as a module the optimizer can step.
#[derive(Module, Debug)]
struct Weight {
    value: Param<Tensor<2>>,
}

/// State bytes of one tensor of `shape` after one step of `optim`.
fn state_bytes(shape: &[usize], mut optim: ModuleOptimizer, device: &Device) -> Result<u64, Box<dyn std::error::Error>> {
    let rows = shape[0];
    let columns = shape.get(1).copied().unwrap_or(1);
    let weight = Weight {
        value: Param::initialized(ParamId::new(), Tensor::<2>::ones([rows, columns], device).require_grad()),
    };
    let loss = weight.value.val().mul_scalar(1e-3).sum();
    let grads = GradientsParams::from_grads(loss.backward(), &weight);
    let weight = optim.step(1e-3, weight, grads);
    let report = StateReport::of(&optim)?;
    drop(weight);
    Ok(report.total_bytes())
}

const GIB: f64 = (1u64 << 30) as f64;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let models = args
        .iter()
        .position(|arg| arg == "--models")
        .and_then(|i| args.get(i + 1))
        .map_or("gpt2,gpt-1.3b,llama-7b", String::as_str);
    let device = Device::flex().autodiff();
    let eight_bit = AdamW8bitConfig::new();
    let thirty_two_bit = eight_bit.clone().f32_states();
    let four_bit = AdamW8bitConfig::new().with_states(StateConfig::new().with_state_bits(4).with_block_size(128));

    println!("| model | parameters | weights f32 | gradients f32 | AdamW state, 32-bit | AdamW8bit state | AdamW8bit, embedding 32-bit | AdamW 4-bit state | training memory 32-bit → 8-bit |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for name in models.split(',') {
        let (title, layers) = model(name)?;
        let (mut params, mut state32, mut state8, mut state8_embedding32, mut state4) = (0u64, 0u64, 0u64, 0u64, 0u64);
        for layer in &layers {
            let elements: u64 = layer.shape.iter().map(|&n| n as u64).product();
            let bytes32 = state_bytes(&layer.shape, thirty_two_bit.init(), &device)?;
            let bytes8 = state_bytes(&layer.shape, eight_bit.init(), &device)?;
            params += layer.count * elements;
            state32 += layer.count * bytes32;
            state8 += layer.count * bytes8;
            state8_embedding32 += layer.count * if layer.embedding { bytes32 } else { bytes8 };
            state4 += layer.count * state_bytes(&layer.shape, four_bit.init(), &device)?;
        }
        let weights = 4 * params;
        let gib = |bytes: u64| format!("{:.2} GiB", bytes as f64 / GIB);
        println!(
            "| {title} | {:.1} M | {} | {} | {} | {} | {} | {} | {} → {} |",
            params as f64 / 1e6,
            gib(weights),
            gib(weights),
            gib(state32),
            gib(state8),
            gib(state8_embedding32),
            gib(state4),
            gib(2 * weights + state32),
            gib(2 * weights + state8_embedding32),
        );
    }
    Ok(())
}
