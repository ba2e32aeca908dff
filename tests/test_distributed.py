"""Data-parallel training under torchrun: 2 gloo processes against 1.

One `torchrun --nproc_per_node=2` launch of this file (see `worker`) trains every scenario,
interrupts a run after 2 of 3 epochs, and resumes a run that one process interrupted; the
tests then compare with single-process runs made here. The models have no BatchNorm and no
active dropout, so the two optimisations are the same up to float summation order.

QAT rounds to the int8 grid, which turns that float noise into an occasional one-step flip;
after a few dozen steps a QAT run drifts from the single-process one by ~1e-4 (SGD) to ~1e-3
(Adam, which amplifies near-zero gradients), as two single-process runs with perturbed
inputs would. The QAT scenarios are kept short enough (or on SGD) to stay within `ATOL`.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, TensorDataset

from torchslim.data import Dataset, Split, TensorLoader, load_dataset
from torchslim.distillation import DistillationLoss
from torchslim.errors import ConfigError
from torchslim.models import create_model
from torchslim.pruning import GradualPruning, WeightPruning
from torchslim.quantization.qat import prepare_qat_
from torchslim.select import Select
from torchslim.training import Callback, Trainer, make_train_config
from torchslim.training import distributed as dist_utils

SCENARIOS = ("plain", "pruned_distilled", "qat", "qat_lsq", "dataloader")
ATOL = 1e-5  # 1 vs 2 processes: same steps, float sums in another order
EPOCHS = 3


class Interrupted(Exception):
    """Raised by `StopAt` to stand for a killed run."""


class StopAt(Callback):
    """Kill the run when `epoch` starts (after the checkpoint of the epoch before)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        if epoch == self.epoch:
            raise Interrupted


def make_trainer(scenario: str, data: Dataset, *, epochs: int = 2,
                 checkpoint_dir: Path | None = None, stop_at: int | None = None) -> Trainer:
    """A lenet300 on digits set up as `scenario` says, identically in every process."""
    torch.manual_seed(0)
    model = create_model("lenet300", input_shape=data.input_shape, pretrained=False)
    options: dict[str, Any] = {}
    train = data.train
    config = make_train_config(epochs=epochs, batch_size=64, lr=0.05, early_stopping_patience=5)
    if scenario == "pruned_distilled":  # masks change mid-run; adapters are the loss's own
        teacher = copy.deepcopy(model)
        options["loss"] = DistillationLoss(teacher, temperature=2.0, alpha=0.5,
                                           features=[("fc2", "fc1")])
        options["callbacks"] = [GradualPruning(WeightPruning(sparsity=0.6), start=5, end=30,
                                               every=5, targets=Select(names=("fc1", "fc2")))]
    elif scenario == "qat":  # fake-quant weights; input ranges observed on the global batch
        prepare_qat_(model)
        # 20 steps: float-order noise flips a value on the int8 grid now and then, after
        # which runs drift apart by ~1e-4 (both equally valid; see the module docstring)
        train = Split(train.images[:640], train.labels[:640])
    elif scenario == "qat_lsq":  # learned input scales (LSQ), gradient scaled by global size
        prepare_qat_(model, learn_scale=True)
    if stop_at is not None:
        options["callbacks"] = [StopAt(stop_at)]
    if scenario == "dataloader":  # a user's plain DataLoader: shuffled alike in every process
        loader = DataLoader(TensorDataset(train.images, train.labels), batch_size=64, shuffle=True)
        return Trainer(model, loader, val_loader=DataLoader(TensorDataset(data.val.images, data.val.labels),
                                                            batch_size=50),
                       config=config, checkpoint_dir=checkpoint_dir, progress=False, **options)
    return Trainer(model, TensorLoader(train, batch_size=64, shuffle=True),
                   val_loader=TensorLoader(data.val, batch_size=50), config=config,
                   checkpoint_dir=checkpoint_dir, progress=False, **options)


def fit(trainer: Trainer, *, resume: bool = False) -> bool:
    """Run `trainer`; False if a `StopAt` killed it."""
    try:
        trainer.fit(resume=resume)
    except Interrupted:
        return False
    return True


def save_result(trainer: Trainer, path: Path) -> None:
    save_file({k: v.detach().clone().contiguous() for k, v in trainer.model.state_dict().items()},
              str(path.with_suffix(".safetensors")))
    history = [{k: v for k, v in asdict(r).items() if k not in ("seconds", "samples_per_second")}
               for r in trainer.history]
    path.with_suffix(".json").write_text(json.dumps(history))


def worker(out: Path) -> None:
    """What each of the 2 torchrun processes runs (writes `out/<what>-rank<r>.*`)."""
    data = load_dataset("digits")
    rank = dist_utils.rank()
    assert dist_utils.world_size() == 2
    for scenario in SCENARIOS:
        trainer = make_trainer(scenario, data)
        fit(trainer)
        save_result(trainer, out / f"{scenario}-rank{rank}")
    assert not fit(make_trainer("plain", data, epochs=EPOCHS, checkpoint_dir=out / "ckpt-by-2",
                                stop_at=2))
    trainer = make_trainer("plain", data, epochs=EPOCHS, checkpoint_dir=out / "ckpt-by-1")
    assert fit(trainer, resume=True)
    save_result(trainer, out / f"resumed-by-2-rank{rank}")
    trainer = make_trainer("plain", data)
    trainer.model.register_parameter("orphan", torch.nn.Parameter(torch.zeros(3)))
    try:  # last: the failed step leaves that DDP wrapper half-way
        trainer.fit()
    except ConfigError as exc:
        (out / f"unused-rank{rank}.txt").write_text(str(exc))
    dist_utils.shutdown()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def torchrun(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`torchrun --nproc_per_node=2 ARGS` on CPU, on a free port; fails the test on error."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         "--master_addr=127.0.0.1", f"--master_port={free_port()}", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def load_result(path: Path) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    return load_file(str(path.with_suffix(".safetensors"))), json.loads(
        path.with_suffix(".json").read_text())


def max_difference(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> float:
    assert first.keys() == second.keys()
    return max(float((first[k].float() - second[k].float()).abs().max()) for k in first)


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory, digits: Dataset) -> Path:
    """The 2-process results, after a 1-process run was interrupted for them to resume."""
    out = tmp_path_factory.mktemp("ddp")
    assert not fit(make_trainer("plain", digits, epochs=EPOCHS, checkpoint_dir=out / "ckpt-by-1",
                                stop_at=2))
    torchrun(__file__, str(out))
    return out


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_two_processes_train_the_single_process_weights(launched: Path, digits: Dataset,
                                                        scenario: str) -> None:
    trainer = make_trainer(scenario, digits)
    fit(trainer)
    single = {k: v.detach() for k, v in trainer.model.state_dict().items()}
    rank0, history0 = load_result(launched / f"{scenario}-rank0")
    rank1, history1 = load_result(launched / f"{scenario}-rank1")
    assert max_difference(rank0, rank1) == 0.0  # the replicas never drift apart
    assert history0 == history1  # metrics (and early-stopping inputs) agree on every rank
    assert max_difference(single, rank0) < ATOL
    for ours, theirs in zip([asdict(r) for r in trainer.history], history0, strict=True):
        assert ours["val_accuracy"] == theirs["val_accuracy"]
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], abs=1e-5)


def test_a_checkpoint_resumes_with_another_process_count(launched: Path, digits: Dataset,
                                                         tmp_path: Path) -> None:
    whole = make_trainer("plain", digits, epochs=EPOCHS)
    assert fit(whole)
    reference = whole.model.state_dict()
    resumed = make_trainer("plain", digits, epochs=EPOCHS, checkpoint_dir=launched / "ckpt-by-2")
    assert fit(resumed, resume=True)  # 2 epochs by 2 processes, the last one by 1
    assert [r.epoch for r in resumed.history] == [0, 1, 2]
    assert max_difference(reference, resumed.model.state_dict()) < ATOL
    by_two, _ = load_result(launched / "resumed-by-2-rank0")  # 2 epochs by 1, the last by 2
    assert max_difference(reference, by_two) < ATOL


def test_a_parameter_without_gradient_is_named_on_every_rank(launched: Path) -> None:
    for rank in (0, 1):
        message = (launched / f"unused-rank{rank}.txt").read_text()
        assert "loss does not depend on orphan; freeze them" in message


def test_an_uneven_batch_split_is_refused_with_the_fix(digits: Dataset) -> None:
    from torchslim.training.trainer import _check_shardable

    with pytest.raises(ConfigError, match="batch_size 63 does not split evenly over 2"):
        _check_shardable(TensorLoader(digits.train, batch_size=63), 2)
    split = Split(digits.train.images[:65], digits.train.labels[:65])  # last batch: 1 sample
    with pytest.raises(ConfigError, match="last batch holds 1 samples, fewer than the 2"):
        _check_shardable(TensorLoader(split, batch_size=64), 2)
    _check_shardable(TensorLoader(split, batch_size=64, drop_last=True), 2)
    _check_shardable(TensorLoader(split, batch_size=63), 1)  # alone: anything goes


RECIPE = {
    "version": 1, "model": "lenet300", "dataset": "digits", "seed": 0,
    "baseline": {"epochs": 1, "lr": 0.1},
    "stages": [
        {"prune": {"sparsity": 0.7}},
        {"fine_tune": {"epochs": 1, "lr": 0.02, "distill": {"teacher": "original", "alpha": 0.5}}},
        {"encode": {"coder": "auto"}},
    ],
}


def test_torchrun_compress_writes_one_artifact_and_one_report(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    result = torchrun("-m", "torchslim", "compress", str(recipe), "--out", str(tmp_path / "out"),
                      "--no-progress", cwd=tmp_path)
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["prune", "fine_tune", "encode"]
    assert report["final"]["bytes"] == (out / "model.slim").stat().st_size
    assert result.stdout.count("smaller on disk than the dense fp32 baseline") == 1  # rank 0 only
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("report")) == [
        "report.json", "report.md"]
    assert not [p for p in out.rglob("*.tmp")]


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
