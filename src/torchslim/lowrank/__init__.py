"""Low-rank factorization of Linear layers and decomposition of convolutions.

`LowRank` splits `Linear(m->n)` into two thinner Linears from a truncated SVD;
`ConvDecomposition` replaces k x k convs by Tucker-2, spatially separable or depthwise-separable
chains. Both record a structural edit, so the changed model saves and loads without pickle.
"""

from torchslim.lowrank.conv import ConvDecomposition, ConvMethod, DecomposedConv, decompose_conv
from torchslim.lowrank.linear import FactorizedLinear, LowRank, factorize_linear
from torchslim.lowrank.ranks import break_even_rank, energy_rank, param_ratio_rank, svd_factors

__all__ = ["ConvDecomposition", "ConvMethod", "DecomposedConv", "FactorizedLinear", "LowRank",
           "break_even_rank", "decompose_conv", "energy_rank", "factorize_linear",
           "param_ratio_rank", "svd_factors"]
