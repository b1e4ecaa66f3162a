r"""Time predictors p_φ(t | x_t): classifiers over the T training timesteps (TAG.md §5).

Every time predictor (learned network or exact posterior) follows one contract, :class:`TimePredictor`:

* ``forward(x, c=None) -> logits`` of shape ``(B, T)``, with ``T = num_train_timesteps``;
* ``log_prob(x, t, c=None) -> (B,)``: ``log softmax(logits)[t]`` at integer timesteps ``t`` of shape ``(B,)``;
* ``predict_t(x, c=None) -> (B,)``: the argmax timestep ``t_pred``.

The predictor gets **no timestep input** (it predicts t). ``c`` is an optional class condition (B,) int64 for
p_φ(t | x, c); ``c=None`` uses a learned "null" embedding, so a conditional predictor also serves the
unconditional interface.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .nets import mlp

__all__ = ["MLPTimePredictor", "SimpleCNNTimePredictor", "TimePredictor"]


class TimePredictor(nn.Module):
    """Base class: subclasses implement ``forward(x, c=None) -> (B, T) logits`` and set
    ``num_train_timesteps`` and ``sample_shape`` (the shape of one sample, without batch)."""

    num_train_timesteps: int
    sample_shape: tuple[int, ...]
    num_classes: int | None = None

    def check_input(self, x: Tensor) -> None:
        """Raise ``ValueError`` if ``x`` is not shaped ``(B, *sample_shape)``."""
        if x.ndim < 1 or tuple(x.shape[1:]) != tuple(self.sample_shape):
            raise ValueError(f"time predictor expects x of shape (B, {', '.join(map(str, self.sample_shape))}), "
                             f"got {tuple(x.shape)}")

    def log_prob(self, x: Tensor, t: Tensor, c: Tensor | None = None) -> Tensor:
        """``log p_φ(t | x[, c])`` per sample, shape ``(B,)``; ``t`` integer training timesteps ``(B,)``."""
        logits = self(x, c)
        t = torch.as_tensor(t, device=logits.device).long().reshape(-1).expand(x.shape[0])
        if t.min() < 0 or t.max() >= logits.shape[1]:
            raise ValueError(f"timestep {int(t.min())}..{int(t.max())} outside the predictor's "
                             f"0..{logits.shape[1] - 1}")
        # upcast half precision for a stable log-softmax, but never round float64 logits down to float32
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        return torch.log_softmax(logits, dim=-1).gather(1, t[:, None]).squeeze(1).to(x.dtype)

    @torch.no_grad()
    def predict_t(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        """Argmax timestep ``t_pred``, shape ``(B,)``, int64."""
        return self(x, c).argmax(dim=-1)


class _CondEmbedding(nn.Module):
    """Learned class embedding with an extra "null" row, used when ``c is None`` or where ``c == -1``
    (condition dropout during training marks dropped entries with -1)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, c: Tensor | None, batch: int, device: torch.device) -> Tensor:
        if c is None:  # the extra row ``num_classes`` is the null embedding; it is not a valid class index
            return self.table(torch.full((batch,), self.num_classes, device=device, dtype=torch.long))
        c = torch.as_tensor(c, device=device).long().reshape(-1).expand(batch)
        if c.min() < -1 or c.max() >= self.num_classes:
            raise ValueError(f"condition {c.unique().tolist()} outside 0..{self.num_classes - 1} (-1 = no condition)")
        return self.table(torch.where(c < 0, torch.full_like(c, self.num_classes), c))  # -1 -> null row


class MLPTimePredictor(TimePredictor):
    """MLP time predictor for vectors ``(B, dim)`` -> logits ``(B, T)``.

    ``num_layers`` linear layers with SiLU (the paper's toy predictor is a 5-layer MLP, TAG.md §5.2). With
    ``num_classes`` set, a learned condition embedding is concatenated to the input (p_φ(t | x, c)).
    """

    def __init__(self, dim: int, num_train_timesteps: int = 1000, hidden: int = 256, num_layers: int = 5,
                 num_classes: int | None = None, cond_dim: int = 64):
        super().__init__()
        self.config: dict[str, Any] = {"dim": dim, "num_train_timesteps": num_train_timesteps, "hidden": hidden,
                                       "num_layers": num_layers, "num_classes": num_classes, "cond_dim": cond_dim}
        self.sample_shape = (dim,)
        self.num_train_timesteps = num_train_timesteps
        self.num_classes = num_classes
        self.cond = _CondEmbedding(num_classes, cond_dim) if num_classes else None
        self.net = mlp(dim + (cond_dim if num_classes else 0), hidden, num_train_timesteps, num_layers)

    def forward(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        self.check_input(x)
        h = x if self.cond is None else torch.cat([x, self.cond(c, x.shape[0], x.device).to(x.dtype)], -1)
        return self.net(h)


class SimpleCNNTimePredictor(TimePredictor):
    """The paper's SimpleCNN (TAG.md §5.2): 4 × [3×3 conv ("same" padding), ReLU, 2×2 avg-pool] with
    32/64/128/256 channels, flatten, optional concatenated condition embedding, Linear -> T logits.

    Pooling uses ``ceil_mode=True`` so that small images (8×8 digits: 8→4→2→1→1) keep a non-empty map; for
    32×32 inputs this is identical to the paper's layout (≈1.41 M parameters unconditional, TAG.md §5.2).
    Flatten (not global pooling) follows TAG.md's parameter-count inference.

    Args:
        in_channels, image_size: input is ``(B, in_channels, image_size, image_size)``.
    """

    def __init__(self, in_channels: int, image_size: int, num_train_timesteps: int = 1000,
                 widths: tuple[int, ...] = (32, 64, 128, 256), num_classes: int | None = None, cond_dim: int = 64):
        super().__init__()
        self.config = {"in_channels": in_channels, "image_size": image_size,
                       "num_train_timesteps": num_train_timesteps, "widths": list(widths),
                       "num_classes": num_classes, "cond_dim": cond_dim}
        self.sample_shape = (in_channels, image_size, image_size)
        self.num_train_timesteps = num_train_timesteps
        self.num_classes = num_classes
        blocks: list[nn.Module] = []
        c_in, size = in_channels, image_size
        for w in widths:
            blocks += [nn.Conv2d(c_in, w, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2, ceil_mode=True)]
            c_in, size = w, -(-size // 2)
        self.features = nn.Sequential(*blocks, nn.Flatten())
        self.cond = _CondEmbedding(num_classes, cond_dim) if num_classes else None
        self.head = nn.Linear(c_in * size * size + (cond_dim if num_classes else 0), num_train_timesteps)

    def forward(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        self.check_input(x)
        h = self.features(x)
        if self.cond is not None:
            h = torch.cat([h, self.cond(c, x.shape[0], x.device).to(h.dtype)], -1)
        return self.head(h)
