"""Small networks: a timestep embedding and the MLP ε-model used on vector data (the toy experiment).

Image ε-models are diffusers ``UNet2DModel`` s (see :mod:`tagdiff.interop`); time predictors live in
:mod:`tagdiff.time_predictor`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoints import register_model

__all__ = ["MLPEpsModel", "mlp", "timestep_embedding"]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017; DDPM). ``(B,)`` -> ``(B, dim)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


def mlp(in_dim: int, hidden: int, out_dim: int, num_layers: int) -> nn.Sequential:
    """``num_layers`` linear layers with SiLU between them (``num_layers >= 1``)."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < num_layers - 1:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


@register_model
class MLPEpsModel(nn.Module):
    """ε-prediction MLP for vectors: ``model(x, t) -> eps_hat``, x of shape ``(B, dim)``, t ``(B,)`` int64.

    The input is ``[x, emb(t)]`` with a sinusoidal timestep embedding; ``num_layers`` linear layers
    (the paper's toy score net is a 3-layer MLP, docs/notation.md §6.1).

    Raises:
        ValueError: if x is not shaped ``(B, dim)``.
    """

    def __init__(self, dim: int, num_train_timesteps: int = 1000, hidden: int = 256, num_layers: int = 3,
                 emb_dim: int = 64):
        super().__init__()
        self.config: dict[str, Any] = {"dim": dim, "num_train_timesteps": num_train_timesteps, "hidden": hidden,
                                       "num_layers": num_layers, "emb_dim": emb_dim}
        self.sample_shape = (dim,)
        self.num_train_timesteps = num_train_timesteps
        self.emb_dim = emb_dim
        self.net = mlp(dim + emb_dim, hidden, dim, num_layers)

    def forward(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.sample_shape[0]:
            raise ValueError(f"x has shape {tuple(x.shape)}, expected (B, {self.sample_shape[0]})")
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        return self.net(torch.cat([x, timestep_embedding(t, self.emb_dim).to(x.dtype)], dim=-1))
