"""The data a command trains or evaluates on, from its ``--dataset`` / ``--data-dir`` / image options."""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch

from ..data import DatasetInfo, dataset_info, load_dataset
from ..data.streaming import STREAMING_DATASETS, open_dataset

__all__ = ["data_options", "held_out_sample", "load_data", "pixels", "train_data"]


def data_options(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {"data_dir": args.data_dir, "image_size": args.image_size, "channels": args.channels}
    if args.dataset == "hf":
        kw.update(image_column=args.image_column, label_column=args.label_column)
    return kw


def load_data(args: argparse.Namespace, split: str, **kw: Any) -> tuple[Any, Any, Any]:
    """``(x, labels, info)`` of ``split`` loaded whole (:func:`tagdiff.data.load_dataset`)."""
    opts = data_options(args)
    if getattr(args, "split_seed", None) is not None and args.dataset != "mnist":
        kw["split_seed"] = args.split_seed
    info = dataset_info(args.dataset, **opts)
    x, y = load_dataset(args.dataset, split, download=args.download, **opts, **kw)
    return x, y, info


def train_data(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """The training split: ``(Dataset, labels (N,), info)`` for mnist / folder / hf, ``(x, labels, info)`` else."""
    if args.dataset not in STREAMING_DATASETS:
        return load_data(args, "train", seed=args.seed)
    kw = data_options(args)
    if getattr(args, "split_seed", None) is not None and args.dataset != "mnist":
        kw["split_seed"] = args.split_seed
    ds = open_dataset(args.dataset, "train", download=args.download, **kw)
    names = getattr(ds, "class_names", None)
    k = getattr(ds, "num_classes", None) or (len(names) if names else 1)
    return ds, ds.labels, DatasetInfo(args.dataset, tuple(ds.sample_shape), k, names)


def pixels(data: Any) -> Any:
    """``data`` as a tensor (a Dataset is decoded whole: only for pixel-dependent condition labels)."""
    if isinstance(data, torch.Tensor):
        return data
    return torch.stack([data[i] for i in range(len(data))])


def held_out_sample(args: argparse.Namespace, split: str, seed: int, num_samples: int) -> Any:
    """``load_data(args, split, seed=seed, num_samples=num_samples)[0]``; for mnist / folder / hf the same images
    (the same seeded subset, equal bit for bit) decoded from the lazy Dataset, only the ``num_samples`` kept."""
    if args.dataset not in STREAMING_DATASETS:
        return load_data(args, split, seed=seed, num_samples=num_samples)[0]
    kw = data_options(args)
    if getattr(args, "split_seed", None) is not None and args.dataset != "mnist":
        kw["split_seed"] = args.split_seed
    ds = open_dataset(args.dataset, split, download=args.download, **kw)
    keep = range(len(ds))
    if num_samples < len(ds):  # the rule of tagdiff.data.load_dataset
        keep = np.sort(np.random.default_rng(seed).choice(len(ds), num_samples, replace=False)).tolist()
    return torch.stack([ds[i] for i in keep])
