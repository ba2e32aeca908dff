"""The MLPs of Hinton et al.'s MNIST distillation, registered by name."""

import pytest
import torch

from torchslim import artifact
from torchslim.errors import ConfigError
from torchslim.models import create_model
from torchslim.models.mlp import MLP
from torchslim.training import Trainer, make_train_config


@pytest.mark.parametrize(("name", "widths", "dropout", "input_dropout"), [
    ("mlp-1200-1200", [(1200, 784), (1200, 1200), (10, 1200)], 0.5, 0.2),
    ("mlp-800-800", [(800, 784), (800, 800), (10, 800)], 0.0, 0.0),
])
def test_registered_shapes_and_dropout(name, widths, dropout, input_dropout, tmp_path) -> None:
    model = create_model(name, pretrained=False)
    assert [tuple(getattr(model, f"fc{i}").weight.shape) for i in (1, 2, 3)] == widths
    assert (model.dropout.p, model.input_dropout.p) == (dropout, input_dropout)
    assert tuple(model(torch.zeros(3, 1, 28, 28)).shape) == (3, 10)
    loaded = artifact.load(artifact.save(model, tmp_path / "m.slim"))
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(loaded.eval()(x), model.eval()(x))


def test_train_config_dropout_leaves_the_input_dropout_alone() -> None:
    model = create_model("mlp-1200-1200", input_shape=(1, 8, 8), pretrained=False)
    batches = [(torch.randn(4, 1, 8, 8), torch.arange(4))]
    Trainer(model, batches, config=make_train_config(epochs=1, dropout=0.3), progress=False)
    assert (model.dropout.p, model.input_dropout.p) == (0.3, 0.2)


def test_bad_widths_are_refused() -> None:
    with pytest.raises(ConfigError, match="hidden widths"):
        MLP(hidden=())
