"""The fine-tuning loop: cross-entropy, and distillation from a teacher."""
import pytest
import torch
import torch.nn.functional as F

import apib_fx
from apib_fx.data import training_data
from apib_fx.testing import random_keep
from apib_fx.train import distillation_loss, fit


def _student_and_teacher():
    torch.manual_seed(0)
    teacher = apib_fx.models.CifarResNet(20, 10).eval()
    x = torch.randn(1, 3, 16, 16)
    graph = apib_fx.trace(teacher, x)
    return apib_fx.apply(teacher, graph, random_keep(graph, 0.5)), teacher


def _loader():
    train, _ = training_data("digits", (3, 16, 16))
    small = torch.utils.data.TensorDataset(*(t[:256] for t in train.tensors))
    return torch.utils.data.DataLoader(small, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))


def test_distillation_loss_is_hintons():
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    p, log_q = F.softmax(t / 3, dim=1), F.log_softmax(s / 3, dim=1)
    want = 9 * (p * (p.log() - log_q)).sum(dim=1).mean()
    assert torch.allclose(distillation_loss(s, t, 3.0), want, rtol=1e-5)
    assert float(distillation_loss(t, t)) == pytest.approx(0.0, abs=1e-6)


def test_zero_distillation_weight_trains_as_without_a_teacher():
    runs = []
    for teacher in (None, "teacher"):
        student, model = _student_and_teacher()
        torch.manual_seed(1)
        fit(student, _loader(), 1, progress=False, teacher=model if teacher else None, distill=0.0)
        runs.append(student.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_distillation_pulls_the_student_toward_the_teacher():
    student, teacher = _student_and_teacher()
    _, held_out = training_data("digits", (3, 16, 16))
    x = held_out.tensors[0][:200]

    def gap():
        with torch.no_grad():
            return float(distillation_loss(student.eval()(x), teacher(x), 1.0))

    before = gap()
    weights = [p.clone() for p in teacher.parameters()]
    fit(student, _loader(), 3, lr=0.02, progress=False, teacher=teacher, distill=1.0, temperature=1.0)
    assert gap() < 0.5 * before
    assert not teacher.training and all(torch.equal(a, b) for a, b in zip(weights, teacher.parameters()))


@pytest.mark.parametrize("kwargs", [{"distill": 1.5}, {"temperature": 0.0}])
def test_bad_distillation_settings(kwargs):
    student, teacher = _student_and_teacher()
    with pytest.raises(ValueError):
        fit(student, _loader(), 1, progress=False, teacher=teacher, **kwargs)
