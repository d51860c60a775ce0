"""onnxruntime's own profile of a decode, summarised: where a token's time goes, by
execution provider and by op.

A session made with ``profile=PREFIX`` (``make_session``, ``native_session``,
``OnnxDecoder``) writes a Chrome-trace JSON when ``end_profiling()`` is called: one
``model_run`` event per ``session.run`` and one ``<node>_kernel_time`` event per node
executed, nodes inside ``If`` branches included (the ``If`` itself is left out: its time
holds theirs), each naming its op and the provider that ran it. :func:`summarize` keeps the runs after the first ``skip_runs`` (the prompt's
prefill) and reports per run (per decode token): wall time, time inside nodes by
provider, and the ops that take the most. On the CUDA provider a node's time is the host's
time in it (a launch, or a wait where the op needs a value on the host: NonZero's count,
a copy to the CPU), and a node placed on the CPU provider in a CUDA session shows up
under ``CPUExecutionProvider``: the two things to look at first.
"""
from __future__ import annotations

import bisect
import json
from collections import defaultdict
from pathlib import Path

from sparseinfer.reference.errors import SparseInferError

KERNEL_SUFFIX = "_kernel_time"
# A control-flow node's time holds its branch's nodes, which are listed themselves: left out
CONTAINERS = frozenset({"If", "Loop", "Scan"})


def read_events(path) -> list:
    try:
        events = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SparseInferError(f"cannot read onnxruntime profile {path}: {e}") from None
    if not isinstance(events, list):
        raise SparseInferError(f"{path}: not an onnxruntime profile (expected a JSON list of trace events)")
    return events


def summarize(path, skip_runs: int = 1, top: int = 8) -> dict:
    """Per-run time by provider and the ``top`` ops, over the runs after the first ``skip_runs``."""
    events = read_events(path)
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")
    kept = runs[skip_runs:]
    if not kept:
        raise SparseInferError(f"{path}: {len(runs)} model runs, none left after skipping {skip_runs}")
    starts = [s for s, _ in kept]

    def in_kept(ts):
        i = bisect.bisect_right(starts, ts) - 1
        return i >= 0 and ts <= kept[i][1]

    n = len(kept)
    providers = defaultdict(lambda: [0.0, 0])
    ops = defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith(KERNEL_SUFFIX) or not in_kept(e["ts"]):
            continue
        args = e.get("args", {})
        if args.get("op_name") in CONTAINERS:
            continue
        provider = args.get("provider", "?")
        for table, key in ((providers, provider), (ops, (args.get("op_name", "?"), provider))):
            table[key][0] += e["dur"]
            table[key][1] += 1
    node_us = sum(us for us, _ in providers.values())
    ranked = sorted(ops.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "runs": n,
        "us_per_run": round(sum(b - a for a, b in kept) / n, 1),
        "node_us_per_run": round(node_us / n, 1),
        "by_provider": {p: {"us_per_run": round(us / n, 1), "nodes_per_run": round(c / n, 1)}
                        for p, (us, c) in sorted(providers.items())},
        "top_ops": [{"op": op, "provider": p, "us_per_run": round(us / n, 1), "calls_per_run": round(c / n, 1),
                     "share_of_nodes": round(us / node_us, 3) if node_us else 0.0}
                    for (op, p), (us, c) in ranked],
        "profile_file": str(path),
    }


def one_line(summary: dict, top: int = 3) -> str:
    """'12.3 ms/token (CPU 12.3 ms); MatMul 61%, SparseMLP 20%, ...'"""
    by = ", ".join(f"{p.replace('ExecutionProvider', '')} {v['us_per_run'] / 1e3:.2f} ms"
                   for p, v in summary["by_provider"].items())
    ops = ", ".join(f"{o['op']} {100 * o['share_of_nodes']:.0f}%" for o in summary["top_ops"][:top])
    return f"{summary['us_per_run'] / 1e3:.2f} ms/token in run ({by}); {ops}"
