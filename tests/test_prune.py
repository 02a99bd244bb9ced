"""apib_fx.prune: FLOPs targets met exactly, APIB's choices, bad input, progress and reports."""
import copy
import gc
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import apib_fx
from apib_fx.calib import CalibrationError, calibration_batches
from apib_fx.testing import zoo_model

from . import models as M

FAST_MODELS = ["resnet18", "mobilenet_v2", "shufflenet_v2_x0_5"]
SLOW_MODELS = ["resnet50", "vgg16_bn", "densenet121", "efficientnet_b0"]
TARGETS = [0.3, 0.48, 0.7]


def _data(n=16, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _check_target(name, method, target):
    model = zoo_model(name, num_classes=10)
    x = _data()
    pruned = apib_fx.prune(model, target, x, method=method, num_calib=16, batch_size=8, progress=False)
    macs0 = apib_fx.count_flops(model, x[:1])
    macs1 = apib_fx.count_flops(pruned, x[:1])
    achieved = 1 - macs1 / macs0
    assert abs(achieved - target) <= 0.005, (name, method, target, achieved)
    report = pruned.apib_report
    assert report.flops_after == macs1 and report.flops_before == macs0
    assert abs(report.flops_reduction - achieved) < 1e-12
    assert pruned(x[:2]).shape == (2, 10)


@pytest.mark.parametrize("name", FAST_MODELS)
@pytest.mark.parametrize("method", ["apib", "l1", "fpgm", "random"])
@pytest.mark.parametrize("target", TARGETS)
def test_targets_met(name, method, target):
    _check_target(name, method, target)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_MODELS)
@pytest.mark.parametrize("method", ["apib", "l1", "fpgm", "random"])
@pytest.mark.parametrize("target", TARGETS)
def test_targets_met_slow(name, method, target):
    _check_target(name, method, target)


class DupDead(nn.Module):
    """8 channels: 0-3 distinct, 4-5 exact copies of the strongest filters 0-1, 6-7 dead (large
    weights, but a bias that keeps them at zero after ReLU)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 10)
        with torch.no_grad():
            w = self.conv1.weight
            w[:2] *= 3.0  # the strongest unique filters
            w[4:6] = w[0:2]
            self.conv1.bias[4:6] = self.conv1.bias[0:2]
            w[6:8] = w[0:2].abs() * 2
            self.conv1.bias[6:8] = -1e4  # never active: no information at all

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def _digits(n=64):
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.images[:n], dtype=torch.float32).unsqueeze(1) / 16.0


def _removed(pruned, model, name="conv1"):
    return getattr(model, name).out_channels - getattr(pruned, name).out_channels


def test_apib_removes_duplicates_and_dead_channels_first():
    model = DupDead()
    x = _digits()
    graph = apib_fx.trace(model, x[:1])
    from apib_fx.scoring import score_apib

    group = [g for g in graph.groups if any(m.param == "conv1.weight" for m in g.members)][0]
    scores = score_apib(graph, graph.module, list(x.split(32)), progress=False)
    survival = scores.primary[group.index]
    lowest4 = set(torch.argsort(survival)[:4].tolist())
    # the dead channels and one copy of each duplicate pair are the four least useful
    assert {6, 7} <= lowest4
    assert len(lowest4 & {0, 4}) == 1 and len(lowest4 & {1, 5}) == 1
    assert float(survival[6]) == 0.0 and float(survival[7]) == 0.0
    # L1 ranks exactly these channels as the most important
    from apib_fx.scoring import score_data_free

    l1 = score_data_free(graph, model, "l1").primary[group.index]
    assert set(torch.argsort(l1)[:2].tolist()) == {2, 3}  # L1 would drop the unique channels first


def test_layers_reading_the_same_tensor_share_channel_kernels(monkeypatch):
    from apib_fx.hsic import HSICStats
    from apib_fx.scoring import ConsumerCapture, score_apib

    model = zoo_model("resnet18", num_classes=10)  # each stage's conv1 and downsample read one tensor
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    graph = apib_fx.trace(model, x[:1])
    calls = []
    real = HSICStats.channel_terms
    monkeypatch.setattr(HSICStats, "channel_terms", lambda self, f: calls.append(1) or real(self, f))
    shared = score_apib(graph, graph.module, list(x.split(8)), progress=False)
    n_shared = len(calls)
    calls.clear()
    # Key by the consumer itself: nothing shared.
    monkeypatch.setattr(ConsumerCapture, "_key", staticmethod(lambda n, c: (n.name, c.group, c.slot)))
    alone = score_apib(graph, graph.module, list(x.split(8)), progress=False)
    assert n_shared < len(calls)
    for g in shared.primary:
        assert torch.equal(shared.primary[g], alone.primary[g]) and torch.equal(shared.secondary[g], alone.secondary[g])


def test_channels_last_features_reach_the_kernels_contiguous(monkeypatch):
    # Linear layers on channels-last maps (a ConvNeXt block) read channels that lie C apart in
    # memory. The kernels' batched products get each channel's values contiguous (copied once
    # per sample, not matrix by matrix inside the product), with the same statistics.
    from apib_fx.hsic import HSICStats, _pairs, _products
    from apib_fx.scoring import score_apib

    model = M.ChannelsLast()
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    graph = apib_fx.trace(model, x[:1])
    strides = []
    real = HSICStats.channel_terms
    monkeypatch.setattr(HSICStats, "channel_terms", lambda self, f: strides.append(f.stride(-1)) or real(self, f))
    score_apib(graph, graph.module, list(x.split(8)), progress=False)
    assert strides and set(strides) == {1}
    f = torch.randn(4, 8, 5, 6).permute(0, 3, 1, 2).reshape(4, 6, 40)[:, :, ::2]  # (n, B, m), stride 2
    pairs = _pairs(6, f.device, f.dtype)
    for got, want in zip(_products(f, pairs), _products(f.contiguous(), pairs)):
        torch.testing.assert_close(got, want)


def test_a_layer_reading_several_groups_computes_its_output_kernel_once(monkeypatch):
    from apib_fx.hsic import HSICStats
    from apib_fx.scoring import find_consumers, score_apib

    model = zoo_model("densenet121", num_classes=10)  # every dense-layer conv reads a concat of groups
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    graph = apib_fx.trace(model, x[:1])
    consumers = find_consumers(graph)
    assert max(len(todo) for todo in consumers.values()) > 2
    calls = []
    real = HSICStats.output_terms
    monkeypatch.setattr(HSICStats, "output_terms", lambda self, y: calls.append(1) or real(self, y))
    cached = score_apib(graph, graph.module, [x], progress=False)
    assert len(calls) == len(consumers)  # one per consumer layer and batch, not one per group
    real_add = HSICStats.add
    monkeypatch.setattr(HSICStats, "add", lambda self, x, y, consumer=0, terms=None, output=None:
                        real_add(self, x, y, consumer, terms))  # recomputed per group
    fresh = score_apib(graph, graph.module, [x], progress=False)
    for g in cached.primary:
        assert torch.equal(cached.primary[g], fresh.primary[g]) and torch.equal(cached.secondary[g], fresh.secondary[g])


def test_apib_end_to_end_drops_dead_channels():
    model = DupDead()
    x = _digits()
    pruned = apib_fx.prune(model, 0.25, x, num_calib=64, batch_size=32, progress=False)
    report = pruned.apib_report
    row = [r for r in report.groups if r.name.startswith("conv1.weight")][0]
    assert row.channels_after < row.channels_before
    # the dead channels contribute nothing: outputs barely move when only they go
    keep = torch.tensor([0, 1, 2, 3, 4, 5])
    g = apib_fx.trace(model, x[:1])
    grp = [gr for gr in g.groups if gr.name.startswith("conv1.weight")][0]
    no_dead = apib_fx.apply(model, g, {grp.index: keep})
    assert torch.allclose(no_dead(x), model(x), atol=1e-5)


def test_apib_scores_channels_a_recurrent_layer_reads_against_its_output_sequence():
    # (an LSTM returns (sequence, (h, c)): the sequence is the output the channels are scored against)
    model, data = M.ConvRecurrent().eval(), torch.randn(32, 3, 6, 7, generator=torch.Generator().manual_seed(0))
    pruned = apib_fx.prune(model, 0.3, data, num_calib=32, batch_size=16, progress=False, tolerance=0.05)
    row = next(r for r in pruned.apib_report.groups if r.name == "conv2.weight[0]")
    assert row.note is None and row.channels_after < row.channels_before
    assert pruned.rnn.input_size == 3 * row.channels_after and pruned(data[:2]).shape == (2, 7, 5)


# ---- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("target", [0, 1, 1.5, -0.1])
def test_target_outside_unit_interval(target):
    with pytest.raises(ValueError, match="flops_target"):
        apib_fx.prune(M.LeNet(), target, torch.randn(4, 3, 32, 32), progress=False)


@pytest.mark.parametrize("target", ["half", torch.tensor(0.3), True])
def test_target_that_is_not_a_number(target):
    with pytest.raises(TypeError, match="flops_target must be a number"):
        apib_fx.prune(M.LeNet(), target, torch.randn(4, 3, 32, 32), progress=False)


def test_numpy_target_is_a_number():
    pruned = apib_fx.prune(M.LeNet(), np.float32(0.3), torch.randn(4, 3, 32, 32), method="l1", progress=False)
    assert abs(pruned.apib_report.flops_reduction - 0.3) <= 0.005


@pytest.mark.parametrize("wrap,inner", [(nn.DataParallel, "model.module"), (torch.compile, "model._orig_mod")])
def test_wrapped_model_names_the_module_inside(wrap, inner):
    model = M.LeNet()
    with pytest.raises(TypeError, match=re.escape(inner)):
        apib_fx.prune(wrap(model), 0.3, torch.randn(4, 3, 32, 32), progress=False)
    with pytest.raises(TypeError, match=re.escape(inner)):
        apib_fx.trace(wrap(model), torch.randn(1, 3, 32, 32))


def test_unreachable_target_states_largest_reduction():
    model = M.LeNet()
    with pytest.raises(apib_fx.UnreachableTarget, match=r"largest reachable reduction is 0\.\d+"):
        apib_fx.prune(model, 0.99, torch.randn(8, 3, 32, 32), min_channels=4, progress=False)
    assert gc.isenabled()  # garbage collection is paused while pruning, and back after an error


def test_target_between_coarse_channels_is_an_error_with_the_nearest_reachable():
    # Few channels, each worth 6-15% of the MACs: 0.1 +- 0.005 lies between two reachable
    # reductions. A model off target must not come back as if it met it.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(3, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(apib_fx.UnreachableTarget) as info:
        apib_fx.prune(model, 0.1, example_inputs=x, method="l1", progress=False)
    message = str(info.value)
    below, above, tol = re.search(r"are (0\.\d+) and (0\.\d+) .* pass tolerance=(0\.\d+)", message).groups()
    assert float(below) < 0.1 - 0.005 and float(above) > 0.1 + 0.005
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # Each way out it names works and lands where it said.
    near = apib_fx.prune(model, 0.1, example_inputs=x, method="l1", tolerance=float(tol), progress=False)
    assert abs(near.apib_report.flops_reduction - 0.1) <= float(tol)
    exact = apib_fx.prune(model, float(above), example_inputs=x, method="l1", progress=False)
    assert abs(exact.apib_report.flops_reduction - float(above)) <= 0.005
    assert exact.apib_report.flops_after == apib_fx.count_flops(exact, x[:1])


@pytest.mark.parametrize("target", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
def test_coarse_first_layer_is_made_up_by_fine_ones(target):
    # LeNet: one conv1 channel is worth 15% of the MACs, one fc1 output 0.07%. Removing in score
    # order can fall short with every next channel overshooting; giving back fine channels after
    # one more coarse one lands within tolerance instead.
    torch.manual_seed(0)
    model = M.LeNet()
    x = torch.randn(8, 3, 32, 32)
    for method in ("apib", "l1", "fpgm", "random"):
        pruned = apib_fx.prune(model, target, x, method=method, progress=False)
        report = pruned.apib_report
        assert abs(report.flops_reduction - target) <= 0.005
        assert report.flops_after == apib_fx.count_flops(pruned, x[:1])


@pytest.mark.parametrize("cls,shape,target", [(M.ChannelsLast, (2, 3, 8, 8), 0.3),
                                              (M.ResidualChain, (2, 3, 16, 16), 0.4)])
def test_small_model_tries_every_width_combination(cls, shape, target):
    # Removing in score order, and making up a coarse channel with fine ones, both miss these
    # targets; some combinations of widths meet them (ChannelsLast at 0.3: only 12 and 12 of its
    # 12 and 24 channels). A small model has every combination tried.
    torch.manual_seed(0)
    model = cls().eval()
    x = torch.randn(shape)
    pruned = apib_fx.prune(model, target, x, method="l1", progress=False)
    report = pruned.apib_report
    assert abs(report.flops_reduction - target) <= 0.005
    assert report.flops_after == apib_fx.count_flops(pruned, x[:1])


def test_garbage_collection_state_is_the_callers():
    x = torch.randn(8, 3, 32, 32)
    apib_fx.prune(M.LeNet(), 0.3, x, progress=False)
    assert gc.isenabled()
    gc.disable()
    try:
        apib_fx.prune(M.LeNet(), 0.3, x, progress=False)
        assert not gc.isenabled()  # a caller that switched it off keeps it off
    finally:
        gc.enable()


class _SampleDataset(torch.utils.data.Dataset):
    """A map-style dataset: one (sample, label) per index, as torchvision's datasets."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i], i


class _UnsizedDataset(torch.utils.data.Dataset):
    def __getitem__(self, i):
        return torch.randn(3, 32, 32)


@pytest.mark.parametrize(
    "data,words",
    [
        (torch.randn(8, 3, 16, 16), "shape"),  # LeNet needs 32x32: traced shape mismatch
        (torch.randint(0, 9, (8, 3, 32, 32)), "dtype"),
        ([], "no samples"),
        ([(torch.randn(4, 3, 32, 32), 0), (torch.randn(4, 3, 28, 28), 0)], "expected"),
        ([{"x": 3}], "not a tensor"),
        (42, "expected a DataLoader"),
        ([torch.randn(4, 3, 32, 32), torch.full((4, 3, 32, 32), float("nan"))], "batch 1 holds 12288 NaN"),
        (_SampleDataset([Image.new("RGB", (32, 32))] * 4), "could not be batched.*ToTensor"),  # no transform
        (_UnsizedDataset(), "without a length"),
    ],
)
def test_bad_calibration_data(data, words):
    model = M.LeNet()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises((CalibrationError, RuntimeError), match=words):
        apib_fx.prune(model, 0.3, data, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("device,words", [("gpu0", "torch device"), ("cuda:99", "CUDA device")])
def test_bad_device_is_refused_before_any_work(device, words):
    model = M.LeNet()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=words):
        apib_fx.prune(model, 0.3, torch.randn(8, 3, 32, 32), device=device, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unknown_input_shape_asks_for_example_inputs():
    with pytest.raises(CalibrationError, match="example_inputs"):
        apib_fx.prune(M.LeNet(), 0.3, progress=False)


def test_synthetic_inputs_warn_and_work():
    model = M.LeNet()
    with pytest.warns(UserWarning, match="synthetic"):
        pruned = apib_fx.prune(model, 0.3, example_inputs=torch.randn(1, 3, 32, 32), num_calib=16,
                               progress=False)
    assert abs(pruned.apib_report.flops_reduction - 0.3) <= 0.005


@pytest.mark.parametrize("method", ["l1", "fpgm", "random"])
def test_data_free_methods_without_data_do_not_warn(method, recwarn):
    # They score weights; synthetic inputs only trace the model (and never re-estimate BatchNorm).
    pruned = apib_fx.prune(M.LeNet(), 0.3, example_inputs=torch.randn(1, 3, 32, 32), method=method, progress=False)
    assert abs(pruned.apib_report.flops_reduction - 0.3) <= 0.005
    assert not [w for w in recwarn if "synthetic" in str(w.message)]


def test_accepts_dataloader_and_dict_batches():
    ds = torch.utils.data.TensorDataset(torch.randn(20, 3, 32, 32), torch.zeros(20, dtype=torch.long))
    loader = torch.utils.data.DataLoader(ds, batch_size=6)
    model = zoo_model("resnet18", num_classes=10)
    a = apib_fx.prune(model, 0.4, loader, num_calib=12, batch_size=6, progress=False)
    b = apib_fx.prune(model, 0.4, [{"image": x} for x, _ in loader], num_calib=12, batch_size=6,
                      progress=False)
    assert a.apib_report.num_calib == 12
    assert [r.channels_after for r in a.apib_report.groups] == [r.channels_after for r in b.apib_report.groups]


def test_model_untouched_and_deterministic():
    model = zoo_model("resnet18", num_classes=10)
    model.train()
    before = copy.deepcopy(model.state_dict())
    x = _data()
    p1 = apib_fx.prune(model, 0.48, x, num_calib=16, batch_size=8, progress=False)
    p2 = apib_fx.prune(model, 0.48, x, num_calib=16, batch_size=8, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and all(m.training for m in model.modules())
    assert [r.channels_after for r in p1.apib_report.groups] == [r.channels_after for r in p2.apib_report.groups]
    assert all(torch.equal(a, b) for a, b in zip(p1.state_dict().values(), p2.state_dict().values()))


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
def test_other_kernels(kernel):
    model = zoo_model("resnet18", num_classes=10)
    pruned = apib_fx.prune(model, 0.48, _data(), kernel=kernel, num_calib=16, batch_size=8, progress=False)
    assert abs(pruned.apib_report.flops_reduction - 0.48) <= 0.005


def test_min_channels_respected():
    model = zoo_model("resnet18", num_classes=10)
    pruned = apib_fx.prune(model, 0.7, _data(), min_channels=16, num_calib=16, batch_size=8, progress=False)
    assert all(r.channels_after >= min(16, r.channels_before) for r in pruned.apib_report.groups)


# ---- progress and report -----------------------------------------------------------------------

def test_progress_bars_and_table(capsys):
    model = zoo_model("resnet18", num_classes=10)
    pruned = apib_fx.prune(model, 0.3, _data(), num_calib=16, batch_size=8, progress=True)
    err = capsys.readouterr().err
    assert "calibration" in err and "search" in err
    apib_fx.prune(model, 0.3, _data(), num_calib=16, batch_size=8, progress=False)
    assert capsys.readouterr().err == ""
    table = pruned.apib_report.table()
    assert table.count("\n") == len(pruned.apib_report.groups) + 1
    assert "layer1.0.conv1.weight[0]" in table
    summary = pruned.apib_report.summary()
    assert "removed" in summary and "alpha" in summary
    assert set(pruned.apib_report.timings) >= {"trace", "forward", "kernels", "lasso", "search", "rewrite", "total"}


@pytest.mark.parametrize("method", ["apib", "l1"])
def test_round_to_hardware_friendly_widths(method):
    model = zoo_model("resnet18", num_classes=10)
    pruned = apib_fx.prune(model, 0.48, _data(), method=method, round_to=8, num_calib=16, batch_size=8,
                           progress=False)
    report = pruned.apib_report
    changed = [r for r in report.groups if r.channels_after != r.channels_before]
    assert changed and all(r.channels_after % 8 == 0 for r in changed)
    assert abs(report.flops_reduction - 0.48) <= 0.005
    assert pruned.get_submodule("layer1.0.conv1").out_channels % 8 == 0


def test_recalibrate_bn_sets_batch_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.ReLU())
    model.train()
    model[2].eval()  # flags are restored exactly, also mixed ones
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    batches = list(torch.randn(3, 8, 3, 10, 10).unbind(0))
    assert apib_fx.recalibrate_bn(model, batches) == 1
    conv_out = [model[0](b) for b in batches]
    means = torch.stack([o.mean(dim=(0, 2, 3)) for o in conv_out])
    variances = torch.stack([o.var(dim=(0, 2, 3), unbiased=True) for o in conv_out])
    torch.testing.assert_close(model[1].running_mean, means.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[1].running_var, variances.mean(0), rtol=1e-5, atol=1e-6)
    assert model.training and model[1].training and not model[2].training
    assert model[1].momentum == 0.1
    for k, v in weights.items():
        assert torch.equal(model.state_dict()[k], v), k
    with pytest.raises(ValueError, match="at least 2 samples"):
        apib_fx.recalibrate_bn(model, [torch.randn(1, 3, 10, 10)])


def test_recalibrate_bn_takes_a_loader_of_labelled_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    x = torch.randn(24, 3, 10, 10)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(24)), batch_size=8)
    apib_fx.recalibrate_bn(model, loader)
    by_loader = model[1].running_mean.clone(), model[1].running_var.clone()
    apib_fx.recalibrate_bn(model, list(x.split(8)))
    assert torch.equal(model[1].running_mean, by_loader[0]) and torch.equal(model[1].running_var, by_loader[1])
    # the first num_samples samples only, cut mid-batch; one tensor is one batch
    apib_fx.recalibrate_bn(model, loader, num_samples=12)
    first = model[1].running_mean.clone()
    apib_fx.recalibrate_bn(model, [x[:8], x[8:12]])
    assert torch.equal(model[1].running_mean, first)
    apib_fx.recalibrate_bn(model, x[:12])
    torch.testing.assert_close(model[1].running_mean, model[0](x[:12]).mean(dim=(0, 2, 3)))
    with pytest.raises(TypeError, match="expected a DataLoader"):
        apib_fx.recalibrate_bn(model, 3)


@pytest.mark.parametrize("model_fn,passes", [(lambda: zoo_model("resnet18", num_classes=10), [True]),
                                             (M.LeNet, [True, False])])
def test_recalibrate_bn_runs_channels_last_and_restores_the_layout(model_fn, passes, monkeypatch):
    """On the CPU the statistics come from a channels-last pass (faster with oneDNN); a model
    that views its maps as contiguous (LeNet's x.view(-1, 16*5*5)) falls back to its own
    layout. Either way: the same statistics as a plain training-mode pass, and every parameter
    is the same tensor, in the same layout, afterwards."""
    from apib_fx import recalibrate

    torch.manual_seed(0)
    model = model_fn()
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        model = nn.Sequential(nn.BatchNorm2d(3), model)
    size = 32
    batches = list(torch.randn(3, 8, 3, size, size).unbind(0))
    ref = copy.deepcopy(model)
    ref.train()
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
        elif isinstance(m, nn.Dropout):
            m.eval()
    with torch.no_grad():
        for b in batches:
            ref(b)
    params = {k: (v, v.data_ptr(), v.stride()) for k, v in model.named_parameters()}
    layouts = []
    real = recalibrate._collect
    monkeypatch.setattr(recalibrate, "_collect",
                        lambda *a, channels_last: layouts.append(channels_last) or real(*a, channels_last=channels_last))
    assert apib_fx.recalibrate_bn(model, batches) > 0
    assert layouts == passes
    for k, v in model.named_parameters():
        t, ptr, stride = params[k]
        assert v is t and v.data_ptr() == ptr and v.stride() == stride, k
    for (k, v), (_, w) in zip(model.named_buffers(), ref.named_buffers()):
        if "running" in k:
            torch.testing.assert_close(v, w, rtol=1e-4, atol=1e-5)


def test_prune_recalibrates_on_real_data_only():
    model = zoo_model("resnet18", num_classes=10)
    x = _data()
    raw = apib_fx.prune(model, 0.3, x, num_calib=16, batch_size=8, progress=False, recalibrate=False)
    cal = apib_fx.prune(model, 0.3, x, num_calib=16, batch_size=8, progress=False)
    assert raw.apib_report.bn_recalibrated == 0 and cal.apib_report.bn_recalibrated == 20
    assert "recalibrate" in cal.apib_report.timings
    # Same channels and weights; only the BatchNorm statistics differ, and they are those of the data.
    raw_sd, cal_sd = raw.state_dict(), cal.state_dict()
    assert raw_sd.keys() == cal_sd.keys()
    for k in raw_sd:
        if k.endswith("num_batches_tracked"):
            continue  # a counter: reset, then the number of calibration batches
        same = torch.equal(raw_sd[k], cal_sd[k])
        assert same != ("running_" in k), k
    apib_fx.recalibrate_bn(raw, list(x.split(8)))
    for k in raw_sd:
        torch.testing.assert_close(raw.state_dict()[k], cal_sd[k])
    # Data-free methods with data also get it; synthetic inputs never do.
    assert apib_fx.prune(model, 0.3, x, method="l1", num_calib=16, progress=False).apib_report.bn_recalibrated == 20
    with pytest.warns(UserWarning, match="synthetic"):
        syn = apib_fx.prune(model, 0.3, example_inputs=x[:1], num_calib=16, progress=False)
    assert syn.apib_report.bn_recalibrated == 0


def test_token_models_prune_on_integer_inputs(tmp_path):
    """Integer inputs (token ids): synthetic calibration stays within the example's id range, real
    integer batches are accepted once example_inputs says the model takes integers, and the
    result keeps its tied head, exports and reloads."""
    torch.manual_seed(0)
    model = M.EmbeddingTiedHead().eval()
    ids = torch.randint(3, 40, (2, 5))
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match="synthetic"):
        pruned = apib_fx.prune(model, 0.3, example_inputs=ids, num_calib=16, batch_size=8, progress=False)
    assert abs(pruned.apib_report.flops_reduction - 0.3) <= 0.005
    assert pruned.head.weight is pruned.emb.weight and pruned.emb.weight.shape[1] < 16
    from apib_fx.calib import random_inputs
    drawn = random_inputs(ids, 64, torch.Generator().manual_seed(0))
    assert drawn.dtype == ids.dtype and drawn.shape == (64, 5)
    assert int(drawn.min()) >= 3 and int(drawn.max()) <= int(ids.max())
    data = torch.randint(0, 40, (16, 5))
    real = apib_fx.prune(model, 0.3, data, example_inputs=ids, num_calib=16, batch_size=8, progress=False)
    assert abs(real.apib_report.flops_reduction - 0.3) <= 0.005
    with pytest.raises(CalibrationError, match="token ids"):
        apib_fx.prune(model, 0.3, data, progress=False)  # without example_inputs: looks like labels
    path = apib_fx.export_onnx(real, tmp_path / "lm.onnx", ids)
    assert path.exists()
    apib_fx.save(real, tmp_path / "lm.pt")
    again = apib_fx.load(tmp_path / "lm.pt")
    assert again.head.weight is again.emb.weight and torch.equal(again(ids), real(ids))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_low_rank_gram_paths_end_instead_of_cycling():
    """Eight calibration samples give every Gram rank <= 36, far below VGG-19's 4096-wide
    classifier layers: the paths' tails then swap tied channels in and out at one alpha. They end
    there (the old behaviour ran 82,000 events to max_steps, 8 s, and warned)."""
    import warnings

    model = zoo_model("vgg19_bn", num_classes=10)
    x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        pruned = apib_fx.prune(model, 0.48, x, num_calib=8, batch_size=8, progress=False)
    assert abs(pruned.apib_report.flops_reduction - 0.48) <= 0.005


def test_map_style_dataset_is_batched_from_a_seeded_random_draw():
    # A dataset yields samples, not batches; stored class by class, its first samples would be
    # one class: num_calib of them are drawn at random (seeded), as a shuffled DataLoader would.
    samples = [torch.full((3, 32, 32), float(i)) for i in range(20)]
    batches = calibration_batches(_SampleDataset(samples), num_calib=8, batch_size=4, seed=0)
    assert [tuple(t.shape) for b in batches for t in b] == [(4, 3, 32, 32), (4, 3, 32, 32)]
    drawn = [int(v) for (b,) in batches for v in b[:, 0, 0, 0]]
    assert drawn == torch.randperm(20, generator=torch.Generator().manual_seed(0))[:8].tolist()
    again = calibration_batches(_SampleDataset(samples), num_calib=8, batch_size=4, seed=0)
    assert all(torch.equal(a, b) for (a,), (b,) in zip(batches, again))
    pruned = apib_fx.prune(M.LeNet(), 0.3, _SampleDataset([torch.randn(3, 32, 32) for _ in range(12)]),
                           num_calib=8, progress=False)
    assert pruned.apib_report.num_calib == 8 and abs(pruned.apib_report.flops_reduction - 0.3) <= 0.005


class _Overflowing(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)) * 1e38)))


def test_activations_that_overflow_are_named():
    model = _Overflowing()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CalibrationError, match=r"NaN or infinite activations around group \d+ \('a\.weight"):
        apib_fx.prune(model, 0.3, torch.randn(8, 3, 12, 12), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _ImageAndMask(nn.Module):
    """A model of two inputs (an image and a mask fused by a residual add)."""

    def __init__(self):
        super().__init__()
        self.rgb, self.mask_in = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(1, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.body, self.head = nn.Conv2d(16, 16, 3, padding=1), nn.Linear(16, 5)

    def forward(self, img, mask, scale: float = 1.0):
        y = torch.relu(self.bn(self.rgb(img) + self.mask_in(mask)))
        return self.head(torch.relu(self.body(y)).mean((2, 3))) * scale


def test_model_of_two_inputs_prunes_on_batches_of_both():
    torch.manual_seed(0)
    model = _ImageAndMask().eval()
    img, mask, label = torch.randn(24, 3, 12, 12), torch.randn(24, 1, 12, 12), torch.randint(0, 5, (24,))
    before = copy.deepcopy(model.state_dict())
    # batches as a DataLoader gives them: the inputs in forward's order, then the label
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(img, mask, label), batch_size=8)
    pruned = apib_fx.prune(model, 0.3, loader, progress=False)
    report = pruned.apib_report
    assert report.num_calib == 24 and abs(report.flops_reduction - 0.3) <= 0.005 and report.bn_recalibrated == 1
    assert report.flops_after == apib_fx.count_flops(pruned, (img[:1], mask[:1]))
    assert report.input_shapes == ((3, 12, 12), (1, 12, 12)) and report.input_shape == (3, 12, 12)
    from apib_fx.report import markdown
    assert "one 3x12x12 and 1x12x12 inputs" in markdown(report)
    assert pruned(img, mask).shape == (24, 5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # dict batches are read by the forward's parameter names, in any order
    as_dicts = [{"label": label[i:i + 8], "mask": mask[i:i + 8], "img": img[i:i + 8]} for i in range(0, 24, 8)]
    by_name = apib_fx.prune(model, 0.3, as_dicts, progress=False)
    assert [r.channels_after for r in by_name.apib_report.groups] == [r.channels_after for r in report.groups]
    # swapping the inputs is not the same data: the image's 3 channels do not fit the mask's conv
    with pytest.raises(CalibrationError, match="do not fit the model"):
        apib_fx.prune(model, 0.3, [(mask, img)], progress=False)
    # without data: synthetic inputs shaped like each example input
    with pytest.warns(UserWarning, match="synthetic"):
        synthetic = apib_fx.prune(model, 0.3, example_inputs=(img[:1], mask[:1]), progress=False)
    assert abs(synthetic.apib_report.flops_reduction - 0.3) <= 0.005
    l1 = apib_fx.prune(model, 0.3, example_inputs=(img[:1], mask[:1]), method="l1", progress=False)
    assert l1(img, mask).shape == (24, 5)


@pytest.mark.parametrize("data,words", [
    (torch.randn(8, 3, 12, 12), r"expected a tuple/list/dict whose first 2 elements are the 2 input tensors \(img, mask\)"),
    ([(torch.randn(8, 3, 12, 12), torch.randn(8, 1, 12, 12)), (torch.randn(8, 3, 12, 12), torch.randn(8, 1, 10, 10))],
     r"batch 1 input 1 \(mask\) has samples of shape \(1, 10, 10\); expected \(1, 12, 12\)"),
    ([(torch.randn(8, 3, 12, 12), torch.randn(6, 1, 12, 12))], r"6 samples of input 1 \(mask\) but 8 of input 0 \(img\)"),
    ([(torch.randn(8, 3, 12, 12), "mask")], r"input 1 \(mask\) of calibration batch 0 is a str"),
])
def test_model_of_two_inputs_bad_batches(data, words):
    with pytest.raises(CalibrationError, match=words):
        apib_fx.prune(_ImageAndMask(), 0.3, data, progress=False)


@pytest.mark.parametrize("min_channels,round_to", [(1, None), (4, None), (1, 8)])
def test_paths_walked_only_as_deep_as_the_target_needs(min_channels, round_to):
    # The search runs on paths walked down level by level; its result must be the one complete
    # paths give, at every target, floor and rounding, while a high target stops early.
    from apib_fx.scoring import _ordered, _survival, calibrate_apib, search_apib
    from apib_fx.search import search_threshold

    model = zoo_model("resnet18", num_classes=10)
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    graph = apib_fx.trace(model, x[:1])
    calibrated = calibrate_apib(graph, graph.module, list(x.split(32)), progress=False)
    primary = dict(calibrated.scores.primary)
    primary.update((g, torch.from_numpy(_survival(p)[0])) for g, p in calibrated.problems.items())
    primary = _ordered(graph, primary)
    stopped_early = False
    for target in (0.2, 0.48, 0.75):
        full = search_threshold(graph, primary, calibrated.scores.secondary, target, min_channels=min_channels,
                                round_to=round_to, progress=False)
        lazy, scores = search_apib(graph, calibrated, target, min_channels=min_channels, round_to=round_to,
                                   workers=2, progress=False)
        assert lazy.keep.keys() == full.keep.keys(), target
        for g in full.keep:
            assert torch.equal(lazy.keep[g], full.keep[g]), (target, g)
        assert (lazy.threshold, lazy.reduction) == (full.threshold, full.reduction)
        assert {"lasso", "search", "forward", "kernels"} <= set(scores.timings)
        for g, s in scores.primary.items():  # what it knows is exact; the rest ranks below all of that
            known = s > 0
            assert torch.equal(s[known], primary[g][known])
            if known.any() and (~known).any():
                assert float(primary[g][~known].max()) < float(primary[g][known].min())
            stopped_early |= bool((primary[g][~known] > 0).any())
    assert stopped_early  # some path was left unwalked below the cut


class _Wide(nn.Module):
    """A 48-channel layer read by one conv: with two kernel batches of 4 samples its Gram has
    rank at most 2 x 6 = 12, so its Lasso path holds at most 12 channels at any alpha."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 48, 3, padding=1)
        self.conv3 = nn.Conv2d(48, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x)).mean(dim=(2, 3))
        return self.fc(x)


def test_channels_kept_on_relevance_alone_are_counted():
    from apib_fx.hsic import nonneg_lasso_path
    from apib_fx.scoring import calibrate_apib, score_apib

    torch.manual_seed(0)
    model = _Wide().eval()
    x = _data(8, 16)
    with pytest.warns(UserWarning, match=r"more channels than their Gram's rank can be .* batches of 4 here"):
        pruned = apib_fx.prune(model, 0.3, x, num_calib=8, batch_size=4, progress=False)
    report = pruned.apib_report
    assert report.alpha == 0.0
    graph = apib_fx.trace(model, x[:1])
    survival = score_apib(graph, graph.module, [x[:4], x[4:]], progress=False).primary
    wide = next(g for g in graph.groups if g.channels == 48)
    # Kept channels of the wide group, read off the pruned layer's biases (distinct at random).
    kept = [int(torch.nonzero(model.conv2.bias == b)[0]) for b in pruned.conv2.bias]
    assert len(kept) > int((survival[wide.index] > 0).sum())  # more than its path ever selected
    row = next(r for r in report.groups if r.index == wide.index)
    assert row.unselected == int((survival[wide.index][kept] == 0).sum()) > 0
    assert report.unselected == sum(r.unselected for r in report.groups) >= row.unselected
    assert f"{row.unselected} kept on relevance alone" in report.table()
    assert f"{report.unselected} kept channels selected by no Lasso path" in report.summary()
    assert pruned.apib_report.to_dict()["groups"][row.index]["unselected"] == row.unselected
    # Its Gram's rank is at most 2 batches x 4·3/2 = 12 < 48 channels: the report says so, and how
    # many channels the path held at once (as an independent whole path of the same problem does).
    G, b = calibrate_apib(graph, graph.module, [x[:4], x[4:]], progress=False).problems[wide.index]
    on = nonneg_lasso_path(G, b).coefs > 0  # at the breakpoints; β is linear between them, so
    held = int((on[1:] | on[:-1]).sum(dim=1).max())  # a segment's active set is its ends' union
    assert row.rank_bound == 12 and row.rank_limited and 0 < row.max_active == held <= 12
    assert f"{row.unselected} kept on relevance alone (its Gram's rank is at most 12, below its 48 channels" in report.table()
    assert f"({report.rank_limited_unselected} in groups whose Gram's rank is below their width)" in report.summary()
    assert report.rank_limited_unselected == sum(r.unselected for r in report.groups if r.rank_limited) >= row.unselected


def test_channels_no_path_selects_at_full_rank_are_told_apart_from_a_rank_limit(recwarn):
    """With 64 samples in batches of 32 the wide group's Gram can have full rank: channels kept
    below every path's reach are the Lasso's own sparsity, not too few samples, and nothing warns."""
    torch.manual_seed(0)
    pruned = apib_fx.prune(_Wide().eval(), 0.1, _data(64, 16), num_calib=64, batch_size=32, progress=False)
    report = pruned.apib_report
    row = next(r for r in report.groups if r.channels_before == 48)
    assert report.alpha == 0.0 and row.unselected > 0
    assert row.rank_bound == 48 and not row.rank_limited and row.max_active > 12
    assert f"{row.unselected} kept on relevance alone (no Lasso path selected them)" in report.table()
    assert report.rank_limited_unselected == 0 and "rank" not in report.summary()
    assert not [w for w in recwarn if "Gram's rank" in str(w.message)]


class _Reads(nn.Module):
    """32 channels read by two layers from one tensor and by a third from another (tanh of it)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.a, self.b, self.c = nn.Conv2d(32, 4, 1), nn.Conv2d(32, 4, 1), nn.Conv2d(32, 4, 1)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        return self.a(x) + self.b(x) + self.c(torch.tanh(x))


def test_rank_bound_counts_each_distinct_kernel_batch_once():
    """Layers reading the same tensor share one kernel batch (it adds no rank); another tensor
    carrying the same channels adds its own: 2 tensors x 2 batches x 4·3/2 = 24 < 32, the rank
    the Gram has (float64, so rounding does not blur it)."""
    from apib_fx.scoring import calibrate_apib

    torch.manual_seed(0)
    model = _Reads().double()
    x = _data(8, 16).double()
    graph = apib_fx.trace(model, x[:1])
    calibrated = calibrate_apib(graph, graph.module, list(x.split(4)), progress=False)
    (g, (G, _)), = calibrated.problems.items()
    eig = torch.linalg.eigvalsh(G)
    assert calibrated.scores.rank_bound == {g: 24} == {g: int((eig > 1e-11 * eig.max()).sum())}


def test_no_channel_kept_on_relevance_alone_when_the_cut_is_above_zero():
    torch.manual_seed(0)
    model = _Wide().eval()
    pruned = apib_fx.prune(model, 0.7, _data(64, 16), num_calib=64, batch_size=32, progress=False)
    report = pruned.apib_report
    assert report.alpha > 0 and report.unselected == 0
    assert "relevance alone" not in report.table() and "no Lasso path" not in report.summary()


def test_model_branching_on_its_input_shape_prunes_and_reports_the_branches():
    from apib_fx.report import markdown

    torch.manual_seed(0)
    model = M.ShapeBranches().eval()
    data = torch.randn(32, 3, 6, 6)
    with pytest.warns(UserWarning, match="branches on its inputs' shapes"):
        pruned = apib_fx.prune(model, 0.3, data, tolerance=0.02, progress=False)  # (a small model: coarse steps)
    report = pruned.apib_report
    assert abs(report.flops_reduction - 0.3) <= 0.02
    assert report.flops_after == apib_fx.count_flops(pruned, data[:1])
    assert len(report.specialized) == 5 and "`if pad_h > 0 or pad_w > 0:` is True" in report.specialized[1]
    text = markdown(report)
    assert "## Branches on the input's shape" in text and "`if pad_h > 0 or pad_w > 0:` is True" in text
    assert pruned(data).shape == (32, 4)
    with pytest.raises(AssertionError, match="pad_h > 0 or pad_w > 0"):
        pruned(torch.randn(2, 3, 8, 8))
