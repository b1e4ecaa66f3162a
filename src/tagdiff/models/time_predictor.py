r"""Time predictors p_φ(t | x_t): classifiers over the T training timesteps (docs/notation.md §2).

Every time predictor (learned network or exact posterior) follows one contract, :class:`TimePredictor`:

* ``forward(x, c=None) -> logits`` of shape ``(B, T)``, with ``T = num_train_timesteps``;
* ``log_prob(x, t, c=None) -> (B,)``: ``log softmax(logits)[t]`` at integer timesteps ``t`` of shape ``(B,)``;
* ``predict_t(x, c=None) -> (B,)``: the argmax timestep ``t_pred``.

The predictor gets **no timestep input** (it predicts t). ``c`` is an optional class condition (B,) int64 for
p_φ(t | x, c); ``c=None`` uses a learned "null" embedding, so a conditional predictor also serves the
unconditional interface.

**Over σ (flow matching, docs/notation.md §2.4).** A flow model's time is a continuous σ ∈ (0, 1] visited on
shifted grids, so its predictor predicts σ, not a step index. Choice: σ bins, with the same class and the same
contract: class ``t`` is the bin of ``σ_t = (t + 1) / T`` (nearest-σ cells, :meth:`FlowSchedule.class_of`), the
predictor's ``schedule`` is :attr:`FlowSchedule.vp_schedule`, and it reads the VP view ``x_σ / r(σ)`` that the loop
hands every term. Why bins rather than a continuous density: the softmax over bins is the existing class (every
network, checkpoint, :func:`~tagdiff.guidance.tls`, TAG's target ``ctx.t`` and ω_t = ω_0 (1 - ᾱ_t) =
ω_0 σ_t² / r_t², the Time Gap work unchanged), and T = 1000 bins of width 10⁻³ resolve σ finer than any sampler's
grid. Why the VP view: TAG corrects what the loop hands it, and in that view p(t | x) is a VP time posterior with
ᾱ(σ_t), exact for mixtures (:class:`tagdiff.data.gmm_flow.ExactSigmaPosterior`). Train it with
:func:`flow_time_loss`: σ drawn from the flow model's own training density (uniform, or SD3's logit-normal),
x_σ = (1 - σ) x_0 + σ ε, target the bin of the current σ, so the learned prior over bins is that density's
(:meth:`FlowSchedule.sigma_prior`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..sampling.flow_path import FlowSchedule
from .checkpoints import HubMixin, register_model
from .nets import mlp

__all__ = ["MLPTimePredictor", "SimpleCNNTimePredictor", "TimePredictor", "UNetEncoderTimePredictor",
           "flow_time_batch", "flow_time_loss"]


class TimePredictor(HubMixin, nn.Module):
    """Base class: subclasses implement ``forward(x, c=None) -> (B, T) logits`` and set
    ``num_train_timesteps`` and ``sample_shape`` (the shape of one sample, without batch).

    ``save_pretrained(dir)`` / ``from_pretrained(dir_or_hub_id)`` (:class:`~tagdiff.hub.HubMixin`) write and read
    tagdiff's checkpoint folder (``model.safetensors`` + ``config.json``), with the predictor's schedule.
    """

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


@register_model
class MLPTimePredictor(TimePredictor):
    """MLP time predictor for vectors ``(B, dim)`` -> logits ``(B, T)``.

    ``num_layers`` linear layers with SiLU (the paper's toy predictor is a 5-layer MLP, docs/notation.md §2.2). With
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


@register_model
class SimpleCNNTimePredictor(TimePredictor):
    """The paper's SimpleCNN (docs/notation.md §2.2): 4 × [3×3 conv ("same" padding), ReLU, 2×2 avg-pool] with
    32/64/128/256 channels, flatten, optional concatenated condition embedding, Linear -> T logits.

    Pooling uses ``ceil_mode=True`` so that small images (8×8 digits: 8→4→2→1→1) keep a non-empty map; for
    32×32 inputs this is identical to the paper's layout.

    Parameter count at the paper's size (32×32×3, T = 1000; the paper reports 1.48 M, docs/notation.md §2.2, which is
    8.5% of
    the 17.38 M UNet-encoder classifier it is compared with in Table 18): convs 896 + 18 496 + 73 856 + 295 168 =
    388 416; flatten gives 2·2·256 = 1024 features; ``num_classes=10, cond_dim=64`` adds an 11 × 64 = 704 embedding
    (10 classes + the null row) and 64 head inputs, so the head is (1024 + 64)·1000 + 1000 = 1 089 000. Total
    **1 478 120** ≈ 1.48 M (unconditional: 1 413 416 ≈ 1.41 M). The paper does not state flatten vs. global pooling,
    the padding, or the conditioning; this reading (flatten, "same" padding, 1000 logits, a 64-d embedding
    concatenated before the linear layer) is the one that reproduces 1.48 M; global pooling would give 0.71 M.

    Args:
        in_channels, image_size: input is ``(B, in_channels, image_size, image_size)``.
        num_train_timesteps: T, the number of logits.
        widths: channels of the conv blocks.
        num_classes: with it, p_φ(t | x, c) with a learned ``cond_dim`` embedding (plus a null row for ``c=None``
            or ``c == -1``).

    Raises ``ValueError`` (in ``forward``) for an x that is not ``(B, in_channels, image_size, image_size)`` or a
    condition outside ``-1..num_classes-1``.
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


@register_model
class UNetEncoderTimePredictor(TimePredictor):
    """A time predictor on the encoder half of a diffusers ``UNet2DModel``, with a linear head to T logits.

    The paper compares its SimpleCNN with the Dhariwal & Nichol UNet-encoder classifier (17.38 M parameters,
    docs/notation.md §2.2, Table 18); this is that family at tagdiff's CPU size. Layout, as ``UNet2DModel``'s first half
    (:func:`tagdiff.interop.make_unet` with the same ``widths``): ``conv_in`` (3×3 → ``widths[0]``), one diffusers
    ``DownBlock2D`` per width (``AttnDownBlock2D`` for the last with ``attention``; each but the last halves the
    resolution), ``UNetMidBlock2D``; then GroupNorm, SiLU, global average pooling, optional concatenated condition
    embedding, Linear -> T. The ResNet blocks get no time embedding (``temb_channels=None``): the predictor has no
    timestep input. Global pooling (Dhariwal & Nichol's "adaptive" head) makes it independent of the image size.

    Args:
        in_channels, image_size: input is ``(B, in_channels, image_size, image_size)``.
        num_train_timesteps: T, the number of logits.
        widths: channels per resolution level (default as the project's UNet, ``(32, 64, 64)``).
        layers_per_block: ResNet blocks per level.
        num_classes, cond_dim: as :class:`SimpleCNNTimePredictor`.
        attention: single-head self-attention at the lowest level and in the mid block.

    Raises ``ValueError`` at construction for empty or non-positive ``widths``, and in ``forward`` as
    :class:`SimpleCNNTimePredictor`.
    """

    def __init__(self, in_channels: int, image_size: int, num_train_timesteps: int = 1000,
                 widths: tuple[int, ...] = (32, 64, 64), layers_per_block: int = 1, num_classes: int | None = None,
                 cond_dim: int = 64, attention: bool = False):
        super().__init__()
        from diffusers.models.unets.unet_2d_blocks import AttnDownBlock2D, DownBlock2D, UNetMidBlock2D

        widths = tuple(int(w) for w in widths)
        if not widths or min(widths) < 1:
            raise ValueError(f"widths must be positive channel counts, got {list(widths)}")
        self.config = {"in_channels": in_channels, "image_size": image_size,
                       "num_train_timesteps": num_train_timesteps, "widths": list(widths),
                       "layers_per_block": layers_per_block, "num_classes": num_classes, "cond_dim": cond_dim,
                       "attention": bool(attention)}
        self.sample_shape = (in_channels, image_size, image_size)
        self.num_train_timesteps = num_train_timesteps
        self.num_classes = num_classes
        groups = min(8, min(widths))
        common = {"temb_channels": None, "num_layers": layers_per_block, "resnet_eps": 1e-5,
                  "resnet_act_fn": "silu", "resnet_groups": groups}
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        blocks: list[nn.Module] = []
        c_in = widths[0]
        for i, w in enumerate(widths):
            last = i == len(widths) - 1
            if attention and last:
                blocks.append(AttnDownBlock2D(in_channels=c_in, out_channels=w, downsample_type=None,
                                              attention_head_dim=w, **common))
            else:
                blocks.append(DownBlock2D(in_channels=c_in, out_channels=w, add_downsample=not last,
                                          downsample_padding=1, **common))
            c_in = w
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = UNetMidBlock2D(in_channels=c_in, temb_channels=None, resnet_eps=1e-5, resnet_act_fn="silu",
                                        resnet_groups=groups, add_attention=bool(attention), attention_head_dim=c_in)
        self.norm_out = nn.GroupNorm(groups, c_in, eps=1e-5)
        self.cond = _CondEmbedding(num_classes, cond_dim) if num_classes else None
        self.head = nn.Linear(c_in + (cond_dim if num_classes else 0), num_train_timesteps)

    def forward(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        self.check_input(x)
        h = self.conv_in(x)
        for block in self.down_blocks:
            h, _ = block(h, None)
        h = self.mid_block(h, None)
        h = torch.nn.functional.silu(self.norm_out(h)).mean(dim=(2, 3))
        if self.cond is not None:
            h = torch.cat([h, self.cond(c, x.shape[0], x.device).to(h.dtype)], -1)
        return self.head(h)


def flow_time_batch(x0: Tensor, flow: FlowSchedule, density: str = "uniform", generator: torch.Generator | None = None,
                    loc: float = 0.0, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """A σ-predictor training batch from clean samples ``x0`` ``(B, *D)``: σ ~ ``density``
    (:meth:`FlowSchedule.sample_sigma`), ``x_σ = (1 - σ) x0 + σ ε``; returns the VP view ``x_σ / r(σ)`` (x0's
    dtype/device) and the target bins ``flow.class_of(σ)`` ``(B,)`` int64 (module docstring, "Over σ")."""
    sigma = flow.sample_sigma(x0.shape[0], density, generator, loc, scale)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    r = flow.r(sigma).reshape(-1, *([1] * (x0.ndim - 1))).to(x0.device, x0.dtype)
    return flow.q_sample(x0, sigma, noise) / r, flow.class_of(sigma).to(x0.device)


def flow_time_loss(predictor: nn.Module, x0: Tensor, flow: FlowSchedule, density: str = "uniform",
                   generator: torch.Generator | None = None, c: Tensor | None = None, **density_kw: float) -> Tensor:
    """Mean cross-entropy of ``predictor`` on a :func:`flow_time_batch` (the paper's Eq. 8 with σ bins as classes).

    Raises:
        ValueError: if the predictor's T differs from the flow schedule's (its bins are the schedule's classes).
    """
    T = getattr(predictor, "num_train_timesteps", flow.num_train_timesteps)
    if T != flow.num_train_timesteps:
        raise ValueError(f"the predictor has {T} classes but the flow schedule has T={flow.num_train_timesteps} σ bins")
    x, target = flow_time_batch(x0, flow, density, generator, **density_kw)
    return nn.functional.cross_entropy(predictor(x, c), target)
