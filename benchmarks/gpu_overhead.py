"""Where a pruned model's GPU time goes: eager PyTorch vs one CUDA-graph replay (GPU time without
Python's per-kernel launch cost), for torchvision's ResNet-50, the same model as an unpruned
apib_fx GraphModule, and APIB at 48% FLOPs with widths in multiples of 16; float16, channels-last.

    python benchmarks/gpu_overhead.py [--out benchmarks/results/gpu_overhead.md]

Needs a CUDA device. Medians of 20 runs after 5 warm-ups; cuDNN autotuning on.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

import apib_fx
from apib_fx.testing import zoo_model

from _results import emit, write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/gpu_overhead.md")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_overhead.py needs a CUDA device")
    torch.backends.cudnn.benchmark = True
    m = zoo_model("resnet50")
    calib = torch.randn(32, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    graph = apib_fx.trace(m, calib[:1])
    same = apib_fx.apply(m, graph, {})  # a GraphModule with every channel
    x16 = apib_fx.prune(m, 0.48, calib, num_calib=32, batch_size=32, round_to=16, progress=False)
    lines = [f"ResNet-50, {torch.cuda.get_device_name()}, torch {torch.__version__}, float16, channels-last, "
             "median of 20 runs (ms)", "", "| batch | model | eager | CUDA graph |", "|---:|---|---:|---:|"]

    def prep(mod: torch.nn.Module, dt: torch.dtype) -> torch.nn.Module:
        return copy.deepcopy(mod).eval().cuda().to(dtype=dt, memory_format=torch.channels_last)

    dt = torch.float16
    mods = {"torchvision": prep(m, dt), "GraphModule, unpruned": prep(same, dt), "APIB 48% x16": prep(x16, dt)}
    for bs in (32, 256):
        x = torch.randn(bs, 3, 224, 224, device="cuda", dtype=dt).contiguous(memory_format=torch.channels_last)
        for name, mod in mods.items():
            with torch.no_grad():
                for _ in range(5):
                    mod(x)
                torch.cuda.synchronize()
                ts = []
                for _ in range(20):
                    t = time.perf_counter()
                    mod(x)
                    torch.cuda.synchronize()
                    ts.append(time.perf_counter() - t)
                # GPU time alone, without Python launch overhead: one CUDA graph replay
                g, s = torch.cuda.CUDAGraph(), torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for _ in range(3):
                        mod(x)
                torch.cuda.current_stream().wait_stream(s)
                with torch.cuda.graph(g):
                    mod(x)
                g.replay()
                torch.cuda.synchronize()
                gs = []
                for _ in range(20):
                    t = time.perf_counter()
                    g.replay()
                    torch.cuda.synchronize()
                    gs.append(time.perf_counter() - t)
            ts.sort()
            gs.sort()
            row = f"| {bs} | {name} | {ts[10] * 1e3:.2f} | {gs[10] * 1e3:.2f} |"
            emit(lines, row)
    write_results(args.out, lines)


if __name__ == "__main__":
    main()
