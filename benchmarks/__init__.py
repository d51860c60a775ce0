"""GPU benchmarks of the kernel versions (``sparseinfer bench``; results in ``results/<device>.json``)
and the staged GPU checks (``gpu_check``)."""
