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

__all__ = ["check_output_path", "check_output_dir", "atomic_write_text", "atomic_write_json", "AtomicDir", "MANIFEST"]


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


MANIFEST = "manifest.json"
"""Name of the file an :class:`AtomicDir` writes last into a result folder: what the run wrote, and by whom."""


def check_output_dir(path: str | os.PathLike[str], *, overwrite: bool = False, what: str = "--out") -> Path:
    """Check that a result *folder* can be written at ``path`` before any work; return it as an absolute path.

    Nothing is created. Raises ``ValueError`` naming ``what`` when ``path`` is an existing file, lies below something
    that is not a directory, is not writable (for a folder that does not exist yet: its nearest existing ancestor's
    permission counts), or is a non-empty folder: a previous result (it has a :data:`MANIFEST`) is replaced only with
    ``overwrite``, any other non-empty folder never (so that ``--out .`` cannot wipe a working directory).
    """
    target = Path(path).expanduser()
    if str(path) == "":
        raise ValueError(f"{what}: an empty path is not a folder name")
    target = target.absolute()
    if target.exists() and not target.is_dir():
        raise ValueError(f"{what}: {target} is a file, expected a folder")
    ancestor = _nearest_existing(target)
    if not ancestor.is_dir():
        raise ValueError(f"{what}: cannot create {target}: {ancestor} is not a directory")
    parent = target.parent if target.exists() else ancestor
    if not os.access(parent, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK | os.X_OK)):
        raise ValueError(f"{what}: cannot write in {parent if not target.exists() else target} (permission denied)")
    if target.is_dir() and any(target.iterdir()):
        if not (target / MANIFEST).is_file():  # never replace a folder that is not a flowkern result (e.g. --out .)
            raise ValueError(f"{what}: {target} already holds files that are not a flowkern result; choose a new or "
                             "empty folder")
        if not overwrite:
            raise ValueError(f"{what}: {target} holds a previous run's result; pass --overwrite to replace it")
    return target


class AtomicDir:
    """Write a result folder so that it appears complete or not at all (context manager).

    The files go to a hidden sibling ``.{name}.tmp-<pid>-*`` (yielded by ``with``; one left behind by a killed process
    is removed by the next run); on a clean exit a :data:`MANIFEST` listing
    every file (name and size) plus ``info`` is written last, then the folder replaces ``target`` by a rename (a
    previous folder is moved aside first and removed after). On an error or an interrupt the temporary folder is
    removed and ``target`` is left exactly as it was: an interrupted run leaves the previous result or nothing, and
    never a mix of two runs.

    Args:
        target: the result folder (check it first with :func:`check_output_dir`).
        info: JSON-able facts about the run recorded in the manifest (command, arguments, versions).
    """

    def __init__(self, target: str | os.PathLike[str], info: dict[str, Any] | None = None) -> None:
        self.target = Path(target).absolute()
        self.info = dict(info or {})
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        import shutil

        self.target.parent.mkdir(parents=True, exist_ok=True)
        for stale in self.target.parent.glob(f".{self.target.name}.tmp-*-*"):  # left by a killed run (SIGKILL)
            pid = stale.name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
        self.tmp = Path(tempfile.mkdtemp(dir=self.target.parent, prefix=f".{self.target.name}.tmp-{os.getpid()}-"))
        os.chmod(self.tmp, 0o777 & ~_umask())
        return self.tmp

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        import shutil

        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        try:
            files = sorted(p for p in self.tmp.rglob("*") if p.is_file())
            manifest = dict(self.info, files={str(p.relative_to(self.tmp)): p.stat().st_size for p in files})
            atomic_write_json(self.tmp / MANIFEST, manifest)
            if self.target.exists():
                old = Path(tempfile.mkdtemp(dir=self.target.parent, prefix=f".{self.target.name}.old-"))
                os.rmdir(old)
                os.replace(self.target, old)
            os.replace(self.tmp, self.target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            if old is not None and old.exists() and not self.target.exists():
                os.replace(old, self.target)  # interrupted between the two renames: put the previous result back
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
