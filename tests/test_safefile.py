from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from torchslim.errors import ArtifactError
from torchslim.safefile import (
    flatten_state,
    read_checked,
    unflatten_state,
    write_atomic,
    write_checked,
)


def _nested_state() -> dict:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    return {"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
            "pair": (1, "a", None), "scalar": 0.5}


def test_nested_state_round_trips_with_tuples_int_keys_and_tensors(tmp_path: Path) -> None:
    state = _nested_state()
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten_state(state, tensors)
    write_checked(tmp_path / "s.ckpt", tensors, {"state": skeleton})
    loaded_tensors, document = read_checked(tmp_path / "s.ckpt")
    restored = unflatten_state(document["state"], loaded_tensors)
    assert restored["pair"] == (1, "a", None)
    assert restored["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert set(restored["optimizer"]["state"]) == {0, 1}
    assert torch.equal(restored["optimizer"]["state"][0]["exp_avg"],
                       state["optimizer"]["state"][0]["exp_avg"])
    assert torch.equal(restored["rng"], state["rng"])


def test_objects_that_need_pickle_are_refused() -> None:
    with pytest.raises(TypeError, match="without pickle"):
        flatten_state({"bad": object()}, {})


def _written(tmp_path: Path) -> Path:
    path = tmp_path / "m.slim"
    write_checked(path, {"w": torch.arange(100, dtype=torch.float32)}, {"a": 1})
    return path


def test_altered_byte_fails_the_checksum(tmp_path: Path) -> None:
    path = _written(tmp_path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum"):
        read_checked(path)


def test_truncated_file_is_an_artifact_error(tmp_path: Path) -> None:
    path = _written(tmp_path)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ArtifactError, match="truncated"):
        read_checked(path)


def test_plain_safetensors_and_missing_files_are_named(tmp_path: Path) -> None:
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ArtifactError, match="not a torchslim file"):
        read_checked(plain)
    with pytest.raises(ArtifactError, match="does not exist"):
        read_checked(tmp_path / "missing.slim")


def test_failed_write_leaves_neither_file_nor_temp(tmp_path: Path) -> None:
    def explode(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomic(tmp_path / "out.slim", explode)
    assert list(tmp_path.iterdir()) == []
