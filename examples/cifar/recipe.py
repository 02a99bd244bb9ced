"""The APIB paper's CIFAR recipes: train from scratch, prune with APIB, fine-tune, evaluate.

    python examples/cifar/recipe.py --recipe cifar100-vgg16-48 --data ~/data/cifar-100-python --out runs/vgg16

Reads the standard CIFAR python-format directory you already have (nothing is downloaded).
Recipes (the paper's numbers: supplement Table 1, main paper for CIFAR-10):

    cifar100-vgg16-48     VGG-16,    CIFAR-100, 48% FLOPs ↓, omega 40  -> paper 73.89% (+0.09)
    cifar100-resnet56-26  ResNet-56, CIFAR-100, 26% FLOPs ↓, omega 5   -> paper 73.31% (+0.79)
    cifar100-resnet56-53  ResNet-56, CIFAR-100, 53% FLOPs ↓, omega 5   -> paper 70.89% (-1.63)
    cifar10-vgg16-60      VGG-16,    CIFAR-10,  60% FLOPs ↓, omega 40  -> paper +0.40% over the unpruned

Training: SGD (momentum 0.9, Nesterov, weight decay 5e-4), cosine schedule, random crop + flip.
--checkpoint skips training from scratch by loading a state_dict of the unpruned model.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import apib_fx
from apib_fx.data import CropFlip, cifar
from apib_fx.models import CifarResNet, CifarVGG
from apib_fx.train import evaluate, fit

RECIPES = {
    "cifar100-vgg16-48": dict(model="vgg16", classes=100, target=0.48, omega=40, paper="73.89% (+0.09)"),
    "cifar100-resnet56-26": dict(model="resnet56", classes=100, target=0.26, omega=5, paper="73.31% (+0.79)"),
    "cifar100-resnet56-53": dict(model="resnet56", classes=100, target=0.53, omega=5, paper="70.89% (-1.63)"),
    "cifar10-vgg16-60": dict(model="vgg16", classes=10, target=0.60, omega=40, paper="+0.40% over unpruned"),
}


def build(name: str, classes: int) -> torch.nn.Module:
    return CifarVGG(classes) if name == "vgg16" else CifarResNet(int(name[6:]), classes)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", choices=sorted(RECIPES), required=True)
    ap.add_argument("--data", required=True, help="CIFAR python-format directory (cifar-10-batches-py / cifar-100-python)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--finetune-epochs", type=int, default=100)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--finetune-lr", type=float, default=0.01)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--num-calib", type=int, default=128)
    ap.add_argument("--limit", type=int, default=None, help="use only this many images (smoke tests)")
    ap.add_argument("--checkpoint", default=None, help="state_dict of a trained unpruned model")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    r = RECIPES[args.recipe]
    torch.manual_seed(args.seed)
    train_set = cifar(args.data, train=True, num_classes=r["classes"], limit=args.limit)
    test_set = cifar(args.data, train=False, num_classes=r["classes"], limit=args.limit)
    gen = torch.Generator().manual_seed(args.seed)
    train = DataLoader(CropFlip(train_set, seed=args.seed), batch_size=args.batch_size, shuffle=True, generator=gen)
    test = DataLoader(test_set, batch_size=256)
    model = build(r["model"], r["classes"]).to(args.device)
    if args.checkpoint:
        apib_fx.load_weights(model, args.checkpoint)  # (checkpoint dicts and DataParallel keys too)
    else:
        fit(model, train, args.epochs, lr=args.lr, desc="train")
    acc0 = evaluate(model, test)
    calib = train_set.tensors[0][: args.num_calib].to(args.device)
    pruned = apib_fx.prune(model, r["target"], calib, num_calib=args.num_calib, min_channels=r["omega"],
                           batch_size=min(64, args.num_calib))
    acc1 = evaluate(pruned, test)
    fit(pruned, train, args.finetune_epochs, lr=args.finetune_lr, desc="fine-tune")
    acc2 = evaluate(pruned, test)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = pruned.apib_report
    apib_fx.save(pruned.cpu(), out / "pruned.apibfx", meta={"input_shape": [3, 32, 32], "recipe": args.recipe})
    summary = {"recipe": args.recipe, "paper": r["paper"], "top1_unpruned": acc0, "top1_one_shot": acc1,
               "top1_finetuned": acc2, "top1_change": acc2 - acc0, "flops_reduction": report.flops_reduction,
               "params_reduction": 1 - report.params_after / report.params_before, "timings": report.timings}
    (out / "result.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
