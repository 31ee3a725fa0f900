"""Writes a full-size SDXL base checkpoint with random weights as one f16 .safetensors in the original
(SGM) layout, with this project's diffusers -> original key map (scripts/make_single_file_fixture.py),
beside a diffusers config folder (configs and tokenizers, no weights), then times diffusers'
`StableDiffusionXLPipeline.from_single_file(...).to("cuda")` on it (warm page cache, twice).
`scripts/bench-single-file-load.sh` times Atelier's load of the same file in the same call.

    python scripts/bench_single_file_load.py OUT_DIR      -> OUT_DIR/sdxl.safetensors, OUT_DIR/config
"""

import gc
import json
import sys
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.utils import is_accelerate_available
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_single_file_fixture import clip_to_ldm, open_clip_to_ldm, unet_to_ldm, vae_to_ldm  # noqa: E402

VOCAB = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "sd1" / "model" / "tokenizer"


def main():
    out = Path(sys.argv[1])
    config = out / "config"
    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet2DConditionModel(
            sample_size=128, cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
            block_out_channels=(320, 640, 1280), layers_per_block=2, use_linear_projection=True,
            transformer_layers_per_block=(1, 2, 10), addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")).half()
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=2, sample_size=1024, scaling_factor=0.13025, force_upcast=True).half()
        clip_l = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)).half()
        big_g = CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)).half()
    state = unet_to_ldm(unet.state_dict(), unet.config)
    state.update(vae_to_ldm(vae.state_dict(), "first_stage_model."))
    state.update(clip_to_ldm(clip_l.state_dict(), "conditioner.embedders.0.transformer."))
    state.update(open_clip_to_ldm(big_g.state_dict(), "conditioner.embedders.1.model."))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "sdxl.safetensors"
    save_file({k: v.detach().to("cpu", torch.float16).contiguous() for k, v in state.items()}, path)
    print(f"wrote {path}: {path.stat().st_size / 1e9:.2f} GB, {len(state)} tensors")

    unet.save_config(config / "unet")
    vae.save_config(config / "vae")
    clip_l.config.save_pretrained(config / "text_encoder")
    big_g.config.save_pretrained(config / "text_encoder_2")
    for folder, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        CLIPTokenizer(vocab=str(VOCAB / "vocab.json"), merges=str(VOCAB / "merges.txt"), pad_token=pad,
                      model_max_length=77).save_pretrained(config / folder)
    EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                           timestep_spacing="leading").save_config(config / "scheduler")
    (config / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.42.1",
        "force_zeros_for_empty_prompt": True, "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}))
    del unet, vae, clip_l, big_g, state
    gc.collect()
    torch.cuda.empty_cache()

    print("accelerate available:", is_accelerate_available())
    for attempt in range(2):
        torch.cuda.synchronize()
        started = time.perf_counter()
        pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=str(config), torch_dtype=torch.float16,
                                                          local_files_only=True).to("cuda")
        torch.cuda.synchronize()
        print(f"diffusers from_single_file + to(cuda), run {attempt + 1}: {time.perf_counter() - started:.2f} s")
        del pipe
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
