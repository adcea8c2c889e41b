//! Device selection shared by the examples: `flex`, `ndarray`, `wgpu`, `vulkan`, `cuda`, `cpu`.

use burn::tensor::Device;

const NAMES: [&str; 6] = ["flex", "ndarray", "wgpu", "vulkan", "cuda", "cpu"];

/// The device named on the command line, or why this build cannot provide it.
pub fn device_from_name(name: &str) -> Result<Device, String> {
    if let Some(device) = compiled_device(name) {
        return Ok(device);
    }
    if NAMES.contains(&name) {
        Err(format!("device `{name}` needs the `{name}` feature: cargo run --release --features {name} …"))
    } else {
        Err(format!("unknown device `{name}`: expected one of {}", NAMES.join(", ")))
    }
}

fn compiled_device(name: &str) -> Option<Device> {
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
