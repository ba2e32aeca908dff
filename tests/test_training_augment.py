"""Random shifts (Hinton's jitter): exact translations, seeded, and wired into the trainer."""

import pytest
import torch

from torchslim.data import TensorLoader, load_dataset
from torchslim.errors import ConfigError
from torchslim.models import create_model
from torchslim.training import Trainer, make_train_config
from torchslim.training.augment import random_shift


def test_every_image_is_an_exact_translation_within_the_limit() -> None:
    images = torch.full((64, 1, 9, 9), -0.5)
    images[:, 0, 4, 4] = 3.0  # one bright pixel in the centre of each image
    moved = random_shift(images, 2, generator=torch.Generator().manual_seed(0))
    assert moved.shape == images.shape
    assert torch.equal(moved.amin(dim=(1, 2, 3)), images.amin(dim=(1, 2, 3)))  # background fill
    rows, cols = (moved[:, 0] == 3.0).nonzero()[:, 1:].T
    assert len(rows) == 64  # the pixel never leaves the frame
    offsets = set(zip((rows - 4).tolist(), (cols - 4).tolist(), strict=True))
    assert offsets <= {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}
    assert len(offsets) > 15  # the 25 offsets are drawn, not one


def test_shifts_follow_the_generator() -> None:
    images = torch.randn(16, 1, 8, 8)
    first = random_shift(images, 1, generator=torch.Generator().manual_seed(3))
    again = random_shift(images, 1, generator=torch.Generator().manual_seed(3))
    other = random_shift(images, 1, generator=torch.Generator().manual_seed(4))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert random_shift(images, 0, generator=torch.Generator()) is images


@pytest.mark.parametrize(("batch", "pixels", "message"), [
    (torch.zeros(4, 64), 1, "height, width"),
    (torch.zeros(2, 1, 8, 8), 8, r"shift must be in \[0, 7\]"),
])
def test_bad_batches_and_sizes_are_refused(batch, pixels, message) -> None:
    with pytest.raises(ConfigError, match=message):
        random_shift(batch, pixels, generator=torch.Generator())


def test_the_trainer_shifts_training_batches_only_when_asked() -> None:
    data = load_dataset("digits")
    loader = TensorLoader(data.train, batch_size=64, shuffle=True)

    def trained(shift: int) -> torch.Tensor:
        torch.manual_seed(0)
        model = create_model("mlp-800-800", input_shape=(1, 8, 8), pretrained=False)
        Trainer(model, loader, config=make_train_config(epochs=1, lr=0.05, shift=shift),
                progress=False).fit()
        return model.fc1.weight.detach().clone()

    plain, shifted, again = trained(0), trained(1), trained(1)
    assert not torch.equal(plain, shifted)  # the option reached the batches
    assert torch.equal(shifted, again)  # seeded: the same shifts every run
    with pytest.raises(ConfigError, match="shift"):
        make_train_config(shift=-1)
