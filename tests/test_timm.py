"""timm's models (random weights): its layers (norm-act BatchNorm, "same"-padded convs, blur
pooling, layer scales, DropPath, functional GroupNorm) prune exactly through their ops' rules;
weight-standardised convs (NF-ResNets, NFNets, BiT) prune through their parameters, not exactly."""
import pytest
import torch

import apib_fx
from apib_fx.testing import check_exact, fill_zero_weights

timm = pytest.importorskip("timm")

# Every group of these is prunable except the classifier's outputs.
FAST = ["efficientnet_b0", "tf_efficientnet_b0", "mobilenetv3_large_100", "resnetblur18",
        "poolformer_s12", "regnety_008", "nf_resnet26"]
SLOW = ["resnet50d", "efficientnetv2_rw_t", "densenet121", "cspdarknet53", "mixnet_s", "rexnet_100",
        "ghostnet_100", "hrnet_w18_small_v2", "dla34", "res2net50_26w_4s", "resnest14d", "xception41",
        "vovnet39a", "ese_vovnet19b_dw", "dpn68", "selecsls42b", "tresnet_m", "repvgg_a0",
        "hgnet_tiny", "hgnetv2_b0", "fastvit_t8", "mobilenetv4_conv_small", "lcnet_050", "tinynet_a",
        "mnasnet_100", "fbnetc_100", "seresnext26d_32x4d", "gernet_s", "regnetx_002",
        "cspresnet50", "darknet53", "resnetrs50", "densenetblur121d", "regnetz_b16",
        "inception_next_tiny", "rdnet_tiny", "efficientformer_l1", "convnext_tiny",
        "swin_tiny_patch4_window7_224", "deit_tiny_patch16_224", "pit_ti_224", "botnet26t_256",
        "levit_128s", "starnet_s050", "resnetv2_50x1_bit", "nfnet_f0", "nf_regnet_b0", "convnextv2_atto",
        "hardcorenas_a", "fbnetv3_b", "visformer_tiny"]
MODELS = [pytest.param(n) for n in FAST] + [pytest.param(n, marks=pytest.mark.slow) for n in SLOW]
# These also keep some groups whole, with a reason: class and position tokens added to the stream
# (DeiT, PiT), a softmax over split-attention branches (ResNeSt).
PARTLY_FIXED = {"swin_tiny_patch4_window7_224", "deit_tiny_patch16_224", "pit_ti_224", "resnest14d"}


def timm_model(name: str, **kwargs) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = fill_zero_weights(timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval())
    cfg = model.pretrained_cfg
    fixed = cfg.get("fixed_input_size", False) or name.startswith(("botnet", "levit"))
    size = cfg.get("input_size", (3, 224, 224))[-1] if fixed else 64
    return model, torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", MODELS)
def test_timm_exact(name):
    model, x = timm_model(name)
    graph = apib_fx.trace(model, x)
    fixed = [g for g in graph.groups if not g.prunable]
    assert len(graph.prunable_groups) >= 5
    if name not in PARTLY_FIXED:
        assert all("output" in g.reason for g in fixed), [g.reason for g in fixed]
    report = check_exact(model, x, graph=graph)
    assert report.shapes_ok and report.finite
    if report.exact_expected:
        assert report.max_diff <= 1e-5, report
    assert report.flops_model == report.flops_after < report.flops_before


@pytest.mark.parametrize("name", [pytest.param("mobilevit_xxs")] + [
    pytest.param(n, marks=pytest.mark.slow) for n in ("crossvit_tiny_240", "twins_svt_small", "mobilevitv2_050",
                                                      "efficientvit_m0", "tiny_vit_5m_224", "nest_tiny",
                                                      "pnasnet5large")])
def test_timm_models_branching_on_the_input_shape(name):
    """They pad, resize or pick a kernel only when the input asks for it (MobileViT's patches,
    Twins' and TinyViT's windows, CrossViT's second branch, PNASNet's padding): traced through the branches the
    example input takes. MobileViT unfolds patches to sizes computed from the batch size and the
    channel count together: the pruned model runs other batch sizes too."""
    model, x = timm_model(name)
    with pytest.warns(UserWarning, match="branches on its inputs' shapes"):
        graph = apib_fx.trace(model, x)
    assert graph.specialized and len(graph.prunable_groups) >= 5
    reports = [check_exact(model, batch, graph=graph)
               for batch in (x, torch.randn(3, *x.shape[1:], generator=torch.Generator().manual_seed(2)))]
    for report in reports:
        assert report.shapes_ok and report.finite
        if report.exact_expected:  # (MobileViT, Twins, TinyViT, NesT pass through LayerNorm over the channels)
            assert report.max_diff <= 1e-5, report
    assert reports[0].flops_model == reports[0].flops_after < reports[0].flops_before


@pytest.mark.slow
def test_pruned_twins_exports_with_parity(tmp_path):
    """Its checks of the branches it was traced through export (each one call the exporters
    evaluate, not a comparison of a traced size with a bool, which TorchScript's has no op for)."""
    from apib_fx.export import export_onnx

    model, x = timm_model("twins_svt_small")
    data = torch.randn(4, *x.shape[1:], generator=torch.Generator().manual_seed(2))
    with pytest.warns(UserWarning, match="branches on its inputs' shapes"):
        pruned = apib_fx.prune(model, 0.3, data, method="l1", progress=False)
    path = export_onnx(pruned, tmp_path / "twins.onnx", data[:1])
    assert path.parity["max_diff"] <= 1e-4 * path.parity["scale"] and path.parity["batch_sizes"] == [1, 3]


def test_drop_path_stays_a_module_in_the_pruned_model():
    """Traced in eval mode, timm's DropPath would vanish from the graph and fine-tuning the pruned
    model would run without stochastic depth: it is kept as a module."""
    from timm.layers import DropPath

    model, x = timm_model("resnet18", drop_path_rate=0.9, zero_init_last=False)  # branches not zero
    graph = apib_fx.trace(model, x)
    pruned = apib_fx.apply(model, graph, {g.index: torch.arange(g.channels // 2) for g in graph.prunable_groups})
    called = [pruned.get_submodule(n.target) for n in pruned.graph.nodes if n.op == "call_module"]
    n_drop = sum(isinstance(m, DropPath) for m in model.modules())
    assert n_drop > 0 and sum(isinstance(m, DropPath) for m in called) == n_drop
    pruned.train()
    torch.manual_seed(0)
    with torch.no_grad():
        outs = [pruned(x) for _ in range(4)]
    assert not all(torch.equal(outs[0], o) for o in outs[1:])  # paths dropped at random in training


def test_apib_prunes_a_timm_model_to_target():
    model, x = timm_model("efficientnet_b0")
    data = torch.randn(32, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    pruned = apib_fx.prune(model, 0.4, data, num_calib=32, batch_size=16, progress=False)
    report = pruned.apib_report
    assert abs(report.flops_reduction - 0.4) <= 0.005
    assert report.flops_after == apib_fx.count_flops(pruned, x[:1]) * 1


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_batchnorm_act_models_run_under_export_and_jit_trace():
    # timm's BatchNormAct2d runs F.batch_norm in its own forward; the pruned graph calls it with the
    # module as an argument (torch.jit.script cannot compile that; the README says so), and the
    # other two deployment routes reproduce the pruned model.
    model, x = timm_model("efficientnet_b0")
    pruned = apib_fx.prune(model, 0.3, example_inputs=x, method="l1", progress=False).eval()
    assert pruned.num_classes == 10 and pruned.pretrained_cfg == model.pretrained_cfg  # (carried over)
    with torch.no_grad():
        want = pruned(x)
        assert torch.allclose(torch.export.export(pruned, (x,)).module()(x), want, atol=1e-5, rtol=1e-5)
        assert torch.allclose(torch.jit.trace(pruned, x)(x), want, atol=1e-5, rtol=1e-5)
