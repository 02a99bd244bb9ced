"""The FLOPs-target search: one global threshold on channel scores, moved until the model's MACs
(from :meth:`ChannelGraph.flops`, never a rebuilt model) meet the target.

For APIB the threshold *is* the global penalty α: channels whose survival α is below it are the
ones the HSIC Lasso drops at that α. Channels are removed in increasing score order (ties broken
by the secondary score, then group and channel index, so results are reproducible); each group keeps
at least ``min_channels`` (the paper's ω) and, with ``round_to``, a multiple of it. Where one
channel is worth more MACs than the tolerance (a small model's first conv), the search skips
such channels and, if it still falls short, makes up one more of them with fine channels given
back, and a small model has every combination of widths tried; a target no choice found lands
within tolerance of is an error naming the nearest reductions, never a model off target.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .graph import ChannelGraph


class UnreachableTarget(ValueError):
    """The FLOPs target cannot be met under the constraints."""


@dataclass
class SearchResult:
    keep: dict[int, Tensor]
    channels: dict[int, int]
    threshold: float  # the global score cut (APIB: α)
    reduction: float  # achieved fraction of MACs removed, by the FLOPs model
    flops_before: int
    flops_after: int
    steps: int
    # Candidates (in the global removal order) this many from the lowest are removed by position
    # alone: only their scores' rank below the rest matters, not their order among themselves.
    decided_from: int = 0


def _rounded(kept: np.ndarray, full: np.ndarray, floor: np.ndarray, round_to: Optional[int]) -> np.ndarray:
    kept = np.maximum(kept, floor)
    if round_to:
        kept = np.minimum(full, np.ceil(kept / round_to) * round_to)
    return kept


def channel_floor(full: np.ndarray, min_channels: int, round_to: Optional[int],
                  least: np.ndarray) -> np.ndarray:
    """The fewest channels each group keeps: ``min_channels``, or the group's own ``least``
    (:attr:`ChannelGroup.min_channels`) where that is more."""
    floor = np.minimum(full, np.maximum(max(1, int(min_channels)), least))
    if round_to:
        floor = np.minimum(full, np.ceil(floor / round_to) * round_to).astype(np.int64)
    return floor


def least_of(graph: ChannelGraph, groups: list[int]) -> np.ndarray:
    """:attr:`ChannelGroup.min_channels` of ``groups``, in that order."""
    return np.array([graph.groups[g].min_channels for g in groups], dtype=np.int64)


def reduction_of_removal(graph: ChannelGraph, removed: dict[int, int], min_channels: int = 1,
                         round_to: Optional[int] = None) -> float:
    """Fraction of MACs removed when group g loses ``removed[g]`` channels, with the floor and
    rounding :func:`search_threshold` applies."""
    groups = sorted(removed)
    full = np.array([graph.groups[g].channels for g in groups], dtype=np.int64)
    floor = channel_floor(full, min_channels, round_to, least_of(graph, groups))
    kept = _rounded(full - np.array([removed[g] for g in groups], dtype=np.int64), full, floor, round_to)
    base = graph.flops()
    return 1.0 - graph.flops(dict(zip(groups, kept.astype(np.int64).tolist()))) / base if base else 0.0


def _give_back(removed: np.ndarray, keys: list[np.ndarray], reduction_of: Callable[[np.ndarray], float],
               flops_target: float, tolerance: float, budget: int = 4096) -> Optional[np.ndarray]:
    """Removal counts within ``tolerance`` of ``flops_target`` near ``removed`` (which falls short
    of it, and whose every group's next channel overshoots), or None. Each try removes the next
    channel in score order (overshooting), then gives back the highest-scored removed channels of
    other groups (skipping groups whose channel would fall short) until the reduction is back in
    tolerance: a small model's fine channels (a Linear's) make up for a coarse one (a first conv's).
    ``keys[g]``: group g's candidates' scores in removal order; ``budget``: the most FLOPs
    evaluations spent (only small models get here: their few channels make it cheap)."""
    nxt = sorted((float(keys[g][n]), g) for g, n in enumerate(removed.tolist()) if n < len(keys[g]))
    # The removed channels, highest score first (so each group's from its last).
    back = sorted(((float(keys[a][i]), a) for a, n in enumerate(removed.tolist()) for i in range(n)), reverse=True)
    for _, b in nxt:
        trial = removed.copy()
        trial[b] += 1
        stuck = np.zeros(len(trial), dtype=bool)
        stuck[b] = True  # (given back, it would undo the try)
        for _, a in back:
            if stuck[a]:
                continue
            if budget <= 0:
                return None
            budget -= 1
            trial[a] -= 1
            red = reduction_of(trial)
            if red < flops_target - tolerance:
                trial[a] += 1
                stuck[a] = True
            elif red <= flops_target + tolerance:
                return trial
    return None


def _every_choice(removable: np.ndarray, keys: list[np.ndarray],
                  reductions_of: Callable[[np.ndarray], np.ndarray], flops_target: float, tolerance: float,
                  limit: int = 1 << 16) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """Every combination of per-group removal counts (0..``removable[g]``), when there are at
    most ``limit`` (a small model): the one within ``tolerance`` of ``flops_target`` with the
    lowest global cut (the highest score it removes), then the closest reduction; and every
    combination's reduction. (None, None) when there are too many, (None, reductions) when none
    lands within tolerance. ``keys[g]``: group g's candidates' scores in removal order."""
    if float(np.prod(removable + 1.0)) > limit:
        return None, None
    axes = [np.arange(r + 1) for r in removable.tolist()]
    counts = np.stack([a.ravel() for a in np.meshgrid(*axes, indexing="ij")], axis=1) if axes else np.zeros((1, 0), int)
    reductions = np.concatenate([reductions_of(counts[i : i + 32768]) for i in range(0, len(counts), 32768)])
    hit = np.abs(reductions - flops_target) <= tolerance
    if not hit.any():
        return None, reductions
    counts, close = counts[hit], np.abs(reductions[hit] - flops_target)
    scores = np.full((len(keys), int(removable.max(initial=0)) + 1), -np.inf)
    for g, k in enumerate(keys):
        scores[g, 1 : len(k) + 1] = k
    cut = scores[np.arange(len(keys))[None, :], counts].max(axis=1)
    return counts[np.lexsort((close, cut))[0]], reductions


def search_threshold(
    graph: ChannelGraph,
    primary: dict[int, Tensor],
    secondary: dict[int, Tensor],
    flops_target: float,
    *,
    min_channels: int = 1,
    tolerance: float = 0.005,
    round_to: Optional[int] = None,
    progress: bool = True,
) -> SearchResult:
    """Remove the lowest-scored channels until ``flops_target`` (fraction of MACs removed) is met."""
    groups = sorted(primary)
    full = np.array([graph.groups[g].channels for g in groups], dtype=np.int64)
    floor = channel_floor(full, min_channels, round_to, least_of(graph, groups))

    # Per group: channels in removal order (lowest first); the top `floor` are never candidates.
    order_in_group: list[np.ndarray] = []
    cand_group, cand_key1, cand_key2, cand_rank = [], [], [], []
    for gi, g in enumerate(groups):
        p = primary[g].double().numpy()
        s = secondary[g].double().numpy()
        idx = np.lexsort((np.arange(len(p)), s, p))  # ascending: p, then s, then index
        order_in_group.append(idx)
        n_cand = int(full[gi] - floor[gi])
        cand = idx[:n_cand]
        cand_group.append(np.full(n_cand, gi))
        cand_key1.append(p[cand])  # per group: its candidates' primary scores, in removal order
        cand_key2.append(s[cand])
        cand_rank.append(np.arange(n_cand))
    if groups:
        cg, k1, k2 = np.concatenate(cand_group), np.concatenate(cand_key1), np.concatenate(cand_key2)
        rank_in_group = np.concatenate(cand_rank)
        global_order = np.lexsort((rank_in_group, cg, k2, k1))
        cg, k1 = cg[global_order], k1[global_order]
    else:
        cg = np.zeros(0, dtype=np.int64)
        k1 = np.zeros(0)
    total = len(cg)

    def kept_of(removed: np.ndarray) -> np.ndarray:
        return _rounded(full - removed, full, floor, round_to).astype(np.int64)

    def removed_after(k: int) -> np.ndarray:
        return np.bincount(cg[:k], minlength=len(groups)) if k else np.zeros(len(groups), np.int64)

    def macs_of(removed: np.ndarray) -> int:
        return graph.flops(dict(zip(groups, kept_of(removed).tolist())))

    def macs(k: int) -> int:
        return macs_of(removed_after(k))

    def reductions_of(counts: np.ndarray) -> np.ndarray:  # (n, groups) removal counts at once
        return 1.0 - graph.flops_batch(kept_of(counts), groups) / base

    base = graph.flops()
    if not 0.0 < flops_target < 1.0:
        raise ValueError(f"flops_target must be a fraction of FLOPs removed in (0, 1), got {flops_target}")
    goal = (1.0 - flops_target) * base
    most = 1.0 - macs(total) / base if base else 0.0
    if most < flops_target - tolerance:
        raise UnreachableTarget(
            f"flops_target={flops_target:.3f} cannot be reached: with min_channels={min_channels}"
            + (f", round_to={round_to}" if round_to else "")
            + f" and {len(graph.groups) - len(groups)} non-prunable groups, the largest reachable "
            f"reduction is {most:.3f}. Lower flops_target or min_channels."
        )
    lo, hi, steps = 0, total, 0  # macs(lo) > goal >= macs(hi) (or hi = total)
    bar = tqdm(total=max(1, int(math.log2(total + 1)) + 1), desc="search", unit="step", disable=not progress)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        steps += 1
        bar.update(1)
        if macs(mid) <= goal:
            hi = mid
        else:
            lo = mid
    bar.close()
    k = hi if macs(lo) > goal else lo
    decided_from = max(k - 1, 0)  # (from here on the choice follows the order)
    removed = removed_after(k)
    reduction = 1.0 - macs_of(removed) / base
    if reduction > flops_target + tolerance and k > 0:
        # One more channel overshoots (a channel worth many MACs): from just below the goal, take
        # the following candidates in order, skipping groups whose next channel overshoots.
        removed = removed_after(k - 1)
        exhausted = np.zeros(len(groups), dtype=bool)
        for j in range(k - 1, total):
            g = cg[j]
            if exhausted[g]:
                continue
            trial = removed.copy()
            trial[g] += 1
            red = 1.0 - macs_of(trial) / base
            if red > flops_target + tolerance:
                exhausted[g] = True
                continue
            removed = trial
            if red >= flops_target:
                break
        below = 1.0 - macs_of(removed) / base
        if below < flops_target - tolerance:
            decided_from = 0  # giving channels back reads the order of all of them
            settled = _give_back(removed, cand_key1, lambda r: 1.0 - macs_of(r) / base, flops_target, tolerance)
            every = None
            if settled is None:  # a small model: its few widths can all be tried
                settled, every = _every_choice(full - floor, cand_key1, reductions_of, flops_target, tolerance)
            if settled is None:
                # Channels too coarse for the tolerance (one channel is worth several percent of
                # the MACs). A model off target must not come back as if it met it.
                if every is not None:  # the true nearest reductions, on either side
                    below = float(every[every < flops_target].max(initial=0.0))
                    reduction = float(every[every > flops_target].min(initial=1.0))
                needed = math.ceil(min(flops_target - below, reduction - flops_target) * 1000 + 1e-6) / 1000
                found = "reachable" if every is not None else "found"
                raise UnreachableTarget(
                    f"flops_target={flops_target:.3f} cannot be met within tolerance={tolerance:g}: the "
                    f"nearest reductions {found} are {below:.3f} and {reduction:.3f} (this model's channels "
                    f"are coarse). Choose one of them as flops_target, or pass tolerance={needed:g}."
                )
            removed = settled
    elif k > 0:
        # Prefer the side of the goal that is closer when both are within tolerance of it.
        below = 1.0 - macs(k - 1) / base
        if abs(below - flops_target) < abs(reduction - flops_target) and abs(below - flops_target) <= tolerance:
            removed = removed_after(k - 1)
    # The global cut: the highest score among the removed channels (each group's last).
    cuts = [cand_key1[gi][n - 1] for gi, n in enumerate(removed.tolist()) if n > 0]
    threshold = float(max(cuts)) if cuts else 0.0
    kept = kept_of(removed)
    keep = {}
    for gi, g in enumerate(groups):
        n_remove = int(full[gi] - kept[gi])
        if n_remove:
            keep[g] = torch.as_tensor(np.sort(order_in_group[gi][n_remove:]), dtype=torch.long)
    after = macs_of(removed)
    return SearchResult(
        keep=keep,
        channels={g: int(n) for g, n in zip(groups, kept)},
        threshold=threshold,
        reduction=1.0 - after / base,
        flops_before=base,
        flops_after=after,
        steps=steps,
        decided_from=decided_from,
    )
