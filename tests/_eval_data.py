"""Writers of small benchmark files in the official release formats, for the flowkern.eval tests.

Each writer takes a folder and the records, and lays them out as the benchmark ships them: POPE JSON lines,
ScienceQA ``problems.json`` + ``pid_splits.json``, ``TextVQA_0.5.1_val.json``, COCO ``instances_val2014.json`` +
``captions_val2014.json``. Answer files are written in LLaVA's format (JSON lines).
"""

from __future__ import annotations

import json
from pathlib import Path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_pope(folder: Path, split: str, rows: list[tuple[int, str, str, str]]) -> Path:
    """``coco_pope_<split>.json``: rows of (question_id, image, object, label)."""
    return write_jsonl(folder / f"coco_pope_{split}.json", [
        {"question_id": qid, "image": image, "text": f"Is there a {obj} in the image?", "label": label}
        for qid, image, obj, label in rows
    ])


def write_sqa(folder: Path, problems: dict[str, dict], splits: dict[str, list[str]]) -> Path:
    """``problems.json`` (pid -> problem, the release's fields) and ``pid_splits.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    full = {}
    for pid, p in problems.items():
        full[pid] = {"question": p["question"], "choices": p["choices"], "answer": p["answer"],
                     "hint": p.get("hint", ""), "image": p.get("image"), "task": "closed choice",
                     "grade": "grade2", "subject": "natural science", "topic": "biology",
                     "category": p.get("category", "Animals"),
                     "skill": "Identify animals", "lecture": "", "solution": "", "split": p.get("split", "test")}
    (folder / "problems.json").write_text(json.dumps(full), encoding="utf-8")
    (folder / "pid_splits.json").write_text(json.dumps(splits), encoding="utf-8")
    return folder


def write_textvqa(folder: Path, entries: list[dict]) -> Path:
    """``TextVQA_0.5.1_val.json`` with the release's top-level fields; entries need question_id, image_id,
    question, answers (and may have ocr_tokens)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = []
    for e in entries:
        full = {"question": e["question"], "image_id": e["image_id"], "image_classes": ["Poster"],
                "flickr_original_url": "", "flickr_300k_url": "", "image_width": 1024, "image_height": 768,
                "answers": e["answers"], "question_tokens": e["question"].split(), "question_id": e["question_id"],
                "set_name": "val"}
        if "ocr_tokens" in e:
            full["ocr_tokens"] = e["ocr_tokens"]
        data.append(full)
    path = folder / "TextVQA_0.5.1_val.json"
    path.write_text(json.dumps({"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1",
                                "data": data}), encoding="utf-8")
    return path


COCO_CATEGORIES = {1: "person", 3: "car", 6: "bus", 18: "dog", 35: "skis", 44: "bottle", 46: "wine glass",
                   58: "hot dog", 62: "chair", 63: "couch", 70: "toilet", 81: "sink"}


def write_coco(folder: Path, images: dict[int, tuple[list[str], list[str]]]) -> Path:
    """``instances_val2014.json`` + ``captions_val2014.json``: image id -> (instance class names, captions)."""
    folder.mkdir(parents=True, exist_ok=True)
    by_name = {name: cid for cid, name in COCO_CATEGORIES.items()}
    imgs = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg", "width": 640, "height": 480} for i in images]
    inst, caps = [], []
    for i, (classes, captions) in images.items():
        inst.extend({"id": len(inst) + 1, "image_id": i, "category_id": by_name[c], "bbox": [0, 0, 1, 1],
                     "area": 1.0, "iscrowd": 0, "segmentation": []} for c in classes)
        caps.extend({"id": len(caps) + 1, "image_id": i, "caption": c} for c in captions)
    categories = [{"id": cid, "name": name, "supercategory": "x"} for cid, name in COCO_CATEGORIES.items()]
    info = {"description": "COCO 2014 Dataset"}
    (folder / "instances_val2014.json").write_text(json.dumps(
        {"info": info, "licenses": [], "images": imgs, "annotations": inst, "categories": categories}))
    (folder / "captions_val2014.json").write_text(json.dumps(
        {"info": info, "licenses": [], "images": imgs, "annotations": caps}))
    return folder
