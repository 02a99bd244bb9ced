"""Minimal training and evaluation loops for fine-tuning pruned models (SGD + cosine schedule)."""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
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


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float = 4.0) -> Tensor:
    """Hinton et al.'s knowledge-distillation term: T² · KL(softmax(teacher/T) ‖ softmax(student/T)),
    averaged over the batch (T² keeps its gradients on the scale of cross-entropy's)."""
    return F.kl_div(F.log_softmax(student / temperature, dim=1), F.log_softmax(teacher / temperature, dim=1),
                    reduction="batchmean", log_target=True) * temperature**2


def fit(
    model: nn.Module,
    loader: Iterable,
    epochs: int,
    lr: float = 0.05,
    weight_decay: float = 5e-4,
    momentum: float = 0.9,
    progress: bool = True,
    desc: str = "train",
    teacher: Optional[nn.Module] = None,
    distill: float = 0.5,
    temperature: float = 4.0,
) -> nn.Module:
    """Train ``model`` in place with SGD, cosine learning rate, cross-entropy; returns it.

    With a ``teacher`` (e.g. the unpruned model, on the same device; left in eval mode and never
    updated) the loss is (1 − ``distill``) · cross-entropy + ``distill`` ·
    :func:`distillation_loss` at ``temperature``: the pruned model learns the teacher's outputs,
    the usual way to recover accuracy after pruning."""
    if not 0.0 <= distill <= 1.0:
        raise ValueError(f"distill is the weight of the distillation term, in [0, 1]; got {distill}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    device = _device_of(model)
    if teacher is not None:
        teacher_was = teacher.training
        teacher.eval()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)
    steps = max(1, epochs * len(loader))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    bar = tqdm(total=steps, desc=desc, unit="step", disable=not progress)
    for _ in range(epochs):
        for x, y in loader:
            x = x.to(device)
            out = model(x)
            loss = F.cross_entropy(out, y.to(device))
            if teacher is not None:
                with torch.no_grad():
                    target = teacher(x)
                loss = (1.0 - distill) * loss + distill * distillation_loss(out, target, temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    if teacher is not None:
        teacher.train(teacher_was)
    return model
