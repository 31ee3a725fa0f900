"""Atelier in f16 on the GPU against diffusers in f16 (and f32) on the same weights and noise.

Runs on the GPU machine (see scripts/gpu-checks.sh): for each model folder, diffusers makes the
final latents of a DDIM run with classifier-free guidance in float16 and in float32 from the
same initial noise (1 step, and 8 steps); `atelier generate --device cuda` (f16) makes its own. It
prints max|a - b| / max|b| for ours-vs-diffusers-f16 and, as the yardstick of f16 rounding,
diffusers-f16-vs-diffusers-f32, and fails when ours is further from diffusers' f16 than
TOLERANCE_FACTOR times that yardstick (or 1e-2, whichever is larger).

    python3 scripts/gpu-parity-f16.py ATELIER_BINARY OUT_DIR MODEL_DIR...
"""
import json
import os
import subprocess
import sys

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

TOLERANCE_FACTOR = 2.0
# One step (close to a single UNet forward: no accumulation) and a whole short run.
STEP_COUNTS = (1, 8)
GUIDANCE = 7.5
PROMPT = "a watercolor fox in a snowy forest"


def relative_error(ours, reference):
    ours = np.asarray(ours, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    return float(np.abs(ours - reference).max() / max(np.abs(reference).max(), 1e-12))


def diffusers_latents(model, dtype, noise, width, height, steps):
    index = json.load(open(os.path.join(model, "model_index.json")))
    xl = index["_class_name"].startswith("StableDiffusionXL")
    cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    kwargs = {} if xl else {"safety_checker": None, "requires_safety_checker": False}
    try:
        pipe = cls.from_pretrained(model, torch_dtype=dtype, **kwargs)
    except OSError:  # a fixture stored as the fp16 variant only
        pipe = cls.from_pretrained(model, torch_dtype=dtype, variant="fp16", **kwargs)
    pipe = pipe.to("cuda")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        out = pipe(
            PROMPT,
            # None, not "": with force_zeros_for_empty_prompt (SDXL) diffusers then uses zeros,
            # as Atelier does for an empty negative prompt; "" would be encoded instead.
            negative_prompt=None,
            num_inference_steps=steps,
            guidance_scale=GUIDANCE,
            width=width,
            height=height,
            latents=torch.from_numpy(noise).to("cuda", dtype),
            output_type="latent",
        ).images
    latents = out.float().cpu().numpy()
    del pipe
    torch.cuda.empty_cache()
    return latents


def main():
    binary, out_dir, models = sys.argv[1], sys.argv[2], sys.argv[3:]
    os.makedirs(out_dir, exist_ok=True)
    failures = 0
    for model in models:
        name = os.path.basename(os.path.dirname(model.rstrip("/"))) if model.rstrip("/").endswith("model") else os.path.basename(model.rstrip("/"))
        unet = json.load(open(os.path.join(model, "unet", "config.json")))
        vae = json.load(open(os.path.join(model, "vae", "config.json")))
        factor = 2 ** (len(vae["block_out_channels"]) - 1)
        side = unet["sample_size"] * factor
        shape = (1, unet["in_channels"], side // factor, side // factor)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(0)).numpy().astype(np.float32)
        noise_path = os.path.join(out_dir, f"{name}-noise.npy")
        np.save(noise_path, noise)
        for steps in STEP_COUNTS:
            reference16 = diffusers_latents(model, torch.float16, noise, side, side, steps)
            reference32 = diffusers_latents(model, torch.float32, noise, side, side, steps)
            ours_path = os.path.join(out_dir, f"{name}-{steps}-ours-f16.npy")
            subprocess.run(
                [binary, "generate", "--model", model, "--device", "cuda", "--prompt", PROMPT,
                 "--steps", str(steps), "--guidance", str(GUIDANCE), "--scheduler", "ddim",
                 "--width", str(side), "--height", str(side), "--init-noise", noise_path,
                 "--save-latents", ours_path, "--out", os.path.join(out_dir, f"{name}-ours.png")],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            ours = np.load(ours_path)
            ours_vs_16 = relative_error(ours, reference16)
            f16_vs_f32 = relative_error(reference16, reference32)
            ours_vs_32 = relative_error(ours, reference32)
            bound = max(TOLERANCE_FACTOR * f16_vs_f32, 1e-2)
            ok = ours_vs_16 <= bound
            failures += not ok
            print(
                f"{name}, {steps} DDIM step(s): ours(f16) vs diffusers(f16) {ours_vs_16:.2e} | "
                f"diffusers f16 vs f32 {f16_vs_f32:.2e} | ours(f16) vs diffusers(f32) {ours_vs_32:.2e} | "
                f"bound {bound:.2e} {'ok' if ok else 'FAILED'}",
                flush=True,
            )
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
