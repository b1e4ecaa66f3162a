r"""Label classifiers for guidance and evaluation on small images (docs/notation.md §4.4, §4.1, §7.2).

Three roles, three networks, all on images ``(B, C, H, W)`` in ``[-1, 1]`` (tagdiff's convention):

* :class:`NoisyClassifier`: p(y | x_t, t), a noise-aware classifier for **classifier guidance**
  (:class:`tagdiff.guidance.ClassifierGuidance`; guided-diffusion / TFG ``cg``). ``forward(x, t) -> (B, K)``.
* :class:`CleanClassifier`: p(y | x) on clean images, for **DPS / TFG label guidance** through Tweedie's x0_hat,
  with loss ℓ = -log p(y | x0_hat) (:class:`tagdiff.guidance.DPSGuidance`). ``forward(x) -> (B, K)``.
* :class:`EvalClassifier`: an **independent evaluation** classifier (the TFG benchmark scores accuracy with a
  separate classifier, docs/notation.md §7.2) that is never used for guidance. It has a different architecture from
  :class:`CleanClassifier` (residual blocks, GroupNorm, GELU, max-pooling, dropout); train it with another seed and,
  ideally, on another data split. Its penultimate ``features(x) -> (B, feature_dim)`` are the feature space of
  :mod:`tagdiff.image_metrics` (FID/KID).

None of the networks uses BatchNorm: every output depends on its own sample only (no batch coupling), in train
and eval mode alike, apart from dropout in :class:`EvalClassifier` during training.

The loss functions follow :func:`tagdiff.training.train`'s signature ``(model, x0, t, noise, schedule, c) -> scalar``;
pass the class labels to ``train`` with ``labels=`` (they arrive as ``c``)::

    train(NoisyClassifier(1, 28), noisy_classifier_loss, x, schedule, TrainConfig(...), out, labels=y)
    train(CleanClassifier(1, 28), clean_classifier_loss, x, schedule, TrainConfig(...), out, labels=y)

Extra loss options are keyword-only; bind them with ``functools.partial``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoints import HubMixin, register_model
from .nets import timestep_embedding

if TYPE_CHECKING:
    from ..sampling.schedules import VPSchedule

__all__ = ["CleanClassifier", "EvalClassifier", "NoisyClassifier", "accuracy", "clean_classifier_loss",
           "noisy_classifier_loss"]


def _groups(channels: int, max_groups: int = 8) -> int:
    """Largest divisor of ``channels`` that is ``<= max_groups`` (GroupNorm needs ``channels % groups == 0``)."""
    return max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)


def _check_widths(widths: Any) -> list[int]:
    widths = [int(w) for w in widths]
    if not widths or min(widths) < 1:
        raise ValueError(f"widths must be a non-empty sequence of positive integers, got {widths!r}")
    return widths


class _ImageClassifier(HubMixin, nn.Module):
    """Shared input validation: ``x`` must be ``(B, *sample_shape)``. ``save_pretrained`` / ``from_pretrained``
    (:class:`~tagdiff.hub.HubMixin`) write and read tagdiff's checkpoint folder."""

    sample_shape: tuple[int, int, int]
    num_classes: int

    def _init_shape(self, in_channels: int, image_size: int, num_classes: int) -> None:
        if in_channels < 1 or image_size < 1:
            raise ValueError(f"in_channels and image_size must be positive, got {in_channels}, {image_size}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.sample_shape = (in_channels, image_size, image_size)
        self.num_classes = num_classes

    def check_input(self, x: Tensor) -> None:
        """Raise ``ValueError`` if ``x`` is not a floating tensor shaped ``(B, *sample_shape)``."""
        if not isinstance(x, Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != self.sample_shape:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            shape = ", ".join(map(str, self.sample_shape))
            raise ValueError(f"{type(self).__name__} expects images of shape (B, {shape}), got {got}")
        if not x.is_floating_point():
            raise ValueError(f"{type(self).__name__} expects floating images in [-1, 1], got dtype {x.dtype}")


# ----------------------------------------------------------------------------------------------- noisy classifier


class _FiLMResBlock(nn.Module):
    """conv3×3 → GroupNorm → FiLM(t) → SiLU → conv3×3 → GroupNorm → SiLU, plus a (1×1) skip connection.

    FiLM: ``h * (1 + scale(t)) + shift(t)``; the FiLM layer is zero-initialised, so training starts from a
    t-independent network.
    """

    def __init__(self, c_in: int, c_out: int, emb_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm1 = nn.GroupNorm(_groups(c_out), c_out)
        self.film = nn.Linear(emb_dim, 2 * c_out)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        y = F.silu(self.norm1(self.conv1(h)) * (1 + scale) + shift)
        y = F.silu(self.norm2(self.conv2(y)))
        return y + self.skip(h)


@register_model
class NoisyClassifier(_ImageClassifier):
    """Noise-aware classifier p(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021; docs/notation.md §4.1).

    Layout: per width ``w``: a residual block (two 3×3 convs, GroupNorm, SiLU) whose first activation is
    modulated by FiLM from a sinusoidal timestep embedding (:func:`tagdiff.nets.timestep_embedding` → Linear → SiLU
    → Linear), then 2×2 average pooling (``ceil_mode=True``: 8→4→2→1, 28→14→7→4); flatten; Linear → K logits.
    Defaults (widths 32/64/128, ``emb_dim=128``) give ≈0.41 M parameters at 28×28.

    Args:
        in_channels, image_size: inputs are ``(B, in_channels, image_size, image_size)`` in ``[-1, 1]`` (at t = 0).
        num_classes: K. num_train_timesteps: T of the diffusion schedule it is trained with.
        widths: channels per resolution. emb_dim: timestep-embedding width.

    ``forward(x, t)``: ``t`` int64 training timesteps of shape ``(B,)`` (a scalar or 1-element tensor is broadcast).

    Raises:
        ValueError: in ``forward``, if ``x`` is not ``(B, *sample_shape)``, or ``t`` is not integral, has another
            shape, or leaves ``[0, T-1]``.
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int = 10, num_train_timesteps: int = 1000,
                 widths: tuple[int, ...] = (32, 64, 128), emb_dim: int = 128):
        super().__init__()
        widths = _check_widths(widths)
        if num_train_timesteps < 1 or emb_dim < 2:
            raise ValueError(f"need num_train_timesteps >= 1 and emb_dim >= 2, got {num_train_timesteps}, {emb_dim}")
        self.config: dict[str, Any] = {"in_channels": in_channels, "image_size": image_size,
                                       "num_classes": num_classes, "num_train_timesteps": num_train_timesteps,
                                       "widths": widths, "emb_dim": emb_dim}
        self._init_shape(in_channels, image_size, num_classes)
        self.num_train_timesteps = num_train_timesteps
        self.emb_dim = emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.blocks = nn.ModuleList()
        c_in, size = in_channels, image_size
        for w in widths:
            self.blocks.append(_FiLMResBlock(c_in, w, emb_dim))
            c_in, size = w, -(-size // 2)
        self.pool = nn.AvgPool2d(2, ceil_mode=True)
        self.head = nn.Linear(c_in * size * size, num_classes)

    def check_t(self, t: Tensor | int, batch: int, device: torch.device | str | None = None) -> Tensor:
        """Validate timesteps and return them as int64 ``(batch,)``.

        Raises:
            ValueError: non-integral ``t``, a shape other than ``()``, ``(1,)`` or ``(batch,)``, or values outside
                ``[0, T-1]``.
        """
        t = torch.as_tensor(t, device=device)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"t must hold integer training timesteps, got dtype {t.dtype}")
        if t.ndim == 0 or tuple(t.shape) == (1,):
            t = t.reshape(1).expand(batch)
        elif tuple(t.shape) != (batch,):
            raise ValueError(f"t must have shape ({batch},) (one timestep per sample) or be a scalar, "
                             f"got {tuple(t.shape)}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) > self.num_train_timesteps - 1):
            raise ValueError(f"timestep out of range: got [{int(t.min())}, {int(t.max())}], expected integers in "
                             f"[0, {self.num_train_timesteps - 1}]")
        return t.long()

    def forward(self, x: Tensor, t: Tensor | int) -> Tensor:
        self.check_input(x)
        t = self.check_t(t, x.shape[0], x.device)
        emb = self.time_mlp(timestep_embedding(t, self.emb_dim).to(x.dtype))
        h = x
        for block in self.blocks:
            h = self.pool(block(h, emb))
        return self.head(h.flatten(1))


def noisy_classifier_loss(model: nn.Module, x0: Tensor, t: Tensor, noise: Tensor, schedule: VPSchedule,
                          c: Tensor | None = None, *, t_max: int | None = None) -> Tensor:
    """``CE(model(q_sample(x0, t, noise), t), c)``: the noisy-classifier loss for :func:`tagdiff.training.train`.

    ``train`` draws ``t ~ U{0..T-1}``. With ``t_max`` (bind with ``functools.partial``) the timesteps are remapped
    to ``t * (t_max + 1) // T``, i.e. (near-)uniform on ``{0..t_max}``; use it when guidance is only applied at low
    noise, or when high-noise inputs carry no label information and only dilute training. The classifier is then
    untrained above ``t_max``: keep guidance off there (a :class:`tagdiff.guidance.Strength` window).

    Raises:
        ValueError: if ``c`` is missing (pass ``labels=`` to ``train``) or holds -1 ("no label", from
            ``cond_drop > 0``), or ``t_max`` leaves ``[0, T-1]``.
    """
    if c is None:
        raise ValueError("noisy_classifier_loss needs class labels; pass labels= to tagdiff.training.train")
    if bool((c < 0).any()):
        raise ValueError("class labels must be >= 0; train classifiers with cond_drop=0")
    if t_max is not None:
        T = schedule.num_train_timesteps
        if not 0 <= t_max <= T - 1:
            raise ValueError(f"t_max must be in [0, {T - 1}], got {t_max}")
        t = t * (t_max + 1) // T
    xt = schedule.q_sample(x0, t, noise)
    return F.cross_entropy(model(xt, t).float(), c)


# ----------------------------------------------------------------------------------------------- clean classifier


@register_model
class CleanClassifier(_ImageClassifier):
    """Classifier p(y | x) on clean images, for DPS/TFG label guidance through x0_hat (docs/notation.md §4.2, §4.4).

    Layout: per width ``w``: [3×3 conv, SiLU, 3×3 conv, SiLU, 2×2 average pool (``ceil_mode``)]; flatten;
    Linear → SiLU → Linear → K logits. Smooth activations (SiLU) and average pooling keep ∇_x log p(y | x)
    smooth for guidance. ≈0.47 M parameters at 28×28 with the defaults.

    Guidance loss: ``lambda x0_hat: -torch.log_softmax(clf(x0_hat), -1)[:, y]`` (per sample, shape ``(B,)``).

    Raises:
        ValueError: in ``forward``, if ``x`` is not ``(B, *sample_shape)``.
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int = 10, widths: tuple[int, ...] = (32, 64),
                 hidden: int = 128):
        super().__init__()
        widths = _check_widths(widths)
        self.config: dict[str, Any] = {"in_channels": in_channels, "image_size": image_size,
                                       "num_classes": num_classes, "widths": widths, "hidden": hidden}
        self._init_shape(in_channels, image_size, num_classes)
        layers: list[nn.Module] = []
        c_in, size = in_channels, image_size
        for w in widths:
            layers += [nn.Conv2d(c_in, w, 3, padding=1), nn.SiLU(), nn.Conv2d(w, w, 3, padding=1), nn.SiLU(),
                       nn.AvgPool2d(2, ceil_mode=True)]
            c_in, size = w, -(-size // 2)
        self.body = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Sequential(nn.Linear(c_in * size * size, hidden), nn.SiLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return self.head(self.body(x))


def clean_classifier_loss(model: nn.Module, x0: Tensor, t: Tensor, noise: Tensor, schedule: VPSchedule,
                          c: Tensor | None = None, *, noise_std: float = 0.1) -> Tensor:
    """``CE(model(x0 + noise_std · noise), c)`` for :func:`tagdiff.training.train`; ``t`` and ``schedule`` are unused.

    The light Gaussian augmentation (``noise_std``, default 0.1; 0 disables; bind with ``functools.partial``)
    uses ``train``'s seeded ``noise``, so resumed runs stay exact. It makes the classifier, and its input gradient,
    better behaved on the slightly-off-manifold Tweedie estimates x0_hat that DPS feeds it.

    Raises:
        ValueError: if ``c`` is missing (pass ``labels=`` to ``train``) or holds -1, or ``noise_std < 0``.
    """
    if c is None:
        raise ValueError("clean_classifier_loss needs class labels; pass labels= to tagdiff.training.train")
    if bool((c < 0).any()):
        raise ValueError("class labels must be >= 0; train classifiers with cond_drop=0")
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    x = x0 + noise_std * noise if noise_std > 0 else x0
    return F.cross_entropy(model(x).float(), c)


# ------------------------------------------------------------------------------------------ evaluation classifier


class _ResBlock(nn.Module):
    """Pre-activation residual block: GroupNorm → GELU → conv3×3 → GroupNorm → GELU → conv3×3, plus skip."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, h: Tensor) -> Tensor:
        y = self.conv1(F.gelu(self.norm1(h)))
        y = self.conv2(F.gelu(self.norm2(y)))
        return y + self.skip(h)


@register_model
class EvalClassifier(_ImageClassifier):
    """Independent evaluation classifier (docs/notation.md §7.2: accuracy and FID come from a classifier never used for
    guidance). Do not guide with it.

    Layout: 3×3 stem conv; per width ``w``: a pre-activation residual block (GroupNorm, GELU) and 2×2 max pooling
    (``ceil_mode``); GroupNorm → GELU → flatten → Linear → GELU = ``features`` ``(B, feature_dim)``; then
    dropout → Linear → K logits. Differs from :class:`CleanClassifier` in depth, normalisation, activation,
    pooling and regularisation, so that guidance cannot "fool" the evaluator through shared weaknesses. ≈0.57 M
    parameters at 28×28 with the defaults.

    Args:
        feature_dim: width of the penultimate features (the FID/KID feature space, see :mod:`tagdiff.image_metrics`).
        dropout: dropout before the last layer (training only).

    Raises:
        ValueError: in ``forward``/``features``, if ``x`` is not ``(B, *sample_shape)``.
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int = 10,
                 widths: tuple[int, ...] = (32, 64, 128), feature_dim: int = 128, dropout: float = 0.3):
        super().__init__()
        widths = _check_widths(widths)
        if feature_dim < 1 or not 0 <= dropout < 1:
            raise ValueError(f"need feature_dim >= 1 and 0 <= dropout < 1, got {feature_dim}, {dropout}")
        self.config: dict[str, Any] = {"in_channels": in_channels, "image_size": image_size,
                                       "num_classes": num_classes, "widths": widths, "feature_dim": feature_dim,
                                       "dropout": dropout}
        self._init_shape(in_channels, image_size, num_classes)
        self.feature_dim = feature_dim
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1)]
        c_in, size = widths[0], image_size
        for w in widths:
            layers += [_ResBlock(c_in, w), nn.MaxPool2d(2, ceil_mode=True)]
            c_in, size = w, -(-size // 2)
        layers += [nn.GroupNorm(_groups(c_in), c_in), nn.GELU(), nn.Flatten(),
                   nn.Linear(c_in * size * size, feature_dim), nn.GELU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features ``(B, feature_dim)`` (post-GELU, before dropout), dtype of ``x``."""
        self.check_input(x)
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


# --------------------------------------------------------------------------------------------------------- helpers


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, labels: Tensor | int, *, t: Tensor | int | None = None,
             batch_size: int = 512) -> float:
    """Fraction of ``x`` (``(N, C, H, W)``) whose argmax logit equals ``labels`` (``(N,)`` or one int for all).

    Runs ``model(x)`` (``t=None``) or ``model(x, t)`` (noise-aware classifiers: pass the noisy ``x_t`` and its
    timestep(s), a scalar or ``(N,)``) in eval mode and restores the model's train/eval mode afterwards.
    Evaluate on held-out data; for generated samples, this is the benchmark's "accuracy" (docs/notation.md §7.2).

    Raises:
        ValueError: empty ``x``, or ``labels``/``t`` whose length is not ``N``.
    """
    n = x.shape[0]
    if n == 0:
        raise ValueError("accuracy of an empty set is undefined")
    device = next(model.parameters()).device
    labels = torch.as_tensor(labels).long().reshape(-1)
    if labels.numel() == 1:
        labels = labels.expand(n)
    if labels.shape[0] != n:
        raise ValueError(f"labels has {labels.shape[0]} entries but x has {n} samples")
    if t is not None:
        t = torch.as_tensor(t).reshape(-1)
        if t.numel() == 1:
            t = t.expand(n)
        if t.shape[0] != n:
            raise ValueError(f"t has {t.shape[0]} entries but x has {n} samples")
    was_training = model.training
    model.eval()
    try:
        correct = 0
        for i in range(0, n, batch_size):
            xb = x[i:i + batch_size].to(device)
            logits = model(xb) if t is None else model(xb, t[i:i + batch_size].to(device))
            correct += int((logits.argmax(-1).cpu() == labels[i:i + batch_size]).sum())
    finally:
        model.train(was_training)
    return correct / n
