"""Knowledge distillation as a loss for the one `Trainer`: soft targets, hard/soft mix, hints.

`L = α·L_hard + (1 − α)·L_soft (+ β·L_features)`, where `L_soft` is Hinton et al.'s (2015)
KL divergence between the teacher's and the student's softened distributions, scaled by T² so
its gradients keep their size as T changes; `α = 0` is pure-soft (labels unused). Models that
output embeddings instead of logits use an `mse` or `cosine` output term. Feature (hint)
distillation (FitNets, Romero et al. 2015) matches named intermediate outputs through learned
adapters when the widths differ. Being a loss, it composes with pruning callbacks and QAT.

The teacher is frozen and run in eval mode under `no_grad`; with `cache_teacher` its outputs are
memoised per sample (keyed by the sample's bytes), which pays off when the same training
samples come back every epoch without augmentation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import nn

from torchslim.calibration import call_model, logits_of, token_cross_entropy
from torchslim.config import to_jsonable, validated
from torchslim.errors import ConfigError
from torchslim.training.callbacks import Loss

__all__ = ["Distill", "DistillationLoss", "OutputLoss", "TrainedTeacher", "soft_target_loss"]


class OutputLoss(StrEnum):
    KL = "kl"  # logits: Hinton soft targets with temperature
    MSE = "mse"  # embeddings or regression outputs
    COSINE = "cosine"  # embeddings: 1 - cos(student, teacher)


@validated
@dataclass(frozen=True, kw_only=True, config=ConfigDict(extra="forbid"))
class TrainedTeacher:
    """A teacher of another architecture than the student, kept in its own file: loaded from
    `path` when it is there, otherwise trained (`train:` block) on the run's data and written
    there, so the next run reuses it.

    Attributes:
        model: the registered model name (e.g. `mlp-1200-1200`); a file found at `path` must
            hold this model.
        path: the teacher's `.slim` file, relative to the working directory (like `--out`).
        train: the training options (`TrainConfig` keys: epochs, lr, shift, ...); without them
            the file must exist.
    """

    what = "teacher block"

    model: str = Field(min_length=1)
    path: str = Field(min_length=1)
    train: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "path": self.path, "train": to_jsonable(self.train)}


@validated
@dataclass(frozen=True, kw_only=True, config=ConfigDict(extra="forbid"))
class Distill:
    """A `distill:` block of a fine-tuning stage: which teacher, and the loss options.

    Attributes:
        teacher: `original` (the uncompressed model the run started from), an artifact path or
            registered name, or a `TrainedTeacher` block (`{model:, path:, train:}`): another
            architecture, trained first if its file is missing.
        temperature: softening T of the kl term (> 0).
        alpha: weight of the hard-label term, in [0, 1]; 0 is pure-soft (no labels needed).
        output: kl | mse | cosine, the output term.
        features: (student module, teacher module) name pairs for hint losses.
        feature_weight: β, the weight of the summed hint losses.
        cache_teacher: memoise teacher outputs per sample.
    """

    what = "distill block"

    teacher: str | TrainedTeacher = "original"
    temperature: float = Field(default=4.0, gt=0)
    alpha: float = Field(default=0.5, ge=0, le=1)
    output: OutputLoss = OutputLoss.KL
    features: tuple[tuple[str, str], ...] = ()
    feature_weight: float = Field(default=1.0, ge=0)
    cache_teacher: bool = False

    def loss_options(self) -> dict[str, Any]:
        """The keyword arguments of `DistillationLoss` (everything but the teacher)."""
        return {"temperature": self.temperature, "alpha": self.alpha, "output": self.output,
                "features": self.features, "feature_weight": self.feature_weight,
                "cache_teacher": self.cache_teacher}

    def to_dict(self) -> dict[str, Any]:
        return {name: to_jsonable(getattr(self, name)) for name in self.__dataclass_fields__}


def soft_target_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), averaged over the batch.

    Example:
        >>> logits = torch.tensor([[2.0, 0.0, -1.0]])
        >>> float(soft_target_loss(logits, logits, 4.0))
        0.0
    """
    if student.dim() > 2:  # a language model's (batch, tokens, vocabulary): averaged per token
        student, teacher = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2


def _output_of(value: Any) -> torch.Tensor:
    """The tensor a hooked module returned (HF layers return tuples: take the first item)."""
    while isinstance(value, tuple | list):
        value = value[0]
    if not isinstance(value, torch.Tensor):
        raise ConfigError(f"a hooked module returned {type(value).__name__}, not a tensor")
    return value


def _adapter(student: torch.Tensor, teacher: torch.Tensor, name: str) -> nn.Module:
    """Identity when the widths agree, else a learned 1x1 conv / linear map to the teacher's."""
    if student.dim() != teacher.dim() or (student.dim() == 4 and student.shape[2:] != teacher.shape[2:]):
        raise ConfigError(f"feature pair {name}: student output {tuple(student.shape)} and teacher "
                          f"output {tuple(teacher.shape)} differ beyond the channel width; pair "
                          "layers with the same spatial / sequence shape")
    if student.dim() == 4:  # (B, C, H, W): channels on dim 1
        s_width, t_width = student.shape[1], teacher.shape[1]
        return nn.Identity() if s_width == t_width else nn.Conv2d(s_width, t_width, 1, bias=False)
    s_width, t_width = student.shape[-1], teacher.shape[-1]  # (B, C) or (B, T, C)
    return nn.Identity() if s_width == t_width else nn.Linear(s_width, t_width, bias=False)


class _Capture:
    """Forward hooks that keep the latest output of named modules."""

    def __init__(self, model: nn.Module, names: Sequence[str], role: str) -> None:
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ConfigError(f"{role} has no module(s) {missing} for feature distillation; "
                              f"modules are: {', '.join(n for n in modules if n)[:600]}")
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.outputs[name] = _output_of(output)
        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


class DistillationLoss(Loss):
    """`α·CE(student, labels) + (1−α)·output_term(student, teacher) + β·Σ hint MSE`.

    Args:
        teacher: the frozen teacher (never trained, kept in eval mode).
        temperature: T of the kl term.
        alpha: weight of the hard-label cross-entropy (0: pure-soft, labels ignored).
        output: kl | mse | cosine.
        features: (student module, teacher module) name pairs for hint losses.
        feature_weight: β.
        cache_teacher: memoise teacher outputs per sample (not with `features`).

    Example:
        >>> teacher, student = nn.Linear(4, 3), nn.Linear(4, 3)
        >>> loss = DistillationLoss(teacher, temperature=2.0, alpha=0.0)
        >>> _ = loss.bind(student, torch.randn(2, 4))
        >>> x = torch.randn(5, 4)
        >>> float(loss(student(x), torch.zeros(5, dtype=torch.long), x)) >= 0
        True
    """

    def __init__(self, teacher: nn.Module, *, temperature: float = 4.0, alpha: float = 0.5,
                 output: OutputLoss | str = OutputLoss.KL, features: Sequence[tuple[str, str]] = (),
                 feature_weight: float = 1.0, cache_teacher: bool = False) -> None:
        problems = []
        if not temperature > 0:
            problems.append(f"temperature={temperature} (valid: > 0)")
        if not 0 <= alpha <= 1:
            problems.append(f"alpha={alpha} (valid: 0..1)")
        if output not in set(OutputLoss):
            problems.append(f"output={output!r} (valid: {', '.join(OutputLoss)})")
        if cache_teacher and features:
            problems.append("cache_teacher with features (hints need the teacher's activations "
                            "of every step; drop one of them)")
        if problems:
            raise ConfigError(f"invalid distillation options: {'; '.join(problems)}")
        # Eval mode and no_grad on every call: the teacher never trains, and the caller's
        # model keeps its requires_grad flags (it may be copied and trained later).
        self.teacher = teacher.eval()
        self.temperature, self.alpha = temperature, alpha
        self.output = OutputLoss(output)
        self.features = tuple((str(s), str(t)) for s, t in features)
        self.feature_weight = feature_weight
        self.cache_teacher = cache_teacher
        self.cache: dict[bytes, torch.Tensor] = {}
        self.adapters = nn.ModuleDict()
        self._student: _Capture | None = None
        self._teacher = _Capture(self.teacher, [t for _, t in self.features], "the teacher")

    # ------------------------------------------------------------------ trainer side
    def bind(self, student: nn.Module, example_inputs: torch.Tensor) -> list[nn.Parameter]:
        """Hook the student and build adapters from one dry run; returns their parameters."""
        if self._student is not None:
            self._student.close()
        device = next(student.parameters()).device
        self.teacher.to(device)
        self._student = _Capture(student, [s for s, _ in self.features], "the student")
        with torch.no_grad():
            was_training = student.training
            s_out = logits_of(call_model(student.eval(), example_inputs))
            student.train(was_training)
            t_out = logits_of(call_model(self.teacher, example_inputs))
        if s_out.shape != t_out.shape:
            raise ConfigError(f"student output {tuple(s_out.shape)} and teacher output "
                              f"{tuple(t_out.shape)} differ; distillation needs the same output "
                              "shape (same classes / embedding width)")
        self.adapters = nn.ModuleDict({
            str(i): _adapter(self._student.outputs[s], self._teacher.outputs[t], f"{s}->{t}")
            for i, (s, t) in enumerate(self.features)}).to(device)
        return list(self.adapters.parameters())

    def state_dict(self) -> dict[str, Any]:
        return {"adapters": self.adapters.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.adapters.load_state_dict(state.get("adapters", {}))

    # ------------------------------------------------------------------- the loss
    def _teacher_outputs(self, inputs: torch.Tensor) -> torch.Tensor:
        if not self.cache_teacher or not isinstance(inputs, torch.Tensor):
            with torch.no_grad():
                return logits_of(call_model(self.teacher, inputs))
        keys = [hashlib.blake2b(row.cpu().numpy().tobytes(), digest_size=16).digest()
                for row in inputs]
        missing = [i for i, key in enumerate(keys) if key not in self.cache]
        if missing:
            with torch.no_grad():
                fresh = logits_of(self.teacher(inputs[missing]))
            for i, value in zip(missing, fresh, strict=True):
                self.cache[keys[i]] = value
        return torch.stack([self.cache[key] for key in keys])

    def _output_term(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.output == OutputLoss.KL:
            return soft_target_loss(outputs, target, self.temperature)
        if self.output == OutputLoss.MSE:
            return F.mse_loss(outputs, target)
        return (1 - F.cosine_similarity(outputs, target, dim=-1)).mean()

    def __call__(self, outputs: torch.Tensor, labels: torch.Tensor,
                 inputs: torch.Tensor) -> torch.Tensor:
        if self._student is None:
            raise ConfigError("DistillationLoss.bind(student, example_inputs) was not called; "
                              "pass the loss to Trainer(loss=...), which binds it")
        target = self._teacher_outputs(inputs)
        outputs = logits_of(outputs)  # a tuple / dict / Hugging Face output: its logits
        loss = (1 - self.alpha) * self._output_term(outputs, target)
        if self.alpha > 0:
            loss = loss + self.alpha * token_cross_entropy(outputs, labels)
        if self.features:
            hints = [F.mse_loss(self.adapters[str(i)](self._student.outputs[s]),
                                self._teacher.outputs[t])
                     for i, (s, t) in enumerate(self.features)]
            loss = loss + self.feature_weight * torch.stack(hints).sum()
        return loss
