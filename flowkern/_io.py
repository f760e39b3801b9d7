"""Small file helpers shared by the commands: output-path validation and atomic writes.

A command that writes a result file should validate the location *before* doing any work
(:func:`check_output_path`), then write with :func:`atomic_write_text` / :func:`atomic_write_json`: the content goes
to a temporary file in the same folder, is flushed to disk and moved over the target with :func:`os.replace`, so a
reader (or a killed run) sees either the old file or the complete new one, never half of it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["check_output_path", "atomic_write_text", "atomic_write_json"]


def _nearest_existing(path: Path) -> Path:
    current = path
    while not current.exists():
        if current.parent == current:
            break
        current = current.parent
    return current


def check_output_path(path: str | os.PathLike[str], *, overwrite: bool = False, what: str = "--out") -> Path:
    """Check that a result file can be written at ``path``; return it as an absolute :class:`~pathlib.Path`.

    Nothing is created. Raises ``ValueError`` naming ``what`` (the argument, e.g. ``"--out"``) when ``path`` is an
    existing directory, an existing file and ``overwrite`` is false, below something that is not a directory, or
    in a folder that is not writable (for a folder that does not exist yet: its nearest existing ancestor).
    """
    target = Path(path).expanduser()
    if str(path) == "" or target.name in ("", ".", ".."):
        raise ValueError(f"{what}: {str(path)!r} is not a file name")
    target = target.absolute()
    if target.is_dir():
        raise ValueError(f"{what}: {target} is a directory, expected a file path")
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise ValueError(f"{what}: {target} already exists (pass --overwrite to replace it)")
        if not os.access(target, os.W_OK):
            raise ValueError(f"{what}: {target} exists and is not writable")
    ancestor = _nearest_existing(target.parent)
    if not ancestor.is_dir():
        raise ValueError(f"{what}: cannot create {target}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{what}: cannot write in {ancestor} (permission denied)")
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (temp file in the same folder, fsync, :func:`os.replace`).

    Missing parent folders are created. The file gets the usual permissions (``0o666`` less the umask), not the
    temporary file's ``0o600``. On any error the temporary file is removed and the target is left as it was.
    Returns the path written.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding=encoding, newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)
        os.replace(tmp_name, target)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    return target


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON (UTF-8, trailing newline) to ``path`` atomically; see :func:`atomic_write_text`."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=False) + "\n"
    return atomic_write_text(path, text)
