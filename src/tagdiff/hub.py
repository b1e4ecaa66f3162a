"""Hugging Face Hub-style ``save_pretrained`` / ``from_pretrained`` for tagdiff's own models.

tagdiff models (time predictors, classifiers) mix in :class:`HubMixin`. The folder it writes is tagdiff's checkpoint
layout (:func:`tagdiff.checkpoints.save_model`): ``model.safetensors`` plus ``config.json`` holding
``{"class", "config", "schedule", ...}``. huggingface_hub's ``PyTorchModelHubMixin`` writes a flat ``config.json`` of
constructor arguments instead, which :func:`~tagdiff.checkpoints.load_model` (and the shipped checkpoints) could not
read, so the two methods are written on top of ``save_model`` / ``load_model``. Such a folder can be uploaded as is
(``huggingface_hub.upload_folder``) and shared next to the diffusion model it was trained for.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["HubMixin", "resolve_pretrained"]

_M = TypeVar("_M", bound="HubMixin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def resolve_pretrained(name_or_path: str | Path, *, revision: str | None = None,
                       cache_dir: str | Path | None = None) -> Path:
    """The local folder for ``name_or_path``: an existing folder, a shipped name (``"digits/time_predictor"``), or
    else a Hub repository ID (``"user/repo"``) fetched with ``huggingface_hub.snapshot_download`` (served from the
    cache when offline, ``HF_HUB_OFFLINE=1``).

    Raises:
        CheckpointError: not a folder nor a shipped name, and the Hub ID cannot be fetched (offline and not cached,
            no such repository, no network); the message names the ID.
    """
    from .checkpoints import CheckpointError, resolve_checkpoint

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
            CheckpointError: the class is not in :data:`tagdiff.checkpoints.MODEL_CLASSES`.
        """
        from .checkpoints import save_model

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
        from .checkpoints import CheckpointError, load_model

        folder = resolve_pretrained(name_or_path, revision=revision, cache_dir=cache_dir)
        model = load_model(folder, device)
        if not isinstance(model, cls):
            raise CheckpointError(f"{name_or_path}: holds a {type(model).__name__}, not a {cls.__name__}")
        return model
