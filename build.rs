//! With the `cuda` feature, compiles Atelier's own kernels (`src/engine/cuda/kernels.cu`) to PTX
//! with nvcc, for the compute capability in `CUDA_COMPUTE_CAP` (default 80, the oldest the kernels'
//! instructions run on; the driver compiles the PTX again for newer GPUs, and older ones keep
//! candle's operations).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=src/engine/cuda/kernels.cu");
    println!("cargo::rerun-if-changed=src/engine/cuda/elementwise.cuh");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let compute_cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let ptx = out_dir.join("atelier_kernels.ptx");
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=compute_{compute_cap}"))
        .arg("src/engine/cuda/kernels.cu")
        .arg("-o")
        .arg(&ptx)
        .status();
    match status {
        Ok(status) if status.success() => {}
        Ok(status) => panic!("nvcc failed ({status}) on src/engine/cuda/kernels.cu"),
        Err(error) => panic!("cannot run {nvcc} for the cuda feature: {error}"),
    }
}
