"""diffusers on the CPU in f32, for scripts/bench-cpu-vs-diffusers.sh: one SD UNet step with
classifier-free guidance (batch 2) and one VAE decode, at the given size, on the model folder
that Atelier then times too. Prints one JSON line.
    python3 bench_cpu_diffusers.py MODEL_DIR SIDE THREADS
"""

import json
import sys
import time

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel


def main():
    model, side, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(threads)
    unet = UNet2DConditionModel.from_pretrained(f"{model}/unet", torch_dtype=torch.float32).eval()
    vae = AutoencoderKL.from_pretrained(f"{model}/vae", torch_dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    cells = side // 8
    sample = torch.randn(2, 4, cells, cells, generator=generator)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    latents = torch.randn(1, 4, cells, cells, generator=generator)
    result = {"torch": torch.__version__, "threads": threads, "side": side}
    with torch.inference_mode():
        unet(sample, 999, encoder_hidden_states=context)
        started = time.perf_counter()
        unet(sample, 500, encoder_hidden_states=context)
        result["unet_step_ms"] = (time.perf_counter() - started) * 1e3
        vae.decode(latents)
        started = time.perf_counter()
        vae.decode(latents)
        result["vae_decode_ms"] = (time.perf_counter() - started) * 1e3
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
