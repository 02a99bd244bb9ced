"""The torchvision CNN zoo: exact pruning, FLOPs against two independent counters."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import apib_fx
from apib_fx.testing import CNN_ZOO, check_exact, zoo_input_size, zoo_model

FAST = [
    "resnet18", "resnext50_32x4d", "vgg11_bn", "squeezenet1_1", "densenet121", "googlenet",
    "mobilenet_v3_small", "mnasnet0_5", "efficientnet_b0", "regnet_y_400mf", "shufflenet_v2_x0_5",
    "convnext_tiny",
]
SLOW = [n for n in CNN_ZOO if n not in FAST]
ZOO = [pytest.param(n) for n in FAST] + [pytest.param(n, marks=pytest.mark.slow) for n in SLOW]


def _inputs(name, batch=2):
    size = zoo_input_size(name)
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ZOO)
def test_zoo_exact(name):
    model = zoo_model(name)
    x = _inputs(name)
    graph = apib_fx.trace(model, x)
    assert len(graph.prunable_groups) >= 1
    # every group's channels are the classifier's fixed outputs or prunable; nothing else blocked
    fixed = [g for g in graph.groups if not g.prunable]
    assert all("output" in g.reason for g in fixed), [g.reason for g in fixed]
    report = check_exact(model, x, graph=graph)
    assert report.shapes_ok and report.finite
    if report.exact_expected:
        assert report.max_diff <= 1e-5, report
    else:  # a LayerNorm/GroupNorm over channels (ConvNeXt): values change, shapes must not
        assert "norm" in report.note.lower()
    assert report.flops_model == report.flops_after < report.flops_before


@pytest.mark.parametrize("name", ZOO)
def test_count_flops_matches_flop_counter_mode(name):
    model = zoo_model(name)
    x = _inputs(name, batch=1)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    assert apib_fx.count_flops(model, x) * 2 == counter.get_total_flops()
    assert apib_fx.trace(model, x).flops() == apib_fx.count_flops(model, x)


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "shufflenet_v2_x0_5", "mobilenet_v3_small",
                                  "regnet_y_400mf"])
def test_flops_model_on_random_widths(name):
    model = zoo_model(name)
    x = _inputs(name, batch=1)
    graph = apib_fx.trace(model, x)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        keep = {}
        for g in graph.prunable_groups:
            n = int(torch.randint(1, g.channels + 1, (1,), generator=gen))
            keep[g.index] = torch.randperm(g.channels, generator=gen)[:n]
        channels = {g: len(k) for g, k in keep.items()}
        pruned = apib_fx.apply(model, graph, keep)
        assert graph.flops(channels) == apib_fx.count_flops(pruned, x)


def test_resnet50_macs_at_224():
    model = zoo_model("resnet50")
    macs = apib_fx.count_flops(model, torch.randn(1, 3, 224, 224))
    assert 4.0e9 < macs < 4.2e9  # the papers' 4.1 GFLOPs


def test_originals_bit_identical_on_zoo_model():
    model = zoo_model("mobilenet_v3_small")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = _inputs("mobilenet_v3_small")
    check_exact(model, x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
