//! Replays the reference vectors (bitsandbytes' 8-bit cases, torchao's 4-bit cases) on a device
//! and judges the results.
//!
//! ```text
//! cargo run --features wgpu,ndarray --example conformance -- --device flex|ndarray|wgpu [DIR…]
//! ```
//! The DIRs default to those of `$BURN8BIT_VECTORS`, else the repository's
//! `tests/data/bitsandbytes-0.50.2` and `tests/data/torchao-0.18.0`. One line per
//! `.safetensors` file, directory by directory, each in file-name order:
//! `<file stem> <kind> PASS|FAIL <key>=<value> … hash=<16 hex digits>`, then `N passed, M failed`.
//! The exit status is non-zero when a case failed.

mod common;

use std::process::ExitCode;

use burn_8bit_conformance::{VectorFile, run_case};

fn main() -> ExitCode {
    match run(std::env::args().skip(1).collect()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(message) => {
            eprintln!("conformance: {message}");
            eprintln!("usage: conformance [--device flex|ndarray|wgpu|vulkan|cuda|cpu] [DIR…]");
            ExitCode::from(2)
        }
    }
}

fn run(args: Vec<String>) -> Result<bool, String> {
    let mut device_name = "flex".to_string();
    let mut dirs = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--device" => device_name = args.next().ok_or("--device needs a value")?,
            flag if flag.starts_with("--") => return Err(format!("unknown flag {flag}")),
            _ => dirs.push(arg.into()),
        }
    }
    if dirs.is_empty() {
        dirs = VectorFile::default_dirs();
    }
    let device = common::device_from_name(&device_name)?;
    let files = VectorFile::list_all(&dirs).map_err(|error| error.to_string())?;
    if files.is_empty() {
        return Err(format!("no .safetensors files in {dirs:?}"));
    }
    let (mut passed, mut failed) = (0, 0);
    for path in files {
        let line = match VectorFile::open(&path) {
            Ok(file) => {
                let report = run_case(&file, &device);
                if report.passed { passed += 1 } else { failed += 1 }
                report.line()
            }
            Err(error) => {
                failed += 1;
                let stem = path.file_stem().unwrap_or_default().to_string_lossy();
                let reason = error.to_string().replace(char::is_whitespace, "_");
                format!("{stem} unknown FAIL reason={reason} hash={:016x}", burn_8bit_conformance::fnv1a64([]))
            }
        };
        println!("{line}");
    }
    println!("{passed} passed, {failed} failed");
    Ok(failed == 0)
}
