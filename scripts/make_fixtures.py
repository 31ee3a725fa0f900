#!/usr/bin/env python3
"""Builds the tiny Stable Diffusion pipelines that Atelier's tests run, and what diffusers computes for them.

Three pipelines with seeded random weights, in the diffusers folder layout, with the real CLIP BPE
vocabulary (from the PyPI package open-clip-torch):
  sd1   SD 1.x-like: epsilon, conv projections, PNDM/leading scheduler config, vocab.json + merges.txt
        only, text encoder weights with the `text_model.` prefix (as transformers 4 wrote them).
  sd2   SD 2.x-like: v-prediction, linear projections, gelu text encoder, pads with "!", DDIM config,
        upcast attention, vocab.json + merges.txt,
        every file saved as the `fp16` variant, text encoder without the prefix (transformers 5).
  sdxl  SDXL-like: two text encoders (the second with projection), pooled embeddings and time ids,
        force_zeros_for_empty_prompt, trailing timestep spacing, VAE factor 4, tokenizer.json (first
        tokenizer only).
Weights are stored in float16 (to keep the repository small); the reference runs load them in float32,
as Atelier's CPU tests do, so both compute on identical values.

For each pipeline, `expected.safetensors` and `expected.json` hold: token ids of tricky prompts, text
embeddings, one UNet forward (also at a latent size that is not a multiple of 2^levels), one VAE decode,
and the final latents and image of full runs from given noise with DDIM and Euler, with and without a
negative prompt.

Usage: python scripts/make_fixtures.py [OUT_DIR=tests/fixtures]
Needs: pip install torch diffusers==0.42.1 transformers safetensors open-clip-torch numpy
"""
import gzip
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import diffusers
import open_clip
import transformers
from diffusers import (
    AutoencoderKL,
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
    UniPCMultistepScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures")

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "",
    "  Mixed   CASE, punctuation!!! and numbers 1234 -- don't stop's ",
    "émigré café, naïve façade — 東京 🦊",
    "a castle on a hill, (golden hour:1.2), <lora:foo:0.8>",
    " ".join(["word"] * 90),  # longer than 77 tokens: truncated
]
RUN_PROMPT = "a red fox in the snow, highly detailed"
RUN_NEGATIVE = "blurry, lowres"


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_clip_vocab(folder: Path):
    """vocab.json + merges.txt exactly as openai/clip-vit-large-patch14 ships them."""
    bpe_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in merges[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


def make_tokenizer(tmp: Path, pad_token: str) -> CLIPTokenizer:
    write_clip_vocab(tmp)
    return CLIPTokenizer(vocab=str(tmp / "vocab.json"), merges=str(tmp / "merges.txt"), pad_token=pad_token,
                         model_max_length=77)


def perturb(module: torch.nn.Module, seed: int):
    """Default init leaves norms at 1/0 and some biases at 0; perturb them so wrong wiring shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.05 * noise)
            elif "embedding" in name and p.dim() == 2:
                p.copy_(0.5 * noise)
    return module


def text_config(hidden, layers, heads, act, projection=None):
    return CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=hidden * 2 + 5, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, hidden_act=act, bos_token_id=49406,
        eos_token_id=49407, pad_token_id=1, projection_dim=projection or hidden,
    )


def tiny_vae(channels, scaling_factor, seed, groups=8):
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels), up_block_types=("UpDecoderBlock2D",) * len(channels),
        layers_per_block=1, norm_num_groups=groups, sample_size=64, scaling_factor=scaling_factor,
    )
    return perturb(vae, seed)


def build_sd1(tmp):
    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8,
    )
    unet = perturb(unet, 11)
    torch.manual_seed(2)
    te = perturb(CLIPTextModel(text_config(16, 3, 4, "quick_gelu")), 12)
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, trained_betas=None,
    )
    pipe = StableDiffusionPipeline(
        vae=tiny_vae((16, 32), 0.18215, 13), text_encoder=te, tokenizer=make_tokenizer(tmp, "<|endoftext|>"),
        unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return pipe, dict(width=64, height=48, steps=6, guidance=7.5)


def build_sd2(tmp):
    torch.manual_seed(3)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
        norm_num_groups=4,
    )
    unet = perturb(unet, 21)
    torch.manual_seed(4)
    te = perturb(CLIPTextModel(text_config(8, 2, 2, "gelu")), 22)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1, prediction_type="v_prediction", timestep_spacing="leading",
    )
    pipe = StableDiffusionPipeline(
        vae=tiny_vae((16, 32), 0.18215, 23), text_encoder=te, tokenizer=make_tokenizer(tmp, "!"),
        unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return pipe, dict(width=48, height=64, steps=5, guidance=6.0)


def build_sdxl(tmp):
    torch.manual_seed(5)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=(2, 4), use_linear_projection=True,
        transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 + 6 * 8, norm_num_groups=8,
    )
    unet = perturb(unet, 31)
    torch.manual_seed(6)
    te = perturb(CLIPTextModel(text_config(8, 2, 2, "quick_gelu")), 32)
    te2 = perturb(CLIPTextModelWithProjection(text_config(8, 2, 2, "gelu", projection=8)), 33)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="trailing", interpolation_type="linear", use_karras_sigmas=False,
    )
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae((16, 16, 32), 0.13025, 34), text_encoder=te, text_encoder_2=te2,
        tokenizer=make_tokenizer(tmp / "1", "<|endoftext|>"), tokenizer_2=make_tokenizer(tmp / "2", "!"),
        unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    return pipe, dict(width=64, height=64, steps=4, guidance=5.0)


def add_text_model_prefix(path: Path):
    """Rewrite a transformers-5 text encoder file with transformers 4's `text_model.` key prefix."""
    tensors = load_file(path)
    renamed = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in tensors.items()}
    save_file(renamed, path, metadata={"format": "pt"})


def tokenizer_only_vocab_merges(folder: Path, pad_token: str):
    """Leave only vocab.json, merges.txt and the configs, as the SD 1.5 repos have."""
    for name in ("tokenizer.json",):
        (folder / name).unlink(missing_ok=True)
    write_clip_vocab(folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    config.update({"tokenizer_class": "CLIPTokenizer", "pad_token": pad_token, "model_max_length": 77,
                   "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"})
    config_path.write_text(json.dumps(config, indent=2))


def save(pipe, folder: Path, name: str):
    if folder.exists():
        shutil.rmtree(folder)
    variant = "fp16" if name == "sd2" else None
    pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True, variant=variant)
    if name == "sd1":
        add_text_model_prefix(folder / "text_encoder" / "model.safetensors")
        tokenizer_only_vocab_merges(folder / "tokenizer", "<|endoftext|>")
    if name in ("sd2", "sdxl"):
        tokenizer_only_vocab_merges(folder / ("tokenizer" if name == "sd2" else "tokenizer_2"), "!")
    # Tokenizer folders must say which pad token they use: that is what Atelier reads.
    for tok in ("tokenizer", "tokenizer_2"):
        config_path = folder / tok / "tokenizer_config.json"
        if config_path.exists():
            config = json.loads(config_path.read_text())
            assert "pad_token" in config, config_path
    return variant


def t(x):
    return x.detach().to(torch.float32).contiguous().cpu()


def main():
    torch.set_grad_enabled(False)
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = OUT / ".tmp-vocab"
    builders = {"sd1": build_sd1, "sd2": build_sd2, "sdxl": build_sdxl}
    for name, build in builders.items():
        pipe, run = build(tmp / name)
        folder = OUT / name / "model"
        variant = save(pipe, folder, name)
        cls = StableDiffusionXLPipeline if name == "sdxl" else StableDiffusionPipeline
        kwargs = {} if name == "sdxl" else dict(safety_checker=None, requires_safety_checker=False)
        pipe = cls.from_pretrained(folder, torch_dtype=torch.float32, variant=variant, **kwargs)
        pipe.set_progress_bar_config(disable=True)
        expected, meta = {}, {"diffusers": diffusers.__version__, "transformers": transformers.__version__,
                              "torch": torch.__version__, "run": run, "prompt": RUN_PROMPT, "negative_prompt": RUN_NEGATIVE}
        xl = name == "sdxl"

        # Tokenizers.
        tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if xl else [])
        meta["tokens"] = []
        for i, tok in enumerate(tokenizers):
            for prompt in PROMPTS:
                ids = tok(prompt, padding="max_length", max_length=77, truncation=True).input_ids
                full = tok(prompt).input_ids
                meta["tokens"].append({"tokenizer": i, "prompt": prompt, "ids": ids, "untruncated_len": len(full)})

        # Text embeddings, exactly as the pipeline computes them.
        if xl:
            pe, ne, pp, npool = pipe.encode_prompt(RUN_PROMPT, device="cpu", num_images_per_prompt=1,
                                                   do_classifier_free_guidance=True, negative_prompt=RUN_NEGATIVE)
            _, ze, _, zp = pipe.encode_prompt(RUN_PROMPT, device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=True, negative_prompt=None)
            expected.update(prompt_embeds=t(pe), negative_prompt_embeds=t(ne), pooled_prompt_embeds=t(pp),
                            negative_pooled_prompt_embeds=t(npool), empty_negative_prompt_embeds=t(ze),
                            empty_negative_pooled_prompt_embeds=t(zp))
        else:
            pe, ne = pipe.encode_prompt(RUN_PROMPT, "cpu", 1, True, negative_prompt=RUN_NEGATIVE)
            _, ze = pipe.encode_prompt(RUN_PROMPT, "cpu", 1, True, negative_prompt=None)
            expected.update(prompt_embeds=t(pe), negative_prompt_embeds=t(ne), empty_negative_prompt_embeds=t(ze))

        # One UNet forward, at the run's latent size and at an odd one.
        gen = torch.Generator().manual_seed(100)
        ctx = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=gen)
        for tag, (lh, lw) in {"": (run["height"] // pipe.vae_scale_factor, run["width"] // pipe.vae_scale_factor),
                              "_odd": (9, 7)}.items():
            sample = torch.randn(2, 4, lh, lw, generator=gen)
            extra = None
            if xl:
                text_embeds = torch.randn(2, 8, generator=gen)
                time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0], [96.0, 48.0, 8.0, 4.0, 64.0, 32.0]])
                extra = {"text_embeds": text_embeds, "time_ids": time_ids}
                expected["unet_text_embeds" + tag] = text_embeds
                expected["unet_time_ids" + tag] = time_ids
            out = pipe.unet(sample, 421.5, encoder_hidden_states=ctx, added_cond_kwargs=extra).sample
            expected["unet_sample" + tag] = sample
            expected["unet_context" + tag] = ctx.clone()
            expected["unet_out" + tag] = t(out)
        meta["unet_timestep"] = 421.5

        # One VAE decode of scaled latents.
        lat = torch.randn(1, 4, 8, 6, generator=gen)
        expected["vae_latents"] = lat
        expected["vae_image"] = t(pipe.vae.decode(lat / pipe.vae.config.scaling_factor).sample)

        # Full runs from given noise.
        lh, lw = run["height"] // pipe.vae_scale_factor, run["width"] // pipe.vae_scale_factor
        noise = torch.randn(1, 4, lh, lw, generator=gen)
        expected["noise"] = noise
        base_config = dict(pipe.scheduler.config)
        meta["runs"] = []
        samplers = [("ddim", DDIMScheduler, {}, (False, True)), ("euler", EulerDiscreteScheduler, {}, (False, True)),
                    ("euler-karras", EulerDiscreteScheduler, {"use_karras_sigmas": True}, (True,)),
                    ("euler-exponential", EulerDiscreteScheduler, {"use_exponential_sigmas": True}, (True,)),
                    ("dpmpp-2m", DPMSolverMultistepScheduler, {}, (True,)),
                    ("dpmpp-2m-karras", DPMSolverMultistepScheduler, {"use_karras_sigmas": True}, (False,)),
                    ("heun", HeunDiscreteScheduler, {}, (True,)),
                    ("lms-karras", LMSDiscreteScheduler, {"use_karras_sigmas": True}, (True,)),
                    ("pndm", PNDMScheduler, {"skip_prk_steps": True}, (True,)),
                    ("dpm2", KDPM2DiscreteScheduler, {}, (True,)),
                    ("unipc", UniPCMultistepScheduler, {}, (True,)),
                    ("deis", DEISMultistepScheduler, {}, (True,))]
        for sched_name, sched_cls, options, negatives in samplers:
            for with_negative in negatives:
                pipe.scheduler = sched_cls.from_config(base_config, **options)
                args = dict(prompt=RUN_PROMPT, negative_prompt=RUN_NEGATIVE if with_negative else None,
                            num_inference_steps=run["steps"], guidance_scale=run["guidance"],
                            width=run["width"], height=run["height"], latents=noise.clone())
                latents = pipe(**args, output_type="latent").images
                pipe.scheduler = sched_cls.from_config(base_config, **options)
                image = pipe(**args, output_type="np").images  # (1, H, W, 3) in [0, 1]
                key = f"{sched_name.replace('-', '_')}_{'neg' if with_negative else 'noneg'}"
                expected[f"run_{key}_latents"] = t(latents)
                expected[f"run_{key}_image"] = torch.from_numpy(np.ascontiguousarray(image)).float()
                meta["runs"].append({"key": key, "scheduler": sched_name, "negative_prompt": with_negative,
                                     "timesteps": [float(x) for x in pipe.scheduler.timesteps]})

        save_file({k: v.contiguous() for k, v in expected.items()}, OUT / name / "expected.safetensors")
        (OUT / name / "expected.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False))
        print(name, "ok", {k: tuple(v.shape) for k, v in expected.items() if k.startswith("run_ddim_noneg")})
    lcm_fixture(tmp / "lcm")
    shutil.rmtree(tmp, ignore_errors=True)
    scheduler_tables()
    scheduler_trajectories()


def lcm_fixture(tmp):
    """An LCM-distilled SD 1.x-like pipeline (time_cond_proj_dim: the guidance scale goes in as an
    embedding, no classifier-free guidance), with LCMScheduler: one UNet forward with the guidance
    embedding, and a 1-step run (the only deterministic LCM run) from given noise."""
    from diffusers import LatentConsistencyModelPipeline
    torch.manual_seed(21)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8, time_cond_proj_dim=8,
    )
    unet = perturb(unet, 22)
    torch.manual_seed(23)
    te = perturb(CLIPTextModel(text_config(16, 2, 4, "quick_gelu")), 24)
    scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                             num_train_timesteps=1000, set_alpha_to_one=True, steps_offset=1)
    pipe = LatentConsistencyModelPipeline(
        vae=tiny_vae((16, 32), 0.18215, 25), text_encoder=te, tokenizer=make_tokenizer(tmp, "<|endoftext|>"),
        unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    folder = OUT / "lcm" / "model"
    if folder.exists():
        shutil.rmtree(folder)
    pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    pipe = LatentConsistencyModelPipeline.from_pretrained(folder, torch_dtype=torch.float32, safety_checker=None,
                                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    run = dict(width=64, height=48, steps=1, guidance=8.0)
    expected = {}
    gen = torch.Generator().manual_seed(26)
    w = torch.tensor([run["guidance"] - 1.0])
    w_embedding = pipe.get_guidance_scale_embedding(w, embedding_dim=8)
    sample = torch.randn(1, 4, 6, 8, generator=gen)
    ctx = torch.randn(1, 77, 16, generator=gen)
    expected["guidance_embedding"] = w_embedding
    expected["unet_sample"] = sample
    expected["unet_context"] = ctx
    expected["unet_out"] = t(pipe.unet(sample, 499, encoder_hidden_states=ctx, timestep_cond=w_embedding).sample)
    noise = torch.randn(1, 4, run["height"] // 2, run["width"] // 2, generator=gen)
    expected["noise"] = noise
    args = dict(prompt=RUN_PROMPT, num_inference_steps=run["steps"], guidance_scale=run["guidance"],
                width=run["width"], height=run["height"], latents=noise.clone())
    expected["run_latents"] = t(pipe(**args, output_type="latent").images)
    image = pipe(**args, output_type="np").images
    expected["run_image"] = torch.from_numpy(np.ascontiguousarray(image)).float()
    meta = {"diffusers": diffusers.__version__, "run": run, "prompt": RUN_PROMPT, "unet_timestep": 499,
            "timesteps": [float(x) for x in pipe.scheduler.timesteps]}
    save_file({k: v.contiguous() for k, v in expected.items()}, OUT / "lcm" / "expected.safetensors")
    (OUT / "lcm" / "expected.json").write_text(json.dumps(meta, indent=1))
    print("lcm ok", pipe.scheduler.timesteps)


def scheduler_tables():
    """Timesteps, sigmas and the initial sigma of every scheduler config x sampler x step count."""
    configs = {
        name: json.loads((OUT / name / "model" / "scheduler" / "scheduler_config.json").read_text())
        for name in ("sd1", "sd2", "sdxl")
    }
    configs["linspace"] = dict(configs["sd1"], timestep_spacing="linspace", steps_offset=0)
    configs["squaredcos"] = dict(configs["sd2"], beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing")
    samplers = {"ddim": (DDIMScheduler, {}), "euler": (EulerDiscreteScheduler, {}),
                "euler-karras": (EulerDiscreteScheduler, {"use_karras_sigmas": True}),
                "euler-exponential": (EulerDiscreteScheduler, {"use_exponential_sigmas": True}),
                "dpmpp-2m": (DPMSolverMultistepScheduler, {}),
                "dpmpp-2m-karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
                "dpmpp-2m-exponential": (DPMSolverMultistepScheduler, {"use_exponential_sigmas": True}),
                "euler-a": (EulerAncestralDiscreteScheduler, {}),
                "dpmpp-2m-sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
                "heun": (HeunDiscreteScheduler, {}),
                "heun-karras": (HeunDiscreteScheduler, {"use_karras_sigmas": True}),
                **NEW_SAMPLERS}
    tables = []
    for config_name, config in configs.items():
        for sampler, (cls, options) in samplers.items():
            for steps in (1, 4, 7, 10, 25, 33, 50):
                scheduler = cls.from_config(config, **options)
                scheduler.set_timesteps(steps)
                entry = {"config": config_name, "scheduler_config": config, "sampler": sampler, "steps": steps,
                         "timesteps": [float(t) for t in scheduler.timesteps],
                         "init_noise_sigma": float(scheduler.init_noise_sigma)}
                if hasattr(scheduler, "sigmas"):
                    entry["sigmas"] = [float(s) for s in scheduler.sigmas]
                if config_name == "squaredcos" and sampler.startswith("dpm2-a"):
                    # KDPM2 ancestral at sigma_max = 20291: diffusers' first down-sigma is rounding
                    # noise of sqrt(s1^2 - up^2) (NaN for 4 and 7 steps, a random midpoint for the
                    # rest); Atelier uses the exact s1^2 / s0 there, so there is nothing to match.
                    continue
                tables.append(entry)
    (OUT / "schedulers.json").write_text(json.dumps(tables))


# The samplers added for issue 3 (diffusers class and options per CLI id).
NEW_SAMPLERS = {
    "ddpm": (DDPMScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
    "lms": (LMSDiscreteScheduler, {}),
    "lms-karras": (LMSDiscreteScheduler, {"use_karras_sigmas": True}),
    "dpm2": (KDPM2DiscreteScheduler, {}),
    "dpm2-karras": (KDPM2DiscreteScheduler, {"use_karras_sigmas": True}),
    "dpm2-a": (KDPM2AncestralDiscreteScheduler, {}),
    "dpm2-a-karras": (KDPM2AncestralDiscreteScheduler, {"use_karras_sigmas": True}),
    "dpmpp-sde": (DPMSolverSDEScheduler, {}),
    "dpmpp-sde-karras": (DPMSolverSDEScheduler, {"use_karras_sigmas": True}),
    "unipc": (UniPCMultistepScheduler, {}),
    "unipc-karras": (UniPCMultistepScheduler, {"use_karras_sigmas": True}),
    "deis": (DEISMultistepScheduler, {}),
    "deis-karras": (DEISMultistepScheduler, {"use_karras_sigmas": True}),
    "lcm": (LCMScheduler, {}),
}


# The stand-in model of the trajectories: the ideal denoiser for data x0 ~ N(MU, S^2), evaluated
# with alphas_cumprod interpolated at (possibly fractional) timesteps, in float64.
MU, S = 0.5, 0.8
DDIM_ETA = 0.5


def ideal_model(x, t, alphas_cumprod, prediction_type):
    abar = float(np.interp(float(t), np.arange(len(alphas_cumprod)), alphas_cumprod.double().numpy()))
    x = x.double()
    eps = (1 - abar) ** 0.5 * (x - abar ** 0.5 * MU) / (abar * S * S + 1 - abar)
    if prediction_type == "v_prediction":
        x0 = (x - (1 - abar) ** 0.5 * eps) / abar ** 0.5
        return (abar ** 0.5 * eps - (1 - abar) ** 0.5 * x0).float()
    return eps.float()


class BrownianReplay:
    """Stands in for DPMSolverSDEScheduler's Brownian tree. Each step asks for the normalised
    increment from sigma_k to the midpoint, then from sigma_k to sigma_k+1; the two overlap, so the
    second is built from the first and an independent draw z. The draws stored (and replayed by
    Atelier) are the first increment and z."""

    def __init__(self, randn):
        self.randn, self.first = randn, None

    def __call__(self, sigma, sigma_next):
        z = self.randn((1, 4, 8, 8))
        if self.first is None:
            self.first = (sigma, sigma_next, z)
            return z
        start, midpoint, n1 = self.first
        self.first = None
        a, b = start - midpoint, midpoint - sigma_next
        return (a.sqrt() * n1 + b.sqrt() * z) / (a + b).sqrt()


def dpmpp_2s_ancestral_reference(config, options, steps, noise, randn):
    """k-diffusion's sample_dpmpp_2s_ancestral (eta 1) on Euler's sigmas, with the ideal model
    wrapped as k-diffusion's CompVis denoisers do; returns the sample after every model evaluation."""
    euler = EulerDiscreteScheduler.from_config(config, **options)
    euler.set_timesteps(steps)
    sigmas, timesteps = euler.sigmas, euler.timesteps
    log_sigmas = np.log(np.array(((1 - euler.alphas_cumprod) / euler.alphas_cumprod) ** 0.5))
    v = euler.config.prediction_type == "v_prediction"

    def denoise(x, sigma, t):
        out = ideal_model(x / (sigma ** 2 + 1) ** 0.5, t, euler.alphas_cumprod, euler.config.prediction_type)
        if v:
            return out * (-sigma / (sigma ** 2 + 1) ** 0.5) + x / (sigma ** 2 + 1)
        return x - sigma * out

    x = noise * euler.init_noise_sigma
    trajectory = []
    for i in range(len(sigmas) - 1):
        s, sn = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, s, timesteps[i])
        up = torch.minimum(sn, (sn ** 2 * (s ** 2 - sn ** 2) / s ** 2) ** 0.5)
        down = (sn ** 2 - up ** 2) ** 0.5
        if down == 0:
            x = x + (x - denoised) / s * (down - s)
        else:
            t, t_next = -s.log(), -down.log()
            h = t_next - t
            sig_mid = (-(t + h * 0.5)).exp()
            x_2 = (sig_mid / (-t).exp()) * x - (-h * 0.5).expm1() * denoised
            trajectory.append(x_2.clone())
            t_mid = float(np.float32(euler._sigma_to_t(np.array(float(sig_mid)), log_sigmas)))
            denoised_2 = denoise(x_2, sig_mid, t_mid)
            x = ((-t_next).exp() / (-t).exp()) * x - (-h).expm1() * denoised_2
        if sn > 0:
            x = x + randn(x.shape) * up
        trajectory.append(x.clone())
    return trajectory


def scheduler_trajectories():
    """Full sampling loops driven by the ideal denoiser from fixed noise; stochastic schedulers draw
    their noise from a list that is stored too, so that Atelier can replay it."""
    import diffusers.schedulers.scheduling_dpmsolver_multistep as dpm_module
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as ancestral_module
    configs = {name: json.loads((OUT / name / "model" / "scheduler" / "scheduler_config.json").read_text())
               for name in ("sd1", "sd2")}
    samplers = {"ddim": (DDIMScheduler, {}), "euler": (EulerDiscreteScheduler, {}),
                "euler-karras": (EulerDiscreteScheduler, {"use_karras_sigmas": True}),
                "euler-a": (EulerAncestralDiscreteScheduler, {}),
                "dpmpp-2m": (DPMSolverMultistepScheduler, {}),
                "dpmpp-2m-karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
                "dpmpp-2m-sde-karras": (DPMSolverMultistepScheduler,
                                        {"use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++"}),
                "heun": (HeunDiscreteScheduler, {}), "heun-karras": (HeunDiscreteScheduler, {"use_karras_sigmas": True}),
                **NEW_SAMPLERS, "dpmpp-2s-a": (None, {}), "dpmpp-2s-a-karras": (None, {"use_karras_sigmas": True}),
                "ddim-eta": (DDIMScheduler, {})}
    import diffusers.schedulers.scheduling_ddim as ddim_module
    import diffusers.schedulers.scheduling_ddpm as ddpm_module
    import diffusers.schedulers.scheduling_k_dpm_2_ancestral_discrete as kdpm2a_module
    import diffusers.schedulers.scheduling_lcm as lcm_module
    tensors, entries = {}, []
    gen = torch.Generator().manual_seed(7)
    for config_name, config in configs.items():
        for sampler, (cls, options) in samplers.items():
            for steps in (4, 10):
                key = f"{config_name}_{sampler}_{steps}"
                noise = torch.randn(1, 4, 8, 8, generator=gen)
                drawn = []

                def fake_randn(shape, dtype=None, device=None, generator=None, **_):
                    z = torch.randn(shape, generator=gen, dtype=torch.float32)
                    drawn.append(z.clone())
                    return z.to(dtype or torch.float32)

                for module in (ancestral_module, dpm_module, ddpm_module, kdpm2a_module, lcm_module, ddim_module):
                    module.randn_tensor = fake_randn
                if cls is None:
                    trajectory = dpmpp_2s_ancestral_reference(config, options, steps, noise, fake_randn)
                else:
                    scheduler = cls.from_config(config, **options)
                    scheduler.set_timesteps(steps)
                    if cls is DPMSolverSDEScheduler:
                        scheduler.noise_sampler = BrownianReplay(fake_randn)
                    sample = noise * scheduler.init_noise_sigma
                    trajectory = []
                    for t in scheduler.timesteps:
                        x = scheduler.scale_model_input(sample, t)
                        out = ideal_model(x, t, scheduler.alphas_cumprod, scheduler.config.prediction_type)
                        extra = {"eta": DDIM_ETA} if sampler == "ddim-eta" else {}
                        sample = scheduler.step(out, t, sample, **extra).prev_sample
                        trajectory.append(sample.clone())
                tensors[f"{key}_noise"] = noise
                tensors[f"{key}_trajectory"] = torch.cat(trajectory)
                if drawn:
                    tensors[f"{key}_step_noise"] = torch.cat(drawn)
                entries.append({"key": key, "config": config_name, "scheduler_config": config,
                                "sampler": "ddim" if sampler == "ddim-eta" else sampler, "steps": steps,
                                "eta": DDIM_ETA if sampler == "ddim-eta" else 0.0, "stochastic": bool(drawn)})
    save_file({k: v.contiguous() for k, v in tensors.items()}, OUT / "trajectories.safetensors")
    (OUT / "trajectories.json").write_text(json.dumps({"mu": MU, "s": S, "runs": entries}))


if __name__ == "__main__":
    main()
