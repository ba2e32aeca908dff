import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim import artifact
from torchslim.cli import main
from torchslim.data import TensorLoader
from torchslim.errors import ArtifactError, ConfigError
from torchslim.measure import evaluate
from torchslim.models import create_model
from torchslim.quantization import Quantization, quantize_model, sqnr_db
from torchslim.runtime.onnx_program import OrtModule, export_onnx
from torchslim.safefile import read_checked, write_checked
from torchslim.training import Trainer, make_train_config


@pytest.fixture(scope="module")
def trained(digits) -> nn.Module:
    torch.manual_seed(0)
    model = create_model("lenet300", pretrained=False, input_shape=(1, 8, 8), num_classes=10)
    Trainer(model, TensorLoader(digits.train, batch_size=64, shuffle=True),
            config=make_train_config(epochs=5, lr=0.1, batch_size=64), progress=False).fit()
    return model.eval()


def _calibration(digits) -> list[torch.Tensor]:
    return [digits.train.images[i * 64:(i + 1) * 64] for i in range(4)]


@pytest.mark.parametrize("method", ["static", "dynamic"])
def test_int8_model_runs_integer_ops_and_matches_float(trained, digits, method: str) -> None:
    int8 = quantize_model(trained, Quantization(method=method), example_inputs=digits.test.images[:2],
                          calibration=_calibration(digits))
    assert isinstance(int8, OrtModule)
    assert int8.report["int8_ops"] and not int8.report["float_ops"]
    x = digits.test.images[:200]
    with torch.no_grad():
        reference = trained(x)
    assert sqnr_db(reference, int8(x)) > 25  # int8: well above 20 dB on logits
    test = TensorLoader(digits.test, batch_size=500)
    assert evaluate(int8, test)["accuracy"] >= evaluate(trained, test)["accuracy"] - 0.01
    assert ts.measure.count_params(int8) == ts.measure.count_params(trained)


def test_int8_artifact_is_smaller_and_loads_to_the_same_outputs(trained, digits, tmp_path: Path) -> None:
    int8 = quantize_model(trained, Quantization(method="static"),
                          example_inputs=digits.test.images[:2], calibration=_calibration(digits))
    dense = ts.save(trained, tmp_path / "fp32.slim").stat().st_size
    path = ts.save(int8, tmp_path / "int8.slim")
    assert path.stat().st_size < dense / 3.2  # int8 weights: ~4x fewer bytes
    reloaded = ts.load(path)
    x = digits.test.images[:50]
    assert torch.equal(reloaded(x), int8(x))
    assert reloaded.report["int8_ops"] == int8.report["int8_ops"]
    tensors, document = read_checked(path)
    tensors["onnx"] = torch.full((500,), 0xFF, dtype=torch.uint8)  # not a protobuf
    write_checked(path, tensors, document)
    with pytest.raises(ArtifactError, match="not a valid ONNX protobuf"):
        artifact.load(path)


def _activation_scales(model: OrtModule) -> dict[str, float]:
    """Scale of each activation QuantizeLinear (weights are stored quantized, not quantized here)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(model.program).graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    return {node.input[0]: float(constants[node.input[1]]) for node in graph.node
            if node.op_type == "QuantizeLinear" and node.input[1] in constants
            and constants[node.input[1]].size == 1}


def test_each_calibration_method_chooses_its_own_activation_ranges(trained, digits) -> None:
    """`entropy` is a real KL search (onnxruntime's default bins made it minmax under another
    name), and `percentile` clips to the percentile asked for."""
    def quantized(**options) -> OrtModule:
        return quantize_model(trained, Quantization(method="static", **options),
                              example_inputs=digits.test.images[:2], calibration=_calibration(digits))

    minmax = _activation_scales(quantized())
    entropy = _activation_scales(quantized(calibrate="entropy"))
    clipped = _activation_scales(quantized(calibrate="percentile", percentile=99.0))
    assert minmax.keys() == entropy.keys() == clipped.keys() and len(minmax) >= 3
    assert any(entropy[k] < 0.9 * minmax[k] for k in minmax)  # KL clips some range
    assert all(clipped[k] <= minmax[k] * 1.001 for k in minmax)
    assert any(clipped[k] < 0.9 * minmax[k] for k in minmax)
    with pytest.raises(ConfigError, match=r"percentile=99\.0 is used by calibrate='percentile' only"):
        Quantization(method="static", percentile=99.0)


def test_bad_requests_are_clear_errors(trained, digits) -> None:
    with pytest.raises(ConfigError, match="needs calibration data"):
        quantize_model(trained, Quantization(method="static"), example_inputs=digits.test.images[:2],
                       calibration=[])
    with pytest.raises(ConfigError, match=r"bits=4.*use bits=8"):
        Quantization(bits=4)
    with pytest.raises(ConfigError, match="less than or equal to 8"):
        Quantization(bits=9)
    no_weights = nn.Sequential(nn.Flatten(), nn.ReLU())
    with pytest.raises(ConfigError, match="left every op in float"):
        quantize_model(no_weights, Quantization(), example_inputs=torch.randn(2, 1, 8, 8))


def test_quantize_cli_writes_an_artifact_evaluate_and_bench_run_on_int8(
        trained, tmp_path: Path, capsys) -> None:
    source = ts.save(trained, tmp_path / "fp32.slim")
    out = tmp_path / "q"
    assert main(["quantize", str(source), "--method", "static", "--calibration", "digits",
                 "--batches", "4", "--threads", "1", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["after"]["backend"] == "onnxruntime" and report["before"]["backend"] == "torch"
    assert report["comparison"]["bytes_ratio"] > 3.1  # int8 weights: 4x, less the JSON report kept with them
    assert report["after"]["accuracy"] >= report["before"]["accuracy"] - 0.01
    capsys.readouterr()
    assert main(["evaluate", str(out / "model.slim"), "--dataset", "digits", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["backend"] == "onnxruntime" and result["accuracy"] == report["after"]["accuracy"]
    assert main(["bench", str(out / "model.slim"), "--batch", "16", "--repeats", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["backend"] == "onnxruntime"
    assert main(["quantize", str(source), "--method", "static", "--calibration", "mnist",
                 "--out", str(tmp_path / "x")]) == 2
    assert "inputs (1, 28, 28)" in capsys.readouterr().err


def test_torch_backend_runs_int_mm_and_round_trips(trained, digits, tmp_path: Path) -> None:
    from torchslim.quantization.torch_int8 import Int8DynamicLinear

    int8 = quantize_model(trained, Quantization(backend="torch"), example_inputs=digits.test.images[:2])
    assert isinstance(int8.fc1, Int8DynamicLinear) and isinstance(trained.fc1, nn.Linear)
    assert int8.fc1.weight_int8.dtype == torch.int8
    x = digits.test.images[:200]
    with torch.no_grad():
        assert sqnr_db(trained(x), int8(x)) > 25
    path = ts.save(int8, tmp_path / "t.slim")
    assert path.stat().st_size < ts.save(trained, tmp_path / "f.slim").stat().st_size / 3
    assert torch.equal(ts.load(path)(x), int8(x))
    with pytest.raises(ConfigError, match="backend torch runs dynamic int8 only"):
        Quantization(method="static", backend="torch")
    with pytest.raises(ConfigError, match="no Linear layer"):
        quantize_model(nn.Sequential(nn.Conv2d(1, 2, 3)), Quantization(backend="torch"),
                       example_inputs=torch.randn(1, 1, 8, 8))


def test_onnxruntime_int8_agrees_with_the_fake_quant_reference(trained, digits) -> None:
    from torchslim.quantization import QuantSpec, quantize_dequantize

    reference = copy.deepcopy(trained)
    with torch.no_grad():  # our per-channel int8 weight grid, simulated in float
        for layer in (reference.fc1, reference.fc2, reference.fc3):
            layer.weight.copy_(quantize_dequantize(layer.weight, QuantSpec(bits=8, axis=0)))
    int8 = quantize_model(trained, Quantization(method="static"), example_inputs=digits.test.images[:2],
                          calibration=_calibration(digits))
    x = digits.test.images[:300]
    with torch.no_grad():
        simulated, real = reference(x), int8(x)
    # The two differ only by the activation quantization the real kernels add.
    assert sqnr_db(simulated, real) > 25
    assert float((simulated.argmax(1) == real.argmax(1)).float().mean()) > 0.98


class SequenceTagger(nn.Module):
    """Token ids (vocab given) or feature vectors -> a recurrent layer -> Linear on the last step."""

    def __init__(self, rnn: nn.RNNBase, *, vocab: int | None = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, rnn.input_size) if vocab else nn.Identity()
        self.rnn = rnn
        self.head = nn.Linear(rnn.hidden_size * (2 if rnn.bidirectional else 1), 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(x))  # (B, T, H * directions)
        return self.head(out[:, -1])


def _sequences(batch: int, steps: int, vocab: int | None) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, steps)) if vocab else torch.randn(batch, steps, 8)


@pytest.mark.parametrize("vocab", [None, 50], ids=["features", "token-ids"])
def test_lstm_runs_on_the_int8_lstm_kernel_and_matches_float(vocab: int | None) -> None:
    import onnx

    torch.manual_seed(0)
    lstm = nn.LSTM(8, 32, num_layers=2, bidirectional=True, batch_first=True)
    model = SequenceTagger(lstm, vocab=vocab).eval()
    int8 = quantize_model(model, Quantization(method="dynamic"), example_inputs=_sequences(2, 6, vocab))
    graph = onnx.load_from_string(int8.program).graph
    kernels = [node for node in graph.node if node.op_type == "DynamicQuantizeLSTM"]
    assert len(kernels) == 2 and not [node for node in graph.node if node.op_type == "LSTM"]
    int8_weights = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.INT8}
    assert all(set(node.input[1:3]) <= int8_weights for node in kernels)  # W and R stored int8
    assert int8.report["int8_ops"]["DynamicQuantizeLSTM"] == 2
    assert not any(op.startswith("LSTM") for op in int8.report["float_ops"])
    x = _sequences(16, 11, vocab)  # another batch size and sequence length than the export's
    with torch.no_grad():
        reference, real = model(x), int8(x)
    assert float(torch.cosine_similarity(reference.flatten(), real.flatten(), dim=0)) > 0.99
    assert sqnr_db(reference, real) > 25


def test_recurrent_layers_without_an_int8_kernel_are_reported_as_float() -> None:
    torch.manual_seed(0)
    model = SequenceTagger(nn.GRU(8, 16, batch_first=True)).eval()
    int8 = quantize_model(model, Quantization(), example_inputs=_sequences(4, 6, None))
    assert int8.report["int8_ops"]  # the head runs in int8
    assert any(op.startswith("GRU") for op in int8.report["float_ops"])  # the GRU fell back, said so
    x = _sequences(4, 9, None)
    with torch.no_grad():
        assert sqnr_db(model(x), int8(x)) > 25
    lstm = SequenceTagger(nn.LSTM(8, 16, batch_first=True)).eval()
    static = quantize_model(lstm, Quantization(method="static"), example_inputs=x,
                            calibration=[_sequences(4, 9, None) for _ in range(2)])
    assert any(op.startswith("LSTM") for op in static.report["float_ops"])  # no QDQ LSTM kernel
    on_torch = quantize_model(lstm, Quantization(backend="torch"), example_inputs=x)
    assert on_torch.report["float_ops"] == ["LSTM rnn"]  # only the head runs on torch._int_mm


def test_fp32_program_without_spin_wait_matches_the_module(trained, digits) -> None:
    """A float ONNX program runs as a module; `spin_wait=False` reaches onnxruntime's session."""
    x = digits.test.images[:20]
    program = OrtModule(export_onnx(trained, x[:2]), spin_wait=False)
    options = program.session().get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    with torch.no_grad():
        torch.testing.assert_close(program(x), trained(x), atol=1e-4, rtol=1e-4)
