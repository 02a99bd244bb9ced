"""ChannelGraph: the result of the trace pass.

A :class:`ChannelGroup` is a set of channels that is pruned as one unit of choice: ``keep`` picks
which of its ``channels`` survive, and every :class:`Member` (a parameter or buffer slice) loses
the matching positions. Channels are grouped when they are tied (a residual add makes the stream's
producers share channels) *and* appear in exactly the same parameter slices with the same
multiplicity, so every member sees every channel of its group the same way: that is what makes
:meth:`ChannelGraph.flops` exact from channel counts alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, fx, nn

from .labels import NONE, LabelSpace


def stored_tensors(module: nn.Module, tree: Optional[Mapping[str, nn.Module]] = None) -> dict[str, Tensor]:
    """Every parameter and buffer of ``module`` under every name it has (a tied tensor appears
    once per name; parameters first): the tensors a member's ``param`` can name. ``tree``:
    ``dict(module.named_modules(remove_duplicate=False))``, where the caller has it."""
    # One walk of the module tree for both (named_parameters and named_buffers walk it each).
    params: dict[str, Tensor] = {}
    buffers: dict[str, Tensor] = {}
    for prefix, m in (module.named_modules(remove_duplicate=False) if tree is None else tree.items()):
        dot = prefix + "." if prefix else ""
        for name, t in m._parameters.items():
            if t is not None:
                params[dot + name] = t
        for name, t in m._buffers.items():
            if t is not None:
                buffers[dot + name] = t
    params.update(buffers)
    return params


def graph_tensors(model: nn.Module, graph: fx.Graph,
                  tree: Optional[Mapping[str, nn.Module]] = None) -> dict[str, Tensor]:
    """:func:`stored_tensors` of the GraphModule that ``graph`` makes of ``model`` (the tensors of
    the submodules its nodes call, and the attributes they read), without building it; in
    ``model``'s order, so a tied tensor's first name is the one ``named_parameters()`` reports."""
    reached = {n.target for n in graph.nodes if n.op in ("call_module", "get_attr")}
    out = {}
    for name, t in stored_tensors(model, tree).items():
        path = name
        while path:  # the tensor itself, or a module above it, is read by the graph
            if path in reached:
                out[name] = t
                break
            path = path.rpartition(".")[0]
    return out


@dataclass(frozen=True)
class Member:
    """A parameter/buffer slice that loses positions when its group loses channels.

    ``param``: qualified name as in ``model.named_parameters()`` / ``named_buffers()``.
    ``dim``: the dimension that shrinks. ``role``: ``"out"`` (a producer's output channels),
    ``"in"`` (a consumer's input channels) or ``"pass"`` (per-channel state: BatchNorm, biases,
    depthwise filters, layer scales). A tied tensor playing two roles (an embedding table read
    again by a tied output layer) has a member for each.
    """

    param: str
    dim: int
    role: str
    positions: Tensor = field(repr=False)  # positions along ``dim`` that belong to the group
    classes: Tensor = field(repr=False)  # the group channel carried by each of those positions

    def index(self, keep: Tensor) -> Tensor:
        """Indices along ``dim`` of the kept group channels ``keep`` (sorted)."""
        return self.positions[torch.isin(self.classes, torch.as_tensor(keep, dtype=torch.long))]

    @property
    def multiplicity(self) -> int:
        """Positions per group channel (H*W for a Linear after flatten, g for a grouped conv)."""
        return int(self.positions.numel() // max(1, int(self.classes.max()) + 1)) if self.classes.numel() else 0


def _member(param: str, dim: int, role: str, positions: Tensor, classes: Tensor) -> Member:
    """``Member(param, dim, role, positions, classes)`` at a third of the cost: a frozen
    dataclass sets each field through object.__setattr__."""
    m = object.__new__(Member)
    m.__dict__.update(param=param, dim=dim, role=role, positions=positions, classes=classes)
    return m


@dataclass
class ChannelGroup:
    """Channels removed together. ``channels``: how many; ``keep`` indices run over 0..channels-1."""

    index: int
    channels: int
    members: list[Member]
    prunable: bool = True
    reason: Optional[str] = None  # why not, when not prunable
    exact: bool = True  # False when a normalisation mixes these channels with the others
    note: Optional[str] = None  # why not exact
    min_channels: int = 1  # the fewest it can keep (2 where a layer needs two values to normalise)
    min_reason: Optional[str] = None  # why, when more than 1

    @property
    def name(self) -> str:
        """A readable handle: the first producer's parameter, else the first member's; ``@k`` when
        its slice starts at position k (q, k and v packed into one attention weight)."""
        for role in ("out", "pass", "in"):
            for m in self.members:
                if m.role == role:
                    first = int(m.positions.min()) if m.positions.numel() else 0
                    return f"{m.param}[{m.dim}]" + (f"@{first}" if first else "")
        return f"group{self.index}"

    def __repr__(self) -> str:
        state = "prunable" if self.prunable else f"fixed ({self.reason})"
        return f"ChannelGroup({self.index}, {self.name}, channels={self.channels}, {state})"


def _concat_tagged(parts: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """The parts flattened into one array, which part each entry came from, and the parts'
    lengths: lets a loop over many small tensors become a few vectorised ops."""
    lengths = torch.tensor([p.numel() for p in parts], dtype=torch.long)
    flat = torch.cat([p.reshape(-1) for p in parts]) if parts else torch.zeros(0, dtype=torch.long)
    return flat, torch.repeat_interleave(torch.arange(len(parts)), lengths), lengths


@dataclass
class _BindingCounts:
    """Per binding, how many of its positions each group has (pairs ``start..stop`` of ``group``
    and ``count``) and how many carry no channel (``unlabeled``); ``distinct`` maps a binding's
    key to its row (bindings sharing one label tensor share a row)."""

    distinct: dict[tuple[str, int], int]
    start: np.ndarray
    stop: np.ndarray
    group: np.ndarray
    count: np.ndarray
    unlabeled: np.ndarray


def _storage_key(labels: Tensor) -> tuple[int, ...]:
    """Equal keys <=> the same label values: the same memory, read the same way."""
    return (labels.data_ptr(), labels.numel(), *labels.stride()) if labels.numel() else (0, 0)


class ChannelGraph:
    """Channel groups of a traced model, plus what :func:`apib_fx.apply` and the FLOPs model need.

    ``module`` is the traced ``GraphModule`` (it shares parameters with the user's model and is
    never modified; built on first use); ``groups`` the channel groups; ``timings`` the seconds
    :func:`apib_fx.trace` spent per phase (``fx``: torch.fx's symbolic trace, ``shapes``,
    ``labels``: the channel propagation, ``groups``: grouping and the FLOPs model);
    ``specialized`` the branches on input shapes the graph follows, as the example inputs took
    them (``"`if H % 7:` is False (file:line, in module 'path')"``; the graph checks them).
    """

    def __init__(
        self,
        module: Union[fx.GraphModule, Callable[[], fx.GraphModule]],
        space: LabelSpace,
        node_labels: dict[str, Any],
        example_inputs: tuple[Tensor, ...],
    ):
        self._module = module
        self.timings: dict[str, float] = {}
        self.specialized: list[str] = []
        self.example_inputs = example_inputs
        self.node_labels = node_labels
        self._bindings = {k: b for k, b in space.bindings.items()}
        self._build_flops(space, self._build_groups(space))

    @property
    def module(self) -> fx.GraphModule:
        if not isinstance(self._module, nn.Module):
            self._module = self._module()
        return self._module

    def __getstate__(self) -> dict[str, Any]:
        # Pickled and deep-copied with its GraphModule (the recipe to build it is a closure).
        state = self.__dict__.copy()
        state["_module"] = self.module
        return state

    # -- grouping ---------------------------------------------------------------------------
    def _build_groups(self, space: LabelSpace) -> "_BindingCounts":
        n = space.size
        rep = space.roots
        # All bindings' labelled positions in one flat array (binding k, position, channel id), so
        # the grouping below is a handful of vectorised ops whatever the number of layers.
        # Bindings of one label tensor (a BatchNorm's weight, bias and running statistics; a
        # conv's weight and bias) are grouped once: they appear together in every signature.
        all_keys = list(self._bindings)
        shared: dict[tuple[int, int], int] = {}
        by_object: dict[int, int] = {}  # (a BatchNorm's four bindings share one label tensor: keyed once)
        same_as = []
        for k, b in enumerate(self._bindings.values()):
            first = by_object.get(id(b.labels))
            if first is None:
                first = by_object[id(b.labels)] = shared.setdefault(_storage_key(b.labels), k)
            same_as.append(first)
        distinct = sorted(set(same_as))
        bindings = [self._bindings[all_keys[k]] for k in distinct]
        ids, which, lengths = _concat_tagged([b.labels for b in bindings])
        pos = torch.arange(ids.numel()) - (torch.cumsum(lengths, 0) - lengths)[which]
        on = ids != NONE
        on = torch.nonzero(on).squeeze(1)  # (one nonzero for the three selections)
        ids, which, pos = ids.index_select(0, on), which.index_select(0, on), pos.index_select(0, on)

        # Signature of a class: which bound dims it appears in, and how many times. Classes with
        # equal signatures form one group. Hashed as Σ_k count_k · salt_k (mod 2^64) with random
        # 62-bit salts: one scatter-add over the positions, no sort of (dim, class) pairs. Two
        # different count vectors collide with probability ~2^-62.
        gen = torch.Generator().manual_seed(0)
        salt = torch.randint(1, 2**62, (len(bindings),), generator=gen)
        sig = torch.zeros(n, dtype=torch.long)
        sig.index_add_(0, rep[ids], salt[which])
        reps = torch.nonzero(rep == torch.arange(n)).flatten()  # ascending
        # Group classes by signature; groups ordered by their first class (creation order).
        _, inv = torch.unique(sig[reps], return_inverse=True)
        n_groups = int(inv.max()) + 1 if reps.numel() else 0
        first = torch.full((n_groups,), n, dtype=torch.long).scatter_reduce(0, inv, reps, "amin")
        rank = torch.empty(n_groups, dtype=torch.long)
        rank[torch.argsort(first)] = torch.arange(n_groups)
        group_of_rep = rank[inv]
        order = torch.argsort(group_of_rep * (n + 1) + reps)
        sizes = torch.bincount(group_of_rep, minlength=n_groups)
        starts = torch.cumsum(sizes, 0) - sizes
        class_of_rep = torch.empty_like(reps)
        class_of_rep[order] = torch.arange(reps.numel()) - starts[group_of_rep[order]]
        rep_group = torch.full((n,), NONE, dtype=torch.long)
        rep_class = torch.full((n,), NONE, dtype=torch.long)
        rep_group[reps] = group_of_rep
        rep_class[reps] = class_of_rep
        self.id_group = rep_group[rep]
        self.id_class = rep_class[rep]
        class_lists = sizes.tolist()

        blocked = self._first_reasons(space.blocked, n_groups)
        mixed = self._first_reasons(space.mixed, n_groups)
        floors = self._floors(space.floors)

        # Members: one per (binding, group) pair, positions ascending within it.
        stride = max(1, n_groups)
        key = which * stride + self.id_group[ids]
        # Bindings come in order and groups in creation order along most of them: sort only if not.
        if key.numel() > 1 and not bool((key[1:] >= key[:-1]).all()):
            order = torch.argsort(key, stable=True)
            key, pos, ids = key[order], pos[order], ids[order]
        pair_keys, pair_counts = torch.unique_consecutive(key, return_counts=True)
        counts = pair_counts.tolist()
        pos_parts = torch.split(pos, counts)
        cls_parts = torch.split(self.id_class[ids], counts)
        pair_d, pair_g = np.divmod(pair_keys.numpy(), stride)  # pairs ascending by binding row d
        row_of = {k: d for d, k in enumerate(distinct)}
        counts_of = _BindingCounts(
            distinct={key: row_of[first] for key, first in zip(all_keys, same_as)},
            start=np.searchsorted(pair_d, np.arange(len(distinct))),
            stop=np.searchsorted(pair_d, np.arange(len(distinct)), side="right"),
            group=pair_g, count=pair_counts.numpy(),
            unlabeled=lengths.numpy() - np.bincount(pair_d, weights=pair_counts.numpy(), minlength=len(distinct)),
        )
        # In binding order, as if each binding had been grouped on its own. (A dense block's
        # groups are read by every later layer of the block: DenseNet-121 has 3,400 members.)
        members: list[list[Member]] = [[] for _ in class_lists]
        start, stop, group_of_pair = counts_of.start.tolist(), counts_of.stop.tolist(), pair_g.tolist()
        for (param, dim), binding in self._bindings.items():
            if binding.role == "axis":
                continue
            roles = (binding.role, *sorted(binding.also)) if binding.also else (binding.role,)
            d = counts_of.distinct[(param, dim)]
            for i in range(start[d], stop[d]):
                for role in roles:
                    members[group_of_pair[i]].append(_member(param, dim, role, pos_parts[i], cls_parts[i]))

        self.groups = [
            ChannelGroup(
                index=gi,
                channels=size,
                members=members[gi],
                prunable=gi not in blocked,
                reason=blocked.get(gi),
                exact=gi not in mixed,
                note=mixed.get(gi),
                min_channels=min(size, floors[gi][0]) if gi in floors else 1,
                min_reason=floors[gi][1] if gi in floors and size > 1 else None,
            )
            for gi, size in enumerate(class_lists)
        ]
        return counts_of

    def _floors(self, entries: list[tuple[Tensor, int, str]]) -> dict[int, tuple[int, str]]:
        """Group -> (the largest count among the entries that touch it, that entry's reason)."""
        out: dict[int, tuple[int, str]] = {}
        for ids, count, reason in entries:
            for g in self.id_group[ids].unique().tolist():
                if count > out.get(g, (1, ""))[0]:
                    out[g] = (count, reason)
        return out

    def _first_reasons(self, entries: list[tuple[Tensor, str]], n_groups: int) -> dict[int, str]:
        """Group -> the reason of the first entry (ids, reason) that touches it."""
        if not entries:
            return {}
        ids, which, _ = _concat_tagged([e[0] for e in entries])
        first = torch.full((n_groups,), len(entries), dtype=torch.long)
        first.scatter_reduce_(0, self.id_group[ids], which, "amin")
        hit = torch.nonzero(first < len(entries)).flatten()
        return {g: entries[e][1] for g, e in zip(hit.tolist(), first[hit].tolist())}

    # -- keep -> per-id mask ----------------------------------------------------------------
    def keep_ids(self, keep: Mapping[int, Any]) -> Tensor:
        """Bool mask over global channel ids: False for ids of removed group channels."""
        kept = torch.ones(self.id_group.numel(), dtype=torch.bool)
        for g, idx in keep.items():
            group = self.groups[g]
            cls_kept = torch.zeros(group.channels, dtype=torch.bool)
            cls_kept[torch.as_tensor(idx, dtype=torch.long)] = True
            sel = self.id_group == g
            kept[sel] = cls_kept[self.id_class[sel]]
        return kept

    def positions_kept(self, param: str, dim: int, keep_ids: Tensor) -> Optional[Tensor]:
        """Kept indices along ``dim`` of ``param``, or None when it keeps all of them."""
        binding = self._bindings.get((param, dim))
        if binding is None:
            return None
        labels = binding.labels
        on = labels != NONE
        kept = torch.ones(labels.numel(), dtype=torch.bool)
        kept[on] = keep_ids[labels[on]]
        return None if bool(kept.all()) else torch.nonzero(kept).flatten()

    def sliced_params(self) -> list[tuple[str, int]]:
        return [k for k, b in self._bindings.items() if b.role != "axis"]

    # -- FLOPs model --------------------------------------------------------------------------
    def _build_flops(self, space: LabelSpace, counts_of: "_BindingCounts") -> None:
        """Each MACs term is coef x prod of dim sizes; each dim size is affine in the groups'
        channel counts: size = const + sum_g multiplicity_g * channels_g."""
        G = len(self.groups)
        terms = space.flops_terms
        width = max((len(t.dims) for t in terms), default=1)
        self._coef = np.array([t.coef for t in terms], dtype=np.float64)
        self._A = np.zeros((width, len(terms), G), dtype=np.float64)
        self._b = np.ones((width, len(terms)), dtype=np.float64)
        channels = np.array([g.channels for g in self.groups], dtype=np.float64)
        # A (term, dim) slot's size: the positions of its binding that carry no channel are the
        # constant, the others count per group (the grouping counted both for every binding).
        slots = [(ti, k, counts_of.distinct[key]) for ti, term in enumerate(terms) for k, key in enumerate(term.dims)]
        if slots:
            term_of, dim_of, binding = (np.array(v, dtype=np.int64) for v in zip(*slots))
            self._b[dim_of, term_of] = counts_of.unlabeled[binding]
            # Every slot's (group, count) pairs, one flat array: the ranges start..stop concatenated.
            start, n_pairs = counts_of.start[binding], counts_of.stop[binding] - counts_of.start[binding]
            slot = np.repeat(np.arange(len(slots)), n_pairs)
            pair = np.arange(n_pairs.sum()) - np.repeat(np.cumsum(n_pairs) - n_pairs - start, n_pairs)
            g_idx = counts_of.group[pair]
            self._A[dim_of[slot], term_of[slot], g_idx] = counts_of.count[pair] / channels[g_idx]
        self._full = channels

    def channel_vector(self, channels: Optional[Mapping[int, int]] = None) -> np.ndarray:
        c = self._full.copy()
        for g, n in (channels or {}).items():
            c[g] = n
        return c

    def flops(self, channels: Optional[Mapping[int, int]] = None) -> int:
        """MACs of the model at the traced example inputs if group ``i`` had ``channels[i]``
        channels (groups not listed keep all of theirs). No model is built."""
        c = self.channel_vector(channels)
        sizes = self._A @ c + self._b  # (width, terms)
        return int(round(float((self._coef * sizes.prod(axis=0)).sum())))

    def flops_batch(self, channel_matrix: np.ndarray, groups: Optional[Sequence[int]] = None) -> np.ndarray:
        """MACs for many channel vectors at once: ``channel_matrix`` is (n, groups); with
        ``groups``, (n, len(groups)): those groups' channels, the others keeping all of theirs."""
        if groups is None:
            sizes = np.einsum("wtg,ng->nwt", self._A, channel_matrix) + self._b[None]
        else:
            groups = np.asarray(groups, dtype=np.int64)
            rest = self._full.copy()
            rest[groups] = 0.0
            fixed = self._A @ rest + self._b  # (width, terms): what the other groups contribute
            sizes = np.einsum("wtg,ng->nwt", self._A[:, :, groups], channel_matrix) + fixed[None]
        return (self._coef[None] * sizes.prod(axis=1)).sum(axis=1)

    def table(self, only_fixed: bool = False) -> str:
        """The groups as a Markdown table: channels, the MACs one of their channels costs at the
        traced inputs (what removing it saves), the parameter and buffer slices that lose rows
        (producers' outputs / consumers' inputs / per-channel state) and why a group is fixed or
        inexact. ``only_fixed``: the groups that cannot be pruned, to see why."""
        full = self.flops()
        rows = ["| group | name | channels | MACs per channel | slices out / in / per-channel | status |",
                "|---:|---|---:|---:|---|---|"]
        for g in self.groups:
            if only_fixed and g.prunable:
                continue
            roles = [sum(m.role == r for m in g.members) for r in ("out", "in", "pass")]
            status = "prunable" if g.exact else f"prunable, not exact: {g.note}"
            if g.min_channels > 1:
                status += f"; keeps at least {g.min_channels}: {g.min_reason}"
            status = status if g.prunable else f"fixed: {g.reason}"
            rows.append(f"| {g.index} | {g.name} | {g.channels} | {full - self.flops({g.index: g.channels - 1}):,} "
                        f"| {' / '.join(map(str, roles))} | {status} |")
        return "\n".join(rows)

    @property
    def prunable_groups(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def __repr__(self) -> str:
        return (
            f"ChannelGraph({len(self.groups)} groups, {len(self.prunable_groups)} prunable, "
            f"{self.flops():,} MACs)"
        )
