#!/usr/bin/env bash
# On the GPU machine (device tool, carry [".gpu"], after scripts/pack-gpu.sh here): unpacks the
# binaries and checks the CUDA build's numbers:
#   1. tests/gpu_kernels.rs: our kernels against candle's CPU f32 at SD 1.5/SDXL shapes, f32 and f16
#      (attention on both kernels where the GPU is a Hopper);
#   2. tests/headless/parity.rs (the `headless` binary's parity:: tests) in f32 on the GPU
#      against the values diffusers computed (the CPU's bar);
#   3. scripts/gpu-parity-f16.py: `atelier generate` in f16 against diffusers in f16 on the
#      fixtures and on full-size SD 1.5 and SD 2.1 architectures with random weights.
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
# PyTorch's cuDNN, for Atelier's convolutions too (ATELIER_CUDNN=0 leaves it out).
eval "$(bash scripts/cudnn-env.sh)"
out=${OUT:-/tmp/atelier-gpu}
mkdir -p "$out" /tmp/atelier-bin
for binary in atelier headless gpu_kernels; do
  xz -dc ".gpu/$binary.xz" > "/tmp/atelier-bin/$binary" && chmod +x "/tmp/atelier-bin/$binary"
done
# The test binaries find the fixtures here rather than where they were built.
export ATELIER_REPO_DIR=$PWD
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
ATELIER_TEST_DEVICE=cuda /tmp/atelier-bin/gpu_kernels --include-ignored --test-threads 1 || status=1
# The portable attention kernel too, where the Hopper one took the 64-wide heads above.
ATELIER_HOPPER_ATTENTION=0 ATELIER_TEST_DEVICE=cuda /tmp/atelier-bin/gpu_kernels flash_attention \
  --include-ignored --test-threads 1 || status=1
ATELIER_TEST_DEVICE=cuda /tmp/atelier-bin/headless parity:: --test-threads 1 || status=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl
export PYTHONPATH=/tmp/site
models=(tests/fixtures/sd1/model tests/fixtures/sd2/model tests/fixtures/sdxl/model)
if python3 .gpu/bench_diffusers.py /tmp/sd15 1 sd15 > /dev/null; then
  cp -r tests/fixtures/sd1/model/tokenizer tests/fixtures/sd1/model/scheduler /tmp/sd15/
  cat > /tmp/sd15/model_index.json <<'JSON'
{"_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "PNDMScheduler"]}
JSON
  models+=(/tmp/sd15)
fi
# SD 2.1 768-v at full size (random weights): its 64-wide heads take the Hopper attention kernel
# on an H100/H200, which no fixture reaches (their heads are 8 wide, SD 1.5's 40-160).
if python3 scripts/bench_full_diffusers.py sd21 /tmp/sd21 .gpu/tok --save-only > /dev/null; then
  models+=(/tmp/sd21)
fi
python3 scripts/gpu-parity-f16.py /tmp/atelier-bin/atelier "$out" "${models[@]}" || status=1
exit $status
