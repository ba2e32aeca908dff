from pathlib import Path

import pytest
import torch

from torchslim import artifact
from torchslim.errors import ArtifactError, ConfigError
from torchslim.models import create_model
from torchslim.testing import TinyMLP, assert_same_outputs


@pytest.mark.parametrize("name", ["lenet300", "lenet5", "resnet-small"])
def test_save_load_gives_identical_outputs(tmp_path: Path, name: str) -> None:
    model = create_model(name, pretrained=False)
    if name == "resnet-small":  # non-trivial BN statistics must survive too
        model.train()
        model(torch.randn(16, 1, 28, 28))
        model.eval()
    path = artifact.save(model, tmp_path / "model.slim", metadata={"note": "x"})
    reloaded = artifact.load(path)
    assert_same_outputs(model, reloaded, torch.randn(4, 1, 28, 28))
    assert artifact.read_metadata(path)["metadata"] == {"note": "x"}
    assert artifact.read_metadata(path)["model"]["name"] == name


def test_unregistered_model_needs_a_spec_and_loads_into_a_given_module(tmp_path: Path) -> None:
    model = TinyMLP()
    with pytest.raises(ConfigError, match="create_model"):
        artifact.save(model, tmp_path / "m.slim")
    registered = create_model("lenet300", pretrained=False, input_shape=(1, 8, 8))
    path = artifact.save(registered, tmp_path / "m.slim")
    with pytest.raises(ArtifactError, match="does not fit"):
        artifact.load(path, model=TinyMLP())


def test_wrong_version_is_refused_with_the_fix(tmp_path: Path) -> None:
    from torchslim.safefile import write_checked

    path = tmp_path / "future.slim"
    write_checked(path, {}, {"format": artifact.ARTIFACT_FORMAT, "version": 99, "model": {}})
    with pytest.raises(ArtifactError, match="version 99"):
        artifact.load(path)
