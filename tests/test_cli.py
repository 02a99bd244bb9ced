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
    for cmd in ("prune", "finetune", "export", "bench", "demo"):
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


def _trained_resnet20(classes=10):
    """A CIFAR ResNet-20 whose every tensor differs from a freshly built one's."""
    torch.manual_seed(1)
    model = apib_fx.models.CifarResNet(20, classes)
    with torch.no_grad():
        for t in model.state_dict().values():
            t.copy_(torch.rand_like(t, dtype=torch.float32).to(t.dtype) + 1)
    return model.eval()


def test_prune_and_export_read_trained_weights(tmp_path):
    trained = _trained_resnet20()
    # as a DataParallel training loop saves it
    torch.save({"epoch": 9, "model": {f"module.{k}": v for k, v in trained.state_dict().items()}}, tmp_path / "w.pth")
    out_dir = tmp_path / "run"
    run("prune", "--model", "cifar:resnet20", "--weights", str(tmp_path / "w.pth"), "--method", "l1",
        "--flops-target", "0.3", "--calib", "digits", "--num-calib", "16", "--batch-size", "16",
        "--out", str(out_dir), "--no-onnx", "--quiet")
    pruned = apib_fx.load(out_dir / "model.apibfx")
    assert torch.equal(pruned.fc.bias, trained.fc.bias)  # the classifier's outputs are never pruned
    kept = pruned.conv1.weight  # the stem's kept filters are filters of the trained stem
    assert kept.shape[0] < trained.conv1.weight.shape[0]
    assert all(any(torch.equal(k, t) for t in trained.conv1.weight) for k in kept)
    # export builds the same trained model: ONNX Runtime's output is the trained model's
    import onnxruntime as ort

    run("export", "--model", "cifar:resnet20", "--weights", str(tmp_path / "w.pth"), "--out", str(tmp_path / "m.onnx"))
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = trained(x)
    assert torch.allclose(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_weights_that_do_not_fit_are_one_line_errors(tmp_path):
    torch.save(_trained_resnet20(classes=100).state_dict(), tmp_path / "c100.pth")
    base = ["prune", "--model", "cifar:resnet20", "--out", str(tmp_path / "x"), "--quiet"]
    for extra, words in [
        (["--weights", str(tmp_path / "c100.pth")], "pass --num-classes 100"),
        (["--weights", str(tmp_path / "none.pth")], "no weights file"),
    ]:
        out = run(*base, *extra, check=False)
        lines = [l for l in out.stderr.strip().splitlines() if l.strip()]
        assert out.returncode != 0 and len(lines) == 1 and words in lines[0], out.stderr
        assert not (tmp_path / "x").exists()
    out = run("export", "--model", str(tmp_path / "c100.pth"), "--weights", str(tmp_path / "c100.pth"),
              "--out", str(tmp_path / "m.onnx"), check=False)
    assert out.returncode != 0 and "holds a state_dict" in out.stderr and "--weights PATH" in out.stderr
    pruned = tmp_path / "p.apibfx"
    apib_fx.save(_trained_resnet20(), pruned, meta={"input_shape": [3, 32, 32]})
    out = run("export", "--model", str(pruned), "--weights", str(tmp_path / "c100.pth"),
              "--out", str(tmp_path / "m.onnx"), check=False)
    assert out.returncode != 0 and "a saved model file holds its own weights" in out.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_timm_models_with_their_trained_weights(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(3)
    trained = timm.create_model("resnet18", pretrained=False, num_classes=7).eval()
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "w.pth")
    run("prune", "--model", "timm:resnet18", "--weights", str(tmp_path / "w.pth"), "--num-classes", "7",
        "--method", "l1", "--flops-target", "0.3", "--input-shape", "3,64,64", "--out", str(tmp_path / "run"),
        "--no-onnx", "--quiet")
    pruned = apib_fx.load(tmp_path / "run" / "model.apibfx")
    assert torch.equal(pruned.fc.bias, trained.fc.bias)
    x = torch.randn(1, 3, 64, 64)
    assert 0.295 <= 1 - apib_fx.count_flops(pruned, x) / apib_fx.count_flops(trained, x) <= 0.305
    out = run("prune", "--model", "timm:no_such_net", "--out", str(tmp_path / "x"), check=False)
    assert out.returncode != 0 and "unknown timm model 'no_such_net'" in out.stderr


def test_prune_then_finetune_on_digits(tmp_path):
    from apib_fx.data import training_data
    from apib_fx.train import evaluate

    run("prune", "--model", "cifar:resnet20", "--input-shape", "3,16,16", "--flops-target", "0.4", "--calib", "digits",
        "--num-calib", "32", "--batch-size", "16", "--out", str(tmp_path / "run"), "--no-onnx", "--quiet")
    pruned, meta = apib_fx.serialize.load(tmp_path / "run" / "model.apibfx", with_meta=True)
    out = run("finetune", "--model", str(tmp_path / "run" / "model.apibfx"), "--data", "digits", "--epochs", "2",
              "--lr", "0.05", "--out", str(tmp_path / "ft.apibfx"), "--quiet")
    tuned, tuned_meta = apib_fx.serialize.load(tmp_path / "ft.apibfx", with_meta=True)
    record = tuned_meta["finetune"][-1]
    _, held_out = training_data("digits", (3, 16, 16))
    loader = torch.utils.data.DataLoader(held_out, batch_size=64)
    # the figures printed and recorded are the saved models' own
    assert record["top1_before"] == evaluate(pruned, loader) and record["top1_after"] == evaluate(tuned, loader)
    assert f"{100 * record['top1_after']:.2f}%" in out.stdout and f"{100 * record['top1_before']:.2f}%" in out.stdout
    assert record["top1_after"] >= 0.5 > record["top1_before"]  # two epochs teach a random ResNet-20 the digits
    # the pruned shapes and the pruning report travel on
    assert tuned_meta["report"] == meta["report"] and tuned_meta["input_shape"] == [3, 16, 16]
    assert {n: p.shape for n, p in tuned.named_parameters()} == {n: p.shape for n, p in pruned.named_parameters()}


@pytest.mark.parametrize("extra,words", [
    (["--data", "imagefolder:{tmp}"], "has no train/ or val/ sub-folder"),
    (["--data", "cifar10:{tmp}"], "no CIFAR-10 training files"),
    (["--data", "digits", "--num-classes", "5"], "the model has 5 outputs, --data digits has 10 classes"),
    (["--data", "digits", "--epochs", "0"], "--epochs must be at least 1"),
    (["--data", "mnist"], "unknown --data 'mnist'"),
])
def test_finetune_bad_input_one_line(extra, words, tmp_path):
    args = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    out = run("finetune", "--model", "cifar:resnet20", *args, "--out", str(tmp_path / "ft.apibfx"), "--quiet",
              check=False)
    lines = [l for l in out.stderr.strip().splitlines() if l.strip()]
    assert out.returncode != 0 and len(lines) == 1 and words in lines[0], out.stderr
    assert not (tmp_path / "ft.apibfx").exists()


def test_a_saved_model_without_its_input_shape_takes_input_shape(tmp_path):
    apib_fx.save(apib_fx.models.CifarResNet(20), tmp_path / "m.apibfx")  # no meta
    out = run("export", "--model", str(tmp_path / "m.apibfx"), "--out", str(tmp_path / "m.onnx"), check=False)
    assert out.returncode != 0 and "pass --input-shape" in out.stderr
    run("export", "--model", str(tmp_path / "m.apibfx"), "--input-shape", "3,32,32", "--out", str(tmp_path / "m.onnx"))
    assert (tmp_path / "m.onnx").exists()


def test_inspect_lists_the_groups():
    out = run("inspect", "--model", "cifar:resnet20")
    graph = apib_fx.trace(apib_fx.models.CifarResNet(20), torch.zeros(1, 3, 32, 32))
    assert out.stdout.startswith(f"resnet20 at 1x3x32x32: {len(graph.groups)} channel groups, "
                                 f"{len(graph.prunable_groups)} prunable, 1 fixed; {graph.flops():,} MACs")
    assert graph.table() in out.stdout
    fixed = run("inspect", "--model", "cifar:resnet20", "--only-fixed").stdout
    assert "fixed: they reach a model output" in fixed and "| prunable |" not in fixed


def test_inspect_lists_the_branches_on_the_input_shape():
    pytest.importorskip("timm")
    out = run("inspect", "--model", "timm:mobilevit_xxs", "--input-shape", "3,64,64")
    assert "branches on the input's shape, followed as this input takes them" in out.stdout
    assert "- `if new_h != H or new_w != W:` is False (mobilevit.py:" in out.stdout


def _image_root(root, shades):
    """root/{split}/{class}/*.png, every image one flat grey level: (split, class) -> level."""
    from PIL import Image

    for (split, cls), level in shades.items():
        d = root / split / cls
        d.mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 40), (level, level, level)).save(d / f"{i}.png")


def test_imagefolder_sources_read_the_right_split(tmp_path):
    from apib_fx.data import calibration_tensor, training_data

    shades = {("train", "cat"): 40, ("train", "dog"): 80, ("val", "cat"): 160, ("val", "dog"): 220}
    _image_root(tmp_path, shades)
    red = lambda x: {round(float(v) * 0.229 + 0.485, 2) for v in x[:, 0].flatten()}  # back to [0, 1]
    calib = calibration_tensor(f"imagefolder:{tmp_path}", 4, (3, 32, 32))
    assert calib.shape == (4, 3, 32, 32) and red(calib) <= {round(40 / 255, 2), round(80 / 255, 2)}
    held_out = calibration_tensor(f"imagefolder:{tmp_path / 'val'}", 6, (3, 32, 32))  # a folder of classes as given
    assert held_out.shape == (6, 3, 32, 32) and red(held_out) == {round(160 / 255, 2), round(220 / 255, 2)}
    train, val = training_data(f"imagefolder:{tmp_path}", (3, 32, 32))
    assert train.classes == val.classes == ["cat", "dog"] and len(train) == len(val) == 6
    assert train[0][0].shape == val[0][0].shape == (3, 32, 32)
    assert red(torch.stack([val[i][0] for i in range(6)])) == {round(160 / 255, 2), round(220 / 255, 2)}


def test_finetune_distils_from_a_teacher(tmp_path):
    trained = _trained_resnet20()
    torch.save(trained.state_dict(), tmp_path / "teacher.pth")
    run("prune", "--model", "cifar:resnet20", "--weights", str(tmp_path / "teacher.pth"), "--input-shape", "3,16,16",
        "--method", "l1", "--flops-target", "0.3", "--calib", "digits", "--num-calib", "16", "--batch-size", "16",
        "--out", str(tmp_path / "run"), "--no-onnx", "--quiet")
    student = str(tmp_path / "run" / "model.apibfx")
    teacher = ["--teacher", "cifar:resnet20", "--teacher-weights", str(tmp_path / "teacher.pth")]
    run("finetune", "--model", student, "--data", "digits", "--epochs", "1", *teacher, "--distill", "0.7",
        "--out", str(tmp_path / "ft.apibfx"), "--quiet")
    record = apib_fx.serialize.load(tmp_path / "ft.apibfx", with_meta=True)[1]["finetune"][-1]
    assert (record["teacher"], record["distill"], record["temperature"]) == ("cifar:resnet20", 0.7, 4.0)
    for extra, words in [
        (["--teacher", "cifar:resnet20", "--num-classes", "5"], "the teacher has 5 outputs, the model 10"),
        (["--teacher-weights", str(tmp_path / "teacher.pth")], "--teacher-weights needs --teacher"),
        ([*teacher, "--distill", "2"], "--distill must be in [0, 1]"),
    ]:
        out = run("finetune", "--model", student, "--data", "digits", *extra, "--out", str(tmp_path / "bad.apibfx"),
                  "--quiet", check=False)
        lines = [l for l in out.stderr.strip().splitlines() if l.strip()]
        assert out.returncode != 0 and len(lines) == 1 and words in lines[0], out.stderr
    assert not (tmp_path / "bad.apibfx").exists()


def test_image_folders_are_normalised_as_the_model_expects(tmp_path):
    from apib_fx.data import IMAGENET_MEAN, IMAGENET_STD, calibration_tensor, model_normalization

    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224.augreg_in21k", pretrained=False, num_classes=10)
    assert model_normalization(vit) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # (timm's config for it)
    assert model_normalization(apib_fx.models.CifarResNet(20)) == (IMAGENET_MEAN, IMAGENET_STD)
    pruned = apib_fx.prune(vit, 0.2, example_inputs=torch.zeros(1, 3, 224, 224), method="l1", progress=False)
    assert model_normalization(pruned) == model_normalization(vit)  # (the config travels with the pruned model)
    _image_root(tmp_path, {("train", "a"): 51, ("train", "b"): 51})
    x = calibration_tensor(f"imagefolder:{tmp_path}", 2, (3, 32, 32), normalization=model_normalization(vit))
    assert torch.allclose(x, torch.full_like(x, (51 / 255 - 0.5) / 0.5), atol=1e-6)


def test_inspect_and_prune_whole_heads(tmp_path):
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=32,
                            num_classes=10).eval()
    apibfx = apib_fx.save(vit, tmp_path / "vit.apibfx", meta={"input_shape": [3, 32, 32]})
    for heads in ("dims", "whole"):
        graph = apib_fx.trace(vit, torch.zeros(1, 3, 32, 32), heads=heads)
        assert graph.table() in run("inspect", "--model", str(apibfx), "--heads", heads).stdout
    run("prune", "--model", str(apibfx), "--heads", "whole", "--method", "l1", "--flops-target", "0.45",
        "--out", str(tmp_path / "run"), "--no-onnx", "--quiet")
    rows = [r for r in json.loads((tmp_path / "run" / "report.json").read_text())["groups"]
            if r["name"].endswith("in_proj_weight[0]")]
    assert [r["channels_before"] for r in rows] == [4, 4]  # heads, not head dims
    assert json.loads((tmp_path / "run" / "report.json").read_text())["heads"] == "whole"
    assert "pruned by whole heads" in (tmp_path / "run" / "report.md").read_text()
    assert run("prune", "--model", str(apibfx), "--heads", "all", "--out", str(tmp_path / "x"), check=False).returncode != 0
