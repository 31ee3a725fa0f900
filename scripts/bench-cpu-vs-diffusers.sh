#!/usr/bin/env bash
# diffusers (PyTorch) and Atelier on this machine's CPU, f32, on the same SD 1.5 architecture
# with random weights, in one go: one UNet step with guidance (batch 2) and one VAE decode at
# 512x512 (or SIDE), each after one untimed run, at the same thread count (all cores).
#     bash scripts/bench-cpu-vs-diffusers.sh [SIDE]
# Needs Python with torch, transformers and diffusers (PYTHON, default python3) and a release
# build of Atelier (built here when missing). Takes a few minutes on two cores.
set -euo pipefail
cd "$(dirname "$0")/.."
side=${1:-512}
python=${PYTHON:-python3}
threads=$(nproc)
model=${MODEL_DIR:-/tmp/atelier-cpu-bench-sd15}
[[ -x target/release/atelier ]] || cargo build --release
if [[ ! -f $model/model_index.json ]]; then
  tokens=$(mktemp -d)
  cp -r tests/fixtures/sd1/model/tokenizer "$tokens/"
  "$python" scripts/bench_full_diffusers.py sd15 "$model" "$tokens" --save-only > /dev/null 2>&1
  rm -rf "$tokens"
fi
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $threads threads"
reference=$("$python" scripts/bench_cpu_diffusers.py "$model" "$side" "$threads" 2>/dev/null | tail -1)
echo "diffusers: $reference"
ours=$(RAYON_NUM_THREADS=$threads target/release/atelier bench --model "$model" --device cpu \
  --steps 1 --warmup 1 --width "$side" --height "$side" --json | tail -1)
"$python" - "$reference" "$ours" <<'PY'
import json, sys
ref = json.loads(sys.argv[1])
ours = json.loads(sys.argv[2])["report"]
print(f"UNet step (batch 2): PyTorch {ref['unet_step_ms'] / 1e3:.2f} s, Atelier {ours['unet_step_ms'] / 1e3:.2f} s: "
      f"Atelier at {ref['unet_step_ms'] / ours['unet_step_ms']:.2f}x PyTorch's speed")
print(f"VAE decode: PyTorch {ref['vae_decode_ms'] / 1e3:.2f} s, Atelier {ours['vae_decode_ms'] / 1e3:.2f} s: "
      f"Atelier at {ref['vae_decode_ms'] / ours['vae_decode_ms']:.2f}x PyTorch's speed")
PY
