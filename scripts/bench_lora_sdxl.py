"""Two full-size SDXL LoRAs with random weights in kohya's format (SGM-named UNet, lora_te1_ and
lora_te2_ text encoders, rank 32, f16: attention, feed-forward and projection linears), for
`scripts/bench-lora.sh`, which times merging them into the random-weight SDXL single file that
`scripts/bench_single_file_load.py` writes, and the UNet's speed with them on.

    python scripts/bench_lora_sdxl.py OUT_DIR      -> OUT_DIR/style-a.safetensors, style-b.safetensors
"""

import sys
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_single_file_fixture import unet_to_ldm  # noqa: E402

RANK = 32
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=128, cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
            block_out_channels=(320, 640, 1280), layers_per_block=2, use_linear_projection=True,
            transformer_layers_per_block=(1, 2, 10), addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
        clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                              num_attention_heads=12, hidden_act="quick_gelu"))
        big_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                           num_hidden_layers=32, num_attention_heads=20,
                                                           hidden_act="gelu", projection_dim=1280))
    for seed, name in ((1, "style-a"), (2, "style-b")):
        gen = torch.Generator().manual_seed(seed)
        state = {}

        def add(key, module):
            out_features, in_features = module.weight.shape[:2]
            state[key + ".lora_down.weight"] = (0.01 * torch.randn(RANK, in_features, generator=gen)).half()
            state[key + ".lora_up.weight"] = (0.01 * torch.randn(out_features, RANK, generator=gen)).half()
            state[key + ".alpha"] = torch.tensor(float(RANK // 2)).half()

        for module_name, module in unet.named_modules():
            if isinstance(module, torch.nn.Linear) and module_name.endswith(UNET_TARGETS):
                original = next(iter(unet_to_ldm({module_name + ".weight": None}, unet.config)))
                add("lora_unet_" + original[len("model.diffusion_model."):-len(".weight")].replace(".", "_"), module)
        for prefix, encoder in (("lora_te1_", clip_l), ("lora_te2_", big_g)):
            for module_name, module in encoder.named_modules():
                if isinstance(module, torch.nn.Linear) and module_name.endswith(TE_TARGETS):
                    path = module_name if module_name.startswith("text_model.") else "text_model." + module_name
                    add(prefix + path.replace(".", "_"), module)
        save_file(state, out / f"{name}.safetensors")
        size = (out / f"{name}.safetensors").stat().st_size / 1e6
        print(f"{name}: {len(state) // 3} modules, {size:.0f} MB")


if __name__ == "__main__":
    main()
