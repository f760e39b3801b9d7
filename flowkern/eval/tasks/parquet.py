"""Benchmark rows stored as tables — the lmms-lab parquet releases, a ``datasets`` ``save_to_disk`` export or the
``datasets`` Arrow cache — read with ``pyarrow``, streamed by row group / record batch (never a whole file in
memory: lmms-lab POPE is ~1.5 GB with its images), images left in the files until a batch needs them.

``--data`` is a ``.parquet`` / ``.arrow`` file, a folder of them (searched recursively), or a dataset id resolved in
the local Hugging Face caches (:mod:`flowkern.eval.tasks.hubcache`). Each file belongs to a *subset* (the dataset's
config, e.g. POPE's ``default`` and ``Full``) and a *split* (``test``; ``adversarial``), read from its place in the
folder, as the hub and ``datasets`` lay them out:

- ``<subset>/<split>-NNNNN-of-NNNNN.parquet`` (the hub's ``data/`` folder is the subset ``default``; a file at the
  top is in ``default`` too), ``<subset>/<split>/NNNN.parquet`` (the hub's parquet conversion);
- ``save_to_disk``: ``<split>/data-NNNNN-of-NNNNN.arrow`` beside ``dataset_dict.json``, or one split's
  ``data-*.arrow`` beside ``state.json`` (split from its ``_split``);
- the ``datasets`` cache: ``<subset>/<version>/<hash>/<name>-<split>[-NNNNN-of-NNNNN].arrow``.

:func:`select` picks the files of one subset and one or more splits (``split`` may be ``SUBSET/SPLIT``); a name that
does not exist is a ``ValueError`` listing what does. :func:`check_columns` checks a file's schema,
:func:`iter_rows` streams rows, :class:`EmbeddedImage` points at an image cell and :func:`open_images` decodes a
batch of them (reading each row group's image column once).
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["TableFile", "TableSource", "EmbeddedImage", "is_table_source", "open_source", "select",
           "column_names", "check_columns", "iter_rows", "open_images", "check_images", "TABLE_SUFFIXES"]

TABLE_SUFFIXES = (".parquet", ".arrow")
_SHARD = re.compile(r"^(?P<stem>.+?)(?:-\d{5}-of-\d{5})?$")
_BATCH_ROWS = 256
_VERSION = re.compile(r"\d+\.\d+\.\d+")


@dataclass(frozen=True)
class TableFile:
    """One parquet or Arrow file of a dataset, its subset and its split."""

    path: Path
    subset: str
    split: str


@dataclass(frozen=True)
class TableSource:
    """What ``--data`` names: every table file found, where (``root``), and the dataset id and revision when it was
    resolved in the Hugging Face cache."""

    root: Path
    files: tuple[TableFile, ...]
    dataset_id: str | None = None
    revision: str | None = None

    def layout(self) -> dict[str, list[str]]:
        """``{subset: [split, ...]}``, sorted."""
        out: dict[str, set[str]] = {}
        for f in self.files:
            out.setdefault(f.subset, set()).add(f.split)
        return {k: sorted(v) for k, v in sorted(out.items())}

    def describe(self) -> str:
        """``default (test); Full (adversarial, popular, random)``: the subsets and their splits."""
        return "; ".join(f"{k} ({', '.join(v)})" for k, v in self.layout().items())

    @property
    def name(self) -> str:
        """The dataset id, else the root folder."""
        return self.dataset_id or str(self.root)


@dataclass(frozen=True)
class EmbeddedImage:
    """An image stored in a table cell (``{"bytes", "path"}``): the file, the row (0-based in the file) and the
    column. Decoded by :func:`open_images`; ``str()`` names it for messages."""

    file: Path
    row: int
    column: str = "image"

    def __str__(self) -> str:
        return f"{self.file}: row {self.row}: column {self.column!r}"


def _has_tables(folder: Path) -> bool:
    for _dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(n.endswith(TABLE_SUFFIXES) for n in filenames):
            return True
    return False


def is_table_source(data: str | os.PathLike[str]) -> bool:
    """True when ``data`` is a parquet / Arrow file, a folder holding some, or a dataset id (``ORG/NAME``) that is
    not a local path: the tables of this module, not a benchmark's official files."""
    from flowkern.eval.tasks.hubcache import is_dataset_id

    path = Path(os.fspath(data)).expanduser()
    if path.is_file():
        return path.suffix in TABLE_SUFFIXES
    if path.is_dir():
        return _has_tables(path)
    return is_dataset_id(data)


def _place(path: Path, root: Path) -> tuple[str, str]:
    """(subset, split) of a table file from its place under ``root``."""
    rel = path.relative_to(root).parts if path != root else (path.name,)
    stem = _SHARD.match(Path(rel[-1]).stem).group("stem")  # type: ignore[union-attr]
    folder = path.parent
    if (folder / "state.json").is_file() and stem == "data":  # save_to_disk: one split
        try:
            split = json.loads((folder / "state.json").read_text(encoding="utf-8")).get("_split")
        except (OSError, ValueError):
            split = None
        return "default", str(split or (rel[-2] if len(rel) > 1 else "train"))
    if stem == "data" and len(rel) >= 2:  # save_to_disk DatasetDict: <split>/data-*.arrow
        return (rel[-3] if len(rel) >= 3 else "default"), rel[-2]
    if stem.isdigit() and len(rel) >= 3:  # the hub's parquet conversion: <subset>/<split>/0000.parquet
        return rel[-3], rel[-2]
    if len(rel) >= 4 and _VERSION.fullmatch(rel[-3]) and "-" in stem:  # datasets cache
        return rel[-4], stem.split("-", 1)[1]
    subset = rel[-2] if len(rel) >= 2 else "default"
    return ("default" if subset == "data" else subset), stem


def open_source(data: str | os.PathLike[str]) -> TableSource:
    """The table files of ``data`` (a file, a folder, or a dataset id in the local cache).

    Raises:
        FileNotFoundError: nothing there, or a dataset id that is not cached (one line saying where it looked).
    """
    from flowkern.eval.tasks.hubcache import is_dataset_id, resolve_dataset

    text = os.fspath(data)
    dataset_id = revision = None
    if is_dataset_id(text):
        where = resolve_dataset(text)
        root, dataset_id, revision = where.root, where.dataset_id, where.revision
    else:
        root = Path(text).expanduser()
    if root.is_file():
        subset, split = _place(root, root.parent)
        return TableSource(root, (TableFile(root, subset, split),), dataset_id, revision)
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for n in sorted(filenames):
            if n.endswith(TABLE_SUFFIXES):
                p = Path(dirpath) / n
                files.append(TableFile(p, *_place(p, root)))
    if not files:
        raise FileNotFoundError(f"--data: no .parquet or .arrow files in {root}")
    return TableSource(root, tuple(_newest_builds(files)), dataset_id, revision)


def _newest_builds(files: list[TableFile]) -> list[TableFile]:
    """The ``datasets`` cache keeps one ``<version>/<hash>/`` folder per build of a subset: only the newest is read."""
    builds: dict[str, Path] = {}
    for f in files:
        if _VERSION.fullmatch(f.path.parent.parent.name):
            best = builds.get(f.subset)
            if best is None or f.path.parent.stat().st_mtime > best.stat().st_mtime:
                builds[f.subset] = f.path.parent
    return [f for f in files if not _VERSION.fullmatch(f.path.parent.parent.name) or builds[f.subset] == f.path.parent]


def select(source: TableSource, split: str | None, *, prefer_subset: Sequence[str] = ("default",),
           prefer_split: Sequence[str] = (), what: str = "--split") -> tuple[str, list[str], list[TableFile]]:
    """The subset, splits and files to read.

    ``split`` is ``SPLIT`` or ``SUBSET/SPLIT`` (None: the first of ``prefer_split`` the subset has, else all its
    splits). Without a subset, the first of ``prefer_subset`` holding the split is taken, else the only subset
    holding it.

    Raises:
        ValueError: a subset or split that is not there (listing those that are), or a split found in several
            subsets, none preferred.
    """
    layout = source.layout()
    subset = None
    if split is not None and "/" in split:
        subset, split = split.split("/", 1)
        if subset not in layout:
            raise ValueError(f"{what} {subset}/{split}: {source.name} has no subset {subset!r} (it has: "
                             f"{source.describe()})")
    if subset is None:
        holding = [s for s, splits in layout.items() if split is None or split in splits]
        preferred = [s for s in prefer_subset if s in holding]
        if preferred:
            subset = preferred[0]
        elif len(holding) == 1:
            subset = holding[0]
        elif not holding:
            raise ValueError(f"{what} {split}: {source.name} has no split {split!r} (it has: {source.describe()})")
        else:
            raise ValueError(f"{what}: {source.name} has several subsets ({source.describe()}): name one as "
                             f"{what} SUBSET/SPLIT")
    splits = layout[subset]
    if split is None:
        chosen = [s for s in prefer_split if s in splits][:1] or splits
    elif split in splits:
        chosen = [split]
    else:
        raise ValueError(f"{what} {split}: subset {subset!r} of {source.name} has no split {split!r} (it has: "
                         f"{source.describe()})")
    return subset, chosen, [f for f in source.files if f.subset == subset and f.split in chosen]


# ----------------------------------------------------------------------------------------------------------------
# reading


def _arrow_batches(path: Path, columns: Sequence[str] | None) -> Iterator[Any]:
    import pyarrow as pa

    source = pa.memory_map(str(path))
    try:
        reader = pa.ipc.open_stream(source)
        batches: Any = reader
    except pa.ArrowInvalid:
        source.seek(0)
        reader = pa.ipc.open_file(source)
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    for batch in batches:
        yield batch.select(list(columns)) if columns is not None else batch


def _schema(path: Path) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.suffix == ".parquet":
            return pq.read_schema(path)
        return next(_arrow_batches(path, None)).schema
    except (pa.ArrowException, OSError, StopIteration) as exc:
        raise ValueError(f"--data: {path}: not a readable {path.suffix[1:]} table ({exc})") from None


_KINDS = {"str": "a string", "int": "an integer", "id": "an integer or a string", "strs": "a list of strings",
          "image": "an image ({bytes, path})"}


def _kind_ok(kind: str, t: Any) -> bool:
    import pyarrow.types as pt

    text = pt.is_string(t) or pt.is_large_string(t)
    if kind == "str":
        return text
    if kind == "int":
        return pt.is_integer(t)
    if kind == "id":
        return text or pt.is_integer(t)
    if kind == "strs":
        return (pt.is_list(t) or pt.is_large_list(t)) and (pt.is_string(t.value_type) or
                                                             pt.is_large_string(t.value_type))
    if kind == "image":
        return pt.is_struct(t) and t.get_field_index("bytes") >= 0 and (
            pt.is_binary(t.field("bytes").type) or pt.is_large_binary(t.field("bytes").type))
    raise ValueError(kind)


def column_names(path: Path) -> list[str]:
    """The table's column names (``ValueError`` for a file that is not a readable table)."""
    return list(_schema(path).names)


def check_columns(path: Path, columns: dict[str, str]) -> None:
    """Check that the table has each column with the expected kind (``str``, ``int``, ``id``, ``strs``, ``image``).

    Raises:
        ValueError: ``"--data: FILE: no column 'x' (columns: ...)"`` or ``"--data: FILE: column 'x' has type T,
            expected ..."``.
    """
    schema = _schema(path)
    for name, kind in columns.items():
        if schema.get_field_index(name) < 0:
            raise ValueError(f"--data: {path}: no column {name!r} (columns: {', '.join(schema.names)})")
        t = schema.field(name).type
        if not _kind_ok(kind, t):
            raise ValueError(f"--data: {path}: column {name!r} has type {t}, expected {_KINDS[kind]}")


def iter_rows(path: Path, columns: Sequence[str], *, required: Sequence[str] = ()) -> Iterator[tuple[int, dict]]:
    """``(row, {column: value})`` for each row of the file, streamed batch by batch (``row`` is 0-based in the file).

    Raises:
        ValueError: ``"--data: FILE: row N: column 'x' is null"`` for a null in one of ``required``.
    """
    import pyarrow.parquet as pq

    if path.suffix == ".parquet":
        batches: Any = pq.ParquetFile(path).iter_batches(batch_size=_BATCH_ROWS, columns=list(columns))
    else:
        batches = _arrow_batches(path, columns)
    row = 0
    for batch in batches:
        for values in batch.to_pylist():
            for name in required:
                if values.get(name) is None:
                    raise ValueError(f"--data: {path}: row {row}: column {name!r} is null")
            yield row, values
            row += 1


def _cells(path: Path, column: str, rows: set[int]) -> dict[int, Any]:
    """The cells of ``column`` at ``rows``, reading only the row groups / batches that hold them."""
    import pyarrow.parquet as pq

    out: dict[int, Any] = {}
    start = 0
    if path.suffix == ".parquet":
        pf = pq.ParquetFile(path)
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            wanted = [r for r in rows if start <= r < start + n]
            if wanted:
                cells = pf.read_row_group(g, columns=[column]).column(0)
                out.update((r, cells[r - start].as_py()) for r in wanted)
            start += n
            if len(out) == len(rows):
                break
        return out
    for batch in _arrow_batches(path, [column]):
        n = batch.num_rows
        wanted = [r for r in rows if start <= r < start + n]
        out.update((r, batch.column(0)[r - start].as_py()) for r in wanted)
        start += n
        if len(out) == len(rows):
            break
    return out


def _decode(ref: EmbeddedImage, cell: Any) -> Any:
    from flowkern._images import decode_image

    data = cell.get("bytes") if isinstance(cell, dict) else None
    if not data:
        raise ValueError(f"--data: {ref}: no image bytes")
    return decode_image(io.BytesIO(data), "--data:", ref).convert("RGB")


def _by_file(refs: Sequence[EmbeddedImage]) -> dict[tuple[Path, str], set[int]]:
    groups: dict[tuple[Path, str], set[int]] = {}
    for ref in refs:
        groups.setdefault((ref.file, ref.column), set()).add(ref.row)
    return groups


def open_images(images: Sequence[Any]) -> list:
    """``images`` with every :class:`EmbeddedImage` decoded to an RGB ``PIL.Image`` (paths and images kept as
    they are), reading each file's cells once.

    Raises:
        ValueError: a cell without bytes or with bytes that are not an image (naming the file, row and column).
    """
    refs = [im for im in images if isinstance(im, EmbeddedImage)]
    if not refs:
        return list(images)
    cells = {(path, column, row): cell for (path, column), rows in _by_file(refs).items()
             for row, cell in _cells(path, column, rows).items()}
    return [_decode(im, cells.get((im.file, im.column, im.row))) if isinstance(im, EmbeddedImage) else im
            for im in images]


def check_images(refs: Sequence[EmbeddedImage], *, chunk: int = 128) -> None:
    """Check that each image cell holds an image that decodes fully (:func:`flowkern._images.decode_image`: a
    truncated cell or a decompression-bomb header is refused), reading ``chunk`` rows at a time; no pixels are kept.

    Raises:
        ValueError: the first bad cell, naming the file, row and column.
    """
    for start in range(0, len(refs), chunk):
        part = refs[start:start + chunk]
        for (path, column), rows in _by_file(part).items():
            cells = _cells(path, column, rows)
            for row in sorted(rows):
                _decode(EmbeddedImage(path, row, column), cells.get(row))
