//! Cross-backend conformance: every backend compiled in must produce the same codes, absmax and
//! dequantized values, bit for bit, on the reference inputs and on random tensors with partial
//! blocks, all-zero blocks, tiny (1e-30) and huge (1e30) scales, at every block size.

mod common;

use burn::tensor::{Device, Tensor};
use burn_8bit_conformance::{VectorFile, run_case};
use burn_8bit::{BlockQuantized, BlockSize, MapKind};
use common::{Rng, devices, vector_files};

/// Everything a backend produced for one input, as bits.
#[derive(Debug, PartialEq, Eq)]
struct Bits {
    codes: Vec<u32>,
    absmax: Vec<u32>,
    dequantized: Vec<u32>,
}

fn run(device: &Device, input: &[f32], map: MapKind, block: BlockSize) -> Bits {
    let q = BlockQuantized::quantize(Tensor::<1>::from_floats(input, device), map, block);
    Bits {
        codes: q.codes().clone().into_data().try_to_vec::<u32>().unwrap(),
        absmax: q.absmax_values().iter().map(|a| a.to_bits()).collect(),
        dequantized: q
            .dequantize_flat()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect(),
    }
}

/// The devices to compare; `None` (with a visible skip) when fewer than two are compiled in.
fn backends_to_compare() -> Option<Vec<(&'static str, Device)>> {
    let devices = devices();
    if devices.len() < 2 {
        common::skip("cross-backend comparison: one backend compiled in (use --features wgpu,ndarray)");
        return None;
    }
    Some(devices)
}

fn assert_same_on_every_backend(case: &str, input: &[f32], map: MapKind, block: BlockSize) {
    let Some(devices) = backends_to_compare() else {
        return;
    };
    let (first_name, first) = &devices[0];
    let expected = run(first, input, map, block);
    for (name, device) in &devices[1..] {
        let got = run(device, input, map, block);
        for (what, a, b) in [
            ("codes", &expected.codes, &got.codes),
            ("absmax", &expected.absmax, &got.absmax),
            ("dequantized", &expected.dequantized, &got.dequantized),
        ] {
            assert_eq!(a.len(), b.len(), "{case}: {what} lengths, {first_name} vs {name}");
            if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
                panic!(
                    "{case} ({map:?}, block {}): {what}[{i}] differs, {first_name} {:#010x} vs {name} {:#010x}",
                    block.get(),
                    a[i],
                    b[i]
                );
            }
        }
    }
}

#[test]
fn reference_inputs_give_identical_bits_on_every_backend() {
    for path in vector_files() {
        let file = VectorFile::open(&path).unwrap();
        if file.kind() != "quantize" {
            continue;
        }
        let map = MapKind::from_name(&file.meta::<String>("map").unwrap()).unwrap();
        let block = BlockSize::new(file.meta("blocksize").unwrap()).unwrap();
        let input = file.f32s("input").unwrap();
        assert_same_on_every_backend(file.stem(), &input, map, block);
    }
}

#[test]
fn runner_hashes_agree_across_backends() {
    for path in vector_files() {
        let file = VectorFile::open(&path).unwrap();
        if !matches!(file.kind(), "maps" | "quantize") {
            continue;
        }
        let Some(devices) = backends_to_compare() else {
            return;
        };
        let hashes: Vec<(&str, u64)> = devices
            .iter()
            .map(|(name, device)| (*name, run_case(&file, device).hash))
            .collect();
        assert!(
            hashes.iter().all(|(_, h)| *h == hashes[0].1),
            "{}: {hashes:x?}",
            file.stem()
        );
    }
}

/// Random data shaped to hit the edge cases: normal values, runs of exact zeros (whole zero
/// blocks), outliers, and scales from 1e-30 to 1e33 (nothing below 1e-30: GPUs may flush
/// subnormal products to zero).
fn edge_case_input(rng: &mut Rng, len: usize, scale: f32) -> Vec<f32> {
    let mut input = rng.normals(len);
    for (i, x) in input.iter_mut().enumerate() {
        let run = i / 64;
        if run % 7 == 3 {
            *x = 0.0;
        } else if i % 97 == 0 {
            *x *= 1e3;
        }
        *x *= scale * [1.0f32, 0.25, 1e3, 4.0][run % 4];
    }
    input
}

#[test]
fn random_edge_cases_give_identical_bits_at_every_block_size() {
    let mut rng = Rng::new(2024);
    for block in BlockSize::all() {
        for scale in [1e-30f32, 1e-3, 1.0, 1e30] {
            for len in [block.get() * 3 + 17, 4 * block.get(), 50_001] {
                let input = edge_case_input(&mut rng, len, scale);
                for map in MapKind::ALL {
                    let magnitudes: Vec<f32>;
                    let input = if matches!(map, MapKind::DynamicUnsigned | MapKind::LinearUnsigned) {
                        magnitudes = input.iter().map(|x| x.abs()).collect();
                        &magnitudes
                    } else {
                        &input
                    };
                    let case = format!("len {len} scale {scale:e}");
                    assert_same_on_every_backend(&case, input, map, block);
                }
            }
        }
    }
}

#[test]
fn non_finite_blocks_agree_across_backends() {
    let mut input: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin()).collect();
    input[10] = f32::NAN;
    input[300] = f32::INFINITY;
    input[600] = f32::NEG_INFINITY;
    input[601] = f32::from_bits(0x7f80_0001);
    for block in BlockSize::all() {
        assert_same_on_every_backend("non-finite", &input, MapKind::DynamicSigned, block);
    }
}
