"""Image to image on the fixture models, as diffusers computes it, for tests/headless/img2img.rs.

For the SD 1.x, SD 2.x and SDXL fixtures: a deterministic 'photo' (a smooth colour pattern), the
VAE encoder's latent distribution of it (mean and std), and whole img2img runs of
StableDiffusionImg2ImgPipeline / StableDiffusionXLImg2ImgPipeline with Euler and DDIM. The
random draws are replayed rather than seeded: `randn_tensor` is replaced in the VAE module and the
pipeline module by a function that draws from a fixed generator and records each draw, so the
fixture holds the VAE's sampling noise (first draw) and the noise added to the init latents
(second), which Atelier is given back.

Needs torch, transformers and diffusers 0.42.1; run where they are installed:
    python scripts/make_img2img_fixture.py [OUT_DIR (default tests/fixtures)]
"""

import json
import sys
from pathlib import Path

import diffusers
import diffusers.models.autoencoders.vae as vae_module
import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as sd_img2img
import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img as sdxl_img2img
import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionXLImg2ImgPipeline,
)
from safetensors.torch import save_file

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
PROMPT = "a red fox in the snow, highly detailed"
NEGATIVE = "blurry, lowres"


def pattern(height, width):
    """A smooth colour image in [0, 1], (1, 3, H, W)."""
    y = torch.linspace(0, 1, height).view(height, 1).expand(height, width)
    x = torch.linspace(0, 1, width).view(1, width).expand(height, width)
    r = x
    g = y
    b = 0.5 + 0.5 * torch.sin(6.0 * x + 4.0 * y)
    return torch.stack([r, g, b]).unsqueeze(0).float()


class Replay:
    """Stands in for randn_tensor: draws from one seeded generator and keeps every draw."""

    def __init__(self, seed):
        self.generator = torch.Generator().manual_seed(seed)
        self.draws = []

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        draw = torch.randn(tuple(shape), generator=self.generator, dtype=torch.float32)
        self.draws.append(draw.clone())
        return draw.to(device=device or "cpu", dtype=dtype or torch.float32)


def main():
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else FIXTURES
    tensors = {}
    runs = []
    families = [("sd1", StableDiffusionImg2ImgPipeline, sd_img2img, 48, 64, 7.5),
                ("sd2", StableDiffusionImg2ImgPipeline, sd_img2img, 64, 48, 7.5),
                ("sdxl", StableDiffusionXLImg2ImgPipeline, sdxl_img2img, 64, 64, 5.0)]
    for family, cls, module, height, width, guidance in families:
        options = {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
        if family == "sd2":
            options["variant"] = "fp16"  # the fixture stores its weights as the fp16 variant
        pipe = cls.from_pretrained(FIXTURES / family / "model", torch_dtype=torch.float32, **options)
        pipe.set_progress_bar_config(disable=True)
        image = pattern(height, width)
        tensors[f"{family}_image"] = image
        with torch.no_grad():
            dist = pipe.vae.encode(image * 2 - 1).latent_dist
        tensors[f"{family}_encode_mean"] = dist.mean.contiguous()
        tensors[f"{family}_encode_std"] = dist.std.contiguous()
        for sampler, scheduler_cls in (("euler", EulerDiscreteScheduler), ("ddim", DDIMScheduler)):
            for steps, strength in ((10, 0.6), (7, 0.35)):
                pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
                replay = Replay(len(runs) + 100)
                vae_module.randn_tensor = replay
                module.randn_tensor = replay
                key = f"{family}_{sampler}_{steps}_{int(strength * 100)}"
                args = dict(prompt=PROMPT, image=image, strength=strength, num_inference_steps=steps,
                            guidance_scale=guidance)
                # SDXL zeroes an absent negative prompt (force_zeros_for_empty_prompt); SD encodes it.
                args["negative_prompt"] = None if family == "sdxl" else NEGATIVE
                with torch.no_grad():
                    latents = pipe(**args, output_type="latent").images
                draws = list(replay.draws)
                replay.draws.clear()
                replay.generator.manual_seed(len(runs) + 100)
                with torch.no_grad():
                    pixels = pipe(**args, output_type="np").images
                assert len(draws) == 2, f"{key}: {len(draws)} draws"
                tensors[f"{key}_sample_noise"] = draws[0]
                tensors[f"{key}_noise"] = draws[1]
                tensors[f"{key}_latents"] = latents.float().contiguous()
                tensors[f"{key}_pixels"] = torch.from_numpy(np.ascontiguousarray(pixels)).float()
                runs.append({"key": key, "family": family, "sampler": sampler, "steps": steps,
                             "strength": strength, "guidance": guidance, "width": width, "height": height,
                             "prompt": PROMPT, "negative_prompt": "" if family == "sdxl" else NEGATIVE})
    save_file(tensors, out_dir / "img2img.safetensors")
    (out_dir / "img2img.json").write_text(json.dumps({"diffusers": diffusers.__version__, "runs": runs}, indent=1))
    print(len(runs), "runs")


if __name__ == "__main__":
    main()
