"""Training-driven channel selection: network slimming and learned channel gates.

Both make the network tell us which channels it can do without, during ordinary training:
- **Network slimming** (Liu et al. 2017): an L1 penalty on BatchNorm scales pushes the gamma of
  useless channels to zero; `BatchNormSparsity` is a trainer callback that adds the penalty's
  subgradient, then `ChannelPruning(importance="bn_scale", scope="global")` removes them.
- **Gates**: one learnable gate per coupled channel unit multiplies that channel wherever it is
  produced (after the BatchNorm if there is one); `GateSparsity` is a loss that adds an L1
  penalty on the gates to the task loss. `ChannelGates.fold_` multiplies the gates into the
  weights (the function is unchanged) and removes the hooks; `ChannelPruning(importance="gate")`
  then removes the units whose gates went to zero. Gates work for groups without BatchNorm too
  (MLPs, transformer FFNs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from torchslim.errors import ConfigError
from torchslim.graph import ChannelGraph, trace_channels
from torchslim.training.callbacks import Callback, CrossEntropy, Loss

if TYPE_CHECKING:
    from torchslim.training.trainer import Trainer

__all__ = ["GATE_SCORES", "BatchNormSparsity", "ChannelGates", "GateSparsity", "attach_gates_"]

GATE_SCORES = "torchslim_gate_scores"  # model attribute: unit key -> |gate|, read by importance "gate"
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class BatchNormSparsity(Callback):
    """Add `strength * sign(gamma)` to every BatchNorm scale's gradient (L1 subgradient).

    Example:
        >>> callback = BatchNormSparsity(strength=1e-4)
    """

    def __init__(self, strength: float = 1e-4) -> None:
        if strength < 0:
            raise ConfigError(f"BatchNormSparsity strength must be >= 0, got {strength}")
        self.strength = strength

    def on_before_optimizer_step(self, trainer: Trainer, step: int) -> None:
        for module in trainer.model.modules():
            weight = getattr(module, "weight", None) if isinstance(module, BATCHNORMS) else None
            if weight is not None and weight.grad is not None:
                weight.grad.add_(torch.sign(weight.detach()), alpha=self.strength)


def _unit_key(unit: list[Any]) -> str:
    first = unit[0]
    return f"{first.module}|{first.axis}|{first.index}"


class ChannelGates(nn.Module):
    """One gate per unit of each gated group, applied by forward hooks; see `attach_gates_`."""

    def __init__(self, graph: ChannelGraph, model: nn.Module) -> None:
        super().__init__()
        self.gates = nn.ParameterList()
        self.keys: list[list[str]] = []
        self.sites: list[list[tuple[str, torch.Tensor]]] = []  # per group: (module, channel->unit)
        for group in graph.groups:
            sites = _gate_sites(group.units, model)
            if not sites:
                continue
            self.gates.append(nn.Parameter(torch.ones(len(group.units))))
            self.keys.append([_unit_key(unit) for unit in group.units])
            self.sites.append(sites)
        self._handles: list[Any] = []

    def hook_(self, model: nn.Module) -> None:
        for gate, sites in zip(self.gates, self.sites, strict=True):
            for name, index in sites:
                layer = model.get_submodule(name)
                self._handles.append(layer.register_forward_hook(_gating(gate, index, _channel_dim(layer))))

    def penalty(self) -> torch.Tensor:
        """Sum of |gate| over every gate (the L1 term)."""
        return torch.stack([gate.abs().sum() for gate in self.gates]).sum()

    def fold_(self, model: nn.Module) -> dict[str, float]:
        """Multiply the gates into the gated layers, remove the hooks; returns |gate| per unit.

        The model computes the same function afterwards, without hooks. The scores are kept on
        the model for `ChannelPruning(importance="gate")`.
        """
        for handle in self._handles:
            handle.remove()
        self._handles = []
        scores: dict[str, float] = {}
        with torch.no_grad():
            for gate, sites, keys in zip(self.gates, self.sites, self.keys, strict=True):
                for name, index in sites:
                    factor = torch.cat([gate.detach(), gate.new_ones(1)])[index]
                    _scale_outputs_(model.get_submodule(name), factor)
                scores.update(zip(keys, gate.detach().abs().tolist(), strict=True))
        setattr(model, GATE_SCORES, scores)
        return scores


def _gate_sites(units: list[list[Any]], model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Where a group is gated: its BatchNorms if it has any, else its Linear/Conv producers."""
    by_module: dict[str, dict[int, int]] = {}
    for u, unit in enumerate(units):
        for member in unit:
            by_module.setdefault(f"{member.module}|{member.axis}", {})[member.index] = u
    norms = [k for k in by_module if isinstance(model.get_submodule(k.split("|")[0]), BATCHNORMS)]
    producers = [k for k in by_module if k.endswith("|out") and
                 isinstance(model.get_submodule(k.split("|")[0]), nn.Linear | nn.Conv1d | nn.Conv2d)]
    sites = []
    for key in norms or producers:
        name = key.split("|")[0]
        layer = model.get_submodule(name)
        size = int(getattr(layer, "num_features", 0) or getattr(layer, "out_features", 0)
                   or getattr(layer, "out_channels", 0))
        # channel i -> its unit; channels of other groups -> len(units), an extra gate fixed at 1
        index = [by_module[key].get(i, len(units)) for i in range(size)]
        sites.append((name, torch.tensor(index)))
    return sites


def _channel_dim(layer: nn.Module) -> int:
    return -1 if isinstance(layer, nn.Linear) else 1


def _gating(gate: nn.Parameter, index: torch.Tensor, dim: int) -> Any:
    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        shape = [1] * output.dim()
        shape[dim] = -1
        factor = torch.cat([gate, gate.new_ones(1)])[index]  # (C,)
        return output * factor.view(shape)  # (..., C, ...) * (1, C, 1, 1) or (..., C)
    return hook


def _scale_outputs_(layer: nn.Module, factor: torch.Tensor) -> None:
    """Scale output channel i of `layer` by factor[i] through its parameters."""
    weight, bias = getattr(layer, "weight", None), getattr(layer, "bias", None)
    if isinstance(layer, BATCHNORMS):
        if weight is None:
            raise ConfigError(f"cannot fold a gate into {layer}: it has no affine scale")
        weight.mul_(factor)
    else:
        assert isinstance(weight, torch.Tensor)
        weight.mul_(factor.view(-1, *[1] * (weight.dim() - 1)))  # (C_out, ...) rows
    if isinstance(bias, torch.Tensor):
        bias.mul_(factor)


def attach_gates_(model: nn.Module, example_inputs: Any) -> ChannelGates:
    """Put a gate (initially 1) on every prunable unit of `model`; returns the gates.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> gates = attach_gates_(net, torch.zeros(1, 4))
        >>> [tuple(g.shape) for g in gates.gates]
        [(8,)]
    """
    gates = ChannelGates(trace_channels(model, example_inputs), model)
    if not gates.keys:
        raise ConfigError(f"{type(model).__name__} has no prunable channel group to gate")
    gates.hook_(model)
    return gates


class GateSparsity(Loss):
    """Task loss + `strength * sum|gate|`: trains the gates toward a sparse set of channels."""

    def __init__(self, gates: ChannelGates, *, strength: float = 1e-3, base: Loss | None = None) -> None:
        self.gates, self.strength, self.base = gates, strength, base or CrossEntropy()

    def bind(self, model: nn.Module, example_inputs: torch.Tensor) -> list[nn.Parameter]:
        return [*self.base.bind(model, example_inputs), *self.gates.parameters()]

    def state_dict(self) -> dict[str, Any]:
        return {"gates": self.gates.state_dict(), "base": self.base.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gates.load_state_dict(state["gates"])
        self.base.load_state_dict(state.get("base", {}))

    def __call__(self, outputs: torch.Tensor, labels: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        return self.base(outputs, labels, inputs) + self.strength * self.gates.penalty()
