"""MoE expert kernels side by side: moeprune (Triton on GPU / torch grouped path on CPU, float and int4)
vs transformers' ``eager``, ``batched_mm`` and ``grouped_mm`` experts implementations.

Run: ``python benchmarks/kernels.py`` (writes the ``## Kernels`` section of BENCHMARKS.md).

Shapes: Mixtral-8x7B experts (E=8, H=4096, I=14336, top-2) and Qwen3-30B-A3B (E=128, H=2048, I=768,
top-8), decode (1-16 tokens) and prefill (2k-16k tokens), bf16 and int4 (group 128) on a GPU.  On a CPU
the shapes are reduced (H and I / 8, Qwen3 with 32 experts), prefill is 128-512 tokens, and the float
dtype is fp32 (CPUs without AVX512-BF16 run bf16 matmuls ~30x slower than fp32, which would only
measure that).  All implementations of a case are timed in one run, interleaved (A B C A B C ...),
median of the repeats.  GB/s = minimal bytes (weights of the experts hit, in the implementation's
storage format, + activations) / time; TFLOP/s = 6 * T * top_k * H * I / time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: import from the repo root (profile.py would shadow stdlib)
    sys.path[0] = str(Path(__file__).resolve().parents[1])
import torch  # noqa: E402

from benchmarks.report import interleaved, machine, table, write_section  # noqa: E402

GPU_SHAPES = {
    "Mixtral-8x7B": dict(E=8, H=4096, I=14336, k=2),
    "Qwen3-30B-A3B": dict(E=128, H=2048, I=768, k=8),
}
CPU_SHAPES = {
    "Mixtral-8x7B /8": dict(E=8, H=512, I=1792, k=2),
    "Qwen3-30B-A3B /8, 32 experts": dict(E=32, H=256, I=96, k=8),
}
GPU_TOKENS = dict(decode=[1, 4, 16], prefill=[2048, 8192, 16384])
CPU_TOKENS = dict(decode=[1, 4, 16], prefill=[128, 512])


def make_module(shape: dict, dtype: torch.dtype, device: str):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    cfg = MixtralConfig(hidden_size=shape["H"], intermediate_size=shape["I"], num_local_experts=shape["E"])
    cfg._experts_implementation = "eager"
    with torch.device(device):
        m = MixtralExperts(cfg).to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    return m.eval()


def routing(t: int, shape: dict, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, shape["E"], generator=g)
    w, idx = logits.softmax(-1).topk(shape["k"], dim=-1)
    return idx.to(device), (w / w.sum(-1, keepdim=True)).to(device)


def weight_bytes(module, experts_hit: int) -> int:
    """Bytes of the expert weights (packed + scales + zeros if quantized) for ``experts_hit`` experts."""
    total = 0
    for name in ("gate_up_proj", "down_proj"):
        w = getattr(module, name)
        tensors = [w] if isinstance(w, torch.Tensor) else list(w.buffers())
        total += sum(t.numel() * t.element_size() for t in tensors) // module.num_experts * experts_hit
    return total


def implementations(module, qmodule, device: str, t: int, shape: dict, dtype):
    """name -> callable(x, idx, w) for this case (batched_mm only where its weight gather fits)."""
    from transformers.integrations.moe import batched_mm_experts_forward, grouped_mm_experts_forward

    from moeprune.kernels import torch_experts_forward

    eager = type(module).forward.__wrapped__  # the class's own per-expert loop
    fns = {"eager": lambda x, i, w: eager(module, x, i, w)}
    gather = t * shape["k"] * 3 * shape["H"] * shape["I"] * module.down_proj.element_size()
    if gather <= (8 << 30 if device == "cuda" else 1 << 30):
        fns["batched_mm"] = lambda x, i, w: batched_mm_experts_forward(module, x, i, w)
    fns["grouped_mm"] = lambda x, i, w: grouped_mm_experts_forward(module, x, i, w)
    if device == "cuda":
        from moeprune.kernels.triton_moe import triton_experts_forward

        fns["moeprune triton"] = lambda x, i, w: triton_experts_forward(module, x, i, w)
        fns["moeprune triton int4"] = lambda x, i, w: triton_experts_forward(qmodule, x, i, w)
    else:
        fns["moeprune torch"] = lambda x, i, w: torch_experts_forward(module, x, i, w)
        fns["moeprune torch int4"] = lambda x, i, w: torch_experts_forward(qmodule, x, i, w)
    return fns


def run(device: str, repeats: int, quick: bool = False) -> tuple[list[list], str]:
    from moeprune.kernels import quantize_experts_

    cuda = device == "cuda"
    shapes, tokens = (GPU_SHAPES, GPU_TOKENS) if cuda else (CPU_SHAPES, CPU_TOKENS)
    dtype = torch.bfloat16 if cuda else torch.float32
    if quick:
        tokens = {k: v[:1] for k, v in tokens.items()}
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows = []
    for shape_name, shape in shapes.items():
        module = make_module(shape, dtype, device)
        qmodule = make_module(shape, dtype, device)
        qmodule.load_state_dict(module.state_dict())
        quantize_experts_(qmodule, 4, group_size=128 if shape["I"] % 128 == 0 and shape["H"] % 128 == 0 else 32)
        for phase, ts in tokens.items():
            for t in ts:
                x = torch.randn(t, shape["H"], device=device, dtype=dtype, generator=None) * 0.5
                idx, w = routing(t, shape, device)
                hit = int(torch.unique(idx).numel())
                fns = implementations(module, qmodule, device, t, shape, dtype)
                ref = None

                def timed(fn):
                    def go():
                        with torch.no_grad():
                            fn(x, idx, w)
                        sync()
                    return go

                with torch.no_grad():  # correctness guard next to the timings
                    ref = fns["eager"](x, idx, w).float()
                    for name, fn in fns.items():
                        err = ((fn(x, idx, w).float() - ref).norm() / ref.norm()).item()
                        limit = 0.3 if "int4" in name else (2e-2 if cuda else 1e-4)
                        if not err < limit:
                            raise AssertionError(f"{shape_name} T={t} {name}: rel err {err:.3g} vs eager")
                times = interleaved({n: timed(f) for n, f in fns.items()}, repeats=repeats, warmup=1)
                flops = 6 * t * shape["k"] * shape["H"] * shape["I"]
                act_bytes = 2 * t * shape["H"] * x.element_size()
                for name, sec in times.items():
                    qm = qmodule if "int4" in name else module
                    gbs = (weight_bytes(qm, hit) + act_bytes) / sec / 1e9
                    rows.append([shape_name, phase, t, name, "int4" if "int4" in name else str(dtype)[6:],
                                 sec * 1e3, gbs, flops / sec / 1e12, times["eager"] / sec])
                    print(" | ".join(str(c if not isinstance(c, float) else f"{c:.4g}") for c in rows[-1]),
                          flush=True)
        del module, qmodule
    return rows, str(dtype)[6:]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="one token count per phase")
    ap.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default 1 on CPU: OpenMP spin-waits wreck timings on a shared box)")
    args = ap.parse_args(argv)
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    t0 = time.perf_counter()
    rows, dt = run(args.device, args.repeats, args.quick)
    header = ["shape", "phase", "tokens", "implementation", "weights", "ms", "GB/s", "TFLOP/s", "x eager"]
    dev = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    body = "\n".join([
        f"`python benchmarks/kernels.py` on {dev} ({machine()}), {time.perf_counter() - t0:.0f} s, "
        f"load average {os.getloadavg()[0]:.1f} at the end.",
        "",
        f"Experts forward only (routing given). Float dtype {dt}; int4 = group-wise asymmetric, group 128 "
        "(32 where the reduced CPU shapes need it). Median of "
        f"{args.repeats} interleaved repeats. GB/s = weights of the experts hit (storage format) + "
        "activations, over time; TFLOP/s = 6·T·k·H·I / time; `x eager` = eager time / time. "
        "Every implementation's output is checked against eager first (int4: rel err < 0.3 on these Gaussian weights).",
        "",
        "" if args.device == "cuda" else
        "CPU run: shapes reduced (H, I / 8; Qwen3 with 32 experts), fp32 (bf16 matmul has no fast CPU "
        "kernel here), `moeprune torch` = the torch grouped path (the Triton kernels need a GPU); int4 on "
        "CPU dequantizes every expert hit on each call (a correctness fallback, not a fast path). "
        "batched_mm is left out where its per-pair weight gather would exceed 1 GiB.",
        "",
        table(rows, header),
    ])
    print(body)
    if not args.no_write:
        write_section("Kernels", body)


if __name__ == "__main__":
    main()
