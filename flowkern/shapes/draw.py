"""Drawing a shapes scene: :func:`render` (Pillow, supersampled) and the JPEG round trip of the TextVQA files."""

from __future__ import annotations

import io
import math
import random
from typing import Any

from flowkern.shapes.world import BACKGROUNDS, CANVAS, Scene, ShapeObject

__all__ = ["render", "jpeg_roundtrip"]


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
    bg = BACKGROUNDS[scene.background]
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



def jpeg_roundtrip(img: Any) -> Any:
    """The image after a JPEG save and load at the writers' quality (what shapes-TextVQA's files hold)."""
    from PIL import Image

    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    buf.seek(0)
    return Image.open(buf).convert("RGB")

