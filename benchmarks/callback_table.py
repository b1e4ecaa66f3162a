"""Which schedulers TAG corrects, per model kind: ``python benchmarks/callback_table.py`` prints a markdown table.

Rows: every VP diffusers scheduler ``tagdiff`` knows and UniPC with its corrector off (flow-matching schedulers run
flow pipelines: ``tests/integrations/test_flow_pipelines.py``). Columns:
``TAGCallback`` in a tiny Stable-Diffusion pipeline (ε-prediction latents, and v-prediction with zero terminal SNR,
trailing timesteps), and ``sample_pipeline`` with TAG on a tiny pixel UNet (ε). Each cell runs 4 steps at ω = 5 and
ω = 0 (seed 0) with models built from configs (``tagdiff.integrations.tiny``): "corrected (k)" with k corrections
and whether ω = 0 reproduces the run without TAG bit for bit, or "refused: <the first words of the message>".
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

STEPS = 4


def _cell(run) -> str:
    try:
        plain, zero, (tagged, k) = run(None), run(0.0), run(5.0)
    except ValueError as e:
        return "refused: " + str(e).split(";")[0][:90]
    except ImportError as e:  # DPMSolverSDEScheduler without torchsde
        return "not run: " + str(e).strip().splitlines()[0][:60]
    same = "ω=0 bit for bit" if torch.equal(plain, zero) else "ω=0 DIFFERS"
    moved = "" if not torch.equal(plain, tagged) else ", no change at ω=5"
    return f"corrected ({k}; {same}{moved})"


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    import diffusers
    from diffusers import DDPMPipeline, DiffusionPipeline

    from tagdiff import TemporalAlignment
    from tagdiff.integrations.diffusers import TAGCallback, sample_pipeline
    from tagdiff.integrations.tiny import PROMPT, pixel_pipeline, sd_pipeline
    from tagdiff.models.time_predictor import SimpleCNNTimePredictor
    from tagdiff.sampling.schedulers import SUPPORTED_SCHEDULERS

    root = Path(tempfile.mkdtemp())
    sd = DiffusionPipeline.from_pretrained(sd_pipeline(root / "sd"))
    px = DDPMPipeline.from_pretrained(pixel_pipeline(root / "px"))
    for p in (sd, px):
        p.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    latent_tp = SimpleCNNTimePredictor(4, 8, 1000, widths=(8, 16)).eval()
    pixel_tp = SimpleCNNTimePredictor(3, 8, 1000, widths=(8, 16)).eval()
    base = dict(sd.scheduler.config)
    vpred = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    rows = [(name, {}) for name in SUPPORTED_SCHEDULERS] + [
        ("UniPCMultistepScheduler", {"disable_corrector": list(range(STEPS))})]
    print("| scheduler | TAGCallback, latent ε (SD) | TAGCallback, latent v, zero SNR | sample_pipeline, pixel ε |")
    print("|---|---|---|---|")
    for name, extra in rows:
        cls = getattr(diffusers, name)
        cells = []
        for kind in ("eps", "v"):
            def run(omega, kind=kind, cls=cls, extra=extra):
                cfg = {k: v for k, v in base.items() if not k.startswith("_")}
                cfg.update(extra, **(vpred if kind == "v" else {}))
                sd.scheduler = cls.from_config(cfg)
                cb = None if omega is None else TAGCallback(latent_tp, omega)
                out = sd([PROMPT], num_inference_steps=STEPS, height=16, width=16, guidance_scale=3.0,
                         output_type="latent", generator=torch.Generator().manual_seed(0),
                         callback_on_step_end=cb).images
                return out if omega != 5.0 else (out, len(cb.history))
            cells.append(_cell(run))

        def run_px(omega, cls=cls, extra=extra):
            px.scheduler = cls.from_config({**dict(px.scheduler.config), **extra})
            terms = [] if omega is None else [TemporalAlignment(pixel_tp, omega, placement="post")]
            out = sample_pipeline(px, terms=terms, batch_size=1, num_inference_steps=STEPS, output_type="pt",
                                  generator=torch.Generator().manual_seed(0)).images
            return out if omega != 5.0 else (out, STEPS - 1)
        cells.append(_cell(run_px))
        label = name + (" (corrector off)" if extra else "")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
