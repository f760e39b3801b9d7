"""What the tests share, in one place: the op backends and input builders, the tiny models (made with the one
tiny-model builder :mod:`flowkern.hf.tiny`) and benchmark files in the official formats, and the repository root.
No test module imports another one."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import flowkern
from flowkern import ops
from flowkern.hf.tiny import (
    CHAT_TEMPLATE,
    IMAGE_TOKEN,
    clip_config,
    save_tiny_llava,
    text_config,
    tiny_vlm,
    word_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]
"""The repository root."""


# ---------------------------------------------------------------------------------------------------------------------
# ops: backends to run, op input builders, tolerances against the float64 reference;
# prompts and grids of the Hugging Face tests

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _triton_param() -> object:
    if HAS_CUDA:
        return pytest.param(("triton", "cuda"), id="triton-cuda")
    if INTERPRET:
        return pytest.param(("triton", "cpu"), id="triton-interp")
    return pytest.param(("triton", "cpu"), id="triton-interp", marks=pytest.mark.skip("needs TRITON_INTERPRET=1"))


CPP = pytest.param(
    ("cpp", "cpu"), id="cpp", marks=pytest.mark.skipif(not ops.cpp_available(), reason="flowkern._C not built")
)
TRITON = _triton_param()
REFERENCE = pytest.param(("reference", "cpu"), id="reference")
ALL_BACKENDS = [CPP, TRITON, REFERENCE]

TOL = {  # docs/reliability.md, tightened where the kernels allow
    torch.float32: dict(out=2e-5, mass=1e-5, lse=1e-5),
    torch.float16: dict(out=1e-2, mass=5e-3, lse=5e-3),
    torch.bfloat16: dict(out=1e-2, mass=5e-3, lse=1e-2),
}


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    old = os.environ.get("FLOWKERN_BACKEND")
    os.environ["FLOWKERN_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FLOWKERN_BACKEND", None)
        else:
            os.environ["FLOWKERN_BACKEND"] = old


def poison_allocator(device: str, numel: int) -> None:
    """Allocate, NaN-fill and free a buffer so that memory handed out next is likely to hold NaNs.

    Outputs that a kernel forgets to write then show up as NaN / mismatches instead of lucky zeros.
    """
    buf = torch.full((numel,), float("nan"), device=device)
    del buf


def padding_mask(kind: str, b: int, sk: int, gen: torch.Generator) -> torch.Tensor | None:
    """None, or a bool [B, Sk] mask with left or right padding of random length per row (row 0 unpadded)."""
    if kind == "none":
        return None
    mask = torch.ones(b, sk, dtype=torch.bool)
    for row in range(1, b):
        n = int(torch.randint(1, max(2, sk // 2), (1,), generator=gen))
        if kind == "left":
            mask[row, :n] = False
        elif kind == "right":
            mask[row, sk - n :] = False
        elif kind == "all":
            mask[row] = False
        else:
            raise AssertionError(kind)
    return mask


def make_qkv(
    b: int, hq: int, hkv: int, sq: int, sk: int, d: int, dtype: torch.dtype, device: str, seed: int,
    noncontiguous: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh random q [B,Hq,Sq,D], k/v [B,Hkv,Sk,D]; optionally as transposed views of [B,S,H,D] storage."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(h: int, s: int) -> torch.Tensor:
        if noncontiguous:
            t = torch.randn(b, s, h, d, generator=gen).transpose(1, 2)
        else:
            t = torch.randn(b, h, s, d, generator=gen)
        return t.to(device=device, dtype=dtype)

    return rnd(hq, sq), rnd(hkv, sk), rnd(hkv, sk)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max(|ref|, tiny), in float64."""
    x, ref = x.double().cpu(), ref.double().cpu()
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30)) if ref.numel() else 0.0


def max_abs(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double().cpu(), ref.double().cpu()
    both_inf = torch.isinf(x) & torch.isinf(ref) & (torch.sign(x) == torch.sign(ref))
    diff = torch.where(both_inf, 0.0, (x - ref).abs())
    return float(diff.max()) if diff.numel() else 0.0


# ----------------------------------------------------------------------------------------------------------
# prompts and grids for the tiny-model tests


def left_pad(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` ``[B, max len]`` from token lists."""
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


SEGMENT = {"sys": 0, "img": 1, "user": 2}
"""Hand-written segment labels (flowkern.hf.segments' ids, written out)."""


def labelled_prompts(samples: list[list[tuple[str, list[int]]]], pad: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids``, ``attention_mask`` and hand-written labels (-1 = padding) from pieces
    ``(segment name, tokens)``."""
    rows, labels = [], []
    for pieces in samples:
        ids, lab = [], []
        for name, toks in pieces:
            ids += toks
            lab += [SEGMENT[name]] * len(toks)
        rows.append(ids)
        labels.append(lab)
    ids, mask = left_pad(rows, pad)
    width = ids.shape[1]
    lab = torch.tensor([[-1] * (width - len(r)) + r for r in labels])
    return ids, mask, lab


def raster(start: int, rows: int, cols: int, row_stride: int | None = None) -> torch.Tensor:
    """Sequence positions of a row-major token grid starting at ``start`` (``row_stride`` skips newline tokens)."""
    stride = cols if row_stride is None else row_stride
    return start + torch.arange(rows)[:, None] * stride + torch.arange(cols)[None, :]


# ---------------------------------------------------------------------------------------------------------------------
# model commands (flow, generate, cam, prune CLIs): one prompt, a word-level tokenizer that spells it, a tiny
# LLaVA-1.5 saved in the official format

CLI_WORDS = "USER ASSISTANT USER: ASSISTANT: : what is in the image ? a cat dog red blue yes no describe color".split()
"""The tokenizer's words: the chat template's and the prompt's (plus ``w0 ..`` filler words)."""

PROMPT = "what is in the image ?"
LAYERS = 4
"""Decoder layers of the tiny language models."""


def make_tokenizer(extra_special: tuple[str, ...] = ()) -> Any:
    """A word-level tokenizer of :data:`CLI_WORDS` with ``<image>`` (and ``extra_special``) as special tokens."""
    return word_tokenizer(CLI_WORDS, extra_special=extra_special)


def llm_config(tok: Any = None, *, model_type: str | None = "llama", **extra: Any) -> dict:
    """:func:`flowkern.hf.tiny.text_config` with :data:`LAYERS` layers and ``tok``'s vocabulary (default
    :func:`make_tokenizer`); ``model_type=None`` for families whose text config has its own class (Qwen2-VL)."""
    tok = make_tokenizer() if tok is None else tok
    return text_config(model_type, num_hidden_layers=LAYERS, vocab_size=len(tok), **extra)


def save_llava(path: str | os.PathLike, *, chat_template: str | None = CHAT_TEMPLATE, **text: Any) -> None:
    """A LLaVA-1.5 layout saved to ``path``: CLIP tower 8x8 / patch 2 (16 image tokens, CLS dropped), a Llama text
    model of :func:`llm_config` (``text``: more of its fields, e.g. ``max_position_embeddings``)."""
    save_tiny_llava(path, vision=clip_config(8, 2), text=llm_config(**text), words=CLI_WORDS,
                    chat_template=chat_template)


def save_photo(path: str | os.PathLike, *, seed: int = 0, size: tuple[int, int] = (30, 40)) -> None:
    """A random RGB picture ``size = (height, width)`` written to ``path``."""
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


# ---------------------------------------------------------------------------------------------------------------------
# eval: writers of small benchmark files in the official release formats (POPE JSON lines, ScienceQA
# problems.json + pid_splits.json, TextVQA_0.5.1_val.json, COCO instances/captions); answer files in LLaVA's format

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


# ---------------------------------------------------------------------------------------------------------------------
# eval: the tiny offline LLaVA the eval and sweep tests answer with, its images, and a slowed CLI subprocess for
# signal tests

EVAL_WORDS = ("Is there a dog cat car in the image? Answer question using single word or phrase. yes no Yes No "
         "Please describe this detail. Context: A. B. with option's letter from given choices directly.").split()
assert len(set(EVAL_WORDS)) == len(EVAL_WORDS)  # each word listed once (word_tokenizer would merge a repeat)


def save_eval_llava(path: Path) -> Path:
    """A LLaVA-1.5 layout (CLIP 8x8 / patch 2, Llama 4 x 32) whose vocabulary has the benchmark prompts' words."""
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=8,
                  patch_size=2, projection_dim=32)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, eos_token_id=None, initializer_range=0.3)
    save_tiny_llava(path, vision=vision, text=text, words=EVAL_WORDS)
    return path


def write_llava_pope(root: Path) -> Path:
    """Under ``root``: a tiny LLaVA (:func:`save_eval_llava` in ``llava/``: 4 text layers, 16 image tokens on a 4 x 4
    grid) and 6 POPE questions (``pope/``, split random) on 4 COCO-named images (``val2014/``); returns ``root``. The
    files the sweep, knockout and compare CLI tests run on."""
    save_eval_llava(root / "llava")
    for i in range(4):
        save_image(root / "val2014" / f"COCO_val2014_{i:012d}.jpg", i)
    objects = ["dog", "cat", "car", "red dog"]
    write_pope(root / "pope", "random", [(q, f"COCO_val2014_{q % 4:012d}.jpg", objects[q % 4],
                                          "yes" if q % 2 else "no") for q in range(1, 7)])
    return root


def save_image(path: Path, seed: int) -> Path:
    """A small random RGB image (size varies with the seed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (12 + seed % 5, 16, 3), dtype=np.uint8)).save(path)
    return path


def slowed_flowkern(module: str, argv: list[str], delay: float) -> list[str]:
    """The command line of ``flowkern ARGV`` in a subprocess whose ``<module>.generate_answers`` (``flowkern.eval.run``
    or ``flowkern.eval.sweep``) sleeps ``delay`` seconds per batch, so that a signal sent mid-run lands mid-run."""
    # SIGINT back to Python's default: a shell's background job (``cmd &``, nohup) starts with SIGINT ignored, and the
    # child would inherit that (the tests send Ctrl-C as a terminal would)
    code = ("import signal, sys, time\n"
            "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            f"import {module} as m\n"
            "_gen = m.generate_answers\n"
            "def slow(*a, **k):\n"
            f"    time.sleep({delay})\n"
            "    return _gen(*a, **k)\n"
            "m.generate_answers = slow\n"
            "from flowkern.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    return [sys.executable, "-c", code, *argv]


def signal_when(cmd: list[str], env: dict[str, str], ready: Callable[[], bool], sig: int) -> tuple[int, str]:
    """Run ``cmd`` and send it ``sig`` as soon as ``ready()`` holds (polled every 20 ms, for at most 90 s); returns
    its exit code and stderr. The process is killed if it outlives the test."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if ready():
                proc.send_signal(sig)
                break
            time.sleep(0.02)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


# ---------------------------------------------------------------------------------------------------------------------
# inputs: hostile image files (cut short, a decompression-bomb header, 16-bit / float / transparent pixels)

def save_truncated(path: Path, seed: int = 0, fmt: str = "PNG") -> Path:
    """A valid image file (:func:`save_image`'s pixels, 32 x 32) cut to its first half: its header reads, its
    pixels do not."""
    import io

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def save_bomb_header(path: Path, side: int = 20000) -> Path:
    """A PNG whose header claims ``side x side`` pixels (400 M by default: over twice PIL's decompression-bomb limit)
    and whose data is a few bytes: written by hand, nothing that big is ever allocated."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0"))
                     + chunk(b"IEND", b""))
    return path


def save_wide_image(path: Path, mode: str) -> Path:
    """A 16 x 16 image that ``convert("RGB")`` renders wrongly: ``"I;16"`` (16-bit values up to 65280), ``"F"``
    (floats in [0, 1], as TIFF) or ``"RGBA"`` (half transparent)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ramp = np.arange(256).reshape(16, 16)
    if mode == "I;16":
        Image.fromarray((ramp * 256).astype(np.uint16)).save(path)
    elif mode == "F":
        Image.fromarray((ramp / 255).astype(np.float32)).save(path)
    elif mode == "RGBA":
        rgba = np.zeros((16, 16, 4), dtype=np.uint8)
        rgba[..., 3] = np.where(ramp < 128, 0, 255)
        Image.fromarray(rgba).save(path)
    else:
        raise ValueError(mode)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# data: the lmms-lab parquet releases written small (the published column names and types, the hub's
# `huggingface` schema metadata so that the `datasets` library decodes the image column), laid out as on the hub

_HF_FEATURES = {"str": {"dtype": "string", "_type": "Value"}, "int": {"dtype": "int64", "_type": "Value"},
                "strs": {"feature": {"dtype": "string", "_type": "Value"}, "_type": "Sequence"},
                "image": {"_type": "Image"}}


def write_table(path: Path, columns: dict[str, tuple[str, list]], *, row_group_size: int = 2) -> Path:
    """A parquet file of ``{name: (kind, values)}`` (kind: str, int, strs, image: the image file's bytes or None)
    with row groups of ``row_group_size`` rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {"str": pa.string(), "int": pa.int64(), "strs": pa.list_(pa.string()),
             "image": pa.struct([("bytes", pa.binary()), ("path", pa.string())])}
    arrays = {}
    for name, (kind, values) in columns.items():
        if kind == "image":
            values = [None if v is None else {"bytes": v, "path": None} for v in values]
        arrays[name] = pa.array(values, type=types[kind])
    table = pa.table(arrays)
    features = {name: _HF_FEATURES[kind] for name, (kind, _) in columns.items()}
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_lmms_pope(root: Path, rows: list[dict], *, images: Path) -> Path:
    """lmms-lab/POPE's layout: subset ``default`` (``data/test-*.parquet``, every row) and subset ``Full`` (one
    file per category). ``rows``: dicts with question_id, image (a file name in ``images``), question, answer,
    category."""
    def columns(part: list[dict]) -> dict[str, tuple[str, list]]:
        return {"id": ("str", [str(i) for i in range(len(part))]),
                "question_id": ("str", [str(r["question_id"]) for r in part]),
                "question": ("str", [r["question"] for r in part]), "answer": ("str", [r["answer"] for r in part]),
                "image_source": ("str", [Path(r["image"]).stem for r in part]),
                "image": ("image", [(images / r["image"]).read_bytes() for r in part]),
                "category": ("str", [r["category"] for r in part])}

    write_table(root / "data" / "test-00000-of-00001.parquet", columns(rows))
    for category in sorted({r["category"] for r in rows}):
        part = [r for r in rows if r["category"] == category]
        write_table(root / "Full" / f"{category}-00000-of-00001.parquet", columns(part))
    return root


def write_datasets_cache(cache: Path, dataset_id: str, subset: str, split: str, parquet: Path, *,
                         build: str = "0" * 40) -> Path:
    """What ``datasets.load_dataset(dataset_id, subset)`` leaves in ``HF_DATASETS_CACHE`` (and reloads offline):
    ``ORG___NAME/<subset>/0.0.0/<build>/<name>-<split>.arrow`` (an Arrow stream) and ``dataset_info.json``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    org, name = dataset_id.split("/")
    builder = name.lower()
    folder = cache / f"{org}___{builder}" / subset / "0.0.0" / build
    folder.mkdir(parents=True, exist_ok=True)
    table = pq.read_table(parquet)
    with pa.OSFile(str(folder / f"{builder}-{split}.arrow"), "wb") as sink, \
            pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=4):
            writer.write_batch(batch)
    features = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]
    info = {"description": "", "citation": "", "homepage": "", "license": "", "features": features,
            "builder_name": "parquet", "dataset_name": builder, "config_name": subset,
            "version": {"version_str": "0.0.0", "major": 0, "minor": 0, "patch": 0},
            "splits": {split: {"name": split, "num_bytes": 0, "num_examples": table.num_rows,
                               "dataset_name": builder}}}
    (folder / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return folder


# ----------------------------------------------------------------------------------------------------------
# pruning oracles: padded batches of three families, and the language model run on its inputs with rows deleted
# (test_prune_predecoder.py, test_prune_schedule.py, test_prune_merge.py)

PRUNE_NEW_TOKENS = 4


def _prune_llava(layers: int):
    model = tiny_vlm("llava", layers=layers)
    r0 = [5, 6, 7] + [IMAGE_TOKEN] * 16 + [8, 9] + [IMAGE_TOKEN] * 16 + [10, 11, 12]  # two images: 32 image tokens
    r1 = [5, 6] + [IMAGE_TOKEN] * 16 + [9, 10, 11, 12]
    pv = torch.randn(3, 3, 8, 8)
    ids, mask = left_pad([r0, r1])
    b2 = dict(input_ids=ids, attention_mask=mask, pixel_values=pv)
    b1 = dict(input_ids=torch.tensor([r1]), attention_mask=torch.ones(1, len(r1), dtype=torch.long),
              pixel_values=pv[2:])
    return model, {1: b1, 2: b2}


def _prune_llava_next(layers: int):
    model = tiny_vlm("llava_next", layers=layers)
    sizes = torch.tensor([[6, 30], [20, 6]])
    n0, n1 = 16 + 2 * (8 + 1), 16 + 8 * (2 + 1)
    pv = torch.randn(2, 3, 3, 8, 8)
    r0 = [5, 6, 7] + [IMAGE_TOKEN] * n0 + [8, 9, 10]
    r1 = [5] + [IMAGE_TOKEN] * n1 + [8, 9, 10, 11]
    ids, mask = left_pad([r0, r1])
    b2 = dict(input_ids=ids, attention_mask=mask, pixel_values=pv, image_sizes=sizes)
    b1 = dict(input_ids=torch.tensor([r0]), attention_mask=torch.ones(1, len(r0), dtype=torch.long),
              pixel_values=pv[:1], image_sizes=sizes[:1])
    return model, {1: b1, 2: b2}


def _prune_qwen2_vl(layers: int):
    model = tiny_vlm("qwen2_vl", layers=layers)
    r0 = [5, 102] + [IMAGE_TOKEN] * 16 + [103, 8, 9, 10]
    r1 = [5, 6, 102] + [IMAGE_TOKEN] * 8 + [103, 8, 9]
    pv = torch.randn(64 + 32, 24)
    thw = torch.tensor([[1, 8, 8], [1, 4, 8]])
    ids, mask = left_pad([r0, r1])
    b2 = dict(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=thw,
              mm_token_type_ids=(ids == IMAGE_TOKEN).int())
    i1 = torch.tensor([r0])
    b1 = dict(input_ids=i1, attention_mask=torch.ones_like(i1), pixel_values=pv[:64], image_grid_thw=thw[:1],
              mm_token_type_ids=(i1 == IMAGE_TOKEN).int())
    return model, {1: b1, 2: b2}


def prune_batches(family: str, layers: int) -> tuple[Any, dict[int, dict[str, torch.Tensor]]]:
    """A tiny model of ``family`` (llava, llava_next, qwen2_vl; ``layers`` decoder layers, seeded) and its inputs:
    ``{1: one prompt, 2: a left-padded batch of two with different image-token counts}``."""
    torch.manual_seed(0)
    return {"llava": _prune_llava, "llava_next": _prune_llava_next, "qwen2_vl": _prune_qwen2_vl}[family](layers)


def lm_prompt_inputs(model: Any, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """What the language model gets at the unpruned prefill of generate: (inputs_embeds, attention_mask,
    position_ids) -- the model's own merge of the image features into the embeddings, its own positions."""
    seen = {}

    def grab(module, args, kw):
        seen.setdefault("kw", {k: kw.get(k) for k in ("inputs_embeds", "attention_mask", "position_ids")})

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model.generate(**kwargs, max_new_tokens=1, do_sample=False)
    finally:
        handle.remove()
    kw = seen["kw"]
    assert kw["position_ids"] is not None  # generate passes the positions; the oracle passes them on
    return kw["inputs_embeds"], kw["attention_mask"], kw["position_ids"]


def deleted_rows_inputs(model: Any, kwargs: dict, removed: torch.Tensor, update: Any = None) -> dict:
    """The oracle's inputs: the language model's prompt inputs with the ``removed`` rows deleted (bool [B, S]),
    left-padded (zero embeddings, mask 0), positions gathered; ``update(embeds)`` edits the embeddings first."""
    embeds, mask, pos = lm_prompt_inputs(model, kwargs)
    if mask is None:  # generate drops an all-ones mask
        mask = kwargs["attention_mask"]
    if update is not None:
        embeds = update(embeds)
    keep = mask.bool() & ~removed
    n = int(keep.sum(dim=1).max())
    B, _, D = embeds.shape
    e = torch.zeros(B, n, D)
    m = torch.zeros(B, n, dtype=torch.long)
    p = torch.zeros(*pos.shape[:-1], n, dtype=pos.dtype) if pos.dim() == 3 else torch.zeros(B, n, dtype=pos.dtype)
    for b in range(B):
        idx = torch.nonzero(keep[b]).flatten()
        e[b, n - idx.numel():] = embeds[b, idx]
        m[b, n - idx.numel():] = 1
        if pos.dim() == 3:
            p[:, b, n - idx.numel():] = pos[:, b, idx]
        else:
            p[b, n - idx.numel():] = pos[b if pos.shape[0] == B else 0, idx]
    return dict(inputs_embeds=e, attention_mask=m, position_ids=p)


def generate_on_deleted_rows(model: Any, kwargs: dict, removed: torch.Tensor, update: Any = None,
                             **extra: Any) -> Any:
    """The oracle: transformers' greedy ``generate`` on :func:`deleted_rows_inputs` (logits returned)."""
    with torch.no_grad():
        return model.generate(**deleted_rows_inputs(model, kwargs, removed, update), max_new_tokens=PRUNE_NEW_TOKENS,
                              do_sample=False, output_logits=True, return_dict_in_generate=True, **extra)


def generate_pruned(model: Any, kwargs: dict, shapes: list | None = None, **prune_kwargs: Any) -> tuple[Any, Any]:
    """Greedy generate under flowkern.prune; ``shapes`` collects the hidden-state shape entering decoder layer 0."""
    hook = None
    if shapes is not None:
        layer0 = model.model.language_model.layers[0]
        hook = layer0.register_forward_pre_hook(lambda m, a, kw: shapes.append(
            tuple((a[0] if a else kw["hidden_states"]).shape)), with_kwargs=True)
    try:
        with torch.no_grad(), flowkern.prune(model, **prune_kwargs) as p:
            out = model.generate(**kwargs, max_new_tokens=PRUNE_NEW_TOKENS, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
    finally:
        if hook is not None:
            hook.remove()
    return out, p


def assert_same_generation(got: Any, expect: Any, S: int, atol: float = 1e-5) -> None:
    assert torch.equal(got.sequences[:, S:], expect.sequences)
    for a, b in zip(got.logits, expect.logits, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


def removed_image_tokens(p: Any, kwargs: dict) -> torch.Tensor:
    img = (kwargs["input_ids"] == IMAGE_TOKEN) & kwargs["attention_mask"].bool()
    kept = torch.zeros_like(img)
    for b, pos in enumerate(p.kept_image_positions):
        kept[b, pos] = True
    assert not (kept & ~img).any()
    return img & ~kept
