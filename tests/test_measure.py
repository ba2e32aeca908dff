import pytest
import torch
from torch import nn

from torchslim.errors import ConfigError
from torchslim.measure import (
    compare,
    count_flops,
    count_params,
    evaluate,
    measure_latency,
    num_threads,
)


class Oracle(nn.Module):
    """Returns one-hot logits of labels hidden in the input's first column."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(x[:, 0].long(), 5).float() * 10


def test_evaluate_reports_top1_topk_and_loss() -> None:
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    inputs = torch.stack([labels.float(), torch.zeros(6)], dim=1)
    perfect = evaluate(Oracle(), [(inputs, labels)], topk=(1, 2))
    assert perfect["accuracy"] == 1.0 and perfect["top2"] == 1.0 and perfect["loss"] < 1e-3
    shifted = evaluate(Oracle(), [(inputs, (labels + 1) % 5)], topk=(1, 5))
    assert shifted["accuracy"] == 0.0 and shifted["top5"] == 1.0
    with pytest.raises(ConfigError, match="no batches"):
        evaluate(Oracle(), [])


def test_params_count_nonzero_after_zeroing() -> None:
    layer = nn.Linear(10, 4)
    with torch.no_grad():
        layer.weight[:2] = 0
    assert count_params(layer) == (44, 24)


def test_flops_of_a_linear_layer_are_two_per_multiply_add() -> None:
    assert count_flops(nn.Linear(32, 8), torch.randn(5, 32)) == 2 * 5 * 32 * 8


def test_latency_summary_is_consistent_and_threads_are_restored() -> None:
    before = torch.get_num_threads()
    latency = measure_latency(nn.Linear(64, 64), torch.randn(16, 64), threads=1, warmup=2,
                              repeats=7)
    assert latency.threads == 1 and latency.repeats == 7 and latency.batch_size == 16
    assert 0 < latency.median_ms <= latency.p90_ms
    assert latency.throughput == pytest.approx(16 / (latency.median_ms / 1e3))
    assert torch.get_num_threads() == before
    with pytest.raises(ConfigError, match="threads"), num_threads(0):
        pass


def test_compare_gives_ratios_before_over_after() -> None:
    result = compare({"accuracy": 0.9, "params": 100, "median_ms": 4.0, "flops": 10},
                     {"accuracy": 0.9, "params": 25, "median_ms": 2.0, "flops": 10})
    assert result == {"accuracy_delta": 0.0, "accuracy_retention": 1.0, "params_ratio": 4.0,
                      "flops_ratio": 1.0, "median_ms_ratio": 2.0}


def test_probe_accuracy_separates_separable_features_and_not_noise() -> None:
    from torchslim.measure import probe_accuracy

    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 2
    separable = torch.randn(200, 8, generator=generator) + 3 * labels[:, None].float()
    assert probe_accuracy(separable, labels) > 0.95
    assert probe_accuracy(torch.randn(200, 8, generator=generator), labels) < 0.7



def test_probe_accuracy_repeats_average_over_different_splits() -> None:
    from torchslim.measure import probe_accuracy

    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(120) % 3
    features = torch.randn(120, 6, generator=generator) + 0.8 * labels[:, None].float()
    splits = [probe_accuracy(features, labels, seed=s) for s in range(3)]
    assert len(set(splits)) > 1  # the split moves the result: what repeats average out
    assert probe_accuracy(features, labels, repeats=3) == pytest.approx(sum(splits) / 3)
    with pytest.raises(ValueError, match="repeats >= 1"):
        probe_accuracy(features, labels, repeats=0)

def test_flops_count_recurrent_and_attention_layers() -> None:
    from torchslim.measure import count_flops

    lstm = nn.LSTM(8, 32, num_layers=2, batch_first=True)  # 4 gates x hidden x (input + hidden) per step
    assert count_flops(lstm, torch.randn(3, 5, 8)) == 2 * 3 * 5 * (4 * 32 * (8 + 32) + 4 * 32 * (32 + 32))
    attention = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x = torch.randn(1, 6, 16)
    projections = 2 * 6 * 16 * 16 * 4  # q, k, v and out projections
    assert count_flops(nn.Sequential(), x) == 0
    assert count_flops(_SelfAttention(attention), x) >= projections


class _SelfAttention(nn.Module):
    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x, x, x, need_weights=False)[0]


def test_evaluate_scores_a_language_model_per_token_and_skips_ignored_labels() -> None:
    class Echo(nn.Module):  # predicts token t+1 = token t: scores (N, T, V) like a causal LM
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return nn.functional.one_hot(ids, 5).float() * 10

    ids = torch.tensor([[1, 2, 2, 3], [4, 4, 4, 0]])
    labels = torch.tensor([[2, 2, 3, 3], [4, 4, -100, -100]])  # right on 2 + 2 tokens
    result = evaluate(Echo(), [(ids, labels)])
    assert result["samples"] == 6  # tokens, the two -100 labels skipped
    assert result["accuracy"] == pytest.approx(4 / 6)
