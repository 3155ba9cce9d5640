"""
Kernels for a per-head KV cache: eviction (select + compact), decode attention over the packed
cache, and an in-place append, each beside the PyTorch reference it must agree with.

Laid out like a Triton tutorial: reference (v1, plain PyTorch), the reference under
torch.compile (v2), the Triton kernel (v3), a plain-named wrapper, then the benchmark. The packed
layout is model.KVCache's: head (b, h) owns rows start[b, h] ... start + capacity - 1, the first
length[b, h] hold its kept tokens in ascending token order, the rest are spare rows for appends.

    python kernels.py                          # a small agreement check (CPU: v1 and v2 only)
    python kernels.py --bench                  # one table on a CUDA card (H100: a few minutes)
    python kernels.py --bench --out runs/kernels_h100.json
    python kernels.py --profile                # eager vs CUDA-graph vs kernel time of each v3 path (CUDA)
    python kernels.py --once                   # one evict and one decode: a driver for Nsight Compute (ncu)
    python -m pytest -q test_kernels.py        # CPU: Triton runs under TRITON_INTERPRET=1

Eviction follows lukv.compress: the eviction order is a stable ascending sort of the scores, so
among tied scores the lower token index goes first (the higher index is kept); the first `sink`
and last `window` tokens are always kept. Scores are compared as fp32 (-0.0 ties +0.0, NaN ranks
above +inf as in torch.sort), protected tokens above everything.

Shapes: B batch, H KV heads, G query heads per KV head, T tokens, D head dim, K kept tokens per
head, N packed rows (the sum of all capacities), P parts of the decode token stream (one program each).
"""

import argparse
import contextlib
import datetime
import functools
import inspect
import json
import math
import os
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # kernels.py still imports (v1, v2) where Triton is not installed
    import types
    triton = types.SimpleNamespace(jit=lambda fn: fn, cdiv=lambda a, b: -(-a // b),
                                   next_power_of_2=lambda n: 1 << max(0, int(n) - 1).bit_length())
    tl = types.SimpleNamespace(constexpr=lambda x: x)
    HAVE_TRITON = False
else:
    HAVE_TRITON = True

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # read once, as Triton does when kernels are defined
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class Tuning:
    """Block sizes and launch shapes of the v3 kernels; the benchmark prints variant rows of some of them."""
    select_slice: int = 1024  # tokens per program of the radix rounds and the compaction (a power of two;
    #                           2048 tied 1024 in CUDA-graph timings on an H100, 2026-11-27: 128.6 vs 129.9 us)
    select_warps: int = 4  # warps per radix-round program
    radix_bits: int = 8  # bits per radix digit (2, 4 or 8): 32 / radix_bits rounds of 2^radix_bits bins
    histogram_dot: bool = False  # 8-bit digits counted by a one-hot matrix product instead of tl.histogram: 1.6x
    #                              slower per evict on an H100 (207.1 vs 129.9 us), kept as a variant row
    copy_rows: int = 32  # packed rows per copy tile of the compaction kernel (32 x 128 bf16 = 8 KB)
    copy_warps: int = 4  # warps per compaction program
    decode_block_n: int = 64  # keys per inner tile of the decode kernel (one size for every chunk: one compile)
    decode_warps: int = 4  # warps per decode program
    decode_stages: int = 3  # software pipelining depth of the K/V loads (3 x 2 x 16 KB of shared memory)
    decode_block_n_gqa: int = 64  # the same three when G > 1 query heads share a KV head: 64 / 4 / 3 beat
    decode_warps_gqa: int = 4  # 128 / 8 / 2 on D2, D3 and D4 in CUDA-graph timings on an H100, 2026-11-27
    decode_stages_gqa: int = 3  # (D2 93.8 vs 101.6 us; results/kernels_bench_h100_graphs.txt)
    decode_sum_g1: bool = False  # with G = 1, q.k and p.v as multiply-sums over the one query row instead of
    #                              tl.dot, which pads it to 16 rows: slower on an H100 (D1 66.1 vs 54.8 us;
    #                              results/kernels_bench_h100_sum_g1_hoisted.txt), so a variant row
    decode_programs_per_sm: int = 2  # the token stream of all heads is cut into this many equal parts per SM
    decode_min_chunk: int = 256  # fewest tokens per decode program (short caches use fewer programs)
    combine_block: int = 64  # partial results per tile of the combine kernel
    decode_fused_combine: bool = False  # merge each head in the split kernel's last part of it (no second launch):
    #                                     correct, but slower on an H100 (D1 57.2 vs 55.1 us, D2 101.8 vs 93.9 us;
    #                                     results/kernels_bench_h100_fused.txt), so a variant row


TUNING = Tuning()


@contextlib.contextmanager
def tuned(**overrides):
    """Run a block with some TUNING fields changed (the benchmark's variant rows, the tests)."""
    saved = {name: getattr(TUNING, name) for name in overrides}
    for name, value in overrides.items():
        setattr(TUNING, name, value)
    try:
        yield TUNING
    finally:
        for name, value in saved.items():
            setattr(TUNING, name, value)


class PackedKV(NamedTuple):
    """The packed per-head cache of one layer (model.KVCache's layout)."""
    k: torch.Tensor  # (N, D)
    v: torch.Tensor  # (N, D)
    pos: torch.Tensor  # (N,) int64 original token index of every row, -1 on spare rows
    start: torch.Tensor  # (B, H) int64 first row of each head
    length: torch.Tensor  # (B, H) int64 rows in use
    capacity: torch.Tensor  # (B, H) int64 rows owned (length + spare)


# -----------------------------------------------------------------------------
# shared helpers: input checks (before any launch), devices, compile availability


def _check_v3_device(t):
    if not HAVE_TRITON:
        raise RuntimeError("v3 needs Triton (pip install triton); use impl='v1'")
    if not (t.is_cuda or INTERPRET):
        raise ValueError(f"v3 runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1), got device "
                         f"{t.device}; move the inputs to the GPU or use impl='v1'")


def _check_tensor(name, t, dims, dtypes, device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}; put them on one device")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first), got strides {t.stride()}")


def _to_device(x, device):
    """Host metadata to the device; pinned and non-blocking on CUDA, so no stream sync."""
    return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x.to(device)


def _auto_impl(t):
    return "v3" if HAVE_TRITON and t.is_cuda else "v1"


@functools.lru_cache(maxsize=None)
def v2_available(device_type="cpu"):
    """(ok, reason): whether torch.compile works here (it needs a C++ compiler on the CPU)."""
    try:
        torch.compile(lambda x: x * 2 + 1, dynamic=True)(torch.ones(3, device=device_type))
        return True, ""
    except Exception as e:  # any backend failure means: no v2 on this machine
        return False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


@functools.lru_cache(maxsize=None)
def _compiled(fn, device_type):
    ok, reason = v2_available(device_type)
    if not ok:
        raise RuntimeError(f"v2 needs torch.compile, which fails here ({reason}); use v1 (the same math)")
    return torch.compile(fn, dynamic=True)


# -----------------------------------------------------------------------------
# evict, v1: order-preserving keys, topk, sort, gather (the reference)


def score_keys(scores, sink, window):
    """Order-preserving int64 keys (B, H, T): key(a) < key(b) iff a < b as fp32 (sink/window largest)."""
    x = scores.float()
    x = torch.where(x == 0, torch.zeros_like(x), x)  # -0.0 ties +0.0, as in torch.sort
    x = torch.where(torch.isnan(x), torch.full_like(x, float("nan")), x)  # one NaN bit pattern
    bits = x.view(torch.int32).long()  # (B, H, T)
    keys = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: reverse their magnitude
    tok = torch.arange(x.shape[-1], device=x.device)
    protected = (tok < sink) | (tok >= x.shape[-1] - window)  # (T,)
    return keys.masked_fill(protected, 2 ** 31 - 1)


def _select_gather(k, v, scores, counts, sink, window, kmax):
    """Kept token indices (B, H, K) ascending (T pads past a head's count) and their K/V rows."""
    B, H, T, D = k.shape
    ranked = score_keys(scores, sink, window) * 2 ** 32 + torch.arange(T, device=k.device)  # distinct keys
    top = torch.topk(ranked, kmax, dim=-1, sorted=True).indices  # (B, H, K) best first; ties: higher index
    valid = torch.arange(kmax, device=k.device) < counts[..., None]  # (B, H, K)
    kept = torch.sort(top.masked_fill(~valid, T), dim=-1).values  # (B, H, K) ascending, padding last
    src = kept.clamp(max=T - 1)[..., None].expand(B, H, kmax, D)  # (B, H, K, D)
    return kept, torch.gather(k, 2, src), torch.gather(v, 2, src)  # (B, H, K), (B, H, K, D) x 2


def _check_evict(k, v, scores, counts, sink, window, slack):
    """Validate evict inputs; returns counts as a CPU int64 (B, H) tensor (a sync if on the GPU)."""
    _check_tensor("k", k, 4, FLOAT_DTYPES, k.device)
    _check_tensor("v", v, 4, (k.dtype,), k.device)
    _check_tensor("scores", scores, 3, FLOAT_DTYPES, k.device)
    B, H, T, D = k.shape
    if v.shape != k.shape or scores.shape != (B, H, T) or T < 1:
        raise ValueError(f"expected k, v (B, H, T, D) and scores (B, H, T) with T >= 1, got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}, scores {tuple(scores.shape)}")
    if min(sink, window, slack) < 0:
        raise ValueError(f"sink, window and slack must be >= 0, got {sink}, {window}, {slack}")
    counts = torch.as_tensor(counts)
    if counts.dtype not in (torch.int32, torch.int64) or counts.shape != (B, H):
        raise ValueError(f"counts must be integers of shape (B={B}, H={H}), got {counts.dtype} {tuple(counts.shape)}")
    counts = counts.to("cpu", torch.long)
    floor = min(T, sink + window)  # protected tokens are always kept
    if bool((counts < floor).any()) or bool((counts > T).any()):
        raise ValueError(f"each head keeps between sink + window = {floor} (the protected tokens) and T = {T} "
                         f"tokens; got counts from {int(counts.min())} to {int(counts.max())}")
    return counts


_LAYOUTS = {}  # (counts, slack, device) -> the layout's (3, B, H) device tensor and N: see _layout
MAX_LAYOUTS = 256  # distinct layouts kept; entries are never dropped (a recorded CUDA graph may read them)


def _layout(counts, slack, device):
    """start, length, capacity (B, H) on the device and N: heads packed back to back.

    The host -> device copy of a layout is made once per distinct (counts, slack, device) and kept;
    a repeated call copies nothing from the host. That matters for CUDA graphs: a captured copy
    from a temporary pinned buffer would replay whatever that buffer holds later, while a captured
    clone of a kept tensor replays the right layout. Callers get a clone, which they may change in
    place (append grows `length`). Past MAX_LAYOUTS distinct layouts, new ones are copied on every
    call and not kept (do not record those into a graph).
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # "cuda" and "cuda:0" are one device
    key = (counts.numpy().tobytes(), tuple(counts.shape), slack, str(device))
    if key in _LAYOUTS:
        meta, n_rows = _LAYOUTS[key]
    else:
        capacity = counts + slack
        start = torch.cumsum(capacity.flatten(), 0).view_as(capacity) - capacity  # exclusive prefix sum
        meta, n_rows = _to_device(torch.stack([start, counts, capacity]), device), int(capacity.sum())
        if len(_LAYOUTS) < MAX_LAYOUTS:
            _LAYOUTS[key] = meta, n_rows
    meta = meta.clone()  # (3, B, H) a device copy: no host involved
    return meta[0], meta[1], meta[2], n_rows


def _pack(kept, k_kept, v_kept, counts, slack):
    """Scatter kept rows (B, H, K[, D]) into the packed layout (the torch half of v1 and v2)."""
    B, H, K, D = k_kept.shape
    start, length, capacity, N = _layout(counts, slack, k_kept.device)
    slots = torch.arange(K, device=k_kept.device)
    valid = slots < length[..., None]  # (B, H, K)
    rows = (start[..., None] + slots)[valid]  # (n_kept,) head-major, ascending
    k_out, v_out = k_kept.new_zeros(N, D), v_kept.new_zeros(N, D)  # spare rows hold zeros
    pos = torch.full((N,), -1, dtype=torch.long, device=k_kept.device)
    k_out[rows], v_out[rows], pos[rows] = k_kept[valid], v_kept[valid], kept[valid]
    return PackedKV(k_out, v_out, pos, start, length, capacity)


def evict_v1(k, v, scores, counts, sink=0, window=0, slack=32, compiled=False):
    """Keep counts[b, h] tokens of each head by score; returns the packed cache (PackedKV)."""
    counts = _check_evict(k, v, scores, counts, sink, window, slack)
    select_gather = _compiled(_select_gather, k.device.type) if compiled else _select_gather
    kept, k_kept, v_kept = select_gather(k, v, scores, counts.to(k.device), sink, window, int(counts.max()))
    return _pack(kept, k_kept, v_kept, counts, slack)


def evict_v2(k, v, scores, counts, sink=0, window=0, slack=32):
    """v1 with the select + gather under torch.compile (the scatter into the layout stays eager)."""
    return evict_v1(k, v, scores, counts, sink, window, slack, compiled=True)


# -----------------------------------------------------------------------------
# evict, v3: a radix select of each row's threshold key spread over slices of the row, then a sliced compaction
#   _radix_round_kernel  32 / BITS launches, (slices, rows) programs each: round r histograms digit r (from the
#                        top) of the keys still tied with the count-th largest on the higher digits; the slices
#                        of a row add their 256 bins into one row histogram (integer atomics: the same sums in
#                        any order). The last round also stores each slice's own bins for the compaction.
#   _compact_kernel      (slices, rows) programs: the threshold from the row histograms, this slice's output
#                        offset from the bins of earlier slices, positions by block-local prefix sums, then a
#                        dense copy of its kept K/V rows
# Why this shape: one program per row (32 rows) leaves 100 of 132 SMs idle, and tl.histogram costs grow with
# the bin count (2048 bins cost ~9x what 256 do per key), so small digits over many programs per row. The digit
# width is Tuning.radix_bits (BITS): 32 / BITS rounds (ROUNDS) of 2^BITS bins (BINS) each.

INT32_MIN = tl.constexpr(-2 ** 31)
HISTOGRAM_MASK = tl.constexpr(HAVE_TRITON and "mask" in inspect.signature(tl.histogram).parameters)  # Triton 3.4+


@triton.jit
def _score_keys(row_ptr, offs_t, T, sink, window):
    """Order-preserving int32 keys of one row's scores at offs_t; padding gets the smallest key."""
    x = tl.load(row_ptr + offs_t, mask=offs_t < T, other=0.0).to(tl.float32)
    bits = x.to(tl.int32, bitcast=True)
    bits = tl.where(bits == INT32_MIN, 0, bits)  # -0.0 ties +0.0
    bits = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7FC00000, bits)  # every NaN is one NaN
    keys = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: reverse their magnitude
    keys = tl.where((offs_t < sink) | (offs_t >= T - window), 0x7FFFFFFF, keys)  # protected: largest
    return tl.where(offs_t < T, keys, INT32_MIN)


@triton.jit
def _replay_rounds(hist_ptr, count, ROUNDS: tl.constexpr, BINS: tl.constexpr):
    """Follow the count-th largest key through the first ROUNDS row histograms (BINS each).

    Returns (prefix, above, n_in): the digits picked so far as one integer (the bucket), the keys of the
    row above the bucket, and the keys in it. Digits are of the unsigned key u = key + 2^31.
    """
    offs_b = tl.arange(0, BINS)
    prefix = count.to(tl.int64) * 0
    above = count * 0
    n_in = count * 0
    for r in tl.static_range(ROUNDS):
        hist = tl.load(hist_ptr + r * BINS + offs_b)  # (bins,) keys of the bucket per next digit
        at_or_above = above + tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist  # (bins,) non-increasing
        digit = tl.sum((at_or_above >= count).to(tl.int32), 0) - 1  # the last bin still holding the count-th
        n_in = tl.sum(tl.where(offs_b == digit, hist, 0), 0)
        above = tl.sum(tl.where(offs_b == digit, at_or_above, 0), 0) - n_in
        prefix = prefix * BINS + digit
    return prefix, above, n_in


@triton.jit
def _histogram_dot(digit, mask, BITS: tl.constexpr, DOT_F32: tl.constexpr):
    """Histogram (2^BITS,) int32 of the masked digits, as one matrix product on the tensor cores.

    Split each digit into its high and low halves (R = 2^(BITS/2) values each); then
    hist[a * R + b] = #{k : hi_k = a, lo_k = b} = (onehot(hi)^T @ onehot(lo))[a, b]. The one-hot
    matrices cost SLICE * 2R compares where tl.histogram pays about SLICE * R * R, and the sums are
    exact: 0/1 inputs, fp32 accumulation, at most SLICE per bin. Measured (H100, 2026-11-27): the
    rounds got slower, 31-48 us against 9-15 us, because the (SLICE, R) one-hot tiles cut the
    achieved occupancy to 11.5% (results/ncu_h100_histogram_dot.txt); a variant row, not the default.
    """
    R: tl.constexpr = 2 ** (BITS // 2)
    offs_r = tl.arange(0, R)
    hi = (digit[:, None] >> (BITS // 2)) == offs_r[None, :]  # (SLICE, R)
    lo = (digit[:, None] & (R - 1)) == offs_r[None, :]  # (SLICE, R)
    dtype = tl.float32 if DOT_F32 else tl.float16
    a = (hi & mask[:, None]).to(dtype)
    b = lo.to(dtype)
    if DOT_F32:
        hist = tl.dot(tl.trans(a), b, input_precision="ieee")  # (R, R) fp32 counts
    else:
        hist = tl.dot(tl.trans(a), b)  # (R, R) fp32 counts
    return tl.reshape(hist.to(tl.int32), (R * R,))  # row-major: bin a * R + b is the digit


@triton.jit
def _radix_round_kernel(
    scores_ptr,  # (B*H, T) any float dtype, contiguous
    count_ptr,  # (B*H,) int64 tokens each head keeps
    hist_ptr,  # (B*H, ROUNDS, BINS) int32, zeroed: row histograms, summed atomically
    gt_ptr,  # (B*H, n_slices, BINS) int32 out (last round): slice keys above each candidate threshold
    eq_ptr,  # (B*H, n_slices, BINS) int32 out (last round): slice keys equal to each candidate
    T,  # tokens per row
    sink,  # first tokens always kept
    window,  # last tokens always kept
    n_slices,  # cdiv(T, SLICE)
    ROUND: tl.constexpr,  # 0 .. ROUNDS - 1; the earlier rounds' histograms are complete
    SLICE: tl.constexpr,  # tokens per program
    BITS: tl.constexpr,  # bits per digit
    BINS: tl.constexpr,  # 2 ** BITS
    ROUNDS: tl.constexpr,  # 32 // BITS
    HIST_DOT: tl.constexpr,  # histogram by a one-hot matrix product (BITS = 8) instead of tl.histogram
    DOT_F32: tl.constexpr,  # one-hot operands in fp32 (the interpreter), else fp16 (exact: 0/1 inputs, fp32 sums)
):
    slice_id = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    count = tl.load(count_ptr + row).to(tl.int32)
    hist_row = hist_ptr + row * (ROUNDS * BINS)
    # every program replays the earlier rounds itself (a few 256-bin scans): no extra launch to pick digits
    prefix, above, n_in = _replay_rounds(hist_row, count, ROUND, BINS)
    low_bits: tl.constexpr = 32 - BITS * ROUND  # key bits not fixed by the prefix
    lo = ((prefix << low_bits) - 2 ** 31).to(tl.int32)  # the bucket as signed keys lo .. hi (int64 shifts)
    hi = (((prefix + 1) << low_bits) - 1 - 2 ** 31).to(tl.int32)
    offs_t = slice_id * SLICE + tl.arange(0, SLICE)
    keys = _score_keys(scores_ptr + row * T, offs_t, T, sink, window)  # (SLICE,)
    in_bucket = (offs_t < T) & (keys >= lo) & (keys <= hi)
    digit = ((keys ^ INT32_MIN) >> (low_bits - BITS)) & (BINS - 1)  # (& undoes the sign extension)
    offs_b = tl.arange(0, BINS)
    if HIST_DOT:  # BINS = R * R: the histogram as a (R, SLICE) @ (SLICE, R) one-hot product on the tensor cores
        hist = _histogram_dot(digit, in_bucket, BITS, DOT_F32)
    elif HISTOGRAM_MASK:
        hist = tl.histogram(digit, BINS, mask=in_bucket)
    else:  # Triton < 3.4: keys outside the bucket land in bin 0 and are taken out again
        hist = tl.histogram(tl.where(in_bucket, digit, 0), BINS)
        hist -= tl.where(offs_b == 0, SLICE - tl.sum(in_bucket.to(tl.int32), 0), 0)
    tl.atomic_add(hist_row + ROUND * BINS + offs_b, hist, mask=hist > 0, sem="relaxed")
    if ROUND == ROUNDS - 1:  # the compaction's offsets: this slice's counts for every possible last digit
        above_slice = tl.sum(((offs_t < T) & (keys > hi)).to(tl.int32), 0)
        gt = above_slice + tl.sum(hist, 0) - tl.cumsum(hist, 0)  # (bins,) keys above candidate (prefix, b)
        table = (row * n_slices + slice_id) * BINS + offs_b
        tl.store(gt_ptr + table, gt)
        tl.store(eq_ptr + table, hist)


@triton.jit
def _compact_kernel(
    scores_ptr,  # (B*H, T) the same scores
    k_ptr,  # (B*H, T, D) keys, contiguous
    v_ptr,  # (B*H, T, D) values
    hist_ptr,  # (B*H, ROUNDS, BINS) int32 row histograms from _radix_round_kernel
    gt_ptr,  # (B*H, n_slices, BINS) int32 per-slice keys above each candidate threshold
    eq_ptr,  # (B*H, n_slices, BINS) int32 per-slice keys equal to each candidate
    start_ptr,  # (B*H,) int64 first packed row of each head
    count_ptr,  # (B*H,) int64 tokens each head keeps
    capacity_ptr,  # (B*H,) int64 rows each head owns
    pos_ptr,  # (N,) int64 out: token index of every packed row, -1 on spare rows
    k_out_ptr,  # (N, D) packed keys, out (spare rows: zeros)
    v_out_ptr,  # (N, D) packed values, out
    T,  # tokens per row
    sink,  # first tokens always kept
    window,  # last tokens always kept
    n_slices,  # cdiv(T, SLICE)
    D: tl.constexpr,  # head dim
    SLICE: tl.constexpr,  # tokens per program
    BLOCK_S: tl.constexpr,  # earlier slices summed per step
    BLOCK_R: tl.constexpr,  # packed rows per copy tile
    BLOCK_D: tl.constexpr,  # next power of two >= D
    BINS: tl.constexpr,  # bins per radix round
    ROUNDS: tl.constexpr,  # radix rounds
):
    slice_id = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    start = tl.load(start_ptr + row)
    count = tl.load(count_ptr + row)
    # the threshold: the count-th largest key; `above` keys beat it, `n_eq` tie with it
    thr_u, above, n_eq = _replay_rounds(hist_ptr + row * (ROUNDS * BINS), count.to(tl.int32), ROUNDS, BINS)
    thr_key = (thr_u - 2 ** 31).to(tl.int32)
    last_digit = thr_u & (BINS - 1)
    skip = n_eq - (count.to(tl.int32) - above)  # ties evicted: the first `skip` by token index
    # where this slice's kept rows go: the kept rows of earlier slices (ties there are the lowest indices)
    gt_before = count.to(tl.int32) * 0
    eq_before = count.to(tl.int32) * 0
    for s0 in range(0, slice_id, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        table = (row * n_slices + offs_s) * BINS + last_digit
        gt_before += tl.sum(tl.load(gt_ptr + table, mask=offs_s < slice_id, other=0), 0)
        eq_before += tl.sum(tl.load(eq_ptr + table, mask=offs_s < slice_id, other=0), 0)
    first = (gt_before + tl.maximum(eq_before - skip, 0)).to(tl.int64)
    # 1. positions: block-local prefix sums in ascending token order
    offs_t = slice_id * SLICE + tl.arange(0, SLICE)
    keys = _score_keys(scores_ptr + row * T, offs_t, T, sink, window)
    tie = (keys == thr_key) & (offs_t < T)
    keep = ((keys > thr_key) & (offs_t < T)) | (tie & (eq_before + tl.cumsum(tie.to(tl.int32), 0) > skip))
    slot = first + tl.cumsum(keep.to(tl.int32), 0) - 1
    tl.store(pos_ptr + start + slot, offs_t.to(tl.int64), mask=keep & (slot < count))  # never past the head
    n_keep = tl.minimum(tl.sum(keep.to(tl.int32), 0), tl.maximum(count - first, 0))
    tl.debug_barrier()  # the positions written above are read back by other threads
    # 2. copy the slice's kept K/V rows densely; the last slice also clears the spare rows
    end = first + n_keep
    if slice_id == n_slices - 1:  # (int64 on both paths)
        end = tl.load(capacity_ptr + row)
    offs_d = tl.arange(0, BLOCK_D)
    for r0 in range(first, end, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        kept_r = offs_r < first + n_keep  # (BLOCK_R,) rows copied; the others up to `end` are spare
        tok = tl.load(pos_ptr + start + offs_r, mask=kept_r, other=0)
        src = (row * T + tok)[:, None] * D + offs_d[None, :]  # (BLOCK_R, BLOCK_D) int64
        dst = (start + offs_r)[:, None] * D + offs_d[None, :]
        mask_src = kept_r[:, None] & (offs_d[None, :] < D)
        mask_dst = (offs_r < end)[:, None] & (offs_d[None, :] < D)
        tl.store(k_out_ptr + dst, tl.load(k_ptr + src, mask=mask_src, other=0.0), mask=mask_dst)
        tl.store(v_out_ptr + dst, tl.load(v_ptr + src, mask=mask_src, other=0.0), mask=mask_dst)
        tl.store(pos_ptr + start + offs_r, tl.full([BLOCK_R], -1, tl.int64), mask=(offs_r < end) & ~kept_r)


def _select(scores, counts, sink, window):
    """The radix rounds -> row histograms (B*H, ROUNDS, BINS), per-slice tables gt, eq (B*H, n_slices, BINS), SLICE."""
    B, H, T = scores.shape
    slice_len = TUNING.select_slice  # one size for every T: GPU tests and runs compile it once
    bits = TUNING.radix_bits
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"Tuning.radix_bits must divide the 32-bit key into equal digits of at most 8 bits "
                         f"(1, 2, 4 or 8), got {bits}: other widths leave key bits unselected")
    n_slices, rounds = triton.cdiv(T, slice_len), 32 // bits
    hist = torch.zeros(B * H, rounds, 2 ** bits, dtype=torch.int32, device=scores.device)
    gt, eq = (torch.empty(B * H, n_slices, 2 ** bits, dtype=torch.int32, device=scores.device) for _ in range(2))
    for r in range(rounds):
        _radix_round_kernel[(n_slices, B * H)](scores, counts, hist, gt, eq, T, sink, window, n_slices, ROUND=r,
                                               SLICE=slice_len, BITS=bits, BINS=2 ** bits, ROUNDS=rounds,
                                               HIST_DOT=TUNING.histogram_dot and bits == 8, DOT_F32=INTERPRET,
                                               num_warps=TUNING.select_warps)
    return hist, gt, eq, slice_len


def evict_v3(k, v, scores, counts, sink=0, window=0, slack=32):
    """Triton radix select (32 / radix_bits rounds) and sliced compaction: one launch each, a memset, no sync."""
    counts = _check_evict(k, v, scores, counts, sink, window, slack)
    _check_v3_device(k)
    B, H, T, D = k.shape
    start, length, capacity, N = _layout(counts, slack, k.device)
    pos = torch.empty(N, dtype=torch.long, device=k.device)
    k_out, v_out = k.new_empty(N, D), v.new_empty(N, D)
    if N == 0:  # nothing kept, no spare rows: nothing to launch
        return PackedKV(k_out, v_out, pos, start, length, capacity)
    hist, gt, eq, slice_len = _select(scores, length, sink, window)
    n_slices = gt.shape[1]
    _compact_kernel[(n_slices, B * H)](
        scores, k, v, hist, gt, eq, start, length, capacity, pos, k_out, v_out, T, sink, window, n_slices, D=D,
        SLICE=slice_len, BLOCK_S=64, BLOCK_R=TUNING.copy_rows, BLOCK_D=triton.next_power_of_2(D),
        BINS=hist.shape[2], ROUNDS=hist.shape[1], num_warps=TUNING.copy_warps)
    return PackedKV(k_out, v_out, pos, start, length, capacity)


EVICT = {"v1": evict_v1, "v2": evict_v2, "v3": evict_v3}


def evict(k, v, scores, counts, sink=0, window=0, slack=32, impl="auto"):
    """Keep counts[b, h] tokens of k, v (B, H, T, D) by score -> PackedKV. impl: auto / v1 / v2 / v3."""
    return EVICT[_auto_impl(k) if impl == "auto" else impl](k, v, scores, counts, sink, window, slack)


def evict_into_cache(cache, layer, k, v, scores, counts, sink=0, window=0, impl="auto"):
    """Evict a prompt's k, v (B, H, T, D) straight into one layer of a model.KVCache (slack = cache.slack)."""
    B, H, T, D = k.shape
    if (B, H, D) != (cache.B, cache.cfg.n_kv_head, cache.cfg.head_dim):
        raise ValueError(f"k has shape {tuple(k.shape)}, the cache expects (B={cache.B}, H={cache.cfg.n_kv_head}, "
                         f"T, D={cache.cfg.head_dim})")
    k, v = k.to(cache.device, cache.dtype).contiguous(), v.to(cache.device, cache.dtype).contiguous()
    packed = evict(k, v, scores.to(cache.device).contiguous(), counts, sink, window, cache.slack, impl)
    cache.k[layer], cache.v[layer], cache.pos[layer] = packed.k, packed.v, packed.pos
    cache.start[layer], cache.length[layer], cache.capacity[layer] = packed.start, packed.length, packed.capacity
    if layer == cache.cfg.n_layer - 1:
        cache.seen = max(cache.seen, T)
    return packed


# -----------------------------------------------------------------------------
# decode attention, v1: pad every head to the longest, mask, softmax (the reference)


def _check_decode(q, k_packed, v_packed, start, length, dtypes):
    _check_tensor("q", q, 4, dtypes, q.device)
    _check_tensor("k_packed", k_packed, 2, (q.dtype,), q.device)
    _check_tensor("v_packed", v_packed, 2, (q.dtype,), q.device)
    _check_tensor("start", start, 2, (torch.int64,), q.device)
    _check_tensor("length", length, 2, (torch.int64,), q.device)
    B, H, G, D = q.shape
    if k_packed.shape != v_packed.shape or k_packed.shape[1] != D or start.shape != (B, H) or length.shape != (B, H):
        raise ValueError(f"expected q (B, H, G, D), k_packed and v_packed (N, D), start and length (B, H); got q "
                         f"{tuple(q.shape)}, k_packed {tuple(k_packed.shape)}, v_packed {tuple(v_packed.shape)}, "
                         f"start {tuple(start.shape)}, length {tuple(length.shape)}")


def _attend_padded(q, k_packed, v_packed, start, length, scale, kmax):
    """q (B, H, G, D) over each head's first length rows; an empty head gives zeros."""
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    slots = torch.arange(kmax, device=q.device)
    valid = slots < length[..., None]  # (B, H, K)
    rows = (start[..., None] + slots).clamp(0, max(k_packed.shape[0] - 1, 0))  # (B, H, K)
    keys, values = k_packed[rows].to(ct), v_packed[rows].to(ct)  # (B, H, K, D) each
    values = values.masked_fill(~valid[..., None], 0.0)  # padding may read garbage rows: 0 * NaN is NaN
    s = torch.einsum("bhgd,bhkd->bhgk", q.to(ct), keys) * scale  # (B, H, G, K)
    probs = torch.softmax(s.masked_fill(~valid[:, :, None], float("-inf")), dim=-1)
    probs = torch.where(valid[:, :, None], probs, 0.0)  # empty heads: 0, not NaN
    return torch.einsum("bhgk,bhkd->bhgd", probs, values).to(q.dtype)  # (B, H, G, D)


def decode_v1(q, k_packed, v_packed, start, length, scale=None, compiled=False):
    """One decode step over the packed cache (model.KVCache.attend's math); fp64 inputs give fp64."""
    _check_decode(q, k_packed, v_packed, start, length, FLOAT_DTYPES + (() if compiled else (torch.float64,)))
    kmax = int(length.max()) if length.numel() else 0
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    attend = _compiled(_attend_padded, q.device.type) if compiled else _attend_padded
    return attend(q, k_packed, v_packed, start, length, scale, kmax)


def decode_v2(q, k_packed, v_packed, start, length, scale=None):
    """v1 under torch.compile."""
    return decode_v1(q, k_packed, v_packed, start, length, scale, compiled=True)


# -----------------------------------------------------------------------------
# decode attention, v3: split-KV over equal parts of one token stream, then a log-sum-exp combine
#   The kept rows of all heads, laid end to end, form one stream of sum(length) tokens. It is cut into
#   parts of `width` tokens, one program each, so every program reads the same number of bytes however
#   skewed the per-head lengths are (a work list of fixed chunks per head leaves a long head's chunks to
#   a few late waves, and many short programs pay their start-up latency many times).
#   _decode_split_kernel    one program per part: an online softmax over each head segment in its part
#                           (most parts hold one or two); partial result of (part p, head h) in slot p + h
#   _decode_combine_kernel  one program per (head, query head of the group): the log-sum-exp merge of the
#                           head's parts p_first .. p_last, found by arithmetic, not by a table
# Slot p + h is unique: walking the stream, each new segment moves to the next part or the next head (or
# both), so p + h strictly increases; hence P + B*H slots suffice.
# Fused (Tuning.decode_fused_combine): no second launch. After writing a segment, a part takes a ticket
# for its head (an atomic counter, acquire-release); the part that takes the head's last ticket sees
# every other part's partial result and merges them with the same _merge_parts, then resets the counter.


@triton.jit
def _token_stream(length_ptr, n_heads, n_parts, chunk, min_chunk, BLOCK_HEADS: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """Head ends in the token stream (BLOCK_HEADS,), lengths, the total and the part width (scalars)."""
    offs_h = tl.arange(0, BLOCK_HEADS)
    lengths = tl.load(length_ptr + offs_h, mask=offs_h < n_heads, other=0)  # (BLOCK_HEADS,) int64
    ends = tl.cumsum(lengths, 0)  # (BLOCK_HEADS,) where each head's segment of the stream ends
    total = tl.sum(lengths, 0)
    auto = (total + n_parts - 1) // n_parts  # equal parts of the whole stream ...
    auto = tl.maximum((auto + BLOCK_N - 1) // BLOCK_N * BLOCK_N, min_chunk)  # ... in whole tiles, not too short
    width = tl.where(chunk > 0, chunk + 0 * total, auto)  # a caller's chunk wins (tests, tuning)
    return offs_h, lengths, ends, total, width


@triton.jit
def _merge_parts(o_part_ptr, lse_part_ptr, out_ptr, head, g, p_first, n, n_slots, G, D: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[head, g] = the log-sum-exp merge of the head's n partial results, slots p_first + head + 0 .. n - 1."""
    offs_c = tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    l = (n * 0).to(tl.float32)  # scalar running sums
    m = l - float("inf")
    acc = tl.zeros([BLOCK_D], tl.float32)
    for c0 in range(0, n, BLOCK_C):  # one pass: rescale the running sums when the maximum grows
        slot = p_first + c0 + offs_c + head  # (BLOCK_C,)
        mask_c = (c0 + offs_c < n) & (slot < n_slots)  # (lengths past N never read past the buffer)
        lse = tl.load(lse_part_ptr + slot * G + g, mask=mask_c, other=float("-inf"))
        o = tl.load(o_part_ptr + (slot * G + g)[:, None] * D + offs_d[None, :],
                    mask=mask_c[:, None] & (offs_d[None, :] < D), other=0.0)  # (BLOCK_C, BLOCK_D)
        m_new = tl.maximum(m, tl.max(lse, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: weights 0, not NaN
        alpha = tl.exp2(m - m_safe)
        w = tl.exp2(lse - m_safe)  # (BLOCK_C,)
        l = l * alpha + tl.sum(w, 0)
        acc = acc * alpha + tl.sum(w[:, None] * o, 0)
        m = m_new
    out = tl.where(l > 0, acc / l, 0.0)  # an empty head attends to nothing: zeros
    tl.store(out_ptr + (head * G + g) * D + offs_d, out.to(out_ptr.dtype.element_ty), mask=offs_d < D)


@triton.jit
def _decode_split_kernel(
    q_ptr,  # (B*H, G, D) one query token per query head
    k_ptr,  # (N, D) packed keys
    v_ptr,  # (N, D) packed values
    start_ptr,  # (B*H,) int64 first row of each head
    length_ptr,  # (B*H,) int64 rows each head attends to
    o_part_ptr,  # (P + B*H, G, D) fp32 out: each segment's normalised output, slot part + head
    lse_part_ptr,  # (P + B*H, G) fp32 out: each segment's log2-sum-exp2
    n_heads,  # B*H
    n_rows,  # N (reads never leave the packed tensors)
    n_parts,  # P, the grid: the stream is cut into at most this many parts
    chunk,  # tokens per part, or 0: cdiv(total, P) rounded up to whole tiles, at least min_chunk
    min_chunk,  # shortest automatic part
    qk_scale,  # softmax scale * log2(e)
    G,  # query heads per KV head
    D: tl.constexpr,  # head dim
    BLOCK_HEADS: tl.constexpr,  # next power of two >= B*H
    BLOCK_G: tl.constexpr,  # G padded to >= 16 rows for tl.dot; 1 when not USE_DOT
    BLOCK_N: tl.constexpr,  # keys per inner tile
    BLOCK_D: tl.constexpr,  # next power of two >= D, >= 16
    PRECISION: tl.constexpr,  # tl.dot input precision ("ieee" for fp32 inputs)
    DOT_F32: tl.constexpr,  # upcast dot operands (the Triton 3.9 interpreter's bf16 tl.dot is wrong)
    USE_DOT: tl.constexpr,  # tl.dot over BLOCK_G query rows; False: G = 1, multiply-sums over one row
    out_ptr,  # (B*H, G, D) out when FUSED: the merged attention output, in the query dtype
    ticket_ptr,  # (>= B*H,) int32 when FUSED: parts of each head done so far; zero between calls
    FUSED: tl.constexpr,  # merge each head in the last part to finish it (no combine launch)
    BLOCK_C: tl.constexpr,  # partial results per merge tile (FUSED)
):
    tl.static_assert(USE_DOT or BLOCK_G == 1, "the multiply-sum path takes one query row")
    part = tl.program_id(0).to(tl.int64)
    offs_h, lengths, ends, total, width = _token_stream(length_ptr, n_heads, n_parts, chunk, min_chunk,
                                                        BLOCK_HEADS, BLOCK_N)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    if FUSED:
        if part == 0:  # heads with no rows are in no part: their output is zeros
            empty = (offs_h < n_heads) & (lengths == 0)  # (BLOCK_HEADS,)
            for g in range(G):
                tl.store(out_ptr + (offs_h[:, None] * G + g) * D + offs_d[None, :],
                         tl.zeros([BLOCK_HEADS, BLOCK_D], tl.float32).to(out_ptr.dtype.element_ty),
                         mask=empty[:, None] & (offs_d[None, :] < D))
    lo = part * width  # this part is stream tokens lo .. hi - 1
    hi = tl.minimum(lo + width, total)
    if lo >= hi:  # the grid is an upper bound on the parts
        return
    first_head = tl.sum((ends <= lo).to(tl.int32), 0)  # heads that end before the part are skipped
    last_head = tl.sum((ends - lengths < hi).to(tl.int32), 0) - 1  # the last head that starts inside it
    mask_gd = (offs_g[:, None] < G) & (offs_d[None, :] < D)
    for head in range(first_head, last_head + 1):
        head_end = tl.sum(tl.where(offs_h == head, ends, 0), 0)
        head_begin = head_end - tl.sum(tl.where(offs_h == head, lengths, 0), 0)
        t0 = tl.maximum(lo, head_begin) - head_begin  # this segment: the head's rows t0 .. t1 - 1
        t1 = tl.minimum(hi, head_end) - head_begin
        row0 = tl.load(start_ptr + head)
        q = tl.load(q_ptr + (head * G + offs_g)[:, None] * D + offs_d[None, :], mask=mask_gd, other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
        if not USE_DOT:  # BLOCK_G = 1: the one query row, once per head
            q_row = tl.sum(q.to(tl.float32), 0)  # (BLOCK_D,)
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for n0 in range(t0, t1, BLOCK_N):  # the G query heads share one read of each K/V tile
            rows = row0 + n0 + tl.arange(0, BLOCK_N)
            mask_n = (rows < row0 + t1) & (rows >= 0) & (rows < n_rows)
            mask_nd = mask_n[:, None] & (offs_d[None, :] < D)
            k = tl.load(k_ptr + rows[:, None] * D + offs_d[None, :], mask=mask_nd, other=0.0)  # (BLOCK_N, BLOCK_D)
            if DOT_F32:
                k = k.to(tl.float32)
            if USE_DOT:
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_G, BLOCK_N)
            else:  # the query row times each key, summed over D
                s = tl.sum(k.to(tl.float32) * q_row[None, :], 1)[None, :] * qk_scale  # (1, BLOCK_N)
            s = tl.where(mask_n[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + rows[:, None] * D + offs_d[None, :], mask=mask_nd, other=0.0)
            if DOT_F32:
                v = v.to(tl.float32)
            if USE_DOT:
                pv = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)  # (BLOCK_G, BLOCK_D)
            else:  # sum(p, 0) only drops the one row; p stays fp32 (the dot path rounds it to v's dtype)
                pv = tl.sum(tl.sum(p, 0)[:, None] * v.to(tl.float32), 0)[None, :]  # (1, BLOCK_D)
            acc = acc * alpha[:, None] + pv
            m = m_new
        slot = part + head
        # an empty head inside the part writes nothing (its slot may be another segment's)
        write_g = (offs_g < G) & (t0 + 0 * offs_g < t1)  # (BLOCK_G,)
        tl.store(o_part_ptr + (slot * G + offs_g)[:, None] * D + offs_d[None, :], acc / l[:, None],
                 mask=write_g[:, None] & (offs_d[None, :] < D))
        tl.store(lse_part_ptr + slot * G + offs_g, m + tl.log2(l), mask=write_g)
        if FUSED:
            if t0 < t1:  # a ticket per head: the part that takes the last one merges the head
                n_h = (head_end - 1) // width - head_begin // width + 1  # the parts that hold this head's rows
                tl.debug_barrier()  # every thread's partial stores come before the ticket (released by it)
                ticket = tl.atomic_add(ticket_ptr + head, 1, sem="acq_rel")
                if ticket == n_h - 1:  # the others are done and their partials visible (acquired)
                    for g in range(G):
                        _merge_parts(o_part_ptr, lse_part_ptr, out_ptr, head, g, head_begin // width, n_h,
                                     n_parts + n_heads, G, D, BLOCK_C, BLOCK_D)
                    tl.atomic_xchg(ticket_ptr + head, 0, sem="relaxed")  # ready for the next call


@triton.jit
def _decode_combine_kernel(
    o_part_ptr,  # (P + B*H, G, D) fp32 per-segment outputs
    lse_part_ptr,  # (P + B*H, G) fp32 per-segment log2-sum-exp2
    length_ptr,  # (B*H,) int64
    out_ptr,  # (B*H, G, D) out, in the query dtype
    n_heads,  # B*H
    n_parts,  # P, as in the split kernel
    chunk,  # as in the split kernel
    min_chunk,  # as in the split kernel
    G,  # query heads per KV head
    D: tl.constexpr,  # head dim
    BLOCK_HEADS: tl.constexpr,  # next power of two >= B*H
    BLOCK_N: tl.constexpr,  # the split kernel's tile (it rounds the part width)
    BLOCK_C: tl.constexpr,  # partial results per tile
    BLOCK_D: tl.constexpr,  # next power of two >= D
):
    head = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    offs_h, lengths, ends, total, width = _token_stream(length_ptr, n_heads, n_parts, chunk, min_chunk,
                                                        BLOCK_HEADS, BLOCK_N)
    head_end = tl.sum(tl.where(offs_h == head, ends, 0), 0)
    head_len = tl.sum(tl.where(offs_h == head, lengths, 0), 0)
    p_first = (head_end - head_len) // width  # the parts that hold this head's rows
    n = tl.where(head_len > 0, (head_end - 1) // width - p_first + 1, 0)
    _merge_parts(o_part_ptr, lse_part_ptr, out_ptr, head, g, p_first, n, n_parts + n_heads, G, D, BLOCK_C, BLOCK_D)


@functools.lru_cache(maxsize=None)
def _sm_count(device):
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


_TICKETS = {}  # device -> int32 counters, one per head, zero between calls (the fused merge resets its own)


def _tickets(device, n_heads):
    """The fused decode's per-head ticket counters; kept (a CUDA graph may record them), grown when needed.

    One set per device: two fused decodes running at once on different streams would share them.
    """
    if device not in _TICKETS or _TICKETS[device].numel() < n_heads:
        _TICKETS[device] = torch.zeros(max(n_heads, 256), dtype=torch.int32, device=device)
    return _TICKETS[device]


def decode_v3(q, k_packed, v_packed, start, length, scale=None, chunk=None):
    """Triton split-KV decode: 2 launches (1 with Tuning.decode_fused_combine), metadata on the device (no sync).

    chunk: tokens per split program; None cuts the stream into Tuning.decode_programs_per_sm parts per SM.
    """
    _check_decode(q, k_packed, v_packed, start, length, FLOAT_DTYPES)
    _check_v3_device(q)
    B, H, G, D = q.shape
    n_heads, n_rows = B * H, k_packed.shape[0]
    if n_rows == 0 or n_heads == 0:  # no rows at all: every head attends to nothing
        return torch.zeros_like(q)
    if chunk:  # enough parts for any lengths that fit the packed tensors (sum(length) <= N)
        n_parts, min_chunk = triton.cdiv(n_rows, chunk), chunk
    else:
        n_parts, min_chunk, chunk = TUNING.decode_programs_per_sm * _sm_count(q.device), TUNING.decode_min_chunk, 0
    o_part = torch.empty(n_parts + n_heads, G, D, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(n_parts + n_heads, G, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    block_heads, block_d = triton.next_power_of_2(n_heads), max(16, triton.next_power_of_2(D))
    block_n, warps, stages = (TUNING.decode_block_n_gqa, TUNING.decode_warps_gqa, TUNING.decode_stages_gqa) if G > 1 \
        else (TUNING.decode_block_n, TUNING.decode_warps, TUNING.decode_stages)
    upcast = INTERPRET and q.dtype == torch.bfloat16
    use_dot = G > 1 or not TUNING.decode_sum_g1
    fused = TUNING.decode_fused_combine
    tickets = _tickets(q.device, n_heads) if fused else o_part  # (unused when not fused)
    _decode_split_kernel[(n_parts,)](
        q, k_packed, v_packed, start, length, o_part, lse_part, n_heads, n_rows, n_parts, chunk, max(1, min_chunk),
        scale * math.log2(math.e), G, D=D, BLOCK_HEADS=block_heads,
        BLOCK_G=max(16, triton.next_power_of_2(G)) if use_dot else 1,
        BLOCK_N=block_n, BLOCK_D=block_d, PRECISION="ieee" if q.dtype == torch.float32 or upcast else "tf32",
        DOT_F32=upcast, USE_DOT=use_dot, out_ptr=out, ticket_ptr=tickets, FUSED=fused, BLOCK_C=TUNING.combine_block,
        num_warps=warps, num_stages=stages)
    if not fused:
        _decode_combine_kernel[(n_heads, G)](
            o_part, lse_part, length, out, n_heads, n_parts, chunk, max(1, min_chunk), G, D=D,
            BLOCK_HEADS=block_heads, BLOCK_N=block_n, BLOCK_C=TUNING.combine_block, BLOCK_D=block_d, num_warps=4)
    return out


DECODE = {"v1": decode_v1, "v2": decode_v2, "v3": decode_v3}


def decode_attention(q, k_packed, v_packed, start, length, scale=None, impl="auto"):
    """q (B, H, G, D) attends to each head's packed rows -> (B, H, G, D), like KVCache.attend."""
    return DECODE[_auto_impl(q) if impl == "auto" else impl](q, k_packed, v_packed, start, length, scale)


# -----------------------------------------------------------------------------
# append one decoded token per head in place: O(B * H * D) bytes, no copy of the cache


def _check_append(k_packed, v_packed, pos, start, length, capacity, k_new, v_new, check):
    dev = k_packed.device
    _check_tensor("k_packed", k_packed, 2, FLOAT_DTYPES, dev)
    _check_tensor("v_packed", v_packed, 2, (k_packed.dtype,), dev)
    _check_tensor("k_new", k_new, 3, (k_packed.dtype,), dev)
    _check_tensor("v_new", v_new, 3, (k_packed.dtype,), dev)
    for name, t in (("pos", pos), ("start", start), ("length", length), ("capacity", capacity)):
        _check_tensor(name, t, 1 if name == "pos" else 2, (torch.int64,), dev)
    B, H, D = k_new.shape
    if v_new.shape != k_new.shape or v_packed.shape != k_packed.shape or k_packed.shape[1] != D or \
            pos.shape[0] != k_packed.shape[0] or not start.shape == length.shape == capacity.shape == (B, H):
        raise ValueError(f"expected k_new, v_new (B, H, D), k_packed, v_packed (N, D), pos (N,), start, length, "
                         f"capacity (B, H); got k_new {tuple(k_new.shape)}, v_new {tuple(v_new.shape)}, k_packed "
                         f"{tuple(k_packed.shape)}, pos {tuple(pos.shape)}, start {tuple(start.shape)}")
    if check and bool((length >= capacity).any()):  # one sync; check=False leaves it to the kernel
        full = (length >= capacity).nonzero()[0].tolist()
        raise ValueError(f"capacity overflow: head (b, h) = {full} has no spare row left; re-pack the cache "
                         f"with more slack (KVCache.append re-packs) before appending")


def append_v1(k_packed, v_packed, pos, start, length, capacity, k_new, v_new, position, check=True):
    """Write k_new, v_new (B, H, D) at row start + length of every head; length += 1 (in place)."""
    _check_append(k_packed, v_packed, pos, start, length, capacity, k_new, v_new, check)
    rows = start + length  # (B, H)
    fits = (length < capacity) & (rows >= 0) & (rows < k_packed.shape[0])  # full heads: skipped, no stray write
    rows = rows[fits]  # (n,)
    k_packed[rows], v_packed[rows], pos[rows] = k_new[fits], v_new[fits], position
    length += fits.long()


@triton.jit
def _append_kernel(
    k_new_ptr,  # (B*H, D) the new token's keys
    v_new_ptr,  # (B*H, D) and values
    k_ptr,  # (N, D) packed keys, written in place
    v_ptr,  # (N, D) packed values
    pos_ptr,  # (N,) int64 token positions
    start_ptr,  # (B*H,) int64
    length_ptr,  # (B*H,) int64, incremented in place
    capacity_ptr,  # (B*H,) int64
    position,  # token position of the new token
    n_rows,  # N (no write outside the packed tensors)
    D: tl.constexpr,  # head dim
    BLOCK_D: tl.constexpr,  # next power of two >= D
):
    head = tl.program_id(0).to(tl.int64)
    n = tl.load(length_ptr + head)
    offs_d = tl.arange(0, BLOCK_D)
    row = tl.load(start_ptr + head) + n + 0 * offs_d  # (BLOCK_D,) the same row in every lane
    # a full head is left as is (the wrapper raised already unless check=False), and no write leaves the tensors
    fits = (row - tl.load(start_ptr + head) < tl.load(capacity_ptr + head)) & (row >= 0) & (row < n_rows)
    mask = (offs_d < D) & fits
    tl.store(k_ptr + row * D + offs_d, tl.load(k_new_ptr + head * D + offs_d, mask=mask), mask=mask)
    tl.store(v_ptr + row * D + offs_d, tl.load(v_new_ptr + head * D + offs_d, mask=mask), mask=mask)
    tl.store(pos_ptr + row, position + 0 * row, mask=fits & (offs_d == 0))
    tl.store(length_ptr + head, n + tl.max(fits.to(tl.int64), 0))


def append_v3(k_packed, v_packed, pos, start, length, capacity, k_new, v_new, position, check=True):
    """Triton append: one launch, one program per head."""
    _check_append(k_packed, v_packed, pos, start, length, capacity, k_new, v_new, check)
    _check_v3_device(k_packed)
    B, H, D = k_new.shape
    _append_kernel[(B * H,)](k_new, v_new, k_packed, v_packed, pos, start, length, capacity, position,
                             k_packed.shape[0], D=D,
                             BLOCK_D=triton.next_power_of_2(D), num_warps=1)


APPEND = {"v1": append_v1, "v3": append_v3}


def append_(k_packed, v_packed, pos, start, length, capacity, k_new, v_new, position, impl="auto", check=True):
    """Append one token per head in place; raises on capacity overflow (check=False: full heads skip)."""
    fn = APPEND[_auto_impl(k_packed) if impl == "auto" else impl]
    fn(k_packed, v_packed, pos, start, length, capacity, k_new, v_new, position, check)


# -----------------------------------------------------------------------------
# benchmark: bytes first, then triton.testing.do_bench (median, L2 flushed) side by side


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
    start, length, capacity, N = _layout(lengths, slack, torch.device(device))
    return torch.randn(N, D, dtype=dtype, device=device), torch.randn(N, D, dtype=dtype, device=device), \
        start, length, capacity


def _sdpa(q, k, v):
    """Dense decode with SDPA flash: a group's G query heads are G query tokens of its KV head (no repeat)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v)  # q (B, H, G, D), k, v (B, H, T, D)


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


# the decode cases of the benchmark and --profile: (name, B, H KV heads, G query heads per KV head, T context)
DECODE_CASES = [("D1", 1, 32, 1, 32768), ("D2", 8, 8, 4, 32768), ("D3", 1, 8, 4, 32768), ("D4", 1, 8, 4, 131072)]

# variant rows of the benchmark: the same kernels under other TUNING values (pick defaults from one run)
EVICT_VARIANTS = [("one-hot dot", dict(histogram_dot=True)),  # the radix rounds' histogram on the tensor cores
                  ("slice2048", dict(select_slice=2048, copy_rows=64)),  # half the programs
                  ("radix4", dict(radix_bits=4)),  # 8 rounds of 16 bins: tl.histogram's cost grows with the bins
                  ("radix2", dict(radix_bits=2))]  # 16 rounds of 4 bins
# (label, overrides, the head groups it changes: "any", "G=1" or "G>1")
DECODE_VARIANTS = [("3/SM", dict(decode_programs_per_sm=3), "any"),
                   ("fused", dict(decode_fused_combine=True), "any"),  # the last part of each head merges it
                   ("multiply-sum", dict(decode_sum_g1=True), "G=1"),  # no tl.dot, no 16-row padding
                   ("n64w4s4", dict(decode_block_n=64, decode_warps=4, decode_stages=4), "G=1"),
                   ("n32w4s4", dict(decode_block_n=32, decode_warps=4, decode_stages=4), "G=1"),
                   ("n128w8s2", dict(decode_block_n_gqa=128, decode_warps_gqa=8, decode_stages_gqa=2), "G>1")]


def _variant_applies(groups, G):
    """Whether a decode variant changes the kernel that runs for head groups of G query heads."""
    return groups == "any" or groups == ("G=1" if G == 1 else "G>1")


def _with(overrides, fn):
    """fn run under tuned(**overrides): a benchmark variant row."""
    def run():
        with tuned(**overrides):
            return fn()
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


def bench(out=None, quick=False, passes=3):
    """Print one table (and write JSON to `out`): evict, decode and append, each beside its baselines.

    Every row is timed twice: `eager`, the Python call as a user makes it (checks, allocations and
    launches included), and `graph`, one replay of the same call recorded into a CUDA graph (the GPU's
    own time: what a graph-captured decode loop pays). Rows are built first, then timed in `passes`
    interleaved passes; a row's time is the median of its pass medians and `spread` is max / min of
    them, so a noisy row shows itself instead of deciding a target.
    """
    from triton.testing import do_bench
    assert torch.cuda.is_available(), "the benchmark needs a CUDA card; on the CPU run the tests instead"
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
        kp, vp, start, length, capacity = _random_packed(_lengths(B, H, 6553, 32768, "spread", gen), D, dtype, dev,
                                                         slack=8192)  # room for many timed calls; a full head is left as is
        pos = torch.zeros(kp.shape[0], dtype=torch.long, device=dev)
        kn, vn = (torch.randn(B, H, D, dtype=dtype, device=dev) for _ in range(2))
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
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump({"header": head, "device": props.name, "date": str(datetime.date.today()), "torch":
                       torch.__version__, "triton": triton.__version__, "roof_gbps": roof, "tuning": asdict(TUNING),
                       "rows": rows, "targets": [dict(target=n, value=v, basis=b, op=o, goal=g)
                                                 for n, (v, b), o, g in checks]}, f, indent=1)
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
            --section LaunchStats --section WarpStateStats python kernels.py --once
    """
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
        kernels = _gpu_us_per_call(fn)
        top = ", ".join(f"{name[:40]} {us:.1f}" for name, us in sorted(kernels.items(), key=lambda x: -x[1])[:5])
        print(f"{label:28} {eager:9.1f} {graph if graph else float('nan'):9.1f} {sum(kernels.values()):10.1f}  "
              f"{top}" + (f"  [graph: {why}]" if why else ""), flush=True)


# -----------------------------------------------------------------------------
# CLI


def demo():
    """A small agreement check of every implementation that runs on this machine."""
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    impls = [i for i in ("v1", "v2", "v3") if i != "v3" or dev == "cuda" or INTERPRET]
    if "v3" not in impls:
        print("v3: skipped, Triton needs CUDA (or TRITON_INTERPRET=1 python kernels.py on the CPU)")
    k, v = (torch.randn(2, 4, 300, 64, device=dev) for _ in range(2))
    scores = torch.randint(0, 8, (2, 4, 300), device=dev).float()  # many ties
    counts = torch.randint(8, 300, (2, 4))
    ref = evict_v1(k, v, scores, counts, sink=2, window=4)
    q = torch.randn(2, 4, 2, 64, device=dev)
    out_ref = decode_v1(q.double(), ref.k.double(), ref.v.double(), ref.start, ref.length)
    for impl in impls:
        if impl == "v2" and not v2_available(dev)[0]:
            print(f"v2: skipped, torch.compile unavailable ({v2_available(dev)[1]})")
            continue
        got = EVICT[impl](k, v, scores, counts, sink=2, window=4)
        out = DECODE[impl](q, got.k, got.v, got.start, got.length)
        print(f"{impl}: evict positions equal: {torch.equal(got.pos, ref.pos)}, decode max |diff| vs fp64: "
              f"{(out.double() - out_ref).abs().max().item():.2e}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # what to run
    parser.add_argument("--bench", action="store_true", help="the benchmark table (needs CUDA)")
    parser.add_argument("--quick", action="store_true", help="smaller benchmark sizes (a smoke run)")
    parser.add_argument("--profile", action="store_true", help="eager vs CUDA-graph vs device time per v3 path")
    parser.add_argument("--once", action="store_true", help="one E1 evict and one D1 decode (a driver for ncu)")
    # output
    parser.add_argument("--out", default=None, help="write the benchmark rows as JSON to this path")
    args = parser.parse_args()
    if args.once:
        ncu_driver()
    elif args.profile:
        profile_kernels()
    elif args.bench:
        bench(args.out, args.quick)
    else:
        demo()
