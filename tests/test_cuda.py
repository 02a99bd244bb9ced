"""The library on a CUDA device: pruning a model that lives on the GPU, calibrating on the GPU for a
CPU model, exact rewrites, HSIC statistics and BatchNorm re-estimation against the CPU, and the
torch-cuda latency backend. Skipped where no GPU is present (CI); run them on a GPU machine with
``python -m pytest tests/test_cuda.py``."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import apib_fx
from apib_fx.hsic import HSICStats
from apib_fx.testing import random_keep, zeroed_reference, zoo_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SIZE = 64


@pytest.fixture(autouse=True)
def full_float32():
    """TF32 off, so the GPU computes float32 like the CPU and results can be compared closely."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _calib(n: int = 32, device: str = "cpu") -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)).to(device)


def _widths(pruned) -> list[int]:
    return [row.channels_after for row in pruned.apib_report.groups]


def test_prune_a_model_on_the_gpu():
    model = zoo_model("resnet18").cuda()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = _calib(device="cuda")
    pruned = apib_fx.prune(model, 0.48, calib, num_calib=32, batch_size=16, progress=False)
    report = pruned.apib_report
    assert all(t.device.type == "cuda" for t in pruned.parameters())
    assert all(t.device.type == "cuda" for t in pruned.buffers())
    assert abs(report.flops_reduction - 0.48) <= 0.005
    assert apib_fx.count_flops(pruned, calib[:1]) == report.flops_after
    assert report.bn_recalibrated > 0
    with torch.no_grad():
        out = pruned.eval()(calib[:4])
    assert out.shape == (4, 1000) and out.device.type == "cuda" and bool(torch.isfinite(out).all())
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and after[k].device.type == "cuda" for k in before)


def test_calibrating_on_the_gpu_matches_the_cpu():
    """A CPU model calibrated on the GPU (device="cuda") comes back on the CPU, with the widths a
    CPU calibration gives (float32 on both; the Lasso paths run on the CPU either way)."""
    model = zoo_model("resnet18")
    calib = _calib()
    on_cpu = apib_fx.prune(model, 0.48, calib, num_calib=32, batch_size=16, progress=False)
    on_gpu = apib_fx.prune(model, 0.48, calib, num_calib=32, batch_size=16, progress=False, device="cuda")
    assert all(t.device.type == "cpu" for t in on_gpu.parameters())
    assert abs(on_gpu.apib_report.flops_reduction - 0.48) <= 0.005
    a, b = _widths(on_cpu), _widths(on_gpu)
    # Convolutions sum in another order on the GPU (~1e-6 relative): a channel at a tie may flip.
    agree = sum(min(x, y) for x, y in zip(a, b)) / sum(max(x, y) for x, y in zip(a, b))
    assert agree >= 0.98, (a, b)


def test_hsic_statistics_on_the_gpu_match_the_cpu():
    g = torch.Generator().manual_seed(1)
    x = torch.relu(torch.randn(32, 24, 49, generator=g) + 0.5)
    y = torch.randn(32, 64, 49, generator=g)
    results = []
    for device in ("cpu", "cuda"):
        stats = HSICStats(24)
        stats.add(x.to(device), y.to(device))
        stats.add(x.flip(0).to(device), y.flip(0).to(device))
        results.append(stats.gram())
    (G_cpu, b_cpu), (G_gpu, b_gpu) = results
    assert G_gpu.device.type == "cpu" and G_gpu.dtype == torch.float64
    torch.testing.assert_close(G_gpu, G_cpu, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b_gpu, b_cpu, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "densenet121"])
def test_rewrite_is_exact_on_the_gpu(name):
    model = zoo_model(name).cuda().eval()
    x = _calib(2, "cuda")
    graph = apib_fx.trace(model, x)
    keep = random_keep(graph, 0.3, seed=0)
    pruned = apib_fx.apply(model, graph, keep).eval()
    ref = zeroed_reference(model, graph, keep).eval()
    assert all(t.device.type == "cuda" for t in pruned.parameters())
    with torch.no_grad():
        want, got = ref(x), pruned(x)
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= 1e-5 * max(1.0, float(want.abs().max()))


def test_batchnorm_reestimation_on_the_gpu_matches_the_cpu():
    model = zoo_model("resnet18")
    graph = apib_fx.trace(model, _calib(1))
    pruned = apib_fx.apply(model, graph, random_keep(graph, 0.3, seed=0))
    on_gpu = copy.deepcopy(pruned).cuda()
    batches = list(_calib(32).split(16))
    assert apib_fx.recalibrate_bn(pruned, batches) == apib_fx.recalibrate_bn(on_gpu, [b.cuda() for b in batches])
    for (name, cpu), (_, gpu) in zip(pruned.named_buffers(), on_gpu.named_buffers()):
        if name.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5, msg=name)


def test_torch_cuda_latency_backend():
    model = zoo_model("resnet18")
    graph = apib_fx.trace(model, _calib(1))
    pruned = apib_fx.apply(model, graph, random_keep(graph, 0.5, seed=0))
    rows = apib_fx.benchmark({"base": model, "pruned": pruned}, _calib(1), batch_sizes=(1, 8),
                             backends=("torch-cuda",), warmup=2, iters=5, progress=False)
    assert len(rows) == 4
    assert all(r["status"] == "ok" and r["device"].startswith("cuda:") and r["median_ms"] > 0 for r in rows)
    assert all(t.device.type == "cpu" for t in model.parameters())  # timed on a copy


def test_cli_calibrates_on_the_gpu(tmp_path):
    from apib_fx.cli import main

    rc = main(["prune", "--model", "torchvision:resnet18", "--input-shape", f"3,{SIZE},{SIZE}", "--num-calib", "32",
               "--batch-size", "16", "--device", "cuda", "--no-onnx", "--quiet", "--out", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert abs(report["flops_reduction"] - 0.48) <= 0.005
    pruned = apib_fx.load(tmp_path / "model.apibfx")
    assert report["flops_after"] == apib_fx.count_flops(pruned, torch.randn(1, 3, SIZE, SIZE))


def test_prune_a_half_precision_channels_last_model_on_the_gpu():
    model = zoo_model("resnet18").cuda().half().to(memory_format=torch.channels_last)
    calib = _calib(device="cuda").half().contiguous(memory_format=torch.channels_last)
    pruned = apib_fx.prune(model, 0.48, calib, num_calib=32, batch_size=16, progress=False)
    assert abs(pruned.apib_report.flops_reduction - 0.48) <= 0.005
    assert all(t.dtype == torch.float16 for t in pruned.parameters())
    with torch.no_grad():
        out = pruned.eval()(calib[:4])
    assert out.dtype == torch.float16 and bool(torch.isfinite(out).all())


def test_whole_heads_of_a_vit_prune_on_the_gpu():
    """Whole heads (heads="whole") calibrated on the GPU: the heads are scored through the output
    projection on the device, the target is met, and the widths are the CPU's."""
    from torchvision.models import VisionTransformer

    from apib_fx.testing import fill_zero_weights

    torch.manual_seed(0)
    model = fill_zero_weights(VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                hidden_dim=32, mlp_dim=32, num_classes=10).eval())
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    kwargs = dict(heads="whole", num_calib=16, batch_size=8, progress=False)
    on_cpu = apib_fx.prune(model, 0.6, x, **kwargs)
    on_gpu = apib_fx.prune(model.cuda(), 0.6, x.cuda(), **kwargs)
    assert all(t.device.type == "cuda" for t in on_gpu.parameters())
    assert abs(on_gpu.apib_report.flops_reduction - 0.6) <= 0.005
    assert apib_fx.count_flops(on_gpu, x[:1].cuda()) == on_gpu.apib_report.flops_after
    heads = [r.channels_before for r in on_gpu.apib_report.groups if r.name.endswith("in_proj_weight[0]")]
    assert heads == [4, 4]
    a, b = _widths(on_cpu), _widths(on_gpu)
    agree = sum(min(p, q) for p, q in zip(a, b)) / sum(max(p, q) for p, q in zip(a, b))
    assert agree >= 0.95, (a, b)
