import contextlib
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchslim import artifact
from torchslim.errors import ArtifactError
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


def test_any_module_saves_without_a_spec_and_loads_into_a_given_instance(tmp_path: Path) -> None:
    model = TinyMLP()
    x = torch.randn(3, 1, 8, 8)
    path = artifact.save(model, tmp_path / "m.slim", example_inputs=x)
    document = artifact.read_metadata(path)
    assert "model" not in document
    assert document["module"]["class"] == "torchslim.testing.TinyMLP"  # information only
    assert document["inputs"] == {"kind": "tensor", "shape": [1, 8, 8], "dtype": "float32"}
    with pytest.raises(ArtifactError, match=r"torchslim.testing.TinyMLP.*model=YourClass"):
        artifact.load(path)  # never imports the class
    reloaded = artifact.load(path, model=TinyMLP())
    assert_same_outputs(model, reloaded, x)
    assert reloaded.torchslim_inputs == document["inputs"]
    registered = create_model("lenet300", pretrained=False, input_shape=(1, 8, 8))
    path = artifact.save(registered, tmp_path / "r.slim")
    with pytest.raises(ArtifactError, match="does not fit"):
        artifact.load(path, model=TinyMLP())


def test_wrong_version_is_refused_with_the_fix(tmp_path: Path) -> None:
    from torchslim.safefile import write_checked

    path = tmp_path / "future.slim"
    write_checked(path, {}, {"format": artifact.ARTIFACT_FORMAT, "version": 99, "model": {}})
    with pytest.raises(ArtifactError, match="version 99"):
        artifact.load(path)


def _compressed_lenet(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    from torchslim.api import apply_, finalize_
    from torchslim.clustering import WeightSharing
    from torchslim.pruning import WeightPruning

    model = create_model("lenet300", pretrained=False, input_shape=(1, 8, 8))
    apply_(model, WeightPruning(sparsity=0.9))
    apply_(model, WeightSharing(bits=4))
    finalize_(model)
    return model, artifact.save(model, tmp_path / "c.slim", encoding=artifact.Encoding())


@pytest.mark.parametrize("coder", ["raw", "huffman", "zstd", "ans", "auto"])
def test_encoded_artifact_is_bit_exact_and_small(tmp_path: Path, coder: str) -> None:
    model, _ = _compressed_lenet(tmp_path)
    dense = artifact.save(model, tmp_path / "dense.slim")
    path = artifact.save(model, tmp_path / f"{coder}.slim", encoding=artifact.Encoding(coder=coder))
    loaded = artifact.load(path).state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor.view(torch.uint8), loaded[name].view(torch.uint8)), name
    assert path.stat().st_size * 8 < dense.stat().st_size


def test_newer_encoded_version_is_refused(tmp_path: Path) -> None:
    from torchslim.safefile import read_checked, write_checked

    _, path = _compressed_lenet(tmp_path)
    tensors, document = read_checked(path)
    write_checked(path, tensors, {**document, "version": 7})
    with pytest.raises(ArtifactError, match="version 7"):
        artifact.load(path)


_CORRUPT_SOURCE: dict[str, bytes] = {}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_loader_on_corrupted_bytes_only_raises_artifact_error(tmp_path: Path, data) -> None:
    if "file" not in _CORRUPT_SOURCE:
        _, path = _compressed_lenet(tmp_path)
        _CORRUPT_SOURCE["file"] = path.read_bytes()
    original = bytearray(_CORRUPT_SOURCE["file"])
    mode = data.draw(st.sampled_from(["flip", "truncate", "splice"]))
    if mode == "truncate":
        corrupted = original[:data.draw(st.integers(0, len(original) - 1))]
    else:
        corrupted = original
        for _ in range(data.draw(st.integers(1, 8))):
            at = data.draw(st.integers(0, len(original) - 1))
            corrupted[at] = data.draw(st.integers(0, 255)) if mode == "splice" else corrupted[at] ^ 0xFF
    target = tmp_path / "bad.slim"
    target.write_bytes(bytes(corrupted))
    with contextlib.suppress(ArtifactError):  # anything else fails the test
        artifact.load(target)
