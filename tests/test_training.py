import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torchslim.data import TensorLoader
from torchslim.errors import ConfigError
from torchslim.testing import TinyMLP
from torchslim.training import Callback, Trainer, make_train_config
from torchslim.training.optim import build_optimizer, build_scheduler


def _trainer(digits, tmp_path: Path | None = None, callbacks=(), **config) -> Trainer:
    torch.manual_seed(0)
    model = TinyMLP()
    values = {"epochs": 3, "lr": 0.1, "batch_size": 64, **config}
    return Trainer(model, TensorLoader(digits.train, batch_size=values["batch_size"],
                                       shuffle=True),
                   val_loader=TensorLoader(digits.val, batch_size=500),
                   config=make_train_config(**values), callbacks=callbacks,
                   checkpoint_dir=tmp_path, progress=False)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw", "rmsprop"])
def test_every_optimizer_learns_digits(digits, optimizer: str) -> None:
    lr = {"sgd": 0.1, "adam": 0.01, "adamw": 0.01, "rmsprop": 0.001}[optimizer]
    history = _trainer(digits, optimizer=optimizer, lr=lr, nesterov=True).fit()
    assert history[-1].val_accuracy > 0.8
    assert history[-1].train_loss < history[0].train_loss


def _lrs(**config) -> list[float]:
    cfg = make_train_config(**{"epochs": 4, "lr": 1.0, **config})
    optimizer = build_optimizer(torch.nn.Linear(2, 2).parameters(), cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=10)
    lrs = []
    for _ in range(40):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_schedules_shape_the_learning_rate() -> None:
    cosine = _lrs(schedule="cosine", warmup_epochs=1)
    assert cosine[0] == pytest.approx(0.01) and cosine[10] == pytest.approx(1.0)
    assert cosine[-1] < 0.01 and cosine[25] == pytest.approx(0.5, abs=0.06)
    step = _lrs(schedule="step", step_epochs=2, gamma=0.5)
    assert step[19] == 1.0 and step[20] == 0.5
    multi = _lrs(schedule="multistep", milestones=(1, 3), gamma=0.1)
    assert multi[9] == 1.0 and multi[10] == pytest.approx(0.1) and multi[30] == pytest.approx(0.01)
    expo = _lrs(schedule="exponential", gamma=0.5)
    assert expo[10] == pytest.approx(0.5) and expo[20] == pytest.approx(0.25)
    assert set(_lrs(schedule="constant")) == {1.0}


def test_l1_penalty_shrinks_weights_and_dropout_is_set(digits) -> None:
    plain = _trainer(digits, epochs=2)
    plain.fit()
    sparse = _trainer(digits, epochs=2, l1=1e-2, dropout=0.3)
    sparse.fit()
    assert sparse.model.net[3].p == 0.3

    def weight_l1(trainer: Trainer) -> float:
        return sum(float(p.detach().abs().sum()) for p in trainer.model.parameters() if p.dim() > 1)

    assert weight_l1(sparse) < 0.8 * weight_l1(plain)


class Recorder(Callback):
    def __init__(self) -> None:
        self.events: list[str] = []
        self.max_grad = 0.0

    def on_fit_start(self, trainer): self.events.append("fit_start")
    def on_epoch_start(self, trainer, epoch): self.events.append(f"epoch_start{epoch}")
    def on_epoch_end(self, trainer, record): self.events.append(f"epoch_end{record.epoch}")
    def on_fit_end(self, trainer): self.events.append("fit_end")

    def on_before_optimizer_step(self, trainer, step):
        grads = [p.grad for p in trainer.model.parameters()]
        self.max_grad = max(self.max_grad, float(torch.cat([g.flatten() for g in grads]).norm()))


def test_callbacks_run_in_order_and_gradients_are_clipped(digits) -> None:
    recorder = Recorder()
    _trainer(digits, epochs=2, callbacks=[recorder], grad_clip=0.01).fit()
    assert recorder.events == ["fit_start", "epoch_start0", "epoch_end0", "epoch_start1",
                               "epoch_end1", "fit_end"]
    assert recorder.max_grad > 0.01  # the hook sees raw gradients; clipping follows it


def test_early_stopping_stops_and_restores_the_best_weights(digits) -> None:
    # lr so high that validation accuracy collapses after the first epochs
    trainer = _trainer(digits, epochs=30, lr=3.0, optimizer="sgd",
                       early_stopping_patience=2, schedule="constant")
    history = trainer.fit()
    assert len(history) < 30
    best = max(r.val_accuracy for r in history)
    from torchslim.measure import evaluate
    assert evaluate(trainer.model, trainer.val_loader)["accuracy"] == best


class StopAfterEpoch(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_fit_end(self, trainer): pass

    def on_epoch_end(self, trainer, record):
        if record.epoch == self.epoch:
            raise KeyboardInterrupt  # dies before this epoch's checkpoint is written


def test_resume_after_interruption_matches_an_uninterrupted_run(digits, tmp_path: Path) -> None:
    config = {"epochs": 4, "dropout": 0.2, "optimizer": "adam", "lr": 0.01, "warmup_epochs": 1}
    reference = _trainer(digits, **config)
    reference.fit()
    with pytest.raises(KeyboardInterrupt):
        _trainer(digits, tmp_path, callbacks=[StopAfterEpoch(2)], **config).fit()
    resumed = _trainer(digits, tmp_path, **config)
    resumed.model.net[1].weight.data.zero_()  # prove the weights come from the checkpoint
    history = resumed.fit(resume=True)
    assert [r.epoch for r in history] == [0, 1, 2, 3]
    for a, b in zip(reference.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_resume_with_changed_config_is_refused(digits, tmp_path: Path) -> None:
    _trainer(digits, tmp_path, epochs=1).fit()
    with pytest.raises(ConfigError, match="changed: lr"):
        _trainer(digits, tmp_path, epochs=1, lr=0.5).fit(resume=True)


KILL_SCRIPT = """
import os, signal, sys
from torchslim.cli import main
from torchslim.training import Callback, Trainer

class Kill(Callback):
    def on_epoch_start(self, trainer, epoch):
        if epoch == 2:
            os.kill(os.getpid(), signal.SIGKILL)

original = Trainer.__init__
def patched(self, *args, **kwargs):
    kwargs["callbacks"] = [Kill()]
    original(self, *args, **kwargs)
if sys.argv[1] == "kill":
    Trainer.__init__ = patched
sys.exit(main(sys.argv[2:]))
"""


def test_kill_minus_nine_then_resume_reaches_the_uninterrupted_result(tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    args = ["train", "--model", "lenet300", "--dataset", "digits", "--epochs", "4",
            "--no-progress", "--threads", "1"]

    def run(mode: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), mode, *args, "--out", str(out),
                               *extra], capture_output=True, text=True, timeout=300)

    killed = run("kill", tmp_path / "a")
    assert killed.returncode == -9
    assert (tmp_path / "a" / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "a" / "model.slim").exists()
    resumed = run("plain", tmp_path / "a", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    straight = run("plain", tmp_path / "b")
    assert straight.returncode == 0, straight.stderr
    from torchslim import artifact
    a, b = artifact.load(tmp_path / "a" / "model.slim"), artifact.load(tmp_path / "b" / "model.slim")
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_bad_training_options_name_the_field_and_range() -> None:
    with pytest.raises(ConfigError, match="epochs: Input should be greater than or equal to 1"):
        make_train_config(epochs=0)
    with pytest.raises(ConfigError, match="schedule: Input should be"):
        make_train_config(schedule="linear-ish")


def test_early_stopping_without_validation_and_missing_cuda_are_explained(digits) -> None:
    loader = TensorLoader(digits.train, batch_size=64)
    with pytest.raises(ConfigError, match="val_loader"):
        Trainer(TinyMLP(), loader, config=make_train_config(early_stopping_patience=2))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            Trainer(TinyMLP(), loader, config=make_train_config(device="cuda"))


def _dataloader_trainer(digits, tmp_path: Path, callbacks=(), **config) -> Trainer:
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    train = DataLoader(TensorDataset(digits.train.images, digits.train.labels), batch_size=64,
                       shuffle=True)
    val = DataLoader(TensorDataset(digits.val.images, digits.val.labels), batch_size=256)
    return Trainer(TinyMLP(), train, val_loader=val,
                   config=make_train_config(**{"epochs": 3, "lr": 0.1, **config}),
                   callbacks=callbacks, checkpoint_dir=tmp_path, progress=False)


def test_a_plain_dataloader_trains_and_resumes_exactly(digits, tmp_path: Path) -> None:
    reference = _dataloader_trainer(digits, tmp_path / "ref")
    history = reference.fit()
    assert history[-1].val_accuracy > 0.8 and history[-1].train_loss < history[0].train_loss
    with pytest.raises(KeyboardInterrupt):
        _dataloader_trainer(digits, tmp_path / "run", callbacks=[StopAfterEpoch(1)]).fit()
    resumed = _dataloader_trainer(digits, tmp_path / "run")
    resumed.fit(resume=True)
    for a, b in zip(reference.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_run_killed_during_gradual_pruning_resumes_with_its_masks(digits, tmp_path: Path) -> None:
    """The checkpoint holds parametrized weights (masks): they exist again before it loads."""
    from torchslim.pruning import GradualPruning, WeightPruning

    def gradual() -> GradualPruning:
        return GradualPruning(WeightPruning(sparsity=0.8), start=0, end=40, every=5)

    reference = _trainer(digits, tmp_path / "ref", callbacks=[gradual()])
    reference.fit()
    with pytest.raises(KeyboardInterrupt):
        _trainer(digits, tmp_path / "run", callbacks=[gradual(), StopAfterEpoch(1)]).fit()
    resumed = _trainer(digits, tmp_path / "run", callbacks=[gradual()])
    resumed.fit(resume=True)
    expected, got = reference.model.state_dict(), resumed.model.state_dict()
    assert any(".mask" in name for name in got) and expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    weight = resumed.model.net[1].weight
    assert float((weight == 0).float().mean()) == pytest.approx(0.8, abs=0.01)


def test_a_long_epoch_reports_its_steps_in_the_log(digits, monkeypatch, caplog) -> None:
    import logging

    import torchslim.training.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "STEP_LINE_SECONDS", 0.0)  # every step counts as "long"
    trainer = _trainer(digits, epochs=1, batch_size=256)
    trainer.progress = True
    with caplog.at_level(logging.INFO, logger="torchslim.progress"):
        trainer.fit()
    steps = len(trainer.train_loader)
    lines = [r.getMessage() for r in caplog.records if "step" in r.getMessage()]
    assert lines[0].startswith(f"epoch 1/1 step 1/{steps}: train loss ")
    assert len(lines) == steps
