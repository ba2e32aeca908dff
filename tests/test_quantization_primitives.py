import pytest
import torch

from torchslim.errors import ConfigError
from torchslim.quantization import (
    Observer,
    QuantSpec,
    dequantize,
    fake_quantize,
    qparams_from_range,
    quantize,
    quantize_dequantize,
    sqnr_db,
)


def test_seed_formula_is_the_per_tensor_symmetric_case() -> None:
    w = torch.randn(64, 32)
    alpha = 127 / w.abs().max()
    seed = torch.round(w * alpha)  # w_q = round(w · α)
    spec = QuantSpec(bits=8)
    scale, zero = qparams_from_range(w.min(), w.max(), spec)
    assert int(zero) == 0
    assert torch.equal(quantize(w, scale, zero, spec).float(), seed)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
def test_values_stay_in_range_and_error_is_at_most_half_a_step(bits: int, symmetric: bool) -> None:
    x = torch.randn(16, 40) * 3 + (0 if symmetric else 2)
    spec = QuantSpec(bits=bits, symmetric=symmetric, axis=0)
    low, high = x.amin(1), x.amax(1)
    scale, zero = qparams_from_range(low, high, spec)
    q = quantize(x, scale, zero, spec)
    assert int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax
    error = (dequantize(q, scale, zero, spec) - x).abs()
    assert bool((error <= scale[:, None] / 2 + 1e-6).all())


def test_finer_granularity_and_more_bits_raise_sqnr() -> None:
    torch.manual_seed(0)
    w = torch.randn(32, 128) * torch.logspace(-2, 0, 32)[:, None]  # channels of very different range
    per_tensor = sqnr_db(w, quantize_dequantize(w, QuantSpec(bits=8)))
    per_channel = sqnr_db(w, quantize_dequantize(w, QuantSpec(bits=8, axis=0)))
    per_group = sqnr_db(w, quantize_dequantize(w, QuantSpec(bits=4, group_size=32)))
    four_bit_channel = sqnr_db(w, quantize_dequantize(w, QuantSpec(bits=4, axis=0)))
    assert per_channel > per_tensor + 6
    assert per_channel > 40  # int8 per-channel weights: ~6 dB per bit
    assert per_group > four_bit_channel
    assert sqnr_db(w, w) == float("inf")


def test_asymmetric_represents_zero_exactly_and_uses_the_whole_range() -> None:
    x = torch.rand(1000) * 5 + 1  # all positive: symmetric would waste half the codes
    spec = QuantSpec(bits=8, symmetric=False, signed=False)
    scale, zero = qparams_from_range(x.min(), x.max(), spec)
    assert float(dequantize(quantize(torch.zeros(1), scale, zero, spec), scale, zero, spec)) == 0.0
    asym = sqnr_db(x, quantize_dequantize(x, spec))
    assert asym > sqnr_db(x, quantize_dequantize(x, QuantSpec(bits=8)))


def test_fake_quantize_forward_matches_and_gradient_is_straight_through() -> None:
    x = torch.linspace(-2, 2, 41, requires_grad=True)
    spec = QuantSpec(bits=4)
    scale, zero = qparams_from_range(torch.tensor(-1.0), torch.tensor(1.0), spec)
    y = fake_quantize(x, scale, zero, spec)
    assert torch.allclose(y, dequantize(quantize(x.detach(), scale, zero, spec), scale, zero, spec))
    y.sum().backward()
    codes = (x.detach() / scale).round()
    inside = (codes >= spec.qmin) & (codes <= spec.qmax)
    assert torch.equal(x.grad, inside.float())  # 1 inside the range, 0 where clipped


def test_bad_specs_name_the_valid_range() -> None:
    with pytest.raises(ConfigError, match=r"bits=9 \(valid: 2\.\.8\)"):
        QuantSpec(bits=9)
    with pytest.raises(ConfigError, match="not with axis"):
        QuantSpec(group_size=8, axis=0)
    with pytest.raises(ConfigError, match="multiple of group_size=32"):
        quantize_dequantize(torch.randn(4, 48), QuantSpec(group_size=32))


def test_observers_clip_outliers_and_refuse_empty_calibration() -> None:
    torch.manual_seed(0)
    spec = QuantSpec(bits=8)
    batches = [torch.randn(4096) for _ in range(4)]
    batches[0][0] = 80.0  # one outlier
    scales = {}
    for kind in ("minmax", "moving_average", "percentile", "mse", "kl"):
        observer = Observer(spec, kind)
        for batch in batches:
            observer.observe(batch)
        scales[kind] = float(observer.qparams()[0])
    assert scales["minmax"] == pytest.approx(80 / 127, rel=1e-5)
    for kind in ("percentile", "kl"):
        assert scales[kind] < scales["minmax"] / 5, kind
    assert scales["moving_average"] < scales["minmax"]
    data = torch.cat(batches)
    errors = {k: float((quantize_dequantize_with(data, s, spec) - data).pow(2).mean())
              for k, s in scales.items()}
    assert errors["mse"] <= min(errors.values()) * 1.05  # it may keep a huge outlier: by design
    with pytest.raises(ConfigError, match="calibration set is empty"):
        Observer(spec).qparams()
    with pytest.raises(ConfigError, match="per-tensor"):
        Observer(QuantSpec(axis=0), "kl")


def quantize_dequantize_with(x: torch.Tensor, scale: float, spec: QuantSpec) -> torch.Tensor:
    s, z = torch.tensor(scale), torch.tensor(0, dtype=torch.int32)
    return dequantize(quantize(x, s, z, spec), s, z, spec)


def test_full_range_symmetric_grid_uses_every_code_and_rounds_finer() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    full = QuantSpec(bits=4, group_size=64, full_range=True)
    scale, zero = qparams_from_range(*torch.aminmax(w.reshape(64, 2, 64), dim=-1), full)
    codes = quantize(w, scale, zero, full)
    assert set(codes.unique().tolist()) == set(range(-8, 8))  # all 16 codes, not 15
    assert bool((scale < 0).any()) and bool((scale > 0).any())  # the extreme's sign decides
    # each group's value of largest magnitude is exact: it sits on code -8
    groups = w.reshape(64, 2, 64)
    extreme = groups.gather(-1, groups.abs().argmax(-1, keepdim=True))
    restored = dequantize(codes, scale, zero, full).reshape(64, 2, 64)
    assert torch.allclose(restored.gather(-1, groups.abs().argmax(-1, keepdim=True)), extreme)
    seven_levels = QuantSpec(bits=4, group_size=64)
    assert sqnr_db(w, quantize_dequantize(w, full)) > sqnr_db(w, quantize_dequantize(w, seven_levels)) + 0.5
    with pytest.raises(ConfigError, match="full_range"):
        QuantSpec(bits=4, symmetric=False, signed=False, full_range=True)
