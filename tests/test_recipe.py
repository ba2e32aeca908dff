import pytest

from torchslim.apps.recipe import load_recipe, parse_recipe
from torchslim.errors import ConfigError


def _recipe(**overrides):
    return {"version": 1, "model": "lenet300", "dataset": "digits",
            "stages": [{"prune": {"sparsity": 0.5}}, {"encode": {}}], **overrides}


def test_shipped_recipes_validate() -> None:
    for name in ("lenet300_deep_compression", "lenet5_deep_compression"):
        recipe = load_recipe(f"examples/recipes/{name}.yaml")
        assert [s.kind for s in recipe.stages][-1] == "encode"
        assert recipe.baseline is not None and recipe.baseline.epochs > 0
    recipe = load_recipe("examples/recipes/resnet_small_tucker_distill.yaml")
    assert [s.kind for s in recipe.stages] == ["decompose_conv", "fine_tune"]
    assert recipe.stages[1].config.distill.teacher == "original"
    recipe = load_recipe("examples/recipes/resnet_small_structured_distill.yaml")
    assert [s.kind for s in recipe.stages] == ["structured_prune", "fine_tune"]
    assert recipe.stages[0].config.target == "macs"


@pytest.mark.parametrize(("change", "message"), [
    ({"stagse": []}, r"unknown recipe key\(s\) \['stagse'\]; valid keys: baseline"),
    ({"version": 2}, "version 2 is not supported"),
    ({"stages": [{"prnue": {}}]},
     "unknown stage 'prnue'; valid stages: awq, cluster, decompose_conv, distill, drop_layers, encode"),
    ({"stages": [{"prune": {"sparsity": 1.5}}]}, "stage 0 .prune.: .*less than 1"),
    ({"stages": [{"fine_tune": {"epoch": 1}}]}, "epoch: Unexpected keyword argument"),
    ({"stages": [{"cluster": {"bits": 0}}]}, "bits: Input should be greater than or equal to 1"),
    ({"stages": [{"encode": {}}, {"prune": {"sparsity": 0.5}}]}, "'encode' must be the last"),
    ({"stages": [{"prune": {"sparsity": 0.5, "targets": {"name": ["fc1"]}}}]},
     r"unknown selector key\(s\) \['name'\]"),
    ({"baseline": {"lr": 0}}, "baseline: .*lr"),
    ({"stages": [{"low_rank": {"rank": 0}}]}, "stage 0 .low_rank.: .*rank"),
    ({"stages": [{"low_rank": {"energy": 1.2}}]}, "energy: Input should be less than or equal to 1"),
    ({"stages": [{"decompose_conv": {"method": "tucker"}}]}, "exactly one of rank, energy"),
    ({"stages": [{"fine_tune": {"epochs": 1, "distill": {"temprature": 2}}}]},
     r"stage 0 \(fine_tune\): invalid distill block: .*valid keys: alpha, cache_teacher"),
    ({"stages": [{"distill": {"distill": {"alpha": 2}}}]}, "alpha: Input should be less"),
    ({"stages": [{"structured_prune": {"ratio": 1}}]}, "stage 0 .structured_prune.: .*ratio"),
    ({"stages": [{"structured_prune": {"ratio": 0.5, "importance": "l3"}}]}, "importance: Input should be"),
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


def test_distill_blocks_and_structural_stages_parse() -> None:
    recipe = parse_recipe(_recipe(stages=[
        {"low_rank": {"param_ratio": 0.5, "targets": {"types": ["Linear"]}}},
        {"decompose_conv": {"method": "spatial", "energy": 0.9}},
        {"fine_tune": {"epochs": 1, "distill": {"temperature": 2, "alpha": 0.2}}},
        {"fine_tune": {"epochs": 1}},
        {"distill": {"epochs": 2}},
    ]))
    kinds = [s.kind for s in recipe.stages]
    assert kinds == ["low_rank", "decompose_conv", "fine_tune", "fine_tune", "distill"]
    tuned, plain, distill = (s.config for s in recipe.stages[2:])
    assert tuned.distill.temperature == 2 and tuned.distill.teacher == "original"
    assert plain.distill is None
    assert distill.distill.alpha == 0.5 and distill.train.epochs == 2


def test_the_language_model_recipes_validate() -> None:
    for name, first in (("smollm2_deep_compression", "sparsegpt"), ("smollm2_sparsegpt_distill", "sparsegpt"),
                        ("smollm2_sparsegpt24_distill", "sparsegpt"), ("smollm2_wanda_distill", "wanda")):
        recipe = load_recipe(f"examples/recipes/{name}.yaml")
        assert recipe.model == "smollm2-135m" and recipe.dataset == "python-docs"
        assert recipe.stages[0].kind == first and recipe.text["sequence_length"] == 256
        if name.endswith("_distill"):
            assert [s.kind for s in recipe.stages] == [first, "distill", "encode"]
