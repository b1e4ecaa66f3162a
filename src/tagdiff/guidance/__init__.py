"""Composable perturbations, guidance terms and correctors behind one :class:`Term` interface."""

from .base import STRENGTH_SCHEDULES as STRENGTH_SCHEDULES
from .base import StepContext as StepContext
from .base import Strength as Strength
from .base import Term as Term
from .base import guided_eps as guided_eps
from .classifier import ClassifierGuidance as ClassifierGuidance
from .dps import DPSGuidance as DPSGuidance
from .dps import label_loss as label_loss
from .perturb import Corruption as Corruption
from .perturb import Drift as Drift
from .perturb import LinearDrift as LinearDrift
from .temporal import TemporalAlignment as TemporalAlignment
from .temporal import tls as tls

__all__ = ["ClassifierGuidance", "Corruption", "DPSGuidance", "Drift", "LinearDrift", "STRENGTH_SCHEDULES",
           "StepContext", "Strength", "TemporalAlignment", "Term", "guided_eps", "label_loss", "tls"]
