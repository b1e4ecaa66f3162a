"""File IO that keeps what the user had: atomic writes, one writer per folder (a lock), Ctrl-C deferred while a
checkpoint is written, and output folders checked before any work."""

from __future__ import annotations

import errno
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

__all__ = ["atomic_write_bytes", "LockError", "DeferInterrupt", "dir_lock", "ensure_output_dir", "ensure_output_file",
           "user_cache_dir"]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, ``os.replace``).

    A crash leaves either the old file or the new one, never a truncated file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class LockError(ValueError):
    """Another live process holds the lock of an output folder."""


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM  # exists, owned by someone else
    return True


@contextmanager
def dir_lock(directory: str | os.PathLike, what: str = "training") -> Iterator[Path]:
    """Hold ``directory/.lock`` (created with ``O_EXCL``, holding the pid) for the duration of the block.

    A lock whose pid is dead (a killed run) is taken over; one held by a live process raises.

    Raises:
        LockError: another live process holds the lock (the message names it and the folder).
    """
    path = Path(directory) / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(path.read_text().strip() or "0")
            except (OSError, ValueError):
                pid = 0
            if pid != os.getpid() and _pid_alive(pid):
                raise LockError(f"another {what} (pid {pid}) is writing to {path.parent} (lock file {path}); wait "
                                f"for it to finish or use another --out") from None
            path.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{os.getpid()}\n")
        break
    else:
        raise LockError(f"could not take the lock file {path}")
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


class DeferInterrupt:
    """Context manager turning SIGINT (Ctrl-C) into a flag, so work can stop at a consistent point.

    Inside the block a first Ctrl-C only sets :attr:`pending`; the code polls :meth:`check`, which raises
    ``KeyboardInterrupt`` at a safe point. A second Ctrl-C raises at once. Outside the main thread it does nothing.
    """

    def __init__(self) -> None:
        self.pending = False
        self._old: object = None
        self._active = False

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.pending:
            raise KeyboardInterrupt
        self.pending = True

    def __enter__(self) -> DeferInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
            self._active = True
        return self

    def check(self) -> None:
        """Raise ``KeyboardInterrupt`` if a Ctrl-C arrived since the block began."""
        if self.pending:
            raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        if self._active:
            signal.signal(signal.SIGINT, self._old)  # type: ignore[arg-type]
            self._active = False


def _probe_writable(directory: Path, option: str, shown: Path) -> None:
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tagdiff-write-test.")
    except OSError as e:
        raise ValueError(f"{option} {shown}: cannot write into {directory} ({e.strerror or e}); expected a writable "
                         "folder") from None
    os.close(fd)
    os.unlink(tmp)


def ensure_output_dir(path: str | os.PathLike, option: str = "--out") -> Path:
    """Create ``path`` if needed and check that files can be written into it; call before any long work.

    Raises:
        ValueError: ``path`` (or a parent) is an existing file, or the folder cannot be created or written into.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path} is an existing file; expected a folder (it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{option} {path}: cannot create the folder ({e.strerror or e}); expected a writable "
                         "folder") from None
    _probe_writable(path, option, path)
    return path


def ensure_output_file(path: str | os.PathLike, option: str = "--out") -> Path:
    """Check that ``path`` can be written as a file (its parent is created if needed); call before any work.

    Raises:
        ValueError: ``path`` is an existing folder, or its parent cannot be created or written into.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder; expected a file name such as {path / 'report.json'}")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise ValueError(f"{option} {path}: {parent} is a file, not a folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{option} {path}: cannot create {parent} ({e.strerror or e})") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{option} {path}: the file is not writable")
    _probe_writable(parent, option, path)
    return path


def user_cache_dir(kind: str) -> Path:
    """tagdiff's cache folder for ``kind`` (e.g. ``"latents"``): ``$TAGDIFF_CACHE/kind`` if set, else
    ``$XDG_CACHE_HOME/tagdiff/kind``, else ``~/.cache/tagdiff/kind``. Caches never go inside a model folder (that may be
    the Hugging Face cache, or read-only). The folder is not created here."""
    root = os.environ.get("TAGDIFF_CACHE")
    if root:
        return Path(root) / kind
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg or Path.home() / ".cache") / "tagdiff" / kind
