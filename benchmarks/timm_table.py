"""timm's models (random weights): trace, prune a random 30% of every prunable group, compare with
the original whose removed input slices are zeroed, and check the FLOPs model.

    python benchmarks/timm_table.py [--models a,b,...] [--out benchmarks/results/timm.md]

CNNs run at 64x64, models with a fixed input size at theirs; batch 2. Models torch.fx cannot
trace are listed with the error apib_fx reports. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import collections
import time
import warnings

import timm
import torch

import apib_fx
from apib_fx.testing import check_exact, fill_zero_weights

from _results import emit, write_results

MODELS = [
    "resnet50", "resnet50d", "resnetv2_50", "resnetrs50", "resnetblur18", "seresnext26d_32x4d",
    "res2net50_26w_4s", "resnest14d", "tresnet_m", "dpn68", "xception41", "dla34", "hrnet_w18_small_v2",
    "densenet121", "densenetblur121d", "cspdarknet53", "cspresnet50", "darknet53", "cs3darknet_s",
    "vovnet39a", "ese_vovnet19b_dw", "selecsls42b", "gernet_s", "regnetx_002", "regnety_008",
    "regnetz_b16", "repvgg_a0", "hgnet_tiny", "hgnetv2_b0", "efficientnet_b0", "tf_efficientnet_b0",
    "efficientnetv2_rw_t", "tf_efficientnetv2_s", "mobilenetv3_large_100", "mobilenetv4_conv_small",
    "mixnet_s", "mnasnet_100", "fbnetc_100", "tinynet_a", "lcnet_050", "ghostnet_100",
    "ghostnetv2_100", "repghostnet_050", "rexnet_100", "skresnet18", "ecaresnet26t",
    "convnext_tiny", "convnextv2_atto", "inception_next_tiny", "rdnet_tiny", "poolformer_s12",
    "efficientformer_l1", "fastvit_t8", "starnet_s050", "mambaout_femto", "edgenext_xx_small",
    "vit_tiny_patch16_224", "deit_tiny_patch16_224", "cait_xxs24_224", "pit_ti_224", "levit_128s",
    "swin_tiny_patch4_window7_224", "pvt_v2_b0", "coatnet_nano_rw_224", "maxvit_nano_rw_256",
    "mixer_b16_224", "resmlp_12_224", "botnet26t_256", "lambda_resnet26t", "gcresnet33ts",
    "nf_resnet50", "eca_nfnet_l0", "resnetv2_50x1_bit", "mobilevit_xxs", "efficientvit_b0",
    "twins_svt_small", "crossvit_tiny_240", "mobilevitv2_050", "efficientvit_m0", "tiny_vit_5m_224",
    "nest_tiny", "hiera_tiny_224", "nasnetalarge", "pnasnet5large", "inception_v4", "mobileone_s0",
    "hardcorenas_a", "fbnetv3_b", "sequencer2d_s", "halonet26t", "xcit_nano_12_p16_224", "davit_tiny",
    "coat_tiny", "visformer_tiny", "tnt_s_patch16_224", "gcvit_xxtiny", "volo_d1_224",
]


def row(name: str) -> str:
    torch.manual_seed(0)
    model = fill_zero_weights(timm.create_model(name, pretrained=False, num_classes=10).eval())
    cfg = model.pretrained_cfg
    # (and at theirs: attention over a fixed grid, and Inception-v4, whose stem leaves nothing of 64x64)
    fixed = cfg.get("fixed_input_size", False) or name.startswith(("botnet", "levit", "lambda", "halo", "inception_v4"))
    size = cfg.get("input_size", (3, 224, 224))[-1] if fixed else 64
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    warnings.filterwarnings("ignore", message="the forward branches on its inputs' shapes")  # (counted in the table)
    try:
        t = time.perf_counter()
        graph = apib_fx.trace(model, x)
        seconds = time.perf_counter() - t
    except Exception as e:
        first = str(e).splitlines()[0][:110].replace("|", "/")
        return f"| {name} | {size} | - | - | untraceable: {type(e).__name__}: {first} | - | - | - | - | - | - |"
    r = check_exact(model, x, graph=graph)
    # The same pruned graph on a batch of another size: sizes computed from the batch stay computed.
    other = check_exact(model, torch.randn(3, *x.shape[1:], generator=torch.Generator().manual_seed(2)), graph=graph)
    other_ok = other.shapes_ok and other.finite and (other.max_diff <= 1e-5 or not other.exact_expected)
    mixes = "weight standardisation spans channels" if r.note and "standardisation" in r.note else "norm mixes channels"
    exact = ("yes" if r.max_diff <= 1e-5 else "NO") if r.exact_expected else f"no ({mixes}; shapes ok)"
    if not (r.shapes_ok and r.finite):
        exact = "FAILED"
    reasons = collections.Counter(g.reason.split(",")[0][:60] for g in graph.groups
                                  if not g.prunable and "model output" not in g.reason)
    kept = "; ".join(f"{n}x {why}" for why, n in reasons.most_common(2)).replace("|", "/") or "-"
    return (f"| {name} | {size} | {len(graph.groups)} | {len(graph.prunable_groups)} | {exact} | {r.max_diff:.1e} "
            f"| {'yes' if r.flops_model == r.flops_after else 'NO'} | {'yes' if other_ok else 'NO'} | {seconds:.2f} | {len(graph.specialized) or '-'} | {kept} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", default="benchmarks/results/timm.md")
    args = ap.parse_args()
    head = ["| model | input | groups | prunable | exact | max diff | FLOPs model = count | batch 3 too | trace s | branches on the input shape followed | other groups kept whole (besides the classifier's outputs) |",
            "|---|---:|---:|---:|---|---:|---|---|---:|---:|---|"]
    lines = [f"timm {timm.__version__}, torch {torch.__version__}; batch 2, random weights, 30% of every "
             "prunable group removed at random; CNNs at 64x64, fixed-size models at their size. 'batch 3 too': "
             "the graph traced at batch 2, pruned the same way, runs a batch of 3 (matching its reference where exact).",
             ""] + head
    print("\n".join(lines), flush=True)
    for name in args.models.split(","):
        emit(lines, row(name))
    write_results(args.out, lines)


if __name__ == "__main__":
    main()
