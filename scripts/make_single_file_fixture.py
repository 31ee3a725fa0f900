"""Tiny single-file checkpoints (the original CompVis/SGM layout that A1111 and ComfyUI read) and
what diffusers' `from_single_file` computes with them, for tests/headless/single_file.rs.

Four pipelines with seeded random weights, built in diffusers, then written in the original
layout by this script's own diffusers -> original key map (the inverse of diffusers'
`convert_ldm_*` functions); the script checks that `from_single_file` reads every weight back
exactly, then records its runs:
  sd1.safetensors          SD 1.x: CLIP ViT-L layout, conv projections, 8 heads (no sidecar:
                           the family's default), f16.
  sd2-v.safetensors/.yaml  SD 2.x 768-v: OpenCLIP layout (stacked q/k/v, an extra last block
                           that the penultimate-layer encoder skips), linear projections,
                           `parameterization: "v"` and `num_head_channels` in the sidecar, bf16.
  sdxl.safetensors/.yaml   SDXL: CLIP ViT-L + OpenCLIP bigG, text_time embedding, depth 2
                           transformers, SGM sidecar with `num_head_channels`, f16.
  sdxl-refiner.safetensors The SDXL refiner: OpenCLIP bigG alone (`conditioner.embedders.0`),
           /.yaml         five time ids (size, crop, aesthetic score), f16; run through diffusers'
                          img2img pipeline (its only one) at strength 0.6.
  sd1-inpaint.safetensors  SD 1.x inpainting: 9 input channels, EMA copies beside the weights
                           (`model_ema.*`, ignored as diffusers and A1111 ignore them), f16.
  vae.safetensors          A VAE alone in the original layout (bare keys), other weights than
                           sd1's, for the VAE override, f32.
Norms have 32 groups and text heads are 64 wide or a single head, as in every released model,
so that the shapes alone (and the sidecar) describe the architecture.

Reference runs (float32, from recorded noise): text to image with Euler and DDIM for each of
sd1, sd2-v and sdxl; sd1 with the VAE override; inpainting with the 9-channel model (random draws
recorded in diffusers' order, as make_inpaint_fixture.py does).

Needs torch, transformers and diffusers 0.42.1:
    python scripts/make_single_file_fixture.py OUT_DIR
"""

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import diffusers
import diffusers.models.autoencoders.vae as vae_module
import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint as sd_inpaint
import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img as sdxl_img2img
import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
PROMPT = "a red fox in the snow, highly detailed"
NEGATIVE = "blurry, lowres"
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False, clip_sample=False)


def perturb(module, seed):
    """Norms away from 1/0 and biases away from 0, so that miswired weights show."""
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


def text_encoder(act, layers, projection, seed, hidden=16):
    config = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=hidden + 5,
                            num_hidden_layers=layers, num_attention_heads=1, max_position_embeddings=77,
                            hidden_act=act, bos_token_id=49406, eos_token_id=2, pad_token_id=1,
                            projection_dim=hidden)
    torch.manual_seed(seed)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
    return perturb(model, seed)


def vae(scaling_factor, seed):
    torch.manual_seed(seed)
    model = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32),
                          down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                          layers_per_block=1, norm_num_groups=32, sample_size=64, scaling_factor=scaling_factor)
    return perturb(model, seed)


def unet(seed, **config):
    torch.manual_seed(seed)
    base = dict(block_out_channels=(32, 32), norm_num_groups=32, sample_size=32)
    base.update(config)
    return perturb(UNet2DConditionModel(**base), seed)


def tokenizer(pad):
    folder = FIXTURES / "sd1" / "model" / "tokenizer"
    tok = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), pad_token=pad,
                        model_max_length=77)
    assert tok("a red fox").input_ids == [49406, 320, 736, 3240, 49407], "the real CLIP vocabulary"
    return tok


# ---- diffusers -> original layout (the inverse of diffusers' convert_ldm_* functions) ----

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
          "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def resnet_to_ldm(rest):
    part, _, tail = rest.partition(".")
    return f"{RESNET.get(part, part)}.{tail}"


def unet_to_ldm(state, config):
    group = config["layers_per_block"] + 1
    attention_up = {i for i, t in enumerate(config["up_block_types"]) if t.startswith("CrossAttn")}
    out = {}
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    for key, value in state.items():
        parts = key.split(".")
        module, param = key.rsplit(".", 1)
        if module in fixed:
            name = f"{fixed[module]}.{param}"
        elif parts[0] == "down_blocks":
            b, kind = int(parts[1]), parts[2]
            if kind == "downsamplers":
                name = f"input_blocks.{(b + 1) * group}.0.op.{'.'.join(parts[5:])}"
            else:
                i = 1 + b * group + int(parts[3])
                rest = ".".join(parts[4:])
                name = f"input_blocks.{i}.0.{resnet_to_ldm(rest)}" if kind == "resnets" else f"input_blocks.{i}.1.{rest}"
        elif parts[0] == "mid_block":
            k, rest = int(parts[2]), ".".join(parts[3:])
            name = f"middle_block.{2 * k}.{resnet_to_ldm(rest)}" if parts[1] == "resnets" else f"middle_block.1.{rest}"
        elif parts[0] == "up_blocks":
            b, kind = int(parts[1]), parts[2]
            if kind == "upsamplers":
                slot = 2 if b in attention_up else 1
                name = f"output_blocks.{b * group + group - 1}.{slot}.conv.{'.'.join(parts[5:])}"
            else:
                i = b * group + int(parts[3])
                rest = ".".join(parts[4:])
                name = f"output_blocks.{i}.0.{resnet_to_ldm(rest)}" if kind == "resnets" else f"output_blocks.{i}.1.{rest}"
        else:
            raise KeyError(key)
        out["model.diffusion_model." + name] = value
    return out


def vae_to_ldm(state, prefix):
    levels = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("decoder.up_blocks."))
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in state.items():
        half, rest = key.split(".", 1)
        if rest.startswith("conv_norm_out."):
            name = f"{half}.norm_out.{rest.split('.', 1)[1]}"
        elif rest.startswith(("down_blocks.", "up_blocks.")):
            parts = rest.split(".")
            level = int(parts[1]) if parts[0] == "down_blocks" else levels - 1 - int(parts[1])
            kind = "down" if parts[0] == "down_blocks" else "up"
            if parts[2] == "resnets":
                tail = ".".join(parts[4:]).replace("conv_shortcut", "nin_shortcut")
                name = f"{half}.{kind}.{level}.block.{parts[3]}.{tail}"
            else:
                name = f"{half}.{kind}.{level}.{'downsample' if kind == 'down' else 'upsample'}.conv.{parts[-1]}"
        elif rest.startswith("mid_block.resnets."):
            parts = rest.split(".")
            name = f"{half}.mid.block_{int(parts[2]) + 1}.{'.'.join(parts[3:]).replace('conv_shortcut', 'nin_shortcut')}"
        elif rest.startswith("mid_block.attentions.0."):
            tail = rest[len("mid_block.attentions.0."):]
            module, param = tail.rsplit(".", 1)
            name = f"{half}.mid.attn_1.{attention[module]}.{param}"
            if module != "group_norm" and param == "weight":
                value = value[:, :, None, None]
        else:
            name = key
        out[prefix + name] = value
    return out


def with_text_model(state):
    """transformers >= 5.6 flattens CLIPTextModel's state dict; the original layout keeps `text_model.`."""
    return {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v
            for k, v in state.items() if not k.endswith("position_ids")}


def clip_to_ldm(state, prefix):
    return {prefix + k: v for k, v in with_text_model(state).items()}


def open_clip_to_ldm(state, prefix, extra_layer_seed=None):
    out, qkv = {}, {}
    renames = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
               "self_attn.out_proj": "attn.out_proj"}
    state = with_text_model(state)
    width = state["text_model.embeddings.token_embedding.weight"].shape[1]
    for key, value in state.items():
        if key == "text_model.embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = value
        elif key == "text_model.embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = value
        elif key.startswith("text_model.final_layer_norm."):
            out[prefix + "ln_final." + key.rsplit(".", 1)[1]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif key.startswith("text_model.encoder.layers."):
            parts = key.split(".")
            layer, rest = int(parts[3]), ".".join(parts[4:])
            module, param = rest.rsplit(".", 1)
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((layer, param), {})[module[-6]] = value
            else:
                out[f"{prefix}transformer.resblocks.{layer}.{renames[module]}.{param}"] = value
        elif not key.endswith("position_ids"):
            raise KeyError(key)
    for (layer, param), parts in qkv.items():
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    if extra_layer_seed is not None:
        # SD 2.x files hold OpenCLIP's last block, which the penultimate-layer encoder never runs.
        gen = torch.Generator().manual_seed(extra_layer_seed)
        last = 1 + max(int(k.split(".resblocks.")[1].split(".")[0]) for k in out if ".resblocks." in k)
        template = {k: v for k, v in out.items() if f".resblocks.{last - 1}." in k}
        for key, value in template.items():
            out[key.replace(f".resblocks.{last - 1}.", f".resblocks.{last}.")] = torch.randn(value.shape, generator=gen)
        if prefix + "text_projection" not in out:
            out[prefix + "text_projection"] = torch.randn(width, width, generator=gen)
    return out


def cast(state, dtype):
    return {k: v.detach().to(dtype).contiguous() for k, v in state.items()}


SD2_YAML = """model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    parameterization: "v"
    linear_start: 0.00085
    linear_end: 0.0120
    timesteps: 1000
    scale_factor: 0.18215
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        use_checkpoint: True
        image_size: 32 # unused
        num_head_channels: 16
        use_linear_in_transformer: True
        context_dim: 16
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder
      params:
        freeze: True
        layer: "penultimate"
"""

SDXL_YAML = """model:
  target: sgm.models.diffusion.DiffusionEngine
  params:
    scale_factor: 0.13025
    denoiser_config:
      target: sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser
      params:
        num_idx: 1000
        scaling_config:
          target: sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling
    network_config:
      target: sgm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        adm_in_channels: 80
        num_classes: sequential
        num_head_channels: 16
        transformer_depth: [0, 2]
        context_dim: 48
"""


REFINER_YAML = """model:
  target: sgm.models.diffusion.DiffusionEngine
  params:
    scale_factor: 0.13025
    network_config:
      target: sgm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        adm_in_channels: 72
        num_classes: sequential
        num_head_channels: 16
        context_dim: 32
    conditioner_config:
      target: sgm.modules.GeneralConditioner
      params:
        emb_models:
          - input_key: txt
            target: sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2
            params:
              layer: penultimate
              legacy: False
"""


def build(name):
    """(pipeline in float32, original-layout state dict, sidecar yaml or None, file dtype)."""
    scheduler = DDIMScheduler(**SCHEDULER)
    common = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if name in ("sd1", "sd1-inpaint"):
        seed = 10 if name == "sd1" else 20
        model = unet(seed, in_channels=9 if name == "sd1-inpaint" else 4, layers_per_block=2,
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                     attention_head_dim=8)
        encoder = text_encoder("quick_gelu", 2, False, seed + 1)
        cls = StableDiffusionInpaintPipeline if name == "sd1-inpaint" else StableDiffusionPipeline
        pipe = cls(unet=model, vae=vae(0.18215, seed + 2), text_encoder=encoder, tokenizer=tokenizer("<|endoftext|>"),
                   scheduler=scheduler, **common)
        state = unet_to_ldm(model.state_dict(), model.config)
        state.update(vae_to_ldm(pipe.vae.state_dict(), "first_stage_model."))
        state.update(clip_to_ldm(encoder.state_dict(), "cond_stage_model.transformer."))
        if name == "sd1-inpaint":
            # EMA copies, under the flattened names the original trainer wrote.
            gen = torch.Generator().manual_seed(seed + 3)
            for key, value in list(state.items()):
                if key.startswith("model.diffusion_model."):
                    flat = "model_ema." + key[len("model.diffusion_model."):].replace(".", "")
                    state[flat] = torch.randn(value.shape, generator=gen)
        return pipe, state, None, torch.float16
    if name == "sd2-v":
        model = unet(30, layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",) * 2,
                     up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=16,
                     attention_head_dim=(2, 2), use_linear_projection=True)
        encoder = text_encoder("gelu", 2, False, 31)
        pipe = StableDiffusionPipeline(
            unet=model, vae=vae(0.18215, 32), text_encoder=encoder, tokenizer=tokenizer("!"),
            scheduler=DDIMScheduler(**SCHEDULER, prediction_type="v_prediction"), **common)
        state = unet_to_ldm(model.state_dict(), model.config)
        state.update(vae_to_ldm(pipe.vae.state_dict(), "first_stage_model."))
        state.update(open_clip_to_ldm(encoder.state_dict(), "cond_stage_model.model.", extra_layer_seed=33))
        return pipe, state, SD2_YAML, torch.bfloat16
    if name == "sdxl-refiner":
        model = unet(50, layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                     attention_head_dim=(2, 2), use_linear_projection=True, transformer_layers_per_block=(1, 2),
                     addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=72)
        encoder_2 = text_encoder("gelu", 2, True, 51, 32)
        pipe = StableDiffusionXLImg2ImgPipeline(
            unet=model, vae=vae(0.13025, 52), text_encoder=None, text_encoder_2=encoder_2, tokenizer=None,
            tokenizer_2=tokenizer("!"), scheduler=scheduler, requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False)
        state = unet_to_ldm(model.state_dict(), model.config)
        state.update(vae_to_ldm(pipe.vae.state_dict(), "first_stage_model."))
        state.update(open_clip_to_ldm(encoder_2.state_dict(), "conditioner.embedders.0.model."))
        return pipe, state, REFINER_YAML, torch.float16
    assert name == "sdxl"
    model = unet(40, layers_per_block=2, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=48,
                 attention_head_dim=(2, 2), use_linear_projection=True, transformer_layers_per_block=(1, 2),
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=80)
    # Encoders of different widths, as ViT-L and bigG are (diffusers tells them apart by width).
    encoder, encoder_2 = text_encoder("quick_gelu", 2, False, 41, 16), text_encoder("gelu", 2, True, 42, 32)
    pipe = StableDiffusionXLPipeline(unet=model, vae=vae(0.13025, 43), text_encoder=encoder,
                                     text_encoder_2=encoder_2, tokenizer=tokenizer("<|endoftext|>"),
                                     tokenizer_2=tokenizer("!"), scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True)
    state = unet_to_ldm(model.state_dict(), model.config)
    state.update(vae_to_ldm(pipe.vae.state_dict(), "first_stage_model."))
    state.update(clip_to_ldm(encoder.state_dict(), "conditioner.embedders.0.transformer."))
    state.update(open_clip_to_ldm(encoder_2.state_dict(), "conditioner.embedders.1.model."))
    return pipe, state, SDXL_YAML, torch.float16


class Replay:
    def __init__(self, seed):
        self.generator = torch.Generator().manual_seed(seed)
        self.draws = []

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        draw = torch.randn(tuple(shape), generator=self.generator, dtype=torch.float32)
        self.draws.append(draw.clone())
        return draw.to(device=device or "cpu", dtype=dtype or torch.float32)


def same_weights(a, b, what):
    sa, sb = a.state_dict(), b.state_dict()
    for key, value in sa.items():
        if key.endswith("position_ids"):
            continue
        assert key in sb, f"{what}: {key} missing after from_single_file"
        assert torch.equal(value.float(), sb[key].float()), f"{what}: {key} differs after from_single_file"


def main():
    out = Path(sys.argv[1])
    folder = out / "single-file"
    folder.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    tensors, runs = {}, []
    work = Path(os.environ.get("FIXTURE_WORK_DIR") or tempfile.mkdtemp())
    for name in ("sd1", "sd2-v", "sdxl", "sd1-inpaint", "sdxl-refiner"):
        pipe, state, yaml, dtype = build(name)
        path = folder / f"{name}.safetensors"
        save_file(cast(state, dtype), path)
        if yaml:
            (folder / f"{name}.yaml").write_text(yaml)
        # The reference: the same rounded weights, in float32, through diffusers' own reader.
        config_dir = work / name
        pipe.save_pretrained(config_dir, safe_serialization=True)
        cls = type(pipe)
        sdxl_family = name.startswith("sdxl")
        loaded = cls.from_single_file(str(path), config=str(config_dir), torch_dtype=torch.float32,
                                      local_files_only=True, **({} if sdxl_family else dict(safety_checker=None)))
        rounded = cls.from_pretrained(config_dir, torch_dtype=dtype).to(torch.float32)
        for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
            if hasattr(rounded, component) and getattr(rounded, component) is not None:
                same_weights(getattr(rounded, component), getattr(loaded, component), f"{name} {component}")
        loaded.set_progress_bar_config(disable=True)
        height, width = (64, 64) if sdxl_family else (48, 64)
        for sampler, scheduler_cls in (("euler", EulerDiscreteScheduler), ("ddim", DDIMScheduler)):
            loaded.scheduler = scheduler_cls.from_config(loaded.scheduler.config)
            key = f"{name.replace('-', '_')}_{sampler}"
            args = dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=height, width=width,
                        num_inference_steps=6, guidance_scale=6.0)
            run = {"key": key, "file": path.name, "sampler": sampler, "steps": 6, "guidance": 6.0,
                   "width": width, "height": height, "prompt": PROMPT, "negative_prompt": NEGATIVE}
            if name == "sdxl-refiner":
                # The refiner's pipeline reworks a picture: size, crop and aesthetic score ids.
                if sampler == "ddim":
                    continue
                gen = torch.Generator().manual_seed(6)
                image = torch.rand(1, 3, height, width, generator=gen)
                replay = Replay(8)
                vae_module.randn_tensor = replay
                sdxl_img2img.randn_tensor = replay
                latents = loaded(**args, image=image, strength=0.6, output_type="latent").images
                tensors[f"{key}_image"] = image
                for index, draw in enumerate(replay.draws):
                    tensors[f"{key}_draw{index}"] = draw
                run["draws"] = len(replay.draws)
                run["strength"] = 0.6
            elif name == "sd1-inpaint":
                if sampler == "ddim":
                    continue
                gen = torch.Generator().manual_seed(5)
                image = torch.rand(1, 3, height, width, generator=gen)
                mask = torch.zeros(1, 1, height, width)
                mask[:, :, height // 4: 3 * height // 4, width // 3:] = 1.0
                replay = Replay(7)
                vae_module.randn_tensor = replay
                sd_inpaint.randn_tensor = replay
                latents = loaded(**args, image=image, mask_image=mask, strength=1.0, output_type="latent").images
                tensors[f"{key}_image"] = image
                tensors[f"{key}_mask"] = mask
                for index, draw in enumerate(replay.draws):
                    tensors[f"{key}_draw{index}"] = draw
                run["draws"] = len(replay.draws)
            else:
                lh, lw = height // loaded.vae_scale_factor, width // loaded.vae_scale_factor
                noise = torch.randn(1, 4, lh, lw, generator=torch.Generator().manual_seed(len(runs)))
                latents = loaded(**args, latents=noise.clone(), output_type="latent").images
                tensors[f"{key}_noise"] = noise
            tensors[f"{key}_latents"] = latents.float().contiguous()
            runs.append(run)
        if name == "sd1":
            # The VAE override: another VAE, alone in a file with bare original keys.
            other = vae(0.18215, 90)
            save_file(cast(vae_to_ldm(other.state_dict(), ""), torch.float32), folder / "vae.safetensors")
            other_dir = work / "vae"
            other.save_pretrained(other_dir)
            override = AutoencoderKL.from_single_file(str(folder / "vae.safetensors"), config=str(other_dir),
                                                      torch_dtype=torch.float32, local_files_only=True)
            same_weights(AutoencoderKL.from_pretrained(other_dir, torch_dtype=torch.float32), override,
                         "vae override")
            loaded.vae = override
            loaded.scheduler = EulerDiscreteScheduler.from_config(loaded.scheduler.config)
            noise = tensors["sd1_euler_noise"]
            args = dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=48, width=64, num_inference_steps=6,
                        guidance_scale=6.0)
            image = loaded(**args, latents=noise.clone(), output_type="np").images
            tensors["sd1_vae_override_image"] = torch.from_numpy(np.ascontiguousarray(image)).float()
    save_file(tensors, folder / "expected.safetensors")
    meta = {"diffusers": diffusers.__version__, "torch": torch.__version__, "runs": runs}
    (folder / "expected.json").write_text(json.dumps(meta, indent=1))
    if not os.environ.get("FIXTURE_WORK_DIR"):
        shutil.rmtree(work, ignore_errors=True)
    print(len(runs), "runs;", sorted((p.name, p.stat().st_size) for p in folder.iterdir()))


if __name__ == "__main__":
    main()
