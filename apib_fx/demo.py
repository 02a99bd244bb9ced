"""The end-to-end demo on real data that ships with scikit-learn (handwritten digits, no download):
train a CIFAR-style ResNet-20, prune it with APIB, fine-tune, export to ONNX (checked against ONNX
Runtime), benchmark latency, and print one table."""
from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader

from .data import digits
from .flops import count_flops
from .models import CifarResNet
from .prune import prune
from .train import evaluate, fit


@dataclass
class DemoResult:
    acc_unpruned: float
    acc_oneshot: float
    acc_finetuned: float
    flops_before: int
    flops_after: int
    params_before: int
    params_after: int
    flops_reduction: float
    onnx_max_diff: Optional[float]
    latency: list[dict[str, Any]] = field(default_factory=list)
    prune_seconds: float = 0.0
    report: Any = None

    def table(self) -> str:
        lat = {(r["model"], r["batch"]): r for r in self.latency if r.get("status") == "ok"}

        def ms(name: str, batch: int) -> str:
            r = lat.get((name, batch))
            return f"{r['median_ms']:.2f}" if r else "-"

        def speed(batch: int) -> str:
            r = lat.get(("pruned", batch))
            return f"{r['speedup']:.2f}x (ideal {r['ideal_speedup']:.2f}x)" if r else "-"

        rows = [
            "| model | top-1 | MACs | params | ONNX Runtime CPU ms (batch 1 / 32) | speedup b1 / b32 |",
            "|---|---:|---:|---:|---:|---|",
            f"| unpruned | {self.acc_unpruned:.2%} | {self.flops_before:,} | {self.params_before:,} | "
            f"{ms('unpruned', 1)} / {ms('unpruned', 32)} | 1.00x |",
            f"| APIB one-shot (BatchNorm re-estimated) | {self.acc_oneshot:.2%} | {self.flops_after:,} | {self.params_after:,} | | |",
            f"| APIB + fine-tune | {self.acc_finetuned:.2%} | {self.flops_after:,} | {self.params_after:,} | "
            f"{ms('pruned', 1)} / {ms('pruned', 32)} | {speed(1)} / {speed(32)} |",
        ]
        diff = "skipped" if self.onnx_max_diff is None else f"passed (max diff {self.onnx_max_diff:.1e})"
        return "\n".join(rows) + (
            f"\n\nFLOPs removed: {self.flops_reduction:.1%} (pruning took {self.prune_seconds:.1f} s); "
            f"ONNX Runtime parity: {diff}"
        )


def run_demo(
    flops_target: float = 0.48,
    epochs: int = 12,
    finetune_epochs: int = 6,
    seed: int = 0,
    round_to: Optional[int] = 8,
    out_dir: Optional[str | Path] = None,
    bench: bool = True,
    progress: bool = True,
) -> DemoResult:
    """Train, prune, fine-tune, export and benchmark; deterministic under ``seed``. ``round_to``:
    kept widths are multiples of it (ONNX Runtime's CPU kernels work in blocks of 8 channels; odd
    widths can make a pruned model slower than the original)."""
    from .bench import benchmark
    from .export import export_onnx

    torch.manual_seed(seed)
    train_set, test_set = digits("train", seed=seed), digits("test", seed=seed)
    gen = torch.Generator().manual_seed(seed)
    train = DataLoader(train_set, batch_size=64, shuffle=True, generator=gen)
    test = DataLoader(test_set, batch_size=256)
    model = CifarResNet(depth=20, num_classes=10, width=16, in_channels=1)
    fit(model, train, epochs, lr=0.1, progress=progress, desc="train")
    acc0 = evaluate(model, test)

    calib = train_set.tensors[0][:128]
    start = time.perf_counter()
    pruned = prune(model, flops_target, calib, num_calib=128, batch_size=64, round_to=round_to,
                   progress=progress, seed=seed)
    prune_seconds = time.perf_counter() - start
    acc1 = evaluate(pruned, test)
    fit(pruned, train, finetune_epochs, lr=0.02, progress=progress, desc="fine-tune")
    acc2 = evaluate(pruned, test)

    x = calib[:1]
    # Without out_dir the ONNX files are only needed for the benchmark: a temporary folder, removed
    # afterwards (every run would otherwise leave ~2 MB behind).
    with contextlib.ExitStack() as stack:
        if out_dir:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
        else:
            out = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="apib_fx_demo_")))
        onnx_path = export_onnx(pruned, out / "pruned.onnx", x, check=True)
        max_diff = onnx_path.parity["max_diff"] if onnx_path.parity else None
        rows: list[dict[str, Any]] = []
        if bench:
            base_path = export_onnx(model, out / "unpruned.onnx", x, check=False)
            rows = benchmark({"unpruned": base_path, "pruned": onnx_path}, x, batch_sizes=(1, 32),
                             backends=("ort-cpu",), warmup=10, iters=50, progress=progress)
    report = pruned.apib_report
    return DemoResult(
        acc_unpruned=acc0, acc_oneshot=acc1, acc_finetuned=acc2,
        flops_before=count_flops(model, x), flops_after=count_flops(pruned, x),
        params_before=report.params_before, params_after=report.params_after,
        flops_reduction=report.flops_reduction, onnx_max_diff=max_diff, latency=rows,
        prune_seconds=prune_seconds, report=report,
    )
