//! Layers for stable 8-bit training with [Burn](https://burn.dev), after Dettmers et al., *8-bit
//! Optimizers via Block-wise Quantization* (ICLR 2022), §2.3.
//!
//! - [`StableEmbedding`]: an embedding with Xavier-uniform initialisation and a layer norm
//!   (computed in `f32`), whose weight keeps **32-bit** optimizer state;
//! - [`keep_embeddings_32bit`]: the one call that gives every `StableEmbedding` weight of a model
//!   its own `f32`-state optimizer while the rest of the model trains with 8-bit state.
#![deny(missing_docs)]
#![deny(rustdoc::broken_intra_doc_links)]

mod embedding;
mod groups;

pub use embedding::{StableEmbedding, StableEmbeddingConfig, StableEmbeddingError};
pub use groups::{keep_embeddings_32bit, stable_embedding_weights};
