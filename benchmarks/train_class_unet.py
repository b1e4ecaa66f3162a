"""Train a class-conditional digits UNet with label dropout (one network: ε(x, y) and ε(x, ∅)), then check CFG on it.

The CLI equivalent is ``tagdiff train diffusion --class-conditional --cond-drop P``; this script: the
model is a ``UNet2DModel`` with ``num_class_embeds = K + 1`` whose last embedding is the null label (``y = -1`` in
tagdiff, :class:`tagdiff.interop.UNetEpsModel` ``null_class``), trained by :func:`tagdiff.training.train` with
``cond_drop`` (dropped labels become -1). The exported folder is a diffusers UNet folder with ``null_class`` in
``tagdiff.json`` (:func:`tagdiff.interop.load_unet` reads it).

After training it samples ``--num-per-class`` images per class with DDIM and classifier-free guidance at each
``--scales`` and reports the accuracy of the shipped evaluation classifier (and of unconditional samples, y = -1)::

    python benchmarks/train_class_unet.py --out runs/digits/unet_class --steps 2500 --widths 16,32,32 --bf16

made the shipped ``assets/digits/unet_class`` (16 min on one contended CPU core; its ``metrics.json``: accuracy
0.89 / 0.997 / 1.0 at CFG scale 1 / 2 / 4, 0.12 unconditional).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tagdiff import ClassifierFreeGuidance, StackedRandomGenerator, VPSchedule, sample_ddim
from tagdiff.cli.recipes import exporter
from tagdiff.data import load_dataset
from tagdiff.models.assets import assets_dir
from tagdiff.models.checkpoints import load_model
from tagdiff.models.classifiers import accuracy
from tagdiff.models.unet import UNetEpsModel, load_unet, make_unet
from tagdiff.training.loop import TrainConfig, eps_loss, train


def evaluate(model: UNetEpsModel, schedule: VPSchedule, scales: list[float], num_per_class: int, steps: int,
             seed: int, num_classes: int) -> dict[str, float]:
    clf = load_model(assets_dir("digits") / "clf_eval")
    y = torch.arange(num_classes).repeat_interleave(num_per_class)
    noise = StackedRandomGenerator(range(seed, seed + y.numel()))
    x_T = noise.randn((y.numel(), 1, 8, 8))
    ts = schedule.timesteps(steps)
    out = {}
    for s in scales:
        x0 = sample_ddim(model, x_T, ts, schedule, cond={"y": y}, clip_x0=1.0,
                         terms=[ClassifierFreeGuidance(s, {"y": -1})])
        out[f"accuracy_cfg_{s:g}"] = accuracy(clf, x0, y)
    x0 = sample_ddim(model, x_T, ts, schedule, cond={"y": torch.full_like(y, -1)}, clip_x0=1.0)
    out["accuracy_unconditional"] = accuracy(clf, x0, y)  # chance level (0.1) expected
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/digits/unet_class")
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--cond-drop", type=float, default=0.1, help="label dropout probability (Ho & Salimans: 0.1-0.2)")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--scales", default="1,2,4")
    p.add_argument("--num-per-class", type=int, default=32)
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--widths", default="16,32,32", help="UNet block widths (the unconditional digits UNet: 32,64,64)")
    p.add_argument("--save-every", type=int, default=500, help="steps between resumable states; rerun with a "
                   "smaller --steps to export the last state")
    p.add_argument("--eval-only", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()

    x, labels = load_dataset("digits", "train")
    K = int(labels.max()) + 1
    schedule = VPSchedule.linear(1000)
    out = Path(args.out)
    if not args.eval_only:
        widths = tuple(int(w) for w in args.widths.split(","))
        model = UNetEpsModel(make_unet(8, 1, widths=widths, num_classes=K + 1), 1000, null_class=K)
        config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, ema_decay=0.999,
                             save_every=args.save_every,
                             bf16=args.bf16, cond_drop=args.cond_drop)
        flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(args).items()
                 if v not in (False, None) and k not in ("quiet", "device")]
        command = "python benchmarks/train_class_unet.py " + " ".join(flags)
        t0 = time.time()
        result = train(model, eps_loss, x, schedule, config, out, labels=labels, export=exporter(model, schedule),
                       progress=not args.quiet, device=args.device,
                       export_extra={"dataset": "digits", "null_class": K, "num_classes": K, "command": command})
        print(f"trained {args.steps} steps in {time.time() - t0:.0f} s, final loss {result['final_loss']:.4f}")
    model, schedule = load_unet(out)
    metrics = evaluate(model, schedule, [float(s) for s in args.scales.split(",")], args.num_per_class,
                       args.sample_steps, args.seed, K)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
