"""Timing rounds: every runner once per round, in alternating order, with the load other
processes put on the machine meanwhile; and their summary (medians, ratios)."""
from __future__ import annotations

import gc
import os
import statistics
import time
from typing import Callable

from sparseinfer.reference.errors import SparseInferError

from .runners import BUILDER_GENAI, Run

QUIET_CORES = 0.25           # a round is "quiet" when other processes used less than this many cores in every run
INTERVAL_LEVEL = 0.9         # median_interval's coverage
INTERVAL_RESAMPLES = 2000


def _load1() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _machine_busy_s() -> float | None:
    """CPU seconds the whole machine has spent busy (all cores; /proc/stat), None off Linux."""
    try:
        fields = open("/proc/stat").readline().split()[1:]
    except OSError:
        return None
    ticks = [int(x) for x in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)          # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class OtherLoad:
    """CPU cores' worth of work done by other processes over an interval: the machine's busy
    time less this process's own, divided by the wall time (0: nothing else ran)."""

    def __enter__(self):
        self.busy, self.own, self.t0 = _machine_busy_s(), _own_cpu_s(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t0
        busy = _machine_busy_s()
        self.cores = (None if busy is None or self.busy is None or wall <= 0 else
                      round(max(busy - self.busy - (_own_cpu_s() - self.own), 0.0) / wall, 2))
        return False


def wait_quiet(max_wait_s: float, below_cores: float = 0.3, window_s: float = 1.0) -> dict:
    """Wait up to ``max_wait_s`` for a ``window_s`` in which other processes use less than
    ``below_cores`` cores; nothing is paused or signalled. Returns what was seen."""
    t0 = time.perf_counter()
    seen = None
    while True:
        with OtherLoad() as load:
            time.sleep(window_s)
        seen = load.cores
        if seen is None or seen < below_cores or time.perf_counter() - t0 >= max_wait_s:
            return {"waited_s": round(time.perf_counter() - t0, 1), "other_cores_before": seen}


def round_order(names: list[str], r: int) -> list[str]:
    """Round r's order: as given on even rounds, reversed on odd ones. Where a model runs in
    its round may matter by itself (two identical decoders taking turns on a 2-core VM, 9
    rounds: the second 7% faster, 2026-12-06, though their creation order, see
    ``creation_blocks``, was not reversed then), so a fixed order could favour one model."""
    return list(names) if r % 2 == 0 else list(names)[::-1]


def creation_blocks(names: list[str], rounds: int) -> list[tuple[list[str], int]]:
    """The timed rounds in two blocks: the models made (sessions created) in the given order
    for the first half, rounded up, then made anew in the reverse order for the rest. Which of
    two sessions was created first matters by itself: of two identical decoders created one
    after the other on a 2-core VM, the one created second decoded 5-12% faster in four runs
    (2026-12-06, whichever was run first in a round; the cause was not found), so a fixed
    creation order would favour one model."""
    first = (rounds + 1) // 2
    return [(list(names), first)] + ([(list(names)[::-1], rounds - first)] if rounds > first else [])


def run_rounds_recreated(makers: dict[str, Callable[[], Callable[[list[int], int], Run]]], prompt_ids: list[int],
                         new_tokens: int, rounds: int, warmup: int = 1, log=lambda s: None,
                         quiet_wait_s: float = 0.0) -> dict:
    """``run_rounds`` in the two ``creation_blocks``: each block makes the runners (``makers``,
    name -> a function making one) in its order, runs its warm-up and its share of the rounds
    (the run order alternating across the blocks as in one sequence), then drops them. Every
    round row says which order its runners were ``created`` in."""
    names, rows, tokens, done = list(makers), [], {}, 0
    for order, n in creation_blocks(names, rounds):
        made = {name: makers[name]() for name in order}
        got = run_rounds({name: made[name] for name in names}, prompt_ids, new_tokens, n, warmup, log, quiet_wait_s,
                         first_round=done)
        del made
        gc.collect()
        for row in got["rounds"]:
            row["created"] = order
        rows += got["rounds"]
        for name, toks in got["tokens"].items():
            tokens.setdefault(name, toks)
        done += n
    return {"rounds": rows, "tokens": tokens}


def run_rounds(runners: dict[str, Callable[[list[int], int], Run]], prompt_ids: list[int], new_tokens: int,
               rounds: int, warmup: int = 1, log=lambda s: None, quiet_wait_s: float = 0.0,
               first_round: int = 0) -> dict:
    """Warm-up rounds, then ``rounds`` rounds in alternating order (forward, reversed, ...),
    numbered (and ordered) from ``first_round``.

    Every run must produce exactly ``new_tokens`` tokens (a stop token earlier is an error:
    the runners would not be timed on the same work). Each run records ``other_cores``, the
    cores other processes kept busy meanwhile; with ``quiet_wait_s`` each round first waits
    up to that long for the machine to be quiet (``wait_quiet``)."""
    if rounds < 1 or new_tokens < 2:
        raise SparseInferError(f"rounds ({rounds}) must be >= 1 and new tokens ({new_tokens}) >= 2")
    names = list(runners)
    first_tokens: dict[str, list[int]] = {}
    rows = []
    for r in range(-warmup, rounds):
        order = round_order(names, r if r < 0 else first_round + r)
        row = {"round": first_round + r if r >= 0 else f"warmup{r + warmup}", "order": order}
        if quiet_wait_s > 0:
            row.update(wait_quiet(quiet_wait_s))
        row["load1_before"] = _load1()
        for name in order:
            with OtherLoad() as load:
                got = runners[name](prompt_ids, new_tokens)
            if len(got.tokens) != new_tokens:
                raise SparseInferError(f"{name} stopped after {len(got.tokens)} of {new_tokens} new tokens "
                                       f"(a stop token): pick another prompt or fewer new tokens")
            first_tokens.setdefault(name, got.tokens)
            row[name] = {"decode_tokens_per_s": round(got.decode_tokens_per_s, 3),
                         "decode_s": round(got.decode_s, 4), "prefill_s": round(got.prefill_s, 4),
                         "other_cores": load.cores}
        row["load1_after"] = _load1()
        log(f"round {row['round']}: " + ", ".join(f"{n} {row[n]['decode_tokens_per_s']:.2f} tok/s "
                                                  f"(others {row[n]['other_cores']} cores)" for n in names)
            + f"; load {row['load1_before']} -> {row['load1_after']}")
        rows.append(row)
    return {"rounds": rows, "tokens": first_tokens}


def summarize_rounds(rounds: list[dict], names: list[str], reference: str = BUILDER_GENAI) -> dict:
    """Medians (and min / max) per runner over the timed rounds; each runner's ratio to ``reference``
    as the ratio of the medians and per round."""
    timed = [r for r in rounds if isinstance(r["round"], int)]
    if not timed:
        raise SparseInferError("no timed rounds")
    out = {"tokens_per_s": {}, "ratio_to_" + reference: {}}
    for name in names:
        per = [r[name]["decode_tokens_per_s"] for r in timed]
        out["tokens_per_s"][name] = {"median": round(statistics.median(per), 3), "min": min(per), "max": max(per),
                                     "per_round": per}
    if reference in names:
        ref = out["tokens_per_s"][reference]["median"]
        for name in names:
            if name == reference:
                continue
            per = [round(r[name]["decode_tokens_per_s"] / r[reference]["decode_tokens_per_s"], 4) for r in timed]
            out["ratio_to_" + reference][name] = {
                "of_medians": round(out["tokens_per_s"][name]["median"] / ref, 4), "per_round": per,
                "median_per_round": round(statistics.median(per), 4),
                "median_per_round_interval": median_interval(per, [r.get("created") for r in timed])}
    return out


def median_interval(values, strata=None, level: float = INTERVAL_LEVEL, resamples: int = INTERVAL_RESAMPLES,
                    seed: int = 0) -> list[float]:
    """[low, high]: a percentile-bootstrap interval at ``level`` for the median of ``values``
    (per-round ratios). Each resample draws with replacement as many values from each stratum
    (``strata``: one label per value, such as the order the models were created in) as it
    has, so that every resample keeps the rounds' balance of strata; the interval holds the
    central ``level`` of the resamples' medians. Deterministic for a ``seed``. The rounds of
    one run share its machine state, so this says how closely they pin their own median, not
    where another run's would fall. A value that is not finite (a timing that failed) leaves
    the interval undefined: [nan, nan]."""
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise SparseInferError(f"an interval needs one or more values, got shape {values.shape}")
    if not 0.0 < level < 1.0 or resamples < 1:
        raise SparseInferError(f"interval level {level} must be in (0, 1) and resamples ({resamples}) >= 1")
    labels = [None] * values.size if strata is None else [str(x) for x in strata]
    if len(labels) != values.size:
        raise SparseInferError(f"{len(labels)} strata labels for {values.size} values")
    if not np.all(np.isfinite(values)):
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    groups = [values[[i for i, x in enumerate(labels) if x == label]] for label in dict.fromkeys(labels)]
    draws = np.concatenate([g[rng.integers(0, g.size, size=(resamples, g.size))] for g in groups], axis=1)
    low, high = np.quantile(np.median(draws, axis=1), [(1 - level) / 2, (1 + level) / 2])
    return [round(float(low), 4), round(float(high), 4)]


def quiet_summary(rounds: list[dict], names: list[str]) -> dict:
    """``summarize_rounds`` of the timed rounds in which every run saw other processes use
    fewer than ``QUIET_CORES`` cores, and how many there were."""
    quiet = [r for r in rounds if isinstance(r["round"], int) and
             all(r[n]["other_cores"] is not None and r[n]["other_cores"] < QUIET_CORES for n in names)]
    return {"other_cores_below": QUIET_CORES, "count": len(quiet), **(summarize_rounds(quiet, names) if quiet else {})}
