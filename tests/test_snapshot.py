"""`apply_`'s rollback copy keeps the model's values in a temporary file, not in memory, and a
technique that fails halfway still leaves the model exactly as it was: values, tied weights,
parametrizations, dtypes and parameter attributes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from torchslim import apply_
from torchslim.pruning import SparseGPT, WeightPruning
from torchslim.snapshot import ModelSnapshot

transformers = pytest.importorskip("transformers")


class Doubling(nn.Module):
    """A user parametrization: the weight used is twice the one stored."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return 2 * weight


class Mixed(nn.Module):
    """Tied layers, a parametrized weight, a bf16 layer, a bool buffer and a buffer that views
    part of another one."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(6, 6)
        self.tied = nn.Linear(6, 6)
        self.tied.weight = self.first.weight
        self.half = nn.Linear(6, 3).to(torch.bfloat16)
        self.register_buffer("flags", torch.tensor([True, False, True]))
        self.register_buffer("table", torch.arange(12.0).reshape(3, 4))
        self.register_buffer("row", self.table[1])
        parametrize.register_parametrization(self.first, "bias", Doubling())
        self.first.weight.user_note = "kept"  # type: ignore[attr-defined]


def test_the_snapshot_holds_shapes_in_memory_and_restores_values_ties_and_attributes() -> None:
    torch.manual_seed(0)
    model = Mixed()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with ModelSnapshot(model) as before:
        on_meta = {name for name, p in before.structure.named_parameters(remove_duplicate=False)
                   if p.device.type == "meta"}
        assert on_meta == {name for name, _ in model.named_parameters(remove_duplicate=False)}
        assert before.structure.flags.device.type == "meta"
        assert before.structure.table.device.type == "cpu"  # shares its storage with `row`: kept in memory
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        restored = before.restore()
    state = restored.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
    assert restored.tied.weight is restored.first.weight
    assert restored.first.weight.user_note == "kept"
    assert restored.row.untyped_storage().data_ptr() == restored.table.untyped_storage().data_ptr()
    assert parametrize.is_parametrized(restored.first, "bias")
    assert torch.equal(restored.first.bias, 2 * expected["first.parametrizations.bias.original"])


class FailsWhenCalled(nn.Module):
    """A user activation with a bug: it raises on every call after the first `allowed`."""

    def __init__(self, allowed: int) -> None:
        super().__init__()
        self.calls, self.allowed = 0, allowed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > self.allowed:
            raise RuntimeError("user layer failed")
        return torch.nn.functional.silu(x)


def test_a_technique_failing_after_changing_layers_leaves_the_model_as_it_was() -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config).eval()
    model.model.layers[1].mlp.act_fn = FailsWhenCalled(allowed=0)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.randint(0, 128, (2, 16)) for _ in range(2)]
    with pytest.raises(RuntimeError, match="user layer failed"):
        apply_(model, SparseGPT(sparsity=0.5), calibration=batches)
    # block 0 was pruned before block 1 failed: the rollback is what restores it
    seen = [k for k, v in model.state_dict().items() if not torch.equal(v, expected[k])]
    assert seen == []
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert float((model.model.layers[0].mlp.up_proj.weight == 0).float().mean()) < 0.01


def test_changes_are_still_observed_per_layer_through_the_snapshot() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    changes = apply_(model, WeightPruning(sparsity=0.5))
    assert set(changes.changed) == {"0", "2"}
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_no_room_for_the_rollback_copy_is_one_clear_error_before_any_work(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "gone"))  # nothing can be written there
    model = nn.Sequential(nn.Linear(8, 8))
    before = model[0].weight.detach().clone()
    with pytest.raises(OSError, match="TMPDIR"):
        apply_(model, WeightPruning(sparsity=0.5))
    assert torch.equal(model[0].weight, before) and not parametrize.is_parametrized(model[0])
