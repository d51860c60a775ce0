"""Hugging Face checkpoint folders: ``config.json`` and ``model.safetensors``, or the shards
that ``model.safetensors.index.json`` lists (any ``*.safetensors`` without either), and
``tokenizer.json`` when present.

The config is checked first (``config.check_config``), then every safetensors header
(``safetensors_header``), then that the tensors present are exactly those the config implies
(``tensors``); the tensors are read one at a time as ``weights.assemble`` asks for them.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

from sparseinfer.reference.dtypes import dtype_name
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.shapes import ModelShape, read_config

from ..tokenizer import load_tokenizer_json
from .config import check_config, token_ids
from .names import EMBEDDING, tensor_names
from .safetensors_header import check_data_tiled, check_safetensors_header
from .tensors import check_no_extra_tensors, check_tensors_present, layer_window
from .weights import Checkpoint, OpenCheckpoint, load_whole

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def _require_regular_file(p: Path, what: str) -> None:
    if not p.is_file():
        raise SparseInferError(f"{p}: {'a directory' if p.is_dir() else 'not a regular file'}, not {what}")


def _safetensor_files(root: Path) -> list[Path]:
    index = root / INDEX_FILE
    if index.exists():
        _require_regular_file(index, "a shard index")
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SparseInferError(f"cannot read {index}: {e}") from None
        files = [root / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.exists():
                raise SparseInferError(f"{root}: shard {f.name} listed in {INDEX_FILE} is missing")
    elif (root / SINGLE_FILE).exists():
        files = [root / SINGLE_FILE]
    else:
        files = sorted(root.glob("*.safetensors"))
        if not files:
            raise SparseInferError(f"{root}: no model.safetensors, {INDEX_FILE} or *.safetensors found")
    for f in files:
        _require_regular_file(f, "a safetensors file")
    return files


@contextlib.contextmanager
def _safetensors_reader(files: list[Path], shape: ModelShape, source: str):
    """``get(name) -> ndarray | None`` over the files, each tensor read when asked (so a
    checkpoint is in memory once, not its files' bytes and then its arrays), the set of
    dtypes read so far (bf16 arrives as ml_dtypes.bfloat16) and every stored tensor's shape.
    The headers are checked first, then that each name the config implies is there (and no
    other), then the data's tiling (``check_data_tiled``)."""
    from safetensors import SafetensorError, safe_open

    errors = (SafetensorError, OSError, ValueError, TypeError)
    headers = [check_safetensors_header(f) for f in files]
    shapes = {name: dims for h in headers for name, dims in h.shapes.items()}
    window = layer_window(shape.num_layers, shapes)
    expected = tensor_names(shape, window)
    check_tensors_present(expected, shapes, source, absent_layers=shape.num_layers - window)
    check_no_extra_tensors(expected, shapes, source, tied=shape.tie_word_embeddings)
    for h in headers:
        check_data_tiled(h)
    with contextlib.ExitStack() as stack:
        where = {}
        for f in files:
            try:
                handle = stack.enter_context(safe_open(str(f), framework="np"))
                where.update(dict.fromkeys(handle.keys(), (f, handle)))
            except errors as e:
                raise SparseInferError(f"cannot read {f}: {e}") from None
        dtypes = set()

        def get(name):
            if name not in where:
                return None
            f, handle = where[name]
            try:
                a = handle.get_tensor(name)
            except errors as e:
                raise SparseInferError(f"cannot read {f}: {e}") from None
            dtypes.add(dtype_name(a.dtype))
            return a

        yield get, dtypes, shapes


@contextlib.contextmanager
def open_hf_checkpoint(path):
    """The checkpoint as an ``OpenCheckpoint`` (config, headers, tensor names, special tokens and
    tokenizer checked; tensors read when asked) while the files are open."""
    root = Path(path)
    if not root.exists():
        raise SparseInferError(f"no such checkpoint: {root}")
    if not root.is_dir():
        raise SparseInferError(f"{root}: expected a checkpoint directory (config.json + *.safetensors) or a .gguf file")
    cfg = read_config(root)
    config_name = str(root / "config.json")
    shape = check_config(cfg, config_name)
    with _safetensors_reader(_safetensor_files(root), shape, str(root)) as (get, dtypes, shapes):
        embedding = shapes[EMBEDDING]
        ids = token_ids(cfg, shape.vocab_size, config_name, embedding[0] if embedding else None)
        tok = load_tokenizer_json(root / "tokenizer.json") if (root / "tokenizer.json").is_file() else None
        yield OpenCheckpoint(shape, tok, str(root), get, **ids, stored_dtypes=dtypes)


def load_hf_checkpoint(path) -> Checkpoint:
    return load_whole(open_hf_checkpoint(path))
