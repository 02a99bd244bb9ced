"""The ``apib-fx`` command line: prune, export, bench, demo."""
from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

EPILOG = """examples:
  apib-fx demo                                    # the whole story on scikit-learn's digits
  apib-fx prune --model torchvision:resnet50 --flops-target 0.48 --calib synthetic --out runs/r50
  apib-fx prune --model cifar:resnet56 --calib cifar100:~/data/cifar-100-python --out runs/r56
  apib-fx prune --model torchvision:resnet50 --weights resnet50.pth --calib imagefolder:~/data/val --out runs/r50
  apib-fx export --model runs/r50/model.apibfx --out runs/r50/model.onnx
  apib-fx bench --model torchvision:resnet50 --model runs/r50/model.apibfx --batch-sizes 1,32
"""


WEIGHTS_HELP = ("trained weights for a torchvision:, timm: or cifar: model: a state_dict file "
                "(torch.save(model.state_dict(), path)) or a checkpoint dict holding one; read with weights_only")


class CliError(Exception):
    """A user mistake: printed as one line, exit status 2."""


def load_model(spec: str, num_classes: Optional[int] = None,
               weights: Optional[str] = None) -> tuple[nn.Module, tuple[int, ...], str]:
    """``torchvision:NAME`` or ``timm:NAME`` (random weights), ``cifar:resnet20|resnet56|resnet110|vgg16``,
    or a file written by ``apib_fx.save`` / ``apib-fx prune``; ``weights``: a state_dict file for a
    built-in model (``--weights``). Returns (model, input shape CxHxW, label)."""
    model, shape, label = _built_or_saved(spec, num_classes)
    if weights is None:
        return model, shape, label
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
    return model, shape, label


def _built_or_saved(spec: str, num_classes: Optional[int]) -> tuple[nn.Module, tuple[int, ...], str]:
    from .models import CifarResNet, CifarVGG
    from .testing import fill_zero_weights, zoo_input_size, zoo_model

    kind, sep, name = spec.partition(":")
    if sep and kind == "torchvision":
        try:
            model = zoo_model(name, num_classes=num_classes or 1000)
        except ValueError as e:
            raise CliError(str(e)) from None
        size = zoo_input_size(name, small=False)
        return model, (3, size, size), name
    if sep and kind == "timm":
        try:
            import timm
        except ImportError:
            raise CliError("timm: models need the timm package (pip install timm)") from None
        if not timm.is_model(name):
            raise CliError(f"unknown timm model {name!r}; timm.list_models('*pattern*') lists them")
        torch.manual_seed(0)  # (random weights, as for torchvision:)
        model = timm.create_model(name, pretrained=False, **({"num_classes": num_classes} if num_classes else {}))
        return fill_zero_weights(model.eval()), tuple(model.pretrained_cfg.get("input_size", (3, 224, 224))), name
    if sep and kind == "cifar":
        classes = num_classes or 10
        if name.startswith("resnet") and name[6:].isdigit():
            try:
                return CifarResNet(int(name[6:]), classes).eval(), (3, 32, 32), name
            except ValueError as e:
                raise CliError(str(e)) from None
        if name == "vgg16":
            return CifarVGG(classes).eval(), (3, 32, 32), name
        raise CliError(f"unknown cifar model {name!r}; expected resnet20/32/44/56/110 or vgg16")
    path = Path(spec).expanduser()
    if not path.exists():
        raise CliError(f"model {spec!r} is neither torchvision:NAME, timm:NAME, cifar:NAME nor an existing file")
    from .serialize import load

    model, meta = load(path, with_meta=True)
    shape = tuple((meta or {}).get("input_shape") or ())
    if not shape:
        raise CliError(f"{spec} does not record its input shape; pass --input-shape C,H,W")
    return model, shape, path.stem


def _shape(text: Optional[str]) -> Optional[tuple[int, ...]]:
    if not text:
        return None
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise CliError(f"--input-shape must look like 3,224,224, got {text!r}") from None


def cmd_prune(args: argparse.Namespace) -> int:
    from . import export_onnx, prune, save
    from .data import calibration_tensor
    from .report import write_reports

    if not 0 < args.flops_target < 1:
        raise CliError(f"--flops-target is the fraction of FLOPs to remove, in (0, 1); got {args.flops_target}")
    model, shape, label = load_model(args.model, args.num_classes, args.weights)
    shape = _shape(args.input_shape) or shape
    calib = calibration_tensor(args.calib, args.num_calib, shape, seed=args.seed)
    example = torch.zeros(1, *shape)
    if calib is not None and tuple(calib.shape[1:]) != shape:
        raise CliError(f"--calib gives inputs of shape {tuple(calib.shape[1:])}, the model expects {shape}")
    pruned = prune(
        model, args.flops_target, calib, example_inputs=example, method=args.method,
        kernel=args.kernel, min_channels=args.min_channels, num_calib=args.num_calib,
        batch_size=args.batch_size, round_to=args.round_to, tolerance=args.tolerance,
        progress=not args.quiet, seed=args.seed,
        workers=args.workers, device=args.device,
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

    model, shape, _ = load_model(args.model, args.num_classes, args.weights)
    shape = _shape(args.input_shape) or shape
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
        m, s, label = load_model(spec)
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
    pr.add_argument("--weights", default=None,
                    help=WEIGHTS_HELP)
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
    pr.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    pr.add_argument("--quiet", action="store_true", help="no progress bars")
    pr.set_defaults(func=cmd_prune)

    ex = sub.add_parser("export", help="export a model to ONNX, checked against ONNX Runtime")
    ex.add_argument("--model", required=True, help="torchvision:NAME, timm:NAME, cifar:NAME or a saved .apibfx file")
    ex.add_argument("--weights", default=None,
                    help=WEIGHTS_HELP)
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
