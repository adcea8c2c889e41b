//! `StableEmbedding`: embedding → layer norm in `f32`, Xavier-uniform weights, optional padding row.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::tensor::module::embedding;
use burn::tensor::{Device, FloatDType, Int, Tensor};

/// An invalid [`StableEmbeddingConfig`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StableEmbeddingError {
    /// `n_embedding` or `d_model` is zero.
    #[error("a StableEmbedding needs n_embedding > 0 and d_model > 0, got {n_embedding}×{d_model}")]
    Empty {
        /// Rows asked for.
        n_embedding: usize,
        /// Columns asked for.
        d_model: usize,
    },
    /// The padding index is not a row of the table.
    #[error("padding index {padding_idx} is outside the {n_embedding} rows")]
    PaddingOutOfRange {
        /// The index given.
        padding_idx: usize,
        /// Rows of the table.
        n_embedding: usize,
    },
    /// The layer-norm epsilon is not a finite value > 0.
    #[error("layer_norm_epsilon = {0} is invalid: expected a finite value > 0")]
    Epsilon(f64),
}

/// Configuration of a [`StableEmbedding`], named like Burn's `EmbeddingConfig`.
///
/// ```
/// use burn::tensor::{Device, Int, Tensor};
/// use burn_8bit_nn::StableEmbeddingConfig;
///
/// let device = Device::default();
/// let embedding = StableEmbeddingConfig::new(1000, 64).with_padding_idx(Some(0)).init(&device);
/// let tokens = Tensor::<2, Int>::from_ints([[5, 0, 7]], &device);
/// assert_eq!(embedding.forward(tokens).dims(), [1, 3, 64]);
/// ```
#[derive(Config, Debug)]
pub struct StableEmbeddingConfig {
    /// Number of embedding vectors (vocabulary size).
    pub n_embedding: usize,
    /// Size of each vector.
    pub d_model: usize,
    /// A row kept at zero (its gradient masked), e.g. the padding token.
    pub padding_idx: Option<usize>,
    /// Epsilon of the layer norm.
    #[config(default = 1e-5)]
    pub layer_norm_epsilon: f64,
}

/// The stable embedding layer of Dettmers et al. (2022): a lookup table initialised
/// Xavier-uniform (U(−a, a), a = sqrt(6 / (n_embedding + d_model))), followed by a layer norm
/// computed in `f32` whatever the model's float type. Its weight is meant to keep 32-bit optimizer
/// state (see [`crate::keep_embeddings_32bit`]).
///
/// Input `[batch, seq]` token ids, output `[batch, seq, d_model]`, like Burn's `Embedding`.
#[derive(Module, Debug)]
pub struct StableEmbedding {
    /// The table, `[n_embedding, d_model]`.
    pub weight: Param<Tensor<2>>,
    /// Layer-norm scale, `[d_model]`.
    pub gamma: Param<Tensor<1>>,
    /// Layer-norm shift, `[d_model]`.
    pub beta: Param<Tensor<1>>,
    /// The padding row, if any.
    pub padding_idx: Option<usize>,
    /// Layer-norm epsilon.
    pub epsilon: f64,
}

impl StableEmbeddingConfig {
    /// Checks the config.
    pub fn validate(&self) -> Result<(), StableEmbeddingError> {
        if self.n_embedding == 0 || self.d_model == 0 {
            return Err(StableEmbeddingError::Empty {
                n_embedding: self.n_embedding,
                d_model: self.d_model,
            });
        }
        if let Some(padding_idx) = self.padding_idx
            && padding_idx >= self.n_embedding
        {
            return Err(StableEmbeddingError::PaddingOutOfRange {
                padding_idx,
                n_embedding: self.n_embedding,
            });
        }
        if !(self.layer_norm_epsilon > 0.0 && self.layer_norm_epsilon.is_finite()) {
            return Err(StableEmbeddingError::Epsilon(self.layer_norm_epsilon));
        }
        Ok(())
    }

    /// The layer on `device`, or a typed error for an invalid config.
    pub fn try_init(&self, device: &Device) -> Result<StableEmbedding, StableEmbeddingError> {
        self.validate()?;
        let (n, d) = (self.n_embedding, self.d_model);
        // Burn's Xavier initialiser takes fan-in and fan-out explicitly for a 2-D table.
        let weight: Tensor<2> = Initializer::XavierUniform { gain: 1.0 }
            .init_with([n, d], Some(d), Some(n), device)
            .val()
            .detach();
        let weight = match self.padding_idx {
            Some(row) => weight.slice_assign([row..row + 1, 0..d], Tensor::zeros([1, d], device)),
            None => weight,
        };
        // A parameter must be a leaf of the autodiff graph.
        let weight = weight.detach();
        Ok(StableEmbedding {
            weight: Param::from_tensor(weight),
            gamma: Param::from_tensor(Tensor::ones([d], device)),
            beta: Param::from_tensor(Tensor::zeros([d], device)),
            padding_idx: self.padding_idx,
            epsilon: self.layer_norm_epsilon,
        })
    }

    /// The layer on `device`; panics with the [`StableEmbeddingError`] message on an invalid
    /// config (see [`Self::try_init`]).
    pub fn init(&self, device: &Device) -> StableEmbedding {
        self.try_init(device).unwrap_or_else(|error| panic!("{error}"))
    }
}

impl StableEmbedding {
    /// Embeds `[batch, seq]` token ids into `[batch, seq, d_model]`, normalised.
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        let weight = self.weight.val();
        let dtype = weight.dtype();
        let weight = match self.padding_idx {
            // Multiplying by a 0/1 row mask keeps the padding row's output and gradient at zero.
            Some(row) => {
                let [n, _] = weight.dims();
                let device = weight.device();
                let mask = Tensor::<1>::ones([n], (&device, dtype))
                    .slice_assign([row..row + 1], Tensor::zeros([1], (&device, dtype)))
                    .unsqueeze_dim::<2>(1);
                weight * mask
            }
            None => weight,
        };
        let x = embedding(weight, tokens).cast(FloatDType::F32);
        let mean = x.clone().mean_dim(2);
        let centered = x - mean;
        let variance = centered.clone().square().mean_dim(2);
        let normalised = centered / (variance + self.epsilon).sqrt();
        let gamma = self.gamma.val().cast(FloatDType::F32).unsqueeze::<3>();
        let beta = self.beta.val().cast(FloatDType::F32).unsqueeze::<3>();
        let out = normalised * gamma + beta;
        out.cast(FloatDType::from(dtype))
    }

    /// Rows and columns of the table.
    pub fn dims(&self) -> [usize; 2] {
        self.weight.dims()
    }
}
