"""``tagdiff train diffusion | time-predictor | classifier``: data, model, config, and the held-out reports.

The training data of ``--dataset mnist | folder | hf`` is a lazy Dataset (:func:`tagdiff.data.streaming.open_dataset`)
trained through the DataLoader path of :func:`tagdiff.training.train` (``--num-workers`` decoding processes): the
decoded set is never held. ``toy`` and ``digits`` (a few hundred KiB) stay one in-memory tensor, so the commands of
the shipped checkpoints reproduce them bit for bit. The held-out reports load their (small) split whole. Condition
labels that depend on pixels (``--condition class_ink`` / ``class_slant``, ``--attribute``) are computed from the
training split decoded once (the attribute bench's digits / MNIST scale).
"""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path
from typing import Any

__all__ = ["time_predictor_report", "train_command"]

from .data import held_out_sample, load_data, pixels, train_data
from .flow import flow_loss, flow_setup


def train_command(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    import torch

    from .._io import ensure_output_dir
    from .._utils import resolve_device
    from ..data.streaming import WithLabels
    from ..sampling.schedules import VPSchedule
    from ..training.distributed import launch, world_size
    from ..training.loop import TrainConfig, train
    from . import recipes as rc
    from .args import check_model_memory
    from .latent import latent_data

    if args.num_processes > 1 and world_size() == 1:  # start the run in N processes (each runs this command)
        return {"exit_code": launch(argv, args.num_processes)}
    device = resolve_device(args.device)
    if args.what == "classifier" and args.checkpoint is not None and args.kind != "noisy":
        raise ValueError(f"--checkpoint ties a noisy classifier to a model's schedule; a --kind {args.kind} "
                         "classifier sees clean images (drop --checkpoint)")
    folder = _resolve_model_data(args)
    ensure_output_dir(args.out)
    schedule = VPSchedule.from_name(args.schedule, args.num_train_timesteps)
    data, labels, info = train_data(args)
    if getattr(args, "vae", None) is not None:  # latents are encoded once from the whole split, then cached
        data = pixels(data)
    data, info, latent_meta = latent_data(args, data, info)  # --vae: the cached latents (unchanged without)
    if folder is not None:  # a diffusers model or pipeline folder: its scheduler's schedule, its UNet's shape
        schedule = folder.schedule
        _check_shape(args.checkpoint, folder.sample_shape, tuple(info.sample_shape))
        args.num_train_timesteps = schedule.num_train_timesteps
    elif getattr(args, "checkpoint", None) is not None:  # tie the predictor to its diffusion model's schedule
        schedule = _model_schedule(args.checkpoint, tuple(info.sample_shape))
        args.num_train_timesteps = schedule.num_train_timesteps
    flow, schedule = flow_setup(args, schedule)  # flows: their FlowSchedule; the loop runs on its VP view
    T = args.num_train_timesteps
    key, cond, meta = args.what, (labels if args.what == "classifier" else None), {}
    check_model_memory(args, tuple(info.sample_shape))
    with torch.random.fork_rng(devices=[]):  # the model's initialisation depends on --seed only
        torch.manual_seed(args.seed)
        model, loss, cond, meta, info = _make_model(args, data, labels, info, T, cond, meta)
        if flow is not None and args.what == "classifier":  # σ-aware: the noisy loss on the flow's VP view
            meta = {**meta, "flow": {"num_train_timesteps": flow.num_train_timesteps, "shift": flow.shift},
                    "flow_checkpoint": str(args.checkpoint)}
        elif flow is not None:  # the flow objectives and what they record (tagdiff.json / config.json)
            loss, flow_meta = flow_loss(args, flow)
            meta = {**meta, **flow_meta}
    key = f"classifier-{args.kind}" if args.what == "classifier" else key
    recipe = rc.recipe_for(key, info)
    config = TrainConfig(steps=args.steps or recipe.steps, batch_size=args.batch_size or recipe.batch_size,
                         lr=recipe.lr if args.lr is None else args.lr, seed=args.seed, save_every=args.save_every,
                         ema_decay=args.ema_decay if args.ema_decay is not None else recipe.ema_decay,
                         cond_drop=args.cond_drop if meta.get("num_conditions") else 0.0,
                         mixed_precision=args.mixed_precision, bf16=args.bf16,
                         grad_accum=args.grad_accum, lr_scheduler=args.lr_scheduler,
                         lr_warmup_steps=args.lr_warmup_steps, lr_decay_steps=args.lr_decay_steps,
                         ema_warmup=args.ema_warmup, ema_power=args.ema_power, hflip=args.hflip)
    if args.ema_warmup and config.ema_decay is None:
        raise ValueError("--ema-warmup needs an EMA: pass --ema-decay (this recipe has none)")
    if not isinstance(data, torch.Tensor):  # the Dataset's items carry the condition labels (if any)
        data, cond = (data if cond is None else WithLabels(data, cond)), None
    command = "tagdiff " + " ".join(shlex.quote(a) for a in argv)
    result = train(model, loss, data, schedule, config, args.out, resume=not args.no_resume, progress=not args.quiet,
                   labels=cond, export_extra={"dataset": args.dataset, "command": command, **meta,
                                                 **latent_meta},
                   export=rc.exporter(model, schedule, flow if args.what == "diffusion" else None), device=device,
                   num_workers=args.num_workers)
    model = model.cpu()
    if int(os.environ.get("RANK", "0")) != 0:  # data-parallel: the main process reports
        return result
    print(f"saved {args.what} to {args.out} (final loss {result['final_loss']:.4f}, {result['seconds']:.0f} s)")
    if args.what == "classifier":
        result["held_out"] = _classifier_report(model, args, meta, schedule)
    elif args.what == "time-predictor":
        result["held_out"] = time_predictor_report(model, schedule, args, args.out / "report.json")
        if meta.get("num_conditions"):  # with the true and with the null condition, on the whole held-out split
            from .latent import latent_held_out

            hx, hy, _ = load_data(args, "held_out")
            hx = latent_held_out(args, hx)
            result["held_out_conditional"] = rc.conditional_report(model, schedule, args.condition, meta, hx, hy,
                                                                   info, args.out / "report_conditional.json")
    return result


def _resolve_model_data(args: argparse.Namespace) -> Any:
    """Fill what ``--checkpoint`` implies: a time predictor for a model needs the model's data (``--dataset``, no
    default then); a diffusers model or pipeline folder gives the schedule, its ``vae/`` (a latent pipeline: the
    images are encoded by it unless ``--vae`` names another) and the image size and channels of folder / hf data.
    Returns the :class:`~tagdiff.models.pipeline.DiffusersFolder`, or ``None`` for a tagdiff checkpoint.

    Raises:
        ValueError: ``--checkpoint`` without ``--dataset``; CheckpointError: an unreadable model folder.
    """
    from ..models.checkpoints import resolve_checkpoint
    from ..models.pipeline import is_diffusers_model_folder, read_diffusers_folder

    checkpoint = getattr(args, "checkpoint", None)
    if args.dataset is None:
        if checkpoint is not None:
            raise ValueError(f"--checkpoint {checkpoint}: name the images the predictor learns from with --dataset "
                             "(digits, mnist[:DIR], folder:DIR or hf:DIR); the toy data fits no image model")
        args.dataset = "toy"
    if checkpoint is None or not is_diffusers_model_folder(path := resolve_checkpoint(checkpoint)):
        return None
    folder = read_diffusers_folder(path)
    if folder.vae_dir is not None and getattr(args, "vae", None) is None:
        args.vae = str(folder.vae_dir)
    c, h, w = folder.image_shape
    if args.dataset in ("folder", "hf"):
        if args.image_size is None and h == w:
            args.image_size = h
        if args.channels is None and c in (1, 3):
            args.channels = c
    return folder


def _check_shape(checkpoint: Any, shape: tuple[int, ...], sample_shape: tuple[int, ...]) -> None:
    if tuple(shape) != tuple(sample_shape):
        raise ValueError(f"--checkpoint {checkpoint} makes samples of shape {tuple(shape)} but the data has "
                         f"{tuple(sample_shape)}")


def _model_schedule(checkpoint: Any, sample_shape: tuple[int, ...]) -> Any:
    """The schedule of the diffusion model at ``checkpoint``; its samples must have the data's shape."""
    from ..models.load import load_checkpoint

    model, schedule = load_checkpoint(checkpoint)
    _check_shape(checkpoint, tuple(getattr(model, "sample_shape", sample_shape)), sample_shape)
    return schedule


def _make_model(args: argparse.Namespace, data: Any, labels: Any, info: Any, T: int, cond: Any,
                meta: dict[str, Any]) -> tuple[Any, Any, Any, dict[str, Any], Any]:
    from ..training.loop import eps_loss, time_loss
    from . import recipes as rc

    if args.what == "classifier":
        if args.attribute:
            cond, info, meta = rc.attribute_labels(args.attribute, pixels(data), labels, info)
        model, loss = rc.make_classifier(args.kind, info, T)
    elif args.what == "diffusion":
        K = None
        if args.class_conditional:
            if labels is None:
                raise ValueError(f"--class-conditional needs class labels; dataset {args.dataset!r} has none")
            K = int(labels.max()) + 1
            cond, meta = labels, {"null_class": K, "num_classes": K, "num_conditions": K}
        model = rc.make_eps_model(info, T, hidden=args.hidden, layers=args.layers or 3, widths=args.widths,
                                  num_classes=K)
        loss = eps_loss
    else:
        x = pixels(data) if args.condition.startswith("class_") else None
        cond, meta = rc.condition_labels(args.condition, x, labels, info)
        model, loss = rc.make_time_predictor(info, T, hidden=args.hidden, layers=args.layers or 5,
                                             num_classes=meta["num_conditions"], arch=args.arch,
                                             widths=args.widths), time_loss
    return model, loss, cond, meta, info


def time_predictor_report(predictor: Any, schedule: Any, args: argparse.Namespace, out: Path | None,
                          num_samples: int = 500, seed: int = 12345) -> dict[str, Any]:
    """Evaluate on held-out, forward-noised data; print per-bucket table; write ``out`` (JSON) and a PNG beside."""
    from .latent import latent_held_out
    from .recipes import time_predictor_report as report

    split = "train" if args.dataset == "toy" else "held_out"  # toy: fresh draws (another seed) are held out
    held_out = latent_held_out(args, held_out_sample(args, split, seed, num_samples))
    return report(predictor, schedule, held_out, out, f"{args.dataset} time predictor", seed)


def _classifier_report(model: Any, args: argparse.Namespace, meta: dict[str, Any], schedule: Any) -> dict[str, Any]:
    """Held-out accuracy (attribute classifiers: against the held-out levels with the training split's medians)."""
    import torch

    from .recipes import attribute_labels, classifier_report

    x, y, info = load_data(args, "held_out")
    if args.attribute:
        medians = torch.tensor(meta[f"{args.attribute}_medians"], dtype=torch.float64)
        y = attribute_labels(args.attribute, x, y, info, medians)[0]
    return classifier_report(model, args.kind, x, y, args.out, schedule)
