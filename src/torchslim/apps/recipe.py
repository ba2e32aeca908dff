"""Recipes: a versioned YAML list of stages, validated before anything runs.

```yaml
version: 1
model: lenet300          # registered name; `--model ARTIFACT` on the CLI overrides it
dataset: mnist
baseline: {epochs: 12}   # train the baseline first (TrainConfig options), unless given one
stages:
  - prune: {per_layer: {fc1: 0.92, fc2: 0.91, fc3: 0.74}}
  - fine_tune: {epochs: 8, lr: 0.01}
  - cluster: {bits: 6}
  - fine_tune: {epochs: 3, lr: 0.001}
  - encode: {coder: auto}
```
Structural stages (`structured_prune`, `low_rank`, `decompose_conv`, `drop_layers`) change layers;
a `fine_tune` (or `distill`) stage with a `distill: {teacher: original, temperature: 4, alpha: 0.5}`
block trains against a teacher, `original` being the model the run started from.
Unknown keys, unknown stage names and bad values fail on load, listing what is valid; each
stage's `targets:` is a `Select` mapping, resolved against the model before the first stage runs
(up to the first structural stage: later selections may name the layers it creates).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Importing the techniques registers them (and their recipe stages).
from torchslim import batchnorm, clustering, depth, lowrank, pruning  # noqa: F401
from torchslim.apps.stages import (
    DistillStage,
    EncodeStage,
    FineTune,
    GradualPrune,
    IterativePrune,
    LowBitStage,
    QATStage,
)
from torchslim.config import build_config
from torchslim.errors import ConfigError
from torchslim.quantization import weight_only  # noqa: F401
from torchslim.registry import stage_kinds, stage_type
from torchslim.select import Select
from torchslim.training import TrainConfig

__all__ = ["RECIPE_VERSION", "DistillStage", "EncodeStage", "FineTune", "GradualPrune",
           "IterativePrune", "LowBitStage", "QATStage", "Recipe", "Stage", "load_recipe", "parse_recipe"]
# The stage configs live with their runners in `torchslim.apps.stages`; they are re-exported here
# because a recipe is where users meet them.

RECIPE_VERSION = 1


@dataclass(frozen=True)
class Stage:
    """One recipe step: its config, and the layers it touches."""

    config: Any
    targets: Select

    @property
    def kind(self) -> str:
        return str(self.config.kind)


@dataclass(frozen=True)
class Recipe:
    """A validated recipe; `digest` identifies it for resuming."""

    model: str | None
    dataset: str | None
    seed: int
    baseline: TrainConfig | None
    stages: tuple[Stage, ...]
    source: dict[str, Any]
    time_stages: tuple[int, ...] = ()  # stage numbers timed at the end, beside baseline and final
    text: dict[str, Any] = field(default_factory=dict)  # LMs: sequence_length, eval/train_tokens

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.source, sort_keys=True).encode()).hexdigest()[:16]


def _stage(index: int, item: Any, seed: int) -> Stage:
    if not isinstance(item, dict) or len(item) != 1:
        raise ConfigError(f"stage {index} must be a mapping with one key (the stage name), got "
                          f"{item!r}; stage names: {', '.join(stage_kinds())}")
    (kind, options), = item.items()
    if kind not in stage_kinds():
        raise ConfigError(f"stage {index}: unknown stage {str(kind)[:60]!r}; valid stages: "
                          f"{', '.join(stage_kinds())}")
    if options is not None and not isinstance(options, dict):
        raise ConfigError(f"stage {index} ({kind}): options must be a mapping (`{kind}: {{key: "
                          f"value}}`), got a {type(options).__name__}: {str(options)[:60]}")
    options = dict(options or {})
    try:
        targets = Select.from_dict(options.pop("targets", None))
        cls = stage_type(kind).config
        config = cls.from_options(options) if hasattr(cls, "from_options") else build_config(cls, options)
        if hasattr(config, "check"):  # options the stage reads only later (coder, `train:` block)
            config.check(seed)
    except ConfigError as exc:
        raise ConfigError(f"stage {index} ({kind}): {exc}") from None
    return Stage(config=config, targets=targets)


def parse_recipe(data: Any) -> Recipe:
    """Validate a recipe mapping (as read from YAML)."""
    if not isinstance(data, dict):
        raise ConfigError(f"a recipe is a mapping with 'version' and 'stages', got {type(data).__name__}")
    valid = {"version", "name", "description", "model", "dataset", "seed", "baseline", "stages",
             "time_stages", "text"}
    unknown = sorted(set(data) - valid)
    if unknown:
        raise ConfigError(f"unknown recipe key(s) {unknown}; valid keys: {', '.join(sorted(valid))}")
    if data.get("version") != RECIPE_VERSION:
        raise ConfigError(f"recipe version {data.get('version')!r} is not supported; this "
                          f"torchslim reads version {RECIPE_VERSION} (add `version: 1`)")
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ConfigError("a recipe needs a non-empty 'stages' list")
    seed = data.get("seed", 0)
    if type(seed) is not int or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {str(seed)[:40]!r}")
    baseline = None
    if data.get("baseline") is not None:
        try:
            if not isinstance(data["baseline"], dict):
                raise ConfigError(f"options must be a mapping, got {type(data['baseline']).__name__}")
            baseline = build_config(TrainConfig, {"seed": seed, **data["baseline"]})
        except ConfigError as exc:
            raise ConfigError(f"baseline: {exc}") from None
    for key in ("model", "dataset"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise ConfigError(f"{key} must be a name (a string), got {str(data[key])[:60]!r}")
    parsed = tuple(_stage(i, item, seed) for i, item in enumerate(stages))
    text = data.get("text") or {}
    if not isinstance(text, dict) or set(text) - {"sequence_length", "eval_tokens", "train_tokens"} \
            or not all(type(v) is int and v > 0 for v in text.values()):
        raise ConfigError("text (language models) takes positive integers sequence_length (calibration "
                          "and training window, default 512), eval_tokens (held-out tokens scored, "
                          "default 16384) and train_tokens (calibration-split tokens one training "
                          f"epoch reads, default all), got {str(text)[:80]!r}")
    timed = data.get("time_stages") or []
    if not isinstance(timed, list) or not all(type(n) is int and 1 <= n <= len(parsed) for n in timed):
        raise ConfigError(f"time_stages lists stage numbers (1 to {len(parsed)}) to time beside the "
                          f"baseline and the final model, got {str(timed)[:60]!r}")
    encodes = [i for i, s in enumerate(parsed) if s.kind == "encode"]
    if encodes and encodes != [len(parsed) - 1]:
        raise ConfigError("'encode' must be the last stage, and appear once")
    conversions = [i for i, s in enumerate(parsed) if stage_type(s.kind).converts]
    last_model_stage = len(parsed) - 1 - len(encodes)  # `encode` only codes the file
    if conversions and conversions != [last_model_stage]:
        raise ConfigError("'quantize' / 'qat' must come last (only 'encode' may follow), once: the "
                          "model becomes an int8 program")
    return Recipe(model=data.get("model"), dataset=data.get("dataset"), seed=seed,
                  baseline=baseline, stages=parsed, source=data,
                  time_stages=tuple(sorted(set(timed))), text=dict(text))


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist; see examples/recipes/ for examples")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise ConfigError(f"recipe {path} is {path.stat().st_size:,} bytes; a recipe is a short "
                          f"YAML file (at most {MAX_RECIPE_BYTES:,} bytes)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"recipe {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                          "save it as UTF-8") from None
    return parse_recipe(parse_yaml(text, what=f"recipe {path}"))


MAX_RECIPE_BYTES = 1 << 20


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader without anchors/aliases: a 1 KB "billion laughs" file cannot expand."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(f"YAML aliases (*{event.anchor}) are not allowed in recipes (line "
                              f"{event.start_mark.line + 1}); write the value out")
        return super().compose_node(parent, index)


def parse_yaml(text: str, *, what: str) -> Any:
    """Parse untrusted YAML safely: no Python objects, no aliases, errors as `ConfigError`."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} is not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{what} nests too deeply to be a recipe") from None
