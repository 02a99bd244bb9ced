"""The apib-fx console script, run for real in a subprocess."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

import apib_fx


def _cli():
    exe = shutil.which("apib-fx")
    return [exe] if exe else [sys.executable, "-m", "apib_fx.cli"]


def run(*args, check=True):
    out = subprocess.run(_cli() + list(args), capture_output=True, text=True, timeout=600)
    if check:
        assert out.returncode == 0, out.stderr[-2000:]
    return out


def test_help():
    out = run("--help")
    for cmd in ("prune", "export", "bench", "demo"):
        assert cmd in out.stdout
    assert "--flops-target" in run("prune", "--help").stdout


def test_prune_writes_everything(tmp_path):
    out_dir = tmp_path / "run"
    run("prune", "--model", "cifar:resnet20", "--flops-target", "0.4", "--calib", "digits", "--tolerance", "0.002",
        "--num-calib", "32", "--batch-size", "16", "--out", str(out_dir), "--quiet", "--workers", "2")
    names = {p.name for p in out_dir.iterdir()}
    assert {"model.apibfx", "model.onnx", "report.json", "report.md", "channels.png"} <= names
    report = json.loads((out_dir / "report.json").read_text())
    model = apib_fx.load(out_dir / "model.apibfx")
    x = torch.randn(1, 3, 32, 32)
    assert report["flops_after"] == apib_fx.count_flops(model, x)
    assert report["flops_before"] == apib_fx.count_flops(apib_fx.models.CifarResNet(20), x)
    assert abs(report["flops_reduction"] - 0.4) <= 0.002
    assert (out_dir / "channels.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out_dir / "report.md").read_text()
    assert "| group | layer | channels | kept |" in md and "FLOPs removed" in md
    # the saved model feeds the other subcommands
    run("export", "--model", str(out_dir / "model.apibfx"), "--out", str(tmp_path / "again.onnx"))
    bench = run("bench", "--model", "cifar:resnet20", "--model", str(out_dir / "model.apibfx"),
                "--batch-sizes", "1", "--iters", "2", "--warmup", "1", "--backends", "torch,ort-cpu",
                "--save", str(tmp_path / "b.md"), "--quiet")
    assert "ideal" in bench.stdout and (tmp_path / "b.md").exists()


@pytest.mark.parametrize(
    "args,words",
    [
        (["prune", "--model", "torchvision:nonexistent_net", "--out", "x"], "unknown torchvision model"),
        (["prune", "--model", "cifar:resnet20", "--flops-target", "1.5", "--out", "x"], "flops-target"),
        (["prune", "--model", "/no/such/file.apibfx", "--out", "x"], "neither"),
        (["prune", "--model", "cifar:resnet20", "--calib", "cifar10:/no/such/dir", "--out", "x"], "does not exist"),
        (["prune", "--model", "cifar:resnet20", "--calib", "webcam", "--out", "x"], "unknown --calib"),
        (["prune", "--model", "cifar:resnet20", "--workers", "0", "--out", "x"], "workers must be"),
        (["prune", "--model", "cifar:resnet20", "--device", "gpu0", "--out", "x"], "torch device"),
        (["prune", "--model", "cifar:resnet20", "--tolerance", "2", "--out", "x"], "tolerance must be in (0, 1)"),
    ],
)
def test_bad_arguments_one_line(args, words, tmp_path):
    out = run(*args, check=False)
    assert out.returncode != 0
    lines = [l for l in out.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("apib-fx: error:") and words in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def test_debug_shows_traceback():
    out = run("--debug", "prune", "--model", "torchvision:nonexistent_net", "--out", "x", check=False)
    assert out.returncode != 0 and "Traceback" in out.stderr
