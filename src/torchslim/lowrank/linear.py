"""Low-rank factorization of Linear layers: `Linear(m->n)` becomes `Linear(m->r) ∘ Linear(r->n)`.

The factors come from a truncated SVD of the weight, so before any fine-tuning the pair is the
best rank-r approximation of the layer. Both halves are ordinary `nn.Linear`s: the result runs
anywhere (torch.compile, ONNX, int8 kernels) and later stages (pruning, quantization) see two
plain layers. A layer whose split would not save weights (r·(m+n) >= m·n) is left alone and
reported as skipped.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import nn

from torchslim.config import TechniqueConfig, validated
from torchslim.errors import ConfigError
from torchslim.lowrank.ranks import break_even_rank, energy_rank, param_ratio_rank, svd_factors
from torchslim.parametrized import weight_of
from torchslim.registry import register_technique
from torchslim.select import Select
from torchslim.structure import Edit, register_edit, replace_layers_, replace_module_

__all__ = ["FactorizedLinear", "LowRank", "factorize_linear", "factorize_linears_"]


@validated
@dataclass(frozen=True, kw_only=True, config=ConfigDict(extra="forbid"))
class LowRank(TechniqueConfig):
    """Split each selected Linear into two thinner ones. Give exactly one of `rank`, `energy`,
    `param_ratio` (or only `per_layer`).

    Attributes:
        rank: the same rank for every layer.
        energy: per layer, the smallest rank keeping this fraction of sum(σ²), in (0, 1].
        param_ratio: per layer, the largest rank keeping at most this fraction of its weights.
        per_layer: rank overrides by layer name.
        skip_unprofitable: leave layers alone whose split would not save weights.
    """

    kind = "low_rank"
    structural = True
    selects_layers = True

    rank: int | None = Field(default=None, ge=1)
    energy: float | None = Field(default=None, gt=0, le=1)
    param_ratio: float | None = Field(default=None, gt=0, lt=1)
    per_layer: dict[str, int] = Field(default_factory=dict)
    skip_unprofitable: bool = True

    def __post_init__(self) -> None:
        given = [n for n in ("rank", "energy", "param_ratio") if getattr(self, n) is not None]
        if len(given) != 1 and not (self.per_layer and not given):
            raise ConfigError(f"low_rank: give exactly one of rank, energy, param_ratio (or only "
                              f"per_layer); got {given or 'none'}")
        bad = {name: r for name, r in self.per_layer.items() if r < 1}
        if bad:
            raise ConfigError(f"low_rank: per_layer ranks must be >= 1, got {bad}")

    def rank_for(self, name: str, weight: torch.Tensor) -> int | None:
        """The rank this config asks for `name`'s `(n, m)` weight (None: leave the layer)."""
        rows, cols = weight.shape
        if name in self.per_layer:
            return self.per_layer[name]
        if self.rank is not None:
            return self.rank
        if self.energy is not None:
            return energy_rank(torch.linalg.svdvals(weight.detach().double()), self.energy)
        if self.param_ratio is not None:
            return param_ratio_rank(rows, cols, self.param_ratio)
        return None


class FactorizedLinear(nn.Sequential):
    """`Linear(in->rank, no bias)` then `Linear(rank->out)`: a Linear stored as two factors."""

    def __init__(self, in_features: int, out_features: int, rank: int, *, bias: bool = True) -> None:
        super().__init__(nn.Linear(in_features, rank, bias=False),
                         nn.Linear(rank, out_features, bias=bias))

    @property
    def rank(self) -> int:
        first = self[0]
        assert isinstance(first, nn.Linear)
        return first.out_features


def factorize_linear(layer: nn.Linear, rank: int) -> FactorizedLinear:
    """The rank-`rank` SVD factorization of `layer` (at full rank: the same function).

    Example:
        >>> layer = nn.Linear(8, 6)
        >>> pair = factorize_linear(layer, 6)
        >>> x = torch.randn(3, 8)
        >>> bool(torch.allclose(pair(x), layer(x), atol=1e-5))
        True
    """
    weight = weight_of(layer)
    left, right = svd_factors(weight, rank)  # (out, r), (r, in)
    pair = FactorizedLinear(layer.in_features, layer.out_features, rank,
                            bias=layer.bias is not None)
    first, second = pair[0], pair[1]
    assert isinstance(first, nn.Linear) and isinstance(second, nn.Linear)
    with torch.no_grad():
        first.weight.copy_(right)
        second.weight.copy_(left)
        if layer.bias is not None and second.bias is not None:
            second.bias.copy_(layer.bias)
    return pair.to(weight.device)


def _plan(model: nn.Module, config: LowRank, targets: Select) -> tuple[dict[str, int], dict[str, str]]:
    """Ranks for the layers to split, and why the others are skipped; raises on bad ranks."""
    layers = [(n, m) for n, m in targets.resolve(model) if isinstance(m, nn.Linear)]
    if not layers:
        raise ConfigError("low_rank splits Linear layers, and the selection holds none; select "
                          "Linear layers (for convs use decompose_conv)")
    unknown = sorted(set(config.per_layer) - {n for n, _ in layers})
    if unknown:
        raise ConfigError(f"low_rank per_layer names {unknown} are not selected Linear layers; "
                          f"selected: {', '.join(n for n, _ in layers)}")
    ranks: dict[str, int] = {}
    skipped: dict[str, str] = {}
    problems = []
    for name, layer in layers:
        rows, cols = layer.out_features, layer.in_features
        rank = config.rank_for(name, weight_of(layer))
        if rank is None:
            skipped[name] = "no rank given"
        elif rank > min(rows, cols):
            problems.append(f"{name}: rank {rank} (valid: 1..{min(rows, cols)})")
        elif config.skip_unprofitable and rank > break_even_rank(rows, cols):
            skipped[name] = (f"rank {rank} would not save weights ({rank}·({cols}+{rows}) >= "
                             f"{cols}·{rows}); at most {break_even_rank(rows, cols)} does")
        else:
            ranks[name] = rank
    if problems:
        raise ConfigError(f"low_rank: rank out of range for {'; '.join(problems)}; a rank must be "
                          "between 1 and min(in_features, out_features)")
    return ranks, skipped


def factorize_linears_(model: nn.Module, config: LowRank, *, targets: Select,
                       calibration: Any = None) -> dict[str, Any]:
    """Handler of `LowRank`: split the selected Linears in place; returns ranks and skips."""
    ranks, skipped = _plan(model, config, targets)

    def build(name: str, layer: nn.Module) -> tuple[nn.Module, Edit]:
        assert isinstance(layer, nn.Linear)  # checked by _plan
        return (factorize_linear(layer, ranks[name]),
                {"kind": "low_rank_linear", "layer": name, "rank": ranks[name]})

    done = replace_layers_(model, list(ranks), build)
    ranks = {name: rank for name, rank in ranks.items() if name in done["replaced"]}
    return {**done, "ranks": ranks, "skipped": {**skipped, **done["skipped"]}}


def _replay(model: nn.Module, edit: Edit) -> None:
    layer = model.get_submodule(edit["layer"])
    if not isinstance(layer, nn.Linear):
        raise ConfigError(f"{edit['layer']} is a {type(layer).__name__}, not a Linear")
    rank = int(edit["rank"])
    if not 1 <= rank <= min(layer.in_features, layer.out_features):
        raise ConfigError(f"rank {rank} does not fit {layer}")
    replace_module_(model, edit["layer"], FactorizedLinear(
        layer.in_features, layer.out_features, rank, bias=layer.bias is not None))


register_technique(LowRank, factorize_linears_)
register_edit("low_rank_linear", _replay)
