"""The procedural data set of "Atelier Shapes": pictures of shapes drawn by torch, with captions.

Every picture is drawn from parameters (shapes, colours, sizes, positions, background) and its
caption is built from the same parameters, e.g. "a small yellow star at the top left on a blue
background". Drawing is vectorised (signed distance fields on a pixel grid), so a batch of 256
pictures of 128x128 takes a few milliseconds on a GPU.

Used by scripts/train_demo_model.py (training) and scripts/shapes_validate.py (the fixed
validation prompts, which the Rust analyser in src/shapes_check.rs reads too).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# The named colours (sRGB, 0-255). The analyser in src/shapes_check.rs uses the same table.
COLOURS = {
    "red": (220, 30, 35),
    "orange": (245, 135, 20),
    "yellow": (245, 220, 35),
    "green": (40, 165, 60),
    "blue": (35, 75, 215),
    "purple": (130, 50, 180),
    "pink": (245, 135, 190),
    "brown": (115, 70, 35),
    "black": (15, 15, 15),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
}
COLOUR_NAMES = list(COLOURS)
SHAPES = ["circle", "square", "triangle", "star", "ring"]
# Centres as fractions of the picture (x right, y down), and how captions say them.
POSITIONS = {
    "center": ((0.5, 0.5), "in the center"),
    "left": ((0.25, 0.5), "on the left"),
    "right": ((0.75, 0.5), "on the right"),
    "top": ((0.5, 0.25), "at the top"),
    "bottom": ((0.5, 0.75), "at the bottom"),
    "top left": ((0.25, 0.25), "at the top left"),
    "top right": ((0.75, 0.25), "at the top right"),
    "bottom left": ((0.25, 0.75), "at the bottom left"),
    "bottom right": ((0.75, 0.75), "at the bottom right"),
}
POSITION_NAMES = list(POSITIONS)
# Radius as a fraction of the picture's side.
SIZES = {"small": 0.095, "large": 0.19}
SHADES = {"dark": 0.55, "light": 0.45}  # dark: scaled towards black; light: mixed with white
MAX_SHAPES = 3


@dataclass
class Shape:
    kind: str
    colour: str
    size: str
    position: str
    shade: str | None = None


@dataclass
class Scene:
    shapes: list[Shape]
    background: str  # plain | gradient | textured
    colours: tuple[str, ...]  # one colour, or two for a gradient (top, bottom)
    shade: str | None = None
    caption: str = ""
    said: dict = field(default_factory=dict)


def with_article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def colour_words(name: str, shade: str | None) -> str:
    return f"{shade} {name}" if shade else name


def shape_phrase(shape: Shape, say_size: bool, say_position: bool) -> str:
    words = ["a"]
    if say_size:
        words.append(shape.size)
    words.append(colour_words(shape.colour, shape.shade))
    words.append(shape.kind)
    if say_position:
        words.append(POSITIONS[shape.position][1])
    return with_article(" ".join(words[1:]))


def background_phrase(scene: Scene) -> str:
    if scene.background == "gradient":
        top, bottom = scene.colours
        return with_article(f"{top} to {bottom} gradient background")
    colour = colour_words(scene.colours[0], scene.shade)
    if scene.background == "textured":
        return f"a textured {colour} background"
    return with_article(f"{colour} background")


def caption(scene: Scene, rng: random.Random) -> str:
    """The caption of a scene; parts may be left out so that short prompts work too."""
    say_background = rng.random() > 0.12 or not scene.shapes
    parts = []
    for shape in scene.shapes:
        say_size = rng.random() > 0.2
        say_position = rng.random() > 0.2 or len(scene.shapes) > 1
        parts.append(shape_phrase(shape, say_size, say_position))
    text = " and ".join(parts)
    if not scene.shapes:
        return background_phrase(scene)
    if say_background:
        text += " on " + background_phrase(scene)
    return text


def random_scene(rng: random.Random) -> Scene:
    kind = rng.random()
    background = "plain" if kind < 0.55 else ("gradient" if kind < 0.78 else "textured")
    if background == "gradient":
        colours = tuple(rng.sample(COLOUR_NAMES, 2))
    else:
        colours = (rng.choice(COLOUR_NAMES),)
    shade = None
    if background != "gradient" and rng.random() < 0.12 and colours[0] not in ("black", "white"):
        shade = rng.choice(list(SHADES))
    count_draw = rng.random()
    count = 0 if count_draw < 0.04 else (1 if count_draw < 0.6 else (2 if count_draw < 0.9 else 3))
    shapes: list[Shape] = []
    used_positions: list[tuple[float, float, float]] = []
    for _ in range(count):
        for _attempt in range(20):
            position = rng.choice(POSITION_NAMES)
            size = rng.choice(list(SIZES))
            (x, y), _ = POSITIONS[position]
            radius = SIZES[size]
            if all(math.hypot(x - ux, y - uy) >= radius + ur + 0.02 for ux, uy, ur in used_positions):
                break
        else:
            break
        colour = rng.choice([c for c in COLOUR_NAMES if c not in colours])
        shape_shade = None
        if rng.random() < 0.08 and colour not in ("black", "white"):
            shape_shade = rng.choice(list(SHADES))
        shapes.append(Shape(rng.choice(SHAPES), colour, size, position, shape_shade))
        used_positions.append((x, y, radius))
    scene = Scene(shapes, background, colours, shade)
    scene.caption = caption(scene, rng)
    return scene


def shade_rgb(rgb, shade: str | None) -> tuple[float, float, float]:
    r, g, b = (c / 255.0 for c in rgb)
    if shade == "dark":
        k = SHADES["dark"]
        return (r * k, g * k, b * k)
    if shade == "light":
        k = SHADES["light"]
        return (r + (1 - r) * k, g + (1 - g) * k, b + (1 - b) * k)
    return (r, g, b)


def sdf(kind: torch.Tensor, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """Signed distance (in radii) to each shape, at points relative to its centre (y up)."""
    radius = torch.sqrt(px * px + py * py)
    circle = radius - 1.0
    square = torch.maximum(px.abs(), py.abs()) - 0.84
    ring = (radius - 0.72).abs() - 0.28
    # Equilateral triangle pointing up (Inigo Quilez's sdEquilateralTriangle), half side 1.0.
    k = math.sqrt(3.0)
    side = 1.05
    tx = px.abs() - side
    ty = py + 0.28 + side / k
    flip = (tx + k * ty) > 0
    tx2 = torch.where(flip, (tx - k * ty) / 2, tx)
    ty2 = torch.where(flip, (-k * tx - ty) / 2, ty)
    tx3 = tx2 - tx2.clamp(-2 * side, 0.0)
    triangle = -torch.sqrt(tx3 * tx3 + ty2 * ty2) * torch.sign(ty2)
    # Five-pointed star (sdStar5), outer radius 1.08, inner ratio 0.45.
    k1x, k1y = 0.809016994375, -0.587785252292
    sx = px.abs()
    sy = py.clone()
    dot1 = (k1x * sx + k1y * sy).clamp(min=0.0)
    sx = sx - 2 * dot1 * k1x
    sy = sy - 2 * dot1 * k1y
    dot2 = (-k1x * sx + k1y * sy).clamp(min=0.0)
    sx = sx + 2 * dot2 * k1x
    sy = sy - 2 * dot2 * k1y
    sx = sx.abs()
    outer = 1.08
    sy = sy - outer
    bax, bay = 0.45 * -k1y - 0.0, 0.45 * k1x - 1.0
    h = ((sx * bax + sy * bay) / (bax * bax + bay * bay)).clamp(0.0, outer)
    dx = sx - bax * h
    dy = sy - bay * h
    star = torch.sqrt(dx * dx + dy * dy) * torch.sign(sy * bax - sx * bay)
    stack = torch.stack([circle, square, triangle, star, ring], dim=0)
    return torch.gather(stack, 0, kind.unsqueeze(0).expand_as(stack[:1])).squeeze(0)


def scene_params(scenes: list[Scene], gen: torch.Generator, jitter: bool = True) -> dict[str, torch.Tensor]:
    """Everything `render_params` needs, drawn on the CPU (data loader workers do this)."""
    batch = len(scenes)
    scale = 1.0 if jitter else 0.0

    def rand(*shape):
        return torch.rand(*shape, generator=gen)

    top = torch.zeros(batch, 3)
    bottom = torch.zeros(batch, 3)
    texture_amount = torch.zeros(batch)
    for i, scene in enumerate(scenes):
        first = torch.tensor(shade_rgb(COLOURS[scene.colours[0]], scene.shade))
        top[i] = first
        if scene.background == "gradient":
            bottom[i] = torch.tensor(shade_rgb(COLOURS[scene.colours[-1]], None))
        else:
            bottom[i] = first
        if scene.background == "textured":
            texture_amount[i] = 0.16 + 0.08 * float(rand(1))
    params = {
        "top": (top + scale * 0.035 * (rand(batch, 3) * 2 - 1)).clamp(0, 1),
        "bottom": (bottom + scale * 0.035 * (rand(batch, 3) * 2 - 1)).clamp(0, 1),
        "texture_amount": texture_amount,
        "texture_coarse": rand(batch, 1, 6, 6) * 2 - 1,
        "texture_fine": rand(batch, 1, 24, 24) * 2 - 1,
        "active": torch.zeros(batch, MAX_SHAPES),
        "kind": torch.zeros(batch, MAX_SHAPES, dtype=torch.long),
        "centre": torch.zeros(batch, MAX_SHAPES, 2),
        "radius": torch.ones(batch, MAX_SHAPES),
        "colour": torch.zeros(batch, MAX_SHAPES, 3),
    }
    for i, scene in enumerate(scenes):
        for slot, shape in enumerate(scene.shapes):
            params["active"][i, slot] = 1.0
            params["kind"][i, slot] = SHAPES.index(shape.kind)
            params["centre"][i, slot] = torch.tensor(POSITIONS[shape.position][0])
            params["radius"][i, slot] = SIZES[shape.size]
            params["colour"][i, slot] = torch.tensor(shade_rgb(COLOURS[shape.colour], shape.shade))
    params["centre"] += scale * 0.045 * (rand(batch, MAX_SHAPES, 2) * 2 - 1)
    params["radius"] *= 1 + scale * 0.12 * (rand(batch, MAX_SHAPES) * 2 - 1)
    params["rotation"] = scale * 0.18 * (rand(batch, MAX_SHAPES) * 2 - 1)
    params["colour"] = (params["colour"] + scale * 0.035 * (rand(batch, MAX_SHAPES, 3) * 2 - 1)).clamp(0, 1)
    return params


def render_params(params: dict[str, torch.Tensor], size: int, device) -> torch.Tensor:
    """Pictures (B, 3, size, size) in [-1, 1] from `scene_params`, drawn on `device`."""
    p = {k: v.to(device) for k, v in params.items()}
    coords = (torch.arange(size, dtype=torch.float32, device=device) + 0.5) / size
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    t = ys[None, None]
    picture = p["top"][:, :, None, None] * (1 - t) + p["bottom"][:, :, None, None] * t
    noise = (F.interpolate(p["texture_coarse"], size=(size, size), mode="bicubic", align_corners=False) * 0.6
             + F.interpolate(p["texture_fine"], size=(size, size), mode="bilinear", align_corners=False) * 0.4)
    picture = (picture * (1 + p["texture_amount"][:, None, None, None] * noise)).clamp(0, 1)
    for slot in range(MAX_SHAPES):
        cx = p["centre"][:, slot, 0, None, None]
        cy = p["centre"][:, slot, 1, None, None]
        r = p["radius"][:, slot, None, None]
        dx = (xs[None] - cx) / r
        dy = -(ys[None] - cy) / r
        cos = torch.cos(p["rotation"][:, slot])[:, None, None]
        sin = torch.sin(p["rotation"][:, slot])[:, None, None]
        rx = cos * dx - sin * dy
        ry = sin * dx + cos * dy
        distance = sdf(p["kind"][:, slot, None, None].expand_as(rx), rx, ry)
        alpha = (0.5 - distance * r * size).clamp(0, 1) * p["active"][:, slot, None, None]
        alpha = alpha.unsqueeze(1)
        picture = picture * (1 - alpha) + p["colour"][:, slot, :, None, None] * alpha
    return picture * 2 - 1


def render(scenes: list[Scene], size: int, device, gen: torch.Generator, jitter: bool = True) -> torch.Tensor:
    """Pictures of the scenes, (B, 3, size, size) in [-1, 1]."""
    return render_params(scene_params(scenes, gen, jitter), size, device)


# The fixed validation set: single shapes on plain backgrounds, every shape, colour and position.
def validation_prompts() -> list[dict]:
    """Prompts with the parameters that the analyser checks, and a seed each."""
    rng = random.Random(20261129)
    prompts = []
    positions = ["center", "left", "right", "top", "bottom", "top left", "top right", "bottom left", "bottom right"]
    index = 0
    for round_ in range(2):
        for shape in SHAPES:
            for _ in range(4):
                colour = COLOUR_NAMES[index % len(COLOUR_NAMES)]
                background = rng.choice([c for c in COLOUR_NAMES if c != colour])
                position = positions[index % len(positions)]
                index += 1
                prompts.append({
                    "prompt": f"a large {colour} {shape} {POSITIONS[position][1]} on {with_article(background)} background",
                    "shape": shape, "colour": colour, "background": background, "position": position,
                    "size": "large", "seed": 1000 + index,
                })
    return prompts
