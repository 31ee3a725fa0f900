"""Prompt embeddings as AUTOMATIC1111 computes them, on the fixture text encoders, for
tests/headless/prompts.rs.

A1111's algorithm written again here from its description (modules/prompt_parser.py's
attention grammar, modules/sd_hijack_clip.py's chunking with the default 20-token comma
backtrack, modules/sd_emphasis.py's "Original" emphasis) on top of transformers' CLIP: each
chunk is BOS + 75 tokens + EOS, padded with EOS (SD 2.x then pads after the first EOS with its
own pad token), encoded on its own; token weights multiply the hidden states and the chunk is
rescaled to its mean before weighting; chunks are concatenated. SD 1.x and 2.x take the last
hidden state (the diffusers SD 2.x encoder already ends at OpenCLIP's penultimate layer), SDXL
the penultimate of both encoders, and its pooled output from the first chunk.

Needs torch and transformers:
    python scripts/make_prompt_fixture.py [OUT_DIR]   (default: tests/fixtures)
"""

import json
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
CHUNK = 75
BACKTRACK = 20

PROMPTS = [
    "a red fox in the snow, highly detailed",
    "a (red:1.3) fox in the [snow], ((highly detailed))",
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
    "\\(literal brackets\\) and (unbalanced emphasis",
    "masterpiece, (red scarf:1.3), [blurry] BREAK snowy street",
    "fox BREAK BREAK owl",
    ", ".join(f"word{i} detail" for i in range(40)),
    "a " + " ".join(["fox"] * 150) + ", (snow:0.8)",
    "",
    "time: 5pm (clock: 1.5 ) end:1.2) [[faint]]",
]

# Prompts also encoded with clip skip 2 and 3 (SD 1.x; A1111 leaves SD 2.x and SDXL alone).
CLIP_SKIP_PROMPTS = [0, 1, 7]

# The attention grammar's tokens, tried in this order at every position.
LEXEME = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse(text):
    pieces, round_open, square_open = [], [], []

    def scale(start, factor):
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in LEXEME.finditer(text):
        lexeme, weight = match.group(0), match.group(1)
        if lexeme.startswith("\\"):
            pieces.append([lexeme[1:], 1.0])
        elif lexeme == "(":
            round_open.append(len(pieces))
        elif lexeme == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            scale(round_open.pop(), float(weight))
        elif lexeme == ")" and round_open:
            scale(round_open.pop(), 1.1)
        elif lexeme == "]" and square_open:
            scale(square_open.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(BREAK.split(lexeme)):
                if i > 0:
                    pieces.append(["BREAK", -1])
                pieces.append([part, 1.0])
    for start in round_open:
        scale(start, 1.1)
    for start in square_open:
        scale(start, 1 / 1.1)
    if not pieces:
        pieces = [["", 1.0]]
    merged = [pieces[0]]
    for piece in pieces[1:]:
        if piece[1] == merged[-1][1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return merged


def chunks(tokenizer, prompt):
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    comma = tokenizer.get_vocab().get(",</w>")
    done, tokens, weights, last_comma = [], [], [], -1

    def close():
        nonlocal tokens, weights, last_comma
        pad = CHUNK - len(tokens)
        done.append(([bos] + tokens + [eos] * pad + [eos], [1.0] + weights + [1.0] * pad + [1.0]))
        tokens, weights, last_comma = [], [], -1

    for text, weight in parse(prompt):
        if text == "BREAK" and weight == -1:
            close()
            continue
        for token in tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"]:
            if token == comma:
                last_comma = len(tokens)
            elif len(tokens) == CHUNK and last_comma != -1 and len(tokens) - last_comma <= BACKTRACK:
                moved, moved_weights = tokens[last_comma + 1:], weights[last_comma + 1:]
                tokens, weights = tokens[:last_comma + 1], weights[:last_comma + 1]
                close()
                tokens, weights = moved, moved_weights
            if len(tokens) == CHUNK:
                close()
            tokens.append(token)
            weights.append(weight)
    if tokens or not done:
        close()
    pad = tokenizer.pad_token_id
    if pad != eos:
        for ids, _ in done:
            end = ids.index(eos)
            ids[end + 1:] = [pad] * (len(ids) - end - 1)
    return done


def encode(encoder, tokenizer, prompt, penultimate, clip_skip=1):
    outputs, pooled = [], None
    for index, (ids, weights) in enumerate(chunks(tokenizer, prompt)):
        with torch.no_grad():
            out = encoder(torch.tensor([ids]), output_hidden_states=True)
        if penultimate:
            z = out.hidden_states[-2]
        elif clip_skip > 1:
            # A1111's "CLIP stop at last layers": that hidden state, then the final layer norm.
            final_norm = next(m for name, m in encoder.named_modules() if name.endswith("final_layer_norm"))
            z = final_norm(out.hidden_states[-clip_skip])
        else:
            z = out.last_hidden_state
        if index == 0 and hasattr(out, "text_embeds"):
            pooled = out.text_embeds
        before = z.mean()
        z = z * torch.tensor(weights).reshape(1, -1, 1)
        z = z * (before / z.mean())
        outputs.append(z)
    return torch.cat(outputs, dim=1), pooled


def main():
    tensors, meta = {}, {"prompts": PROMPTS, "families": {}}
    families = {
        "sd1": [("text_encoder", "tokenizer", CLIPTextModel)],
        "sd2": [("text_encoder", "tokenizer", CLIPTextModel)],
        "sdxl": [("text_encoder", "tokenizer", CLIPTextModel),
                 ("text_encoder_2", "tokenizer_2", CLIPTextModelWithProjection)],
    }
    for family, parts in families.items():
        model = FIXTURES / family / "model"
        variant = lambda enc: "fp16" if (model / enc / "model.fp16.safetensors").exists() else None
        loaded = [(cls.from_pretrained(model / enc, torch_dtype=torch.float32, variant=variant(enc)).eval(),
                   CLIPTokenizer.from_pretrained(model / tok)) for enc, tok, cls in parts]
        counts = []
        for i, prompt in enumerate(PROMPTS):
            contexts, pooled = [], None
            for encoder, tokenizer in loaded:
                z, p = encode(encoder, tokenizer, prompt, penultimate=family == "sdxl")
                contexts.append(z)
                pooled = p if p is not None else pooled
            tensors[f"{family}/{i}/context"] = torch.cat(contexts, dim=-1).contiguous()
            if family == "sdxl":
                tensors[f"{family}/{i}/pooled"] = pooled.contiguous()
            counts.append(len(chunks(loaded[0][1], prompt)))
            if family == "sd1" and i in CLIP_SKIP_PROMPTS:
                encoder, tokenizer = loaded[0]
                for skip in (2, 3):
                    z, _ = encode(encoder, tokenizer, prompt, penultimate=False, clip_skip=skip)
                    tensors[f"{family}/{i}/clip_skip_{skip}"] = z.contiguous()
        meta["families"][family] = {"chunks": counts}
    meta["clip_skip_prompts"] = CLIP_SKIP_PROMPTS
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else FIXTURES
    save_file(tensors, out / "prompts.safetensors")
    (out / "prompts.json").write_text(json.dumps(meta, indent=1))
    print({k: tuple(v.shape) for k, v in tensors.items() if k.endswith("context")})


if __name__ == "__main__":
    main()
