"""The Pareto front of rows that trade latency against a loss (lower is better on both)."""
from __future__ import annotations


def pareto_front(rows: list[dict], x: str = "latency_ms", y: str = "mean_kl") -> list[int]:
    """Indices of rows no other row beats on both ``x`` and ``y`` (lower is better)."""
    front = []
    for i, r in enumerate(rows):
        dominated = any((o[x] <= r[x] and o[y] <= r[y]) and (o[x] < r[x] or o[y] < r[y])
                        for j, o in enumerate(rows) if j != i)
        if not dominated:
            front.append(i)
    return front


def mark_pareto(rows: list[dict], x: str = "latency_ms", y: str = "mean_kl") -> None:
    """Set each row's ``pareto`` to whether it is on the front of (``x``, ``y``)."""
    front = pareto_front(rows, x, y)
    for i, r in enumerate(rows):
        r["pareto"] = i in front
