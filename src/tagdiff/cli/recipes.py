"""Which network and which defaults for which dataset: the one place the CLI's training recipes live.

* vectors (``toy``): :class:`~tagdiff.nets.MLPEpsModel` (3 layers) and :class:`~tagdiff.time_predictor.MLPTimePredictor`
  (5 layers), as in the paper's toy (docs/notation.md §6.1);
* images (``digits``, ``mnist``, ``folder``, ``hf``): a CPU-sized diffusers ``UNet2DModel`` (no attention) and the
  paper's SimpleCNN time predictor (docs/notation.md §2.2).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..data import DatasetInfo
from ..data.attributes import ATTRIBUTES, attribute_bins, attribute_quantiles, get_attribute, joint_condition
from ..models.nets import MLPEpsModel
from ..models.time_predictor import MLPTimePredictor, SimpleCNNTimePredictor, TimePredictor, UNetEncoderTimePredictor
from ..models.unet import UNetEpsModel, make_unet, save_unet
from ..sampling.schedules import VPSchedule

__all__ = ["CONDITIONS", "RECIPES", "Recipe", "attribute_labels", "classifier_report", "condition_labels",
           "conditional_report", "exporter", "make_classifier", "make_eps_model",
           "make_time_predictor", "make_vae", "recipe_for", "TIME_PREDICTOR_ARCHS", "time_predictor_report"]

CONDITIONS = ("none", "class", *(f"class_{name}" for name in ATTRIBUTES))


@dataclass(frozen=True)
class Recipe:
    """Default training hyper-parameters for one kind of model on one kind of data."""

    steps: int
    batch_size: int
    lr: float
    ema_decay: float | None = None


RECIPES: dict[tuple[str, str], Recipe] = {
    ("diffusion", "vector"): Recipe(20_000, 1024, 1e-3, 0.999),
    ("time-predictor", "vector"): Recipe(20_000, 1024, 1e-3),
    ("diffusion", "image"): Recipe(15_000, 128, 2e-4, 0.999),
    ("time-predictor", "image"): Recipe(20_000, 256, 1e-3),
    ("classifier-noisy", "image"): Recipe(10_000, 256, 1e-3),
    ("classifier-clean", "image"): Recipe(4_000, 256, 1e-3),
    ("classifier-eval", "image"): Recipe(4_000, 256, 1e-3),
    ("vae", "image"): Recipe(3_000, 64, 1e-3),
}


def _kind(info: DatasetInfo) -> str:
    return "vector" if len(info.sample_shape) == 1 else "image"


def recipe_for(what: str, info: DatasetInfo) -> Recipe:
    """The default :class:`Recipe` for ``what`` (``"diffusion"``/``"time-predictor"``) on ``info``'s data."""
    return RECIPES[(what, _kind(info))]


def make_eps_model(info: DatasetInfo, num_train_timesteps: int, *, hidden: int = 256, layers: int = 3,
                   widths: tuple[int, ...] = (32, 64, 64), num_classes: int | None = None) -> nn.Module:
    """An ε-model for the dataset: an MLP for vectors, a small ``UNet2DModel`` for square images.

    With ``num_classes`` K the UNet is class-conditional for classifier-free guidance (Ho & Salimans 2022): K + 1
    class embeddings, the last one the "no label" class (``null_class = K``; tagdiff's label ``-1``), trained with
    label dropout (``TrainConfig.cond_drop``) so that one network gives ε(x, y) and ε(x, ∅).

    Raises:
        ValueError: for non-square images, or a class-conditional model on vector data.
    """
    if _kind(info) == "vector":
        if num_classes:
            raise ValueError("class-conditional ε-models are UNets: use an image dataset (digits, mnist, folder, hf)")
        return MLPEpsModel(info.sample_shape[0], num_train_timesteps, hidden, layers)
    c, h, w = info.sample_shape
    if h != w:
        raise ValueError(f"image models need square images, got {h}×{w}; pass --image-size")
    if num_classes:
        return UNetEpsModel(make_unet(h, c, widths=widths, num_classes=num_classes + 1), num_train_timesteps,
                            null_class=num_classes)
    return UNetEpsModel(make_unet(h, c, widths=widths), num_train_timesteps)


TIME_PREDICTOR_ARCHS = ("simplecnn", "unet-encoder", "mlp")


def make_time_predictor(info: DatasetInfo, num_train_timesteps: int, *, hidden: int = 256, layers: int = 5,
                        num_classes: int | None = None, arch: str | None = None,
                        widths: tuple[int, ...] = (32, 64, 64)) -> TimePredictor:
    """A time predictor for the dataset.

    ``arch`` (:data:`TIME_PREDICTOR_ARCHS`): ``"mlp"`` (:class:`MLPTimePredictor`, ``hidden``/``layers``; vector
    data), ``"simplecnn"`` (the paper's SimpleCNN, docs/notation.md §2.2; images), ``"unet-encoder"``
    (:class:`UNetEncoderTimePredictor` with the UNet ``widths``, the paper's Table 18 comparison; images).
    ``None`` chooses by the data's shape: the MLP for vectors, the SimpleCNN for images.

    Raises:
        ValueError: an unknown ``arch``, an image architecture for vector data or ``"mlp"`` for images, or
            non-square images.
    """
    kind = _kind(info)
    if arch is None:
        arch = "mlp" if kind == "vector" else "simplecnn"
    if arch not in TIME_PREDICTOR_ARCHS:
        raise ValueError(f"unknown time predictor architecture {arch!r}; choose from {', '.join(TIME_PREDICTOR_ARCHS)}")
    if (arch == "mlp") != (kind == "vector"):
        raise ValueError(f"--arch {arch} is for {'vector data' if arch == 'mlp' else 'images'}, but the data has "
                         f"shape {tuple(info.sample_shape)}; use " + ("--arch simplecnn or unet-encoder" if
                                                                        arch == "mlp" else "--arch mlp"))
    if arch == "mlp":
        return MLPTimePredictor(info.sample_shape[0], num_train_timesteps, hidden, layers, num_classes=num_classes)
    c, h, w = info.sample_shape
    if h != w:
        raise ValueError(f"image models need square images, got {h}×{w}; pass --image-size")
    if arch == "unet-encoder":
        return UNetEncoderTimePredictor(c, h, num_train_timesteps, widths=tuple(widths), num_classes=num_classes)
    return SimpleCNNTimePredictor(c, h, num_train_timesteps, num_classes=num_classes)


def make_vae(info: DatasetInfo, *, widths: tuple[int, ...] | None = None, latent_channels: int = 4,
             kl_weight: float = 1e-6) -> nn.Module:
    """A small diffusers ``AutoencoderKL`` for the dataset's square images, as a :class:`~tagdiff.vae.VAEModel`.

    ``len(widths)`` encoder/decoder levels (``DownEncoderBlock2D`` / ``UpDecoderBlock2D``, one ResNet per level,
    the mid-block attention of diffusers' default), downsampling f = 2^(len(widths) - 1). Default widths: (16, 32)
    for images up to 16 pixels (digits 8×8 → 4×4×4 latents, f = 2) and (16, 32, 32) above (MNIST, f = 4). Images
    are padded with -1 to a canvas that is a multiple of 4f (:func:`~tagdiff.vae.canvas_pad`): MNIST 28×28 → 32×32,
    latents ``(latent_channels, 8, 8)``; digits are not padded.

    Raises:
        ValueError: vector data, non-square images, empty or non-positive widths, or latent_channels < 1.
    """
    from diffusers import AutoencoderKL

    from ..models.vae import VAEModel, canvas_pad

    if _kind(info) != "image":
        raise ValueError(f"a VAE is for image datasets (digits, mnist, folder); {info.name!r} has samples of shape "
                         f"{info.sample_shape}")
    c, h, w = info.sample_shape
    if h != w:
        raise ValueError(f"VAEs need square images, got {h}×{w}; pass --image-size")
    widths = tuple(widths) if widths else ((16, 32) if h <= 16 else (16, 32, 32))
    if min(widths) < 1 or latent_channels < 1:
        raise ValueError(f"VAE widths and latent channels must be positive, got {list(widths)} and {latent_channels}")
    n = len(widths)
    pad = canvas_pad(h, 2 ** (n - 1))
    vae = AutoencoderKL(in_channels=c, out_channels=c, block_out_channels=widths, layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                        latent_channels=latent_channels, norm_num_groups=min(8, min(widths)),
                        sample_size=h + sum(pad))
    return VAEModel(vae, (c, h, w), pad, kl_weight)


def make_classifier(kind: str, info: DatasetInfo, num_train_timesteps: int) -> tuple[nn.Module, Any]:
    """``(classifier, loss_fn)`` for ``kind`` in ``noisy`` (p(y|x_t,t), classifier guidance), ``clean`` (p(y|x),
    DPS through x0_hat) or ``eval`` (independent evaluation classifier, FID/KID features).

    Raises:
        ValueError: for an unknown kind, vector data, or a dataset without classes.
    """
    from ..models.classifiers import (
        CleanClassifier,
        EvalClassifier,
        NoisyClassifier,
        clean_classifier_loss,
        noisy_classifier_loss,
    )

    if _kind(info) != "image":
        raise ValueError(f"classifiers are for image datasets; {info.name!r} has samples of shape {info.sample_shape}")
    if not info.num_classes or info.num_classes < 2:
        raise ValueError(f"dataset {info.name!r} has no class labels to train a classifier on")
    c, h, _ = info.sample_shape
    if kind == "noisy":
        return NoisyClassifier(c, h, info.num_classes, num_train_timesteps), noisy_classifier_loss
    if kind == "clean":
        return CleanClassifier(c, h, info.num_classes), clean_classifier_loss
    if kind == "eval":
        return EvalClassifier(c, h, info.num_classes), clean_classifier_loss
    raise ValueError(f"unknown classifier kind {kind!r}; expected noisy, clean or eval")


def exporter(model: nn.Module, schedule: VPSchedule, flow: Any = None) -> Any:
    """The export function :func:`tagdiff.training.train` should use for ``model`` (diffusers folder for UNets;
    with ``flow``, a flow-matching UNet's: a ``FlowMatchEulerDiscreteScheduler`` config)."""
    if isinstance(model, UNetEpsModel):
        return partial(_export_unet, vp_schedule=schedule, flow_schedule=flow)
    return None


def _export_unet(model: UNetEpsModel, out_dir: Any, *, vp_schedule: VPSchedule, flow_schedule: Any = None,
                 **extra: Any) -> Any:
    extra.pop("schedule", None)  # recorded by save_unet itself (scheduler_config.json + tagdiff.json)
    return save_unet(model, vp_schedule, out_dir, flow_schedule=flow_schedule, **extra)


def condition_labels(condition: str, x: Tensor, y: Tensor, info: DatasetInfo,
                     medians: Tensor | None = None) -> tuple[Tensor | None, dict[str, Any]]:
    """Condition labels of a conditional time predictor p_φ(t | x, c) (``train time-predictor --condition``).

    * ``"none"``: no labels (unconditional predictor);
    * ``"class"``: ``c = y`` (``info.num_classes`` conditions);
    * ``"class_ink"`` / ``"class_slant"``: the joint condition ``c = 2 y + b`` (``2 · num_classes`` conditions) of
      the multi-condition bench (``tagdiff bench multicond``), with bin b = 1 if the image's ink mass / slant
      (:mod:`tagdiff.data.attributes`) is above its class median (``medians``; default: the medians of ``x``
      itself, i.e. of the training split) and 0 otherwise.

    Returns:
        ``(labels (N,) int64 or None, meta)``; ``meta`` (``condition``, ``num_conditions`` and, for class_<attribute>,
        ``<attribute>_medians``) is recorded in the checkpoint's config.json.

    Raises:
        ValueError: an unknown condition, a dataset without class labels, or class_<attribute> on non-image data.
    """
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; expected one of {', '.join(CONDITIONS)}")
    if condition == "none":
        return None, {"condition": "none", "num_conditions": None}
    K = info.num_classes
    if not K or K < 2:
        raise ValueError(f"--condition {condition} needs class labels; dataset {info.name!r} has none")
    if condition == "class":
        return y.long(), {"condition": "class", "num_conditions": K}
    attribute = condition.removeprefix("class_")
    if _kind(info) != "image":
        raise ValueError(f"{condition} labels (--condition {condition} or --attribute {attribute}) need image data "
                         f"(the {attribute} of an image); dataset {info.name!r} has samples of shape "
                         f"{info.sample_shape}")
    medians = attribute_quantiles(attribute, x, y, K, (0.5,))[:, 0] if medians is None else medians
    labels = joint_condition(y, attribute_bins(attribute, x, y, K, medians))
    return labels, {"condition": condition, "num_conditions": 2 * K,
                    f"{attribute}_medians": [float(v) for v in medians]}


def attribute_labels(attribute: str, x: Tensor, y: Tensor, info: DatasetInfo,
                     medians: Tensor | None = None) -> tuple[Tensor, DatasetInfo, dict[str, Any]]:
    """Labels of an attribute classifier (``train classifier --attribute``): the attribute's level b ∈ {0, 1} (above
    the class median, :mod:`tagdiff.data.attributes`), i.e. ``condition_labels("class_<attribute>") % 2``.

    Returns:
        ``(labels (N,) int64, info with num_classes = 2, meta)``; ``meta`` (``attribute``, ``levels``,
        ``<attribute>_medians``) is recorded in the checkpoint's config.json.
    Raises:
        ValueError: an unknown attribute, a dataset without class labels, or non-image data.
    """
    from dataclasses import replace

    levels = get_attribute(attribute).levels
    joint, meta = condition_labels(f"class_{attribute}", x, y, info, medians)
    meta = {"attribute": attribute, "levels": list(levels), f"{attribute}_medians": meta[f"{attribute}_medians"]}
    names = tuple(f"{attribute}:{lvl}" for lvl in levels)
    return joint % 2, replace(info, num_classes=2, class_names=names), meta


def conditional_report(predictor: TimePredictor, schedule: VPSchedule, condition: str, meta: dict[str, Any],
                       held_x: Tensor, held_y: Tensor, info: DatasetInfo, out: Path | None = None,
                       seed: int = 12345, max_samples: int = 2000) -> dict[str, Any]:
    """Held-out accuracy, mean |argmax − t| and cross-entropy of a conditional time predictor, with the true
    condition and with the null embedding (``c = -1``), on forward-noised held-out images
    (:func:`~tagdiff.metrics.evaluate_time_predictor`, 100 timesteps each); printed, and written to ``out`` (JSON)
    if given. Only the first ``max_samples`` held-out images are used (all 359 on digits; 2000 of MNIST's 10,000,
    which keeps the report to about a minute on a CPU).

    The held-out condition labels come from :func:`condition_labels` with the training split's medians
    (``meta["ink_medians"]`` / ``meta["slant_medians"]``), i.e. the same definition the predictor was trained with.
    """
    import json

    from ..metrics.time_gap import evaluate_time_predictor

    key = f"{condition.removeprefix('class_')}_medians"
    medians = torch.tensor(meta[key], dtype=torch.float64) if key in meta else None
    held_x, held_y = held_x[:max_samples], held_y[:max_samples]
    held_c, _ = condition_labels(condition, held_x, held_y, info, medians)
    keys = ("accuracy", "mean_abs_error", "cross_entropy")
    report: dict[str, Any] = {"condition": condition, "num_held_out": int(held_x.shape[0]), "seed": seed}
    for name, c in (("conditional", held_c), ("null", torch.full_like(held_c, -1))):
        r = evaluate_time_predictor(predictor.eval(), held_x, schedule, c=c, seed=seed)
        report[name] = {k: r[k] for k in keys}
    print("held-out, true / null condition: " + ", ".join(
        f"{k} {report['conditional'][k]:.3f} / {report['null'][k]:.3f}" for k in keys))
    if out is not None:
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
    return report


def classifier_report(model: nn.Module, kind: str, x: Tensor, y: Tensor, out_dir: Path | None = None,
                      schedule: VPSchedule | None = None, seed: int = 12345) -> dict[str, Any]:
    """Held-out accuracy of a classifier on ``x`` (``(N, C, H, W)``) with labels ``y`` (``(N,)`` int64); a noisy
    classifier (``kind="noisy"``) on the forward-noised ``x_t = schedule.q_sample(x, t, ε)`` (ε seeded with
    ``seed + t``) at training timesteps t = 0, 0.1 T, 0.3 T, 0.5 T (0, 100, 300, 500 for T = 1000): what it sees
    when it guides. Printed, and written to ``out_dir/metrics.json`` if given.

    Raises:
        ValueError: empty ``x``, ``y`` whose length is not N (:func:`tagdiff.classifiers.accuracy`), or a noisy
            classifier without ``schedule``.
    """
    import json

    from ..models.classifiers import accuracy

    if kind == "noisy" and schedule is None:
        raise ValueError("the held-out report of a noisy classifier needs its schedule (x_t = q_sample(x, t, ε))")
    T = int(getattr(model, "num_train_timesteps", 1000))
    ts = tuple(sorted({round(f * T) for f in (0, 0.1, 0.3, 0.5)})) if kind == "noisy" else (None,)
    report: dict[str, Any] = {}
    for t in ts:
        if t is None:
            report["accuracy"] = accuracy(model, x, y)
            continue
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + t), dtype=x.dtype)
        x_t = schedule.q_sample(x, torch.full((x.shape[0],), t), noise)
        report[f"accuracy_t{t}"] = accuracy(model, x_t, y, t=t)
    report["num_held_out"] = int(x.shape[0])
    if kind == "noisy":
        report["inputs"] = f"x_t = q_sample(x, t, noise seeded {seed} + t)"
    print("held-out " + ", ".join(f"{k} {v:.3f}" for k, v in report.items() if isinstance(v, float)))
    if out_dir is not None:
        (Path(out_dir) / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def time_predictor_report(predictor: TimePredictor, schedule: VPSchedule, held_out: Tensor, out: Path | None = None,
                          title: str = "time predictor", seed: int = 12345) -> dict[str, Any]:
    """Accuracy, mean |argmax − t| and cross-entropy of ``predictor`` on forward-noised ``held_out`` samples
    (:func:`~tagdiff.metrics.evaluate_time_predictor`), printed per bucket of timesteps; written to ``out`` (JSON)
    with a PNG figure beside it if given.

    Raises:
        ValueError: ``held_out`` samples of a shape the predictor does not take.
    """
    import json

    from ..metrics.time_gap import evaluate_time_predictor
    from .plots import plot_time_predictor_report

    predictor.check_input(held_out[:1])
    report = evaluate_time_predictor(predictor.eval(), held_out, schedule, seed=seed)
    print(f"{'timesteps':>12s} {'accuracy':>9s} {'|argmax-t|':>11s} {'CE (nats)':>10s}")
    for b in report["buckets"]:
        print(f"{b['t_min']:5d}-{b['t_max']:<6d} {b['accuracy']:9.3f} {b['mean_abs_error']:11.1f} "
              f"{b['cross_entropy']:10.3f}")
    print(f"{'all':>12s} {report['accuracy']:9.3f} {report['mean_abs_error']:11.1f} {report['cross_entropy']:10.3f}")
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        plot_time_predictor_report(report, out.with_suffix(".png"), title)
        print(f"wrote {out} and {out.with_suffix('.png')} (accuracy and |argmax - t| per timestep)")
    return report
