#!/usr/bin/env bash
# Builds Atelier with the `cuda` feature and the GPU test binaries on this (GPU-less) machine and
# packs them, stripped and compressed, into .gpu/ for the device tool's `carry` (64 MiB limit):
#     bash scripts/pack-gpu.sh
# then, on the GPU machine: bash scripts/gpu-checks.sh; bash scripts/bench-vs-diffusers.sh sd15 sdxl
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(../shared/gpu/cuda-env.sh)"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target-cuda}
mkdir -p .gpu
# slim: without the bundled model, so that the binaries and fixtures fit the carry limit.
cargo build --release --features cuda,slim
log=$(mktemp)
cargo test --release --features cuda,slim --test headless --test gpu_kernels --no-run 2>&1 | tee "$log"
strip -o .gpu/atelier.tmp "$CARGO_TARGET_DIR/release/atelier"
xz -T2 -6 -c .gpu/atelier.tmp > .gpu/atelier.xz
cargo bench --features cuda,slim --bench gpu_kernels --no-run 2>&1 | tee -a "$log"
for test in headless gpu_kernels; do
  binary=$(grep -o "$CARGO_TARGET_DIR/release/deps/$test-[0-9a-f]*" "$log" | head -1)
  strip -o .gpu/atelier.tmp "$binary"
  xz -T2 -6 -c .gpu/atelier.tmp > ".gpu/$test.xz"
done
# The kernel timings (benches/gpu_kernels.rs), whose binary has the same name as the tests'.
binary=$(grep -o "$CARGO_TARGET_DIR/release/deps/gpu_kernels-[0-9a-f]*" "$log" | tail -1)
strip -o .gpu/atelier.tmp "$binary"
xz -T2 -6 -c .gpu/atelier.tmp > .gpu/kernel-timings.xz
rm -f .gpu/atelier.tmp "$log"
[[ -d .gpu/whl ]] || ../shared/gpu/diffusers-wheels.sh .gpu/whl
cp ../shared/gpu/bench_diffusers.py .gpu/
mkdir -p .gpu/tok
cp -r tests/fixtures/sd1/model/tokenizer tests/fixtures/sdxl/model/tokenizer_2 .gpu/tok/
du -sh .gpu/*
