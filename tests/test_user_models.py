"""A user's own model and data, from files torchslim has never seen: save/load of any module
(in a fresh process), the CLI through FILE.py:FUNCTION factories, bench and export from the
recorded input signature, int8 programs that load on their own, and clean errors for bad factories."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from torchslim import apply_, artifact, finalize_
from torchslim.cli import main
from torchslim.factories import build_from_factory, load_data_factory
from torchslim.pruning import WeightPruning

NETS = '''
import torch
from torch import nn


class SameConv(nn.Conv2d):
    """TF-"SAME" padding: pads in forward, then convolves its own weight."""

    def forward(self, x):
        pad = self.kernel_size[0] - 1
        x = nn.functional.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
        return nn.functional.conv2d(x, self.weight, self.bias, self.stride)


class UserNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = SameConv(1, 8, 3)
        self.norm = nn.GroupNorm(2, 8)
        self.head = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.conv(x))).flatten(1))


def build_model():
    torch.manual_seed(0)
    return UserNet()


def broken():
    raise RuntimeError("weights file missing")


def not_a_model():
    return 42
'''

DATA = '''
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset


def loaders():
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(digits.target)
    sets = {"train": (x[:1200], y[:1200]), "val": (x[1200:1500], y[1200:1500]), "test": (x[1500:], y[1500:])}
    return {name: DataLoader(TensorDataset(*pair), batch_size=64, shuffle=name == "train")
            for name, pair in sets.items()}


def no_train():
    return {"val": []}
'''


@pytest.fixture
def user_code(tmp_path: Path) -> Path:
    (tmp_path / "nets.py").write_text(NETS)
    (tmp_path / "data.py").write_text(DATA)
    return tmp_path


def _json(capsys, argv: list[str]) -> dict:
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_any_module_saves_and_loads_in_a_fresh_process_with_identical_outputs(user_code: Path) -> None:
    model = build_from_factory(f"{user_code}/nets.py:build_model")
    x = torch.randn(4, 1, 8, 8)
    apply_(model, WeightPruning(sparsity=0.5))  # masks on the subclassed conv and the head, baked in
    finalize_(model)
    path = artifact.save(model, user_code / "user.slim", example_inputs=x)
    torch.save(x, user_code / "x.pt")
    torch.save(model(x).detach(), user_code / "y.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(user_code)!r})
        import torchslim, nets
        model = torchslim.load({str(path)!r}, model=nets.UserNet())
        x = torch.load({str(user_code / "x.pt")!r}); y = torch.load({str(user_code / "y.pt")!r})
        assert torch.equal(model(x), y), "outputs differ"
        print("same")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert result.stdout.strip() == "same", result.stderr[-2000:]


def test_cli_takes_factories_for_model_and_data(user_code: Path, capsys) -> None:
    model_spec, data_spec = f"{user_code}/nets.py:build_model", f"{user_code}/data.py:loaders"
    result = _json(capsys, ["evaluate", "--model", model_spec, "--dataset", data_spec, "--json"])
    assert result["samples"] == 297 and 0 <= result["accuracy"] <= 1 and result["params"] > 5000
    model = build_from_factory(model_spec)
    path = artifact.save(model, user_code / "m.slim", example_inputs=torch.zeros(2, 1, 8, 8))
    bench = _json(capsys, ["bench", str(path), "--factory", model_spec, "--repeats", "3", "--json"])
    assert bench["median_ms"] > 0
    for fmt in ("onnx", "pt2"):
        out = user_code / f"m.{fmt}"
        assert main(["export", str(path), "--factory", model_spec, "--format", fmt, "--out", str(out)]) == 0
        assert out.stat().st_size > 1000
    import onnxruntime

    session = onnxruntime.InferenceSession(str(user_code / "m.onnx"))
    x = torch.randn(3, 1, 8, 8)
    (onnx_out,) = session.run(None, {"input": x.numpy()})
    assert torch.allclose(torch.from_numpy(onnx_out), model(x), atol=1e-4)


def test_an_int8_program_of_a_user_model_loads_and_benchmarks_on_its_own(user_code: Path, capsys) -> None:
    from torchslim.quantization import Quantization, QuantMethod, quantize_model

    loaders = load_data_factory(f"{user_code}/data.py:loaders")
    model = build_from_factory(f"{user_code}/nets.py:build_model")
    batches = [x for x, _ in loaders["train"]][:4]
    int8 = quantize_model(model, Quantization(method=QuantMethod.STATIC), example_inputs=batches[0],
                          calibration=batches)
    path = artifact.save(int8, user_code / "q.slim")
    assert artifact.read_metadata(path)["module"]["class"].endswith("UserNet")
    bench = _json(capsys, ["bench", str(path), "--repeats", "3", "--json"])
    assert bench["backend"] == "onnxruntime"
    result = _json(capsys, ["evaluate", str(path), "--dataset", f"{user_code}/data.py:loaders", "--json"])
    assert result["backend"] == "onnxruntime" and result["samples"] == 297


@pytest.mark.parametrize(("argv", "problem"), [
    (["evaluate", "--model", "{d}/missing.py:build_model"], "does not exist"),
    (["evaluate", "--model", "{d}/nets.py:nope"], "has no function 'nope'"),
    (["evaluate", "--model", "{d}/nets.py:broken"], "raised RuntimeError: weights file missing"),
    (["evaluate", "--model", "{d}/nets.py:not_a_model"], "returned a int, not an nn.Module"),
    (["evaluate", "--model", "{d}/nets.py:build_model", "--dataset", "{d}/data.py:no_train"],
     "missing \\['train'\\]"),
    (["bench", "{d}/nets.py:build_model"], "inputs of UserNet are unknown"),
])
def test_bad_factories_are_one_clean_error(user_code: Path, capsys, argv: list[str], problem: str) -> None:
    import re

    assert main([a.format(d=user_code) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("torchslim: error:") and err.count("\n") == 1 and re.search(problem, err), err


def test_an_artifact_of_a_user_model_without_its_factory_names_the_class(user_code: Path, capsys) -> None:
    model = build_from_factory(f"{user_code}/nets.py:build_model")
    path = artifact.save(model, user_code / "m.slim", example_inputs=torch.zeros(1, 1, 8, 8))
    assert main(["bench", str(path)]) == 2
    assert "UserNet" in capsys.readouterr().err


def test_cli_quantizes_a_user_model_on_user_data_keeping_a_layer_in_float(user_code: Path, capsys) -> None:
    out = user_code / "q"
    assert main(["quantize", "--model", f"{user_code}/nets.py:build_model", "--dataset",
                 f"{user_code}/data.py:loaders", "--method", "static", "--exclude", "head",
                 "--threads", "1", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "UserNet"
    assert report["quantization"]["excluded"] == {"head": "kept in float by exclude="}
    assert report["after"]["backend"] == "onnxruntime" and report["after"]["samples"] == 297
    assert abs(report["after"]["accuracy"] - report["before"]["accuracy"]) < 0.05
    result = _json(capsys, ["evaluate", str(out / "model.slim"), "--dataset", f"{user_code}/data.py:loaders",
                            "--json"])
    assert result["accuracy"] == report["after"]["accuracy"]


def test_compare_measures_any_two_modules_interleaved(user_code: Path) -> None:
    import copy

    from torchslim.measure import compare
    from torchslim.pruning import ChannelPruning

    loaders = load_data_factory(f"{user_code}/data.py:loaders")
    before = build_from_factory(f"{user_code}/nets.py:build_model")
    after = copy.deepcopy(before)
    x = next(iter(loaders["val"]))[0]
    apply_(after, ChannelPruning(ratio=0.5), example_inputs=x[:2])
    result = compare(before, after, loaders["val"], example_inputs=x, rounds=3)
    assert result["comparison"]["macs_ratio"] > 1.5 and result["comparison"]["params_ratio"] > 1.5
    assert result["after"]["bytes"] < result["before"]["bytes"]
    assert {"accuracy", "median_ms"} <= result["after"].keys()
    agreement = compare(before, after, loaders["val"], example_inputs=x, rounds=1,
                        metric=lambda model, data: 0.5)
    assert agreement["after"]["accuracy"] == 0.5


def test_cli_prunes_and_fine_tunes_a_user_model_on_user_data_and_resumes(user_code: Path, capsys) -> None:
    model_spec, data_spec = f"{user_code}/nets.py:build_model", f"{user_code}/data.py:loaders"
    out = user_code / "p"
    argv = ["prune", "--model", model_spec, "--dataset", data_spec, "--structured", "--ratio", "0.5",
            "--epochs", "1", "--lr", "0.01", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "UserNet" and report["dataset"] == "user data"
    assert report["final"]["flops"] < report["baseline"]["flops"] / 1.8  # SameConv + GroupNorm pruned
    pruned = artifact.load(out / "model.slim", model=build_from_factory(model_spec))
    assert (pruned.conv.out_channels, pruned.norm.num_groups) == (4, 1)
    first = (out / "model.slim").read_bytes()
    (out / "model.slim").unlink()
    (out / "stages" / "02-fine_tune.slim").unlink()
    assert main([*argv, "--resume"]) == 0  # stage files of a user model reload through the factory
    assert (out / "model.slim").read_bytes() == first
    capsys.readouterr()
    result = _json(capsys, ["evaluate", str(out / "model.slim"), "--factory", model_spec,
                            "--dataset", data_spec, "--json"])
    assert result["accuracy"] == report["final"]["test_accuracy"]


def test_a_recipe_naming_the_users_model_trains_its_baseline_block(user_code: Path) -> None:
    recipe = {"version": 1, "model": f"{user_code}/nets.py:build_model",
              "dataset": f"{user_code}/data.py:loaders",
              "baseline": {"epochs": 3, "lr": 0.01, "optimizer": "adam"},
              "stages": [{"prune": {"sparsity": 0.5}}]}
    (user_code / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = user_code / "run"
    assert main(["compress", str(user_code / "recipe.yaml"), "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["baseline"]["test_accuracy"] > 0.8  # trained, not the random initialisation (~10%)
    assert (out / "stages" / "00-baseline.slim").is_file()
    # --model given: the recipe's baseline block is not used, and the run says so
    again = user_code / "again"
    assert main(["compress", str(user_code / "recipe.yaml"), "--model", str(out / "model.slim"),
                 "--factory", f"{user_code}/nets.py:build_model", "--out", str(again), "--quiet"]) == 0
    assert not (again / "stages" / "00-baseline.slim").exists()


class TwoHeads(torch.nn.Module):
    """A detector-style model: a dict holding a map and a tuple of two heads."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
        self.boxes = torch.nn.Conv2d(8, 4, 1)
        self.scores = torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> dict[str, object]:
        features = self.body(x)
        heads = (self.scores(features.mean((2, 3))), features.amax((1, 2, 3)))
        return {"map": self.boxes(features), "heads": heads}


def test_an_int8_program_keeps_every_output_of_a_dict_and_tuple_model(tmp_path: Path) -> None:
    from torchslim.quantization import Quantization, quantize_model, sqnr_db

    torch.manual_seed(0)
    model, x = TwoHeads().eval(), torch.rand(16, 3, 8, 8)
    for method in ("dynamic", "static"):
        int8 = quantize_model(model, Quantization(method=method), example_inputs=x[:2], calibration=[x])
        loaded = artifact.load(artifact.save(int8, tmp_path / f"{method}.slim"))
        with torch.no_grad():
            expected, got = model(x), loaded(x)
        assert set(got) == {"map", "heads"} and isinstance(got["heads"], tuple) and len(got["heads"]) == 2
        assert got["map"].shape == expected["map"].shape and got["heads"][1].shape == (16,)
        for want, have in ((expected["map"], got["map"]), *zip(expected["heads"], got["heads"], strict=True)):
            assert sqnr_db(want, have) > 20


class WithAuxLoss(torch.nn.Module):
    """Logits and a scalar auxiliary loss: the scalar has no batch dimension to export."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.fc(x)
        return logits, logits.pow(2).mean()


def test_an_output_without_a_batch_dimension_keeps_the_first_tensor_and_says_so() -> None:
    from torchslim.quantization import Quantization, quantize_model

    torch.manual_seed(0)
    model, x = WithAuxLoss().eval(), torch.randn(8, 8)
    with pytest.warns(UserWarning, match="without a batch dimension.*first tensor only"):
        int8 = quantize_model(model, Quantization(method="dynamic"), example_inputs=x[:2])
    with torch.no_grad():
        assert int8(x).shape == (8, 3)


def test_quantizing_a_zoo_model_on_data_of_another_shape_is_one_clear_error(tmp_path: Path, capsys) -> None:
    (tmp_path / "data.py").write_text(textwrap.dedent('''
        import torch
        from torch.utils.data import DataLoader, TensorDataset


        def loaders():
            x, y = torch.rand(32, 1, 20, 20), torch.randint(0, 10, (32,))
            return {"train": DataLoader(TensorDataset(x, y), batch_size=16),
                    "val": DataLoader(TensorDataset(x, y), batch_size=16)}
        '''))
    out = tmp_path / "q"
    assert main(["quantize", "lenet5", "--method", "static", "--batches", "1", "--dataset",
                 f"{tmp_path}/data.py:loaders", "--out", str(out)]) == 2
    assert "(1, 20, 20) per sample but lenet5 takes (1, 28, 28)" in capsys.readouterr().err
    assert not out.exists()
