"""The experiments' tests: the library's test settings (offline hub, one torch thread unless OMP_NUM_THREADS says
otherwise) and its shared helpers (``tests/cli_helpers.py``)."""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
