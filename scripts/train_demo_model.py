#!/usr/bin/env python3
"""Train "Atelier Shapes", the small text-to-image model that ships inside Atelier.

A real Stable Diffusion pipeline in the diffusers layout (CLIP text encoder with the real BPE
tokenizer, a UNet with cross-attention, an AutoencoderKL, a scheduler config), trained from scratch
on the procedural pictures of scripts/shapes_data.py. Seeded; runs in chunks of a few minutes,
the state carried from one run to the next (the GPU machine lends at most 10 minutes a call):

    python3 scripts/train_demo_model.py train --state STATE --minutes 8     # again until done
    python3 scripts/train_demo_model.py export --state STATE --out assets/atelier-shapes
    python3 scripts/train_demo_model.py samples --model assets/atelier-shapes --out DIR
    python3 scripts/train_demo_model.py plot --model assets/atelier-shapes --out screenshots/shapes-loss.png

`train` first trains the autoencoder (--vae-steps), then the UNet and the text encoder together
(--unet-steps, 10 % empty captions for classifier-free guidance, offset noise); each run ends with a
grid of validation samples (`samples.png`) and the loss log in STATE/progress.json. The state keeps
the weights and their moving averages in float16 (the optimiser restarts with a short warm-up).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes_data  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SIZE = 128
SEED = 20261129


def bytes_to_unicode():
    """GPT-2's byte-to-character table, which CLIP's BPE vocabulary is written in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_tokenizer(folder: Path):
    """The CLIP tokenizer with the real BPE vocabulary (the one Atelier bundles)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    merges = gzip.open(REPO / "assets/clip/bpe_simple_vocab_16e6.txt.gz").read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in merges[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tokenizer = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"),
                              pad_token="<|endoftext|>", model_max_length=77)
    ids = tokenizer("a red circle").input_ids
    assert ids == [49406, 320, 736, 7117, 49407], ids  # the real vocabulary, not a stub
    return tokenizer


def build_models():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(SEED)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=16, sample_size=SIZE, scaling_factor=1.0,
    )
    unet = UNet2DConditionModel(
        sample_size=SIZE // 4, in_channels=4, out_channels=4, block_out_channels=(64, 96, 96), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=4, norm_num_groups=16,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407, projection_dim=64,
    ))
    return vae, unet, text_encoder


def noise_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         clip_sample=False, steps_offset=1)


def inference_scheduler():
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")


class Scenes(torch.utils.data.IterableDataset):
    """Endless batches of (drawing parameters, token ids, captions), made by loader workers."""

    def __init__(self, batch: int, tokenizer, seed: int, empty_caption_rate: float):
        self.batch = batch
        self.tokenizer = tokenizer
        self.seed = seed
        self.empty_caption_rate = empty_caption_rate
        self.word_ids: dict[str, list[int]] = {}

    def token_ids(self, captions: list[str]) -> torch.Tensor:
        """Token ids as the tokenizer gives them, faster: CLIP's BPE works word by word, and the
        captions are lowercase words separated by spaces, so each word is tokenized once."""
        ids = torch.full((len(captions), 77), 49407, dtype=torch.long)
        for row, text in enumerate(captions):
            tokens = [49406]
            for word in text.split():
                if word not in self.word_ids:
                    self.word_ids[word] = self.tokenizer(word, add_special_tokens=False).input_ids
                tokens += self.word_ids[word]
            tokens = tokens[:76] + [49407]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        rng = random.Random(self.seed * 1000 + worker)
        gen = torch.Generator().manual_seed(self.seed * 1000 + worker)
        while True:
            scenes = [shapes_data.random_scene(rng) for _ in range(self.batch)]
            captions = ["" if rng.random() < self.empty_caption_rate else s.caption for s in scenes]
            ids = self.token_ids(captions)
            yield shapes_data.scene_params(scenes, gen), ids, captions


def loader(batch: int, tokenizer, seed: int, empty_caption_rate: float = 0.0, workers: int = 12):
    dataset = Scenes(batch, tokenizer, seed, empty_caption_rate)
    rng = random.Random(seed)
    captions = [shapes_data.random_scene(rng).caption for _ in range(64)] + [""]
    expected = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(dataset.token_ids(captions), expected.input_ids), "word-by-word token ids differ"
    return iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=4,
                                            persistent_workers=False, worker_init_fn=one_thread))


def one_thread(_worker: int):
    torch.set_num_threads(1)


def save_half(module: torch.nn.Module, path: Path):
    save_file({k: v.detach().to(torch.float16).contiguous().cpu() for k, v in module.state_dict().items()}, str(path))


def load_into(module: torch.nn.Module, path: Path):
    state = load_file(str(path))
    module.load_state_dict({k: v.float() for k, v in state.items()})


def lr_at(step: int, total: int, peak: float, warmup_from: int, warmup: int = 300) -> float:
    cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    ramp = min(1.0, (step - warmup_from + 1) / warmup)
    return peak * cosine * ramp


def train_vae(vae, state: dict, args, device, deadline: float, tokenizer, log):
    vae.train()
    optimiser = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    batches = loader(args.vae_batch, tokenizer, SEED + state["vae_step"])
    start = state["vae_step"]
    running = []
    while state["vae_step"] < args.vae_steps and time.time() < deadline:
        params, _, _ = next(batches)
        pictures = shapes_data.render_params(params, SIZE, device)
        for group in optimiser.param_groups:
            group["lr"] = lr_at(state["vae_step"], args.vae_steps, args.vae_lr, start, 100)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            posterior = vae.encode(pictures).latent_dist
            latents = posterior.sample()
            decoded = vae.decode(latents).sample
        decoded = decoded.float()
        reconstruction = F.l1_loss(decoded, pictures) + F.mse_loss(decoded, pictures)
        kl = posterior.kl().mean() / (latents[0].numel())
        loss = reconstruction + args.vae_kl * kl
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimiser.step()
        running.append(reconstruction.item())
        state["vae_step"] += 1
        if state["vae_step"] % 100 == 0:
            state["vae_log"].append([state["vae_step"], sum(running) / len(running)])
            log(f"vae step {state['vae_step']}: reconstruction {state['vae_log'][-1][1]:.4f}")
            running = []
    vae.eval()


@torch.no_grad()
def latent_scale(vae, tokenizer, device) -> float:
    batches = loader(256, tokenizer, SEED + 77, workers=2)
    values = []
    for _ in range(8):
        params, _, _ = next(batches)
        pictures = shapes_data.render_params(params, SIZE, device)
        values.append(vae.encode(pictures).latent_dist.sample().float().flatten())
    return float(1.0 / torch.cat(values).std())


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float):
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def train_unet(vae, unet, text_encoder, unet_ema, text_ema, state: dict, args, device, deadline, tokenizer, log):
    scheduler = noise_scheduler()
    alphas = scheduler.alphas_cumprod.to(device)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimiser = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=0.01, betas=(0.9, 0.99),
                                  fused=device.type == "cuda")
    batches = loader(args.unet_batch, tokenizer, SEED + 1 + state["unet_step"], empty_caption_rate=0.1)
    start = state["unet_step"]
    scale = state["latent_scale"]
    unet.train()
    text_encoder.train()
    running = []
    gen = torch.Generator(device=device).manual_seed(SEED + state["unet_step"])
    while state["unet_step"] < args.unet_steps and time.time() < deadline:
        drawing, ids, _ = next(batches)
        with torch.no_grad():
            pictures = shapes_data.render_params(drawing, SIZE, device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                latents = vae.encode(pictures).latent_dist.sample(generator=gen).float() * scale
        batch = latents.shape[0]
        noise = torch.randn(latents.shape, generator=gen, device=device)
        noise += args.offset_noise * torch.randn((batch, latents.shape[1], 1, 1), generator=gen, device=device)
        timesteps = torch.randint(0, 1000, (batch,), generator=gen, device=device)
        a = alphas[timesteps].sqrt()[:, None, None, None]
        s = (1 - alphas[timesteps]).sqrt()[:, None, None, None]
        noisy = a * latents + s * noise
        for group in optimiser.param_groups:
            group["lr"] = lr_at(state["unet_step"], args.unet_steps, args.unet_lr, start)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            context = text_encoder(ids.to(device)).last_hidden_state
            predicted = unet(noisy, timesteps, encoder_hidden_states=context).sample
        loss = F.mse_loss(predicted.float(), noise)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        state["unet_step"] += 1
        decay = min(args.ema, (1 + state["unet_step"]) / (10 + state["unet_step"]))
        ema_update(unet_ema, unet, decay)
        ema_update(text_ema, text_encoder, decay)
        running.append(loss.item() if state["unet_step"] % 10 == 0 else None)
        if state["unet_step"] % 200 == 0:
            values = [v for v in running if v is not None]
            state["unet_log"].append([state["unet_step"], sum(values) / max(1, len(values))])
            log(f"unet step {state['unet_step']}: loss {state['unet_log'][-1][1]:.4f} "
                f"lr {optimiser.param_groups[0]['lr']:.2e}")
            running = []


def pipeline(vae, unet, text_encoder, tokenizer):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=inference_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@torch.no_grad()
def sample_grid(pipe, prompts: list[dict], path: Path, device, steps=20, guidance=5.0):
    from PIL import Image

    images = []
    for entry in prompts:
        gen = torch.Generator(device="cpu").manual_seed(entry["seed"])
        latents = torch.randn((1, 4, SIZE // 4, SIZE // 4), generator=gen).to(device)
        out = pipe(entry["prompt"], num_inference_steps=steps, guidance_scale=guidance, latents=latents,
                   height=SIZE, width=SIZE, output_type="pil")
        images.append(out.images[0])
    columns = 8
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * SIZE, rows * SIZE))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * SIZE, (i // columns) * SIZE))
    grid.save(path)
    return images


def train(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    started = time.time()
    deadline = started + args.minutes * 60
    state_dir = Path(args.state)
    state_dir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else state_dir
    out.mkdir(parents=True, exist_ok=True)
    log_lines = []

    def log(text):
        line = f"[{time.time() - started:6.1f}s] {text}"
        print(line, flush=True)
        log_lines.append(line)

    tokenizer = clip_tokenizer(Path(tempfile.mkdtemp()) / "tokenizer")
    vae, unet, text_encoder = build_models()
    progress_path = state_dir / "progress.json"
    state = json.loads(progress_path.read_text()) if progress_path.exists() else {
        "vae_step": 0, "unet_step": 0, "vae_log": [], "unet_log": [], "latent_scale": None, "seconds": [],
    }
    unet_ema = build_models()[1]
    text_ema = build_models()[2]
    for module, name in [(vae, "vae"), (unet, "unet"), (text_encoder, "text_encoder"), (unet_ema, "unet_ema"),
                         (text_ema, "text_encoder_ema")]:
        path = state_dir / f"{name}.safetensors"
        if path.exists():
            load_into(module, path)
    if not (state_dir / "unet_ema.safetensors").exists():
        unet_ema.load_state_dict(unet.state_dict())
        text_ema.load_state_dict(text_encoder.state_dict())
    for module in (vae, unet, text_encoder, unet_ema, text_ema):
        module.to(device)
    log(f"device {device}; vae step {state['vae_step']}, unet step {state['unet_step']}")

    if state["vae_step"] < args.vae_steps:
        train_vae(vae, state, args, device, deadline, tokenizer, log)
    vae.eval()
    if state["vae_step"] >= args.vae_steps and state["latent_scale"] is None:
        state["latent_scale"] = latent_scale(vae, tokenizer, device)
        log(f"latent scale {state['latent_scale']:.4f}")
    if state["latent_scale"] is not None and state["unet_step"] < args.unet_steps:
        train_unet(vae, unet, text_encoder, unet_ema, text_ema, state, args, device, deadline, tokenizer, log)

    state["seconds"].append(round(time.time() - started, 1))
    save_half(vae, state_dir / "vae.safetensors")
    for module, name in [(unet, "unet"), (text_encoder, "text_encoder"), (unet_ema, "unet_ema"),
                         (text_ema, "text_encoder_ema")]:
        save_half(module, state_dir / f"{name}.safetensors")
    progress_path.write_text(json.dumps(state))
    log(f"saved at vae step {state['vae_step']}, unet step {state['unet_step']}")

    if state["latent_scale"] is not None and state["unet_step"] > 0:
        vae.config.scaling_factor = state["latent_scale"]
        vae.register_to_config(scaling_factor=state["latent_scale"])
        pipe = pipeline(vae, unet_ema.eval(), text_ema.eval(), tokenizer).to(device)
        pipe.set_progress_bar_config(disable=True)
        sample_grid(pipe, shapes_data.validation_prompts()[:32], out / "samples.png", device)
        log("samples.png written")
    (out / "train.log").write_text("\n".join(log_lines) + "\n")


def export(args):
    state_dir = Path(args.state)
    state = json.loads((state_dir / "progress.json").read_text())
    tokenizer_folder = Path(tempfile.mkdtemp()) / "tokenizer"
    tokenizer = clip_tokenizer(tokenizer_folder)
    vae, unet, text_encoder = build_models()
    load_into(vae, state_dir / "vae.safetensors")
    load_into(unet, state_dir / "unet_ema.safetensors")
    load_into(text_encoder, state_dir / "text_encoder_ema.safetensors")
    vae.register_to_config(scaling_factor=round(state["latent_scale"], 5))
    pipe = pipeline(vae, unet, text_encoder, tokenizer)
    pipe.to(torch.float16)
    out = Path(args.out)
    pipe.save_pretrained(out, safe_serialization=True)
    # vocab.json + merges.txt (1.6 MB) rather than transformers 5's tokenizer.json (3.6 MB): both
    # diffusers and Atelier read them.
    (out / "tokenizer/tokenizer.json").unlink(missing_ok=True)
    for name in ("vocab.json", "merges.txt"):
        (out / "tokenizer" / name).write_bytes((tokenizer_folder / name).read_bytes())
    (out / "training.json").write_text(json.dumps({
        "name": "Atelier Shapes",
        "trained_by": "scripts/train_demo_model.py",
        "seed": SEED,
        "size": SIZE,
        "vae_steps": state["vae_step"],
        "unet_steps": state["unet_step"],
        "latent_scale": state["latent_scale"],
        "run_seconds": state["seconds"],
        "vae_log": state["vae_log"],
        "unet_log": state["unet_log"],
    }, indent=1) + "\n")
    print(f"exported to {out}")


def samples(args):
    """Diffusers' pictures of the validation prompts (for the analyser: atelier shapes-check)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(args.model, torch_dtype=torch.float32, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = json.loads(Path(args.prompts).read_text())["prompts"]
    import numpy as np

    for index, entry in enumerate(prompts):
        # The initial latents are saved beside each picture, so that Atelier can start from the
        # same noise: atelier shapes-check --noise OUT --compare-with OUT.
        gen = torch.Generator(device="cpu").manual_seed(entry["seed"])
        latents = torch.randn((1, 4, SIZE // 4, SIZE // 4), generator=gen)
        np.save(out / f"{index:03}.npy", latents.numpy())
        prompt = "" if args.empty_prompt else entry["prompt"]
        image = pipe(prompt, num_inference_steps=args.steps, guidance_scale=args.guidance, latents=latents,
                     height=SIZE, width=SIZE).images[0]
        image.save(out / f"{index:03}.png")
    print(f"{len(prompts)} pictures in {out}")


def plot(args):
    """The loss curves of training.json as a PNG (PIL only): autoencoder, then UNet."""
    from PIL import Image, ImageDraw

    info = json.loads((Path(args.model) / "training.json").read_text())
    panels = [("autoencoder: L1 + L2 reconstruction", info["vae_log"]),
              ("UNet + text encoder: noise prediction MSE", info["unet_log"])]
    width, height, margin = 520, 300, 58
    image = Image.new("RGB", (width * len(panels), height), "white")
    draw = ImageDraw.Draw(image)
    for index, (title, log) in enumerate(panels):
        left = index * width + margin
        right = (index + 1) * width - 16
        top, bottom = 30, height - 40
        steps = [s for s, _ in log]
        values = [math.log10(v) for _, v in log]
        low, high = math.floor(min(values) * 2) / 2, math.ceil(max(values) * 2) / 2
        x = lambda step: left + (right - left) * (step - steps[0]) / max(1, steps[-1] - steps[0])  # noqa: E731
        y = lambda value: bottom - (bottom - top) * (value - low) / max(1e-9, high - low)  # noqa: E731
        draw.rectangle([left, top, right, bottom], outline="black")
        draw.text((left, 8), title, fill="black")
        tick = low
        while tick <= high + 1e-9:
            draw.line([left - 4, y(tick), left, y(tick)], fill="black")
            draw.text((left - 50, y(tick) - 6), f"{10 ** tick:.3g}", fill="black")
            tick += 0.5
        for step in (steps[0], (steps[0] + steps[-1]) // 2, steps[-1]):
            draw.text((x(step) - 14, bottom + 6), str(step), fill="black")
        draw.text(((left + right) // 2 - 20, bottom + 22), "step", fill="black")
        draw.line([(x(s), y(v)) for s, v in zip(steps, values)], fill=(40, 90, 200), width=2)
    image.save(args.out)
    print(f"wrote {args.out}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    t = commands.add_parser("train")
    t.add_argument("--state", required=True)
    t.add_argument("--out")
    t.add_argument("--minutes", type=float, default=8.0)
    t.add_argument("--vae-steps", type=int, default=3000)
    t.add_argument("--vae-batch", type=int, default=48)
    t.add_argument("--vae-lr", type=float, default=4e-4)
    t.add_argument("--vae-kl", type=float, default=1e-4)
    t.add_argument("--unet-steps", type=int, default=30000)
    t.add_argument("--unet-batch", type=int, default=256)
    t.add_argument("--unet-lr", type=float, default=3e-4)
    t.add_argument("--offset-noise", type=float, default=0.05)
    t.add_argument("--ema", type=float, default=0.9995)
    e = commands.add_parser("export")
    e.add_argument("--state", required=True)
    e.add_argument("--out", required=True)
    s = commands.add_parser("samples")
    s.add_argument("--model", required=True)
    s.add_argument("--prompts", default=str(REPO / "assets/atelier-shapes-validation.json"))
    s.add_argument("--out", required=True)
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--guidance", type=float, default=5.0)
    s.add_argument("--empty-prompt", action="store_true")
    p = commands.add_parser("plot")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    args = parser.parse_args()
    {"train": train, "export": export, "samples": samples, "plot": plot}[args.command](args)


if __name__ == "__main__":
    main()
