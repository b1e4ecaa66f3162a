r"""Training objectives on the flow-matching path (docs/notation.md §1.6, §2.4): the rectified-flow velocity loss of
``tagdiff train diffusion --objective flow`` and the σ-bin loss of a flow model's time predictor.

Both plug into :func:`tagdiff.training.train` as ordinary loss functions ``loss(model, x0, t, noise, schedule, c)``
with a ``draw_t(batch, T, generator)`` method: the loop draws the step's "time" with it (continuous σ here) from the
step's seeded generator where it draws ``t ~ U{0..T-1}`` for ε-models, so flow runs are seeded and resume-exact too.

* :class:`FlowMatchingLoss`: σ ~ ``density``, ``x_σ = (1 - σ) x_0 + σ ε``, target ``v = ε - x_0``, the network
  called at diffusers' timestep ``T σ`` (``FlowMatchEulerDiscreteScheduler``'s convention, the one
  :class:`~tagdiff.sampling.flow.FlowModel` samples with). σ is drawn by diffusers'
  ``training_utils.compute_density_for_timestep_sampling`` (SD3's script: ``"logit_normal"`` with mean 0, std 1, or
  ``"uniform"``, its ``"none"``), continuous: SD3's script then rounds σ onto the 1000 training σs; we do not, so
  the network learns every σ a shifted sampling grid visits. The loss is the plain mean squared error (SD3's
  weighting for logit-normal draws is 1).
* :class:`FlowTimeLoss`: σ ~ the flow model's density (:meth:`FlowSchedule.sample_sigma`, the one
  :meth:`FlowSchedule.sigma_prior` integrates), the VP view ``x_σ / r(σ)``, target the bin of σ: exactly
  :func:`tagdiff.models.time_predictor.flow_time_loss`, with the loop's noise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..sampling.flow_path import SIGMA_DENSITIES, FlowSchedule

__all__ = ["FlowMatchingLoss", "FlowTimeLoss", "check_density"]


def check_density(density: str) -> str:
    if density not in SIGMA_DENSITIES:
        raise ValueError(f"unknown sigma density {density!r}; expected one of {', '.join(SIGMA_DENSITIES)}")
    return density


def _bcast(sigma: Tensor, x: Tensor) -> Tensor:
    return sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.device, x.dtype)


class FlowMatchingLoss:
    """``||v_θ(x_σ, T σ) - (ε - x_0)||²`` with σ ~ ``density`` (module docstring); ``c`` goes to the model as ``y=``.

    Raises:
        ValueError: an unknown density.
    """

    def __init__(self, density: str = "logit_normal", num_train_timesteps: int = 1000):
        self.density, self.num_train_timesteps = check_density(density), int(num_train_timesteps)

    def draw_t(self, batch: int, T: int, generator: torch.Generator) -> Tensor:
        """σ ∈ [0, 1) for one step, shape ``(batch,)`` float32, from the step's generator (diffusers' sampler)."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        scheme = "logit_normal" if self.density == "logit_normal" else "none"
        return compute_density_for_timestep_sampling(scheme, batch, logit_mean=0.0, logit_std=1.0,
                                                     generator=generator)

    def __call__(self, model: nn.Module, x0: Tensor, sigma: Tensor, noise: Tensor, schedule: object,
                 c: Tensor | None = None) -> Tensor:
        s = _bcast(sigma, x0)
        x = (1 - s) * x0 + s * noise
        t = sigma.to(x0.device, torch.float32) * self.num_train_timesteps
        v = model(x, t) if c is None else model(x, t, y=c)
        return F.mse_loss(v.float(), (noise - x0).float())


class FlowTimeLoss:
    """Cross-entropy of a time predictor over the σ bins of ``flow`` on the VP view of x_σ, σ ~ ``density``.

    Raises:
        ValueError: an unknown density.
    """

    def __init__(self, flow: FlowSchedule, density: str = "logit_normal"):
        self.flow, self.density = flow, check_density(density)

    def draw_t(self, batch: int, T: int, generator: torch.Generator) -> Tensor:
        return self.flow.sample_sigma(batch, self.density, generator)

    def __call__(self, predictor: nn.Module, x0: Tensor, sigma: Tensor, noise: Tensor, schedule: object,
                 c: Tensor | None = None) -> Tensor:
        sigma = sigma.to(torch.float64).cpu()
        x = self.flow.q_sample(x0, sigma, noise) / _bcast(self.flow.r(sigma), x0)
        target = self.flow.class_of(sigma).to(x0.device)
        return F.cross_entropy(predictor(x, c).float(), target)
