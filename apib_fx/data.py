"""Datasets that need no download: scikit-learn's digits, and loaders for data a user already has
(CIFAR in its python format, ImageNet-style folders)."""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class DataError(ValueError):
    """A data source that cannot be read, with what was expected."""


def digits(split: str = "train", size: int = 16, seed: int = 0, test_fraction: float = 0.25) -> TensorDataset:
    """scikit-learn's handwritten digits (1,797 8x8 images, 10 classes, ships with the package),
    upsampled to ``size``x``size``, one channel, standardised; a fixed stratified-enough split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - 0.3) / 0.35
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    idx = perm[n_test:] if split == "train" else perm[:n_test]
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return TensorDataset(x[idx], y[idx])


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def cifar(path: str | Path, train: bool = True, num_classes: int = 10, limit: Optional[int] = None) -> TensorDataset:
    """CIFAR-10/100 from the standard python-format directory (``cifar-10-batches-py`` with
    ``data_batch_1..5``/``test_batch``, or ``cifar-100-python`` with ``train``/``test``).
    Nothing is downloaded. Returns normalised (N, 3, 32, 32) float images and labels."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"CIFAR directory {str(root)!r} does not exist; expected the extracted python-format folder")
    if num_classes == 10:
        files = [root / f"data_batch_{i}" for i in range(1, 6)] if train else [root / "test_batch"]
        key = b"labels"
    elif num_classes == 100:
        files = [root / ("train" if train else "test")]
        key = b"fine_labels"
    else:
        raise ValueError(f"num_classes must be 10 or 100, got {num_classes}")
    present = [f for f in files if f.exists()]
    if not present:
        raise DataError(
            f"no CIFAR-{num_classes} {'training' if train else 'test'} files in {str(root)!r}; expected "
            + ", ".join(f.name for f in files)
        )
    xs, ys = [], []
    for f in present:
        d = _unpickle(f)
        if b"data" not in d or key not in d:
            raise DataError(f"{f} is not a CIFAR-{num_classes} python batch (missing b'data' or {key!r})")
        xs.append(np.asarray(d[b"data"], dtype=np.uint8))
        ys.append(np.asarray(d[key], dtype=np.int64))
    x = torch.from_numpy(np.concatenate(xs)).reshape(-1, 3, 32, 32).float() / 255.0
    y = torch.from_numpy(np.concatenate(ys))
    if limit is not None:
        x, y = x[:limit], y[:limit]
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return TensorDataset((x - mean) / std, y)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Normalization = tuple[tuple[float, ...], tuple[float, ...]]


def model_normalization(model: Any) -> Normalization:
    """The per-channel (mean, std) a model's inputs are normalised with: a timm model's
    ``pretrained_cfg`` (some use 0.5, CLIP-style models others; a pruned model carries the
    attribute over), else ImageNet's."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("mean") and cfg.get("std"):
        return tuple(map(float, cfg["mean"])), tuple(map(float, cfg["std"]))
    return IMAGENET_MEAN, IMAGENET_STD


def image_folder(path: str | Path, size: int = 224, train: bool = False,
                 normalization: Normalization = (IMAGENET_MEAN, IMAGENET_STD)):
    """An ImageNet-style folder (one sub-folder per class) with the usual transforms, normalised
    with ``normalization`` (mean, std) per channel."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    root = Path(path)
    if not root.is_dir():
        raise DataError(f"image folder {str(root)!r} does not exist; expected one sub-folder of images per class")
    norm = T.Normalize(*normalization)
    if train:
        tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    else:
        tf = T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(), norm])
    try:
        return ImageFolder(str(root), transform=tf)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"cannot read image folder {str(root)!r}: {e}") from None


class CropFlip(Dataset):
    """A TensorDataset's images with CIFAR's training augmentation: a random crop of the image
    zero-padded by ``padding`` pixels on each side, and a horizontal flip half the time (seeded)."""

    def __init__(self, base: TensorDataset, padding: int = 4, seed: int = 0):
        self.x, self.y = base.tensors
        self.padding = padding
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        p = self.padding
        h, w = self.x.shape[-2:]
        img = F.pad(self.x[i], (p, p, p, p))
        dx, dy = torch.randint(0, 2 * p + 1, (2,), generator=self.gen).tolist()
        img = img[..., dy : dy + h, dx : dx + w]
        if torch.rand(1, generator=self.gen).item() < 0.5:
            img = img.flip(-1)
        return img, self.y[i]


def _fit_digits(x: Tensor, input_shape: tuple[int, ...]) -> Tensor:
    """Digits (N, 1, 16, 16) resized and repeated to a model's (C, H, W) input."""
    if len(input_shape) != 3:
        return x
    x = F.interpolate(x, size=tuple(input_shape[1:]), mode="bilinear", align_corners=False)
    return x.expand(-1, input_shape[0], -1, -1).contiguous()


def training_data(spec: str, input_shape: tuple[int, ...], seed: int = 0,
                  normalization: Normalization = (IMAGENET_MEAN, IMAGENET_STD)) -> tuple[Dataset, Dataset]:
    """(training, held-out) labelled datasets for ``--data``: ``digits`` (fitted to the model's
    input), ``cifar10:PATH`` / ``cifar100:PATH`` (random crops and flips for training) or
    ``imagefolder:PATH`` (``PATH/train`` and ``PATH/val``, one sub-folder per class, at the
    model's input size, normalised with ``normalization``)."""
    kind, _, path = spec.partition(":")
    if kind == "digits":
        train, test = digits("train", seed=seed), digits("test", seed=seed)
        return (TensorDataset(_fit_digits(train.tensors[0], input_shape), train.tensors[1]),
                TensorDataset(_fit_digits(test.tensors[0], input_shape), test.tensors[1]))
    if kind in ("cifar10", "cifar100"):
        if not path:
            raise DataError(f"--data {kind} needs a path: {kind}:PATH")
        classes = int(kind[5:])
        return (CropFlip(cifar(path, train=True, num_classes=classes), seed=seed),
                cifar(path, train=False, num_classes=classes))
    if kind == "imagefolder":
        if not path:
            raise DataError("--data imagefolder needs a path: imagefolder:PATH (with train/ and val/ inside)")
        root = Path(path).expanduser()
        missing = [d for d in ("train", "val") if not (root / d).is_dir()]
        if missing:
            raise DataError(f"image folder {str(root)!r} has no {' or '.join(f'{d}/' for d in missing)} sub-folder; "
                            "expected train/ and val/, each with one sub-folder of images per class")
        size = input_shape[-1] if len(input_shape) == 3 else 224
        return (image_folder(root / "train", size=size, train=True, normalization=normalization),
                image_folder(root / "val", size=size, normalization=normalization))
    raise DataError(f"unknown --data {spec!r}; expected digits, imagefolder:PATH, cifar10:PATH or cifar100:PATH")


def calibration_tensor(spec: str, num: int, input_shape: tuple[int, ...], seed: int = 0,
                       normalization: Normalization = (IMAGENET_MEAN, IMAGENET_STD)) -> Optional[Tensor]:
    """Inputs for ``--calib``: ``synthetic`` (None: prune draws them), ``digits``,
    ``imagefolder:PATH`` (``PATH/train`` where there is one: a dataset root's held-out images
    should not choose the channels they later judge; normalised with ``normalization``),
    ``cifar10:PATH``, ``cifar100:PATH`` (their training images)."""
    kind, _, path = spec.partition(":")
    if kind == "synthetic":
        return None
    if kind == "digits":
        return _fit_digits(digits("train", size=16, seed=seed).tensors[0][:num], input_shape)
    if kind in ("cifar10", "cifar100"):
        if not path:
            raise DataError(f"--calib {kind} needs a path: {kind}:PATH")
        return cifar(path, train=True, num_classes=int(kind[5:]), limit=num).tensors[0]
    if kind == "imagefolder":
        if not path:
            raise DataError("--calib imagefolder needs a path: imagefolder:PATH")
        root = Path(path).expanduser()
        root = root / "train" if (root / "train").is_dir() else root
        ds = image_folder(root, size=input_shape[-1] if len(input_shape) == 3 else 224, normalization=normalization)
        n = min(num, len(ds))
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
        return torch.stack([ds[int(i)][0] for i in idx])
    raise DataError(
        f"unknown --calib {spec!r}; expected synthetic, digits, imagefolder:PATH, cifar10:PATH or cifar100:PATH"
    )
