"""APIB vs l1 vs fpgm vs random vs Torch-Pruning's magnitude pruner on the digits task.

    python benchmarks/compare_methods.py [--seeds 0,1,2] [--targets 0.48,0.7]

For every seed: train a CIFAR-style ResNet-20 on scikit-learn's digits, then for every target and
method prune to the same FLOPs reduction, measure one-shot accuracy, fine-tune with the same
budget, measure again. Prints mean ± std over seeds and writes benchmarks/results/compare_methods.md.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import apib_fx
from apib_fx.data import digits
from apib_fx.models import CifarResNet
from apib_fx.train import evaluate, fit

from _peers import tp_magnitude
from _results import write_results

METHODS = ["apib", "l1", "fpgm", "random", "torch-pruning"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--targets", default="0.48,0.7")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--finetune-epochs", type=int, default=6)
    ap.add_argument("--out", default="benchmarks/results/compare_methods.md")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    targets = [float(t) for t in args.targets.split(",")]
    results: dict[tuple, list] = {}
    base_acc = []
    for seed in seeds:
        torch.manual_seed(seed)
        train_set, test_set = digits("train", seed=seed), digits("test", seed=seed)
        train = DataLoader(train_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
        test = DataLoader(test_set, batch_size=256)
        model = fit(CifarResNet(20, 10, 16, 1), train, args.epochs, lr=0.1, progress=False)
        base_acc.append(evaluate(model, test))
        calib = train_set.tensors[0][:128]
        for target in targets:
            for method in METHODS:
                torch.manual_seed(seed)
                t = time.perf_counter()
                if method == "torch-pruning":
                    pruned, red, once, _ = tp_magnitude(model, calib[:1], target)
                    seconds = once
                else:
                    pruned = apib_fx.prune(model, target, calib, method=method, num_calib=128, progress=False,
                                           seed=seed, recalibrate=False)
                    red, seconds = pruned.apib_report.flops_reduction, time.perf_counter() - t
                one_shot = evaluate(pruned, test)
                apib_fx.recalibrate_bn(pruned, list(calib.split(64)))  # what prune() does by default
                recalibrated = evaluate(pruned, test)
                fit(pruned, train, args.finetune_epochs, lr=0.02, progress=False)
                tuned = evaluate(pruned, test)
                results.setdefault((target, method), []).append((red, one_shot, recalibrated, tuned, seconds))
                print(f"seed {seed} target {target} {method:14s} FLOPs↓ {red:.3f} one-shot {one_shot:.3f} "
                      f"+BN {recalibrated:.3f} fine-tuned {tuned:.3f} prune {seconds:.2f}s", flush=True)

    def ms(values):
        return f"{100 * statistics.mean(values):.2f} ± {100 * (statistics.stdev(values) if len(values) > 1 else 0):.2f}"

    lines = [f"ResNet-20 (width 16) on scikit-learn digits (16x16), {len(seeds)} seeds, {args.epochs} training "
             f"epochs, {args.finetune_epochs} fine-tuning epochs (SGD, cosine), 128 calibration images. "
             f"Unpruned top-1: {ms(base_acc)}%.", "",
             "| FLOPs ↓ target | method | achieved FLOPs ↓ | one-shot top-1 % | one-shot + BN re-estimated % "
             "| fine-tuned top-1 % | time to prune (s) |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for (target, method), rows in results.items():
        lines.append(f"| {target:.2f} | {method} | {statistics.mean(r[0] for r in rows):.3f} | {ms([r[1] for r in rows])} | "
                     f"{ms([r[2] for r in rows])} | {ms([r[3] for r in rows])} | {statistics.mean(r[4] for r in rows):.2f} |")
    text = "\n".join(lines)
    print("\n" + text)
    out = Path(args.out)
    write_results(out, text + "\n")


if __name__ == "__main__":
    main()
