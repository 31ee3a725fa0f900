"""diffusers on a full-size architecture with random weights (f16, CUDA), for
scripts/bench-vs-diffusers.sh: builds the whole pipeline (text encoders, tokenizers, UNet, VAE,
DDIM scheduler), saves it in the diffusers layout for Atelier to load the very same weights, and
times, at the family's native size with 30 DDIM steps and guidance 7.5:
  - eager: the UNet loop (batch 2, as the shared bench_diffusers.py does) and one VAE decode;
  - pipeline: a whole warm pipeline call (text encoding, 30 steps, decode, PIL), no previews;
  - compiled: torch.compile(unet) in its default mode, the compile time (first call) apart;
  - VAE decode alone at the sides given with --vae-sides (f16 for SD 1.5/2.1, f32 for SDXL as
    its pipeline decodes).
Prints one JSON line last.
    python3 bench_full_diffusers.py sd15|sd21|sdxl OUT_DIR TOKENIZERS_DIR [--compile] [--vae-sides 512,768]
(--save-only: build on the CPU and save, no timing: to check a loader against the layout.)
TOKENIZERS_DIR holds `tokenizer` (and `tokenizer_2` for SDXL) with the real CLIP vocabulary.
"""

import json
import os
import shutil
import sys
import time

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

STEPS = 30
GUIDANCE = 7.5
PROMPT = "a photo of a red fox in the snow, highly detailed"


def sd_unet(cross, heads, linear, upcast, sample):
    return UNet2DConditionModel(
        sample_size=sample,
        cross_attention_dim=cross,
        attention_head_dim=heads,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        use_linear_projection=linear,
        upcast_attention=upcast,
    )


def build(arch, tokenizers):
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(f"{tokenizers}/tokenizer")
    prediction = "v_prediction" if arch == "sd21" else "epsilon"
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction,
    )
    side = {"sd15": 512, "sd21": 768, "sdxl": 1024}[arch]
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2, sample_size=side, force_upcast=arch == "sdxl",
        scaling_factor=0.13025 if arch == "sdxl" else 0.18215,
    )
    if arch == "sd15":
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
            projection_dim=768))
        unet = sd_unet(768, 8, False, False, 64)
        pipe = StableDiffusionPipeline(vae, text_encoder, tokenizer, unet, scheduler, None, None,
                                       requires_safety_checker=False)
    elif arch == "sd21":
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
            num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu",
            projection_dim=512))
        unet = sd_unet(1024, (5, 10, 20, 20), True, True, 96)
        pipe = StableDiffusionPipeline(vae, text_encoder, tokenizer, unet, scheduler, None, None,
                                       requires_safety_checker=False)
    else:
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
            projection_dim=768))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
            num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
            projection_dim=1280))
        tokenizer_2 = CLIPTokenizer.from_pretrained(f"{tokenizers}/tokenizer_2")
        unet = UNet2DConditionModel(
            sample_size=128, cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
            block_out_channels=(320, 640, 1280), layers_per_block=2, use_linear_projection=True,
            transformer_layers_per_block=(1, 2, 10), addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
        pipe = StableDiffusionXLPipeline(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2,
                                         unet, scheduler, force_zeros_for_empty_prompt=True)
    pipe.to("cpu" if "--save-only" in sys.argv else "cuda", torch.float16)
    pipe.set_progress_bar_config(disable=True)
    return pipe, side


def unet_loop(pipe, arch, side):
    """The UNet loop of the shared bench_diffusers.py: 30 DDIM steps, batch 2, ms per step."""
    dev = "cuda"
    with torch.inference_mode():
        if arch == "sdxl":
            emb, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPT, device=dev, do_classifier_free_guidance=True)
            extra = {"text_embeds": torch.cat([neg_pooled, pooled]),
                     "time_ids": torch.tensor([[side, side, 0, 0, side, side]] * 2, device=dev, dtype=torch.float16)}
        else:
            emb, neg = pipe.encode_prompt(PROMPT, dev, 1, True)
            extra = None
        emb = torch.cat([neg, emb])
        latents0 = torch.randn(1, 4, side // 8, side // 8, device=dev, dtype=torch.float16)
        sched = pipe.scheduler

        def run():
            sched.set_timesteps(STEPS)
            lat = latents0 * sched.init_noise_sigma
            for t in sched.timesteps:
                x = sched.scale_model_input(torch.cat([lat, lat]), t)
                n = pipe.unet(x, t, encoder_hidden_states=emb, added_cond_kwargs=extra).sample
                u, c = n.chunk(2)
                lat = sched.step(u + GUIDANCE * (c - u), t, lat).prev_sample
            return lat

        started = time.perf_counter()
        run()
        torch.cuda.synchronize()
        first_s = time.perf_counter() - started
        run()
        torch.cuda.synchronize()
        started = time.perf_counter()
        run()
        torch.cuda.synchronize()
        loop = time.perf_counter() - started
    return {"ms_step": loop * 1e3 / STEPS, "it_s": STEPS / loop, "first_loop_s": first_s}


def vae_decode_ms(vae, side, dtype):
    vae = vae.to(dtype)
    latents = torch.randn(1, 4, side // 8, side // 8, device="cuda", dtype=dtype)
    with torch.inference_mode():
        vae.decode(latents)
        torch.cuda.synchronize()
        started = time.perf_counter()
        vae.decode(latents)
        torch.cuda.synchronize()
    return (time.perf_counter() - started) * 1e3


def main():
    arch, out, tokenizers = sys.argv[1:4]
    sides = []
    if "--vae-sides" in sys.argv:
        sides = [int(s) for s in sys.argv[sys.argv.index("--vae-sides") + 1].split(",")]
    pipe, side = build(arch, tokenizers)
    if os.path.exists(out):
        shutil.rmtree(out)
    pipe.save_pretrained(out)
    if "--save-only" in sys.argv:
        return
    result = {"arch": arch, "side": side, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name()}
    torch.cuda.reset_peak_memory_stats()
    result["eager"] = unet_loop(pipe, arch, side)
    result["eager"]["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    vae_dtype = torch.float32 if arch == "sdxl" else torch.float16
    result["vae_ms"] = {str(s): vae_decode_ms(pipe.vae, s, vae_dtype) for s in sorted({side, *sides})}
    pipe.vae.to(torch.float16)
    # A whole warm pipeline call: text encoding, 30 steps, decode (SDXL upcasts its VAE).
    pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=side, width=side)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=side, width=side)
    torch.cuda.synchronize()
    result["pipeline_s"] = time.perf_counter() - started
    result["pipeline_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(result), flush=True)
    if "--compile" in sys.argv:
        pipe.unet = torch.compile(pipe.unet)
        compiled = unet_loop(pipe, arch, side)
        compiled["compile_and_first_loop_s"] = compiled.pop("first_loop_s")
        result["compiled"] = compiled
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
