//! A small pre-norm transformer language model over bytes, with `StableEmbedding` (or, for the
//! ablation, Burn's plain `Embedding`) for its tokens.

use burn::module::Module;
use burn::nn::attention::generate_autoregressive_mask;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::transformer::{TransformerEncoder, TransformerEncoderConfig, TransformerEncoderInput};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::{Device, Int, Tensor};
use burn::train::{ClassificationOutput, InferenceStep, TrainOutput, TrainStep};
use burn_8bit::nn::{StableEmbedding, StableEmbeddingConfig};

use crate::data::TextBatch;

/// The model's size.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub vocab: usize,
    pub context: usize,
    pub d_model: usize,
    pub layers: usize,
    pub heads: usize,
}

#[derive(Module, Debug)]
pub struct TransformerLm {
    /// The paper's layer: Xavier init, layer norm on the output (`None` in the ablation arm).
    stable: Option<StableEmbedding>,
    /// Burn's embedding, N(0, 1) init (only in the ablation arm without StableEmbedding).
    plain: Option<Embedding>,
    position: Embedding,
    encoder: TransformerEncoder,
    norm: LayerNorm,
    head: Linear,
}

impl TransformerLm {
    pub fn new(shape: Shape, stable_embedding: bool, device: &Device) -> Self {
        let Shape { vocab, context, d_model, layers, heads } = shape;
        Self {
            stable: stable_embedding.then(|| StableEmbeddingConfig::new(vocab, d_model).init(device)),
            plain: (!stable_embedding).then(|| EmbeddingConfig::new(vocab, d_model).init(device)),
            position: EmbeddingConfig::new(context, d_model).init(device),
            encoder: TransformerEncoderConfig::new(d_model, 4 * d_model, heads, layers)
                .with_dropout(0.0)
                .with_norm_first(true)
                .init(device),
            norm: LayerNormConfig::new(d_model).init(device),
            head: LinearConfig::new(d_model, vocab).init(device),
        }
    }

    /// Logits `[batch, context, vocab]` for the next token at every position.
    pub fn logits(&self, inputs: Tensor<2, Int>) -> Tensor<3> {
        let [batch, context] = inputs.dims();
        let device = inputs.device();
        let tokens = match (&self.stable, &self.plain) {
            (Some(stable), _) => stable.forward(inputs),
            (None, Some(plain)) => plain.forward(inputs),
            (None, None) => unreachable!("the model has one token embedding"),
        };
        let positions = Tensor::<1, Int>::arange(0..context as i64, &device).reshape([1, context]);
        let x = tokens + self.position.forward(positions);
        let mask = generate_autoregressive_mask(batch, context, &device);
        let x = self.encoder.forward(TransformerEncoderInput::new(x).mask_attn(mask));
        self.head.forward(self.norm.forward(x))
    }

    /// Mean cross-entropy over every position of the batch.
    pub fn forward(&self, batch: TextBatch) -> ClassificationOutput {
        let logits = self.logits(batch.inputs);
        let [b, t, vocab] = logits.dims();
        let logits = logits.reshape([b * t, vocab]);
        let targets = batch.targets.reshape([b * t]);
        let loss = CrossEntropyLossConfig::new()
            .init(&logits.device())
            .forward(logits.clone(), targets.clone());
        ClassificationOutput::new(loss, logits, targets)
    }
}

impl TrainStep for TransformerLm {
    type Input = TextBatch;
    type Output = ClassificationOutput;

    fn step(&self, batch: TextBatch) -> TrainOutput<ClassificationOutput> {
        let output = self.forward(batch);
        TrainOutput::new(self, output.loss.backward(), output)
    }
}

impl InferenceStep for TransformerLm {
    type Input = TextBatch;
    type Output = ClassificationOutput;

    fn step(&self, batch: TextBatch) -> ClassificationOutput {
        self.forward(batch)
    }
}
