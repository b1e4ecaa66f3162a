"""Shared test setup: offline hub, one torch thread unless the run asks for more.

Tiny tensors run faster single-threaded on CPU, so the default is one thread; ``OMP_NUM_THREADS=N make test`` (and
the other-CPU pass of ``.ci/run``, ``make test-other-cpus``) runs every in-process test with N threads instead, so a
comparison that only holds at one thread count fails here rather than on a user's machine.

Markers: ``slow`` (deselected by ``make test``), ``io`` (data-file handling and checkpoint IO, no numerics: skipped
by the other-CPU pass, whose kernels they do not exercise).
"""

import os
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["TAGDIFF_CACHE"] = tempfile.mkdtemp(prefix="tagdiff-test-cache-")  # latent caches: never the user's
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

IO_ONLY = {"test_data_images.py", "test_data_streaming.py", "test_streaming.py",
           "test_assets.py", "test_checkpoints.py"}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name in IO_ONLY:
            item.add_marker(pytest.mark.io)
