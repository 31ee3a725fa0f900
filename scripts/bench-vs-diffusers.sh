#!/usr/bin/env bash
# Runs diffusers and Atelier on the same GPU, on full-size architectures with random weights, in
# one call, and prints the ratios that the README's performance section quotes. Build and pack
# first, on the developer machine:
#     bash scripts/pack-gpu.sh
# then through the device tool, with carry [".gpu"] (one call per line fits the 10-minute limit):
#     bash scripts/bench-vs-diffusers.sh sd15 sd21
#     bash scripts/bench-vs-diffusers.sh sdxl
# For each family (SD 1.5 at 512x512, SD 2.1 768-v at 768x768, SDXL at 1024x1024; 30 DDIM steps,
# guidance 7.5, f16), scripts/bench_full_diffusers.py builds the whole pipeline with random
# weights, saves it, and times diffusers: the eager UNet loop, a whole warm pipeline call, the
# VAE decode, and the UNet loop under torch.compile (compile time apart). Atelier then loads the
# very same folder and runs `bench` (UNet step, CPU enqueue time, VAE decode untiled and tiled,
# peak memory; once more without CUDA graphs) and `generate` with a live preview every step: a fresh process (its first job,
# what the first CUDA work costs it) and a warm engine (--repeat 3, the last run timed).
set -euo pipefail
archs=("$@")
# COMPILE=0 leaves torch.compile out (it takes a minute or two per family).
compile=--compile
[[ ${COMPILE:-1} == 0 ]] && compile=
[[ $# -eq 0 ]] && archs=(sd15 sd21 sdxl)
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
# PyTorch's cuDNN, for Atelier's convolutions too (ATELIER_CUDNN=0 leaves it out).
eval "$(bash scripts/cudnn-env.sh)"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl
export PYTHONPATH=/tmp/site
out=${OUT:-/tmp/bench-out}
mkdir -p "$out" /tmp/atelier-bin
bin=/tmp/atelier-bin/atelier
[[ -x $bin ]] || { xz -dc .gpu/atelier.xz > $bin && chmod +x $bin; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
for arch in "${archs[@]}"; do
  case $arch in
    sd15) side=512; vae_sides=512,768,1024; tiled=512,768,1024,2048 ;;
    sd21) side=768; vae_sides=768; tiled=768 ;;
    sdxl) side=1024; vae_sides=1024; tiled=1024,2048 ;;
    *) echo "unknown family $arch" >&2; exit 2 ;;
  esac
  model=/tmp/$arch
  python3 scripts/bench_full_diffusers.py "$arch" "$model" .gpu/tok $compile --vae-sides $vae_sides \
    2> "$out/diffusers-$arch.err" | tee "$out/diffusers-$arch.json" || true
  $bin bench --model "$model" --device cuda --steps 30 --warmup 3 --tiled-decode $tiled --json \
    | tee "$out/atelier-bench-$arch.json"
  # The same steps without CUDA graphs (each step's ~1,000 launches enqueued by the CPU).
  ATELIER_CUDA_GRAPHS=0 $bin bench --model "$model" --device cuda --steps 30 --warmup 3 --json \
    | tee "$out/atelier-bench-eager-$arch.json"
  job=(generate --model "$model" --prompt "a photo of a red fox in the snow, highly detailed"
       --steps 30 --scheduler ddim --guidance 7.5 --seed 1 --device cuda --width $side --height $side)
  { time $bin "${job[@]}" --out "$out/$arch-cold.png"; } 2>&1 | grep -vE "^$|^user|^sys" \
    | sed 's/^/cold: /' | tee "$out/atelier-cold-$arch.txt"
  $bin "${job[@]}" --repeat 3 --out "$out/$arch-warm.png" 2>&1 | sed 's/^/warm: /' \
    | tee "$out/atelier-warm-$arch.txt"
  if [[ $arch == sdxl ]]; then
    $bin "${job[@]}" --repeat 2 --text-encoders-on-cpu --out "$out/$arch-encoders-on-cpu.png" 2>&1 \
      | sed 's/^/encoders on the CPU: /' | tee "$out/atelier-cpu-encoders-$arch.txt"
    # Both memory options, as an 8 GiB card would run it (the README's SDXL-on-8-GiB figure).
    $bin "${job[@]}" --repeat 2 --text-encoders-on-cpu --vae-tiling on --out "$out/$arch-8gib.png" 2>&1 \
      | sed 's/^/both memory options: /' | tee "$out/atelier-8gib-$arch.txt"
  fi
  python3 scripts/bench_summary.py "$arch" "$out" | tee "$out/summary-$arch.txt"
  rm -rf "$model"
done
