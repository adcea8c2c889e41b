//! A small regression task for runs through Burn's `Learner`: a two-layer network learning a
//! teacher's `tanh(w · x)` from seeded data, with seeded weights, so that every run of a test or
//! example starts from the same model and sees the same batches.

use std::sync::Arc;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataloader::{DataLoader, DataLoaderBuilder};
use burn::data::dataset::InMemDataset;
use burn::module::{Module, Param};
use burn::nn::{Linear, Relu};
use burn::tensor::{Device, Tensor};
use burn::train::{InferenceStep, RegressionOutput, TrainOutput, TrainStep};

use crate::rng::Rng;

/// Inputs per sample.
pub const INPUTS: usize = 64;

/// `output(relu(hidden(x)))`, trained on the mean square error.
#[derive(Module, Debug)]
pub struct Regressor {
    /// `INPUTS` → the hidden width.
    pub hidden: Linear,
    /// The hidden width → 1.
    pub output: Linear,
    /// Between the two layers.
    pub activation: Relu,
}

impl Regressor {
    /// The network with `width` hidden units, its weights drawn as Burn's default `Linear`
    /// initialisation draws them (U(−k, k), k = 1/√inputs) but from a generator seeded with
    /// `seed` rather than the backend's.
    ///
    /// ```
    /// use burn::tensor::Device;
    /// use burn_8bit_conformance::regression::{Regressor, samples, valid_loss};
    ///
    /// let device = Device::default();
    /// let model = Regressor::new(32, 4, &device);
    /// assert_eq!(valid_loss(&model, &samples(16, 3), &device), valid_loss(&Regressor::new(32, 4, &device), &samples(16, 3), &device));
    /// ```
    pub fn new(width: usize, seed: u64, device: &Device) -> Self {
        let mut rng = Rng::new(seed);
        Self {
            hidden: seeded_linear(&mut rng, INPUTS, width, device),
            output: seeded_linear(&mut rng, width, 1, device),
            activation: Relu::new(),
        }
    }

    /// The predictions for `batch` and their mean square error.
    pub fn forward(&self, batch: &Batch) -> RegressionOutput {
        let prediction = self.output.forward(self.activation.forward(self.hidden.forward(batch.inputs.clone())));
        let loss = (prediction.clone() - batch.targets.clone()).powi_scalar(2).mean();
        RegressionOutput::new(loss, prediction, batch.targets.clone())
    }
}

fn seeded_linear(rng: &mut Rng, inputs: usize, outputs: usize, device: &Device) -> Linear {
    let k = 1.0 / (inputs as f32).sqrt();
    let mut uniform = |n: usize| -> Vec<f32> { rng.uniforms(n).into_iter().map(|u| (2.0 * u - 1.0) * k).collect() };
    let weight = Tensor::<1>::from_floats(uniform(inputs * outputs).as_slice(), device).reshape([inputs, outputs]);
    let bias = Tensor::<1>::from_floats(uniform(outputs).as_slice(), device);
    Linear { weight: Param::from_tensor(weight), bias: Some(Param::from_tensor(bias)) }
}

impl TrainStep for Regressor {
    type Input = Batch;
    type Output = RegressionOutput;

    fn step(&self, batch: Batch) -> TrainOutput<RegressionOutput> {
        let output = self.forward(&batch);
        TrainOutput::new(self, output.loss.backward(), output)
    }
}

impl InferenceStep for Regressor {
    type Input = Batch;
    type Output = RegressionOutput;

    fn step(&self, batch: Batch) -> RegressionOutput {
        self.forward(&batch)
    }
}

/// Inputs `[n, INPUTS]` and targets `[n, 1]`.
#[derive(Clone, Debug)]
pub struct Batch {
    /// One sample per row.
    pub inputs: Tensor<2>,
    /// The teacher's output per row.
    pub targets: Tensor<2>,
}

/// One input vector and the teacher's output for it.
#[derive(Clone, Debug)]
pub struct Sample {
    /// `INPUTS` standard normals.
    pub inputs: Vec<f32>,
    /// `tanh(w · inputs)`.
    pub target: f32,
}

/// Stacks samples into a [`Batch`] on the loader's device.
pub struct SampleBatcher;

impl Batcher<Sample, Batch> for SampleBatcher {
    fn batch(&self, items: Vec<Sample>, device: &Device) -> Batch {
        let n = items.len();
        let inputs: Vec<f32> = items.iter().flat_map(|s| s.inputs.clone()).collect();
        let targets: Vec<f32> = items.iter().map(|s| s.target).collect();
        Batch {
            inputs: Tensor::<1>::from_floats(inputs.as_slice(), device).reshape([n, INPUTS]),
            targets: Tensor::<1>::from_floats(targets.as_slice(), device).reshape([n, 1]),
        }
    }
}

/// `n` samples of the teacher (its weights drawn with seed 1), the inputs drawn with `seed`.
pub fn samples(n: usize, seed: u64) -> Vec<Sample> {
    let mut rng = Rng::new(seed);
    let teacher = Rng::new(1).normals(INPUTS);
    (0..n)
        .map(|_| {
            let inputs = rng.normals(INPUTS);
            let target = inputs.iter().zip(&teacher).map(|(x, w)| x * w).sum::<f32>().tanh();
            Sample { inputs, target }
        })
        .collect()
}

/// A training and a validation loader, as `SupervisedTraining::new` takes them.
pub type Loaders = (Arc<dyn DataLoader<Batch>>, Arc<dyn DataLoader<Batch>>);

/// Loaders over `train` in batches of `batch_size` and `valid` in one batch.
pub fn loaders(train: Vec<Sample>, valid: Vec<Sample>, batch_size: usize) -> Loaders {
    let valid_batch = valid.len().max(1);
    (
        DataLoaderBuilder::new(SampleBatcher).batch_size(batch_size).build(InMemDataset::new(train)),
        DataLoaderBuilder::new(SampleBatcher).batch_size(valid_batch).build(InMemDataset::new(valid)),
    )
}

/// The mean square error of `model` on `valid`, in one batch.
pub fn valid_loss(model: &Regressor, valid: &[Sample], device: &Device) -> f32 {
    model.forward(&SampleBatcher.batch(valid.to_vec(), device)).loss.into_scalar::<f32>()
}
