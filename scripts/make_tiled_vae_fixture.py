"""Tiled VAE decoding and encoding as diffusers computes it, for tests/headless/memory_options.rs.

On the SD 1.x fixture's VAE (sample_size 64, so 64-pixel tiles of 32 latent cells, a quarter
overlapping): seeded latents of 56x80 cells decoded with `enable_tiling()` and without, and a
smooth 112x160 image encoded with tiling (mean and std of the latent distribution). The sizes
are not multiples of the tile stride, so the last row and column of tiles are partial, as
they are for most real sizes.

Needs torch and diffusers 0.42.1; run where they are installed:
    python scripts/make_tiled_vae_fixture.py [OUT_DIR (default tests/fixtures)]
"""

import json
import sys
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"


def pattern(height, width):
    """A smooth colour image in [-1, 1], (1, 3, H, W), with some detail across tile edges."""
    y = torch.linspace(0, 1, height).view(height, 1).expand(height, width)
    x = torch.linspace(0, 1, width).view(1, width).expand(height, width)
    r = x
    g = 0.5 + 0.5 * torch.cos(9.0 * y)
    b = 0.5 + 0.5 * torch.sin(6.0 * x + 4.0 * y)
    return (torch.stack([r, g, b]).unsqueeze(0) * 2 - 1).float()


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else FIXTURES
    vae = AutoencoderKL.from_pretrained(FIXTURES / "sd1" / "model" / "vae").float().eval()
    latents = torch.randn((1, 4, 56, 80), generator=torch.Generator().manual_seed(7))
    image = pattern(112, 160)
    with torch.no_grad():
        untiled = vae.decode(latents).sample
        vae.enable_tiling()
        tiled = vae.decode(latents).sample
        posterior = vae.encode(image).latent_dist
    tensors = {
        "latents": latents.contiguous(),
        "decoded_untiled": untiled.contiguous(),
        "decoded_tiled": tiled.contiguous(),
        "image": image.contiguous(),
        "encoded_tiled_mean": posterior.mean.contiguous(),
        "encoded_tiled_std": posterior.std.contiguous(),
    }
    save_file(tensors, str(out / "tiled_vae.safetensors"))
    meta = {
        "diffusers": diffusers.__version__,
        "torch": torch.__version__,
        "model": "sd1",
        "tile_sample_min_size": vae.tile_sample_min_size,
        "tile_latent_min_size": vae.tile_latent_min_size,
        "tile_overlap_factor": vae.tile_overlap_factor,
        "max_difference_tiled_vs_untiled": float((tiled - untiled).abs().max()),
    }
    (out / "tiled_vae.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
