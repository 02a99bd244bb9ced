"""Torch-Pruning as a peer, at the same FLOPs reduction as apib_fx (bisection on its ratio)."""
from __future__ import annotations

import copy
import time

import torch
from torch import nn

import apib_fx


def tp_magnitude(model: nn.Module, x: torch.Tensor, target: float, tolerance: float = 0.005, tries: int = 14):
    """Torch-Pruning's MagnitudePruner (L1, global) with the pruning ratio bisected until the MACs
    reduction is within ``tolerance`` of ``target``. Returns (model, reduction, seconds of the last
    prune, seconds in total)."""
    import torch_pruning as tp

    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    base = apib_fx.count_flops(model, x)
    lo, hi = 0.0, 0.99
    start = time.perf_counter()
    best = None
    for _ in range(tries):
        ratio = (lo + hi) / 2
        m = copy.deepcopy(model)
        t = time.perf_counter()
        ignored = [dict(m.named_modules())[n] for n, mod in model.named_modules() if mod is classifier]
        pruner = tp.pruner.MagnitudePruner(m, x, importance=tp.importance.MagnitudeImportance(p=1),
                                           global_pruning=True, pruning_ratio=ratio, ignored_layers=ignored)
        pruner.step()
        once = time.perf_counter() - t
        red = 1 - apib_fx.count_flops(m, x) / base
        if best is None or abs(red - target) < abs(best[1] - target):
            best = (m, red, once)
        if abs(red - target) <= tolerance:
            break
        lo, hi = (ratio, hi) if red < target else (lo, ratio)
    return best[0], best[1], best[2], time.perf_counter() - start
