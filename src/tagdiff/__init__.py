"""tagdiff: Temporal Alignment Guidance (TAG) for diffusion models.

Conventions: VP space, integer training timesteps ``t in {0..T-1}``, models ``eps_model(x, t, **cond)`` predicting ε
(or v / x0, declared by a ``prediction_type`` attribute). Samplers: tagdiff's own DDPM/DDIM (:func:`sample_ddpm`,
:func:`sample_ddim`) and every diffusers scheduler (:func:`sample_scheduler`), through one loop (:func:`run_loop`).
See the README and ``docs/`` for the method and results.
"""

from ._utils import NonFiniteError as NonFiniteError
from ._utils import StackedRandomGenerator as StackedRandomGenerator
from .data.gmm import GaussianMixture as GaussianMixture
from .data.gmm_flow import FlowGaussianMixture as FlowGaussianMixture
from .guidance import DSG as DSG
from .guidance import AdaptiveProjectedGuidance as AdaptiveProjectedGuidance
from .guidance import AdaptiveTemporalAlignment as AdaptiveTemporalAlignment
from .guidance import APGMomentum as APGMomentum
from .guidance import CFGPlusPlus as CFGPlusPlus
from .guidance import CFGZeroStar as CFGZeroStar
from .guidance import ClassifierFreeGuidance as ClassifierFreeGuidance
from .guidance import ClassifierGuidance as ClassifierGuidance
from .guidance import Corruption as Corruption
from .guidance import DPSGuidance as DPSGuidance
from .guidance import DPSNormalized as DPSNormalized
from .guidance import DPSStep as DPSStep
from .guidance import Drift as Drift
from .guidance import EpsilonScaling as EpsilonScaling
from .guidance import LangevinCorrector as LangevinCorrector
from .guidance import LinearDrift as LinearDrift
from .guidance import StepContext as StepContext
from .guidance import Strength as Strength
from .guidance import TemporalAlignment as TemporalAlignment
from .guidance import Term as Term
from .guidance import TFGGuidance as TFGGuidance
from .guidance import TimeCorrection as TimeCorrection
from .guidance import TimeShift as TimeShift
from .guidance import guided_eps as guided_eps
from .guidance import mpgd as mpgd
from .guidance import tls as tls
from .metrics.time_gap import TimeGapRecorder as TimeGapRecorder
from .metrics.time_gap import evaluate_time_predictor as evaluate_time_predictor
from .metrics.toy import wasserstein1 as wasserstein1
from .models.load import load as load
from .models.nets import MLPEpsModel as MLPEpsModel
from .models.time_predictor import MLPTimePredictor as MLPTimePredictor
from .models.time_predictor import SimpleCNNTimePredictor as SimpleCNNTimePredictor
from .models.time_predictor import TimePredictor as TimePredictor
from .models.time_predictor import UNetEncoderTimePredictor as UNetEncoderTimePredictor
from .sampling.flow import FlowModel as FlowModel
from .sampling.flow import sample_flow as sample_flow
from .sampling.flow_path import FlowSchedule as FlowSchedule
from .sampling.flow_path import flux_mu as flux_mu
from .sampling.loop import StepInfo as StepInfo
from .sampling.loop import run_loop as run_loop
from .sampling.samplers import ddim_step as ddim_step
from .sampling.samplers import ddpm_step as ddpm_step
from .sampling.samplers import get_sampler as get_sampler
from .sampling.samplers import sample as sample
from .sampling.samplers import sample_ddim as sample_ddim
from .sampling.samplers import sample_ddpm as sample_ddpm
from .sampling.schedulers import sample_scheduler as sample_scheduler
from .sampling.schedules import VPSchedule as VPSchedule
from .sampling.terms import Corrector as Corrector
from .sampling.terms import ScoreTerm as ScoreTerm
from .sampling.terms import StepTerm as StepTerm

__version__ = "0.1.0"

# The diffusers integration imports diffusers' pipelines (seconds): loaded on first use, ``from tagdiff import
# TAGCallback`` included (PEP 562).
_LAZY = {"TAGCallback": "integrations.diffusers", "sample_pipeline": "integrations.diffusers",
         "callback_target": "integrations.diffusers"}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'tagdiff' has no attribute {name!r}")

__all__ = [
    "AdaptiveProjectedGuidance", "APGMomentum", "CFGPlusPlus", "CFGZeroStar", "ClassifierFreeGuidance",
    "ClassifierGuidance", "Corrector", "Corruption", "ddim_step", "ddpm_step", "DPSGuidance", "DPSNormalized",
    "DPSStep", "DSG", "mpgd",
    "Drift", "EpsilonScaling", "evaluate_time_predictor", "FlowGaussianMixture", "FlowModel", "FlowSchedule",
    "flux_mu", "GaussianMixture", "get_sampler", "guided_eps",
    "LangevinCorrector", "LinearDrift", "MLPEpsModel", "MLPTimePredictor", "NonFiniteError", "run_loop", "sample",
    "sample_ddim", "sample_ddpm", "sample_flow", "sample_scheduler", "ScoreTerm", "SimpleCNNTimePredictor",
    "StackedRandomGenerator", "StepContext", "StepInfo", "StepTerm", "Strength", "TemporalAlignment",
           "AdaptiveTemporalAlignment", "Term",
    "TFGGuidance", "TimeCorrection", "TimeGapRecorder", "TimePredictor", "TimeShift", "tls", "UNetEncoderTimePredictor",
    "VPSchedule", "wasserstein1", "load", "TAGCallback", "sample_pipeline", "callback_target",
]
