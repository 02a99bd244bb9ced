"""The ``apib-fx`` command line: prune, export, bench, demo."""
from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .trace import HEADS

EPILOG = """examples:
  apib-fx demo                                    # the whole story on scikit-learn's digits
  apib-fx prune --model torchvision:resnet50 --flops-target 0.48 --calib synthetic --out runs/r50
  apib-fx prune --model cifar:resnet56 --calib cifar100:~/data/cifar-100-python --out runs/r56
  apib-fx prune --model torchvision:resnet50 --weights resnet50.pth --calib imagefolder:~/data/imagenet --out runs/r50
  apib-fx inspect --model torchvision:vit_b_16 --only-fixed
  apib-fx finetune --model runs/r56/model.apibfx --data cifar100:~/data/cifar-100-python --out runs/r56/ft.apibfx
  apib-fx export --model runs/r50/model.apibfx --out runs/r50/model.onnx
  apib-fx bench --model torchvision:resnet50 --model runs/r50/model.apibfx --batch-sizes 1,32
"""


WEIGHTS_HELP = ("trained weights for a torchvision:, timm: or cifar: model: a state_dict file "
                "(torch.save(model.state_dict(), path)) or a checkpoint dict holding one; read with weights_only")


class CliError(Exception):
    """A user mistake: printed as one line, exit status 2."""


def load_model(spec: str, num_classes: Optional[int] = None, weights: Optional[str] = None,
               input_shape: Optional[str] = None) -> tuple[nn.Module, tuple[int, ...], str, dict]:
    """``torchvision:NAME`` or ``timm:NAME`` (random weights), ``cifar:resnet20|resnet56|resnet110|vgg16``,
    or a file written by ``apib_fx.save`` / ``apib-fx prune``; ``weights``: a state_dict file for a
    built-in model (``--weights``); ``input_shape``: ``--input-shape``, which overrides the model's
    own. Returns (model, input shape CxHxW, label, the file's meta)."""
    model, shape, label, meta = _built_or_saved(spec, num_classes)
    shape = _shape(input_shape) or shape
    if not shape:
        raise CliError(f"{spec} does not record its input shape; pass --input-shape C,H,W")
    if weights is None:
        return model, shape, label, meta
    from .serialize import WeightsMismatchError, load_weights

    if not spec.startswith(("torchvision:", "timm:", "cifar:")):
        raise CliError("--weights is for torchvision:, timm: and cifar: models; a saved model file holds its "
                       "own weights")
    try:
        load_weights(model, weights)
    except WeightsMismatchError as e:
        if e.num_outputs is not None:  # the flag that builds the model with that many classes
            raise CliError(f"the weights in {e.path!r} do not fit {spec}: {e.problems}; trained for "
                           f"{e.num_outputs} classes? pass --num-classes {e.num_outputs}") from None
        raise
    return model, shape, label, meta


def _built_or_saved(spec: str, num_classes: Optional[int]) -> tuple[nn.Module, tuple[int, ...], str, dict]:
    from .models import CifarResNet, CifarVGG
    from .testing import fill_zero_weights, zoo_input_size, zoo_model

    kind, sep, name = spec.partition(":")
    if sep and kind == "torchvision":
        try:
            model = zoo_model(name, num_classes=num_classes or 1000)
        except ValueError as e:
            raise CliError(str(e)) from None
        size = zoo_input_size(name, small=False)
        return model, (3, size, size), name, {}
    if sep and kind == "timm":
        try:
            import timm
        except ImportError:
            raise CliError("timm: models need the timm package (pip install timm)") from None
        if not timm.is_model(name):
            raise CliError(f"unknown timm model {name!r}; timm.list_models('*pattern*') lists them")
        torch.manual_seed(0)  # (random weights, as for torchvision:)
        model = timm.create_model(name, pretrained=False, **({"num_classes": num_classes} if num_classes else {}))
        return fill_zero_weights(model.eval()), tuple(model.pretrained_cfg.get("input_size", (3, 224, 224))), name, {}
    if sep and kind == "cifar":
        classes = num_classes or 10
        if name.startswith("resnet") and name[6:].isdigit():
            try:
                return CifarResNet(int(name[6:]), classes).eval(), (3, 32, 32), name, {}
            except ValueError as e:
                raise CliError(str(e)) from None
        if name == "vgg16":
            return CifarVGG(classes).eval(), (3, 32, 32), name, {}
        raise CliError(f"unknown cifar model {name!r}; expected resnet20/32/44/56/110 or vgg16")
    path = Path(spec).expanduser()
    if not path.exists():
        raise CliError(f"model {spec!r} is neither torchvision:NAME, timm:NAME, cifar:NAME nor an existing file")
    from .serialize import load

    model, meta = load(path, with_meta=True)
    return model, tuple((meta or {}).get("input_shape") or ()), path.stem, meta or {}


def _shape(text: Optional[str]) -> Optional[tuple[int, ...]]:
    if not text:
        return None
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise CliError(f"--input-shape must look like 3,224,224, got {text!r}") from None


def cmd_prune(args: argparse.Namespace) -> int:
    from . import export_onnx, prune, save
    from .data import calibration_tensor, model_normalization
    from .report import write_reports

    if not 0 < args.flops_target < 1:
        raise CliError(f"--flops-target is the fraction of FLOPs to remove, in (0, 1); got {args.flops_target}")
    model, shape, label, _ = load_model(args.model, args.num_classes, args.weights, args.input_shape)
    calib = calibration_tensor(args.calib, args.num_calib, shape, seed=args.seed,
                               normalization=model_normalization(model))
    example = torch.zeros(1, *shape)
    if calib is not None and tuple(calib.shape[1:]) != shape:
        raise CliError(f"--calib gives inputs of shape {tuple(calib.shape[1:])}, the model expects {shape}")
    pruned = prune(
        model, args.flops_target, calib, example_inputs=example, method=args.method,
        kernel=args.kernel, min_channels=args.min_channels, num_calib=args.num_calib,
        batch_size=args.batch_size, round_to=args.round_to, tolerance=args.tolerance,
        progress=not args.quiet, seed=args.seed,
        workers=args.workers, device=args.device, heads=args.heads,
    )
    report = pruned.apib_report
    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    model_path = save(pruned, out / "model.apibfx", meta={"input_shape": list(shape), "source": args.model,
                                                            "report": report.to_dict()})
    extra = {"model": args.model, "calib": args.calib, "pruned_model": str(model_path)}
    if not args.no_onnx:
        onnx_path = export_onnx(pruned, out / "model.onnx", example, check=True)
        extra["onnx"] = str(onnx_path)
        if onnx_path.parity:
            extra["onnx_max_diff"] = onnx_path.parity["max_diff"]
    paths = write_reports(report, out, extra)
    print(report.summary())
    print(f"wrote {model_path}, " + (f"{extra['onnx']}, " if "onnx" in extra else "")
          + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from . import export_onnx

    model, shape, _, _ = load_model(args.model, args.num_classes, args.weights, args.input_shape)
    path = export_onnx(model, Path(args.out).expanduser(), torch.randn(1, *shape), opset=args.opset,
                       check=not args.no_check)
    print(f"wrote {path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import benchmark, format_table, plot_latency, save_results

    models, shape = {}, None
    for spec in args.model:
        if spec.endswith(".onnx"):
            if not Path(spec).exists():
                raise CliError(f"ONNX file {spec!r} does not exist")
            models[Path(spec).stem] = spec
            continue
        m, s, label, _ = load_model(spec, input_shape=args.input_shape)
        shape = shape or s
        models[label if label not in models else spec] = m
    shape = _shape(args.input_shape) or shape
    if shape is None:
        raise CliError("only ONNX files given: pass --input-shape C,H,W")
    batches = tuple(int(b) for b in args.batch_sizes.split(","))
    rows = benchmark(models, torch.randn(1, *shape), batch_sizes=batches, backends=tuple(args.backends.split(",")),
                     warmup=args.warmup, iters=args.iters, threads=args.threads, progress=not args.quiet)
    print(format_table(rows))
    for path in args.save or []:
        save_results(rows, path)
        print(f"wrote {path}")
    if args.plot:
        plot_latency(rows, args.plot)
        print(f"wrote {args.plot}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .trace import trace

    model, shape, label, _ = load_model(args.model, args.num_classes, None, args.input_shape)
    graph = trace(model, torch.zeros(1, *shape), heads=args.heads)
    fixed = len(graph.groups) - len(graph.prunable_groups)
    print(f"{label} at 1x{'x'.join(map(str, shape))}: {len(graph.groups)} channel groups, "
          f"{len(graph.prunable_groups)} prunable, {fixed} fixed; {graph.flops():,} MACs")
    print(graph.table(only_fixed=args.only_fixed))
    if graph.specialized:
        print("\nbranches on the input's shape, followed as this input takes them (a pruned model checks them):")
        print("\n".join(f"- {s}" for s in graph.specialized))
    return 0


def _classes(dataset: Any) -> int:
    """How many classes a labelled dataset's labels span."""
    if hasattr(dataset, "classes"):  # ImageFolder
        return len(dataset.classes)
    labels = getattr(dataset, "y", None)
    if labels is None:
        labels = dataset.tensors[1]
    return int(labels.max()) + 1


def _teacher(args: argparse.Namespace, x: torch.Tensor, outputs: int) -> Optional[nn.Module]:
    """``--teacher`` (with ``--teacher-weights``) on ``x``'s device, in eval mode; None without one.
    It must give as many outputs as the model it teaches."""
    if not args.teacher:
        if args.teacher_weights:
            raise CliError("--teacher-weights needs --teacher (the architecture they are for)")
        return None
    teacher, _, _, _ = load_model(args.teacher, args.num_classes, args.teacher_weights,
                                  ",".join(map(str, x.shape[1:])))
    teacher = teacher.to(x.device).eval()
    with torch.no_grad():
        taught = teacher(x).shape[-1]
    if taught != outputs:
        raise CliError(f"the teacher has {taught} outputs, the model {outputs}; pass the teacher's "
                       "--num-classes or --teacher-weights")
    return teacher


def cmd_finetune(args: argparse.Namespace) -> int:
    import time

    from torch.utils.data import DataLoader

    from . import save
    from .data import model_normalization, training_data
    from .train import evaluate, fit

    if args.epochs < 1:
        raise CliError(f"--epochs must be at least 1, got {args.epochs}")
    if not 0 <= args.distill <= 1 or not args.temperature > 0:
        raise CliError(f"--distill must be in [0, 1] and --temperature positive, got {args.distill} and "
                       f"{args.temperature}")
    if not args.lr > 0:
        raise CliError(f"--lr must be positive, got {args.lr}")
    model, shape, label, meta = load_model(args.model, args.num_classes, args.weights, args.input_shape)
    train_set, val_set = training_data(args.data, shape, seed=args.seed, normalization=model_normalization(model))
    x0, _ = train_set[0]
    if tuple(x0.shape) != shape:
        raise CliError(f"--data {args.data} gives inputs of shape {tuple(x0.shape)}, the model takes {shape}")
    try:
        device = torch.device(args.device or "cpu")
        model = model.to(device)
    except (RuntimeError, AssertionError) as e:
        raise CliError(f"--device {args.device!r} is not usable here: {str(e).splitlines()[0]}") from None
    with torch.no_grad():
        outputs = model.eval()(x0.unsqueeze(0).to(device)).shape[-1]
    classes = _classes(train_set)
    if outputs < classes:
        raise CliError(f"the model has {outputs} outputs, --data {args.data} has {classes} classes")
    teacher = _teacher(args, x0.unsqueeze(0).to(device), outputs)
    torch.manual_seed(args.seed)
    # (a last batch of a few samples would give BatchNorm statistics of a few samples: dropped)
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, num_workers=args.data_workers,
                        generator=torch.Generator().manual_seed(args.seed), drop_last=len(train_set) > args.batch_size)
    held_out = DataLoader(val_set, batch_size=args.batch_size, num_workers=args.data_workers)
    before = evaluate(model, held_out, progress=not args.quiet, desc="top-1 before")
    start = time.perf_counter()
    fit(model, loader, args.epochs, lr=args.lr, weight_decay=args.weight_decay, progress=not args.quiet,
        desc="fine-tune", teacher=teacher, distill=args.distill, temperature=args.temperature)
    seconds = time.perf_counter() - start
    after = evaluate(model, held_out, progress=not args.quiet, desc="top-1 after")
    record = {"data": args.data, "epochs": args.epochs, "lr": args.lr, "weight_decay": args.weight_decay,
              "batch_size": args.batch_size, "top1_before": before, "top1_after": after, "seconds": seconds}
    if teacher is not None:
        record.update(teacher=args.teacher, distill=args.distill, temperature=args.temperature)
    out = save(model.cpu(), Path(args.out).expanduser(),
               meta={**meta, "input_shape": list(shape), "source": meta.get("source", args.model),
                     "finetune": [*meta.get("finetune", []), record]})
    print(f"| {label} | top-1 on the held-out split |\n|---|---:|\n| before | {100 * before:.2f}% |\n"
          f"| after {args.epochs} epoch{'s' * (args.epochs > 1)} ({seconds:.0f} s) | {100 * after:.2f}% |")
    print(f"wrote {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(flops_target=args.flops_target, epochs=args.epochs, finetune_epochs=args.finetune_epochs,
                      seed=args.seed, out_dir=args.out, bench=not args.no_bench, progress=not args.quiet)
    print()
    print(result.table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="apib-fx",
        description="Prune a PyTorch model to a FLOPs budget (APIB: HSIC Lasso under the information "
                    "bottleneck), export it to ONNX and measure its latency.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    pr = sub.add_parser("prune", help="prune a model to a FLOPs target and write model, ONNX and reports")
    pr.add_argument("--model", required=True,
                    help="torchvision:NAME, timm:NAME or cifar:resnet56|vgg16 (random weights unless --weights), "
                         "or a saved .apibfx file")
    pr.add_argument("--weights", default=None, help=WEIGHTS_HELP)
    pr.add_argument("--flops-target", type=float, default=0.48, help="fraction of FLOPs to remove (default 0.48)")
    pr.add_argument("--tolerance", type=float, default=0.005,
                    help="how far (absolute) the achieved reduction may be from --flops-target (default 0.005)")
    pr.add_argument("--calib", default="synthetic",
                    help="synthetic | digits | imagefolder:PATH | cifar10:PATH | cifar100:PATH (default synthetic)")
    pr.add_argument("--out", required=True, help="output directory")
    pr.add_argument("--method", default="apib", choices=["apib", "l1", "fpgm", "random"])
    pr.add_argument("--kernel", default="laplace", choices=["laplace", "gaussian", "linear"])
    pr.add_argument("--num-calib", type=int, default=128, help="calibration samples (default 128)")
    pr.add_argument("--batch-size", type=int, default=64, help="kernel batch size (default 64)")
    pr.add_argument("--min-channels", type=int, default=1, help="fewest channels a group keeps (the paper's omega)")
    pr.add_argument("--round-to", type=int, default=None, help="keep multiples of this many channels")
    pr.add_argument("--num-classes", type=int, default=None, help="classifier outputs of a built-in model")
    pr.add_argument("--input-shape", default=None, help="C,H,W (default: the model's usual input)")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--device", default=None,
                    help="where calibration runs: cpu, cuda or cuda:N (default: cpu, where the model is loaded)")
    pr.add_argument("--workers", type=int, default=None,
                    help="processes for APIB's Lasso paths (default: the CPU cores, at most 8)")
    pr.add_argument("--heads", default="dims", choices=HEADS,
                    help="attention loses the same head dims in every head (default) or whole heads")
    pr.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    pr.add_argument("--quiet", action="store_true", help="no progress bars")
    pr.set_defaults(func=cmd_prune)

    ins = sub.add_parser("inspect", help="the model's channel groups: what can be pruned, what each channel costs, "
                                         "and why a group is fixed")
    ins.add_argument("--model", required=True, help="torchvision:NAME, timm:NAME, cifar:NAME or a saved .apibfx file")
    ins.add_argument("--input-shape", default=None, help="C,H,W (default: the model's usual input)")
    ins.add_argument("--num-classes", type=int, default=None, help="classifier outputs of a built-in model")
    ins.add_argument("--only-fixed", action="store_true", help="list only the groups that cannot be pruned")
    ins.add_argument("--heads", default="dims", choices=HEADS,
                     help="group attention's head dims (default) or whole heads")
    ins.set_defaults(func=cmd_inspect)

    ex = sub.add_parser("export", help="export a model to ONNX, checked against ONNX Runtime")
    ex.add_argument("--model", required=True, help="torchvision:NAME, timm:NAME, cifar:NAME or a saved .apibfx file")
    ex.add_argument("--weights", default=None, help=WEIGHTS_HELP)
    ex.add_argument("--num-classes", type=int, default=None, help="classifier outputs of a built-in model")
    ex.add_argument("--out", required=True, help="the .onnx file to write")
    ex.add_argument("--input-shape", default=None, help="C,H,W")
    ex.add_argument("--opset", type=int, default=None)
    ex.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime parity check")
    ex.set_defaults(func=cmd_export)

    be = sub.add_parser("bench", help="latency table: models x backends x batch sizes, with ideal speedups")
    be.add_argument("--model", action="append", required=True,
                    help="repeatable; the first is the baseline: torchvision:NAME, timm:NAME, cifar:NAME, .apibfx "
                         "or .onnx")
    be.add_argument("--input-shape", default=None, help="C,H,W")
    be.add_argument("--batch-sizes", default="1,32")
    be.add_argument("--backends", default="torch,torch-cuda,ort-cpu,ort-cuda")
    be.add_argument("--warmup", type=int, default=5)
    be.add_argument("--iters", type=int, default=20)
    be.add_argument("--threads", type=int, default=None)
    be.add_argument("--save", action="append", help="write the table: .md or .json (repeatable)")
    be.add_argument("--plot", default=None, help="write a latency plot (.png)")
    be.add_argument("--quiet", action="store_true")
    be.set_defaults(func=cmd_bench)

    ft = sub.add_parser("finetune", help="fine-tune a (pruned) model on labelled data and save it")
    ft.add_argument("--model", required=True,
                    help="a saved .apibfx file (e.g. apib-fx prune's model.apibfx), torchvision:NAME, timm:NAME or "
                         "cifar:NAME")
    ft.add_argument("--data", required=True,
                    help="digits | cifar10:PATH | cifar100:PATH | imagefolder:PATH (PATH/train and PATH/val)")
    ft.add_argument("--out", required=True, help="the .apibfx file to write")
    ft.add_argument("--epochs", type=int, default=5)
    ft.add_argument("--lr", type=float, default=0.01, help="initial learning rate (SGD, cosine schedule; default 0.01)")
    ft.add_argument("--weight-decay", type=float, default=1e-4)
    ft.add_argument("--batch-size", type=int, default=64)
    ft.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cpu)")
    ft.add_argument("--data-workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    ft.add_argument("--weights", default=None, help=WEIGHTS_HELP)
    ft.add_argument("--num-classes", type=int, default=None, help="classifier outputs of a built-in model")
    ft.add_argument("--input-shape", default=None, help="C,H,W (default: the model's own)")
    ft.add_argument("--teacher", default=None,
                    help="distil from this model (e.g. the unpruned one: torchvision:NAME with --teacher-weights, "
                         "or a saved .apibfx file)")
    ft.add_argument("--teacher-weights", default=None, help="trained weights for a built-in --teacher")
    ft.add_argument("--distill", type=float, default=0.5,
                    help="with --teacher: the distillation term's weight, cross-entropy's is 1 minus it (default 0.5)")
    ft.add_argument("--temperature", type=float, default=4.0, help="with --teacher: softmax temperature (default 4)")
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--quiet", action="store_true", help="no progress bars")
    ft.set_defaults(func=cmd_finetune)

    de = sub.add_parser("demo", help="train, prune, fine-tune, export and benchmark on scikit-learn's digits")
    de.add_argument("--flops-target", type=float, default=0.48)
    de.add_argument("--epochs", type=int, default=12)
    de.add_argument("--finetune-epochs", type=int, default=6)
    de.add_argument("--seed", type=int, default=0)
    de.add_argument("--out", default=None, help="where to keep the ONNX files (default: not kept)")
    de.add_argument("--no-bench", action="store_true")
    de.add_argument("--quiet", action="store_true")
    de.set_defaults(func=cmd_demo)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("apib-fx: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line for users, the traceback on --debug
        if args.debug:
            traceback.print_exc()
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"apib-fx: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
