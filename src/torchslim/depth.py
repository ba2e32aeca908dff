"""Layer dropping: a shallower model that keeps some blocks of a stack, e.g. every other one.

The usual way to make a distillation student for a transformer (DistilBERT, Sanh et al. 2019):
keep layers 0, 2, 4 of a 6-layer encoder with their trained weights, then distil. The kept
blocks are taken from the model itself, so the student starts close to the teacher.
"""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import nn

from torchslim.config import TechniqueConfig, validated
from torchslim.errors import ConfigError
from torchslim.registry import register_technique
from torchslim.select import Select
from torchslim.structure import Edit, record_edit_, register_edit, replace_module_

__all__ = ["LayerDropping", "keep_layers_"]

STACKS = (nn.ModuleList, nn.Sequential)  # exact types: subclasses may have their own forward


@validated
@dataclass(frozen=True, kw_only=True, config=ConfigDict(extra="forbid"))
class LayerDropping(TechniqueConfig):
    """Keep only the blocks `keep` (indices, in order) of the ModuleList/Sequential `stack`.

    The caller chooses blocks whose removal keeps the shapes consistent (for example blocks
    that map a width to itself); a mismatch shows up as a shape error on the first forward.

    Example:
        >>> model = nn.Sequential(nn.ModuleList([nn.Linear(2, 2) for _ in range(4)]))
        >>> result = keep_layers_(model, LayerDropping(stack="0", keep=(0, 2)), targets=Select())
        >>> len(model[0]), result["replaced"]
        (2, ['0'])
    """

    kind = "drop_layers"
    structural = True

    stack: str
    keep: tuple[int, ...] = Field(min_length=1)


def _stack(model: nn.Module, name: str) -> nn.ModuleList | nn.Sequential:
    try:
        stack = model.get_submodule(name)
    except AttributeError:
        lists = [n for n, m in model.named_modules() if type(m) in STACKS]
        raise ConfigError(f"drop_layers: the model has no module {name!r}; its layer stacks "
                          f"(ModuleList / Sequential) are: {', '.join(lists) or 'none'}") from None
    if type(stack) not in STACKS:
        raise ConfigError(f"drop_layers: {name!r} is a {type(stack).__name__}, not a ModuleList "
                          "or Sequential")
    assert isinstance(stack, nn.ModuleList | nn.Sequential)
    return stack


def _kept(stack: nn.ModuleList | nn.Sequential, keep: tuple[int, ...]) -> nn.Module:
    return type(stack)(*[stack[i] for i in keep]) if isinstance(stack, nn.Sequential) \
        else nn.ModuleList([stack[i] for i in keep])


def _check_keep(keep: tuple[int, ...], size: int, name: str) -> None:
    if len(set(keep)) != len(keep) or any(not 0 <= i < size for i in keep):
        raise ConfigError(f"drop_layers: keep={list(keep)} must be distinct indices of {name!r}, "
                          f"valid: 0..{size - 1}")


def keep_layers_(model: nn.Module, config: LayerDropping, *, targets: Select,
                 calibration: Any = None) -> dict[str, Any]:
    """Handler of `LayerDropping`: keep the chosen blocks (with their weights) in place."""
    stack = _stack(model, config.stack)
    _check_keep(config.keep, len(stack), config.stack)
    before = sum(p.numel() for p in model.parameters())
    replace_module_(model, config.stack, _kept(stack, config.keep))
    record_edit_(model, {"kind": "keep_layers", "stack": config.stack, "keep": list(config.keep)})
    return {"replaced": [config.stack], "kept": list(config.keep), "removed": len(stack) - len(config.keep),
            "params_before": before, "params_after": sum(p.numel() for p in model.parameters())}


def _replay(model: nn.Module, edit: Edit) -> None:
    stack = _stack(model, edit["stack"])
    keep = tuple(int(i) for i in edit["keep"])
    _check_keep(keep, len(stack), edit["stack"])
    replace_module_(model, edit["stack"], _kept(stack, keep))


register_technique(LayerDropping, keep_layers_)
register_edit("keep_layers", _replay)
