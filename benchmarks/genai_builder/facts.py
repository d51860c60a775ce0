"""What a genai model folder holds: the decoder model its ``genai_config.json`` names, the
model's shape as that file gives it, and the model's node and op counts, initializers and file
sizes."""
from __future__ import annotations

import json
from pathlib import Path

from sparseinfer.reference.errors import SparseInferError

GENAI_CONFIG = "genai_config.json"


def model_file(folder) -> Path:
    """The decoder model a genai folder names (``genai_config.json``'s decoder filename)."""
    folder = Path(folder)
    cfg_path = folder / GENAI_CONFIG
    if not cfg_path.is_file():
        raise SparseInferError(f"{folder}: no {GENAI_CONFIG} (not an onnxruntime-genai model folder)")
    try:
        name = json.loads(cfg_path.read_text())["model"]["decoder"]["filename"]
    except (ValueError, KeyError, TypeError):
        raise SparseInferError(f"{cfg_path}: no model.decoder.filename") from None
    path = folder / name
    if not path.is_file():
        raise SparseInferError(f"{cfg_path} names {name}, which is not in {folder}")
    return path


SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers")


def decoder_shape(folder) -> dict:
    """The model's shape in a genai folder's ``genai_config.json`` (``SHAPE_FIELDS``; the
    vocabulary's size is the model's, the others the decoder's); a field missing is None."""
    model_file(folder)                                   # a genai folder, or a one-line error
    cfg = json.loads((Path(folder) / GENAI_CONFIG).read_text())["model"]
    return {key: cfg.get(key, cfg["decoder"].get(key)) for key in SHAPE_FIELDS}


def model_facts(folder) -> dict:
    """Node count (per layer too), op counts, initializer bytes and file sizes of a genai folder's model."""
    import onnx

    path = model_file(folder)
    proto = onnx.load(str(path), load_external_data=False)
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        key = f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        ops[key] = ops.get(key, 0) + 1
    cfg = json.loads((Path(folder) / GENAI_CONFIG).read_text())
    layers = int(cfg["model"]["decoder"]["num_hidden_layers"])
    files = {p.name: p.stat().st_size for p in sorted(Path(folder).iterdir())
             if p.is_file() and (p == path or p.name.startswith(path.name + ".") or p.name.startswith(path.stem + ".onnx"))}
    external = {init.name for init in proto.graph.initializer if init.data_location == onnx.TensorProto.EXTERNAL}
    return {"folder": str(folder), "model": path.name, "nodes": len(proto.graph.node), "layers": layers,
            "nodes_per_layer": round(len(proto.graph.node) / layers, 2) if layers else None,
            "initializers": len(proto.graph.initializer), "initializers_external": len(external),
            "op_counts": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
            "files_bytes": files, "model_bytes": sum(files.values()),
            "kv_cache_shared": bool(json.loads((Path(folder) / GENAI_CONFIG).read_text())["search"].get(
                "past_present_share_buffer", False)),
            "context_length": int(cfg["model"].get("context_length", 0))}
