"""Write the documentation pages that are read from the code, at build time (mkdocs-gen-files).

- `cli.md`: every `torchslim` command, from the argparse parser (`torchslim.cli.build_parser`).
- `recipes.md`: every recipe stage and key, from the stage registry (`torchslim.registry`): each
  stage's config class, its fields with types, defaults and bounds (pydantic metadata), and the
  field descriptions of the class docstring's `Attributes:` / `Args:` section.
- technique pages: a line `<!-- slim:stage KIND -->` is replaced by that stage's key table.

Nothing here is written twice: a new option, stage or key appears on the next build.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import importlib
import inspect
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import mkdocs_gen_files

os.environ["COLUMNS"] = "100"  # argparse wraps usage lines to the terminal width

# Modules whose `__all__` names a config class publicly (the link target in the API reference).
PUBLIC_MODULES = ("torchslim", "torchslim.pruning", "torchslim.quantization", "torchslim.lowrank",
                  "torchslim.clustering", "torchslim.depth", "torchslim.distillation", "torchslim.training")


# ----------------------------------------------------------------------------- docstrings
def field_docs(cls: type) -> dict[str, str]:
    """`name: description` entries of the `Attributes:`/`Args:` sections of `cls` and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        text = inspect.cleandoc(klass.__dict__.get("__doc__") or "")
        section, name = False, None
        for line in text.splitlines():
            if re.match(r"^(Attributes|Args|Arguments|Parameters):\s*$", line):
                section, name = True, None
                continue
            if not section:
                continue
            if line and not line.startswith(" "):
                section = False  # the next section or prose
                continue
            entry = re.match(r"^ {4}(\w+)(?: \([^)]*\))?:\s*(.*)$", line)
            if entry:
                name = entry.group(1)
                docs[name] = entry.group(2).strip()
            elif name and line.strip():
                docs[name] += " " + line.strip()
    return docs


def summary(cls: type) -> str:
    """The docstring's first paragraph, on one line."""
    text = inspect.cleandoc(cls.__doc__ or "")
    return " ".join(text.split("\n\n")[0].split())


# ----------------------------------------------------------------------------- config fields
REQUIRED = object()  # the default of a key that must be given


@dataclasses.dataclass
class Key:
    """One key of a config: its type, default value (or REQUIRED), bounds and description."""

    name: str
    type: Any
    default: Any
    bounds: str
    doc: str


def _yaml(value: Any) -> str:
    if isinstance(value, enum.Enum):
        value = value.value
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple | list):
        return "`[" + ", ".join(_yaml(v).strip("`") for v in value) + "]`"
    if isinstance(value, dict):
        return "`{" + ", ".join(f"{k}: {_yaml(v).strip('`')}" for k, v in value.items()) + "}`"
    return f"`{value}`"


def _bounds(metadata: list[Any]) -> str:
    words = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    parts = []
    for item in metadata:
        for attribute, symbol in words.items():
            if getattr(item, attribute, None) is not None:
                parts.append(f"{symbol} {getattr(item, attribute)}")
        if getattr(item, "min_length", None) is not None:
            parts.append(f"at least {item.min_length} item(s)")
    return ", ".join(parts)


def type_text(tp: Any) -> str:
    """A field's type as a reader of YAML needs it: enums by their values."""
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return " \\| ".join(f"`{member.value}`" for member in tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        kept = [type_text(a) for a in args if a is not type(None)]
        return " or ".join(kept) + (" or `null`" if type(None) in args else "")
    if origin is typing.Literal:
        return " or ".join(f"`{value}`" for value in args)
    if origin is typing.Annotated:
        return type_text(args[0])
    if origin is dict:
        return f"mapping of {type_text(args[0])} to {type_text(args[1])}"
    if origin in (tuple, list):
        inner = args[0] if args else Any
        return f"list of {type_text(inner)}"
    if tp is Any:
        return "any"
    if isinstance(tp, type):
        if dataclasses.is_dataclass(tp):
            return f"`{tp.__name__}` mapping"
        names = {"str": "text", "int": "integer", "float": "number", "bool": "boolean"}
        return names.get(tp.__name__, tp.__name__)
    return str(tp).replace("typing.", "")


def keys_of(cls: type) -> list[Key]:
    """The fields of a config class (pydantic or plain dataclass), in declaration order."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    pydantic_fields = getattr(cls, "__pydantic_fields__", None)
    keys = []
    for field in dataclasses.fields(cls):
        info = pydantic_fields.get(field.name) if pydantic_fields else None
        if info is not None:  # pydantic keeps defaults and bounds in its FieldInfo
            default = (REQUIRED if info.is_required() else
                       info.default_factory() if info.default_factory is not None else info.default)
            bounds = _bounds(list(info.metadata))
        else:
            factory = field.default_factory
            default = (field.default if field.default is not dataclasses.MISSING else
                       factory() if factory is not dataclasses.MISSING else REQUIRED)
            bounds = ""
        field_type = hints.get(field.name, field.type)
        keys.append(Key(field.name, field_type, default, bounds, docs.get(field.name, "")))
    return keys


def _cell(text: str) -> str:
    """Text that stays inside one Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def key_table(keys: list[Key], *, anchor_links: dict[str, str] | None = None) -> str:
    rows = ["| key | type | default | valid | meaning |", "|---|---|---|---|---|"]
    for key in keys:
        doc = _cell(key.doc)
        if anchor_links and key.name in anchor_links:
            doc = (doc + " " if doc else "") + anchor_links[key.name]
        default = "required" if key.default is REQUIRED else _yaml(key.default)
        rows.append(f"| `{key.name}` | {type_text(key.type)} | {default} | {key.bounds} | {doc} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- recipe stages
def public_path(cls: type) -> str | None:
    """`module.Name` where `cls` is exported publicly (and documented in the API reference)."""
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        if cls.__name__ in getattr(module, "__all__", ()) and getattr(module, cls.__name__) is cls:
            return f"{module_name}.{cls.__name__}"
    return None


def _link(cls: type) -> str:
    """A reference to the class in the API reference, or its import path when not public."""
    path = public_path(cls)
    return f"[`{path}`][{path}]" if path else f"`{cls.__module__}.{cls.__name__}`"


def _trains(cls: type) -> bool:
    from torchslim.training import TrainConfig

    return typing.get_type_hints(cls).get("train") is TrainConfig


def own_options(cls: type) -> list[Key]:
    """The keys a training stage takes besides the training options and `distill:`: found by
    asking its `from_options` parser which of its fields' keys it consumes."""
    candidates: dict[str, Key] = {}
    for key in keys_of(cls):
        if key.name in ("train", "distill"):
            continue
        if isinstance(key.type, type) and dataclasses.is_dataclass(key.type):
            candidates.update({k.name: k for k in keys_of(key.type)})
        else:
            candidates[key.name] = key
    probe = {name: key.default for name, key in candidates.items() if key.default is not REQUIRED}
    try:
        cls._own_options(probe)  # pops the keys it reads
    except Exception:
        return list(candidates.values())  # cannot tell: list every candidate
    return [candidates[name] for name in candidates if name not in probe]


def stage_section(kind: str, *, heading: str | None, base: str = "") -> str:
    """One stage: what it is, how it runs, its keys; `base` leads from the page to the docs root."""
    from torchslim.registry import stage_type, technique_config, technique_kinds

    stage = stage_type(kind)
    cls = stage.config
    lines = [f"{heading} `{kind}`", ""] if heading else []
    lines += [summary(cls), ""]
    facts = []
    technique = technique_config(kind) if kind in technique_kinds() else None
    if technique is not None:
        facts.append(f"Python: `ts.apply_(model, {technique.__name__}(...))` with {_link(technique)}")
    if stage.runner is not None:
        config = "" if technique is cls else f" (its config: {_link(cls)})"
        facts.append(f"the recipe stage has its own runner{config}: it trains, converts or writes "
                     "the file, beyond one `apply_`" if technique is not None else
                     f"a recipe stage with its own runner; its config: {_link(cls)}")
    if stage.structural:
        facts.append("replaces or reshapes layers (later `targets:` are resolved after it runs)")
    if stage.converts:
        facts.append("turns the model into an int8 program: the last model stage (only `encode` may follow)")
    lines += ["- " + fact for fact in facts] + [""]
    if _trains(cls):
        distill_default = next(k.default for k in keys_of(cls) if k.name == "distill")
        lines += [f"Keys: every [training option]({base}recipes.md#training-options) at the top level "
                  f"(`epochs`, `lr`, ...), and a [`distill:` block]({base}recipes.md#distill-block) "
                  + ("(optional: this stage always distils, from the original model by default)."
                     if distill_default is not None else "(optional: without it, the loss is the labels')."),
                  ""]
        extra = own_options(cls)
        if extra:
            lines += ["Its own keys:", "", key_table(extra), ""]
        return "\n".join(lines)
    keys = keys_of(cls)
    links = {"train": f"Its keys are the [training options]({base}recipes.md#training-options)."}
    if keys:
        lines += [key_table(keys, anchor_links=links), ""]
    else:
        lines += ["No keys.", ""]
    return "\n".join(lines)


def top_level_keys() -> list[str]:
    """The keys a recipe mapping accepts, as `parse_recipe` itself lists them."""
    from torchslim.apps.recipe import RECIPE_VERSION, parse_recipe
    from torchslim.errors import ConfigError

    try:
        parse_recipe({"version": RECIPE_VERSION, "stages": [{"encode": {}}], " probe": 1})
    except ConfigError as exc:
        match = re.search(r"valid keys: (.*)$", str(exc))
        if match:
            return [k.strip() for k in match.group(1).split(",")]
    raise RuntimeError("could not read the valid recipe keys from parse_recipe")


TOP_LEVEL = {
    "version": "Recipe format version; this torchslim reads `1`. Required.",
    "name": "A name for the recipe (information only).",
    "description": "A description (information only).",
    "model": "A registered model name, a language model name (`smollm2-135m`), an artifact path, or "
             "`FILE.py:FUNCTION`; `--model` on the command line overrides it.",
    "dataset": "A built-in dataset name, a text dataset for a causal language model (`python-docs`: "
               "one-shot stages only, rows in perplexity), or `FILE.py:FUNCTION` returning "
               "`{\"train\", \"val\", \"test\"}` loaders.",
    "seed": "Seeds the baseline's initialisation and every stage (a non-negative integer, default 0).",
    "baseline": "Train the recipe's model first (its registered model, or its own `FILE.py:FUNCTION`), "
                "with these [training options](#training-options); omit it to compress a trained model. "
                "A `--model` given on the command line is compressed as given (a warning says so).",
    "stages": "The ordered list of stages, each a mapping with one key: the stage name. Required.",
    "time_stages": "Stage numbers (1 = the first stage) whose result is timed too, beside the baseline "
                   "and the final model (other rows show – for latency).",
    "text": "Language models: `sequence_length` of the calibration and training windows (default "
            "512), `eval_tokens`, the held-out tokens scored for perplexity (default 16384), and "
            "`train_tokens`, the calibration-split tokens one epoch of `fine_tune` / `distill` reads "
            "(default: all but the last twentieth, their validation windows).",
}


def recipes_page() -> str:
    from torchslim.apps.recipe import RECIPE_VERSION
    from torchslim.distillation import Distill, TrainedTeacher
    from torchslim.registry import stage_kinds, stage_type
    from torchslim.select import Select
    from torchslim.training import TrainConfig

    kinds = stage_kinds()
    training = [k for k in kinds if _trains(stage_type(k).config)]
    out = [
        "# Recipes",
        "",
        "A recipe is a versioned YAML file: a model, a dataset and an ordered list of stages. "
        "`torchslim compress RECIPE --out DIR` validates the whole recipe against the model before "
        "any work (unknown keys and stage names fail, listing the valid ones; a `targets:` selection "
        "that matches no layer fails), then runs the stages, checkpointing each "
        "(`DIR/stages/NN-KIND.slim`), and writes `DIR/model.slim`, `DIR/report.md|json` and plots. "
        "`--resume` continues a killed run (see [Scaling out](scaling-out.md#checkpoints-and-resuming)). "
        "The report has one row per stage with its validation and test accuracy, params, non-zeros, "
        "bytes on disk, MACs and measured latency, plus `accuracy_vs_size.png` and "
        "`accuracy_vs_latency.png`. Any order of stages composes, e.g. `structured_prune -> fine_tune "
        "(distill) -> prune -> cluster -> quantize -> encode` in one call.",
        "",
        "This page is generated from the code at build time: the stage registry "
        "(`torchslim.registry.stage_kinds()`), each stage's config class, its fields' types, defaults "
        "and bounds, and the descriptions in its docstring.",
        "",
        "## An example",
        "",
        "A recipe for your own model, from [`examples/recipe_own_model.py`](own-model.md#a-recipe) "
        "(run by the test suite):",
        "",
        "```yaml",
        '--8<-- "examples/recipe_own_model.py:recipe"',
        "```",
        "",
        "The recipes that reproduce the published numbers are in `examples/recipes/`; "
        "`torchslim demo` runs the built-in Deep Compression recipe.",
        "",
        "## Top-level keys",
        "",
        "| key | meaning |",
        "|---|---|",
    ]
    out += [f"| `{key}` | {TOP_LEVEL.get(key, '(not described yet)')} |" for key in top_level_keys()]
    out += ["", f"This torchslim reads recipe version `{RECIPE_VERSION}`.", "",
            "## Rules", "",
            "- `encode` must be the last stage, and appear once; it codes the file, not the model.",
            "- A stage that converts the model to an int8 program (" +
            ", ".join(f"`{k}`" for k in kinds if stage_type(k).converts) +
            ") must be the last model stage: only `encode` may follow it.",
            "- Structural stages (" + ", ".join(f"`{k}`" for k in kinds if stage_type(k).structural) +
            ") replace or reshape layers; `targets:` of later stages are resolved after they run.",
            "- The training stages (" + ", ".join(f"`{k}`" for k in training) +
            ") keep every pruned weight at zero and every shared weight shared while they train.",
            "- Any stage may take [`targets:`](#targets), the layers it acts on; a technique's default "
            "is its own (Linear and Conv layers, for most). Selections are resolved against the model "
            "before the first stage runs (up to the first structural stage).",
            "", "## Stages", "",
            "| stage | what it does |", "|---|---|"]
    out += [f"| [`{k}`](#{k}) | {_cell(summary(stage_type(k).config))} |" for k in kinds]
    out += [""]
    for kind in kinds:
        out += [stage_section(kind, heading="###"), ""]
    out += ["## Training options", "",
            "The keys of `baseline:`, of every training stage (at its top level) and of the `train:` "
            "block of `gradual_prune` / `iterative_prune` (`TrainConfig`):", "",
            key_table(keys_of(TrainConfig)), "",
            "## `distill:` block", "",
            summary(Distill), "", key_table(keys_of(Distill)), "",
            "### Teacher block", "",
            summary(TrainedTeacher) + " A file at `path` must hold `model`; delete it to train the "
            "teacher again. The stage's summary in the report "
            "records whether the teacher was trained or reused, and its validation and test accuracy. "
            "[`examples/recipes/hinton_mnist_distill.yaml`](techniques/distillation.md#hintons-mnist-"
            "experiment) trains the teacher of Hinton et al.'s MNIST experiment this way:", "",
            "```yaml",
            "  - distill:",
            "      epochs: 40",
            "      shift: 2            # jitter: the transfer set is shifted by up to 2 pixels",
            "      distill:",
            "        temperature: 20",
            "        teacher:",
            "          model: lenet5",
            "          path: runs/hinton-lenet5-teacher/model.slim",
            "          train: {epochs: 30, lr: 0.05, momentum: 0.9, shift: 2}",
            "```", "",
            key_table(keys_of(TrainedTeacher)), "",
            "## `targets:`", "",
            summary(Select) + " In a recipe, `targets:` is a mapping of these keys (a rule that matches "
            "nothing is an error):", "",
            key_table(keys_of(Select)), ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------- CLI
def _subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return {name: (helps.get(name, ""), sub) for name, sub in action.choices.items()}
    return {}


def _option_row(action: argparse.Action) -> str:
    if action.option_strings:
        names = ", ".join(f"`{s}`" for s in action.option_strings)
    else:
        names = f"`{action.metavar or action.dest}`"
    value = ""
    if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
        value = " \\| ".join(f"`{c}`" for c in action.choices)
    elif action.nargs != 0 and action.option_strings:
        metavar = action.metavar or action.dest.upper()
        value = f"`{metavar}`" + (" ..." if action.nargs in ("+", "*") else "")
    default = ""
    if action.default not in (None, False, argparse.SUPPRESS) and action.nargs != 0:
        default = f"`{action.default}`"
    required = " (required)" if action.required and action.option_strings else ""
    help_text = _cell(argparse.HelpFormatter("torchslim")._expand_help(action)) if action.help else ""
    return f"| {names}{required} | {value} | {default} | {help_text} |"


def _command_section(name: str, help_text: str, parser: argparse.ArgumentParser) -> list[str]:
    out = [f"## `torchslim {name}`", "", f"*{help_text}*" if help_text else "", ""]
    if parser.description:
        out += [parser.description, ""]
    out += ["```text", parser.format_usage().strip(), "```", ""]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.dest != "help"]
        if not actions:
            continue
        title = group.title or "options"
        out += [f"**{title[0].upper() + title[1:]}**", "", "| argument | value | default | meaning |",
                "|---|---|---|---|"] + [_option_row(a) for a in actions] + [""]
    if parser.epilog:
        out += [parser.epilog, ""]
    return out


def cli_page() -> str:
    from torchslim.cli import build_parser

    parser = build_parser()
    commands = _subcommands(parser)
    out = ["# Command line", "",
           "`torchslim COMMAND ...` is a thin shell over the same functions as the Python API. This "
           "page is generated from its argparse parser (`torchslim.cli.build_parser()`) at build "
           "time; `torchslim COMMAND --help` prints the same.", "",
           "Wherever a command takes a model, it takes a registered name, a `.slim` artifact, a "
           "local Hugging Face folder, or `FILE.py:FUNCTION` / `package.module:FUNCTION` returning your "
           "`nn.Module` with its weights; `--dataset` takes a built-in name or a function returning "
           "`{\"train\", \"val\", \"test\"}` loaders (see [Your own model](own-model.md)).", "",
           "```text", parser.format_usage().strip(), "```", "",
           "| command | what it does |", "|---|---|"]
    out += [f"| [`{name}`](#torchslim-{name}) | {help_text} |" for name, (help_text, _) in commands.items()]
    out += [""]
    globals_ = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    if globals_:
        out += ["Options before the command:", "", "| argument | value | default | meaning |",
                "|---|---|---|---|"] + [_option_row(a) for a in globals_] + [""]
    if parser.epilog:
        out += [parser.epilog + ".", ""]
    for name, (help_text, sub) in commands.items():
        out += _command_section(name, help_text, sub)
    return "\n".join(out)


# ----------------------------------------------------------------------------- write
def expand_markers(text: str, base: str) -> str:
    return re.sub(r"<!-- slim:stage (\w+) -->",
                  lambda m: stage_section(m.group(1), heading=None, base=base).rstrip(), text)


def main() -> None:
    with mkdocs_gen_files.open("cli.md", "w") as handle:
        handle.write(cli_page())  # replaces the stub docs/cli.md of the repository
    mkdocs_gen_files.set_edit_path("cli.md", "gen_pages.py")
    with mkdocs_gen_files.open("recipes.md", "w") as handle:
        handle.write(recipes_page())  # replaces the stub docs/recipes.md
    mkdocs_gen_files.set_edit_path("recipes.md", "gen_pages.py")
    docs = Path(__file__).parent
    for page in sorted(docs.rglob("*.md")):
        name = page.relative_to(docs).as_posix()
        text = page.read_text(encoding="utf-8")
        if "<!-- slim:stage" in text:
            with mkdocs_gen_files.open(name, "w") as handle:
                handle.write(expand_markers(text, "../" * name.count("/")))


main()
