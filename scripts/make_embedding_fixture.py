"""Tiny textual inversion embeddings for the fixture models and what diffusers'
`load_textual_inversion` computes with them, for tests/headless/embeddings.rs.

Files (tests/fixtures/embeddings/), seeded random vectors:
  inkStyle.safetensors     kohya's `emb_params`, 2 vectors, for the SD 1.x fixture.
  softFocus.safetensors    diffusers' single `{"<token>": vectors}`, 1 vector, SD 1.x.
  xlGlow.safetensors       SDXL's `clip_l` / `clip_g`, 3 vectors each.

Runs (float32, Euler, 6 steps, 32x32, from recorded noise): the word in the prompt and in the
negative prompt. A multi-vector embedding takes one token position per vector (A1111; diffusers
means to, with `word word_1 ...`, but with transformers 5 its `maybe_convert_prompt` no longer
expands the word and only the first vector is read), so this script writes the expansion into
the prompts it gives diffusers itself, and checks the token ids. Needs torch, transformers, diffusers 0.42.1:
    python scripts/make_embedding_fixture.py OUT_DIR
"""

import json
import re
import sys
from pathlib import Path

import diffusers
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"


VECTORS = {"inkStyle": 2, "softFocus": 1, "xlGlow": 3}


def expand(prompt):
    """`word` -> `word word_1 ...` for every multi-vector embedding (diffusers' own convention)."""
    words = []
    for word in prompt.split(" "):
        bare = word.strip(",")
        if VECTORS.get(bare, 1) > 1:
            word = word.replace(bare, " ".join([bare] + [f"{bare}_{i}" for i in range(1, VECTORS[bare])]))
        words.append(word)
    return " ".join(words)


def run(pipe, prompt, negative, noise):
    for text in (prompt, negative):
        ids = pipe.tokenizer(expand(text)).input_ids
        expected = sum(VECTORS[w] * len(re.findall(rf"\b{w}\b", text)) for w in VECTORS)
        assert sum(i >= 49408 for i in ids) == expected, (text, ids)
    prompt, negative = expand(prompt), expand(negative)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        return pipe(prompt=prompt, negative_prompt=negative, num_inference_steps=6, guidance_scale=6.0, width=32,
                    height=32, latents=noise.clone(), output_type="latent").images.float().contiguous()


def main():
    out = Path(sys.argv[1]) / "embeddings"
    out.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    gen = torch.Generator().manual_seed(90)
    tensors, runs = {}, []

    sd1 = StableDiffusionPipeline.from_pretrained(FIXTURES / "sd1" / "model", torch_dtype=torch.float32,
                                                  safety_checker=None, requires_safety_checker=False)
    sd1.set_progress_bar_config(disable=True)
    width = sd1.text_encoder.config.hidden_size
    ink = 0.5 * torch.randn(2, width, generator=gen)
    soft = 0.5 * torch.randn(width, generator=gen)
    save_file({"emb_params": ink}, out / "inkStyle.safetensors")
    save_file({"<soft-focus>": soft}, out / "softFocus.safetensors")
    sd1.load_textual_inversion(ink, token="inkStyle", text_encoder=sd1.text_encoder, tokenizer=sd1.tokenizer)
    sd1.load_textual_inversion(soft.unsqueeze(0), token="softFocus", text_encoder=sd1.text_encoder,
                               tokenizer=sd1.tokenizer)
    noise = torch.randn(1, 4, 16, 16, generator=gen)
    tensors["sd1_noise"] = noise
    for key, prompt, negative in (("sd1_ink", "a fox, inkStyle, in the snow", "blurry"),
                                  ("sd1_both", "softFocus portrait of a fox inkStyle", "lowres, inkStyle")):
        tensors[f"{key}_latents"] = run(sd1, prompt, negative, noise)
        runs.append({"key": key, "model": "sd1", "prompt": prompt, "negative_prompt": negative})

    sdxl = StableDiffusionXLPipeline.from_pretrained(FIXTURES / "sdxl" / "model", torch_dtype=torch.float32)
    sdxl.set_progress_bar_config(disable=True)
    clip_l = 0.5 * torch.randn(3, sdxl.text_encoder.config.hidden_size, generator=gen)
    clip_g = 0.5 * torch.randn(3, sdxl.text_encoder_2.config.hidden_size, generator=gen)
    save_file({"clip_l": clip_l, "clip_g": clip_g}, out / "xlGlow.safetensors")
    sdxl.load_textual_inversion(clip_l, token="xlGlow", text_encoder=sdxl.text_encoder, tokenizer=sdxl.tokenizer)
    sdxl.load_textual_inversion(clip_g, token="xlGlow", text_encoder=sdxl.text_encoder_2,
                                tokenizer=sdxl.tokenizer_2)
    noise = torch.randn(1, 4, 8, 8, generator=gen)
    tensors["sdxl_noise"] = noise
    prompt, negative = "xlGlow, a fox in the snow", "blurry"
    tensors["sdxl_glow_latents"] = run(sdxl, prompt, negative, noise)
    runs.append({"key": "sdxl_glow", "model": "sdxl", "prompt": prompt, "negative_prompt": negative})

    save_file(tensors, out / "expected.safetensors")
    (out / "expected.json").write_text(json.dumps({"diffusers": diffusers.__version__, "runs": runs}, indent=1))
    print(len(runs), "runs;", sorted((p.name, p.stat().st_size) for p in out.iterdir()))


if __name__ == "__main__":
    main()
