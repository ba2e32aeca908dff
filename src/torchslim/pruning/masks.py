"""Pure mask math for unstructured pruning: scores in, boolean keep-masks out.

Nothing here touches an `nn.Module`: every function maps tensors to tensors, so the criteria
are testable on their own and shared by one-shot, iterative, gradual and global pruning.
A mask is `True` where the weight is kept.
"""

from __future__ import annotations

import torch

from torchslim.errors import ConfigError

__all__ = [
    "activation_scores",
    "check_sparsity",
    "global_masks",
    "magnitude_scores",
    "mask_by_sparsity",
    "mask_by_threshold",
    "random_scores",
    "std_threshold",
    "taylor_scores",
]


def check_sparsity(sparsity: float, *, name: str = "sparsity") -> float:
    """Return `sparsity` if it is a fraction in [0, 1), else raise `ConfigError`."""
    if not isinstance(sparsity, int | float) or not 0.0 <= float(sparsity) < 1.0:
        raise ConfigError(f"{name} must be a fraction in [0, 1), got {sparsity!r} "
                          "(0.9 removes 90% of the weights)")
    return float(sparsity)


def magnitude_scores(weight: torch.Tensor, *, norm: int = 1) -> torch.Tensor:
    """|w| (norm=1) or w² (norm=2): the same ranking per element, kept apart for group norms."""
    return weight.detach().abs() if norm == 1 else weight.detach().pow(2)


def random_scores(weight: torch.Tensor, *, seed: int) -> torch.Tensor:
    """Uniform random scores: the baseline every criterion must beat."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(weight.shape, generator=generator)


def taylor_scores(weight: torch.Tensor, grad_abs_sum: torch.Tensor) -> torch.Tensor:
    """First-order Taylor importance |w·∂L/∂w|, with the gradient magnitude summed over batches."""
    return (weight.detach() * grad_abs_sum).abs()


def activation_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """|w| scaled by the L2 norm of the input feature it multiplies (Wanda, Sun et al. 2023).

    `input_norm` has one entry per input feature (Linear) or input channel (Conv), shape (in,).
    """
    shape = [1, -1] + [1] * (weight.dim() - 2)  # (1, in, 1, 1) for conv kernels
    return weight.detach().abs() * input_norm.reshape(shape)


def mask_by_threshold(weight: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep `|w| > threshold` (Han et al. 2015: w_new = w · 1[|w| > θ])."""
    return weight.detach().abs() > threshold


def std_threshold(weight: torch.Tensor, multiple: float) -> float:
    """θ = multiple · std(w), the per-layer quality parameter of Han et al. 2015."""
    if multiple < 0:
        raise ConfigError(f"std_multiple must be >= 0, got {multiple}")
    return float(multiple * weight.detach().float().std())


def mask_by_sparsity(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the `1 - sparsity` fraction of entries with the highest scores (ties: lowest index).

    Example:
        >>> mask_by_sparsity(torch.tensor([0.1, 3.0, -0.5, 2.0]).abs(), 0.5).tolist()
        [False, True, False, True]
    """
    check_sparsity(sparsity)
    flat = scores.reshape(-1)
    keep = flat.numel() - round(sparsity * flat.numel())
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    if keep > 0:
        mask[torch.topk(flat, keep, sorted=False).indices] = True
    return mask.reshape(scores.shape)


def global_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One ranking across all layers: the lowest-scoring `sparsity` fraction of all weights goes.

    Scores must be comparable across layers (e.g. magnitudes of similarly scaled layers).
    """
    check_sparsity(sparsity)
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    joint = mask_by_sparsity(flat, sparsity)
    masks, start = {}, 0
    for name, score in scores.items():
        masks[name] = joint[start:start + score.numel()].reshape(score.shape)
        start += score.numel()
    return masks
