#!/usr/bin/env python3
"""The peers of `bench_step` and `gpu_report`, timed on the CPU at the same size and thread count.

One optimizer step over one tensor of `--params` f32 parameters (2 warm-up steps, then `--steps`
timed ones), for torch's Adam and AdamW (fused and foreach, f32 states) and bitsandbytes'
Adam8bit (block-wise 8-bit states); bitsandbytes' block-wise quantize and dequantize (block 256,
dynamic map) of the same number of elements; and a plain copy (`y = x + 1`, 8 bytes per
element) as the memory bandwidth of this run. Each row is printed as ns per element, the bytes
the operation must move per element, the bandwidth that implies, and its fraction of the copy's.

    python3 -m venv .venv && .venv/bin/pip install -r benches/peers/requirements.txt
    .venv/bin/python benches/peers/peers.py --params 16777216 --threads 2
"""

import argparse
import time

import torch
import bitsandbytes as bnb
import bitsandbytes.functional as bnbf


def timed(function, repetitions):
    """Seconds per call of `function`, best of `repetitions` after one warm-up call."""
    function()
    best = float("inf")
    for _ in range(repetitions):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def optimizer_step(make, params, warmup, steps):
    """Seconds per step of the optimizer `make([p])` over `params` elements, mean of `steps`."""
    generator = torch.Generator().manual_seed(1)
    parameter = torch.nn.Parameter(torch.randn(params, generator=generator))
    parameter.grad = torch.randn(params, generator=generator)
    optimizer = make([parameter])
    for _ in range(warmup):
        optimizer.step()
    started = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    return (time.perf_counter() - started) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=16_777_216)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--block", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = args.params

    source = torch.randn(n)
    target = torch.empty(n)
    copy_seconds = timed(lambda: torch.add(source, 1.0, out=target), args.steps)
    copy_bandwidth = 8 * n / copy_seconds

    rows = [("copy (y = x + 1)", copy_seconds, 8.0)]
    # Adam moves p, g, m, v in and p, m, v out: 28 bytes per f32 parameter; the 8-bit step moves
    # p, g, two codes and two absmax per block in, p, codes and absmax out.
    eight_bit_bytes = 4 + 4 + 2 + 8 / args.block + 4 + 2 + 8 / args.block
    optimizers = [
        ("torch Adam, fused (f32 state)", lambda p: torch.optim.Adam(p, lr=1e-3, fused=True), 28.0),
        ("torch Adam, foreach (f32 state)", lambda p: torch.optim.Adam(p, lr=1e-3, foreach=True), 28.0),
        ("torch AdamW, fused (f32 state)", lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True), 28.0),
        ("bitsandbytes Adam8bit", lambda p: bnb.optim.Adam8bit(p, lr=1e-3), eight_bit_bytes),
    ]
    for name, make, bytes_moved in optimizers:
        rows.append((name, optimizer_step(make, n, 2, args.steps), bytes_moved))

    codes, state = bnbf.quantize_blockwise(source, blocksize=args.block)
    code_bytes = 1 + 4 / args.block
    rows.append((
        f"bitsandbytes quantize_blockwise (block {args.block})",
        timed(lambda: bnbf.quantize_blockwise(source, blocksize=args.block), args.steps),
        4 + code_bytes,
    ))
    rows.append((
        f"bitsandbytes dequantize_blockwise (block {args.block})",
        timed(lambda: bnbf.dequantize_blockwise(codes, state), args.steps),
        code_bytes + 4,
    ))

    print(f"{n} elements, {args.threads} threads, torch {torch.__version__}, "
          f"bitsandbytes {bnb.__version__}, copy bandwidth {copy_bandwidth / 1e9:.1f} GB/s")
    print("| operation | ns/element | bytes/element | GB/s | of the copy's bandwidth |")
    print("|---|---:|---:|---:|---:|")
    for name, seconds, bytes_moved in rows:
        bandwidth = bytes_moved * n / seconds
        print(f"| {name} | {1e9 * seconds / n:.3f} | {bytes_moved:.2f} | {bandwidth / 1e9:.1f} | "
              f"{100 * bandwidth / copy_bandwidth:.1f} % |")


if __name__ == "__main__":
    main()
