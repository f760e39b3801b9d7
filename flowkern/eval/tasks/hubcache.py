"""Dataset ids (``lmms-lab/POPE``) resolved in the local Hugging Face caches, offline: nothing here opens a network
connection or imports a library that might.

Where it looks, in order (the same variables ``huggingface_hub`` and ``datasets`` read):

1. the hub cache — ``$HF_HUB_CACHE``, else ``$HUGGINGFACE_HUB_CACHE``, else ``$HF_HOME/hub``, else
   ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub`` — where ``huggingface-cli download
   --repo-type dataset ORG/NAME`` and ``datasets.load_dataset`` put a dataset repository's files:
   ``datasets--ORG--NAME/snapshots/<revision>/<files as in the repository>``, with ``refs/<branch>`` holding the
   revision a branch points at;
2. the ``datasets`` cache — ``$HF_DATASETS_CACHE``, else ``$HF_HOME/datasets``, else
   ``$XDG_CACHE_HOME/huggingface/datasets``, else ``~/.cache/huggingface/datasets`` — where ``load_dataset`` writes
   its Arrow copies: ``ORG___NAME/<subset>/<version>/<hash>/<name>-<split>[-NNNNN-of-NNNNN].arrow``.

A revision is chosen with ``ORG/NAME@REVISION`` (a branch name or a commit hash, full or a unique prefix); without
one, ``refs/main`` (else the only snapshot, else the newest one).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DatasetLocation", "is_dataset_id", "resolve_dataset", "hub_cache_dir", "datasets_cache_dir"]

_ID = re.compile(r"^(?P<org>[A-Za-z0-9][\w.-]*)/(?P<name>[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w./-]+))?$")


@dataclass(frozen=True)
class DatasetLocation:
    """Where a dataset id was found: the folder holding its files, the cache kind and the revision (a commit hash
    for the hub cache; None for the ``datasets`` cache, whose folders carry no revision)."""

    dataset_id: str
    root: Path
    cache: str
    revision: str | None


def _home_cache() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg).expanduser() / "huggingface" if xdg else Path("~/.cache/huggingface").expanduser()


def hub_cache_dir() -> Path:
    """The hub cache folder the environment selects (see the module docstring)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return _home_cache() / "hub"


def datasets_cache_dir() -> Path:
    """The ``datasets`` library's cache folder the environment selects (see the module docstring)."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "datasets"
    return _home_cache() / "datasets"


def is_dataset_id(data: str | os.PathLike[str]) -> bool:
    """True for ``ORG/NAME`` (optionally ``@REVISION``) that is not an existing local path."""
    text = os.fspath(data)
    return bool(_ID.match(text)) and not Path(text).expanduser().exists()


def _snapshot(repo: Path, revision: str | None) -> tuple[Path, str] | None:
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    names = sorted(p.name for p in snapshots.iterdir() if p.is_dir())
    if not names:
        return None
    wanted = revision or "main"
    ref = repo / "refs" / wanted
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
        if commit in names:
            return snapshots / commit, commit
    if revision is None:
        if len(names) == 1:
            return snapshots / names[0], names[0]
        newest = max(names, key=lambda n: (snapshots / n).stat().st_mtime)
        return snapshots / newest, newest
    matches = [n for n in names if n.startswith(revision)]
    if len(matches) == 1:
        return snapshots / matches[0], matches[0]
    return None


def resolve_dataset(dataset_id: str) -> DatasetLocation:
    """The local folder of ``ORG/NAME[@REVISION]`` in the hub cache, else in the ``datasets`` cache.

    Raises:
        FileNotFoundError: one line naming the folders looked in and the command that downloads the dataset.
        ValueError: not a dataset id.
    """
    m = _ID.match(dataset_id)
    if m is None:
        raise ValueError(f"--data {dataset_id!r}: not a dataset id (ORG/NAME[@REVISION]) nor an existing path")
    org, name, revision = m.group("org"), m.group("name"), m.group("rev")
    plain = f"{org}/{name}"
    hub = hub_cache_dir() / f"datasets--{org}--{name}"
    found = _snapshot(hub, revision)
    if found is not None:
        return DatasetLocation(plain, found[0], "hub", found[1])
    looked = [str(hub)]
    cache = datasets_cache_dir()
    if revision is None and cache.is_dir():
        wanted = f"{org}___{name}".lower()
        for folder in sorted(cache.iterdir()):
            if folder.is_dir() and folder.name.lower() == wanted:
                return DatasetLocation(plain, folder, "datasets", None)
        looked.append(str(cache / f"{org}___{name}"))
    at = f" at revision {revision}" if revision else ""
    rev = f" --revision {revision}" if revision else ""
    raise FileNotFoundError(f"--data {dataset_id}: not in the local Hugging Face cache{at} (looked in "
                            f"{' and '.join(looked)}; flowkern never downloads): get it with `huggingface-cli "
                            f"download --repo-type dataset {plain}{rev}` (or set HF_HUB_CACHE / HF_HOME to where it "
                            f"is), or pass the folder holding its parquet files")
