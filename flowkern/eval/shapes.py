"""A synthetic shapes world and its four benchmark analogues, written in the official file formats.

Every scene is drawn from a seed (``random.Random(f"{seed}:{task}:{index}")``, so the same seed gives the same
files on every machine): 1-4 objects, each a distinct (colour, shape) pair of :data:`COLORS` x :data:`SHAPES`,
with varied sizes, positions and small rotations, on a plain or lightly textured background, optionally with a
1-2 character label (digits and capital letters without the look-alikes ``I`` / ``O``) in a white box. Objects never
overlap each other or the label. :class:`Scene` carries the full ground truth (pixel boxes, colours, label).

The writers lay the sets out exactly as the real benchmarks ship, so the :mod:`flowkern.eval` loaders read them
unchanged:

========== ============================================ ======================================================
task       files                                        question / reference
========== ============================================ ======================================================
pope       ``coco_pope_{random,popular,adversarial}``   "Is there a red circle in the image?" yes / no; one
           ``.json`` + ``images/``                      positive and one negative per image and split
sqa        ``problems.json``, ``pid_splits.json``,      relation ("Which shape is to the left of the blue
           ``images/test/<pid>/image.png``              square?"), count or colour, 2-4 options; a quarter
                                                        with a ``Context:`` the answer needs or that is true
textvqa    ``TextVQA_0.5.1_val.json`` +                 "What is written in the image?", the label x 10
           ``train_images/<image_id>.jpg``
caption    ``annotations/instances_val2014.json``,      "Please describe this image in detail."; 5 reference
           ``annotations/captions_val2014.json``,       captions, one instance per object; the 24 colour-shape
           ``annotations/chair_vocabulary.txt``,        pairs are the CHAIR object classes
           ``val2014/``
========== ============================================ ======================================================

POPE negatives follow POPE's three samplers: *random* (any absent colour-shape pair), *popular* (the absent pair
most frequent in the whole set's ground truth) and *adversarial* (an absent pair sharing the shape or the colour of
an object in the image, the near miss). Question ids are unique across the three POPE files.

Nothing here imports torch; drawing uses Pillow only.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import string
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "COLORS", "SHAPES", "LABEL_CHARS", "CANVAS", "TASKS", "NUMBER_WORDS", "SYSTEM_PROMPT",
    "ShapeObject", "Label", "Scene", "make_scene", "scenes", "render", "patch_targets", "centre_cell", "object_patches",
    "label_patches",
    "near_misses", "pope_questions", "sqa_problem", "SQA_KINDS", "textvqa_question", "caption_text",
    "reference_captions",
    "write_pope", "write_sqa", "write_textvqa", "write_caption", "write_task", "eval_command",
    "chair_vocabulary", "vocabulary", "object_class",
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

TASKS: tuple[str, ...] = ("pope", "sqa", "textvqa", "caption")
"""The task analogues :func:`write_task` knows."""

NUMBER_WORDS = ("zero", "one", "two", "three", "four")

SYSTEM_PROMPT = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the human's questions.")
"""LLaVA-1.5's (vicuna v1) system prompt, used by the demo model's chat template."""

_BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250), "grey": (222, 222, 222), "cream": (244, 236, 214), "sky": (220, 234, 246),
}
_TEXTURES = ("plain", "plain", "noise", "stripes", "dots")
_MIN_GAP = 0.03  # between objects (fraction of the canvas)
_RELATION_MARGIN = 0.12  # centre distance that makes "left of" unambiguous


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


# ------------------------------------------------------------------------------------------------------------------
# scenes


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
    background = rng.choice(list(_BACKGROUNDS))
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
# drawing


def _polygon(o: ShapeObject, scale: float) -> list[tuple[float, float]]:
    cx, cy, r = o.x * scale, o.y * scale, o.r * scale
    rot = math.radians(o.rotation)
    if o.shape == "square":
        pts = [(math.pi / 4 + k * math.pi / 2, r * 0.92) for k in range(4)]
        pts = [(a, rr * math.sqrt(2) * 0.78) for a, rr in pts]
    elif o.shape == "triangle":
        pts = [(-math.pi / 2 + k * 2 * math.pi / 3, r) for k in range(3)]
    else:  # star
        pts = [(-math.pi / 2 + k * math.pi / 5, r if k % 2 == 0 else r * 0.45) for k in range(10)]
    return [(cx + rr * math.cos(a + rot), cy + rr * math.sin(a + rot)) for a, rr in pts]


def _font(px: int) -> Any:
    from PIL import ImageFont

    return ImageFont.load_default(size=px)


def render(scene: Scene, size: int = CANVAS, *, supersample: int = 2) -> Any:
    """The scene as an RGB ``PIL.Image`` of ``size x size`` pixels (drawn at ``supersample`` x and downsampled)."""
    from PIL import Image, ImageDraw

    big = size * supersample
    bg = _BACKGROUNDS[scene.background]
    img = Image.new("RGB", (big, big), bg)
    draw = ImageDraw.Draw(img)
    trng = random.Random(scene.texture_seed)
    shade = tuple(max(0, v - 18) for v in bg)
    if scene.texture == "stripes":
        step = big // trng.randint(10, 16)
        for k in range(-big, big, step):
            draw.line([(k, 0), (k + big, big)], fill=shade, width=max(1, big // 160))
    elif scene.texture == "dots":
        for _ in range(60):
            x, y = trng.uniform(0, big), trng.uniform(0, big)
            rr = big / 150
            draw.ellipse([x - rr, y - rr, x + rr, y + rr], fill=shade)
    elif scene.texture == "noise":
        for _ in range(400):
            x, y = trng.uniform(0, big), trng.uniform(0, big)
            v = trng.randint(-16, 16)
            w = big / 90
            draw.rectangle([x, y, x + w, y + w], fill=tuple(max(0, min(255, c + v)) for c in bg))
    for o in scene.objects:
        outline = tuple(int(v * 0.6) for v in o.rgb)
        width = max(1, big // 120)
        if o.shape == "circle":
            cx, cy, r = o.x * big, o.y * big, o.r * big * 0.95
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=o.rgb, outline=outline, width=width)
        else:
            draw.polygon(_polygon(o, big), fill=o.rgb, outline=outline, width=width)
    if scene.label is not None:
        lab = scene.label
        box = [(lab.x - lab.hw) * big, (lab.y - lab.hh) * big, (lab.x + lab.hw) * big, (lab.y + lab.hh) * big]
        draw.rectangle(box, fill=(255, 255, 255), outline=(30, 30, 30), width=max(1, big // 120))
        font = _font(int(lab.hh * 2 * big * 0.78))
        draw.text((lab.x * big, lab.y * big), lab.text, fill=(0, 0, 0), font=font, anchor="mm",
                  stroke_width=max(1, big // 128), stroke_fill=(0, 0, 0))
    return img.resize((size, size), Image.Resampling.LANCZOS) if supersample > 1 else img


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


# ------------------------------------------------------------------------------------------------------------------
# questions and answers


def _plural(shape: str) -> str:
    return shape + "s"


def caption_text(scene: Scene) -> str:
    """The canonical caption (what the demo model is trained to say), objects left to right:
    ``"There are two shapes : a red circle and a blue star ."``."""
    names = [f"a {n}" for n in scene.names]
    listed = names[0] if len(names) == 1 else " , ".join(names[:-1]) + " and " + names[-1]
    n = len(names)
    head = "There is one shape" if n == 1 else f"There are {NUMBER_WORDS[n]} shapes"
    label = f" . There is a label that says {scene.label.text}" if scene.label is not None else ""
    return f"{head} : {listed}{label} ."


def reference_captions(scene: Scene, rng: random.Random) -> list[str]:
    """Five human-style reference captions naming every object (COCO-like ``captions`` annotations)."""
    names = scene.names
    order = names[:]
    out = [caption_text(scene).replace(" ,", ",").replace(" .", ".").replace(" :", ":")]
    for _ in range(4):
        rng.shuffle(order)
        listed = ", ".join(f"a {n}" for n in order[:-1]) + (" and " if len(order) > 1 else "") + f"a {order[-1]}"
        form = rng.choice(["A picture of {x}.", "{X} on a {bg} background.", "An image showing {x}.",
                           "Some simple shapes: {x}."])
        out.append(form.format(x=listed, X=listed[0].upper() + listed[1:], bg=scene.background))
    return out


def near_misses(scene: Scene, *, colour: bool = True, shape: bool = True) -> list[str]:
    """The absent colour-shape pairs (in :data:`ALL_CLASSES` order) that share the colour (``colour``) or the shape
    (``shape``) of an object of ``scene``: POPE's adversarial negatives."""
    present = set(scene.names)
    return [c for c in ALL_CLASSES if c not in present
            and any((shape and c.split()[1] == o.shape) or (colour and c.split()[0] == o.color)
                    for o in scene.objects)]


def pope_questions(scene: Scene, rng: random.Random, counts: Counter) -> dict[str, list[tuple[str, str]]]:
    """Per POPE split, ``[(object, label), ...]``: one present object (yes) and one absent one (no).

    ``counts``: how often each class occurs in the set (the *popular* sampler's ranking).
    """
    present = set(scene.names)
    absent = [c for c in ALL_CLASSES if c not in present]
    pos = rng.choice(scene.names)
    near = near_misses(scene)
    ranked = sorted(absent, key=lambda c: (-counts.get(c, 0), ALL_CLASSES.index(c)))
    top = ranked[:3]
    return {
        "random": [(pos, "yes"), (rng.choice(absent), "no")],
        "popular": [(rng.choice(scene.names), "yes"), (rng.choice(top), "no")],
        "adversarial": [(rng.choice(scene.names), "yes"), (rng.choice(near or absent), "no")],
    }


def pope_question_text(obj: str) -> str:
    """``"Is there a red circle in the image?"``."""
    return f"Is there a {obj} in the image?"


_RELATIONS = {
    "left": ("to the left of", lambda a, b: b.x - a.x > _RELATION_MARGIN),
    "right": ("to the right of", lambda a, b: a.x - b.x > _RELATION_MARGIN),
    "above": ("above", lambda a, b: b.y - a.y > _RELATION_MARGIN),
    "below": ("below", lambda a, b: a.y - b.y > _RELATION_MARGIN),
}
_NAMES = ("Anna", "Ben", "Chen", "Dara")
SQA_KINDS = ("relation", "count", "color", "names")
"""The kinds of problem :func:`sqa_problem` asks (a relation becomes ``context-relation`` when it has a context)."""


def _options(correct: str, pool: Sequence[str], rng: random.Random, k: int) -> tuple[list[str], int]:
    wrong = [p for p in dict.fromkeys(pool) if p != correct]
    rng.shuffle(wrong)
    choices = [correct, *wrong[:k - 1]]
    rng.shuffle(choices)
    return choices, choices.index(correct)


def sqa_problem(scene: Scene, rng: random.Random, *, kind: str | None = None) -> dict[str, Any]:
    """One ScienceQA-style problem about the scene: ``question``, ``choices``, ``answer`` (index), ``hint``,
    ``kind`` (relation / count / colour / names / context-count), ``solution``, ``focus`` (the names of the
    objects the answer is about: a training aid, not written to the files).

    ``kind``: ask this kind (``relation``, ``count``, ``color`` or ``names``) when the scene allows it, else one
    drawn as usual (training uses it to ask more of a kind; the files never do).

    Relations need a centre distance above a margin, so the right option is unambiguous; wrong options are
    objects of the image that do not satisfy the relation (or absent colour-shape pairs when there are too few).
    """
    objs = list(scene.objects)
    absent = [c for c in ALL_CLASSES if c not in scene.names]
    shape_counts = Counter(o.shape for o in objs)
    unique = [o for o in objs if shape_counts[o.shape] == 1]
    kinds = ["count", "color"] if unique else ["count"]
    pairs = [(rel, a, b) for rel, (_, ok) in _RELATIONS.items() for a in objs for b in objs
             if a is not b and ok(a, b)]
    if pairs:
        kinds += ["relation", "relation", "relation"]
    named = [(a, b) for a in objs for b in objs if a is not b and abs(a.x - b.x) > _RELATION_MARGIN]
    if named:
        kinds.append("names")
    kind = kind if kind in kinds else rng.choice(kinds)
    hint = ""
    if kind == "relation":
        rel, a, b = rng.choice(pairs)
        phrase, ok = _RELATIONS[rel]
        question = f"Which shape is {phrase} the {b.name}?"
        others = [o.name for o in objs if o is not b and not ok(o, b)]
        pool = others + rng.sample(absent, 3)
        choices, answer = _options(a.name, pool, rng, rng.randint(2, 4))
        solution = f"The {a.name} is {phrase} the {b.name}."
        focus = [a.name, b.name]
        if rng.random() < 0.3:
            hint = f"There {'is' if len(objs) == 1 else 'are'} {NUMBER_WORDS[len(objs)]} " \
                   f"shape{'s' if len(objs) > 1 else ''} in the picture."
            kind = "context-relation"
    elif kind == "count":
        if rng.random() < 0.5:
            shape = rng.choice(SHAPES)
            n = sum(o.shape == shape for o in objs)
            question = f"How many {_plural(shape)} are there?"
            focus = [o.name for o in objs if o.shape == shape]
        else:
            n = len(objs)
            question = "How many shapes are there?"
            focus = [o.name for o in objs]
        choices, answer = _options(str(n), [str(k) for k in range(5)], rng, rng.randint(2, 4))
        solution = f"Count them: {n}."
    elif kind == "color":
        o = rng.choice(unique)
        question = f"What colour is the {o.shape}?"
        choices, answer = _options(o.color, list(COLORS), rng, rng.randint(2, 4))
        solution = f"The {o.shape} is {o.color}."
        focus = [o.name]
    else:  # names: the answer needs the context and the image
        a, b = rng.choice(named)
        n1, n2 = rng.sample(_NAMES, 2)
        hint = f"{n1} drew the {a.name}. {n2} drew the {b.name}."
        side = rng.choice(["left", "right"])
        question = f"Whose shape is further to the {side}?"
        correct = n1 if (a.x < b.x) == (side == "left") else n2
        choices, answer = _options(correct, [n1, n2], rng, 2)
        solution = f"{correct} drew the shape further to the {side}."
        focus = [a.name, b.name]
    return {"question": question, "choices": choices, "answer": answer, "hint": hint, "kind": kind,
            "solution": solution, "focus": focus}


_TEXT_QUESTIONS = ("What is written in the image?", "What does the label say?", "What is written on the label?",
                   "Which characters are on the label?")


def textvqa_question(scene: Scene, rng: random.Random) -> tuple[str, list[str]]:
    """A question about the label and its ten reference answers (the label, some written in lower case)."""
    if scene.label is None:
        raise ValueError("textvqa_question: the scene has no label")
    text = scene.label.text
    answers = [text if rng.random() < 0.8 else text.lower() for _ in range(10)]
    return rng.choice(_TEXT_QUESTIONS), answers


# ------------------------------------------------------------------------------------------------------------------
# writers


def _save(img: Any, path: Path, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "JPEG":
        img.save(path, format="JPEG", quality=95)
    else:
        img.save(path, format="PNG", optimize=False)


def jpeg_roundtrip(img: Any) -> Any:
    """The image after a JPEG save and load at the writers' quality (what shapes-TextVQA's files hold)."""
    from PIL import Image

    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj), encoding="utf-8")
    os.replace(tmp, path)


def _write_truth(out: Path, truth: dict[str, Any], seed: int, task: str) -> None:
    _write_json(out / "shapes_ground_truth.json", {"task": task, "seed": seed, "canvas": CANVAS, "scenes": truth})


def write_pope(out: str | os.PathLike[str], *, seed: int, num: int) -> Path:
    """shapes-POPE: ``coco_pope_{adversarial,popular,random}.json`` (JSON lines) and ``images/*.png``.

    ``num`` images; per split, one yes and one no question per image (``2 * num`` questions per file).
    """
    out = Path(out)
    items = list(scenes(seed, "pope", num))
    counts = Counter(n for s in items for n in s.names)
    rows: dict[str, list[dict]] = {"random": [], "popular": [], "adversarial": []}
    truth = {}
    for i, scene in enumerate(items):
        name = f"shapes_{seed}_{i:06d}.png"
        _save(render(scene), out / "images" / name)
        truth[name] = scene.to_dict()
        qs = pope_questions(scene, random.Random(f"{scene.seed}:q"), counts)
        for split, pairs in qs.items():
            rows[split].extend({"image": name, "text": pope_question_text(obj), "label": label} for obj, label in pairs)
    qid = 1
    for split in ("adversarial", "popular", "random"):  # unique ids across files: no `category` needed
        lines = []
        for row in rows[split]:
            lines.append(json.dumps({"question_id": qid, **row}))
            qid += 1
        (out / f"coco_pope_{split}.json").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _write_truth(out, truth, seed, "pope")
    return out


def write_sqa(out: str | os.PathLike[str], *, seed: int, num: int) -> Path:
    """shapes-SQA: ``problems.json``, ``pid_splits.json`` (all ``num`` problems in ``test``) and
    ``images/test/<pid>/image.png``, with the release's fields."""
    out = Path(out)
    problems, truth = {}, {}
    for i, scene in enumerate(scenes(seed, "sqa", num)):
        pid = f"{seed}{i:06d}"
        p = sqa_problem(scene, random.Random(f"{scene.seed}:q"))
        _save(render(scene), out / "images" / "test" / pid / "image.png")
        topic = {"count": "counting", "color": "colours"}.get(p["kind"], "spatial relations")
        problems[pid] = {
            "question": p["question"], "choices": p["choices"], "answer": p["answer"], "hint": p["hint"],
            "image": "image.png", "task": "closed choice", "grade": "grade1", "subject": "shapes world",
            "topic": topic, "category": p["kind"], "skill": topic, "lecture": "", "solution": p["solution"],
            "split": "test",
        }
        truth[pid] = scene.to_dict()
    _write_json(out / "problems.json", problems)
    _write_json(out / "pid_splits.json", {"train": [], "val": [], "minival": [], "test": list(problems)})
    _write_truth(out, truth, seed, "sqa")
    return out


def write_textvqa(out: str | os.PathLike[str], *, seed: int, num: int) -> Path:
    """shapes-TextVQA: ``TextVQA_0.5.1_val.json`` (ten answers per question, ``ocr_tokens`` = the label) and
    ``train_images/<image_id>.jpg``; every scene has a label."""
    out = Path(out)
    data, truth = [], {}
    for i, scene in enumerate(scenes(seed, "textvqa", num, label=True)):
        image_id = f"shapes{seed}x{i:06d}"
        question, answers = textvqa_question(scene, random.Random(f"{scene.seed}:q"))
        _save(render(scene), out / "train_images" / f"{image_id}.jpg", "JPEG")
        data.append({"question": question, "image_id": image_id, "image_classes": ["Shapes"],
                     "flickr_original_url": "", "flickr_300k_url": "", "image_width": CANVAS,
                     "image_height": CANVAS, "answers": answers, "question_tokens": question.rstrip("?").split(),
                     "question_id": i + 1, "set_name": "val", "ocr_tokens": [scene.label.text]})
        truth[image_id] = scene.to_dict()
    _write_json(out / "TextVQA_0.5.1_val.json",
                {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data})
    _write_truth(out, truth, seed, "textvqa")
    return out


def chair_vocabulary() -> dict[str, list[str]]:
    """The CHAIR object classes of the shapes world: each ``"colour shape"`` pair, named by itself only."""
    return {c: [] for c in ALL_CLASSES}


def write_caption(out: str | os.PathLike[str], *, seed: int, num: int) -> Path:
    """shapes-caption: ``annotations/{instances,captions}_val2014.json`` (COCO format, the 24 colour-shape classes
    as categories), ``annotations/chair_vocabulary.txt`` (the object list CHAIR reads) and ``val2014/*.png``."""
    out = Path(out)
    ann = out / "annotations"
    categories = [{"id": k + 1, "name": c, "supercategory": c.split()[1]} for k, c in enumerate(ALL_CLASSES)]
    cat_id = {c["name"]: c["id"] for c in categories}
    images, instances, captions, truth = [], [], [], {}
    for i, scene in enumerate(scenes(seed, "caption", num)):
        image_id = seed * 1_000_000 + i + 1
        name = f"shapes_val_{image_id:012d}.png"
        _save(render(scene), out / "val2014" / name)
        images.append({"id": image_id, "file_name": name, "width": CANVAS, "height": CANVAS, "license": 0,
                       "coco_url": "", "flickr_url": "", "date_captured": ""})
        for o in scene.objects:
            instances.append({"id": len(instances) + 1, "image_id": image_id, "category_id": cat_id[o.name],
                              "bbox": o.bbox(), "area": round(o.bbox()[2] * o.bbox()[3], 2), "iscrowd": 0,
                              "segmentation": []})
        for text in reference_captions(scene, random.Random(f"{scene.seed}:c")):
            captions.append({"id": len(captions) + 1, "image_id": image_id, "caption": text})
        truth[str(image_id)] = scene.to_dict()
    info = {"description": f"flowkern shapes-caption, seed {seed}", "version": "1.0", "year": 2024}
    _write_json(ann / "instances_val2014.json", {"info": info, "licenses": [], "images": images,
                                                 "annotations": instances, "categories": categories})
    _write_json(ann / "captions_val2014.json", {"info": info, "licenses": [], "images": images,
                                                "annotations": captions})
    (ann / "chair_vocabulary.txt").write_text(
        "# CHAIR object classes of the flowkern shapes world: class = synonym; synonym; ...\n"
        + "".join(f"{c}\n" for c in ALL_CLASSES), encoding="utf-8")
    _write_truth(out, truth, seed, "caption")
    return out


_WRITERS = {"pope": write_pope, "sqa": write_sqa, "textvqa": write_textvqa, "caption": write_caption}
_EVAL = {"pope": ("pope", "", "images"), "sqa": ("sqa", "", None), "textvqa": ("textvqa", "", None),
         "caption": ("chair", "", None)}


def write_task(task: str, out: str | os.PathLike[str], *, seed: int, num: int) -> Path:
    """Write a shapes set of ``task`` (one of :data:`TASKS`) with ``num`` images to ``out``."""
    if task not in _WRITERS:
        raise ValueError(f"--task: unknown shapes task {task!r} (choose from {', '.join(TASKS)})")
    if num < 1:
        raise ValueError(f"--num {num}: expected at least 1")
    return _WRITERS[task](out, seed=seed, num=num)


def eval_command(task: str, out: str | os.PathLike[str], *, model: str = "demo", results: str | None = None) -> str:
    """The ``flowkern eval`` command line that scores a set written by :func:`write_task`."""
    name, data, images = _EVAL[task]
    out = Path(out)
    data_path = out / data if data else out
    parts = ["flowkern", "eval", "--model", model, "--task", name, "--data", str(data_path)]
    if images:
        parts += ["--images", str(out / images)]
    parts += ["--out", results or str(out.parent / f"{out.name}-results")]
    return " ".join(parts)


def vocabulary() -> list[str]:
    """Every whitespace word of the shapes prompts and answers (LLaVA-1.5 prompt suffixes and system prompt
    included), sorted: the demo model's word-level vocabulary. Label characters come twice: ``"K"`` and the
    continuation piece ``"##K"`` (two-character labels are two tokens that decode without a space)."""
    from flowkern.eval.tasks import chair, pope, sqa, textvqa

    texts = [SYSTEM_PROMPT, pope.PROMPT_SUFFIX, sqa.PROMPT_SUFFIX, textvqa.PROMPT_SUFFIX, textvqa.OCR_PREFIX,
             chair.PROMPT, "USER : ASSISTANT : Yes No Context: There is are one shape shapes : a and , . label",
             "that says", *_TEXT_QUESTIONS, *(f"{c}." for c in string.ascii_uppercase[:5])]
    for name in ALL_CLASSES:
        texts.append(pope_question_text(name))
    for rel, (phrase, _) in _RELATIONS.items():
        texts.append(f"Which shape is {phrase} the {rel}?")
    for s in SHAPES:
        texts += [f"How many {_plural(s)} are there?", f"What colour is the {s}?", f"the {s}? {s}s {s}"]
    texts += ["How many shapes are there?", "Whose shape is further to the left? right?",
              *(f"{n} drew the {s}." for n in _NAMES for s in SHAPES), *NUMBER_WORDS, *COLORS,
              "in the picture.", "shape shapes"]
    words = {w for t in texts for w in t.split()}
    words |= set(LABEL_CHARS) | {f"##{c}" for c in LABEL_CHARS} | set("01234")
    return sorted(words)
