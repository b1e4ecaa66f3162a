"""Checkpoints: safetensors weights plus a JSON config, written atomically; the registry of model classes; the
Hugging Face Hub-style ``save_pretrained`` / ``from_pretrained`` mixin.

A model checkpoint is a folder holding ``model.safetensors`` and ``config.json``
(``{"class": ..., "config": {...constructor kwargs...}, ...extra}``). Each file is written through a temporary
file and ``os.replace``, so an interrupted write never leaves a truncated checkpoint. No pickles. The classes a
checkpoint may name register themselves (:func:`register_model`), so this module imports no concrete model and
loading never imports arbitrary code. Every checkpoint kind, diffusers folders included, loads through
:func:`tagdiff.models.load`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load, save
from torch import nn

from .._io import atomic_write_bytes
from ..sampling.schedules import VPSchedule

__all__ = ["CheckpointError", "HubMixin", "MODEL_CLASSES", "SHIPPED_DEFAULTS", "load_model", "load_tensors",
           "read_config", "register_model", "resolve_checkpoint", "resolve_pretrained", "save_model", "save_tensors",
           "shipped_models"]

_M = TypeVar("_M", bound="HubMixin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

# The model classes a tagdiff checkpoint may name: a closed list, filled by :func:`register_model` when the modules
# that define them are imported (``import tagdiff.models`` imports them all).
MODEL_CLASSES: dict[str, type[nn.Module]] = {}

_T = TypeVar("_T", bound=type)


def register_model(cls: _T) -> _T:
    """Class decorator: let checkpoints name ``cls`` (its constructor arguments are its ``config`` property)."""
    MODEL_CLASSES[cls.__name__] = cls
    return cls


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
        config = json.loads(cfg_path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{cfg_path} is not a text file (not UTF-8 JSON); expected a tagdiff "
                              "config.json") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e})") from None
    if not isinstance(config, dict) or "class" not in config or "config" not in config:
        raise CheckpointError(f"{cfg_path} lacks the 'class'/'config' entries of a tagdiff checkpoint")
    if not isinstance(config["config"], dict):
        raise CheckpointError(f"{cfg_path}: 'config' must be an object of constructor arguments, got "
                              f"{config['config']!r}")
    return config


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save_model`, in ``eval()`` mode, on ``device``.

    ``directory`` is a folder or a shipped name (:func:`resolve_checkpoint`, e.g. ``"digits/clf_clean"``).

    Raises:
        CheckpointError: missing/corrupt files, an unknown class, or weights that do not fit the config.
    """
    directory = resolve_checkpoint(directory)
    config = read_config(directory)
    cls = MODEL_CLASSES.get(config["class"])
    if cls is None:
        raise CheckpointError(f"{directory}: unknown model class {config['class']!r}; "
                              f"known: {', '.join(MODEL_CLASSES)}")
    for key in ("num_train_timesteps", "num_classes", "dim", "hidden", "layers", "in_channels", "image_size"):
        v = config["config"].get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise CheckpointError(f"{directory / 'config.json'}: {key} must be a positive integer, got {v!r}")
    try:
        model = cls(**config["config"])
    except Exception as e:  # a bad value (e.g. num_train_timesteps: -5) fails in the constructor in many ways
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{directory / 'config.json'}: config does not fit {cls.__name__} ({msg})") from None
    tensors, _ = load_tensors(directory / "model.safetensors")
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise CheckpointError(f"{directory}: weights do not match the config ({str(e).splitlines()[0]})") from None
    if "schedule" in config and getattr(model, "num_train_timesteps", None) is not None:
        try:  # time predictors and noisy classifiers carry their schedule: samplers refuse a mismatched one
            model.schedule = VPSchedule.from_dict(config["schedule"])
        except Exception as e:
            raise CheckpointError(f"{directory / 'config.json'}: malformed 'schedule' entry {config['schedule']!r} "
                                  f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return model.to(device).eval()


# Shipped models: ``<dataset>/<name>`` is the folder ``tagdiff/assets/<dataset>/<name>``; a bare dataset name is
# that dataset's ε-model (``digits_flow``: the digits flow-matching velocity model).
SHIPPED_DEFAULTS = {"digits": "unet", "digits_flow": "unet", "toy": "score"}


def _assets_root() -> Path:
    from importlib import resources

    return Path(str(resources.files("tagdiff") / "assets"))


def shipped_models() -> dict[str, Path]:
    """The shipped checkpoints by name (``"digits/unet"``, ``"toy/time_predictor"``, ...), sorted; plus the bare
    dataset names (``"digits"``, ``"toy"``) for the ε-models."""
    root = _assets_root()
    names = {f"{d.name}/{m.name}": m for d in sorted(root.iterdir()) if d.is_dir()
             for m in sorted(d.iterdir()) if (m / "config.json").is_file()}
    for dataset, name in SHIPPED_DEFAULTS.items():
        if f"{dataset}/{name}" in names:
            names[dataset] = names[f"{dataset}/{name}"]
    return dict(sorted(names.items()))


def model_kind(directory: str | Path) -> str:
    """A short description of what the checkpoint folder holds (its model class), e.g. ``"UNet2DModel"``."""
    cfg = Path(directory) / "config.json"
    try:
        config = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return "unreadable"
    return str(config.get("class") or config.get("_class_name") or "unknown")


def resolve_checkpoint(name: str | Path) -> Path:
    """The folder of a checkpoint given as a path or as a shipped name (``tagdiff models`` lists them).

    An existing folder wins over a shipped name of the same spelling.

    Raises:
        CheckpointError: neither an existing folder nor a shipped name (the message lists the shipped names).
    """
    path = Path(name)
    if path.is_dir():
        return path
    shipped = shipped_models()
    key = str(name).strip().strip("/")
    if key in shipped:
        return shipped[key]
    if path.exists():
        raise CheckpointError(f"checkpoint {str(name)!r} is a file, expected a checkpoint folder or a shipped name")
    raise CheckpointError(f"checkpoint folder not found: {name} (not a folder, nor a shipped model name; "
                          f"known names: {', '.join(shipped)})")


# ------------------------------------------------------------------ Hugging Face Hub-style save/load


def resolve_pretrained(name_or_path: str | Path, *, revision: str | None = None,
                       cache_dir: str | Path | None = None) -> Path:
    """The local folder for ``name_or_path``: an existing folder, a shipped name (``"digits/time_predictor"``), or
    else a Hub repository ID (``"user/repo"``) fetched with ``huggingface_hub.snapshot_download`` (served from the
    cache when offline, ``HF_HUB_OFFLINE=1``).

    Raises:
        CheckpointError: not a folder nor a shipped name, and the Hub ID cannot be fetched (offline and not cached,
            no such repository, no network); the message names the ID.
    """
    try:
        return resolve_checkpoint(name_or_path)
    except CheckpointError as local_error:
        name = str(name_or_path)
        if not _HUB_ID.match(name):
            raise
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(repo_id=name, revision=revision, cache_dir=cache_dir))
        except Exception as e:  # offline, missing repo, network: huggingface_hub raises many types
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"{name!r} is neither a local checkpoint folder nor a shipped name, and fetching "
                                  f"it as a Hugging Face Hub ID failed ({type(e).__name__}: {reason})") from local_error


class HubMixin:
    """``save_pretrained(dir)`` / ``from_pretrained(dir_or_hub_id)`` in tagdiff's checkpoint layout.

    A model's recorded ``schedule`` (the diffusion schedule a time predictor or noisy classifier was trained on) is
    written with it and restored on loading, so samplers can refuse a predictor trained for another schedule.
    """

    def save_pretrained(self, save_directory: str | Path, **extra: Any) -> Path:
        """Write ``model.safetensors`` + ``config.json`` into ``save_directory`` (created; files written
        atomically). ``extra`` (JSON-able) is stored in config.json. Returns the folder.

        Raises:
            CheckpointError: the class is not in :data:`MODEL_CLASSES`.
        """
        schedule = getattr(self, "schedule", None)
        if schedule is not None and "schedule" not in extra:
            extra["schedule"] = schedule.to_dict()
        return save_model(self, save_directory, **extra)  # type: ignore[arg-type]

    @classmethod
    def from_pretrained(cls: type[_M], name_or_path: str | Path, *, device: Any = "cpu", revision: str | None = None,
                        cache_dir: str | Path | None = None) -> _M:
        """Load a model saved by :meth:`save_pretrained` (or :func:`~tagdiff.checkpoints.save_model`), in
        ``eval()`` mode on ``device``. ``name_or_path``: a folder, a shipped name, or a Hub ID
        (:func:`resolve_pretrained`; ``revision`` and ``cache_dir`` are for Hub IDs).

        Raises:
            CheckpointError: the folder cannot be found or fetched, is corrupt, or holds a model that is not a
                ``cls`` (e.g. a classifier loaded as a time predictor).
        """
        folder = resolve_pretrained(name_or_path, revision=revision, cache_dir=cache_dir)
        model = load_model(folder, device)
        if not isinstance(model, cls):
            raise CheckpointError(f"{name_or_path}: holds a {type(model).__name__}, not a {cls.__name__}")
        return model
