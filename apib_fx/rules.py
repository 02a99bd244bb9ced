"""The channel rules: one table entry per op, saying how it maps channels.

A :class:`Rule` has two halves:

* ``propagate(ctx, *args, **kwargs)`` runs during :func:`apib_fx.trace` on label tensors (see
  :mod:`apib_fx.labels`) instead of values: it returns the labels of the op's output and tells the
  :class:`~apib_fx.labels.LabelSpace` which parameter slices carry which channels, which channels
  must go together, and which cannot be removed.
* ``rewrite(node, module, keep)`` runs during :func:`apib_fx.apply`, after parameters were sliced:
  it fixes what the graph or a module hard-codes about channel counts (``view`` shapes, ``split``
  sizes, ``in_channels``, ``normalized_shape``...).

Supporting a new op is one entry in :data:`RULES` (or :func:`register_rule` from user code); an op
without an entry is *opaque*: its channels are kept whole, with the reason recorded.
"""
from __future__ import annotations

import inspect
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import attention
from .labels import (
    NONE,
    ChannelSize,
    ChannelValue,
    ShapeSize,
    LabelSpace,
    along,
    axis_ids,
    canonical,
    compress,
    flatten_values,
    has_labels,
    is_labels,
    unlabeled,
    varying_axes,
)

try:  # torchvision is a dependency, but keep the engine importable without it
    from torchvision.ops import StochasticDepth
except ImportError:  # pragma: no cover
    StochasticDepth = None


def node_arg(node: fx.Node, index: int, kwarg: Optional[str] = None) -> Any:
    """Argument ``index`` of a call node (or keyword ``kwarg``), None if absent."""
    if kwarg is not None and kwarg in node.kwargs:
        return node.kwargs[kwarg]
    return node.args[index] if index < len(node.args) else None


def graph_constants(graph: fx.Graph) -> dict[str, Tensor]:
    """Tensors the traced forward created (fx's ``_tensor_constant0``...), read by ``get_attr``
    nodes of ``graph`` but not attributes of the model (the tracer keeps them on the graph)."""
    return getattr(graph, "_apib_constants", {})


def weight_param(node: fx.Node) -> Optional[str]:
    """The parameter a functional layer reads its weight from (``F.linear(x, self.weight)``: a
    ``get_attr`` node), None if the weight is computed or absent."""
    w = node_arg(node, 1, "weight")
    return w.target if isinstance(w, fx.Node) and w.op == "get_attr" else None


@dataclass
class RuleContext:
    """What a rule may look at besides its arguments."""

    space: LabelSpace
    node: fx.Node
    module: Optional[nn.Module] = None

    @property
    def out_shape(self) -> tuple[int, ...]:
        meta = self.node.meta.get("tensor_meta")
        return tuple(meta.shape)

    @property
    def op_name(self) -> str:
        t = self.node.target
        if self.node.op == "call_module":
            return f"{type(self.module).__name__} '{t}'"
        if self.node.op == "call_method":
            return f"Tensor.{t}"
        return getattr(t, "__name__", str(t))

    def param(self, attr: str) -> str:
        """Qualified name of a parameter of the called module, as in ``named_parameters()``."""
        return f"{self.node.target}.{attr}" if self.node.target else attr

    def arg_node(self, index: int, kwarg: Optional[str] = None) -> Any:
        return node_arg(self.node, index, kwarg)

    def unlabeled_output(self) -> Any:
        """Unlabeled values shaped like this node's output (tensor, or nested tuples)."""

        def build(meta: Any) -> Any:
            if meta is None:
                return None
            if hasattr(meta, "shape"):
                return unlabeled(meta.shape)
            if isinstance(meta, (tuple, list)):
                return type(meta)(build(m) for m in meta)
            if isinstance(meta, dict):
                return {k: build(v) for k, v in meta.items()}
            return None

        out = build(self.node.meta.get("tensor_meta"))
        return _as_type(self.node.meta.get("type"), out)


def _as_type(cls: Any, values: Any) -> Any:
    """``values`` (a tuple) as ``cls`` when that is a named tuple or a torch structseq
    (``x.max(dim)``'s ``(values, indices)``), so ``.values`` reads work on labels too."""
    if not (isinstance(values, tuple) and isinstance(cls, type) and issubclass(cls, tuple) and cls is not tuple):
        return values
    try:
        return cls(*values) if hasattr(cls, "_fields") else cls(values)
    except Exception:  # a tuple subclass built another way: a plain tuple indexes the same
        return values


class KeepView:
    """Answers the rewrite pass' questions about kept positions of a traced node's labels."""

    def __init__(self, node_labels: dict[str, Any], keep_ids: Tensor):
        self.node_labels = node_labels
        self.keep_ids = keep_ids

    def mask(self, labels: Tensor) -> Tensor:
        small = compress(labels)
        kept = torch.ones(small.shape, dtype=torch.bool)
        on = small != NONE
        kept[on] = self.keep_ids[small[on]]
        return kept

    def kept_along(self, labels: Tensor, axis: int) -> Tensor:
        """Bool vector over ``axis``: which positions survive (pruning is rectangular)."""
        axis = axis % labels.dim()
        kept = self.mask(labels)
        other = [a for a in range(kept.dim()) if a != axis]
        vec = kept.any(dim=other) if other else kept
        vec = vec.reshape(-1)
        if vec.numel() == 1:
            vec = vec.expand(labels.shape[axis])
        return vec

    def size_along(self, labels: Tensor, axis: int) -> int:
        return int(self.kept_along(labels, axis).sum())

    def labels(self, node: Any) -> Any:
        return self.node_labels.get(node.name) if isinstance(node, fx.Node) else None


Propagate = Callable[..., Any]
Rewrite = Callable[[fx.Node, Optional[nn.Module], KeepView], None]


@dataclass(frozen=True)
class Rule:
    propagate: Propagate
    rewrite: Optional[Rewrite] = None
    # For ops that mix the channels of their (first) input into their output: a layer through
    # its weights (conv, linear), or a contraction (q of q kᵀ, of attention). The axis of that
    # input holding the channels; data-driven scoring reads activations there.
    input_axis: Optional[int] = None
    # Contractions whose operands depend on the call (an einsum's equation): ``inputs(node)`` lists
    # (operand node, axis of its contracted channels) for each operand, in the order scoring
    # should prefer them; it reads the first whose channels there are prunable.
    inputs: Optional[Callable[[fx.Node], list[tuple[Any, int]]]] = None
    # For modules the tracer should record as the ops they compute rather than one node (so
    # their inner widths get rules): ``expand(module, args, kwargs)`` returns the outputs computed
    # on the tracer's proxies, or None to keep this call one node (then ``propagate`` applies).
    expand: Optional[Callable[[nn.Module, tuple, dict], Any]] = None
    # For modules: ``shape(module, x)`` is the output shape of ``module(x)`` from the input alone,
    # so the shape pass need not run the layer (most of a trace's time); None when unsure (odd
    # input, hooks, a setting the formula does not cover): the layer then runs, and raises its own
    # error if the input does not fit. For functions and Tensor methods: ``shape(*args,
    # **kwargs)`` is the output's (shape, dtype), or None likewise.
    shape: Optional[Callable[..., Any]] = None


# --------------------------------------------------------------------------------------------
# Propagation helpers


def _first_labels(args: tuple, kwargs: dict) -> Optional[Tensor]:
    for v in list(args) + list(kwargs.values()):
        if is_labels(v):
            return v
    return None


def takes_split(rule: Propagate) -> Propagate:
    """Marks a rule that may be handed a reshape's split not yet tied (:func:`tie_outer`):
    elementwise rules pass it on, layers tie it to the axis they read (:func:`_channel_ids`). The
    trace ties it as :func:`tie_outer` does before any other rule sees it."""
    rule.takes_split = True  # type: ignore[attr-defined]
    return rule


def _channel_ids(ctx: RuleContext, x: Tensor, axis: int) -> Tensor:
    """1-D labels of ``x`` along ``axis``; channels that also vary along another axis cannot be
    consumed per position by a layer, so they are blocked and read as unlabeled."""
    axis = axis % x.dim()
    extra = [a for a in varying_axes(x) if a != axis]
    if extra and ctx.space.pending.pop(id(x), None) is not None:
        if axis in varying_axes(x):
            # The first layer to read a split's channels says which axis holds them: channel c
            # is its whole slice along the other axes (H·W features of a Linear viewed as a map).
            small = compress(x)
            for a in extra:
                ctx.space.unify(small, small.narrow(a, 0, 1).expand_as(small))
        else:
            tie_outer(ctx.space, x)
    if extra:
        extra = [a for a in ctx.space.class_varying_axes(x) if a != axis]  # ids tied along them count once
    if extra:
        ctx.space.block(x, f"{ctx.op_name} reads them along axis {axis} but they also vary along axes {extra}")
        return torch.full((x.shape[axis],), NONE, dtype=torch.long)
    return axis_ids(x, axis)


def tie_outer(space: LabelSpace, labels: Tensor, defer: bool = False) -> Tensor:
    """When a reshape spreads channels over several axes (channel shuffle's (b, g, c/g, h, w), heads),
    only the innermost may be pruned freely: the same inner position is removed in every slice of the
    outer axes, so every later reshape stays rectangular.

    ``defer``: for a split of one axis (a view or unflatten). The innermost axis is then only the
    default: a layer reading the result along another axis (a Linear's features viewed as a
    (C, H, W) map for a conv) frees that one instead. The labels wait in ``space.pending``; the
    trace ties them here before any rule but those marked :func:`takes_split` sees them, and at
    the end of the pass."""
    if len(varying_axes(labels)) < 2:
        return labels  # varies along one axis at most (most results: no channel classes to look up)
    axes = space.class_varying_axes(labels)
    if len(axes) >= 2 and defer:
        space.pending[id(labels)] = labels
    elif len(axes) >= 2:
        small = compress(labels)
        # Whole heads: the axis just before the innermost, (B, N, heads, d) or (B, N, 3, heads, d),
        # when channels change along it; a single head there (k and v shared by every query head:
        # (B, N, 2, 1, d)) leaves nothing free.
        free = axes[-1]
        if space.whole_heads:
            free = axes[-1] - 1 if axes[-1] - 1 in axes else None
        for a in axes:
            if a != free:
                space.link(small, small.narrow(a, 0, 1).expand_as(small))
    return labels


def _relabeled(space: LabelSpace, value: Any) -> Any:
    if is_labels(value):
        return tie_outer(space, canonical(value))
    if isinstance(value, Tensor):  # a fresh tensor created from non-label inputs
        return unlabeled(value.shape)
    if isinstance(value, (tuple, list)):
        return type(value)(_relabeled(space, v) for v in value)
    return value


# --------------------------------------------------------------------------------------------
# Propagation rules


def kept_whole(why: str) -> Propagate:
    """Propagation of an op whose channels cannot be removed: they are blocked with ``why``.
    Marked ``keeps_whole``, so the trace measures the op's MACs as a constant."""

    def rule(ctx: RuleContext, *args: Any, **kwargs: Any) -> Any:
        tensors = [v for v in flatten_values((args, kwargs)) if is_labels(v)]
        for v in tensors:
            if has_labels(v):
                ctx.space.block(v, f"consumed by {ctx.op_name}, {why}")
        if not tensors and ctx.node.op != "call_module" and ctx.node.meta.get("tensor_meta") is None:
            # Plain values in and out (a wrapped helper computing pad sizes from sizes, as
            # torchvision's Swin3d has): computed, since later ops index and use them.
            try:
                return run_plain(ctx, *args, **kwargs)
            except Exception:  # (it ran in the shape pass: nothing here should differ)
                pass
        return ctx.unlabeled_output()

    rule.keeps_whole = True  # type: ignore[attr-defined]
    return rule


opaque = kept_whole("which has no channel rule")
opaque.__doc__ = "An op with no channel rule: whatever channels it reads cannot be removed."


@takes_split
def passthrough(ctx: RuleContext, *args: Any, **kwargs: Any) -> Any:
    """Elementwise on one tensor: channels stay where they are (and a statistic over channels,
    ``sqrt(var)``, stays one)."""
    x = _first_labels(args, kwargs)
    return x if x is not None else ctx.unlabeled_output()


passthrough.takes_statistics = True  # type: ignore[attr-defined]


def clamp(ctx: RuleContext, *args: Any, **kwargs: Any) -> Any:
    """``clamp``/``clip``: elementwise on one tensor; with tensor bounds (``x.clamp(min=t)``),
    elementwise on all of them, which must then line up channel for channel."""
    if sum(isinstance(v, Tensor) for v in flatten_values((args, kwargs))) > 1:
        return broadcast(ctx, *args, **kwargs)
    _mark_channel_values(ctx, args, kwargs)
    return passthrough(ctx, *args, **kwargs)


clamp.takes_statistics = True  # type: ignore[attr-defined]  (x / x.norm(1, keepdim=True).clamp(min=eps))


def _run_on_labels(ctx: RuleContext, *args: Any, **kwargs: Any) -> Any:
    target = ctx.node.target
    if ctx.node.op == "call_method":
        name = "reshape" if target == "view" else target  # a broadcast label view may not be viewable
        return getattr(args[0], name)(*args[1:], **kwargs)
    return target(*args, **kwargs)


def relabel(ctx: RuleContext, *args: Any, **kwargs: Any) -> Any:
    """Shape ops move labels exactly as they move values: run the op itself on the labels."""
    return _relabeled(ctx.space, _run_on_labels(ctx, *args, **kwargs))


def stack(ctx: RuleContext, tensors: Any, *args: Any, **kwargs: Any) -> Any:
    """``torch.stack``: its inputs keep one shape, so channel c of each goes with channel c of
    the others (as in a residual add), and the new axis carries none of its own: stacked maps
    summed over it (BiFPN's weighted fusion) or interleaved by a flatten stay prunable."""
    if isinstance(tensors, (tuple, list)) and all(is_labels(t) for t in tensors):
        for t in tensors[1:]:
            ctx.space.unify(tensors[0], t)
    return relabel(ctx, tensors, *args, **kwargs)


def _split(space: LabelSpace, x: Any, out: Any) -> Any:
    """A view/reshape/unflatten result: a split of channels along one axis waits for its reader."""
    if is_labels(x) and is_labels(out) and len(varying_axes(x)) == 1:
        return tie_outer(space, canonical(out), defer=True)
    return _relabeled(space, out)


def unflatten(ctx: RuleContext, x: Any, *args: Any, **kwargs: Any) -> Any:
    return _split(ctx.space, x, _run_on_labels(ctx, x, *args, **kwargs))


def _cat_parameter(node: Any, axis: int, rank: int, channels: int) -> Optional[tuple[str, int]]:
    """(name, dim) of the parameter a cat operand is: read by ``get_attr``, or broadcast by
    ``expand`` with -1 along ``axis`` (its size there then follows the sliced parameter)."""
    if isinstance(node, fx.Node) and node.op == "call_method" and node.target == "expand" and node.args:
        sizes = _shape_args(node.args, node.kwargs)
        if len(sizes) != rank or sizes[axis] != -1:
            return None
        node = node.args[0]
    if not (isinstance(node, fx.Node) and node.op == "get_attr") or node.target in graph_constants(node.graph):
        return None
    shape = tuple(node.meta["tensor_meta"].shape) if "tensor_meta" in node.meta else ()
    dim = axis - (rank - len(shape))
    return (node.target, dim) if 0 <= dim and shape[dim] == channels else None


def _may_be_parameter(node: Any) -> bool:
    """Whether :func:`_cat_parameter` could find a parameter in ``node`` (read, or expanded)."""
    if isinstance(node, fx.Node) and node.op == "call_method" and node.target == "expand" and node.args:
        node = node.args[0]
    return isinstance(node, fx.Node) and node.op == "get_attr"


def _parameters_joined(ctx: RuleContext, small: list[Tensor], d: int) -> list[Tensor]:
    """A parameter concatenated with channels along another axis (a ViT's class token before
    its patch tokens) holds the same channels along that axis: it is per-channel state of them
    ("pass", sliced with them), so the stream stays prunable. Compressed labels in, out."""
    nodes = ctx.node.args[0]
    if not isinstance(nodes, (tuple, list)) or not any(_may_be_parameter(node) for node in nodes):
        return small  # (DenseNet's concats of up to 32 feature maps: no label tests)
    has = [bool((s != NONE).any()) for s in small]
    if all(has) or not any(has):
        return small
    labeled = [s for s, h in zip(small, has) if h]
    axes = {a for s in labeled for a in range(s.dim()) if s.shape[a] > 1}
    if len(axes) != 1 or d in axes:
        return small
    (a,) = axes
    ids = axis_ids(labeled[0], a)
    if bool((ids == NONE).any()) or any(not torch.equal(axis_ids(s, a), ids) for s in labeled[1:]):
        return small
    out = list(small)
    for i, node in enumerate(nodes):
        param = None if has[i] else _cat_parameter(node, a, small[i].dim(), ids.numel())
        if param is not None:
            ctx.space.bind(param[0], param[1], ids, "pass")
            out[i] = ids.view([-1 if j == a else 1 for j in range(small[i].dim())])
    return out


def concat(ctx: RuleContext, tensors: Any, dim: int = 0, **kwargs: Any) -> Any:
    """``torch.cat``: as :func:`relabel`, on the inputs' compressed labels. Run on the broadcast
    label views themselves, a DenseNet concat would write out (1, C, H, W) int64 labels per
    call only to find them constant over H and W again."""
    if kwargs or not isinstance(tensors, (tuple, list)) or not tensors or not all(is_labels(t) for t in tensors):
        return relabel(ctx, tensors, dim, **kwargs)
    rank = tensors[0].dim()
    d = dim % rank
    small = _parameters_joined(ctx, [compress(t) for t in tensors], d)
    varying = {a for s in small for a in range(rank) if a != d and s.shape[a] > 1}
    parts = [s.expand([t.shape[a] if a == d or a in varying else 1 for a in range(rank)])
             for t, s in zip(tensors, small)]
    return _relabeled(ctx.space, torch.cat(parts, d).expand(ctx.out_shape))


def run_plain(ctx: RuleContext, *args: Any, **kwargs: Any) -> Any:
    """Python-level ops (size arithmetic, ``getattr(x, 'shape')``, ``math.sqrt(C)``): evaluate;
    tensors become labels. A float computed from a channel count stays tagged (:class:`ChannelValue`)."""
    values = flatten_values((args, kwargs))
    if not any(is_labels(v) for v in values):
        target = ctx.node.target
        if ctx.node.op == "call_method":
            out = _relabeled(ctx.space, getattr(args[0], target)(*args[1:], **kwargs))
        else:
            out = _relabeled(ctx.space, target(*args, **kwargs))
        if type(out) is float and any(isinstance(v, (ChannelSize, ChannelValue)) for v in values):
            out = ChannelValue(out)
        return out
    return relabel(ctx, *args, **kwargs)


def _axis_size(space: LabelSpace, x: Tensor, axis: int) -> int:
    """``x.shape[axis]``, tagged: a :class:`ChannelSize` when channels change along that axis, else
    a :class:`ShapeSize` (a batch or spatial axis, or heads: the same channels spread again)."""
    axis = axis % x.dim()
    if axis in space.class_varying_axes(x):
        ids = axis_ids(x, axis)
        return ChannelSize(x.shape[axis], ids[ids != NONE])
    return ShapeSize(x.shape[axis])


def size_of(ctx: RuleContext, x: Any, *args: Any, **kwargs: Any) -> Any:
    """``x.shape`` / ``x.size()`` / ``x.size(d)``: sizes of channel axes remember their channels."""
    if not is_labels(x) or (ctx.node.target is getattr and args[0] != "shape"):
        return run_plain(ctx, x, *args, **kwargs)
    dim = None if ctx.node.target is getattr else (args[0] if args else kwargs.get("dim"))
    if dim is not None:
        return _axis_size(ctx.space, x, dim)
    return torch.Size([_axis_size(ctx.space, x, a) for a in range(x.dim())])


def length(ctx: RuleContext, x: Any) -> Any:
    """``len(pieces)``: how many tensors a split gave (the trace checks it where a forward loops
    over them), or ``len(x.shape)``. (A tensor's own length is never traced: it reads no
    metadata alone, see ``apib_fx.trace._Tracer.to_int``.)"""
    return len(x)


def _shape_args(args: tuple, kwargs: dict) -> list:
    """The target sizes of a ``view``/``reshape`` call (listed, or packed in one tuple)."""
    rest = list(args[1:])
    if "shape" in kwargs:
        return list(kwargs["shape"])
    if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)):
        return list(rest[0])
    return rest


def reshape(ctx: RuleContext, *args: Any, **kwargs: Any) -> Any:
    """``view``/``reshape``: move labels like values. A target size computed from channel counts
    (``x.reshape(B, N, 3, heads, C // heads)`` with ``C`` read off another tensor) is recorded so
    the rewrite gives it the new literal size of its axis: the reshape then fits whatever was
    pruned on either side. A channel count mixed with a batch or spatial size cannot be replaced;
    it must then count the channels of its own axis, or both sides are kept whole."""
    out = _split(ctx.space, args[0], _run_on_labels(ctx, *args, **kwargs))
    shape = _shape_args(args, kwargs)
    if not is_labels(out) or len(shape) != out.dim():
        return out
    fixed = []
    for axis, size in enumerate(shape):
        if not isinstance(size, ChannelSize):
            continue
        if size.pure:
            fixed.append(axis)
            continue
        ids = axis_ids(out, axis)
        ids = ids[ids != NONE]
        mine = set(ctx.space.classes(ids).tolist())
        if not mine or not mine <= set(ctx.space.classes(size.ids).tolist()):
            ctx.space.block(size.ids, f"their count sets a size in {ctx.op_name} mixed with other sizes")
            ctx.space.block(ids, f"their axis in {ctx.op_name} is sized by other channels")
    if fixed:
        ctx.node.meta["apib_channel_sized"] = fixed
    return out


def _index_axes(index: Any, ndim: int) -> list[tuple[int, Any]]:
    """(position in the index tuple, input axis) for each item of ``x[index]`` that consumes an axis."""
    items = index if isinstance(index, tuple) else (index,)
    consuming = [i for i, it in enumerate(items) if it is not None and it is not Ellipsis]
    out, axis = [], 0
    for i, item in enumerate(items):
        if item is Ellipsis:
            axis = ndim - sum(1 for j in consuming if j > i)
        elif item is not None:
            out.append((i, axis))
            axis += 1
    return out


def unbind(ctx: RuleContext, x: Any, dim: int = 0) -> Any:
    """``unbind`` along an axis without channels (q, k, v out of one ``qkv`` tensor): each piece
    keeps its labels. Along a channel axis the number of pieces would change: kept whole."""
    if is_labels(x) and dim % x.dim() in ctx.space.class_varying_axes(x):
        ctx.space.block(x, f"unbound into pieces along their axis by {ctx.op_name}")
    return relabel(ctx, x, dim)


def getitem(ctx: RuleContext, x: Any, index: Any) -> Any:
    if not is_labels(x):
        return x[index] if not isinstance(x, Tensor) else unlabeled(ctx.out_shape)
    # Integer, strided or tensor indexing along a channel axis picks channels the graph hard-codes.
    items = index if isinstance(index, tuple) else (index,)
    masks = [it for it in items if isinstance(it, Tensor) and (is_labels(it) or it.dtype == torch.bool)]
    if masks:
        # A mask or index computed by the model (x[x > 0]) selects by value: which elements, and
        # how many, depend on every channel it reads.
        for t in [x, *masks]:
            if is_labels(t):
                ctx.space.block(t, f"selected by a computed index or mask ({ctx.op_name})")
        return unlabeled(ctx.out_shape)
    varying = set(varying_axes(x))
    bounds = {}
    for i, axis in _index_axes(index, x.dim()):
        item = items[i]
        if axis in varying:
            ok = isinstance(item, slice) and item.step in (None, 1) and all(
                b is None or isinstance(b, int) for b in (item.start, item.stop)
            )
            if not ok:
                ctx.space.block(x, f"indexed along their axis by {item!r}")
                return unlabeled(ctx.out_shape)
            bounds[i] = tuple(None if b is None else int(b) for b in (item.start, item.stop))
    if bounds:
        # Bounds the graph computes (``y[:, :C // 2]`` with C read off y): the rewrite moves their
        # traced values, as it moves literal ones.
        ctx.node.meta["apib_slice_bounds"] = bounds
    return _relabeled(ctx.space, x[index])


def narrow(ctx: RuleContext, x: Any, dim: Any, start: Any, length: Any) -> Any:
    """``x.narrow(dim, start, length)``: ``x[..., start:start + length]`` along ``dim``; along a
    channel axis only with literal bounds, which the rewrite moves to the kept positions."""
    if not is_labels(x) or type(dim) is not int:
        return relabel(ctx, x, dim, start, length)
    d = dim % x.dim()
    if d not in varying_axes(x):
        return relabel(ctx, x, dim, start, length)
    if type(start) is not int or type(length) is not int or ctx.node.kwargs:
        ctx.space.block(x, f"narrowed along their axis by {ctx.op_name} to computed bounds")
        return unlabeled(ctx.out_shape)
    start = start + x.shape[d] if start < 0 else start
    return getitem(ctx, x, (slice(None),) * d + (slice(start, start + length),))


def _mark_channel_values(ctx: RuleContext, args: tuple, kwargs: dict) -> None:
    """Numbers computed from channel counts among a tensor op's arguments (``x / C ** 0.5``,
    ``x.clamp(max=C / 4)``): the rewrite keeps their unpruned values (freeze_channel_values)."""
    frozen = {k: (int(v) if isinstance(v, int) else float(v))
              for k, v in list(enumerate(args)) + list(kwargs.items())
              if isinstance(v, (ChannelSize, ChannelValue))}
    if frozen:
        ctx.node.meta["apib_frozen"] = frozen


def _statistics_met(ctx: RuleContext, values: list[Any]) -> Optional[Tensor]:
    """Statistics over channels among ``values`` (see :func:`_reduce`): with no channels beside
    them (``var + eps``), the result is a statistic of the same channels, returned; met by the
    very channels they summarise (``x - mean``, ``x / std``), those channels become prunable but
    not exact; met by other channels, they cannot be removed. None when there is no statistic."""
    space = ctx.space
    found = [(v, space.statistic(v)) for v in values]
    stats = [s for _, s in found if s is not None]
    if not stats:
        return None
    others = [v for v, s in found if s is None and is_labels(v) and has_labels(v)]
    if not others:
        out = ctx.unlabeled_output()
        space.add_statistic(out, torch.cat([ids for ids, _ in stats]), stats[0][1])
        return out
    seen = torch.cat([space.distinct(v) for v in others]).unique()
    for ids, op in stats:
        if torch.equal(ids, seen):
            space.mark_mixed(ids, f"{op} across them gives a statistic they are normalised by")
        else:
            space.block(ids, f"reduced over their axis by {op}, whose result meets other channels in "
                             f"{ctx.op_name}")
    return None


def broadcast(ctx: RuleContext, *args: Any, **kwargs: Any) -> Any:
    """Elementwise ops of several tensors (add, mul, where...): channels that meet at the same
    position must be removed together (a residual add, an SE block's ``x * scale``)."""
    if ctx.node.meta.get("tensor_meta") is None:  # arithmetic on sizes (``h // p * w // p``)
        out = run_plain(ctx, *args, **kwargs)
        if type(out) is bool:
            # A check of a channel count (``torch._assert(x.shape[1] == 64)``) keeps its traced
            # outcome: the pruned model passes the checks the model passed.
            _mark_channel_values(ctx, args, kwargs)
        return out
    if ctx.space.statistics:
        out = _statistics_met(ctx, list(args) + list(kwargs.values()))
        if out is not None:
            return out
    _mark_channel_values(ctx, args, kwargs)
    out_shape = ctx.out_shape
    nd = len(out_shape)
    space = ctx.space
    if len(args) == 2 and not kwargs and is_labels(args[0]) and is_labels(args[1]) \
            and args[0].dim() == args[1].dim() == nd:
        # The common case (a residual add, an SE block's x * scale): two operands whose channels
        # vary along the same axes, every position a channel. They line up one to one and nothing
        # is missing on either side: link them, without the bookkeeping below.
        p = compress(args[0])
        if space.link_aligned(p, compress(args[1])):
            return p.expand(out_shape)
    operands = []  # (compressed labels at out rank, real shape at out rank, fx arg)
    fx_args = list(ctx.node.args) + list(ctx.node.kwargs.values())
    for value, fx_arg in zip(list(args) + list(kwargs.values()), fx_args):
        if not is_labels(value):
            continue
        real = (1,) * (nd - value.dim()) + tuple(value.shape)
        small = compress(value.reshape(real))
        operands.append((small, real, fx_arg, value.dim()))
    if not operands:
        return ctx.unlabeled_output()
    common = _broadcast_shapes([op[0].shape for op in operands])
    out = torch.full(common, NONE, dtype=torch.long)
    for small, *_ in operands:
        s = small.expand(common)
        out = torch.where(out == NONE, s, out)
    for i, (p_small, *_) in enumerate(operands):
        p = p_small.expand(common)
        if not bool((p != NONE).any()):
            continue
        p_axes = None
        for j, (q_small, q_real, q_arg, q_dim) in enumerate(operands):
            if j == i:
                continue
            q = q_small.expand(common)
            both = (p != NONE) & (q != NONE)
            if j > i and bool(both.any()):  # each pair once: linking is symmetric
                space.link(p[both], q[both])
            missing = (p != NONE) & (q == NONE)
            if not bool(missing.any()):
                continue
            # Where p's channels change: ids tied along an axis (a head's dims, when whole heads
            # go) are one channel there, so a per-head parameter of size 1 along it lines up.
            p_axes = space.class_varying_axes(p_small) if p_axes is None else p_axes
            # q broadcasts along p's channel axes (a scalar, a per-sample scale): no conflict.
            if not all(q_real[a] > 1 for a in p_axes):
                continue
            param = _parameter_of(q_arg) if len(p_axes) == 1 and not bool((q != NONE).any()) else None
            if param is not None:
                # A parameter used elementwise (ConvNeXt's layer_scale): it is per-channel state.
                # Read directly, it lines up with the output; reshaped first (``gamma.view(1, -1,
                # 1, 1)``), only a vector can, along its one axis.
                name, shape = param
                if q_arg.op == "get_attr":  # (its shape lines up with the output's)
                    dim = p_axes[0] - (nd - q_dim)
                elif len(shape) == 1 and shape[0] == q_real[p_axes[0]]:
                    dim = 0
                else:
                    space.block(p[missing], f"meet values without a prunable channel in {ctx.op_name}")
                    continue
                space.bind(name, dim, axis_ids(p, p_axes[0]), "pass")
            else:
                table = _gathered_parameter_axis(q_arg, p_axes[0] - (nd - q_dim)) if len(p_axes) == 1 \
                    and not bool((q != NONE).any()) else None
                if table is not None:  # a per-head bias gathered from a table (Swin, MaxViT)
                    space.bind(table[0], table[1], axis_ids(p, p_axes[0]), "pass")
                else:
                    space.block(p[missing], f"meet values without a prunable channel in {ctx.op_name}")
    return out.expand(out_shape) if tuple(common) != tuple(out_shape) else out


def _gathered_parameter_axis(node: Any, axis: int) -> Optional[tuple[str, int]]:
    """(name, dim) of the parameter whose ``dim`` becomes ``axis`` of ``node``, through rows
    gathered by an index tensor (``table[index]``), ``view``/``reshape`` that keep that axis last
    and sized -1, ``permute``, ``unsqueeze`` and copies: a relative-position bias with one column
    per head (``table[index].view(N, N, -1).permute(2, 0, 1).unsqueeze(0)``). None otherwise."""
    while isinstance(node, fx.Node) and node.op in ("call_method", "call_function") and node.args:
        meta = node.meta.get("tensor_meta")
        source = node.args[0]
        rest = list(node.args[1:])
        if node.kwargs or not isinstance(source, fx.Node) or meta is None or not hasattr(meta, "shape"):
            return None
        nd = len(meta.shape)
        axis %= nd
        if node.target in ("contiguous", "clone", "to", "float", "half", "type_as"):
            pass
        elif node.target in ("unsqueeze", torch.unsqueeze) and len(rest) == 1 and isinstance(rest[0], int):
            d = rest[0] % nd
            if axis == d:
                return None
            axis -= axis > d
        elif node.target in ("permute", torch.permute):
            perm = _shape_args(node.args, {})
            if len(perm) != nd or not all(isinstance(d, int) for d in perm):
                return None
            axis = perm[axis] % nd
        elif node.target in ("view", "reshape", torch.reshape):
            sizes = _shape_args(node.args, {})
            before = source.meta.get("tensor_meta")
            if axis != nd - 1 or not sizes or sizes[-1] != -1 or before is None or before.shape[-1] != meta.shape[-1]:
                return None
            axis = len(before.shape) - 1
        elif node.target is operator.getitem and len(rest) == 1 and isinstance(rest[0], fx.Node):
            index = rest[0].meta.get("tensor_meta")
            if index is None or not hasattr(index, "shape") or index.dtype not in (torch.long, torch.int):
                return None
            if axis < len(index.shape):
                return None
            axis = axis - len(index.shape) + 1  # rows gathered along dim 0, the rest follow
        else:
            return None
        node = source
    if isinstance(node, fx.Node) and node.op == "get_attr" and node.target not in graph_constants(node.graph):
        meta = node.meta.get("tensor_meta")
        if meta is not None and axis < len(meta.shape):
            return node.target, axis
    return None


broadcast.takes_statistics = True  # type: ignore[attr-defined]


# Ops that only give a parameter another view: size-1 axes added or removed, a dtype or device.
_PARAM_VIEWS = {"view", "reshape", "unsqueeze", "squeeze", "to", "float", "half", "type_as",
                torch.reshape, torch.unsqueeze, torch.squeeze, operator.getitem}


def _parameter_of(node: Any) -> Optional[tuple[str, tuple[int, ...]]]:
    """(name, shape) of the parameter or buffer ``node`` reads, directly (``get_attr``) or through
    views that only add or drop size-1 axes (``gamma.view(1, -1, 1, 1)``, ``gamma[:, None, None]``,
    ``gamma.view(C, 1, 1)`` of a vector of C: :func:`rewrite_shape_args` updates that C)."""
    literals: list[Any] = []
    while isinstance(node, fx.Node) and node.op in ("call_method", "call_function"):
        if node.target not in _PARAM_VIEWS or not node.args:
            return None
        rest = list(node.args[1:]) + list(node.kwargs.values())
        if node.target in ("view", "reshape", torch.reshape):
            literals += rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        elif node.target is operator.getitem:
            index = rest[0] if isinstance(rest[0], tuple) else (rest[0],)
            if not all(i is None or i is Ellipsis or i == slice(None) for i in index):
                return None
        elif any(isinstance(v, fx.Node) for v in rest):
            return None
        node = node.args[0]
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) and node.op == "get_attr" else None
    if meta is None or node.target in graph_constants(node.graph):
        return None  # (a tensor the forward creates is no parameter to slice)
    shape = tuple(meta.shape)
    allowed = {1, -1} | ({shape[0]} if len(shape) == 1 else set())
    if not all(isinstance(v, int) and v in allowed for v in literals):
        return None
    return node.target, shape


def _resize_parameter_view(node: fx.Node) -> bool:
    """A view of a 1-D parameter written with its length (``scale.view(C, 1, 1)``): C follows
    the sliced parameter. True if ``node`` is such a view (then nothing else is to be done)."""
    param = _parameter_of(node)
    if param is None or node.target not in ("view", "reshape", torch.reshape):
        return False
    name, old = param
    owner_name, _, attr = name.rpartition(".")
    root = node.graph.owning_module
    new = getattr(root.get_submodule(owner_name) if owner_name else root, attr).shape
    if len(old) == 1 and new[0] != old[0]:
        args = list(node.args)
        packed = len(args) == 2 and isinstance(args[1], (tuple, list))
        shape = [new[0] if s == old[0] else s for s in (args[1] if packed else args[1:])]
        node.args = (args[0], type(args[1])(shape)) if packed else (args[0], *shape)
    return True


def _dims_arg(args: tuple, kwargs: dict, nd: int) -> Optional[list[int]]:
    dim = kwargs.get("dim", args[0] if args else None)
    if dim is None:
        return None
    dims = [dim] if isinstance(dim, int) else list(dim)
    return [d % nd for d in dims]


def reduction(ctx: RuleContext, x: Tensor, *args: Any, **kwargs: Any) -> Any:
    """mean/sum/amax over some dims: fine over spatial dims; over the channel axis see :func:`_reduce`."""
    dims = _dims_arg(args, kwargs, x.dim())
    keepdim = kwargs.get("keepdim", args[1] if len(args) > 1 and isinstance(args[1], bool) else False)
    return _reduce(ctx, x, dims, bool(keepdim))


def reduction_at(dim_at: int, keepdim_at: int) -> Propagate:
    """:func:`reduction` of an op whose ``dim`` and ``keepdim`` follow other arguments
    (``x.norm(p, dim, keepdim)``, ``x.var(dim, unbiased, keepdim)``) or are keywords."""

    def rule(ctx: RuleContext, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        keepdim = kwargs.get("keepdim", args[keepdim_at] if len(args) > keepdim_at else False)
        return _reduce(ctx, x, _dims_arg(args[dim_at:dim_at + 1], kwargs, x.dim()), bool(keepdim))

    return rule


def _reduce(ctx: RuleContext, x: Tensor, dims: Optional[list[int]], keepdim: bool) -> Any:
    """A reduction over ``dims`` (all if None). Over an axis of tied channels it is fine (they are
    removed together). Over the channel axis, kept as an axis of 1 (``x.mean(1, keepdim=True)``),
    it is a statistic of the channels: a hand-written LayerNorm's mean and variance, GRN's mean
    norm. Brought back onto the same channels (``x - mean``, ``x / norm``) it makes them
    prunable but not exact, as LayerNorm does; reaching anything else (an attention map applied
    to other channels, a concat) keeps them whole (:func:`broadcast`). Otherwise fatal, unless
    nothing reads the result."""
    dims = list(range(x.dim())) if dims is None else dims
    axes = set(ctx.space.class_varying_axes(x))
    if set(dims) & axes:
        if not ctx.node.users:  # a result nothing reads (attention weights written out, unused)
            return ctx.unlabeled_output()
        if keepdim and axes <= set(dims):
            return ctx.space.add_statistic(ctx.unlabeled_output(), x, ctx.op_name)
        ctx.space.block(x, f"reduced over their axis by {ctx.op_name}")
        return ctx.unlabeled_output()
    return compress(x).amax(dim=dims, keepdim=keepdim).expand(ctx.out_shape)


def max_min(ctx: RuleContext, x: Any, *args: Any, **kwargs: Any) -> Any:
    """``max``/``min``: of two tensors, elementwise; over one axis, ``(values, indices)``, which
    keep the channels of the axes left; over everything or over a channel axis, kept whole."""
    if any(isinstance(v, Tensor) for v in list(args) + list(kwargs.values())):
        return broadcast(ctx, x, *args, **kwargs)
    dim = args[0] if args else kwargs.get("dim")
    if dim is None or not is_labels(x):
        return reduction(ctx, x)
    keepdim = args[1] if len(args) > 1 else kwargs.get("keepdim", False)
    d = dim % x.dim()
    if d in ctx.space.class_varying_axes(x):
        ctx.space.block(x, f"reduced over their axis by {ctx.op_name}")
        return ctx.unlabeled_output()
    values = compress(x).amax(dim=d, keepdim=keepdim)
    out = tuple(values.expand(tuple(m.shape)) for m in ctx.node.meta["tensor_meta"])
    return _as_type(ctx.node.meta.get("type"), out)


def softmax(ctx: RuleContext, x: Tensor, *args: Any, **kwargs: Any) -> Any:
    """Fine over an axis without channels, or of tied ones (a split-attention's radix axis: a
    channel goes with its whole slice); fatal over channels that may go one by one."""
    dim = ctx.module.dim if ctx.module is not None else kwargs.get("dim", args[0] if args else None)
    if dim is None or dim % x.dim() in ctx.space.class_varying_axes(x):
        ctx.space.block(x, f"normalised across channels by {ctx.op_name}")
        return ctx.unlabeled_output()
    return x


def lp_normalize(ctx: RuleContext, x: Tensor, p: Any = 2.0, dim: int = 1, *args: Any, **kwargs: Any) -> Any:
    """``F.normalize``: over an axis without channels (XCA's tokens) each channel is scaled on its
    own; across the channels it is a normalisation, prunable but not exact (as LayerNorm)."""
    axes = ctx.space.class_varying_axes(x) if is_labels(x) else []
    d = dim % x.dim()
    if d in axes:
        if len(axes) > 1:
            ctx.space.block(x, f"normalised over several channel axes by {ctx.op_name}")
            return ctx.unlabeled_output()
        ctx.space.mark_mixed(x, f"{ctx.op_name} normalises across them")
    return x


def spatial(ctx: RuleContext, x: Tensor, *args: Any, **kwargs: Any) -> Any:
    """Pooling, upsampling, padding: act on axes 2.. of an (N, C, ...) tensor; channels untouched.
    A max pool that also returns its indices gives them the channels of the values they locate
    (each channel's indices point into that channel's own plane)."""
    if any(a >= 2 for a in varying_axes(x)):
        return opaque(ctx, x)
    meta = ctx.node.meta.get("tensor_meta")
    if isinstance(meta, tuple) and not hasattr(meta, "shape"):  # (values, indices), not one TensorMetadata
        return tuple(compress(x).expand(tuple(m.shape)) for m in meta)
    return compress(x).expand(ctx.out_shape)


def unpool(ctx: RuleContext, x: Any, indices: Any, *args: Any, **kwargs: Any) -> Any:
    """Max unpooling (SegNet's decoder): each channel's values go back to the positions its max
    pool recorded in that channel's ``indices``, so values and indices lose the same channels
    (the encoder's channels are tied to the decoder's); axes 2.. change size."""
    if not (is_labels(x) and is_labels(indices)) or x.shape != indices.shape \
            or any(a >= 2 for a in varying_axes(x) + varying_axes(indices)):
        return opaque(ctx, x, indices, *args, **kwargs)
    ctx.space.unify(x, indices)
    return compress(x).expand(ctx.out_shape)


def pad(ctx: RuleContext, x: Tensor, pad: Any, *args: Any, **kwargs: Any) -> Any:
    """``F.pad``: channels untouched as long as no axis that carries them is padded."""
    sizes = list(pad)
    padded = {x.dim() - 1 - i for i in range(len(sizes) // 2) if sizes[2 * i] or sizes[2 * i + 1]}
    if padded & set(varying_axes(x)):
        return _padded_across(ctx, x, pad, *args, **kwargs)
    return compress(x).expand(ctx.out_shape)


_padded_across = kept_whole("which pads along their axis")


def pad_module(ctx: RuleContext, x: Tensor) -> Any:
    """Padding modules (ZeroPad2d, ReflectionPad1d, CircularPad3d...): as ``F.pad`` with their
    ``padding`` (a 2-D pad of a 3-D tensor pads its channel axis: kept whole then)."""
    return pad(ctx, x, ctx.module.padding)


def _factor(ctx: RuleContext, attr: str, args: tuple, kwargs: dict) -> Any:
    """The integer setting of a shuffle: the module's attribute, or the function's argument."""
    if ctx.module is not None:
        return getattr(ctx.module, attr)
    return args[0] if args else kwargs.get(attr, kwargs.get("groups"))


def _pixel_channels(ctx: RuleContext, x: Tensor, attr: str, args: tuple, kwargs: dict) -> Optional[tuple[int, int]]:
    """(factor r, channel axis) of a pixel (un)shuffle of ``x`` (*, C, H, W) whose channels vary
    along that axis alone; None otherwise (kept whole)."""
    r, axis = _factor(ctx, attr, args, kwargs), x.dim() - 3
    if type(r) is not int or axis < 0 or any(a != axis for a in varying_axes(x)):
        return None
    return r, axis


def glu(ctx: RuleContext, x: Any, dim: int = -1) -> Any:
    """``F.glu(x, dim)`` / ``nn.GLU``: ``a * sigmoid(b)`` for the two halves of ``x`` along ``dim``;
    position i of each half meets the other's, so they are removed together (the halves are cut
    at run time: nothing to rewrite)."""
    if isinstance(ctx.module, nn.GLU):
        dim = ctx.module.dim
    if not is_labels(x):
        return ctx.unlabeled_output()
    first, second = x.chunk(2, dim)
    ctx.space.unify(first, second)
    return _relabeled(ctx.space, first)


def unflatten_module(ctx: RuleContext, x: Tensor) -> Tensor:
    return _split(ctx.space, x, x.unflatten(ctx.module.dim, ctx.module.unflattened_size))


def resize_unflatten(node: fx.Node, m: nn.Module, keep: KeepView) -> None:
    """``nn.Unflatten``: the sizes of resized axes become their new sizes."""
    sizes = _new_sizes(node, keep)
    if sizes is None:
        return
    dim = m.dim % (len(sizes) - len(m.unflattened_size) + 1)  # in the input's rank
    new = sizes[dim:dim + len(m.unflattened_size)]
    m.unflattened_size = type(m.unflattened_size)(new) if isinstance(m.unflattened_size, (tuple, list)) else new


def pixel_shuffle(ctx: RuleContext, x: Tensor, *args: Any, **kwargs: Any) -> Any:
    """(*, C r², H, W) -> (*, C, H r, W r) (super-resolution upsampling): output channel c is
    input channels c r² .. c r² + r² - 1 spread over r x r positions, so those go together."""
    found = _pixel_channels(ctx, x, "upscale_factor", args, kwargs)
    if found is None:
        return opaque(ctx, x, *args, **kwargs)
    r, axis = found
    blocks = axis_ids(x, axis).view(-1, r * r)
    ctx.space.unify(blocks, blocks[:, :1].expand_as(blocks))
    return along(blocks[:, 0].contiguous(), axis, ctx.out_shape)


def pixel_unshuffle(ctx: RuleContext, x: Tensor, *args: Any, **kwargs: Any) -> Any:
    """(*, C, H r, W r) -> (*, C r², H, W): input channel c becomes output channels
    c r² .. c r² + r² - 1 (one per position of its r x r patches)."""
    found = _pixel_channels(ctx, x, "downscale_factor", args, kwargs)
    if found is None:
        return opaque(ctx, x, *args, **kwargs)
    r, axis = found
    return along(axis_ids(x, axis).repeat_interleave(r * r), axis, ctx.out_shape)


def channel_shuffle(ctx: RuleContext, x: Tensor, *args: Any, **kwargs: Any) -> Any:
    """(N, g C', *) -> position k of group i moves to k g + i (ShuffleNet). Every group must keep
    the same positions, so position k of each group goes together and ``groups`` stays."""
    g = _factor(ctx, "groups", args, kwargs)
    if type(g) is not int or x.dim() < 3 or any(a != 1 for a in varying_axes(x)):
        return opaque(ctx, x, *args, **kwargs)
    ids = axis_ids(x, 1)
    _tie_slices(ctx.space, ids, g)
    return along(ids.view(g, -1).t().reshape(-1), 1, ctx.out_shape)


def roll(ctx: RuleContext, x: Tensor, shifts: Any, dims: Any = None) -> Any:
    """``torch.roll`` (Swin's shifted windows): channels untouched if none of the rolled axes
    carries them."""
    axes = [dims] if isinstance(dims, int) else list(dims) if dims is not None else None
    if axes is None or {a % x.dim() for a in axes} & set(varying_axes(x)):
        return opaque(ctx, x, shifts, dims)
    return x


def _linear(ctx: RuleContext, x: Tensor, w: str, out_features: int, bias: Optional[str]) -> Tensor:
    ctx.space.bind(w, 1, _channel_ids(ctx, x, -1), "in")
    out = ctx.space.param_ids(w, 0, out_features)
    if bias is not None:
        ctx.space.bind(bias, 0, out, "pass")
    out_shape = ctx.out_shape
    ctx.space.add_flops(math.prod(out_shape) // out_features, [(w, 0), (w, 1)])
    return along(out, -1, out_shape)


@takes_split
def linear(ctx: RuleContext, x: Tensor) -> Tensor:
    m: nn.Linear = ctx.module
    return _linear(ctx, x, ctx.param("weight"), m.out_features,
                   ctx.param("bias") if m.bias is not None else None)


@takes_split
def linear_fn(ctx: RuleContext, x: Tensor, weight: Any, bias: Any = None) -> Tensor:
    """``F.linear(x, self.weight, self.bias)`` on parameters read by ``get_attr``: as nn.Linear.
    A weight computed in the graph has no parameter to slice: its inputs stay whole."""
    w, b = weight_param(ctx.node), ctx.arg_node(2, "bias")
    if not is_labels(x) or w is None or (isinstance(b, fx.Node) and b.op != "get_attr"):
        return opaque(ctx, x, weight, bias)
    return _linear(ctx, x, w, weight.shape[0], b.target if isinstance(b, fx.Node) else None)


def recurrent(ctx: RuleContext, x: Any, hx: Any = None) -> Any:
    """``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``: the first layer's input weights (``weight_ih_l0``,
    and ``weight_ih_l0_reverse`` when bidirectional) read the input's features, its last axis
    whatever ``batch_first`` says: those channels prune exactly. The hidden units stay whole (they
    recur through ``weight_hh`` and come in gate blocks): the outputs carry no channels, and
    channels in a given initial state are kept."""
    m: nn.RNNBase = ctx.module
    if not is_labels(x):  # (a PackedSequence: its MACs, measured by the shape pass, are a constant)
        return opaque(ctx, x, hx)
    ids = _channel_ids(ctx, x, -1)
    first = [ctx.param(f"weight_ih_l0{s}") for s in (("", "_reverse") if m.bidirectional else ("",))]
    for w in first:
        ctx.space.bind(w, 1, ids, "in")
        rows = getattr(m, w.rpartition(".")[2]).shape[0]  # (gate rows of the hidden units: whole)
        ctx.space.bind(w, 0, torch.full((rows,), NONE, dtype=torch.long), "out")
    # MACs (as count_flops counts them): every input position meets every weight matrix; only
    # the first layer's input weights change with these channels.
    positions = math.prod(x.shape[:-1])
    for name, p in m.named_parameters():
        if p.dim() == 2:
            w = ctx.param(name)
            if w in first:
                ctx.space.add_flops(positions, [(w, 0), (w, 1)])
            else:
                ctx.space.add_flops(positions * p.shape[0] * p.shape[1], [])
    for v in flatten_values(hx):
        if is_labels(v) and has_labels(v):
            ctx.space.block(v, f"consumed by {ctx.op_name} as its initial state, whose hidden units stay whole")
    return ctx.unlabeled_output()


recurrent.measured = True  # type: ignore[attr-defined]  # (the shape pass measures its MACs, for a packed input)


def resize_recurrent(node: fx.Node, m: nn.Module, keep: KeepView) -> None:
    m.input_size = m.weight_ih_l0.shape[1]


def _embedding(ctx: RuleContext, w: str, dim: int, max_norm: Any) -> Tensor:
    # Each output vector is a row of the table: its last axis is the table's columns, channels
    # that start here (a tied output layer reading them unifies with them through the weight).
    out = along(ctx.space.param_ids(w, 1, dim), -1, ctx.out_shape)
    if max_norm is not None:
        ctx.space.mark_mixed(out, f"{ctx.op_name} rescales each row to max_norm over its columns")
    return out


def embedding(ctx: RuleContext, ids: Any, *args: Any, **kwargs: Any) -> Tensor:
    m: nn.Embedding = ctx.module
    return _embedding(ctx, ctx.param("weight"), m.embedding_dim, m.max_norm)


def embedding_fn(ctx: RuleContext, ids: Any, weight: Any, *args: Any, **kwargs: Any) -> Any:
    """``F.embedding(ids, self.weight, ...)`` on a parameter read by ``get_attr``."""
    w = ctx.arg_node(1, "weight")
    if not (isinstance(w, fx.Node) and w.op == "get_attr"):
        return opaque(ctx, ids, weight, *args, **kwargs)
    max_norm = node_arg(ctx.node, 3, "max_norm")
    return _embedding(ctx, w.target, weight.shape[1], max_norm)


def resize_embedding(node: fx.Node, m: nn.Module, keep: KeepView) -> None:
    m.num_embeddings, m.embedding_dim = m.weight.shape


def _tie_slices(space: LabelSpace, ids: Tensor, g: int) -> None:
    """Position j of each of the ``g`` equal slices of ``ids`` goes with position j of the first."""
    per = ids.numel() // g
    flat = ids.numpy()
    if flat.size and flat.min() != NONE:  # the usual case: one union, no masks
        space.link_ids(flat, np.tile(flat[:per], g))
    else:
        space.link(ids.view(g, per), ids[:per].expand(g, per))


def _conv(ctx: RuleContext, x: Tensor, w: str, w_shape: tuple[int, ...], groups: int,
          bias: Optional[str], fan_in_mixed: Optional[str] = None) -> Tensor:
    """``fan_in_mixed``: why each filter's values depend on all of its input channels (weight
    standardisation): removing inputs then changes the other inputs' weights, unless each
    filter reads one input channel (depthwise)."""
    space = ctx.space
    g, cout = groups, w_shape[0]
    ipg, opg = w_shape[1], cout // groups
    axis = x.dim() + 1 - len(w_shape)  # the channel axis: 1, or 0 for an unbatched input
    xin = _channel_ids(ctx, x, axis)
    if fan_in_mixed is not None and ipg > 1:
        space.mark_mixed(xin, fan_in_mixed)
        if math.prod(w_shape[2:]) == 1:  # a filter of one value per input channel
            space.require(xin, 2, f"'{w}' standardises each 1x1 filter over its inputs, which takes two")
    if g == 1:
        space.bind(w, 1, xin, "in")
        out = space.param_ids(w, 0, cout)
    elif ipg == 1:
        # Depthwise (with channel multiplier opg): input channel c owns filters c*opg..c*opg+opg-1,
        # so a channel is removed with its whole group and the conv stays depthwise.
        out = xin.repeat_interleave(opg)
        space.bind(w, 0, out, "pass")
        space.bind(w, 1, torch.full((1,), NONE, dtype=torch.long), "in")
    else:
        # Grouped conv: every group must keep the same width, so position j of each group goes
        # together (inputs and outputs alike) and `groups` stays unchanged.
        _tie_slices(space, xin, g)
        space.bind(w, 1, xin[:ipg], "in")
        out = space.param_ids(w, 0, cout)
        _tie_slices(space, out, g)
    if bias is not None:
        space.bind(bias, 0, out, "pass")
    out_shape = ctx.out_shape
    positions = math.prod(out_shape) // max(1, out_shape[axis])  # samples x output positions
    space.add_flops(positions * math.prod(w_shape[2:]), [(w, 0), (w, 1)])
    return along(out, axis, out_shape)


@takes_split
def conv(ctx: RuleContext, x: Tensor) -> Tensor:
    m: nn.modules.conv._ConvNd = ctx.module
    bias = ctx.param("bias") if m.bias is not None else None
    return _conv(ctx, x, ctx.param("weight"), tuple(m.weight.shape), m.groups, bias)


@takes_split
def conv_transpose(ctx: RuleContext, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """Transposed convolution (a decoder's upsampling): its weight is (in, out / groups, k...),
    input channels on dim 0 and each group's output positions on dim 1. ``output_size`` only sets
    the spatial size (torch ignores any batch and channel sizes in it)."""
    m: nn.modules.conv._ConvTransposeNd = ctx.module
    space, w = ctx.space, ctx.param("weight")
    g, (cin, opg) = m.groups, m.weight.shape[:2]
    axis = x.dim() + 1 - m.weight.dim()  # the channel axis: 1, or 0 for an unbatched input
    xin = _channel_ids(ctx, x, axis)
    if g == 1:
        space.bind(w, 0, xin, "in")
        out = space.param_ids(w, 1, opg)
    elif cin == g:
        # Depthwise (opg outputs per input channel): input channel c owns w[c] and outputs
        # c*opg..c*opg+opg-1, so the conv stays depthwise.
        out = xin.repeat_interleave(opg)
        space.bind(w, 0, xin, "pass")
        space.bind(w, 1, torch.full((opg,), NONE, dtype=torch.long), "out")
    else:
        # Grouped: output j of every group is computed by column j of its group's rows, so it is
        # one channel appearing once per group; inputs keep the same width in every group.
        _tie_slices(space, xin, g)
        space.bind(w, 0, xin, "in")
        out = space.param_ids(w, 1, opg).repeat(g)
    if m.bias is not None:
        space.bind(ctx.param("bias"), 0, out, "pass")
    # MACs: every input position meets every (in, out-per-group) weight pair of its group.
    positions = math.prod(x.shape) // max(1, x.shape[axis])  # samples x input positions
    space.add_flops(positions * math.prod(m.weight.shape[2:]), [(w, 0), (w, 1)])
    return along(out, axis, ctx.out_shape)


def _conv_signature(input: Any, weight: Any, bias: Any = None, stride: Any = 1, padding: Any = 0,
                    dilation: Any = 1, groups: int = 1) -> None:
    """F.conv1d/2d/3d's signature (builtins: ``inspect`` cannot read it)."""


_CONV_SIGNATURE = inspect.signature(_conv_signature)


@dataclass(frozen=True)
class StandardisedWeight:
    """A conv weight computed by weight standardisation from the parameter ``param``: each
    filter normalised over its fan-in by ``F.batch_norm`` in training mode on
    ``param.reshape(1, O, -1)`` (``filters``), times per-filter gains (``per_filter``: parameters
    holding one value per filter), reshaped back to the parameter's shape (timm's ``StdConv2d``
    and ``ScaledStdConv2d``: BiT ResNetV2, NFNets, NF-ResNets)."""

    param: str
    filters: fx.Node
    per_filter: tuple[str, ...]


# Ops that scale a per-filter gain by a constant (ScaledStdConv2d's ``gain * scale``).
_SCALINGS = {operator.mul, operator.truediv, torch.mul, torch.div, "mul", "div"}


def _per_filter_parameter(node: Any, filters: int) -> Optional[str]:
    """The parameter behind ``node`` when it is a vector of ``filters`` values read through views
    and scalings by plain numbers, else None."""
    while isinstance(node, fx.Node) and node.op in ("call_method", "call_function"):
        if node.target in _SCALINGS:
            if len(node.args) != 2 or node.kwargs or not isinstance(node.args[1], (int, float)):
                return None
        elif node.target in ("view", "reshape", "flatten", torch.reshape, torch.flatten):
            pass  # (a vector of ``filters`` values whatever the view: checked below)
        else:
            return None
        node = node.args[0]
    param = _parameter_of(node)
    if param is None:
        return None
    name, shape = param
    return name if shape and shape[0] == filters and math.prod(shape) == filters else None


def standardised_weight(weight: Any) -> Optional[StandardisedWeight]:
    """The :class:`StandardisedWeight` a conv's ``weight`` argument computes, or None."""
    if not (isinstance(weight, fx.Node) and weight.op == "call_method"
            and weight.target in ("reshape_as", "view_as") and len(weight.args) == 2):
        return None
    normed, raw = weight.args
    if not (isinstance(raw, fx.Node) and raw.op == "get_attr" and isinstance(normed, fx.Node)
            and normed.op == "call_function" and normed.target is F.batch_norm):
        return None
    param = _parameter_of(raw)
    if param is None or len(param[1]) < 2:
        return None
    a = _BATCH_NORM_SIGNATURE.bind(*normed.args, **normed.kwargs).arguments
    filters = a["input"]
    if (a.get("running_mean") is not None or a.get("running_var") is not None or a.get("training") is not True
            or not (isinstance(filters, fx.Node) and filters.op == "call_method"
                    and filters.target in ("reshape", "view") and filters.args[0] is raw)):
        return None
    name, shape = param
    sizes = list(filters.args[1]) if len(filters.args) == 2 and isinstance(filters.args[1], (tuple, list)) \
        else list(filters.args[1:])
    if sizes not in ([1, shape[0], -1], [1, shape[0], math.prod(shape[1:])]):
        return None
    per_filter = []
    for key in ("weight", "bias"):
        if a.get(key) is not None:
            gain = _per_filter_parameter(a[key], shape[0])
            if gain is None:
                return None
            per_filter.append(gain)
    return StandardisedWeight(name, filters, tuple(per_filter))


_computed_weight = kept_whole("whose weight is computed in the graph, not read from a parameter (only "
                              "weight standardisation as timm writes it is understood)")


@takes_split
def conv_fn(ctx: RuleContext, x: Tensor, weight: Any, *args: Any, **kwargs: Any) -> Tensor:
    """``F.conv2d(x, self.weight, ...)`` on a parameter or buffer read by ``get_attr`` (a fixed
    blur filter, a functional layer): as the Conv module. A standardised weight
    (:class:`StandardisedWeight`) is its parameter's, with the per-filter gains as per-channel
    state; each filter's statistics span its input channels, so those are prunable but not
    exactly. Any other computed weight has no parameter to slice: its inputs stay whole."""
    a = _CONV_SIGNATURE.bind(*ctx.node.args, **ctx.node.kwargs).arguments
    w, b = weight_param(ctx.node), a.get("bias")
    std = standardised_weight(a["weight"]) if w is None else None
    if is_labels(x) and w is None and std is None and isinstance(a["weight"], fx.Node):
        return _computed_weight(ctx, x, weight, *args, **kwargs)
    if not is_labels(x) or (w is None and std is None) or (isinstance(b, fx.Node) and b.op != "get_attr"):
        return opaque(ctx, x, weight, *args, **kwargs)
    out = _conv(ctx, x, w or std.param, tuple(weight.shape), int(a.get("groups", 1)),
                b.target if isinstance(b, fx.Node) else None,
                None if std is None else f"the weight standardisation of '{std.param}' normalises each "
                                         "filter over its input channels")
    if std is not None:
        ids = ctx.space.param_ids(std.param, 0, weight.shape[0])
        for gain in std.per_filter:
            ctx.space.bind(gain, 0, ids, "pass")
    return out


def _resize_filters_view(std: StandardisedWeight) -> None:
    """``weight.reshape(1, O, -1)`` of a standardised weight: O follows the sliced parameter."""
    owner_name, _, attr = std.param.rpartition(".")
    root = std.filters.graph.owning_module
    filters = getattr(root.get_submodule(owner_name) if owner_name else root, attr).shape[0]
    args = std.filters.args
    if len(args) == 2 and isinstance(args[1], (tuple, list)):
        std.filters.args = (args[0], type(args[1])([args[1][0], filters, *args[1][2:]]))
    else:
        std.filters.args = (args[0], args[1], filters, *args[3:])


def rewrite_conv_fn(node: fx.Node, module: Any, keep: KeepView) -> None:
    """A functional conv's standardised weight is viewed as its pruned filter count; a depthwise
    one's ``groups`` literal follows that count."""
    a = _CONV_SIGNATURE.bind(*node.args, **node.kwargs).arguments
    groups, w = a.get("groups", 1), weight_param(node)
    std = standardised_weight(a["weight"]) if w is None else None
    if std is not None:
        w = std.param
        _resize_filters_view(std)
    if w is None or not isinstance(groups, int) or groups == 1:
        return
    owner_name, _, attr = w.rpartition(".")
    owner = node.graph.owning_module.get_submodule(owner_name)
    shape = getattr(owner, attr).shape
    ipg = shape[1]
    if ipg != 1:
        return  # grouped: the group count never changes
    old = keep.labels(node)
    opg = old.shape[1] // groups if old is not None and old.dim() > 1 else 1
    new_groups = shape[0] // opg
    if new_groups != groups:
        if len(node.args) > 6:
            node.args = node.args[:6] + (new_groups,) + node.args[7:]
        else:
            node.kwargs = {**node.kwargs, "groups": new_groups}


def _read_state(*args: Any) -> Optional[list[fx.Node]]:
    """The ``get_attr`` nodes among a functional layer's state arguments (absent ones skipped),
    or None if any is computed in the graph: then there is no parameter to slice."""
    nodes = [a for a in args if isinstance(a, fx.Node)]
    return nodes if all(n.op == "get_attr" for n in nodes) else None


def _bind_per_channel(ctx: RuleContext, x: Tensor, axis: int, tensors: dict[str, Any]) -> Tensor:
    """Bind each per-channel tensor (qualified name -> value) to ``x``'s channels along ``axis``."""
    ids = _channel_ids(ctx, x, axis) if x.dim() > 1 else axis_ids(x, 0)
    for name, t in tensors.items():
        if isinstance(t, Tensor) and t.dim() >= 1 and t.shape[0] == ids.numel():
            ctx.space.bind(name, 0, ids, "pass")
    return x


def channel_affine(*params: str, axis: int = 1) -> Propagate:
    """Per-channel state along ``axis`` (BatchNorm, affine InstanceNorm, PReLU): exact to prune."""

    def rule(ctx: RuleContext, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return _bind_per_channel(ctx, x, axis, {ctx.param(p): getattr(ctx.module, p, None) for p in params})

    return takes_split(rule)


_BN_STATE = ("weight", "bias", "running_mean", "running_var")


def batch_norm_of(module: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    """``module``'s BatchNorm alone, run as ``nn.BatchNorm`` runs it (batch statistics and running
    statistics updates in training mode, the running ones in eval mode). The trace puts it in place
    of ``F.batch_norm`` calls that a BatchNorm subclass makes on its own state in its own forward
    (timm's ``BatchNormAct2d``: BatchNorm, then dropout and activation), see
    :func:`apib_fx.trace.module_batch_norms`."""
    return nn.modules.batchnorm._BatchNorm.forward(module, x)


def branch_check(condition: bool, taken: bool, message: str) -> None:
    """The check a graph traced through a branch on its input's shape makes (see
    ``apib_fx.trace._Tracer.to_bool``): ``condition`` is ``taken``, as it was for the example inputs.
    One call, not a comparison in the graph: exporters evaluate it on their own traced sizes."""
    if bool(condition) != taken:
        raise AssertionError(message)


@takes_split
def module_batch_norm(ctx: RuleContext, module: nn.Module, x: Tensor) -> Tensor:
    path = ctx.arg_node(0).target
    return _bind_per_channel(ctx, x, 1, {f"{path}.{p}": getattr(module, p, None) for p in _BN_STATE})


def resize_module_batch_norm(node: fx.Node, module: Any, keep: KeepView) -> None:
    owner = node.graph.owning_module.get_submodule(node.args[0].target)
    resize_channels("num_features")(node, owner, keep)


@takes_split
def batch_norm_fn(ctx: RuleContext, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """``F.batch_norm(x, running_mean, running_var, weight, bias, ...)`` on state read by
    ``get_attr``: per-channel, exact to prune. State computed in the graph keeps them whole."""
    values = _BATCH_NORM_SIGNATURE.bind(x, *args, **kwargs).arguments
    nodes = _BATCH_NORM_SIGNATURE.bind(*ctx.node.args, **ctx.node.kwargs).arguments
    keys = [k for k in ("running_mean", "running_var", "weight", "bias") if isinstance(nodes.get(k), fx.Node)]
    state = _read_state(*(nodes[k] for k in keys))
    if state is None:
        return opaque(ctx, x, *args, **kwargs)
    return _bind_per_channel(ctx, x, 1, {n.target: values[k] for n, k in zip(state, keys)})


_BATCH_NORM_SIGNATURE = inspect.signature(F.batch_norm)


def _normalized(ctx: RuleContext, x: Tensor, k: int, weights: list[Optional[str]]) -> Tensor:
    """LayerNorm over the last ``k`` axes: per-channel weights are exact to slice, but the
    statistics mix channels, so pruning changes the other channels' values."""
    axes = [a for a in varying_axes(x) if a >= x.dim() - k]
    if not axes:
        return x
    if len(axes) > 1:
        ctx.space.block(x, f"normalised over several channel axes by {ctx.op_name}")
        return x
    ctx.space.mark_mixed(x, f"{ctx.op_name} normalises across them")
    dim = axes[0] - (x.dim() - k)
    for name in weights:
        if name is not None:
            ctx.space.bind(name, dim, axis_ids(x, axes[0]), "pass")
    return x


def layer_norm(ctx: RuleContext, x: Tensor) -> Tensor:
    m: nn.LayerNorm = ctx.module
    names = [ctx.param(p) for p in ("weight", "bias") if getattr(m, p, None) is not None]
    return _normalized(ctx, x, len(m.normalized_shape), names)


def layer_norm_fn(ctx: RuleContext, x: Tensor, normalized_shape: Any, *args: Any, **kwargs: Any) -> Tensor:
    state = _read_state(ctx.arg_node(2, "weight"), ctx.arg_node(3, "bias"))
    if state is None:
        return opaque(ctx, x)
    return _normalized(ctx, x, len(tuple(normalized_shape)), [n.target for n in state])


def rms_norm_fn(ctx: RuleContext, x: Tensor, normalized_shape: Any, *args: Any, **kwargs: Any) -> Tensor:
    state = _read_state(ctx.arg_node(2, "weight"))
    if state is None:
        return opaque(ctx, x)
    return _normalized(ctx, x, len(tuple(normalized_shape)) if isinstance(normalized_shape, (tuple, list)) else 1,
                       [n.target for n in state])


def whole_groups(num_groups: int, channels: int) -> bool:
    """How a GroupNorm of ``num_groups`` over ``channels`` loses channels. Whole groups (True):
    exact, every kept group normalises the same values as before, and ``num_groups`` shrinks.
    Otherwise position j of every group goes together: ``num_groups`` stays and every group's
    statistics change. Whole groups unless that leaves fewer units to remove (GroupNorm(1, C), or
    wide groups: GroupNorm(32, 2048) has 32 groups of 64)."""
    return num_groups * num_groups >= channels


def _group_norm(ctx: RuleContext, x: Tensor, num_groups: int, weights: list[str]) -> Tensor:
    ids = _channel_ids(ctx, x, 1)
    per = ids.numel() // num_groups
    groups = ids.view(num_groups, per)
    # Channels that go together must all be channels: a group (or a position) that also holds
    # values with no prunable channel (the model input concatenated in) cannot lose only some.
    if whole_groups(num_groups, ids.numel()):
        ctx.space.unify(groups, groups[:, :1].expand(num_groups, per))
    else:
        ctx.space.unify(groups, groups[:1].expand(num_groups, per))
        ctx.space.mark_mixed(x, f"{ctx.op_name} normalises across them")
    for name in weights:
        ctx.space.bind(name, 0, ids, "pass")
    return x


@takes_split
def group_norm(ctx: RuleContext, x: Tensor) -> Tensor:
    m: nn.GroupNorm = ctx.module
    return _group_norm(ctx, x, m.num_groups, [ctx.param(p) for p in ("weight", "bias")] if m.affine else [])


@takes_split
def group_norm_fn(ctx: RuleContext, x: Tensor, num_groups: int, *args: Any, **kwargs: Any) -> Tensor:
    """``F.group_norm(x, groups, self.weight, self.bias)`` on ``get_attr`` parameters (timm's
    GroupNorm1): as nn.GroupNorm."""
    state = _read_state(ctx.arg_node(2, "weight"), ctx.arg_node(3, "bias"))
    if state is None:
        return opaque(ctx, x, num_groups, *args, **kwargs)
    return _group_norm(ctx, x, int(num_groups), [n.target for n in state])


def _channels_along(space: LabelSpace, t: Tensor, axis: int) -> Tensor:
    """Ids along ``axis`` if channels change along it, else NONE: a label repeated along a token
    axis, or tied across heads, says nothing about that axis' size."""
    axis %= t.dim()
    if axis in space.class_varying_axes(t):
        return axis_ids(t, axis)
    return torch.full((t.shape[axis],), NONE, dtype=torch.long)


def sdpa(ctx: RuleContext, q: Any, k: Any, v: Any, attn_mask: Any = None, *args: Any, **kwargs: Any) -> Any:
    """``F.scaled_dot_product_attention(q, k, v)``: q and k are contracted over their last axis
    (their channels there go together); the output carries v's. Channels on batch axes are heads
    (``heads="whole"``): a head of q, k and v goes together, and where k and v are shared by the
    heads (multi-query attention) the output's heads are q's. Channels on the sequence axes, or in
    the mask, are kept whole. The default scale 1/sqrt(E) is frozen by the rewrite, so removing
    head dims does not change the softmax temperature."""
    if not all(is_labels(t) and t.dim() >= 2 for t in (q, k, v)):
        return opaque(ctx, q, k, v, attn_mask, *args, **kwargs)
    space = ctx.space
    out_shape = ctx.out_shape
    nd = len(out_shape)
    varying_q, varying_k, varying_v = (space.class_varying_axes(t) for t in (q, k, v))
    for t, varying in ((q, varying_q), (k, varying_k), (v, varying_v)):
        if t.dim() - 2 in varying or (t.dim() - 1 in varying and len(varying) > 1):
            space.block(t, f"on an axis of {ctx.op_name} other than the features or the heads")
    if is_labels(attn_mask):
        space.block(attn_mask, f"used as the mask of {ctx.op_name}")
    if q.dim() - 1 in varying_q or k.dim() - 1 in varying_k:  # head dims: contracted together
        space.link(*torch.broadcast_tensors(compress(q).narrow(-2, 0, 1), compress(k).narrow(-2, 0, 1)))
    _pair_batch_axes(ctx, q, k, nd)
    _pair_batch_axes(ctx, q, v, nd)
    name = ctx.node.name
    q_heads = compress(q).narrow(-1, 0, 1).narrow(-2, 0, 1).expand(*out_shape[:-2], 1, 1)
    dims, fixed = _batch_axes_flops(space, name, q_heads)  # heads whose count changes
    coef = fixed * out_shape[-2] * k.shape[-2]  # batch x heads x L x S
    for tag, t in (("E", q), ("Ev", v)):
        key = f"{name}#{tag}"
        space.bind(key, 0, _channels_along(space, t, -1), "axis")
        space.add_flops(coef, dims + [(key, 0)])
    ctx.node.meta["apib_sdpa_scale"] = 1.0 / math.sqrt(q.shape[-1])
    out = compress(v).narrow(-2, 0, 1).expand(out_shape)
    if not varying_v and any(a < q.dim() - 2 for a in varying_q):
        out = q_heads.expand(out_shape)  # k and v shared by q's heads
    return tie_outer(space, canonical(out))


def _batch_axes_flops(space: LabelSpace, name: str, full: Tensor) -> tuple[list[tuple[str, int]], int]:
    """The batch axes (all but the last two) of a product's output ``full``: the FLOPs dims of
    those along which channels change (heads, bound as ``name#B<i>``), and the product of the
    others' sizes."""
    dims, fixed = [], 1
    for i, n in enumerate(full.shape[:-2]):
        along = _channels_along(space, full, i) if n > 1 else None
        if along is not None and bool((along != NONE).any()):
            space.bind(f"{name}#B{i}", 0, along, "axis")
            dims.append((f"{name}#B{i}", 0))
        else:
            fixed *= n
    return dims, fixed


def freeze_sdpa_scale(node: fx.Node, module: Any, keep: KeepView) -> None:
    """Give the attention its original scale explicitly (the default follows the pruned width)."""
    scale = node.meta.get("apib_sdpa_scale")
    if scale is not None and node.kwargs.get("scale") is None and len(node.args) < 7:
        node.kwargs = {**node.kwargs, "scale": scale}


def _pair_batch_axes(ctx: RuleContext, a: Tensor, b: Tensor, nd: int) -> None:
    """The batch axes of a matrix product pair up elementwise, as in a broadcast: channels on one
    (heads mixed by a layer, as in talking-heads attention) must meet the same channels on the
    other operand, or a size-1 axis; against a fixed-size axis they are kept whole."""
    space = ctx.space
    sides = []
    for t in (a, b):
        lead = nd - t.dim()
        varying = {ax + lead for ax in space.class_varying_axes(t) if ax < t.dim() - 2}
        sides.append((t, lead, varying))
    for (t, lead, varying), (u, u_lead, u_varying) in ((sides[0], sides[1]), (sides[1], sides[0])):
        for ax in sorted(varying):
            u_ax = ax - u_lead
            if u_ax < 0 or u.shape[u_ax] == 1:
                continue  # the other side broadcasts along it
            if ax in u_varying:
                ids, u_ids = axis_ids(t, ax - lead), axis_ids(u, u_ax)
                if ids.numel() == u_ids.numel():
                    on = (ids != NONE) & (u_ids != NONE)
                    space.link(ids[on], u_ids[on])
                    continue
            space.block(t, f"meet a batch axis without the same channels in {ctx.op_name}")
            return


def _parameter_matrix(node: Any) -> Optional[tuple[str, int]]:
    """(name, the dim it contracts) of the right operand of ``x @ W`` read straight from a
    parameter (dim 0) or transposed (``W.t()``, ``W.T``, ``W.transpose(0, 1)``: dim 1)."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        return node.target, 0
    inner = node.args[0] if node.args else None
    if not (isinstance(inner, fx.Node) and inner.op == "get_attr") or node.kwargs:
        return None
    rest = node.args[1:]
    transposed = (
        (node.target in ("t", torch.t) and not rest)
        or (node.target in ("transpose", torch.transpose) and len(rest) == 2 and {d % 2 for d in rest} == {0, 1}
            and all(isinstance(d, int) for d in rest))
        or (node.target is getattr and rest in (("T",), ("mT",)))
    )
    meta = inner.meta.get("tensor_meta")
    return (inner.target, 1) if transposed and meta is not None and len(meta.shape) == 2 else None


def matmul(ctx: RuleContext, a: Any, b: Any) -> Any:
    """(..., M, K) @ (..., K, N): the contraction channels of both sides go together; M comes from
    ``a`` and N from ``b``. The sizes enter FLOPs as activation axes."""
    if not (is_labels(a) and is_labels(b)) or a.dim() < 2 or b.dim() < 2:
        return opaque(ctx, a, b)
    return _matmul(ctx, a, b, _parameter_matrix(ctx.arg_node(1)), ctx.out_shape)


def _matmul(ctx: RuleContext, a: Tensor, b: Tensor, w: Optional[tuple[str, int]],
            out_shape: tuple[int, ...]) -> Tensor:
    """:func:`matmul` on labels ``a``, ``b``; ``w``: (name, contracted dim) when ``b`` is read
    straight from a parameter matrix; ``out_shape``: the product's shape."""
    space = ctx.space
    ka, kb = torch.broadcast_tensors(compress(a).select(-2, 0), compress(b).select(-1, 0))
    # Only labels that vary along an operand's contracted axis are channels of that axis; labels
    # constant along it belong to its other axes (a GC block's x (C, HW) @ softmax map (HW, 1),
    # whose one channel is no channel of x's).
    if a.dim() - 1 not in space.class_varying_axes(a):
        ka = torch.full_like(ka, NONE)
    if b.dim() - 2 not in space.class_varying_axes(b):
        kb = torch.full_like(kb, NONE)
    space.link(ka, kb)
    # Contracted against values without these channels: a parameter matrix (x @ W, x @ W.t(), a
    # relative-position table) reads them like a Linear layer; anything else of fixed size (a
    # computed table) keeps them.
    for ids, other in ((ka, kb), (kb, ka)):
        lone = (ids != NONE) & (other == NONE)
        if not bool(lone.any()):
            continue
        if ids is ka and w is not None and b.dim() == 2 and bool((kb == NONE).all()):
            space.bind(w[0], w[1], axis_ids(a, -1), "in")
        else:
            space.block(ids[lone], f"contracted with values without these channels in {ctx.op_name}")
    rows = compress(a).narrow(-1, 0, 1).expand(*a.shape[:-1], 1)
    cols = compress(b).narrow(-2, 0, 1).expand(*b.shape[:-2], 1, b.shape[-1])
    # Channels on the contracted axis are summed away. Where an operand's labels also vary along
    # its other axes only because the same channels were spread there (q's heads, tied by
    # tie_outer), the output carries no channel; other channels there would span two axes.
    for operand, contracted, side in ((a, a.dim() - 1, "rows"), (b, b.dim() - 2, "cols")):
        varying = space.class_varying_axes(operand)
        if contracted in varying:
            if len(varying) > 1:
                space.block(operand, f"spread over a contracted and another axis of {ctx.op_name}")
            if side == "rows":
                rows = unlabeled(rows.shape)
            else:
                cols = unlabeled(cols.shape)
    _pair_batch_axes(ctx, a, b, len(out_shape))
    rows, cols = torch.broadcast_tensors(rows, cols)
    small_rows, small_cols = torch.broadcast_tensors(compress(rows), compress(cols))
    both = (small_rows != NONE) & (small_cols != NONE)
    # Both sides carry channels at the same positions: fine where they are one channel (a head's,
    # paired along a batch axis), else they would span two axes.
    if bool(both.any()) and not bool((space.classes(small_rows[both]) == space.classes(small_cols[both])).all()):
        space.block(cols, f"would span two channel axes of the output of {ctx.op_name}")
    out = torch.where(rows != NONE, rows, cols)
    name = ctx.node.name

    def channels_along(t: Tensor, axis: int) -> Tensor:
        return _channels_along(space, t, axis)

    dims = []
    for axis, ids in (("M", channels_along(a, -2)), ("K", channels_along(a, -1)), ("N", channels_along(b, -1))):
        key = (f"{name}#{axis}", 0)
        space.bind(key[0], 0, ids, "axis")
        dims.append(key)
    batch_dims, coef = _batch_axes_flops(space, name, out.expand(out_shape))
    space.add_flops(coef, dims + batch_dims)
    return tie_outer(space, canonical(out.expand(out_shape)))


def _einsum_form(equation: Any, shapes: list[tuple[int, ...]]) -> Optional[tuple[str, str, str]]:
    """The subscripts (a, b, out) of a two-operand ``torch.einsum`` that is one matrix product:
    letters in both operands and the output are batch axes, one letter in both operands only is
    contracted, and the letters of each operand alone go to the output. None for any other form
    (ellipsis, a letter repeated in an operand, summed in one operand only, two contracted)."""
    if not isinstance(equation, str) or len(shapes) != 2:
        return None
    eq = equation.replace(" ", "")
    lhs, arrow, out = eq.partition("->")
    terms = lhs.split(",")
    if "." in eq or len(terms) != 2:
        return None
    a, b = terms
    if not arrow:  # implicit output: the letters seen once, in alphabetical order
        out = "".join(sorted(c for c in set(a + b) if (a + b).count(c) == 1))
    if any(len(set(t)) != len(t) for t in (a, b, out)) or not all(c.isalpha() for c in a + b + out):
        return None
    if len(a) != len(shapes[0]) or len(b) != len(shapes[1]) or not set(out) <= set(a) | set(b):
        return None
    contracted = [c for c in a if c in b and c not in out]
    if len(contracted) != 1 or any(c not in out for c in a + b if c not in contracted and (c in a) != (c in b)):
        return None
    return a, b, out


def _einsum_operands(rest: Sequence[Any]) -> list[Any]:
    """An einsum's operands, passed one by one (``einsum(eq, a, b)``) or as a list."""
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        return list(rest[0])
    return list(rest)


def einsum(ctx: RuleContext, equation: Any, *operands: Any) -> Any:
    """``torch.einsum`` of two operands that is one matrix product (``"bhid,bhjd->bhij"``: attention
    written as an einsum, as in MaxViT; ``"bchw,oc->bohw"``: a Linear over channels): the operands'
    labels are laid out as ``(batch..., M, K) @ (..., K, N)`` (the letters of each operand alone
    flattened into M and N) and take :func:`matmul`'s rule, a parameter operand reading its
    contracted channels like a Linear layer. Other forms keep their channels whole."""
    operands = _einsum_operands(operands)
    shapes = [tuple(t.shape) if isinstance(t, Tensor) else () for t in operands]
    form = _einsum_form(equation, shapes)
    if form is None or not all(is_labels(t) for t in operands):
        return opaque(ctx, equation, *operands)
    nodes = _einsum_operands(ctx.node.args[1:])
    (sa, sb, out), (a, b) = form, operands
    # A parameter operand goes on the right, where matmul reads a parameter matrix.
    if _parameter_matrix(nodes[0]) is not None and _parameter_matrix(nodes[1]) is None:
        (sa, a), (sb, b) = (sb, b), (sa, a)
        nodes.reverse()
    k = next(c for c in sa if c in sb and c not in out)
    batch = [c for c in out if c in sa and c in sb]
    free_a = [c for c in sa if c not in sb]
    free_b = [c for c in sb if c not in sa]
    size = dict(zip(sa, a.shape)) | dict(zip(sb, b.shape))
    m, n = math.prod(size[c] for c in free_a), math.prod(size[c] for c in free_b)
    lhs = a.permute([sa.index(c) for c in batch + free_a + [k]]).reshape(*[size[c] for c in batch], m, size[k])
    rhs = b.permute([sb.index(c) for c in batch + [k] + free_b]).reshape(*[size[c] for c in batch], size[k], n)
    w = None
    if len(sb) == 2 and not batch and nodes[1] is not None:
        w = _parameter_matrix(nodes[1])
        w = (w[0], (w[1] + sb.index(k)) % 2) if w is not None else None  # the dim holding k
    prod = _matmul(ctx, lhs, rhs, w, (*[size[c] for c in batch], m, n))
    prod = prod.reshape(*[size[c] for c in batch + free_a + free_b])
    order = batch + free_a + free_b
    return tie_outer(ctx.space, canonical(prod.permute([order.index(c) for c in out])))


def einsum_inputs(node: fx.Node) -> list[tuple[Any, int]]:
    """(operand, axis of the contracted letter) of a two-operand einsum of :func:`einsum`'s form."""
    operands = _einsum_operands(node.args[1:])
    metas = [o.meta.get("tensor_meta") if isinstance(o, fx.Node) else None for o in operands]
    if len(operands) != 2 or any(m is None or not hasattr(m, "shape") for m in metas):
        return []
    form = _einsum_form(node.args[0], [tuple(m.shape) for m in metas])
    if form is None:
        return []
    a, b, out = form
    k = next(c for c in a if c in b and c not in out)
    return [(operands[0], a.index(k)), (operands[1], b.index(k))]


def placeholder_output(ctx: RuleContext, *args: Any, **kwargs: Any) -> Any:
    return ctx.unlabeled_output()


def flatten_module(ctx: RuleContext, x: Tensor) -> Tensor:
    return _relabeled(ctx.space, torch.flatten(x, ctx.module.start_dim, ctx.module.end_dim))


# --------------------------------------------------------------------------------------------
# Rewrite rules (run on the copied GraphModule after parameters were sliced)


def _new_sizes(node: fx.Node, keep: KeepView) -> Optional[list[int]]:
    labels = keep.labels(node)
    if not is_labels(labels):
        return None
    return [keep.size_along(labels, a) for a in range(labels.dim())]


def rewrite_shape_args(node: fx.Node, module: Any, keep: KeepView) -> None:
    """``view``/``reshape``/``expand``: replace literal sizes of resized axes, and sizes computed
    from channel counts (recorded by :func:`reshape`) by the new size of their axis."""
    if _resize_parameter_view(node):
        return
    sizes = _new_sizes(node, keep)
    old = list(node.meta["tensor_meta"].shape) if "tensor_meta" in node.meta else None
    channel_sized = set(node.meta.get("apib_channel_sized", ()))
    if sizes is None or old is None or (sizes == old and not channel_sized):
        return
    args = list(node.args)
    packed = len(args) == 2 and isinstance(args[1], (tuple, list))
    shape = list(args[1] if packed else args[1:])
    if len(shape) != len(sizes):
        return
    for i, (s, new, was) in enumerate(zip(shape, sizes, old)):
        # A size computed in the graph from sizes that are not channel counts (``C // heads`` with
        # ``C`` read off the unlabeled model input) was as fixed as a literal: it goes the same way.
        # One that the pruned model computes right by itself stays computed: ``B * C * rows`` with
        # C read off the pruned tensor (a literal would fix the batch size it was traced with).
        if i in channel_sized or ((isinstance(s, fx.Node) or (isinstance(s, int) and s != -1)) and new != was):
            if not (isinstance(s, fx.Node) and i not in channel_sized and _size_after(s, keep) == new):
                shape[i] = new
    node.args = (args[0], type(args[1])(shape)) if packed else (args[0], *shape)


def _size_after(node: Any, keep: KeepView, depth: int = 0) -> Any:
    """The value a size expression of the graph (``B * C * rows``, read off tensors' shapes through
    Python arithmetic) takes in the pruned model, at the traced batch and spatial sizes; None
    where it reads anything else."""
    if not isinstance(node, fx.Node):
        return node if isinstance(node, (int, float)) and not isinstance(node, bool) else None
    if depth > 32:
        return None
    if node.op == "call_method" and node.target == "size" or (
            node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",)):
        labels = keep.labels(node.args[0])
        if not is_labels(labels):
            return None
        dim = node.args[1] if node.op == "call_method" and len(node.args) > 1 else node.kwargs.get("dim")
        if dim is not None:
            return keep.size_along(labels, dim) if isinstance(dim, int) else None
        return tuple(keep.size_along(labels, a) for a in range(labels.dim()))
    if node.op != "call_function" or node.kwargs or getattr(node.target, "__module__", None) not in ("_operator", "math"):
        return None
    args = [_size_after(a, keep, depth + 1) if isinstance(a, fx.Node) else a for a in node.args]
    if any(a is None for a in args):
        return None
    try:
        return node.target(*args)
    except Exception:
        return None


def rewrite_split(node: fx.Node, module: Any, keep: KeepView) -> None:
    """``split``/``chunk`` along a channel axis: give the new piece sizes explicitly."""
    pieces = keep.labels(node)
    if not isinstance(pieces, (tuple, list)) or not pieces:
        return
    args = list(node.args)
    kwargs = dict(node.kwargs)
    dim = kwargs.pop("dim", args[2] if len(args) > 2 else 0)
    dim = dim % pieces[0].dim()
    new = [keep.size_along(p, dim) for p in pieces]
    old = [p.shape[dim] for p in pieces]
    if new == old:
        return
    if node.op == "call_method":
        node.target = "split"
    else:
        node.target = torch.split
    node.args = (args[0], new)
    node.kwargs = {"dim": dim}


def _moved_bounds(keep: KeepView, labels: Tensor, axis: int) -> Optional[Callable[[Optional[int]], Optional[int]]]:
    """Slice bound along ``axis`` before pruning -> the same bound counting only kept positions;
    None when nothing along the axis goes."""
    kept = keep.kept_along(labels, axis)
    if bool(kept.all()):
        return None  # channels vary along this axis (tokens of two producers), none go
    n = kept.numel()
    prefix = torch.cat([torch.zeros(1, dtype=torch.long), kept.long().cumsum(0)])

    def moved(b: Optional[int]) -> Optional[int]:
        if b is None:
            return None
        b = max(0, min(n, b + n if b < 0 else b))
        return int(prefix[b])

    return moved


def freeze_channel_values(node: fx.Node, module: Any, keep: KeepView) -> None:
    """Numbers computed from channel counts and used as values in elementwise arithmetic
    (``x / C ** 0.5``, ``x * C``) become their unpruned literals, so the pruned model computes the
    same function of the channels it keeps."""
    frozen = node.meta.get("apib_frozen")
    if not frozen:
        return
    args, kwargs = list(node.args), dict(node.kwargs)
    for key, value in frozen.items():
        if isinstance(key, int) and key < len(args):
            args[key] = value
        elif key in kwargs:
            kwargs[key] = value
    node.args, node.kwargs = tuple(args), kwargs


def rewrite_getitem(node: fx.Node, module: Any, keep: KeepView) -> None:
    """Slices along a channel axis (``x[:, :32]``, ``y[:, :C // 2]``): count only the kept
    positions; a bound the graph computes becomes the literal of its new value."""
    src = node.args[0]
    labels = keep.labels(src)
    if not is_labels(labels):
        return
    index = node.args[1]
    items = index if isinstance(index, tuple) else (index,)
    varying = set(varying_axes(labels))
    new_items = list(items)
    traced = node.meta.get("apib_slice_bounds", {})
    for i, axis in _index_axes(index, labels.dim()):
        item = items[i]
        if axis in varying and isinstance(item, slice):
            moved = _moved_bounds(keep, labels, axis)
            if moved is not None:
                start, stop = (traced[i][k] if isinstance(b, fx.Node) and i in traced else b
                               for k, b in enumerate((item.start, item.stop)))
                new_items[i] = slice(moved(start), moved(stop), item.step)
    node.args = (src, tuple(new_items) if isinstance(index, tuple) else new_items[0])


def rewrite_narrow(node: fx.Node, module: Any, keep: KeepView) -> None:
    """``x.narrow(dim, start, length)`` along a channel axis: bounds over the kept positions."""
    labels = keep.labels(node.args[0])
    if not is_labels(labels) or len(node.args) != 4 or not all(type(a) is int for a in node.args[1:]):
        return
    dim, start, length = node.args[1:]
    d = dim % labels.dim()
    if d not in varying_axes(labels):
        return
    moved = _moved_bounds(keep, labels, d)
    if moved is not None:
        start = start + labels.shape[d] if start < 0 else start
        new_start = moved(start)
        node.args = (node.args[0], dim, new_start, moved(start + length) - new_start)


def rewrite_unflatten(node: fx.Node, module: Any, keep: KeepView) -> None:
    """``unflatten(dim, sizes)``: literal sizes of resized axes become their new sizes."""
    new = _new_sizes(node, keep)
    old = list(node.meta["tensor_meta"].shape) if "tensor_meta" in node.meta else None
    args = list(node.args)
    if new is None or old is None or new == old or len(args) < 3:
        return
    dim = args[1] % (len(old) - len(args[2]) + 1)  # in the input's rank
    sizes = [s if s == -1 or new[dim + i] == old[dim + i] else new[dim + i] for i, s in enumerate(args[2])]
    args[2] = type(args[2])(sizes)
    node.args = tuple(args)


def rewrite_layer_norm_fn(node: fx.Node, module: Any, keep: KeepView) -> None:
    sizes = _new_sizes(node, keep)
    if sizes is None:
        return
    args = list(node.args)
    k = len(tuple(args[1]))
    args[1] = type(args[1])(sizes[len(sizes) - k:]) if isinstance(args[1], (tuple, list)) else sizes[-1]
    node.args = tuple(args)


def _groups_after(num_groups: int, channels: int, kept: int) -> int:
    return kept // (channels // num_groups) if whole_groups(num_groups, channels) else num_groups


def resize_group_norm(node: fx.Node, m: nn.Module, keep: KeepView) -> None:
    sizes = _new_sizes(node, keep)
    kept = m.weight.shape[0] if m.affine else (sizes[1] if sizes is not None and len(sizes) > 1 else None)
    if kept is not None:
        m.num_groups = _groups_after(m.num_groups, m.num_channels, kept)
        m.num_channels = kept


def rewrite_group_norm_fn(node: fx.Node, module: Any, keep: KeepView) -> None:
    sizes = _new_sizes(node, keep)
    if sizes is None or len(sizes) < 2 or "tensor_meta" not in node.meta:
        return
    # F.group_norm hands its arguments to __torch_function__ by position: the graph has them so.
    args = list(node.args)
    args[1] = _groups_after(args[1], node.meta["tensor_meta"].shape[1], sizes[1])
    node.args = tuple(args)


def resize_conv(node: fx.Node, m: nn.Module, keep: KeepView) -> None:
    w = m.weight
    opg = m.out_channels // m.groups
    if m.in_channels // m.groups == 1 and m.groups > 1:  # depthwise stays depthwise
        m.groups = w.shape[0] // opg
    m.out_channels = w.shape[0]
    m.in_channels = m.groups * w.shape[1]


def resize_conv_transpose(node: fx.Node, m: nn.Module, keep: KeepView) -> None:
    w = m.weight  # (in, out / groups, k...)
    if m.in_channels == m.groups > 1:  # depthwise stays depthwise
        m.groups = w.shape[0]
    m.in_channels = w.shape[0]
    m.out_channels = w.shape[1] * m.groups


def resize_linear(node: fx.Node, m: nn.Module, keep: KeepView) -> None:
    m.out_features, m.in_features = m.weight.shape


def resize_channels(attr: str, params: tuple[str, ...] = ("weight", "running_mean")) -> Rewrite:
    def rewrite(node: fx.Node, m: nn.Module, keep: KeepView) -> None:
        for p in params:
            t = getattr(m, p, None)
            if isinstance(t, Tensor) and t.dim() >= 1:
                setattr(m, attr, t.shape[0])
                return
        sizes = _new_sizes(node, keep)
        if sizes is not None and len(sizes) > 1:
            setattr(m, attr, sizes[1])

    return rewrite


def resize_layer_norm(node: fx.Node, m: nn.Module, keep: KeepView) -> None:
    sizes = _new_sizes(node, keep)
    if sizes is not None:
        m.normalized_shape = tuple(sizes[len(sizes) - len(m.normalized_shape):])


# --------------------------------------------------------------------------------------------
# Output shapes of common layers, without running them (Rule.shape)


def _fits(m: nn.Module, x: Tensor, like: Optional[Tensor]) -> bool:
    """An input the layer takes as it is: a float tensor of its parameters' dtype and device."""
    return (isinstance(x, Tensor) and x.is_floating_point()
            and (like is None or (x.dtype == like.dtype and x.device == like.device)))


def _window_out(size: int, k: int, s: int, p: int, d: int, ceil: bool) -> int:
    """Output length of a conv or pooling window (torch's formula, ceil_mode's last-window rule)."""
    span = size + 2 * p - d * (k - 1) - 1
    out = (-(-span // s) if ceil else span // s) + 1
    if ceil and (out - 1) * s >= size + p:
        out -= 1  # the last window would start in the right padding
    return out


def conv_shape(m: nn.Module, x: Tensor) -> Optional[tuple[int, ...]]:
    nd = len(m.kernel_size)
    if (m.transposed or m.padding_mode != "zeros" or x.dim() not in (nd + 1, nd + 2)
            or x.shape[-nd - 1] != m.in_channels or not _fits(m, x, m.weight)):
        return None
    size = x.shape[-nd:]
    if m.padding == "same":
        out = list(size)
    else:
        pad = (0,) * nd if m.padding == "valid" else m.padding
        out = [_window_out(n, k, st, p, d, False)
               for n, k, st, p, d in zip(size, m.kernel_size, m.stride, pad, m.dilation)]
    return None if min(out) < 1 else (*x.shape[:-nd - 1], m.out_channels, *out)


def conv_transpose_shape(m: nn.Module, x: Tensor) -> Optional[tuple[int, ...]]:
    nd = len(m.kernel_size)
    if (not m.transposed or m.padding_mode != "zeros" or x.dim() not in (nd + 1, nd + 2)
            or x.shape[-nd - 1] != m.in_channels or not _fits(m, x, m.weight)):
        return None
    settings = (m.stride, m.padding, m.dilation, m.output_padding)
    if any(len(v) != nd or not all(type(i) is int for i in v) for v in settings):
        return None
    if any(op >= max(s, d) for op, s, d in zip(m.output_padding, m.stride, m.dilation)):
        return None  # torch refuses such output padding: let it say so
    out = [(n - 1) * s - 2 * p + d * (k - 1) + op + 1
           for n, k, s, p, d, op in zip(x.shape[-nd:], m.kernel_size, *settings)]
    return None if min(out) < 1 else (*x.shape[:-nd - 1], m.out_channels, *out)


def linear_shape(m: nn.Module, x: Tensor) -> Optional[tuple[int, ...]]:
    if x.dim() < 1 or x.shape[-1] != m.in_features or not _fits(m, x, m.weight):
        return None
    return (*x.shape[:-1], m.out_features)


def batch_norm_shape(m: nn.Module, x: Tensor) -> Optional[tuple[int, ...]]:
    try:
        m._check_input_dim(x)
    except ValueError:
        return None
    like = m.weight if m.affine else m.running_mean
    if m.training or x.shape[1] != m.num_features or not _fits(m, x, like):
        return None
    return tuple(x.shape)


def batch_norm_of_shape(module: Any, x: Any) -> Optional[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of :func:`batch_norm_of` (timm's BatchNormAct2d's BatchNorm): the module's."""
    if not (isinstance(module, _BatchNorm) and isinstance(x, Tensor)):
        return None
    shape = batch_norm_shape(module, x)
    return None if shape is None else (shape, x.dtype)


def elementwise_shape(m: nn.Module, x: Tensor) -> Optional[tuple[int, ...]]:
    return tuple(x.shape) if _fits(m, x, None) else None


def layer_norm_shape(m: nn.Module, x: Tensor) -> Optional[tuple[int, ...]]:
    ns = tuple(m.normalized_shape)
    if x.dim() < len(ns) or tuple(x.shape[x.dim() - len(ns):]) != ns or not _fits(m, x, m.weight):
        return None
    return tuple(x.shape)


def group_norm_shape(m: nn.Module, x: Tensor) -> Optional[tuple[int, ...]]:
    if x.dim() < 2 or x.shape[1] != m.num_channels or not _fits(m, x, m.weight):
        return None
    return tuple(x.shape)


def unary_shape(x: Any, *args: Any, **kwargs: Any) -> Optional[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of an elementwise op on one float tensor whose other arguments are plain
    values (``F.relu(x, inplace=True)``, ``x.clamp(0, 6)``): ``x``'s. None when another argument
    is a tensor (``torch.clamp(x, lo_tensor)`` broadcasts): running it decides."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        return None
    if any(isinstance(v, Tensor) for v in (*args, *kwargs.values())):
        return None
    return tuple(x.shape), x.dtype


def layer_norm_fn_shape(x: Any, normalized_shape: Any, weight: Any = None, bias: Any = None,
                        eps: float = 1e-5) -> Optional[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of ``F.layer_norm``: the input's, when it ends in ``normalized_shape`` and
    the affine tensors match it (else None: running it raises torch's own error)."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        return None
    ns = tuple(normalized_shape) if isinstance(normalized_shape, (tuple, list)) else (normalized_shape,)
    if not ns or x.dim() < len(ns) or tuple(x.shape[x.dim() - len(ns):]) != ns:
        return None
    for t in (weight, bias):
        if t is not None and not (isinstance(t, Tensor) and tuple(t.shape) == ns
                                  and t.dtype == x.dtype and t.device == x.device):
            return None
    return tuple(x.shape), x.dtype


def _arithmetic_operands(args: tuple, kwargs: dict) -> Optional[list[Tensor]]:
    """The tensor operands of ``a (+|-|*) b`` (with ``alpha=``), or None when the call is not
    that: one or two tensors, the rest real Python numbers, all on one device."""
    if len(args) != 2 or set(kwargs) - {"alpha"}:
        return None
    tensors = [a for a in args if isinstance(a, Tensor)]
    numbers = [a for a in (*args, *kwargs.values()) if not isinstance(a, Tensor)]
    if not tensors or not all(type(v) in (int, float, bool) for v in numbers):
        return None
    if len({t.device for t in tensors}) != 1:
        return None
    return tensors


def arithmetic_shape(*args: Any, **kwargs: Any) -> Optional[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of ``a + b``, ``a - b``, ``a * b`` without computing it: the broadcast
    shape and torch's promoted dtype."""
    tensors = _arithmetic_operands(args, kwargs)
    if tensors is None:
        return None
    shape = _broadcast_shapes([t.shape for t in tensors])
    return None if shape is None else (shape, torch.result_type(*args))


def _broadcast_shapes(shapes: list[torch.Size]) -> Optional[tuple[int, ...]]:
    """torch.broadcast_shapes in plain Python (a tenth of its time), None if they do not broadcast."""
    rank = max(len(s) for s in shapes)
    out = [1] * rank
    for s in shapes:
        for i, n in enumerate(s, rank - len(s)):
            if n != 1:
                if out[i] not in (1, n):
                    return None
                out[i] = n
    return tuple(out)


def concat_shape(tensors: Any, dim: int = 0) -> Optional[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of ``torch.cat(tensors, dim)`` without copying: sizes add up along ``dim``,
    the dtype is promoted. None for anything unusual (a legacy empty 1-D tensor, which cat skips;
    ranks or other sizes that differ; several devices): running it decides."""
    if not isinstance(tensors, (tuple, list)) or not tensors or not all(isinstance(t, Tensor) for t in tensors):
        return None
    if not isinstance(dim, int) or isinstance(dim, bool):
        return None
    rank = tensors[0].dim()
    if rank == 0 or any(t.dim() != rank for t in tensors) or len({t.device for t in tensors}) != 1:
        return None
    d = dim % rank
    first = tensors[0].shape
    if any(t.shape[a] != first[a] for t in tensors for a in range(rank) if a != d):
        return None
    shape = list(first)
    shape[d] = sum(t.shape[d] for t in tensors)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return tuple(shape), dtype


def inplace_arithmetic_shape(*args: Any, **kwargs: Any) -> Optional[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of ``a += b`` and ``a.add_(b)``: ``a``'s, when ``b`` broadcasts into it and
    the result can be cast to ``a``'s dtype (else None: running it raises torch's own error)."""
    tensors = _arithmetic_operands(args, kwargs)
    a = args[0]
    if tensors is None or not isinstance(a, Tensor):
        return None
    if _broadcast_shapes([t.shape for t in tensors]) != tuple(a.shape):
        return None
    if not torch.can_cast(torch.result_type(*args), a.dtype):
        return None
    return tuple(a.shape), a.dtype


_POOL_DIMS = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3,
}


def _pooled(nd: int, x: Any, kernel: Any, stride: Any, padding: Any, dilation: Any,
            ceil: Any) -> Optional[tuple[int, ...]]:
    """Output shape of an nd-dimensional pooling window over ``x`` (None for anything torch should
    judge itself: a rank, dtype or argument it refuses)."""
    if not isinstance(x, Tensor) or x.dim() not in (nd + 1, nd + 2) or not x.is_floating_point():
        return None
    tup = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,) * nd  # noqa: E731
    k = tup(kernel)
    st = k if stride is None or (isinstance(stride, (tuple, list)) and not stride) else tup(stride)
    p, d = tup(padding), tup(dilation)
    values = (*k, *st, *p, *d)
    if {len(k), len(st), len(p), len(d)} != {nd} or not all(type(v) is int for v in values) or type(ceil) is not bool:
        return None
    if min(k) < 1 or min(st) < 1 or min(d) < 1 or any(2 * pi > ki for pi, ki in zip(p, k)):
        return None  # torch refuses padding over half the window: let it say so
    lead, size = tuple(x.shape[:-nd]), x.shape[-nd:]
    out = [_window_out(n, ki, si, pi, di, ceil) for n, ki, si, pi, di in zip(size, k, st, p, d)]
    return None if min(out) < 1 else (*lead, *out)


def _adaptive_pooled(nd: int, x: Any, output_size: Any) -> Optional[tuple[int, ...]]:
    if not isinstance(x, Tensor) or x.dim() not in (nd + 1, nd + 2) or not x.is_floating_point():
        return None
    want = tuple(output_size) if isinstance(output_size, (tuple, list)) else (output_size,) * nd
    if len(want) != nd or not all(o is None or (type(o) is int and o >= 1) for o in want):
        return None
    lead, size = tuple(x.shape[:-nd]), x.shape[-nd:]
    return (*lead, *(n if o is None else o for n, o in zip(size, want)))  # None keeps the input's size


def pool_shape(m: nn.Module, x: Tensor) -> Optional[tuple[int, ...]]:
    nd = _POOL_DIMS.get(type(m))
    if nd is None or getattr(m, "return_indices", False):
        return None
    if hasattr(m, "output_size"):  # adaptive
        return _adaptive_pooled(nd, x, m.output_size)
    return _pooled(nd, x, m.kernel_size, m.stride, m.padding, getattr(m, "dilation", 1), m.ceil_mode)


def _pool_fn_shapes(nd: int) -> dict[str, Callable[..., Any]]:
    """(shape, dtype) formulas of F.max_poolNd, F.avg_poolNd, F.adaptive_avg_poolNd and
    F.adaptive_max_poolNd (Inception's branch pools are functional)."""

    def max_pool(input: Any, kernel_size: Any, stride: Any = None, padding: Any = 0, dilation: Any = 1,
                 ceil_mode: bool = False, return_indices: bool = False) -> Optional[tuple[tuple[int, ...], torch.dtype]]:
        shape = None if return_indices else _pooled(nd, input, kernel_size, stride, padding, dilation, ceil_mode)
        return None if shape is None else (shape, input.dtype)

    def avg_pool(input: Any, kernel_size: Any, stride: Any = None, padding: Any = 0, ceil_mode: bool = False,
                 count_include_pad: bool = True, divisor_override: Any = None) -> Optional[tuple[tuple[int, ...], torch.dtype]]:
        if divisor_override is not None and not (type(divisor_override) is int and divisor_override != 0):
            return None
        shape = _pooled(nd, input, kernel_size, stride, padding, 1, ceil_mode)
        return None if shape is None else (shape, input.dtype)

    def adaptive_pool(input: Any, output_size: Any, return_indices: bool = False) -> Optional[tuple[tuple[int, ...], torch.dtype]]:
        shape = None if return_indices else _adaptive_pooled(nd, input, output_size)
        return None if shape is None else (shape, input.dtype)

    return {"max": max_pool, "avg": avg_pool, "adaptive": adaptive_pool}


# --------------------------------------------------------------------------------------------
# The table

PASS = Rule(passthrough)
UNARY = Rule(passthrough, shape=unary_shape)  # elementwise functions and methods of one tensor
CLAMP = Rule(clamp, freeze_channel_values, shape=unary_shape)  # (the formula declines tensor bounds)
PASS_MODULE = Rule(passthrough, shape=elementwise_shape)  # activations, dropout, identity
POOL = Rule(spatial, shape=pool_shape)
SHAPE = Rule(relabel)
CAT = Rule(concat, shape=concat_shape)
RESHAPE = Rule(reshape, rewrite_shape_args)
SPLIT = Rule(relabel, rewrite_split)
BROADCAST = Rule(broadcast, freeze_channel_values)
ARITHMETIC = Rule(broadcast, freeze_channel_values, shape=arithmetic_shape)
INPLACE_ARITHMETIC = Rule(broadcast, freeze_channel_values, shape=inplace_arithmetic_shape)
REDUCE = Rule(reduction)
SPATIAL = Rule(spatial)
UNPOOL = Rule(unpool)
PIXEL_SHUFFLE = Rule(pixel_shuffle)
PIXEL_UNSHUFFLE = Rule(pixel_unshuffle)
CHANNEL_SHUFFLE = Rule(channel_shuffle)
SOFTMAX = Rule(softmax)
MATMUL = Rule(matmul, input_axis=-1)
EINSUM = Rule(einsum, inputs=einsum_inputs)
SDPA = Rule(sdpa, freeze_sdpa_scale, input_axis=-1)
UNFLATTEN = Rule(unflatten, rewrite_unflatten)
GLU = Rule(glu)
NARROW = Rule(narrow, rewrite_narrow)
MAX_MIN = Rule(max_min, freeze_channel_values)
_UNMASKED_ONLY = kept_whole("which is written out only without masks or is_causal")

_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid, nn.Tanh,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Tanhshrink,
    nn.Softsign, nn.LogSigmoid, nn.Threshold, nn.Hardshrink, nn.Softshrink, nn.RReLU, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)
_POOLS = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.LPPool3d, nn.Upsample,
    nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
)
_PADS = (
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d,
    nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d,
)
_UNARY_FUNCTIONS = (
    torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.sigmoid, torch.sigmoid, F.tanh, torch.tanh, F.leaky_relu, F.elu, F.selu,
    F.softplus, F.hardtanh, F.dropout, F.dropout1d, F.dropout2d,
    F.dropout3d, F.alpha_dropout, torch.exp, torch.neg, operator.neg, operator.pos, torch.abs,
    torch.sqrt, torch.rsqrt, torch.square, torch.erf, torch.nn.functional.hardtanh_, torch.clone,
    torch.detach, torch.sign, torch.nan_to_num, torch.log, torch.log1p, torch.sin, torch.cos,
    torch.reciprocal, torch.floor, torch.ceil, torch.round, torch.trunc, torch.frac, F.softsign,
    F.logsigmoid, F.hardshrink, F.softshrink, F.tanhshrink, F.threshold, F.rrelu, F.celu,
)
_UNARY_METHODS = (
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous",
    "clone", "detach", "float", "half", "double", "bfloat16", "to", "type_as", "exp", "neg", "abs",
    "sqrt", "rsqrt", "square", "hardtanh_", "requires_grad_", "cpu", "cuda", "sign", "nan_to_num", "log",
    "log1p", "sin", "cos", "reciprocal", "floor", "ceil", "round", "trunc", "frac",
)
_CONVERSIONS = ("float", "half", "double", "bfloat16", "to", "type_as", "cpu", "cuda", "requires_grad_")
_BINARY = (
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum,
    torch.minimum, torch.where, operator.gt, operator.lt, operator.ge, operator.le, operator.eq, operator.ne,
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum",
    operator.pow, torch.pow, "pow", "masked_fill", "masked_fill_", torch.masked_fill,
    # elementwise ops of several tensors: a + v·b·c, a + v·b/c, a + w·(b − a), and the like
    torch.addcmul, "addcmul", "addcmul_", torch.addcdiv, "addcdiv", "addcdiv_", torch.lerp, "lerp", "lerp_",
    torch.fmax, "fmax", torch.fmin, "fmin", torch.hypot, "hypot", torch.atan2, "atan2", torch.copysign, "copysign",
)
# New tensors shaped like their input: its positions, so its channels.
_LIKE = (torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like, torch.randn_like)

# Functional pooling: (spatial dims, kind) for its shape formula.
_POOL_FUNCTIONS = {
    F.max_pool1d: (1, "max"), F.max_pool2d: (2, "max"), F.max_pool3d: (3, "max"),
    F.avg_pool1d: (1, "avg"), F.avg_pool2d: (2, "avg"), F.avg_pool3d: (3, "avg"),
    F.adaptive_avg_pool1d: (1, "adaptive"), F.adaptive_avg_pool2d: (2, "adaptive"), F.adaptive_avg_pool3d: (3, "adaptive"),
    F.adaptive_max_pool1d: (1, "adaptive"), F.adaptive_max_pool2d: (2, "adaptive"), F.adaptive_max_pool3d: (3, "adaptive"),
}


class _RuleTable(dict):
    """The rule table (a dict): also remembers the rule each module class resolved to (a lookup
    walks the class's MRO, several times per traced module), until the table changes."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.resolved: dict[tuple[type, Any], Optional[Rule]] = {}

    def _changed(self) -> None:
        self.resolved.clear()


def _invalidating(name: str) -> None:
    base = getattr(dict, name)

    def method(self: _RuleTable, *args: Any, **kwargs: Any) -> Any:
        out = base(self, *args, **kwargs)
        self._changed()
        return out

    setattr(_RuleTable, name, method)


for _name in ("__setitem__", "__delitem__", "__ior__", "update", "pop", "popitem", "clear", "setdefault"):
    _invalidating(_name)


RULES: dict[Any, Rule] = _RuleTable({
    # producers
    nn.Conv1d: Rule(conv, resize_conv, input_axis=1, shape=conv_shape),
    nn.Conv2d: Rule(conv, resize_conv, input_axis=1, shape=conv_shape),
    nn.Conv3d: Rule(conv, resize_conv, input_axis=1, shape=conv_shape),
    nn.ConvTranspose1d: Rule(conv_transpose, resize_conv_transpose, input_axis=1, shape=conv_transpose_shape),
    nn.ConvTranspose2d: Rule(conv_transpose, resize_conv_transpose, input_axis=1, shape=conv_transpose_shape),
    nn.ConvTranspose3d: Rule(conv_transpose, resize_conv_transpose, input_axis=1, shape=conv_transpose_shape),
    nn.Linear: Rule(linear, resize_linear, input_axis=-1, shape=linear_shape),
    # (scored against the output sequence: the first item of what they return)
    nn.LSTM: Rule(recurrent, resize_recurrent, input_axis=-1), nn.GRU: Rule(recurrent, resize_recurrent, input_axis=-1),
    nn.RNN: Rule(recurrent, resize_recurrent, input_axis=-1),
    F.linear: Rule(linear_fn, input_axis=-1),
    nn.Embedding: Rule(embedding, resize_embedding),
    F.embedding: Rule(embedding_fn),
    F.conv1d: Rule(conv_fn, rewrite_conv_fn, input_axis=1),
    F.conv2d: Rule(conv_fn, rewrite_conv_fn, input_axis=1),
    F.conv3d: Rule(conv_fn, rewrite_conv_fn, input_axis=1),
    nn.MultiheadAttention: Rule(  # self-attention is written out (head dims); other calls stay whole
        kept_whole("which is written out (head dims prunable) only for plain self-attention: no "
                   "cross-attention, masks, is_causal, add_bias_kv, add_zero_attn, dropout or "
                   "leaf_modules entry"), expand=attention.write_out),
    nn.TransformerEncoderLayer: Rule(_UNMASKED_ONLY, expand=attention.write_out_encoder_layer),
    nn.TransformerEncoder: Rule(_UNMASKED_ONLY, expand=attention.write_out_encoder),
    # per-channel state
    nn.BatchNorm1d: Rule(channel_affine("weight", "bias", "running_mean", "running_var"),
                         resize_channels("num_features"), shape=batch_norm_shape),
    nn.BatchNorm2d: Rule(channel_affine("weight", "bias", "running_mean", "running_var"),
                         resize_channels("num_features"), shape=batch_norm_shape),
    nn.BatchNorm3d: Rule(channel_affine("weight", "bias", "running_mean", "running_var"),
                         resize_channels("num_features"), shape=batch_norm_shape),
    **dict.fromkeys((nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d),
                    Rule(channel_affine("weight", "bias", "running_mean", "running_var"),
                         resize_channels("num_features"))),
    nn.PReLU: Rule(channel_affine("weight"), resize_channels("num_parameters", ("weight",))),
    F.batch_norm: Rule(batch_norm_fn),
    batch_norm_of: Rule(module_batch_norm, resize_module_batch_norm, shape=batch_norm_of_shape),
    # normalisations that mix channels
    nn.LayerNorm: Rule(layer_norm, resize_layer_norm, shape=layer_norm_shape),
    F.layer_norm: Rule(layer_norm_fn, rewrite_layer_norm_fn, shape=layer_norm_fn_shape),
    nn.RMSNorm: Rule(layer_norm, resize_layer_norm, shape=layer_norm_shape),
    F.rms_norm: Rule(rms_norm_fn, rewrite_layer_norm_fn),
    nn.GroupNorm: Rule(group_norm, resize_group_norm, shape=group_norm_shape),
    F.group_norm: Rule(group_norm_fn, rewrite_group_norm_fn),
    # shape ops
    nn.Flatten: Rule(flatten_module), nn.Unflatten: Rule(unflatten_module, resize_unflatten),
    torch.flatten: SHAPE, "flatten": SHAPE,
    torch.cat: CAT, torch.concat: CAT, torch.stack: Rule(stack),
    torch.split: SPLIT, "split": SPLIT, torch.chunk: SPLIT, "chunk": SPLIT,
    torch.tensor_split: SPLIT, "tensor_split": SPLIT, torch.unbind: Rule(unbind), "unbind": Rule(unbind),
    torch.reshape: RESHAPE, "reshape": RESHAPE, "view": RESHAPE, "expand": Rule(relabel, rewrite_shape_args),
    torch.unflatten: UNFLATTEN, "unflatten": UNFLATTEN,
    "expand_as": SHAPE, "view_as": SHAPE, "reshape_as": SHAPE,
    torch.permute: SHAPE, "permute": SHAPE, torch.transpose: SHAPE, "transpose": SHAPE,
    torch.swapaxes: SHAPE, "swapaxes": SHAPE, torch.movedim: SHAPE, "movedim": SHAPE,
    torch.t: SHAPE, "t": SHAPE, torch.squeeze: SHAPE, "squeeze": SHAPE,
    torch.unsqueeze: SHAPE, "unsqueeze": SHAPE, torch.narrow: NARROW, "narrow": NARROW,
    operator.getitem: Rule(getitem, rewrite_getitem),
    "size": Rule(size_of), "dim": Rule(run_plain), getattr: Rule(size_of), len: Rule(length),
    # (fx records math functions of sizes as calls: ``1 / math.sqrt(C)``)
    math.sqrt: Rule(run_plain), math.pow: Rule(run_plain), math.log: Rule(run_plain),
    math.floor: Rule(run_plain), math.ceil: Rule(run_plain),
    # sizes (``h // p``) are computed; tensors are elementwise
    operator.floordiv: BROADCAST, operator.mod: BROADCAST, torch.floor_divide: BROADCAST,
    "floor_divide": BROADCAST, torch.remainder: BROADCAST, "remainder": BROADCAST, torch.fmod: BROADCAST,
    "fmod": BROADCAST,
    # reductions, softmax
    torch.mean: REDUCE, "mean": REDUCE, torch.sum: REDUCE, "sum": REDUCE, torch.amax: REDUCE,
    "amax": REDUCE, torch.amin: REDUCE, "amin": REDUCE,
    "norm": Rule(reduction_at(1, 2)), torch.norm: Rule(reduction_at(1, 2)),
    torch.linalg.vector_norm: Rule(reduction_at(1, 2)),
    "var": Rule(reduction_at(0, 2)), torch.var: Rule(reduction_at(0, 2)), "std": Rule(reduction_at(0, 2)),
    torch.std: Rule(reduction_at(0, 2)),
    torch.max: MAX_MIN, "max": MAX_MIN, torch.min: MAX_MIN, "min": MAX_MIN,
    F.normalize: Rule(lp_normalize),
    nn.Softmax: SOFTMAX, nn.LogSoftmax: SOFTMAX, F.softmax: SOFTMAX, torch.softmax: SOFTMAX,
    "softmax": SOFTMAX, F.log_softmax: SOFTMAX, "log_softmax": SOFTMAX,
    # spatial ops
    **{f: Rule(spatial, shape=_pool_fn_shapes(nd)[kind]) for f, (nd, kind) in _POOL_FUNCTIONS.items()},
    # (with return_indices=True: (values, indices))
    F.max_pool1d_with_indices: SPATIAL, F.max_pool2d_with_indices: SPATIAL, F.max_pool3d_with_indices: SPATIAL,
    F.adaptive_max_pool1d_with_indices: SPATIAL, F.adaptive_max_pool2d_with_indices: SPATIAL,
    F.adaptive_max_pool3d_with_indices: SPATIAL,
    nn.MaxUnpool1d: UNPOOL, nn.MaxUnpool2d: UNPOOL, nn.MaxUnpool3d: UNPOOL,
    F.max_unpool1d: UNPOOL, F.max_unpool2d: UNPOOL, F.max_unpool3d: UNPOOL,
    nn.PixelShuffle: PIXEL_SHUFFLE, torch.pixel_shuffle: PIXEL_SHUFFLE,
    nn.PixelUnshuffle: PIXEL_UNSHUFFLE, torch.pixel_unshuffle: PIXEL_UNSHUFFLE,
    nn.GLU: GLU, F.glu: GLU,
    nn.ChannelShuffle: CHANNEL_SHUFFLE, torch.channel_shuffle: CHANNEL_SHUFFLE,
    torch.native_channel_shuffle: CHANNEL_SHUFFLE,
    F.interpolate: SPATIAL, F.pad: Rule(pad), torch.roll: Rule(roll), "roll": Rule(roll),
    # matrix products
    F.scaled_dot_product_attention: SDPA,
    torch.einsum: EINSUM,
    torch.matmul: MATMUL, operator.matmul: MATMUL, "matmul": MATMUL, torch.bmm: MATMUL, "bmm": MATMUL,
})
RULES.update({m: PASS_MODULE for m in _ACTIVATIONS})
RULES.update({m: POOL if m in _POOL_DIMS else SPATIAL for m in _POOLS})
RULES.update({m: Rule(pad_module) for m in _PADS})
RULES.update({f: UNARY for f in _UNARY_FUNCTIONS})
# Conversions change the dtype or device: no shape formula (running them is cheap).
RULES.update({f: PASS if f in _CONVERSIONS else UNARY for f in _UNARY_METHODS})
RULES.update({f: CLAMP for f in (torch.clamp, torch.clip, "clamp", "clamp_", "clip", "clip_")})
RULES.update({f: BROADCAST for f in _BINARY})
RULES.update({f: PASS for f in _LIKE})
RULES.update({f: ARITHMETIC for f in (operator.add, operator.sub, operator.mul, torch.add, torch.sub, torch.mul,
                                      "add", "sub", "mul")})
RULES.update({f: INPLACE_ARITHMETIC for f in (operator.iadd, operator.isub, operator.imul, "add_", "sub_", "mul_")})
if StochasticDepth is not None:
    RULES[StochasticDepth] = PASS_MODULE
# Layers of libraries apib_fx does not import, keyed by their qualified class name (exact class).
RULES.update({
    # timm: stochastic depth stays a module (traced in eval mode, it would vanish from the graph)
    "timm.layers.drop.DropPath": PASS_MODULE,
    # timm: TensorFlow "same" padding computed from the input size (fx cannot trace the branch):
    # a conv whose padding is spatial, so the conv's rule holds
    "timm.layers.conv2d_same.Conv2dSame": Rule(conv, resize_conv, input_axis=1),
})

# Modules the tracer keeps whole by default: their forward is not traceable or not worth tracing.
DEFAULT_LEAF_MODULES: tuple[type, ...] = tuple(t for t in (StochasticDepth,) if t is not None)


def register_rule(op: Any, rule: Rule) -> None:
    """Teach the engine a new op: a module class, a function, or a Tensor method name."""
    RULES[op] = rule


def module_rule(module_type: type) -> Optional[Rule]:
    """The rule of a module class: its own, or a base class's if it did not replace ``forward``
    (torchvision's ``Conv3DSimple(nn.Conv3d)`` is a Conv3d; a subclass with its own forward is not)."""
    key = (module_type, getattr(module_type, "forward", None))  # (a forward patched later: looked up anew)
    resolved = getattr(RULES, "resolved", None)
    if resolved is None:  # RULES replaced by a plain dict
        return _resolve_module_rule(module_type)
    try:
        return resolved[key]
    except KeyError:
        rule = resolved[key] = _resolve_module_rule(module_type)
        return rule


def _resolve_module_rule(module_type: type) -> Optional[Rule]:
    by_name = RULES.get(f"{module_type.__module__}.{module_type.__qualname__}")
    if by_name is not None:
        return by_name
    for cls in module_type.__mro__:
        if cls in RULES:
            return RULES[cls] if module_type.forward is cls.forward else None
    return None


def rule_for(node: fx.Node, module: Optional[nn.Module] = None) -> Optional[Rule]:
    if node.op == "call_module":
        return module_rule(type(module))
    try:
        return RULES.get(node.target)
    except TypeError:  # unhashable target
        return None
