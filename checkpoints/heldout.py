"""Held-out figures of every committed model, recomputed on the machine at hand.

Each model folder under ``checkpoints/`` (and each shipped digits/toy asset) records in ``heldout.json``:

* ``probe``: a fingerprint that needs no data. The model's output on seeded inputs (``torch.Generator`` draws, the
  same on every machine) summarised as its mean, its root mean square and its projection on a seeded direction.
  Two machines that load the same weights agree on it to float32 rounding of the network.
* ``held_out``: the figures that matter, on a fixed slice of the held-out split (the first N images of MNIST's
  official t10k files, or digits' held-out split): a classifier's accuracy, a time predictor's exact-t accuracy,
  mean |argmax − t| and cross-entropy (a flow's σ predictor: over its σ bins, on their VP view), an ε-model's
  denoising MSE, a flow model's velocity MSE, a VAE's reconstruction MSE.

``tests/models/test_committed_checkpoints.py`` recomputes both and compares with ``TOLERANCES`` below, whose
derivation is
written beside each entry. Commands::

    python checkpoints/heldout.py --data-dir ../shared/data/mnist --write   # (re)record every heldout.json
    python checkpoints/heldout.py --data-dir ../shared/data/mnist           # compare with the records

Without ``--data-dir`` (or ``$TAGDIFF_MNIST_DIR``) the MNIST held-out figures are skipped; the probes and the
digits figures always run.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
DEFAULT_MNIST = REPO.parent / "shared" / "data" / "mnist"

# How many held-out images each figure uses (the first N of the split, in file order).
N_CLASSIFIER = 2000
N_PREDICTOR = 200     # × 20 timesteps = 4000 predictions
N_DENOISE = 500
N_VAE = 500

# Allowed |recomputed − recorded|, and why. Measured (benchmarks/reproducibility.py's kernel sets: ATen default /
# avx2 / avx512 kernels, MKL and oneDNN capped at AVX2 or SSE4.2, 1 and 2 threads) against the records made with the
# native kernels: probes ≤ 3.3e-7 × rms, cross-entropies ≤ 1.2e-8 and MSEs ≤ 1.7e-7 relative, no argmax flipped.
TOLERANCES: dict[str, dict[str, Any]] = {
    # probe: a network's float32 rounding under other kernels; 1e-5 × rms is 30× the largest measured and still
    # 100× below what a changed weight does (a 0.1 % change of the output is refused: the test checks it)
    "probe": {"rel_rms": 1e-5},
    # argmax figures: a prediction flips only where its top-two logits are within rounding (measured: none); allow
    # 3 flips of a classifier's held-out images, and 10 of a time predictor's 4000 predictions (neighbouring
    # timesteps have close logits)
    "accuracy": {"flips": 3},
    "time_accuracy": {"flips": 10},
    "mean_abs_error": {"abs": 0.05},   # 10 flips by ≤ 20 timesteps over 4000 predictions
    # smooth averages over thousands of float32 values: relative 5e-6 (30× the largest measured)
    "cross_entropy": {"rel": 5e-6},
    "mse": {"rel": 5e-6},
}


# ----------------------------------------------------------------------------------------------- the models


def mnist_folders() -> dict[str, str]:
    """Committed folder (relative to checkpoints/) → kind."""
    return {
        "mnist/unet": "eps", "mnist/unet_class": "eps_class", "mnist/clf_noisy": "classifier_noisy",
        "mnist/clf_clean": "classifier", "mnist/clf_eval": "classifier", "mnist/time_predictor": "time_predictor",
        "mnist_latent/vae": "vae", "mnist_latent/ckpt/unet_class": "latent_eps_class",
        "mnist_latent/ckpt/time_predictor": "latent_time_predictor",
        "mnist_flow/unet": "flow_class", "mnist_flow/time_predictor": "flow_time_predictor",
        "mnist_strong/unet": "eps",
    }


def digits_folders() -> dict[str, str]:
    """Shipped assets (names of :func:`tagdiff.checkpoints.shipped_models`) → kind; their held-out split is digits'
    (toy: fresh draws of the mixture with seed 12345)."""
    return {"digits/unet": "eps", "digits/unet_class": "eps_class", "digits/clf_noisy": "classifier_noisy",
            "digits/clf_clean": "classifier", "digits/clf_eval": "classifier",
            "digits/time_predictor": "time_predictor", "toy/score": "eps", "toy/time_predictor": "time_predictor",
            "digits_flow/unet": "flow", "digits_flow/time_predictor": "flow_time_predictor",
            "digits_flow/unet_class": "flow_class"}


def folder_path(name: str) -> Path:
    """A committed folder (``mnist/...``) under checkpoints/, a shipped one (``digits/...``, ``toy/...``) in the
    package."""
    from tagdiff.models.checkpoints import shipped_models

    return (ROOT / name) if name.startswith("mnist") else shipped_models()[name]


# ----------------------------------------------------------------------------------------------- figures


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _summary(out: torch.Tensor, seed: int = 7) -> dict[str, float]:
    out = out.detach().double().flatten()
    r = torch.randn(out.shape, generator=_gen(seed), dtype=torch.float64)
    return {"mean": float(out.mean()), "rms": float(out.pow(2).mean().sqrt()), "proj": float((out * r).mean())}


def _load(name: str, kind: str) -> tuple[Any, Any]:
    """(model, schedule or None)."""
    from tagdiff.models.checkpoints import load_model
    from tagdiff.models.load import load_checkpoint

    path = folder_path(name)
    if kind == "vae":
        from tagdiff.models.latent import LatentSpace

        return LatentSpace.from_pretrained(path), None
    if kind.endswith("eps") or kind.endswith("eps_class") or kind in ("flow", "flow_class", "flow_time_predictor"):
        return load_checkpoint(path)   # a flow: its LoadedFlow and FlowSchedule; a σ predictor: its bins' VP view
    return load_model(path), None


@torch.no_grad()
def probe(model: Any, kind: str) -> dict[str, float]:
    """The model's output on seeded inputs of its sample shape (no data needed)."""
    if kind == "vae":
        x = torch.rand((4, *model.image_shape), generator=_gen(1)) * 2 - 1
        z = model.encode(x)
        return {**{f"z_{k}": v for k, v in _summary(z).items()}, **_summary(model.decode(z), seed=8)}
    shape = tuple(model.sample_shape)
    x = torch.randn((4, *shape), generator=_gen(1))
    T = int(getattr(model, "num_train_timesteps", 1000))
    t = torch.tensor([0, T // 4, T // 2, T - 1])
    if kind.startswith("classifier_noisy"):
        return _summary(model(x, t))
    if kind.startswith("classifier"):
        return _summary(model(x))
    if "time_predictor" in kind:
        return _summary(model(x))
    if kind.endswith("eps_class"):
        return _summary(model(x, t, y=torch.tensor([0, 3, 7, getattr(model, "null_class", 0)])))
    if kind == "flow":   # the velocity network at diffusers' timesteps T σ
        return _summary(model.model(x, t.float()))
    if kind == "flow_class":   # the same, at classes 0, 3, 7 and the null label
        return _summary(model.model(x, t.float(), y=torch.tensor([0, 3, 7, -1])))
    return _summary(model(x, t))


@functools.lru_cache(maxsize=2)
def _mnist_held_out(mnist_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from tagdiff.data import load_dataset

    return load_dataset("mnist", "held_out", data_dir=mnist_dir)


def _held_out_data(name: str, mnist_dir: Path | None, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    from tagdiff.data import load_dataset

    if name.startswith("mnist"):
        if mnist_dir is None:
            return None
        x, y = _mnist_held_out(Path(mnist_dir))
        return x[:n], y[:n]
    if name.startswith("toy"):
        return load_dataset("toy", num_samples=n, seed=12345)
    x, y = load_dataset("digits", "held_out")
    return x[:n], y[:n]


def _latent(x: torch.Tensor) -> torch.Tensor:
    from tagdiff.models.latent import LatentSpace

    space = LatentSpace.from_pretrained(ROOT / "mnist_latent" / "vae")
    with torch.no_grad():
        return torch.cat([space.encode(x[i:i + 250]) for i in range(0, x.shape[0], 250)])


@torch.no_grad()
def held_out(name: str, model: Any, schedule: Any, kind: str, mnist_dir: Path | None) -> dict[str, Any] | None:
    """The held-out figures of one model (None where its data is absent)."""
    from tagdiff.metrics.time_gap import evaluate_time_predictor
    from tagdiff.models.classifiers import accuracy
    from tagdiff.sampling.schedules import VPSchedule

    n = {"vae": N_VAE}.get(kind, N_CLASSIFIER if kind.startswith("classifier") else
                           N_PREDICTOR if "time_predictor" in kind else N_DENOISE)
    data = _held_out_data(name, mnist_dir, n)
    if data is None:
        return None
    x, y = data
    if kind.startswith("latent"):
        x = _latent(x)
    out: dict[str, Any] = {"num_held_out": int(x.shape[0])}
    if kind == "vae":
        rec = torch.cat([model.decode(model.encode(x[i:i + 250])) for i in range(0, x.shape[0], 250)])
        out["mse"] = float((rec.double() - x.double()).pow(2).mean())
    elif kind.startswith("classifier"):
        if kind == "classifier_noisy":   # on x_t = q_sample(x, t, seeded noise), at t = 0 and T/2
            from tagdiff.models.checkpoints import read_config

            sched = VPSchedule.from_dict(read_config(folder_path(name))["schedule"])
            T = sched.num_train_timesteps
            for t in (0, T // 2):
                noise = torch.randn(x.shape, generator=_gen(12345 + t))
                xt = sched.q_sample(x, torch.full((x.shape[0],), t), noise)
                out[f"accuracy_t{t}"] = accuracy(model, xt, y, t=t)
        else:
            out["accuracy"] = accuracy(model, x, y)
    elif "time_predictor" in kind:
        T = int(model.num_train_timesteps)
        sched = schedule or VPSchedule.linear(T)
        r = evaluate_time_predictor(model.eval(), x, sched, num_timesteps=20, seed=12345)
        out.update(time_accuracy=r["accuracy"], mean_abs_error=r["mean_abs_error"], cross_entropy=r["cross_entropy"],
                   num_predictions=int(x.shape[0]) * len(r["timesteps"]))
    elif kind in ("flow", "flow_class"):   # velocity MSE at seeded (σ ~ U(0, 1), noise): x_σ = (1 - σ) x + σ ε,
        # target ε - x; a class-conditional model at the images' own labels
        g = _gen(12345)
        sigma = torch.rand(x.shape[0], generator=g)
        noise = torch.randn(x.shape, generator=g)
        s = sigma.view(-1, *([1] * (x.ndim - 1)))
        xs, T = (1 - s) * x + s * noise, schedule.num_train_timesteps
        kw = {"y": y} if kind == "flow_class" else {}
        v = torch.cat([model.model(xs[i:i + 250], T * sigma[i:i + 250], **{k: w[i:i + 250] for k, w in kw.items()})
                       for i in range(0, x.shape[0], 250)])
        out["mse"] = float((v.double() - (noise - x).double()).pow(2).mean())
    else:   # ε-model: denoising MSE at seeded (t, noise)
        g = _gen(12345)
        T = schedule.num_train_timesteps
        t = torch.randint(0, T, (x.shape[0],), generator=g)
        noise = torch.randn(x.shape, generator=g)
        xt = schedule.q_sample(x, t, noise)
        kw = {"y": y} if kind.endswith("eps_class") else {}
        eps = torch.cat([model(xt[i:i + 250], t[i:i + 250], **{k: v[i:i + 250] for k, v in kw.items()})
                         for i in range(0, x.shape[0], 250)])
        out["mse"] = float((eps.double() - noise.double()).pow(2).mean())
    return out


def figures(name: str, kind: str, mnist_dir: Path | None) -> dict[str, Any]:
    model, schedule = _load(name, kind)
    if hasattr(model, "eval"):
        model.eval()
    return {"kind": kind, "probe": probe(model, kind), "held_out": held_out(name, model, schedule, kind, mnist_dir)}


# ----------------------------------------------------------------------------------------------- comparison


def compare(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Every figure outside its tolerance, one line each (empty: all agree)."""
    bad = []
    rp, np_ = recorded["probe"], now["probe"]
    for key in rp:
        scale = rp["z_rms" if key.startswith("z_") else "rms"]
        if abs(np_[key] - rp[key]) > TOLERANCES["probe"]["rel_rms"] * scale:
            bad.append(f"probe {key}: {np_[key]!r} against recorded {rp[key]!r} (scale {scale:.3g})")
    rh, nh = recorded.get("held_out"), now.get("held_out")
    if rh is None or nh is None:
        return bad
    for key, want in rh.items():
        got = nh[key]
        if key.startswith("num_"):
            ok = got == want
        elif key.startswith("accuracy"):
            ok = abs(got - want) <= TOLERANCES["accuracy"]["flips"] / rh["num_held_out"] + 1e-12
        elif key == "time_accuracy":
            ok = abs(got - want) <= TOLERANCES["time_accuracy"]["flips"] / rh["num_predictions"] + 1e-12
        elif key == "mean_abs_error":
            ok = abs(got - want) <= TOLERANCES["mean_abs_error"]["abs"]
        else:
            ok = abs(got - want) <= TOLERANCES[key]["rel"] * abs(want)
        if not ok:
            bad.append(f"held_out {key}: {got!r} against recorded {want!r}")
    return bad


def all_folders(include_mnist: bool = True) -> dict[str, str]:
    out = dict(digits_folders())
    if include_mnist:
        out.update({k: v for k, v in mnist_folders().items() if (ROOT / k).is_dir()})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=os.environ.get("TAGDIFF_MNIST_DIR"),
                   help="MNIST IDX folder (default $TAGDIFF_MNIST_DIR; without it MNIST held-out figures are skipped)")
    p.add_argument("--write", action="store_true", help="record heldout.json in every folder instead of comparing")
    p.add_argument("--only", default=None, help="comma-separated folder names (default: all)")
    args = p.parse_args(argv)
    names = all_folders()
    if args.only:
        names = {k: v for k, v in names.items() if k in args.only.split(",")}
    failures = 0
    for name, kind in names.items():
        now = figures(name, kind, args.data_dir)
        path = folder_path(name) / "heldout.json"
        if args.write:
            _write_json(path, now)
            print(f"wrote {path.relative_to(REPO)}: {now['held_out']}")
            continue
        bad = compare(json.loads(path.read_text()), now)
        failures += bool(bad)
        print(f"{name}: " + ("ok" if not bad else "; ".join(bad)))
    return 1 if failures else 0


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    raise SystemExit(main())
