"""Composable perturbations, guidance terms and correctors behind one :class:`Term` interface."""

from ..sampling.terms import STRENGTH_SCHEDULES as STRENGTH_SCHEDULES
from ..sampling.terms import Corrector as Corrector
from ..sampling.terms import ScoreTerm as ScoreTerm
from ..sampling.terms import StepContext as StepContext
from ..sampling.terms import StepTerm as StepTerm
from ..sampling.terms import Strength as Strength
from ..sampling.terms import Term as Term
from ..sampling.terms import guided_eps as guided_eps
from .baselines import EpsilonScaling as EpsilonScaling
from .baselines import LangevinCorrector as LangevinCorrector
from .baselines import TimeCorrection as TimeCorrection
from .baselines import TimeShift as TimeShift
from .cfg import AdaptiveProjectedGuidance as AdaptiveProjectedGuidance
from .cfg import APGMomentum as APGMomentum
from .cfg import CFGPlusPlus as CFGPlusPlus
from .cfg import CFGZeroStar as CFGZeroStar
from .cfg import ClassifierFreeGuidance as ClassifierFreeGuidance
from .cfg import interval_from_sigma as interval_from_sigma
from .classifier import ClassifierGuidance as ClassifierGuidance
from .constrained import DSG as DSG
from .constrained import DPSStep as DPSStep
from .constrained import mpgd as mpgd
from .contrastive import SelfGuidance as SelfGuidance
from .contrastive import TimestepGuidance as TimestepGuidance
from .dps import DPSGuidance as DPSGuidance
from .dps import label_loss as label_loss
from .multicond import MULTICOND_VARIANTS as MULTICOND_VARIANTS
from .multicond import REPARAM_SCHEDULES as REPARAM_SCHEDULES
from .multicond import MultiConditionTAG as MultiConditionTAG
from .multicond import combined_loss as combined_loss
from .multicond import reparameterize as reparameterize
from .perturb import Corruption as Corruption
from .perturb import Drift as Drift
from .perturb import LinearDrift as LinearDrift
from .temporal import AdaptiveTemporalAlignment as AdaptiveTemporalAlignment
from .temporal import TemporalAlignment as TemporalAlignment
from .temporal import tls as tls
from .tfg import TFG_SCHEDULES as TFG_SCHEDULES
from .tfg import DPSNormalized as DPSNormalized
from .tfg import TFGGuidance as TFGGuidance
from .tfg import dps_as_tfg as dps_as_tfg
from .tfg import tfg_schedule as tfg_schedule

__all__ = ["Corrector", "ScoreTerm", "StepTerm", "EpsilonScaling", "LangevinCorrector", "TimeCorrection", "TimeShift",
           "ClassifierGuidance", "Corruption", "DPSGuidance", "DPSNormalized", "Drift", "LinearDrift",
           "STRENGTH_SCHEDULES", "StepContext", "Strength", "TFGGuidance", "TFG_SCHEDULES", "TemporalAlignment",
           "AdaptiveTemporalAlignment", "Term",
           "dps_as_tfg", "guided_eps", "label_loss", "tfg_schedule", "tls",
           "AdaptiveProjectedGuidance", "APGMomentum", "CFGPlusPlus", "CFGZeroStar", "ClassifierFreeGuidance",
           "interval_from_sigma", "SelfGuidance", "TimestepGuidance", "REPARAM_SCHEDULES", "MULTICOND_VARIANTS",
           "MultiConditionTAG", "combined_loss", "reparameterize", "DPSStep", "DSG", "mpgd"]
