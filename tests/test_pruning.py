import pytest
import torch
from torch import nn

from torchslim.api import apply_, finalize_
from torchslim.data import TensorLoader
from torchslim.errors import ConfigError, SelectionError
from torchslim.models import create_model
from torchslim.pruning import (
    GradualPruning,
    WeightPruning,
    cubic_sparsity,
    iterative_sparsities,
    rewind_,
    scan_sensitivity,
    sparsities_for_drop,
    sparsity_of,
)
from torchslim.pruning import masks as M
from torchslim.select import Select
from torchslim.testing import TinyMLP
from torchslim.training import Trainer, make_train_config


def test_mask_by_sparsity_keeps_the_largest_scores() -> None:
    scores = torch.arange(10.0)
    mask = M.mask_by_sparsity(scores, 0.3)
    assert mask.tolist() == [False] * 3 + [True] * 7
    assert M.mask_by_sparsity(scores, 0.0).all()


def test_threshold_and_std_rules_follow_han_2015() -> None:
    weight = torch.tensor([-2.0, -0.5, 0.1, 0.4, 3.0])
    assert M.mask_by_threshold(weight, 0.45).tolist() == [True, True, False, False, True]
    assert M.std_threshold(weight, 0.5) == pytest.approx(0.5 * float(weight.std()))


def test_global_ranking_prunes_small_layers_harder() -> None:
    masks = M.global_masks({"big": torch.full((10,), 5.0), "small": torch.full((10,), 1.0)}, 0.5)
    assert masks["big"].all() and not masks["small"].any()


def test_activation_scores_weight_columns_by_input_norm() -> None:
    weight = torch.ones(2, 3)
    scores = M.activation_scores(weight, torch.tensor([1.0, 2.0, 3.0]))
    assert scores.tolist() == [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]


@pytest.mark.parametrize("criterion", ["magnitude", "l2", "random", "taylor", "activation"])
def test_every_criterion_reaches_the_asked_sparsity(digits, criterion: str) -> None:
    model = create_model("lenet300", pretrained=False, input_shape=(1, 8, 8))
    calibration = TensorLoader(digits.train, batch_size=64)
    result = apply_(model, WeightPruning(sparsity=0.8, criterion=criterion, calibration_batches=2),
                    calibration=calibration)
    assert result["sparsity"] == {"fc1": 0.8, "fc2": 0.8, "fc3": 0.8}


def test_taylor_without_calibration_is_refused_and_the_model_is_unchanged() -> None:
    model = create_model("lenet300", pretrained=False, input_shape=(1, 8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="calibration"):
        apply_(model, WeightPruning(sparsity=0.5, criterion="taylor"))
    assert set(model.state_dict()) == set(before)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_global_scope_and_per_layer_overrides() -> None:
    model = create_model("lenet300", pretrained=False)
    result = apply_(model, WeightPruning(sparsity=0.9, scope="global"))
    total = sum(m.weight.numel() for m in (model.fc1, model.fc2, model.fc3))
    zeros = sum(int((m.weight == 0).sum()) for m in (model.fc1, model.fc2, model.fc3))
    assert zeros == round(0.9 * total) and len(set(result["sparsity"].values())) > 1
    other = create_model("lenet300", pretrained=False)
    result = apply_(other, WeightPruning(sparsity=0.5, per_layer={"fc3": 0.9}))
    assert result["sparsity"]["fc3"] == 0.9 and result["sparsity"]["fc1"] == 0.5


def test_bad_pruning_input_names_the_problem() -> None:
    with pytest.raises(ConfigError, match="sparsity: Input should be less than 1"):
        WeightPruning(sparsity=1.0)
    with pytest.raises(ConfigError, match="exactly one of"):
        WeightPruning(sparsity=0.5, threshold=0.1)
    model = create_model("lenet300", pretrained=False)
    with pytest.raises(SelectionError, match="'fc9' matched no"):
        apply_(model, WeightPruning(sparsity=0.5), targets=Select(names=("fc9",)))
    with pytest.raises(ConfigError, match="per_layer names"):
        apply_(model, WeightPruning(sparsity=0.5, per_layer={"nope": 0.5}))


def test_masks_are_reversible_until_finalized_and_pruning_only_adds_zeros() -> None:
    layer = nn.Sequential(nn.Linear(20, 20))
    original = layer[0].weight.detach().clone()
    apply_(layer, WeightPruning(sparsity=0.5))
    first_zeros = layer[0].weight == 0
    apply_(layer, WeightPruning(sparsity=0.7))
    assert (layer[0].weight[first_zeros] == 0).all() and sparsity_of(layer[0]) == 0.7
    assert torch.equal(layer[0].parametrizations.weight.original, original)
    finalize_(layer)
    assert not hasattr(layer[0], "parametrizations") and sparsity_of(layer[0]) == 0.7
    assert not torch.signbit(layer[0].weight[layer[0].weight == 0]).any()  # +0.0, never -0.0



class ScaledLinear(nn.Linear):
    """A user's Linear subclass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def test_finalizing_a_copy_leaves_the_masked_original_working() -> None:
    import copy

    model = nn.Sequential(ScaledLinear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    apply_(model, WeightPruning(sparsity=0.5))
    frozen = finalize_(copy.deepcopy(model))  # e.g. to save a copy while the original trains on
    assert not hasattr(frozen[0], "parametrizations") and type(frozen[0]) is ScaledLinear
    assert hasattr(model[0], "parametrizations") and sparsity_of(model[0]) == 0.5
    x = torch.randn(3, 8)
    assert torch.equal(model(x), frozen(x))  # the original still has its (masked) weights
    finalize_(model)
    assert type(model[0]) is ScaledLinear and type(model[2]) is nn.Linear

def test_pruned_weights_stay_zero_through_fine_tuning(digits) -> None:
    model = TinyMLP()
    apply_(model, WeightPruning(sparsity=0.75))
    pruned = model.net[1].weight == 0
    Trainer(model, TensorLoader(digits.train, batch_size=64, shuffle=True),
            config=make_train_config(epochs=2, lr=0.1, optimizer="adam", weight_decay=0.01),
            progress=False).fit()
    assert (model.net[1].weight[pruned] == 0).all()
    grad = model.net[1].parametrizations.weight.original.grad
    assert grad is None or (grad[pruned] == 0).all()


def test_schedules_follow_their_formulas() -> None:
    assert cubic_sparsity(0, final=0.8, end=10) == 0.0
    assert cubic_sparsity(5, final=0.8, end=10) == pytest.approx(0.8 * (1 - 0.5 ** 3))
    assert cubic_sparsity(99, final=0.8, end=10) == 0.8
    steps = iterative_sparsities(0.9, 3)
    kept = [1 - s for s in steps]
    assert steps[-1] == pytest.approx(0.9) and kept[1] / kept[0] == pytest.approx(kept[0])


def test_gradual_pruning_ramps_during_training_and_resumes_state(digits) -> None:
    model = TinyMLP()
    callback = GradualPruning(WeightPruning(sparsity=0.8), start=0, end=30, every=5)
    Trainer(model, TensorLoader(digits.train, batch_size=64, shuffle=True),
            config=make_train_config(epochs=2, lr=0.05), callbacks=[callback],
            progress=False).fit()
    assert callback.current == pytest.approx(0.8)
    assert sparsity_of(model.net[1]) == pytest.approx(0.8, abs=1e-3)
    fresh = GradualPruning(WeightPruning(sparsity=0.8), end=30)
    fresh.load_state_dict(callback.state_dict())
    assert fresh.current == callback.current


def test_rewind_restores_survivors_and_keeps_zeros() -> None:
    torch.manual_seed(0)
    model = TinyMLP()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.net[1].weight.mul_(3)
    apply_(model, WeightPruning(sparsity=0.5))
    kept = model.net[1].weight != 0
    rewind_(model, initial)
    assert torch.equal(model.net[1].weight[kept], initial["net.1.weight"][kept])
    assert (model.net[1].weight[~kept] == 0).all()


def test_sensitivity_scan_and_suggested_sparsities(digits) -> None:
    torch.manual_seed(0)
    model = create_model("lenet300", pretrained=False, input_shape=(1, 8, 8))
    Trainer(model, TensorLoader(digits.train, batch_size=64, shuffle=True),
            config=make_train_config(epochs=3, lr=0.1), progress=False).fit()
    scan = scan_sensitivity(model, TensorLoader(digits.val, batch_size=500),
                            sparsities=(0.5, 0.99), progress=False)
    assert set(scan["layers"]) == {"fc1", "fc2", "fc3"}
    assert all(curve[1] <= curve[0] + 0.02 for curve in scan["layers"].values())
    assert min(c[1] for c in scan["layers"].values()) < scan["baseline"] - 0.05
    chosen = sparsities_for_drop(scan, 1.0)
    assert chosen == {"fc1": 0.99, "fc2": 0.99, "fc3": 0.99}
