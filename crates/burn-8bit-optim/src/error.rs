//! Typed errors of the 8-bit optimizers.

use burn_8bit_ops::QuantError;

/// An invalid optimizer configuration.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// A hyper-parameter outside its valid range.
    #[error("{name} = {value} is invalid: expected {expected}")]
    OutOfRange {
        /// The config field.
        name: &'static str,
        /// The value given.
        value: f64,
        /// The valid range, in words.
        expected: &'static str,
    },
    /// Two settings that are valid alone but contradict each other.
    #[error("{fields} contradict each other: {reason}")]
    Incompatible {
        /// The config fields.
        fields: &'static str,
        /// Why, in words.
        reason: &'static str,
    },
    /// The block size is not a power of two in 64..=4096.
    #[error(transparent)]
    BlockSize(#[from] QuantError),
}

/// Checks `low <= value < high` (or `<= high` when `inclusive`), naming the field on failure.
pub(crate) fn check_range(
    name: &'static str,
    value: f64,
    low: f64,
    high: f64,
    inclusive: bool,
    expected: &'static str,
) -> Result<(), ConfigError> {
    let in_range = value >= low && if inclusive { value <= high } else { value < high };
    if in_range {
        Ok(())
    } else {
        Err(ConfigError::OutOfRange {
            name,
            value,
            expected,
        })
    }
}

/// Why an optimizer record could not be loaded by [`crate::load_record_checked`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LoadError {
    /// The record bytes are not a readable optimizer record.
    #[error("unreadable optimizer record: {0}")]
    Unreadable(String),
    /// The record holds state for a parameter the module does not have.
    #[error("the record holds state for parameter {param_id}, which the module does not have")]
    UnknownParameter {
        /// The parameter id in the record.
        param_id: u64,
    },
    /// The state was written for a tensor of another shape.
    #[error("parameter {param_id}: the record's state is for shape {recorded:?}, the parameter has {expected:?}")]
    ShapeMismatch {
        /// The parameter id.
        param_id: u64,
        /// The shape in the record.
        recorded: Vec<usize>,
        /// The module's parameter's shape.
        expected: Vec<usize>,
    },
    /// The state was written by another optimizer.
    #[error("parameter {param_id}: the record's state is {recorded}'s, this optimizer is {expected}")]
    OptimizerMismatch {
        /// The parameter id.
        param_id: u64,
        /// The optimizer that wrote the record.
        recorded: String,
        /// The optimizer loading it.
        expected: String,
    },
    /// The state of a parameter is incomplete, inconsistent, out of range or fails its
    /// checksum: the record was damaged or edited.
    #[error("parameter {param_id}: {reason}")]
    Corrupt {
        /// The parameter id.
        param_id: u64,
        /// What is wrong.
        reason: String,
    },
}

/// `value ∈ [0, 1)`: a decay rate.
pub(crate) fn check_beta(name: &'static str, value: f64) -> Result<(), ConfigError> {
    check_range(name, value, 0.0, 1.0, false, "a decay rate in [0, 1)")
}

/// `value > 0` and finite.
pub(crate) fn check_positive(name: &'static str, value: f64) -> Result<(), ConfigError> {
    if value > 0.0 && value.is_finite() {
        Ok(())
    } else {
        Err(ConfigError::OutOfRange {
            name,
            value,
            expected: "a finite value > 0",
        })
    }
}

/// `value >= 0` and finite.
pub(crate) fn check_non_negative(name: &'static str, value: f64) -> Result<(), ConfigError> {
    check_range(name, value, 0.0, f64::MAX, true, "a finite value >= 0")
}

/// Asserts that `result` is a [`ConfigError::OutOfRange`] naming `field`.
#[cfg(test)]
#[track_caller]
pub(crate) fn assert_rejects<T: std::fmt::Debug>(result: Result<T, ConfigError>, field: &str) {
    match result {
        Err(ConfigError::OutOfRange { name, .. }) => assert_eq!(name, field),
        other => panic!("expected `{field}` to be rejected, got {other:?}"),
    }
}

/// Asserts that `actual` is `expected` within a relative `1e-6`.
#[cfg(test)]
#[track_caller]
pub(crate) fn assert_close(actual: f32, expected: f64) {
    let error = (f64::from(actual) - expected).abs();
    assert!(error <= 1e-6 * expected.abs(), "{actual} is not {expected}");
}
