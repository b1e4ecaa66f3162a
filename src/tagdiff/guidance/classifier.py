"""Classifier guidance with a noise-aware classifier p(y | x_t, t) (Dhariwal & Nichol 2021; docs/notation.md §4.1)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..sampling.terms import ScoreTerm, StepContext, Strength

__all__ = ["ClassifierGuidance", "grad_log_prob"]


def grad_log_prob(logits_fn: Callable[[Tensor], Tensor], x: Tensor, target: Tensor) -> Tensor:
    """``∇_x log softmax(logits_fn(x))[target]`` per sample, shape of ``x``.

    Per-sample: the summed log-probabilities have independent per-sample gradients (no batch coupling,
    as long as ``logits_fn`` has none, e.g. no BatchNorm in train mode).

    Raises:
        ValueError: if ``target`` leaves ``[0, K-1]`` for K logits, or logits are not shaped ``(B, K)``.
    """
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        logits = logits_fn(x_in)
        if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
            raise ValueError(f"classifier must return logits of shape (B, K), got {tuple(logits.shape)}")
        target = torch.as_tensor(target, device=logits.device).long().reshape(-1).expand(x.shape[0])
        K = logits.shape[1]
        if target.min() < 0 or target.max() >= K:
            raise ValueError(f"target class {target.unique().tolist()} out of range; the classifier has classes "
                             f"0..{K - 1}")
        log_p = torch.log_softmax(logits, dim=-1).gather(1, target[:, None]).sum()
        (grad,) = torch.autograd.grad(log_p, x_in)
    return grad


class ClassifierGuidance(ScoreTerm):
    """Δs = scale_t · ∇_x log p(y | x_t, t) (guided-diffusion ``cond_fn`` + ``condition_score``).

    Args:
        classifier: ``(x, t) -> logits`` of shape ``(B, K)``, trained on noisy x_t (t: ``(B,)`` int64).
        target: class index, or ``(B,)`` tensor of class indices.
        guidance_scale: the classifier scale s (``1`` samples p(x | y) exactly with an exact classifier);
            a :class:`Strength` gives a schedule/window over t.

    Raises:
        ValueError: at sampling time if ``target`` is outside the classifier's classes.
    """

    def __init__(self, classifier: Callable[[Tensor, Tensor], Tensor], target: int | Tensor,
                 guidance_scale: float | Strength = 1.0):
        self.classifier = classifier
        self.target = target
        self.strength = guidance_scale if isinstance(guidance_scale, Strength) else Strength(float(guidance_scale))

    def delta_score(self, x: Tensor, t: Tensor, x0_hat: Tensor, ctx: StepContext) -> Tensor | None:
        if not self.strength.active(t):
            return None
        grad = grad_log_prob(lambda z: self.classifier(z, t), x, self.target)
        return self.strength(t, ctx.schedule, x) * grad
