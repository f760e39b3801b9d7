"""A sweep's folder: its layout (file names), ``sweep.json`` (the settings a rerun must share), ``results.jsonl``
(one record per finished point), and the outputs written once the points are scored (``summary.csv``,
``cliff.json``, ``sweep.png``). Every write is atomic; only process 0 writes."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flowkern.eval.sweep.cliff import cliff_report, within
from flowkern.eval.sweep.dist import Dist
from flowkern.eval.sweep.points import (
    FLAGS,
    MAIN_METRIC,
    Point,
    SweepConfig,
    SweepResult,
    SweepUsageError,
    main_rank,
)
from flowkern.identity import check_same
from flowkern.outdir import Claim, OutputError, claim

__all__ = ["RESULTS_FILE", "SUMMARY_FILE", "CLIFF_FILE", "FIGURE_FILE", "SWEEP_FILE", "POINTS_DIR", "SHARDS_DIR",
           "claim_out", "start_sweep", "read_results", "write_outputs", "checkpoint_layers", "atomic_savefig"]

RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.csv"
CLIFF_FILE = "cliff.json"
FIGURE_FILE = "sweep.png"
SWEEP_FILE = "sweep.json"
POINTS_DIR = "points"
SHARDS_DIR = ".shards"


def checkpoint_layers(model: str) -> int | None:
    """Decoder layers from a checkpoint's config.json (a model directory or a hub id in the local Hugging Face
    cache; no weights loaded), or None when that file or number is not found (the model must be loaded to know)."""
    from huggingface_hub import try_to_load_from_cache

    from flowkern.hf.models import ADAPTERS

    path = Path(str(model)).expanduser()
    config_file: Any = path / "config.json" if path.is_dir() else None
    if config_file is None and not path.exists():
        with contextlib.suppress(Exception):  # a malformed hub id: left to the loader's message
            config_file = try_to_load_from_cache(str(model), "config.json")
    if not isinstance(config_file, str | os.PathLike) or not Path(config_file).is_file():
        return None
    try:
        raw = json.loads(Path(config_file).read_text())
    except (OSError, ValueError):
        return None
    for adapter in ADAPTERS.values():
        if isinstance(raw, dict) and raw.get("model_type") in adapter.model_types:
            n = (raw.get(adapter.text_config_key) or {}).get("num_hidden_layers")
            return int(n) if n is not None else None
    return None


def claim_out(config: SweepConfig, dist: Dist) -> Claim | None:
    """Process 0 claims the sweep folder (:func:`flowkern.outdir.claim`, kind ``sweep``: one job at a time, never
    another kind of folder, a probe write first); the other processes of a torchrun job write inside it, into their
    shard folders, under that claim. Returns process 0's claim (None elsewhere); release it when the sweep ends.

    Raises:
        SweepUsageError: on every process, the one-line refusal of process 0.
    """
    owned, error = None, None
    if dist.index == 0:
        try:
            owned = claim(config.out, "sweep", overwrite=config.overwrite)
        except OutputError as exc:
            error = str(exc)
    error = dist.broadcast(error)
    if error is not None:
        raise SweepUsageError(error)
    return owned



def read_results(path: Path) -> dict[str, dict[str, Any]]:
    """The last record per point of a results.jsonl (a torn last line is ignored)."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    data = data[: data.rfind(b"\n") + 1]
    out = {}
    for raw in data.split(b"\n"):
        if raw.strip():
            with contextlib.suppress(json.JSONDecodeError):
                obj = json.loads(raw)
                out[obj["point"]] = obj
    return out



def start_sweep(out: Path, config: SweepConfig, dist: Dist, settings: dict[str, Any],
                flags: dict[str, str] | None = None) -> None:
    """Refuse other settings in ``out``; (re)write sweep.json; ``overwrite`` clears the sweep's files (process 0).
    ``flags``: the options of settings this command names otherwise (:func:`flowkern.identity.flag`).

    Raises:
        SweepUsageError: other settings, an unreadable sweep.json, or points without a sweep.json.
    """
    from flowkern._io import atomic_write_json

    path = out / SWEEP_FILE
    if config.overwrite:
        if dist.index == 0:
            for name in (POINTS_DIR, SHARDS_DIR):
                shutil.rmtree(out / name, ignore_errors=True)
            for name in (RESULTS_FILE, SUMMARY_FILE, CLIFF_FILE, FIGURE_FILE, SWEEP_FILE):
                with contextlib.suppress(FileNotFoundError):
                    (out / name).unlink()
        dist.barrier()
    elif path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            raise SweepUsageError(f"--out: {path}: not valid JSON; pass --overwrite to start afresh") from None
        check_same(old.get("settings") if isinstance(old, dict) else None, settings, what=f"the sweep in {out} was run",
                   where=path, flags={**FLAGS, **(flags or {})}, error=SweepUsageError)
    elif (out / POINTS_DIR).is_dir() and any((out / POINTS_DIR).iterdir()):
        raise SweepUsageError(f"--out: {out} has points but no {SWEEP_FILE}: pass --overwrite to start afresh")
    dist.barrier()
    if dist.index == 0:
        from flowkern import _version

        atomic_write_json(path, {"settings": settings, "flowkern": _version.__version__,
                                 "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    dist.barrier()


def atomic_savefig(fig: Any, path: Path, *, dpi: int = 120) -> None:
    """Write a matplotlib figure to ``path`` as PNG atomically (a hidden temporary file beside it, then
    :func:`os.replace`; removed on error)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # a leftover's name: outdir
    try:
        with os.fdopen(fd, "wb") as handle:
            fig.savefig(handle, dpi=dpi, format="png")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0o600 -> the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_outputs(out: Path, config: SweepConfig, dist: Dist, done: dict[str, dict[str, Any]],
                  layers: Sequence[int], series: Sequence[tuple[str, str]], search: dict[str, Any],
                  skipped: bool) -> SweepResult:
    """Write summary.csv, cliff.json and sweep.png (process 0) from the scored points in ``done`` (point name ->
    results.jsonl record); every process gets the same :class:`SweepResult` back.

    Args:
        layers: the main series' layers; ``series``: ``(rank, "main" | "control")`` of each series.
        search: the search's record (:func:`flowkern.eval.sweep.cliff.search_cliff`), kept in cliff.json.
        skipped: layer 0 was left out of the main series (its rank cannot rank before the decoder,
            :func:`flowkern.eval.sweep.points.ranks_at`).
    """
    from flowkern._io import atomic_write_json, atomic_write_text

    metric, higher = MAIN_METRIC[config.task]
    base = done["baseline"]["value"]
    curves: dict[str, dict[int, float]] = {}
    for r, kind in series:
        key = "main" if kind == "main" else r
        curves[key] = {x: done[n]["value"] for x in layers if (n := Point(x, r, kind, config.prune.keep).name) in done}
    curve = curves.pop("main")
    cliff = cliff_report(curve, base, tolerance=config.tolerance, higher_is_better=higher)
    cliff = {"task": config.task, "metric": metric, "keep": config.prune.keep, "rank": main_rank(config),
             "layers": "0-based decoder layer L = first layer without the image (the paper's layer L+1)",
             **cliff, "search": search,
             "controls": {r: cliff_report(c, base, tolerance=config.tolerance, higher_is_better=higher)
                          ["cliff_layer"] for r, c in curves.items()},
             "control_curves": {r: {str(x): v for x, v in sorted(c.items())} for r, c in curves.items()}}
    if skipped:
        cliff["skipped"] = f"layer 0 (rank {main_rank(config)!r} with keep != 0 needs layer L-1 to rank by)"
    files = {"results": out / RESULTS_FILE, "summary": out / SUMMARY_FILE, "cliff": out / CLIFF_FILE,
             "figure": out / FIGURE_FILE}
    records = [done["baseline"]] + [done[n] for r, k in series for x in layers
                                    if (n := Point(x, r, k, config.prune.keep).name) in done]
    if dist.index == 0:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["point", "series", "layer", "rank", "keep", "n", metric, "delta_points", "within_tolerance"])
        for r in records:
            delta = (r["value"] - base) * 100.0
            w.writerow([r["point"], r["series"], "" if r["layer"] is None else r["layer"], r["rank"] or "",
                        "" if r["keep"] is None else r["keep"], r["n"], f"{r['value']:.6f}", f"{delta:.4f}",
                        within(r["value"], base, config.tolerance)])
        atomic_write_text(files["summary"], buf.getvalue())
        atomic_write_json(files["cliff"], cliff)
        from flowkern.viz import plot_sweep

        fig = plot_sweep(curve, base, controls=curves, cliff=cliff["cliff_layer"], tolerance=config.tolerance,
                         metric=metric, title=f"{config.task}: {Path(str(config.model).rstrip('/')).name}, "
                                                    f"keep={config.prune.keep}")
        atomic_savefig(fig, files["figure"])
    return SweepResult(out=out, baseline=base, curve=curve, controls=curves, cliff=cliff, points=records,
                       generated=0, seconds=0.0, files=files)
