"""Checkpoints: safetensors weights plus a JSON config, written atomically; resumable training state.

A model checkpoint is a folder holding ``model.safetensors`` and ``config.json``
(``{"class": ..., "config": {...constructor kwargs...}, ...extra}``). Each file is written through a temporary
file and ``os.replace``, so an interrupted write never leaves a truncated checkpoint. No pickles.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save
from torch import nn

from ._utils import atomic_write_bytes
from .classifiers import CleanClassifier, EvalClassifier, NoisyClassifier
from .nets import MLPEpsModel
from .time_predictor import MLPTimePredictor, SimpleCNNTimePredictor

__all__ = ["CheckpointError", "MODEL_CLASSES", "load_model", "load_tensors", "read_config", "save_model",
           "save_tensors"]

# The model classes a tagdiff checkpoint may name (a closed list, so loading never imports arbitrary code).
MODEL_CLASSES: dict[str, type[nn.Module]] = {
    cls.__name__: cls for cls in (MLPEpsModel, MLPTimePredictor, SimpleCNNTimePredictor, NoisyClassifier,
                                  CleanClassifier, EvalClassifier)
}


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match what it is loaded into."""


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> None:
    """Atomically write a safetensors file; ``metadata`` values are JSON-encoded into the header."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"json": json.dumps(metadata or {})}
    atomic_write_bytes(path, save(tensors, metadata=meta))


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a safetensors file written by :func:`save_tensors`. Returns ``(tensors, metadata)``.

    Raises:
        CheckpointError: if the file is missing or corrupt.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    data = path.read_bytes()
    try:
        from safetensors import safe_open  # noqa: F401  (import check only)

        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + header_len])
        meta = json.loads(header.get("__metadata__", {}).get("json", "{}"))
    except Exception as e:  # safetensors raises several exception types on corrupt input
        raise CheckpointError(f"checkpoint file {path} is corrupt or truncated ({type(e).__name__}: {e})") from None
    return tensors, meta


def save_model(model: nn.Module, directory: str | Path, **extra: Any) -> Path:
    """Write ``model.safetensors`` and ``config.json`` for a tagdiff model into ``directory`` (atomically).

    ``extra`` (JSON-able) is stored in config.json, e.g. ``schedule=schedule.to_dict()``, ``command="..."``.

    Raises:
        CheckpointError: if the model class is not one tagdiff knows how to rebuild.
    """
    name = type(model).__name__
    if name not in MODEL_CLASSES:
        raise CheckpointError(f"cannot checkpoint {name}; known classes: {', '.join(MODEL_CLASSES)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(directory / "model.safetensors", model.state_dict())
    config = {"class": name, "config": model.config, **extra}
    atomic_write_bytes(directory / "config.json", (json.dumps(config, indent=2) + "\n").encode())
    return directory


def read_config(directory: str | Path) -> dict[str, Any]:
    """Read and validate ``config.json`` of a checkpoint folder.

    Raises:
        CheckpointError: if the folder or file is missing, or the JSON is corrupt.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {directory}")
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"no config.json in {directory}; expected a tagdiff checkpoint (model.safetensors + "
                              "config.json)")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e})") from None
    if not isinstance(config, dict) or "class" not in config or "config" not in config:
        raise CheckpointError(f"{cfg_path} lacks the 'class'/'config' entries of a tagdiff checkpoint")
    return config


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save_model`, in ``eval()`` mode.

    Raises:
        CheckpointError: missing/corrupt files, an unknown class, or weights that do not fit the config.
    """
    directory = Path(directory)
    config = read_config(directory)
    cls = MODEL_CLASSES.get(config["class"])
    if cls is None:
        raise CheckpointError(f"{directory}: unknown model class {config['class']!r}; "
                              f"known: {', '.join(MODEL_CLASSES)}")
    try:
        model = cls(**config["config"])
    except TypeError as e:
        raise CheckpointError(f"{directory}: config does not fit {cls.__name__} ({e})") from None
    tensors, _ = load_tensors(directory / "model.safetensors")
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise CheckpointError(f"{directory}: weights do not match the config ({str(e).splitlines()[0]})") from None
    return model.to(device).eval()
