"""Run a recipe: baseline, then each stage, each checkpointed so a killed run resumes.

Between stages the model is always plain (masks and codebooks baked into the weights) and a
small constraint table says which layers are sparse or shared. A stage that trains re-attaches
those constraints first (zeros stay zero, shared weights stay shared), so every stage
checkpoint is an ordinary `.slim` file and resuming never depends on in-memory state.

Under `torchrun` every process runs every stage (training ones data-parallel, the others
deterministically alike); rank 0 alone writes files and measures, and all return its report.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim import artifact
from torchslim.api import finalize_
from torchslim.apps.recipe import EncodeStage, Recipe, Stage
from torchslim.apps.run_data import (
    ONE_SHOT_STAGES,
    TEXT_TRAINING_STAGES,
    BuiltinData,
    RunData,
    TextData,
    learn_inputs_,
    resolve_run_data,
)
from torchslim.apps.run_folder import RunFolder
from torchslim.apps.stages import apply_stage
from torchslim.clustering import keep_shared_
from torchslim.data import TensorLoader
from torchslim.distillation import Distill, DistillationLoss, TrainedTeacher
from torchslim.errors import ConfigError, SlimError
from torchslim.models import create_model, get_entry, spec_of
from torchslim.progress import ProgressLines, format_seconds
from torchslim.pruning.unstructured import set_mask_
from torchslim.registry import stage_type
from torchslim.training import Loss, TrainConfig, Trainer, distributed

__all__ = ["CompressionRun", "check_stages", "constrain_"]

log = logging.getLogger(__name__)
Constraints = dict[str, str]  # layer name -> "sparse" | "shared"


def constrain_(model: nn.Module, constraints: Constraints) -> None:
    """Re-attach masks (sparse layers) and codebooks (shared layers) to a plain model."""
    modules = dict(model.named_modules())
    for name, kind in constraints.items():
        module = modules[name]
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        if kind == "shared":
            keep_shared_(module)
        else:
            set_mask_(module, weight.detach() != 0)


def _label(model: Any) -> str:
    spec = getattr(model, "torchslim_spec", None)
    return str(spec.name) if spec is not None else type(model).__name__


def check_stages(stages: tuple[Stage, ...], model: nn.Module) -> None:
    """Resolve every stage's selection and per-layer names on `model`, up to the first
    structural stage (later ones may select the layers it creates).

    Raises:
        SelectionError, ConfigError: naming the stage, and the selection that matches nothing.
    """
    for index, stage in enumerate(stages, start=1):
        try:
            if getattr(stage.config, "targets_layers", True):  # not channel groups (checked when traced)
                names = {name for name, _ in stage.targets.resolve(model)}
                per_layer = getattr(stage.config, "per_layer", None) or {}
                unknown = sorted(set(per_layer) - names)
                if unknown:
                    raise ConfigError(f"per_layer names {unknown} are not among the selected "
                                      f"layers {sorted(names)}")
        except SlimError as exc:
            raise type(exc)(f"stage {index} ({stage.kind}): {exc}") from None
        if stage_type(stage.kind).structural:
            break


class CompressionRun:
    """One recipe applied to one model, writing into `out`.

    Args:
        recipe: the validated recipe.
        out: output folder (stage checkpoints in `out/stages/`).
        model_source: an artifact path or registered name overriding the recipe's model.
        resume: reuse stage checkpoints (and in-stage training checkpoints) found in `out`.
        progress: show progress bars.
        timing: measure latency after every stage (off for search trials scored on size).
    """

    def __init__(self, recipe: Recipe, out: str | Path, *, model_source: str | None = None,
                 resume: bool = False, overwrite: bool = False, progress: bool = True,
                 timing: bool = True, factory: str | None = None) -> None:
        from torchslim.factories import is_factory

        self.recipe, self.out, self.progress, self.timing = recipe, Path(out), progress, timing
        from torchslim.models.language import language_model_names

        self.model_source = model_source or (recipe.model if recipe.model and (
            is_factory(recipe.model) or recipe.model in language_model_names()) else None)
        self.factory = factory
        self.stages_dir = self.out / "stages"
        name, dataset = recipe.model, recipe.dataset
        source = self.model_source
        if source and Path(source).is_file():  # an artifact: its model, and the dataset it was trained on
            saved = artifact.read_metadata(source)
            name = saved["model"]["name"] if "model" in saved else None
            dataset = dataset or saved.get("metadata", {}).get("dataset")
        elif source:
            name = None if is_factory(source) or Path(source).is_dir() else source
        if name in language_model_names():  # a language model: its text by default
            name, dataset = None, dataset or "python-docs"
        data, _ = resolve_run_data(dataset, name, seed=recipe.seed, required=True)
        assert data is not None
        if isinstance(data, TextData):
            data = dataclasses.replace(data, **recipe.text)  # sequence_length, eval_tokens, train_tokens
        self.data: RunData = data
        self.original: nn.Module | None = None  # the model before stage 1: `teacher: original`
        self._loaded: nn.Module | None = None  # `--model`, loaded once
        self.model_given = model_source is not None  # by the caller, not by the recipe's `model:`
        self.folder = RunFolder(self.out)
        self.resume, self.overwrite = resume, overwrite
        self.teachers: dict[str, dict[str, Any]] = {}  # trained-teacher path -> how it was got

    def _fresh(self) -> nn.Module | None:
        """A new uncompressed instance of a user's model (to load its stage files into), or
        None for a registered model (artifacts rebuild those by themselves)."""
        from torchslim.factories import build_from_factory, is_factory

        if self.model_source and is_factory(self.model_source) and not Path(self.model_source).exists():
            return build_from_factory(self.model_source)
        return build_from_factory(self.factory) if self.factory else None

    def _load(self, path: Path) -> nn.Module:
        return artifact.load(path, model=self._fresh())

    def _claim(self) -> None:
        """Rank 0 locks `out` for this run (see `RunFolder`); the others wait for it."""
        distributed.barrier()  # every process has read `out` before rank 0 changes it
        if distributed.is_main_process():
            self.folder.claim(self.recipe.digest, resume=self.resume, overwrite=self.overwrite)
        distributed.barrier()

    @staticmethod
    def _restorable(path: Path) -> bool:
        """Whether a stage file is there to restore, seen alike by every process: all look
        before rank 0 may write it."""
        found = path.is_file()
        distributed.barrier()
        return found

    @staticmethod
    def _save(model: nn.Module, path: Path, metadata: dict[str, Any]) -> None:
        """A stage checkpoint, written by rank 0 only."""
        if distributed.is_main_process():
            artifact.save(model, path, metadata=metadata)

    # ----------------------------------------------------------------- model and training
    def baseline(self) -> nn.Module:
        """The model to compress: given artifact/name, or the recipe's model (trained if asked)."""
        if self.model_source:
            model = copy.deepcopy(self._source_model())  # the dry run's copy stays unchanged
            if isinstance(self.data, TextData):
                self.data.bind_(model)
            learn_inputs_(model, self.data, seed=self.recipe.seed)
            if self.recipe.baseline is None:
                return model
            if self.model_given:
                log.warning("--model %s is compressed as given: the recipe's `baseline:` block is not "
                            "used", self.model_source)
                return model
            return self._trained_baseline(lambda: model, self.recipe.baseline)
        if self.recipe.model is None:
            raise ConfigError("the recipe names no model; add `model:` or pass --model")
        if self.recipe.baseline is None:
            if get_entry(self.recipe.model).load_pretrained is None:
                raise ConfigError(f"model {self.recipe.model!r} ships no trained weights; add a "
                                  "`baseline:` block to the recipe or pass --model ARTIFACT")
            return create_model(self.recipe.model)
        torch.manual_seed(self.recipe.seed)
        return self._trained_baseline(self._untrained, self.recipe.baseline)

    def _trained_baseline(self, build: Any, config: TrainConfig) -> nn.Module:
        """The recipe's `baseline:` training of the model `build()` returns (the registered
        model, or the recipe's own `model: FILE.py:FUNCTION`), restored when already done."""
        path = self.stages_dir / "00-baseline.slim"
        if self._restorable(path):
            return self._load(path)
        model = build()
        self.train(model, config, self.stages_dir / "00-baseline-ckpt")
        self._save(model, path, metadata={"stage": "baseline", "constraints": {}})
        return model

    def _source_model(self) -> nn.Module:
        """The model given by `--model` (a language model name, an artifact, a factory), loaded
        once for the dry run and the run."""
        if self._loaded is None:
            from torchslim.apps.workflows import load_model_or_artifact
            from torchslim.models.language import language_model_names, load_language_model

            assert self.model_source is not None
            self._loaded = load_language_model(self.model_source) \
                if self.model_source in language_model_names() else \
                load_model_or_artifact(self.model_source, factory=self.factory)[0]
        return self._loaded

    def _untrained(self) -> nn.Module:
        """The recipe's registered model, randomly initialised for the run's data."""
        if not isinstance(self.data, BuiltinData):
            raise ConfigError("a `baseline:` block trains a registered model on a built-in dataset; "
                              "with your own data, pass your trained model (--model FILE.py:FUNCTION)")
        assert self.recipe.model is not None
        return create_model(self.recipe.model, pretrained=False, input_shape=self.data.data.input_shape,
                            num_classes=self.data.data.num_classes)

    def train(self, model: nn.Module, config: TrainConfig, checkpoint_dir: Path,
              callbacks: tuple[Any, ...] = (), loss: Loss | None = None) -> None:
        trainer = Trainer(model, self.data.train_loader(config.batch_size, config.seed),
                          val_loader=self.data.val_loader(), config=config,
                          loss=loss, callbacks=callbacks, checkpoint_dir=checkpoint_dir,
                          progress=self.progress)
        trainer.fit(resume=True)
        model.cpu()

    def calibration(self, batches: int = 8) -> list[tuple[Any, Any]]:
        """Training-split batches for data-driven criteria (never validation or test)."""
        return self.data.calibration(batches, self.recipe.seed)

    def fine_tune(self, model: nn.Module, config: TrainConfig, constraints: Constraints,
                  checkpoint_dir: Path, callbacks: tuple[Any, ...] = (),
                  distill: Distill | None = None) -> None:
        """Train with the constraints attached (zeros stay zero, shared stays shared), then bake."""
        constrain_(model, constraints)
        self.train(model, config, checkpoint_dir, callbacks, self.distill_loss(distill))
        finalize_(model)

    def distill_loss(self, distill: Distill | None) -> Loss | None:
        """The distillation loss a `distill:` block asks for (None without one)."""
        if distill is None:
            return None
        return DistillationLoss(self.teacher(distill.teacher), **distill.loss_options())

    def teacher(self, source: str | TrainedTeacher) -> nn.Module:
        """`original` (the model before stage 1), an artifact / registered model, or a teacher
        block (loaded from its file, trained into it first when the file is missing)."""
        if isinstance(source, TrainedTeacher):
            return self._trained_teacher(source)
        if source == "original":
            assert self.original is not None, "run() sets the original model first"
            return copy.deepcopy(self.original)
        from torchslim.apps.workflows import load_model_or_artifact

        return load_model_or_artifact(source)[0]

    def _trained_teacher(self, block: TrainedTeacher) -> nn.Module:
        """The teacher in `block.path`; trained on the run's data (the `train:` options) and
        written there first if the file is missing, so later runs reuse it."""
        path = Path(block.path)
        if self._restorable(path):
            teacher = artifact.load(path)
            found = getattr(teacher, "torchslim_spec", None)
            if found is None or found.name != block.model:
                raise ConfigError(f"teacher file {path} holds {_label(teacher)!r}, not {block.model!r}: "
                                  "fix the teacher's `model:`, or move the file away to train a new one")
            self._note_teacher(block, teacher, trained=False, seconds=0.0)
            return teacher
        if block.train is None:
            raise ConfigError(f"teacher file {path} does not exist and the teacher block has no "
                              "`train:` options to train it: add `train: {epochs: ...}` (it is then "
                              "trained and written there), or give the path of a trained artifact")
        if not isinstance(self.data, BuiltinData):
            raise ConfigError("a teacher block with `train:` trains a registered model on a built-in "
                              "dataset; with your own data, train the teacher first and give its file")
        config = TrainConfig(**{"seed": self.recipe.seed, **block.train})
        log.info("training the teacher %s (%d epochs) into %s", block.model, config.epochs, path)
        started = time.perf_counter()
        torch.manual_seed(config.seed)
        teacher = create_model(block.model, pretrained=False, input_shape=self.data.data.input_shape,
                               num_classes=self.data.data.num_classes)
        self.train(teacher, config, self.stages_dir / "teacher-ckpt")
        teacher.eval()
        seconds = time.perf_counter() - started
        if distributed.is_main_process():
            path.parent.mkdir(parents=True, exist_ok=True)
            artifact.save(teacher, path, metadata={"dataset": self.data.name, "stage": "teacher",
                                                   "train": config.to_dict()})
        self._note_teacher(block, teacher, trained=True, seconds=seconds)
        return teacher

    def _note_teacher(self, block: TrainedTeacher, teacher: nn.Module, *, trained: bool,
                      seconds: float) -> None:
        """The stage summary's record of the teacher: trained or reused, and its accuracy."""
        from torchslim.measure import evaluate

        note: dict[str, Any] = {"model": block.model, "path": block.path, "trained": trained}
        if trained:
            note["train_seconds"] = round(seconds, 1)
        if isinstance(self.data, BuiltinData):
            note["val_accuracy"] = evaluate(teacher, self.data.val_loader())["accuracy"]
            note["test_accuracy"] = evaluate(
                teacher, TensorLoader(self.data.data.test, batch_size=1000))["accuracy"]
        self.teachers[block.path] = note

    def initial_state(self) -> dict[str, torch.Tensor]:
        """The registered model's initialisation under the recipe's seed (lottery rewinding)."""
        model = self.original
        if model is None or getattr(model, "torchslim_spec", None) is None:
            raise ConfigError("rewind resets weights to the registered model's initialisation; "
                              "your own model has none recorded: drop `rewind`")
        torch.manual_seed(self.recipe.seed)  # the baseline's own initialisation
        spec = spec_of(model)
        return create_model(spec.name, pretrained=False, input_shape=spec.input_shape,
                            num_classes=spec.num_classes).state_dict()

    def run_stage(self, index: int, stage: Stage, model: nn.Module,
                  constraints: Constraints) -> Any:
        """Run one stage by its registered runner (a technique without one is applied): the
        summary, or for a converting stage (the int8 model, the summary)."""
        runner = stage_type(stage.kind).runner or apply_stage
        return runner(self, stage, model, constraints, self.stages_dir / f"{index:02d}-{stage.kind}-ckpt")

    # ------------------------------------------------------------------ measure, run
    def measure(self, label: str, model: nn.Module, *, encoding: artifact.Encoding) -> dict[str, Any]:
        """Validation/test accuracy, counts, FLOPs, dense and encoded bytes of one model (latency
        is timed at the end, interleaved: `_time_rows`)."""
        import tempfile

        from torchslim.apps.language import measure_language_model
        from torchslim.apps.workflows import measure_model
        from torchslim.measure import evaluate

        data, split = self.data.measured()
        if isinstance(self.data, TextData):
            row = measure_language_model(model, self.data)
        else:
            row = measure_model(model, data=data, split=split, timing=False)
            row["test_accuracy"] = row["accuracy"]
            row["val_accuracy"] = evaluate(model, self.data.val_loader())["accuracy"]
        row["dense_bytes"] = row["bytes"]
        with tempfile.TemporaryDirectory() as folder:
            path = artifact.save(model, Path(folder) / "m.slim", encoding=encoding)
            row["bytes"] = path.stat().st_size
        row["bits_per_weight"] = 8 * row["bytes"] / max(row["params"], 1)
        return {"name": label, **row}

    def _time_rows(self, rows: list[dict[str, Any]], final: nn.Module) -> None:
        """Time the baseline, the final model and the recipe's `time_stages` in one place,
        interleaved, so that their latencies compare models and not moments of a long run."""
        from torchslim.apps.language import time_decoding_
        from torchslim.apps.workflows import time_rows_

        last = len(self.recipe.stages)
        wanted = [n for n in self.recipe.time_stages if n != last]
        assert self.original is not None  # set by `_run` before any stage
        models = [self.original, *(self._stage_model(n) for n in wanted), final]
        timed = [rows[0], *(rows[n] for n in wanted), rows[-1]]
        if isinstance(self.data, TextData):
            time_decoding_(timed, models)
        else:
            time_rows_(timed, models)

    def _stage_model(self, index: int) -> nn.Module:
        """The model as stage `index` (1-based) left it, from its checkpoint."""
        stage = self.recipe.stages[index - 1]
        path = self.stages_dir / f"{index:02d}-{stage.kind}.slim"
        return artifact.load(path) if stage_type(stage.kind).converts else self._load(path)

    def run(self) -> dict[str, Any]:
        """Run every stage (resuming finished ones), write model.slim and the report; the
        output folder stays locked until the run ends (or fails). A recipe that does not fit
        the model fails in `dry_run`, before the folder is touched."""
        self.dry_run()
        self._claim()
        try:
            return self._run()
        finally:
            self.folder.release()

    def dry_run(self) -> None:
        """Check every stage against the model before any work: the untrained architecture (or
        the given model) is built and every selection and per-layer name resolved on it, up to
        the first stage that changes structure (later ones may name the layers it creates).

        Raises:
            SelectionError, ConfigError: a selection or per-layer name matching no layer.
        """
        if self.model_source:
            model = self._source_model()
        elif self.recipe.model is None:
            raise ConfigError("the recipe names no model; add `model:` or pass --model")
        else:
            model = self._untrained()
        if isinstance(self.data, TextData):
            self.data.bind_(model)  # tokenizes now: a model without a tokenizer fails here
            refused = [s.kind for s in self.recipe.stages
                       if s.kind in TRAINING_STAGES and s.kind not in TEXT_TRAINING_STAGES]
            refused += ["baseline"] if self.recipe.baseline is not None else []
            if refused:
                raise ConfigError(f"stage(s) {', '.join(refused)} do not train a language model; with "
                                  f"text {self.data.name!r} use the one-shot stages ({ONE_SHOT_STAGES}) "
                                  f"and {' / '.join(TEXT_TRAINING_STAGES)} (distillation from the "
                                  "original model)")
            if any(s.kind in TEXT_TRAINING_STAGES for s in self.recipe.stages):
                self.data.steps_per_epoch(1)  # enough text for one training window, checked now
        check_stages(self.recipe.stages, model)

    def _run(self) -> dict[str, Any]:
        from torchslim.measure import compare
        from torchslim.report import write_report

        started = time.perf_counter()
        last = self.recipe.stages[-1].config
        encoding = artifact.Encoding(coder=last.coder, index_bits=last.index_bits) \
            if isinstance(last, EncodeStage) else artifact.Encoding()
        model = self.baseline()
        self.original = copy.deepcopy(model).eval()
        main = distributed.is_main_process()  # the others run the stages, then wait
        rows = [self.measure("baseline", model, encoding=encoding)] if main else []
        constraints: Constraints = {}
        summaries = []
        lines = ProgressLines("stage", len(self.recipe.stages), enabled=self.progress and main)
        for index, stage in enumerate(self.recipe.stages, start=1):
            path = self.stages_dir / f"{index:02d}-{stage.kind}.slim"
            tick = time.perf_counter()
            if self._restorable(path):
                converts = stage_type(stage.kind).converts
                model = artifact.load(path) if converts else self._load(path)
                saved = artifact.read_metadata(path)["metadata"]
                constraints, summary = dict(saved["constraints"]), saved["summary"]
                log.info("stage %d (%s) restored from %s", index, stage.kind, path)
                done = f"{stage.kind} restored from {path.name}"
            else:
                if stage_type(stage.kind).converts:
                    model, summary = self.run_stage(index, stage, model, constraints)
                else:
                    summary = self.run_stage(index, stage, model, constraints)
                self._save(model, path, metadata={"stage": stage.kind, "summary": summary,
                                                  "constraints": constraints})
                done = f"{stage.kind} done in {format_seconds(time.perf_counter() - tick)}"
            summaries.append({"stage": stage.kind, "seconds": time.perf_counter() - tick,
                              **summary})
            lines.update(index, done)
            if main:
                rows.append(self.measure(f"{index}. {stage.kind}", model, encoding=encoding))
            distributed.barrier()  # timings run while the other processes idle
        if not main:
            return dict(distributed.broadcast_object(None))
        final = artifact.save(model, self.out / "model.slim",
                              encoding=encoding if isinstance(last, EncodeStage) else None,
                              metadata={"recipe_digest": self.recipe.digest,
                                        "dataset": self.data.name})
        rows[-1]["bytes"] = final.stat().st_size
        rows[-1]["bits_per_weight"] = 8 * rows[-1]["bytes"] / max(rows[-1]["params"], 1)
        if self.timing:
            self._time_rows(rows, model)
        report = {
            "recipe": self.recipe.source, "recipe_digest": self.recipe.digest,
            "model": _label(self.original), "dataset": self.data.name, "seed": self.recipe.seed,
            "test_accuracy": rows[-1].get("test_accuracy"), "val_accuracy": rows[-1].get("val_accuracy"),
            "perplexity": rows[-1].get("perplexity"),
            "baseline": rows[0], "final": rows[-1], "stages": summaries,
            "comparison": compare({**rows[0], "bytes": rows[0]["dense_bytes"]}, rows[-1]),
            "seconds": time.perf_counter() - started, "artifact": str(final),
        }
        write_report(self.out, report, title=recipe_title(self.recipe, str(report["model"]), self.data.name),
                     rows=rows, settings=recipe_settings(self.recipe))
        name = f"{report['model']} on {self.data.name}"
        if isinstance(self.data, TextData):  # no accuracy to plot: the table has the perplexity
            return dict(distributed.broadcast_object({**report, "rows": rows}))
        plot_frontier(rows, self.out / "accuracy_vs_size.png", x="bytes",
                      title=f"{name}: test accuracy vs file size, per stage")
        if self.timing:
            plot_frontier(rows, self.out / "accuracy_vs_latency.png", x="latency_batch_ms",
                          title=f"{name}: test accuracy vs latency (stages timed at the end)")
        return dict(distributed.broadcast_object({**report, "rows": rows}))


# Stages that train on labelled batches: a text dataset has none to give them.
TRAINING_STAGES = frozenset({"fine_tune", "distill", "qat", "lowbit", "gradual_prune", "iterative_prune"})


def recipe_title(recipe: Recipe, model: str, dataset: str) -> str:
    """What was compressed and how: `lenet300 on mnist: Deep Compression (prune → fine_tune → ...)`."""
    how = " → ".join(stage.kind for stage in recipe.stages)
    name = recipe.source.get("name")
    return f"{model} on {dataset}: " + (f"{name} ({how})" if name else how)


def recipe_settings(recipe: Recipe) -> list[str]:
    """The recipe as the user wrote it, one Markdown line per stage (defaults left implicit)."""
    lines = []
    if recipe.source.get("baseline"):
        lines += [f"- baseline training: `{json.dumps(recipe.source['baseline'], sort_keys=True)}`", ""]
    for index, item in enumerate(recipe.source["stages"], start=1):
        (kind, options), = item.items()
        lines.append(f"{index}. `{kind}`: " + (f"`{json.dumps(options, sort_keys=True)}`" if options
                                                else "defaults"))
    return lines


def plot_frontier(rows: list[dict[str, Any]], path: Path, *, x: str = "bytes",
                  title: str = "") -> Path:
    """Test accuracy vs `x` (bytes on disk, or the batched latency), one marker per stage.

    Markers, not a line: the stages are a sequence, not a trade-off curve. Each stage has its
    own marker and colour and is named in a legend beside the axes, so labels never overlap;
    the baseline's accuracy is a dashed line with its sampling-noise band.
    """
    import matplotlib

    from torchslim.report import MARKERS, accuracy_axis_, legend_outside_, log_axis_, new_figure, save_figure

    drawn = [(i, row) for i, row in enumerate(rows)
             if row.get(x) is not None and row.get("test_accuracy") is not None]
    points = [row for _, row in drawn]
    values = [row[x] for row in points]
    logarithmic = max(values) > 10 * min(values)  # a log axis over a narrow range reads badly
    scaled = ", log scale" if logarithmic else ""
    if x == "bytes":
        scale, label = 1 / 1024, f"file size (KiB{scaled})"
    else:
        batch, threads = rows[0].get("latency_batch"), rows[0].get("threads")
        scale, label = 1.0, f"latency at batch {batch}, {threads} threads (ms{scaled})"
    fig, axis = new_figure(size=(9, 4.8))
    colours = matplotlib.colormaps["tab20"]
    for index, row in drawn:  # a stage keeps its marker in every plot
        axis.scatter(row[x] * scale, 100 * row["test_accuracy"], marker=MARKERS[index % len(MARKERS)],
                     color=colours(index % 20), s=60, zorder=3, label=row["name"],
                     edgecolors="black", linewidths=0.5)
    baseline = rows[0]
    accuracy_axis_(axis, [100 * row["test_accuracy"] for row in points],
                   baseline=100 * baseline["test_accuracy"], samples=baseline.get("samples"),
                   label="test accuracy (%)")
    if logarithmic:
        log_axis_(axis)
    else:
        axis.set_xlim(0, max(values) * scale * 1.1)
    axis.set_xlabel(label)
    axis.set_title(title or f"test accuracy vs {label.split(' (')[0]}", fontsize=10)
    legend_outside_(axis)
    return save_figure(fig, path)
