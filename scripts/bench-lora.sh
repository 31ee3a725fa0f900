#!/usr/bin/env bash
# Two LoRAs merged into a full-size SDXL (random weights, the single file of
# scripts/bench_single_file_load.py): the time to apply them, and the UNet's speed without and
# with them (merged into the weights, it must not change). Build and pack first
# (bash scripts/pack-gpu.sh), then through the device tool, carry [".gpu"]:
#     bash scripts/bench-lora.sh
set -euo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl
export PYTHONPATH=/tmp/site
bin=/tmp/atelier-bin/atelier
mkdir -p /tmp/atelier-bin
[[ -x $bin ]] || { xz -dc .gpu/atelier.xz > $bin && chmod +x $bin; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
[[ -f /tmp/single-file/sdxl.safetensors ]] || python3 scripts/bench_single_file_load.py /tmp/single-file
python3 scripts/bench_lora_sdxl.py /tmp/loras
model=/tmp/single-file/sdxl.safetensors
for round in 1 2; do
  echo "without LoRAs, round $round:"
  $bin bench --model $model --device cuda --steps 20 --warmup 3 | grep -E "model load|UNet step"
  echo "with two LoRAs (0.8 and -0.5), round $round:"
  $bin bench --model $model --device cuda --steps 20 --warmup 3 \
    --lora /tmp/loras/style-a.safetensors:0.8 --lora /tmp/loras/style-b.safetensors:-0.5 2>&1 \
    | grep -E "LoRA|UNet step|warning"
done
