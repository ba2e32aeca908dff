import pytest

from torchslim.errors import ConfigError
from torchslim.recipe import load_recipe, parse_recipe


def _recipe(**overrides):
    return {"version": 1, "model": "lenet300", "dataset": "digits",
            "stages": [{"prune": {"sparsity": 0.5}}, {"encode": {}}], **overrides}


def test_shipped_recipes_validate() -> None:
    for name in ("lenet300_deep_compression", "lenet5_deep_compression"):
        recipe = load_recipe(f"examples/recipes/{name}.yaml")
        assert [s.kind for s in recipe.stages][-1] == "encode"
        assert recipe.baseline is not None and recipe.baseline.epochs > 0


@pytest.mark.parametrize(("change", "message"), [
    ({"stagse": []}, r"unknown recipe key\(s\) \['stagse'\]; valid keys: baseline"),
    ({"version": 2}, "version 2 is not supported"),
    ({"stages": [{"prnue": {}}]}, "unknown stage 'prnue'; valid stages: cluster, encode"),
    ({"stages": [{"prune": {"sparsity": 1.5}}]}, "stage 0 .prune.: .*less than 1"),
    ({"stages": [{"fine_tune": {"epoch": 1}}]}, "epoch: Unexpected keyword argument"),
    ({"stages": [{"cluster": {"bits": 0}}]}, "bits: Input should be greater than or equal to 1"),
    ({"stages": [{"encode": {}}, {"prune": {"sparsity": 0.5}}]}, "'encode' must be the last"),
    ({"stages": [{"prune": {"sparsity": 0.5, "targets": {"name": ["fc1"]}}}]},
     r"unknown selector key\(s\) \['name'\]"),
    ({"baseline": {"lr": 0}}, "baseline: .*lr"),
])
def test_bad_recipes_fail_on_load_listing_what_is_valid(change, message) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_recipe(_recipe(**change))


def test_missing_or_broken_files_are_config_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("version: 1\nstages: [prune: {\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(broken)


def test_digest_changes_with_the_recipe() -> None:
    assert parse_recipe(_recipe()).digest != parse_recipe(_recipe(seed=1)).digest
