//! StableEmbedding, its 32-bit optimizer state, and per-parameter overrides, on every backend.

mod common;

use burn::module::{Module, ModuleVisitor, Param, ParamGroup};
use burn::nn::{Linear, LinearConfig};
use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{DType, Device, FloatDType, Int, Tensor};
use burn_8bit::nn::{
    StableEmbedding, StableEmbeddingConfig, StableEmbeddingError, keep_embeddings_32bit, stable_embedding_weights,
};
use burn_8bit::{
    AdamW8bitConfig, Optim8bitConfig, OptimizerKind, StateConfig, StateReport, SwitchGroups, SwitchRecord,
    load_record_checked,
};
use common::devices;

#[derive(Module, Debug)]
struct TinyLm {
    embedding: StableEmbedding,
    head: Linear,
}

impl TinyLm {
    fn new(device: &Device) -> Self {
        Self {
            embedding: StableEmbeddingConfig::new(100, 64).with_padding_idx(Some(0)).init(device),
            head: LinearConfig::new(64, 80).init(device),
        }
    }

    fn loss(&self, tokens: Tensor<2, Int>) -> Tensor<1> {
        let logits = self.head.forward(self.embedding.forward(tokens));
        logits.powi_scalar(2).mean()
    }
}

fn floats<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.cast(FloatDType::F32).into_data().try_to_vec::<f32>().unwrap()
}

fn tokens(device: &Device) -> Tensor<2, Int> {
    Tensor::<2, Int>::from_ints([[3, 0, 7, 7, 42], [0, 99, 1, 5, 0]], device)
}

#[test]
fn weights_are_xavier_uniform_with_a_zero_padding_row() {
    for (name, device) in devices() {
        let layer = StableEmbeddingConfig::new(300, 200).with_padding_idx(Some(7)).init(&device);
        let bound = (6.0f32 / 500.0).sqrt();
        let weight = floats(layer.weight.val());
        assert!(weight.iter().all(|w| w.abs() <= bound), "[{name}] outside ±{bound}");
        let mean_abs = weight.iter().map(|w| w.abs()).sum::<f32>() / weight.len() as f32;
        assert!((mean_abs - bound / 2.0).abs() < 0.05 * bound, "[{name}] not uniform: {mean_abs}");
        assert!(weight[7 * 200..8 * 200].iter().all(|&w| w == 0.0), "[{name}] padding row");
    }
}

#[test]
fn invalid_configs_are_typed_errors() {
    let device = Device::flex();
    assert_eq!(
        StableEmbeddingConfig::new(10, 4).with_padding_idx(Some(10)).try_init(&device).err(),
        Some(StableEmbeddingError::PaddingOutOfRange { padding_idx: 10, n_embedding: 10 })
    );
    assert!(matches!(StableEmbeddingConfig::new(0, 4).try_init(&device), Err(StableEmbeddingError::Empty { .. })));
    assert!(matches!(
        StableEmbeddingConfig::new(10, 4).with_layer_norm_epsilon(0.0).try_init(&device),
        Err(StableEmbeddingError::Epsilon(_))
    ));
}

#[test]
fn forward_normalises_each_position_and_zeroes_padding() {
    for (name, device) in devices() {
        let layer = StableEmbeddingConfig::new(100, 64).with_padding_idx(Some(0)).init(&device);
        let out = layer.forward(tokens(&device));
        assert_eq!(out.dims(), [2, 5, 64], "[{name}]");
        let values = floats(out);
        for (position, row) in values.chunks(64).enumerate() {
            let mean = row.iter().sum::<f32>() / 64.0;
            let var = row.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / 64.0;
            let padding = [1, 5, 9].contains(&position);
            if padding {
                assert!(row.iter().all(|&x| x == 0.0), "[{name}] padding position {position}");
            } else {
                // var(x) / (var(x) + ε) with var(x) ≈ a²/3 ≈ 0.012 and ε = 1e-5.
                assert!(mean.abs() < 1e-5 && (var - 1.0).abs() < 2e-3, "[{name}] {position}: {mean} {var}");
            }
        }
    }
}

#[test]
fn half_precision_models_normalise_in_f32() {
    for (name, device) in devices() {
        if !device.supports_dtype(DType::F16) {
            common::skip(&format!("{name}: no F16"));
            continue;
        }
        let mut layer = StableEmbeddingConfig::new(100, 64).init(&device);
        let reference = floats(layer.forward(tokens(&device)));
        layer.weight = layer.weight.map(|w| w.cast(FloatDType::F16));
        let out = layer.forward(tokens(&device));
        assert_eq!(out.dtype(), DType::F16, "[{name}]");
        let worst = floats(out).iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        // Only the table's f16 rounding and the output's remain: the statistics are f32.
        assert!(worst < 2e-2, "[{name}] {worst}");
    }
}

fn train(model: TinyLm, optim: &mut ModuleOptimizer, device: &Device, steps: usize) -> (TinyLm, Vec<f32>) {
    let mut model = model;
    let mut losses = Vec::new();
    for _ in 0..steps {
        let loss = model.loss(tokens(device));
        losses.push(loss.clone().into_scalar::<f32>());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-2, model, grads);
    }
    (model, losses)
}

#[test]
fn the_padding_row_stays_zero_through_training() {
    for (name, device) in devices() {
        let device = device.autodiff();
        let mut optim = AdamW8bitConfig::new().with_weight_decay(0.1).with_states(StateConfig::new().with_min_8bit_size(1024)).init();
        let (model, losses) = train(TinyLm::new(&device), &mut optim, &device, 5);
        assert!(losses[4] < losses[0], "[{name}] {losses:?}");
        let weight = floats(model.embedding.weight.val().inner());
        assert!(weight[..64].iter().all(|&w| w == 0.0), "[{name}] padding row moved");
    }
}

#[test]
fn embeddings_keep_f32_state_while_the_rest_is_8_bit() {
    for (name, device) in devices() {
        let device = device.autodiff();
        let model = TinyLm::new(&device);
        let config = AdamW8bitConfig::new().with_states(StateConfig::new().with_min_8bit_size(1024));
        let mut optim = keep_embeddings_32bit(config.init(), &model, config.clone().f32_states().build());
        let (_, _) = train(model, &mut optim, &device, 2);
        let report = StateReport::of(&optim).unwrap();
        let by_elements = |n: u64| report.parameters.iter().find(|p| p.elements == Some(n)).unwrap();
        let embedding = by_elements(100 * 64);
        assert!(!embedding.quantized, "[{name}] embedding state is 8-bit: {report:?}");
        assert_eq!(embedding.bytes, 2 * 4 * 100 * 64, "[{name}]");
        let head_weight = report
            .parameters
            .iter()
            .filter(|p| p.elements == Some(64 * 80) && p.quantized)
            .count();
        assert_eq!(head_weight, 1, "[{name}] the head's weight should be 8-bit: {report:?}");
    }
}

#[test]
fn any_group_can_get_its_own_block_size_and_hyper_parameters() {
    let device = Device::flex().autodiff();
    let model = TinyLm::new(&device);
    let head = ParamGroup::ids_from_module(model.head.clone());
    let mut optim = AdamW8bitConfig::new()
        .with_states(StateConfig::new().with_min_8bit_size(1024))
        .init()
        .with_group(head, AdamW8bitConfig::new().with_states(StateConfig::new().with_min_8bit_size(1024).with_block_size(64)).with_beta_2(0.99).build(), None);
    let (_, _) = train(model, &mut optim, &device, 1);
    let report = StateReport::of(&optim).unwrap();
    let head_weight = report.parameters.iter().find(|p| p.elements == Some(64 * 80)).unwrap();
    // Two states of 5120 codes plus one f32 absmax per 64 elements (the skip count is a scalar).
    assert_eq!(head_weight.bytes, 2 * (5120 + 4 * 80), "{report:?}");
    let embedding = report.parameters.iter().find(|p| p.elements == Some(100 * 64)).unwrap();
    // The rest keeps the default block of 256.
    assert_eq!(embedding.bytes, 2 * (6400 + 4 * 25), "{report:?}");
}

/// The trap of loading a `keep_embeddings_32bit` run into a plain 8-bit optimizer: the
/// embedding's `f32` state is quantized at its next step and keeps its step count, instead of
/// restarting from zero.
#[test]
fn an_f32_embedding_state_converts_when_loaded_into_a_plain_optimizer() {
    for (name, device) in devices() {
        let device = device.autodiff();
        let model = TinyLm::new(&device);
        let config = AdamW8bitConfig::new().with_states(StateConfig::new().with_min_8bit_size(1024));
        let mut grouped = keep_embeddings_32bit(config.init(), &model, config.clone().f32_states().build());
        let (model, _) = train(model, &mut grouped, &device, 2);
        let loaded = load_record_checked(config.init(), grouped.to_record(), &model, OptimizerKind::AdamW)
            .unwrap_or_else(|e| panic!("[{name}] {e}"));
        let mut plain = loaded.optimizer;
        let (_, _) = train(model, &mut plain, &device, 1);
        let report = StateReport::of(&plain).unwrap();
        let embedding = report.parameters.iter().find(|p| p.elements == Some(100 * 64)).unwrap();
        assert!(embedding.quantized, "[{name}] the plain optimizer keeps 8-bit state: {report:?}");
        assert_eq!(embedding.steps, Some(3), "[{name}] the embedding's state restarted: {report:?}");
    }
}

/// A second `GradientsParams` holding the same gradient tensors as `from`, for the parameters
/// of the module it visits.
struct SameGradients<'a> {
    from: &'a GradientsParams,
    to: GradientsParams,
}

impl ModuleVisitor for SameGradients<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(grad) = self.from.get::<D>(param.id) {
            self.to.register(param.id, grad);
        }
    }
}

/// Burn clips per group: the embedding group of `keep_embeddings_32bit` must clip its gradient
/// as the config clips every other one, so that it steps exactly as it does without the group.
/// Every optimizer steps from one backward pass: two passes may differ in their last bits on
/// wgpu, whose autotuned kernels can change between calls.
#[test]
fn the_embedding_group_clips_as_the_rest_does() {
    for (name, device) in devices() {
        let device = device.autodiff();
        let model = TinyLm::new(&device);
        let grads = GradientsParams::from_grads(model.loss(tokens(&device)).backward(), &model);
        let clipped = AdamW8bitConfig::new().with_grad_clipping(Some(GradientClippingConfig::Value(1e-6)));
        let embedding_after = |mut optim: ModuleOptimizer| {
            let mut same = SameGradients { from: &grads, to: GradientsParams::new() };
            model.visit(&mut same);
            let model = optim.step(1e-2, model.clone(), same.to);
            floats(model.embedding.weight.val().inner())
        };
        let grouped = embedding_after(keep_embeddings_32bit(clipped.init(), &model, clipped.clone().f32_states().build()));
        let ungrouped = embedding_after(clipped.clone().f32_states().init());
        let unclipped = embedding_after(AdamW8bitConfig::new().f32_states().init());
        assert_eq!(grouped, ungrouped, "[{name}] the embedding group stepped differently");
        assert_ne!(grouped, unclipped, "[{name}] clipping changed nothing: the test cannot tell");
    }
}

/// Converting a Burn AdamW record for a `keep_embeddings_32bit` run: with the run's groups the
/// embedding's state stays `f32`, bit for bit; converted as one optimizer it would be quantized.
#[test]
fn switching_with_groups_keeps_the_embedding_state_f32() {
    for (name, device) in devices() {
        let device = device.autodiff();
        let mut burn_adamw = AdamWConfig::new().init();
        let (model, _) = train(TinyLm::new(&device), &mut burn_adamw, &device, 2);
        let config = AdamW8bitConfig::new().with_states(StateConfig::new().with_min_8bit_size(1024));
        let embedding_optimizer = config.clone().f32_states().build();
        let groups = SwitchGroups::new(&config.build()).with_group(stable_embedding_weights(&model), &embedding_optimizer);
        let grouped = || groups.from_burn_record(burn_adamw.to_record()).unwrap_or_else(|e| panic!("[{name}] {e}"));
        let plain = || config.build().from_burn_record(burn_adamw.to_record()).unwrap_or_else(|e| panic!("[{name}] {e}"));

        let optim = keep_embeddings_32bit(config.init(), &model, embedding_optimizer.clone());
        let loaded = load_record_checked(optim, grouped(), &model, OptimizerKind::AdamW)
            .unwrap_or_else(|e| panic!("[{name}] {e}"));
        let embedding_state = |report: &StateReport| report.parameters.iter().find(|p| p.elements == Some(100 * 64)).cloned().unwrap();
        let embedding = embedding_state(&loaded.report);
        assert!(!embedding.quantized, "[{name}] the embedding state was quantized: {:?}", loaded.report);
        assert_eq!(embedding.steps, Some(2), "[{name}]");
        let head = loaded.report.parameters.iter().find(|p| p.elements == Some(64 * 80)).unwrap();
        assert!(head.quantized, "[{name}] the head's state should be 8-bit: {:?}", loaded.report);
        assert!(embedding_state(&StateReport::from_record(plain()).unwrap()).quantized, "[{name}]");

        // Back to Burn's record and one more step of Burn's AdamW: the embedding moves exactly as
        // it does from the original record, which only an unquantized round trip achieves.
        let embedding_after = |record| {
            let mut optim = AdamWConfig::new().init().load_record(record);
            let (model, _) = train(model.clone(), &mut optim, &device, 1);
            floats(model.embedding.weight.val().inner())
        };
        let original = embedding_after(burn_adamw.to_record());
        let through_groups = embedding_after(groups.to_burn_record(grouped()).unwrap());
        let through_plain = embedding_after(config.build().to_burn_record(plain()).unwrap());
        assert_eq!(through_groups, original, "[{name}] the grouped round trip changed the embedding's state");
        assert_ne!(through_plain, original, "[{name}] quantizing changed nothing: the test cannot tell");
    }
}
