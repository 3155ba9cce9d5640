"""Benchmark of the LU-KV solver (solver.py): the readable min-heap sweep against its fast twin, same curves.

    python -m bench.solver                     # 1,024 heads x 2,048 and x 32,768 tokens; the heap takes minutes at 32,768
    python -m bench.solver --heap-heads 128    # the heap on the first 128 heads only (the fast one still on all)

The curves are what profiling makes: per head, utilities lognormal (sigma 2) times a lognormal
head scale, a noisy scorer (score = log utility + N(0, noise)), the cumulative loss in the
scorer's order over the evictable tokens (solver.loss_curves), sink 4, window 16, and a floor of
1% + sink + window (lukv.LUKVConfig's defaults; lukv.head_curves slices them off, as profiling
does). Both methods build the (99, N) table of solver.greedy_budget_table from the same curves,
in the same run, and must agree exactly: the curves are sums of float32 values in float64, so the
heap gets them rounded onto their exact grid, as the fast one rounds them inside. Times are CPU
seconds of this process (steadier than wall seconds on a shared machine; both are printed), best
of --repeats for the fast method, once for the heap.
"""

import os
import time

import numpy as np

import solver
import tasks
from lukv import LUKVConfig, head_curves


def timed(fn, repeats=1):
    """(result, cpu seconds, wall seconds) of the fastest of `repeats` calls."""
    best = None
    for _ in range(repeats):
        cpu, wall = time.process_time(), time.perf_counter()
        result = fn()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        best = (result, cpu, wall) if best is None or cpu < best[1] else best
    return best


def realistic_inputs(N, T, noise, seed):
    """imp and scores (N, T) float32, as the oracle and a noisy scorer would give them."""
    rng = np.random.default_rng(seed)
    head_scale = np.exp(rng.standard_normal((N, 1), dtype=np.float32))  # (N, 1) heads differ in how much they matter
    imp = head_scale * np.exp(2.0 * rng.standard_normal((N, T), dtype=np.float32))  # (N, T) lognormal utilities
    scores = np.log(imp) + noise * rng.standard_normal((N, T), dtype=np.float32)  # (N, T) ranked with noise
    return imp, scores


def bench(N, T, args):
    """Time and print every step for N heads of T tokens; True when the heap's table equals the fast one."""
    imp, scores = realistic_inputs(N, T, args.noise, args.seed)
    cfg = LUKVConfig(sink=args.sink, window=args.window, min_share=args.min_share)
    (curves, floors, n_protected), cpu, wall = timed(lambda: head_curves(imp[None], scores[None], cfg))  # (1, N, T)
    print(f"\n{N} heads x {T} tokens ({curves.shape[1] - 1} evictable each, floor {floors[0]})")
    print(f"  loss_curves (all heads)                       cpu {cpu:7.2f} s   wall {wall:7.2f} s")

    def table(curves, rows, method):
        return solver.greedy_budget_table(curves[:rows], floors[:rows], len(solver.RATIOS),
                                          n_protected_total=rows * n_protected, method=method)

    reachable = curves[:, : curves.shape[1] - floors[0]]  # (N, n+1-floor)
    segments, cpu, wall = timed(lambda: solver.hull_segments(reachable), args.repeats)
    print(f"  fast: hull_segments (all hulls)               cpu {cpu:7.2f} s   wall {wall:7.2f} s   "
          f"{len(segments[0])} segments")
    fast, fast_cpu, wall = timed(lambda: table(curves, N, "fast"), args.repeats)
    print(f"  fast: greedy_budget_table (99, {N})         cpu {fast_cpu:7.2f} s   wall {wall:7.2f} s")
    _, cpu, wall = timed(lambda: table(head_curves(imp[None], scores[None], cfg)[0], N, "fast"), args.repeats)
    print(f"  fast: loss_curves + table                     cpu {cpu:7.2f} s   wall {wall:7.2f} s")

    rows = N if args.heap_heads <= 0 else min(N, args.heap_heads)
    on_grid = np.concatenate([solver.exact_grid(reachable[:rows]), curves[:rows, reachable.shape[1]:]], axis=1)
    heap, heap_cpu, wall = timed(lambda: table(on_grid, rows, "heap"))
    same = fast if rows == N else table(curves, rows, "fast")
    print(f"  heap: greedy_budget_table (99, {rows})         cpu {heap_cpu:7.2f} s   wall {wall:7.2f} s"
          + ("" if rows == N else f"   (first {rows} heads only)"))
    identical = np.array_equal(heap, same)
    print(f"  identical tables: {identical}" + (f"   speed-up {heap_cpu / fast_cpu:.0f}x" if rows == N else ""))
    return identical


def parse(argv=None):
    """(parser, args), every argument checked before any work."""
    parser = tasks.ArgumentParser(description=__doc__.split("\n")[0])
    # sizes
    parser.add_argument("--heads", type=int, default=1024, help="N, every (layer, KV head) pair: 32 x 32 by default")
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 32768])
    # curves
    parser.add_argument("--noise", type=float, default=1.0, help="scorer noise on log utility (larger: fewer hull corners)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sink", type=int, default=4, help="first tokens every head keeps")
    parser.add_argument("--window", type=int, default=16, help="most recent tokens every head keeps")
    parser.add_argument("--min-share", type=float, default=0.01, help="every head keeps at least this share too")
    # timing
    parser.add_argument("--repeats", type=int, default=3, help="the fast method's best of")
    parser.add_argument("--heap-heads", type=int, default=0, help="time the heap on this many heads only (0: all)")
    args = parser.parse_args(argv)
    for name, low in [("heads", 1), ("repeats", 1), ("heap_heads", 0), ("sink", 0), ("window", 0)]:
        tasks.check_range(parser, "--" + name.replace("_", "-"), getattr(args, name), low)
    for T in args.tokens:
        tasks.check_range(parser, "--tokens", T, args.sink + args.window + 1)
    if not (0 <= args.min_share < 1 and args.noise >= 0):
        parser.error(f"expected 0 <= --min-share < 1 and --noise >= 0, got {args.min_share} and {args.noise}")
    return parser, args


if __name__ == "__main__":
    parser, args = parse()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"bench/solver.py: numpy {np.__version__}, {os.cpu_count()} CPUs, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, load average {load}, "
          f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    ok = all([bench(args.heads, T, args) for T in args.tokens])
    raise SystemExit(0 if ok else "the fast and heap tables differ")
