"""Pieces the benchmark scripts share: device label and synchronisation, peak-RSS probes, LLaVA-1.5 configs, reports.

The scripts run as ``python benchmarks/bench_x.py``, so this folder is on ``sys.path`` and they import from here with
``from _common import ...``. ``transformers`` and ``flowkern`` are imported only by the functions that need them, so
importing this module costs no more than ``torch`` (``bench_cam.py`` imports ``flowkern`` late on purpose, and
``bench_attention.py`` / ``bench_compact.py`` do not need ``transformers``).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import LlavaConfig, LlavaForConditionalGeneration

RESULTS = Path(__file__).resolve().parent / "results"

# --------------------------------------------------------------------------------------------- device


def resolve_device(choice: str) -> str:
    """``"cpu"`` or ``"cuda"`` from a ``--device`` value (``"auto"``: CUDA when there is one); exits without a GPU."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if choice == "auto" else choice
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return device


def device_label(device: str) -> str:
    """The results-file label: ``cpu-<n>core`` on CPU, else the GPU's model tag (``h100``, ``h200``, ...)."""
    if device == "cpu":
        return f"cpu-{os.cpu_count()}core"
    name = torch.cuda.get_device_name().lower()
    for tag in ("h200", "h100", "a100", "l40", "4090"):
        if tag in name:
            return tag
    return name.replace(" ", "-")


def sync(device: str) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def cuda_peak_mib(fn: Callable[[], Any]) -> dict:
    """Run ``fn()`` on a cleared CUDA allocator; ``peak_extra_mib`` (peak growth over what was allocated before)
    and ``peak_total_mib``."""
    import gc

    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return dict(peak_extra_mib=(peak - base) / 2**20, peak_total_mib=peak / 2**20)


# --------------------------------------------------------------------------------------------- peak RSS (CPU)


def status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...); ``OSError`` where there is none."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


def reset_peak_rss_kib(*, fallback: bool = True) -> int:
    """Reset the process's peak RSS to the current RSS (Linux: ``clear_refs`` 5) and return it in KiB.

    Not Linux: with ``fallback``, the lifetime high-water mark (over-counts nothing, may under-count); without it,
    the ``OSError``.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return status_kib("VmRSS")
    except OSError:
        if not fallback:
            raise
        return max_rss_kib()


def peak_rss_kib(*, fallback: bool = True) -> int:
    """The process's peak RSS (``VmHWM``) in KiB since the last :func:`reset_peak_rss_kib`.

    Not Linux: with ``fallback``, the lifetime high-water mark; without it, the ``OSError``.
    """
    try:
        return status_kib("VmHWM")
    except OSError:
        if not fallback:
            raise
        return max_rss_kib()


def max_rss_kib() -> int:
    """The process's lifetime peak RSS from ``getrusage`` (KiB on Linux; never reset)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def max_rss_mib() -> float:
    """:func:`max_rss_kib` in MiB."""
    return max_rss_kib() / 1024


# --------------------------------------------------------------------------------------------- LLaVA-1.5 models

# Named geometries for :func:`llava_15_config`: overrides of its defaults (the published LLaVA-1.5-7B). All keep
# its token counts: 336 px / patch 14 = 576 image tokens per image, vocab 32064.
LLAVA_15_SIZES: dict[str, dict[str, Any]] = {
    # llava-hf/llava-1.5-7b-hf: bench_trace / bench_generate on GPU (bench_cam's "llava-1.5-7b", without pad token)
    "7b": {},
    # bench_trace on CPU: a 2-layer tower of width 256, 4 text layers of width 512 (8 heads of 64)
    "cpu": dict(vision_hidden=256, vision_intermediate=1024, vision_layers=2, vision_heads=4, projection_dim=256,
                hidden=512, intermediate=1376, layers=4, heads=8),
    # bench_generate on CPU: a 1-layer tower of width 128, 8 text layers of width 256, features of the last layer
    "tiny": dict(vision_hidden=128, vision_intermediate=512, vision_layers=1, vision_heads=4, projection_dim=128,
                 hidden=256, intermediate=688, layers=8, heads=4, vision_feature_layer=-1),
    # bench_cam on CPU: a 2-layer tower of width 64, 32 text layers of width 256; LlamaConfig's default RMSNorm eps
    "cpu-reduced": dict(vision_hidden=64, vision_intermediate=128, vision_layers=2, vision_heads=2, projection_dim=64,
                        hidden=256, intermediate=688, layers=32, heads=4, rms_norm_eps=1e-6),
}


def llava_15_config(size: str = "7b", **overrides: Any) -> LlavaConfig:
    """A LLaVA-1.5 config: the geometry ``LLAVA_15_SIZES[size]``, then ``overrides`` (keywords of
    :func:`_llava_15_config`, e.g. ``pad_token_id=None``), over the published 7B defaults."""
    if size not in LLAVA_15_SIZES:
        raise ValueError(f"unknown size {size!r}: one of {', '.join(map(repr, LLAVA_15_SIZES))}")
    return _llava_15_config(**{**LLAVA_15_SIZES[size], **overrides})


def _llava_15_config(*, vision_hidden: int = 1024, vision_intermediate: int = 4096, vision_layers: int = 24,
                     vision_heads: int = 16, projection_dim: int = 768, hidden: int = 4096, intermediate: int = 11008,
                     layers: int = 32, heads: int = 32, rms_norm_eps: float = 1e-5, pad_token_id: int | None = 32001,
                     vision_feature_layer: int = -2) -> LlavaConfig:
    """The defaults are the geometry ``llava-hf/llava-1.5-7b-hf`` publishes: CLIP ViT-L/14 at 336 px (24 layers,
    hidden 1024, 16 heads, MLP 4096, quick-GELU, LayerNorm eps 1e-5; 24 x 24 = 576 patch tokens, CLS dropped by
    ``vision_feature_select_strategy="default"``, features from layer -2), 2-layer GELU projector, Llama-2-7B (32
    layers, hidden 4096, 32 heads, MLP 11008, RMSNorm eps 1e-5, 4096 positions), vocab 32064 with image token 32000,
    pad 32001, BOS 1, EOS 2. ``pad_token_id=None``: no pad token in the text config nor in the LLaVA config."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=vision_intermediate,
                              num_hidden_layers=vision_layers, num_attention_heads=vision_heads, image_size=336,
                              patch_size=14, projection_dim=projection_dim, hidden_act="quick_gelu",
                              layer_norm_eps=1e-5)
    text = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, vocab_size=32064,
                       max_position_embeddings=4096, rms_norm_eps=rms_norm_eps, pad_token_id=pad_token_id,
                       bos_token_id=1, eos_token_id=2)
    pad = {} if pad_token_id is None else dict(pad_token_id=pad_token_id)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, projector_hidden_act="gelu",
                       vision_feature_select_strategy="default", vision_feature_layer=vision_feature_layer, **pad)


def build_model(size: str, device: str, dtype: torch.dtype) -> LlavaForConditionalGeneration:
    """``llava_15_config(size)`` with random weights (seed 0) on ``device`` in ``dtype``, SDPA attention, eval mode;
    end-of-sequence disabled so that ``generate`` always decodes ``max_new_tokens`` steps (the project's one
    tiny-model builder, :func:`flowkern.hf.tiny.build_model`)."""
    from flowkern.hf.tiny import build_model as build

    return build(llava_15_config(size), seed=0, device=device, dtype=dtype, attn_implementation="sdpa",
                 decode_all=True)


def model_summary(model: LlavaForConditionalGeneration, size: str, *, vocab: bool = False) -> dict:
    """The report's ``model`` entry: size name, text and vision geometry (with the vocabulary size if ``vocab``),
    image tokens per image and the parameter count."""
    t, v = model.config.text_config, model.config.vision_config
    return dict(size=size, text_layers=t.num_hidden_layers, hidden=t.hidden_size, heads=t.num_attention_heads,
                **(dict(vocab=t.vocab_size) if vocab else {}), vision_layers=v.num_hidden_layers,
                vision_hidden=v.hidden_size, image_tokens_per_image=(v.image_size // v.patch_size) ** 2,
                parameters=sum(p.numel() for p in model.parameters()))


# --------------------------------------------------------------------------------------------- reports


def llava_caption(report: dict) -> str:
    """First part of a LLaVA benchmark table's caption: machine, versions, dtype, backend and model geometry
    (from :func:`make_report` with transformers and :func:`model_summary`); callers append the workload."""
    m = report["model"]
    return (f"{report['device']} ({report['device_name']}, {report['threads']} threads, torch {report['torch']}, "
            f"transformers {report['transformers']}, {report['dtype']}, backend {report['backend']}); LLaVA-1.5 "
            f"{m['size']} config, random weights: {m['text_layers']} text layers x {m['hidden']}, ")


def make_report(label: str, device: str, *, with_transformers: bool = False, setup: dict | None = None,
                **fields: Any) -> dict:
    """A results record: the machine (``device`` label, ``device_name``, ``threads``), the versions (``torch``,
    ``transformers`` if ``with_transformers``, ``flowkern``) and flowkern's ``backend`` for ``device``, then the
    entries of ``setup`` (dtype, model, ...), then ``command`` and ``date``, then ``fields`` in the order given."""
    import flowkern

    gpu = device == "cuda"
    report = dict(device=label,
                  device_name=torch.cuda.get_device_name() if gpu else platform.processor() or platform.machine(),
                  threads=torch.get_num_threads(), torch=torch.__version__)
    if with_transformers:
        import transformers

        report["transformers"] = transformers.__version__
    report.update(flowkern=flowkern.__version__, backend=flowkern.ops.backend_for(torch.device(device)))
    report.update(setup or {})
    report.update(command=" ".join([Path(sys.executable).name, *sys.argv]), date=time.strftime("%Y-%m-%d"))
    report.update(fields)
    return report


def write_json(path: Path, record: dict, indent: int = 2) -> None:
    """Write ``record`` as JSON (and a final newline) to ``path``, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=indent) + "\n")


def write_report(report: dict, out: Path | None, name: str | None, markdown_table: Callable[[dict], str]) -> None:
    """Write ``report`` to ``out`` (default ``results/<device label>[-name].json``), then print its Markdown table
    and the path written."""
    out = out or RESULTS / (f"{report['device']}-{name}.json" if name else f"{report['device']}.json")
    write_json(out, report)
    print()
    print(markdown_table(report))
    print(f"\nwrote {out}")

# --------------------------------------------------------------------------------------------- saved POPE runs
# (bench_eval, bench_sweep): a saved tiny LLaVA with LLaVA-1.5's 576 image tokens and a POPE question file

OBJECTS = ("dog", "cat", "car", "person", "chair", "bottle", "bus", "cup")
WORDS = ("Is there a in the image? Answer question using single word or phrase. yes no " + " ".join(OBJECTS)).split()


def save_pope_model(path: Path, size: str = "tiny") -> None:
    """The ``size`` geometry (default ``"tiny"``: 8 text layers) as a saved model + processor, 576 image tokens per
    image (CLIP 336 px / 14 px patches), with a word tokenizer covering the POPE prompts of :func:`save_pope`."""
    from flowkern.hf.tiny import save_tiny_llava

    g = LLAVA_15_SIZES[size]
    vision = dict(hidden_size=g["vision_hidden"], intermediate_size=g["vision_intermediate"],
                  num_hidden_layers=g["vision_layers"], num_attention_heads=g["vision_heads"], image_size=336,
                  patch_size=14, projection_dim=g["projection_dim"], hidden_act="quick_gelu")
    text = dict(hidden_size=g["hidden"], intermediate_size=g["intermediate"], num_hidden_layers=g["layers"],
                num_attention_heads=g["heads"], num_key_value_heads=g["heads"], max_position_embeddings=4096,
                eos_token_id=None)
    save_tiny_llava(path, vision=vision, text=text, words=WORDS, vision_feature_layer=g["vision_feature_layer"])


def save_pope(root: Path, questions: int) -> tuple[Path, Path]:
    """``coco_pope_random.json`` with ``questions`` questions over 8 images, and the image folder."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = root / "val2014"
    images.mkdir(parents=True)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (336, 336, 3), dtype=np.uint8)).save(images / f"COCO_val2014_{i:012d}.jpg")
    data = root / "pope"
    data.mkdir()
    with open(data / "coco_pope_random.json", "w") as f:
        for q in range(1, questions + 1):
            f.write(json.dumps({"question_id": q, "image": f"COCO_val2014_{q % 8:012d}.jpg",
                                "text": f"Is there a {OBJECTS[(q * 3) % len(OBJECTS)]} in the image?",
                                "label": "yes" if q % 2 else "no"}) + "\n")
    return data, images
