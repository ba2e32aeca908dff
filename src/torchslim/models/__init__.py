"""Reference models by name: `create_model("lenet300")`, `model_names()`.

Registration is explicit, here; modules that need heavy packages (transformers) import them only
when their model is built.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from torchslim.models.lenet import LeNet5, LeNet300
from torchslim.models.mlp import MLP
from torchslim.models.mnist_cnn import MnistCNN, load_mnist_cnn_weights
from torchslim.models.registry import (
    ModelEntry,
    ModelSpec,
    TrainDefaults,
    build_model,
    create_model,
    dataset_for,
    example_inputs,
    get_entry,
    model_names,
    register_model,
    spec_of,
)
from torchslim.models.resnet_small import ResNetSmall

__all__ = [
    "ModelEntry",
    "ModelSpec",
    "TrainDefaults",
    "build_model",
    "create_model",
    "dataset_for",
    "example_inputs",
    "get_entry",
    "model_names",
    "register_model",
    "spec_of",
]


def _build_mobilenet_v2(**kwargs: Any) -> nn.Module:
    from torchslim.models.mobilenet_v2 import MobileNetV2

    return MobileNetV2(**kwargs)


def _load_mobilenet_v2(model: nn.Module) -> None:
    from torchslim.models.mobilenet_v2 import load_mobilenet_v2_weights

    load_mobilenet_v2_weights(model)


def _build_minilm(**kwargs: Any) -> nn.Module:
    from torchslim.models.minilm import MiniLM

    return MiniLM(**kwargs)


def _load_minilm(model: nn.Module) -> None:
    from torchslim.models.minilm import load_minilm_weights

    load_minilm_weights(model)


register_model(ModelEntry(
    name="lenet300", description="LeNet-300-100 MLP (Deep Compression's MNIST model)",
    build=LeNet300, input_shape=(1, 28, 28), num_classes=10, default_dataset="mnist",
    train_defaults=TrainDefaults(epochs=12, optimizer="sgd", lr=0.1, weight_decay=1e-4,
                                 schedule="cosine", batch_size=128),
))
register_model(ModelEntry(
    name="lenet5", description="LeNet-5, Caffe variant: conv 20/50 5x5, fc 500",
    build=LeNet5, input_shape=(1, 28, 28), num_classes=10, default_dataset="mnist",
    train_defaults=TrainDefaults(epochs=12, optimizer="sgd", lr=0.05, weight_decay=5e-4,
                                 schedule="cosine", batch_size=128),
))
def _hinton_teacher(**kwargs: Any) -> nn.Module:
    return MLP(hidden=(1200, 1200), dropout=0.5, input_dropout=0.2, **kwargs)


def _hinton_student(**kwargs: Any) -> nn.Module:
    return MLP(hidden=(800, 800), **kwargs)


# Hinton et al. 2015's MNIST teacher and student (see torchslim.models.mlp).
register_model(ModelEntry(
    name="mlp-1200-1200", description="784-1200-1200-10 MLP, dropout 0.2 input / 0.5 hidden "
    "(Hinton 2015's MNIST teacher)",
    build=_hinton_teacher, input_shape=(1, 28, 28), num_classes=10, default_dataset="mnist",
    train_defaults=TrainDefaults(epochs=30, optimizer="sgd", lr=0.05, weight_decay=0.0,
                                 schedule="cosine", batch_size=128),
))
register_model(ModelEntry(
    name="mlp-800-800", description="784-800-800-10 MLP, no regularization (Hinton 2015's "
    "MNIST student)",
    build=_hinton_student, input_shape=(1, 28, 28), num_classes=10, default_dataset="mnist",
    train_defaults=TrainDefaults(epochs=20, optimizer="adam", lr=1e-3, weight_decay=0.0,
                                 schedule="cosine", batch_size=128),
))
register_model(ModelEntry(
    name="resnet-small", description="small residual CNN for 28x28 images (16/32/64 channels)",
    build=ResNetSmall, input_shape=(1, 28, 28), num_classes=10, default_dataset="fashion-mnist",
    train_defaults=TrainDefaults(epochs=15, optimizer="sgd", lr=0.1, weight_decay=5e-4,
                                 schedule="cosine", batch_size=128, warmup_epochs=1),
))
register_model(ModelEntry(
    name="mnist-cnn", description="pretrained MNIST CNN from digit-recognizer-py (99.06%)",
    build=MnistCNN, input_shape=(1, 28, 28), num_classes=10, default_dataset="mnist",
    load_pretrained=load_mnist_cnn_weights,
    train_defaults=TrainDefaults(epochs=5, optimizer="adam", lr=1e-3, weight_decay=0.0),
))
register_model(ModelEntry(
    name="mobilenet-v2", description="MobileNetV2 width 1.0, pretrained on ImageNet",
    build=_build_mobilenet_v2, input_shape=(3, 224, 224), num_classes=1000,
    load_pretrained=_load_mobilenet_v2,
))
register_model(ModelEntry(
    name="minilm", description="all-MiniLM-L6-v2 sentence encoder (mean-pooled, 384-d)",
    build=_build_minilm, input_shape=(128,), num_classes=384, input_kind="tokens",
    vocab_size=30522, load_pretrained=_load_minilm,
))

