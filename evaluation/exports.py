"""The rows of a Table II/III run and their exports, each made once and cached.

A row is ``dense``, ``sparse`` at an α schedule (the predictor baked into the export), or
``random`` at a sparsity S: the paper's control, here a *fixed* random mask per layer —
a fraction S of each MLP's rows (gate and up rows, down columns) set to zero in the
weights, then a dense export. The same rows are dropped at every position, prefill
included; a per-token random mask on decode only would need a random predictor inside
the export (not available).

An export lives in ``<root>/<slug>/model.onnx`` with ``key.json`` beside it: the
checkpoint's files (path, size, mtime), the row, the target and a hash of the exporter's
sources. ``key.json`` is written last, so an interrupted export is redone; any change of
key re-exports.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparseinfer.reference.alpha import AlphaSchedule
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.files import write_json

EXPORTER_SOURCES = ("export.py", "onnx_builder.py", "mlp_functions.py", "checkpoint.py", "gguf_loader.py",
                    "tokenizer.py")


@dataclass(frozen=True)
class Row:
    kind: str                         # dense | sparse | random
    alpha: str | None = None          # sparse: the α schedule as given
    random: float | None = None       # random: the fraction of rows dropped
    seed: int = 0

    @property
    def label(self) -> str:
        if self.kind == "sparse":
            return f"α {self.alpha}"
        if self.kind == "random":
            return f"random {self.random:.2f}"
        return "dense"

    @property
    def slug(self) -> str:
        if self.kind == "sparse":
            return "alpha-" + self.alpha.replace(",", "_").replace("@", "at")
        if self.kind == "random":
            return f"random-{self.random:g}-seed{self.seed}"
        return "dense"

    def as_dict(self) -> dict:
        return {"kind": self.kind, "alpha": self.alpha, "random": self.random, "seed": self.seed,
                "label": self.label}


def parse_alpha(spec: str, num_layers: int | None = None) -> str:
    """α schedule as given, after checking it parses (and, with ``num_layers``, fits the model)."""
    schedule = AlphaSchedule.parse(spec)
    if num_layers is not None:
        schedule.check_layers(num_layers)
    return str(spec).strip()


def make_rows(alphas=(), random: float | None = None, seed: int = 0, num_layers: int | None = None) -> list[Row]:
    """dense first, then each α in order, then the random control; bad values are one-line errors."""
    rows = [Row("dense")]
    for spec in alphas:
        row = Row("sparse", alpha=parse_alpha(spec, num_layers))
        if row not in rows:
            rows.append(row)
    if random is not None:
        if not 0.0 < float(random) < 1.0:
            raise SparseInferError(f"--random {random}: expected a sparsity between 0 and 1 (e.g. 0.9)")
        rows.append(Row("random", random=float(random), seed=seed))
    return rows


def drop_random_rows(weights, fraction: float, seed: int = 0):
    """A copy of ``weights`` with ``round(fraction * k)`` random MLP rows of each layer zeroed
    (gate and up rows, down columns; an own draw per layer)."""
    rng = np.random.default_rng(seed)
    layers = []
    for lw in weights.layers:
        k = lw.gate.shape[0]
        drop = rng.choice(k, size=int(round(fraction * k)), replace=False)
        gate, up, down = (np.array(a, copy=True) for a in (lw.gate, lw.up, lw.down))
        gate[drop] = 0
        up[drop] = 0
        down[:, drop] = 0
        layers.append(dataclasses.replace(lw, gate=gate, up=up, down=down))
    tied = weights.lm_head is weights.embed
    out = dataclasses.replace(weights, layers=layers)
    if tied:
        out.lm_head = out.embed
    return out


def source_hash() -> str:
    """Hash of the exporter's sources: an export made by other code is made again."""
    import sparseinfer.model_export as me

    h = hashlib.sha256()
    root = Path(me.__file__).parent
    for name in EXPORTER_SOURCES:
        path = root / name
        h.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b""))
    return h.hexdigest()[:16]


def checkpoint_identity(checkpoint) -> list:
    path = Path(checkpoint).resolve()
    if not path.exists():
        raise SparseInferError(f"no such checkpoint: {checkpoint}")
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return [str(path)] + [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def export_key(checkpoint, row: Row, target: str) -> dict:
    return {"checkpoint": checkpoint_identity(checkpoint), "row": row.as_dict(), "target": target,
            "exporter": source_hash()}


def export_root(cache_dir, checkpoint) -> Path:
    """Where a checkpoint's row exports go under ``cache_dir``: its name and a hash of its path."""
    path = Path(checkpoint).resolve()
    return Path(cache_dir) / f"{path.name}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


def is_checkpoint(path) -> bool:
    p = Path(path)
    return (p.is_file() and p.suffix.lower() == ".gguf") or (p.is_dir() and (p / "config.json").is_file())


def ensure_export(checkpoint, row: Row, root, target: str = "cpu", loaded=None,
                  log=None, debug: bool = False) -> Path:
    """The row's model.onnx under ``root``, exported now unless a matching one is cached.
    ``loaded``: a callable returning the loaded checkpoint (so it is read at most once);
    ``debug``: an export with the per-layer debug outputs (masks; part of the key)."""
    from sparseinfer.model_export.export_folder import export_checkpoint

    out = Path(root) / row.slug
    key = export_key(checkpoint, row, target)
    if debug:
        key["debug"] = True
    key_file = out / "key.json"
    model = out / "model.onnx"
    if model.is_file() and key_file.is_file():
        try:
            if json.loads(key_file.read_text()) == key:
                return model
        except json.JSONDecodeError:
            pass
    if key_file.exists():
        key_file.unlink()
    ck = loaded() if loaded else None
    if ck is None:
        from sparseinfer.model_export.checkpoint import load_checkpoint
        ck = load_checkpoint(checkpoint)
    if row.kind == "sparse":
        AlphaSchedule.parse(row.alpha).check_layers(ck.shape.num_layers)
    if log:
        log(f"exporting {row.label} -> {model}")
    source = ck
    if row.kind == "random":
        source = dataclasses.replace(ck, weights=drop_random_rows(ck.weights, row.random, row.seed))
    export_checkpoint(source, model, sparse=row.kind == "sparse", alpha=row.alpha or "1.00", target=target,
                      debug=debug)
    write_json(key_file, key, indent=1)
    return model
