"""The options of ``flowkern demo`` (:class:`DemoConfig`), how much work a run does (:class:`DemoSizes`), the four
task analogues (:data:`TASKS`) and the check of every option before any work (:func:`check_config`)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DemoTask", "DemoSizes", "DemoConfig", "TASKS", "FULL", "QUICK", "REPORT_FILE", "SUMMARY_FILE",
           "check_config", "tolerance_for"]

REPORT_FILE = "report.html"
SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class DemoTask:
    """One task analogue of the demo.

    Attributes:
        world: the :mod:`flowkern.shapes` task name (``"caption"``).
        loader: the :mod:`flowkern.eval` task that reads and scores it (``"chair"``).
        label: the name shown in the report.
        kind: what it asks of the model, in words.
    """

    world: str
    loader: str
    label: str
    kind: str


TASKS: tuple[DemoTask, ...] = (
    DemoTask("pope", "pope", "shapes-POPE", "perception: is this object in the image?"),
    DemoTask("sqa", "sqa", "shapes-SQA", "reasoning: spatial relations, counts, colours, context"),
    DemoTask("textvqa", "textvqa", "shapes-TextVQA", "reading the label in the image"),
    DemoTask("caption", "chair", "shapes-CHAIR", "captioning, scored for hallucinated objects"),
)
"""The four tasks, in report order."""


@dataclass(frozen=True)
class DemoSizes:
    """How much work a run does.

    Attributes:
        images: shapes images per task (POPE asks 6 questions per image: 3 splits x yes/no; the others 1).
        trace: questions per task traced for the attention shares (evenly spread over the set).
        map_examples: examples per task drawn as answer -> image attention maps.
        cam_examples: examples per task explained by LLaVA-CAM.
        cam_samples: SmoothGrad copies per LLaVA-CAM.
        speed_repeats: timed repeats per speed point (after one warm-up; medians reported).
        speed_new_tokens: tokens decoded per timed run (end-of-sequence suppressed).
        speed_batches: batch sizes timed.
        batch_size: questions per ``generate`` in the sweeps and the traces.
    """

    images: Mapping[str, int]
    trace: int
    map_examples: int
    cam_examples: int
    cam_samples: int
    speed_repeats: int
    speed_new_tokens: int = 16
    speed_batches: tuple[int, ...] = (1, 16)
    batch_size: int = 16


FULL = DemoSizes(images={"pope": 50, "sqa": 200, "textvqa": 200, "caption": 100}, trace=32, map_examples=3,
                 cam_examples=3, cam_samples=8, speed_repeats=5)
"""``flowkern demo``: 300 POPE questions, 200 SQA, 200 TextVQA, 100 captions."""

QUICK = DemoSizes(images={"pope": 8, "sqa": 32, "textvqa": 32, "caption": 16}, trace=8, map_examples=2,
                  cam_examples=2, cam_samples=4, speed_repeats=2)
"""``flowkern demo --quick``: 48 POPE questions, 32 SQA, 32 TextVQA, 16 captions."""


@dataclass(frozen=True)
class DemoConfig:
    """The options of ``flowkern demo``.

    Attributes:
        out: the report folder (replaced as a whole; a previous result only with ``overwrite``).
        model: ``"demo"`` (the shipped model) or a directory of another shapes-trained model.
        quick: :data:`QUICK` sizes instead of :data:`FULL` (ignored when ``sizes`` is given).
        sizes: explicit sizes.
        seed: seed of the shapes sets (the same seed draws the same sets on every machine).
        keep: image tokens kept by the top-K (attention) and random-control sweeps (1 .. image tokens - 1).
        tolerance: cliff tolerance in points for every task; None: per task ``max(1, 100 / n)``.
        threads: torch CPU threads during the run (None: leave torch's setting; 1 is fastest for this tiny model
            on a shared machine).
        device: ``"cpu"``, ``"cuda"``, ``"auto"``.
        overwrite: replace a previous report in ``out``.
    """

    out: str | os.PathLike[str] = "runs/demo"
    model: str = "demo"
    quick: bool = False
    sizes: DemoSizes | None = None
    seed: int = 1000
    keep: int = 16
    tolerance: float | None = None
    threads: int | None = 1
    device: str = "cpu"
    overwrite: bool = False

    def resolved_sizes(self) -> DemoSizes:
        """``sizes``, or :data:`QUICK` / :data:`FULL` by ``quick``."""
        return self.sizes or (QUICK if self.quick else FULL)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_config(config: DemoConfig) -> Path:
    """Check every option before any work; return the absolute report folder.

    Raises:
        ValueError: naming the option (``--keep``, ``--threads``, ``--tolerance``, ``--out``, ...).
    """
    from flowkern import _io

    sizes = config.resolved_sizes()
    if not _is_int(config.seed):
        raise ValueError(f"--seed {config.seed!r}: expected an integer")
    if not _is_int(config.keep) or config.keep < 1:
        raise ValueError(f"--keep {config.keep!r}: expected a number of image tokens >= 1")
    if config.threads is not None and (not _is_int(config.threads) or config.threads < 1):
        raise ValueError(f"--threads {config.threads!r}: expected an integer >= 1")
    if config.tolerance is not None and (isinstance(config.tolerance, bool) or not isinstance(
            config.tolerance, int | float) or not math.isfinite(config.tolerance) or config.tolerance < 0):
        raise ValueError(f"--tolerance {config.tolerance!r}: expected a number of points >= 0")
    missing = [t.world for t in TASKS if t.world not in sizes.images]
    if missing:
        raise ValueError(f"sizes.images: no count for {', '.join(missing)}")
    for name, value in [*(("images[" + k + "]", v) for k, v in sizes.images.items()), ("trace", sizes.trace),
                        ("cam_samples", sizes.cam_samples), ("speed_repeats", sizes.speed_repeats),
                        ("speed_new_tokens", sizes.speed_new_tokens), ("batch_size", sizes.batch_size)]:
        if not _is_int(value) or value < 1:
            raise ValueError(f"sizes.{name} {value!r}: expected an integer >= 1")
    for name, value in (("map_examples", sizes.map_examples), ("cam_examples", sizes.cam_examples)):
        if not _is_int(value) or value < 0:
            raise ValueError(f"sizes.{name} {value!r}: expected an integer >= 0")
    if not sizes.speed_batches or any(not _is_int(b) or b < 1 for b in sizes.speed_batches):
        raise ValueError(f"sizes.speed_batches {sizes.speed_batches!r}: expected batch sizes >= 1")
    return _io.check_output_dir(config.out, overwrite=config.overwrite, what="--out", kind="demo")


def tolerance_for(config: DemoConfig, n: int) -> float:
    """The cliff tolerance in points of a task with ``n`` questions: ``config.tolerance``, else the larger of 1 point
    and one question's worth, ``100 / n``."""
    if config.tolerance is not None:
        return float(config.tolerance)
    return max(1.0, 100.0 / max(1, n))
