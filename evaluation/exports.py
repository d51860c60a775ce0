"""The rows of a Table II/III run and their exports, each made once and cached.

A row is ``dense``, ``sparse`` at an α schedule (the predictor baked into the export),
``random`` at a sparsity S — a *fixed* random mask per layer: a fraction S of each MLP's
rows (gate and up rows, down columns) set to zero in the weights, then a dense export, so
the same rows are dropped at every position, prefill included — or ``method``: any
``methods.registry`` method at a target sparsity, which no export carries; those rows decode on
the NumPy reference model (``method_backend``) and have no export. ``method`` ``random``
is the paper's own control: a fresh random row mask per token at each decode step. An export
row may be block-quantized (``quantize``: q8_0, q4_0, q4_1; ``export --quantize``): its label,
folder and key then name the format; a float32 row's are what they were before formats existed.

An export lives in ``<root>/<slug>/model.onnx`` with ``key.json`` beside it: the
checkpoint's files (path, size, mtime), the row, the target and a hash of the sources an
export depends on (``export_sources``: every module the exporter imports, found from the
code). ``key.json`` is written last, so an interrupted export is redone; any change of key
re-exports. What a quantized export converted (its ``note`` lines) is kept beside it in
``notes.json`` and told again when the cached export is reused.
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

from .export_sources import source_hash

@dataclass(frozen=True)
class Row:
    kind: str                         # dense | sparse | random | method
    alpha: str | None = None          # sparse: the α schedule as given
    random: float | None = None       # random: the fraction of rows dropped (a fixed mask)
    seed: int = 0
    method: str | None = None         # method: a methods.registry name
    sparsity: float | None = None     # method: its target sparsity
    params: tuple = ()                # method: sorted (key, value) pairs of its parameters
    quantize: str | None = None       # dense | sparse | random: the export's block format (None: float weights)

    def _named(self, by_kind: dict, sep: str) -> str:
        """``by_kind[kind]()`` ("dense" for a kind not in it), then the block format after ``sep``."""
        base = by_kind.get(self.kind, lambda: "dense")()
        return f"{base}{sep}{self.quantize}" if self.quantize else base

    @property
    def label(self) -> str:
        return self._named({"sparse": lambda: f"α {self.alpha}",
                            "random": lambda: f"random {self.random:.2f} fixed mask",
                            "method": self._method_label}, " ")

    def _method_label(self) -> str:
        extra = ["per token"] if self.method == "random" else []
        extra += [f"{k}={v}" for k, v in self.params]
        return f"{self.method}@{self.sparsity:g}" + (f" ({', '.join(extra)})" if extra else "")

    @property
    def slug(self) -> str:
        return self._named({"sparse": lambda: "alpha-" + self.alpha.replace(",", "_").replace("@", "at"),
                            "random": lambda: f"random-{self.random:g}-seed{self.seed}",
                            "method": self._method_slug}, "-")

    def _method_slug(self) -> str:
        tail = hashlib.sha256(repr(self.params).encode()).hexdigest()[:8] if self.params else ""
        return f"method-{self.method}-{self.sparsity:g}" + (f"-{tail}" if tail else "")

    @property
    def engine(self) -> str:
        return "numpy reference" if self.kind == "method" else "onnxruntime"

    def as_dict(self) -> dict:
        out = {"kind": self.kind, "alpha": self.alpha, "random": self.random, "seed": self.seed,
               "label": self.label}
        if self.kind == "method":
            out.update(method=self.method, sparsity=self.sparsity, params=dict(self.params), engine=self.engine)
        if self.quantize:                     # (float rows as before: their keys and caches stay valid)
            out["quantize"] = self.quantize
        return out


def parse_alpha(spec: str, num_layers: int | None = None) -> str:
    """α schedule as given, after checking it parses (and, with ``num_layers``, fits the model)."""
    schedule = AlphaSchedule.parse(spec)
    if num_layers is not None:
        schedule.check_layers(num_layers)
    return str(spec).strip()


def method_row(name: str, sparsity, params: dict | None = None) -> Row:
    """A ``method`` row: the name and the parameters checked by ``methods.registry`` (one-line errors)."""
    from sparseinfer.methods.base import check_sparsity
    from sparseinfer.methods.registry import check_method_name, make_method

    name = check_method_name(name)
    target = check_sparsity(sparsity, f"--method {name}: sparsity")
    params = {str(k): str(v) for k, v in (params or {}).items()}
    make_method(name, params)                         # unknown or malformed parameters fail here
    return Row("method", method=name, sparsity=target, params=tuple(sorted(params.items())))


def parse_method_rows(methods=(), sparsities=(), params: dict | None = None, approximate: bool = False) -> list[Row]:
    """``--method NAME[@S]`` (repeatable) with ``--sparsity S[,S...]`` (repeatable): a row per
    method and target — a method's own ``@S``, else every ``--sparsity`` value. ``params``:
    {method: {key: value}} (``methods.registry.parse_param_options``); the sign predictor is aimed
    at its target (α calibrated per layer, ``alpha=auto``) unless a schedule is given;
    ``approximate`` allows the sign predictor (sparseinfer, cluster) on a SiLU model."""
    from sparseinfer.methods.base import parse_sparsities
    from sparseinfer.methods.registry import COMPARE_DEFAULT_PARAMS, METHODS, check_method_name

    params = params or {}
    targets = [s for text in sparsities for s in parse_sparsities(text)]
    rows, named = [], set()
    for spec in methods:
        name, at, own = str(spec).partition("@")
        name = check_method_name(name)
        named.add(name)
        wanted = parse_sparsities(own) if at else targets
        if not wanted:
            raise SparseInferError(f"--method {name} needs a target sparsity: --sparsity S or --method {name}@S")
        for s in wanted:
            given = {**COMPARE_DEFAULT_PARAMS.get(name, {}), **params.get(name, {})}
            if approximate and "approximate" in METHODS[name].PARAMS:       # as methods.registry.make_method
                given.setdefault("approximate", "true")
            row = method_row(name, s, given)
            if row not in rows:
                rows.append(row)
    if sparsities and not methods:
        raise SparseInferError("--sparsity is the target of a --method; give --method NAME too")
    unused = sorted(set(params) - named)
    if unused:
        raise SparseInferError(f"--param names {unused[0]}, which is not a --method")
    return rows


def make_rows(alphas=(), random: float | None = None, seed: int = 0, num_layers: int | None = None,
              methods=(), quantize: str | None = None) -> list[Row]:
    """dense first, then each α in order, then the fixed-mask random control, then the
    ``method`` rows; bad values are one-line errors. ``quantize``: the block format of the
    export rows (the ``method`` rows have no export)."""
    quantize = check_quantize_name(quantize)
    rows = [Row("dense", quantize=quantize)]
    for spec in alphas:
        row = Row("sparse", alpha=parse_alpha(spec, num_layers), quantize=quantize)
        if row not in rows:
            rows.append(row)
    if random is not None:
        if not 0.0 < float(random) < 1.0:
            raise SparseInferError(f"--random {random}: expected a sparsity between 0 and 1 (e.g. 0.9)")
        rows.append(Row("random", random=float(random), seed=seed, quantize=quantize))
    rows.extend(r for r in methods if r not in rows)
    return rows


def check_quantize_name(quantize) -> str | None:
    """None, or a block format's name (q8_0, q4_0, q4_1; any case), or a one-line error."""
    from sparseinfer.reference.block_quant import block_format

    return None if quantize in (None, "") else block_format(quantize).name


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


def checkpoint_identity(checkpoint) -> list:
    path = Path(checkpoint).resolve()
    if not path.exists():
        raise SparseInferError(f"no such checkpoint: {checkpoint}")
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return [str(path)] + [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def export_key(checkpoint, row: Row, target: str, dtype: str = "float32") -> dict:
    key = {"checkpoint": checkpoint_identity(checkpoint), "row": row.as_dict(), "target": target,
           "exporter": source_hash()}
    if dtype != "float32":                             # (float32 keys as before: their caches stay valid)
        key["dtype"] = dtype
    return key


def export_root(cache_dir, checkpoint) -> Path:
    """Where a checkpoint's row exports go under ``cache_dir``: its name and a hash of its path."""
    path = Path(checkpoint).resolve()
    return Path(cache_dir) / f"{path.name}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


def check_dtype_name(dtype) -> str:
    """An export dtype the exporter knows (float32, float16), or a one-line error."""
    from sparseinfer.model_export.export import DTYPES

    if dtype not in DTYPES:
        raise SparseInferError(f"dtype {dtype!r}: expected {' or '.join(DTYPES)}")
    return str(dtype)


def is_checkpoint(path) -> bool:
    p = Path(path)
    return (p.is_file() and p.suffix.lower() == ".gguf") or (p.is_dir() and (p / "config.json").is_file())


def ensure_export(checkpoint, row: Row, root, target: str = "cpu", loaded=None,
                  log=None, debug: bool = False, dtype: str = "float32", approximate: bool = False,
                  note=None) -> Path:
    """The row's model.onnx under ``root``, exported now unless a matching one is cached.
    ``loaded``: a callable returning the loaded checkpoint (so it is read at most once);
    ``debug``: an export with the per-layer debug outputs (masks; part of the key);
    ``dtype``: float32, or float16 weights and activations (its own folder and key);
    ``approximate``: a sparse export of a model without exact zeros (SiLU; part of the key);
    ``note(line)``: told what a quantized export converted (again when it comes from the cache).

    A quantized row reads the checkpoint itself, one layer at a time, so that a GGUF keeps its
    blocks (a loaded checkpoint holds them dequantized); a quantized ``random`` row quantizes
    its edited float32 weights."""
    from sparseinfer.model_export.export_folder import export_checkpoint

    out = Path(root) / (row.slug + ("" if dtype == "float32" else f"-{dtype}"))
    key = export_key(checkpoint, row, target, dtype)
    if debug:
        key["debug"] = True
    if approximate:
        key["approximate"] = True
    key_file, notes_file, model = out / "key.json", out / "notes.json", out / "model.onnx"
    if model.is_file() and key_file.is_file():
        try:
            if json.loads(key_file.read_text()) == key:
                for line in json.loads(notes_file.read_text()) if notes_file.is_file() else []:
                    if note:
                        note(line)
                return model
        except json.JSONDecodeError:
            pass
    for stale in (key_file, notes_file):
        if stale.exists():
            stale.unlink()
    streamed = row.quantize is not None and row.kind != "random"
    ck = None
    if not streamed:
        ck = loaded() if loaded else None
        if ck is None:
            from sparseinfer.model_export.loaders import load_checkpoint
            ck = load_checkpoint(checkpoint)
        if row.kind == "sparse":
            AlphaSchedule.parse(row.alpha).check_layers(ck.shape.num_layers)
    if log:
        log(f"exporting {row.label} -> {model}")
    source = checkpoint if streamed else ck
    if row.kind == "random":
        source = dataclasses.replace(ck, weights=drop_random_rows(ck.weights, row.random, row.seed))
    notes = []

    def told(line):
        notes.append(line)
        if note:
            note(line)
    export_checkpoint(source, model, sparse=row.kind == "sparse", alpha=row.alpha or "1.00", target=target,
                      debug=debug, dtype=dtype, approximate=approximate, quantize=row.quantize, note=told)
    if notes:
        write_json(notes_file, notes, indent=1)
    write_json(key_file, key, indent=1)
    return model
