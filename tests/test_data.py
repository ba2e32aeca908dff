import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from torchslim.data import TensorLoader, load_dataset
from torchslim.data.sources import FASHION_MNIST_ENV, read_idx
from torchslim.errors import ConfigError, DataError


def test_digits_splits_are_disjoint_sized_and_normalised_on_train(digits) -> None:
    assert (len(digits.train), len(digits.val), len(digits.test)) == (1372, 125, 300)
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 10
    # normalisation constants come from the training split, so it is standardised
    assert abs(float(digits.train.images.mean())) < 1e-4
    assert abs(float(digits.train.images.std()) - 1) < 1e-3
    train_rows = {row.tobytes() for row in digits.train.images.numpy()}
    overlap = sum(row.tobytes() in train_rows for row in digits.val.images.numpy())
    assert overlap <= 2  # a couple of genuinely duplicated digits at most


def test_validation_split_depends_on_seed_only(digits) -> None:
    again = load_dataset("digits", seed=0)
    other = load_dataset("digits", seed=1)
    assert torch.equal(again.val.labels, digits.val.labels)
    assert not torch.equal(other.val.images, digits.val.images)


def test_loader_visits_every_sample_once_in_a_seeded_epoch_order(digits) -> None:
    loader = TensorLoader(digits.train, batch_size=100, shuffle=True, seed=3)
    loader.set_epoch(0)
    first = torch.cat([labels for _, labels in loader])
    assert len(loader) == 14 and first.numel() == len(digits.train)
    assert torch.equal(first.sort().values, digits.train.labels.sort().values)
    again = torch.cat([labels for _, labels in loader])
    loader.set_epoch(1)
    second = torch.cat([labels for _, labels in loader])
    assert torch.equal(first, again) and not torch.equal(first, second)
    loader.set_epoch(0)
    taken = loader.take(3)
    assert len(taken) == 3 and torch.equal(torch.cat([labels for _, labels in taken]), first[:300])
    assert len(loader.take(100)) == 14  # a short loader gives what it has


def test_mnist_loads_from_its_package() -> None:
    mnist = load_dataset("mnist")
    assert (len(mnist.train), len(mnist.val), len(mnist.test)) == (55000, 5000, 10000)
    assert abs(mnist.mean - 0.1307) < 1e-3 and abs(mnist.std - 0.3081) < 1e-3
    assert mnist.test.images.shape == (10000, 1, 28, 28)
    assert set(mnist.test.labels.unique().tolist()) == set(range(10))


def test_fashion_mnist_loads_when_installed() -> None:
    try:
        data = load_dataset("fashion-mnist")
    except DataError as exc:
        pytest.skip(str(exc))
    assert (len(data.train), len(data.test)) == (55000, 10000)
    assert data.input_shape == (1, 28, 28)


def test_missing_fashion_mnist_names_the_install_command(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path))
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        load_dataset("fashion-mnist")


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_idx_reader_parses_and_rejects_truncated_files(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "ok.gz", array)
    assert np.array_equal(read_idx(tmp_path / "ok.gz"), array)
    _write_idx(tmp_path / "short.gz", array)
    data = gzip.decompress((tmp_path / "short.gz").read_bytes())[:-3]
    (tmp_path / "short.gz").write_bytes(gzip.compress(data))
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "short.gz")


def test_bad_names_and_values_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="known datasets: digits, fashion-mnist, mnist"):
        load_dataset("cifar10")
    with pytest.raises(ConfigError, match="val_fraction"):
        load_dataset("digits", val_fraction=1.5)
