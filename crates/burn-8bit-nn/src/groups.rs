//! Parameter groups for stable 8-bit training: every `StableEmbedding` weight on `f32` state.

use burn::module::{Module, ModuleVisitor, Param, ParamGroup, ParamId};
use burn::optim::{DynOptimizer, ModuleOptimizer};
use burn::tensor::Tensor;

use crate::StableEmbedding;

/// The ids of the table weights of every [`crate::StableEmbedding`] in `model`, as a
/// `ParamGroup` (empty when the model has none).
pub fn stable_embedding_weights<M: Module + 'static>(model: &M) -> ParamGroup {
    // A visitor sees the types of submodules, not of the root: check the root itself first.
    if let Some(embedding) = (model as &dyn std::any::Any).downcast_ref::<StableEmbedding>() {
        return ParamGroup::from_ids(vec![embedding.weight.id]);
    }
    let mut finder = EmbeddingWeights::default();
    model.visit(&mut finder);
    ParamGroup::from_ids(finder.ids)
}

/// Gives every `StableEmbedding` weight of `model` its own optimizer — the paper keeps these
/// in 32-bit state — while the rest of `optim` stays as configured. The embedding's gradient is
/// clipped as `optim` clips every other gradient (its config's `grad_clipping`).
///
/// `optimizer` is usually the 8-bit optimizer's own config with `f32` states, so that
/// hyper-parameters stay the same:
///
/// ```
/// use burn::tensor::Device;
/// use burn_8bit_nn::{StableEmbeddingConfig, keep_embeddings_32bit};
/// use burn_8bit_optim::{AdamW8bitConfig, Optim8bitConfig};
///
/// let device = Device::default();
/// let model = StableEmbeddingConfig::new(50_000, 512).init(&device);
/// let config = AdamW8bitConfig::new().with_weight_decay(0.01);
/// let optim = keep_embeddings_32bit(config.init(), &model, config.clone().f32_states().build());
/// # let _ = optim;
/// ```
pub fn keep_embeddings_32bit<M: Module + 'static, O: DynOptimizer + 'static>(
    optim: ModuleOptimizer,
    model: &M,
    optimizer: O,
) -> ModuleOptimizer {
    // Burn clips per group: the embedding group clips as the rest of the model does.
    let clipping = optim.grad_clipping().cloned();
    optim.with_group(stable_embedding_weights(model), optimizer, clipping)
}

/// Collects the `weight` parameter of every module whose type is `StableEmbedding`.
#[derive(Default)]
struct EmbeddingWeights {
    path: Vec<(String, String)>,
    ids: Vec<ParamId>,
}

impl ModuleVisitor for EmbeddingWeights {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.push((name.to_string(), container_type.to_string()));
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if D != 2 {
            return;
        }
        let inside_embedding = self
            .path
            .iter()
            .rev()
            .find(|(_, kind)| kind.starts_with("Struct:"))
            .is_some_and(|(_, kind)| kind == "Struct:StableEmbedding");
        if inside_embedding {
            self.ids.push(param.id);
        }
    }
}
