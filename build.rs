//! With the `cuda` feature, compiles Atelier's own kernels (`src/engine/cuda/kernels.cu`) to PTX
//! with nvcc, for the compute capability in `CUDA_COMPUTE_CAP` (default 80, the oldest the kernels'
//! instructions run on; the driver compiles the PTX again for newer GPUs, and older ones keep
//! candle's operations). The Hopper attention kernel (`attention_sm90.cu`, wgmma instructions)
//! is compiled on its own for `compute_90a`, which only a 9.0 device runs; an nvcc too old for
//! that target leaves it out (an empty PTX) and the attention stays on the portable kernel.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=src/engine/cuda/kernels.cu");
    println!("cargo::rerun-if-changed=src/engine/cuda/elementwise.cuh");
    println!("cargo::rerun-if-changed=src/engine/cuda/flash_common.cuh");
    println!("cargo::rerun-if-changed=src/engine/cuda/attention_sm90.cu");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let compute_cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let source = "src/engine/cuda/kernels.cu";
    match compile_ptx(
        &nvcc,
        source,
        &compute_cap,
        &out_dir.join("atelier_kernels.ptx"),
    ) {
        Ok(true) => {}
        Ok(false) => panic!("nvcc failed on {source}"),
        Err(error) => panic!("cannot run {nvcc} for the cuda feature: {error}"),
    }
    let hopper = out_dir.join("atelier_attention_sm90.ptx");
    let source = "src/engine/cuda/attention_sm90.cu";
    if !matches!(compile_ptx(&nvcc, source, "90a", &hopper), Ok(true)) {
        println!(
            "cargo::warning=nvcc cannot target compute_90a: the Hopper attention kernel is left out"
        );
        std::fs::write(&hopper, "").expect("OUT_DIR is writable");
    }
}

/// `nvcc --ptx` of `source` for `compute_{cap}` into `ptx`: whether nvcc succeeded.
fn compile_ptx(nvcc: &str, source: &str, cap: &str, ptx: &Path) -> std::io::Result<bool> {
    let status = Command::new(nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=compute_{cap}"))
        .arg(source)
        .arg("-o")
        .arg(ptx)
        .status()?;
    Ok(status.success())
}
