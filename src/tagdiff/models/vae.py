r"""Training a diffusers ``AutoencoderKL`` (the latent space of :mod:`tagdiff.latent`) with
:func:`tagdiff.training.train`: ``tagdiff train vae``.

Loss (a KL-regularised autoencoder as LDM's / SD's "KL-f" VAEs, without their LPIPS and GAN terms)::

    loss = mean_pixels (x̂ − x)²  +  β · Σ_latent KL(q(z | x) ‖ N(0, I)) / num_pixels,     x̂ = decode(z),
    z = μ + σ ⊙ ε   (reparameterisation; ε is taken from the noise tensor train() draws for the batch)

Both terms are per-sample sums divided by the same pixel count, so β is LDM's ``kl_weight`` (the KL summed over
latent elements weighed against the summed reconstruction error; LDM uses 1e-6). Reconstruction is the squared
error (MSE), not L1. After training, the config's ``scaling_factor`` is set to 1 / std of the training images'
posterior means (SD's convention; :func:`tagdiff.latent.scaling_factor`) and the model is exported with
``save_pretrained`` plus ``tagdiff.json`` (command, image shape, padding, β, the scale and its sample count,
held-out reconstruction MSE and PSNR).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..sampling.schedules import VPSchedule
from .latent import LatentSpace, posterior_means, scaling_factor
from .unet import save_folder_atomically

__all__ = ["VAEModel", "canvas_pad", "export_vae", "reconstruction_metrics", "vae_loss"]


def canvas_pad(size: int, factor: int, multiple: int = 4) -> tuple[int, int]:
    """``(before, after)`` padding that makes an image side ``size`` a multiple of ``factor · multiple``, so its
    latents (side / ``factor``) halve cleanly ``log2(multiple)`` times in a latent UNet (the default 3-level
    ``make_unet``). MNIST: 28 with f = 4 → (2, 2), a 32×32 canvas and 8×8 latents; digits: 8 with f = 2 → (0, 0)."""
    total = (-int(size)) % (int(factor) * int(multiple))
    return total // 2, total - total // 2


class VAEModel(nn.Module):
    """An ``AutoencoderKL`` with its image padding and β, as :func:`tagdiff.training.train` trains it.

    Args:
        vae: the ``AutoencoderKL`` (its ``sample_size`` is the padded canvas).
        image_shape: ``(C, H, W)`` of the images, before padding.
        pad: ``(before, after)`` pixels of -1 added to H and W (:func:`canvas_pad`).
        kl_weight: β ≥ 0 (see the module docstring).

    Raises:
        ValueError: a negative or non-finite β, or an image shape that does not fit the VAE canvas.
    """

    def __init__(self, vae: Any, image_shape: tuple[int, ...], pad: tuple[int, int] = (0, 0),
                 kl_weight: float = 1e-6):
        super().__init__()
        if not (kl_weight >= 0 and kl_weight < float("inf")):
            raise ValueError(f"kl_weight (β) must be a finite number >= 0, got {kl_weight!r}")
        self.vae = vae
        self.image_shape, self.pad, self.kl_weight = tuple(int(v) for v in image_shape), tuple(pad), float(kl_weight)
        size = vae.config.sample_size
        if self.image_shape != (vae.config.in_channels, size - sum(pad), size - sum(pad)):
            raise ValueError(f"images {self.image_shape} padded by {tuple(pad)} do not fill the VAE's "
                             f"{vae.config.in_channels}×{size}×{size} canvas")
        vae_config = json.loads(json.dumps(dict(vae.config), default=str))
        self.config: dict[str, Any] = {"vae": {k: v for k, v in vae_config.items() if not k.startswith("_")},
                                       "image_shape": list(self.image_shape), "pad": list(self.pad),
                                       "kl_weight": self.kl_weight}

    def padded(self, x: Tensor) -> Tensor:
        a, b = self.pad
        return F.pad(x, (a, b, a, b), value=-1.0) if a or b else x

    def cropped(self, x: Tensor) -> Tensor:
        a, b = self.pad
        return x[..., a:x.shape[-2] - b, a:x.shape[-1] - b] if a or b else x

    def space(self) -> LatentSpace:
        """The :class:`~tagdiff.latent.LatentSpace` of this VAE (freezes it: for after training)."""
        return LatentSpace(self.vae, image_shape=self.image_shape, pad=self.pad)


def vae_loss(model: VAEModel, x0: Tensor, t: Tensor, noise: Tensor, schedule: VPSchedule,
             c: Tensor | None = None) -> Tensor:
    """The VAE loss of the module docstring for a batch ``x0`` ``(B, *image_shape)`` in [-1, 1] (the
    :func:`tagdiff.training.train` loss contract; ``t``, ``schedule`` and ``c`` are ignored). The
    reparameterisation noise ε is the first ``latent numel`` entries of each sample's ``noise`` (train()'s seeded
    batch noise, so the run is deterministic).

    Raises:
        ValueError: latents with more elements than the images (no noise to take ε from).
    """
    post = model.vae.encode(model.padded(x0)).latent_dist
    n_lat = post.mean[0].numel()
    if n_lat > noise[0].numel():
        raise ValueError(f"latents of shape {tuple(post.mean.shape[1:])} have more elements than the images "
                         f"{tuple(x0.shape[1:])}; this VAE does not compress")
    eps = noise.reshape(noise.shape[0], -1)[:, :n_lat].reshape(post.mean.shape).to(post.mean.dtype)
    x_hat = model.cropped(model.vae.decode(post.mean + post.std * eps).sample)
    num_pixels = x0[0].numel()
    mse = (x_hat.float() - x0.float()).pow(2).mean()
    kl = post.kl().float().mean() / num_pixels  # kl(): 0.5 Σ (μ² + σ² − 1 − log σ²) per sample
    return mse + model.kl_weight * kl


def reconstruction_metrics(space: LatentSpace, x: Tensor, batch_size: int = 256) -> dict[str, float]:
    """Reconstruction error of images ``x`` ``(N, *image_shape)`` in [-1, 1] through ``decode(encode(x))``
    (posterior means; output clamped to [-1, 1]): ``mse`` (mean over all pixels, in [-1, 1] units) and
    ``psnr_db`` = 10 log10(2² / mse) (peak-to-peak 2: the same value as for images in [0, 1])."""
    x_hat = space.decode_batched(space.encode_batched(x, batch_size), batch_size).clamp(-1, 1)
    mse = float((x_hat.double() - x.double()).pow(2).mean())
    psnr = float("inf") if mse == 0 else float(10 * torch.log10(torch.tensor(4.0 / mse, dtype=torch.float64)))
    return {"mse": mse, "psnr_db": psnr, "num_samples": int(x.shape[0])}


def export_vae(model: VAEModel, out_dir: str | Path, *, train_x: Tensor, held_out_x: Tensor | None = None,
               scale_samples: int = 10_000, **extra: Any) -> Path:
    """Set the scaling factor and write the VAE folder: ``save_pretrained`` + ``tagdiff.json``.

    ``scaling_factor`` = 1 / std of the posterior means of the first ``scale_samples`` training images
    ``train_x`` (all of them if fewer); the reconstruction metrics are measured on ``held_out_x``. Written into a
    temporary folder and moved into place file by file, ``config.json`` last (as
    :func:`tagdiff.interop.save_unet`). ``extra`` (JSON-able, e.g. the command) goes to ``tagdiff.json``.

    Returns:
        ``out_dir``.
    """
    out_dir = Path(out_dir)
    vae = model.vae.eval()
    n = min(int(scale_samples), int(train_x.shape[0]))
    scale = scaling_factor(posterior_means(vae, model.padded(train_x[:n])))
    vae.register_to_config(scaling_factor=scale)
    meta: dict[str, Any] = {"image_shape": list(model.image_shape), "pad": list(model.pad),
                            "kl_weight": model.kl_weight, "reconstruction_loss": "mse",
                            "scaling_factor": scale, "scaling_factor_samples": n}
    space = model.space()
    meta["latent_shape"] = list(space.latent_shape)
    if held_out_x is not None:
        meta["held_out"] = reconstruction_metrics(space, held_out_x)
    extra.pop("schedule", None)  # a VAE has no noise schedule
    def write(tmp: Path) -> None:
        vae.save_pretrained(tmp, safe_serialization=True)
        (tmp / "tagdiff.json").write_text(json.dumps({**meta, **extra}, indent=2) + "\n")

    save_folder_atomically(out_dir, write, prefix=".vae.")
    return out_dir
