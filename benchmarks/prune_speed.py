"""Time to prune ResNet-50 (224x224, 64 calibration images) to a FLOPs target.

    python benchmarks/prune_speed.py [--targets 0.48,0.76] [--num-calib 64] [--device cpu]

Prints, in one run: APIB's total time and its split (trace, calibration forward, kernels + Gram,
Lasso paths, search, rewrite, and the BatchNorm re-estimation ``prune`` does by default: one more
forward over the images, for every method), the time of one plain forward pass over the same images (the floor
for any data-driven criterion; timed before and after the methods and pooled), both as a user runs it and with the allocator settings prune uses
for its calibration forwards (apib_fx/_malloc.py: freed memory kept for reuse), and l1, fpgm and Torch-Pruning's MagnitudeImportance pruner at
the same FLOPs targets. Weights are random (nothing is downloaded), so only times are meaningful.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import torch

import apib_fx
from apib_fx import _malloc
from apib_fx._malloc import keep_freed_memory
from apib_fx.bench import cpu_name
from apib_fx.testing import zoo_model

from _peers import tp_magnitude
from _results import emit, write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--num-calib", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--targets", default="0.48,0.76")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-tp", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/prune_speed.md")
    args = ap.parse_args()
    dev = torch.device(args.device)
    model = zoo_model(args.model).to(dev)
    data = torch.randn(args.num_calib, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)).to(dev)
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU {cpu_name()} ({torch.get_num_threads()} threads)"

    def plain_forward(keep: bool) -> list[float]:
        """3 plain forwards over the calibration images (after a warm-up), in seconds."""
        passes = []
        with torch.no_grad(), keep_freed_memory(keep):
            model(data[:2])
            for _ in range(4):
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                for b in data.split(args.batch_size):
                    model(b)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                passes.append(time.perf_counter() - t)
        return passes[1:]  # the first pass inside the scope still faults its heap in

    def secs(v: float) -> str:
        return f"{v:.3f}" if v < 0.1 else f"{v:.2f}"  # a GPU forward takes milliseconds

    kept_on = dev.type == "cpu" and _malloc.enabled()

    def baselines() -> tuple[list[float], list[float]]:
        passes = plain_forward(False)
        return passes, (plain_forward(True) if kept_on else passes)

    # The forwards are timed before and after the methods and pooled: this machine's speed drifts
    # over minutes, and one side of the ratio measured at another time than the other moved the
    # ratios by a third between runs.
    before = baselines()
    print("plain forwards before the methods, as a user runs them / same allocator (s):",
          [secs(p) for p in before[0]], [secs(p) for p in before[1]], flush=True)
    # One untimed run first: lazy initialisation (CUDA context, cuBLAS/cuDNN handles, the first
    # oneDNN primitives) is paid once per process, not per prune.
    apib_fx.prune(model, float(args.targets.split(",")[0]), data, num_calib=args.num_calib,
                  batch_size=args.batch_size, progress=False)
    measured = []
    for target in [float(t) for t in args.targets.split(",")]:
        for method in ("apib", "l1", "fpgm"):
            t = time.perf_counter()
            pruned = apib_fx.prune(model, target, data, method=method, num_calib=args.num_calib,
                                   batch_size=args.batch_size, progress=False)
            measured.append((target, method, pruned.apib_report, time.perf_counter() - t))
            print(f"{target} {method}: {measured[-1][-1]:.2f} s", flush=True)
        if not args.skip_tp:
            try:
                _, achieved, once, total = tp_magnitude(model, data[:1], target)
                measured.append((target, f"Torch-Pruning magnitude (one prune; {total:.1f} s with the ratio "
                                 f"bisection)", achieved, once))
            except Exception as e:
                measured.append((target, "Torch-Pruning magnitude", e, None))
    after = baselines()
    passes, passes_kept = before[0] + after[0], before[1] + after[1]
    forward, forward_kept = float(np.median(passes)), float(np.median(passes_kept))

    lines = [f"{args.model} {args.size}x{args.size}, {args.num_calib} calibration images, batch "
             f"{args.batch_size}, device {device_name}, torch {torch.__version__}",
             f"plain forward over the calibration images, as a user runs it: {secs(forward)} s (median of 6, "
             f"3 before the methods and 3 after: {', '.join(secs(p) for p in passes)})",
             f"the same with freed memory kept for reuse, as prune runs its calibration forwards "
             f"(apib_fx/_malloc.py{'' if kept_on else ': not in effect here'}): {secs(forward_kept)} s "
             f"(median of 6: {', '.join(secs(p) for p in passes_kept)})",
             "ratios: everything but the BN re-estimation over the plain forward (the 1.5x aim), over the "
             "forward with the same allocator settings, and the cost added to the calibration forward "
             "over that forward (0.5 at the aim; independent of how fast the forward ran)", ""]
    head = ("| target | method | achieved | total s | trace | forward | kernels+Gram | lasso | search | rewrite "
            "| BN re-estimation | (total − BN) / forward | (total − BN) / forward, same allocator "
            "| (total − BN − forward) / forward, same allocator |")
    lines += [head, "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for target, method, r, total in measured:
        if isinstance(r, Exception):
            row = f"| {target:.2f} | {method} | error: {type(r).__name__}: {r} |"
        elif isinstance(r, float):  # Torch-Pruning: the reduction it achieved; one prune, nothing split
            row = (f"| {target:.2f} | {method} | {r:.3f} | {total:.2f} | - | - | - | - | - | - | - "
                   f"| {total / forward:.2f} | {total / forward_kept:.2f} | {total / forward_kept:.2f} |")
        else:
            tm = r.timings
            cells = [secs(tm[k]) if k in tm else "-"
                     for k in ("trace", "forward", "kernels", "lasso", "search", "rewrite", "recalibrate")]
            own = total - tm.get("recalibrate", 0.0)
            row = (f"| {target:.2f} | {method} | {r.flops_reduction:.3f} | {total:.2f} | " + " | ".join(cells)
                   + f" | {own / forward:.2f} | {own / forward_kept:.2f} "
                   f"| {(own - tm.get('forward', 0.0)) / forward_kept:.2f} |")
        emit(lines, row)
    write_results(args.out, lines)


if __name__ == "__main__":
    main()
