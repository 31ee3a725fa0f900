"""Inpainting on the fixture models, as diffusers computes it, for tests/headless/inpaint.rs.

Makes a 9-channel inpainting UNet for the SD 1.x fixture (the sd1 UNet's config with
in_channels=9, seeded random weights; saved to OUT/unet, which becomes
tests/fixtures/sd1-inpaint/model/unet beside copies of the sd1 fixture's other components), then
runs StableDiffusionInpaintPipeline on it (9 channels: the UNet reads mask and masked-image
latents), StableDiffusionInpaintPipeline on the ordinary sd1 fixture (4 channels: the known region
is blended back after every step) and StableDiffusionXLInpaintPipeline on the sdxl fixture, with
Euler and DDIM at strengths 1 and 0.75. Random draws are replayed as in make_img2img_fixture.py:
every draw is recorded in diffusers' order (the init image's VAE sample when it is encoded, the
noise, the masked image's VAE sample).

Needs torch, transformers and diffusers 0.42.1:
    python scripts/make_inpaint_fixture.py OUT_DIR
"""

import json
import sys
from pathlib import Path

import diffusers
import diffusers.models.autoencoders.vae as vae_module
import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint as sd_inpaint
import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint as sdxl_inpaint
import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLInpaintPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
PROMPT = "a red fox in the snow, highly detailed"
NEGATIVE = "blurry, lowres"


def pattern(height, width):
    y = torch.linspace(0, 1, height).view(height, 1).expand(height, width)
    x = torch.linspace(0, 1, width).view(1, width).expand(height, width)
    return torch.stack([x, y, 0.5 + 0.5 * torch.sin(6.0 * x + 4.0 * y)]).unsqueeze(0).float()


def disc(height, width):
    """A soft-edged disc in the middle, (1, 1, H, W) in [0, 1] (diffusers binarizes it at 0.5)."""
    y = torch.linspace(-1, 1, height).view(height, 1).expand(height, width)
    x = torch.linspace(-1, 1, width).view(1, width).expand(height, width)
    r = (x * x + y * y).sqrt()
    return (1.0 - (r - 0.55) * 4).clamp(0, 1).view(1, 1, height, width).float()


def perturb(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.05 * noise)
    return module


class Replay:
    def __init__(self, seed):
        self.seed = seed
        self.reset()

    def reset(self):
        self.generator = torch.Generator().manual_seed(self.seed)
        self.draws = []

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        draw = torch.randn(tuple(shape), generator=self.generator, dtype=torch.float32)
        self.draws.append(draw.clone())
        return draw.to(device=device or "cpu", dtype=dtype or torch.float32)


def main():
    out_dir = Path(sys.argv[1])
    sd1 = StableDiffusionPipeline.from_pretrained(FIXTURES / "sd1" / "model", torch_dtype=torch.float32,
                                                  safety_checker=None, requires_safety_checker=False)
    config = dict(sd1.unet.config)
    config["in_channels"] = 9
    torch.manual_seed(31)
    unet9 = perturb(UNet2DConditionModel.from_config(config), 32)
    unet9.save_pretrained(out_dir / "unet", safe_serialization=True)
    unet9 = UNet2DConditionModel.from_pretrained(out_dir / "unet", torch_dtype=torch.float32)
    common = dict(vae=sd1.vae, text_encoder=sd1.text_encoder, tokenizer=sd1.tokenizer, scheduler=sd1.scheduler,
                  safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipes = {
        "sd1-inpaint": (StableDiffusionInpaintPipeline(unet=unet9, **common), sd_inpaint, 48, 64, 7.5),
        "sd1": (StableDiffusionInpaintPipeline(unet=sd1.unet, **common), sd_inpaint, 48, 64, 7.5),
        "sdxl": (StableDiffusionXLInpaintPipeline.from_pretrained(FIXTURES / "sdxl" / "model",
                                                                   torch_dtype=torch.float32),
                 sdxl_inpaint, 64, 64, 5.0),
    }
    tensors = {}
    runs = []
    for family, (pipe, module, height, width, guidance) in pipes.items():
        pipe.set_progress_bar_config(disable=True)
        base_scheduler = pipe.scheduler.config
        image, mask = pattern(height, width), disc(height, width)
        tensors[f"{family}_image"] = image
        tensors[f"{family}_mask"] = mask
        for sampler, scheduler_cls in (("euler", EulerDiscreteScheduler), ("ddim", DDIMScheduler)):
            for steps, strength in ((6, 1.0), (8, 0.75)):
                pipe.scheduler = scheduler_cls.from_config(base_scheduler)
                replay = Replay(len(runs) + 200)
                vae_module.randn_tensor = replay
                module.randn_tensor = replay
                key = f"{family}_{sampler}_{steps}_{int(strength * 100)}"
                args = dict(prompt=PROMPT, image=image, mask_image=mask, strength=strength, height=height,
                            width=width, num_inference_steps=steps, guidance_scale=guidance,
                            negative_prompt=None if family == "sdxl" else NEGATIVE)
                with torch.no_grad():
                    latents = pipe(**args, output_type="latent").images
                draws = list(replay.draws)
                replay.reset()
                with torch.no_grad():
                    pixels = pipe(**args, output_type="np").images
                for index, draw in enumerate(draws):
                    tensors[f"{key}_draw{index}"] = draw
                tensors[f"{key}_latents"] = latents.float().contiguous()
                tensors[f"{key}_pixels"] = torch.from_numpy(np.ascontiguousarray(pixels)).float()
                runs.append({"key": key, "family": family, "sampler": sampler, "steps": steps,
                             "strength": strength, "guidance": guidance, "width": width, "height": height,
                             "prompt": PROMPT, "negative_prompt": "" if family == "sdxl" else NEGATIVE,
                             "draws": len(draws), "unet_in_channels": pipe.unet.config.in_channels})
    save_file(tensors, out_dir / "inpaint.safetensors")
    (out_dir / "inpaint.json").write_text(json.dumps({"diffusers": diffusers.__version__, "runs": runs}, indent=1))
    print(len(runs), "runs", [(r["key"], r["draws"]) for r in runs])


if __name__ == "__main__":
    main()
