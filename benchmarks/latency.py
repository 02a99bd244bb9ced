"""Latency of a torchvision model unpruned vs APIB-pruned: ONNX Runtime on the CPU, and ONNX Runtime
and PyTorch on CUDA where a GPU is present, batch 1 and 32 (``--batch-sizes``), with the speedup next to the ideal one
(the FLOPs ratio).

    python benchmarks/latency.py [--model resnet50] [--flops-target 0.48] [--round-to 16]
    python benchmarks/latency.py --backends torch-cuda --dtype float16 --channels-last
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

import apib_fx
from apib_fx.bench import benchmark, format_table
from apib_fx.testing import zoo_model

from _results import write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--flops-target", type=float, default=0.48)
    ap.add_argument("--round-to", default="none,16", help="comma list; 'none' keeps exact widths")
    ap.add_argument("--num-calib", type=int, default=32)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--batch-sizes", default="1,32", help="comma list")
    ap.add_argument("--backends", default="ort-cpu,ort-cuda,torch-cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                    help="run the models in this precision (PyTorch backends only)")
    ap.add_argument("--channels-last", action="store_true", help="run the models channels-last (PyTorch backends only)")
    ap.add_argument("--out", default="benchmarks/results/latency.md")
    args = ap.parse_args()
    settings = args.dtype != "float32" or args.channels_last
    if settings and any(b.startswith("ort") for b in args.backends.split(",")):
        ap.error("--dtype and --channels-last apply to the PyTorch backends (torch, torch-cuda); "
                 "pass --backends torch-cuda")
    model = zoo_model(args.model)
    calib = torch.randn(args.num_calib, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    models = {f"{args.model}": model}
    for r in args.round_to.split(","):
        round_to = None if r == "none" else int(r)
        pruned = apib_fx.prune(model, args.flops_target, calib, num_calib=args.num_calib, batch_size=32,
                               round_to=round_to, progress=False)
        name = f"APIB {args.flops_target:.0%}" + (f", widths x{round_to}" if round_to else "")
        models[name] = pruned
        print(name, pruned.apib_report.summary(), flush=True)
    if settings:  # pruned in float32, as a user would; then converted for deployment
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        models = {n: copy.deepcopy(m).to(dtype=getattr(torch, args.dtype), memory_format=fmt)
                  for n, m in models.items()}
    batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    rows = benchmark(models, calib[:1], batch_sizes=batch_sizes, backends=tuple(args.backends.split(",")),
                     warmup=5, iters=args.iters, progress=True)
    table = format_table(rows)
    print(table)
    out = Path(args.out)
    write_results(out, f"{args.model} at {args.size}x{args.size}, random weights, APIB on {args.num_calib} Gaussian "
                   f"calibration images, median of {args.iters} runs, torch {torch.__version__}, {args.dtype}"
                   f"{', channels-last' if args.channels_last else ''}.\n\n{table}\n")


if __name__ == "__main__":
    main()
