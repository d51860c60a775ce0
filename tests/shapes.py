"""Shapes as data, shared by tests and benchmarks (STYLE.md 5).

TAIL_DS exercise every tail of the 32-bit sign words and of the 16-byte vector chunks;
BENCH_MODELS are the ProSparse shapes from ``sim.models`` (the one place they live).
"""
TAIL_DS = (1, 2, 31, 32, 33, 63, 64, 97, 255, 256, 257, 300)
TAIL_KS = (1, 3, 17, 100, 513)
BENCH_MODELS = ("prosparse-llama2-7b", "prosparse-llama2-13b")
