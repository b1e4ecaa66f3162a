"""Small shared helpers: broadcasting, per-sample randomness, finiteness guards, atomic writes."""

from __future__ import annotations

import errno
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import torch
from torch import Tensor

__all__ = [
    "NonFiniteError",
    "deferred_finite_checks",
    "StackedRandomGenerator",
    "append_dims",
    "atomic_write_bytes",
    "check_finite",
    "resolve_device",
    "LockError",
    "DeferInterrupt",
    "dir_lock",
    "ensure_output_dir",
    "ensure_output_file",
]

RandnLike = Callable[[Tensor], Tensor]


class NonFiniteError(FloatingPointError):
    """Raised when a guidance gradient, TLS or sample becomes NaN/Inf.

    tagdiff never returns non-finite samples silently: every guidance term and the sampler loop
    check their outputs and raise this error with the step and timestep where it happened.
    """


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims so that ``v`` of shape ``(B,)`` broadcasts against ``(B, *D)``.

    Raises:
        ValueError: if ``v`` already has more than ``ndim`` dimensions.
    """
    extra = ndim - v.ndim
    if extra < 0:
        raise ValueError(f"append_dims: input has {v.ndim} dims but target ndim is {ndim}")
    return v.reshape(*v.shape, *([1] * extra))


_DEFERRED: list[list[tuple[Tensor, Tensor, str | Callable[[], str]]]] = []


def _raise_nonfinite(value: Tensor, what: str | Callable[[], str]) -> None:
    bad = (~torch.isfinite(value)).reshape(value.shape[0], -1).any(-1).nonzero().flatten()
    raise NonFiniteError(
        f"{what() if callable(what) else what} is not finite for samples {bad[:8].tolist()}"
        f"{' (and more)' if bad.numel() > 8 else ''}; lower the strength or check the model"
    )


def check_finite(value: Tensor, what: str | Callable[[], str]) -> Tensor:
    """Return ``value`` unchanged, or raise :class:`NonFiniteError` naming ``what`` if it has NaN/Inf.

    ``what`` may be a zero-argument callable (formatted only on failure). Inside :func:`deferred_finite_checks`
    the check is recorded on the device instead (no host synchronisation) and raised when the block ends.
    """
    if _DEFERRED:
        _DEFERRED[-1].append((torch.isfinite(value).all(), value.detach(), what))
        return value
    if not torch.isfinite(value).all():
        _raise_nonfinite(value, what)
    return value


class deferred_finite_checks:  # noqa: N801 - used as a context manager, like torch.no_grad
    """Context manager: :func:`check_finite` calls inside record a device-side flag instead of reading it on the host
    (a GPU sync per check); on exit the flags are read once and the *first* failing check raises, with its message.
    ``enabled=False`` makes it a no-op (immediate checks). Memory: the checked tensors are kept until the exit."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def __enter__(self) -> deferred_finite_checks:
        if self.enabled:
            _DEFERRED.append([])
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if not self.enabled:
            return
        checks = _DEFERRED.pop()
        if exc_type is not None or not checks:
            return
        ok = torch.stack([flag for flag, _, _ in checks]).cpu()  # the one host read of the block
        if not bool(ok.all()):
            _, value, what = checks[int((~ok).nonzero()[0])]
            _raise_nonfinite(value, what)


class StackedRandomGenerator:
    """One independent ``torch.Generator`` per sample, so each sample depends only on its own seed.

    Drawing a sample alone with seed ``s`` or inside a batch with the same seed gives the same
    noise, hence the same sample (the reproducibility habit of EDM's per-sample seeds).

    Args:
        seeds: one integer seed per batch element.
        device: device of the generators and of the tensors they produce.

    Example:
        >>> rng = StackedRandomGenerator([0, 1, 2])
        >>> x_T = rng.randn((3, 2))          # first dim must equal len(seeds)
        >>> z = rng.randn_like(x_T)
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(s) % (1 << 63)) for s in seeds]

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
        shape = tuple(shape)
        if shape[0] != len(self.generators):
            raise ValueError(f"batch size {shape[0]} does not match the {len(self.generators)} seeds")
        return torch.stack(
            [torch.randn(shape[1:], generator=g, device=self.device, dtype=dtype) for g in self.generators]
        )

    def randn_like(self, x: Tensor) -> Tensor:
        return self.randn(x.shape, dtype=x.dtype).to(x.device)


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


DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """The ``torch.device`` for ``name`` in ``auto | cpu | cuda | cuda:N | mps``.

    ``auto`` is ``cuda`` if available, else ``mps`` if available, else ``cpu``.

    Raises:
        ValueError: an unknown name, or a device this machine does not have (e.g. ``cuda`` without a GPU).
    """
    s = str(name).strip().lower()
    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps is not None and mps.is_available())
    if s == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    kind, _, index = s.partition(":")
    if kind not in DEVICES[1:] or (index and (not index.isdigit() or kind != "cuda")):
        raise ValueError(f"unknown device {str(name)!r}; expected one of auto, cpu, cuda, cuda:N, mps")
    if kind == "cuda" and (not torch.cuda.is_available() or (index and int(index) >= torch.cuda.device_count())):
        found = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA device"
        raise ValueError(f"device {str(name)!r} is not available on this machine ({found}); use --device cpu or auto")
    if kind == "mps" and not has_mps:
        raise ValueError(f"device {str(name)!r} is not available on this machine (no MPS); use --device cpu or auto")
    return torch.device(s)


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
