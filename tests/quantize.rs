//! Block-wise quantization: bitsandbytes conformance (every vector, optimizers included), error thresholds, edge cases, on every
//! backend compiled in.

mod common;

use burn::tensor::{DType, Device, FloatDType, Tensor, TensorData};
use burn_8bit_conformance::{VectorFile, run_case};
use burn_8bit::{BlockQuantized, BlockSize, MapKind, QuantError};
use common::{Rng, devices, vector_files};

#[test]
fn every_reference_vector_passes() {
    for (name, device) in devices() {
        for path in vector_files() {
            let file = VectorFile::open(&path).unwrap();
            let report = run_case(&file, &device);
            println!("[{name}] {}", report.line());
            assert!(report.passed, "[{name}] {}", report.line());
        }
    }
}

#[test]
fn codes_match_the_references_on_the_plain_cases() {
    for path in vector_files() {
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        // bitsandbytes' 8-bit cases (`quant_`) and torchao's 4-bit ones (`quant4_`).
        let plain = ["normal", "heavy", "huge", "tiny"]
            .iter()
            .any(|kind| ["quant", "quant4"].iter().any(|set| stem.starts_with(&format!("{set}_{kind}_"))));
        if !plain {
            continue;
        }
        let report = run_case(&VectorFile::open(&path).unwrap(), &Device::flex());
        let identical: f64 = report.figure("identical").unwrap().parse().unwrap();
        assert!(identical >= 0.99, "{stem}: identical codes {identical}");
    }
}

fn mean_errors(device: &Device, input: &[f32], map: MapKind, block: BlockSize) -> (f64, f64) {
    let x = Tensor::<1>::from_floats(input, device);
    let q = BlockQuantized::quantize(x, map, block);
    let y = q.dequantize_flat().into_data().try_to_vec::<f32>().unwrap();
    let (mut abs, mut rel) = (0f64, 0f64);
    for (&a, &b) in input.iter().zip(&y) {
        let diff = (f64::from(a) - f64::from(b)).abs();
        abs += diff;
        rel += diff / (f64::from(a).abs() + 1e-8);
    }
    (abs / input.len() as f64, rel / input.len() as f64)
}

/// bitsandbytes' own thresholds (tests/test_functional.py, test_dynamic_blockwise_quantization).
#[test]
fn bitsandbytes_error_thresholds_on_fresh_random_data() {
    let mut rng = Rng::new(7);
    let normal = rng.normals(1024 * 1024);
    let uniform = rng.uniforms(1024 * 1024);
    for (name, device) in devices() {
        for block in BlockSize::all() {
            let (abs, rel) = mean_errors(&device, &normal, MapKind::DynamicSigned, block);
            assert!(abs < 0.011, "[{name}] randn block {}: mean abs {abs}", block.get());
            assert!(rel < 0.018, "[{name}] randn block {}: mean rel {rel}", block.get());
            let (signed, _) = mean_errors(&device, &uniform, MapKind::DynamicSigned, block);
            assert!(signed < 0.0036, "[{name}] uniform signed block {}: {signed}", block.get());
            let (unsigned, _) = mean_errors(&device, &uniform, MapKind::DynamicUnsigned, block);
            assert!(unsigned < 0.0023, "[{name}] uniform unsigned block {}: {unsigned}", block.get());
            println!(
                "[{name}] block {:>4}: randn abs {abs:.5} rel {rel:.5}; uniform signed {signed:.5} unsigned {unsigned:.5}",
                block.get()
            );
        }
    }
}

#[test]
fn any_length_round_trips_with_partial_blocks() {
    let mut rng = Rng::new(11);
    for (name, device) in devices() {
        for len in [1usize, 3, 4, 5, 63, 64, 65, 255, 257, 1000, 4097] {
            let input = rng.normals(len);
            let q = BlockQuantized::quantize(
                Tensor::<1>::from_floats(input.as_slice(), &device),
                MapKind::DynamicSigned,
                BlockSize::new(64).unwrap(),
            );
            assert_eq!(q.num_blocks(), len.div_ceil(64));
            assert_eq!(q.codes().dims(), [len.div_ceil(4)]);
            let codes = q.unpacked_codes();
            assert_eq!(codes.len(), len);
            let absmax = q.absmax_values();
            let y = q.dequantize_flat().into_data().try_to_vec::<f32>().unwrap();
            let map = MapKind::DynamicSigned.map();
            for (i, (&x, &yi)) in input.iter().zip(&y).enumerate() {
                let a = absmax[i / 64];
                assert_eq!(yi.to_bits(), (map.values()[codes[i] as usize] * a).to_bits());
                assert!(burn_8bit_conformance::is_nearest(&map, x, codes[i], a), "[{name}] len {len} i {i}");
            }
            let words = q.codes().clone().into_data().try_to_vec::<u32>().unwrap();
            if len % 4 != 0 {
                let last = words.last().unwrap().to_le_bytes();
                assert!(last[len % 4..].iter().all(|&b| b == 0), "[{name}] padding bytes are zero");
            }
        }
    }
}

#[test]
fn empty_tensors_quantize_to_nothing() {
    for (name, device) in devices() {
        let x = Tensor::<2>::empty([0, 5], &device);
        let q = BlockQuantized::quantize(x, MapKind::DynamicSigned, BlockSize::DEFAULT);
        assert!(q.is_empty(), "[{name}]");
        assert_eq!(q.num_blocks(), 0);
        assert_eq!(q.size_bytes(), 0);
        assert!(q.unpacked_codes().is_empty());
        assert_eq!(q.dequantize::<2>().unwrap().dims(), [0, 5]);
        q.check_finite().unwrap();
    }
}

#[test]
fn all_zero_blocks_get_the_zero_code_and_decode_to_positive_zero() {
    for (name, device) in devices() {
        for map in MapKind::ALL {
            let mut input = vec![0.0f32; 128];
            input.extend([-0.0f32; 64]);
            input.extend([0.5f32; 64]);
            let q = BlockQuantized::quantize(
                Tensor::<1>::from_floats(input.as_slice(), &device),
                map,
                BlockSize::new(64).unwrap(),
            );
            let zero = map.map().zero_code();
            assert!(q.unpacked_codes()[..192].iter().all(|&c| c == zero), "[{name}] {map:?}");
            assert_eq!(&q.absmax_values()[..3], &[0.0; 3]);
            let y = q.dequantize_flat().into_data().try_to_vec::<f32>().unwrap();
            assert!(y[..192].iter().all(|v| v.to_bits() == 0), "[{name}] {map:?} decodes +0.0");
        }
    }
}

#[test]
fn non_finite_inputs_poison_their_block_and_nothing_else() {
    let cases = [
        (f32::NAN, f32::NAN.to_bits()),
        (f32::from_bits(0xffc0_1234), f32::NAN.to_bits()),
        (f32::INFINITY, f32::INFINITY.to_bits()),
        (f32::NEG_INFINITY, f32::INFINITY.to_bits()),
    ];
    for (name, device) in devices() {
        for (bad, absmax_bits) in cases {
            let mut input: Vec<f32> = (0..192).map(|i| (i as f32 - 96.0) / 50.0).collect();
            input[70] = bad;
            let q = BlockQuantized::quantize(
                Tensor::<1>::from_floats(input.as_slice(), &device),
                MapKind::DynamicSigned,
                BlockSize::new(64).unwrap(),
            );
            let absmax = q.absmax_values();
            assert_eq!(absmax[1].to_bits(), absmax_bits, "[{name}] {bad}");
            assert!(absmax[0].is_finite() && absmax[2].is_finite());
            assert!(q.unpacked_codes()[64..128].iter().all(|&c| c == 127), "[{name}] {bad}");
            let y = q.dequantize_flat().into_data().try_to_vec::<f32>().unwrap();
            assert!(y[64..128].iter().all(|v| v.is_nan()), "[{name}] {bad}: block decodes to NaN");
            assert!(y[..64].iter().chain(&y[128..]).all(|v| v.is_finite()));
            assert_eq!(q.check_finite(), Err(QuantError::NonFinite { blocks: 1, first: 1 }));
        }
    }
}

#[test]
fn half_precision_inputs_quantize_as_their_f32_values() {
    for (name, device) in devices() {
        for dtype in [FloatDType::F16, FloatDType::BF16] {
            if !device.supports_dtype(dtype) {
                common::skip(&format!("{dtype:?} on {name}: the backend has no such dtype"));
                continue;
            }
            let x = Tensor::<1>::from_floats([0.5, -0.25, 1.5, 0.0, 3.0], &device).cast(dtype);
            assert_ne!(x.dtype(), DType::F32);
            let q = BlockQuantized::quantize(x.clone(), MapKind::DynamicSigned, BlockSize::DEFAULT);
            let reference = BlockQuantized::quantize(x.cast(FloatDType::F32), MapKind::DynamicSigned, BlockSize::DEFAULT);
            assert_eq!(q.unpacked_codes(), reference.unpacked_codes(), "[{name}] {dtype:?}");
        }
    }
}

#[test]
fn shapes_survive_and_wrong_rank_is_an_error() {
    for (name, device) in devices() {
        let x = Tensor::<3>::ones([2, 3, 70], &device);
        let q = BlockQuantized::quantize(x, MapKind::DynamicUnsigned, BlockSize::new(128).unwrap());
        assert_eq!(q.dequantize::<3>().unwrap().dims(), [2, 3, 70], "[{name}]");
        assert!(matches!(q.dequantize::<2>(), Err(QuantError::Inconsistent { .. })));
    }
}

#[test]
fn dequantize_into_writes_the_decoded_values_and_leaves_shared_outputs_alone() {
    let mut rng = Rng::new(21);
    let input = rng.normals(3 * 700);
    for (name, device) in devices() {
        let x = Tensor::<1>::from_floats(input.as_slice(), &device).reshape([3, 700]);
        let q = BlockQuantized::quantize(x, MapKind::DynamicSigned, BlockSize::new(64).unwrap());
        let bits = |t: Tensor<2>| -> Vec<u32> {
            t.into_data().try_to_vec::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
        };
        let expected = bits(q.dequantize::<2>().unwrap());

        let mut reused = Tensor::<2>::full([3, 700], 7.0, &device);
        for round in 0..3 {
            reused = q.dequantize_into(reused).unwrap();
            assert_eq!(bits(reused.clone()), expected, "[{name}] round {round}");
        }

        let shared = Tensor::<2>::full([3, 700], 7.0, &device);
        let decoded = q.dequantize_into(shared.clone()).unwrap();
        assert_eq!(bits(decoded), expected, "[{name}] shared output");
        assert!(
            shared.into_data().try_to_vec::<f32>().unwrap().iter().all(|&v| v == 7.0),
            "[{name}] a clone of the output kept its values"
        );

        let strided = Tensor::<2>::full([700, 3], 7.0, &device).transpose();
        assert_eq!(bits(q.dequantize_into(strided).unwrap()), expected, "[{name}] strided output");
    }
}

#[test]
fn dequantize_into_refuses_an_output_that_cannot_hold_the_values() {
    let all = devices();
    for (name, device) in &all {
        let q = BlockQuantized::quantize(Tensor::<2>::ones([2, 70], device), MapKind::DynamicSigned, BlockSize::DEFAULT);
        let wrong_shape = q.dequantize_into(Tensor::<2>::zeros([70, 2], device));
        assert!(matches!(wrong_shape, Err(QuantError::OutputMismatch { .. })), "[{name}] {wrong_shape:?}");
        if device.supports_dtype(FloatDType::F16) {
            let half = Tensor::<2>::zeros([2, 70], device).cast(FloatDType::F16);
            assert!(matches!(q.dequantize_into(half), Err(QuantError::OutputMismatch { .. })), "[{name}] f16");
        }
        for (other_name, other) in all.iter().filter(|(other_name, _)| other_name != name) {
            let elsewhere = q.dequantize_into(Tensor::<2>::zeros([2, 70], other));
            assert!(matches!(elsewhere, Err(QuantError::OutputMismatch { .. })), "[{name}] on {other_name}");
        }
        let empty = BlockQuantized::quantize(Tensor::<2>::empty([0, 5], device), MapKind::DynamicSigned, BlockSize::DEFAULT);
        assert_eq!(empty.dequantize_into(Tensor::<2>::empty([0, 5], device)).unwrap().dims(), [0, 5], "[{name}]");
    }
}

#[test]
fn from_parts_checks_consistency() {
    let device = Device::flex();
    let q = BlockQuantized::quantize(Tensor::<1>::ones([300], &device), MapKind::DynamicSigned, BlockSize::DEFAULT);
    let rebuilt = BlockQuantized::from_parts(
        q.codes().clone(),
        q.absmax().clone(),
        q.shape().clone(),
        q.block_size(),
        q.map(),
    )
    .unwrap();
    assert_eq!(rebuilt.unpacked_codes(), q.unpacked_codes());
    let wrong_block = BlockQuantized::from_parts(
        q.codes().clone(),
        q.absmax().clone(),
        q.shape().clone(),
        BlockSize::new(64).unwrap(),
        q.map(),
    );
    assert!(matches!(wrong_block, Err(QuantError::Inconsistent { .. })));
    let wrong_dtype = BlockQuantized::from_parts(
        Tensor::from_data(TensorData::new(vec![0i64; 75], [75]), &device),
        q.absmax().clone(),
        q.shape().clone(),
        q.block_size(),
        q.map(),
    );
    assert!(matches!(wrong_dtype, Err(QuantError::Inconsistent { .. })));
}

#[test]
fn quantization_is_deterministic() {
    let mut rng = Rng::new(3);
    let input = rng.normals(50_000);
    for (name, device) in devices() {
        let run = || {
            let q = BlockQuantized::quantize(
                Tensor::<1>::from_floats(input.as_slice(), &device),
                MapKind::DynamicSigned,
                BlockSize::DEFAULT,
            );
            (q.unpacked_codes(), q.absmax_values().iter().map(|a| a.to_bits()).collect::<Vec<_>>())
        };
        assert_eq!(run(), run(), "[{name}]");
    }
}

#[test]
fn autodiff_tensors_quantize_as_constants() {
    for (name, device) in devices() {
        let x = Tensor::<1>::from_floats([0.5, -1.0, 0.25], &device.clone().autodiff()).require_grad();
        let q = BlockQuantized::quantize(x.clone(), MapKind::DynamicSigned, BlockSize::DEFAULT);
        let plain = BlockQuantized::quantize(x.inner(), MapKind::DynamicSigned, BlockSize::DEFAULT);
        assert_eq!(q.unpacked_codes(), plain.unpacked_codes(), "[{name}]");
        assert!(!q.dequantize_flat().is_autodiff());
    }
}
