#!/usr/bin/env bash
# Loading a full-size single-file SDXL checkpoint (random weights, f16, the original layout),
# Atelier against diffusers' from_single_file, on the same GPU and the same file in one call
# (the file is in the page cache for both: it was just written). Build and pack first
# (bash scripts/pack-gpu.sh; accelerate's wheel in .gpu/whl, as diffusers uses it to skip the
# random init), then through the device tool, carry [".gpu"]:
#     bash scripts/bench-single-file-load.sh
set -euo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl
export PYTHONPATH=/tmp/site
bin=/tmp/atelier-bin/atelier
mkdir -p /tmp/atelier-bin
[[ -x $bin ]] || { xz -dc .gpu/atelier.xz > $bin && chmod +x $bin; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 scripts/bench_single_file_load.py /tmp/single-file
for run in 1 2; do
  echo "atelier, run $run:"
  $bin bench --model /tmp/single-file/sdxl.safetensors --device cuda --steps 3 --warmup 1 \
    | grep -E "model load|UNet step"
done
