"""Test data: folders of random PNG images (imported like ``tfg_reference``)."""

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def write_class_folders(root: Path, classes: Sequence[str], names: Sequence[int], shape: tuple[int, ...],
                        seed: int) -> Path:
    """``root/<class>/<name>.png`` for every class and name: uint8 noise of ``shape`` ((H, W) grey or (H, W, 3)
    RGB) from ``np.random.default_rng(seed)``, drawn class by class, name by name. Returns ``root``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k in classes:
        (root / k).mkdir(parents=True)
        for i in names:
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / k / f"{i}.png")
    return root
