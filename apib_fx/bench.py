"""Latency benchmarks: every model x backend x batch size, with the speedup next to the ideal one
(the FLOPs ratio). Unavailable backends are reported as skipped, with the reason."""
from __future__ import annotations

import copy
import json
import os
import pathlib
import platform
import shutil
import statistics
import tempfile
import time
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._atomic import atomic_path, write_text
from .trace import Inputs, as_inputs, eval_mode

BACKENDS = ("torch", "torch-cuda", "ort-cpu", "ort-cuda")
ModelLike = Union[nn.Module, str, pathlib.Path]


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def onnx_macs(path: Union[str, pathlib.Path], input_shape: Sequence[int]) -> int:
    """MACs of an ONNX model's Conv, Gemm and MatMul nodes at ``input_shape`` (batch included),
    from the ONNX graph alone (an independent counter)."""
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(path))
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    real_inputs = [i for i in graph.input if i.name not in inits]
    for dim, value in zip(real_inputs[0].type.tensor_type.shape.dim, input_shape):
        dim.ClearField("dim_param")
        dim.dim_value = int(value)
    model = shape_inference.infer_shapes(model, data_prop=True)
    shapes: dict[str, list[int]] = {i.name: list(i.dims) for i in model.graph.initializer}
    for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        dims = [d.dim_value for d in v.type.tensor_type.shape.dim]
        if dims and all(d > 0 for d in dims):
            shapes[v.name] = dims
    macs, unresolved = 0, 0
    for node in model.graph.node:
        out = shapes.get(node.output[0])
        if out is None:
            unresolved += node.op_type in ("Conv", "Gemm", "MatMul")
            continue
        if node.op_type == "Conv":
            w = shapes[node.input[1]]
            macs += int(np.prod(out)) * int(np.prod(w[1:]))
        elif node.op_type == "Gemm":
            a = shapes[node.input[0]]
            trans_a = any(at.name == "transA" and at.i for at in node.attribute)
            k = a[0] if trans_a else a[1]
            macs += int(np.prod(out)) * k
        elif node.op_type == "MatMul":
            a = shapes.get(node.input[0])
            if a:
                macs += int(np.prod(out)) * a[-1]
    if unresolved:
        import warnings

        warnings.warn(f"onnx_macs: ONNX shape inference left {unresolved} Conv/Gemm/MatMul outputs of "
                      f"{pathlib.Path(path).name} unresolved (shapes computed at run time); their MACs are not counted")
    return macs


def _timed(fn: Any, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000.0)
    return out


def _on(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` if it is on ``device``, else a copy there (the caller's module stays where it is)."""
    here = next((t.device for t in module.parameters()), None) or next((t.device for t in module.buffers()), device)
    return module if here.type == device.type else copy.deepcopy(module).to(device)


def _input_for(module: nn.Module, x: Tensor, device: Optional[torch.device] = None) -> Tensor:
    """``x`` as ``module`` takes it: on ``device`` (default: the module's), in its floating
    dtype (a half-precision model gets half inputs), channels-last if its convolutions are."""
    params = list(module.parameters())
    first = next((t for t in params if t.is_floating_point()), None)
    x = x.to(device or (first.device if first is not None else x.device))
    if first is not None and x.is_floating_point():
        x = x.to(first.dtype)
    if x.dim() == 4 and any(t.dim() == 4 and not t.is_contiguous()
                            and t.is_contiguous(memory_format=torch.channels_last) for t in params):
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _ort_session(path: str, provider: str, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    s = ort.InferenceSession(path, opts, providers=[provider])
    if provider not in s.get_providers():  # ORT falls back to the CPU silently
        raise RuntimeError(f"{provider} did not load (session runs on {s.get_providers()})")
    return s


def benchmark(
    models: Mapping[str, ModelLike],
    example_inputs: Inputs,
    *,
    batch_sizes: Sequence[int] = (1, 32),
    backends: Sequence[str] = BACKENDS,
    warmup: int = 5,
    iters: int = 20,
    threads: Optional[int] = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Latency of every model x backend x batch size (ms: median, p90), throughput (images/s),
    MACs and parameters per image, speedup over the first model, the ideal speedup (its FLOPs
    ratio) and efficiency = speedup / ideal. ``models`` maps names to modules or ONNX files."""
    from .export import export_onnx
    from .flops import count_flops

    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend(s) {unknown}; expected some of {BACKENDS}")
    if not models:
        raise ValueError("models is empty: pass {name: module or ONNX path}")
    x = as_inputs(example_inputs)[0][:1]
    threads = threads or max(1, min(os.cpu_count() or 1, 16))
    # ONNX files exist only while they are timed: removed on the way out, also after an error.
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="apib_fx_bench_"))
    old_threads = torch.get_num_threads()
    try:
        info: dict[str, dict[str, Any]] = {}
        for name, m in models.items():
            if isinstance(m, nn.Module):
                onnx_path = None
                if any(b.startswith("ort") for b in backends):
                    onnx_path = str(export_onnx(m, tmp / f"{len(info)}.onnx", x, check=False))
                info[name] = {"module": m, "onnx": onnx_path, "flops": count_flops(m, _input_for(m, x)),
                              "params": sum(p.numel() for p in m.parameters())}
            else:
                p = pathlib.Path(m)
                if not p.is_file():
                    raise FileNotFoundError(f"model {name!r}: no ONNX file at {str(p)!r}")
                import onnx

                params = sum(int(np.prod(i.dims)) for i in onnx.load(str(p)).graph.initializer)
                info[name] = {"module": None, "onnx": str(p), "flops": onnx_macs(p, x.shape), "params": params}

        import onnxruntime as ort

        providers = ort.get_available_providers()
        rows: list[dict[str, Any]] = []
        jobs = [(n, b, bs) for b in backends for bs in batch_sizes for n in models]
        bar = tqdm(jobs, desc="benchmark", unit="run", disable=not progress)
        for name, backend, bs in bar:
            meta = info[name]
            row: dict[str, Any] = {"model": name, "backend": backend, "batch": bs, "threads": threads,
                                   "flops": meta["flops"], "params": meta["params"], "status": "ok", "reason": ""}
            xb = x.expand(bs, *x.shape[1:]).contiguous()
            try:
                if backend == "torch":
                    if meta["module"] is None:
                        raise LookupError("an ONNX file has no PyTorch module to run")
                    row["device"] = f"cpu: {cpu_name()}"
                    torch.set_num_threads(threads)
                    module = _on(meta["module"], torch.device("cpu"))
                    xc = _input_for(module, xb)
                    with eval_mode(module), torch.no_grad():
                        times = _timed(lambda: module(xc), warmup, iters)
                elif backend == "torch-cuda":
                    if meta["module"] is None:
                        raise LookupError("an ONNX file has no PyTorch module to run")
                    if not torch.cuda.is_available():
                        raise LookupError("no CUDA device on this machine")
                    row["device"] = f"cuda: {torch.cuda.get_device_name()}"
                    module = _on(meta["module"], torch.device("cuda"))
                    xg = _input_for(module, xb)

                    def step() -> None:
                        module(xg)
                        torch.cuda.synchronize()  # kernels run asynchronously: time them, not their launch

                    # cuDNN picks its fastest algorithm per shape during the warm-up, as a deployment would.
                    with eval_mode(module), torch.no_grad(), torch.backends.cudnn.flags(enabled=True, benchmark=True):
                        times = _timed(step, max(warmup, 3), iters)
                    del module, xg
                else:
                    provider = "CPUExecutionProvider" if backend == "ort-cpu" else "CUDAExecutionProvider"
                    if provider not in providers:
                        raise LookupError(f"onnxruntime has no {provider} here (available: {', '.join(providers)})")
                    if backend == "ort-cuda" and not torch.cuda.is_available():
                        raise LookupError("no CUDA device on this machine")
                    session = _ort_session(meta["onnx"], provider, threads)
                    row["device"] = (f"cuda: {torch.cuda.get_device_name()}" if backend == "ort-cuda"
                                     else f"cpu: {cpu_name()}")
                    feed = {session.get_inputs()[0].name: xb.numpy()}
                    times = _timed(lambda: session.run(None, feed), warmup, iters)
                row["median_ms"] = statistics.median(times)
                row["p90_ms"] = float(np.percentile(times, 90))
                row["throughput"] = bs / (row["median_ms"] / 1000.0)
            except Exception as e:  # an unavailable backend is a skipped row, never a silent gap
                row.update(status="skipped", reason=str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
                row.setdefault("device", "-")
            rows.append(row)
    finally:
        torch.set_num_threads(old_threads)
        shutil.rmtree(tmp, ignore_errors=True)
    first = next(iter(models))
    for row in rows:
        base = next(r for r in rows if r["model"] == first and r["backend"] == row["backend"] and r["batch"] == row["batch"])
        row["ideal_speedup"] = info[first]["flops"] / row["flops"] if row["flops"] else float("nan")
        if row["status"] == "ok" and base["status"] == "ok":
            row["speedup"] = base["median_ms"] / row["median_ms"]
            row["efficiency"] = row["speedup"] / row["ideal_speedup"]
    return rows


COLUMNS = [("model", "model"), ("backend", "backend"), ("device", "device"), ("batch", "batch"),
           ("threads", "threads"), ("median_ms", "median ms"), ("p90_ms", "p90 ms"),
           ("throughput", "img/s"), ("flops", "MACs/img"), ("params", "params"), ("speedup", "speedup"),
           ("ideal_speedup", "ideal"), ("efficiency", "efficiency"), ("status", "status")]


def _cell(row: dict[str, Any], key: str) -> str:
    v = row.get(key)
    if v is None:
        return "-"
    if key == "status" and v != "ok":
        return f"skipped: {row.get('reason', '')}"
    if isinstance(v, float):
        return f"{v:,.2f}" if key in ("median_ms", "p90_ms", "throughput", "speedup", "ideal_speedup", "efficiency") else f"{v:.3g}"
    if isinstance(v, int) and key in ("flops", "params"):
        return f"{v:,}"
    return str(v)


def format_table(rows: Sequence[dict[str, Any]], fmt: str = "markdown") -> str:
    """The rows as a Markdown (``fmt="markdown"``) or aligned plain-text table."""
    head = [h for _, h in COLUMNS]
    body = [[_cell(r, k) for k, _ in COLUMNS] for r in rows]
    if fmt == "markdown":
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in [head] + body)


def save_results(rows: Sequence[dict[str, Any]], path: Union[str, pathlib.Path]) -> pathlib.Path:
    """Write rows as JSON (``.json``) or a Markdown table (anything else), atomically."""
    p = pathlib.Path(path)
    text = json.dumps(list(rows), indent=2) if p.suffix == ".json" else format_table(rows) + "\n"
    return write_text(p, text)


def plot_latency(rows: Sequence[dict[str, Any]], path: Union[str, pathlib.Path]) -> pathlib.Path:
    """Bar chart of median latency per (backend, batch), one bar per model; skipped runs left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    keys = sorted({(r["backend"], r["batch"]) for r in ok})
    names = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(3.2 * max(1, len(keys)), 3.4), squeeze=False)
    for ax, (backend, batch) in zip(axes[0], keys):
        vals = [next((r["median_ms"] for r in ok if r["model"] == n and r["backend"] == backend and r["batch"] == batch), 0.0) for n in names]
        ax.bar(range(len(names)), vals, color=["#9aa9bd", "#2f6db5", "#d9822b", "#3c9d5d"][: len(names)] * 4)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{backend}, batch {batch}", fontsize=9)
        ax.set_ylabel("median ms")
    fig.tight_layout()
    p = pathlib.Path(path)
    try:
        with atomic_path(p) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return p
