"""Training-time augmentation on whole batches of image tensors.

Only what a recipe can name: random shifts ("jitter", Hinton et al. 2015 trained their MNIST
teacher on digits translated by up to two pixels). It works on a whole (B, C, H, W) batch with
one slice per distinct offset, not one Python call per image, so it costs little beside the
model on one CPU thread.
"""

from __future__ import annotations

import torch

from torchslim.errors import ConfigError

__all__ = ["random_shift"]


def random_shift(images: torch.Tensor, pixels: int, *, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by its own random offset of -`pixels`..`pixels` in x and in y.

    What is shifted in from outside the frame is the image's own smallest value: the background
    of a normalised digit (black), not 0, which after normalisation is a grey.

    Args:
        images: a (B, C, H, W) float batch.
        pixels: the largest shift, >= 0 (0 returns `images` unchanged).
        generator: the random source (seeded per epoch by the trainer, so a resumed run sees
            the shifts an uninterrupted one would).

    Raises:
        ConfigError: the batch is not (B, C, H, W) floats, or `pixels` is negative or at least
            the image size.

    Example:
        >>> image = torch.zeros(1, 1, 5, 5); image[0, 0, 2, 2] = 1.0
        >>> moved = random_shift(image, 1, generator=torch.Generator().manual_seed(0))
        >>> float(moved.sum()), tuple(moved.shape)
        (1.0, (1, 1, 5, 5))
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ConfigError(f"shift (random translation) needs (batch, channels, height, width) float "
                          f"image batches, got {shape}; drop `shift` for this data")
    batch, channels, height, width = images.shape
    if pixels < 0 or pixels >= min(height, width):
        raise ConfigError(f"shift must be in [0, {min(height, width) - 1}] pixels for "
                          f"{height}x{width} images, got {pixels}")
    if pixels == 0 or batch == 0:
        return images
    side = 2 * pixels + 1
    fill = images.amin(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1): each image's background
    padded = fill.expand(batch, channels, height + 2 * pixels, width + 2 * pixels).clone()
    padded[:, :, pixels:pixels + height, pixels:pixels + width] = images
    offsets = torch.randint(0, side * side, (batch,), generator=generator, device="cpu")
    offsets = offsets.to(images.device)
    shifted = torch.empty_like(images)
    for code in offsets.unique().tolist():
        rows = (offsets == code).nonzero().squeeze(1)
        dy, dx = divmod(int(code), side)  # window origin in the padded image: shift = pixels - d
        shifted[rows] = padded[rows, :, dy:dy + height, dx:dx + width]
    return shifted
