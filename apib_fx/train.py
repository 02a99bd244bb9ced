"""Minimal training and evaluation loops for fine-tuning pruned models (SGD + cosine schedule)."""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def evaluate(model: nn.Module, loader: Iterable, device: Optional[torch.device] = None, progress: bool = False,
             desc: str = "evaluate") -> float:
    """Top-1 accuracy (fraction) of ``model`` on ``loader``, in eval mode; the mode is restored.
    ``progress``: a tqdm bar over the batches (an ImageNet validation pass takes minutes)."""
    device = device or _device_of(model)
    was = model.training
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
            pred = model(x.to(device)).argmax(1)
            correct += int((pred == y.to(device)).sum())
            total += len(y)
    model.train(was)
    return correct / max(1, total)


def fit(
    model: nn.Module,
    loader: Iterable,
    epochs: int,
    lr: float = 0.05,
    weight_decay: float = 5e-4,
    momentum: float = 0.9,
    progress: bool = True,
    desc: str = "train",
) -> nn.Module:
    """Train ``model`` in place with SGD, cosine learning rate, cross-entropy; returns it."""
    device = _device_of(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)
    steps = max(1, epochs * len(loader))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    bar = tqdm(total=steps, desc=desc, unit="step", disable=not progress)
    for _ in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    return model
