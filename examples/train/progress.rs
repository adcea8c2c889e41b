//! A `Learner` renderer that draws a progress line (rewritten in place on a terminal, one line
//! per 5 % otherwise) and records what the summary and the plot need: the training loss of every
//! step, the validation loss of every epoch and the time between training steps.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burn::train::logger::{EvaluationProgressLogger, TrainingProgressLogger};
use burn::train::metric::{MetricDefinition, MetricId, NumericEntry};
use burn::train::renderer::{
    EvaluationName, MetricState, MetricsRenderer, MetricsRendererEvaluation,
    MetricsRendererTraining,
};
use burn::train::LearnerSummary;

/// What one training run recorded.
#[derive(Clone, Debug, Default)]
pub struct Curves {
    /// Training loss of each step, in order.
    pub train_loss: Vec<f64>,
    /// `(steps done, mean validation loss)` after each epoch.
    pub valid_loss: Vec<(usize, f64)>,
    /// Seconds between consecutive training steps of one epoch (the first step of each epoch,
    /// which waits for the data loader, is left out).
    pub step_seconds: Vec<f64>,
}

impl Curves {
    /// Mean seconds per training step.
    pub fn seconds_per_step(&self) -> f64 {
        self.step_seconds.iter().fold(0.0, |sum, s| sum + s) / self.step_seconds.len().max(1) as f64
    }
}

pub struct ProgressRenderer {
    label: String,
    curves: Arc<Mutex<Curves>>,
    names: HashMap<MetricId, String>,
    total_steps: usize,
    epochs: usize,
    epoch: usize,
    in_training: bool,
    last_step: Option<Instant>,
    started: Instant,
    last_printed: usize,
    terminal: bool,
}

impl ProgressRenderer {
    pub fn new(label: &str, total_steps: usize, curves: Arc<Mutex<Curves>>) -> Self {
        Self {
            label: label.to_string(),
            curves,
            names: HashMap::new(),
            total_steps,
            epochs: 0,
            epoch: 1,
            in_training: false,
            last_step: None,
            started: Instant::now(),
            last_printed: 0,
            terminal: std::io::stdout().is_terminal(),
        }
    }

    fn is_loss(&self, entry: &MetricId) -> bool {
        self.names.get(entry).is_some_and(|name| name == "Loss")
    }

    fn draw(&mut self, done: bool) {
        let curves = self.curves.lock().unwrap();
        let steps = curves.train_loss.len();
        let every = (self.total_steps / 20).max(1);
        if !done && !self.terminal && steps < self.last_printed + every {
            return;
        }
        self.last_printed = steps;
        let recent = &curves.train_loss[steps.saturating_sub(20)..];
        let loss = recent.iter().sum::<f64>() / recent.len().max(1) as f64;
        let per_step = curves.seconds_per_step();
        let remaining = Duration::from_secs_f64(per_step * self.total_steps.saturating_sub(steps) as f64);
        let width = 24;
        let filled = (width * steps / self.total_steps.max(1)).min(width);
        let bar = format!("{}{}", "#".repeat(filled), ".".repeat(width - filled));
        let valid = curves.valid_loss.last().map_or(String::new(), |(_, v)| format!("  valid {v:.4}"));
        let line = format!(
            "{:<24} [{bar}] epoch {}/{} step {steps}/{} loss {loss:.4}{valid}  {:.0} ms/step  ETA {}s",
            self.label,
            self.epoch.min(self.epochs.max(1)),
            self.epochs,
            self.total_steps,
            per_step * 1e3,
            remaining.as_secs()
        );
        drop(curves);
        let mut out = std::io::stdout().lock();
        if self.terminal {
            let _ = write!(out, "\r{line}\x1b[K");
            if done {
                let _ = writeln!(out);
            }
        } else {
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
    }
}

impl MetricsRendererTraining for ProgressRenderer {
    fn update_train(&mut self, state: MetricState) {
        if let MetricState::Numeric(entry, Some(NumericEntry::Aggregated { aggregated_value, .. })) = &state
            && self.is_loss(&entry.metric_id)
        {
            self.curves.lock().unwrap().train_loss.push(*aggregated_value);
            self.draw(false);
        }
    }

    fn update_valid(&mut self, state: MetricState) {
        if let MetricState::Numeric(entry, Some(NumericEntry::Final(value))) = &state
            && self.is_loss(&entry.metric_id)
        {
            let mut curves = self.curves.lock().unwrap();
            let steps = curves.train_loss.len();
            curves.valid_loss.push((steps, *value));
        }
    }

    fn on_train_end(&mut self, _summary: Option<LearnerSummary>) -> Result<(), Box<dyn std::error::Error>> {
        Ok(())
    }
}

impl TrainingProgressLogger for ProgressRenderer {
    fn start(&mut self, total_epochs: usize, _starting_epoch: usize, _items: Option<usize>, _label: Option<&str>) {
        self.epochs = total_epochs;
        self.started = Instant::now();
    }

    fn update_epoch(&mut self, epoch: usize) {
        self.epoch = epoch + 1;
    }

    fn start_split(&mut self, split: &str, _total_items: usize) {
        self.in_training = split.eq_ignore_ascii_case("train");
        self.last_step = None;
    }

    fn update_split(&mut self, _items_processed: usize) {
        if !self.in_training {
            return;
        }
        let now = Instant::now();
        if let Some(last) = self.last_step.replace(now) {
            self.curves.lock().unwrap().step_seconds.push((now - last).as_secs_f64());
        }
    }

    fn end_split(&mut self) {
        self.in_training = false;
    }

    fn end(&mut self) {
        self.draw(true);
        println!("{}: {:.1} s in all", self.label, self.started.elapsed().as_secs_f64());
    }

    fn log_event_training(&mut self, _event: String) {}
}

impl EvaluationProgressLogger for ProgressRenderer {
    fn start_global_progress(&mut self, _total_tests: usize) {}
    fn start_test(&mut self, _name: &str, _total_items: usize) {}
    fn update_test_progress(&mut self, _items_processed: usize) {}
    fn end_test(&mut self) {}
    fn end_global_progress(&mut self) {}
    fn log_event_evaluation(&mut self, _event: String) {}
}

impl MetricsRendererEvaluation for ProgressRenderer {
    fn update_test(&mut self, _name: EvaluationName, _state: MetricState) {}
}

impl MetricsRenderer for ProgressRenderer {
    fn manual_close(&mut self) {}

    fn register_metric(&mut self, definition: MetricDefinition) {
        self.names.insert(definition.metric_id, definition.name.to_string());
    }
}
