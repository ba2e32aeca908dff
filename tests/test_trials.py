"""run_trials and the sensitivity scan: in-process and on a real local Ray give the same numbers."""

import importlib.util
import json
from functools import partial

import pytest
import torch

import torchslim as ts
from torchslim.cli import main
from torchslim.data import TensorLoader
from torchslim.errors import ConfigError
from torchslim.models import create_model
from torchslim.pruning import scan_sensitivity
from torchslim.pruning.masks import check_sparsity
from torchslim.training import Trainer, make_train_config
from torchslim.trials import TrialBackend, choose_backend, run_trials

HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="Ray missing: pip install 'torchslim[ray]'")


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray with 2 CPUs for the whole module, started by run_trials itself."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    assert run_trials(abs, [-1, 2], workers=2, progress=False) == [1, 2]
    yield ray
    ray.shutdown()


def test_backend_follows_workers_and_address() -> None:
    assert choose_backend() is TrialBackend.IN_PROCESS
    assert choose_backend(workers=1) is TrialBackend.IN_PROCESS
    assert choose_backend(workers=2) is TrialBackend.RAY
    assert choose_backend(workers=1, ray_address="auto") is TrialBackend.RAY


def test_zero_workers_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="workers must be >= 1"):
        run_trials(abs, [1], workers=0, progress=False)


def test_in_process_seeds_each_trial_and_leaves_the_callers_rng() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    draws = run_trials(torch.rand, [3, 3], progress=False)
    for index, draw in enumerate(draws):
        assert torch.equal(draw, torch.rand(3, generator=torch.Generator().manual_seed(index)))
    torch.manual_seed(123)
    run_trials(torch.rand, [3], progress=False)
    assert torch.equal(torch.rand(1), expected_next)


@pytest.mark.skipif(HAS_RAY, reason="Ray is installed; this checks the error shown without it")
def test_ray_asked_for_without_ray_says_how_to_install() -> None:
    with pytest.raises(ConfigError, match=r"pip install 'torchslim\[ray\]'"):
        run_trials(abs, [1, 2], workers=2, progress=False)


@needs_ray
def test_local_ray_has_the_workers_cpus(local_ray) -> None:
    assert local_ray.cluster_resources()["CPU"] == 2


@needs_ray
def test_ray_matches_in_process_in_item_order(local_ray) -> None:
    shared = torch.arange(60, dtype=torch.int64).reshape(6, 10)  # bound once, put once
    vectors = [torch.full((10,), i, dtype=torch.int64) for i in range(7)]
    function = partial(torch.mv, shared)
    on_ray = run_trials(function, vectors, workers=2, progress=False)
    here = run_trials(function, vectors, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(on_ray, here, strict=True))
    assert torch.equal(on_ray[3], shared @ vectors[3])


@needs_ray
def test_ray_trials_draw_the_same_random_numbers(local_ray) -> None:
    shapes = [(2, 3), (4,), (1,), (5,)]
    on_ray = run_trials(torch.randn, shapes, workers=2, progress=False)
    here = run_trials(torch.randn, shapes, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(on_ray, here, strict=True))


@needs_ray
def test_two_tasks_on_two_cpus_use_one_thread_each(local_ray) -> None:
    threads = run_trials(lambda _: torch.get_num_threads(), range(4), workers=2, progress=False)
    assert threads == [1, 1, 1, 1]
    alone = run_trials(lambda _: torch.get_num_threads(), [0], workers=2, progress=False)
    assert alone == [2]  # one task in flight gets both CPUs


@needs_ray
def test_a_failing_trial_raises_its_own_error(local_ray) -> None:
    with pytest.raises(ConfigError, match=r"got 1\.5"):
        run_trials(check_sparsity, [0.5, 1.5, 0.9], workers=2, progress=False)


@pytest.fixture(scope="module")
def small_trained(digits):
    """LeNet-300-100 on 8x8 digits after 2 epochs: accuracies that move with sparsity."""
    torch.manual_seed(0)
    model = create_model("lenet300", pretrained=False, input_shape=(1, 8, 8))
    Trainer(model, TensorLoader(digits.train, batch_size=64, shuffle=True),
            config=make_train_config(epochs=2, lr=0.1), progress=False).fit()
    return model


@needs_ray
def test_sensitivity_scan_on_ray_equals_in_process(local_ray, small_trained, digits) -> None:
    val = TensorLoader(digits.val, batch_size=500)
    here = scan_sensitivity(small_trained, val, sparsities=(0.5, 0.9, 0.99), progress=False)
    on_ray = scan_sensitivity(small_trained, val, sparsities=(0.5, 0.9, 0.99), progress=False, workers=2)
    assert on_ray["layers"] == here["layers"]
    assert on_ray["baseline"] == here["baseline"]
    assert set(here["layers"]) == {"fc1", "fc2", "fc3"}
    assert len({acc for curve in here["layers"].values() for acc in curve}) > 3  # not all equal
    assert here["execution"]["backend"] == "in-process"
    assert on_ray["execution"]["backend"] == "ray"
    assert on_ray["execution"]["workers"] == 2


@needs_ray
def test_cli_sensitivity_workers_records_backend_and_seconds(local_ray, small_trained, tmp_path) -> None:
    ts.save(small_trained, tmp_path / "model.slim")
    reports = {}
    for label, extra in (("here", []), ("ray", ["--workers", "2"])):
        code = main(["sensitivity", "--model", str(tmp_path / "model.slim"), "--dataset", "digits",
                     "--sparsities", "0.5", "0.99", "--no-progress", "--out", str(tmp_path / label),
                     *extra])
        assert code == 0
        reports[label] = json.loads((tmp_path / label / "sensitivity.json").read_text())
    assert reports["ray"]["layers"] == reports["here"]["layers"]
    assert reports["ray"]["suggested"] == reports["here"]["suggested"]
    assert reports["here"]["execution"]["backend"] == "in-process"
    assert reports["ray"]["execution"] == {"backend": "ray", "workers": 2, "ray_address": None,
                                           "seconds": reports["ray"]["execution"]["seconds"]}
    assert reports["ray"]["execution"]["seconds"] > 0
