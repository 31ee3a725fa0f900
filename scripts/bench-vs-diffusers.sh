#!/usr/bin/env bash
# Runs diffusers and Atelier on the same GPU, on full-size architectures with random weights, in
# one call, and prints the ratios. Build and pack first, on the developer machine:
#     bash scripts/pack-gpu.sh
# then through the device tool, with carry [".gpu"]:
#     bash scripts/bench-vs-diffusers.sh [sd15] [sdxl]
# diffusers' benchmark (../shared/gpu/bench_diffusers.py, copied to .gpu/) times a 30-step DDIM
# loop with classifier-free guidance (UNet batch 2) and one f16 VAE decode, and saves its random
# weights; Atelier's `bench` times the same UNet batch and an f16 decode (SDXL's pipeline decodes
# in f32 because of force_upcast: printed too). For SDXL both leave out the text encoders, so the
# peak memory figures cover the same weights.
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
for arch in "${archs[@]}"; do
  side=512; extra=(); steps=30
  [[ $arch == sdxl ]] && side=1024 && extra=(--skip-text-encoders)
  python3 .gpu/bench_diffusers.py "/tmp/$arch" $steps "$arch" | tee "$out/diffusers-$arch.txt"
  $bin bench --random-weights "$arch" --device cuda --steps $steps --warmup 3 --width $side --height $side \
    --vae-dtype f16 "${extra[@]}" --json | tee "$out/atelier-$arch.json"
  if [[ $arch == sdxl ]]; then
    # The SDXL pipelines decode in f32 (force_upcast): diffusers' decode in f32 (cuDNN, TF32 by
    # PyTorch's default) against ours (TF32 convolutions likewise).
    python3 - <<'PY'
import time, torch
from diffusers import AutoencoderKL
vae = AutoencoderKL.from_pretrained("/tmp/sdxl/vae", variant="fp16", torch_dtype=torch.float32).to("cuda")
latents = torch.randn(1, 4, 128, 128, device="cuda")
with torch.inference_mode():
    vae.decode(latents); torch.cuda.synchronize()
    started = time.perf_counter(); vae.decode(latents); torch.cuda.synchronize()
print(f"diffusers, SDXL pipeline VAE precision (f32, cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}): "
      f"VAE decode {1e3 * (time.perf_counter() - started):.1f} ms")
PY
    $bin bench --random-weights sdxl --device cuda --steps 3 --warmup 1 --vae-dtype f32 "${extra[@]}" \
      | grep -E "VAE|peak" | sed 's/^/atelier, SDXL pipeline VAE precision: /'
  fi
  python3 - "$out/diffusers-$arch.txt" "$out/atelier-$arch.json" "$arch" <<'PY'
import json, re, sys
text = open(sys.argv[1]).read()
ref = json.loads(text.strip().splitlines()[-1])["eager"]
peak = re.search(r"peak_mem_gib=([0-9.]+)", text)
ref_peak = float(peak.group(1)) if peak else float("nan")
ours = json.loads(open(sys.argv[2]).read().strip().splitlines()[-1])["report"]
ours_peak = (ours.get("peak_gpu_memory_bytes") or float("nan")) / 2**30
print(f"{sys.argv[3]}: diffusers {ref['it_s']:.2f} it/s ({ref['ms_step']:.1f} ms/step), VAE {ref['vae_ms']:.1f} ms, "
      f"peak {ref_peak:.2f} GiB | atelier {ours['unet_steps_per_sec']:.2f} it/s ({ours['unet_step_ms']:.1f} ms/step), "
      f"VAE {ours['vae_decode_ms']:.1f} ms, peak {ours_peak:.2f} GiB, 30-step job {ours['end_to_end_30_steps_ms']:.0f} ms")
print(f"{sys.argv[3]}: UNet speed {ours['unet_steps_per_sec'] / ref['it_s']:.2f}x diffusers, "
      f"VAE decode time {ours['vae_decode_ms'] / ref['vae_ms']:.2f}x diffusers', "
      f"peak memory {ours_peak / ref_peak:.2f}x diffusers'")
PY
  if [[ $arch == sd15 ]]; then
    # A whole job through `atelier generate` on the very weights diffusers saved (its text
    # encoder included): end-to-end time and time to the first preview.
    cp -r tests/fixtures/sd1/model/tokenizer tests/fixtures/sd1/model/scheduler /tmp/sd15/
    echo '{"_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "PNDMScheduler"]}' > /tmp/sd15/model_index.json
    for run in 1 2; do
      $bin generate --model /tmp/sd15 --prompt "a fox" --steps 30 --scheduler ddim --seed 1 --device cuda \
        --out "$out/sd15-random.png" 2>&1 | grep -E "steps in|first preview" | sed "s/^/atelier generate (run $run): /"
    done
  fi
done
