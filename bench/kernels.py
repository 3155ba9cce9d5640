"""
The full benchmark of kernels.py on a CUDA card: every case, eager and CUDA-graph timings, the
tuning variants, the issue's targets as PASS / FAIL; a torch.profiler split; a driver for Nsight.

    python -m bench.kernels                          # the table (H100: a few minutes)
    python -m bench.kernels --quick                  # smaller sizes, two decode cases (a smoke run)
    python -m bench.kernels --out runs/kernels_h100.json
    python -m bench.kernels --profile                # eager vs CUDA-graph vs device time of each v3 path
    python -m bench.kernels --once                   # one evict and one decode: a driver for ncu

kernels.py --bench is the short version (a few eager rows); results/KERNELS.md reads the outputs.
Bytes are counted before timing, as kernels.py counts them per operation: GB/s = bytes / time.
"""

import contextlib
import datetime
import json
from dataclasses import asdict

import torch
import torch.nn.functional as F

import solver
import tasks
from kernels import APPEND, DECODE, EVICT, TUNING, _layout, _select, decode_v3, evict_v1, evict_v3

# the decode cases: (name, B, H KV heads, G query heads per KV head, T context)
DECODE_CASES = [("D1", 1, 32, 1, 32768), ("D2", 8, 8, 4, 32768), ("D3", 1, 8, 4, 32768), ("D4", 1, 8, 4, 131072)]

# variant rows: the same kernels under other TUNING values (pick defaults from one run)
EVICT_VARIANTS = [("slice2048", dict(select_slice=2048, copy_rows=64))]  # half the programs
# (label, overrides, the head groups it changes: "any", "G=1" or "G>1")
DECODE_VARIANTS = [("3/SM", dict(decode_programs_per_sm=3), "any"),
                   ("n64w4s4", dict(decode_block_n=64, decode_warps=4, decode_stages=4), "G=1"),
                   ("n32w4s4", dict(decode_block_n=32, decode_warps=4, decode_stages=4), "G=1"),
                   ("n128w8s2", dict(decode_block_n_gqa=128, decode_warps_gqa=8, decode_stages_gqa=2), "G>1")]


def _lengths(B, H, mean, T, shape, gen):
    """Per-head lengths (B, H) totalling B*H*mean: uniform, spread (0.5x-1.5x) or skewed (one long head)."""
    if shape == "uniform":
        return torch.full((B, H), mean, dtype=torch.long)
    if shape == "spread":
        lengths = torch.linspace(0.5 * mean, 1.5 * mean, H).round().long()
        lengths = torch.stack([lengths[torch.randperm(H, generator=gen)] for _ in range(B)])
    else:  # skewed: one head per batch row holds min(T, H*mean/2) tokens, the others share the rest
        lengths = torch.full((B, H), (H * mean - min(T, H * mean // 2)) // (H - 1), dtype=torch.long)
        lengths[:, 0] = min(T, H * mean // 2)
    lengths[:, -1] += H * mean - lengths.sum(1)  # the same total as uniform
    return lengths


def _evict_inputs(B, H, T, D, dtype, device, gen):
    """E1-style evict inputs: k, v (B, H, T, D), scores (B, H, T), counts (B, H) from 0.5x to 1.5x of 20% of T."""
    k, v = (torch.randn(B, H, T, D, dtype=dtype, device=device) for _ in range(2))
    return k, v, torch.rand(B, H, T, device=device), _lengths(B, H, T // 5, T, "spread", gen)


def _random_packed(lengths, D, dtype, device, slack=32):
    """Random packed K, V (N, D) for per-head lengths (B, H), with start, length, capacity (B, H)."""
    start, length, capacity, N = _layout(lengths, slack, torch.device(device))
    return torch.randn(N, D, dtype=dtype, device=device), torch.randn(N, D, dtype=dtype, device=device), \
        start, length, capacity


def _sdpa(q, k, v):
    """Dense decode with SDPA flash: a group's G query heads are G query tokens of its KV head (no repeat)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v)  # q (B, H, G, D), k, v (B, H, T, D)


@contextlib.contextmanager
def tuned(**overrides):
    """Run a block with some kernels.TUNING fields changed."""
    saved = {name: getattr(TUNING, name) for name in overrides}
    for name, value in overrides.items():
        setattr(TUNING, name, value)
    try:
        yield TUNING
    finally:
        for name, value in saved.items():
            setattr(TUNING, name, value)


def _with(overrides, fn):
    """fn run under tuned(**overrides): a benchmark variant row."""
    def run():
        with tuned(**overrides):
            return fn()
    return run


def _variant_applies(groups, G):
    """Whether a decode variant changes the kernel that runs for head groups of G query heads."""
    return groups == "any" or groups == ("G=1" if G == 1 else "G>1")


def _varlen(q, k_packed, v_packed, start, lengths):
    """AdaKV's design: every (b, h) is its own varlen FlashAttention sequence (rows without slack)."""
    B, H, G, D = q.shape
    valid = torch.arange(int(lengths.max()), device=q.device) < lengths.to(q.device)[..., None]  # (B, H, K)
    rows = (start[..., None] + torch.arange(valid.shape[-1], device=q.device))[valid]  # (S,) heads back to back
    k, v = k_packed[rows][:, None], v_packed[rows][:, None]  # (S, 1, D)
    qv = q.reshape(B * H * G, 1, D)  # G query tokens per sequence, each KV head read once
    cu_q = torch.arange(0, B * H * G + 1, G, dtype=torch.int32, device=q.device)
    cu_k = F.pad(torch.cumsum(lengths.flatten(), 0), (1, 0)).to(q.device, torch.int32)
    max_k = int(lengths.max())

    def run():
        from torch.nn.attention.varlen import varlen_attn  # older torch: ImportError, the row is skipped
        return varlen_attn(qv, k, v, cu_q, cu_k, G, max_k)
    return run


def _capture(fn):
    """fn recorded into a CUDA graph -> (replay, ""), or (None, why) where fn syncs or copies from the host."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up on a side stream, as torch.cuda.graph asks
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        torch.cuda.synchronize()
        return graph.replay, ""
    except Exception as e:  # e.g. v1's boolean indexing and .item() sync the host: eager only
        torch.cuda.synchronize()
        return None, f"{type(e).__name__}: {str(e).strip().splitlines()[0][:70] if str(e) else ''}"


def _require_cuda(what):
    if not torch.cuda.is_available():
        raise SystemExit(f"python -m bench.kernels{' ' + what if what else ''} needs a CUDA card (it times GPU "
                         f"kernels); on the CPU run python -m pytest -q tests/test_kernels.py")


def bench(out=None, quick=False, passes=3):
    """Print one table (and write JSON to `out`): evict, decode and append, each beside its baselines.

    Every row is timed twice: `eager`, the Python call as a user makes it (checks, allocations and
    launches included), and `graph`, one replay of the same call recorded into a CUDA graph (the GPU's
    own time: what a graph-captured decode loop pays). Rows are built first, then timed in `passes`
    interleaved passes; a row's time is the median of its pass medians and `spread` is max / min of
    them, so a noisy row shows itself instead of deciding a target.
    """
    _require_cuda("")
    from triton.testing import do_bench
    dev, dtype, D, elt = "cuda", torch.bfloat16, 128, 2
    gen = torch.Generator().manual_seed(0)
    rows, keep = [], []  # keep: every input stays alive until the last pass

    def add(op, case, impl, fn, nbytes, note="", graph=True):
        rows.append(dict(op=op, case=case, impl=impl, fn=fn, bytes=nbytes, note=note, graph=graph))

    src = torch.empty(2 ** 29, dtype=dtype, device=dev)  # 1 GiB
    dst = torch.empty_like(src)
    add("roof", "copy 1 GiB", "torch copy_", lambda: dst.copy_(src), 2 * 2 ** 30, "read + write")

    # evict: B=1, H=32, T=32k, 20% kept, per-head counts from 0.5x to 1.5x the mean; bytes counted first
    B, H, T = 1, 32, 8192 if quick else 32768
    k, v, scores, counts = _evict_inputs(B, H, T, D, dtype, dev, gen)
    kv_bytes = 4 * int(counts.sum()) * D * elt  # read + write every kept K and V row
    case = f"E1: B={B} H={H} T={T} 20%"
    kept = torch.empty(kv_bytes // 2, dtype=torch.uint8, device=dev)
    kept_out = torch.empty_like(kept)
    keep += [src, dst, k, v, scores, kept, kept_out]
    add("evict", case, "copy of the kept bytes", lambda: kept_out.copy_(kept), kv_bytes, "the roof at this size")
    for impl, note in (("v1", "topk + sort + gather"), ("v2", "torch.compile(v1)"), ("v3", "Triton select+compact")):
        add("evict", case, impl, lambda impl=impl: EVICT[impl](k, v, scores, counts, 4, 64), kv_bytes + 4 * B * H * T,
            note)
    for label, overrides in EVICT_VARIANTS:  # the same kernels with other TUNING values, for choosing defaults
        add("evict", case, f"v3 {label}", _with(overrides, lambda: evict_v3(k, v, scores, counts, 4, 64)),
            kv_bytes + 4 * B * H * T, f"variant: {overrides}")
    counts_dev = counts.to(dev)
    add("evict", case, "v3 select only", lambda: _select(scores, counts_dev, 4, 64), 4 * B * H * T,
        "diagnostic: memset + the radix rounds")

    # decode: one query token per query head over a 20% packed cache
    for name, B, H, G, T in DECODE_CASES[:2] if quick else DECODE_CASES:
        case, mean = f"{name}: B={B} Hq={H * G} Hkv={H} T={T}", T // 5
        q = torch.randn(B, H, G, D, dtype=dtype, device=dev)
        for label, n in (("SDPA flash, full cache", T), ("SDPA flash, uniform 20%", mean)):
            kv = [torch.randn(B, H, n, D, dtype=dtype, device=dev) for _ in range(2)]
            keep += kv
            add("decode", case, label, lambda kv=kv, q=q: _sdpa(q, *kv), B * H * n * 2 * D * elt)
        packed = {}
        for shape in ("uniform", "spread", "skewed"):
            lengths = _lengths(B, H, mean, T, shape, gen)
            packed[shape] = (lengths,) + _random_packed(lengths, D, dtype, dev)[:4]
            keep.append(packed[shape])
        for shape in ("uniform", "spread", "skewed", "uniform again"):  # uniform twice: order effects show
            lengths, kp, vp, start, length = packed[shape.split()[0]]
            nbytes = int(lengths.sum()) * 2 * D * elt
            for impl in ("v1", "v2", "v3") if shape == "spread" else ("v3",):
                add("decode", case, f"{impl} {shape}", lambda impl=impl, q=q, kp=kp, vp=vp, start=start, length=length:
                    DECODE[impl](q, kp, vp, start, length), nbytes)
            for label, overrides, groups in DECODE_VARIANTS if shape in ("spread", "skewed") else ():
                if not _variant_applies(groups, G):
                    continue
                run = _with(overrides, lambda q=q, kp=kp, vp=vp, start=start, length=length:
                            decode_v3(q, kp, vp, start, length))
                add("decode", case, f"v3 {shape} {label}", run, nbytes, f"variant: {overrides}")
            if shape == "spread":
                add("decode", case, "varlen FA, head per seq", _varlen(q, kp, vp, start, lengths), nbytes,
                    "AdaKV's design")

    # append: O(B*H*D) bytes per step, beside re-allocating and copying the cache (AdaKV's append)
    for B, H in ((1, 32), (8, 8)):
        # slack: room for many timed calls (a head that fills up is left as is, check=False)
        kp, vp, start, length, capacity = _random_packed(_lengths(B, H, 6553, 32768, "spread", gen), D, dtype, dev,
                                                         slack=8192)
        pos = torch.zeros(kp.shape[0], dtype=torch.long, device=dev)
        kn, vn = (torch.randn(B, H, 1, D, dtype=dtype, device=dev) for _ in range(2))  # (B, H, T = 1, D)
        keep += [kp, vp, pos, kn, vn]
        case = f"A{1 if B == 1 else 2}: B={B} H={H} D={D}"
        for impl in ("v1", "v3"):
            add("append", case, impl, lambda impl=impl, kp=kp, vp=vp, start=start, length=length, capacity=capacity,
                pos=pos, kn=kn, vn=vn: APPEND[impl](kp, vp, pos, start, length, capacity, kn, vn, 7, check=False),
                4 * B * H * D * elt, "check=False")
        n_used = int(length.sum())  # the re-pack copies the rows in use, as AdaKV's append does
        add("append", case, "re-pack copy", lambda kp=kp, vp=vp, n=n_used: (kp[:n].clone(), vp[:n].clone()),
            4 * n_used * D * elt, "AdaKV-style")

    # compile and capture every row once, then time them all in interleaved passes
    for r in rows:
        try:
            r["fn"]()
            torch.cuda.synchronize()
            r["replay"], why = _capture(r["fn"]) if r["graph"] else (None, "")
            r["graph_note"] = why
        except Exception as e:  # one failing baseline must not lose the table
            r["fn"], r["replay"] = None, None
            r["note"] = f"skipped: {type(e).__name__}: {str(e).strip().splitlines()[0][:90] if str(e) else ''}"
    times = {id(r): ([], []) for r in rows}
    for p in range(passes):
        for r in rows:
            for fn, acc in ((r["fn"], times[id(r)][0]), (r.get("replay"), times[id(r)][1])):
                if fn is not None:  # do_bench flushes L2 before every call
                    acc.append(1000 * do_bench(fn, warmup=10, rep=50, return_mode="median"))
        print(f"pass {p + 1}/{passes} timed", flush=True)
    for r in rows:
        eager, graph = times[id(r)]
        r["us"] = float(torch.tensor(eager).median()) if eager else None
        r["graph_us"] = float(torch.tensor(graph).median()) if graph else None
        r["spread"] = max(eager) / min(eager) if eager else None
        r["graph_spread"] = max(graph) / min(graph) if graph else None
        r["eager_passes"], r["graph_passes"] = eager, graph
        for key in ("fn", "replay", "graph"):
            r.pop(key, None)
    _report(rows, out)


def _report(rows, out):
    """The table, the targets of the issue as PASS / FAIL, and the JSON file.

    GB/s, %roof and speedups use the graph times where a row has one (the GPU's work, the same basis
    for a kernel and its baseline); a ratio falls back to eager / eager when either row has no graph.
    """
    import triton
    props = torch.cuda.get_device_properties(0)
    gpu_us = lambda r: r["graph_us"] or r["us"]  # noqa: E731  (the basis of GB/s)
    # GB/s of the measured 1 GiB copy, the faster of its two timings (a captured copy_ ran slower on an H100)
    roof = rows[0]["bytes"] / min(t for t in (rows[0]["us"], rows[0]["graph_us"]) if t) / 1e3
    head = (f"{props.name} | {datetime.date.today()} | torch {torch.__version__} | triton {triton.__version__} | "
            f"copy roof {roof:.0f} GB/s | bf16, D=128, do_bench medians (L2 flushed) of {len(rows[0]['eager_passes'])} "
            f"interleaved passes")
    by_key = {(r["case"].split(":")[0], r["impl"]): r for r in rows}  # ("D1", "v3 spread") -> row
    base = {"evict": "v1", "decode": "SDPA flash, full cache", "append": "v1"}

    def ratio(a, b):  # time of row a / time of row b: graph / graph where both have one, else eager / eager
        a, b = by_key.get(a), by_key.get(b)
        if not (a and b and a["us"] and b["us"]):
            return None, ""
        if a["graph_us"] and b["graph_us"]:
            return a["graph_us"] / b["graph_us"], "graph"
        return a["us"] / b["us"], "eager"

    print(head)
    print(f"v3 tuning: {asdict(TUNING)}")
    print("eager: the Python call (checks, allocations, launches); graph: a CUDA-graph replay of it (GPU time); "
          "spread: slowest / fastest pass")
    print(f"{'op':7} {'case':28} {'impl':24} {'eager us':>9} {'spread':>6} {'graph us':>9} {'spread':>6} {'MB':>8} "
          f"{'GB/s':>6} {'%roof':>6} {'speedup':>9}  note")
    for r in rows:
        cells = f"{'-':>9} {'':6} {'-':>9} {'':6} {r['bytes'] / 1e6:8.2f}"
        if r["us"]:
            speedup, basis = ratio((r["case"].split(":")[0], base.get(r["op"])), (r["case"].split(":")[0], r["impl"]))
            r.update(gbps=r["bytes"] / gpu_us(r) / 1e3, roof_pct=100 * r["bytes"] / gpu_us(r) / 1e3 / roof,
                     speedup=speedup, speedup_basis=basis)
            graph = f"{r['graph_us']:9.1f} {r['graph_spread']:5.2f}x" if r["graph_us"] else f"{'-':>9} {'':6}"
            cells = (f"{r['us']:9.1f} {r['spread']:5.2f}x {graph} {r['bytes'] / 1e6:8.2f} {r['gbps']:6.0f} "
                     f"{r['roof_pct']:5.0f}% " + (f"{speedup:6.2f}x {basis[0]}" if speedup else ""))
        note = r["note"] + (f" [no graph: {r['graph_note']}]" if r.get("graph_note") else "")
        print(f"{r['op']:7} {r['case'][:28]:28} {r['impl']:24} {cells:81}  {note}")

    e_v3 = by_key.get(("E1", "v3"))
    checks = [("evict v3 GB/s / copy roof >= 0.8", (e_v3["roof_pct"] / 100, "graph" if e_v3["graph_us"] else "eager")
               if e_v3 and e_v3.get("roof_pct") else (None, ""), ">=", 0.8),
              ("evict v1 / v3 time >= 3", ratio(("E1", "v1"), ("E1", "v3")), ">=", 3.0)]
    for name, goal in (("D1", 4.0), ("D2", 3.5), ("D4", 3.0)):
        checks.append((f"{name} full SDPA / v3 time >= {goal}", ratio((name, "SDPA flash, full cache"),
                                                                  (name, "v3 spread")), ">=", goal))
    for name in ("D1", "D2", "D3", "D4"):
        checks.append((f"{name} v3 skewed / uniform time <= 1.15", ratio((name, "v3 skewed"), (name, "v3 uniform")),
                       "<=", 1.15))
        checks.append((f"{name} v3 skewed / uniform again <= 1.15", ratio((name, "v3 skewed"),
                                                                        (name, "v3 uniform again")), "<=", 1.15))
        checks.append((f"{name} varlen FA / v3 time > 1", ratio((name, "varlen FA, head per seq"), (name, "v3 spread")),
                       ">=", 1.0))
    print("targets of the issue (g: graph / graph, e: eager / eager):")
    for name, (value, basis), op, goal in checks:
        ok = value is not None and (value >= goal if op == ">=" else value <= goal)
        print(f"  {name:45} " + ("row missing" if value is None else
                                 f"{value:6.2f} {basis[0]}  {'PASS' if ok else 'FAIL'}"))
    if out:
        record = {"header": head, "device": props.name, "date": str(datetime.date.today()), "torch": torch.__version__,
                  "triton": triton.__version__, "roof_gbps": roof, "tuning": asdict(TUNING), "rows": rows,
                  "targets": [dict(target=n, value=v, basis=b, op=o, goal=g) for n, (v, b), o, g in checks]}
        solver.write_atomic(out, lambda f: f.write(json.dumps(record, indent=1).encode()))
        print(f"wrote {out}")


def _gpu_us_per_call(fn, iters=20):
    """Device time per call from torch.profiler: {kernel name: us}, summed over every kernel, memset and copy."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    per_kernel = {}
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        t = getattr(e, "self_cuda_time_total", 0) if t is None else t
        if t > 0:
            per_kernel[e.key] = t / iters
    return per_kernel


def _graph_us(fn):
    """do_bench of one CUDA-graph replay of fn (no host launch cost); None with the reason if capture fails."""
    from triton.testing import do_bench
    replay, why = _capture(fn)
    return (1000 * do_bench(replay, warmup=25, rep=100, return_mode="median") if replay else None), why


def ncu_driver():
    """Run one E1 evict and one D1 decode with the v3 kernels and nothing else, for Nsight Compute:

        ncu --kernel-name regex:"_radix_round|_compact|_decode_split|_decode_combine" --launch-count 7 \\
            --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \\
            --section LaunchStats --section WarpStateStats python -m bench.kernels --once
    """
    _require_cuda("--once")
    gen = torch.Generator().manual_seed(0)
    dev, dtype, D, B, H, T = "cuda", torch.bfloat16, 128, 1, 32, 32768
    evict_v3(*_evict_inputs(B, H, T, D, dtype, dev, gen), 4, 64)
    q = torch.randn(B, H, 1, D, dtype=dtype, device=dev)
    kp, vp, start, length, _ = _random_packed(_lengths(B, H, T // 5, T, "spread", gen), D, dtype, dev)
    decode_v3(q, kp, vp, start, length)
    torch.cuda.synchronize()
    print("E1 evict v3 and D1 decode v3 ran once each")


def profile_kernels():
    """Where the time of the v3 paths goes: eager do_bench, CUDA-graph replay, and device time per kernel.

    eager - device time is the host's share (checks, allocations, launches) that the GPU waits for.
    """
    _require_cuda("--profile")
    import triton
    from triton.testing import do_bench
    dev, dtype, D = "cuda", torch.bfloat16, 128
    gen = torch.Generator().manual_seed(0)
    runs = []
    k, v, scores, counts = _evict_inputs(1, 32, 32768, D, dtype, dev, gen)
    runs.append(("E1 evict v3", lambda: evict_v3(k, v, scores, counts, 4, 64)))
    for label, overrides in EVICT_VARIANTS:
        runs.append((f"E1 evict v3 {label}", _with(overrides, lambda: evict_v3(k, v, scores, counts, 4, 64))))
    runs.append(("E1 evict v1", lambda: evict_v1(k, v, scores, counts, 4, 64)))
    for name, B, H, G, T in DECODE_CASES:
        q = torch.randn(B, H, G, D, dtype=dtype, device=dev)
        for shape in ("spread", "skewed"):
            kp, vp, start, length, _ = _random_packed(_lengths(B, H, T // 5, T, shape, gen), D, dtype, dev)
            runs.append((f"{name} decode v3 {shape}",
                         lambda q=q, kp=kp, vp=vp, start=start, length=length: decode_v3(q, kp, vp, start, length)))
    print(f"{torch.cuda.get_device_name()} | {datetime.date.today()} | torch {torch.__version__} | "
          f"triton {triton.__version__}")
    print(f"{'path':28} {'eager us':>9} {'graph us':>9} {'device us':>10}  kernels (device us per call)")
    for label, fn in runs:
        fn()
        torch.cuda.synchronize()
        eager = 1000 * do_bench(fn, warmup=25, rep=100, return_mode="median")
        graph, why = _graph_us(fn)
        per_kernel = _gpu_us_per_call(fn)
        top = ", ".join(f"{name[:40]} {us:.1f}" for name, us in sorted(per_kernel.items(), key=lambda x: -x[1])[:5])
        print(f"{label:28} {eager:9.1f} {graph if graph else float('nan'):9.1f} {sum(per_kernel.values()):10.1f}  "
              f"{top}" + (f"  [graph: {why}]" if why else ""), flush=True)


def parse(argv=None):
    """(parser, args), checked before any work: at most one of --quick, --profile and --once; --out only where rows
    are written, a .json file that the repository does not ship (unless --overwrite)."""
    parser = tasks.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group()  # default: the table
    what.add_argument("--quick", action="store_true", help="smaller benchmark sizes (a smoke run)")
    what.add_argument("--profile", action="store_true", help="eager vs CUDA-graph vs device time per v3 path")
    what.add_argument("--once", action="store_true", help="one E1 evict and one D1 decode (a driver for ncu)")
    parser.add_argument("--out", default=None, help="write the benchmark rows as JSON to this .json path")
    parser.add_argument("--overwrite", action="store_true", help="--out may replace a file the repository ships")
    args = parser.parse_args(argv)
    if args.out and (args.profile or args.once):
        parser.error("--out: --profile and --once print and write no rows; leave --out out")
    if args.out:
        tasks.check_output(parser, args.out, ".json", args.overwrite)
    if not torch.cuda.is_available():
        parser.error("bench.kernels times GPU kernels and needs a CUDA card; on the CPU run "
                     "python -m pytest -q tests/test_kernels.py")
    return parser, args


if __name__ == "__main__":
    _, args = parse()
    if args.once:
        ncu_driver()
    elif args.profile:
        profile_kernels()
    else:
        bench(args.out, args.quick)
