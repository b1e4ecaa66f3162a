"""The flow-matching side of ``tagdiff train``: ``train diffusion --objective flow`` and ``train time-predictor
--checkpoint FLOW`` (objectives: :mod:`tagdiff.training.flow`; conventions: docs/notation.md §1.6, §2.4).

A flow run trains on the VP view of its :class:`~tagdiff.sampling.flow_path.FlowSchedule` (``vp_schedule``: the
loop needs only T from it, and a σ predictor records it as its schedule, which TAG and the Time Gap check against
the flow sampler's). What is recorded: a flow model's ``tagdiff.json`` (or ``config.json`` for the toy MLP) holds
``objective: flow``, ``sigma_density`` and ``flow`` (T, shift); its predictor's ``config.json`` holds the
``schedule`` (the σ bins' VP view), ``flow``, ``sigma_density`` and ``flow_checkpoint``.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["flow_loss", "flow_setup"]


def flow_setup(args: argparse.Namespace, schedule: Any) -> tuple[Any, Any]:
    """``(flow schedule or None, the schedule the loop runs on)`` for this ``tagdiff train`` command.

    Raises:
        ValueError: ``--schedule`` with ``--objective flow``, or ``--sigma-density`` where no flow is trained.
    """
    from ..sampling.flow_path import FlowSchedule

    if isinstance(schedule, FlowSchedule):  # a time predictor for a flow model (--checkpoint FLOW)
        return schedule, schedule.vp_schedule
    if args.what == "diffusion" and getattr(args, "objective", "eps") == "flow":
        if args.schedule != "linear":
            raise ValueError(f"--schedule {args.schedule} is a VP noise schedule; --objective flow trains on the "
                             "flow path x_σ = (1 - σ) x0 + σ ε (drop --schedule)")
        flow = FlowSchedule(num_train_timesteps=args.num_train_timesteps)
        return flow, flow.vp_schedule
    if getattr(args, "sigma_density", None) is not None:
        raise ValueError("--sigma-density is for --objective flow (train diffusion) or a time predictor of a "
                         "flow-matching --checkpoint (train time-predictor)")
    return None, schedule


def flow_loss(args: argparse.Namespace, flow: Any) -> tuple[Any, dict[str, Any]]:
    """The loss of a flow run and what its checkpoint records (module docstring)."""
    from ..models.checkpoints import resolve_checkpoint
    from ..models.flow_checkpoint import flow_metadata
    from ..training.flow import FlowMatchingLoss, FlowTimeLoss

    fields = {"num_train_timesteps": flow.num_train_timesteps, "shift": flow.shift}
    if args.what == "diffusion":
        density = args.sigma_density or "logit_normal"
        return (FlowMatchingLoss(density, flow.num_train_timesteps),
                {"objective": "flow", "sigma_density": density, "flow": fields})
    recorded = flow_metadata(resolve_checkpoint(args.checkpoint))[1]
    density = args.sigma_density or recorded or "logit_normal"
    if args.sigma_density is None and recorded is None:
        print(f"note: {args.checkpoint} records no σ density; training on logit_normal (pass --sigma-density)")
    return FlowTimeLoss(flow, density), {"flow": fields, "sigma_density": density,
                                         "flow_checkpoint": str(args.checkpoint)}
