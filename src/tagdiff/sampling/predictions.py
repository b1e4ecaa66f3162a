r"""Model parameterisations: ε-, v- and x0-prediction, converted with diffusers' formulas.

A model's ``prediction_type`` attribute (diffusers' names) says what it outputs; a model without one predicts ε.
With ``a = sqrt(ᾱ_t)`` and ``s = sqrt(1 - ᾱ_t)`` (VP space, docs/notation.md §1; diffusers ``DDPMScheduler.step``)::

    "epsilon":       eps = out                      x0 = (x - s eps) / a
    "v_prediction":  x0  = a x - s out              eps = s x + a out          (Salimans & Ho 2022)
    "sample":        x0  = out                      eps = (x - a x0) / s

and back: ``v = a eps - s x0``.

``"flow_prediction"`` (diffusers' name) is a flow-matching velocity ``v = ε - x0`` of the path
``x_σ = (1 - σ) x0 + σ ε``, read in the loop's VP view ``x = x_σ / r``, ``r = sqrt((1 - σ)² + σ²)`` (so
``a = (1 - σ) / r``, ``s = σ / r``, ``a + s = 1 / r``; :mod:`tagdiff.sampling.flow`)::

    "flow_prediction": eps = (x + a v) / (a + s)     x0 = (x - s v) / (a + s)     v = eps - x0

which are ``ε = x_σ + (1 - σ) v`` and ``x̂0 = x_σ - σ v`` in flow space. A model of this kind is called with the VP
view (:class:`tagdiff.sampling.flow.FlowModel` wraps a diffusers flow model, which reads ``x_σ``, into it).

At zero terminal SNR (ᾱ = 0, ``rescale_betas_zero_snr``) x0 cannot be formed from
ε (``a = 0``): :func:`eps_and_x0` refuses an ε-model there; v-models are exact (x0 = -v, eps = x), x0-models give
eps = x.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

__all__ = ["PREDICTION_TYPES", "check_grid_prediction", "check_prediction_type", "eps_and_x0", "FLOW_PREDICTION",
           "from_eps", "model_prediction_type"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
FLOW_PREDICTION = "flow_prediction"  # a flow velocity in the VP view: declared by FlowModel, not by VP networks


def check_prediction_type(kind: Any) -> str:
    """Return ``kind`` if it is one of :data:`PREDICTION_TYPES`.

    Raises:
        ValueError: naming the unsupported type and the supported ones.
    """
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {kind!r} is not supported; expected one of {', '.join(PREDICTION_TYPES)}")
    return kind


def model_prediction_type(model: Any) -> str:
    """The ``prediction_type`` a model declares (attribute), ``"epsilon"`` if it declares none; ``"flow_prediction"``
    for a :class:`~tagdiff.sampling.flow.FlowModel`."""
    kind = getattr(model, "prediction_type", None)
    return "epsilon" if kind is None else kind if kind == FLOW_PREDICTION else check_prediction_type(kind)


def check_grid_prediction(alpha_bars: list[float], kind: str, guided: bool) -> None:
    """Refuse a grid on which ``kind``-predictions cannot be turned into (ε̂, x̂_0): ᾱ = 0 (zero terminal SNR) with
    an ε-model, or with score guidance for any model (x0 is undefined from a guided ε̂ there).

    Args:
        alpha_bars: ᾱ of every state the model is evaluated at (host floats).
        kind: the model's prediction type. guided: whether score terms change ε̂.

    Raises:
        ValueError: naming the problem and the ways out.
    """
    if 0.0 not in alpha_bars:
        return
    if kind == "epsilon":
        raise ValueError("an epsilon-prediction model cannot give x0 at alpha_bar = 0 (zero terminal SNR, "
                         "rescale_betas_zero_snr); use a v_prediction model or a grid that starts below T-1")
    if guided:
        raise ValueError("score guidance is undefined at alpha_bar = 0 (zero terminal SNR): x0 cannot be formed "
                         "from a guided eps; give the guidance a Strength window below the last timestep")


def eps_and_x0(out: Tensor, x: Tensor, alpha_bar: Tensor, kind: str = "epsilon") -> tuple[Tensor, Tensor]:
    """``(eps_hat, x0_hat)`` from a model output of type ``kind`` at state ``x`` with ``alpha_bar`` (broadcastable,
    e.g. ``(B, 1, ..., 1)``). Differentiable; shapes of ``x``.

    No host synchronisation: an ε-model at ᾱ = 0 gives an infinite x0 here; the loops refuse such a grid up front
    (:func:`check_grid_prediction`).

    Raises:
        ValueError: an unknown ``kind``.
    """
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if kind == "epsilon":
        return out, (x - s * out) / a
    if kind == "v_prediction":
        return s * x + a * out, a * x - s * out
    if kind == "sample":
        return (x - a * out) / s, out
    if kind == FLOW_PREDICTION:
        return (x + a * out) / (a + s), (x - s * out) / (a + s)
    raise ValueError(check_prediction_type(kind))


def from_eps(eps_hat: Tensor, x: Tensor, alpha_bar: Tensor, kind: str) -> Tensor:
    """The output a ``kind``-model would give for ``eps_hat`` at ``(x, alpha_bar)``: the inverse of
    :func:`eps_and_x0` (what a diffusers scheduler's ``step`` expects after guidance changed ε̂).

    At ᾱ = 0 only ``"epsilon"`` is defined (x0 cannot be formed from ε̂); the loops refuse guidance there.

    Raises:
        ValueError: an unknown ``kind``.
    """
    if kind == "epsilon":
        return eps_hat
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    x0 = (x - s * eps_hat) / a
    if kind == "v_prediction":
        return a * eps_hat - s * x0
    if kind == "sample":
        return x0
    if kind == FLOW_PREDICTION:
        return eps_hat - x0
    raise ValueError(check_prediction_type(kind))
