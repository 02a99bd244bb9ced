"""In-place arithmetic for the graph runs that need no gradients (calibration, BatchNorm re-estimation).

torch.fx records torchvision's residual ``out += identity`` as ``out + identity`` (a Proxy has no
``__iadd__``), so every residual add of a traced model allocates a new feature map. On a CPU those
allocations cost ~8% of a ResNet-50 forward (first touches of fresh pages), which the user's own
model never pays. :func:`inplace_arithmetic` gives back a copy of the graph whose element-wise
ops write into an operand nothing else reads, checking at run time that the result fits in it.

Only for runs without autograd: the ops fall back to the out-of-place form when gradients are
enabled, so a graph from this pass is never handed to the user.
"""
from __future__ import annotations

import copy
import operator
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from torchvision.ops import StochasticDepth

from .rules import batch_norm_of


def _fits(a: Any, b: Any) -> bool:
    """Whether ``a op= b`` computes exactly ``a op b``: the result's shape, dtype and memory layout
    (a later conv sums in layout order, so a different layout would change its rounding)."""
    if not isinstance(a, Tensor) or torch.is_grad_enabled():
        return False
    contiguous = a.is_contiguous()
    if not contiguous and not (a.dim() == 4 and a.is_contiguous(memory_format=torch.channels_last)):
        return False  # a dense layout is what the out-of-place result keeps
    if isinstance(b, Tensor) and b.dim() > 0:
        if b.shape == a.shape:
            if b.stride() != a.stride() and not (contiguous and b.is_contiguous()):
                return False
        elif (b.dim() > a.dim() or not (contiguous and b.is_contiguous())
              or torch.broadcast_shapes(a.shape, b.shape) != a.shape):
            return False
    elif not isinstance(b, (int, float, bool, Tensor)):
        return False
    return torch.result_type(a, b) == a.dtype


def add_into(a: Any, b: Any) -> Any:
    """``a + b``, written into ``a`` when it fits."""
    return a.add_(b) if _fits(a, b) else a + b


def add_into_second(a: Any, b: Any) -> Any:
    """``a + b``, written into ``b`` when it fits (exact: IEEE addition commutes)."""
    return b.add_(a) if _fits(b, a) else a + b


def sub_into(a: Any, b: Any) -> Any:
    """``a - b``, written into ``a`` when it fits."""
    return a.sub_(b) if _fits(a, b) else a - b


def mul_into(a: Any, b: Any) -> Any:
    """``a * b``, written into ``a`` when it fits."""
    return a.mul_(b) if _fits(a, b) else a * b


def mul_into_second(a: Any, b: Any) -> Any:
    """``a * b``, written into ``b`` when it fits (exact: IEEE multiplication commutes)."""
    return b.mul_(a) if _fits(b, a) else a * b


def div_into(a: Any, b: Any) -> Any:
    """``a / b``, written into ``a`` when it fits."""
    return a.div_(b) if _fits(a, b) else a / b


# op -> (form writing into the first operand, form writing into the second or None). The
# fallbacks keep the operands' order: it decides the layout of an out-of-place result.
INPLACE: dict[Any, tuple[Callable[[Any, Any], Any], Optional[Callable[[Any, Any], Any]]]] = {
    operator.add: (add_into, add_into_second), torch.add: (add_into, add_into_second),
    "add": (add_into, add_into_second),
    operator.mul: (mul_into, mul_into_second), torch.mul: (mul_into, mul_into_second),
    "mul": (mul_into, mul_into_second),
    operator.sub: (sub_into, None), torch.sub: (sub_into, None), "sub": (sub_into, None),
    operator.truediv: (div_into, None), torch.div: (div_into, None), "div": (div_into, None),
}

# Producers whose output is a new tensor that nothing aliases (exact classes: a subclass may
# override forward and hand back its input).
_FRESH_MODULES = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
)
# Activations: a new tensor, or (``inplace=True``) their input, which is then as owned as it was.
_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.LeakyReLU, nn.ELU,
    nn.Mish, nn.GELU, nn.Sigmoid, nn.Tanh,
)
# Modules that hand back their input (eval mode) or a new tensor (training): as owned as the input.
_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                 StochasticDepth)
_FRESH_FUNCTIONS = {
    F.conv1d, F.conv2d, F.conv3d, F.linear, F.batch_norm, F.layer_norm, F.group_norm, batch_norm_of,
    torch.cat, torch.matmul, operator.matmul,
    # the in-place forms: their result is a fresh tensor or their own (owned) operand
    add_into, add_into_second, sub_into, mul_into, mul_into_second, div_into,
} | {op for op in INPLACE if not isinstance(op, str)}
_FRESH_METHODS = {op for op in INPLACE if isinstance(op, str)}


def _owned(node: Any, user: fx.Node, root: nn.Module) -> bool:
    """``node`` is a fresh tensor read once, by ``user``: writing into it changes nothing else."""
    if not isinstance(node, fx.Node) or len(node.users) != 1 or user not in node.users:
        return False
    if sum(1 for a in user.args if a is node) != 1:
        return False
    if node.op == "call_module":
        module = root.get_submodule(node.target)
        kind = type(module)
        if kind in _FRESH_MODULES or (kind in _ACTIVATIONS and not getattr(module, "inplace", False)):
            return True
        if kind in _ACTIVATIONS or kind in _PASS_THROUGH:
            return len(node.args) == 1 and not node.kwargs and _owned(node.args[0], node, root)
        return False
    if node.op == "call_function":
        return node.target in _FRESH_FUNCTIONS
    if node.op == "call_method":
        return node.target in _FRESH_METHODS
    return False


def _may_fit(operand: fx.Node, node: fx.Node) -> bool:
    """False when recorded shapes say the result is larger than ``operand`` (an SE block's
    pooled scale in scale * x); unknown shapes are left to the run-time check."""
    shapes = [getattr(n.meta.get("tensor_meta"), "shape", None) for n in (operand, node)]
    return None in shapes or shapes[0] == shapes[1]


def inplace_arithmetic(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    """A copy of ``gm`` (sharing its submodules and parameters) whose element-wise add, sub, mul
    and div write into an operand that is a fresh tensor read by nothing else. Returns the copy and
    the number of ops changed. Outputs are bit-identical to ``gm``'s; use it under ``no_grad``."""
    graph = copy.deepcopy(gm.graph)  # keeps the codegen (pytree inputs) and node names
    changed = 0
    for node in graph.nodes:
        if node.op not in ("call_function", "call_method") or node.kwargs or len(node.args) != 2:
            continue
        spec = INPLACE.get(node.target)
        if spec is None:
            continue
        first, second = spec
        a, b = node.args
        # Of the operands that may take the result, one of the result's shape when shapes were
        # recorded (an SE block's scale * x has to write into x, not into the pooled scale).
        options = [(a, first)] + ([(b, second)] if second is not None else [])
        options = [into for operand, into in options if _owned(operand, node, gm) and _may_fit(operand, node)]
        if options:
            node.target, node.op = options[0], "call_function"
            changed += 1
    out = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    return out, changed


__all__ = ["inplace_arithmetic"]
