r"""Latent space: a diffusers ``AutoencoderKL`` as the data space of latent diffusion models (LDM; Rombach et al.
2022, "High-Resolution Image Synthesis with Latent Diffusion Models", arXiv 2112.10752).

Conventions (Stable Diffusion's):

* images ``x``: ``(B, *image_shape)`` float in ``[-1, 1]``, e.g. ``(B, 1, 28, 28)``;
* latents ``z = scaling_factor · (mean(q(z | pad(x))) − shift_factor)`` (``shift_factor``: SD3's and Flux's VAEs, else
  0): ``(B, *latent_shape)``, e.g. ``(B, 4, 8, 8)``; the
  posterior *mean* (no sampling), so encoding is deterministic. ``scaling_factor`` (the VAE config's, SD's
  convention) is 1 / std of the training latents' posterior means, so latents have unit variance and the VP
  schedule's x_T ~ N(0, I) matches them;
* ``decode(z) = crop(vae.decode(z / scaling_factor))``. Images are padded with -1 (background) before encoding
  when the VAE works on a larger canvas than the images (MNIST 28×28 → 32×32, so that the latents, 8×8, halve
  cleanly in the latent UNet) and cropped after decoding; the padding is recorded in the VAE folder's
  ``tagdiff.json`` (``image_shape``, ``pad``).

Every diffusion-side object (ε-model, time predictor, TAG, the sampler) then works on latents unchanged; losses
defined on images (DPS label loss with a clean classifier, TFG) reach latents through the decoder,
:meth:`LatentSpace.image_loss` (DPS through a VAE, as the paper's Stable Diffusion experiments do).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .checkpoints import CheckpointError, load_tensors, save_tensors

__all__ = ["VAE_FILES", "LatentSpace", "check_pairing", "check_predictor_space", "encode_dataset", "is_vae_folder",
           "posterior_means", "recorded_vae", "sampling_space", "scaling_factor", "through_decoder", "vae_hash"]

# The files whose bytes define a VAE (its content hash); tagdiff.json and the latent cache are not part of it.
VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")


def is_vae_folder(path: str | Path) -> bool:
    """True if ``path/config.json`` names ``AutoencoderKL`` (a ``save_pretrained`` folder)."""
    cfg = Path(path) / "config.json"
    try:
        return json.loads(cfg.read_bytes().decode("utf-8")).get("_class_name") == "AutoencoderKL"
    except (OSError, ValueError, AttributeError):
        return False


def vae_hash(directory: str | Path) -> str:
    """SHA-256 (hex) of the VAE folder's content: the names and bytes of :data:`VAE_FILES`.

    A copy of the folder has the same hash; retraining or editing the weights or the config (e.g. its
    ``scaling_factor``) changes it.

    Raises:
        CheckpointError: a missing file (named).
    """
    h = hashlib.sha256()
    for name in VAE_FILES:
        path = Path(directory) / name
        if not path.is_file():
            raise CheckpointError(f"{directory} is not an AutoencoderKL folder: {name} is missing")
        h.update(name.encode() + b"\0" + str(path.stat().st_size).encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


class LatentSpace:
    """Encode images to scaled latents and decode them back, through a diffusers ``AutoencoderKL``.

    Args:
        vae: an ``AutoencoderKL`` (put in ``eval()`` mode, gradients of its weights off).
        image_shape: ``(C, H, W)`` of the images; default the VAE's canvas ``(in_channels, sample_size,
            sample_size)`` minus ``pad``.
        pad: ``(before, after)`` pixels of -1 added to each side of H and W before encoding (cropped after
            decoding).
        path, content_hash: the VAE folder and its :func:`vae_hash` (recorded by the models trained on it).

    Attributes:
        scaling_factor: the VAE config's ``scaling_factor`` (latents are ``mean · scaling_factor``).
        latent_shape: ``(latent_channels, H', W')``, with H' = (H + pad) / 2^(len(block_out_channels) - 1)
            (the canvas ``sample_size``).

    Raises:
        ValueError: a non-positive or non-finite ``scaling_factor``, an image shape that does not fit the VAE, or
            a canvas not divisible by the VAE's downsampling factor.
    """

    def __init__(self, vae: Any, *, image_shape: tuple[int, ...] | None = None, pad: tuple[int, int] = (0, 0),
                 path: str | Path | None = None, content_hash: str | None = None):
        cfg = vae.config
        self.vae = vae.eval().requires_grad_(False)
        self.pad = (int(pad[0]), int(pad[1]))
        self.path = None if path is None else str(path)
        self.hash = content_hash
        s = float(cfg.scaling_factor)
        if not (s > 0 and s < float("inf")):
            raise ValueError(f"VAE scaling_factor must be a positive finite number, got {s!r}")
        self.scaling_factor = s
        shift = getattr(cfg, "shift_factor", None)  # SD3 / Flux VAEs: latents (mean - shift) · scale
        self.shift_factor = 0.0 if shift is None else float(shift)
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else int(cfg.sample_size[0])
        if image_shape is not None and path is not None and not (Path(path) / "tagdiff.json").is_file():
            size = int(image_shape[-1]) + sum(self.pad)  # a foreign VAE is convolutional: any canvas fits it
        canvas = (int(cfg.in_channels), size, size)
        crop = size - sum(self.pad)
        self.image_shape = tuple(image_shape) if image_shape is not None else (canvas[0], crop, crop)
        if self.image_shape != (canvas[0], crop, crop):
            raise ValueError(f"images of shape {self.image_shape} do not fit this VAE (canvas {canvas}, pad "
                             f"{self.pad}): expected {(canvas[0], crop, crop)}")
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        if size % factor:
            raise ValueError(f"the VAE canvas {size}×{size} is not divisible by its downsampling factor {factor}")
        self.latent_shape = (int(cfg.latent_channels), size // factor, size // factor)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu", *,
                        image_shape: tuple[int, ...] | None = None) -> LatentSpace:
        """Load an ``AutoencoderKL`` folder (``save_pretrained`` layout, safetensors weights) with the image
        shape and padding of its ``tagdiff.json`` (absent for a foreign VAE: no padding, and the images are
        ``image_shape`` if given, else the VAE config's ``sample_size``; a pipeline's VAE serves any image size).

        Raises:
            CheckpointError: a missing folder, not an AutoencoderKL folder, or files that do not load (named).
        """
        from diffusers import AutoencoderKL

        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"VAE folder not found: {path}")
        if not is_vae_folder(path):
            raise CheckpointError(f"{path} is not an AutoencoderKL folder (expected config.json with _class_name "
                                  "AutoencoderKL and diffusion_pytorch_model.safetensors; train one with "
                                  "tagdiff train vae)")
        digest = vae_hash(path)
        try:
            vae = AutoencoderKL.from_pretrained(path, use_safetensors=True, low_cpu_mem_usage=False)
        except Exception as e:  # diffusers raises many types for a bad folder
            raise CheckpointError(f"could not load the VAE in {path}: {(str(e).splitlines() or [type(e).__name__])[0]}"
                                  ) from None
        meta: dict[str, Any] = {}
        if (path / "tagdiff.json").is_file():
            try:
                meta = json.loads((path / "tagdiff.json").read_text())
            except (ValueError, UnicodeDecodeError):
                raise CheckpointError(f"{path / 'tagdiff.json'} is not valid JSON") from None
        shape = meta.get("image_shape", image_shape)
        try:
            return cls(vae.to(device), image_shape=None if shape is None else tuple(shape),
                       pad=tuple(meta.get("pad", (0, 0))), path=path, content_hash=digest)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def _pad(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"images of shape {tuple(x.shape)} do not fit the VAE {self.path or ''}: expected "
                             f"(B, {', '.join(map(str, self.image_shape))})")
        a, b = self.pad
        return F.pad(x, (a, b, a, b), value=-1.0) if a or b else x

    def encode(self, x: Tensor) -> Tensor:
        """Scaled posterior means ``z``, ``(B, *latent_shape)``, of images ``x`` ``(B, *image_shape)`` in [-1, 1]
        (x's dtype and device). Raises ``ValueError`` for images of another shape."""
        mean = self.vae.encode(self._pad(x).to(self.vae.dtype)).latent_dist.mean
        return (mean - self.shift_factor) * self.scaling_factor if self.shift_factor else mean * self.scaling_factor

    def decode(self, z: Tensor) -> Tensor:
        """Images ``(B, *image_shape)`` (unclamped; about [-1, 1]) of latents ``z`` ``(B, *latent_shape)``;
        differentiable in ``z`` (the DPS adapter's path). Raises ``ValueError`` for latents of another shape."""
        if tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(f"latents of shape {tuple(z.shape)} do not fit the VAE {self.path or ''}: expected "
                             f"(B, {', '.join(map(str, self.latent_shape))})")
        x = self.vae.decode(z / self.scaling_factor + self.shift_factor if self.shift_factor else
                            z / self.scaling_factor).sample
        a, b = self.pad
        return x[..., a:x.shape[-2] - b, a:x.shape[-1] - b] if a or b else x

    @torch.no_grad()
    def encode_batched(self, x: Tensor, batch_size: int = 256) -> Tensor:
        """:meth:`encode` in batches without gradients, float32 on the CPU."""
        return torch.cat([self.encode(x[i:i + batch_size].to(self.device)).float().cpu()
                          for i in range(0, x.shape[0], batch_size)])

    @torch.no_grad()
    def decode_batched(self, z: Tensor, batch_size: int = 256) -> Tensor:
        """:meth:`decode` in batches without gradients, float32 on the CPU."""
        return torch.cat([self.decode(z[i:i + batch_size].to(self.device)).float().cpu()
                          for i in range(0, z.shape[0], batch_size)])

    def image_loss(self, loss_fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        """``loss_fn`` on images as a loss on latents: :func:`through_decoder` ``(loss_fn, self)``."""
        return through_decoder(loss_fn, self)

    def describe(self) -> dict[str, Any]:
        """What models trained on these latents record (``"vae"`` in their config): path, hash, shapes, scale."""
        return {"path": self.path, "hash": self.hash, "scaling_factor": self.scaling_factor,
                **({"shift_factor": self.shift_factor} if self.shift_factor else {}),
                "latent_shape": list(self.latent_shape), "image_shape": list(self.image_shape), "pad": list(self.pad)}


def through_decoder(loss_fn: Callable[[Tensor], Tensor], space: LatentSpace) -> Callable[[Tensor], Tensor]:
    """The latent loss ``ℓ_z(ẑ_0) = ℓ_x(decode(ẑ_0))`` of an image loss ``ℓ_x``: ``(B, *image_shape) -> (B,)``
    becomes ``(B, *latent_shape) -> (B,)``, differentiable through the decoder (DPS / TFG through a VAE, as
    the latent-diffusion experiments of the TAG paper). The gradient is exactly autograd's of the composition.
    """

    def latent_loss(z0_hat: Tensor) -> Tensor:
        return loss_fn(space.decode(z0_hat))

    return latent_loss


def posterior_means(vae: Any, x: Tensor, batch_size: int = 256) -> Tensor:
    """Unscaled posterior means ``(N, *latent_shape)`` float32 (CPU) of VAE-canvas images ``x`` (already padded)."""
    device = next(vae.parameters()).device
    with torch.no_grad():
        return torch.cat([vae.encode(x[i:i + batch_size].to(device)).latent_dist.mean.float().cpu()
                          for i in range(0, x.shape[0], batch_size)])


def scaling_factor(means: Tensor) -> float:
    """SD's ``scaling_factor``: 1 / std of the posterior means ``(N, *latent_shape)`` over every element
    (float64, the unbiased std). Raises ``ValueError`` for fewer than 2 elements or a zero std."""
    if means.numel() < 2:
        raise ValueError("the scaling factor needs at least two latent elements")
    std = float(means.double().std())
    if not std > 0:
        raise ValueError(f"the posterior means have std {std}; cannot scale them to unit variance")
    return 1.0 / std


def _data_fingerprint(x: Tensor) -> str:
    h = hashlib.sha256(f"{tuple(x.shape)} {x.dtype}".encode())
    h.update(x.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def encode_dataset(space: LatentSpace, x: Tensor, *, dataset: str, split: str, cache_dir: str | Path | None,
                   batch_size: int = 256) -> Tensor:
    """Latents ``(N, *latent_shape)`` float32 of images ``x`` ``(N, *image_shape)``, computed once and cached.

    The cache file is ``cache_dir/<dataset>-<split>-<vae hash[:16]>-<data hash[:12]>.safetensors``: keyed by the
    VAE folder's content hash (:func:`vae_hash`), the dataset name, the split and a SHA-256 of the image tensor
    (so a subset or a resized copy of the data is another entry). A file whose recorded keys differ from these
    (or a corrupt one) is recomputed and replaced; a change of the VAE gives a new key, so a stale file is never
    read. ``cache_dir=None`` computes without caching; a cache that cannot be written is skipped (the latents
    are still returned).

    Raises:
        ValueError: images of a shape the VAE does not take, or a VAE without a content hash with a cache.
    """
    if cache_dir is None:
        return space.encode_batched(x, batch_size)
    if space.hash is None:
        raise ValueError("caching latents needs the VAE's content hash (load it with LatentSpace.from_pretrained)")
    data_hash = _data_fingerprint(x)
    key = {"vae_hash": space.hash, "dataset": str(dataset), "split": str(split), "data_hash": data_hash,
           "num_samples": int(x.shape[0]), "latent_shape": list(space.latent_shape)}
    path = Path(cache_dir) / f"{dataset}-{split}-{space.hash[:16]}-{data_hash[:12]}.safetensors"
    if path.is_file():
        try:
            tensors, meta = load_tensors(path)
            if {k: meta.get(k) for k in key} == key and tuple(tensors["z"].shape) == (x.shape[0],
                                                                                      *space.latent_shape):
                return tensors["z"]
        except (CheckpointError, KeyError):
            pass  # corrupt or foreign: recompute below
    z = space.encode_batched(x, batch_size)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tensors(path, {"z": z}, {**key, "vae_path": space.path, "scaling_factor": space.scaling_factor})
    except OSError:
        pass
    return z


def recorded_vae(checkpoint: str | Path) -> dict[str, Any] | None:
    """The ``"vae"`` entry (path, hash, shapes) a latent model recorded at training, or ``None`` (pixel model).

    Read from the folder's ``tagdiff.json`` (diffusers UNet folders) or ``config.json`` (tagdiff models);
    ``checkpoint`` is a folder or a shipped name.
    """
    from .checkpoints import resolve_checkpoint

    folder = resolve_checkpoint(checkpoint)
    for path in (folder / "tagdiff.json", folder / "unet" / "tagdiff.json", folder / "config.json"):
        if path.is_file():
            try:
                vae = json.loads(path.read_text()).get("vae")
            except (ValueError, UnicodeDecodeError, AttributeError):
                continue
            if isinstance(vae, dict):
                return vae
    return None


def check_pairing(vae: str | Path | None, space: LatentSpace | None, checkpoint: str | Path | None,
                  what: str) -> dict[str, Any] | None:
    """The VAE that ``checkpoint`` recorded (:func:`recorded_vae`), or ``None`` for a pixel model (or no
    checkpoint).

    Raises:
        ValueError: naming both: ``checkpoint`` is a latent model and ``vae`` is ``None``, or ``space`` is another
            VAE than the recorded one (content hashes differ). ``what`` names the option (``"--checkpoint"``).
    """
    rec = recorded_vae(checkpoint) if checkpoint is not None else None
    if rec is None:
        return None
    if vae is None:
        raise ValueError(f"{what} {checkpoint} is a latent model (trained on the latents of the VAE "
                         f"{rec.get('path')}); pass --vae {rec.get('path')}")
    if space is not None and rec.get("hash") != space.hash:
        raise ValueError(f"--vae {vae} (content hash {str(space.hash)[:12]}) is not the VAE {what} {checkpoint} "
                         f"was trained on ({rec.get('path')}, hash {str(rec.get('hash'))[:12]})")
    return rec


def sampling_space(checkpoint: str | Path, sample_shape: tuple[int, ...], vae: str | Path | None,
                   device: str | torch.device = "cpu") -> LatentSpace | None:
    """The :class:`LatentSpace` to sample ``checkpoint`` (an ε-model making samples of ``sample_shape``) in, or
    ``None`` for a pixel model sampled without ``vae``.

    Raises:
        ValueError: naming both: a latent model without ``vae``, another VAE than the one it was trained on, or a
            VAE whose latent shape is not the model's sample shape.
        CheckpointError: a VAE folder that does not load.
    """
    space = None if vae is None else LatentSpace.from_pretrained(vae, device)
    if space is not None and tuple(space.latent_shape) != tuple(sample_shape):
        raise ValueError(f"--vae {vae} makes latents of shape {tuple(space.latent_shape)} but --checkpoint "
                         f"{checkpoint} samples shape {tuple(sample_shape)}")
    check_pairing(vae, space, checkpoint, "--checkpoint")
    return space


def check_predictor_space(path: str | Path, predictor: Any, checkpoint: str | Path, space: LatentSpace | None,
                          vae: str | Path | None) -> None:
    """A time predictor must live where the model samples: on the same VAE's latents for a latent model.

    Raises:
        ValueError: naming both: a pixel predictor (images of another shape) with a latent model, or a latent
            predictor trained on another VAE than ``space``'s, or on latents while the model samples pixels.
    """
    shape = tuple(getattr(predictor, "sample_shape", ()) or ())
    if space is not None and shape and shape != tuple(space.latent_shape):
        raise ValueError(f"time predictor {path} works on x of shape {shape} but --checkpoint {checkpoint} samples "
                         f"latents of shape {tuple(space.latent_shape)} (VAE {vae}); train one with tagdiff train "
                         f"time-predictor --vae {vae}")
    rec = recorded_vae(path)
    if rec is not None and space is None:
        raise ValueError(f"time predictor {path} was trained on the latents of the VAE {rec.get('path')} but "
                         f"--checkpoint {checkpoint} samples without a VAE")
    if rec is not None and rec.get("hash") != space.hash:
        raise ValueError(f"time predictor {path} was trained on the latents of the VAE {rec.get('path')} (hash "
                         f"{str(rec.get('hash'))[:12]}), not on those of --vae {vae} (hash {str(space.hash)[:12]})")
