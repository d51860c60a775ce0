"""Figures published in the SparseInfer paper (Shin, Yang, Yi, 2024), for comparison.

Each constant names the table or section it comes from. Simulators compute their own
numbers from model shapes; these are only the published values they are checked against.
"""

# Table I: ProSparse-Llama2-13B, one MLP block, per token.
TABLE1_MODEL = "prosparse-llama2-13b"
TABLE1_SPARSITY = 0.92            # implied by Table I: 1.699e7 / 2.123e8 = 8 % of rows active
TABLE1_POWERINFER_RANK = 1024     # Sec. V-B: DejaVu predictor trained with rank 1024
TABLE1 = {
    # method: (prediction ops, MLP block ops), as printed (Table I)
    "llama.cpp": (0, 2.123e8),
    "PowerInfer": (1.940e7, 1.699e7),
    "SparseInfer": (2.211e6, 1.699e7),
}
# Sec. V-B, predictor memory for the whole 13B model (40 layers)
PREDICTOR_MEMORY_MIB = {"PowerInfer": 1480.0, "SparseInfer": 337.5}
PREDICTOR_MEMORY_RATIO = 4.38

# Sec. V-B: SparseInfer predictor latency on Jetson Orin AGX, per layer per token
PREDICTOR_LATENCY_US_ORIN = 70.0
PREDICTOR_SPEEDUP_VS_POWERINFER = 3.66

# Fig. 4: end-to-end token-latency speedups on Jetson Orin AGX (first 10 GSM8K samples).
# (model, alpha schedule): (vs llama.cpp, vs PowerInfer); alpha > 1 on the first 20 layers only.
FIG4_SPEEDUPS = {
    ("prosparse-llama2-13b", "1.00"): (1.79, 1.27),
    ("prosparse-llama2-7b", "1.00"): (1.74, 1.30),
    ("prosparse-llama2-13b", "1.02@0-19,1.00"): (1.70, 1.21),
    ("prosparse-llama2-7b", "1.03@0-19,1.00"): (1.59, 1.19),
}

# Sec. V-A: measured activation sparsity of the ProSparse models
REPORTED_SPARSITY = {"prosparse-llama2-7b": 0.8932, "prosparse-llama2-13b": 0.8880}

# Sec. II: share of decode time in llama.cpp on Orin for Llama2-13B
DECODE_TIME_SHARE_13B = {"attention": 0.38, "mlp": 0.62}
