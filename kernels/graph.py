"""CUDA graphs of the per-token launches: recorded once, replayed with one call per token.

A decode step runs every layer's MLP: three or four small kernels per layer, each launched
from Python with microseconds of host work (argument checks, CuPy's marshalling, the pool).
At 0.9 sparsity a layer's kernels take about as long on an H100, so an eager decode loop
is bound by the host, not by the bytes. A graph records the launches of all the layers once
and replays them with one ``cudaGraphLaunch``.

What makes a recording replayable (:func:`capture`):

* an eager run first, with the ordinary allocator: kernels compiled and loaded, the
  occupancy query cached, and state that outlives the graph (the down projection's
  self-resetting counters, ``ops._counters``) created in ordinary memory, not in the
  private pool that dies with the graph;
* a private memory pool for a second run (which leaves the pool holding blocks of every
  size the step asks for) and for the recording, used by nothing else, so the buffers the
  graph writes (outputs and temporaries alike) are never handed to other arrays while the
  graph lives;
* inputs in static buffers: a replay reads whatever they hold, so new inputs are copied
  into them first (:meth:`MLPGraph.__call__`).

The recorded step may not read device memory on the host (CuPy raises during capture; so
does the emulator's stand-in), so the wrappers in ``ops.py`` keep every count on the device.

Not done here: keeping the sign words L2-resident across a decode step (an access-policy
window of persisting accesses on the stream or the graph's kernel nodes). CuPy exposes the
persisting set-aside (``cupy.cuda.runtime.deviceSetLimit``) but neither
``cudaStreamSetAttribute`` nor ``cudaGraphKernelNodeSetAttribute``, so this path cannot mark
a window without binding the driver itself. And a step's sign words exceed the L2 several
times over (ProSparse-13B: 40 layers x 8.85 MB = 354 MB, 7B: 32 x 5.6 MB = 180 MB, against
50 MB of L2 on an H100 or H200), so a window over them could keep only a set-aside's
fraction of them resident (its hit ratio), while the set-aside leaves less L2 to the weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.signs import alpha_to_milli

from .device import cupy


@dataclass
class Captured:
    """A recorded step: ``replay()`` launches it on the current stream; ``result`` holds the
    arrays the recording returned (rewritten by every replay)."""
    graph: object
    result: object
    pool: object            # the private pool: kept alive with the graph that writes into it
    stream: object

    def replay(self) -> None:
        self.graph.launch()


def capture(step: Callable) -> Captured:
    """Record ``step()`` (device launches only, no host reads of device memory) as a CUDA graph."""
    cp = cupy()
    step()                                         # lasting state in ordinary memory (see above)
    cp.cuda.get_current_stream().synchronize()     # the capture stream does not wait for the others
    pool = cp.cuda.MemoryPool()
    stream = cp.cuda.Stream(non_blocking=True)
    with cp.cuda.using_allocator(pool.malloc), stream:
        step()                                     # sizes the private pool
        stream.synchronize()
        stream.begin_capture()
        try:
            result = step()
        finally:
            graph = stream.end_capture()
    return Captured(graph, result, pool, stream)


class MLPGraph:
    """The MLPs of several layers (a decode step's), recorded once, replayed per token.

    Each layer reads its own static input ``xs[i]`` (float32 [d_i]) and writes ``outs[i]``;
    ``graph(xs)`` copies new inputs in and replays; ``graph()`` replays on what the inputs
    hold. Outputs equal the layers' eager ``SparseMLP(x, alpha)`` bit for bit (deterministic
    pipelines). α is fixed at recording time, as in a decode step with a baked schedule.
    """

    def __init__(self, mlps, alpha=1.0):
        cp = cupy()
        self.mlps = list(mlps)
        if not self.mlps:
            raise SparseInferError("MLPGraph needs at least one layer")
        self.alpha_milli = alpha_to_milli(alpha)
        self.xs = [cp.zeros(m.d, dtype=cp.float32) for m in self.mlps]
        self.captured = capture(self._step)
        self.outs = [steps[3] for steps in self.captured.result]

    def _step(self):
        return [m.steps(x, self.alpha_milli) for m, x in zip(self.mlps, self.xs)]

    def set_inputs(self, xs, check: bool = True) -> None:
        """Copy one float32 vector per layer into the static inputs (NaN is an error with ``check``)."""
        xs = list(xs)
        if len(xs) != len(self.mlps):
            raise SparseInferError(f"MLPGraph of {len(self.mlps)} layers got {len(xs)} inputs")
        for m, x, dst in zip(self.mlps, xs, self.xs):
            dst[...] = m.to_device_x(x, check)          # checks dtype, shape [d] and NaN

    def replay(self) -> None:
        self.captured.replay()

    def __call__(self, xs=None, check: bool = True) -> list:
        """Outputs [d] per layer (the graph's buffers: copy them before the next replay)."""
        if xs is not None:
            self.set_inputs(xs, check)
        self.replay()
        return self.outs
