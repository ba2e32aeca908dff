"""Datasets that ship inside packages (MNIST, Fashion-MNIST, digits), split train/val/test."""

from torchslim.data.loader import (
    Dataset,
    Split,
    TensorLoader,
    dataset_names,
    load_dataset,
)

__all__ = ["Dataset", "Split", "TensorLoader", "dataset_names", "load_dataset"]
