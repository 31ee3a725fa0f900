"""Tiny LoRA/LyCORIS files for the fixture models and what diffusers computes with them, for
tests/headless/lora.rs.

Files (tests/fixtures/lora/), seeded random weights, rank 4:
  sd1-kohya.safetensors   kohya/A1111 names (`lora_unet_<diffusers path>`, `lora_te_`), `alpha`,
                          attention and feed-forward linears, 1x1-conv proj_in/proj_out, conv LoRA
                          (LoCon) on the resnets' 3x3 conv1, text encoder attention and MLP.
  sd1-peft.safetensors    diffusers/PEFT names (`unet.<path>.lora_A.weight` / `lora_B.weight`),
                          no alpha (scale 1), UNet attention only.
  sd1-loha.safetensors    LyCORIS LoHa (`hada_w1_a` ...), `alpha`, attention linears.
  sd1-lokr.safetensors    LyCORIS LoKr (`lokr_w1` whole, `lokr_w2_a`/`lokr_w2_b`), `alpha`.
  sdxl-kohya.safetensors  kohya SDXL: the UNet in the original (SGM) layout
                          (`lora_unet_input_blocks_4_1_...`), `lora_te1_` and `lora_te2_`.

Reference runs (float32, Euler, 6 steps, 32x32, from recorded noise; one run with two LoRAs, one
of them negative): each file's definition merged into the diffusers pipeline's weights by this
script (kohya/PEFT `up @ down * alpha / rank`; LoHa `(w1a w1b) * (w2a w2b) * alpha / rank`; LoKr
`kron(w1, w2a w2b) * alpha / rank`). For the kohya (SD 1.x and SGM-named SDXL) and PEFT files,
the script first checks that diffusers' own `load_lora_weights` + `set_adapters` gives the same
latents as that merge on the UNet (diffusers 0.42.1 with transformers 5 drops kohya text-encoder
attention LoRAs, so the text encoders are checked against the definition only); diffusers does
not load LoHa or LoKr. Needs torch, transformers, diffusers 0.42.1 and peft:
    python scripts/make_lora_fixture.py OUT_DIR
"""

import json
import sys
from pathlib import Path

import diffusers
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_single_file_fixture import unet_to_ldm  # noqa: E402

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
PROMPT = "a red fox in the snow, highly detailed"
NEGATIVE = "blurry, lowres"
RANK = 4


def modules(model, kinds, names):
    found = []
    for name, module in model.named_modules():
        if isinstance(module, kinds) and any(name.endswith(n) for n in names):
            found.append((name, module))
    return found


def low_rank(module, gen, conv_rank_kernel=True):
    weight = module.weight
    out_features, in_features = weight.shape[:2]
    if weight.dim() == 4:
        k = weight.shape[2] if conv_rank_kernel else 1
        down = 0.1 * torch.randn(RANK, in_features, k, k, generator=gen)
        up = 0.1 * torch.randn(out_features, RANK, 1, 1, generator=gen)
    else:
        down = 0.1 * torch.randn(RANK, in_features, generator=gen)
        up = 0.1 * torch.randn(out_features, RANK, generator=gen)
    return down, up


def te_path(name):
    """transformers >= 5.6 flattens CLIPTextModel; LoRA files name the `text_model.` level."""
    return name if name.startswith("text_model.") else "text_model." + name


def lora_delta(down, up, scale, shape):
    """kohya's definition: up @ down (a 3x3 conv down composed with a 1x1 up), times alpha / rank."""
    return (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(shape) * scale


def add_lora(state, deltas, component, name, module, key, gen, alpha, down_key, up_key):
    down, up = low_rank(module, gen)
    state[key + down_key], state[key + up_key] = down, up
    if alpha is not None:
        state[key + ".alpha"] = torch.tensor(alpha)
    deltas[(component, name)] = lora_delta(down, up, (alpha or RANK) / RANK, module.weight.shape)


def kohya_sd1(pipe, gen):
    state, deltas = {}, {}
    unet_linear = modules(pipe.unet, torch.nn.Linear, ("to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "ff.net.0.proj"))
    unet_conv = modules(pipe.unet, torch.nn.Conv2d, ("proj_in", "proj_out", "conv1"))
    for name, module in unet_linear + unet_conv:
        add_lora(state, deltas, "unet", name, module, "lora_unet_" + name.replace(".", "_"), gen, 2.0,
                 ".lora_down.weight", ".lora_up.weight")
    for name, module in modules(pipe.text_encoder, torch.nn.Linear, ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")):
        add_lora(state, deltas, "text_encoder", name, module, "lora_te_" + te_path(name).replace(".", "_"), gen, 1.0,
                 ".lora_down.weight", ".lora_up.weight")
    return state, deltas


def peft_sd1(pipe, gen):
    state, deltas = {}, {}
    for name, module in modules(pipe.unet, torch.nn.Linear, ("to_q", "to_k", "to_v", "to_out.0")):
        add_lora(state, deltas, "unet", name, module, f"unet.{name}", gen, None, ".lora_A.weight", ".lora_B.weight")
    return state, deltas


def loha_sd1(pipe, gen):
    state, deltas = {}, {}
    for name, module in modules(pipe.unet, torch.nn.Linear, ("to_q", "to_k", "to_v", "to_out.0")):
        out_features, in_features = module.weight.shape
        key = "lora_unet_" + name.replace(".", "_")
        w1a, w2a = (0.3 * torch.randn(out_features, RANK, generator=gen) for _ in range(2))
        w1b, w2b = (0.3 * torch.randn(RANK, in_features, generator=gen) for _ in range(2))
        alpha = 2.0
        state.update({key + ".hada_w1_a": w1a, key + ".hada_w1_b": w1b, key + ".hada_w2_a": w2a,
                      key + ".hada_w2_b": w2b, key + ".alpha": torch.tensor(alpha)})
        deltas[("unet", name)] = (w1a @ w1b) * (w2a @ w2b) * (alpha / RANK)
    return state, deltas


def lokr_sd1(pipe, gen):
    state, deltas = {}, {}
    for name, module in modules(pipe.unet, torch.nn.Linear, ("to_q", "to_v", "to_out.0")):
        out_features, in_features = module.weight.shape
        key = "lora_unet_" + name.replace(".", "_")
        a, c = 2, 2  # the small factor (a, c); the big one (out / a, in / c) as a low-rank product
        w1 = 0.5 * torch.randn(a, c, generator=gen)
        w2a = 0.3 * torch.randn(out_features // a, RANK, generator=gen)
        w2b = 0.3 * torch.randn(RANK, in_features // c, generator=gen)
        alpha = 3.0
        state.update({key + ".lokr_w1": w1, key + ".lokr_w2_a": w2a, key + ".lokr_w2_b": w2b,
                      key + ".alpha": torch.tensor(alpha)})
        deltas[("unet", name)] = torch.kron(w1, w2a @ w2b) * (alpha / RANK)
    return state, deltas


def kohya_sdxl(pipe, gen):
    state, deltas = {}, {}
    found = modules(pipe.unet, torch.nn.Linear, ("to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "proj_in", "proj_out"))
    found += modules(pipe.unet, torch.nn.Conv2d, ("conv1",))
    for name, module in found:
        original = next(iter(unet_to_ldm({name + ".weight": None}, pipe.unet.config)))
        sgm = original[len("model.diffusion_model."):-len(".weight")]
        add_lora(state, deltas, "unet", name, module, "lora_unet_" + sgm.replace(".", "_"), gen, 2.0,
                 ".lora_down.weight", ".lora_up.weight")
    for prefix, component in (("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2")):
        for name, module in modules(getattr(pipe, component), torch.nn.Linear, ("q_proj", "v_proj", "fc1")):
            add_lora(state, deltas, component, name, module, prefix + te_path(name).replace(".", "_"), gen, None,
                     ".lora_down.weight", ".lora_up.weight")
    return state, deltas


def merge(pipe, deltas, weight, only_unet=False):
    """Adds each delta, times `weight`, to the module it belongs to."""
    for (component, name), delta in deltas.items():
        if only_unet and component != "unet":
            continue
        dict(getattr(pipe, component).named_modules())[name].weight += weight * delta


def check_against_diffusers(load, file, deltas, weight, noise):
    """diffusers' own load_lora_weights on the file's UNet part gives what this script's merge
    gives: the key names and scales above are diffusers' (its kohya text-encoder conversion drops
    attention LoRAs with transformers 5, so the text encoders are merged by the definition only)."""
    pipe = load()
    from safetensors.torch import load_file
    unet_only = {k: v for k, v in load_file(file).items() if k.startswith(("lora_unet_", "unet."))}
    pipe.load_lora_weights(unet_only, adapter_name="check")
    pipe.set_adapters(["check"], [weight])
    theirs = run(pipe, noise)
    pipe = load()
    merge(pipe, deltas, weight, only_unet=True)
    ours = run(pipe, noise)
    error = ((theirs - ours).abs().max() / theirs.abs().max()).item()
    assert error < 1e-4, f"{file}: diffusers' load_lora_weights differs from the merge by {error}"
    print(f"{Path(file).name}: diffusers' load_lora_weights and the merge agree to {error:.1e}")


def run(pipe, noise):
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=6, guidance_scale=6.0,
                    width=32, height=32, latents=noise.clone(), output_type="latent").images.float().contiguous()


def main():
    out = Path(sys.argv[1]) / "lora"
    out.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    tensors, runs = {}, []
    gen = torch.Generator().manual_seed(70)

    def load_sd1():
        pipe = StableDiffusionPipeline.from_pretrained(FIXTURES / "sd1" / "model", torch_dtype=torch.float32,
                                                       safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    base = load_sd1()
    kohya, kohya_deltas = kohya_sd1(base, gen)
    peft, peft_deltas = peft_sd1(base, gen)
    loha, loha_deltas = loha_sd1(base, gen)
    lokr, lokr_deltas = lokr_sd1(base, gen)
    files = {"sd1-kohya": (kohya, kohya_deltas), "sd1-peft": (peft, peft_deltas), "sd1-loha": (loha, loha_deltas),
             "sd1-lokr": (lokr, lokr_deltas)}
    for name, (state, _) in files.items():
        save_file({k: v.contiguous() for k, v in state.items()}, out / f"{name}.safetensors")

    noise = torch.randn(1, 4, 16, 16, generator=gen)
    tensors["sd1_noise"] = noise
    tensors["sd1_plain"] = run(base, noise)
    for name in ("sd1-kohya", "sd1-peft"):
        check_against_diffusers(load_sd1, str(out / f"{name}.safetensors"), files[name][1], 0.8, noise)

    for key, adapters in (("sd1_kohya", [("sd1-kohya", 0.8)]),
                          ("sd1_kohya_peft", [("sd1-kohya", 0.8), ("sd1-peft", -0.5)]),
                          ("sd1_loha", [("sd1-loha", 1.0)]),
                          ("sd1_lokr", [("sd1-lokr", 0.6)])):
        pipe = load_sd1()
        for adapter, weight in adapters:
            merge(pipe, files[adapter][1], weight)
        tensors[f"{key}_latents"] = run(pipe, noise)
        runs.append({"key": key, "model": "sd1", "loras": [{"file": f"{a}.safetensors", "weight": w} for a, w in adapters]})

    def load_sdxl():
        pipe = StableDiffusionXLPipeline.from_pretrained(FIXTURES / "sdxl" / "model", torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    sdxl = load_sdxl()
    sdxl_state, sdxl_deltas = kohya_sdxl(sdxl, gen)
    save_file({k: v.contiguous() for k, v in sdxl_state.items()}, out / "sdxl-kohya.safetensors")
    noise = torch.randn(1, 4, 8, 8, generator=gen)
    tensors["sdxl_noise"] = noise
    check_against_diffusers(load_sdxl, str(out / "sdxl-kohya.safetensors"), sdxl_deltas, 0.7, noise)
    merge(sdxl, sdxl_deltas, 0.7)
    tensors["sdxl_kohya_latents"] = run(sdxl, noise)
    runs.append({"key": "sdxl_kohya", "model": "sdxl", "loras": [{"file": "sdxl-kohya.safetensors", "weight": 0.7}]})

    save_file(tensors, out / "expected.safetensors")
    meta = {"diffusers": diffusers.__version__, "prompt": PROMPT, "negative_prompt": NEGATIVE, "steps": 6,
            "guidance": 6.0, "width": 32, "height": 32, "sampler": "euler", "runs": runs}
    (out / "expected.json").write_text(json.dumps(meta, indent=1))
    print(len(runs), "runs;", sorted((p.name, p.stat().st_size) for p in out.iterdir()))


if __name__ == "__main__":
    main()
