"""Simulators: operation and memory counts (Table I), hardware latency (model shapes: reference.shapes)."""
from sparseinfer.reference.shapes import BUILTIN_MODELS, ModelShape, from_hf_config, load_model
from .ops import ops_per_layer, ops_per_token, predictor_memory_mib, table1

__all__ = ["BUILTIN_MODELS", "ModelShape", "from_hf_config", "load_model", "ops_per_layer",
           "ops_per_token", "predictor_memory_mib", "table1"]
