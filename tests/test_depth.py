from pathlib import Path

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.depth import LayerDropping
from torchslim.errors import ConfigError
from torchslim.models import create_model
from torchslim.testing import assert_same_outputs


class Stack(nn.Module):
    """Four residual Linear blocks in a ModuleList, like a transformer encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(6, 6) for _ in range(4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


def test_kept_blocks_keep_their_weights_and_order() -> None:
    model = Stack()
    kept = [model.blocks[0], model.blocks[2]]
    result = ts.apply_(model, LayerDropping(stack="blocks", keep=(0, 2)))
    assert result["removed"] == 2 and result["params_after"] == 2 * 42
    assert list(model.blocks) == kept
    x = torch.randn(3, 6)
    expected = x + kept[0](x)
    assert torch.allclose(model(x), expected + kept[1](expected))


def test_bad_stack_or_indices_name_the_valid_choices() -> None:
    with pytest.raises(ConfigError, match=r"no module .layers.*ModuleList / Sequential.*blocks"):
        ts.apply_(Stack(), LayerDropping(stack="layers", keep=(0,)))
    with pytest.raises(ConfigError, match=r"keep=\[0, 4\].*valid: 0\.\.3"):
        ts.apply_(Stack(), LayerDropping(stack="blocks", keep=(0, 4)))
    with pytest.raises(ConfigError, match="keep"):
        LayerDropping(stack="blocks", keep=())


def test_shallow_registered_model_round_trips(tmp_path: Path) -> None:
    model = create_model("resnet-small", pretrained=False).eval()
    # Block 1 maps 16 -> 16 channels at stride 1: dropping it keeps every shape.
    result = ts.apply_(model, LayerDropping(stack="blocks", keep=(0, 2, 3, 4, 5)))
    assert len(model.blocks) == 5 and result["params_after"] < result["params_before"]
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert_same_outputs(model, ts.load(ts.save(model, tmp_path / "m.slim")), torch.randn(2, 1, 28, 28))
