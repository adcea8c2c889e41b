//! The implementations of [`crate::BlockwiseOps`], one folder or file per backend family.

#[cfg(feature = "cube")]
mod cube;
#[cfg(feature = "flex")]
mod flex;
#[cfg(feature = "ndarray")]
mod ndarray;
