"""The demo end to end on a reduced budget."""
import tempfile

import torch

from apib_fx.demo import run_demo


def test_demo_reduced_budget(tmp_path):
    torch.set_num_threads(2)
    r = run_demo(flops_target=0.48, epochs=3, finetune_epochs=1, seed=0, out_dir=tmp_path, progress=False)
    assert abs(r.flops_reduction - 0.48) <= 0.005
    assert r.flops_after < 0.53 * r.flops_before
    assert r.acc_unpruned > 0.8 and r.acc_finetuned > 0.5  # chance is 0.1
    assert r.acc_oneshot > 0.5  # BatchNorm statistics re-estimated on the calibration images
    assert r.onnx_max_diff is not None and r.onnx_max_diff < 1e-3
    assert (tmp_path / "pruned.onnx").exists()
    ok = [row for row in r.latency if row["status"] == "ok"]
    assert {row["batch"] for row in ok} == {1, 32}
    table = r.table()
    assert "APIB + fine-tune" in table and "ideal" in table


def test_demo_without_out_dir_leaves_no_files(tmp_path, monkeypatch):
    # The ONNX files go to a temporary folder that is removed after the run.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    r = run_demo(flops_target=0.48, epochs=1, finetune_epochs=0, seed=0, bench=False, progress=False)
    assert r.onnx_max_diff is not None and r.onnx_max_diff < 1e-3
    assert list(tmp_path.iterdir()) == []
