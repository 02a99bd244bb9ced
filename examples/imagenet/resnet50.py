"""APIB on ResNet-50 / ImageNet (the paper: 56% FLOPs ↓, 50% parameters ↓, -0.08% top-1).

    python examples/imagenet/resnet50.py --data ~/data/imagenet --checkpoint resnet50.pth --out runs/r50

``--data`` is an ImageFolder root with ``train/`` and ``val/`` (one sub-folder per class);
``--checkpoint`` a state_dict of a trained torchvision ResNet-50 you already have (nothing is
downloaded; without it the model starts from random weights, useful only for smoke tests).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torchvision
from torch.utils.data import DataLoader

import apib_fx
from apib_fx.data import image_folder
from apib_fx.train import evaluate, fit


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--flops-target", type=float, default=0.56)
    ap.add_argument("--min-channels", type=int, default=1, help="the paper's omega for ResNet-50")
    ap.add_argument("--num-calib", type=int, default=128)
    ap.add_argument("--finetune-epochs", type=int, default=90)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    root = Path(args.data).expanduser()
    train_set = image_folder(root / "train", size=args.size, train=True)
    val_set = image_folder(root / "val", size=args.size, train=False)
    model = torchvision.models.resnet50(weights=None, num_classes=len(train_set.classes))
    if args.checkpoint:
        apib_fx.load_weights(model, args.checkpoint)  # (checkpoint dicts and DataParallel keys too)
    model = model.to(args.device).eval()
    train = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, num_workers=args.workers)
    val = DataLoader(val_set, batch_size=args.batch_size, num_workers=args.workers)
    acc0 = evaluate(model, val, progress=True, desc="top-1 unpruned")
    calib_loader = DataLoader(image_folder(root / "train", size=args.size, train=False), batch_size=32, shuffle=True,
                              generator=torch.Generator().manual_seed(0))
    pruned = apib_fx.prune(model, args.flops_target, calib_loader, num_calib=args.num_calib,
                           min_channels=args.min_channels, batch_size=min(64, args.num_calib), device=args.device)
    acc1 = evaluate(pruned, val, progress=True, desc="top-1 one-shot")
    fit(pruned, train, args.finetune_epochs, lr=args.lr, weight_decay=1e-4, desc="fine-tune")
    acc2 = evaluate(pruned, val, progress=True, desc="top-1 fine-tuned")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    apib_fx.save(pruned.cpu(), out / "pruned.apibfx", meta={"input_shape": [3, args.size, args.size]})
    r = pruned.apib_report
    summary = {"paper": "56% FLOPs ↓, 50% params ↓, -0.08% top-1", "top1_unpruned": acc0, "top1_one_shot": acc1,
               "top1_finetuned": acc2, "flops_reduction": r.flops_reduction,
               "params_reduction": 1 - r.params_after / r.params_before, "timings": r.timings}
    (out / "result.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
