"""DPS-style training-free guidance: the gradient of a loss on x0_hat, taken through the model.

the paper's Eq. 9/29 (Chung et al. 2023): ``∇_{x_t} log p_t(c | x_t) ≈ -∇_{x_t} ℓ(A(x0_hat(x_t)), c)``, folded into
the score as in the paper's composite score (docs/notation.md §3.6, with the sign corrected: ``score - scale ∇ℓ``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..sampling.terms import ScoreTerm, StepContext, Strength

__all__ = ["DPSGuidance", "label_loss"]


class DPSGuidance(ScoreTerm):
    """Δs = -scale_t · ∇_{x_t} ℓ(A(x0_hat(x_t))), with the gradient through the ε-model.

    The loss must be **per sample**, shape ``(B,)``: no norm over the whole batch (the original DPS code
    takes ``torch.linalg.norm`` over the batch, so each sample's step depends on the others; docs/notation.md §4.2).
    Summing per-sample losses before ``autograd.grad`` keeps the gradients independent.

    **Unclipped on images, the result is rounding noise beyond a few digits.** Without ``clip_x0`` in the sampler,
    DPS on an image model drives x̂_0 and the state far outside [-1, 1] (to ~6e5 on the shipped digits model at scale
    16, 50 DDIM(η=1) steps), and every step amplifies float rounding. Measured there, the same per-sample seeds in a
    batch of 8 and in a batch of 2 (different CPU kernels, nothing else) end up to 45 apart in float32 (a rerun: up
    to 20.8 at values near 1e5), 2e-7 apart in float64 (a rerun: 4.8e-6); a float32 and a float64 run of the same
    seeds do not agree at all (differences of 2.6e5). Such outputs are reproducible only with the same batch size,
    precision, device and library versions. Clip x̂_0 in the sampler for images (``sample_ddim(..., clip_x0=1.0)``,
    ``tagdiff sample``'s default ``--clip-x0 auto``): the batch-8-vs-2 difference drops to 7e-4 in float32, and the
    state stays in [-1, 1]; or compare runs in float64. Latents and other unbounded data are never clipped (see
    :mod:`tagdiff.latent`); there the sensitivity depends on the scale used.

    Args:
        loss_fn: ``A(x0_hat) -> (B,)`` per-sample loss ℓ (e.g. ``||y - A(x0_hat)||²`` or ``-log p(c | x0_hat)``).
        guidance_scale: scale of the gradient; a :class:`Strength` gives a schedule/window over t.
        operator: optional measurement operator A applied to x0_hat before ``loss_fn``.

    Raises:
        ValueError: if the loss is not shaped ``(B,)``.
    """

    needs_model_grad = True

    def __init__(self, loss_fn: Callable[[Tensor], Tensor], guidance_scale: float | Strength = 1.0,
                 operator: Callable[[Tensor], Tensor] | None = None):
        self.loss_fn = loss_fn
        self.operator = operator
        self.strength = guidance_scale if isinstance(guidance_scale, Strength) else Strength(float(guidance_scale))

    def delta_score(self, x: Tensor, t: Tensor, x0_hat: Tensor, ctx: StepContext) -> Tensor | None:
        if not self.strength.active(t):
            return None
        if not x.requires_grad:
            raise RuntimeError("DPSGuidance needs x with requires_grad; run it through tagdiff's sampler loop")
        y_hat = self.operator(x0_hat) if self.operator is not None else x0_hat
        loss = self.loss_fn(y_hat)
        if loss.shape != (x.shape[0],):
            raise ValueError(f"DPS loss must be per-sample with shape ({x.shape[0]},), got {tuple(loss.shape)}")
        (grad,) = torch.autograd.grad(loss.sum(), x, retain_graph=ctx.retain_graph)
        return -self.strength(t, ctx.schedule, x) * grad


def label_loss(classifier: Callable[[Tensor], Tensor], target: Tensor | int) -> Callable[[Tensor], Tensor]:
    """Per-sample DPS label loss ``ℓ(x0_hat) = -log p(y | x0_hat)`` of a clean classifier (TFG label guidance).

    ``target`` is a class index or a ``(B,)`` tensor of indices; returns a function ``(B, *D) -> (B,)``.

    Raises:
        ValueError: (when called) if a target is outside the classifier's classes. The range is read from the
            target itself, on the host, once per distinct (targets, class count) pair (targets are small), so guided
            sampling on an accelerator does not synchronise at every step.
    """
    y_host = torch.as_tensor(target).detach().long().reshape(-1).cpu()
    on_device: dict[Any, Tensor] = {}

    def loss(x0_hat: Tensor) -> Tensor:
        logits = classifier(x0_hat)
        K = logits.shape[1]
        if (logits.device, K) not in on_device:
            if y_host.min() < 0 or y_host.max() >= K:
                raise ValueError(f"target class {y_host.unique().tolist()} out of range; the classifier has classes "
                                 f"0..{K - 1}")
            on_device[(logits.device, K)] = y_host.to(logits.device)
        y = on_device[(logits.device, K)].expand(logits.shape[0])
        return -torch.log_softmax(logits, -1).gather(1, y[:, None]).squeeze(1)

    return loss
