#!/usr/bin/env bash
# Runs diffusers and Atelier on the same random-weight model in one call on the GPU machine and
# prints the ratios. Build first (on the developer machine):
#     eval "$(../shared/gpu/cuda-env.sh)"
#     CARGO_TARGET_DIR=target-cuda cargo build --release --features cuda
#     mkdir -p .gpu && cp target-cuda/release/atelier .gpu/ && strip .gpu/atelier
#     ../shared/gpu/diffusers-wheels.sh .gpu/whl && cp ../shared/gpu/bench_diffusers.py .gpu/
# then, through the device tool with carry [".gpu"]:
#     bash scripts/bench-vs-diffusers.sh [sd15|sdxl ...]
set -euo pipefail
archs=("${@:-sd15}")
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl
export PYTHONPATH=/tmp/site
out=${OUT:-/tmp}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
for arch in "${archs[@]}"; do
  side=512; [[ $arch == sdxl ]] && side=1024
  python3 .gpu/bench_diffusers.py "/tmp/$arch" 30 "$arch" | tee "$out/diffusers-$arch.txt"
  .gpu/atelier bench --random-weights "$arch" --device cuda --steps 30 --warmup 3 \
    --width $side --height $side --json | tee "$out/atelier-$arch.json"
  python3 - "$out/diffusers-$arch.txt" "$out/atelier-$arch.json" "$arch" <<'PY'
import json, sys
ref = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])["eager"]
ours = json.loads(open(sys.argv[2]).read().strip().splitlines()[-1])["report"]
arch = sys.argv[3]
print(f"{arch}: diffusers {ref['it_s']:.2f} it/s, VAE {ref['vae_ms']:.1f} ms | "
      f"atelier {ours['unet_steps_per_sec']:.2f} it/s, VAE {ours['vae_decode_ms']:.1f} ms | "
      f"UNet speed ratio {ours['unet_steps_per_sec'] / ref['it_s']:.2f}x, "
      f"VAE time ratio {ours['vae_decode_ms'] / ref['vae_ms']:.2f}x")
PY
done
