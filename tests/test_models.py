import pytest
import torch

from torchslim.data import TensorLoader, load_dataset
from torchslim.errors import ConfigError
from torchslim.measure import count_params, evaluate
from torchslim.models import ModelSpec, create_model, example_inputs, model_names, spec_of


def test_registry_lists_the_reference_models_and_names_unknown_ones() -> None:
    assert {"lenet300", "lenet5", "resnet-small", "mnist-cnn", "mobilenet-v2", "minilm"} <= set(
        model_names())
    with pytest.raises(ConfigError, match=r"known models: .*lenet300"):
        create_model("lenet-300")


@pytest.mark.parametrize(("name", "params"), [("lenet300", 266_610), ("lenet5", 431_080),
                                              ("resnet-small", 174_970)])
def test_paper_architectures_have_their_parameter_counts(name: str, params: int) -> None:
    model = create_model(name, pretrained=False)
    total, nonzero = count_params(model)
    assert total == params and nonzero <= total  # BN biases start at zero
    spec = spec_of(model)
    assert model(example_inputs(spec, 3)).shape == (3, 10)
    assert ModelSpec.from_dict(spec.to_dict()) == spec


def test_models_adapt_to_the_dataset_shape_or_say_why_not() -> None:
    small = create_model("lenet300", pretrained=False, input_shape=(1, 8, 8), num_classes=4)
    assert small(torch.zeros(2, 1, 8, 8)).shape == (2, 4)
    with pytest.raises(ConfigError, match="at least 16x16"):
        create_model("lenet5", pretrained=False, input_shape=(1, 8, 8))
    with pytest.raises(ConfigError, match="no pretrained weights"):
        create_model("lenet300", pretrained=True)
    with pytest.raises(ConfigError, match="pretrained 'mnist-cnn' expects"):
        create_model("mnist-cnn", num_classes=5)


def test_pretrained_mnist_cnn_scores_its_published_accuracy_through_our_loader() -> None:
    model = create_model("mnist-cnn")
    data = load_dataset("mnist")
    metrics = evaluate(model, TensorLoader(data.test, batch_size=1000))
    assert abs(metrics["accuracy"] - 0.9906) <= 0.0005
