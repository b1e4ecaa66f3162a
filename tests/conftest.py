"""Shared test setup: offline hub, one torch thread (tiny tensors run faster single-threaded on CPU)."""

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)
