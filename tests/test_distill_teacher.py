"""A recipe's teacher of another architecture: trained into its file when missing, reused after."""

import json
from pathlib import Path

import pytest
import torch

from torchslim import artifact
from torchslim.apps.compress import CompressionRun
from torchslim.apps.recipe import parse_recipe
from torchslim.errors import ConfigError


def _recipe(teacher: dict, **distill) -> dict:
    return {"version": 1, "model": "mlp-800-800", "dataset": "digits", "seed": 0,
            "baseline": {"epochs": 1, "optimizer": "adam", "lr": 0.001},
            "stages": [{"distill": {"epochs": 1, "optimizer": "adam", "lr": 0.001, "shift": 1,
                                    "distill": {"teacher": teacher, "temperature": 20,
                                                "alpha": 0.1, **distill}}}]}


def test_the_teacher_is_trained_once_then_reused(tmp_path: Path) -> None:
    path = tmp_path / "teacher" / "model.slim"
    teacher = {"model": "mlp-1200-1200", "path": str(path),
               "train": {"epochs": 2, "lr": 0.05, "shift": 1}}
    report = CompressionRun(parse_recipe(_recipe(teacher)), tmp_path / "a", progress=False,
                            timing=False).run()
    note = report["stages"][0]["teacher"]
    assert note["trained"] and note["model"] == "mlp-1200-1200"
    assert note["test_accuracy"] > 0.5  # trained (chance is 0.1): 2 epochs on the 8x8 digits
    assert artifact.read_metadata(path)["metadata"]["train"]["shift"] == 1
    first = path.stat().st_mtime_ns
    report = CompressionRun(parse_recipe(_recipe({**teacher, "train": None})), tmp_path / "b",
                            progress=False, timing=False).run()
    assert path.stat().st_mtime_ns == first  # loaded, not trained again
    assert report["stages"][0]["teacher"]["trained"] is False
    assert report["stages"][0]["teacher"]["test_accuracy"] == note["test_accuracy"]
    student = artifact.load(tmp_path / "b" / "model.slim")
    assert student.fc1.weight.shape == (800, 64)  # the student, not the teacher
    saved = json.loads((tmp_path / "b" / "report.json").read_text())
    assert saved["recipe"]["stages"][0]["distill"]["distill"]["teacher"]["path"] == str(path)


def test_a_missing_teacher_without_training_options_names_the_fix(tmp_path: Path) -> None:
    recipe = parse_recipe(_recipe({"model": "mlp-1200-1200", "path": str(tmp_path / "none.slim")}))
    with pytest.raises(ConfigError, match=r"does not exist .* add `train: \{epochs: ...\}`"):
        CompressionRun(recipe, tmp_path / "o", progress=False, timing=False).run()


def test_a_teacher_file_of_another_model_is_refused(tmp_path: Path) -> None:
    from torchslim.models import create_model

    path = artifact.save(create_model("lenet300", input_shape=(1, 8, 8), pretrained=False),
                         tmp_path / "t.slim")
    recipe = parse_recipe(_recipe({"model": "mlp-1200-1200", "path": str(path)}))
    with pytest.raises(ConfigError, match="holds 'lenet300', not 'mlp-1200-1200'"):
        CompressionRun(recipe, tmp_path / "o", progress=False, timing=False).run()


@pytest.mark.parametrize(("teacher", "extra", "message"), [
    ({"model": "mlp-12", "path": "t.slim"}, {}, "distill: teacher: unknown model 'mlp-12'"),
    ({"model": "mlp-800-800", "path": "t.slim", "train": {"epoch": 2}}, {},
     "distill: teacher: train: .*epoch"),
    ({"model": "mlp-800-800", "pth": "t.slim"}, {}, "pth"),
    ({"model": "mlp-800-800", "path": "t.slim"}, {"cache_teacher": True}, "drop cache_teacher"),
])
def test_bad_teacher_blocks_fail_when_the_recipe_loads(teacher, extra, message) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_recipe(_recipe(teacher, **extra))


def test_the_student_sees_the_teachers_outputs_on_the_same_shifted_batch() -> None:
    """The loss gets the trainer's (shifted) inputs, so the teacher is asked about the very
    images the student sees: a student copied from the teacher has a zero soft loss."""
    from torchslim.distillation import DistillationLoss
    from torchslim.models import create_model
    from torchslim.training.augment import random_shift

    torch.manual_seed(0)
    teacher = create_model("mlp-800-800", input_shape=(1, 8, 8), pretrained=False).eval()
    loss = DistillationLoss(teacher, temperature=20, alpha=0.0)
    x = random_shift(torch.randn(8, 1, 8, 8), 1, generator=torch.Generator().manual_seed(0))
    loss.bind(teacher, x[:2])
    with torch.no_grad():
        value = float(loss(teacher(x), torch.zeros(8, dtype=torch.long), x))
    assert value == pytest.approx(0, abs=1e-6)


def test_the_shipped_hinton_recipe_trains_its_teacher_then_distils_the_papers_student_at_t20() -> None:
    from torchslim.apps.recipe import load_recipe
    from torchslim.distillation import TrainedTeacher

    recipe = load_recipe("examples/recipes/hinton_mnist_distill.yaml")
    assert (recipe.model, recipe.dataset) == ("mlp-800-800", "mnist")
    assert recipe.baseline is not None and recipe.baseline.shift == 0  # hard labels, no jitter
    (stage,) = recipe.stages
    assert stage.kind == "distill" and stage.config.train.shift == 2
    distill = stage.config.distill
    assert distill.temperature == 20
    assert isinstance(distill.teacher, TrainedTeacher) and distill.teacher.model == "lenet5"
    assert distill.teacher.train is not None and distill.teacher.train["shift"] == 2
