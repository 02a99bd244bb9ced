"""ONNX export with parity, save/load in a fresh process, latency benchmark rows."""
import json
import os
import subprocess
import tempfile
import sys

import pytest
import torch

import apib_fx
from apib_fx.bench import benchmark, format_table, onnx_macs, plot_latency, save_results
from apib_fx.export import OnnxExportError, OnnxParityError, export_onnx
from apib_fx.serialize import ModelFileError, WeightsMismatchError, load, load_weights, save
from apib_fx.testing import CNN_ZOO, zoo_input_size, zoo_model

FAST = ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5", "densenet121", "convnext_tiny", "googlenet"]
ZOO = [pytest.param(n) for n in FAST] + [pytest.param(n, marks=pytest.mark.slow) for n in CNN_ZOO if n not in FAST]


def _pruned(name, target=0.48):
    model = zoo_model(name, num_classes=10)
    size = zoo_input_size(name)
    x = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(0))
    return model, apib_fx.prune(model, target, x, num_calib=8, batch_size=8, progress=False), x[:1]


@pytest.mark.parametrize("name", ZOO)
def test_pruned_zoo_exports_with_parity(name, tmp_path):
    model, pruned, x = _pruned(name)
    for m, label in ((pruned, "pruned"), (model, "unpruned")):
        path = export_onnx(m, tmp_path / f"{label}.onnx", x)
        p = path.parity
        assert path.exists() and p["max_diff"] <= max(1e-4 * p["scale"], 4 * p.get("float32_error", 0.0))
        assert path.parity["batch_sizes"] == [1, 3]  # dynamic batch checked at two sizes
    if "shufflenet" in name:  # channel shuffle reshapes by run-time sizes: ONNX inference cannot follow
        with pytest.warns(UserWarning, match="unresolved"):
            assert onnx_macs(tmp_path / "pruned.onnx", x.shape) < apib_fx.count_flops(pruned, x)
    else:
        assert onnx_macs(tmp_path / "pruned.onnx", x.shape) == apib_fx.count_flops(pruned, x)


def _shuffles():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.PixelUnshuffle(2), torch.nn.Conv2d(64, 12, 1, groups=4),
                               torch.nn.ChannelShuffle(4), torch.nn.Conv2d(12, 8, 1), torch.nn.PixelShuffle(2),
                               torch.nn.Conv2d(2, 2, 1))


@pytest.mark.parametrize("name,shape", [("Unpooling", (2, 3, 16, 12)), ("TransposedConvs", (2, 3, 10, 12)),
                                        ("shuffles", (2, 3, 10, 10)), ("SuperResolution", (2, 3, 8, 10)),
                                        ("StandardisedConvs", (2, 3, 8, 8)), ("ShapeBranches", (2, 3, 6, 6)),
                                        ("ConvRecurrent", (2, 3, 6, 7)), ("IteratedSplits", (2, 3, 6, 6))])
def test_pruned_decoders_export_with_parity(name, shape, tmp_path):
    # Max unpooling (ONNX counts its indices over the whole tensor, torch per channel plane: the
    # exporter converts them), transposed convs, pixel and channel shuffles, circular padding and
    # RMSNorm (the last three through torch's dynamo exporter, from a batch-1 example),
    # weight-standardised convs (a training-mode batch norm of the weights), the checks of a
    # graph traced through branches on the input's shape and of the pieces a loop runs over, and
    # an LSTM fed by pruned conv features, with pruned widths.
    from . import models as M

    torch.manual_seed(0)
    model = (_shuffles() if name == "shuffles" else getattr(M, name)()).eval()
    x = torch.randn(shape)
    pruned = apib_fx.prune(model, 0.4, x, tolerance=0.15, progress=False)  # (few, coarse groups)
    assert apib_fx.count_flops(pruned, x) <= 0.75 * apib_fx.count_flops(model, x)
    path = export_onnx(pruned, tmp_path / "decoder.onnx", x[:1])
    assert path.parity["max_diff"] <= 1e-4 * path.parity["scale"] and path.parity["batch_sizes"] == [1, 3]


def test_export_leaves_model_untouched(tmp_path):
    model = zoo_model("resnet18")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, tmp_path / "m.onnx", torch.randn(2, 3, 32, 32))
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class Unexportable(torch.nn.Module):
    def forward(self, x):
        return torch.special.zeta(x.abs() + 2, torch.ones_like(x))  # no ONNX operator


def test_export_failure_leaves_no_file(tmp_path):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")
    with pytest.raises(OnnxExportError, match="cannot export"):
        export_onnx(Unexportable(), target, torch.randn(2, 4))
    assert target.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_parity_mismatch_raises_and_leaves_no_file(tmp_path, monkeypatch):
    import onnxruntime as ort

    real_run = ort.InferenceSession.run

    def noisy(self, *a, **k):
        return [o + 1e-2 for o in real_run(self, *a, **k)]

    monkeypatch.setattr(ort.InferenceSession, "run", noisy)
    with pytest.raises(OnnxParityError, match=r"max \|diff\|"):
        export_onnx(zoo_model("mobilenet_v3_small"), tmp_path / "m.onnx", torch.randn(1, 3, 32, 32))
    assert os.listdir(tmp_path) == []


class Cancelling(torch.nn.Module):
    """(x + 1e4) - 1e4: float32 rounds x to ~1e-3, so PyTorch itself is off by up to 5e-4."""

    def forward(self, x):
        return (x + 1e4) - 1e4


def _ort_returns(monkeypatch, fn):
    import onnxruntime as ort

    real_run = ort.InferenceSession.run
    monkeypatch.setattr(ort.InferenceSession, "run", lambda self, *a, **k: fn(real_run(self, *a, **k), a[1]))


def test_parity_judged_against_float64_when_float32_rounding_exceeds_tolerance(tmp_path, monkeypatch):
    x = torch.randn(2, 64)
    with torch.no_grad():
        assert (Cancelling()(x) - x).abs().max() > 1e-4  # PyTorch float32 alone misses the tolerance
    # An ONNX Runtime as exact as float64: off from PyTorch by PyTorch's own rounding, and accepted.
    _ort_returns(monkeypatch, lambda outs, feed: [feed["input"].astype("float32")])
    path = export_onnx(Cancelling(), tmp_path / "m.onnx", x)
    assert path.parity["reference"] == "float64" and path.parity["max_diff"] < 1e-6
    assert 1e-4 < path.parity["float32_error"] < 1e-3


def test_parity_against_float64_still_fails_a_wrong_export(tmp_path, monkeypatch):
    _ort_returns(monkeypatch, lambda outs, feed: [feed["input"] + 1e-2])
    with pytest.raises(OnnxParityError, match="float64 result ONNX Runtime is off by 1.0"):
        export_onnx(Cancelling(), tmp_path / "m.onnx", torch.randn(2, 64))
    assert os.listdir(tmp_path) == []


def test_save_load_roundtrip_in_fresh_process(tmp_path):
    _, pruned, x = _pruned("shufflenet_v2_x0_5")
    path = save(pruned, tmp_path / "m.apibfx", meta={"input_shape": list(x.shape[1:])})
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        want = pruned.eval()(x)
    code = (
        "import torch, apib_fx.serialize as s; m, meta = s.load(%r, with_meta=True); "
        "x = torch.load(%r); torch.save(m.eval()(x), %r); print(meta['input_shape'])"
        % (str(path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt"))
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(list(x.shape[1:]))
    assert torch.equal(torch.load(tmp_path / "y.pt"), want)


def test_load_rejects_other_files(tmp_path):
    with pytest.raises(ModelFileError, match="no model file"):
        load(tmp_path / "missing.apibfx")
    (tmp_path / "junk").write_bytes(b"not a model")
    with pytest.raises(ModelFileError, match="not an apib_fx model"):
        load(tmp_path / "junk")
    torch.save(zoo_model("resnet18").state_dict(), tmp_path / "weights.pth")
    with pytest.raises(ModelFileError, match="holds a state_dict .* apib_fx.load_weights"):
        load(tmp_path / "weights.pth")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ModelFileError, match="format"):
        load(tmp_path / "other.pt")


def _trained_like(classes=10, seed=1):
    """A CIFAR ResNet-20 whose every tensor differs from a freshly built one's."""
    torch.manual_seed(seed)
    model = apib_fx.models.CifarResNet(20, classes)
    with torch.no_grad():
        for t in model.state_dict().values():
            t.copy_(torch.rand_like(t, dtype=torch.float32).to(t.dtype) + 1)
    return model


@pytest.mark.parametrize("layout", ["plain", "checkpoint", "dataparallel", "compiled", "old_batchnorm"])
def test_load_weights_reads_the_layouts_training_scripts_save(layout, tmp_path):
    trained = _trained_like()
    state = trained.state_dict()
    if layout == "checkpoint":
        state = {"epoch": 90, "state_dict": state, "optimizer": {"lr": 0.1}}
    elif layout == "dataparallel":
        state = {"model": {f"module.{k}": v for k, v in state.items()}}
    elif layout == "compiled":
        state = {f"_orig_mod.{k}": v for k, v in state.items()}
    elif layout == "old_batchnorm":  # saved before BatchNorm counted its steps
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "w.pth")
    model = apib_fx.models.CifarResNet(20, 10)
    assert load_weights(model, tmp_path / "w.pth") is model
    for name, t in trained.state_dict().items():
        if layout == "old_batchnorm" and name.endswith("num_batches_tracked"):
            continue
        assert torch.equal(model.state_dict()[name], t), name
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), trained.eval()(x))


def test_load_weights_rejects_what_does_not_fit_and_leaves_the_model_as_it_was(tmp_path):
    model = apib_fx.models.CifarResNet(20, 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ModelFileError, match="no weights file"):
        load_weights(model, tmp_path / "missing.pth")
    torch.save(_trained_like(classes=100).state_dict(), tmp_path / "c100.pth")
    with pytest.raises(WeightsMismatchError, match=r"'fc.weight' is \(100, 64\) in the file.*100 classes") as e:
        load_weights(model, tmp_path / "c100.pth")
    assert e.value.num_outputs == 100
    other = apib_fx.models.CifarResNet(32, 10).state_dict()  # more blocks: keys the model lacks
    torch.save(other, tmp_path / "r32.pth")
    with pytest.raises(WeightsMismatchError,
                       match="missing 'layers.3.shortcut.0.weight'.*unexpected 'layers.5.shortcut.0.weight'") as e:
        load_weights(model, tmp_path / "r32.pth")
    assert e.value.num_outputs is None
    torch.save(_trained_like(), tmp_path / "pickled_module.pth")  # the whole module, not its weights
    with pytest.raises(ModelFileError, match=r"state_dict\(\)"):
        load_weights(model, tmp_path / "pickled_module.pth")
    torch.save({"epoch": 3, "lr": torch.tensor(0.1), "weights": [1, 2]}, tmp_path / "odd.pth")
    with pytest.raises(ModelFileError, match="holds a dict with keys 'epoch', 'lr', 'weights', not a state_dict"):
        load_weights(model, tmp_path / "odd.pth")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_benchmark_rows(tmp_path):
    model, pruned, x = _pruned("resnet18")
    onnx_file = export_onnx(pruned, tmp_path / "p.onnx", x)
    rows = benchmark({"base": model, "pruned": pruned, "pruned_onnx": onnx_file}, x, batch_sizes=(1, 2),
                     warmup=1, iters=2, progress=False)
    assert len(rows) == 3 * 4 * 2
    keys = {"model", "backend", "device", "batch", "threads", "flops", "params", "status", "reason", "ideal_speedup"}
    assert all(keys <= set(r) for r in rows)
    ok = [r for r in rows if r["status"] == "ok"]
    assert all({"median_ms", "p90_ms", "throughput", "speedup", "efficiency"} <= set(r) for r in ok)
    for r in ok:
        assert r["efficiency"] == pytest.approx(r["speedup"] / r["ideal_speedup"])
    ratio = apib_fx.count_flops(model, x) / apib_fx.count_flops(pruned, x)
    assert [r["ideal_speedup"] for r in rows if r["model"] == "pruned"][0] == pytest.approx(ratio)
    torch_onnx = [r for r in rows if r["model"] == "pruned_onnx" and r["backend"] == "torch"]
    assert all(r["status"] == "skipped" and "ONNX" in r["reason"] for r in torch_onnx)
    if not torch.cuda.is_available():
        cuda = [r for r in rows if r["backend"] in ("ort-cuda", "torch-cuda")]
        assert {r["backend"] for r in cuda} == {"ort-cuda", "torch-cuda"}
        assert all(r["status"] == "skipped" and r["reason"] for r in cuda)
    save_results(rows, tmp_path / "b.json")
    save_results(rows, tmp_path / "b.md")
    assert len(json.loads((tmp_path / "b.json").read_text())) == len(rows)
    assert "| model | backend |" in (tmp_path / "b.md").read_text()
    plot_latency(rows, tmp_path / "b.png")
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "skipped" in format_table(rows, fmt="text")


def test_onnx_macs_hand_counted(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5))
    path = export_onnx(model, tmp_path / "m.onnx", torch.randn(1, 3, 8, 8))
    assert onnx_macs(path, (1, 3, 8, 8)) == 4 * 6 * 6 * 3 * 9 + 144 * 5


def test_benchmark_feeds_a_model_its_own_precision_and_layout():
    model = zoo_model("resnet18", num_classes=10).to(dtype=torch.bfloat16, memory_format=torch.channels_last)
    rows = benchmark({"bf16": model}, torch.randn(1, 3, 32, 32), batch_sizes=(2,), backends=("torch",),
                     warmup=1, iters=1, progress=False)
    assert rows[0]["status"] == "ok", rows[0]["reason"]
    assert rows[0]["flops"] == apib_fx.count_flops(zoo_model("resnet18", num_classes=10), torch.randn(1, 3, 32, 32))


def test_benchmark_removes_its_onnx_files(tmp_path, monkeypatch):
    # The modules are exported to ONNX for onnxruntime: those files must not pile up in /tmp,
    # neither after a run nor when a later model is rejected.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    x = torch.randn(1, 3, 8, 8)
    rows = benchmark({"m": model}, x, batch_sizes=(1,), backends=("ort-cpu",), warmup=1, iters=1, progress=False)
    assert rows[0]["status"] == "ok", rows[0]["reason"]
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="no ONNX file"):
        benchmark({"m": model, "gone": tmp_path / "gone.onnx"}, x, backends=("ort-cpu",), progress=False)
    assert list(tmp_path.iterdir()) == []
