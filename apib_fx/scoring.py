"""The score pass: an importance per channel of every prunable group (higher = keep).

``apib`` (data-driven): for each group, the calibration activations at each of its consumers
(a conv or linear that reads the channels through its weights, or a contraction of them such as
q in attention's q kᵀ, scored against the attention output) give one centred, unit-Frobenius
kernel per channel and one for the consumer's output; the HSIC Lasso over them is solved along its
whole regularisation path, and a channel's score is its *survival* α: the largest global penalty at
which it is still selected. Pruning every channel whose survival is below α is exactly APIB with
one global α, so the search can move α continuously until the FLOPs target is met. Ties (channels
that never enter) are broken by relevance HSIC(K_c, L).

``l1``, ``fpgm``, ``random`` (data-free baselines): filter L1 norm, distance to the other filters
(geometric-median criterion), uniform noise. Each group's scores are divided by their mean so one
global threshold compares groups of different sizes and scales.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import numpy as np

import torch
from torch import Tensor, fx, nn
from tqdm.auto import tqdm

from ._fork import ForkRounds, fork_map
from ._malloc import keep_freed_memory
from .calib import CalibrationError
from .graph import ChannelGraph
from .inplace import inplace_arithmetic
from .labels import NONE, axis_ids, changing_axes, compress, is_labels
from .rules import rule_for, weight_param
from .search import (SearchResult, UnreachableTarget, channel_floor, least_of, reduction_of_removal,
                     search_threshold)

if TYPE_CHECKING:
    from .hsic import HSICStats

METHODS = ("apib", "l1", "fpgm", "random")


@dataclass
class Scores:
    """Per prunable group: ``primary`` (C,) and a ``secondary`` tie-break (C,), both higher = keep."""

    primary: dict[int, Tensor]
    secondary: dict[int, Tensor]
    timings: dict[str, float] = field(default_factory=dict)
    notes: dict[int, str] = field(default_factory=dict)
    # APIB: per scored group, the most channels its Lasso path held at once (on the part walked),
    # and the bound on its Gram's rank, B(B−1)/2 per kernel batch of B samples (see APIBProblems).
    max_active: dict[int, int] = field(default_factory=dict)
    rank_bound: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Consumer:
    """A layer that reads a group's channels through its weights: where APIB looks."""

    node: str
    group: int
    slot: int  # which consumer of the group (their statistics are summed)
    axis: int  # channel axis of the layer's input
    source: str  # the input's node (a layer's first argument; an einsum's operand)
    positions: Tensor  # input positions of the group, ordered by channel then position
    per_channel: int

    @cached_property  # asked once per calibration batch
    def start(self) -> Optional[int]:
        """First position when ``positions`` is one ascending run (the usual case): then the
        features are a view of the input, not a gathered copy."""
        p = self.positions
        first = int(p[0])
        return first if torch.equal(p, torch.arange(first, first + p.numel())) else None


def _channel_axes(graph: ChannelGraph, labels: Tensor) -> list[int]:
    """Axes of ``labels`` along which the channels change: ids tied into one channel (a head's
    dims, when whole heads are the channels) do not count."""
    small = compress(labels)
    on = small != NONE
    channel = torch.full_like(small, NONE)
    channel[on] = graph.id_group[small[on]] * graph.id_group.numel() + graph.id_class[small[on]]
    return changing_axes(channel)


def find_consumers(graph: ChannelGraph) -> dict[str, list[Consumer]]:
    """Consumers of each prunable group, keyed by fx node name: layers that read the group's
    channels through their weights, and contractions of them (q in q kᵀ), whose output the
    channels are scored against."""
    in_params = {
        (m.param, g.index) for g in graph.prunable_groups for m in g.members if m.role == "in"
    }
    in_params |= {(p.rpartition(".")[0], g) for p, g in in_params}  # (and the modules that own them)
    prunable = {g.index for g in graph.prunable_groups}
    by_node: dict[str, list[Consumer]] = {}
    slots: dict[int, int] = {}
    for node in graph.module.graph.nodes:
        if node.op == "call_module":
            rule = rule_for(node, graph.module.get_submodule(node.target))
            weight = node.target  # (any of its own weights: a recurrent layer's weight_ih_l0)
        elif node.op in ("call_function", "call_method"):
            rule = rule_for(node)
            weight = weight_param(node)  # None: a contraction of two activations
        else:
            continue
        if rule is None or not node.args:
            continue
        candidates = rule.inputs(node) if rule.inputs is not None else [(node.args[0], rule.input_axis)]
        source, axis, labels = None, None, None
        for operand, operand_axis in candidates:
            if operand_axis is None or not isinstance(operand, fx.Node):
                continue
            labels = graph.node_labels.get(operand.name)
            if not is_labels(labels):
                continue
            axis_of = operand_axis % labels.dim()
            if (rule.inputs is not None or labels.shape[axis_of] > 1) and axis_of not in _channel_axes(graph, labels):
                # An operand's labels along its contracted axis belong to another axis (a GC
                # block's attention map; whole heads, whose channels lie on a batch axis).
                continue
            if bool((axis_ids(labels, operand_axis) != NONE).any()):
                source, axis = operand, operand_axis
                break
        if source is None:
            continue
        ids = axis_ids(labels, axis)
        on = ids != NONE
        groups = torch.full_like(ids, NONE)
        groups[on] = graph.id_group[ids[on]]
        for g in groups[on].unique().tolist():
            if g not in prunable or (weight is not None and (weight, g) not in in_params):
                continue  # e.g. a depthwise conv: it carries channels, it does not mix them
            pos = torch.nonzero(groups == g).flatten()
            cls = graph.id_class[ids[pos]]
            order = torch.argsort(cls * (ids.numel() + 1) + pos)
            slot = slots.get(g, 0)
            slots[g] = slot + 1
            by_node.setdefault(node.name, []).append(
                Consumer(node.name, g, slot, axis, source.name, pos[order],
                         pos.numel() // graph.groups[g].channels)
            )
    return by_node


class ConsumerCapture(fx.Interpreter):
    """Runs calibration batches and feeds each consumer's (input channels, output) to the group's
    HSIC statistics. Feature maps are dropped as soon as the graph no longer needs them."""

    def __init__(self, module: fx.GraphModule, consumers: dict[str, list[Consumer]],
                 stats: dict[int, HSICStats]):
        super().__init__(module, garbage_collect_values=True)
        self.consumers = consumers
        self.stats = stats
        self.kernel_seconds = 0.0
        # Layers reading the same channels of the same tensor (a block's first conv and its
        # downsample shortcut) see identical channel kernels: compute them once per batch.
        nodes = {n.name: n for n in module.graph.nodes}
        self._nodes = nodes
        self._keys = {name: [self._key(nodes[name], c) for c in todo] for name, todo in consumers.items()}
        self._uses: dict[tuple, int] = {}
        for keys in self._keys.values():
            for key in keys:
                self._uses[key] = self._uses.get(key, 0) + 1
        self._shared: dict[tuple, tuple[Tensor, Tensor]] = {}
        self._left: dict[tuple, int] = {}
        # Per group: Σ B(B−1)/2 over the distinct kernel batches its Gram sums (a batch that
        # layers reading the same tensor share counts once: it adds no rank).
        self.pairs: dict[int, int] = {}

    @staticmethod
    def _key(n: fx.Node, c: Consumer) -> tuple:
        where = c.start if c.start is not None else tuple(c.positions.tolist())
        return (c.source, c.group, c.axis, where, c.positions.numel(), c.per_channel)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        self._shared.clear()
        self._left = dict(self._uses)
        try:
            return super().run(*args, **kwargs)
        finally:
            self._shared.clear()

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        todo = self.consumers.get(n.name)
        if todo:
            start = time.perf_counter()
            x = self.env[self._nodes[todo[0].source]]  # (one input per node: its first, or an einsum's operand)
            b = x.shape[0]
            y = (out[0] if isinstance(out, tuple) else out).reshape(b, -1).float()  # (a recurrent layer: its sequence)
            # A layer reading several groups (a conv after a concat) regresses each on the same
            # output: its kernel is computed once.
            output = self.stats[todo[0].group].output_terms(y) if len(todo) > 1 else None
            for c, key in zip(todo, self._keys[n.name]):
                moved = x.movedim(c.axis, 1)
                first = c.start
                feats = (moved.narrow(1, first, c.positions.numel()) if first is not None
                         else moved.index_select(1, c.positions.to(x.device)))
                channels = c.positions.numel() // c.per_channel
                feats = feats.reshape(b, channels, -1).float()
                if feats.stride(-1) != 1:
                    # Channels on a channels-last axis (the Linear layers of a ConvNeXt block, a
                    # ViT): the kernels need each channel's values contiguous per sample. One
                    # transpose per sample here is 2-3x faster than reordering them later.
                    feats = feats.contiguous()
                terms = None
                fresh = True
                if self._uses[key] > 1:
                    terms = self._shared.get(key)
                    if terms is None:
                        terms = self._shared[key] = self.stats[c.group].channel_terms(feats)
                    else:
                        fresh = False
                    self._left[key] -= 1
                    if self._left[key] == 0:
                        del self._shared[key]
                if fresh:
                    self.pairs[c.group] = self.pairs.get(c.group, 0) + b * (b - 1) // 2
                self.stats[c.group].add(feats, y, consumer=c.slot, terms=terms, output=output)
            self.kernel_seconds += time.perf_counter() - start
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Total path cost (sum of width^1.75) below which the paths run in this process: ~0.1 s of
# work (ResNet-50's 2048-channel path, 623k, takes ~0.45 s), about what forking a large process costs.
_FORK_WORTH = 150_000.0


@dataclass
class APIBProblems:
    """What the calibration pass leaves for the Lasso: per scored group its Gram form (G, b), and
    :class:`Scores` already holding the groups nothing reads (kept whole), every group's
    relevance tie-break, the calibration timings and each group's ``rank_bound``: G is a sum of
    products of centred kernels, each in a space of dimension B(B−1)/2 (symmetric B × B with
    zero row sums), so its rank is at most that summed over the distinct kernel batches (or C)."""

    problems: dict[int, tuple[Tensor, Tensor]]
    scores: Scores

    def cost(self) -> dict[int, float]:
        # A path's time grows about as width^1.75 (ResNet-50's: 0.45 s at 2048 channels,
        # 0.17 s at 1024, 0.03 s at 512).
        return {g: float(G.shape[0]) ** 1.75 for g, (G, _) in self.problems.items()}

    def workers(self, workers: Optional[int]) -> Optional[int]:
        """Processes for the paths: ``workers``, or 1 where they are a few milliseconds of work
        (forking would cost more than it saves), or None (the default)."""
        if workers is None and sum(self.cost().values()) < _FORK_WORTH:
            return 1
        return workers


def calibrate_apib(
    graph: ChannelGraph,
    module: fx.GraphModule,
    batches: Sequence[Union[Tensor, tuple[Tensor, ...]]],
    kernel: str = "laplace",
    progress: bool = True,
) -> APIBProblems:
    """The HSIC Lasso problem of every prunable group, from calibration ``batches`` (one tensor
    per model input) run through ``module`` (the traced graph, on the device the batches are on)."""
    from .hsic import HSICStats

    consumers = find_consumers(graph)
    stats = {g.index: HSICStats(g.channels, kernel=kernel) for g in graph.prunable_groups}
    # Residual adds into their operand, as the user's own model does (no gradients here).
    capture = ConsumerCapture(inplace_arithmetic(module)[0], consumers, stats)
    batches = [b if isinstance(b, tuple) else (b,) for b in batches]  # (a model of one input: tensors)
    device = batches[0][0].device
    start = time.perf_counter()
    # Feature maps reuse freed heap memory instead of being faulted in anew (glibc; see _malloc).
    with torch.no_grad(), keep_freed_memory(device.type == "cpu"):
        for inputs in tqdm(batches, desc="apib: calibration", unit="batch", disable=not progress):
            capture.run(*inputs)
    _sync(device)
    total = time.perf_counter() - start
    timings = {"forward": total - capture.kernel_seconds, "kernels": capture.kernel_seconds}

    primary, secondary, notes = {}, {}, {}
    rank_bound = {g: min(graph.groups[g].channels, n) for g, n in capture.pairs.items()}
    scored = {c.group for cs in consumers.values() for c in cs}
    problems = {}
    for g in graph.prunable_groups:
        if g.index in scored:
            problems[g.index] = stats[g.index].gram()
            if not all(bool(torch.isfinite(t).all()) for t in problems[g.index]):
                raise CalibrationError(
                    f"the calibration forward gave NaN or infinite activations around group {g.index} "
                    f"('{g.name}'): the inputs are finite, so a layer overflowed. Check that the data is "
                    "scaled as in training; a float16 model may overflow where a float32 copy would not"
                )
            secondary[g.index] = problems[g.index][1].double().cpu()
        else:
            # Nothing mixes these channels (no layer, no contraction reads them): keep them unless forced.
            primary[g.index] = torch.full((g.channels,), float("inf"), dtype=torch.float64)
            secondary[g.index] = torch.zeros(g.channels, dtype=torch.float64)
            notes[g.index] = "kept whole: no layer or contraction reads these channels (APIB has no output to score them against)"
    return APIBProblems(problems, Scores(primary, secondary, timings, notes, rank_bound=rank_bound))


def _ordered(graph: ChannelGraph, primary: dict[int, Tensor]) -> dict[int, Tensor]:
    return {g.index: primary[g.index] for g in graph.prunable_groups}  # group order


def score_apib(
    graph: ChannelGraph,
    module: fx.GraphModule,
    batches: Sequence[Union[Tensor, tuple[Tensor, ...]]],
    kernel: str = "laplace",
    progress: bool = True,
    workers: Optional[int] = None,
) -> Scores:
    """APIB survival-α scores from calibration ``batches`` (see :func:`calibrate_apib`), every
    path walked to its end. ``workers``: processes for the Lasso paths (default: the CPU cores
    available, at most 8). :func:`search_apib` walks them only as far as a FLOPs target needs."""
    calibrated = calibrate_apib(graph, module, batches, kernel, progress)
    scores, problems = calibrated.scores, calibrated.problems
    start = time.perf_counter()
    with tqdm(total=len(problems), desc="apib: lasso paths", unit="group", disable=not progress) as bar:
        # Independent per group and bound by Python: spread over processes.
        walked = fork_map(_survival, problems, calibrated.cost(), calibrated.workers(workers),
                          done=lambda _: bar.update())
    scores.primary.update((g, torch.from_numpy(s)) for g, (s, _) in walked.items())
    scores.max_active = {g: peak for g, (_, peak) in walked.items()}
    scores.primary = _ordered(graph, scores.primary)
    scores.timings["lasso"] = time.perf_counter() - start
    return scores


def _survival(problem: tuple[Tensor, Tensor]) -> tuple[np.ndarray, int]:
    """A group's APIB scores (numpy, so a forked worker never builds torch objects to send) and
    the most channels its path held at once."""
    path = _walk_path(problem)
    return path.descend(-math.inf), path.max_active


def _walk_path(problem: tuple[Tensor, Tensor]):
    from .hsic import SurvivalPath

    return SurvivalPath(*problem, record=False)  # (the survival is all the search needs)


def _descend(path, level: float) -> tuple[np.ndarray, bool, int]:
    """(survival so far, whether the path is complete, most channels active at once so far):
    what a worker sends back each level."""
    return path.descend(level), path.finished, path.max_active


# Each level is the last times 1/√2: a few cheap rounds at high α, and no path walked much below
# the α the target needs (halving walked VGG-16's 4096-wide paths ~1.3x further than needed).
_LEVEL_STEP = math.sqrt(0.5)


def search_apib(
    graph: ChannelGraph,
    calibrated: APIBProblems,
    flops_target: float,
    *,
    min_channels: int = 1,
    tolerance: float = 0.005,
    round_to: Optional[int] = None,
    workers: Optional[int] = None,
    progress: bool = True,
) -> tuple[SearchResult, Scores]:
    """:func:`search_threshold` on APIB scores, walking the Lasso paths only as deep as it needs.

    All paths descend together, level by level (α × 1/√2 each time). At a level, a channel's
    survival is known if it entered above it; the others are scored 0, below every known
    channel, as their true survival (at most the level) is, and beside the channels finished
    paths never selected (also 0). The search runs once removing every channel scored 0 falls
    short of the target: its result is then the one complete paths give, provided the
    candidates it removes by position alone (:attr:`SearchResult.decided_from`) cover all of
    those and each group's ``min_channels`` best are known; otherwise the paths go one level
    deeper (at their end every score is exact). With ``round_to`` each group must also lose all
    of them after rounding. Returns the result and the scores it used, whose timings gain
    ``lasso`` (walking the paths) and ``search``.
    """
    scores, problems = calibrated.scores, calibrated.problems
    top = max((float(b.max()) for _, b in problems.values()), default=0.0)
    widths = {g: G.shape[0] for g, (G, _) in problems.items()}
    full = np.array(list(widths.values()), dtype=np.int64)
    least = least_of(graph, list(widths))
    floor = dict(zip(widths, channel_floor(full, min_channels, round_to, least).tolist()))  # (as the search's)
    seconds = {"lasso": 0.0, "search": 0.0}

    def search(primary: dict[int, Tensor]) -> SearchResult:
        return search_threshold(graph, _ordered(graph, primary), scores.secondary, flops_target,
                                min_channels=min_channels, tolerance=tolerance, round_to=round_to, progress=False)

    every = {g.index: g.channels for g in graph.prunable_groups}  # (each keeps its floor)
    if reduction_of_removal(graph, every, min_channels, round_to) < flops_target - tolerance:
        # Out of reach whatever the scores: the search says so (and by how much) before any path.
        search({**scores.primary, **{g: torch.zeros(w, dtype=torch.float64) for g, w in widths.items()}})
    levels = [top * _LEVEL_STEP]
    while levels[-1] > 1e-6 * top:
        levels.append(levels[-1] * _LEVEL_STEP)
    levels.append(-math.inf)  # the rest in one go (a cut that far down is rare; ~20 rounds fewer)
    result = None
    t = time.perf_counter()
    rounds = ForkRounds(_walk_path, _descend, problems, calibrated.cost(), levels,
                        calibrated.workers(workers))  # (the paths' set-up)
    seconds["lasso"] += time.perf_counter() - t
    with rounds, tqdm(total=len(levels), desc="apib: lasso paths and search", unit="level", disable=not progress) as bar:
        walking = iter(rounds)
        while result is None:
            t = time.perf_counter()
            walked = next(walking)
            seconds["lasso"] += time.perf_counter() - t
            bar.update()
            t = time.perf_counter()
            finished = all(done for _, done, _ in walked.values())
            # Channels scored 0: those yet to enter, and those a finished path never selected. In
            # the complete paths' order they come first too, but ordered otherwise among themselves.
            low = {g: int((s == 0).sum()) for g, (s, _, _) in walked.items()}
            primary = _ordered(graph, {**scores.primary, **{g: torch.from_numpy(s) for g, (s, _, _) in walked.items()}})
            if finished:
                result = search(primary)
            elif (all(widths[g] - n >= floor[g] for g, n in low.items())
                  and reduction_of_removal(graph, low, min_channels, round_to) < flops_target):
                try:
                    result = search(primary)
                except UnreachableTarget:
                    result = None  # (complete paths may still reach it: go on)
                if result is not None and (
                        result.decided_from < sum(low.values())
                        # (rounding widths up gives back a group's best removed channels)
                        or any(widths[g] - result.channels[g] < n for g, n in low.items())):
                    result = None
            seconds["search"] += time.perf_counter() - t
        bar.total = bar.n  # (the levels below were not needed)
        bar.set_postfix_str(f"alpha {result.threshold:.3g}")
    return result, Scores(primary, scores.secondary, {**scores.timings, **seconds}, scores.notes,
                          {g: peak for g, (_, _, peak) in walked.items()}, scores.rank_bound)


def _out_slices(graph: ChannelGraph, group_index: int, params: dict[str, Tensor]) -> Tensor:
    """(channels, features): each channel's producer weights (``out`` members; else all members)."""
    group = graph.groups[group_index]
    members = [m for m in group.members if m.role == "out"] or list(group.members)
    rows = []
    for m in members:
        p = params.get(m.param)
        if p is None:
            continue
        order = torch.argsort(m.classes * (m.positions.numel() + 1) + m.positions)
        t = p.detach().movedim(m.dim, 0).index_select(0, m.positions[order].to(p.device))
        rows.append(t.reshape(group.channels, -1).double().cpu())
    return torch.cat(rows, dim=1)


def _relative(x: Tensor) -> Tensor:
    mean = x.mean()
    return x / mean if float(mean) > 0 else torch.ones_like(x)


def score_data_free(graph: ChannelGraph, model: nn.Module, method: str, seed: int = 0) -> Scores:
    """``l1``, ``fpgm`` or ``random`` scores from the weights alone."""
    start = time.perf_counter()
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    primary, secondary = {}, {}
    for g in graph.prunable_groups:
        if method == "random":
            s = torch.rand(g.channels, generator=gen, dtype=torch.float64)
        else:
            w = _out_slices(graph, g.index, params)
            if method == "l1":
                s = w.abs().sum(dim=1)
            elif method == "fpgm":
                # Filters near the geometric median are replaceable by the others: small total distance.
                s = torch.cdist(w, w).sum(dim=1)
            else:
                raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
        primary[g.index] = _relative(s)
        secondary[g.index] = torch.zeros(g.channels, dtype=torch.float64)
    return Scores(primary, secondary, {"score": time.perf_counter() - start})
