"""The one trainer every technique fine-tunes with.

Techniques plug in through `Callback`s and a `Loss`; the trainer owns the loop, the optimizer,
the LR schedule, regularisation, early stopping, progress display, and per-epoch checkpoints
from which a killed run resumes to the same result as an uninterrupted one.

Under `torchrun` (see `training.distributed`) the same loop runs data-parallel: every process
walks the same global batches and trains on its own shard of each through DDP, so the
optimisation is the single-process one; metrics are summed over processes, and only rank 0
writes checkpoints, which hold nothing that depends on the process count.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from torchslim.calibration import (
    call_model,
    correct_predictions,
    first_samples,
    logits_of,
    move_inputs,
    split_batch,
)
from torchslim.errors import ConfigError
from torchslim.measure import evaluate
from torchslim.progress import ProgressLines
from torchslim.training import distributed
from torchslim.training.augment import random_shift
from torchslim.training.callbacks import Callback, CrossEntropy, Loss
from torchslim.training.checkpoint import (
    capture_rng,
    read_checkpoint,
    restore_rng,
    write_checkpoint,
)
from torchslim.training.config import TrainConfig
from torchslim.training.optim import build_optimizer, build_scheduler


class Batches(Protocol):
    """What the trainer reads: a sized iterable of (inputs, labels) batches, such as a torch
    `DataLoader` or our in-memory `TensorLoader`."""

    def __iter__(self) -> Iterator[Any]: ...

    def __len__(self) -> int: ...


__all__ = ["CHECKPOINT_NAME", "Batches", "EpochRecord", "Trainer"]

CHECKPOINT_NAME = "last.ckpt"
log = logging.getLogger(__name__)
STEP_LINE_SECONDS = 60.0  # within an epoch, a progress line at most this often


@dataclass(frozen=True)
class EpochRecord:
    """Metrics of one epoch (losses are means, accuracies fractions)."""

    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float | None
    val_accuracy: float | None
    lr: float
    seconds: float
    samples_per_second: float


class Trainer:
    """Train `model` on `train_loader` as `config` says.

    Args:
        model: the module to train, in place.
        train_loader: batches of (inputs, labels): a torch `DataLoader` (its sampler's
            `set_epoch` is called every epoch) or a `TensorLoader` (re-shuffled per epoch).
        config: hyper-parameters (see `TrainConfig`).
        val_loader: validation batches, for the curves and early stopping.
        loss: the objective (default: cross-entropy on labels).
        callbacks: hooks run in order at each event.
        checkpoint_dir: where `last.ckpt` is written after every epoch.
        progress: show a progress bar (on rank 0 only under torchrun).

    Under torchrun each process trains on `batch_size / world_size` samples of every batch of
    `train_loader` (a ConfigError if that does not divide); `on_step` then gets the loss of the
    process's own shard, while `EpochRecord` metrics are those of the whole global batch.

    Example:
        >>> from torchslim.data import load_dataset, TensorLoader
        >>> from torchslim.models import create_model
        >>> from torchslim.training import make_train_config
        >>> data = load_dataset("digits")
        >>> model = create_model("lenet300", input_shape=(1, 8, 8), pretrained=False)
        >>> trainer = Trainer(model, TensorLoader(data.train, batch_size=64, shuffle=True),
        ...                   config=make_train_config(epochs=3, lr=0.1), progress=False)
        >>> history = trainer.fit()
        >>> history[-1].train_accuracy > 0.8
        True
    """

    def __init__(self, model: nn.Module, train_loader: Batches, *, config: TrainConfig,
                 val_loader: Batches | None = None, loss: Loss | None = None,
                 callbacks: Sequence[Callback] = (), checkpoint_dir: str | Path | None = None,
                 progress: bool = True) -> None:
        if len(train_loader) == 0:
            raise ConfigError("the training loader yields no batches; check the dataset and "
                              "batch_size (drop_last with fewer samples than a batch?)")
        if config.early_stopping_patience is not None and val_loader is None:
            raise ConfigError("early_stopping_patience needs a val_loader (the validation split)")
        self.device = distributed.device_for(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {config.device!r} asked for, but CUDA is not available; "
                              "use device='cpu'")
        self.world = distributed.world_size()
        _check_shardable(train_loader, self.world)
        self.model = model.to(self.device)
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.config = config
        self.loss = loss or CrossEntropy()
        self.callbacks = list(callbacks)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.progress = progress
        self._set_dropout(config.dropout)
        first, _ = split_batch(next(iter(train_loader)))
        example = move_inputs(first_samples(first, 2), self.device)
        self.extra = self.loss.bind(self.model, example)  # e.g. distillation adapters
        self.optimizer = build_optimizer([*model.parameters(), *self.extra], config)
        self.replica: nn.Module | None = None  # the DDP wrapper while fitting under torchrun
        self.scheduler = build_scheduler(self.optimizer, config, len(train_loader))
        self.history: list[EpochRecord] = []
        self.step = 0
        self.start_epoch = 0
        self.best_accuracy = -1.0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.stale_epochs = 0

    def _set_dropout(self, rate: float | None) -> None:
        if rate is None:
            return
        dropouts = [m for m in self.model.modules() if isinstance(m, nn.Dropout)
                    and not getattr(m, "keeps_rate", False)]  # e.g. an MLP's input dropout
        if not dropouts and rate > 0:
            raise ConfigError(f"dropout={rate} asked for, but {type(self.model).__name__} has "
                              "no nn.Dropout layer; add one to the model or drop the option")
        for module in dropouts:
            module.p = rate

    @property
    def checkpoint_path(self) -> Path | None:
        return self.checkpoint_dir / CHECKPOINT_NAME if self.checkpoint_dir else None

    def fit(self, *, resume: bool = False) -> list[EpochRecord]:
        """Run the remaining epochs; with `resume`, continue from the last checkpoint if any."""
        torch.manual_seed(self.config.seed)
        for callback in self.callbacks:
            callback.on_fit_start(self)  # may add masks: wrap after, so DDP sees them
        # Restored after the callbacks have shaped the model (masks, fake quantizers), so the
        # checkpoint's parametrized state finds the same structure it was written from.
        if resume and self.checkpoint_path and self.checkpoint_path.is_file():
            self._load_checkpoint(self.checkpoint_path)
            log.info("resumed from %s at epoch %d", self.checkpoint_path, self.start_epoch)
        if self.world > 1:
            self.replica = distributed.data_parallel(self.model, self.extra, self.device)
        try:
            self._run_epochs()
        finally:
            self.replica = None  # DDP holds the process group: drop it before anyone ends that
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        for callback in self.callbacks:
            callback.on_fit_end(self)
        return self.history

    def _run_epochs(self) -> None:
        lines = ProgressLines("training", self.config.epochs - self.start_epoch,
                              enabled=self.progress and distributed.is_main_process())
        for done, epoch in enumerate(range(self.start_epoch, self.config.epochs), start=1):
            record = self._run_epoch(epoch)
            self.history.append(record)
            val = "" if record.val_accuracy is None else f", val accuracy {record.val_accuracy:.4f}"
            lines.update(done, f"epoch {epoch + 1}/{self.config.epochs}, train loss {record.train_loss:.4f}"
                         f"{val}, {record.seconds:.1f} s")
            stop = self._update_early_stopping(record)
            for callback in self.callbacks:
                callback.on_epoch_end(self, record)
            self.start_epoch = epoch + 1
            if self.checkpoint_path:
                self._save_checkpoint(self.checkpoint_path)
            if stop:
                log.info("early stop after epoch %d (no val gain in %d epochs)", epoch,
                         self.stale_epochs)
                break

    def _regularised(self, loss: torch.Tensor) -> torch.Tensor:
        if self.config.l1 == 0:
            return loss
        penalty = sum(p.abs().sum() for p in self.model.parameters() if p.dim() > 1 and p.requires_grad)
        return loss + self.config.l1 * penalty

    def _train_step(self, inputs: torch.Tensor, labels: torch.Tensor,
                    share: float = 1.0) -> tuple[float, float]:
        """One optimizer step; `share` = world size x this shard's fraction of the batch, so
        that DDP's gradient average is the gradient of the mean over the global batch."""
        outputs = call_model(self.replica or self.model, inputs)
        loss = self.loss(outputs, labels, inputs)
        self.optimizer.zero_grad(set_to_none=True)
        self._regularised(loss if share == 1.0 else loss * share).backward()
        if self.replica is not None:
            self._check_gradients()
        for callback in self.callbacks:
            callback.on_before_optimizer_step(self, self.step)
        if self.config.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        for callback in self.callbacks:
            callback.on_after_optimizer_step(self, self.step)
        return float(loss.detach()), correct_predictions(logits_of(outputs).detach(), labels)

    def _check_gradients(self) -> None:
        """DDP waits for a gradient of every trainable parameter before it averages: one the
        loss never reaches would stall it, so name those instead."""
        assert self.replica is not None
        unused = [name.removeprefix("module.model.") for name, p in self.replica.named_parameters()
                  if p.requires_grad and p.grad is None]
        if unused:
            raise ConfigError(f"data-parallel training needs a gradient for every trainable "
                              f"parameter, but the loss does not depend on {', '.join(unused)}; "
                              "freeze them (requires_grad_(False)) or train in one process")

    def _run_epoch(self, epoch: int) -> EpochRecord:
        _set_epoch(self.train_loader, epoch)
        for callback in self.callbacks:
            callback.on_epoch_start(self, epoch)
        self.model.train()
        loss_sum, correct, seen = 0.0, 0.0, 0
        start = time.perf_counter()
        show = self.progress and distributed.is_main_process()
        # Shifts drawn from (seed, epoch) alone: a resumed run sees the same ones.
        shifts = torch.Generator().manual_seed(self.config.seed * 100_003 + epoch + 1)
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{self.config.epochs}",
                   disable=None if show else True,  # None: only on a terminal
                   leave=False, unit="batch", mininterval=0.5)
        # an epoch of minutes (a language model's) also reports its steps, once a minute
        steps = ProgressLines(f"epoch {epoch + 1}/{self.config.epochs} step",
                              len(self.train_loader) if hasattr(self.train_loader, "__len__") else None,
                              enabled=show)
        reported = time.monotonic()
        for index, batch in enumerate(bar):
            inputs, labels = split_batch(batch)
            if labels is None:
                raise ConfigError("a training batch holds no labels; give (inputs, labels) batches or a "
                                  "dict with 'labels'")
            size = len(labels)
            if self.config.shift:  # before sharding: every process draws the same shifts
                inputs = random_shift(inputs, self.config.shift, generator=shifts)
            if self.world > 1:
                inputs, labels = distributed.shard(inputs), distributed.shard(labels)
            share = self.world * len(labels) / size
            inputs, labels = move_inputs(inputs, self.device), labels.to(self.device)
            loss, hits = self._train_step(inputs, labels, share)
            batch = int(labels.shape[0])
            loss_sum, correct, seen = loss_sum + loss * batch, correct + hits, seen + batch
            for callback in self.callbacks:
                callback.on_step(self, self.step, loss)
            self.step += 1
            if self.step % 50 == 0:
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}",
                                refresh=False)
            if time.monotonic() - reported >= STEP_LINE_SECONDS:
                steps.update(index + 1, f"train loss {loss_sum / seen:.4f}")
                reported = time.monotonic()
        seconds = time.perf_counter() - start
        if self.world > 1:  # the whole global batch's metrics, identical on every process
            totals = distributed.all_reduce_sum(
                torch.tensor([loss_sum, correct, seen], dtype=torch.float64))
            loss_sum, correct, seen = float(totals[0]), float(totals[1]), int(totals[2])
        val = self._validate()
        return EpochRecord(
            epoch=epoch, train_loss=loss_sum / seen, train_accuracy=correct / seen,
            val_loss=val["loss"] if val else None, val_accuracy=val["accuracy"] if val else None,
            lr=float(self.optimizer.param_groups[0]["lr"]), seconds=seconds,
            samples_per_second=seen / seconds)

    def _validate(self) -> dict[str, float] | None:
        """Validation loss and accuracy; under torchrun each process evaluates its shard of
        every batch and the sums are all-reduced, so all processes see the same numbers (and
        take the same early-stopping decisions)."""
        if self.val_loader is None:
            return None
        if self.world == 1:
            return evaluate(self.model, self.val_loader, device=self.device)
        shards = [(distributed.shard(x), distributed.shard(y)) for x, y in self.val_loader]
        shards = [(x, y) for x, y in shards if len(y)]
        totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, samples
        if shards:
            val = evaluate(self.model, shards, device=self.device)
            totals += torch.tensor([val["loss"] * val["samples"],
                                    round(val["accuracy"] * val["samples"]), val["samples"]],
                                   dtype=torch.float64)
        loss_sum, correct, samples = distributed.all_reduce_sum(totals).tolist()
        return {"loss": loss_sum / samples, "accuracy": correct / samples, "samples": samples}

    def _update_early_stopping(self, record: EpochRecord) -> bool:
        if self.config.early_stopping_patience is None or record.val_accuracy is None:
            return False
        if record.val_accuracy > self.best_accuracy:
            self.best_accuracy = record.val_accuracy
            self.best_state = copy.deepcopy(self.model.state_dict())
            self.stale_epochs = 0
            return False
        self.stale_epochs += 1
        return self.stale_epochs >= self.config.early_stopping_patience

    def _save_checkpoint(self, path: Path) -> None:
        """Rank 0 writes (atomically) while the others wait: every process holds the same
        state, and none of it depends on the process count, so any count can resume it."""
        if distributed.is_main_process():
            self._write_checkpoint(path)
        distributed.barrier()

    def _write_checkpoint(self, path: Path) -> None:
        write_checkpoint(path, {
            "config": self.config.to_dict(),
            "epoch": self.start_epoch,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": capture_rng(),
            "history": [asdict(r) for r in self.history],
            "early_stopping": {"best_accuracy": self.best_accuracy, "best_state": self.best_state,
                               "stale_epochs": self.stale_epochs},
            "callbacks": [c.state_dict() for c in self.callbacks],
            "loss": self.loss.state_dict(),
        })

    def _load_checkpoint(self, path: Path) -> None:
        state = read_checkpoint(path)
        if state["config"] != self.config.to_dict():
            changed = sorted(k for k, v in self.config.to_dict().items()
                             if state["config"].get(k) != v)
            raise ConfigError(f"checkpoint {path} was written with a different training config "
                              f"(changed: {', '.join(changed)}); rerun with the same options or "
                              "without --resume")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        restore_rng(state["rng"])
        self.start_epoch, self.step = int(state["epoch"]), int(state["step"])
        self.history = [EpochRecord(**r) for r in state["history"]]
        stopping = state["early_stopping"]
        self.best_accuracy = float(stopping["best_accuracy"])
        self.best_state, self.stale_epochs = stopping["best_state"], int(stopping["stale_epochs"])
        self.loss.load_state_dict(state.get("loss", {}))
        for callback, callback_state in zip(self.callbacks, state["callbacks"], strict=False):
            callback.load_state_dict(callback_state)

    def state_summary(self) -> dict[str, Any]:
        """Where training stands: epochs done, steps, best validation accuracy."""
        return {"epochs_done": self.start_epoch, "steps": self.step,
                "best_val_accuracy": self.best_accuracy if self.best_state is not None else None}


def _set_epoch(loader: Batches, epoch: int) -> None:
    """Re-shuffle per epoch: our `TensorLoader`, or a DataLoader's (distributed) sampler."""
    for owner in (loader, getattr(loader, "sampler", None)):
        set_epoch = getattr(owner, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
            return


def _check_shardable(loader: Batches, world: int) -> None:
    """Every process must get samples of every batch, the full ones in equal parts."""
    if world == 1:
        return
    batch = getattr(loader, "batch_size", None)
    source = getattr(loader, "split", None)  # our in-memory loader; a DataLoader has a dataset
    size = len(source if source is not None else getattr(loader, "dataset", ()))
    if not isinstance(batch, int):
        raise ConfigError(f"data-parallel training shards every batch over {world} processes and "
                          f"needs the loader's batch_size; {type(loader).__name__} has none: use a "
                          "torch DataLoader with batch_size")
    last = 0 if getattr(loader, "drop_last", False) else size % batch
    if batch % world or 0 < last < world:
        problem = (f"batch_size {batch} does not split evenly over {world} processes"
                   if batch % world else
                   f"the last batch holds {last} samples, fewer than the {world} processes")
        raise ConfigError(f"{problem}; each process trains on batch_size / {world} samples of "
                          f"every batch: use a batch_size that is a multiple of {world} (and "
                          "leaves no tiny last batch), or drop_last")
