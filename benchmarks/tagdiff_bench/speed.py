"""Speed: seconds per sampling step with and without guidance and TAG, and time-predictor training throughput.

Timing does not depend on the weights, so the models are freshly initialised with each dataset's recipe
architecture (digits 1×8×8, MNIST 1×28×28): the diffusers UNet, the SimpleCNN time predictor and the noise-aware /
clean classifiers. Each configuration runs ``warmup`` steps, then ``num_steps`` timed DDIM(η = 1) steps at
``batch_size``, ``repeats`` times, keeping the fastest (least-disturbed) timing. TAG's overhead is reported as a
ratio to the step it corrects: ``t(X + TAG) / t(X) - 1``.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from tagdiff.cli.recipes import make_eps_model, make_time_predictor
from tagdiff.data import dataset_info
from tagdiff.guidance import ClassifierGuidance, DPSGuidance, TemporalAlignment, Term, label_loss
from tagdiff.models.classifiers import CleanClassifier, NoisyClassifier
from tagdiff.sampling.samplers import sample_ddim
from tagdiff.sampling.schedules import VPSchedule
from tagdiff.training.loop import TrainConfig, time_loss

__all__ = ["CONFIGS", "interleaved_medians", "loop_overheads", "run_speed"]

CONFIGS = ("sampler", "sampler+tag", "cg", "cg+tag", "dps", "dps+tag")


def _terms(config: str, tp: Any, noisy: Any, clean: Any, target: torch.Tensor) -> list[Term]:
    terms: list[Term] = []
    if config.startswith("cg"):
        terms.append(ClassifierGuidance(noisy, target, 1.0))
    elif config.startswith("dps"):
        terms.append(DPSGuidance(label_loss(clean, target), 1.0))
    if config.endswith("+tag"):
        terms.append(TemporalAlignment(tp, 1.0))
    return terms


def _time_sampling(eps_model: Any, schedule: VPSchedule, terms: list[Term], shape: tuple[int, ...], num_steps: int,
                   warmup: int, repeats: int) -> float:
    """Seconds per step: the minimum over ``repeats`` timings of ``num_steps`` steps (the least-disturbed run)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    grid = schedule.timesteps(1000)[100:100 + warmup + num_steps]  # mid-trajectory timesteps, no final step
    sample_ddim(eps_model, x, grid[:warmup], schedule, eta=1.0, terms=terms, clip_x0=1.0)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        sample_ddim(eps_model, x, grid[warmup:], schedule, eta=1.0, terms=terms, clip_x0=1.0)
        best = min(best, (time.perf_counter() - t0) / num_steps)
    return best


def interleaved_medians(fns: dict[str, Any], repeats: int) -> dict[str, float]:
    """Median seconds of each zero-argument callable over ``repeats`` rounds, the variants interleaved round-robin
    (A, B, C, A, B, C, ...) so that load drifts hit them alike; one untimed warm-up round first."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def loop_overheads(eps_model: Any, tp: Any, clean: Any, schedule: VPSchedule, shape: tuple[int, ...], *,
                   num_steps: int = 10, repeats: int = 7) -> dict[str, Any]:
    """Side-by-side ratios (interleaved medians, one process):

    * ``loop_vs_diffusers``: :func:`tagdiff.sample_scheduler` without terms / the plain diffusers loop
      (``for t in timesteps: step(unet(scale_model_input(x, t), t), t, x)``) on the same UNet, per scheduler;
    * ``tag_vs_floor``: a DPS + TAG step with the Time-Gap recorder on / (a DPS step + one time-predictor forward and
      backward at the same batch), the floor of any TLS corrector; also without logit sharing, for comparison.
    """
    import diffusers

    from tagdiff.metrics.time_gap import TimeGapRecorder
    from tagdiff.sampling.schedulers import sample_scheduler

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(shape, generator=g)
    out: dict[str, Any] = {"loop_vs_diffusers": {}}
    for name in ("DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler"):
        sched = getattr(diffusers, name)(**schedule.to_diffusers_config())

        def plain(sched: Any = sched) -> None:
            s = type(sched).from_config(sched.config)
            s.set_timesteps(num_steps)
            x = noise * s.init_noise_sigma
            with torch.no_grad():
                for t in s.timesteps:
                    x = s.step(eps_model.unet(s.scale_model_input(x, t), t).sample, t, x).prev_sample

        def ours(sched: Any = sched) -> None:
            with torch.no_grad():
                sample_scheduler(sched, eps_model, noise, num_inference_steps=num_steps)

        med = interleaved_medians({"diffusers": plain, "tagdiff": ours}, repeats)
        out["loop_vs_diffusers"][name] = med["tagdiff"] / med["diffusers"]
    target = torch.arange(shape[0]) % 10
    grid = schedule.timesteps(1000)[100:100 + num_steps]

    def dps_run(tag: bool, recorder: bool, share: bool = True) -> Any:
        def fn() -> None:
            terms: list[Term] = [DPSGuidance(label_loss(clean, target), 1.0)]
            if tag:
                terms.append(TemporalAlignment(tp if share else _NoShare(tp), 1.0))
            sample_ddim(eps_model, noise, grid, schedule, eta=1.0, terms=terms, clip_x0=1.0,
                        callback=TimeGapRecorder(tp) if recorder else None)
        return fn

    x = noise.clone()
    t = torch.full((shape[0],), int(grid[0]))

    def floor_tp() -> None:
        for _ in range(num_steps):
            xi = x.detach().requires_grad_(True)
            torch.autograd.grad(tp.log_prob(xi, t).sum(), xi)

    med = interleaved_medians({"dps": dps_run(False, False), "tp_fwd_bwd": floor_tp,
                               "dps+tag+recorder": dps_run(True, True),
                               "dps+tag+recorder, no sharing": dps_run(True, True, share=False)}, repeats)
    floor = med["dps"] + med["tp_fwd_bwd"]
    out["tag_vs_floor"] = med["dps+tag+recorder"] / floor
    out["tag_vs_floor_without_sharing"] = med["dps+tag+recorder, no sharing"] / floor
    out["medians_seconds"] = med
    out["config"] = {"num_steps": num_steps, "repeats": repeats, "timing": "interleaved medians", "batch": shape[0]}
    return out


class _NoShare(torch.nn.Module):
    """A time predictor wrapper with its own ``log_prob``: TAG then cannot hand its logits to the recorder."""

    def __init__(self, tp: Any):
        super().__init__()
        self.tp = tp
        self.num_train_timesteps, self.sample_shape = tp.num_train_timesteps, tp.sample_shape

    def forward(self, x: torch.Tensor, c: Any = None) -> torch.Tensor:
        return self.tp(x, c)

    def log_prob(self, x: torch.Tensor, t: torch.Tensor, c: Any = None) -> torch.Tensor:
        return self.tp.log_prob(x, t, c)


def _time_predictor_throughput(tp: Any, schedule: VPSchedule, shape: tuple[int, ...], batch_size: int,
                               steps: int, bf16: bool) -> float:
    x0 = torch.randn((batch_size, *shape))
    opt = torch.optim.Adam(tp.parameters(), lr=1e-4)
    cfg = TrainConfig(bf16=bf16)
    tp.train()
    t0 = 0.0
    for i in range(steps + 2):
        if i == 2:
            t0 = time.perf_counter()
        t = torch.randint(0, schedule.num_train_timesteps, (batch_size,))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = time_loss(tp, x0, t, torch.randn_like(x0), schedule)
        opt.zero_grad()
        loss.backward()
        opt.step()
    tp.eval()
    return batch_size * steps / (time.perf_counter() - t0)


def run_speed(out_dir: str | Path, *, datasets: tuple[str, ...] = ("digits", "mnist"), batch_size: int = 256,
              num_steps: int = 5, warmup: int = 1, train_steps: int = 5, repeats: int = 3,
              progress: bool = True) -> dict[str, Any]:
    """Run the speed benchmark; write ``out_dir/results.json``; return the results."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    schedule = VPSchedule.linear(1000)
    results: dict[str, Any] = {"seconds_per_step": {}, "tag_overhead": {}, "time_predictor_train_images_per_s": {}}
    for name in datasets:
        info = dataset_info(name)
        c, h, _ = info.sample_shape
        eps_model = make_eps_model(info, 1000).eval()
        tp = make_time_predictor(info, 1000).eval()
        noisy, clean = NoisyClassifier(c, h).eval(), CleanClassifier(c, h).eval()
        target = torch.arange(batch_size) % 10
        per: dict[str, float] = {}
        for config in CONFIGS:
            per[config] = _time_sampling(eps_model, schedule, _terms(config, tp, noisy, clean, target),
                                         (batch_size, *info.sample_shape), num_steps, warmup, repeats)
            if progress:
                print(f"  {name:7s} {config:12s} {per[config] * 1e3:9.1f} ms/step", flush=True)
        results["seconds_per_step"][name] = per
        results["tag_overhead"][name] = {base: per[f"{base}+tag"] / per[base] - 1 for base in ("sampler", "cg", "dps")}
        results.setdefault("overheads", {})[name] = loop_overheads(eps_model, tp, clean, schedule,
                                                                   (batch_size, *info.sample_shape))
        results["time_predictor_train_images_per_s"][name] = {
            "fp32": _time_predictor_throughput(make_time_predictor(info, 1000), schedule, info.sample_shape, 256,
                                               train_steps, False),
            "bf16": _time_predictor_throughput(make_time_predictor(info, 1000), schedule, info.sample_shape, 256,
                                               train_steps, True)}
    results["config"] = {"batch_size": batch_size, "num_steps": num_steps, "warmup": warmup, "repeats": repeats,
                         "timing": "min over repeats", "sampler": "ddim eta=1",
                         "threads": torch.get_num_threads(), "torch": torch.__version__,
                         "machine": f"{platform.machine()} {platform.processor() or ''}".strip()}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
