"""The in-place arithmetic pass used by no-grad runs (calibration, BatchNorm re-estimation)."""
import operator

import pytest
import torch
from torch import fx, nn

import apib_fx
from apib_fx.inplace import add_into, inplace_arithmetic
from apib_fx.testing import zoo_model

from . import models as M
from .test_engine import CASES, _model


def _into_calls(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and "_into" in n.target.__name__)


def _written(gm: fx.GraphModule) -> set[str]:
    """Names of the values the in-place ops write into."""
    out = set()
    for n in gm.graph.nodes:
        if n.op == "call_function" and "_into" in n.target.__name__:
            out.add(n.args[1 if n.target.__name__.endswith("_second") else 0].name)
    return out


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("cls,shape", CASES, ids=[c[0].__name__ for c in CASES])
def test_bit_identical_and_original_untouched(cls, shape):
    model = _model(cls).eval()
    x = torch.randn(shape)
    gm = apib_fx.trace(model, x[:1]).module  # traced on one sample, run on two: run-time checks
    code = gm.code
    fast, changed = inplace_arithmetic(gm)
    assert changed == _into_calls(fast)
    with torch.no_grad():
        ref, out = gm(x), fast(x)
    assert _same(ref, out)
    assert gm.code == code and _into_calls(gm) == 0


@pytest.mark.parametrize("name,changed", [("resnet18", 8), ("mobilenet_v3_small", 6),
                                          ("efficientnet_b0", 9), ("convnext_tiny", 18)])
def test_residual_adds_run_in_place_on_the_zoo(name, changed):
    model = zoo_model(name).eval()
    x = torch.randn(2, 3, 64, 64)
    gm = apib_fx.trace(model, x[:1]).module
    fast, n = inplace_arithmetic(gm)
    assert n == changed
    with torch.no_grad():
        assert torch.equal(model(x), fast(x))
    # Parameters are shared, not copied.
    assert all(p is q for p, q in zip(gm.parameters(), fast.parameters()))


class Aliases(nn.Module):
    """Operands the pass must leave alone: read again later, aliased through a pass-through
    module, a parameter, or smaller than the result."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.keep = nn.Identity()
        self.scale = nn.Parameter(torch.randn(4, 1, 1))

    def forward(self, x):
        y = self.conv(x)
        z = y + 1.0  # y is read again below
        a = self.keep(self.bn(z))  # the identity hands back bn's output...
        b = a * 2.0  # ...which is read again below
        c = self.scale + b  # a parameter: never written
        pooled = self.bn(y).mean((2, 3), keepdim=True)
        d = self.keep(y) * 3.0  # an identity of y, which is read elsewhere
        return c + y + a + (pooled - b) + d  # pooled is smaller than the result


def test_operands_read_elsewhere_are_not_written():
    model = Aliases().eval()
    x = torch.randn(2, 3, 5, 5)
    gm = apib_fx.trace(model, x[:1]).module
    fast, n = inplace_arithmetic(gm)
    written = _written(fast)
    assert n > 0 and written and not written & {"conv", "bn", "keep", "keep_1", "scale", "mean"}
    with torch.no_grad():
        assert torch.equal(model(x), fast(x))


class ConstantBranch(nn.Module):
    """A branch computed from a parameter (batch 1 whatever the input) added to the input's batch:
    shapes recorded on one sample agree, at batch 4 they do not."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 6, 8))
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(self.pos) + x


def test_run_time_check_falls_back_when_the_result_does_not_fit():
    model = ConstantBranch().eval()
    gm = apib_fx.trace(model, torch.randn(1, 6, 8)).module
    fast, n = inplace_arithmetic(gm)
    assert n == 1  # shapes agreed on the traced sample
    x = torch.randn(4, 6, 8)
    with torch.no_grad():
        assert torch.equal(fast(x), model(x))
        # Type promotion falls back too: a float32 operand cannot hold a float64 result.
        assert add_into(torch.ones(2), torch.ones(2, dtype=torch.float64)).dtype == torch.float64


def test_with_gradients_nothing_is_written():
    model = zoo_model("resnet18").train()
    x = torch.randn(2, 3, 32, 32)
    gm = apib_fx.trace(model, x[:1]).module
    fast, n = inplace_arithmetic(gm)
    assert n > 0
    a = torch.ones(3, requires_grad=True) * 1.0
    before = a.detach().clone()
    add_into(a, torch.ones(3))
    assert torch.equal(a.detach(), before)
    fast(x).sum().backward()  # autograd sees the out-of-place ops
    assert all(p.grad is not None for p in fast.parameters() if p.requires_grad)


def test_untraced_shapes_are_checked_at_run_time():
    # A plain symbolic trace records no shapes: only the run-time check decides.
    gm = fx.symbolic_trace(M.SEBlock().eval())
    for node in gm.graph.nodes:
        assert "tensor_meta" not in node.meta
    fast, _ = inplace_arithmetic(gm)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(gm(x), fast(x))


def test_in_place_forms_cover_the_out_of_place_ops():
    a, b = torch.randn(3, 4), torch.randn(4)
    from apib_fx.inplace import INPLACE
    ops = {operator.add: a + b, operator.sub: a - b, operator.mul: a * b, operator.truediv: a / b}
    with torch.no_grad():
        for op, want in ops.items():
            x = a.clone()
            got = INPLACE[op][0](x, b)
            assert got is x and torch.equal(got, want)
