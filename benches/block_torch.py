#!/usr/bin/env python3
"""PyTorch's side of the block benchmark (issue: forward/backward per block).

Times one Llama-shaped decoder block (RMSNorm, RoPE, causal attention, SwiGLU), forward plus
backward to its input and every weight, written in plain PyTorch eager ops, on the GPU:
  - in bf16 (the issue's setting) and in f32 with TF32 off (what symerge's f32 CUDA backend
    computes), attention both as explicit matmul + softmax (like symerge) and through SDPA;
  - next to the bf16 and f32 GEMM rates measured in the same run (8192^3, random data).
Prints a table and writes JSON (--out). Median of CUDA-event timings after warm-up.

    python3 benches/block_torch.py --out block_torch.json   # needs torch with CUDA
    python3 benches/block_torch.py --device cpu --dtypes f32 --batch 1 --seq 128 --threads 2
      # the CPU, next to `symerge bench-block --device cpu` with the same shape and threads
"""

import argparse
import json
import math

import time

import torch

DEV = "cuda"

SHAPES = {
    "llama-7b": dict(hidden=4096, inter=11008, heads=32, kv_heads=32),
    "llama-tiny": dict(hidden=256, inter=688, heads=8, kv_heads=4),
}


def time_ms(fn, warmup=3, reps=10):
    for _ in range(warmup):
        fn()
    if DEV == "cpu":
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
        times.sort()
        return times[len(times) // 2]
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def gemm_tflops(dtype, n=8192):
    a = torch.randn(n, n, device=DEV, dtype=dtype)
    b = torch.randn(n, n, device=DEV, dtype=dtype)
    ms = time_ms(lambda: a @ b)
    return 2 * n**3 / ms / 1e9


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


def rmsnorm(x, w, eps=1e-5):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def block(x, p, cos, sin, heads, kv_heads, sdpa):
    b, s, h = x.shape
    d = h // heads
    y = rmsnorm(x, p["ln1"])
    q = (y @ p["wq"].T).view(b, s, heads, d).transpose(1, 2)
    k = (y @ p["wk"].T).view(b, s, kv_heads, d).transpose(1, 2)
    v = (y @ p["wv"].T).view(b, s, kv_heads, d).transpose(1, 2)
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    if kv_heads != heads:
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
    if sdpa:
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        mask = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
        a = torch.softmax(scores.float(), dim=-1).to(x.dtype) @ v
    x = x + a.transpose(1, 2).reshape(b, s, h) @ p["wo"].T
    y = rmsnorm(x, p["ln2"])
    m = torch.nn.functional.silu(y @ p["wg"].T) * (y @ p["wu"].T)
    return x + m @ p["wd"].T


def block_flops(tokens, seq, hidden, inter, heads, kv_heads):
    """Matmul flops of forward + backward (backward = 2x forward), attention counted in full."""
    kv = hidden * kv_heads // heads
    proj = 2 * tokens * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter)
    attn = 2 * 2 * tokens * seq * hidden
    return 3 * (proj + attn)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-7b", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--out")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtypes", default="bf16,f32", help="comma-separated: bf16, f32")
    ap.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    global DEV
    DEV = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    sh = SHAPES[args.shape]
    hidden, inter, heads, kv_heads = sh["hidden"], sh["inter"], sh["heads"], sh["kv_heads"]
    d = hidden // heads
    tokens = args.batch * args.seq
    flops = block_flops(tokens, args.seq, hidden, inter, heads, kv_heads)
    result = {
        "device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu",
        "torch": torch.__version__,
        "shape": args.shape,
        "tokens": tokens,
        "seq": args.seq,
        "flops": flops,
        "gemm_tflops": {d: gemm_tflops(t, 8192 if DEV == "cuda" else 2048)
                        for d, t in [("bf16", torch.bfloat16), ("f32", torch.float32)] if d in args.dtypes.split(",")},
        "block": {},
    }
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device=DEV).float() / d))
    ang = torch.arange(args.seq, device=DEV).float()[:, None] * inv[None, :]
    ang = torch.cat((ang, ang), dim=-1)
    for dtype_name, dtype in [("bf16", torch.bfloat16), ("f32", torch.float32)]:
        if dtype_name not in args.dtypes.split(","):
            continue
        g = torch.Generator(device=DEV).manual_seed(0)
        kv = hidden * kv_heads // heads

        def w(*shape):
            return (torch.randn(*shape, device=DEV, generator=g) * 0.02).to(dtype).requires_grad_()

        p = dict(
            ln1=w(hidden), ln2=w(hidden), wq=w(hidden, hidden), wk=w(kv, hidden), wv=w(kv, hidden),
            wo=w(hidden, hidden), wg=w(inter, hidden), wu=w(inter, hidden), wd=w(hidden, inter),
        )
        x = torch.randn(args.batch, args.seq, hidden, device=DEV, generator=g).to(dtype).requires_grad_()
        dy = torch.randn(args.batch, args.seq, hidden, device=DEV, generator=g).to(dtype)
        cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
        for attn in ["matmul", "sdpa"]:
            def step():
                out = block(x, p, cos, sin, heads, kv_heads, attn == "sdpa")
                torch.autograd.grad(out, [x, *p.values()], dy)

            try:
                ms = time_ms(step, reps=args.reps)
            except torch.OutOfMemoryError:
                continue
            key = f"{dtype_name}-{attn}"
            result["block"][key] = {"ms": ms, "tflops": flops / ms / 1e9, "us_per_token": 1e3 * ms / tokens}
            if DEV == "cuda":
                torch.cuda.empty_cache()
    print(f"{result['device']}, torch {result['torch']}, {args.shape} block, {tokens} tokens (seq {args.seq})")
    print("GEMM: " + ", ".join(f"{k} {v:.2f} TFLOP/s" for k, v in result["gemm_tflops"].items()))
    for key, r in result["block"].items():
        print(f"  fwd+bwd {key:<12} {r['ms']:9.2f} ms  {r['tflops']:7.1f} TFLOP/s  {r['us_per_token']:.3f} us/token")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
