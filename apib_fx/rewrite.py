"""The rewrite pass: physically remove channels and fix every shape the graph hard-codes."""
from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
from torch import Tensor, fx, nn

from .graph import ChannelGraph, stored_tensors
from .rules import KeepView, rule_for
from .trace import _with_containers


def _validated(graph: ChannelGraph, keep: Mapping[int, Any]) -> dict[int, Tensor]:
    out = {}
    for g, idx in keep.items():
        if not isinstance(g, int) or not 0 <= g < len(graph.groups):
            raise KeyError(f"keep names group {g!r}, but the graph has groups 0..{len(graph.groups) - 1}")
        group = graph.groups[g]
        idx = torch.as_tensor(idx, dtype=torch.long).flatten()
        if idx.numel() == group.channels and bool((idx.sort().values == torch.arange(group.channels)).all()):
            continue  # keeps everything
        if not group.prunable:
            raise ValueError(f"group {g} ({group.name}) is not prunable: {group.reason}")
        if idx.numel() == 0:
            raise ValueError(f"keep[{g}] is empty: every group must keep at least one channel")
        if idx.numel() < group.min_channels:
            raise ValueError(f"keep[{g}] keeps {idx.numel()} channel(s) of group {g} ({group.name}), which must keep "
                             f"at least {group.min_channels}: {group.min_reason}")
        if int(idx.min()) < 0 or int(idx.max()) >= group.channels:
            raise IndexError(f"keep[{g}] has indices outside 0..{group.channels - 1}")
        if idx.unique().numel() != idx.numel():
            raise ValueError(f"keep[{g}] has repeated indices")
        out[g] = idx.sort().values
    return out


def _sliced_copies(graph: ChannelGraph, keep_ids: Tensor) -> dict[int, Tensor]:
    """id(original tensor) -> its pruned copy, for every parameter and buffer that loses rows.

    Handed to ``deepcopy`` as its memo, so the copy of the model gets the pruned tensors in place
    of the originals: they are never copied whole first (half the peak memory of a rewrite), and
    a tensor shared by several modules stays shared."""
    tensors = stored_tensors(graph.module)
    indices: dict[str, list[tuple[int, Tensor]]] = {}
    for param, dim in graph.sliced_params():
        index = graph.positions_kept(param, dim, keep_ids)
        if index is not None:
            indices.setdefault(param, []).append((dim, index))
    memo: dict[int, Tensor] = {}
    for param, cuts in indices.items():
        old = tensors[param]
        new = old.detach()
        for dim, index in cuts:
            new = new.index_select(dim, index.to(new.device))  # a new tensor: never aliases ``old``
        if isinstance(old, nn.Parameter):
            new = nn.Parameter(new, requires_grad=old.requires_grad)
        memo[id(old)] = new
    return memo


# Attribute values copied onto rebuilt modules: numbers, strings, flags and containers of them.
_PLAIN_TYPES = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)


def _plain(value: Any, depth: int = 0) -> bool:
    if isinstance(value, _PLAIN_TYPES):
        return True
    if depth >= 4:
        return False
    if isinstance(value, (tuple, list, set, frozenset)):
        return all(_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _plain(v, depth + 1) for k, v in value.items())
    return False


def _with_plain_attributes(gm: fx.GraphModule, originals: Mapping[str, nn.Module]) -> fx.GraphModule:
    """Copy the plain attributes (see :func:`_plain`) of ``model`` and of its blocks onto the
    modules the rewrite rebuilt in their place (the root, blocks the graph inlined, containers of
    another class), where those lack them: code built around the model reads them (torchvision's
    detection heads take a backbone's ``out_channels``; timm's ``num_classes``, ``pretrained_cfg``).
    The values are the unpruned model's; modules kept as their own class keep their own (rewritten)
    attributes. Copies, so the two models share no mutable state. ``originals``: the model's
    modules by name. In place; returns ``gm``."""
    for name, module in gm.named_modules():
        original = originals.get(name)
        if original is None or type(module) is type(original):
            continue
        for key, value in vars(original).items():
            if key.startswith("_") or key == "training" or hasattr(module, key) or not _plain(value):
                continue
            setattr(module, key, copy.deepcopy(value))
    return gm


def apply(model: nn.Module, graph: ChannelGraph, keep: Mapping[int, Any]) -> fx.GraphModule:
    """Return a new, smaller dense model keeping channels ``keep[i]`` of ``graph.groups[i]``.

    Groups not in ``keep`` stay whole. Parameter names are those of ``model``; ``model`` itself is
    never modified. The result is a ``torch.fx.GraphModule`` in ``model``'s training mode, carrying
    the plain attributes of ``model`` and of its inlined blocks as they were (``out_channels``,
    ``num_classes``, config dicts): they describe the unpruned model.
    """
    keep = _validated(graph, keep)
    keep_ids = graph.keep_ids(keep)
    gm = copy.deepcopy(graph.module, _sliced_copies(graph, keep_ids))
    view = KeepView(graph.node_labels, keep_ids)
    for node in gm.graph.nodes:
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        rule = rule_for(node, module)
        if rule is not None and rule.rewrite is not None:
            rule.rewrite(node, module, view)
    for node in gm.graph.find_nodes(op="output"):
        # The forward's return annotation, which fx copies into the code, may name what another
        # branch returns (GoogLeNet: its outputs tuple, in training); TorchScript holds the code to it.
        traced = node.meta.get("type")
        if isinstance(node.type, type) and traced is not None and not issubclass(traced, node.type):
            node.type = None
    # A plain GraphModule (the trace's is lazy: its code is generated on first use), built from the
    # rewritten one: its code exists now, not at the user's first call, and TorchScript can
    # compile it (it cannot compile the lazy class). Its module tree is rebuilt: containers again.
    gm = _with_containers(fx.GraphModule(gm, gm.graph, type(model).__name__), model)
    originals = dict(model.named_modules())
    _with_plain_attributes(gm, originals)
    # Same per-module training flags as the user's model.
    for name, m in gm.named_modules():
        src = originals.get(name)
        m.training = src.training if src is not None else model.training
    return gm
