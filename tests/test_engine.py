"""The trace and rewrite passes on hand-written models: exact, or non-prunable with a reason."""
import collections
import gc
import importlib
import inspect
import pickle
import time

import numpy as np
import pytest
import torch
from torch import nn

import apib_fx
from apib_fx.testing import check_exact, random_keep, zoo_model

from . import models as M

_trace_module = importlib.import_module("apib_fx.trace")  # the function apib_fx.trace shadows it

CASES = [
    (M.LeNet, (2, 3, 32, 32)),
    (M.ResidualChain, (2, 3, 16, 16)),
    (M.Branches, (2, 3, 16, 16)),
    (M.SEBlock, (2, 3, 16, 16)),
    (M.GroupedDepthwise, (2, 3, 16, 16)),
    (M.SplitChunk, (2, 3, 8, 8)),
    (M.SharedModule, (2, 3, 8, 8)),
    (M.ChannelsLast, (2, 3, 8, 8)),
    (M.Shuffle, (2, 3, 8, 8)),
    (M.SizeFromOtherTensor, (2, 3, 8, 8)),
    (M.SubclassedConv, (2, 3, 8, 8)),
    (M.SelfAttention, (2, 5, 16)),
    (M.SelfAttentionMergeC, (2, 5, 16)),
    (M.SelfAttentionSDPA, (2, 5, 16)),
    (M.NormAct, (2, 3, 8, 8)),
    (M.FunctionalBatchNorm, (2, 3, 8, 8)),
    (M.BlurPool, (2, 3, 8, 8)),
    (M.FunctionalPools, (2, 3, 5, 6, 7)),
    (M.Unpooling, (2, 3, 16, 12)),
    (M.TransposedConvs, (2, 3, 10, 12)),
    (M.SuperResolution, (2, 3, 8, 10)),
    (M.GatedDecoder, (2, 10)),
    (M.MapDecoder, (2, 10)),
    (M.ChunkedAttention, (2, 5, 16)),
    (M.EinsumAttention, (2, 5, 16)),
    (M.ComputedSlices, (2, 3, 8, 8)),
    (M.ElementwiseOps, (2, 3, 8, 8)),
    (M.WholeGroupNorms, (2, 3, 8, 8)),
    (M.StackedFeatures, (2, 3, 8, 8)),
    (M.SplitAttention, (2, 3, 8, 8)),
    (M.IteratedSplits, (2, 3, 6, 6)),
    (M.ConvRecurrent, (2, 3, 6, 7)),
    (M.ConvGRUSequenceFirst, (2, 3, 6, 7)),
    (M.TensorOps, (2, 3, 6, 10)),
    (M.TransposedParameterMatmul, (2, 3, 12)),
    (M.LayerScales, (2, 3, 8, 8)),
    (M.RolledChannelsLast, (2, 3, 8, 8)),
    (M.TalkingHeads, (2, 5, 16)),
    (M.RelativePosition, (2, 5, 16)),
    (M.ParameterMatmul, (2, 16)),
    (M.ClassTokenSlice, (2, 6, 16)),
    (M.ClassTokenParameter, (2, 3, 8, 8)),
    (M.TiedWeights, (2, 3, 8, 8)),
    (M.KeywordCalls, (2, 3, 8, 8)),
    (M.GlobalContextBlock, (2, 3, 6, 6)),
    (M.ScaledAttention, (2, 5, 16)),
    (M.MultiQueryAttention, (2, 5, 16)),
    (M.MultiQueryMatmul, (2, 5, 16)),
    (M.RelativePositionBias, (2, 5, 16)),
    (M.ShapeChecks, (2, 3, 8, 8)),
    (M.ShapeBranches, (2, 3, 6, 6)),
    (M.PatchUnfold, (2, 3, 8, 6)),
    (M.OptionalArguments, (2, 3, 6, 6)),
]


def _model(cls):
    torch.manual_seed(0)
    m = cls()
    for mod in m.modules():  # non-trivial BatchNorm state, so slicing mistakes show
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2)
            mod.weight.data.uniform_(0.5, 1.5)
    return m


@pytest.mark.parametrize("cls,shape", CASES, ids=[c[0].__name__ for c in CASES])
@pytest.mark.parametrize("seed, heads", [(0, "dims"), (1, "dims"), (0, "whole")])
def test_exact(cls, shape, seed, heads):
    # heads="whole" changes only which axis of a split stays free: every case stays exact.
    model = _model(cls)
    x = torch.randn(shape)
    graph = apib_fx.trace(model, x, heads=heads)
    assert graph.prunable_groups, "nothing prunable"
    report = check_exact(model, x, seed=seed, graph=graph)
    assert report.shapes_ok and report.finite
    assert report.max_diff <= 1e-5, report
    # (with whole heads, a split whose outer slices are single layers' outputs, as Shuffle's
    # concat of two convs, leaves groups of one channel: nothing to remove there)
    assert report.flops_after < report.flops_before or heads == "whole"
    assert report.flops_model == report.flops_after


@pytest.mark.parametrize("cls,shape", CASES, ids=[c[0].__name__ for c in CASES])
def test_exact_at_another_batch_size(cls, shape):
    # Traced on one sample (as prune traces), the pruned model runs any batch: sizes the graph
    # computes from the batch size stay computed.
    model = _model(cls)
    graph = apib_fx.trace(model, torch.randn(1, *shape[1:]))
    report = check_exact(model, torch.randn(3, *shape[1:]), graph=graph)
    assert report.shapes_ok and report.finite
    assert report.max_diff <= 1e-5, report


@pytest.mark.parametrize("cls,shape", CASES, ids=[c[0].__name__ for c in CASES])
def test_flops_batch_equals_flops(cls, shape):
    # The vectorised FLOPs model (the search tries many width vectors at once on small models)
    # against the one-vector form, which the exactness tests tie to count_flops of built models.
    graph = apib_fx.trace(_model(cls), torch.randn(shape))
    gen = torch.Generator().manual_seed(0)
    full = np.array([g.channels for g in graph.groups])
    rows = np.stack([torch.randint(1, int(c) + 1, (6,), generator=gen).numpy() for c in full], axis=1)
    want = np.array([graph.flops(dict(enumerate(r.tolist()))) for r in rows], dtype=np.float64)
    assert np.allclose(graph.flops_batch(rows), want, rtol=1e-12, atol=0)
    some = [g.index for g in graph.prunable_groups][:3]
    want = np.array([graph.flops(dict(zip(some, r[some].tolist()))) for r in rows], dtype=np.float64)
    assert np.allclose(graph.flops_batch(rows[:, some], some), want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("cls,shape", CASES, ids=[c[0].__name__ for c in CASES])
def test_count_flops_matches_flop_counter_mode(cls, shape):
    # torch's own counter ÷ 2, on the op-by-op attention path (it has no formula for fused layers)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from apib_fx.flops import unfused_attention

    model = _model(cls).eval()
    x = torch.randn(shape)
    steps = {}  # recurrent layer -> input positions (time steps x samples)
    for m in model.modules():
        if isinstance(m, nn.RNNBase):
            m.register_forward_pre_hook(lambda m, args: steps.__setitem__(m, args[0].numel() // args[0].shape[-1]))
    with unfused_attention(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, \
            torch.no_grad():
        model(x)
    want = counter.get_total_flops()
    for name, m in model.named_modules():
        if isinstance(m, nn.RNNBase):  # (torch's counter has none of an LSTM's MACs, part of a GRU's: by hand)
            want -= sum(counter.get_flop_counts().get(f"{cls.__name__}.{name}", {}).values())
            want += 2 * _recurrent_macs(m, steps[m])
    assert apib_fx.count_flops(model, x) * 2 == want > 0


def _recurrent_macs(m: nn.RNNBase, positions: int) -> int:
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[type(m).__name__]
    directions, hidden = 1 + m.bidirectional, m.hidden_size
    out = m.proj_size or hidden
    per_step = sum(directions * (gates * hidden * ((m.input_size if layer == 0 else out * directions) + out)
                                 + out * hidden * (m.proj_size > 0))
                   for layer in range(m.num_layers))
    return positions * per_step


@pytest.mark.parametrize("cell,kwargs", [("LSTM", {}), ("LSTM", {"bidirectional": True, "proj_size": 3}),
                                         ("GRU", {"bidirectional": True}), ("RNN", {"nonlinearity": "relu"})])
def test_count_flops_counts_every_step_of_recurrent_layers(cell, kwargs):
    rnn = getattr(nn, cell)(6, 5, num_layers=2, **kwargs)
    assert apib_fx.count_flops(rnn, torch.randn(7, 2, 6)) == _recurrent_macs(rnn, 14)

    class Packed(nn.Module):  # (a packed batch: only its valid steps, 7 + 4)
        def __init__(self):
            super().__init__()
            self.rnn = rnn

        def forward(self, x):
            return self.rnn(nn.utils.rnn.pack_padded_sequence(x, [7, 4]))[0].data

    assert apib_fx.count_flops(Packed(), torch.randn(7, 2, 6)) == _recurrent_macs(rnn, 11)


@pytest.mark.parametrize("layers,shape,prunable", [
    ((nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 6, 3, groups=2), nn.ConvTranspose2d(6, 4, 3)), (3, 12, 12),
     [True, True, False]),
    ((nn.Conv1d(3, 6, 3), nn.ReLU(), nn.Conv1d(6, 6, 3, groups=6), nn.Conv1d(6, 4, 3)), (3, 12),
     [True, False]),  # the depthwise conv keeps its input's channels
], ids=["2d", "1d"])
def test_unbatched_convolutions(layers, shape, prunable):
    # torch convolutions take (C, ...) inputs: channels on axis 0, and no batch in the MACs
    torch.manual_seed(0)
    model = nn.Sequential(*layers).eval()
    x = torch.randn(shape)
    graph = apib_fx.trace(model, x)
    assert [g.prunable for g in graph.groups] == prunable
    assert graph.flops() == apib_fx.count_flops(model, x)
    report = check_exact(model, x, graph=graph)
    assert report.max_diff <= 1e-5 and report.flops_model == report.flops_after < report.flops_before


def test_lenet_view_is_rewritten():
    model = _model(M.LeNet)
    x = torch.randn(2, 3, 32, 32)
    g = apib_fx.trace(model, x)
    (conv2,) = [gr for gr in g.groups if any(m.param == "conv2.weight" and m.role == "out" for m in gr.members)]
    fc1_in = [m for m in conv2.members if m.param == "fc1.weight"][0]
    assert fc1_in.dim == 1 and fc1_in.role == "in" and fc1_in.multiplicity == 25
    assert fc1_in.index(torch.tensor([1])).tolist() == list(range(25, 50))
    pruned = apib_fx.apply(model, g, {conv2.index: torch.arange(10)})
    assert pruned.fc1.in_features == 250 and pruned.fc1.weight.shape == (120, 250)
    assert "250" in pruned.code and pruned(x).shape == (2, 10)


def test_checks_of_channel_counts_pass_after_pruning_and_others_stay():
    model = _model(M.ShapeChecks)
    x = torch.randn(2, 3, 8, 8)
    g = apib_fx.trace(model, x)
    assert len(g.prunable_groups) == 2  # conv1's and conv2's outputs, both checked
    pruned = apib_fx.apply(model, g, {gr.index: torch.arange(3) for gr in g.prunable_groups})
    assert pruned.conv1.out_channels == 3 and pruned.conv2.out_channels == 3  # (3: odd, the model checks for even)
    assert pruned(x).shape == (2, 4)
    with pytest.raises(AssertionError, match="8 rows"):  # the spatial check is still the model's
        pruned(torch.randn(2, 3, 10, 10))


def test_branches_on_input_shapes_follow_the_example_inputs():
    model = _model(M.ShapeBranches)
    x = torch.randn(2, 3, 6, 6)
    before = x.clone()
    with pytest.warns(UserWarning, match=r"branches on its inputs' shapes or on arguments left at their defaults \(5x, first: `if x.dim\(\) == 3:` is False"):
        g = apib_fx.trace(model, x)
    assert torch.equal(x, before)
    assert [s.split("` is ")[1].split(" (")[0] for s in g.specialized] == ["False", "True", "True", "False", "False"]
    assert "`if pad_h > 0 or pad_w > 0:` is True (models.py:" in g.specialized[1]
    keep = {gr.index: torch.arange(5) for gr in g.prunable_groups}
    pruned = apib_fx.apply(model, g, keep)
    assert pruned.conv1.out_channels == 5 and pruned(x).shape == (2, 4)
    # Inputs that take another branch (8 x 8 needs no padding) fail the recorded check.
    with pytest.raises(AssertionError, match=r"`if pad_h > 0 or pad_w > 0:` \(models.py:\d+\) is True"):
        pruned(torch.randn(2, 3, 8, 8))
    assert pruned(torch.randn(1, 3, 7, 5)).shape == (1, 4)  # (padded too: the same branches)
    again = pickle.loads(pickle.dumps(pruned))  # (unpickling re-traces the generated code)
    assert torch.equal(again(x), pruned(x))
    # Traced where both operands of the `or` are False: two checks, the line listed once.
    with pytest.warns(UserWarning, match=r"\(5x, first"):
        g = apib_fx.trace(model, torch.randn(2, 3, 8, 8))
    assert sum("`if pad_h > 0 or pad_w > 0:` is False" in s for s in g.specialized) == 1
    pruned = apib_fx.apply(model, g, {gr.index: torch.arange(5) for gr in g.prunable_groups})
    assert pruned(torch.randn(1, 3, 8, 8)).shape == (1, 4)
    with pytest.raises(AssertionError, match=r"`if pad_h > 0 or pad_w > 0:` \(models.py:\d+\) is False"):
        pruned(torch.randn(1, 3, 8, 6))  # (the second operand's check)


def test_len_and_int_of_sizes_follow_the_example_inputs():
    class Halves(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            y = self.conv(x)
            if len(y.shape) == 4:
                y = y[..., : int(y.shape[-1] * 0.5)]
            return self.fc(y.mean((2, 3)))

    model, x = Halves().eval(), torch.randn(2, 3, 6, 6)
    with pytest.warns(UserWarning):
        g = apib_fx.trace(model, x)
    assert [s.split(" (")[0] for s in g.specialized] == ["`if len(y.shape) == 4:` gives len 4",
                                                          "`y = y[..., : int(y.shape[-1] * 0.5)]` gives int 3"]
    pruned = apib_fx.apply(model, g, {g.prunable_groups[0].index: torch.arange(4)})
    assert pruned(x).shape == (2, 2)
    with pytest.raises(AssertionError, match=r"gives int 3"):
        pruned(torch.randn(2, 3, 8, 8))


def test_loops_over_the_pieces_of_a_split_follow_the_example_inputs():
    # fx cannot iterate a traced value; the pieces of a split are as many as the shapes say.
    model, x = _model(M.IteratedSplits), torch.randn(2, 3, 6, 6)
    with pytest.warns(UserWarning):
        g = apib_fx.trace(model, x)
    assert [s.split(" (")[0] for s in g.specialized] == [
        "`outs = [conv(t) for t, conv in zip(x.chunk(4, 1), self.convs)]` gives 4 pieces",
        "`y = sum(y.split(y.shape[1] // 2, 1))` gives 2 pieces",
        "`rows = [row.mean(-1) for row in y.unbind(2)]` gives 6 pieces"]
    # (the length checks read no channels: every group but the classifier's outputs is prunable)
    assert [gr.reason for gr in g.groups if not gr.prunable] == ["they reach a model output"]
    keep = {gr.index: torch.arange(gr.channels // 2) for gr in g.prunable_groups}
    pruned = apib_fx.apply(model, g, keep)
    assert pruned.stem.out_channels == 8 and pruned(x).shape == (2, 3)
    assert pruned(torch.randn(1, 3, 6, 9)).shape == (1, 3)  # (the width sets no count)
    with pytest.raises(AssertionError, match=r"`rows = .*unbind\(2\)\]` \(models.py:\d+.*gives 6 pieces"):
        pruned(torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize("cls", [M.ConvRecurrent, M.ConvGRUSequenceFirst])
def test_recurrent_layers_prune_their_input_features_and_keep_their_hidden_units(cls):
    model, x = _model(cls), torch.randn(2, 3, 6, 7)
    g = apib_fx.trace(model, x)
    fixed = {gr.name: gr.reason for gr in g.groups if not gr.prunable}
    want = {"fc.weight[0]": "they reach a model output"}
    if model.init is not None:  # (its outputs are the first hidden state)
        want["init.weight[0]"] = "consumed by GRU 'rnn' as its initial state, whose hidden units stay whole"
    assert fixed == want
    conv2 = next(gr for gr in g.groups if gr.name == "conv2.weight[0]")
    ih = [m for m in conv2.members if m.param.startswith("rnn.")]
    # each of conv2's channels is 3 rows of every column: 3 input features of each direction's first layer
    assert sorted((m.param, m.dim, m.role, m.multiplicity) for m in ih) == sorted(
        (f"rnn.weight_ih_l0{s}", 1, "in", 3) for s in ("", "_reverse")[:model.directions])
    pruned = apib_fx.apply(model, g, {conv2.index: torch.tensor([0, 2, 5])})
    assert pruned.rnn.input_size == 9 and pruned.rnn.weight_ih_l0.shape[1] == 9
    assert apib_fx.count_flops(pruned, x) == g.flops({conv2.index: 3})  # (recurrences count no MACs, as FlopCounterMode)


def test_optional_arguments_are_traced_as_left_out():
    # ``mask is not None`` on an argument fx made an input was always true: the mask's path was
    # traced, and failed on calls without one. Left-out arguments are bound to their defaults,
    # and the pruned model checks that calls leave them so.
    model = _model(M.OptionalArguments)
    x = torch.randn(2, 3, 6, 6)
    with pytest.warns(UserWarning, match="arguments left at their defaults"):
        g = apib_fx.trace(model, x)
    assert [s.split(" (")[0] for s in g.specialized] == ["`y = y.amax((2, 3)) if pool_max else y.mean((2, 3))` is False"]
    pruned = apib_fx.apply(model, g, {g.prunable_groups[0].index: torch.arange(5)})
    assert list(inspect.signature(pruned.forward).parameters) == ["x", "mask", "pool_max"]
    assert pruned(x, mask=None).shape == (2, 4)
    with pytest.raises(AssertionError, match="mask has been specialized to have value None"):
        pruned(x, mask=torch.ones(2, 36))
    with pytest.raises(AssertionError, match=r"`y = y.amax\(\(2, 3\)\) if pool_max else .*` \(models.py:\d+\) is False"):
        pruned(x, pool_max=True)


def test_branch_on_tensor_values_is_named_with_its_line():
    with pytest.raises(apib_fx.TraceError, match=r"(?s)`if x.sum\(\) > 0:` \(models.py:\d+, in module 'gate'\) "
                                                 r"branches on tensor values.*leaf_modules=\(Gate,\)"):
        apib_fx.trace(_model(M.Untraceable), torch.randn(1, 3, 8, 8))


def test_trace_does_not_write_into_the_example_inputs():
    class Scales(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)

        def forward(self, x):
            x.mul_(2)  # (the user's own forward writes into its input)
            if x.shape[-1] > 6:  # (and branches on it: the example inputs run up to here)
                x = x[..., :6]
            return self.conv(x)

    x = torch.ones(1, 3, 8, 8)
    with pytest.warns(UserWarning):
        g = apib_fx.trace(Scales(), x)
    assert torch.equal(x, torch.ones(1, 3, 8, 8)) and len(g.specialized) == 1


def test_residual_stream_is_one_group():
    model = _model(M.ResidualChain)
    g = apib_fx.trace(model, torch.randn(1, 3, 8, 8))
    stream = [gr for gr in g.groups if any(m.param == "stem.weight" for m in gr.members)][0]
    outs = sorted(m.param for m in stream.members if m.role == "out")
    assert outs == ["blocks.0.2.weight", "blocks.1.2.weight", "blocks.2.2.weight", "stem.weight"]
    assert stream.prunable
    assert {m.param for m in stream.members if m.role == "in"} >= {"head.weight", "blocks.0.0.weight"}


def test_functional_pooling_keeps_channels_prunable():
    g = apib_fx.trace(_model(M.FunctionalPools), torch.randn(1, 3, 5, 6, 7))
    prunable = {m.param for gr in g.prunable_groups for m in gr.members if m.role == "out"}
    assert prunable == {"conv1.weight", "conv2.weight", "mix.weight"}


def test_unpooling_ties_encoder_and_decoder_channels():
    g = apib_fx.trace(_model(M.Unpooling), torch.randn(1, 3, 16, 12))
    outs = sorted(sorted(m.param for m in gr.members if m.role == "out") for gr in g.prunable_groups)
    # each pool's indices carry its input's channels to the values unpooled with them
    assert outs == [["dec1.weight", "enc1.weight"], ["dec2.weight", "enc2.weight"], ["mid.weight"]]


def test_transposed_convolutions_prune_both_sides():
    model = _model(M.TransposedConvs)
    x = torch.randn(1, 3, 10, 12)
    g = apib_fx.trace(model, x)
    by_out = {(m.param, m.dim): gr for gr in g.prunable_groups for m in gr.members if m.role == "out"}
    up, grouped = by_out[("up.weight", 1)], by_out[("grouped.weight", 1)]  # weights are (in, out / groups, k...)
    assert ("up.weight", 0, "in") in {(m.param, m.dim, m.role) for m in by_out[("down.weight", 0)].members}
    members = {m.param: m for m in grouped.members}
    assert grouped.channels == 4 and members["grouped.bias"].multiplicity == 2  # output j of each group
    assert (members["depthwise.weight"].role, members["depthwise.weight"].dim) == ("pass", 0)
    assert members["head.weight"].multiplicity == 4  # 2 groups x 2 depthwise outputs per channel
    pruned = apib_fx.apply(model, g, {up.index: torch.tensor([0, 4, 9]), grouped.index: torch.tensor([1, 2, 3])})
    assert (pruned.up.out_channels, pruned.fuse.in_channels) == (3, 15)
    assert (pruned.grouped.out_channels, pruned.grouped.groups, pruned.bn.num_features) == (6, 2, 6)
    assert (pruned.depthwise.in_channels, pruned.depthwise.groups, pruned.depthwise.out_channels) == (6, 6, 12)
    assert pruned(x).shape == model(x).shape


def test_pixel_and_channel_shuffles_keep_channels_prunable():
    model = _model(M.SuperResolution)
    g = apib_fx.trace(model, torch.randn(1, 3, 8, 10))
    members = {(m.param, m.role): (gr, m) for gr in g.groups for m in gr.members}
    stem, body_in = members[("stem.weight", "out")][0], members[("body.weight", "in")][1]
    # one stem channel is 4 channels after the unshuffle (4 input positions of the body's filters),
    # and the grouped body ties stem channel c (its group 0) to c + 2 (its group 1)
    assert stem.prunable and stem.channels == 2 and body_in.multiplicity == 4
    body = members[("body.weight", "out")][0]
    assert body.prunable and body.channels == 6  # position j of both shuffled groups goes together
    up, up_out = members[("up.weight", "out")]
    assert up.prunable and up.channels == 3 and up_out.multiplicity == 4  # 4 conv outputs per pixel-shuffled channel
    assert members[("head.weight", "in")][0] is up
    keep = {stem.index: torch.tensor([1]), body.index: torch.tensor([1, 4, 5]), up.index: torch.tensor([1])}
    pruned = apib_fx.apply(model, g, keep)
    assert (pruned.body.in_channels, pruned.body.out_channels, pruned.mix.in_channels) == (8, 6, 6)
    assert (pruned.up.out_channels, pruned.head.in_channels) == (4, 1)


def test_einsum_products_prune_as_matrix_products():
    # The same attention written with einsums and with @: the same groups, members and FLOPs
    # model; the einsum over channels with a parameter reads them as a Linear layer would.
    def layout(graph):
        return [(g.channels, g.prunable, sorted((m.param, m.dim, m.role) for m in g.members)) for g in graph.groups]

    x = torch.randn(1, 5, 16)
    with_einsum, with_matmul = _model(M.EinsumAttention), _model(M.ChunkedAttention)
    g_ein, g_mm = apib_fx.trace(with_einsum, x), apib_fx.trace(with_matmul, x)
    assert layout(g_ein) == layout(g_mm)
    mix = [g for g in g_ein.groups if any(m.param == "mix" for m in g.members)]
    assert len(mix) == 1 and mix[0].prunable and mix[0].channels == 16
    widths = {g.index: g.channels // 2 for g in g_ein.prunable_groups}
    assert g_ein.flops(widths) == g_mm.flops(widths) < g_ein.flops({})
    # APIB reads the einsums' contracted channels as it reads the matrix products': same scores
    from apib_fx.scoring import score_apib

    data = [torch.randn(8, 5, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    s_ein = score_apib(g_ein, g_ein.module, data, progress=False, workers=1)
    s_mm = score_apib(g_mm, g_mm.module, data, progress=False, workers=1)
    assert not s_ein.notes and set(s_ein.primary) == {g.index for g in g_ein.prunable_groups}
    for g in s_ein.primary:
        torch.testing.assert_close(s_ein.primary[g], s_mm.primary[g])
    # a one-operand einsum (a sum over positions) keeps its channels whole, saying why
    conv = apib_fx.trace(_EinsumSum(), torch.randn(1, 3, 6, 6)).groups[0]
    assert conv.members[0].param == "conv.weight" and not conv.prunable and "einsum" in conv.reason


class _EinsumSum(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.out = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return self.out(y * torch.einsum("bchw->bc", y)[:, :, None, None])


def test_gated_decoder_groups():
    # a GLU ties channel i of its first half to channel i of its second; Unflatten's sizes follow
    model = _model(M.GatedDecoder)
    g = apib_fx.trace(model, torch.randn(1, 10))
    members = {(m.param, m.role): (gr, m) for gr in g.groups for m in gr.members}
    fc = members[("fc.weight", "out")][0]
    assert fc.prunable and fc.channels == 32 and members[("up1.weight", "in")][0] is fc
    up1 = members[("up1.weight", "out")][0]
    assert up1.prunable and up1.channels == 8 and members[("up1.weight", "out")][1].multiplicity == 2
    assert members[("up2.weight", "in")][0] is up1
    up2 = members[("up2.weight", "out")][0]
    assert up2.prunable and up2.channels == 6 and members[("head.weight", "in")][0] is up2
    keep = {fc.index: torch.tensor([0, 5, 31]), up1.index: torch.tensor([2, 7]), up2.index: torch.tensor([0, 1, 5])}
    pruned = apib_fx.apply(model, g, keep)
    assert pruned.unflatten.unflattened_size == (3, 1, 1)
    assert (pruned.up1.in_channels, pruned.up1.out_channels, pruned.up2.in_channels) == (3, 4, 2)
    assert (pruned.up2.out_channels, pruned.head.in_channels) == (6, 3)
    # the kept halves line up: output channel 7 of up1 gates with channel 15
    assert torch.equal(pruned.up1.weight, model.up1.weight[[0, 5, 31]][:, [2, 7, 10, 15]])


class _ChannelsLastRMSNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.norm = nn.RMSNorm(8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(self.norm(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


def test_rms_norm_over_channels_is_prunable_not_exact():
    model = _model(_ChannelsLastRMSNorm)
    x = torch.randn(2, 3, 6, 6)
    g = apib_fx.trace(model, x)
    (conv,) = g.prunable_groups
    assert ("norm.weight", 0, "pass") in {(m.param, m.dim, m.role) for m in conv.members}
    report = check_exact(model, x, graph=g)
    assert not report.exact_expected and "RMSNorm" in report.note and report.shapes_ok and report.finite
    assert apib_fx.apply(model, g, {conv.index: torch.tensor([1, 2, 6])}).norm.normalized_shape == (3,)


def test_tensors_the_forward_creates_stay_off_the_model():
    # fx keeps a tensor the forward creates as a new attribute of the traced module
    model = _model(M.TensorOps)
    x = torch.randn(2, 3, 6, 10)
    before = set(vars(model))
    g = apib_fx.trace(model, x)
    pruned = apib_fx.apply(model, g, random_keep(g, 0.5))
    assert set(vars(model)) == before and not hasattr(model, "_tensor_constant0")
    assert torch.equal(pruned._tensor_constant0, torch.linspace(0.0, 1.0, 10))
    by_out = {m.param: gr for gr in g.groups for m in gr.members if m.role == "out"}
    # the one along the channels cannot be sliced (it is no parameter): those channels stay
    assert not by_out["conv3.weight"].prunable and "clamp" in by_out["conv3.weight"].reason
    assert by_out["conv1.weight"].prunable and by_out["conv2.weight"].prunable
    members = {m.param: m for m in by_out["conv2.weight"].members}
    seen = {}  # conv2's output channel -> the conv3 input it becomes (narrow(1, 2, 4): 2..5 -> 0..3)
    for k in range(by_out["conv2.weight"].channels):
        (c,) = members["conv2.weight"].index(torch.tensor([k])).tolist()
        seen[c] = members["conv3.weight"].index(torch.tensor([k])).tolist()
    assert seen == {2: [0], 3: [1], 4: [2], 5: [3]}  # (channels 0, 1, 6, 7 reach nothing: a group of their own)


def test_transposed_parameter_matmul_prunes_like_linear():
    g = apib_fx.trace(_model(M.TransposedParameterMatmul), torch.randn(2, 3, 12))
    (conv,) = [gr for gr in g.groups if any(m.param == "conv.weight" for m in gr.members)]
    assert conv.prunable
    assert {(m.param, m.dim, m.role) for m in conv.members} >= {("W", 1, "in"), ("V", 1, "in"), ("norm.weight", 0, "pass")}


def test_concat_offsets_and_slice():
    model = _model(M.Branches)
    g = apib_fx.trace(model, torch.randn(1, 3, 8, 8))
    by_out = {m.param: gr for gr in g.groups for m in gr.members if m.role == "out"}
    b = by_out["b.weight"]
    mix = [m for m in b.members if m.param == "mix.weight"][0]
    assert mix.index(torch.arange(12)).tolist() == list(range(8, 20))  # concat offset 8
    a = by_out["a.weight"]
    assert {m.param for m in a.members if m.role == "in"} == {"mix.weight", "side.weight"}
    pruned = apib_fx.apply(model, g, {a.index: torch.tensor([0, 3, 5])})
    assert pruned.side.in_channels == 3 and pruned.mix.in_channels == 19
    assert "slice(None, 3" in pruned.code


def test_grouped_conv_keeps_group_count():
    model = _model(M.GroupedDepthwise)
    x = torch.randn(1, 3, 8, 8)
    g = apib_fx.trace(model, x)
    keep = random_keep(g, 0.5)
    pruned = apib_fx.apply(model, g, keep)
    assert pruned.grouped.groups == 4
    assert pruned.grouped.in_channels % 4 == 0 and pruned.grouped.out_channels % 4 == 0
    assert pruned.dw.groups == pruned.dw.in_channels and pruned.dw.out_channels == 2 * pruned.dw.in_channels
    dw = [gr for gr in g.groups if any(m.param == "dw.weight" for m in gr.members)][0]
    assert [m.role for m in dw.members if m.param == "dw.weight"] == ["pass"]
    assert pruned(x).shape == (1, 8, 8, 8)


def test_split_sizes_rewritten():
    model = _model(M.SplitChunk)
    x = torch.randn(1, 3, 8, 8)
    g = apib_fx.trace(model, x)
    conv = [gr for gr in g.groups if any(m.param == "conv.weight" for m in gr.members)]
    assert len(conv) == 2  # the split pieces are chosen independently
    pruned = apib_fx.apply(model, g, random_keep(g, 0.4))
    assert pruned.p.in_channels + pruned.q.in_channels == pruned.conv.out_channels
    assert pruned.r.in_channels != 8 or pruned.s.in_channels != 8


def test_shared_module_ties_both_call_sites():
    model = _model(M.SharedModule)
    g = apib_fx.trace(model, torch.randn(1, 3, 8, 8))
    group = [gr for gr in g.groups if any(m.param == "conv1.weight" and m.role == "out" for m in gr.members)][0]
    outs = {m.param for m in group.members if m.role == "out"}
    assert outs == {"conv1.weight", "conv2.weight"}


def test_layer_scale_parameter_is_pass_member():
    model = _model(M.ChannelsLast)
    g = apib_fx.trace(model, torch.randn(1, 3, 8, 8))
    group = [gr for gr in g.groups if any(m.param == "conv.weight" for m in gr.members)][0]
    assert ("scale", 0, "pass") in {(m.param, m.dim, m.role) for m in group.members}
    assert ("fc2.weight", 0, "out") in {(m.param, m.dim, m.role) for m in group.members}


def test_normalisation_prunable_but_not_exact():
    model = _model(M.ReshapeHardcoded)
    x = torch.randn(2, 3, 8, 8)
    g = apib_fx.trace(model, x)
    group = [gr for gr in g.groups if any(m.param == "conv.weight" for m in gr.members)][0]
    assert group.prunable and not group.exact and "GroupNorm" in group.note
    report = check_exact(model, x, graph=g, fraction=0.5)
    assert not report.exact_expected and report.shapes_ok and report.finite
    assert report.flops_model == report.flops_after < report.flops_before
    pruned = apib_fx.apply(model, g, random_keep(g, 0.5))
    assert pruned.gn.num_channels % 4 == 0 and pruned.gn.num_groups == 4


@pytest.mark.parametrize(
    "cls,param,words",
    [
        (M.SoftmaxOverChannels, "conv.weight", "softmax"),
        (M.ChannelReduction, "conv.weight", "reduced"),
    ],
)
def test_non_prunable_with_reason(cls, param, words):
    model = _model(cls)
    g = apib_fx.trace(model, torch.randn(1, 3, 8, 8))
    group = [gr for gr in g.groups if any(m.param == param and m.role == "out" for m in gr.members)][0]
    assert not group.prunable and words in group.reason.lower()
    with pytest.raises(ValueError, match="not prunable"):
        apib_fx.apply(model, g, {group.index: torch.tensor([0])})


def _pruned_matches_reference(model, graph, keep, x):
    from apib_fx.testing import zeroed_reference

    pruned = apib_fx.apply(model, graph, keep).eval()
    ref = zeroed_reference(model, graph, keep).eval()
    with torch.no_grad():
        for got, want in zip(pruned(x), ref(x)):
            assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)


def test_sizes_computed_from_channel_counts_follow_the_pruning():
    x = torch.randn(2, 3, 8, 8)
    model = _model(M.SizeFromOtherTensor)  # y.reshape(B, C, H * W), C read off another tensor
    g = apib_fx.trace(model, x)
    (a,), (b,) = _group_of(g, "a.weight"), _group_of(g, "b.weight")
    assert a.prunable and b.prunable and a is not b  # independent: the rewrite gives C its new value
    _pruned_matches_reference(model, g, {a.index: torch.tensor([0, 1, 2]), b.index: torch.arange(6)}, x)
    model = _model(M.SizeIntoUnprunableAxis)  # a parameter reshaped with C from the conv
    g = apib_fx.trace(model, torch.randn(1, 3, 4, 4))
    (conv,) = _group_of(g, "conv.weight")
    assert conv.prunable
    _pruned_matches_reference(model, g, {conv.index: torch.tensor([1, 4])}, torch.randn(2, 3, 4, 4))
    model = _model(M.MixedSizeReshape)  # C * H shapes the other conv's channels: both stay whole
    g = apib_fx.trace(model, x)
    assert not _group_of(g, "a.weight")[0].prunable and not _group_of(g, "b.weight")[0].prunable


def test_unflatten_literal_sizes_follow_the_pruning():
    model = _model(M.UnflattenGroups)
    x = torch.randn(2, 3, 5, 5)
    g = apib_fx.trace(model, x)
    (a,) = _group_of(g, "a.weight")
    assert a.prunable and a.channels == 4  # the width inside each of the 3 groups
    keep = {a.index: torch.tensor([0, 2, 3])}
    pruned = apib_fx.apply(model, g, keep)
    assert pruned.a.weight.shape[0] == 9 and "(3, 3)" in pruned.code
    _pruned_matches_reference(model, g, keep, x)
    assert g.flops({a.index: 3}) == apib_fx.count_flops(pruned, x)


def _group_of(graph, param, role="out"):
    return [gr for gr in graph.groups if any(m.param == param and m.role == role for m in gr.members)]


def test_attention_head_dims_pruned_together_across_heads_and_q_k_v():
    model = _model(M.SelfAttention)
    g = apib_fx.trace(model, torch.randn(1, 5, 16))
    (heads,) = _group_of(g, "qkv.weight")
    assert heads.prunable and heads.channels == 8  # head_dim: the same d leaves every head of q, k, v
    qkv = [m for m in heads.members if m.param == "qkv.weight"][0]
    proj_in = [m for m in heads.members if m.param == "proj.weight" and m.role == "in"][0]
    assert qkv.multiplicity == 3 * 4 and proj_in.multiplicity == 4
    (stream,) = _group_of(g, "embed.weight")
    assert stream.prunable and stream is not heads  # the residual stream is its own group
    pruned = apib_fx.apply(model, g, {heads.index: torch.tensor([0, 3, 5]), stream.index: torch.arange(20)})
    assert pruned.qkv.weight.shape == (3 * 4 * 3, 20) and pruned.proj.weight.shape == (20, 12)
    # merging heads with C read off the stream: C is rewritten to the heads' new width
    model = _model(M.SelfAttentionMergeC)
    g = apib_fx.trace(model, torch.randn(1, 5, 16))
    (heads,), (stream,) = _group_of(g, "qkv.weight"), _group_of(g, "embed.weight")
    assert heads is not stream
    _pruned_matches_reference(model, g, {heads.index: torch.tensor([2, 7]), stream.index: torch.arange(0, 32, 3)},
                              torch.randn(2, 5, 16))


def test_attention_through_sdpa_prunes_head_dims_with_the_original_scale():
    model = _model(M.SelfAttentionSDPA)
    x = torch.randn(2, 5, 16)
    g = apib_fx.trace(model, x)
    (heads,) = _group_of(g, "qkv.weight")
    assert heads.prunable and heads.channels == 8
    keep = {heads.index: torch.tensor([1, 2, 6])}
    pruned = apib_fx.apply(model, g, keep)
    assert "scale = 0.35355" in pruned.code  # 1/sqrt(8): the temperature of the unpruned model
    _pruned_matches_reference(model, g, keep, x)
    assert g.flops({heads.index: 3}) == apib_fx.count_flops(pruned, x)


def test_channel_reduction_leaves_other_branch_prunable():
    model = _model(M.ChannelReduction)
    x = torch.randn(2, 3, 8, 8)
    g = apib_fx.trace(model, x)
    other = [gr for gr in g.groups if any(m.param == "other.weight" for m in gr.members)][0]
    assert other.prunable
    assert check_exact(model, x, graph=g).max_diff <= 1e-5


def test_model_outputs_are_never_pruned():
    model = _model(M.LeNet)
    g = apib_fx.trace(model, torch.randn(1, 3, 32, 32))
    fc2 = [gr for gr in g.groups if any(m.param == "fc2.weight" and m.role == "out" for m in gr.members)][0]
    assert not fc2.prunable and "output" in fc2.reason


def test_untraceable_names_module_and_leaf_modules_work():
    model = _model(M.Untraceable)
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(apib_fx.TraceError, match=r"(?s)'gate' \(Gate\).*leaf_modules"):
        apib_fx.trace(model, x)
    g = apib_fx.trace(model, x, leaf_modules=(M.Untraceable.Gate,))
    conv = [gr for gr in g.groups if any(m.param == "conv.weight" for m in gr.members)][0]
    assert not conv.prunable and "Gate" in conv.reason


def test_trace_reports_its_time_per_phase():
    model, x = _model(M.Branches), torch.randn(1, 3, 16, 16)
    start = time.perf_counter()
    g = apib_fx.trace(model, x)
    total = time.perf_counter() - start
    assert list(g.timings) == ["fx", "shapes", "labels", "groups"]
    assert all(t > 0 for t in g.timings.values()) and sum(g.timings.values()) <= total


def test_trace_leaves_garbage_collection_as_the_caller_had_it():
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(apib_fx.TraceError):
        apib_fx.trace(_model(M.Untraceable), x)
    assert gc.isenabled()  # paused while tracing, back after an error
    gc.disable()
    try:
        apib_fx.trace(_model(M.LeNet), torch.randn(1, 3, 32, 32))
        assert not gc.isenabled()  # a caller that switched it off keeps it off
    finally:
        gc.enable()


class _FxTracer(_trace_module._Tracer):
    """The engine's tracer with fx's own node creation, proxies, module calls and patches."""

    patch_model_classes = False

    create_node = torch.fx.Tracer.create_node
    getattr = torch.fx.Tracer.getattr
    proxy = torch.fx.Tracer.proxy

    def call_module(self, m, forward, args, kwargs):
        rule = apib_fx.rules.module_rule(type(m))
        if rule is not None and rule.expand is not None:
            out = rule.expand(m, args, kwargs)
            if out is not None:
                return out
        return torch.fx.Tracer.call_module(self, m, forward, args, kwargs)


def _node_records(graph):
    return [(n.name, n.op, n.target, str(n.args), str(n.kwargs), [u.name for u in n.users], n.meta.get("nn_module_stack"))
            for n in graph.nodes]


class _FunctionalTiedHead(M.EmbeddingTiedHead):
    """Reads the tied table as a parameter in its forward (``F.embedding(ids, self.emb.weight)``)."""

    def __init__(self):
        super().__init__(functional=True)


_Pair = collections.namedtuple("_Pair", "left right")


class _ProxiesInContainers(nn.Module):
    """Torch functions whose tensors come in lists, keyword dicts and a namedtuple (which fx's own
    argument walk opens: the engine's tracer leaves that call to fx)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        y = torch.cat([a, torch.mul(input=b, other=a)], dim=1)
        z = torch.stack(_Pair(a, b), dim=2).flatten(1, 2)
        return torch.add(y, other=z, alpha=0.5)


class _PlainTensorAttribute(nn.Module):
    """A tensor kept as a plain attribute (neither parameter nor buffer), and one the forward makes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.conv.scale = torch.linspace(0.5, 1.5, 4).view(1, 4, 1, 1)

    def forward(self, x):
        return self.conv(x) * self.conv.scale + torch.ones(1, 4, 1, 1)


@pytest.mark.parametrize("model", [M.SharedModule, M.KeywordCalls, _ProxiesInContainers, _PlainTensorAttribute,
                                   M.SplitChunk, M.SelfAttention, M.NormAct,
                                   M.ChannelsLast, M.LayerScales, _FunctionalTiedHead,
                                   "mobilenet_v3_small", "regnet_y_400mf", "shufflenet_v2_x0_5", "googlenet"])
def test_tracer_records_the_graph_fx_records(model):
    # The tracer creates nodes, enters modules, records torch functions and names the parameters
    # a forward reads more cheaply than fx: same nodes, names, arguments, users and module stacks as fx's own code,
    # also for a module called twice and a tied parameter read under its second name.
    from apib_fx.testing import zoo_model

    model = (_model(model) if isinstance(model, type) else zoo_model(model)).eval()
    leaves = tuple(apib_fx.rules.DEFAULT_LEAF_MODULES)
    ours = _trace_module._Tracer(leaves).trace(model)
    reference = _FxTracer(leaves).trace(model)
    assert _node_records(ours) == _node_records(reference)
    assert any(n.meta.get("nn_module_stack") for n in ours.nodes)


class _ReadsItsClass(nn.Module):
    """Records, while traced, where module calls and attribute reads are intercepted."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.seen = []

    def forward(self, x):
        self.seen.append((torch.nn.Module.__dict__["__call__"], "__call__" in nn.Conv2d.__dict__,
                          "__getattr__" in type(self).__dict__))
        return self.conv(x)


class _OwnGetattr(M.LeNet):
    """A model class with its own attribute lookup (as some wrappers have)."""

    def __getattr__(self, name):
        return super().__getattr__(name)


def test_trace_intercepts_on_the_models_classes_and_puts_them_back():
    # nn.Module itself stays as it is (assigning its special methods costs every subclass);
    # the model's classes carry fx's wrappers while traced and nothing after, also after an error.
    original_call = torch.nn.Module.__dict__["__call__"]
    model = _ReadsItsClass()
    _trace_module._Tracer().trace(model)
    assert model.seen == [(original_call, True, True)]
    with pytest.raises(apib_fx.TraceError):
        apib_fx.trace(_model(M.Untraceable), torch.randn(1, 3, 8, 8))
    for cls in (nn.Conv2d, nn.Linear, nn.ReLU, M.Untraceable, _ReadsItsClass, nn.Module):
        owned = {"__call__", "__getattr__"} & set(cls.__dict__)
        assert owned == ({"__call__", "__getattr__"} if cls is nn.Module else set()), cls
    assert torch.nn.Module.__dict__["__call__"] is original_call


@pytest.mark.parametrize("make", [lambda: _OwnGetattr(),
                                  lambda: nn.Sequential(M.LeNet(), nn.Module())])  # a plain container
def test_models_fx_must_patch_itself_trace_as_fx_traces_them(make):
    # A class overriding __getattr__ would bypass a wrapper set below it, and patching a plain
    # nn.Module is patching all: both are left to fx, with the same graph.
    from apib_fx._symbolic import trace_module

    model = make().eval()
    assert trace_module(_trace_module._Tracer(), model, None) is None
    assert trace_module(_trace_module._Tracer(), M.LeNet(), None) is not None
    assert _node_records(_trace_module._Tracer().trace(model)) == _node_records(_FxTracer().trace(model))


class _ScaleByShape(nn.Module):
    """Reads a parameter's shape in its forward: concrete only with ``param_shapes_constant``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 1)
        self.scale = nn.Parameter(torch.rand(6))

    def forward(self, x):
        return self.conv(x) * self.scale.view(1, self.scale.shape[0], 1, 1)


def test_tracer_names_parameters_as_fx_does_with_constant_parameter_shapes():
    tracers = []
    for cls in (_trace_module._Tracer, _FxTracer):
        tracer = cls()
        tracer.param_shapes_constant = True  # the parameter's proxy answers .shape with the real size
        tracers.append(tracer.trace(_ScaleByShape()))
    ours, reference = tracers
    assert _node_records(ours) == _node_records(reference)
    view = next(n for n in ours.nodes if n.target == "view")
    assert view.args[1:] == (1, 6, 1, 1)


class _TiedDeclaredLate(nn.Module):
    """Tied convs whose later call is declared first, and a module the forward never calls."""

    def __init__(self):
        super().__init__()
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.unused = nn.Conv2d(8, 8, 1)
        self.a = nn.Conv2d(3, 8, 1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.mid.weight = self.b.weight
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.b(torch.relu(self.mid(torch.relu(self.a(x))))))


@pytest.mark.parametrize("model, size", [(_TiedDeclaredLate, 8), (M.TiedWeights, 8), (M.SharedModule, 8),
                                         ("inception_v3", 75)])
def test_members_name_tensors_as_the_model_does(model, size):
    # The passes run on the model itself and the GraphModule is built when first needed: the
    # tensors they see are exactly the GraphModule's (not the never-called modules'), and a
    # tied tensor goes by the name named_parameters() gives it, whatever the call order.
    from apib_fx.graph import graph_tensors, stored_tensors
    from apib_fx.testing import zoo_model

    model = (_model(model) if isinstance(model, type) else zoo_model(model)).eval()
    g = apib_fx.trace(model, torch.randn(1, 3, size, size))
    ours, built = graph_tensors(model, g.module.graph), stored_tensors(g.module)
    assert ours.keys() == built.keys() and all(ours[k] is built[k] for k in ours)
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    assert {m.param for gr in g.groups for m in gr.members} <= names
    never_called = [k for k in stored_tensors(model) if k.startswith("unused.")]
    assert bool(never_called) == isinstance(model, _TiedDeclaredLate)
    assert not set(never_called) & ours.keys()


def test_untraceable_forward_points_at_traceable_parts():
    model = _model(M.UntraceableTop)
    with pytest.raises(apib_fx.TraceError, match=r"(?s)forward of UntraceableTop itself.*submodules: backbone, head") as err:
        apib_fx.trace(model, torch.randn(1, 3, 8, 8))
    assert "leaf_modules=(UntraceableTop" not in str(err.value)  # would leave nothing to prune
    part = apib_fx.trace(model.backbone, torch.randn(1, 3, 8, 8))
    assert part.prunable_groups


def test_originals_untouched_bit_for_bit():
    model = _model(M.Branches)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    x = torch.randn(2, 3, 8, 8)
    g = apib_fx.trace(model, x)
    pruned = apib_fx.apply(model, g, random_keep(g, 0.5))
    pruned(x).sum().backward()  # training the result must not touch the original either
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == [m.training for m in model.modules()]
    assert pruned.training


def test_parameter_names_kept():
    model = _model(M.SEBlock)
    g = apib_fx.trace(model, torch.randn(1, 3, 8, 8))
    pruned = apib_fx.apply(model, g, random_keep(g, 0.5))
    assert {k for k, _ in pruned.named_parameters()} == {k for k, _ in model.named_parameters()}


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:The TorchScript type system")
def test_pruned_model_keeps_torch_containers(tmp_path):
    # Fine-tuning code indexes containers: model.classifier[1] = nn.Linear(...), model.features[-1].
    # fx rebuilds the module tree with plain Modules; the result has containers again, also after
    # saving and loading, without the model's own code.
    model = zoo_model("mobilenet_v2").eval()
    x = torch.randn(1, 3, 64, 64)
    g = apib_fx.trace(model, x)
    pruned = apib_fx.apply(model, g, random_keep(g, 0.3)).eval()
    # features holds inverted residual blocks, which the graph inlined: indexable, not callable
    assert type(pruned.features) is apib_fx.BlockSequence and len(pruned.features) == len(model.features)
    with pytest.raises(NotImplementedError):
        pruned.features(x)
    assert type(pruned.features[0]) is nn.Sequential  # a Conv2dNormActivation: a Sequential subclass
    assert pruned.features[-1][0] is pruned.get_submodule(f"features.{len(model.features) - 1}.0")
    assert isinstance(pruned.classifier[-1], nn.Linear)
    with torch.no_grad():
        want = pruned(x)
        assert torch.equal(torch.jit.script(pruned)(x), want)  # a plain GraphModule: TorchScript compiles it
        assert torch.equal(torch.export.export(pruned, (x,)).module()(x), want)
        stem = pruned.features[0]  # calling a container runs its children, as the original did
        assert torch.equal(stem(x), stem[2](stem[1](stem[0](x))))
        pruned.classifier[1] = nn.Linear(pruned.classifier[1].in_features, 7)  # a new head
        assert pruned(x).shape == (1, 7) and not torch.equal(pruned(x)[:, :7], want[:, :7])
        apib_fx.save(pruned, tmp_path / "m.apibfx")
        again = apib_fx.load(tmp_path / "m.apibfx").eval()
        assert type(again.features[0]) is nn.Sequential and torch.equal(again(x), pruned(x))


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:The TorchScript type system")
def test_return_annotation_of_another_branch_is_dropped():
    # GoogLeNet's forward is annotated with the outputs tuple its training branch returns; traced in
    # eval mode it returns a tensor, and TorchScript refused the annotated code.
    model = zoo_model("googlenet").eval()
    x = torch.randn(2, 3, 64, 64)
    g = apib_fx.trace(model, x)
    pruned = apib_fx.apply(model, g, random_keep(g, 0.3)).eval()
    with torch.no_grad():
        assert torch.equal(torch.jit.script(pruned)(x), pruned(x))


class SkipsAChild(nn.Module):
    """A Sequential whose middle child the forward never calls, and a Sequential subclass with
    its own forward: neither may come back as an nn.Sequential (positions would shift; calling it
    would run another function)."""

    class Twice(nn.Sequential):
        def forward(self, x):
            return self[0](x) + self[1](x)

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1))
        self.twice = self.Twice(nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1))

    def forward(self, x):
        return self.twice(self.seq[2](torch.relu(self.seq[0](x))))


def test_containers_the_graph_does_not_match_stay_plain_modules():
    model = SkipsAChild().eval()
    x = torch.randn(1, 3, 8, 8)
    g = apib_fx.trace(model, x)
    pruned = apib_fx.apply(model, g, random_keep(g, 0.5))
    assert not isinstance(pruned.seq, nn.Sequential) and not isinstance(pruned.twice, nn.Sequential)
    assert isinstance(pruned.get_submodule("seq.2"), nn.Conv2d)
    assert pruned(x).shape == model(x).shape


@pytest.mark.parametrize(
    "keep,error",
    [({99: [0]}, KeyError), ({0: []}, ValueError), ({0: [0, 0]}, ValueError), ({0: [1000]}, IndexError)],
)
def test_apply_rejects_bad_keep(keep, error):
    model = _model(M.ResidualChain)
    g = apib_fx.trace(model, torch.randn(1, 3, 8, 8))
    with pytest.raises(error):
        apib_fx.apply(model, g, keep)


def test_bad_example_inputs():
    with pytest.raises(TypeError, match="example_inputs"):
        apib_fx.trace(M.LeNet(), [1, 2, 3])


def _bn_rows(graph, keep, name):
    """Positions of BatchNorm ``name``'s kept channels in the unpruned layer."""
    (group,) = [g for g in graph.groups if any(m.param == f"{name}.running_mean" for m in g.members)]
    (member,) = [m for m in group.members if m.param == f"{name}.running_mean"]
    return member.index(keep.get(group.index, torch.arange(group.channels)))


def test_norm_act_layers_follow_train_mode_after_trace_and_apply(tmp_path):
    """A BatchNorm subclass calling F.batch_norm in its own forward was traced in eval mode
    (training=False recorded): the pruned model must still use batch statistics, update its
    running ones in training mode, be re-estimated by recalibrate_bn, export and reload."""
    import torch.nn.functional as F

    from apib_fx.rules import batch_norm_of
    from apib_fx.testing import zeroed_reference

    model = _model(M.NormAct)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    graph = apib_fx.trace(model, x[:1])
    calls = [n.target for n in graph.module.graph.nodes if n.op == "call_function"]
    assert calls.count(batch_norm_of) == 2 and F.batch_norm not in calls
    keep = random_keep(graph, 0.4, seed=0)
    assert {g for g in keep} >= {g.index for g in graph.prunable_groups}
    pruned = apib_fx.apply(model, graph, keep)
    assert pruned.bn1.num_features == pruned.bn1.weight.numel() < 16

    ref = zeroed_reference(model, graph, keep)
    pruned.train()
    ref.train()
    with torch.no_grad():
        got, want = pruned(x), ref(x)
    # batch statistics are per channel: training mode is exact too
    assert (got - want).abs().max() <= 1e-5 * max(1.0, float(want.abs().max()))
    for name in ("bn1", "bn2"):
        rows = _bn_rows(graph, keep, name)
        moved = pruned.get_submodule(name).running_mean
        assert not torch.equal(moved, before[f"{name}.running_mean"][rows])
        assert torch.allclose(moved, ref.get_submodule(name).running_mean[rows], atol=1e-6)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # input untouched

    assert apib_fx.recalibrate_bn(pruned, [x]) == 2
    apib_fx.recalibrate_bn(ref, [x])
    for name in ("bn1", "bn2"):
        rows = _bn_rows(graph, keep, name)
        assert torch.allclose(pruned.get_submodule(name).running_var,
                              ref.get_submodule(name).running_var[rows], atol=1e-6)

    pruned.eval()
    onnx_path = apib_fx.export_onnx(pruned, tmp_path / "m.onnx", x[:2])
    assert onnx_path.parity["max_diff"] <= 1e-4 * onnx_path.parity["scale"]
    apib_fx.save(pruned, tmp_path / "m.apibfx")
    again = apib_fx.load(tmp_path / "m.apibfx").eval()
    with torch.no_grad():
        assert torch.equal(again(x), pruned(x))


def test_functional_batch_norm_on_computed_state_stays_whole():
    class Computed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 6, 1)
            self.w = torch.nn.Parameter(torch.rand(6))
            self.out = torch.nn.Conv2d(6, 4, 1)

        def forward(self, x):
            import torch.nn.functional as F
            y = F.batch_norm(self.conv(x), None, None, self.w * 2, None, True)
            return self.out(y)

    graph = apib_fx.trace(Computed(), torch.randn(2, 3, 4, 4))
    (group,) = [g for g in graph.groups if any(m.param == "conv.weight" and m.role == "out" for m in g.members)]
    assert not group.prunable and "batch_norm" in group.reason


def test_blur_pool_depthwise_functional_conv_keeps_its_groups_in_step():
    model = _model(M.BlurPool)
    x = torch.randn(2, 3, 8, 8)
    graph = apib_fx.trace(model, x)
    (group,) = [g for g in graph.prunable_groups if any(m.param == "filt" for m in g.members)]
    assert {m.role for m in group.members if m.param == "filt"} == {"pass"}
    pruned = apib_fx.apply(model, graph, {group.index: torch.tensor([0, 3, 5, 6, 7, 11])})
    (call,) = [n for n in pruned.graph.nodes if n.target is torch.nn.functional.conv2d]
    assert call.kwargs.get("groups", call.args[6] if len(call.args) > 6 else None) == 6
    assert tuple(pruned.filt.shape) == (6, 1, 3, 3)


def test_layer_scales_are_sliced_and_a_literal_view_size_follows():
    model = _model(M.LayerScales)
    x = torch.randn(2, 3, 8, 8)
    graph = apib_fx.trace(model, x)
    keep = random_keep(graph, 0.3, seed=0)
    pruned = apib_fx.apply(model, graph, keep)
    for name in ("g1", "g2", "g3"):
        assert getattr(pruned, name).numel() < 16
    with torch.no_grad():
        pruned(x)  # view(C, 1, 1) with the new C


def test_roll_or_pad_along_channels_keeps_them_whole():
    import torch.nn.functional as F

    class RollChannels(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 6, 1)
            self.out = torch.nn.Conv2d(6, 4, 1)

        def forward(self, x):
            return self.out(torch.roll(self.conv(x), 1, 1))

    class PadChannels(RollChannels):
        def forward(self, x):
            return self.out(F.pad(self.conv(x), (0, 0, 0, 0, 0, 0))[:, :6] + F.pad(self.conv(x)[:, :5], (0, 0, 0, 0, 0, 1)))

    for cls, op in ((RollChannels, "roll"), (PadChannels, "pad")):
        graph = apib_fx.trace(cls(), torch.randn(1, 3, 4, 4))
        (group,) = [g for g in graph.groups if any(m.param == "conv.weight" and m.role == "out" for m in g.members)]
        assert not group.prunable and op in group.reason, (cls.__name__, group.reason)


def test_functional_conv_on_a_computed_weight_stays_whole():
    import torch.nn.functional as F

    class StdConv(torch.nn.Module):  # weight standardisation: the conv's weight is computed
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 6, 1)
            self.w = torch.nn.Parameter(torch.randn(4, 6, 3, 3))

        def forward(self, x):
            w = self.w - self.w.mean(dim=(1, 2, 3), keepdim=True)
            return F.conv2d(self.conv(x), w, padding=1)

    graph = apib_fx.trace(StdConv(), torch.randn(1, 3, 4, 4))
    (group,) = [g for g in graph.groups if any(m.param == "conv.weight" and m.role == "out" for m in g.members)]
    assert not group.prunable and "conv2d" in group.reason


def test_linear_viewed_as_map_prunes_by_map_channel():
    # fc's 72 features viewed as (8, 3, 3): map channel c is features 9c..9c+8 (they were kept
    # whole: the view tied the outer axes before the BatchNorm read the channel axis).
    model, x = _model(M.MapDecoder), torch.randn(2, 10)
    g = apib_fx.trace(model, x)
    (fc,), (fc2,) = _group_of(g, "fc.weight"), _group_of(g, "fc2.weight")
    assert fc.prunable and fc.channels == 8 and fc2.prunable and fc2.channels == 5
    (rows,) = [m for m in fc.members if m.param == "fc.weight" and m.role == "out"]
    assert rows.index(torch.tensor([0, 2])).tolist() == list(range(9)) + list(range(18, 27))
    assert {("bn.weight", "pass"), ("up.weight", "in")} <= {(m.param, m.role) for m in fc.members}
    pruned = apib_fx.apply(model, g, {fc.index: torch.tensor([0, 2, 7]), fc2.index: torch.tensor([4])})
    assert (pruned.fc.out_features, pruned.bn.num_features, pruned.fc2.out_features) == (27, 3, 36)
    assert tuple(pruned.unflatten.unflattened_size) == (1, 6, 6)
    _pruned_matches_reference(model, g, {fc.index: torch.tensor([0, 2, 7]), fc2.index: torch.tensor([4])}, x)


def test_stacked_maps_go_channel_by_channel():
    # torch.stack's inputs keep one shape: channel c of a goes with channel c of b. (The new
    # axis was taken for the channels': a summed stack was a reduction over channels, and an
    # interleaved one left groups of 1 channel.)
    model, x = _model(M.StackedFeatures), torch.randn(2, 3, 8, 8)
    g = apib_fx.trace(model, x)
    (ab,), (cd,) = _group_of(g, "a.weight"), _group_of(g, "c.weight")
    assert ab.prunable and ab.channels == 8 and ("b.weight", "out") in {(m.param, m.role) for m in ab.members}
    assert cd.prunable and cd.channels == 6
    (head,) = [m for m in cd.members if m.param == "head.weight"]
    assert head.index(torch.tensor([0, 2])).tolist() == [0, 1, 4, 5]  # interleaved: c0 d0 c1 d1 ...
    _pruned_matches_reference(model, g, {ab.index: torch.tensor([1, 6]), cd.index: torch.tensor([2, 3, 5])}, x)


def test_softmax_over_tied_channels_keeps_them_prunable():
    # Split attention: the softmax runs over the radix axis, whose channels are tied (channel c
    # goes with c + 8): it normalises within one removable unit. It was kept whole.
    model, x = _model(M.SplitAttention), torch.randn(2, 3, 8, 8)
    g = apib_fx.trace(model, x)
    (conv,) = _group_of(g, "conv.weight")
    assert conv.prunable and conv.channels == 8
    rows = {m.param: m.index(torch.tensor([1])).tolist() for m in conv.members if m.role == "out"}
    assert rows == {"conv.weight": [1, 9], "fc2.weight": [1, 9]}


def test_class_token_and_position_embedding_are_per_channel_state():
    # A parameter concatenated with the stream along the tokens (a ViT's class token) and one
    # added to it hold its channels: they are sliced with them ("pass"); the stream was kept whole.
    model, x = _model(M.ClassTokenParameter), torch.randn(2, 3, 8, 8)
    g = apib_fx.trace(model, x)
    (stream,) = _group_of(g, "embed.weight")
    assert stream.prunable and stream.exact and stream.channels == 12
    assert {("cls_token", 2, "pass"), ("pos_embed", 2, "pass"), ("head.weight", 1, "in")} <= \
        {(m.param, m.dim, m.role) for m in stream.members}
    keep = {stream.index: torch.tensor([0, 3, 4, 11])}
    pruned = apib_fx.apply(model, g, keep)
    assert pruned.cls_token.shape == (1, 1, 4) and pruned.pos_embed.shape == (1, 5, 4)
    _pruned_matches_reference(model, g, keep, x)


def test_group_norm_loses_whole_groups():
    # GroupNorm(8, 16): 8 groups of 2 lose whole groups (exact, num_groups shrinks); removing
    # position j of every group would give 2 units of 8 channels and change every group's statistics.
    model, x = _model(M.WholeGroupNorms), torch.randn(2, 3, 8, 8)
    g = apib_fx.trace(model, x)
    (conv1,), (conv2,) = (_group_of(g, f"conv{i}.weight") for i in (1, 2))
    assert conv1.prunable and conv1.exact and conv1.channels == 8
    (w1,) = [m for m in conv1.members if m.param == "conv1.weight"]
    assert w1.index(torch.tensor([0, 3])).tolist() == [0, 1, 6, 7]  # a unit is one GroupNorm group
    assert conv2.prunable and conv2.exact and conv2.channels == 12  # one channel per group
    # conv3's channel 0 shares F.group_norm's second group with an input channel: it stays.
    fixed, conv3 = _group_of(g, "conv3.weight")
    assert not fixed.prunable and fixed.channels == 1 and "carry no prunable channel" in fixed.reason
    assert conv3.prunable and conv3.exact and conv3.channels == 2
    keep = {conv1.index: torch.tensor([1, 2, 5]), conv2.index: torch.tensor([0, 4, 7, 11]),
            conv3.index: torch.tensor([1])}
    pruned = apib_fx.apply(model, g, keep)
    assert (pruned.gn1.num_groups, pruned.gn1.num_channels) == (3, 6)
    assert (pruned.gn2.num_groups, pruned.gn2.num_channels) == (4, 4)
    (gn_call,) = [n for n in pruned.graph.nodes if n.target is torch.nn.functional.group_norm]
    assert gn_call.args[1] == 3 and pruned.weight.shape == (6,)
    report = check_exact(model, x, graph=g, fraction=0.5)
    assert report.exact_expected and report.max_diff <= 1e-5 and report.flops_model == report.flops_after


@pytest.mark.parametrize("num_groups", [2, 4, 8])
def test_group_norm_over_unprunable_channels(num_groups):
    # A GroupNorm over the model's input concatenated with a conv's channels: a unit holding an
    # input channel cannot be removed (it left unequal groups: the pruned model failed).
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.gn, self.out = nn.Conv2d(3, 5, 3, padding=1), nn.GroupNorm(num_groups, 8), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.out(self.gn(torch.cat([x, self.conv(x)], 1)))

    model, x = Model(), torch.randn(2, 3, 6, 6)
    g = apib_fx.trace(model, x)
    for seed in range(4):
        report = check_exact(model, x, graph=g, fraction=0.5, seed=seed)
        assert report.shapes_ok and report.finite
        assert report.exact_expected == (num_groups > 2)  # 2 groups of 4: position j of each
        assert report.max_diff <= 1e-5 or not report.exact_expected
    pruned = apib_fx.apply(model, g, random_keep(g, 0.5))
    assert pruned.gn.num_channels % pruned.gn.num_groups == 0


def test_functional_group_norm_is_prunable_but_not_exact():
    import torch.nn.functional as F

    class GN(torch.nn.Module):  # F.group_norm on its own parameters (timm's GroupNorm1)
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.weight = torch.nn.Parameter(torch.rand(8) + 0.5)
            self.bias = torch.nn.Parameter(torch.randn(8))
            self.out = torch.nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.out(F.group_norm(self.conv(x), 2, self.weight, self.bias))

    model, x = GN(), torch.randn(2, 3, 6, 6)
    g = apib_fx.trace(model, x)
    (group,) = [gr for gr in g.groups if any(m.param == "conv.weight" for m in gr.members)]
    assert group.prunable and not group.exact and "group_norm" in group.note
    assert {("weight", "pass"), ("bias", "pass")} <= {(m.param, m.role) for m in group.members}
    report = check_exact(model, x, graph=g, fraction=0.5)
    assert report.shapes_ok and report.finite and report.flops_model == report.flops_after
    pruned = apib_fx.apply(model, g, random_keep(g, 0.5))
    assert pruned.weight.numel() % 2 == 0  # both groups keep the same width


def test_products_with_fixed_axes_keep_channels_whole():
    graph = apib_fx.trace(_model(M.TalkingHeads), torch.randn(2, 5, 16))
    fixed = [g for g in graph.groups if any(m.param == "proj_l.weight" and m.role == "out" for m in g.members)
             and not g.prunable]
    assert fixed and any("matmul" in g.reason for g in fixed), [g.reason for g in fixed]
    # the heads it mixes meet v's fixed heads (exactness of the rest: test_exact)
    assert all(not g.prunable for g in graph.groups if any(m.param == "proj_l.weight" for m in g.members))


def test_relative_position_table_loses_the_head_dims_of_q():
    # q @ rel.transpose(-1, -2) with rel (tokens, head dim): the table's columns are sliced with q's
    graph = apib_fx.trace(_model(M.RelativePosition), torch.randn(2, 5, 16))
    (qk,) = [g for g in graph.groups if any(m.param == "rel" for m in g.members)]
    assert qk.prunable and ("rel", 1, "in") in {(m.param, m.dim, m.role) for m in qk.members}


def test_parameter_matrix_reads_channels_as_a_linear_layer():
    graph = apib_fx.trace(_model(M.ParameterMatmul), torch.randn(2, 16))
    (group,) = [g for g in graph.prunable_groups if any(m.param == "fc.weight" for m in g.members)]
    assert ("w", 0, "in") in {(m.param, m.dim, m.role) for m in group.members}


def test_tied_weights_stay_tied_and_move_together():
    model = _model(M.TiedWeights)
    graph = apib_fx.trace(model, torch.randn(1, 3, 8, 8))
    # The tie makes mid's input, mid's output and b's output one set of channels, named as
    # named_parameters() names the shared weight.
    (group,) = graph.prunable_groups
    assert {(m.param, m.dim) for m in group.members} >= {("mid.weight", 0), ("mid.weight", 1), ("b.bias", 0)}
    assert not any(m.param == "b.weight" for g in graph.groups for m in g.members)
    pruned = apib_fx.apply(model, graph, {group.index: torch.tensor([0, 2, 5])})
    assert pruned.b.weight is pruned.mid.weight and pruned.mid.weight.shape == (3, 3, 3, 3)
    assert model.b.weight is model.mid.weight and model.mid.weight.shape == (8, 8, 3, 3)


@pytest.mark.parametrize("functional", [False, True])
def test_embedding_columns_are_channels_and_a_tied_head_follows(functional):
    torch.manual_seed(0)
    model = M.EmbeddingTiedHead(functional=functional).eval()
    ids = torch.randint(0, 40, (3, 7))
    graph = apib_fx.trace(model, ids)
    stream = next(g for g in graph.prunable_groups if ("emb.weight", 1) in {(m.param, m.dim) for m in g.members})
    assert stream.channels == 16
    assert {("fc1.weight", 1), ("fc2.weight", 0)} <= {(m.param, m.dim) for m in stream.members}
    for seed in (0, 1):
        report = check_exact(model, ids, seed=seed, graph=graph)
        assert report.shapes_ok and report.max_diff <= 1e-5, report
        assert report.flops_model == report.flops_after < report.flops_before
    pruned = apib_fx.apply(model, graph, {stream.index: torch.arange(0, 16, 2)})
    assert pruned.head.weight is pruned.emb.weight and pruned.emb.weight.shape == (40, 8)
    if not functional:
        assert pruned.emb.embedding_dim == 8
    assert pruned(ids).shape == (3, 7, 40)


def test_embedding_max_norm_mixes_its_columns():
    model = nn.Sequential(nn.Embedding(10, 8, max_norm=1.0), nn.Linear(8, 3))
    graph = apib_fx.trace(model, torch.randint(0, 10, (2, 4)))
    (group,) = graph.prunable_groups
    report = check_exact(model, torch.randint(0, 10, (2, 4)), graph=graph)
    assert not report.exact_expected and "max_norm" in report.note and report.shapes_ok


def test_parametrized_weights_keep_their_channels_with_a_reason():
    """weight_norm / spectral_norm compute the weight from other tensors: no parameter of that name
    to slice, and slicing what it is computed from would change the norm. Such layers' channels
    stay whole, saying how to prune them (remove the parametrization); the rest prunes exactly."""
    import warnings

    from torch.nn.utils import parametrizations as P
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old-style hook weight_norm is deprecated
        old_style = torch.nn.utils.weight_norm(nn.Conv2d(6, 5, 1))
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), P.weight_norm(nn.Conv2d(8, 7, 3)), nn.ReLU(),
        nn.Conv2d(7, 9, 1), nn.ReLU(), nn.Conv2d(9, 6, 1), nn.ReLU(), old_style, nn.ReLU(),
        P.spectral_norm(nn.Conv2d(5, 4, 1)),
    ).eval()
    x = torch.randn(2, 3, 10, 10)
    graph = apib_fx.trace(model, x)
    by_out = {next(m.param for m in g.members if m.role == "out"): g for g in graph.groups}
    for name in ("0.weight", "2.weight", "6.weight", "8.weight"):
        assert not by_out[name].prunable and "parametrization" in by_out[name].reason, name
    assert by_out["4.weight"].prunable  # between two plain convs
    report = check_exact(model, x, graph=graph)
    assert report.max_diff <= 1e-5 and report.flops_after < report.flops_before
    # Removing the parametrizations (the reason's advice) makes them prunable.
    parametrize.remove_parametrizations(model[2], "weight")
    assert apib_fx.trace(model, x).groups[0].prunable


def _check_inexact(model, x, graph):
    """Every group pruned where exactness is not expected: shapes, finite values, and FLOPs as
    the graph predicts and as torch's own counter counts."""
    from torch.utils.flop_counter import FlopCounterMode

    report = check_exact(model, x, graph=graph)
    assert report.shapes_ok and report.finite and not report.exact_expected
    assert report.flops_model == report.flops_after < report.flops_before
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    assert apib_fx.count_flops(model, x) * 2 == counter.get_total_flops()


def test_standardised_weights_prune_their_filters_exactly():
    """A conv whose weight is standardised per filter (timm's StdConv2d / ScaledStdConv2d: BiT,
    NFNets) is pruned through its parameter: filters and their gains go exactly; the input channels
    of a standardised conv are prunable but not exactly (the filter statistics span them), a
    depthwise one's exactly. The pruned graph views the weight as its new filter count."""
    from apib_fx.testing import zeroed_reference

    torch.manual_seed(0)
    model = M.StandardisedConvs().eval()
    x = torch.randn(2, 3, 8, 8)
    graph = apib_fx.trace(model, x)
    by_out = {next(m.param for m in g.members if m.role == "out"): g for g in graph.groups}
    first, inner, last = by_out["conv1.weight"], by_out["conv2.weight"], by_out["conv3.weight"]
    assert all(g.prunable for g in (first, inner, last))
    assert first.exact and last.exact
    assert not inner.exact and "weight standardisation of" in inner.note and "'conv3.weight'" in inner.note
    assert {(m.param, m.role) for m in first.members} >= {("conv1.gain", "pass"), ("dw.weight", "pass"),
                                                          ("dw.gain", "pass"), ("conv2.weight", "in")}
    assert ("conv3.gain", "pass") in {(m.param, m.role) for m in last.members}

    # Exact where expected: the filters of conv1 and conv3 (and the depthwise filters with conv1's).
    keep = {g: k for g, k in random_keep(graph, 0.3).items() if graph.groups[g].exact}
    pruned = apib_fx.apply(model, graph, keep)
    with torch.no_grad():
        want, got = zeroed_reference(model, graph, keep)(x), pruned(x)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    views = [n for n in pruned.graph.nodes if n.op == "call_method" and n.target == "reshape"]
    assert sorted(n.args[2] for n in views) == sorted([len(keep[first.index])] * 2 + [len(keep[last.index])])

    _check_inexact(model, x, graph)
    pruned = apib_fx.prune(model, 0.4, x, method="l1", progress=False)
    assert pruned(x).shape == (2, 4) and model.conv3.gain.shape == (8, 1, 1, 1)

    # conv3's 1x1 filters cannot be standardised over one input (training-mode batch norm of one
    # value raises; its statistics would zero the weight): conv2's group keeps two at least.
    assert (first.min_channels, inner.min_channels, last.min_channels) == (1, 2, 1)
    assert "'conv3.weight' standardises each 1x1 filter" in inner.min_reason and "at least 2" in graph.table()
    with pytest.raises(ValueError, match="must keep at least 2"):
        apib_fx.apply(model, graph, {inner.index: torch.tensor([3])})
    assert apib_fx.apply(model, graph, {inner.index: torch.tensor([3, 5])})(x).isfinite().all()
    # (APIB here keeps one of conv2's channels without that floor)
    narrow = apib_fx.prune(model, 0.4, x, progress=False, tolerance=0.15)
    assert narrow.conv3.weight.shape[1] == 2 and narrow(x).isfinite().all()


class _MeanStdConv(nn.Conv2d):
    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return torch.nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)


def test_other_computed_conv_weights_keep_their_inputs_whole_saying_why():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), _MeanStdConv(8, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 1),
                          nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    x = torch.randn(1, 3, 12, 12)
    graph = apib_fx.trace(model, x)
    by_out = {next(m.param for m in g.members if m.role == "out"): g for g in graph.groups}
    assert not by_out["0.weight"].prunable and "weight is computed in the graph" in by_out["0.weight"].reason
    assert by_out["4.weight"].prunable  # (after it, plain layers prune as usual)
    assert graph.flops({}) == apib_fx.count_flops(model, x)


def test_normalisations_written_out_prune_their_channels_not_exactly():
    """A mean or norm across the channels kept as an axis of 1 that comes back onto the same
    channels (x - mean, x / std, GRN's x * norm / mean norm) is a normalisation: its channels are
    prunable but not exact, as through nn.LayerNorm; shapes and the FLOPs model stay right."""
    torch.manual_seed(0)
    model = M.NormalisedByHand().eval()
    x = torch.randn(2, 3, 10, 10)
    graph = apib_fx.trace(model, x)
    by_out = {next(m.param for m in g.members if m.role == "out"): g for g in graph.groups}
    for name, op in (("conv1.weight", "Tensor.mean"), ("fc1.weight", "Tensor.mean")):
        g = by_out[name]
        assert g.prunable and not g.exact and f"{op} across them gives a statistic" in g.note, g
    assert by_out["conv2.weight"].prunable and by_out["conv2.weight"].exact
    assert {("norm.weight", "pass"), ("norm.bias", "pass")} <= {(m.param, m.role) for m in by_out["conv1.weight"].members}
    assert {("grn.gamma", "pass"), ("grn.beta", "pass")} <= {(m.param, m.role) for m in by_out["fc1.weight"].members}
    _check_inexact(model, x, graph)
    pruned = apib_fx.prune(model, 0.4, x, progress=False, tolerance=0.1)
    assert pruned(x).shape == (2, 4) and pruned.norm.weight.numel() < 8


class _Normalized(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 6, 1), nn.Linear(6, 2)

    def forward(self, x):
        y = self.b(torch.nn.functional.normalize(self.a(x), dim=1))  # across the channels
        z = torch.nn.functional.normalize(y.flatten(2), p=2.0, dim=-1)  # each channel over its positions
        return self.head(z.mean(-1))


def test_normalize_across_channels_is_inexact_and_over_positions_exact():
    model = _Normalized().eval()
    x = torch.randn(2, 3, 6, 6)
    graph = apib_fx.trace(model, x)
    by_out = {next(m.param for m in g.members if m.role == "out"): g for g in graph.groups}
    across, over = by_out["a.weight"], by_out["b.weight"]
    assert across.prunable and not across.exact and "normalize normalises across them" in across.note
    assert over.prunable and over.exact
    keep = {over.index: torch.tensor([0, 2, 5])}
    with torch.no_grad():
        want = apib_fx.testing.zeroed_reference(model, graph, keep)(x)
        got = apib_fx.apply(model, graph, keep)(x)
    assert torch.allclose(got, want, atol=1e-6)
    report = check_exact(model, x, graph=graph)
    assert report.shapes_ok and report.finite and report.flops_model == report.flops_after


def test_a_channel_norm_clamped_before_dividing_is_still_a_normalisation():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), _L2ByHand(), nn.Conv2d(8, 2, 1)).eval()
    graph = apib_fx.trace(model, torch.randn(2, 3, 5, 5))
    group = graph.groups[0]
    assert group.channels == 8 and group.prunable and not group.exact and "Tensor.norm across them" in group.note


class _L2ByHand(nn.Module):
    def forward(self, x):
        return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)


class _StatisticOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        return self.head(torch.relu(y)), y.mean(1, keepdim=True)


@pytest.mark.parametrize("model,why", [
    (M.ChannelReduction, "meets other channels in mul"),  # an attention map from one conv on another's
    (M.SpatialAttention, "goes into cat"),  # CBAM: the channel mean and max become a map's inputs
    (_StatisticOut, "is a model output"),
])
def test_statistics_across_channels_used_otherwise_keep_them_whole(model, why):
    model = _model(model).eval()
    x = torch.randn(2, 3, 8, 8)
    graph = apib_fx.trace(model, x)
    by_out = {next(m.param for m in g.members if m.role == "out"): g for g in graph.groups}
    group = by_out["conv.weight"]
    assert not group.prunable and "reduced over their axis by" in group.reason and why in group.reason, group.reason
    report = check_exact(model, x, graph=graph)
    assert report.shapes_ok and report.max_diff <= 1e-5 and report.flops_model == report.flops_after


def test_a_matrix_product_links_only_channels_of_its_contracted_axis():
    """x (C, HW) @ map (HW, 1) contracts the positions: x's channel 0 (its labels at position 0
    of the contracted axis) is no channel of the map's, and used to be tied to it, splitting x's
    channels into a fixed 1 and a prunable C - 1."""
    model = _model(M.GlobalContextBlock).eval()
    graph = apib_fx.trace(model, torch.randn(2, 3, 6, 6))
    stream = next(g for g in graph.groups if any(m.param == "conv.weight" and m.role == "out" for m in g.members))
    assert stream.prunable and stream.channels == 8
    assert {"conv_attn.weight", "fc1.weight", "fc2.weight", "head.weight"} <= {m.param for m in stream.members}
    (attn,) = [g for g in graph.groups if any(m.param == "conv_attn.weight" and m.role == "out" for m in g.members)]
    assert attn.channels == 1 and all(m.param.startswith("conv_attn.") for m in attn.members)


def test_keyword_called_layers_are_scored_by_apib():
    """A consumer called as ``self.b(input=y)`` is read like a positional call: APIB scores its
    input channels from data (they had no input argument to read, and the trace crashed)."""
    model = _model(M.KeywordCalls).eval()
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    graph = apib_fx.trace(model, x[:1])
    from apib_fx.scoring import find_consumers
    consumers = {c.node for cs in find_consumers(graph).values() for c in cs}
    assert {"b", "fc"} <= consumers
    pruned = apib_fx.prune(model, 0.3, x, num_calib=8, batch_size=8, progress=False, tolerance=0.1)
    assert all(r.note is None for r in pruned.apib_report.groups)


def test_rule_table_changes_apply_to_the_next_trace():
    class Scale(nn.Module):  # no rule: traced as a leaf, its input channels stay whole
        def forward(self, x):
            return 2 * x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.scale, self.head = nn.Conv2d(3, 8, 1), Scale(), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.head(self.scale(self.conv(x)))

    model, x = Net(), torch.randn(1, 3, 4, 4)

    def conv_group(leaf):
        g = apib_fx.trace(model, x, leaf_modules=leaf)
        return [gr for gr in g.groups if any(m.param == "conv.weight" for m in gr.members)][0]

    assert not conv_group((Scale,)).prunable
    apib_fx.register_rule(Scale, apib_fx.RULES[nn.ReLU])  # now it passes channels through
    try:
        assert conv_group(()).prunable
    finally:
        del apib_fx.RULES[Scale]
    assert not conv_group((Scale,)).prunable  # the rule is gone again


@pytest.mark.parametrize("copier", ["pickle", "deepcopy"])
def test_channel_graph_survives_pickle_and_deepcopy(copier):
    # The GraphModule is built on first use: a copied graph carries it, and prunes the same.
    import copy
    import pickle

    model = _model(M.ResidualChain).eval()
    x = torch.randn(2, 3, 16, 16)
    graph = apib_fx.trace(model, x)
    other = pickle.loads(pickle.dumps(graph)) if copier == "pickle" else copy.deepcopy(graph)
    assert [(g.channels, g.prunable, [m.param for m in g.members]) for g in other.groups] == \
        [(g.channels, g.prunable, [m.param for m in g.members]) for g in graph.groups]
    keep = random_keep(graph, 0.3, seed=0)
    assert torch.equal(apib_fx.apply(model, other, keep)(x), apib_fx.apply(model, graph, keep)(x))


def test_rebuilt_modules_carry_the_originals_plain_attributes():
    class Block(nn.Module):  # inlined by the trace: the result holds a plain module in its place
        def __init__(self):
            super().__init__()
            self.stride, self.note = 1, "residual"
            self.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return x + self.conv(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.block, self.head = nn.Conv2d(3, 8, 3), Block(), nn.Conv2d(8, 4, 1)
            self.out_channels, self.cfg = 4, {"input_size": (3, 16, 16), "mean": [0.5, 0.5, 0.5]}
            self.scratch = torch.ones(2)  # a tensor that is no parameter or buffer: not a plain value
            self.meta = "mine"  # a name GraphModule uses itself

        def forward(self, x):
            return self.head(self.block(self.stem(x)))

    model = Net().eval()
    x = torch.randn(1, 3, 16, 16)
    graph = apib_fx.trace(model, x)
    group = next(g for g in graph.prunable_groups if g.channels == 8)
    pruned = apib_fx.apply(model, graph, {group.index: torch.arange(5)})
    assert pruned.out_channels == 4 and pruned.cfg == model.cfg and not hasattr(pruned, "scratch")
    assert type(pruned.block) is not Block and (pruned.block.stride, pruned.block.note) == (1, "residual")
    pruned.cfg["mean"].append(1.0)  # copies: the user's model does not change with the result
    assert model.cfg["mean"] == [0.5, 0.5, 0.5]
    # layers kept as their own class keep their rewritten attributes, not the original's
    assert pruned.head.in_channels == 5 and pruned.block.conv.out_channels == 5
    assert isinstance(pruned.meta, dict)  # GraphModule's own attributes are never overwritten


@pytest.mark.parametrize("cls,x", [(M.ChannelReduction, (1, 3, 8, 8)), (M.ReshapeHardcoded, (1, 3, 8, 8)),
                                   (M.SEBlock, (1, 3, 16, 16))])
def test_graph_table_gives_each_groups_cost_and_status(cls, x):
    model = _model(cls).eval()
    x = torch.randn(*x)
    graph = apib_fx.trace(model, x)
    rows = graph.table().splitlines()[2:]
    assert len(rows) == len(graph.groups)
    before = apib_fx.count_flops(model, x)
    for g, row in zip(graph.groups, rows):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[:3] == [str(g.index), g.name, str(g.channels)]
        if g.prunable and g.channels > 1:  # what one channel costs, against a pruned model's count
            keep = {g.index: torch.arange(1, g.channels)}
            saved = before - apib_fx.count_flops(apib_fx.apply(model, graph, keep), x)
            assert cells[3] == f"{saved:,}"
        assert cells[4] == " / ".join(str(sum(m.role == r for m in g.members)) for r in ("out", "in", "pass"))
        assert cells[5] == (("prunable" if g.exact else f"prunable, not exact: {g.note}") if g.prunable
                            else f"fixed: {g.reason}")
    fixed = graph.table(only_fixed=True).splitlines()[2:]
    assert len(fixed) == len(graph.groups) - len(graph.prunable_groups) and all("fixed:" in r for r in fixed)
