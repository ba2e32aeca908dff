"""Network slimming (BN L1 callback) and learned channel gates, in the real trainer."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from torchslim.api import apply_
from torchslim.data import TensorLoader, load_dataset
from torchslim.errors import ConfigError
from torchslim.pruning import ChannelPruning
from torchslim.pruning.slimming import BatchNormSparsity, GateSparsity, attach_gates_
from torchslim.testing import ResidualAdd, assert_same_outputs
from torchslim.training import Trainer, make_train_config


class DigitsNet(nn.Module):
    """8x8 digits -> conv-BN-ReLU (16) -> conv-BN-ReLU (16) -> pool -> 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(self.features(x).mean(dim=(2, 3)))
        return out


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


def fit(model: nn.Module, data, *, epochs: int, callbacks=(), loss=None, optimizer="adam", lr=0.01) -> None:
    config = make_train_config(epochs=epochs, batch_size=64, optimizer=optimizer, lr=lr, seed=0,
                               momentum=0.9 if optimizer == "sgd" else 0.0)
    Trainer(model, TensorLoader(data.train, batch_size=64, shuffle=True, seed=0), config=config,
            callbacks=callbacks, loss=loss, progress=False).fit()


def gammas(model: nn.Module) -> torch.Tensor:
    return torch.cat([m.weight.detach().abs() for m in model.modules() if isinstance(m, nn.BatchNorm2d)])


def test_bn_l1_penalty_zeroes_gammas_and_bn_scale_pruning_removes_exactly_those(digits):
    from torchslim.measure import evaluate

    torch.manual_seed(0)
    plain, slim = DigitsNet(), DigitsNet()
    slim.load_state_dict(plain.state_dict())
    fit(plain, digits, epochs=8, optimizer="sgd", lr=0.1)
    fit(slim, digits, epochs=8, optimizer="sgd", lr=0.1, callbacks=(BatchNormSparsity(strength=0.03),))
    assert float(gammas(slim).sum()) < 0.5 * float(gammas(plain).sum())
    assert int((gammas(slim) < 0.05).sum()) >= 6 > int((gammas(plain) < 0.05).sum())
    test = TensorLoader(digits.test, batch_size=500)
    before, threshold = evaluate(slim, test)["accuracy"], float(gammas(slim).sort().values[5])
    apply_(slim, ChannelPruning(ratio=0.2, importance="bn_scale", scope="global"),
           example_inputs=digits.test.images[:2])
    assert len(gammas(slim)) == 26 and float(gammas(slim).min()) >= threshold  # the 6 smallest went
    assert evaluate(slim, test)["accuracy"] > before - 0.08  # they carried little


def test_folding_gates_keeps_the_function_and_gate_pruning_removes_the_closed_ones():
    torch.manual_seed(0)
    model = ResidualAdd().eval()
    x = torch.randn(2, 3, 8, 8)
    gates = attach_gates_(model, x)
    assert sorted(len(g) for g in gates.gates) == [8, 8]
    with torch.no_grad():
        for gate in gates.gates:
            gate.copy_(torch.tensor([1.0, 0.0, 0.5, 0.0, 2.0, 1.0, 0.0, 1.0]))
    gated = copy.deepcopy(model)  # hooks come along: the gated function
    gates.fold_(model)
    assert not model.stem._forward_hooks
    assert_same_outputs(gated, model, x, atol=1e-5)
    apply_(model, ChannelPruning(ratio=3 / 8, importance="gate"), example_inputs=x)
    assert model.stem.out_channels == 5 and model.conv1.out_channels == 5
    assert not hasattr(model, "torchslim_gate_scores")


def test_gate_sparsity_loss_trains_gates_with_the_model(digits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    gates = attach_gates_(model, digits.train.images[:2])
    fit(model, digits, epochs=3, loss=GateSparsity(gates, strength=0.05))
    values = gates.gates[0].detach().abs()
    assert float(values.mean()) < 0.9  # the penalty pulled the gates down from 1
    assert float(values.max()) > float(values.min()) + 0.1  # ... but not all alike


def test_gate_importance_without_gates_says_how_to_get_them():
    with pytest.raises(ConfigError, match="attach_gates_"):
        apply_(ResidualAdd(), ChannelPruning(ratio=0.5, importance="gate"),
               example_inputs=torch.randn(2, 3, 8, 8))


def test_training_with_gates_killed_after_an_epoch_resumes_to_the_same_gates(digits, tmp_path):
    from torchslim.training import Callback

    class StopAfterFirstEpoch(Callback):
        def on_epoch_end(self, trainer, record):
            if record.epoch == 1:
                raise KeyboardInterrupt  # before this epoch's checkpoint

    def run(folder, callbacks=(), resume=False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        gates = attach_gates_(model, digits.train.images[:2])
        config = make_train_config(epochs=3, batch_size=64, optimizer="adam", lr=0.01, seed=0)
        trainer = Trainer(model, TensorLoader(digits.train, batch_size=64, shuffle=True, seed=0),
                          config=config, callbacks=callbacks, loss=GateSparsity(gates, strength=0.05),
                          checkpoint_dir=folder, progress=False)
        trainer.fit(resume=resume)
        return model, gates

    reference, reference_gates = run(tmp_path / "ref")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "run", callbacks=[StopAfterFirstEpoch()])
    model, gates = run(tmp_path / "run", resume=True)
    assert torch.equal(gates.gates[0], reference_gates.gates[0])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters(), strict=True))
