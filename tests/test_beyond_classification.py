"""Models outside the classification zoo: segmentation heads (dict outputs, atrous convs) and
video networks (Conv3d, including torchvision's Conv3d subclasses; Swin3d), exact and on target."""
import pytest
import torch
from torchvision.models import detection, segmentation, video

import apib_fx
from apib_fx.testing import check_exact

MODELS = {
    "lraspp_mobilenet_v3_large": (lambda: segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=5), (3, 64, 64)),
    "r3d_18": (lambda: video.r3d_18(weights=None, num_classes=5), (3, 4, 32, 32)),
    "r2plus1d_18": (lambda: video.r2plus1d_18(weights=None, num_classes=5), (3, 4, 32, 32)),
}


@pytest.mark.parametrize("name", MODELS)
def test_exact_and_on_target(name):
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    graph = apib_fx.trace(model, x)
    assert len(graph.prunable_groups) >= len(graph.groups) - 1  # all but the output channels
    report = check_exact(model, x, graph=graph)
    assert report.shapes_ok and report.max_diff <= 1e-5, report
    assert report.flops_model == report.flops_after < report.flops_before
    calib = torch.randn(8, *shape, generator=torch.Generator().manual_seed(1))
    pruned = apib_fx.prune(model, 0.4, calib, num_calib=8, batch_size=8, progress=False)
    removed = 1 - apib_fx.count_flops(pruned, x[:1]) / apib_fx.count_flops(model, x[:1])
    assert abs(removed - 0.4) <= 0.005


def test_swin3d_traces_and_prunes_exactly():
    # Its window helpers take and edit Python lists (fx keeps node arguments immutable) and return
    # pad sizes from a wrapped function (no tensor out): both are computed as the model does.
    torch.manual_seed(0)
    model = video.swin3d_t(weights=None, num_classes=5).eval()
    x = torch.randn(1, 3, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    graph = apib_fx.trace(model, x)
    fixed = {g.reason for g in graph.groups if not g.prunable}
    # (the wrapped window attention keeps its input channels, as in the 2-D Swin)
    assert len(graph.prunable_groups) >= 12 and all("shifted_window_attention_3d" in r or "output" in r for r in fixed)
    report = check_exact(model, x, graph=graph)
    assert report.shapes_ok and report.max_diff <= 1e-5, report
    assert report.flops_model == report.flops_after < report.flops_before


def test_a_detection_backbone_prunes_and_builds_a_detector():
    # fx cannot trace the detector itself (its forward branches on inputs); its backbone is pruned on
    # its own and goes back in, or into a new detector, which reads the backbone's out_channels.
    torch.manual_seed(0)
    model = detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=5).eval()
    x = torch.randn(4, 3, 320, 320, generator=torch.Generator().manual_seed(0))
    backbone = apib_fx.prune(model.backbone, 0.3, x, method="l1", progress=False)
    assert abs(backbone.apib_report.flops_reduction - 0.3) <= 0.005
    assert backbone.out_channels == model.backbone.out_channels == 256  # (the FPN's outputs are never pruned)
    rebuilt = detection.FasterRCNN(backbone, num_classes=5, rpn_anchor_generator=model.rpn.anchor_generator,
                                   min_size=320, max_size=320).eval()
    with torch.no_grad():
        features = backbone(x[:1])
        out = rebuilt([x[0]])
    assert [f.shape[1] for f in features.values()] == [256] * len(features)
    assert set(out[0]) == {"boxes", "labels", "scores"}
