"""Latent-space parts of the ``tagdiff`` command line (see :mod:`tagdiff.latent`): ``train vae`` and the ``--vae``
option of ``train diffusion``, ``train time-predictor``, ``eval time-predictor`` and ``sample``.

A latent model records its VAE (``"vae"``: path, content hash, shapes) in its config; every command that uses it
checks the pairing and refuses, in one line naming both, a latent model without its VAE, another VAE, or a VAE
whose latents do not have the model's shape.
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from .args import add_data_args, add_device_arg, int_tuple, nonneg_float, positive_float, positive_int

__all__ = ["add_vae_arg", "add_vae_parser", "latent_data", "latent_held_out", "train_vae"]



def _latent_cache() -> Path:
    """Where encoded latents are cached: the user cache (:func:`tagdiff._io.user_cache_dir`), never a model folder."""
    from .._io import user_cache_dir

    return user_cache_dir("latents")


def add_vae_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--vae", default=None, metavar="DIR",
                   help=f"an AutoencoderKL folder (tagdiff train vae): {what}")


def add_vae_parser(tsub: Any) -> None:
    p = tsub.add_parser("vae", help="a diffusers AutoencoderKL: the latent space of latent models (--vae)")
    add_data_args(p, default="digits")
    p.add_argument("--out", required=True, type=Path, help="output folder (save_pretrained layout + tagdiff.json)")
    p.add_argument("--steps", type=positive_int, default=None, help="optimisation steps (default: 3000)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="batch size (default: 64)")
    p.add_argument("--lr", type=positive_float, default=None, help="Adam learning rate > 0 (default: 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, batches and noise (default: 0)")
    p.add_argument("--widths", type=int_tuple, default=None,
                   help="channels per level, downsampling 2^(levels-1) (default: 16,32 up to 16 pixels, else "
                        "16,32,32: digits 4x4 latents, MNIST 8x8 on a 32x32 canvas)")
    p.add_argument("--latent-channels", type=positive_int, default=4, help="latent channels (default: 4)")
    p.add_argument("--kl-weight", type=nonneg_float, default=1e-6,
                   help="β of the KL term, LDM's kl_weight (summed KL / summed squared error; default: 1e-6)")
    p.add_argument("--scale-samples", type=positive_int, default=10_000,
                   help="training images whose posterior means set scaling_factor = 1/std (default: 10000)")
    p.add_argument("--save-every", type=positive_int, default=1000,
                   help="steps between resumable checkpoints (default: 1000)")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if --out holds a training state")
    add_device_arg(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def train_vae(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """``tagdiff train vae``: :func:`tagdiff.recipes.make_vae` trained by :func:`tagdiff.training.train` with
    :func:`tagdiff.vae.vae_loss`, exported by :func:`tagdiff.vae.export_vae` (scale from the training split,
    reconstruction metrics on up to 2000 held-out images, seed 12345)."""
    import json

    import torch

    from .._io import ensure_output_dir
    from .._utils import resolve_device
    from ..models.vae import export_vae, vae_loss
    from ..sampling.schedules import VPSchedule
    from ..training.loop import TrainConfig, train
    from . import recipes as rc
    from .data import load_data as _load_data

    device = resolve_device(args.device)
    ensure_output_dir(args.out)
    data, _, info = _load_data(args, "train", seed=args.seed)
    held_out, _, _ = _load_data(args, "held_out", seed=12345, num_samples=2000)
    with torch.random.fork_rng(devices=[]):  # the initialisation depends on --seed only
        torch.manual_seed(args.seed)
        model = rc.make_vae(info, widths=args.widths, latent_channels=args.latent_channels,
                            kl_weight=args.kl_weight)
    recipe = rc.recipe_for("vae", info)
    config = TrainConfig(steps=args.steps or recipe.steps, batch_size=args.batch_size or recipe.batch_size,
                         lr=recipe.lr if args.lr is None else args.lr, seed=args.seed, save_every=args.save_every)
    command = "tagdiff " + " ".join(shlex.quote(a) for a in argv)
    export = partial(export_vae, train_x=data, held_out_x=held_out, scale_samples=args.scale_samples)
    result = train(model, vae_loss, data, VPSchedule.linear(1000), config, args.out, resume=not args.no_resume,
                   progress=not args.quiet, export_extra={"dataset": args.dataset, "command": command},
                   export=export, device=device)
    meta = json.loads((args.out / "tagdiff.json").read_text())
    ho = meta["held_out"]
    print(f"saved vae to {args.out}: latents {'x'.join(map(str, meta['latent_shape']))}, scaling_factor "
          f"{meta['scaling_factor']:.4f} ({meta['scaling_factor_samples']} images), held-out MSE {ho['mse']:.5f}, "
          f"PSNR {ho['psnr_db']:.2f} dB ({ho['num_samples']} images); final loss {result['final_loss']:.5f}, "
          f"{result['seconds']:.0f} s")
    return {**result, "vae": meta}


def _space(vae: str | Path, image_shape: tuple[int, ...] | None = None) -> Any:
    from ..models.latent import LatentSpace

    return LatentSpace.from_pretrained(vae, image_shape=image_shape)


def latent_data(args: argparse.Namespace, x: Any, info: Any, split: str = "train") -> tuple[Any, Any, dict[str, Any]]:
    """``(data, info, meta)`` of a training command: unchanged without ``--vae``; with it the cached latents
    (:func:`tagdiff.latent.encode_dataset`, cached in ``$TAGDIFF_CACHE/latents`` or
    ``~/.cache/tagdiff/latents``, keyed by the VAE's content hash and the images), ``info`` with the latent shape and
    ``meta = {"vae": ...}`` for the model's config. ``--checkpoint`` (the diffusion model a time predictor serves)
    must have been trained on the same VAE.

    Raises:
        ValueError: as :func:`tagdiff.latent.check_pairing`; data of another image shape than the VAE's; an
            attribute condition (``class_ink`` / ``class_slant`` are image attributes) on latents.
    """
    from ..models.latent import check_pairing, encode_dataset

    vae = getattr(args, "vae", None)
    space = None if vae is None else _space(vae, tuple(info.sample_shape))
    check_pairing(vae, space, getattr(args, "checkpoint", None), "--checkpoint")
    if vae is None:
        return x, info, {}
    if getattr(args, "condition", "none") not in ("none", "class"):
        raise ValueError(f"--condition {args.condition} is defined on images, not latents; with --vae use "
                         "--condition none or class")
    if tuple(info.sample_shape) != tuple(space.image_shape):
        raise ValueError(f"--vae {vae} encodes images of shape {tuple(space.image_shape)} but --dataset "
                         f"{args.dataset} has images of shape {tuple(info.sample_shape)}")
    z = encode_dataset(space, x, dataset=args.dataset, split=split, cache_dir=_latent_cache())
    return z, replace(info, sample_shape=tuple(space.latent_shape)), {
        "vae": {**space.describe(), "path": str(Path(vae).resolve())}}


def latent_held_out(args: argparse.Namespace, x: Any) -> Any:
    """Held-out images ``x`` as latents with ``--vae`` (cached as for training), else ``x``; ``eval
    time-predictor`` first checks that its ``--checkpoint`` was trained on that VAE
    (:func:`tagdiff.latent.check_pairing`)."""
    from ..models.latent import check_pairing, encode_dataset

    vae = getattr(args, "vae", None)
    space = None if vae is None else _space(vae, tuple(x.shape[1:]))
    if args.command == "eval":
        check_pairing(vae, space, args.checkpoint, "--checkpoint")
    if space is None:
        return x
    return encode_dataset(space, x, dataset=args.dataset, split="held_out", cache_dir=_latent_cache())
