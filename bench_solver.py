"""Benchmark of the LU-KV solver: the readable min-heap sweep against the fast sort of hull segments, same curves.

    python bench_solver.py                   # 1,024 heads x 2,048 and x 32,768 tokens; the heap takes minutes at 32,768
    python bench_solver.py --heap-heads 128  # the heap on the first 128 heads only (the fast one still on all)

The curves are what profiling makes (lukv.head_curves): per head, utilities lognormal times a
lognormal head scale, a noisy scorer (score = log utility + noise), the cumulative loss in the
scorer's order over the evictable tokens (sink 4, window 16, floor 1% + sink + window). Both
methods build the (99, N) table of lukv.greedy_budget_table from the same curves, in the same
run, and must agree exactly. Times are CPU seconds of this process (steadier than wall seconds
on a shared machine; both are printed), best of --repeats for the fast method, once for the heap.
"""

import argparse
import os
import time

import numpy as np
import torch

import lukv


def timed(fn, repeats=1):
    """(result, cpu seconds, wall seconds) of the fastest of `repeats` calls."""
    best = None
    for _ in range(repeats):
        cpu, wall = time.process_time(), time.perf_counter()
        result = fn()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        best = (result, cpu, wall) if best is None or cpu < best[1] else best
    return best


def realistic_inputs(L, H, T, noise, seed):
    """imp and protected scores (L, H, T) float32, as the oracle and a noisy scorer would give them."""
    g = torch.Generator().manual_seed(seed)
    head_scale = torch.exp(torch.randn(L, H, 1, generator=g))  # heads differ in how much they matter
    imp = head_scale * torch.exp(2.0 * torch.randn(L, H, T, generator=g))  # lognormal utilities
    scores = imp.log() + noise * torch.randn(L, H, T, generator=g)  # the scorer ranks them with noise
    return imp, lukv.protect(scores, lukv.LUKVConfig())


def bench(L, H, T, args):
    cfg = lukv.LUKVConfig()
    imp, scores = realistic_inputs(L, H, T, args.noise, args.seed)
    (curves, floors, n_protected), cpu, wall = timed(lambda: lukv.head_curves(imp, scores, cfg))
    N = L * H
    print(f"\n{N} heads x {T} tokens ({curves.shape[1] - 1} evictable each, floor {floors[0]})")
    print(f"  head_curves (loss curves of all heads)        cpu {cpu:7.2f} s   wall {wall:7.2f} s")

    def table(rows, method):
        return lukv.greedy_budget_table(curves[:rows], floors[:rows], 99, n_protected_total=rows * n_protected,
                                        method=method)

    segments, cpu, wall = timed(lambda: lukv.hull_segments(curves[:, : curves.shape[1] - floors[0]]), args.repeats)
    print(f"  fast: hull_segments (all hulls)               cpu {cpu:7.2f} s   wall {wall:7.2f} s   "
          f"{len(segments[0])} segments")
    fast, fast_cpu, wall = timed(lambda: table(N, "fast"), args.repeats)
    print(f"  fast: greedy_budget_table (99, {N})         cpu {fast_cpu:7.2f} s   wall {wall:7.2f} s")
    _, cpu, wall = timed(lambda: lukv.context_table(imp, scores, cfg), args.repeats)
    print(f"  fast: context_table (curves + table)          cpu {cpu:7.2f} s   wall {wall:7.2f} s")

    rows = N if args.heap_heads <= 0 else min(N, args.heap_heads)
    heap, heap_cpu, wall = timed(lambda: table(rows, "heap"))
    same = fast if rows == N else table(rows, "fast")
    print(f"  heap: greedy_budget_table (99, {rows})         cpu {heap_cpu:7.2f} s   wall {wall:7.2f} s"
          + ("" if rows == N else f"   (first {rows} heads only)"))
    identical = np.array_equal(heap, same)
    print(f"  identical tables: {identical}" + (f"   speed-up {heap_cpu / fast_cpu:.0f}x" if rows == N else ""))
    return identical


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # sizes
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32, help="heads = layers x kv-heads (1,024 by default)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 32768])
    # curves
    parser.add_argument("--noise", type=float, default=1.0, help="scorer noise on log utility (larger: fewer hull corners)")
    parser.add_argument("--seed", type=int, default=0)
    # timing
    parser.add_argument("--repeats", type=int, default=3, help="the fast method's best of")
    parser.add_argument("--heap-heads", type=int, default=0, help="time the heap on this many heads only (0: all)")
    args = parser.parse_args()
    print(f"bench_solver.py: numpy {np.__version__}, {os.cpu_count()} CPUs, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    ok = all([bench(args.layers, args.kv_heads, T, args) for T in args.tokens])
    raise SystemExit(0 if ok else "the fast and heap tables differ")
