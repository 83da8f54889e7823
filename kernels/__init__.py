"""MoE expert kernels: Triton grouped GEMM and a torch fallback (installed as moeprune.kernels)."""
