"""Time to build the channel-dependency graph: apib_fx.trace vs Torch-Pruning's
DependencyGraph().build_dependency, same models, same inputs, same run.

    python benchmarks/trace_speed.py [--size 224] [--small 32] [--repeat 9]

Each is warmed up once per model, then they run in turn ``--repeat`` times (so a noisy machine
slows all alike); the median of each is reported. Torch-Pruning runs one real forward pass, which
a machine with more cores (or a GPU) makes cheaper, while apib_fx's trace computes no activation
(its cost is the same at any input size). So Torch-Pruning is also timed at ``--small`` x
``--small`` (the same graph; its forward then costs next to nothing): the speedup against that
is what remains on a machine where the forward is free.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time
import warnings
from pathlib import Path

import torch

import apib_fx
from apib_fx.testing import zoo_model

from _results import emit, write_results

MODELS = ["resnet18", "resnet50", "resnext50_32x4d", "vgg16_bn", "densenet121", "googlenet",
          "inception_v3", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf",
          "shufflenet_v2_x1_0", "convnext_tiny"]


def timed(fns: list, repeat: int, collect: bool = True) -> list[float | Exception]:
    """Median times of ``fns``, run in turn ``repeat`` times after one warm-up each; an exception
    a function raises in its warm-up is returned in place of its time (and it is not run again).
    With ``collect``, garbage is collected before each timed call, untimed: both builders leave
    graphs full of reference cycles, and otherwise whichever call the collector lands in pays for
    freeing what the call before it left."""
    results: list[float | Exception] = []
    for fn in fns:
        try:
            fn()
            results.append(0.0)
        except Exception as e:  # report, never hide
            results.append(e)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for fn, r, ts in zip(fns, results, times):
            if isinstance(r, Exception):
                continue
            if collect:
                gc.collect()
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return [r if isinstance(r, Exception) else statistics.median(ts) for r, ts in zip(results, times)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--small", type=int, default=32, help="Torch-Pruning's second input size (Inception-v3: at least 75)")
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--no-collect", action="store_true",
                    help="leave garbage collection where it falls (by default each timed call starts collected)")
    ap.add_argument("--out", default="benchmarks/results/trace_speed.md")
    args = ap.parse_args()
    import torch_pruning as tp
    # (it warns about ConvNeXt's layer scales on every build)
    warnings.filterwarnings("ignore", message="Unwrapped parameters detected")

    small = args.small
    rows = [f"| model | apib_fx.trace (s) | Torch-Pruning build_dependency (s) | speedup | TP at {small}x{small} (s) "
            f"| speedup vs TP at {small}x{small} | apib_fx groups | TP groups "
            "| apib_fx phases (ms): fx / shapes / labels / groups |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    print(f"torch threads: {torch.get_num_threads()}, input 1x3x{args.size}x{args.size}, torch-pruning {tp.__version__}")
    print(rows[0]); print(rows[1])
    for name in args.models.split(","):
        model = zoo_model(name)
        size = 299 if name == "inception_v3" and args.size < 299 else args.size
        x = torch.randn(1, 3, size, size)
        side = max(small, 75) if name == "inception_v3" else small  # (Inception-v3's smallest input)
        x_small = torch.randn(1, 3, side, side)

        def build(inputs=x):
            return tp.DependencyGraph().build_dependency(model, example_inputs=inputs)

        phases = []  # ChannelGraph.timings of every timed trace

        def trace():
            phases.append(apib_fx.trace(model, x).timings)

        ours, theirs, theirs_small = timed([trace, build, lambda: build(x_small)], args.repeat, not args.no_collect)
        split = " / ".join(f"{1e3 * statistics.median(p[k] for p in phases[-args.repeat:]):.1f}" for k in phases[0])
        n_ours = len(apib_fx.trace(model, x).prunable_groups)
        cells = []
        for t in (theirs, theirs_small):
            cells += [f"error: {type(t).__name__}", "-"] if isinstance(t, Exception) else [f"{t:.3f}", f"{t / ours:.2f}x"]
        n_theirs = "-"
        if not isinstance(theirs, Exception):
            ignored = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 1000]
            n_theirs = len(list(build().get_all_groups(ignored_layers=ignored)))
            if not isinstance(theirs_small, Exception):  # the same graph at either size
                n_small = len(list(build(x_small).get_all_groups(ignored_layers=ignored)))
                n_theirs = n_theirs if n_small == n_theirs else f"{n_theirs} ({n_small} at {side}x{side})"
        row = f"| {name} | {ours:.3f} | {' | '.join(cells)} | {n_ours} | {n_theirs} | {split} |"
        emit(rows, row)
    out = Path(args.out)
    write_results(out, f"Input 1x3x{args.size}x{args.size} (inception_v3 299; Torch-Pruning also at "
                   f"{small}x{small}, inception_v3 {max(small, 75)}), median of {args.repeat} "
                   "alternating runs, "
                   f"{torch.get_num_threads()} threads, CPU.\n\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
