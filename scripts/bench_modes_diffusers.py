"""Times diffusers' text-to-image, img2img and inpainting pipelines on a full-size architecture with
random weights (fp16, CUDA), after saving that model as a complete diffusers folder (text encoders,
tokenizers and scheduler included) so that `atelier generate` runs on the very same weights.

    python3 scripts/bench_modes_diffusers.py OUT_DIR sd15|sdxl STEPS

Prints one JSON line per pipeline: {"arch", "mode", "secs"} (the whole pipeline call, after a
warm-up call), and writes OUT_DIR/init.png and OUT_DIR/mask.png for Atelier's runs.
"""
import json
import os
import shutil
import sys
import time

import numpy as np
import torch
from PIL import Image
from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline,
                       StableDiffusionInpaintPipeline, StableDiffusionPipeline,
                       StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                          CLIPTokenizer)

out, arch, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
torch.manual_seed(0)
dev, dtype = "cuda", torch.float16

clip_l = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
if arch == "sd15":
    side = 512
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    encoders = {"text_encoder": CLIPTextModel(clip_l)}
    tokenizers = {"tokenizer": f"{repo}/tests/fixtures/sd1/model/tokenizer"}
    pipelines = (StableDiffusionPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline)
else:  # the SDXL base 1.0 architecture
    side = 1024
    unet = UNet2DConditionModel(sample_size=128, cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                                block_out_channels=(320, 640, 1280), layers_per_block=2,
                                use_linear_projection=True, transformer_layers_per_block=(1, 2, 10),
                                addition_embed_type="text_time", addition_time_embed_dim=256,
                                projection_class_embeddings_input_dim=2816,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
    clip_g = CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                            num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
                            projection_dim=1280)
    encoders = {"text_encoder": CLIPTextModel(clip_l), "text_encoder_2": CLIPTextModelWithProjection(clip_g)}
    tokenizers = {"tokenizer": f"{repo}/tests/fixtures/sdxl/model/tokenizer",
                  "tokenizer_2": f"{repo}/tests/fixtures/sdxl/model/tokenizer_2"}
    pipelines = (StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline)
vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                    layers_per_block=2, sample_size=side, force_upcast=False)
scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   steps_offset=1, timestep_spacing="leading")
components = dict(unet=unet.to(dtype), vae=vae.to(dtype), scheduler=scheduler,
                  **{k: v.to(dtype) for k, v in encoders.items()},
                  **{k: CLIPTokenizer.from_pretrained(v) for k, v in tokenizers.items()})
text_pipe = pipelines[0](**components, **({"safety_checker": None, "feature_extractor": None,
                                              "requires_safety_checker": False} if arch == "sd15" else {}))
shutil.rmtree(out, ignore_errors=True)
text_pipe.save_pretrained(out)

picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))
mask = Image.fromarray(np.pad(np.full((side // 2, side // 2), 255, np.uint8), side // 4))
picture.save(f"{out}/init.png")
mask.save(f"{out}/mask.png")

prompt = "a red fox in the snow, highly detailed"
runs = [("text", pipelines[0], {}),
        ("img2img", pipelines[1], dict(image=picture, strength=0.75)),
        ("img2img-1.0", pipelines[1], dict(image=picture, strength=1.0)),
        ("inpaint", pipelines[2], dict(image=picture, mask_image=mask, strength=0.75)),
        ("inpaint-1.0", pipelines[2], dict(image=picture, mask_image=mask, strength=1.0))]
for mode, cls, extra in runs:
    pipe = cls(**text_pipe.components).to(dev)
    pipe.set_progress_bar_config(disable=True)
    call = lambda: pipe(prompt, negative_prompt="blurry", num_inference_steps=steps, guidance_scale=7.5,
                        height=side, width=side, generator=torch.Generator(dev).manual_seed(1), **extra)
    with torch.inference_mode():
        call()
        torch.cuda.synchronize()
        started = time.perf_counter()
        call()
        torch.cuda.synchronize()
        secs = time.perf_counter() - started
    print(json.dumps({"arch": arch, "mode": mode, "secs": secs}), flush=True)
