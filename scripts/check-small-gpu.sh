#!/usr/bin/env bash
# SDXL at 1024x1024 as a small GPU runs it (issue 16: "runs on an 8 GiB GPU"), on a big one: a
# ballast process (PyTorch) takes all of the GPU's free memory but GIB GiB (default 8) and holds it
# while Atelier generates, so that Atelier sees what a small card leaves it (its own CUDA context
# comes out of those GIB, as on the card). Build and pack here first (bash scripts/pack-gpu.sh),
# then through the device tool with carry [".gpu/atelier.xz", ".gpu/whl", ".gpu/tok"]:
#     bash scripts/check-small-gpu.sh [GIB]
# It generates with both memory options (the UI's choice when memory is short), with VAE tiling on
# auto (which should tile by itself), and with no option (which must fail with a clear message);
# then a hires fix to 2048x2048 with both options.
set -uo pipefail
gib=${1:-8}
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
eval "$(bash scripts/cudnn-env.sh)"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl
export PYTHONPATH=/tmp/site
out=${OUT:-/tmp/small-gpu}
mkdir -p "$out" /tmp/atelier-bin
bin=/tmp/atelier-bin/atelier
[[ -x $bin ]] || { xz -dc .gpu/atelier.xz > $bin && chmod +x $bin; }
model=/tmp/sdxl
python3 scripts/bench_full_diffusers.py sdxl "$model" .gpu/tok --save-only 2> "$out/diffusers.err" || exit 1
ready=$(mktemp -u)
python3 - "$gib" "$ready" <<'PY' &
import pathlib, sys, time
import torch
keep = int(float(sys.argv[1]) * 2**30)
free, total = torch.cuda.mem_get_info()
ballast = torch.empty(max(free - keep, 0), dtype=torch.uint8, device="cuda")
free, _ = torch.cuda.mem_get_info()
print(f"ballast {ballast.numel() / 2**30:.2f} GiB of {total / 2**30:.2f}: {free / 2**30:.2f} GiB free", flush=True)
pathlib.Path(sys.argv[2]).touch()
time.sleep(3600)
PY
ballast=$!
while [[ ! -e $ready ]]; do sleep 1; kill -0 $ballast 2>/dev/null || exit 1; done
job=(generate --model "$model" --prompt "a photo of a red fox in the snow, highly detailed"
     --steps 30 --scheduler ddim --guidance 7.5 --seed 1 --device cuda --width 1024 --height 1024)
status=0
for options in "--text-encoders-on-cpu --vae-tiling on" "--text-encoders-on-cpu --vae-tiling auto" ""; do
  label=${options:-no memory option}
  echo "== $gib GiB free, $label"
  # shellcheck disable=SC2086
  $bin "${job[@]}" $options --repeat 2 --out "$out/sdxl-${gib}gib-$(echo "$label" | tr -c 'a-z0-9' '-').png" 2>&1 \
    | tail -6 | tee -a "$out/small-gpu.txt"
  rc=${PIPESTATUS[0]}
  echo "exit status $rc" | tee -a "$out/small-gpu.txt"
  # Both memory options must succeed; with none, a failure is expected (and must say why).
  [[ -n $options && $rc -ne 0 ]] && status=1
  nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader
done
# The hires fix to 2048x2048 (the picture enlarged with Lanczos, so the VAE encodes and decodes
# at 2048 in tiles), with both memory options: 2048 and beyond within GIB GiB.
hires=(generate --model "$model" --prompt "a photo of a red fox in the snow, highly detailed"
       --steps 10 --scheduler ddim --guidance 7.5 --seed 1 --device cuda --width 1024 --height 1024
       --hires-scale 2 --hires-upscaler lanczos --hires-steps 10 --hires-strength 0.5
       --text-encoders-on-cpu --vae-tiling on)
echo "== $gib GiB free, hires fix to 2048x2048, --text-encoders-on-cpu --vae-tiling on"
$bin "${hires[@]}" --out "$out/sdxl-${gib}gib-hires-2048.png" 2>&1 | tail -7 | tee -a "$out/small-gpu.txt"
rc=${PIPESTATUS[0]}
echo "exit status $rc" | tee -a "$out/small-gpu.txt"
[[ $rc -ne 0 ]] && status=1
kill $ballast
rm -rf "$model" "$ready"
exit $status
