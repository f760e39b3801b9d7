"""Writing shapes sets in the official file layouts of POPE, ScienceQA, TextVQA and COCO / CHAIR, so the
:mod:`flowkern.eval` loaders read them unchanged (each writer's docstring gives its files), plus a
``shapes_ground_truth.json`` with every scene.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any

from flowkern.shapes.draw import render
from flowkern.shapes.questions import (
    pope_question_text,
    pope_questions,
    reference_captions,
    sqa_problem,
    textvqa_question,
)
from flowkern.shapes.world import ALL_CLASSES, CANVAS, scenes

__all__ = ["ANALOGUES", "write_pope", "write_sqa", "write_textvqa", "write_caption", "write_task", "eval_command",
           "chair_vocabulary"]

ANALOGUES: tuple[str, ...] = ("pope", "sqa", "textvqa", "caption")
"""The task analogues :func:`write_task` knows (``caption`` is scored by the ``chair`` task)."""


def _save(img: Any, path: Path, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "JPEG":
        img.save(path, format="JPEG", quality=95)
    else:
        img.save(path, format="PNG", optimize=False)



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
    """Write a shapes set of ``task`` (one of :data:`ANALOGUES`) with ``num`` images to ``out``."""
    if task not in _WRITERS:
        raise ValueError(f"--task: unknown shapes task {task!r} (choose from {', '.join(ANALOGUES)})")
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

