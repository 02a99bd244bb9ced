"""The shape pass computes common layers' output shapes by formula (``Rule.shape``) instead of
running them. Checked against running every layer: each formula on its own, then every node of
whole models (shapes, dtypes, MACs), and the cases that must fall back to real values."""
import dataclasses

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import apib_fx
from apib_fx.rules import batch_norm_of, module_rule
from apib_fx.testing import CNN_ZOO, zoo_input_size, zoo_model
from apib_fx.trace import InputShapeError, ShapeAndMacsProp, eval_mode, propagate_shapes, symbolic_trace

from . import models as M
from .test_engine import CASES

LAYERS = [
    (nn.Conv2d(3, 8, 3), (2, 3, 17, 19)),
    (nn.Conv2d(3, 8, 3, stride=2, padding=1), (2, 3, 17, 16)),
    (nn.Conv2d(4, 8, (3, 5), stride=(2, 3), padding=(1, 2), dilation=(2, 1), groups=2), (1, 4, 23, 29)),
    (nn.Conv2d(3, 6, 4, padding="same", dilation=2), (1, 3, 9, 10)),
    (nn.Conv2d(3, 6, 4, padding="valid"), (1, 3, 9, 10)),
    (nn.Conv2d(3, 6, 3), (3, 12, 12)),  # unbatched
    (nn.Conv1d(3, 5, 4, stride=3), (2, 3, 50)),
    (nn.Conv3d(2, 4, 3, stride=(1, 2, 2), padding=1), (1, 2, 5, 9, 9)),
    (nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1), (2, 4, 5, 7)),
    (nn.ConvTranspose2d(4, 6, (2, 3), stride=(2, 3), padding=(0, 1), output_padding=(1, 2), dilation=(1, 2),
                        groups=2), (1, 4, 5, 6)),
    (nn.ConvTranspose1d(3, 6, 4, stride=2, groups=3), (3, 9)),  # unbatched, depthwise
    (nn.ConvTranspose3d(2, 4, 2, stride=2), (1, 2, 3, 4, 5)),
    (nn.Linear(7, 3), (2, 5, 7)),
    (nn.Linear(7, 3), (7,)),
    (nn.BatchNorm1d(4), (3, 4)),
    (nn.BatchNorm1d(4), (3, 4, 9)),
    (nn.BatchNorm2d(4), (2, 4, 5, 6)),
    (nn.BatchNorm3d(4, affine=False), (2, 4, 3, 5, 6)),
    (nn.ReLU(inplace=True), (2, 3, 4)),
    (nn.Hardswish(), (2, 3, 4, 5)),
    (nn.Dropout(0.3), (2, 3)),
    (nn.Identity(), (2, 3, 1)),
    (nn.MaxPool2d(3, 2, 1), (1, 3, 112, 112)),
    (nn.MaxPool2d(3, 2, ceil_mode=True), (1, 3, 56, 56)),
    (nn.MaxPool2d(2, 2, padding=1, ceil_mode=True), (1, 3, 7, 7)),  # last window starts in padding
    (nn.MaxPool2d((2, 3), stride=(2, 1), dilation=(1, 2)), (1, 3, 9, 11)),
    (nn.MaxPool1d(3, 2, ceil_mode=True), (2, 4, 10)),
    (nn.AvgPool2d(3, 2, 1, ceil_mode=True), (1, 3, 14, 15)),
    (nn.AvgPool3d(2), (1, 2, 5, 6, 7)),
    (nn.AdaptiveAvgPool2d(1), (2, 8, 7, 5)),
    (nn.AdaptiveAvgPool2d((None, 3)), (2, 8, 7, 5)),
    (nn.AdaptiveMaxPool1d(4), (8, 9)),
]


@pytest.mark.parametrize("layer,shape", LAYERS, ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else str(v))
def test_each_formula_matches_running_the_layer(layer, shape):
    layer.eval()
    x = torch.randn(shape)
    with torch.no_grad():
        want = tuple(layer(x.clone()).shape)
    assert module_rule(type(layer)).shape(layer, x) == want


_F = torch.randn(2, 3, 4, 5)
ARITHMETIC = [
    (torch.add, (_F, torch.randn(1, 3, 1, 1)), {}),  # an SE scale
    (torch.mul, (_F, torch.randn(5)), {}),
    (torch.sub, (_F, 2), {"alpha": 0.5}),
    (torch.mul, (torch.randint(0, 5, (3, 4)), 2.5), {}),  # int tensor times a float: float
    (torch.add, (torch.randint(0, 5, (3, 4)), True), {}),
    (torch.mul, (torch.randn(3, 4, dtype=torch.float64), torch.randn(4)), {}),  # promoted to float64
    (torch.add, (torch.randn(3, 1), torch.randn(1, 4).half()), {}),
    (torch.mul, (torch.tensor(3.0), torch.randint(0, 5, (2, 2))), {}),  # 0-d float tensor and int tensor
    (torch.Tensor.add_, (torch.randn(3, 4), torch.randn(4)), {}),
    (torch.Tensor.mul_, (torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 1)), {}),
]


@pytest.mark.parametrize("op,args,kwargs", ARITHMETIC, ids=lambda v: getattr(v, "__name__", ""))
def test_arithmetic_formula_matches_running_the_op(op, args, kwargs):
    name = op.__name__
    rule = apib_fx.RULES[name]
    want = op(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args], **kwargs)
    assert rule.shape(*args, **kwargs) == (tuple(want.shape), want.dtype)


@pytest.mark.parametrize("tensors,dim", [
    ([torch.randn(1, 3, 4, 4), torch.randn(1, 5, 4, 4)], 1),  # DenseNet's concat
    ((torch.randn(2, 3), torch.randn(4, 3).double()), -2),  # promoted to float64
    ([torch.randn(2, 3, 0), torch.randn(2, 3, 2)], -1),
    ([torch.randint(0, 3, (2,)), torch.randn(3)], 0),
])
def test_concat_formula_matches_running_cat(tensors, dim):
    want = torch.cat(tensors, dim)
    assert apib_fx.RULES[torch.cat].shape(tensors, dim) == (tuple(want.shape), want.dtype)


@pytest.mark.parametrize("tensors,dim", [
    ([torch.randn(2, 3), torch.randn(0)], 0),  # a legacy empty tensor: cat skips it
    ([torch.randn(2, 3), torch.randn(2, 4)], 0),  # other sizes differ: cat's own error
    ([torch.randn(2, 3), torch.randn(2, 3, 1)], 0),
    ([], 0),
])
def test_concat_formula_declines_what_cat_should_decide(tensors, dim):
    assert apib_fx.RULES[torch.cat].shape(tensors, dim) is None


@pytest.mark.parametrize("op,args,kwargs", [
    (torch.Tensor.add_, (torch.randn(1, 4), torch.randn(3, 4)), {}),  # would have to grow a
    (torch.Tensor.add_, (torch.randint(0, 5, (3, 4)), torch.randn(3, 4)), {}),  # float into an int tensor
    (torch.add, (torch.randn(2), torch.randn(2), torch.randn(2)), {}),  # not a + b
    (torch.add, (torch.randn(2), torch.randn(2)), {"out": torch.empty(2)}),
    (torch.mul, (torch.randn(2), 1j), {}),  # a complex number
    (torch.add, (torch.randn(2, 3), torch.randn(4)), {}),  # shapes that do not broadcast: torch's error
])
def test_arithmetic_formula_declines_other_calls(op, args, kwargs):
    assert apib_fx.RULES[op.__name__].shape(*args, **kwargs) is None


@pytest.mark.parametrize("layer,x", [
    (nn.Conv2d(3, 8, 3), torch.randn(1, 4, 8, 8)),  # wrong channels: the layer says so itself
    (nn.Conv2d(3, 8, 3), torch.randn(1, 3, 8, 8, dtype=torch.float64)),  # dtype the layer refuses
    (nn.Conv2d(3, 8, 5), torch.randn(1, 3, 3, 3)),  # kernel larger than the input
    (nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), torch.randn(1, 3, 8, 8)),
    (nn.ConvTranspose2d(3, 8, 3), torch.randn(1, 4, 8, 8)),  # wrong channels
    (nn.ConvTranspose2d(3, 8, 3, stride=2, output_padding=2), torch.randn(1, 3, 8, 8)),  # torch refuses it
    (nn.ConvTranspose2d(3, 8, 3, padding=3), torch.randn(1, 3, 2, 2)),  # nothing left of the output
    (nn.Linear(4, 2), torch.randint(0, 3, (2, 4))),
    (nn.BatchNorm2d(4), torch.randn(2, 4, 3)),  # BatchNorm2d wants 4-D
    (nn.MaxPool2d(2, return_indices=True), torch.randn(1, 3, 8, 8)),
    (nn.MaxPool2d(2, padding=2), torch.randn(1, 3, 8, 8)),  # padding over half the window
    (nn.LayerNorm(8), torch.randn(2, 8, 4)),  # normalized_shape is not the trailing size
    (nn.LayerNorm(8), torch.randn(2, 8).double()),
    (nn.GroupNorm(2, 8), torch.randn(2, 6, 4, 4)),
])
def test_formulas_decline_what_the_layer_should_decide(layer, x):
    assert module_rule(type(layer)).shape(layer.eval(), x) is None


@pytest.mark.parametrize("op,args,kwargs", [
    (torch.clamp, (torch.randn(2, 3), torch.zeros(3)), {}),  # a tensor bound broadcasts
    (F.relu, (torch.randint(0, 3, (2, 3)),), {}),  # not a float tensor
    (F.layer_norm, (torch.randn(2, 3, 4), (3,)), {}),  # not the trailing size
    (F.layer_norm, (torch.randn(2, 4), (4,), torch.ones(4).double()), {}),  # weight of another dtype
    (F.layer_norm, (torch.randn(2, 4), (4,)), {"bias": torch.ones(3)}),
    (F.max_pool2d, (torch.randn(1, 3, 8, 8), 2), {"return_indices": True}),  # a tuple comes back
    (F.max_pool2d, (torch.randn(1, 3, 8, 8), 2), {"padding": 2}),  # padding over half the window
    (F.avg_pool2d, (torch.randn(8, 8), 2), {}),  # a rank avg_pool2d refuses
    (F.max_pool2d, (torch.randint(0, 3, (1, 3, 8, 8)), 2), {}),  # not a float tensor: run it
    (F.max_pool2d, (torch.randn(1, 3, 2, 2), 3), {}),  # window larger than the input
    (F.adaptive_avg_pool2d, (torch.randn(1, 3, 8, 8), (2, 2, 2)), {}),
    (batch_norm_of, (nn.BatchNorm2d(3), torch.randn(2, 3, 4, 5)), {}),  # training: batch statistics
    (batch_norm_of, (nn.BatchNorm2d(3).eval(), torch.randn(2, 4, 4, 5)), {}),  # wrong channels
    (batch_norm_of, (nn.BatchNorm2d(3).eval(), torch.randn(2, 3, 4)), {}),  # BatchNorm2d wants 4-D
])
def test_function_formulas_decline_what_the_op_should_decide(op, args, kwargs):
    assert apib_fx.RULES[op].shape(*args, **kwargs) is None


@pytest.mark.parametrize("op,args,kwargs", [
    (F.relu, (torch.randn(2, 3),), {"inplace": True}),
    (torch.clamp, (torch.randn(2, 3), 0.0, 6.0), {}),
    (F.layer_norm, (torch.randn(2, 3, 4), (3, 4), torch.ones(3, 4), torch.zeros(3, 4)), {}),
    (F.layer_norm, (torch.randn(2, 4).double(), (4,)), {"eps": 1e-3}),
    (F.max_pool2d, (torch.randn(1, 3, 9, 9), 3), {}),
    (F.max_pool2d, (torch.randn(1, 3, 9, 8), (3, 2), (2, 1), 1), {"ceil_mode": True}),
    (F.max_pool2d, (torch.randn(3, 9, 9), 2), {"dilation": 2, "padding": 1}),
    (F.avg_pool2d, (torch.randn(1, 3, 35, 35), 3), {"stride": 1, "padding": 1}),
    (F.avg_pool2d, (torch.randn(1, 3, 7, 7), 2), {"ceil_mode": True, "count_include_pad": False}),
    (F.avg_pool1d, (torch.randn(2, 3, 10), 4, 3), {}),
    (F.adaptive_avg_pool2d, (torch.randn(1, 3, 9, 7), (1, None)), {}),
    (F.adaptive_max_pool2d, (torch.randn(1, 3, 9, 7), 2), {}),
    (batch_norm_of, (nn.BatchNorm2d(3).eval(), torch.randn(2, 3, 4, 5)), {}),
    (batch_norm_of, (nn.BatchNorm1d(3).eval(), torch.randn(2, 3)), {}),
])
def test_function_formulas_give_the_shape_and_dtype_of_a_run(op, args, kwargs):
    out = op(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args], **kwargs)
    assert apib_fx.RULES[op].shape(*args, **kwargs) == (tuple(out.shape), out.dtype)


def _node_meta(model, inputs, by_formula):
    def summary(meta):
        if hasattr(meta, "shape"):
            return tuple(meta.shape), meta.dtype
        if isinstance(meta, (tuple, list)):
            return tuple(summary(m) for m in meta)
        return meta

    with eval_mode(model), torch.no_grad():
        gm = symbolic_trace(model, example_inputs=inputs)
        prop = ShapeAndMacsProp(gm, by_formula=by_formula)
        prop.propagate(*inputs)
    meta = {n.name: (summary(n.meta.get("tensor_meta")), n.meta.get("macs"), n.meta.get("type")) for n in gm.graph.nodes}
    return meta, len(prop._placeholders)


ZOO_FAST = ["resnet18", "densenet121", "googlenet", "mobilenet_v3_small", "efficientnet_b0",
            "regnet_y_400mf", "shufflenet_v2_x0_5", "convnext_tiny", "squeezenet1_1", "inception_v3"]
ZOO = [pytest.param(n) for n in ZOO_FAST] + [pytest.param(n, marks=pytest.mark.slow) for n in CNN_ZOO if n not in ZOO_FAST]


@pytest.mark.parametrize("name", ZOO)
def test_formulas_give_every_node_the_shapes_of_a_real_run(name):
    model = zoo_model(name)
    size = zoo_input_size(name)
    x = torch.randn(1, 3, size, size)
    real, _ = _node_meta(model, (x,), by_formula=False)
    fast, skipped = _node_meta(model, (x,), by_formula=True)
    assert skipped > 0
    assert fast == real


@pytest.mark.parametrize("cls,shape", CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_hand_models_same_shapes(cls, shape):
    model = cls()
    x = torch.randn(shape)
    assert _node_meta(model, (x,), by_formula=True)[0] == _node_meta(model, (x,), by_formula=False)[0]


class MaskAfterConv(nn.Module):
    """The number of kept elements depends on the conv's values."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return y[y > 0].sum() + y.mean()


class Nonzero(nn.Module):
    def forward(self, x):
        return torch.nonzero(x)


class NonzeroLeaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.nz = Nonzero()

    def forward(self, x):
        return self.nz(self.conv(x)).float().sum()


class MaskAfterInplaceAdd(nn.Module):
    """A computed tensor changed in place by a conv's output, then selected by its own values."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        y = x * 2
        y.add_(self.conv(x))
        return y[y > 0].sum()


@pytest.mark.parametrize("model,leaves", [(MaskAfterConv(), ()), (NonzeroLeaf(), (Nonzero,)),
                                          (MaskAfterInplaceAdd(), ())])
def test_values_the_formulas_skip_are_computed_when_an_op_needs_them(model, leaves):
    x = torch.randn(1, 3, 8, 8)
    with eval_mode(model), torch.no_grad():
        gm = symbolic_trace(model, leaves)
        ShapeAndMacsProp(gm).propagate(x)
        real = {n.name: n.meta.get("tensor_meta") for n in gm.graph.nodes}
        gm2 = symbolic_trace(model, leaves)
        propagate_shapes(gm2, (x,))
    fast = {n.name: n.meta.get("tensor_meta") for n in gm2.graph.nodes}
    assert {k: getattr(v, "shape", None) for k, v in fast.items()} == {k: getattr(v, "shape", None) for k, v in real.items()}
    graph = apib_fx.trace(model, x, leaf_modules=leaves)  # and the whole trace runs
    (conv,) = [g for g in graph.groups if g.name.startswith("conv.weight")]
    assert not conv.prunable  # which elements are kept depends on every channel


def test_a_layer_with_hooks_runs():
    """Hooks may do anything with the output (record it, change its values): such a layer runs."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    seen = []
    model[0].register_forward_hook(lambda m, args, out: seen.append(out.abs().sum()))
    apib_fx.trace(model, torch.randn(1, 3, 8, 8))
    assert len(seen) == 1 and float(seen[0]) > 0


def test_an_input_that_does_not_fit_still_names_the_layers_error():
    with pytest.raises(InputShapeError, match="expected input.*to have 3 channels"):
        apib_fx.trace(M.LeNet(), torch.randn(1, 4, 32, 32))


class _FixedSizeStem(nn.Module):
    """A stem that accepts one input size, as ViT-style patch embeddings do: with a Python
    ``assert`` (tracing stops at it) or ``torch._assert`` (traced as a node, its message formatted
    with the proxies at trace time)."""

    def __init__(self, size: int, traced_assert: bool):
        super().__init__()
        self.size, self.traced_assert = size, traced_assert
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        H = x.shape[2]
        if self.traced_assert:
            torch._assert(H == self.size, f"Input height ({H}) doesn't match model ({self.size}).")
        else:
            assert H == self.size, f"Input height ({H}) doesn't match model ({self.size})."
        return self.conv(x)


@pytest.mark.parametrize("traced_assert", [False, True])
def test_an_input_size_the_model_rejects_is_reported_in_the_models_own_words(traced_assert):
    model = nn.Sequential(_FixedSizeStem(16, traced_assert), nn.ReLU(), nn.Conv2d(4, 2, 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputShapeError, match=r"shape \(1, 3, 8, 8\): Input height \(8\) doesn't match model \(16\)"):
        apib_fx.trace(model, torch.randn(1, 3, 8, 8))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert apib_fx.trace(model, torch.randn(1, 3, 16, 16)).prunable_groups  # the size it takes traces


class _CumsumBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.cumsum(self.conv(x), 2)


def test_a_graph_that_fails_where_the_model_runs_names_the_op_and_module(monkeypatch):
    # (a traced graph that differs from the model's code, simulated: its cumsum fails)
    run = ShapeAndMacsProp.call_function

    def failing(self, target, args, kwargs):
        if target is torch.cumsum:
            raise RuntimeError("cannot run this op here")
        return run(self, target, args, kwargs)

    monkeypatch.setattr(ShapeAndMacsProp, "call_function", failing)
    model = nn.Sequential(_CumsumBlock(), nn.Conv2d(4, 2, 1))
    with pytest.raises(apib_fx.TraceError, match=r"fails where the model itself runs.*cumsum.*module '0' "
                       r"\(_CumsumBlock\).*cannot run this op here(.|\n)*leaf_modules=\(_CumsumBlock,\)"):
        apib_fx.trace(model, torch.randn(1, 3, 8, 8))
    with pytest.raises(InputShapeError):  # where the model itself fails too, the input is the problem
        apib_fx.trace(model, torch.randn(1, 5, 8, 8))


def test_a_formula_that_does_not_fit_a_registered_module_runs_it():
    class Doubler(nn.Module):  # registered with a conv's rule by mistake: no kernel_size
        def forward(self, x):
            return torch.cat([x, x], 1)

    from apib_fx.rules import RULES

    model = nn.Sequential(nn.Conv2d(3, 4, 3), Doubler())
    apib_fx.register_rule(Doubler, dataclasses.replace(RULES[nn.ReLU], shape=RULES[nn.Conv2d].shape))
    try:
        x = torch.randn(1, 3, 8, 8)
        with eval_mode(model), torch.no_grad():
            gm = symbolic_trace(model)
            propagate_shapes(gm, (x,))
        out = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "1"][0]
        assert tuple(out.meta["tensor_meta"].shape) == (1, 8, 6, 6)
    finally:
        del RULES[Doubler]
