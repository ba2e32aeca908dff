"""Recipe stages that are more than one `apply_`, and how every stage runs.

Any registered technique is a stage that `apply_stage` runs: apply it (with training batches
if it reads data), then bake its masks and codebooks into the weights, remembering which layers
must stay sparse or shared while later stages train. The stages below train (`fine_tune`,
`distill`, `gradual_prune`, `iterative_prune`, `lowbit`, `qat`), convert (`quantize`) or code
the file (`encode`); each registers its runner. A runner gets the recipe run (`CompressionRun`:
its data, training and teacher), the stage, the model (changed in place) and the constraint table.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass as pydantic_dataclass
from torch import nn

from torchslim.api import apply_, finalize_, parametrized_layers
from torchslim.config import TechniqueConfig, build_config, validated
from torchslim.distillation import Distill, TrainedTeacher
from torchslim.encoding.coders import parse_coder
from torchslim.errors import ConfigError
from torchslim.parametrized import weight_parametrizations
from torchslim.pruning import GradualPruning, WeightPruning
from torchslim.pruning.schedules import iterative_sparsities, rewind_
from torchslim.quantization.lowbit import LowBit
from torchslim.quantization.ptq import Quantization
from torchslim.registry import register_stage
from torchslim.select import Select
from torchslim.training import TrainConfig

if TYPE_CHECKING:
    from torchslim.apps.compress import CompressionRun, Constraints
    from torchslim.apps.recipe import Stage

__all__ = ["DistillStage", "EncodeStage", "FineTune", "GradualPrune", "IterativePrune", "LowBitStage",
           "QATStage", "apply_stage", "forget_replaced"]


def forget_replaced(constraints: Constraints, replaced: list[str]) -> None:
    """Drop the constraints of replaced layers (and of anything inside them): they are gone."""
    for name in replaced:
        for layer in [c for c in constraints if c == name or c.startswith(name + ".")]:
            del constraints[layer]


def apply_stage(run: CompressionRun, stage: Stage, model: nn.Module, constraints: Constraints,
                checkpoint_dir: Path) -> dict[str, Any]:
    """Any registered technique as a stage: apply it (with training batches if it reads data),
    then bake masks and codebooks into the weights and record which layers stay sparse/shared."""
    config = stage.config
    reads_data = hasattr(config, "calibration_batches")
    result = apply_(model, config, targets=stage.targets,
                    calibration=run.calibration(config.calibration_batches) if reads_data else None)
    forget_replaced(constraints, result.get("replaced", []))
    for name, module in parametrized_layers(model):
        for kind in (getattr(p, "constraint", None) for p in weight_parametrizations(module)):
            if kind == "shared":
                constraints[name] = kind  # a codebook keeps zeros at zero too
            elif kind:
                constraints.setdefault(name, kind)
    finalize_(model)
    return dict(result)


@validated
@pydantic_dataclass(frozen=True, kw_only=True, config=ConfigDict(extra="forbid"))
class EncodeStage(TechniqueConfig):
    """Write the compressed artifact: sparse indices + codebook indices, entropy coded."""

    kind = "encode"
    coder: str = "auto"
    index_bits: int | None = Field(default=None, ge=1, le=16)

    def check(self, seed: int) -> None:
        parse_coder(self.coder)


@validated
@pydantic_dataclass(frozen=True, kw_only=True, config=ConfigDict(extra="forbid"))
class GradualPrune(TechniqueConfig):
    """Train while the sparsity ramps up cubically to `sparsity` (Zhu & Gupta 2017).

    Attributes:
        sparsity: final share of zero weights in every selected layer.
        per_layer: final sparsity overrides by layer name.
        start_epoch: when the ramp starts (epochs, may be fractional).
        end_fraction: share of the training steps at whose end the final sparsity is reached.
        every: steps between two mask updates.
        train: the training options of the run.
        distill: a `distill:` block, as `fine_tune`'s: the training loss is then distillation
            from a teacher (by default the original model).
    """

    kind = "gradual_prune"
    sparsity: float = Field(ge=0, lt=1)
    per_layer: dict[str, float] = Field(default_factory=dict)
    start_epoch: float = Field(default=0.0, ge=0)
    end_fraction: float = Field(default=0.7, gt=0, le=1)
    every: int = Field(default=50, ge=1)
    train: dict[str, Any] = Field(default_factory=dict)
    distill: dict[str, Any] | None = None

    def check(self, seed: int) -> None:
        _check_train(self.train, seed)
        self.distillation()

    def distillation(self) -> Distill | None:
        """The `distill:` block as a `Distill` (None without one)."""
        if self.distill is None:
            return None
        try:
            return build_config(Distill, dict(self.distill))
        except ConfigError as exc:
            raise ConfigError(f"distill: {exc}") from None


@validated
@pydantic_dataclass(frozen=True, kw_only=True, config=ConfigDict(extra="forbid"))
class IterativePrune(TechniqueConfig):
    """`rounds` cycles of magnitude pruning then fine-tuning up to `sparsity` (Han 2015)."""

    kind = "iterative_prune"
    sparsity: float = Field(ge=0, lt=1)
    per_layer: dict[str, float] = Field(default_factory=dict)
    rounds: int = Field(default=3, ge=1)
    rewind: bool = False
    train: dict[str, Any] = Field(default_factory=dict)

    def check(self, seed: int) -> None:
        _check_train(self.train, seed)


def _check_train(train: dict[str, Any], seed: int) -> None:
    """A `train:` block is only read when the stage runs: check it when the recipe loads."""
    try:
        build_config(TrainConfig, {"seed": seed, **train})
    except ConfigError as exc:
        raise ConfigError(f"train: {exc}") from None


def _check_distill(distill: Distill | None, train: TrainConfig, seed: int) -> None:
    """A teacher to train is named and configured right, and the cache is not asked for where
    every epoch's samples differ."""
    if distill is None:
        return
    if distill.cache_teacher and train.shift:
        raise ConfigError(f"distill: cache_teacher memoises the teacher's outputs per sample, but "
                          f"shift: {train.shift} moves every sample anew each epoch, so nothing "
                          "would be reused: drop cache_teacher")
    teacher = distill.teacher
    if isinstance(teacher, TrainedTeacher):
        from torchslim.models import get_entry

        try:
            get_entry(teacher.model)
            if teacher.train is not None:
                _check_train(teacher.train, seed)
        except ConfigError as exc:
            raise ConfigError(f"distill: teacher: {exc}") from None


@dataclass(frozen=True)
class FineTune(TechniqueConfig):
    """Train with every pruned weight kept at zero and every shared weight kept shared;
    with `distill`, the loss is distillation from a teacher (by default the original model)."""

    kind = "fine_tune"
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: Distill | None = None

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> FineTune:
        """Training options at the top level, an optional `distill:` block, and the stage's own
        options (`_own_options`)."""
        block = options.pop("distill", None)
        extra = cls._own_options(options)
        train = build_config(TrainConfig, options)
        if block is None:
            return cls(train=train, **extra)
        return cls(train=train, distill=build_config(Distill, block), **extra)

    def check(self, seed: int) -> None:
        """What the stage reads only when it runs (the teacher block), checked on load."""
        _check_distill(self.distill, self.train, seed)

    @classmethod
    def _own_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class QATStage(FineTune):
    """Quantization-aware training (fake int8 in the forward), then conversion to the int8
    onnxruntime program; optionally distilled from the original model. Must be last."""

    kind = "qat"
    converts = True
    learn_scale: bool = False

    @classmethod
    def _own_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        return {"learn_scale": bool(options.pop("learn_scale", False))}


@dataclass(frozen=True)
class LowBitStage(FineTune):
    """Train with binary/ternary weights (STE), then store them as codes + per-channel scales."""

    kind = "lowbit"
    structural = True
    lowbit: LowBit = field(default_factory=LowBit)

    @classmethod
    def _own_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        return {"lowbit": build_config(LowBit, {k: options.pop(k) for k in ("mode", "activations")
                                                if k in options})}


@dataclass(frozen=True)
class DistillStage(FineTune):
    """`fine_tune` whose loss is always distillation (`distill:` block optional)."""

    kind = "distill"
    distill: Distill | None = field(default_factory=Distill)


# ------------------------------------------------------------------------------- runners
def _fine_tune(run: CompressionRun, stage: Stage, model: nn.Module, constraints: Constraints,
               checkpoint_dir: Path) -> dict[str, Any]:
    config: FineTune = stage.config
    run.fine_tune(model, replace(config.train), constraints, checkpoint_dir, distill=config.distill)
    if config.distill is None:
        return {}
    teacher = config.distill.teacher
    trained = run.teachers.get(teacher.path) if isinstance(teacher, TrainedTeacher) else None
    return {"distill": config.distill.to_dict(), **({"teacher": trained} if trained else {})}


def _gradual(run: CompressionRun, stage: Stage, model: nn.Module, constraints: Constraints,
             checkpoint_dir: Path) -> dict[str, Any]:
    config: GradualPrune = stage.config
    train = TrainConfig(**{"seed": run.recipe.seed, **config.train})
    steps = run.data.steps_per_epoch(train.batch_size)
    start = round(config.start_epoch * steps)
    end = max(start + 1, round(config.end_fraction * train.epochs * steps))
    pruning = WeightPruning(sparsity=config.sparsity, per_layer=config.per_layer)
    callback = GradualPruning(pruning, targets=stage.targets, start=start, end=end, every=config.every)
    distill = config.distillation()
    run.fine_tune(model, train, constraints, checkpoint_dir, (callback,), distill=distill)
    for name, _ in stage.targets.resolve(model):
        constraints.setdefault(name, "sparse")
    return {"start_step": start, "end_step": end, **({"distill": distill.to_dict()} if distill else {})}


def _iterative(run: CompressionRun, stage: Stage, model: nn.Module, constraints: Constraints,
               checkpoint_dir: Path) -> dict[str, Any]:
    from torchslim.apps.compress import constrain_
    from torchslim.apps.recipe import Stage

    config: IterativePrune = stage.config
    train = TrainConfig(**{"seed": run.recipe.seed, **config.train})
    initial = run.initial_state() if config.rewind else None
    rounds = iterative_sparsities(config.sparsity, config.rounds)
    for index, sparsity in enumerate(rounds):
        share = (index + 1) / config.rounds
        per_layer = {n: 1 - (1 - s) ** share for n, s in config.per_layer.items()}
        apply_stage(run, Stage(WeightPruning(sparsity=sparsity, per_layer=per_layer), stage.targets),
                    model, constraints, checkpoint_dir)
        if initial is not None:
            constrain_(model, constraints)
            rewind_(model, initial)
            finalize_(model)
        run.fine_tune(model, train, constraints, checkpoint_dir / f"round{index}")
    return {"round_sparsities": [round(s, 4) for s in rounds]}


def _lowbit(run: CompressionRun, stage: Stage, model: nn.Module, constraints: Constraints,
            checkpoint_dir: Path) -> dict[str, Any]:
    from torchslim.quantization.lowbit import finalize_lowbit_

    config: LowBitStage = stage.config
    result = apply_(model, config.lowbit, targets=stage.targets)
    run.train(model, replace(config.train), checkpoint_dir, loss=run.distill_loss(config.distill))
    replaced = finalize_lowbit_(model)
    forget_replaced(constraints, replaced["replaced"])
    return {**result, **replaced}


def _encode(run: CompressionRun, stage: Stage, model: nn.Module, constraints: Constraints,
            checkpoint_dir: Path) -> dict[str, Any]:
    return {"coder": stage.config.coder}  # the final file is written with this coding


def _quantize(run: CompressionRun, stage: Stage, model: nn.Module, constraints: Constraints,
              checkpoint_dir: Path) -> tuple[nn.Module, dict[str, Any]]:
    from torchslim.apps.workflows import inputs_for
    from torchslim.quantization import quantize_model

    config: Quantization = stage.config
    batches = [x for x, _ in run.calibration(config.calibration_batches)]
    converted = quantize_model(model, config, example_inputs=inputs_for(model, 2), calibration=batches)
    return converted, dict(getattr(converted, "report", {}))


def _qat(run: CompressionRun, stage: Stage, model: nn.Module, constraints: Constraints,
         checkpoint_dir: Path) -> tuple[nn.Module, dict[str, Any]]:
    from torchslim.apps.compress import constrain_
    from torchslim.apps.workflows import inputs_for
    from torchslim.quantization.qat import convert_qat, prepare_qat_

    config: QATStage = stage.config
    example = inputs_for(model, 2)
    constrain_(model, constraints)  # pruned weights stay zero while training
    chosen = None if stage.targets == Select() else stage.targets  # default: QAT's own (Linear, Conv2d)
    prepared = prepare_qat_(model, targets=chosen, learn_scale=config.learn_scale)
    run.train(model, replace(config.train), checkpoint_dir, loss=run.distill_loss(config.distill))
    batches = [x for x, _ in run.calibration(8)]
    converted = convert_qat(model, example_inputs=example, calibration=batches)
    report: dict[str, Any] = dict(getattr(converted, "report", {}))
    return converted, {**report, "layers": len(prepared["layers"]),
                       "folded_batchnorm": len(prepared["folded_batchnorm"])}


for _config, _runner in ((FineTune, _fine_tune), (DistillStage, _fine_tune), (GradualPrune, _gradual),
                         (IterativePrune, _iterative), (LowBitStage, _lowbit), (EncodeStage, _encode),
                         (Quantization, _quantize), (QATStage, _qat)):
    register_stage(_config, _runner)
