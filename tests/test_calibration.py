"""One data contract: any iterable of batches (DataLoader tuples, dicts, bare tensors), read lazily,
taken by pruning criteria (with labels) and by quantization (inputs only)."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchslim import apply_
from torchslim.calibration import Calibration, take_inputs, take_pairs
from torchslim.errors import ConfigError
from torchslim.pruning import WeightPruning


class CountingLoader:
    """An iterable of (x, y) batches that counts how many were read."""

    def __init__(self, batches: int = 100) -> None:
        self.batches, self.read = batches, 0

    def __iter__(self):
        for _ in range(self.batches):
            self.read += 1
            yield torch.randn(8, 4), torch.randint(0, 3, (8,))


def test_every_batch_form_gives_inputs_and_labels() -> None:
    x, y = torch.randn(10, 4), torch.arange(10) % 3
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    pairs = take_pairs(loader, 10)
    assert [tuple(p[0].shape) for p in pairs] == [(4, 4), (4, 4), (2, 4)]
    assert torch.equal(torch.cat([p[1] for p in pairs]), y)
    dict_batch = {"input_ids": torch.ones(2, 5, dtype=torch.long), "labels": torch.tensor([0, 1])}
    (inputs, labels), = take_pairs([dict_batch], 1)
    assert set(inputs) == {"input_ids"} and torch.equal(labels, torch.tensor([0, 1]))
    (bare, none), = take_pairs([x], 1)
    assert bare is x and none is None
    shifted = Calibration(loader, transform=lambda batch: batch[0] * 2)
    assert torch.equal(next(shifted.inputs()), x[:4] * 2)
    with pytest.raises(ConfigError, match="transform="):
        take_pairs(["not a batch"], 1)


def test_reading_is_lazy_and_capped_by_samples_or_batches() -> None:
    loader = CountingLoader()
    assert len(take_inputs(loader, 3)) == 3 and loader.read == 3
    loader = CountingLoader()
    sizes = [int(x.shape[0]) for x in Calibration(loader, num_samples=20).inputs()]
    assert sizes == [8, 8, 4] and loader.read == 3


def test_apply_takes_a_plain_dataloader_and_reads_only_what_it_needs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    loader = CountingLoader()
    result = apply_(model, WeightPruning(sparsity=0.5, criterion="taylor", calibration_batches=2),
                    calibration=loader)
    assert loader.read == 2
    assert result["sparsity"]["0"] == pytest.approx(0.5)


def test_static_int8_calibrates_on_a_dataloader_of_pairs() -> None:
    pytest.importorskip("onnxruntime")
    from torchslim.quantization import Quantization, QuantMethod, quantize_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x = torch.randn(64, 4)
    loader = DataLoader(TensorDataset(x, torch.zeros(64).long()), batch_size=16)
    int8 = quantize_model(model, Quantization(method=QuantMethod.STATIC), example_inputs=x[:2],
                          calibration=loader)
    assert (int8(x) - model(x)).abs().max() < 0.1 * model(x).abs().max()


class SpeechLike(nn.Module):
    """A first layer fed raw, wide-range inputs (like a power spectrum), then a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.front = nn.Linear(4, 16)
        self.back = nn.Sequential(nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.back(self.front(x))


@pytest.mark.parametrize("method", ["dynamic", "static"])
def test_quantization_keeps_excluded_layers_in_float(method: str) -> None:
    pytest.importorskip("onnxruntime")
    from torchslim.quantization import Quantization, quantize_model

    torch.manual_seed(0)
    model, x = SpeechLike().eval(), torch.randn(32, 4)
    int8 = quantize_model(model, Quantization(method=method, exclude=("front",)), example_inputs=x[:2],
                          calibration=[x])
    assert int8.report["excluded"] == {"front": "kept in float by exclude="}
    assert any("front" in op for op in int8.report["float_ops"])
    assert int8.report["int8_ops"]  # the rest is int8
    from torchslim.errors import SelectionError

    with pytest.raises(SelectionError, match="'nope'"):
        quantize_model(model, Quantization(exclude=("nope",)), example_inputs=x[:2])


def test_a_nested_layer_kept_in_float_runs_on_its_float_weights() -> None:
    """The exporter names scopes relative to their parent ("/1/body/body.2/body.2.0/Conv" is
    module "1.body.2.0"): the exclusion must find the node, and onnxruntime must not round its
    weights when it loads the program."""
    pytest.importorskip("onnxruntime")
    from torchslim.quantization import Quantization, quantize_model, sqnr_db

    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()), Body()).eval()
    with torch.no_grad():  # an outlier weight per row on an input channel that is always 0:
        model[1].body[2][0].weight[:, 0] = 50.0  # int8 would round the rest of each row away
        model[1].body[0].bias[0] = -100.0
    x, held_out = torch.rand(16, 3, 8, 8), torch.rand(16, 3, 8, 8)
    results = {}
    for exclude in ((), ("1.body.2.0",)):
        int8 = quantize_model(model, Quantization(method="static", exclude=exclude), example_inputs=x[:2],
                              calibration=[x])
        with torch.no_grad():
            results[exclude] = sqnr_db(model(held_out), int8(held_out))
    assert int8.report["float_ops"] == ["Conv /1/body/body.2/body.2.0/Conv"]
    assert results[("1.body.2.0",)] > results[()] + 10


class Body(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Sequential(nn.Conv2d(8, 4, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_dynamic_int8_on_convolutions_warns_with_the_fix() -> None:
    pytest.importorskip("onnxruntime")
    from torchslim.quantization import Quantization, quantize_model

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    with pytest.warns(UserWarning, match="method='static'"):
        quantize_model(model, Quantization(method="dynamic"), example_inputs=torch.randn(2, 1, 8, 8))


def test_fp16_layers_stay_out_of_int8_with_half_size_weights(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    from torchslim.quantization import Quantization, quantize_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 3)).eval()
    x = torch.randn(16, 64)
    kept = quantize_model(model, Quantization(exclude=("0",)), example_inputs=x[:2])
    halved = quantize_model(model, Quantization(fp16=("0",)), example_inputs=x[:2])
    assert halved.report["excluded"] == {"0": "kept in float16 by fp16="}
    assert halved.report["fp16_weights"] and len(halved.program) < len(kept.program) - 64 * 256 * 2 * 0.9
    assert torch.allclose(halved(x), kept(x), atol=0.02)  # fp16 weight rounding only
    from torchslim import artifact

    reloaded = artifact.load(artifact.save(halved, tmp_path / "h.slim"))  # passes the program checks
    assert torch.equal(reloaded(x), halved(x))
