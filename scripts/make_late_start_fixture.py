"""Where an image-to-image run starts, and how diffusers noises the init latents there.

For every scheduler config of the fixtures x sampler x step count x denoising strength, this runs
diffusers' own `StableDiffusionImg2ImgPipeline.get_timesteps` (which slices the scheduler's
timesteps at `t_start * order` and sets the begin index) and then `scheduler.add_noise` on the
first remaining timestep, as the img2img pipelines do, and records:
  order, first_index (t_start * order), remaining (timesteps left),
  alpha and sigma such that add_noise(x0, noise) = alpha * x0 + sigma * noise.
Atelier's `Scheduler::order`, `first_index_for_strength` and `Scheduler::add_noise` are checked
against it in tests/headless/late_start.rs.

Needs torch and diffusers 0.42.1 (+ torchsde for DPMSolverSDEScheduler); no model weights:
    python scripts/make_late_start_fixture.py [tests/fixtures/late_start.json]
"""

import json
import sys
import types
from pathlib import Path

import diffusers
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    UniPCMultistepScheduler,
)

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"

# Atelier's sampler ids and the diffusers class (with options) each reproduces.
SAMPLERS = {
    "ddim": (DDIMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
    "lms": (LMSDiscreteScheduler, {}),
    "lms-karras": (LMSDiscreteScheduler, {"use_karras_sigmas": True}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-karras": (EulerDiscreteScheduler, {"use_karras_sigmas": True}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "heun-karras": (HeunDiscreteScheduler, {"use_karras_sigmas": True}),
    "dpm2": (KDPM2DiscreteScheduler, {}),
    "dpm2-karras": (KDPM2DiscreteScheduler, {"use_karras_sigmas": True}),
    "dpm2-a": (KDPM2AncestralDiscreteScheduler, {}),
    "dpm2-a-karras": (KDPM2AncestralDiscreteScheduler, {"use_karras_sigmas": True}),
    "dpmpp-2m": (DPMSolverMultistepScheduler, {}),
    "dpmpp-2m-karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "dpmpp-2m-sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp-sde": (DPMSolverSDEScheduler, {}),
    "dpmpp-sde-karras": (DPMSolverSDEScheduler, {"use_karras_sigmas": True}),
    "unipc": (UniPCMultistepScheduler, {}),
    "unipc-karras": (UniPCMultistepScheduler, {"use_karras_sigmas": True}),
    "deis": (DEISMultistepScheduler, {}),
    "deis-karras": (DEISMultistepScheduler, {"use_karras_sigmas": True}),
    "lcm": (LCMScheduler, {}),
}


def configs():
    found = {
        name: json.loads((FIXTURES / name / "model" / "scheduler" / "scheduler_config.json").read_text())
        for name in ("sd1", "sd2", "sdxl")
    }
    found["linspace"] = dict(found["sd1"], timestep_spacing="linspace", steps_offset=0)
    return found


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else FIXTURES / "late_start.json"
    rows = []
    scheduler_configs = configs()
    for config_name, config in scheduler_configs.items():
        for sampler, (cls, options) in SAMPLERS.items():
            for steps in (4, 10, 25):
                for strength in (0.3, 0.55, 0.75, 1.0):
                    scheduler = cls.from_config(config, **options)
                    scheduler.set_timesteps(steps)
                    pipe = types.SimpleNamespace(scheduler=scheduler)
                    timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(pipe, steps, strength, "cpu")
                    if len(timesteps) == 0:
                        continue
                    latent_timestep = timesteps[:1]
                    x0 = torch.tensor([[1.0, 0.0]])
                    noise = torch.tensor([[0.0, 1.0]])
                    noisy = scheduler.add_noise(x0, noise, latent_timestep)
                    rows.append({
                        "config": config_name, "sampler": sampler,
                        "steps": steps, "strength": strength, "order": scheduler.order,
                        "first_index": len(scheduler.timesteps) - len(timesteps),
                        "remaining": len(timesteps), "first_timestep": float(timesteps[0]),
                        "alpha": float(noisy[0, 0]), "sigma": float(noisy[0, 1]),
                    })
    out.write_text(json.dumps({"diffusers": diffusers.__version__, "configs": scheduler_configs, "rows": rows},
                              separators=(",", ":")))
    print(f"{len(rows)} rows -> {out}")


if __name__ == "__main__":
    main()
