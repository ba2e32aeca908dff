import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.data import TensorLoader
from torchslim.errors import ConfigError
from torchslim.measure import evaluate
from torchslim.models import create_model
from torchslim.quantization.qat import convert_qat, fold_batchnorm_, prepare_qat_, strip_qat_
from torchslim.training import Trainer, make_train_config


class ConvBN(nn.Module):
    """conv -> BN -> ReLU twice, then a linear head: the pattern BN folding must handle."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.flatten(1))


def test_batchnorm_folding_keeps_the_function_and_survives_save_load(tmp_path: Path) -> None:
    model = create_model("resnet-small", pretrained=False)
    model.train()
    model(torch.randn(16, 1, 28, 28))  # non-trivial running statistics
    model.eval()
    x = torch.randn(4, 1, 28, 28)
    reference = model(x)
    folded = fold_batchnorm_(model)
    assert len(folded) == 15 and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert torch.allclose(model(x), reference, atol=1e-4)
    assert torch.allclose(ts.load(ts.save(model, tmp_path / "f.slim"))(x), reference, atol=1e-4)


def test_prepared_model_sees_the_int8_grid_and_strip_restores_float() -> None:
    model = ConvBN().eval()
    x = torch.randn(8, 1, 8, 8)
    float_out = model(x)
    result = prepare_qat_(model)
    assert result["folded_batchnorm"] == ["conv1", "conv2"]
    assert result["layers"] == ["conv1", "conv2", "fc"]
    model.train()
    model(x)  # initialises the activation ranges
    model.eval()
    fake = model(x)
    assert 0 < float((fake - float_out).abs().max()) < 0.5 * float(float_out.abs().max())
    weight = model.conv2.weight  # through the parametrization: on a per-channel int8 grid
    steps = weight.detach().reshape(8, -1)
    scale = steps.abs().amax(1, keepdim=True) / 127
    assert torch.allclose(steps / scale, (steps / scale).round(), atol=1e-3)
    with pytest.raises(ConfigError, match="already prepared"):
        prepare_qat_(model)
    strip_qat_(model)
    assert not hasattr(model.fc, "input_quantizer")
    assert torch.allclose(model(x), float_out, atol=1e-4)


@pytest.mark.parametrize("learn_scale", [False, True])
def test_qat_trains_in_the_trainer_and_converts_to_int8(digits, learn_scale: bool) -> None:
    torch.manual_seed(0)
    model = create_model("lenet300", pretrained=False, input_shape=(1, 8, 8), num_classes=10)
    train = TensorLoader(digits.train, batch_size=64, shuffle=True)
    Trainer(model, train, config=make_train_config(epochs=5, lr=0.1, batch_size=64),
            progress=False).fit()
    test = TensorLoader(digits.test, batch_size=500)
    float_accuracy = evaluate(model, test)["accuracy"]
    qat = copy.deepcopy(model)
    prepare_qat_(qat, learn_scale=learn_scale)
    Trainer(qat, train, config=make_train_config(epochs=2, lr=0.01, batch_size=64),
            progress=False).fit()
    if learn_scale:
        assert qat.fc1.input_quantizer.log_scale.requires_grad
    calibration = [digits.train.images[:256]]
    int8 = convert_qat(qat, example_inputs=digits.test.images[:2], calibration=calibration)
    assert int8.report["qat"] and int8.report["int8_ops"]
    assert evaluate(int8, test)["accuracy"] >= float_accuracy - 0.02
    assert hasattr(qat.fc1, "input_quantizer")  # converting does not change the QAT model


def test_layers_left_out_of_qat_stay_in_float_after_conversion() -> None:
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    prepare_qat_(model, targets=ts.Select(types=("Linear",), exclude=("2",)))
    x = torch.randn(32, 8)
    model(x)  # observe input ranges
    int8 = convert_qat(model, example_inputs=x[:2], calibration=[x])
    report = int8.report
    assert report["qat"] and "2" in report["excluded"] and "0" not in report["excluded"]


class ScaledConv(nn.Conv2d):
    """A user's Conv2d subclass with its own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 0.5


class UserNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = ScaledConv(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = torch.relu(self.body(torch.relu(self.stem(x))))
        return {"logits": self.head(features.mean((2, 3)))}


@pytest.mark.parametrize("learn_scale", [False, True])
def test_conversion_keeps_the_input_grids_qat_trained_with(learn_scale: bool) -> None:
    pytest.importorskip("onnxruntime")
    from torchslim.quantization.layer_reconstruction import program_grids
    from torchslim.quantization.primitives import qparams_from_range
    from torchslim.quantization.qat import ACTIVATION_SPEC

    torch.manual_seed(0)
    model = UserNet()
    prepare_qat_(model, learn_scale=learn_scale)
    x = torch.randn(16, 3, 8, 8)
    model.train()
    model(x)  # the ranges start from what the layers see
    body = model.body.input_quantizer
    with torch.no_grad():  # as if training had learned a grid clipping half of the range
        body.max_val.mul_(0.5)
        body.log_scale.sub_(0.5)
    model.eval()
    int8 = convert_qat(model, example_inputs=x[:2], calibration=[x * 3])  # data of a wider range
    grids = program_grids(int8.program).inputs
    for name in ("stem", "body", "head"):
        quantizer = model.get_submodule(name).input_quantizer
        scale, zero = qparams_from_range(quantizer.min_val, quantizer.max_val, ACTIVATION_SPEC)
        if learn_scale:
            scale = quantizer.log_scale.detach().exp()
        assert grids[name][0] == pytest.approx(float(scale), rel=1e-4), name
        assert grids[name][1] == int(zero), name
    assert int8.report["input_ranges"] == {"applied": 3, "not_applied": {}}
    assert model.body.weight.shape == (8, 8, 3, 3)  # the QAT model itself still has its weights
    plain = strip_qat_(copy.deepcopy(model)).eval()
    with torch.no_grad():
        reference, quantized = plain(x)["logits"], int8(x)["logits"]
    assert torch.nn.functional.cosine_similarity(quantized.flatten(), reference.flatten(), dim=0) > 0.9



def test_a_trained_layer_the_forward_never_calls_is_named_not_applied() -> None:
    pytest.importorskip("onnxruntime")

    class WithSpare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second = nn.Linear(8, 16), nn.Linear(16, 4)
            self.spare = nn.Linear(4, 4)  # a user's leftover layer: prepared, never called

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            hidden = torch.relu(self.first(x))
            return self.second(hidden), hidden

    torch.manual_seed(0)
    model = WithSpare()
    prepare_qat_(model)
    x = torch.randn(32, 8)
    model(x)
    model.spare.input_quantizer(torch.randn(2, 4))  # it has a trained range, but no node
    int8 = convert_qat(model.eval(), example_inputs=x[:2], calibration=[x])
    assert int8.report["input_ranges"]["applied"] == 2
    assert "calibrated instead" in int8.report["input_ranges"]["not_applied"]["spare"]
