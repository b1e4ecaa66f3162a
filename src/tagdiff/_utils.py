"""Small numerical helpers: broadcasting, per-sample randomness, finiteness guards, the device choice.

File IO (atomic writes, the directory lock, deferred Ctrl-C, output checks) is in :mod:`tagdiff._io`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "require",
    "NonFiniteError",
    "deferred_finite_checks",
    "StackedRandomGenerator",
    "seeded_noise",
    "append_dims",
    "check_finite",
    "resolve_device",
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


def require(module: str, extra: str, what: str) -> Any:
    """Import the optional dependency ``module`` (an extra of ``pip install tagdiff[extra]``) or raise an ImportError
    that says which extra brings it."""
    from importlib import import_module

    try:
        return import_module(module)
    except ImportError as e:
        raise ImportError(f"{what} needs {module.split('.')[0]}: pip install 'tagdiff[{extra}]'") from e


def seeded_noise(shape: tuple[int, ...], seed: int, device: Any = "cpu", *, per_sample: bool = False
                 ) -> tuple[Any, Any, Any]:
    """``(x_T, randn_like, generator)`` of a seeded sampling run: x_T of ``shape`` and the step noise drawn on the
    CPU (the same numbers on every device) and moved to ``device``; with ``per_sample`` sample i uses seed + i
    (:class:`StackedRandomGenerator`: its noise does not depend on the batch) and ``generator`` is the list of the
    per-sample generators, else one ``torch.Generator``."""
    import torch

    if per_sample:
        rng = StackedRandomGenerator(range(seed, seed + shape[0]))
        return rng.randn(shape).to(device), rng.randn_like, rng.generators
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(shape, generator=g).to(device)

    def randn_like(z: Any) -> Any:
        return torch.randn(z.shape, generator=g, dtype=z.dtype).to(z.device)

    return x_T, randn_like, g
