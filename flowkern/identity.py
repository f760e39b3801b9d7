"""The settings identity of a result: every setting that can change an answer, recorded resolved, and the one check a
resume makes against it.

A command that writes answers records a flat ``settings`` dict (``run.json`` of ``flowkern eval``, ``sweep.json`` of
``flowkern sweep``) and refuses to continue a result recorded under other values (:func:`check_same`): answers of two
configurations are never mixed. The values are the resolved ones, so that equal records mean equal answers:

- ``model`` (the resolved folder, or the hub id), ``revision`` (the hub snapshot's commit, None for a folder) and
  ``weights`` (:func:`model_identity`: a digest of the checkpoint's small files -- config, tokenizer, processor, chat
  template -- in full and of each weights file's size and safetensors header; cheap, and changed by any re-save);
- ``dtype`` as loaded (``auto`` resolved: float32 on CPU, the checkpoint's on CUDA) and ``device``, the device
  *type* (``cpu`` / ``cuda``: the kernels and their rounding differ; which CUDA device does not matter);
- the prompts (:func:`digest` of the task's prompt texts: the prompt template and the question files' content);
- what the command adds: task options, pruning (:meth:`flowkern.plan.PruneSpec.to_dict`), and any later key
  (a knockout spec, a scorer) -- every key of the dict is compared, so a new setting is one more key.

Keys absent from an older record are reported as not recorded rather than guessed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["FLAGS", "flag", "model_identity", "model_folder", "runtime_identity", "digest", "differences",
           "check_same"]

FLAGS: dict[str, str] = {"revision": "--model (its revision)", "weights": "--model (its files: weights, config, "
                         "tokenizer, chat template)", "prompts": "--data (the prompts)", "seed": "--seed"}
"""The option named for a setting whose option is not ``--<key with - for _>``."""

_NOT_RECORDED = "not recorded"
_CONTENT_LIMIT = 32 << 20  # small files are hashed in full; larger ones (weights) by size and header
_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")


def flag(key: str, flags: Mapping[str, str] | None = None) -> str:
    """The option that sets ``key``: ``max_new_tokens`` -> ``--max-new-tokens`` unless :data:`FLAGS` (or ``flags``)
    says otherwise."""
    return {**FLAGS, **(flags or {})}.get(key) or "--" + key.replace("_", "-")


def model_folder(model: str) -> tuple[Path | None, str | None]:
    """The folder holding ``model``'s files and the hub revision: a local folder (revision None), or for a hub id the
    cached snapshot (its name is the commit); ``(None, None)`` when neither is found (loading will say so)."""
    path = Path(str(model)).expanduser()
    if path.is_dir():
        return path.resolve(), None
    if path.exists():
        return None, None
    try:
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(str(model), "config.json")
    except Exception:  # a malformed id: the loader reports it
        return None, None
    if not isinstance(config, str):  # not cached
        return None, None
    folder = Path(config).parent
    return folder, folder.name if folder.parent.name == "snapshots" else None


def _add_file(h: Any, path: Path, rel: str) -> None:
    size = path.stat().st_size
    h.update(f"{rel}\0{size}\0".encode())
    with open(path, "rb") as f:
        if path.suffix == ".safetensors":
            head = f.read(8)
            if len(head) == 8:
                n = struct.unpack("<Q", head)[0]
                h.update(f.read(min(n, _CONTENT_LIMIT)))
        elif size <= _CONTENT_LIMIT and path.suffix not in _WEIGHTS:
            h.update(f.read())


def model_identity(model: str) -> dict[str, Any]:
    """``model``, ``revision`` and ``weights`` of a checkpoint (see the module docstring); nothing is loaded.

    ``weights`` digests, over the folder's files (hidden ones skipped), each name and size, the full content of the
    small ones and each safetensors file's header (names, shapes, dtypes and offsets of every tensor); None when the
    model is not found."""
    folder, revision = model_folder(model)
    if folder is None:
        return {"model": str(model), "revision": None, "weights": None}
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if not any(part.startswith(".") for part in rel.split("/")) and path.is_file():
            st = path.stat()
            files.append((rel, st.st_size, st.st_mtime_ns))
    name = str(folder) if revision is None else str(model)
    return {"model": name, "revision": revision, "weights": _folder_digest(str(folder), tuple(files))}


@functools.lru_cache(maxsize=16)
def _folder_digest(folder: str, files: tuple[tuple[str, int, int], ...]) -> str:
    """The digest of ``files`` (name, size, mtime) of ``folder``: computed once per unchanged listing (a sweep asks
    for it at every point)."""
    h = hashlib.sha256()
    for rel, _size, _mtime in files:
        _add_file(h, Path(folder, rel), rel)
    return h.hexdigest()[:16]


def runtime_identity(model: str, device: str, dtype: str) -> dict[str, str]:
    """``device`` (the type: ``cpu`` / ``cuda``) and ``dtype`` (resolved: ``auto`` becomes what the model loads in)
    of a run; nothing is loaded.

    Raises:
        ValueError: an unknown device or dtype, or CUDA asked for where there is none (naming the option).
    """
    from flowkern.hf.loading import resolve_device, resolve_dtype

    dev = resolve_device(device)
    checkpoint = None
    folder, _ = model_folder(model)
    if folder is not None and (folder / "config.json").is_file():
        try:
            raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raw = {}
        if isinstance(raw, dict):
            text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else {}
            checkpoint = (raw.get("dtype") or raw.get("torch_dtype") or text.get("dtype")
                          or text.get("torch_dtype"))
    resolved = resolve_dtype(dtype, dev, checkpoint if isinstance(checkpoint, str) else None)
    return {"device": dev.type, "dtype": str(resolved).removeprefix("torch.")}


def digest(texts: Iterable[str]) -> str:
    """A short digest (16 hex digits) of a sequence of texts, e.g. a task's prompts."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()[:16]


def _normal(value: Any) -> Any:
    return json.loads(json.dumps(value, ensure_ascii=False, allow_nan=False))  # as it reads back from the record


def differences(recorded: Mapping[str, Any], current: Mapping[str, Any],
                flags: Mapping[str, str] | None = None) -> list[str]:
    """``"<option> was <recorded>, now <current>"`` for every key whose value differs (keys of either side; one
    absent from ``recorded`` is "not recorded")."""
    now = _normal(dict(current))
    keys = list(now) + [k for k in recorded if k not in now]
    out = []
    for k in keys:
        old, new = recorded.get(k, _NOT_RECORDED), now.get(k, _NOT_RECORDED)
        if old != new:
            out.append(f"{flag(k, flags)} was {old if old is _NOT_RECORDED else repr(old)}, now "
                       f"{new if new is _NOT_RECORDED else repr(new)}")
    return out


def check_same(recorded: Any, current: Mapping[str, Any], *, what: str, where: os.PathLike[str] | str,
               flags: Mapping[str, str] | None = None, error: type[ValueError] = ValueError) -> None:
    """Refuse to continue a result recorded under other settings: one line naming each differing setting, its
    recorded value and the new one.

    Args:
        recorded: the record's ``settings`` (anything but a dict is refused as unreadable).
        current: this run's settings.
        what: the result, as in ``"the answers in DIR were generated"``; ``where``: the record file.

    Raises:
        error: (default ``ValueError``) on any difference, naming ``--out``.
    """
    if not isinstance(recorded, dict):
        raise error(f"--out: {where}: no 'settings' object; pass --overwrite to start afresh")
    diffs = differences(recorded, current, flags)
    if diffs:
        raise error(f"--out: {what} under other settings ({'; '.join(diffs)}): use another --out, rerun with the "
                    "same settings to resume, or pass --overwrite to start afresh")
