"""Training: the resumable training loop (EMA, mixed precision, gradient accumulation), its state on disk, and
data-parallel helpers."""

from .loop import TrainConfig as TrainConfig
from .loop import eps_loss as eps_loss
from .loop import time_loss as time_loss
from .loop import train as train
