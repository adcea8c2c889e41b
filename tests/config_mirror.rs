//! Each 8-bit config that claims to be the twin of a Burn config has that config's fields, with
//! its types and defaults, plus the `states` field every 8-bit config adds. Names, defaults
//! and types are read from Burn's own configs (serialized), not from a list kept here: a field
//! Burn adds, renames, retypes or re-defaults fails the test of its twin.

use burn::optim::decay::WeightDecayConfig;
use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdaGradConfig, AdamConfig, AdamWConfig, LambConfig, LionConfig, RmsPropConfig, SgdConfig};
use burn_8bit::{
    AdaGrad8bitConfig, Adam8bitConfig, AdamW8bitConfig, Lamb8bitConfig, Lion8bitConfig, RmsProp8bitConfig,
    Sgd8bitConfig, StateConfig,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// The field every 8-bit config adds to its twin's: how its states are kept (`StateConfig`).
const ADDED_FIELDS: [&str; 1] = ["states"];

fn fields<C: Serialize>(config: &C) -> Map<String, Value> {
    match serde_json::to_value(config).expect("configs serialize") {
        Value::Object(fields) => fields,
        other => panic!("a config serializes to an object, got {other}"),
    }
}

/// Values a field may take, to tell types apart: Burn's own sub-configs (for the fields that
/// default to `None`), a fraction that `f32` and `f64` store differently, an integer, a flag.
fn probes() -> Vec<Value> {
    let json = |value: Result<Value, serde_json::Error>| value.expect("sub-configs serialize");
    vec![
        json(serde_json::to_value(WeightDecayConfig::new(0.01))),
        json(serde_json::to_value(MomentumConfig::new().with_nesterov(true))),
        json(serde_json::to_value(GradientClippingConfig::Norm(1.0))),
        json(serde_json::to_value(GradientClippingConfig::Value(0.5))),
        Value::from(0.1),
        Value::from(3u64),
        Value::from(true),
    ]
}

/// `fields` with `name` set to `value`, read back as a `C` and serialized again: `None` when a
/// `C` cannot hold that value, else the value as `C` stores it.
fn stored_as<C: Serialize + DeserializeOwned>(fields: &Map<String, Value>, name: &str, value: &Value) -> Option<Value> {
    let mut fields = fields.clone();
    fields.insert(name.to_string(), value.clone());
    let config: C = serde_json::from_value(Value::Object(fields)).ok()?;
    Some(self::fields(&config)[name].clone())
}

fn assert_mirrors<Burn, Ours>(burn: Burn, ours: Ours)
where
    Burn: Serialize + DeserializeOwned,
    Ours: Serialize + DeserializeOwned,
{
    let (burn, ours) = (fields(&burn), fields(&ours));
    let mut added: Vec<&str> = ours.keys().map(String::as_str).filter(|name| !burn.contains_key(*name)).collect();
    added.sort_unstable();
    assert_eq!(added, ADDED_FIELDS, "fields beyond the twin's");
    for (name, default) in &burn {
        let Some(own) = ours.get(name) else {
            panic!("`{name}` of Burn's config is missing");
        };
        assert_eq!(own, default, "default of `{name}`");
        for probe in probes() {
            assert_eq!(
                stored_as::<Ours>(&ours, name, &probe),
                stored_as::<Burn>(&burn, name, &probe),
                "`{name}` set to {probe}: the twin holds it differently (another type)"
            );
        }
    }
}

#[test]
fn adam8bit_mirrors_adam() {
    assert_mirrors(AdamConfig::new(), Adam8bitConfig::new());
}

#[test]
fn adamw8bit_mirrors_adamw() {
    assert_mirrors(AdamWConfig::new(), AdamW8bitConfig::new());
}

#[test]
fn sgd8bit_mirrors_sgd() {
    assert_mirrors(SgdConfig::new(), Sgd8bitConfig::new());
}

#[test]
fn rmsprop8bit_mirrors_rmsprop() {
    assert_mirrors(RmsPropConfig::new(), RmsProp8bitConfig::new());
}

#[test]
fn adagrad8bit_mirrors_adagrad() {
    assert_mirrors(AdaGradConfig::new(), AdaGrad8bitConfig::new());
}

#[test]
fn lion8bit_mirrors_lion() {
    assert_mirrors(LionConfig::new(), Lion8bitConfig::new());
}

#[test]
fn lamb8bit_mirrors_lamb() {
    assert_mirrors(LambConfig::new(), Lamb8bitConfig::new());
}

/// The test above can fail: a config whose default or type differs from its twin's is caught.
#[test]
fn a_drifted_twin_is_caught() {
    let drifted_default = std::panic::catch_unwind(|| {
        assert_mirrors(SgdConfig::new(), Sgd8bitConfig::new().with_momentum(Some(MomentumConfig::new())));
    });
    assert!(drifted_default.is_err(), "a twin with another default passed");
    let drifted_type = std::panic::catch_unwind(|| assert_mirrors(AdamConfig::new(), DriftedAdam::default()));
    assert!(drifted_type.is_err(), "a twin with another field type passed");
}

/// Adam's fields and defaults with `epsilon` as `f64`, and the state settings.
#[derive(serde::Serialize, serde::Deserialize)]
struct DriftedAdam {
    beta_1: f32,
    beta_2: f32,
    epsilon: f64,
    amsgrad: bool,
    weight_decay: Option<WeightDecayConfig>,
    grad_clipping: Option<GradientClippingConfig>,
    states: StateConfig,
}

impl Default for DriftedAdam {
    fn default() -> Self {
        let adam = Adam8bitConfig::new();
        Self {
            beta_1: adam.beta_1,
            beta_2: adam.beta_2,
            epsilon: f64::from(adam.epsilon),
            amsgrad: adam.amsgrad,
            weight_decay: None,
            grad_clipping: None,
            states: adam.states,
        }
    }
}
