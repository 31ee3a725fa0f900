#!/usr/bin/env bash
# Image to image and inpainting against diffusers' pipelines, on the same GPU in one call, on a
# full-size architecture with random weights that both load from the same diffusers folder.
# Build and pack first (bash scripts/pack-gpu.sh), then through the device tool, carry [".gpu"]:
#     bash scripts/bench-modes-vs-diffusers.sh [sd15] [sdxl]
# Each figure is a whole job's wall time (prompt encoding, VAE encode, 30 Euler steps with
# guidance, decode), the second of two runs in one process, at 512x512 (SD 1.5) or 1024x1024 (SDXL).
set -euo pipefail
archs=("${@:-sd15}")
[[ $# -eq 0 ]] && archs=(sd15 sdxl)
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl
export PYTHONPATH=/tmp/site
out=${OUT:-/tmp}
bin=/tmp/atelier-bin/atelier
mkdir -p /tmp/atelier-bin
[[ -x $bin ]] || { xz -dc .gpu/atelier.xz > $bin && chmod +x $bin; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
steps=30
for arch in "${archs[@]}"; do
  side=512; [[ $arch == sdxl ]] && side=1024
  model=/tmp/modes-$arch
  python3 scripts/bench_modes_diffusers.py "$model" "$arch" $steps | tee "$out/diffusers-modes-$arch.jsonl"
  common=(--model "$model" --prompt "a red fox in the snow, highly detailed" --negative-prompt blurry
          --steps $steps --guidance 7.5 --scheduler euler --seed 1 --device cuda --width $side --height $side
          --repeat 2 --out "$out/atelier-$arch.png")
  run() {
    local mode=$1; shift
    local secs
    secs=$($bin generate "${common[@]}" "$@" 2>&1 | grep -o "run 2 of 2: [0-9.]* s" | grep -o "[0-9.]*" | tail -1)
    echo "{\"arch\": \"$arch\", \"mode\": \"$mode\", \"secs\": $secs}" | tee -a "$out/atelier-modes-$arch.jsonl"
  }
  : > "$out/atelier-modes-$arch.jsonl"
  run text
  run img2img --init-image "$model/init.png" --strength 0.75
  run img2img-1.0 --init-image "$model/init.png" --strength 1.0
  run inpaint --init-image "$model/init.png" --mask "$model/mask.png" --mask-blur 0 --strength 0.75
  run inpaint-1.0 --init-image "$model/init.png" --mask "$model/mask.png" --mask-blur 0 --strength 1.0
  $bin bench --model "$model" --device cuda --steps 3 --warmup 1 --width $side --height $side \
    | grep -E "VAE decode" | sed "s/^/atelier $arch: /"
  python3 - "$out/diffusers-modes-$arch.jsonl" "$out/atelier-modes-$arch.jsonl" <<'PY'
import json, sys
load = lambda path: {r["mode"]: r["secs"] for r in map(json.loads, open(path)) if r.get("secs") is not None}
ref, ours = load(sys.argv[1]), load(sys.argv[2])
for mode in ref:
    if mode in ours:
        print(f"{mode:12} diffusers {ref[mode]:7.3f} s | atelier {ours[mode]:7.3f} s | {ref[mode] / ours[mode]:.2f}x diffusers' speed")
for mode in ("img2img-1.0", "inpaint-1.0"):
    if mode in ours and "text" in ours:
        print(f"{mode} costs {1e3 * (ours[mode] - ours['text']):.0f} ms more than text to image with the same 30 steps (atelier)")
PY
done
