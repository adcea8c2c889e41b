//! The devices of the backends this build compiled in, defined once for the tests, the benches
//! and the examples (the root crate's backend features turn on this crate's features of the
//! same names).

use burn::tensor::Device;

/// Every device name [`by_name`] knows, compiled in or not.
pub const NAMES: [&str; 6] = ["flex", "ndarray", "wgpu", "vulkan", "cuda", "cpu"];

/// The device called `name` (one of [`NAMES`]), or `None` when this build lacks its feature.
pub fn compiled(name: &str) -> Option<Device> {
    match name {
        #[cfg(feature = "flex")]
        "flex" => Some(Device::flex()),
        #[cfg(feature = "ndarray")]
        #[allow(deprecated)]
        "ndarray" => Some(Device::ndarray()),
        #[cfg(feature = "wgpu")]
        "wgpu" => Some(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)),
        #[cfg(feature = "vulkan")]
        "vulkan" => Some(Device::vulkan(burn::tensor::DeviceKind::DefaultDevice)),
        #[cfg(feature = "cuda")]
        "cuda" => Some(Device::cuda(0)),
        #[cfg(feature = "cpu")]
        "cpu" => Some(Device::cpu()),
        _ => None,
    }
}

/// Every compiled-in device, by name, in the order of [`NAMES`]. `vulkan` is left out where
/// `wgpu` is compiled in too: both open the same adapter.
pub fn all_compiled() -> Vec<(&'static str, Device)> {
    NAMES
        .into_iter()
        .filter(|&name| !(name == "vulkan" && compiled("wgpu").is_some()))
        .filter_map(|name| compiled(name).map(|device| (name, device)))
        .collect()
}

/// The device called `name`, or why this build cannot provide it (for command lines).
pub fn by_name(name: &str) -> Result<Device, String> {
    if let Some(device) = compiled(name) {
        return Ok(device);
    }
    if NAMES.contains(&name) {
        Err(format!("device `{name}` needs the `{name}` feature: cargo run --release --features {name} …"))
    } else {
        Err(format!("unknown device `{name}`: expected one of {}", NAMES.join(", ")))
    }
}

/// Whether a GPU-runtime device (wgpu, vulkan) found an adapter: a tensor round trip that does
/// not panic. The CPU backends and CUDA always count as available.
pub fn has_adapter(name: &str, device: &Device) -> bool {
    if !matches!(name, "wgpu" | "vulkan") {
        return true;
    }
    let probe = device.clone();
    std::panic::catch_unwind(move || {
        burn::tensor::Tensor::<1>::from_floats([1.0], &probe).into_data();
    })
    .is_ok()
}
