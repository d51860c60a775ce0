"""``sparseinfer eval --ray ADDRESS|auto|local``: a row's requests on Ray workers, one model
session per worker.

lm-eval stays in the driver: it builds the tasks, checks its request cache, applies the
filters and metrics and logs the samples. Only the model's three request methods go out.
``RayLM`` is an lm-eval model whose ``generate_until``, ``loglikelihood`` and
``loglikelihood_rolling`` hand the requests, one at a time, to a pool of ``ShardWorker``
actors. Each actor holds one ``SparseInferLM`` on the row's export. With the cuda provider
each actor takes ``num_gpus=1``, so Ray pins it to its own GPU through CUDA_VISIBLE_DEVICES.
The answers are put back in request order: the list a single process returns, so lm-eval
logs the same per-sample records. Each answer goes to lm-eval's cache hook as it arrives,
so an interrupted Ray run resumes like a local one. The requests are dealt out
dynamically (two in flight per worker), since generations differ in length.

Workers: ``--ray-workers N``, by default one per GPU of the cluster (cuda) or one per
``--threads`` CPUs of the cluster (cpu; ``--threads`` defaults to 1 under Ray, and each
worker's onnxruntime session gets that many intra-op threads).

The export must be readable at the same path on every node. On a multi-machine cluster,
put ``--out`` on a shared disk. ``run_eval`` makes the export in the driver before the
workers start. Ray is an optional extra (``pip install -e '.[ray]'``), imported only when
``--ray`` is given.
"""
from __future__ import annotations

import logging
import os

from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM

from sparseinfer.reference.errors import SparseInferError

from .backend import SparseInferLM
from .decoder_lm import DEFAULT_MAX_GEN_TOKS, DENSE_SCORING_NOTE, summarize_stats

log = logging.getLogger("sparseinfer.evaluation")

RAY_EXTRA = "pip install -e '.[ray]' (or pip install 'sparseinfer[ray]')"
IN_FLIGHT = 2                       # requests queued per worker: one running, one waiting


def import_ray():
    try:
        import ray
    except ImportError:
        raise SparseInferError(f"--ray needs Ray, which is not installed: {RAY_EXTRA}") from None
    return ray


def connect(address: str):
    """Ray, initialised: ``auto`` joins the running cluster (``ray start``, RAY_ADDRESS), ``local``
    starts a private instance on this machine, anything else is a cluster address
    (``HOST:PORT`` or ``ray://HOST:PORT``). A Ray this process already started is used as is."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    address = str(address).strip()
    if not address:
        raise SparseInferError("--ray: expected a cluster address, 'auto' or 'local'")
    try:
        if address == "local":
            ray.init(include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SparseInferError(f"--ray {address}: could not connect ({first})") from None
    return ray


def plan_workers(ray, provider: str, workers: int | None, threads: int | None) -> tuple[int, dict]:
    """(number of workers, Ray resources per worker), checked against the cluster's."""
    if workers is not None and workers < 1:
        raise SparseInferError(f"--ray-workers {workers}: expected at least 1")
    threads = int(threads or 1)
    res = ray.cluster_resources()
    cpus, gpus = int(res.get("CPU", 0)), int(res.get("GPU", 0))
    if provider == "cuda":
        if gpus < 1:
            raise SparseInferError("--provider cuda --ray: the Ray cluster has no GPUs")
        n = workers or gpus
        per = {"num_cpus": threads, "num_gpus": 1}
        if n > gpus:
            raise SparseInferError(f"--ray-workers {n}: the Ray cluster has {gpus} GPUs (one worker per GPU)")
    else:
        n = workers or max(1, cpus // threads)
        per = {"num_cpus": threads, "num_gpus": 0}
    if n * threads > cpus:
        raise SparseInferError(f"--ray-workers {n} with {threads} threads each needs {n * threads} CPUs; "
                               f"the Ray cluster has {cpus}")
    return n, per


class ShardWorker:
    """One model session (a ``SparseInferLM`` on the export) inside a Ray actor."""

    def __init__(self, path, row, provider, threads, mlp_kernels, max_length, max_gen_toks):
        self.lm = SparseInferLM(model=str(path), provider=provider, threads=threads, mlp_kernels=mlp_kernels,
                                max_length=max_length, max_gen_toks=max_gen_toks, progress=False)
        self.lm.row = row                  # the row's label (the export alone names only its α)
        self.served = 0

    def info(self) -> dict:
        import ray

        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "max_length": self.lm.max_length,
                "mlp_kernels": self.lm.decoder.mlp_kernels}

    def run(self, kind: str, args):
        self.served += 1
        if kind == "generate_until":
            return self.lm.generate_until([Instance(kind, {}, args, 0)])[0]
        if kind == "loglikelihood":
            return self.lm._loglikelihood_tokens([args])[0]
        if kind == "loglikelihood_rolling":
            return self.lm.loglikelihood_rolling([Instance(kind, {}, args, 0)])[0]
        raise SparseInferError(f"internal: unknown request kind {kind!r}")

    def raw_stats(self) -> tuple[dict, int]:
        return dict(self.lm._stats), self.served

    def reset_stats(self) -> None:
        self.lm.reset_stats()
        self.served = 0


class RayLM(TemplateLM):
    """An lm-eval model that runs its requests on Ray workers (see the module's docstring).
    Only the tokenizer lives in the driver; ``close()`` ends the workers."""

    tok_encode = SparseInferLM.tok_encode
    tok_decode = SparseInferLM.tok_decode
    eot_token_id = SparseInferLM.eot_token_id
    prefix_token_id = SparseInferLM.prefix_token_id

    def __init__(self, path, row, provider="cpu", threads=None, mlp_kernels="auto", max_length=None,
                 max_gen_toks=None, workers=None, progress=True, address="auto"):
        super().__init__()
        from sparseinfer.model_export.export_folder import tokenizer_for

        ray = connect(address)
        self.path, self.row, self.provider, self.progress = path, row, str(provider), bool(progress)
        self.tokenizer, self.bos, self.eos = tokenizer_for(path)
        n, per = plan_workers(ray, self.provider, workers, threads)
        remote = ray.remote(**per)(ShardWorker)
        self.actors = [remote.remote(str(path), row, self.provider, per["num_cpus"], mlp_kernels, max_length,
                                     int(max_gen_toks or DEFAULT_MAX_GEN_TOKS)) for _ in range(n)]
        try:
            self.workers = self._get([a.info.remote() for a in self.actors])
        except BaseException:
            self.close()
            raise
        self.max_length = self.workers[0]["max_length"]
        self.mlp_kernels = self.workers[0]["mlp_kernels"]
        self._noted = False

    # -- Ray plumbing ---------------------------------------------------------------------
    @staticmethod
    def _get(refs):
        """ray.get, with a worker's SparseInferError re-raised as itself (a one-line error)."""
        import ray

        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, SparseInferError):
                raise e.cause from None
            raise

    def _map(self, kind: str, items: list, cache_args) -> list:
        """``ShardWorker.run(kind, item)`` for every item, dealt out to the workers as they
        free up; the answers in the items' order, each handed to the cache hook on arrival."""
        import ray
        from tqdm import tqdm

        results = [None] * len(items)
        todo = iter(enumerate(items))
        pending = {}

        def submit(actor) -> None:
            nxt = next(todo, None)
            if nxt is not None:
                i, args = nxt
                pending[actor.run.remote(kind, args)] = (i, actor)

        for _ in range(IN_FLIGHT):
            for actor in self.actors:
                submit(actor)
        with tqdm(total=len(items), desc=f"{kind} ({self.row.label}, {len(self.actors)} Ray workers)",
                  disable=not self.progress, leave=False) as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    i, actor = pending.pop(ref)
                    results[i] = self._get(ref)
                    self.cache_hook.add_partial(kind, cache_args(items[i]), results[i])
                    bar.update(1)
                    submit(actor)
        return results

    def close(self) -> None:
        import ray

        for actor in getattr(self, "actors", []):
            ray.kill(actor)
        self.actors = []

    # -- lm-eval's interface --------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        return self._map("generate_until", [req.args for req in requests], lambda args: args)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        self._note_dense()
        return self._map("loglikelihood", [tuple(r) for r in requests], lambda item: item[0])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        self._note_dense()
        return self._map("loglikelihood_rolling", [req.args for req in requests], lambda args: args)

    def _note_dense(self) -> None:
        if not self._noted:
            self._noted = True
            log.warning(DENSE_SCORING_NOTE)

    def get_model_info(self) -> dict:
        return {"sparseinfer_row": self.row.as_dict(), "sparseinfer_export": str(self.path),
                "provider": self.provider, "mlp_kernels": self.mlp_kernels, "max_length": self.max_length,
                "ray_workers": len(self.actors)}

    # -- statistics -----------------------------------------------------------------------
    def reset_stats(self) -> None:
        self._get([a.reset_stats.remote() for a in self.actors])

    def stats(self) -> dict:
        """The workers' counters summed (decode tokens/s is then per session, as in one process),
        with the number of workers and the requests each served."""
        parts = self._get([a.raw_stats.remote() for a in self.actors])
        raw = {k: sum(p[0][k] for p in parts) for k in parts[0][0]}
        return {**summarize_stats(raw, self.mlp_kernels), "ray_workers": len(parts),
                "requests_per_worker": [p[1] for p in parts]}
