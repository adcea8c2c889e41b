//! Device selection shared by the examples: `flex`, `ndarray`, `wgpu`, `vulkan`, `cuda`, `cpu`,
//! each available when its feature is compiled in.

/// The device named on the command line, or why this build cannot provide it.
pub use burn_8bit_conformance::devices::by_name as device_from_name;
