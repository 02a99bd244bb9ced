"""Channel labels: the currency of the trace pass.

Every tensor in the traced graph gets a *label tensor* of the same shape whose entries are global
channel ids (int64), or ``NONE`` (-1) where the value does not belong to a prunable channel. A
producer (a conv's output channels, a linear's outputs) creates fresh ids; ops move labels exactly as
they move values, and where two ids must be removed together (a residual add, an SE multiply) they
are *unified*. Shape ops (view, permute, cat, split, getitem, ...) are handled by running the op
itself on the label tensor, which is why channel shuffle, flatten-into-Linear and concat offsets need
no special code.

Label tensors are kept as broadcast views (stride 0 along axes where the label does not vary), so
a (1, 2048, 7, 7) activation costs 2048 ids, not 100k.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import numpy as np
import torch
from torch import Tensor

NONE = -1


class ShapeSize(int):
    """An int read off a traced tensor's shape (or computed from such ints) along axes that carry
    no channel: a batch, token or spatial size. Tagged so that arithmetic mixing it into a
    channel count is known not to be a function of channel counts alone."""

    def _wrap(self, value: object, other: object) -> object:
        if not isinstance(value, int) or isinstance(value, bool):
            return ChannelValue(value) if isinstance(value, float) and isinstance(other, ChannelSize) else value
        if isinstance(other, ChannelSize):
            return ChannelSize(value, other.ids, pure=False)
        return ShapeSize(value)


class ChannelSize(int):
    """A size that counts channels: ``C`` in ``B, C, H, W = x.shape``, and ints computed from it
    (``C // heads``). ``ids``: the channel ids it depends on; ``pure``: computed from channel
    counts and constants only, so its value after pruning is fixed by the kept channels (a rule
    may then replace it by the new literal), not mixed with a batch or spatial size."""

    ids: Tensor
    pure: bool

    def __new__(cls, value: int, ids: Tensor, pure: bool = True) -> "ChannelSize":
        out = super().__new__(cls, value)
        out.ids = ids
        out.pure = pure
        return out

    def _wrap(self, value: object, other: object) -> object:
        if not isinstance(value, int) or isinstance(value, bool):
            return ChannelValue(value) if isinstance(value, float) else value
        if isinstance(other, ChannelSize):
            return ChannelSize(value, torch.cat([self.ids, other.ids]), self.pure and other.pure)
        return ChannelSize(value, self.ids, self.pure and not isinstance(other, ShapeSize))


class ChannelValue(float):
    """A number computed from a channel count that is no size (``C ** -0.5``, ``C / 2``,
    ``math.sqrt(C)``). Used as a value in tensor arithmetic (``x / C ** 0.5``), it keeps its
    unpruned value in the rewritten model: the model then computes the same function of its
    remaining channels (exactness), as ``F.scaled_dot_product_attention``'s frozen scale."""

    def _wrap(self, value: object, other: object) -> object:
        return ChannelValue(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _float_arith(name: str) -> None:
    base = getattr(float, name)

    def op(self: float, other: object = None) -> object:
        value = base(self) if other is None else base(self, other)
        if value is NotImplemented:
            return value
        return self._wrap(value, other)  # type: ignore[attr-defined]

    setattr(ChannelValue, name, op)


for _name in ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__",
              "__rtruediv__", "__pow__", "__rpow__", "__neg__"):
    _float_arith(_name)


def _arith(name: str) -> None:
    """Give both size types the int operator ``name`` that keeps their tags."""
    base = getattr(int, name)

    def op(self: int, other: object = None) -> object:
        value = base(self) if other is None else base(self, other)
        if value is NotImplemented and isinstance(other, float) and hasattr(float, name):
            value = getattr(float, name)(float(self), other)  # C ** 0.5: int has no answer, float's is it
        if value is NotImplemented:
            return value
        return self._wrap(value, other)  # type: ignore[attr-defined]

    for cls in (ShapeSize, ChannelSize):
        setattr(cls, name, op)


for _name in ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__floordiv__",
              "__rfloordiv__", "__mod__", "__rmod__", "__neg__", "__truediv__", "__rtruediv__", "__pow__",
              "__rpow__"):
    _arith(_name)


def unlabeled(shape: Iterable[int]) -> Tensor:
    """A label tensor of ``shape`` carrying no channel."""
    shape = tuple(shape)
    return torch.full((1,) * len(shape), NONE, dtype=torch.long).expand(shape)


def along(ids: Tensor, axis: int, shape: Iterable[int]) -> Tensor:
    """Label tensor of ``shape`` whose labels are ``ids`` along ``axis`` and constant elsewhere."""
    shape = tuple(shape)
    axis = axis % len(shape)
    view = [1] * len(shape)
    view[axis] = ids.numel()
    return ids.reshape(view).expand(shape)


def compress(labels: Tensor) -> Tensor:
    """Drop the broadcast axes (stride 0) to size 1; the result broadcasts back to the original."""
    stride = labels.stride()
    shape = labels.shape
    small = [1 if st == 0 and n else n for st, n in zip(stride, shape)]  # (an empty axis stays empty)
    if small == list(shape):
        return labels
    # One view op (an index of slices costs several): size 1 along each broadcast axis.
    return labels.as_strided(small, stride, labels.storage_offset())


def canonical(labels: Tensor) -> Tensor:
    """Re-detect axes along which labels are constant (after a copying reshape) and make them
    broadcast views again, so later rules see where channels actually vary."""
    small = compress(labels)
    values = small.numpy()  # (the tests in numpy: torch's per-op overhead dominated on small labels)
    for axis in range(small.dim()):
        if values.shape[axis] > 1:
            first = values[(slice(None),) * axis + (slice(0, 1),)]
            if (values == first).all():
                values, small = first, small.narrow(axis, 0, 1)
    return small.expand(labels.shape)


def varying_axes(labels: Tensor) -> list[int]:
    """Axes along which the labels change (call on a canonical label tensor)."""
    # The axes :func:`compress` keeps longer than 1, read off the strides without making the view.
    return [a for a, (n, st) in enumerate(zip(labels.shape, labels.stride())) if n > 1 and st != 0]


def changing_axes(values: Tensor) -> list[int]:
    """Axes along which ``values`` are not all equal (a label tensor mapped to its channels)."""
    return [a for a in range(values.dim())
            if values.shape[a] > 1 and not bool((values == values.narrow(a, 0, 1)).all())]


def axis_ids(labels: Tensor, axis: int) -> Tensor:
    """The 1-D labels along ``axis``, assuming they vary along no other axis."""
    axis = axis % labels.dim()
    # labels[0, ..., :, ..., 0] as one view op (an index of slices and ints costs several).
    return labels.as_strided((labels.shape[axis],), (labels.stride(axis),), labels.storage_offset()).contiguous()


def has_labels(labels: Tensor) -> bool:
    return bool((compress(labels) != NONE).any())


def is_labels(value: object) -> bool:
    return isinstance(value, Tensor) and value.dtype == torch.long


def flatten_values(value: object) -> list:
    """All leaves of nested tuples/lists/dicts."""
    if isinstance(value, (tuple, list)):
        return [leaf for v in value for leaf in flatten_values(v)]
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in flatten_values(v)]
    return [value]


@dataclass
class ParamBinding:
    """The channel ids carried by the positions of one parameter/buffer dimension."""

    labels: Tensor
    role: str  # "out", "in", "pass", or "axis" (an activation axis that only enters FLOPs)
    # Further roles of a tied tensor: an embedding table whose columns a tied output layer reads
    # is both the producer ("out") and a consumer ("in") of the same channels.
    also: set[str] = field(default_factory=set)


@dataclass
class FlopsTerm:
    """MACs of one op = coef x the product of the sizes of the listed bound dimensions."""

    coef: int
    dims: list[tuple[str, int]]


def find(parent: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The root of each of ``ids`` in the union-find forest ``parent`` (a root is its own parent);
    the ids visited are pointed straight at their root (in place)."""
    roots = parent[ids]
    up = parent[roots]
    while not (up == roots).all():  # (np.array_equal's checks cost more than the comparison)
        roots, up = up, parent[up]
    parent[ids] = roots
    return roots


def union(parent: np.ndarray, a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> np.ndarray:
    """Union-find over ids, vectorised: merge the components of ``a[i]`` and ``b[i]``, in place
    (returns ``parent``). The root of a component is its smallest id. Work is proportional to
    the pairs linked, not to all ids: a few small numpy ops per link (each a third of a torch
    op's overhead)."""
    a = a.numpy() if isinstance(a, Tensor) else a
    b = b.numpy() if isinstance(b, Tensor) else b
    if a.size == 0:
        return parent
    while True:
        ra, rb = find(parent, a), find(parent, b)
        apart = ra != rb
        if not apart.any():
            return parent
        ra, rb = ra[apart], rb[apart]
        # Each higher root points at the lowest root it meets; roots hit by several pairs meet
        # the others in the next round.
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))


@dataclass
class LabelSpace:
    """Global channel ids and everything learned about them while propagating."""

    size: int = 0
    parent: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    blocked: list[tuple[Tensor, str]] = field(default_factory=list)
    mixed: list[tuple[Tensor, str]] = field(default_factory=list)
    # (ids, count, why): groups touching these ids keep at least ``count`` channels.
    floors: list[tuple[Tensor, int, str]] = field(default_factory=list)
    # Statistics over channels (a mean or a norm across the channel axis, kept as an axis of 1):
    # id of the value -> (the value, the distinct ids it summarises, the op that made it). See
    # :func:`apib_fx.rules.reduction`: they may only come back onto the same channels.
    statistics: dict[int, tuple[Tensor, Tensor, str]] = field(default_factory=dict)
    bindings: dict[tuple[str, int], ParamBinding] = field(default_factory=dict)
    flops_terms: list[FlopsTerm] = field(default_factory=list)
    # Tied tensors (one Parameter under several names): every name -> the first one, as in
    # ``named_parameters()``, so tied weights unify their channels like a shared module does.
    aliases: dict[str, str] = field(default_factory=dict)
    # Reshape results that spread the channels of one axis over several, whose free axis is not
    # chosen yet (id of the label tensor -> it): see :func:`apib_fx.rules.tie_outer`.
    pending: dict[int, Tensor] = field(default_factory=dict)
    # Which axis of such a split stays free: the innermost (False: the same position is removed in
    # every slice, e.g. the same dims in every attention head) or the one before it (True: whole
    # slices go, e.g. whole heads). See :func:`apib_fx.rules.tie_outer`.
    whole_heads: bool = False

    def fresh(self, n: int) -> Tensor:
        # (``parent`` makes room for them when it is next read, see _parent.)
        ids = torch.arange(self.size, self.size + n, dtype=torch.long)
        self.size += n
        return ids

    @property
    def roots(self) -> Tensor:
        """(size,): every id's class, the smallest id tied to it."""
        parent = self._parent()
        return torch.from_numpy(find(parent, np.arange(self.size)))

    def _parent(self) -> np.ndarray:
        """The union-find forest, with room for every id handed out. It grows geometrically:
        ids not handed out yet are their own roots, so nothing reads them."""
        have = self.parent.size
        if have < self.size:
            grown = max(2 * have, self.size, 1024)
            self.parent = np.concatenate([self.parent, np.arange(have, grown, dtype=np.int64)])
        return self.parent

    def classes(self, labels: Tensor) -> Tensor:
        """Labels mapped to their equivalence class (the smallest id tied to them)."""
        return torch.from_numpy(self._classes(labels))

    def _classes(self, labels: Tensor) -> np.ndarray:
        # In numpy: label tensors are small, and torch's per-op overhead was most of the work.
        out = np.array(labels.numpy())
        on = out != NONE
        if on.any():
            out[on] = find(self._parent(), out[on])
        return out

    def class_varying_axes(self, labels: Tensor) -> list[int]:
        """Axes along which the *classes* change: tied ids along an axis do not count."""
        values = self._classes(compress(labels))
        return [a for a in range(values.ndim)
                if values.shape[a] > 1 and not (values == values.take([0], axis=a)).all()]

    def link(self, a: Tensor, b: Tensor) -> None:
        """Channels at the same positions of ``a`` and ``b`` go together (where both are channels)."""
        a, b = compress(a), compress(b)
        if self.link_aligned(a, b):
            return
        a, b = torch.broadcast_tensors(a, b)
        both = (a != NONE) & (b != NONE) & (a != b)
        if bool(both.any()):
            self.parent = union(self._parent(), a[both].reshape(-1), b[both].reshape(-1))

    def link_aligned(self, a: Tensor, b: Tensor) -> bool:
        """Link two compressed label views of one shape whose every position is a channel (two
        calls of a shared module, a residual add, an SE block's ``x * scale``): one union, no
        masks. False, and nothing linked, for any other pair."""
        if a.shape != b.shape or not a.numel():
            return False
        an, bn = a.numpy().reshape(-1), b.numpy().reshape(-1)  # (numpy: a third of torch's overhead)
        if min(an.min(), bn.min()) == NONE:
            return False
        if a is not b:
            self.parent = union(self._parent(), an, bn)
        return True

    def link_ids(self, a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> None:
        """:meth:`link` of two 1-D arrays of ids of equal length, none of them ``NONE``."""
        self.parent = union(self._parent(), a, b)

    def unify(self, a: Tensor, b: Tensor) -> None:
        """Like :meth:`link`, and a channel facing a non-channel on the other side is blocked."""
        self.link(a, b)
        a, b = torch.broadcast_tensors(compress(a), compress(b))
        # A channel aligned with a value that is not a channel cannot be removed on one side only.
        one = (a != NONE) ^ (b != NONE)
        if bool(one.any()):
            self.block(torch.where(a != NONE, a, b)[one], "aligned with values that carry no prunable channel")

    def block(self, labels: Tensor, reason: str) -> None:
        ids = self.distinct(labels)
        if ids.numel():
            self.blocked.append((ids, reason))

    def mark_mixed(self, labels: Tensor, reason: str) -> None:
        """These channels are prunable but removing them changes the values of the others."""
        ids = self.distinct(labels)
        if ids.numel():
            self.mixed.append((ids, reason))

    def add_statistic(self, value: Tensor, labels: Tensor, op: str) -> Tensor:
        """``value`` summarises the channels of ``labels`` across their axis (made by ``op``)."""
        self.statistics[id(value)] = (value, self.distinct(labels), op)
        return value

    def statistic(self, value: Any) -> Optional[tuple[Tensor, str]]:
        """(ids, op) if ``value`` is a statistic over channels, else None."""
        entry = self.statistics.get(id(value)) if self.statistics else None
        return (entry[1], entry[2]) if entry is not None and entry[0] is value else None

    def block_statistics(self, values: Iterable[Any], where: str) -> None:
        """Statistics among ``values`` that reach something other than their own channels: the
        channels they summarise cannot be removed (their count is in the value)."""
        for v in values:
            stat = self.statistic(v)
            if stat is not None:
                self.block(stat[0], f"reduced over their axis by {stat[1]}, whose result {where}")

    def require(self, labels: Tensor, count: int, reason: str) -> None:
        """The groups of these channels must keep at least ``count`` of them, because ``reason``."""
        ids = self.distinct(labels)
        if ids.numel():
            self.floors.append((ids, int(count), reason))

    def distinct(self, labels: Tensor) -> Tensor:
        """The distinct ids among ``labels`` (no ``NONE``), sorted."""
        ids = compress(labels).reshape(-1)
        ids = ids[ids != NONE]
        if ids.numel() < 4096:
            return ids.unique()
        # Many positions (a ViT's stream, whose class token keeps every token's labels apart):
        # marking them costs a pass over the ids handed out; sorting them, several over these.
        seen = np.zeros(self.size, dtype=bool)
        seen[ids.numpy()] = True
        return torch.from_numpy(np.flatnonzero(seen))

    def param_ids(self, name: str, dim: int, size: int, role: str = "out") -> Tensor:
        """Ids of the positions of ``name`` along ``dim``; the same ids on every call, so a module
        called twice produces the same channels."""
        key = (self.aliases.get(name, name), dim)
        if key not in self.bindings:
            self.bindings[key] = ParamBinding(self.fresh(size), role)
        return self.bindings[key].labels

    def bind(self, name: str, dim: int, labels: Tensor, role: str) -> None:
        """Positions of ``name`` along ``dim`` carry ``labels``. Binding twice (a shared module)
        unifies the two call sites position by position."""
        if labels.dim() != 1 or not labels.is_contiguous():
            labels = labels.reshape(-1).contiguous()
        key = (self.aliases.get(name, name), dim)
        if key in self.bindings:
            binding = self.bindings[key]
            self.unify(binding.labels, labels)
            if role != binding.role and "axis" not in (role, binding.role):
                binding.also.add(role)
        else:
            self.bindings[key] = ParamBinding(labels, role)

    def add_flops(self, coef: int, dims: list[tuple[str, int]]) -> None:
        self.flops_terms.append(FlopsTerm(int(coef), [(self.aliases.get(n, n), d) for n, d in dims]))
