import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchslim.data import TensorLoader
from torchslim.distillation import Distill, DistillationLoss, soft_target_loss
from torchslim.errors import ConfigError
from torchslim.measure import evaluate
from torchslim.testing import TinyMLP
from torchslim.training import Trainer, make_train_config


def test_soft_target_loss_is_t_squared_kl() -> None:
    student, teacher = torch.randn(6, 5), torch.randn(6, 5)
    t = 3.0
    p_teacher = F.softmax(teacher / t, dim=1)
    kl = (p_teacher * (p_teacher.log() - F.log_softmax(student / t, dim=1))).sum(1).mean()
    assert float(soft_target_loss(student, teacher, t)) == pytest.approx(float(kl) * t * t, rel=1e-5)
    assert float(soft_target_loss(teacher, teacher, t)) == pytest.approx(0.0, abs=1e-6)


def test_soft_target_gradient_keeps_its_scale_across_temperatures() -> None:
    # d(T²·KL)/dz = T·(p_s − p_t)/B: for large T it tends to (z_s − z_t)/(K·B), independent of T.
    teacher = torch.randn(4, 10)
    grads = []
    for t in (10.0, 40.0):
        student = torch.randn(4, 10, generator=torch.Generator().manual_seed(1)).requires_grad_()
        soft_target_loss(student, teacher, t).backward()
        grads.append(student.grad)
    assert torch.allclose(grads[0], grads[1], rtol=0.1, atol=1e-3)


def _bound(loss: DistillationLoss, student: nn.Module, x: torch.Tensor) -> DistillationLoss:
    loss.bind(student, x[:2])
    return loss


def test_alpha_mixes_hard_and_soft_terms() -> None:
    teacher, student = TinyMLP().eval(), TinyMLP().eval()
    x, labels = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    with torch.no_grad():
        out = student(x)
    hard = float(F.cross_entropy(out, labels))
    with torch.no_grad():
        soft = float(soft_target_loss(out, teacher(x), 4.0))
    mixed = _bound(DistillationLoss(teacher, temperature=4.0, alpha=0.3), student, x)
    assert float(mixed(out, labels, x)) == pytest.approx(0.3 * hard + 0.7 * soft, rel=1e-5)
    only_hard = _bound(DistillationLoss(teacher, alpha=1.0), student, x)
    assert float(only_hard(out, labels, x)) == pytest.approx(hard, rel=1e-5)
    pure_soft = _bound(DistillationLoss(teacher, alpha=0.0), student, x)
    # Pure-soft mode never looks at the labels.
    assert float(pure_soft(out, labels, x)) == float(pure_soft(out, torch.zeros_like(labels), x))


def test_embedding_output_terms() -> None:
    teacher, student = nn.Linear(4, 6), nn.Linear(4, 6)
    x = torch.randn(5, 4)
    mse = _bound(DistillationLoss(teacher, alpha=0.0, output="mse"), student, x)
    assert float(mse(student(x), torch.zeros(5), x)) == pytest.approx(
        float(F.mse_loss(student(x), teacher(x))), rel=1e-5)
    cosine = _bound(DistillationLoss(teacher, alpha=0.0, output="cosine"), student, x)
    assert float(cosine(teacher(x), torch.zeros(5), x)) == pytest.approx(0.0, abs=1e-6)


def test_bad_options_and_mismatched_models_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match=r"temperature=0.*alpha=1.5"):
        DistillationLoss(TinyMLP(), temperature=0, alpha=1.5)
    with pytest.raises(ConfigError, match="output='hinge'"):
        DistillationLoss(TinyMLP(), output="hinge")
    with pytest.raises(ConfigError, match=r"student output \(2, 3\) and teacher output \(2, 10\)"):
        DistillationLoss(TinyMLP()).bind(TinyMLP(num_classes=3), torch.randn(2, 1, 8, 8))
    with pytest.raises(ConfigError, match=r"teacher has no module\(s\) \['net.9'\]"):
        DistillationLoss(TinyMLP(), features=[("net.1", "net.9")])
    with pytest.raises(ConfigError, match=r"student has no module\(s\) \['nope'\]"):
        DistillationLoss(TinyMLP(), features=[("nope", "net.1")]).bind(TinyMLP(), torch.randn(2, 1, 8, 8))
    with pytest.raises(ConfigError, match="not called"):
        DistillationLoss(TinyMLP())(torch.randn(2, 10), torch.zeros(2, dtype=torch.long),
                                    torch.randn(2, 1, 8, 8))
    with pytest.raises(ConfigError, match="valid keys"):
        Distill(temprature=3)


def test_cached_teacher_outputs_equal_fresh_ones_and_skip_recomputation() -> None:
    calls = []
    teacher = TinyMLP().eval()
    teacher.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    student = TinyMLP()
    x = torch.randn(6, 1, 8, 8)
    cached = _bound(DistillationLoss(teacher, alpha=0.0, cache_teacher=True), student, x)
    fresh = _bound(DistillationLoss(copy.deepcopy(teacher), alpha=0.0), student, x)
    calls.clear()
    out = student(x)
    first = cached(out, torch.zeros(6), x)
    perm = [5, 4, 3, 2, 1, 0]
    again = cached(out[perm], torch.zeros(6), x[perm])
    assert calls == [6]  # the second call was served from the cache
    assert float(first) == pytest.approx(float(fresh(out, torch.zeros(6), x)), rel=1e-6)
    assert float(again) == pytest.approx(float(first), rel=1e-6)


def test_distillation_trains_student_and_adapter_never_the_teacher(digits, tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = TinyMLP()
    config = make_train_config(epochs=4, lr=0.1, batch_size=64)
    train = TensorLoader(digits.train, batch_size=64, shuffle=True)
    Trainer(teacher, train, config=config, progress=False).fit()
    teacher_state = copy.deepcopy(teacher.state_dict())
    teacher.zero_grad(set_to_none=True)

    class Wider(TinyMLP):
        def __init__(self) -> None:
            super().__init__()
            self.net[1] = nn.Linear(64, 24)
            self.net[4] = nn.Linear(24, 10)

    student = Wider()
    loss = DistillationLoss(teacher, temperature=4.0, alpha=0.5, features=[("net.2", "net.2")])
    Trainer(student, train, config=config, loss=loss, progress=False,
            checkpoint_dir=tmp_path / "ckpt").fit()
    adapter = loss.adapters["0"]
    assert isinstance(adapter, nn.Linear) and adapter.weight.shape == (16, 24)
    assert all(torch.equal(teacher_state[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())  # never part of the backward
    accuracy = evaluate(student, TensorLoader(digits.test, batch_size=500))["accuracy"]
    assert accuracy > 0.85
    # The adapter is checkpointed with the model, so a resumed run continues with it.
    fresh = DistillationLoss(teacher, features=[("net.2", "net.2")])
    resumed = Trainer(Wider(), train, config=config, loss=fresh, progress=False,
                      checkpoint_dir=tmp_path / "ckpt")
    resumed.fit(resume=True)
    assert torch.equal(fresh.adapters["0"].weight, adapter.weight)
