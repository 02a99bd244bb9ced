"""``apib_fx.prune``: trace, score, search the FLOPs target, rewrite."""
from __future__ import annotations

import copy
import json
import numbers
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .calib import CalibData, CalibrationError, calibration_batches, forward_inputs
from .flops import count_flops
from .rewrite import apply
from .scoring import METHODS, calibrate_apib, score_data_free, search_apib
from .recalibrate import recalibrate_bn
from .search import UnreachableTarget, search_threshold
from .trace import HEADS, InputShapeError, as_inputs, check_model, eval_mode, gc_paused, trace

KERNELS = ("laplace", "gaussian", "linear")


@dataclass
class GroupRow:
    index: int
    name: str
    channels_before: int
    channels_after: int
    prunable: bool
    reason: Optional[str] = None  # why not prunable
    note: Optional[str] = None  # what the scoring said of it (e.g. nothing to score against)
    unselected: int = 0  # APIB: kept channels no Lasso path selected (kept on relevance alone)
    max_active: int = 0  # APIB: the most channels its Lasso path held at once (on the part walked)
    rank_bound: int = 0  # APIB: bound on its Gram's rank, B(B−1)/2 per kernel batch of B samples (≤ channels)

    @property
    def rank_limited(self) -> bool:
        """APIB: the group's Gram cannot have full rank (``rank_bound`` < its channels): its path
        holds at most that many channels at once, and the calibration samples cannot tell the
        rest apart. More samples per kernel batch raise the bound (it grows as B²)."""
        return 0 < self.rank_bound < self.channels_before


@dataclass
class PruneReport:
    """What :func:`prune` did. FLOPs are MACs at one sample of the example input shape."""

    method: str
    flops_target: float  # asked: fraction of MACs removed
    flops_reduction: float  # achieved, counted on the returned model
    flops_before: int
    flops_after: int
    params_before: int
    params_after: int
    alpha: float  # the global threshold on scores (APIB: the HSIC Lasso penalty)
    num_calib: int
    input_shape: tuple[int, ...]  # one sample of the (first) input, batch dimension left out
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase
    bn_recalibrated: int = 0  # BatchNorm layers whose statistics were re-estimated on calib_data
    groups: list[GroupRow] = field(default_factory=list)
    input_shapes: tuple[tuple[int, ...], ...] = ()  # one sample of every input, in forward's order
    heads: str = "dims"  # what attention lost: head dims ("dims") or whole heads ("whole")
    # Branches on input shapes the model was traced through, as the sample took them (the pruned
    # model checks them): ChannelGraph.specialized.
    specialized: list[str] = field(default_factory=list)

    def table(self, only_pruned: bool = False) -> str:
        """Per-group channels kept, as a Markdown table."""
        rows = ["| group | layer | channels | kept | note |", "|---:|---|---:|---:|---|"]
        for g in self.groups:
            if only_pruned and g.channels_after == g.channels_before:
                continue
            note = (g.note or "") if g.prunable else f"fixed: {g.reason}"
            if g.unselected:
                why = (f"its Gram's rank is at most {g.rank_bound}, below its {g.channels_before} channels: "
                       "more samples per batch raise it" if g.rank_limited else "no Lasso path selected them")
                also = f"{g.unselected} kept on relevance alone ({why})"
                note = f"{note}; {also}" if note else also
            rows.append(f"| {g.index} | {g.name} | {g.channels_before} | {g.channels_after} | {note} |")
        return "\n".join(rows)

    def summary(self) -> str:
        t = ", ".join(f"{k} {v:.2f}s" for k, v in self.timings.items())
        return (
            f"{self.method}: MACs {self.flops_before:,} -> {self.flops_after:,} "
            f"({self.flops_reduction:.1%} removed, target {self.flops_target:.1%}); params "
            f"{self.params_before:,} -> {self.params_after:,}; alpha={self.alpha:.4g}; "
            + (f"BatchNorm re-estimated in {self.bn_recalibrated} layers; " if self.bn_recalibrated else "")
            + (f"{self.unselected} kept channels selected by no Lasso path"
               + (f" ({self.rank_limited_unselected} in groups whose Gram's rank is below their width)"
                  if self.rank_limited_unselected else "") + "; " if self.unselected else "")
            + t
        )

    @property
    def unselected(self) -> int:
        """APIB: kept channels that no HSIC Lasso path selected above α (kept on relevance alone)."""
        return sum(g.unselected for g in self.groups)

    @property
    def rank_limited_unselected(self) -> int:
        """APIB: those of :attr:`unselected` in groups whose Gram's rank is below their width
        (:attr:`GroupRow.rank_limited`): more calibration samples per batch may let the paths
        tell them apart."""
        return sum(g.unselected for g in self.groups if g.rank_limited)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _unselected(graph, keep: dict, primary: dict) -> dict[int, int]:
    """Per scored group, the kept channels whose APIB score is 0: no Lasso path selected them
    above the global α, so the search kept them in order of relevance alone. Either the target
    keeps more channels than the non-negative Lasso finds informative at any α (a channel whose
    kernel the selected ones already explain never enters), or the Gram's rank caps the path: at
    any α it holds at most rank-many channels, B(B−1)/2 per kernel batch of B samples and per
    tensor reading the group (:attr:`GroupRow.rank_limited`; more samples per batch lift that cap)."""
    out = {}
    for g in graph.prunable_groups:
        score = primary[g.index]
        if bool(torch.isinf(score).all()):  # (nothing to score against: kept whole)
            continue
        kept = keep.get(g.index)
        n = int((score if kept is None else score[torch.as_tensor(kept, dtype=torch.long)]).eq(0).sum())
        if n:
            out[g.index] = n
    return out


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _run_device(device: Union[str, torch.device, None], model_device: torch.device) -> torch.device:
    """Where calibration runs: ``device`` checked up front (before any work), else the model's."""
    if device is None:
        return model_device
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must name a torch device such as 'cpu', 'cuda' or 'cuda:1', got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} but no CUDA device is available here: "
                             "use device='cpu', or leave it None to calibrate where the model is")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={str(device)!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def prune(
    model: nn.Module,
    flops_target: float = 0.48,
    calib_data: CalibData = None,
    *,
    example_inputs: Optional[Tensor] = None,
    method: str = "apib",
    kernel: str = "laplace",
    min_channels: int = 1,
    tolerance: float = 0.005,
    num_calib: int = 128,
    batch_size: int = 64,
    round_to: Optional[int] = None,
    device: Union[str, torch.device, None] = None,
    leaf_modules: Sequence[type] = (),
    heads: str = "dims",
    progress: bool = True,
    seed: int = 0,
    recalibrate: bool = True,
    workers: Optional[int] = None,
) -> nn.Module:
    """Remove ``flops_target`` of the model's FLOPs (MACs) by structured channel pruning.

    ``flops_target``: fraction of FLOPs removed (the papers' "FLOPs ↓"): 0.48 leaves 52%.
    ``calib_data``: DataLoader / iterable of batches / tensor; ``num_calib`` samples are used, in
    kernel batches of ``batch_size``. None: synthetic inputs shaped like ``example_inputs``.
    ``method``: "apib" (default), "l1", "fpgm", "random". ``kernel``: "laplace", "gaussian",
    "linear". ``min_channels``: fewest channels any group keeps (ω). ``round_to``: kept widths are
    multiples of it (or whole; 8 or 16 suit GPUs). ``device``: where calibration runs (default: the
    model's device); the returned model is on the input model's device.
    ``recalibrate``: when ``calib_data`` is given, re-estimate the pruned model's BatchNorm
    statistics on it (:func:`apib_fx.recalibrate_bn`); no effect on synthetic data.
    ``heads``: what attention loses, ``"dims"`` (the same head dims in every head) or ``"whole"``
    (whole heads: q, k and v of a head and its share of the output projection); any split of
    channels over two axes follows it (:func:`apib_fx.trace`).
    ``workers``: processes that solve APIB's Lasso paths (default: the CPU cores available, at
    most 8; 1 solves them in this process). Results do not depend on it.

    On Linux with glibc, CPU calibration forwards (and the BatchNorm re-estimation) run with
    freed memory kept for reuse instead of being faulted in anew per batch (process-wide while
    they run; ``APIB_FX_KEEP_FREED_MEMORY=0`` turns it off). Python's cyclic garbage collector
    is paused for the call.

    Returns a new ``torch.fx.GraphModule``; ``model`` is untouched. ``result.apib_report`` is a
    :class:`PruneReport`.
    """
    t_start = time.perf_counter()
    check_model(model)
    if isinstance(flops_target, bool) or not isinstance(flops_target, numbers.Real):
        raise TypeError(
            f"flops_target must be a number (the fraction of FLOPs to remove, e.g. 0.48), got "
            f"{type(flops_target).__name__}"
        )
    if not 0.0 < float(flops_target) < 1.0:
        raise ValueError(
            f"flops_target is the fraction of FLOPs to remove and must lie in (0, 1), got {flops_target!r}"
            " (e.g. 0.48 removes 48%)"
        )
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {', '.join(KERNELS)}")
    if not isinstance(min_channels, int) or min_channels < 1:
        raise ValueError(f"min_channels must be a positive integer, got {min_channels!r}")
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"round_to must be a positive integer or None, got {round_to!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive integer or None, got {workers!r}")
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be in (0, 1), got {tolerance!r}")
    if heads not in HEADS:
        raise ValueError(f"heads must be one of {HEADS}, got {heads!r}")

    model_device = _model_device(model)
    run_device = _run_device(device, model_device)
    if example_inputs is not None:
        example_inputs = as_inputs(example_inputs)
    needs_data = method == "apib"
    recalibrating = recalibrate and calib_data is not None
    batches = calibration_batches(
        calib_data if needs_data or calib_data is not None else None,
        num_calib if needs_data or recalibrating else 2,
        batch_size,
        example_inputs,
        seed,
        scoring=needs_data,  # (a data-free method only traces on them: nothing to warn about)
        names=forward_inputs(model),
    ) if (needs_data or calib_data is not None or example_inputs is not None) else None
    if batches is None:
        raise CalibrationError(
            "the model's input shape is unknown: pass example_inputs (e.g. torch.randn(1, 3, 224, 224)) "
            "or calib_data"
        )
    sample = tuple(t[:1].to(model_device) for t in batches[0])
    if example_inputs is not None:
        for k, (t, s) in enumerate(zip(example_inputs, sample)):
            if tuple(t.shape[1:]) != tuple(s.shape[1:]):
                which = "" if len(sample) == 1 else f" (input {k})"
                raise CalibrationError(
                    f"calibration samples{which} have shape {tuple(s.shape[1:])} but example_inputs has "
                    f"{tuple(t.shape[1:])}"
                )

    # The trace, its labels and the rewrite create tens of thousands of objects that live for the
    # whole call: Python would answer with full collections over every object in the process
    # (~0.15 s each with torch loaded). The few cycles made here are collected afterwards.
    with gc_paused():
        timings: dict[str, float] = {}
        t = time.perf_counter()
        try:
            graph = trace(model, sample, leaf_modules=leaf_modules, heads=heads)
        except InputShapeError as e:
            shapes = ", ".join(str(tuple(t.shape[1:])) for t in sample)
            raise CalibrationError(f"calibration samples of shape {shapes} do not fit the model: {e}") from e
        timings["trace"] = time.perf_counter() - t

        if method == "apib":
            module = graph.module
            if run_device != model_device:
                module = copy.deepcopy(module).to(run_device)
            with eval_mode(module):
                calibrated = calibrate_apib(graph, module, [tuple(t.to(run_device) for t in b) for b in batches],
                                            kernel, progress)
            # The Lasso paths and the FLOPs search go together: paths only as deep as the target needs.
            result, scores = search_apib(graph, calibrated, float(flops_target), min_channels=min_channels,
                                         tolerance=tolerance, round_to=round_to, workers=workers, progress=progress)
            timings.update(scores.timings)
            unselected = _unselected(graph, result.keep, scores.primary)
        else:
            unselected = {}
            scores = score_data_free(graph, model, method, seed)
            timings.update(scores.timings)
            t = time.perf_counter()
            result = search_threshold(
                graph, scores.primary, scores.secondary, float(flops_target),
                min_channels=min_channels, tolerance=tolerance, round_to=round_to, progress=progress,
            )
            timings["search"] = time.perf_counter() - t

        t = time.perf_counter()
        pruned = apply(model, graph, result.keep)
        timings["rewrite"] = time.perf_counter() - t
        recalibrated = 0
        if recalibrating:
            t = time.perf_counter()
            recalibrated = recalibrate_bn(pruned, batches)
            timings["recalibrate"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start

    before = result.flops_before
    after = count_flops(pruned, sample)
    report = PruneReport(
        method=method,
        flops_target=float(flops_target),
        flops_reduction=1.0 - after / before,
        flops_before=before,
        flops_after=after,
        params_before=_n_params(model),
        params_after=_n_params(pruned),
        alpha=result.threshold,
        num_calib=sum(b[0].shape[0] for b in batches) if method == "apib" else 0,
        input_shape=tuple(sample[0].shape[1:]),
        input_shapes=tuple(tuple(t.shape[1:]) for t in sample),
        heads=heads,
        specialized=list(graph.specialized),
        timings=timings,
        bn_recalibrated=recalibrated,
        groups=[
            GroupRow(g.index, g.name, g.channels, result.channels.get(g.index, g.channels), g.prunable, g.reason,
                     scores.notes.get(g.index), unselected.get(g.index, 0), scores.max_active.get(g.index, 0),
                     scores.rank_bound.get(g.index, 0))  # (the last three: APIB only, empty otherwise)
            for g in graph.groups
        ],
    )
    limited = [g for g in report.groups if g.unselected and g.rank_limited]
    if limited:
        # Unlike channels the Lasso finds uninformative at any α, these are scored by too few samples.
        warnings.warn(
            f"{len(limited)} group(s) have more channels than their Gram's rank can be (at most B(B-1)/2 "
            f"per kernel batch of B samples; batches of {max(b[0].shape[0] for b in batches)} here), and "
            f"{report.rank_limited_unselected} of their kept channels were kept on relevance alone, selected "
            "by no Lasso path. A larger batch_size (the bound grows with its square) or num_calib lets the "
            "paths tell them apart; report.table() names the groups", UserWarning, stacklevel=2)
    pruned.apib_report = report
    return pruned


__all__ = ["prune", "PruneReport", "UnreachableTarget", "CalibrationError"]
