"""Per-kernel GPU time of one forward+backward of each HSA pattern on the Triton kernel, and of SDPA causal.

    PYTHONPATH=. python bench/triton_profile.py --length 1024
"""

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, ".")
from mst_hf.attention import HSASpec  # noqa: E402
from mst_hf.attention.impl import triton as at  # noqa: E402


def report(name, fn, reps=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if t > 0:
            rows.append((t / reps / 1000, e.count // reps, e.key[:70]))
    rows.sort(reverse=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):  # few enough launches that the queue never fills: host time per call
        fn()
    host = (time.perf_counter() - start) / reps * 1000
    torch.cuda.synchronize()
    print(f"## {name}: {sum(r[0] for r in rows):.3f} ms GPU, {host:.3f} ms host per fwd+bwd")
    for ms, n, key in rows[:10]:
        print(f"   {ms:.3f} ms  x{n}  {key}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=32768)
    args = p.parse_args()
    T = args.length
    B = max(1, args.tokens // T)
    q, k, v = (torch.randn(B, T, 12, 64, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
               for _ in range(3))
    g = torch.randn_like(q)
    report("sdpa causal", lambda: torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True),
                                                      (q, k, v), g))
    for pattern in at.TRITON_PATTERNS:
        spec = HSASpec(pattern, 128, 128, 128)
        report(pattern, lambda spec=spec: torch.autograd.grad(at.triton_attention(q, k, v, spec), (q, k, v), g))


if __name__ == "__main__":
    main()
