"""Measurement operators A for inverse problems on images: super-resolution, deblurring, inpainting, denoising.

The tasks follow the TFG benchmark (Ye et al. 2024) used by TAG (docs/notation.md §7.2): a measurement ``y = A(x_0) +
σ_y n``
and the per-sample DPS/TFG loss ``ℓ(x̂_0) = ‖A(x̂_0) − y‖₂`` (docs/notation.md §4.4; the norm, not its square).

Shapes: images are ``(B, C, H, W)`` in VP space, i.e. pixel values in ``[-1, 1]``. Every operator here is linear and
has a closed-form adjoint ``Aᵀ`` (checked against autograd in ``tests/test_operators.py``). Every constructor also
takes ``noise_std`` (σ_y ≥ 0, see :class:`Operator`).

Usage with DPS (``A.loss`` already applies A, so do not also pass ``operator=A``)::

    A = make_operator("sr4", 28, noise_std=0.05)
    y = A.measure(x_true, generator=torch.Generator().manual_seed(0))
    term = DPSGuidance(A.loss(y), guidance_scale=1.0)

Any callable ``A(x) -> y`` works as ``DPSGuidance(..., operator=A)``; subclassing :class:`Operator` and writing
``forward`` (plus ``adjoint``/``output_shape`` where they apply) gives ``measure``, ``loss`` and ``__call__`` for free.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["OPERATORS", "BoxInpainting", "GaussianBlur", "Identity", "Operator", "RandomInpainting",
           "SuperResolution", "make_operator"]


def _check_image_shape(shape: Sequence[int], who: str) -> tuple[int, int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4:
        raise ValueError(f"{who} expects images shaped (B, C, H, W), got shape {shape}")
    return shape  # type: ignore[return-value]


class Operator:
    """Base class of a measurement operator ``A: (B, C, H, W) -> y``, with measurement noise ``σ_y``.

    Subclasses implement ``forward`` and, when linear, ``adjoint``; ``output_shape`` defaults to the input shape.

    Args:
        noise_std: σ_y ≥ 0, the std of the Gaussian measurement noise added by :meth:`measure` (pixel units of the
            ``[-1, 1]`` range).
    Raises:
        ValueError: if ``noise_std`` is negative or not finite.
    """

    def __init__(self, noise_std: float = 0.0):
        noise_std = float(noise_std)
        if not (math.isfinite(noise_std) and noise_std >= 0.0):
            raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std}")
        self.noise_std = noise_std

    def forward(self, x: Tensor) -> Tensor:
        """``A(x)``; differentiable. Shape ``(B, C, H, W) -> output_shape(x.shape)``."""
        raise NotImplementedError

    def __call__(self, x: Tensor) -> Tensor:
        return self.forward(x)

    def adjoint(self, y: Tensor) -> Tensor:
        """``Aᵀ y`` in closed form (linear operators only). Shape ``output_shape(s) -> s``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement an adjoint")

    def output_shape(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of ``A(x)`` for ``x`` of shape ``input_shape`` ``(B, C, H, W)``; raises ValueError if unsupported."""
        return _check_image_shape(input_shape, type(self).__name__)

    def measure(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A noisy measurement ``y = A(x) + σ_y n``, ``n ~ N(0, I)`` drawn from ``generator`` (reproducible).

        Returns ``A(x)`` exactly when ``σ_y = 0``. The result is data, so it is detached from the graph.
        """
        y = self.forward(x).detach()
        if self.noise_std == 0.0:
            return y
        return y + self.noise_std * torch.randn(y.shape, generator=generator, dtype=y.dtype, device=y.device)

    def loss(self, y: Tensor, squared: bool = False) -> Callable[[Tensor], Tensor]:
        """Per-sample DPS/TFG loss ``x0_hat -> ‖A(x0_hat) − y‖₂`` (or its square), shape ``(B,)``.

        Pass it to ``DPSGuidance``/``TFGGuidance`` as ``loss_fn`` *without* ``operator=`` (A is applied here).

        Raises:
            ValueError: (when called) if ``A(x0_hat)`` and ``y`` have different shapes.
        """
        y = y.detach()

        def loss_fn(x0_hat: Tensor) -> Tensor:
            y_hat = self.forward(x0_hat)
            if y_hat.shape != y.shape:
                raise ValueError(f"{type(self).__name__} output A(x0_hat) has shape {tuple(y_hat.shape)} but the "
                                 f"measurement y has shape {tuple(y.shape)}")
            r = (y_hat - y).flatten(1)
            return r.square().sum(1) if squared else torch.linalg.vector_norm(r, dim=1)  # grad 0 at r = 0

        return loss_fn

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class Identity(Operator):
    """``A = I`` (denoising: ``y = x + σ_y n``). Self-adjoint."""

    def forward(self, x: Tensor) -> Tensor:
        return x

    def adjoint(self, y: Tensor) -> Tensor:
        return y


class SuperResolution(Operator):
    """Downsampling by average pooling over ``factor × factor`` blocks (TFG's A_down, 256 → 64 on Cat).

    Shapes: ``(B, C, H, W) -> (B, C, H/factor, W/factor)``. Adjoint: nearest upsampling divided by ``factor²``.

    Args:
        factor: integer ≥ 1 (2 and 4 in the registry).
    Raises:
        ValueError: if ``factor`` is not an integer ≥ 1, or (on use) H or W is not divisible by ``factor``.
    """

    def __init__(self, factor: int = 4, noise_std: float = 0.0):
        super().__init__(noise_std)
        if isinstance(factor, bool) or int(factor) != factor or factor < 1:
            raise ValueError(f"SuperResolution factor must be an integer >= 1, got {factor}")
        self.factor = int(factor)

    def output_shape(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        b, c, h, w = _check_image_shape(input_shape, "SuperResolution")
        f = self.factor
        if h % f or w % f:
            raise ValueError(f"SuperResolution factor {f} must divide H and W, got image shape {(b, c, h, w)}")
        return (b, c, h // f, w // f)

    def forward(self, x: Tensor) -> Tensor:
        self.output_shape(x.shape)
        return F.avg_pool2d(x, self.factor)

    def adjoint(self, y: Tensor) -> Tensor:
        f = self.factor
        return y.repeat_interleave(f, dim=-2).repeat_interleave(f, dim=-1) / (f * f)


def _reflect_index(n: int, p: int, device: torch.device) -> Tensor:
    """Source index of each of the ``n + 2p`` positions of a reflect-padded axis (no edge repeat, as F.pad)."""
    i = torch.arange(-p, n + p, device=device).abs()
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)


class GaussianBlur(Operator):
    """Depthwise Gaussian blur with **reflect padding** (as the DPS/TFG deblur operator's ``ReflectionPad2d``).

    ``A x = K * pad_reflect(x)`` with ``K[i, j] = g[i] g[j]``, ``g ∝ exp(−(i − r)² / (2 s²))``, normalised so
    ``K`` sums to 1; each channel is blurred on its own. Reflect padding makes a constant image a fixed point
    everywhere (no dark border). The adjoint is exact for this padding: ``Aᵀ = Pᵀ ∘ Kᵀ`` where ``Kᵀ`` is the
    transposed ('full') convolution and ``Pᵀ`` folds each padded pixel back onto the pixel it was copied from.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``; needs ``kernel_size // 2 < min(H, W)`` (reflect-pad limit).

    Args:
        kernel_size: odd integer ≥ 1 (pixels).
        blur_std: std of the Gaussian kernel in pixels, > 0 (the blur's width; not a noise level).
    Raises:
        ValueError: for an even or < 1 ``kernel_size``, ``blur_std <= 0``, or (on use) an image too small to pad.
    """

    def __init__(self, kernel_size: int = 9, blur_std: float = 3.0, noise_std: float = 0.0):
        super().__init__(noise_std)
        if isinstance(kernel_size, bool) or int(kernel_size) != kernel_size or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"GaussianBlur kernel_size must be an odd integer >= 1, got {kernel_size}")
        if not (math.isfinite(float(blur_std)) and blur_std > 0):
            raise ValueError(f"GaussianBlur blur_std must be > 0, got {blur_std}")
        self.kernel_size, self.blur_std = int(kernel_size), float(blur_std)

    def kernel(self, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> Tensor:
        """The normalised 2-D kernel, shape ``(kernel_size, kernel_size)``, summing to 1."""
        r = self.kernel_size // 2
        g = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float64) / self.blur_std) ** 2)
        return (torch.outer(g, g) / g.sum() ** 2).to(dtype=dtype, device=device)

    def output_shape(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        shape = _check_image_shape(input_shape, "GaussianBlur")
        if self.kernel_size // 2 >= min(shape[2], shape[3]):
            raise ValueError(f"GaussianBlur kernel_size {self.kernel_size} is too large for reflect padding of "
                             f"image shape {shape}: need kernel_size // 2 < min(H, W)")
        return shape

    def forward(self, x: Tensor) -> Tensor:
        self.output_shape(x.shape)
        p = self.kernel_size // 2
        weight = self.kernel(x.dtype, x.device).expand(x.shape[1], 1, -1, -1)  # depthwise: (C, 1, k, k)
        return F.conv2d(F.pad(x, (p, p, p, p), mode="reflect"), weight, groups=x.shape[1])

    def adjoint(self, y: Tensor) -> Tensor:
        b, c, h, w = self.output_shape(y.shape)
        p = self.kernel_size // 2
        weight = self.kernel(y.dtype, y.device).expand(c, 1, -1, -1)
        z = F.conv_transpose2d(y, weight, groups=c)  # Kᵀ: (B, C, H + 2p, W + 2p)
        out = y.new_zeros(b, c, h, w + 2 * p).index_add_(2, _reflect_index(h, p, y.device), z)
        return y.new_zeros(b, c, h, w).index_add_(3, _reflect_index(w, p, y.device), out)


class _MaskOperator(Operator):
    """``A x = m ⊙ x`` with a 0/1 mask ``m`` of shape ``(H, W)`` shared over batch and channels; ``Aᵀ = A``."""

    def mask(self, h: int, w: int) -> Tensor:
        """The 0/1 mask of kept pixels, shape ``(H, W)``, bool (False = masked out, set to 0 in y)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        _, _, h, w = self.output_shape(x.shape)
        return x * self.mask(h, w).to(device=x.device, dtype=x.dtype)

    def adjoint(self, y: Tensor) -> Tensor:
        return self.forward(y)


class BoxInpainting(_MaskOperator):
    """Inpainting of a missing rectangle: pixels inside ``box`` are set to 0 in ``y`` (all channels).

    Args:
        box: ``(top, left, height, width)`` in pixels; must lie inside the image.
    Raises:
        ValueError: for a negative offset or non-positive size, or (on use) a box that leaves the image.
    """

    def __init__(self, box: tuple[int, int, int, int], noise_std: float = 0.0):
        super().__init__(noise_std)
        box = tuple(int(v) for v in box)
        if len(box) != 4 or box[0] < 0 or box[1] < 0 or box[2] < 1 or box[3] < 1:
            raise ValueError(f"BoxInpainting box must be (top >= 0, left >= 0, height >= 1, width >= 1), got {box}")
        self.box = box

    def mask(self, h: int, w: int) -> Tensor:
        top, left, bh, bw = self.box
        if top + bh > h or left + bw > w:
            raise ValueError(f"BoxInpainting box {self.box} does not fit in an image of size (H, W) = {(h, w)}")
        m = torch.ones(h, w, dtype=torch.bool)
        m[top:top + bh, left:left + bw] = False
        return m


class RandomInpainting(_MaskOperator):
    """Inpainting of randomly missing pixels: exactly ``round(fraction · H · W)`` pixels are set to 0 in ``y``.

    The mask is drawn from ``torch.Generator().manual_seed(seed)`` (``randperm`` on CPU), once per image size
    ``(H, W)``, cached, and shared across batch and channels, so it is deterministic for a given ``(seed, H, W)``.

    Args:
        fraction: fraction of pixels *missing*, in ``[0, 1]``.
        seed: seed of the mask.
    Raises:
        ValueError: if ``fraction`` is outside ``[0, 1]``.
    """

    def __init__(self, fraction: float = 0.5, seed: int = 0, noise_std: float = 0.0):
        super().__init__(noise_std)
        if not 0.0 <= float(fraction) <= 1.0:
            raise ValueError(f"RandomInpainting fraction must be in [0, 1], got {fraction}")
        self.fraction, self.seed = float(fraction), int(seed)
        self._masks: dict[tuple[int, int], Tensor] = {}

    def mask(self, h: int, w: int) -> Tensor:
        if (h, w) not in self._masks:
            missing = torch.randperm(h * w, generator=torch.Generator().manual_seed(self.seed))
            m = torch.ones(h * w, dtype=torch.bool)
            m[missing[: round(self.fraction * h * w)]] = False
            self._masks[(h, w)] = m.reshape(h, w)
        return self._masks[(h, w)]


def _blur_for(h: int, w: int, noise_std: float) -> GaussianBlur:
    # blur_std s = min(H, W) / 16 px (8×8 → 0.5, 28×28 → 1.75): strokes of 28×28 MNIST merge but stay legible; the
    # kernel spans ±3s, clipped so the reflect pad fits (kernel_size // 2 < min(H, W)).
    blur_std = min(h, w) / 16
    return GaussianBlur(2 * min(math.ceil(3 * blur_std), min(h, w) - 1) + 1, blur_std, noise_std)


OPERATORS: dict[str, Callable[[int, int, float], Operator]] = {
    "sr2": lambda h, w, s: SuperResolution(2, s),
    "sr4": lambda h, w, s: SuperResolution(4, s),
    "deblur": _blur_for,
    "inpaint_box": lambda h, w, s: BoxInpainting((h // 4, w // 4, max(h // 2, 1), max(w // 2, 1)), s),
    "inpaint_random": lambda h, w, s: RandomInpainting(0.5, 0, s),
    "denoise": lambda h, w, s: Identity(s),
}
"""Name → factory ``(H, W, noise_std) -> Operator``; use :func:`make_operator`."""


def make_operator(name: str, image_size: int | tuple[int, int], noise_std: float = 0.0) -> Operator:
    """Build a registry operator with defaults scaled to the image size (8×8 digits, 28×28 MNIST, ...).

    Defaults: ``sr2``/``sr4`` average-pool by 2/4; ``deblur`` a reflect-padded Gaussian with σ = min(H, W)/16 px
    and a ±3σ kernel (8 → 5×5, σ 0.5; 28 → 13×13, σ 1.75); ``inpaint_box`` masks the central box of half the
    height and width (8 → (2, 2, 4, 4), 28 → (7, 7, 14, 14)); ``inpaint_random`` masks 50% of pixels (seed 0);
    ``denoise`` is the identity (use ``noise_std > 0``).

    Args:
        name: one of :data:`OPERATORS`.
        image_size: ``S`` for S×S images, or ``(H, W)``.
        noise_std: σ_y of :meth:`Operator.measure`.
    Raises:
        ValueError: for an unknown name (the valid ones are listed), a bad size, or an image size the operator
            cannot handle (e.g. ``sr4`` on a size not divisible by 4).
    """
    if name not in OPERATORS:
        raise ValueError(f"unknown operator {name!r}; valid names: {', '.join(sorted(OPERATORS))}")
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if h < 1 or w < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    op = OPERATORS[name](h, w, noise_std)
    op.forward(torch.zeros(1, 1, h, w))  # fail early for sizes the operator cannot handle
    return op
