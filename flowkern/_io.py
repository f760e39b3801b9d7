"""Small file helpers shared by the commands: output-path validation and atomic writes.

A command that writes a result file should validate the location *before* doing any work
(:func:`check_output_path`: a probe entry is created and removed where the file will go), then write with
:func:`atomic_write_text` / :func:`atomic_write_json`: the content goes to a temporary file in the same folder, is
flushed to disk and moved over the target with :func:`os.replace`, so a reader (or a killed run) sees either the old
file or the complete new one, never half of it. A temporary file a killed run leaves (``.<name>.XXXXXXXX.tmp``) is
removed by the next run that owns the folder (:func:`flowkern.outdir.claim`). A result *folder* is written whole
with :class:`AtomicDir`.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["check_output_path", "check_output_dir", "atomic_write_text", "atomic_write_json", "AtomicDir", "MANIFEST"]


def check_output_path(path: str | os.PathLike[str], *, overwrite: bool = False, what: str = "--out") -> Path:
    """Check that a result file can be written at ``path``; return it as an absolute :class:`~pathlib.Path`.

    Nothing is left behind: writing is shown to work by creating and removing a probe entry in the file's folder
    (:func:`flowkern.outdir.probe`; ``os.access`` would say yes to root everywhere). Raises
    :class:`flowkern.outdir.OutputError` (a ``ValueError``) naming ``what`` (the argument, e.g. ``"--out"``) when
    ``path`` is empty, an existing directory, an existing file and ``overwrite`` is false, or in a place that cannot be
    written (below a file, under ``/proc``, through a symlink loop, read-only, ...).
    """
    from flowkern.outdir import OutputError, check_path, probe

    if path is None or not str(path).strip() or Path(path).name in ("", ".", ".."):
        raise OutputError(f"{what}: {'' if path is None else str(path)!r} is not a file name")
    target = check_path(path, what=what)
    if target.is_dir():
        raise OutputError(f"{what}: {target} is a directory, expected a file path")
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise OutputError(f"{what}: {target} already exists (pass --overwrite to replace it)")
    if target.parent.exists() and not target.parent.is_dir():
        raise OutputError(f"{what}: cannot create {target}: {target.parent} is not a directory")
    probe(target.parent, what=what)
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
    except BaseException as exc:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename is None:
            exc.filename = str(target)  # a failed write on the descriptor (full disk): name the file
        raise
    return target


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON (UTF-8, trailing newline) to ``path`` atomically; see :func:`atomic_write_text`."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=False) + "\n"
    return atomic_write_text(path, text)


MANIFEST = "manifest.json"
"""Name of the file an :class:`AtomicDir` writes last into a result folder: what the run wrote, and by whom."""


def check_output_dir(path: str | os.PathLike[str], *, overwrite: bool = False, what: str = "--out",
                     kind: str | None = None) -> Path:
    """Check that a result *folder* replaced as a whole (:class:`AtomicDir`) can be written at ``path`` before any
    work; return it as an absolute path.

    :func:`flowkern.outdir.check` with ``resume=False``: nothing is left behind (a probe entry is created and
    removed). Raises :class:`flowkern.outdir.OutputError` (a ``ValueError``) naming ``what`` when ``path`` is empty,
    a file, in a place that cannot be written, a folder in use, of another ``kind`` than the command's (None: any
    flowkern result), holding files that are no flowkern result (never replaced, so that ``--out .`` cannot wipe a
    working directory), or a previous result while ``overwrite`` is false.
    """
    from flowkern.outdir import check

    return check(path, kind, overwrite=overwrite, resume=False, what=what)


class AtomicDir:
    """Write a result folder so that it appears complete or not at all (context manager).

    The target is owned first (:func:`flowkern.outdir.claim`: one run at a time, the lock file holds the kind named
    by ``info["command"]``). The files go to a hidden sibling ``.{name}.tmp-<pid>-*`` (yielded by ``with``); on a
    clean exit the lock file is taken there too, a :data:`MANIFEST` listing every file (name and size; the lock file,
removed when the run ends, aside) plus ``info``
    is written last, then the folder replaces ``target`` by a rename (a previous folder is moved aside to
    ``.{name}.old-<pid>-*`` first and removed after). On an error or an interrupt the temporary folder is removed and
    ``target`` is left exactly as it was: an interrupted run leaves the previous result or nothing, and never a mix
    of two runs. What a killed run leaves (its temporary folder; a previous result moved aside, which is put back
    when the target is missing) is cleaned up by the next run on the same target.

    Args:
        target: the result folder (check it first with :func:`check_output_dir`).
        info: JSON-able facts about the run recorded in the manifest (command, arguments, versions).
    """

    def __init__(self, target: str | os.PathLike[str], info: dict[str, Any] | None = None) -> None:
        self.target = Path(target).absolute()
        self.info = dict(info or {})
        self.tmp: Path | None = None
        self.claim: Any = None

    def __enter__(self) -> Path:
        from flowkern import outdir

        command = str(self.info.get("command", "")).split()
        kind = command[1] if len(command) > 1 and command[0] == "flowkern" else "result"
        self.target.parent.mkdir(parents=True, exist_ok=True)
        _clean_siblings(self.target)
        self.claim = outdir.claim(self.target, kind, overwrite=True, resume=False)
        try:
            self.tmp = Path(tempfile.mkdtemp(dir=self.target.parent,
                                             prefix=f".{self.target.name}.tmp-{os.getpid()}-"))
            os.chmod(self.tmp, 0o777 & ~_umask())
        except BaseException:
            self.claim.release()
            raise
        return self.tmp

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        import shutil

        assert self.tmp is not None
        try:
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                return
            self._commit()
        finally:
            self.claim.release()

    def _commit(self) -> None:
        import shutil

        from flowkern import outdir

        assert self.tmp is not None
        old = None
        try:
            self.claim.move_to(self.tmp)  # the folder arrives locked, by this process, with its kind
            files = sorted(p for p in self.tmp.rglob("*") if p.is_file() and p.name != outdir.LOCK_FILE)
            manifest = dict(self.info, files={str(p.relative_to(self.tmp)): p.stat().st_size for p in files})
            atomic_write_json(self.tmp / MANIFEST, manifest)
            if self.target.exists():
                old = Path(tempfile.mkdtemp(dir=self.target.parent, prefix=f".{self.target.name}.old-{os.getpid()}-"))
                os.rmdir(old)
                os.replace(self.target, old)
            os.replace(self.tmp, self.target)
            self.claim.created = []  # the folder now holds a result: kept when the claim is released
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            if old is not None and old.exists() and not self.target.exists():
                os.replace(old, self.target)  # interrupted between the two renames: put the previous result back
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise


def _clean_siblings(target: Path) -> None:
    """Remove what killed runs on ``target`` left beside it: their temporary folders, and a previous result they had
    moved aside (put back first if the target is missing: killed between the two renames)."""
    import shutil

    def dead(entry: Path, tag: str) -> bool:
        pid = entry.name.rsplit(f".{tag}-", 1)[1].split("-", 1)[0]
        return pid.isdigit() and not _alive(int(pid))

    olds = sorted((p for p in target.parent.glob(f".{target.name}.old-*-*") if dead(p, "old")),
                  key=lambda p: p.stat().st_mtime)
    if olds and not os.path.lexists(target):
        with contextlib.suppress(OSError):
            os.replace(olds.pop(), target)
    for stale in olds + [p for p in target.parent.glob(f".{target.name}.tmp-*-*") if dead(p, "tmp")]:
        shutil.rmtree(stale, ignore_errors=True)


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
