"""Old import path of dsformer's packed layer; it lives in `compressor.layers.dense_sparse`."""

from ..layers.dense_sparse import DenseSparseLinear

__all__ = ["DenseSparseLinear"]
