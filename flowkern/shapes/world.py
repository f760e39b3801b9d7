"""The shapes world's scenes: colours, shapes, labels, the :class:`Scene` ground truth, seeded scene drawing, and
where an object or a label lies on a patch grid.

Every scene is drawn from a seed (``random.Random(f"{seed}:{task}:{index}")``, so the same seed gives the same scene
on every machine): 1-4 objects, each a distinct (colour, shape) pair of :data:`COLORS` x :data:`SHAPES`, with varied
sizes, positions and small rotations, on a plain or lightly textured background, optionally with a 1-2 character
label (digits and capital letters without the look-alikes ``I`` / ``O``) in a white box. Objects never overlap each
other or the label. Positions are fractions of the canvas.
"""

from __future__ import annotations

import json
import math
import random
import string
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "COLORS", "SHAPES", "LABEL_CHARS", "CANVAS", "NUMBER_WORDS", "SYSTEM_PROMPT", "BACKGROUNDS", "ALL_CLASSES",
    "ShapeObject", "Label", "Scene", "object_class", "make_scene", "scenes",
    "patch_targets", "centre_cell", "object_patches", "label_patches",
]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 38, 38), "green": (34, 160, 60), "blue": (36, 84, 215),
    "yellow": (238, 200, 20), "purple": (135, 55, 185), "orange": (245, 130, 25),
}
"""The six colours (name -> RGB before a small jitter)."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
"""The four shapes."""

LABEL_CHARS: str = string.digits + "".join(c for c in string.ascii_uppercase if c not in "IO")
"""Label characters: 0-9 and A-Z without ``I`` and ``O`` (they read as 1 and 0 at this size)."""

CANVAS = 192
"""Written images are ``CANVAS x CANVAS`` pixels."""

NUMBER_WORDS = ("zero", "one", "two", "three", "four")

SYSTEM_PROMPT = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the human's questions.")
"""LLaVA-1.5's (vicuna v1) system prompt, used by the demo model's chat template."""

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250), "grey": (222, 222, 222), "cream": (244, 236, 214), "sky": (220, 234, 246),
}
"""The background colours (name -> RGB)."""

_TEXTURES = ("plain", "plain", "noise", "stripes", "dots")
_MIN_GAP = 0.03  # between objects (fraction of the canvas)


@dataclass(frozen=True)
class ShapeObject:
    """One object: shape, colour name, centre ``(x, y)`` and radius as fractions of the canvas, rotation in
    degrees, the jittered RGB it is drawn in."""

    shape: str
    color: str
    x: float
    y: float
    r: float
    rotation: float
    rgb: tuple[int, int, int]

    @property
    def name(self) -> str:
        """``"red circle"``."""
        return f"{self.color} {self.shape}"

    def bbox(self, size: int = CANVAS) -> list[float]:
        """COCO box ``[x, y, width, height]`` in pixels of a ``size`` canvas."""
        return [round((self.x - self.r) * size, 2), round((self.y - self.r) * size, 2),
                round(2 * self.r * size, 2), round(2 * self.r * size, 2)]


@dataclass(frozen=True)
class Label:
    """A 1-2 character label in a white box; centre and half-extent ``(hw, hh)`` as fractions of the canvas."""

    text: str
    x: float
    y: float
    hw: float
    hh: float


@dataclass(frozen=True)
class Scene:
    """A scene and its ground truth: objects (left to right), background colour name and texture, label, and the
    seed string it was drawn from."""

    objects: tuple[ShapeObject, ...]
    background: str
    texture: str
    label: Label | None
    seed: str
    texture_seed: int = 0
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def names(self) -> list[str]:
        """The objects' ``"colour shape"`` names, left to right."""
        return [o.name for o in self.objects]

    def to_dict(self) -> dict[str, Any]:
        """The ground truth as plain JSON data (pixel boxes on the written canvas included)."""
        d = asdict(self)
        d.pop("extra")
        for obj, o in zip(d["objects"], self.objects, strict=True):
            obj["bbox"] = o.bbox()
            obj["name"] = o.name
        return json.loads(json.dumps(d))  # tuples -> lists: plain JSON data


def object_class(color: str, shape: str) -> str:
    """The CHAIR / POPE object name of a colour and a shape (``"red circle"``)."""
    return f"{color} {shape}"


ALL_CLASSES: tuple[str, ...] = tuple(object_class(c, s) for s in SHAPES for c in COLORS)


def _overlaps(x: float, y: float, r: float, placed: Sequence[tuple[float, float, float]]) -> bool:
    return any(math.hypot(x - px, y - py) < r + pr + _MIN_GAP for px, py, pr in placed)


def make_scene(rng: random.Random, *, n_objects: int | None = None, label: bool | None = None,
               seed: str = "") -> Scene:
    """Draw one scene from ``rng``: ``n_objects`` (default 1-4, uniform) distinct colour-shape pairs, a label with
    probability 1/2 (``label=True``/``False`` forces it)."""
    n = rng.randint(1, 4) if n_objects is None else int(n_objects)
    if not 1 <= n <= 4:
        raise ValueError(f"n_objects must be in 1..4, got {n}")
    with_label = rng.random() < 0.5 if label is None else bool(label)
    background = rng.choice(list(BACKGROUNDS))
    texture = rng.choice(_TEXTURES)
    for _ in range(200):  # placement by rejection; 200 tries always suffice at these sizes, but stay safe
        placed: list[tuple[float, float, float]] = []
        lab = None
        if with_label:
            text = "".join(rng.choice(LABEL_CHARS) for _ in range(rng.randint(1, 2)))
            hw, hh = (0.075 if len(text) == 1 else 0.12), 0.095
            lx, ly = rng.uniform(hw + 0.02, 1 - hw - 0.02), rng.uniform(hh + 0.02, 1 - hh - 0.02)
            lab = Label(text, round(lx, 4), round(ly, 4), hw, hh)
            placed.append((lx, ly, math.hypot(hw, hh) * 0.9))
        pairs = rng.sample([(c, s) for c in COLORS for s in SHAPES], n)
        objs = []
        for color, shape in pairs:
            for _ in range(100):
                r = rng.uniform(0.085, 0.14)
                x, y = rng.uniform(r + 0.02, 1 - r - 0.02), rng.uniform(r + 0.02, 1 - r - 0.02)
                if not _overlaps(x, y, r, placed):
                    break
            else:
                break
            placed.append((x, y, r))
            base = COLORS[color]
            rgb = tuple(max(0, min(255, v + rng.randint(-12, 12))) for v in base)
            objs.append(ShapeObject(shape, color, round(x, 4), round(y, 4), round(r, 4),
                                    round(rng.uniform(-15, 15), 2), rgb))  # type: ignore[arg-type]
        if len(objs) == n:
            objs.sort(key=lambda o: o.x)
            return Scene(tuple(objs), background, texture, lab, seed, rng.randrange(2**31))
    raise RuntimeError("could not place the objects")  # pragma: no cover


def scenes(seed: int, task: str, num: int, *, label: bool | None = None, start: int = 0) -> Iterator[Scene]:
    """``num`` scenes of a set, each from its own ``random.Random(f"{seed}:{task}:{index}")``."""
    for i in range(start, start + num):
        key = f"{seed}:{task}:{i}"
        yield make_scene(random.Random(key), label=label, seed=key)


# ------------------------------------------------------------------------------------------------------------------
# patch grids


def patch_targets(scene: Scene, grid: int) -> dict[str, list[int]]:
    """Dense ground truth on a ``grid x grid`` patch grid (row-major), for auxiliary training losses.

    ``color`` / ``shape``: 1 + the index in :data:`COLORS` / :data:`SHAPES` of the object whose area covers the
    patch centre, 0 for none; ``char``: 1 + the index in :data:`LABEL_CHARS` of the label character whose half of
    the label box covers the patch centre, 0 for none; ``char_second``: 1 where that character is the second of a
    two-character label.
    """
    colors, shapes = list(COLORS), list(SHAPES)
    out = {k: [0] * grid * grid for k in ("color", "shape", "char", "char_second")}
    for gy in range(grid):
        for gx in range(grid):
            px, py = (gx + 0.5) / grid, (gy + 0.5) / grid
            i = gy * grid + gx
            for o in scene.objects:
                if math.hypot(px - o.x, py - o.y) <= o.r * 0.85:
                    out["color"][i] = 1 + colors.index(o.color)
                    out["shape"][i] = 1 + shapes.index(o.shape)
            lab = scene.label
            if lab is not None and abs(px - lab.x) <= lab.hw and abs(py - lab.y) <= lab.hh:
                k = 0 if len(lab.text) == 1 or px < lab.x else 1
                out["char"][i] = 1 + LABEL_CHARS.index(lab.text[k])
                out["char_second"][i] = k
    return out


def centre_cell(obj: ShapeObject, grid: int) -> tuple[int, int]:
    """``(column, row)`` on a ``grid x grid`` patch grid of the patch under ``obj``'s centre."""
    return min(grid - 1, int(obj.x * grid)), min(grid - 1, int(obj.y * grid))


def object_patches(obj: ShapeObject, grid: int) -> list[int]:
    """Row-major indices on a ``grid x grid`` patch grid of the patches ``obj`` covers: those whose centre lies
    within its radius, and always the patch under its centre (a small object may cover no patch centre)."""
    column, row = centre_cell(obj, grid)
    cells = {row * grid + column}
    for gy in range(grid):
        for gx in range(grid):
            if math.hypot((gx + 0.5) / grid - obj.x, (gy + 0.5) / grid - obj.y) <= obj.r:
                cells.add(gy * grid + gx)
    return sorted(cells)


def label_patches(label: Label, grid: int, char: int | None = None) -> list[int]:
    """Patches (row-major, ``grid x grid``) of the label box, or of the half that holds character ``char`` (0 or
    1) of a two-character label; always at least the patch under that box's centre."""
    x0, x1 = label.x - label.hw, label.x + label.hw
    if char is not None and len(label.text) == 2:
        x0, x1 = (x0, label.x) if char == 0 else (label.x, x1)
    cx = (x0 + x1) / 2
    cells = {min(grid - 1, int(label.y * grid)) * grid + min(grid - 1, int(cx * grid))}
    for gy in range(grid):
        for gx in range(grid):
            px, py = (gx + 0.5) / grid, (gy + 0.5) / grid
            if x0 <= px <= x1 and abs(py - label.y) <= label.hh:
                cells.add(gy * grid + gx)
    return sorted(cells)
