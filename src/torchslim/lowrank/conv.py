"""Decomposition of k x k convolutions into cheaper sequences of convolutions.

Three methods, each an ordinary chain of `nn.Conv2d`s (so it runs, exports and quantizes like
any conv):
- `tucker` (Tucker-2, Kim et al. 2016): 1x1 (C->R_in), k x k (R_in->R_out), 1x1 (R_out->N); the
  factors come from tensorly's `partial_tucker` (HOOI initialised by HOSVD) on the two channel modes.
- `spatial` (Jaderberg et al. 2014, scheme 2): k x 1 (C->r) then 1 x k (r->N), from the SVD of
  the kernel reshaped to `(C·k, N·k)`; exact at full rank.
- `depthwise`: depthwise k x k then pointwise 1x1, from the best rank-1 fit of each input
  channel's `(N, k·k)` slice (MobileNet-style replacement).
1x1 convs (factorize them as matrices), grouped convs and non-zero padding modes are skipped
and reported, as is any layer whose decomposition would not have fewer weights.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Any

import torch
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import nn

from torchslim.config import TechniqueConfig, validated
from torchslim.errors import ConfigError
from torchslim.lowrank.ranks import energy_rank, svd_factors
from torchslim.parametrized import weight_of
from torchslim.registry import register_technique
from torchslim.select import Select
from torchslim.structure import Edit, register_edit, replace_layers_, replace_module_

__all__ = ["ConvDecomposition", "ConvMethod", "DecomposedConv", "decompose_conv",
           "decompose_convs_"]


class ConvMethod(StrEnum):
    TUCKER = "tucker"
    SPATIAL = "spatial"
    DEPTHWISE = "depthwise"


@validated
@dataclass(frozen=True, kw_only=True, config=ConfigDict(extra="forbid"))
class ConvDecomposition(TechniqueConfig):
    """Replace each selected k x k Conv2d by a cheaper chain. For `tucker` and `spatial` give
    exactly one of `rank`, `energy`, `param_ratio`; `depthwise` takes none of them.

    Attributes:
        method: tucker | spatial | depthwise.
        rank: tucker: both channel ranks (<= min(C, N)); spatial: the separable rank.
        energy: per layer, ranks keeping this fraction of sum(σ²) of each unfolding, in (0, 1].
        param_ratio: per layer, the largest ranks keeping at most this fraction of the weights.
    """

    kind = "decompose_conv"
    structural = True
    selects_layers = True

    method: ConvMethod = ConvMethod.TUCKER
    rank: int | None = Field(default=None, ge=1)
    energy: float | None = Field(default=None, gt=0, le=1)
    param_ratio: float | None = Field(default=None, gt=0, lt=1)

    def __post_init__(self) -> None:
        given = [n for n in ("rank", "energy", "param_ratio") if getattr(self, n) is not None]
        if self.method == ConvMethod.DEPTHWISE and given:
            raise ConfigError(f"decompose_conv: method depthwise takes no {given[0]}; drop it")
        if self.method != ConvMethod.DEPTHWISE and len(given) != 1:
            raise ConfigError(f"decompose_conv ({self.method.value}): give exactly one of rank, "
                              f"energy, param_ratio; got {given or 'none'}")


class DecomposedConv(nn.Sequential):
    """A chain of convs standing for one conv; `method` and `ranks` say how it was built."""

    def __init__(self, *layers: nn.Module, method: str, ranks: tuple[int, ...]) -> None:
        super().__init__(*layers)
        self.method, self.ranks = method, ranks


def _check(conv: nn.Module) -> str | None:
    """Why `conv` cannot be decomposed, or None."""
    if not isinstance(conv, nn.Conv2d):
        return f"{type(conv).__name__} (only Conv2d is decomposed)"
    if conv.kernel_size == (1, 1):
        return "1x1 conv: nothing spatial to decompose"
    if conv.groups != 1:
        return f"grouped conv (groups={conv.groups})"
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return f"padding {conv.padding!r}/{conv.padding_mode} (needs explicit zero padding)"
    return None


def build_decomposed(conv: nn.Conv2d, method: ConvMethod, ranks: tuple[int, ...]) -> DecomposedConv:
    """The chain replacing `conv` with these ranks, randomly initialised (shapes only)."""
    out_ch, in_ch = conv.out_channels, conv.in_channels
    kh, kw = conv.kernel_size
    (sh, sw), (dh, dw) = conv.stride, conv.dilation
    ph, pw = (int(p) for p in conv.padding)  # explicit ints: _check refuses string padding
    bias = conv.bias is not None
    if method == ConvMethod.TUCKER:
        r_out, r_in = ranks
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, r_in, 1, bias=False),
            nn.Conv2d(r_in, r_out, (kh, kw), stride=(sh, sw), padding=(ph, pw),
                      dilation=(dh, dw), bias=False),
            nn.Conv2d(r_out, out_ch, 1, bias=bias)]
    elif method == ConvMethod.SPATIAL:
        (rank,) = ranks
        layers = [nn.Conv2d(in_ch, rank, (kh, 1), stride=(sh, 1), padding=(ph, 0),
                            dilation=(dh, 1), bias=False),
                  nn.Conv2d(rank, out_ch, (1, kw), stride=(1, sw), padding=(0, pw),
                            dilation=(1, dw), bias=bias)]
    else:
        layers = [nn.Conv2d(in_ch, in_ch, (kh, kw), stride=(sh, sw), padding=(ph, pw),
                            dilation=(dh, dw), groups=in_ch, bias=False),
                  nn.Conv2d(in_ch, out_ch, 1, bias=bias)]
    return DecomposedConv(*layers, method=method.value, ranks=tuple(ranks))


def _fitted_weights(weight: torch.Tensor, method: ConvMethod, ranks: tuple[int, ...]
                    ) -> list[torch.Tensor]:
    """The weights of each conv of the chain, from the original `(N, C, kh, kw)` kernel."""
    out_ch, in_ch, kh, kw = weight.shape
    w = weight.detach().double().cpu()
    if method == ConvMethod.TUCKER:
        from tensorly.decomposition import partial_tucker

        (core, (u_out, u_in)), _ = partial_tucker(w.numpy(), rank=list(ranks), modes=[0, 1],
                                                  init="svd", random_state=0)
        u_in_t, u_out_t = torch.from_numpy(u_in), torch.from_numpy(u_out)  # (C, R_in), (N, R_out)
        return [u_in_t.T[:, :, None, None], torch.from_numpy(core), u_out_t[:, :, None, None]]
    if method == ConvMethod.SPATIAL:
        (rank,) = ranks
        matrix = w.permute(1, 2, 0, 3).reshape(in_ch * kh, out_ch * kw)  # [(c, y), (n, x)]
        left, right = svd_factors(matrix, rank)  # (C·kh, r), (r, N·kw)
        vertical = left.reshape(in_ch, kh, rank).permute(2, 0, 1)[..., None]  # (r, C, kh, 1)
        horizontal = right.reshape(rank, out_ch, kw).permute(1, 0, 2)[:, :, None, :]  # (N, r, 1, kw)
        return [vertical, horizontal]
    # depthwise: per input channel c, W[:, c] (N, kh·kw) ≈ s·u vᵀ -> pointwise s·u, depthwise v.
    slices = w.permute(1, 0, 2, 3).reshape(in_ch, out_ch, kh * kw)  # (C, N, k²)
    u, s, vh = torch.linalg.svd(slices, full_matrices=False)  # batched over C
    depthwise = vh[:, 0, :].reshape(in_ch, 1, kh, kw)  # (C, 1, kh, kw)
    pointwise = (u[:, :, 0] * s[:, :1]).T[:, :, None, None]  # (N, C, 1, 1)
    return [depthwise, pointwise]


def decompose_conv(conv: nn.Conv2d, method: ConvMethod | str, ranks: tuple[int, ...] = ()
                   ) -> DecomposedConv:
    """`conv` as a fitted chain (tucker at full ranks and spatial at full rank are exact).

    Example:
        >>> conv = nn.Conv2d(4, 6, 3, padding=1)
        >>> chain = decompose_conv(conv, "spatial", (12,))
        >>> x = torch.randn(1, 4, 5, 5)
        >>> bool(torch.allclose(chain(x), conv(x), atol=1e-5))
        True
    """
    method = ConvMethod(method)
    chain = build_decomposed(conv, method, tuple(ranks))
    weights = _fitted_weights(weight_of(conv), method, tuple(ranks))
    convs = [layer for layer in chain if isinstance(layer, nn.Conv2d)]
    with torch.no_grad():
        for layer, value in zip(convs, weights, strict=True):
            layer.weight.copy_(value.float())
        if conv.bias is not None and convs[-1].bias is not None:
            convs[-1].bias.copy_(conv.bias)
    return chain.to(conv.weight.device)


def chain_params(conv: nn.Conv2d, method: ConvMethod, ranks: tuple[int, ...]) -> int:
    """Weights of the chain (biases excluded), without building it."""
    out_ch, in_ch = conv.out_channels, conv.in_channels
    kh, kw = conv.kernel_size
    if method == ConvMethod.TUCKER:
        r_out, r_in = ranks
        return in_ch * r_in + r_in * r_out * kh * kw + r_out * out_ch
    if method == ConvMethod.SPATIAL:
        return ranks[0] * (in_ch * kh + out_ch * kw)
    return in_ch * kh * kw + in_ch * out_ch


def _ranks(conv: nn.Conv2d, config: ConvDecomposition) -> tuple[int, ...] | None:
    """The ranks `config` asks for `conv`; None when no ranks fit its `param_ratio`."""
    out_ch, in_ch = conv.out_channels, conv.in_channels
    kh, kw = conv.kernel_size
    weight = weight_of(conv).detach().double()
    if config.method == ConvMethod.DEPTHWISE:
        return ()
    if config.method == ConvMethod.SPATIAL:
        if config.rank is not None:
            return (config.rank,)
        if config.energy is not None:
            matrix = weight.permute(1, 2, 0, 3).reshape(in_ch * kh, out_ch * kw)
            return (energy_rank(torch.linalg.svdvals(matrix), config.energy),)
        assert config.param_ratio is not None
        return (max(1, math.floor(config.param_ratio * out_ch * in_ch * kh * kw
                                  / (in_ch * kh + out_ch * kw))),)
    if config.rank is not None:
        return (config.rank, config.rank)
    if config.energy is not None:
        energy = config.energy
        return (energy_rank(torch.linalg.svdvals(weight.reshape(out_ch, -1)), energy),
                energy_rank(torch.linalg.svdvals(weight.transpose(0, 1).reshape(in_ch, -1)), energy))
    assert config.param_ratio is not None
    budget = config.param_ratio * out_ch * in_ch * kh * kw
    best = None
    for r_in in range(1, in_ch + 1):  # the same fraction of both channel counts
        ranks = (min(out_ch, max(1, round(r_in * out_ch / in_ch))), r_in)
        if chain_params(conv, ConvMethod.TUCKER, ranks) <= budget:
            best = ranks
    return best


def _plan(model: nn.Module, config: ConvDecomposition, targets: Select
          ) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    plan: dict[str, tuple[int, ...]] = {}
    skipped: dict[str, str] = {}
    problems = []
    for name, conv in targets.resolve(model):
        reason = _check(conv)
        if reason is not None:
            skipped[name] = reason
            continue
        assert isinstance(conv, nn.Conv2d)
        ranks = _ranks(conv, config)
        if ranks is None:
            skipped[name] = f"no Tucker ranks keep at most {config.param_ratio} of its weights"
            continue
        kh, kw = conv.kernel_size
        limits = {ConvMethod.TUCKER: (conv.out_channels, conv.in_channels),
                  ConvMethod.SPATIAL: (min(conv.in_channels * kh, conv.out_channels * kw),),
                  ConvMethod.DEPTHWISE: ()}[config.method]
        if any(not 1 <= r <= limit for r, limit in zip(ranks, limits, strict=True)):
            problems.append(f"{name}: ranks {ranks} (valid: 1..{limits})")
            continue
        before = conv.out_channels * conv.in_channels * kh * kw
        after = chain_params(conv, config.method, ranks)
        if after >= before:
            skipped[name] = f"ranks {ranks} give {after} weights, not fewer than {before}"
        else:
            plan[name] = ranks
    if problems:
        raise ConfigError(f"decompose_conv: rank out of range for {'; '.join(problems)}")
    if not plan and not skipped:
        raise ConfigError("decompose_conv: the selection holds no Conv2d layer")
    return plan, skipped


def decompose_convs_(model: nn.Module, config: ConvDecomposition, *, targets: Select,
                     calibration: Any = None) -> dict[str, Any]:
    """Handler of `ConvDecomposition`: replace the selected convs in place."""
    plan, skipped = _plan(model, config, targets)

    def build(name: str, conv: nn.Module) -> tuple[nn.Module, Edit]:
        assert isinstance(conv, nn.Conv2d)  # checked by _plan
        return (decompose_conv(conv, config.method, plan[name]),
                {"kind": "decompose_conv", "layer": name, "method": config.method.value,
                 "ranks": list(plan[name])})

    done = replace_layers_(model, list(plan), build)
    return {**done, "ranks": {n: list(r) for n, r in plan.items() if n in done["replaced"]},
            "skipped": {**skipped, **done["skipped"]}}


def _replay(model: nn.Module, edit: Edit) -> None:
    conv = model.get_submodule(edit["layer"])
    reason = _check(conv)
    if reason is not None:
        raise ConfigError(f"{edit['layer']} cannot be decomposed: {reason}")
    assert isinstance(conv, nn.Conv2d)
    replace_module_(model, edit["layer"], build_decomposed(
        conv, ConvMethod(edit["method"]), tuple(int(r) for r in edit["ranks"])))


register_technique(ConvDecomposition, decompose_convs_)
register_edit("decompose_conv", _replay)
