//! Quantizes a random tensor block-wise to 8 bits and prints the error and the memory it takes.
//!
//! ```text
//! cargo run --release --example quickstart [-- --device flex|ndarray|wgpu]
//! ```

mod common;

use burn::tensor::{Distribution, Tensor};
use burn_8bit::{BlockQuantized, BlockSize, MapKind};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let device_name = match args.iter().position(|arg| arg == "--device") {
        Some(i) => args.get(i + 1).ok_or("--device needs a value")?.clone(),
        None => "flex".to_string(),
    };
    let device = common::device_from_name(&device_name)?;
    let shape = [1024, 1024];
    let x = Tensor::<2>::random(shape, Distribution::Normal(0.0, 1.0), &device);
    println!("device {device_name}: quantizing a {}x{} f32 tensor (standard normal)", shape[0], shape[1]);
    println!("{:>16} {:>6} {:>14} {:>14} {:>12} {:>8}", "map", "block", "mean |error|", "max |error|", "bytes", "vs f32");
    for map in [MapKind::DynamicSigned, MapKind::LinearSigned] {
        for block in [64, 256, 2048] {
            let block_size = BlockSize::new(block)?;
            let quantized = BlockQuantized::quantize(x.clone(), map, block_size);
            let error = (x.clone() - quantized.dequantize::<2>()?).abs();
            let mean = error.clone().mean().into_scalar::<f32>();
            let max = error.max().into_scalar::<f32>();
            let bytes = quantized.size_bytes();
            let f32_bytes = 4 * quantized.len();
            println!(
                "{:>16} {:>6} {:>14.3e} {:>14.3e} {:>12} {:>7.1}%",
                map.name(),
                block,
                mean,
                max,
                bytes,
                100.0 * bytes as f64 / f32_bytes as f64
            );
        }
    }
    Ok(())
}
