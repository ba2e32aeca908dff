"""Every technique on models torchslim has never seen (tests/user_zoo.py): a Conv2d subclass with
TF-"SAME" padding, GroupNorm, a residual net returning a tuple, a 2-layer LSTM, a model taking
keyword inputs, nn.MultiheadAttention. Each check asserts a change (or a refusal that names the
layer): a silent no-op fails here."""

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import user_zoo as zoo
from torchslim import apply_, artifact, finalize_
from torchslim.calibration import call_model, logits_of
from torchslim.cli import main
from torchslim.errors import NothingChangedWarning, UnsupportedModuleError
from torchslim.lowrank import LowRank
from torchslim.pruning import ChannelPruning, WeightPruning

NAMES = sorted(zoo.MODELS)
ZOO = str(Path(__file__).parent / "user_zoo.py")
# What structured pruning cannot cut, and the name it must give (everything else must shrink).
REFUSED = {"lstm": r"lstm \(LSTM\) has no channel rule"}


def _weights(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]


def _run(model: nn.Module, inputs: object) -> torch.Tensor:
    with torch.no_grad():
        return logits_of(call_model(model, inputs))


def _positional(inputs: object) -> tuple:
    return tuple(inputs.values()) if isinstance(inputs, dict) else (inputs,)


@pytest.mark.parametrize("name", NAMES)
def test_unstructured_pruning_masks_every_weight_layer(name: str) -> None:
    model, x = zoo.build(name), zoo.example(name)
    before = _run(model, x)
    result = apply_(model, WeightPruning(sparsity=0.5))
    finalize_(model)
    assert set(result["sparsity"]) == {n for n, _ in _weights(model)}
    for layer_name, layer in _weights(model):
        assert float((layer.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01), layer_name
    assert not torch.equal(_run(model, x), before)


@pytest.mark.parametrize("name", NAMES)
def test_structured_pruning_shrinks_the_model_or_names_what_it_cannot_cut(name: str) -> None:
    model, x = zoo.build(name), zoo.example(name)
    shapes = [tuple(t.shape) for t in (lambda o: o if isinstance(o, tuple) else (o,))(call_model(model, x))]
    if name in REFUSED:
        with pytest.warns(NothingChangedWarning, match=REFUSED[name]):
            result = apply_(model, ChannelPruning(ratio=0.5), example_inputs=_positional(x))
        assert result["params_after"] == result["params_before"]
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error", NothingChangedWarning)
        result = apply_(model, ChannelPruning(ratio=0.5), example_inputs=_positional(x))
    assert result["params_after"] < 0.75 * result["params_before"], result["sizes"]
    out = call_model(model, x)
    assert [tuple(t.shape) for t in (out if isinstance(out, tuple) else (out,))] == shapes


@pytest.mark.parametrize("name", NAMES)
def test_low_rank_factorizes_what_it_can_and_says_what_it_left(name: str) -> None:
    model, x = zoo.build(name), zoo.example(name)
    result = apply_(model, LowRank(param_ratio=0.5))
    assert result["replaced"] and result["params_after"] < result["params_before"]
    assert _run(model, x).shape == (len(next(iter(x.values())) if isinstance(x, dict) else x), 10)
    if name == "attention":
        assert "attention.out_proj" in result["skipped"]


@pytest.mark.parametrize("method", ["dynamic", "static"])
@pytest.mark.parametrize("name", NAMES)
def test_int8_runs_on_real_kernels_or_is_refused_clearly(name: str, method: str) -> None:
    pytest.importorskip("onnxruntime")
    from torchslim.quantization import Quantization, quantize_model

    model, x = zoo.build(name), zoo.example(name, 16)
    train = zoo.loaders(name)["train"]
    if name == "dict_input":
        with pytest.raises(UnsupportedModuleError, match="one tensor input"):
            quantize_model(model, Quantization(method=method), example_inputs=x, calibration=train)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # dynamic int8 on convolutions: a known warning
        int8 = quantize_model(model, Quantization(method=method), example_inputs=x[:2], calibration=train)
    assert int8.report["int8_ops"], int8.report
    reference = _run(model, x)
    assert (_run(int8, x) - reference).abs().max() < 0.25 * reference.abs().max() + 0.05
    with torch.no_grad():  # the program returns what the model returns: a tuple stays a tuple
        assert type(int8(x)) is type(model(x))
    if name == "lstm" and method == "static":
        assert any("LSTM" in op for op in int8.report["float_ops"])  # said, not silently float


@pytest.mark.parametrize("name", NAMES)
def test_distillation_fine_tunes_through_the_trainer_on_a_plain_dataloader(name: str) -> None:
    from torchslim.distillation import DistillationLoss
    from torchslim.training import Trainer, make_train_config

    model, data = zoo.build(name), zoo.loaders(name)
    before = [p.detach().clone() for p in model.parameters()]
    history = Trainer(model, data["train"], val_loader=data["val"], progress=False,
                      config=make_train_config(epochs=1, lr=0.01, optimizer="adam"),
                      loss=DistillationLoss(zoo.build(name), temperature=4, alpha=0.5)).fit()
    assert len(history) == 1 and history[0].val_accuracy is not None
    assert torch.isfinite(torch.tensor(history[0].train_loss))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_every_model_saves_and_loads_in_a_fresh_process_with_identical_outputs(tmp_path: Path) -> None:
    for name in NAMES:
        model, x = zoo.build(name), zoo.example(name)
        apply_(model, WeightPruning(sparsity=0.3))
        finalize_(model)
        if name not in REFUSED:
            apply_(model, ChannelPruning(ratio=0.25), example_inputs=_positional(x))
        artifact.save(model, tmp_path / f"{name}.slim", example_inputs=x)
        torch.save({"x": x, "y": _run(model, x)}, tmp_path / f"{name}.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(ZOO).parent)!r})
        import user_zoo as zoo, torchslim
        from torchslim.calibration import call_model, logits_of
        for name in {NAMES!r}:
            model = torchslim.load({str(tmp_path)!r} + f"/{{name}}.slim", model=zoo.build(name))
            saved = torch.load({str(tmp_path)!r} + f"/{{name}}.pt")
            with torch.no_grad():
                assert torch.equal(logits_of(call_model(model, saved["x"])), saved["y"]), name
        print("identical")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.stdout.strip() == "identical", result.stderr[-2000:]


@pytest.mark.parametrize("name", ["same_conv", "group_norm", "lstm"])
def test_cli_round_trip_through_factory_strings(name: str, tmp_path: Path, capsys) -> None:
    model_spec, data_spec = f"{ZOO}:build_{name}", f"{ZOO}:loaders_{name}"
    structured = [] if name in REFUSED else ["--structured"]
    out = tmp_path / "p"
    assert main(["prune", "--model", model_spec, "--dataset", data_spec, *structured, "--ratio", "0.5",
                 "--epochs", "1", "--lr", "0.01", "--no-progress", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    if structured:
        assert report["final"]["params"] < report["baseline"]["params"]
    else:
        assert report["final"]["nonzero_params"] < report["baseline"]["nonzero_params"]
    capsys.readouterr()
    assert main(["evaluate", str(out / "model.slim"), "--factory", model_spec, "--dataset", data_spec,
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == report["final"]["test_accuracy"]


def test_cli_trains_and_scans_a_user_model_on_user_data(tmp_path: Path, capsys) -> None:
    model_spec, data_spec = f"{ZOO}:build_group_norm", f"{ZOO}:loaders_group_norm"
    assert main(["train", "--model", model_spec, "--dataset", data_spec, "--epochs", "2", "--lr", "0.01",
                 "--optimizer", "adam", "--no-progress", "--out", str(tmp_path / "t")]) == 0
    report = json.loads((tmp_path / "t" / "report.json").read_text())
    assert report["model"] == "GroupNormNet" and report["test_accuracy"] > report["initial_test_accuracy"]
    trained = tmp_path / "t" / "model.slim"
    assert main(["sensitivity", "--model", str(trained), "--factory", model_spec, "--dataset", data_spec,
                 "--sparsities", "0.5", "0.9", "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    scan = json.loads((tmp_path / "s" / "sensitivity.json").read_text())
    assert set(scan["layers"]) == {"features.0", "features.3", "head"}


def test_auto_searches_a_user_model_on_user_data(tmp_path: Path) -> None:
    from torchslim.apps.auto import Target, auto_compress

    report = auto_compress(f"{ZOO}:build_same_conv", target=Target("macs", 2), max_drop=1.0,
                           out=tmp_path / "auto", dataset=f"{ZOO}:loaders_same_conv", trials=2, epochs=1,
                           progress=False)
    assert report["model"] == "SameConvNet" and report["final"]["ratios"]["macs"] >= 2
    assert (tmp_path / "auto" / "model.slim").is_file()


def _gpt2(transformers: Any) -> tuple[nn.Module, Any, torch.Tensor]:
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=16)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval(), config, torch.randint(0, 100, (2, 8))


CONV1D = [f"transformer.h.{i}.{layer}" for i in range(2)
          for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def test_gpt2_conv1d_layers_are_pruned_as_the_linears_they_are_and_reload(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    model, config, ids = _gpt2(transformers)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NothingChangedWarning)
        pruned = apply_(model, WeightPruning(sparsity=0.5))
    assert set(CONV1D) < set(pruned.changed) and not pruned.skipped
    assert pruned.changed["transformer.h.1.mlp.c_proj"] == "Conv1D as Linear; weight parametrized (Mask)"
    finalize_(model)
    assert float((model.transformer.h[0].mlp.c_fc.weight == 0).float().mean()) > 0.3
    path = artifact.save(model, tmp_path / "gpt2.slim", example_inputs=ids)
    reloaded = artifact.load(path, model=transformers.GPT2LMHeadModel(config))
    assert torch.equal(_run(reloaded, ids), _run(model, ids))


@pytest.mark.parametrize("technique", ["low_rank", "weight_only", "cluster", "torch_int8"])
def test_every_layer_technique_handles_gpt2_conv1d_and_never_unties_the_head(technique: str) -> None:
    transformers = pytest.importorskip("transformers")
    from torchslim.clustering import WeightSharing
    from torchslim.quantization.torch_int8 import quantize_linears_int8_
    from torchslim.quantization.weight_only import WeightOnly

    model, _, ids = _gpt2(transformers)
    before = _run(model, ids)
    configs = {"low_rank": LowRank(rank=8), "weight_only": WeightOnly(bits=8, group_size=32),
               "cluster": WeightSharing(bits=6)}
    if technique == "torch_int8":
        result: dict[str, Any] = quantize_linears_int8_(model)
        changed = result["replaced"]
    else:
        result = apply_(model, configs[technique])
        changed = list(result.changed)
    assert set(CONV1D) <= set(changed)
    if technique in ("low_rank", "weight_only", "torch_int8"):  # replacing the head would untie it
        assert "tied to transformer.wte.weight" in result["skipped"]["lm_head"]
        assert model.lm_head.weight is model.transformer.wte.weight
    after = _run(model, ids)
    assert after.shape == before.shape and not torch.equal(after, before)
    if technique != "low_rank":  # 8-bit and 64-value codebooks: close to the original
        assert float((after - before).abs().max()) < 0.05
