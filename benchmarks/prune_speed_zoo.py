"""APIB's time to prune across model families, next to a plain forward over the same images.

    python benchmarks/prune_speed_zoo.py [--models resnet50,convnext_tiny,...] [--num-calib 64]

For each model: the plain forward over the calibration images (with the allocator settings prune
uses for its own calibration forward, apib_fx/_malloc.py, so the two forwards compare), then one
APIB prune to ``--target`` (no BatchNorm re-estimation: it is one more forward, for every method)
with its split, and L1 (the data-free baseline, same search) for scale. What APIB adds to its
forward depends on the shapes: the B×B kernel products cost about B·(C_in + C_out) per feature
position against a layer's C_in·C_out·k², so thin layers (EfficientNet's early stages) pay more
than their forward, and a group's Lasso path grows with its width (ConvNeXt's and ViT's
3072-wide MLPs). Weights are random (nothing is downloaded), so only times are meaningful.
"""
from __future__ import annotations

import argparse
import time

import torch

import apib_fx
from apib_fx._malloc import keep_freed_memory
from apib_fx.bench import cpu_name
from apib_fx.testing import zoo_model

from _results import emit, write_results

MODELS = ["resnet50", "vgg16_bn", "densenet121", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_1_6gf",
          "convnext_tiny", "vit_b_16"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--num-calib", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--target", type=float, default=0.48)
    ap.add_argument("--out", default="benchmarks/results/prune_speed_zoo.md")
    args = ap.parse_args()
    data = torch.randn(args.num_calib, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    lines = [f"{args.num_calib} calibration images at {args.size}x{args.size}, kernel batch {args.batch_size}, "
             f"flops_target {args.target}, CPU {cpu_name()} ({torch.get_num_threads()} threads), torch "
             f"{torch.__version__}; seconds; APIB without BatchNorm re-estimation",
             "",
             "| model | forward | APIB total | calibration forward | kernels+Gram | lasso | trace+search+rewrite "
             "| APIB / forward | (APIB − its forward) / forward | L1 total |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for name in args.models.split(","):
        model = zoo_model(name)
        with torch.no_grad(), keep_freed_memory(True):
            model(data[:2])
            passes = []
            for _ in range(3):
                t = time.perf_counter()
                for b in data.split(args.batch_size):
                    model(b)
                passes.append(time.perf_counter() - t)
        forward = sorted(passes)[1]
        apib_fx.prune(model, args.target, data[:8], batch_size=4, progress=False, recalibrate=False)  # warm-up
        t = time.perf_counter()
        pruned = apib_fx.prune(model, args.target, data, batch_size=args.batch_size, progress=False,
                               recalibrate=False)
        total = time.perf_counter() - t
        tm = pruned.apib_report.timings
        rest = tm["trace"] + tm["search"] + tm["rewrite"]
        t = time.perf_counter()
        apib_fx.prune(model, args.target, data, method="l1", progress=False, recalibrate=False)
        l1 = time.perf_counter() - t
        emit(lines, f"| {name} | {forward:.2f} | {total:.2f} | {tm['forward']:.2f} | {tm['kernels']:.2f} "
                    f"| {tm['lasso']:.2f} | {rest:.2f} | {total / forward:.2f} "
                    f"| {(total - tm['forward']) / forward:.2f} | {l1:.2f} |")
    write_results(args.out, lines)


if __name__ == "__main__":
    main()
