"""Pure math of low-rank factorization: truncated SVD factors and how to pick a rank.

No modules here: these functions take and return tensors and integers, so the numerics are
tested on their own. `torchslim.lowrank.linear` and `.conv` do the module surgery.
"""

from __future__ import annotations

import math

import torch

from torchslim.errors import ConfigError

__all__ = ["break_even_rank", "energy_rank", "param_ratio_rank", "svd_factors"]


def svd_factors(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-`rank` approximation `matrix ≈ left @ right` (Eckart-Young).

    The singular values are split evenly (sqrt on each side) so both factors have similar scale,
    which keeps fine-tuning of the two new layers well conditioned.

    Args:
        matrix: `(n, m)`.
        rank: 1 <= rank <= min(n, m).

    Returns:
        `left (n, rank)`, `right (rank, m)`, float32.

    Example:
        >>> w = torch.randn(6, 4)
        >>> left, right = svd_factors(w, 4)
        >>> bool(torch.allclose(left @ right, w, atol=1e-5))
        True
    """
    rows, cols = matrix.shape
    check_rank(rank, rows, cols)
    u, s, vh = torch.linalg.svd(matrix.detach().double(), full_matrices=False)
    root = s[:rank].sqrt()
    left = u[:, :rank] * root  # (n, r) * (r,)
    right = root[:, None] * vh[:rank]  # (r, 1) * (r, m)
    return left.float().contiguous(), right.float().contiguous()


def check_rank(rank: int, rows: int, cols: int, *, name: str = "rank") -> None:
    """Raise `ConfigError` unless 1 <= rank <= min(rows, cols)."""
    if not 1 <= rank <= min(rows, cols):
        raise ConfigError(f"{name}={rank} is out of range for a {rows}x{cols} matrix; valid: "
                          f"1..{min(rows, cols)}")


def energy_rank(singular: torch.Tensor, energy: float) -> int:
    """Smallest r whose top singular values keep `energy` of the squared sum (Frobenius²).

    Example:
        >>> energy_rank(torch.tensor([3.0, 1.0, 0.1]), 0.8)   # 9 / 10.01 of the energy
        1
        >>> energy_rank(torch.tensor([3.0, 1.0, 0.1]), 1.0)
        3
    """
    if not 0 < energy <= 1:
        raise ConfigError(f"energy={energy} is out of range; valid: (0, 1]")
    squares = singular.double().square()
    cumulative = squares.cumsum(0) / squares.sum().clamp_min(1e-300)
    # A tolerance so energy=1.0 does not demand more than every value because of rounding.
    return min(int((cumulative < energy - 1e-12).sum()) + 1, singular.numel())


def break_even_rank(rows: int, cols: int) -> int:
    """The largest rank at which `Linear(m->r) ∘ Linear(r->n)` has fewer weights than `n x m`.

    Example:
        >>> break_even_rank(100, 100)   # 49 * 200 = 9,800 < 10,000; 50 * 200 is not smaller
        49
    """
    return (rows * cols - 1) // (rows + cols)


def param_ratio_rank(rows: int, cols: int, ratio: float) -> int:
    """The largest rank whose two factors keep at most `ratio` of the `rows x cols` weights."""
    if not 0 < ratio < 1:
        raise ConfigError(f"param_ratio={ratio} is out of range; valid: (0, 1)")
    return max(1, math.floor(ratio * rows * cols / (rows + cols)))
