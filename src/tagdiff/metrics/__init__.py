"""Metrics: the Time Gap and time-predictor evaluation, image metrics (FID/KID in a classifier's feature space)
and point-set distances. No plotting."""

from .time_gap import TimeGapRecorder as TimeGapRecorder
from .time_gap import evaluate_time_predictor as evaluate_time_predictor
from .time_gap import time_gap as time_gap
from .toy import wasserstein1 as wasserstein1
