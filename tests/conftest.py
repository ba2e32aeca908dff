import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits():
    from torchslim.data import load_dataset

    return load_dataset("digits")
