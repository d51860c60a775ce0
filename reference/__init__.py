"""NumPy reference of the SparseInfer predictor and the gated MLP (bit-exact contract).

The accumulation order that the GPU kernels follow is defined in ``order_contract``.
"""
from .activations import Activation
from .alpha import AlphaSchedule
from .errors import SparseInferError
from .mlp import MODES, MLPTrace, check_mlp_inputs, mlp_dense, mlp_sparse
from .order_contract import (down_projection, down_projection_error_bound, exact_rows,
                             rigorous_error_bound, vector_width, warp_dot_rows)
from .signs import (alpha_to_milli, negative_product_counts, pack_signs, predict_zero_rows,
                    words_per_row, zero_rows_from_counts)

__all__ = [
    "Activation", "AlphaSchedule", "SparseInferError", "MODES", "MLPTrace", "check_mlp_inputs",
    "mlp_dense", "mlp_sparse", "down_projection", "down_projection_error_bound", "exact_rows",
    "rigorous_error_bound", "vector_width", "warp_dot_rows", "alpha_to_milli",
    "negative_product_counts", "pack_signs", "predict_zero_rows", "words_per_row",
    "zero_rows_from_counts",
]
