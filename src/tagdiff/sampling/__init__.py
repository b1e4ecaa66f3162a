"""Sampling: VP schedules, prediction types, the term contract, the loop, tagdiff's DDPM/DDIM, the driver of any
diffusers scheduler and flow matching (:mod:`.flow`). Samplers know nothing of guidance; terms
(:mod:`tagdiff.guidance`) act through the loop."""

from .flow import FlowModel as FlowModel
from .flow import sample_flow as sample_flow
from .flow_path import FlowSchedule as FlowSchedule
from .flow_path import flux_mu as flux_mu
from .loop import run_loop as run_loop
from .samplers import sample as sample
from .samplers import sample_ddim as sample_ddim
from .samplers import sample_ddpm as sample_ddpm
from .schedulers import sample_scheduler as sample_scheduler
from .schedules import VPSchedule as VPSchedule
from .terms import Corrector as Corrector
from .terms import ScoreTerm as ScoreTerm
from .terms import StepContext as StepContext
from .terms import StepTerm as StepTerm
