"""Compression methods, one module each; these explicit imports register them."""
from . import asvd, saes_svd, svd, svd_llm, welore  # noqa: F401  (training-free low-rank family)
from . import dsformer, maestro, prune  # noqa: F401  (dense x sparse, ordered low rank, pruning)
