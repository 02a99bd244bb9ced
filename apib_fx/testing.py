"""Exactness checking, reusable in tests and by users adding rules for their own ops.

The reference for a pruned model is the *original* model with every removed input slice of every
consumer (``"in"`` members) set to zero: removing a channel must be the same as no consumer
reading it. In eval mode both must give the same outputs.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .graph import ChannelGraph
from .labels import NONE, compress, flatten_values
from .rewrite import apply
from .trace import Inputs, as_inputs, trace


def random_keep(graph: ChannelGraph, fraction: float = 0.3, seed: int = 0) -> dict[int, Tensor]:
    """Remove a random ``fraction`` of every prunable group's channels (keeping at least its
    ``min_channels``)."""
    gen = torch.Generator().manual_seed(seed)
    keep = {}
    for g in graph.prunable_groups:
        n_keep = max(g.min_channels, g.channels - int(round(fraction * g.channels)))
        keep[g.index] = torch.randperm(g.channels, generator=gen)[:n_keep].sort().values
    return keep


def zeroed_reference(model: nn.Module, graph: ChannelGraph, keep: dict[int, Tensor]) -> nn.Module:
    """A copy of ``model`` whose consumers ignore the removed channels (their input slices are 0).

    Consumers without weights (a matrix product contracting channels, as q @ kᵀ over head
    dimensions) get their input multiplied by a 0/1 mask instead; the copy is then made from the
    traced graph."""
    keep_ids = graph.keep_ids(keep)
    masks = _contraction_masks(graph, keep_ids)
    ref = copy.deepcopy(graph.module if masks else model)
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for gi, idx in keep.items():
            group = graph.groups[gi]
            removed = torch.ones(group.channels, dtype=torch.bool)
            removed[idx] = False
            removed = torch.nonzero(removed).flatten()
            for m in group.members:
                if m.role == "in" and m.param in params:
                    p = params[m.param]
                    p.index_fill_(m.dim, m.index(removed).to(p.device), 0.0)
    if masks:
        nodes = {n.name: n for n in ref.graph.nodes}
        device = next((t.device for t in ref.parameters()), torch.device("cpu"))
        for i, (name, (mask, where)) in enumerate(masks.items()):
            node = nodes[name]
            ref.register_buffer(f"_zeroed_mask{i}", mask.to(device))
            with ref.graph.inserting_before(node):
                m = ref.graph.get_attr(f"_zeroed_mask{i}")
                masked = ref.graph.call_function(_masked, (_operand(node, where), m))
            node.args = _with_operand(node.args, where, masked)
        ref.recompile()
    return ref


def _operand_positions(node: torch.fx.Node) -> Optional[tuple[int, ...]]:
    """Where a contraction's first tensor operand sits in ``node.args``: matmul and attention
    take it first; ``torch.einsum(eq, a, b)`` second, ``torch.einsum(eq, [a, b])`` in a list."""
    from .rules import EINSUM, MATMUL, SDPA, rule_for

    rule = rule_for(node)
    if rule in (MATMUL, SDPA):
        return (0,)
    if rule is EINSUM and len(node.args) > 1:
        return (1, 0) if isinstance(node.args[1], (tuple, list)) else (1,)
    return None


def _operand(node: torch.fx.Node, where: tuple[int, ...]) -> Any:
    value: Any = node.args
    for i in where:
        value = value[i] if i < len(value) else None
    return value


def _with_operand(args: tuple, where: tuple[int, ...], value: Any) -> tuple:
    items = list(args)
    head = where[0]
    items[head] = value if len(where) == 1 else type(items[head])(_with_operand(tuple(items[head]), where[1:], value))
    return tuple(items)


def _contraction_masks(graph: ChannelGraph, keep_ids: Tensor) -> dict[str, tuple[Tensor, tuple[int, ...]]]:
    """For each matrix product (attention, a two-operand einsum) whose first operand carries
    channels and loses some: a 0/1 mask over that operand (broadcastable) and where the operand
    sits in the node's arguments, by node name."""
    out = {}
    for node in graph.module.graph.nodes:
        where = _operand_positions(node) if node.op in ("call_function", "call_method") else None
        if where is None:
            continue
        a = _operand(node, where)
        labels = graph.node_labels.get(a.name) if isinstance(a, torch.fx.Node) else None
        if labels is None:
            continue
        small = compress(labels)
        on = small != NONE
        if not bool(on.any()):
            continue
        mask = torch.ones(small.shape)
        mask[on] = keep_ids[small[on]].float()
        if not bool((mask == 1).all()):
            out[node.name] = (_one_period(mask), where)
    return out


def _one_period(mask: Tensor) -> Tensor:
    """``mask`` cut to its shortest period along each axis, a divisor of its size there: an
    operand whose batch axis is merged with heads (``B * heads``, as BoTNet's attention) repeats
    the heads' pattern once per sample, and the reference must take other batch sizes too."""
    for axis in range(mask.dim()):
        n = mask.shape[axis]
        for p in range(1, n):
            if n % p == 0 and torch.equal(mask, mask.narrow(axis, 0, p).tile(
                    [n // p if a == axis else 1 for a in range(mask.dim())])):
                mask = mask.narrow(axis, 0, p).clone()
                break
    return mask


def _masked(x: Tensor, mask: Tensor) -> Tensor:
    """``x * mask`` with the mask repeated along axes where ``x`` holds several of its periods."""
    reps = [x.shape[a - mask.dim() + x.dim()] // n if n > 1 else 1 for a, n in enumerate(mask.shape)]
    return x * (mask.tile(reps) if any(r > 1 for r in reps) else mask)


def _tensors(out: Any) -> list[Tensor]:
    if hasattr(out, "_asdict"):
        out = tuple(out)
    return [t for t in flatten_values(out) if isinstance(t, Tensor)]


@dataclass
class ExactReport:
    exact_expected: bool  # False when some pruned group passes a channel-mixing normalisation
    max_diff: float  # max |pruned - reference| / output scale
    shapes_ok: bool
    finite: bool
    flops_before: int
    flops_after: int
    flops_model: int  # graph.flops(channel counts) for the same keep
    note: Optional[str] = None

    @property
    def ok(self) -> bool:
        good = self.shapes_ok and self.finite and self.flops_model == self.flops_after
        return good and (self.max_diff <= 1e-5 or not self.exact_expected)


def check_exact(
    model: nn.Module,
    example_inputs: Inputs,
    fraction: float = 0.3,
    seed: int = 0,
    graph: Optional[ChannelGraph] = None,
) -> ExactReport:
    """Prune a random ``fraction`` of every prunable group and compare with the zeroed reference."""
    from .flops import count_flops

    inputs = as_inputs(example_inputs)
    graph = graph or trace(model, inputs)
    keep = random_keep(graph, fraction, seed)
    pruned = apply(model, graph, keep)
    ref = zeroed_reference(model, graph, keep)
    ref.eval()
    pruned.eval()
    with torch.no_grad():
        want = _tensors(ref(*inputs))
        got = _tensors(pruned(*inputs))
    shapes_ok = len(want) == len(got) and all(a.shape == b.shape for a, b in zip(want, got))
    finite = all(bool(torch.isfinite(t).all()) for t in got)
    max_diff = float("inf")
    if shapes_ok:
        max_diff = max(
            float((a - b).abs().max() / max(1.0, float(a.abs().max()))) for a, b in zip(want, got)
        )
    inexact = [g for g in graph.groups if g.index in keep and not g.exact]
    return ExactReport(
        exact_expected=not inexact,
        max_diff=max_diff,
        shapes_ok=shapes_ok,
        finite=finite,
        flops_before=count_flops(model, inputs),
        flops_after=count_flops(pruned, inputs),
        flops_model=graph.flops({g: len(k) for g, k in keep.items()}),
        note=inexact[0].note if inexact else None,
    )


# The torchvision classification CNNs (weights=None). regnet_y_128gf (645M parameters) is left out:
# three copies of it do not fit the memory of a small CI machine.
CNN_ZOO: tuple[str, ...] = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
    "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
    "alexnet", "squeezenet1_0", "squeezenet1_1",
    "densenet121", "densenet161", "densenet169", "densenet201",
    "googlenet", "inception_v3",
    "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
    "mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3",
    "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3", "efficientnet_b4",
    "efficientnet_b5", "efficientnet_b6", "efficientnet_b7",
    "efficientnet_v2_s", "efficientnet_v2_m", "efficientnet_v2_l",
    "regnet_x_400mf", "regnet_x_800mf", "regnet_x_1_6gf", "regnet_x_3_2gf", "regnet_x_8gf",
    "regnet_x_16gf", "regnet_x_32gf",
    "regnet_y_400mf", "regnet_y_800mf", "regnet_y_1_6gf", "regnet_y_3_2gf", "regnet_y_8gf",
    "regnet_y_16gf", "regnet_y_32gf",
    "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0",
    "convnext_tiny", "convnext_small", "convnext_base", "convnext_large",
)


def zoo_model(name: str, num_classes: int = 1000, seed: int = 0) -> nn.Module:
    """A torchvision classification model with random weights (nothing is downloaded)."""
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"unknown torchvision model {name!r}; e.g. one of {', '.join(CNN_ZOO[:6])}, ...")
    kwargs: dict[str, Any] = {"weights": None, "num_classes": num_classes}
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=False)
    torch.manual_seed(seed)
    return fill_zero_weights(torchvision.models.get_model(name, **kwargs).eval())


def fill_zero_weights(model: nn.Module, std: float = 0.02) -> nn.Module:
    """Give weight matrices that are initialised to all zeros (ViT's classifier head) small random
    values, in place: with a zero head every output is 0 and any comparison of outputs passes."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and not bool(p.any()):
                p.normal_(0.0, std)
    return model


def zoo_input_size(name: str, small: bool = True) -> int:
    """Smallest comfortable square input: 64 px, inception_v3 needs 75."""
    if not small:
        return 299 if name == "inception_v3" else 224
    return 75 if name == "inception_v3" else 64
