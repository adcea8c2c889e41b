//! The text, its byte alphabet, a train/validation split, and the batches the `Learner` reads.

use std::io::Read;
use std::sync::Arc;

use burn::data::dataloader::batcher::Batcher;
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_8bit_conformance::rng::Rng;

/// The default text: the Jargon File 4.4.7 (public domain), see `data/README.md`.
const DEFAULT_TEXT: &[u8] = include_bytes!("../../data/jargon-file-4.4.7.txt.gz");

/// Every `VALID_EVERY`-th chunk of `CHUNK` bytes is held out for validation: interleaved, so
/// both splits sample the whole text.
const CHUNK: usize = 4096;
const VALID_EVERY: usize = 20;

/// A tokenised text split into training and validation tokens.
pub struct Corpus {
    pub train: Arc<Vec<u32>>,
    pub valid: Arc<Vec<u32>>,
    pub vocab: usize,
    pub bytes: usize,
}

impl Corpus {
    /// The text at `path`, or the embedded default; tokens are indices into its sorted set of
    /// distinct bytes.
    pub fn load(path: Option<&str>, context: usize) -> Result<Self, String> {
        let text = match path {
            Some(path) => std::fs::read(path).map_err(|e| format!("{path}: {e}"))?,
            None => {
                let mut text = Vec::new();
                flate2::read::GzDecoder::new(DEFAULT_TEXT)
                    .read_to_end(&mut text)
                    .map_err(|e| format!("embedded text: {e}"))?;
                text
            }
        };
        let mut alphabet = text.clone();
        alphabet.sort_unstable();
        alphabet.dedup();
        let mut index = [0u32; 256];
        for (i, &byte) in alphabet.iter().enumerate() {
            index[usize::from(byte)] = i as u32;
        }
        let (mut train, mut valid) = (Vec::new(), Vec::new());
        for (i, chunk) in text.chunks(CHUNK).enumerate() {
            let split = if i % VALID_EVERY == VALID_EVERY - 1 { &mut valid } else { &mut train };
            split.extend(chunk.iter().map(|&byte| index[usize::from(byte)]));
        }
        if valid.len() <= context + 1 || train.len() <= context + 1 {
            return Err(format!(
                "the text is too short: {} bytes, need {} chunks of {CHUNK} bytes for a validation split",
                text.len(),
                VALID_EVERY
            ));
        }
        Ok(Self {
            train: Arc::new(train),
            valid: Arc::new(valid),
            vocab: alphabet.len(),
            bytes: text.len(),
        })
    }
}

/// `count` window offsets into `tokens`, from a seed.
pub fn offsets(tokens: &[u32], context: usize, count: usize, seed: u64) -> Vec<usize> {
    let span = (tokens.len() - context - 1) as u64;
    let mut rng = Rng::new(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    (0..count).map(|_| (rng.next_u64() % span) as usize).collect()
}

/// `[batch, context]` input tokens and the next token at every position.
#[derive(Clone, Debug)]
pub struct TextBatch {
    pub inputs: Tensor<2, Int>,
    pub targets: Tensor<2, Int>,
}

/// Cuts windows of `context + 1` tokens at the offsets it is given.
#[derive(Clone)]
pub struct WindowBatcher {
    pub tokens: Arc<Vec<u32>>,
    pub context: usize,
}

impl Batcher<usize, TextBatch> for WindowBatcher {
    fn batch(&self, offsets: Vec<usize>, device: &Device) -> TextBatch {
        let (batch, context) = (offsets.len(), self.context);
        let mut inputs = Vec::with_capacity(batch * context);
        let mut targets = Vec::with_capacity(batch * context);
        for offset in offsets {
            let window = &self.tokens[offset..offset + context + 1];
            inputs.extend(window[..context].iter().map(|&t| i64::from(t)));
            targets.extend(window[1..].iter().map(|&t| i64::from(t)));
        }
        TextBatch {
            inputs: Tensor::from_data(TensorData::new(inputs, [batch, context]), device),
            targets: Tensor::from_data(TensorData::new(targets, [batch, context]), device),
        }
    }
}
