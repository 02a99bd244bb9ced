"""The paper's recipes, end to end for one tiny step on files the test writes."""
import importlib.util
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _load(rel):
    spec = importlib.util.spec_from_file_location(rel.replace("/", "_"), ROOT / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write_cifar(root: Path, classes: int, n: int = 48):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    key = b"labels" if classes == 10 else b"fine_labels"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if classes == 10 else ["train", "test"]
    for name in names:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: rng.integers(0, classes, n).tolist()}
        with open(root / name, "wb") as f:
            pickle.dump(batch, f)


@pytest.mark.parametrize("recipe", ["cifar100-vgg16-48", "cifar100-resnet56-26", "cifar100-resnet56-53", "cifar10-vgg16-60"])
def test_cifar_recipe_one_step(recipe, tmp_path):
    mod = _load("examples/cifar/recipe.py")
    classes = 10 if recipe.startswith("cifar10-") else 100
    data = tmp_path / "cifar"
    _write_cifar(data, classes)
    out = tmp_path / "out"
    mod.main(["--recipe", recipe, "--data", str(data), "--out", str(out), "--epochs", "1", "--finetune-epochs", "1",
              "--batch-size", "16", "--num-calib", "16", "--limit", "32", "--device", "cpu"])
    result = json.loads((out / "result.json").read_text())
    target = mod.RECIPES[recipe]["target"]
    assert abs(result["flops_reduction"] - target) <= 0.005
    assert (out / "pruned.apibfx").exists()


def test_cifar_recipe_missing_data(tmp_path):
    mod = _load("examples/cifar/recipe.py")
    from apib_fx.data import DataError

    with pytest.raises(DataError, match="does not exist"):
        mod.main(["--recipe", "cifar10-vgg16-60", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])


def _write_imagenet(root: Path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(d / f"{i}.png")


def test_imagenet_recipe_one_step(tmp_path):
    mod = _load("examples/imagenet/resnet50.py")
    _write_imagenet(tmp_path / "imagenet")
    out = tmp_path / "out"
    mod.main(["--data", str(tmp_path / "imagenet"), "--out", str(out), "--size", "32", "--num-calib", "8",
              "--finetune-epochs", "1", "--batch-size", "4", "--workers", "0", "--device", "cpu"])
    result = json.loads((out / "result.json").read_text())
    assert abs(result["flops_reduction"] - 0.56) <= 0.005


def test_imagenet_recipe_prunes_the_checkpoint_it_is_given(tmp_path):
    import torch
    import torchvision

    import apib_fx

    mod = _load("examples/imagenet/resnet50.py")
    _write_imagenet(tmp_path / "imagenet")
    torch.manual_seed(1)
    trained = torchvision.models.resnet50(weights=None, num_classes=2)
    # as torchvision's reference training script saves it (DataParallel keys inside a checkpoint dict)
    torch.save({"model": {f"module.{k}": v for k, v in trained.state_dict().items()}, "epoch": 89},
               tmp_path / "ckpt.pth")
    out = tmp_path / "out"
    mod.main(["--data", str(tmp_path / "imagenet"), "--out", str(out), "--size", "32", "--num-calib", "8",
              "--finetune-epochs", "0", "--batch-size", "4", "--workers", "0", "--device", "cpu",
              "--checkpoint", str(tmp_path / "ckpt.pth")])
    pruned = apib_fx.load(out / "pruned.apibfx")
    assert torch.equal(pruned.fc.bias, trained.fc.bias)  # (the classifier's outputs stay; no fine-tuning)
    full = dict(trained.named_parameters())
    # a conv that lost filters but none of its inputs: its filters are filters of the checkpoint
    name, kept = next((n, w) for n, w in pruned.named_parameters()
                      if w.dim() == 4 and w.shape[0] < full[n].shape[0] and w.shape[1] == full[n].shape[1])
    assert all(any(torch.equal(k, t) for t in full[name]) for k in kept), name
