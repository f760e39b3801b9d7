"""The owner of an output folder: one run at a time writes a result folder, only into a folder of its own kind, and only
where writing has been shown to work.

.. code-block:: python

    from flowkern import outdir

    with outdir.claim("runs/pope", "eval", overwrite=False) as owned:   # before the model loads
        owned.path                                                        # the absolute folder
        ...                                                               # write the result

:func:`claim` does, in this order, before any work:

1. **Path.** An empty path is refused (``--out ''`` would otherwise mean the working directory); the path is made
   absolute; a file in its place, or a file above it, is refused.
2. **Probe.** Writing is *tried*, not guessed from permission bits (``os.access`` says yes to root everywhere): the
   missing folders are created and an entry is created and removed inside. A path under ``/proc`` or ``/sys``,
   through a symlink loop, on a read-only or full filesystem fails here, with one line naming the path.
3. **Lock.** An exclusive ``flock`` on :data:`LOCK_FILE` inside the folder, held until the claim is released (the
   ``with`` block ends: the lock file is removed; or the process dies: the kernel drops the lock of a process killed
   with SIGKILL, so a killed run leaves at most an unlocked lock file, never a stale lock). The holder writes who it
   is into the lock file (pid, host, command, start time); a second run on the folder fails at once with
   :class:`OutputError`, one line naming that holder.
4. **Kind.** A folder holds one kind of result (``eval``, ``sweep``, ``demo``, ``flow``, ``cam``, ``shapes``, ...):
   the one its files show (:data:`SIGNATURES`), or while a run holds it (or after a killed one) the one its lock
   file records. A folder of another kind, or a non-empty folder that is no flowkern result, is refused without
   touching any of its files -- ``overwrite`` included: a command only ever removes the files it writes itself.
5. **Leftovers.** Hidden temporary files of :mod:`flowkern._io`'s atomic writes left inside the folder by a killed
   run are removed (under the lock no live run can own them).

A claim that created the folder and wrote nothing into it removes the folder again when released, so a run refused
after its claim (a missing image, a model that does not load) leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["OutputError", "Claim", "claim", "check", "check_path", "probe", "folder_kind", "LOCK_FILE", "SIGNATURES",
           "os_error_line", "remove_stale_temporaries"]

LOCK_FILE = ".flowkern.lock"
"""The hidden file inside an owned folder: the ``flock`` target, and a JSON line with the folder's kind and its
current (or last) holder."""

SIGNATURES: dict[str, str] = {"sweep.json": "sweep", "run.json": "eval", "shapes_ground_truth.json": "shapes"}
"""A result folder that no run holds is recognized by one of these files; a folder with ``manifest.json``
(:class:`flowkern._io.AtomicDir`) by the command recorded in it."""

_TMP_FILE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # tempfile.mkstemp(prefix=".<name>.", suffix=".tmp")


class OutputError(ValueError):
    """An output location that cannot be used (empty path, not writable, in use, another kind of folder): a one-line
    message naming the argument; the CLI prints it and exits 2."""


def check_path(path: str | os.PathLike[str] | None, *, what: str = "--out") -> Path:
    """``path`` as an absolute path, after refusing an empty one (nothing is read or created).

    Raises:
        OutputError: ``path`` is None, empty or blank.
    """
    if path is None or not str(path).strip():
        raise OutputError(f"{what}: an empty path is not a folder or file name (say '.' for the current folder)")
    return Path(os.path.abspath(Path(path).expanduser()))


def os_error_line(exc: OSError, path: str | os.PathLike[str] | None = None) -> str:
    """``<path>: <reason>`` of an OS error (its own file name, else ``path``), on one line."""
    where = exc.filename if exc.filename is not None else path
    reason = exc.strerror or str(exc)
    if exc.filename2 is not None:
        where = f"{where} -> {exc.filename2}"
    return f"{where}: {reason}" if where is not None else reason


def _probe(folder: Path, what: str) -> list[Path]:
    """Create the missing folders up to ``folder`` and an entry inside it, remove the entry; return the folders that
    were created (outermost first)."""
    missing: list[Path] = []
    current = folder
    while True:
        try:
            os.stat(current)
            break
        except FileNotFoundError:
            missing.append(current)
            if current.parent == current:
                break
            current = current.parent
        except NotADirectoryError:
            blocker = next(p for p in current.parents if os.path.lexists(p))
            raise OutputError(f"{what}: cannot create {folder}: {blocker} is not a directory") from None
        except OSError as exc:  # ELOOP, EACCES, ...
            raise OutputError(f"{what}: cannot use {os_error_line(exc, current)}") from None
    if current.exists() and not current.is_dir():
        raise OutputError(f"{what}: {current} is a file, expected a folder" if current == folder else
                          f"{what}: cannot create {folder}: {current} is not a directory")
    created = []
    try:
        for p in reversed(missing):
            os.mkdir(p)
            created.append(p)
        probe = folder / f".flowkern-probe-{os.getpid()}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        _remove_empty(created)
        raise OutputError(f"{what}: cannot write in {folder}: {os_error_line(exc)}") from None
    return created


def probe(folder: str | os.PathLike[str], *, what: str = "--out") -> None:
    """Show that ``folder`` can be written by doing it: create its missing parts and an entry inside, then remove
    them all.

    Raises:
        OutputError: naming ``what``, the path and the system's reason (a file in the way, ``/proc``, a symlink loop,
            a read-only filesystem, no permission, ...).
    """
    _remove_empty(_probe(Path(folder), what))


def _remove_empty(folders: list[Path]) -> None:
    for p in reversed(folders):
        with contextlib.suppress(OSError):
            os.rmdir(p)


def folder_kind(folder: Path) -> str | None:
    """The kind of result in ``folder``: the one its :data:`LOCK_FILE` records, else the one its files show
    (:data:`SIGNATURES`, ``manifest.json``); ``""`` for a folder holding only flowkern's hidden files (nothing yet);
    None for a non-empty folder that is no flowkern result."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        kind = json.loads((folder / LOCK_FILE).read_text(encoding="utf-8")).get("kind")
        if isinstance(kind, str) and kind:
            return kind
    for name, kind in SIGNATURES.items():
        if (folder / name).is_file():
            return kind
    with contextlib.suppress(OSError, ValueError, AttributeError):
        command = json.loads((folder / "manifest.json").read_text(encoding="utf-8")).get("command", "")
        if isinstance(command, str) and command.startswith("flowkern "):
            return command.split()[1]
    try:
        names = [n for n in os.listdir(folder) if n != LOCK_FILE and not _TMP_FILE.match(n)]
    except FileNotFoundError:
        return ""
    return None if names else ""


def check(path: str | os.PathLike[str] | None, kind: str | None, *, overwrite: bool = False, resume: bool = True,
          what: str = "--out", probe: bool = True) -> Path:
    """Everything :func:`claim` checks, without taking the folder: the path, the probe (``probe=False``: nothing is
    created) and the folder's kind. Returns the absolute folder.

    Args:
        kind: the kind of result the command writes (``"eval"``, ``"sweep"``, ``"demo"``, ...); None: any kind
            (only a folder that is no flowkern result is refused).
        overwrite: the command will replace its own previous result.
        resume: the command continues its own previous result (eval, sweep); False: a previous result of this kind
            is refused unless ``overwrite`` (a folder replaced as a whole: demo, flow, cam).

    Raises:
        OutputError: naming ``what``.
    """
    folder = check_path(path, what=what)
    if probe:
        _remove_empty(_probe(folder, what))
    elif folder.exists() and not folder.is_dir():
        raise OutputError(f"{what}: {folder} is a file, expected a folder")
    if folder.is_dir():
        _check_free(folder, what)
        _check_kind(folder, kind, overwrite=overwrite, resume=resume, what=what)
    return folder


def _check_free(folder: Path, what: str) -> None:
    """Refuse a folder another run holds now (its lock file is locked by another process), without taking or
    creating anything. A folder this process holds passes (a run checks the folder it has claimed)."""
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return  # no lock file (or none readable): nobody holds the folder, or claim() will say why
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        if holder.get("pid") != os.getpid() or holder.get("host") != socket.gethostname():
            raise OutputError(_in_use(folder, what, _holder_text(fd))) from None
    finally:
        os.close(fd)


def _holder(fd: int) -> dict[str, Any]:
    """The record a lock file holds ({} when unreadable)."""
    try:
        info = json.loads(os.pread(fd, 65536, 0).decode("utf-8", "replace"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _in_use(folder: Path, what: str, holder: str) -> str:
    return (f"{what}: {folder} is in use by another flowkern run: {holder}; wait for it to finish or choose another "
            "folder")


def _check_kind(folder: Path, kind: str | None, *, overwrite: bool, resume: bool, what: str) -> None:
    found = folder_kind(folder)
    if found is None:
        raise OutputError(f"{what}: {folder} already holds files that are not a flowkern result; choose a new or "
                          "empty folder (nothing in it was changed)")
    if found and kind is not None and found != kind:
        raise OutputError(f"{what}: {folder} holds the result of a flowkern {found} run, not of flowkern {kind}; "
                          "choose another folder (nothing in it was changed)")
    if found and not resume and not overwrite:
        raise OutputError(f"{what}: {folder} holds a previous run's result; pass --overwrite to replace it")


def _holder_text(fd: int) -> str:
    info = _holder(fd)
    if "pid" not in info:
        return "another process (its details are being written)"
    command = " ".join(str(info.get("command", "")).split())
    if len(command) > 160:
        command = command[:157] + "..."
    where = f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')}"
    return f"{where} ({command})" if command else where


class Claim:
    """A folder owned by this process (see :func:`claim`): ``path``, ``kind``; :meth:`release` (or leaving the
    ``with`` block) gives it up."""

    def __init__(self, path: Path, kind: str, fd: int, created: list[Path]) -> None:
        self.path = path
        self.kind = kind
        self.fd: int | None = fd
        self.created = created

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename is None:
            exc.filename = str(self.path)  # an error from a bare file descriptor (os.write): name the folder
        self.release()

    def record(self) -> dict[str, Any]:
        """What the lock file says while this process holds it."""
        return {"kind": self.kind, "pid": os.getpid(), "host": socket.gethostname(),
                "command": " ".join(["flowkern", *sys.argv[1:]]) if sys.argv else "flowkern",
                "since": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def move_to(self, folder: Path) -> None:
        """Take a lock file in ``folder`` too, then give up the current one: for a result folder that is written
        elsewhere and renamed into place (:class:`flowkern._io.AtomicDir`), so that the folder arrives locked."""
        fd = _open_locked(folder / LOCK_FILE)
        if fd is None:  # a fresh temporary folder nobody else knows: cannot be locked by another process
            raise OSError(errno.EAGAIN, "lock taken", str(folder / LOCK_FILE))
        _write_record(fd, self.record())
        old, self.fd = self.fd, fd
        if old is not None:
            os.close(old)

    def release(self) -> None:
        """Remove the lock file and unlock; a folder this claim created and left without a result is removed."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path / LOCK_FILE)  # while still locked: a run that opened it meanwhile sees it replaced
        if self.created:
            _remove_empty(self.created)
        os.close(self.fd)
        self.fd = None


def _open_locked(lock: Path) -> int | None:
    """An fd of ``lock`` (created if missing) holding its exclusive flock, or None when another process holds it."""
    for _ in range(5):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:  # not a file its previous holder has just removed
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
    raise OSError(errno.EAGAIN, "the lock file keeps being replaced", str(lock))


def _write_record(fd: int, record: dict[str, Any]) -> None:
    data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def claim(path: str | os.PathLike[str] | None, kind: str, *, overwrite: bool = False, resume: bool = True,
          what: str = "--out") -> Claim:
    """Own the output folder ``path`` for a run writing a ``kind`` result (see the module docstring); use as a
    context manager (or call :meth:`Claim.release`). Before any work: nothing is written but the folder, the lock
    file and the probe entry.

    Args:
        kind: the kind of result (``"eval"``, ``"sweep"``, ...), recorded in the lock file.
        overwrite, resume: see :func:`check`.
        what: the argument named in messages.

    Raises:
        OutputError: an empty path, a file in the way, a location that cannot be written (one line with the path and
            the system's reason), a folder in use by another run (its pid, host, command and start), a folder of
            another kind or not a flowkern result, a previous result with ``resume=False`` and no ``overwrite``.
    """
    folder = check_path(path, what=what)
    if folder.is_dir():  # refuse a folder in use or of another kind before writing anything into it
        _check_free(folder, what)
        _check_kind(folder, kind, overwrite=overwrite, resume=resume, what=what)
    created = _probe(folder, what)
    lock = folder / LOCK_FILE
    try:
        try:
            fd = _open_locked(lock)
        except OSError as exc:
            raise OutputError(f"{what}: cannot write in {folder}: {os_error_line(exc)}") from None
        if fd is None:
            holder = "another process"
            with contextlib.suppress(OSError), open(folder / LOCK_FILE, "rb") as f:
                holder = _holder_text(f.fileno())
            raise OutputError(_in_use(folder, what, holder))
    except OutputError:
        _remove_empty(created)
        raise
    owned = Claim(folder, kind, fd, created)
    try:
        _check_kind(folder, kind, overwrite=overwrite, resume=resume, what=what)  # again, now that no one writes
        try:
            _write_record(fd, owned.record())
        except OSError as exc:  # a full disk: before any work, so the location is refused
            raise OutputError(f"{what}: cannot write in {folder}: {os_error_line(exc, lock)}") from None
        remove_stale_temporaries(folder)
    except BaseException:
        owned.release()
        raise
    return owned


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the hidden temporary files of :mod:`flowkern._io`'s atomic writes (``.<name>.XXXXXXXX.tmp``) anywhere
    under ``folder``, left by a killed run; call only while owning the folder. Returns what was removed."""
    removed = []
    for root, _dirs, names in os.walk(folder):
        for name in names:
            if _TMP_FILE.match(name):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(root, name))
                    removed.append(Path(root, name))
    return removed
