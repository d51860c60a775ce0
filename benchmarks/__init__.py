"""GPU benchmarks of the kernel versions (``sparseinfer bench``; results in ``results/<device>.json``)
and the logistics of the lent device (``carry_parts``: a large wheel carried in checked parts)."""
