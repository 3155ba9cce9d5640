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
    python -m pytest -q test_kernels.py        # CPU: Triton runs under TRITON_INTERPRET=1

Eviction follows lukv.compress: the eviction order is a stable ascending sort of the scores, so
among tied scores the lower token index goes first (the higher index is kept); the first `sink`
and last `window` tokens are always kept. Scores are compared as fp32 (-0.0 ties +0.0, NaN ranks
above +inf as in torch.sort), protected tokens above everything.

Shapes: B batch, H KV heads, G query heads per KV head, T tokens, D head dim, K kept tokens per
head, N packed rows (the sum of all capacities), P token chunks of the decode work list.
"""

import argparse
import datetime
import functools
import json
import math
import os
from dataclasses import dataclass
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
    select_resident: int = 32768  # rows up to this long keep their keys in registers for the radix select
    select_block: int = 4096  # tile of the threshold kernel on longer rows (streamed from L2 each round)
    select_slice: int = 512  # tokens per program of the slice-count and compaction kernels
    select_warps: int = 16  # one program per row: 32k keys over 512 threads
    copy_rows: int = 64  # packed rows per copy tile of the compaction kernel
    decode_block_n: int = 64  # keys per inner tile of the decode kernel
    decode_chunks_per_sm: int = 8  # the work list holds about this many token chunks per SM
    decode_max_chunk: int = 4096  # longest chunk (tokens) one decode program reads
    decode_stages: int = 3  # software pipelining depth of the K/V loads


TUNING = Tuning()


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


def _layout(counts, slack, device):
    """start, length, capacity (B, H) on the device and N: heads packed back to back."""
    capacity = counts + slack
    start = torch.cumsum(capacity.flatten(), 0).view_as(capacity) - capacity  # exclusive prefix sum
    meta = _to_device(torch.stack([start, counts, capacity]), device)  # (3, B, H) one copy
    return meta[0], meta[1], meta[2], int(capacity.sum())


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
# evict, v3: radix select of each row's threshold key, per-slice counts, then a sliced compaction
#   _threshold_kernel    one program per row: 3 histogram rounds (11 + 11 + 10 bits) -> the count-th key
#   _slice_count_kernel  one program per 512 tokens: keys above / equal to the threshold
#   _compact_kernel      one program per 512 tokens: its output offset from the counts of earlier slices,
#                        positions by block-local prefix sums, then a dense copy of its kept K/V rows

INT32_MIN = tl.constexpr(-2 ** 31)


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
def _digit_histogram(row_ptr, keys_row, T, sink, window, prefix, MATCH_SHIFT: tl.constexpr, SHIFT: tl.constexpr,
                     BITS: tl.constexpr, RESIDENT: tl.constexpr, BLOCK_T: tl.constexpr):
    """Histogram of key bits [SHIFT, SHIFT + BITS) over the keys whose bits above MATCH_SHIFT equal prefix.

    Keys are compared unsigned (u = key + 2^31); every other key, and the padding, lands in bin 0.
    """
    hist = tl.zeros([1 << BITS], tl.int32)
    for t0 in range(0, 1 if RESIDENT else T, BLOCK_T):  # resident: one tile, the keys already in registers
        if RESIDENT:
            u = keys_row ^ INT32_MIN
        else:
            u = _score_keys(row_ptr, t0 + tl.arange(0, BLOCK_T), T, sink, window) ^ INT32_MIN
        digit = (u >> SHIFT) & ((1 << BITS) - 1)  # (& also undoes the sign extension of >>)
        if MATCH_SHIFT < 32:
            digit = tl.where(((u >> MATCH_SHIFT) & ((1 << (32 - MATCH_SHIFT)) - 1)) == prefix, digit, 0)
        hist += tl.histogram(digit, 1 << BITS)
    return hist


@triton.jit
def _pick_digit(hist, n_other, above, count, BITS: tl.constexpr):
    """The digit holding the count-th largest key -> (digit, keys above that digit, keys in it)."""
    offs = tl.arange(0, 1 << BITS)
    hist = hist - tl.where(offs == 0, n_other, 0)  # the keys outside the bucket sat in bin 0
    at_or_above = above + tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist  # (bins,) non-increasing
    digit = tl.sum((at_or_above >= count).to(tl.int32), 0) - 1
    in_digit = tl.sum(tl.where(offs == digit, hist, 0), 0)
    return digit, tl.sum(tl.where(offs == digit, at_or_above, 0), 0) - in_digit, in_digit


@triton.jit
def _threshold_kernel(
    scores_ptr,  # (B*H, T) any float dtype, contiguous
    count_ptr,  # (B*H,) int64 tokens each head keeps
    thr_ptr,  # (B*H,) int32 out: the count-th largest key of each row
    T,  # tokens per row
    sink,  # first tokens always kept
    window,  # last tokens always kept
    RESIDENT: tl.constexpr,  # one BLOCK_T tile holds the whole row: its keys stay in registers
    BLOCK_T: tl.constexpr,  # tokens per tile (next power of two >= T when resident)
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = scores_ptr + row * T
    count = tl.load(count_ptr + row).to(tl.int32)
    keys_row = _score_keys(row_ptr, tl.arange(0, BLOCK_T), T, sink, window) if RESIDENT else None
    lanes = BLOCK_T * tl.cdiv(T, BLOCK_T)  # keys histogrammed, padding included
    # radix select, 11 + 11 + 10 bits from the top: each round keeps the digit that holds the count-th
    # largest key; `above` counts the keys already known to be larger, `n_in` the keys still in the bucket
    d1, above, n_in = _pick_digit(_digit_histogram(row_ptr, keys_row, T, sink, window, 0, 32, 21, 11, RESIDENT,
                                                   BLOCK_T), lanes - T, 0, count, 11)
    d2, above, n_in = _pick_digit(_digit_histogram(row_ptr, keys_row, T, sink, window, d1, 21, 10, 11, RESIDENT,
                                                   BLOCK_T), lanes - n_in, above, count, 11)
    d3, above, n_in = _pick_digit(_digit_histogram(row_ptr, keys_row, T, sink, window, d1 * 2048 + d2, 10, 0, 10,
                                                   RESIDENT, BLOCK_T), lanes - n_in, above, count, 10)
    thr = (d1.to(tl.int64) * 2 ** 21 + d2 * 2 ** 10 + d3) - 2 ** 31  # back to a signed key
    tl.store(thr_ptr + row, thr.to(tl.int32))


@triton.jit
def _slice_count_kernel(
    scores_ptr,  # (B*H, T) the same scores
    thr_ptr,  # (B*H,) int32 from _threshold_kernel
    gt_ptr,  # (B*H, n_slices) int32 out: keys above the threshold per slice
    eq_ptr,  # (B*H, n_slices) int32 out: keys equal to the threshold per slice
    T,  # tokens per row
    sink,  # first tokens always kept
    window,  # last tokens always kept
    n_slices,  # cdiv(T, SLICE)
    SLICE: tl.constexpr,  # tokens per program
):
    slice_id = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    thr_key = tl.load(thr_ptr + row)
    keys = _score_keys(scores_ptr + row * T, slice_id * SLICE + tl.arange(0, SLICE), T, sink, window)
    tl.store(gt_ptr + row * n_slices + slice_id, tl.sum((keys > thr_key).to(tl.int32), 0))
    tl.store(eq_ptr + row * n_slices + slice_id, tl.sum((keys == thr_key).to(tl.int32), 0))


@triton.jit
def _compact_kernel(
    scores_ptr,  # (B*H, T) the same scores
    k_ptr,  # (B*H, T, D) keys, contiguous
    v_ptr,  # (B*H, T, D) values
    thr_ptr,  # (B*H,) int32 from _threshold_kernel
    gt_ptr,  # (B*H, n_slices) int32
    eq_ptr,  # (B*H, n_slices) int32
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
    BLOCK_S: tl.constexpr,  # next power of two >= n_slices
    BLOCK_R: tl.constexpr,  # packed rows per copy tile
    BLOCK_D: tl.constexpr,  # next power of two >= D
):
    slice_id = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    start = tl.load(start_ptr + row)
    count = tl.load(count_ptr + row)
    thr_key = tl.load(thr_ptr + row)
    # where this slice's kept rows go: the kept rows of earlier slices, ties kept last-by-index
    offs_s = tl.arange(0, BLOCK_S)
    gt = tl.load(gt_ptr + row * n_slices + offs_s, mask=offs_s < n_slices, other=0)
    eq = tl.load(eq_ptr + row * n_slices + offs_s, mask=offs_s < n_slices, other=0)
    skip = tl.sum(eq, 0) - (count - tl.sum(gt, 0))  # the first `skip` ties by index are evicted
    ties_before = tl.cumsum(eq, 0) - eq  # (BLOCK_S,) exclusive
    kept = gt + tl.minimum(eq, tl.maximum(ties_before + eq - skip, 0))
    first = tl.sum(tl.where(offs_s < slice_id, kept, 0), 0).to(tl.int64)
    ties_seen = tl.sum(tl.where(offs_s == slice_id, ties_before, 0), 0)
    # 1. positions: block-local prefix sums in ascending token order
    offs_t = slice_id * SLICE + tl.arange(0, SLICE)
    keys = _score_keys(scores_ptr + row * T, offs_t, T, sink, window)
    tie = keys == thr_key
    keep = (keys > thr_key) | (tie & (ties_seen + tl.cumsum(tie.to(tl.int32), 0) > skip))
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
    """Launch the threshold and slice-count kernels -> thr (B*H,), gt and eq (B*H, n_slices), slice length."""
    B, H, T = scores.shape
    resident = triton.next_power_of_2(T) <= TUNING.select_resident
    block_t = triton.next_power_of_2(T) if resident else TUNING.select_block
    slice_len = min(TUNING.select_slice, triton.next_power_of_2(T))
    n_slices = triton.cdiv(T, slice_len)
    thr = torch.empty(B * H, dtype=torch.int32, device=scores.device)
    gt, eq = (torch.empty(B * H, n_slices, dtype=torch.int32, device=scores.device) for _ in range(2))
    _threshold_kernel[(B * H,)](scores, counts, thr, T, sink, window, RESIDENT=resident, BLOCK_T=block_t,
                                num_warps=TUNING.select_warps)
    _slice_count_kernel[(n_slices, B * H)](scores, thr, gt, eq, T, sink, window, n_slices, SLICE=slice_len,
                                           num_warps=4)
    return thr, gt, eq, slice_len


def evict_v3(k, v, scores, counts, sink=0, window=0, slack=32):
    """Triton threshold search, slice counts, sliced compaction: 3 launches, no sync (counts on the host)."""
    counts = _check_evict(k, v, scores, counts, sink, window, slack)
    _check_v3_device(k)
    B, H, T, D = k.shape
    start, length, capacity, N = _layout(counts, slack, k.device)
    pos = torch.empty(N, dtype=torch.long, device=k.device)
    k_out, v_out = k.new_empty(N, D), v.new_empty(N, D)
    if N == 0:  # nothing kept, no spare rows: nothing to launch
        return PackedKV(k_out, v_out, pos, start, length, capacity)
    thr, gt, eq, slice_len = _select(scores, length, sink, window)
    n_slices = gt.shape[1]
    _compact_kernel[(n_slices, B * H)](
        scores, k, v, thr, gt, eq, start, length, capacity, pos, k_out, v_out, T, sink, window, n_slices, D=D,
        SLICE=slice_len, BLOCK_S=triton.next_power_of_2(n_slices), BLOCK_R=TUNING.copy_rows,
        BLOCK_D=triton.next_power_of_2(D), num_warps=4)
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
# decode attention, v3: split-KV over a work list of token chunks, then a log-sum-exp combine


@triton.jit
def _chunk_table(length_ptr, n_heads, chunk, BLOCK_HEADS: tl.constexpr):
    """The work list, on the fly: head i owns chunks ends[i] - n_chunks[i] ... ends[i] - 1."""
    offs_h = tl.arange(0, BLOCK_HEADS)
    n_chunks = (tl.load(length_ptr + offs_h, mask=offs_h < n_heads, other=0) + chunk - 1) // chunk
    return offs_h, n_chunks, tl.cumsum(n_chunks, 0)


@triton.jit
def _decode_split_kernel(
    q_ptr,  # (B*H, G, D) one query token per query head
    k_ptr,  # (N, D) packed keys
    v_ptr,  # (N, D) packed values
    start_ptr,  # (B*H,) int64 first row of each head
    length_ptr,  # (B*H,) int64 rows each head attends to
    o_part_ptr,  # (P, G, D) fp32 out: each chunk's normalised output
    lse_part_ptr,  # (P, G) fp32 out: each chunk's log2-sum-exp2
    n_heads,  # B*H
    n_rows,  # N (reads never leave the packed tensors)
    chunk,  # tokens per work item
    qk_scale,  # softmax scale * log2(e)
    G,  # query heads per KV head
    D: tl.constexpr,  # head dim
    BLOCK_HEADS: tl.constexpr,  # next power of two >= B*H
    BLOCK_G: tl.constexpr,  # G padded to >= 16 rows for tl.dot
    BLOCK_N: tl.constexpr,  # keys per inner tile
    BLOCK_D: tl.constexpr,  # next power of two >= D, >= 16
    PRECISION: tl.constexpr,  # tl.dot input precision ("ieee" for fp32 inputs)
    DOT_F32: tl.constexpr,  # upcast dot operands (the Triton 3.9 interpreter's bf16 tl.dot is wrong)
):
    item = tl.program_id(0).to(tl.int64)
    offs_h, n_chunks, ends = _chunk_table(length_ptr, n_heads, chunk, BLOCK_HEADS)
    if item >= tl.sum(n_chunks, 0):  # the grid is an upper bound on the work list
        return
    head = tl.sum((ends <= item).to(tl.int32), 0)  # the head whose chunk range holds this item
    first = tl.sum(tl.where(offs_h == head, ends - n_chunks, 0), 0)
    row0 = tl.load(start_ptr + head)
    t0 = (item - first) * chunk
    t1 = tl.minimum(t0 + chunk, tl.load(length_ptr + head))
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask_gd = (offs_g[:, None] < G) & (offs_d[None, :] < D)
    q = tl.load(q_ptr + (head * G + offs_g)[:, None] * D + offs_d[None, :], mask=mask_gd, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
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
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_G, BLOCK_N)
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + rows[:, None] * D + offs_d[None, :], mask=mask_nd, other=0.0)
        if DOT_F32:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    out_offs = (item * G + offs_g)[:, None] * D + offs_d[None, :]
    tl.store(o_part_ptr + out_offs, acc / l[:, None], mask=mask_gd)
    tl.store(lse_part_ptr + item * G + offs_g, m + tl.log2(l), mask=offs_g < G)


@triton.jit
def _decode_combine_kernel(
    o_part_ptr,  # (P, G, D) fp32 per-chunk outputs
    lse_part_ptr,  # (P, G) fp32 per-chunk log2-sum-exp2
    length_ptr,  # (B*H,) int64
    out_ptr,  # (B*H, G, D) out, in the query dtype
    n_heads,  # B*H
    n_parts,  # P (rows of the partial buffers)
    chunk,  # tokens per work item
    G,  # query heads per KV head
    D: tl.constexpr,  # head dim
    BLOCK_HEADS: tl.constexpr,  # next power of two >= B*H
    BLOCK_C: tl.constexpr,  # chunks per tile
    BLOCK_GD: tl.constexpr,  # BLOCK_G * BLOCK_D, (g, d) flattened with d fastest
    BLOCK_D: tl.constexpr,  # next power of two >= D
):
    head = tl.program_id(0).to(tl.int64)
    offs_h, n_chunks, ends = _chunk_table(length_ptr, n_heads, chunk, BLOCK_HEADS)
    first = tl.sum(tl.where(offs_h == head, ends - n_chunks, 0), 0)
    n = tl.sum(tl.where(offs_h == head, n_chunks, 0), 0)
    offs_gd = tl.arange(0, BLOCK_GD)
    g, d = offs_gd // BLOCK_D, offs_gd % BLOCK_D
    mask_gd = (g < G) & (d < D)
    m = tl.full([BLOCK_GD], float("-inf"), tl.float32)
    for c0 in range(0, n, BLOCK_C):  # pass 1: the largest log-sum-exp of each query head
        item = first + c0 + tl.arange(0, BLOCK_C)
        mask = ((c0 + tl.arange(0, BLOCK_C) < n) & (item < n_parts))[:, None] & mask_gd[None, :]
        lse = tl.load(lse_part_ptr + item[:, None] * G + g[None, :], mask=mask, other=float("-inf"))
        m = tl.maximum(m, tl.max(lse, 0))
    m = tl.where(m == float("-inf"), 0.0, m)
    l = tl.zeros([BLOCK_GD], tl.float32)
    acc = tl.zeros([BLOCK_GD], tl.float32)
    for c0 in range(0, n, BLOCK_C):  # pass 2: weight each chunk by 2^(lse - m)
        item = first + c0 + tl.arange(0, BLOCK_C)
        mask = ((c0 + tl.arange(0, BLOCK_C) < n) & (item < n_parts))[:, None] & mask_gd[None, :]
        w = tl.exp2(tl.load(lse_part_ptr + item[:, None] * G + g[None, :], mask=mask, other=float("-inf")) - m)
        o = tl.load(o_part_ptr + (item[:, None] * G + g[None, :]) * D + d[None, :], mask=mask, other=0.0)
        l += tl.sum(w, 0)
        acc += tl.sum(w * o, 0)
    out = tl.where(l > 0, acc / l, 0.0)  # an empty head attends to nothing: zeros
    tl.store(out_ptr + (head * G + g) * D + d, out.to(out_ptr.dtype.element_ty), mask=mask_gd)


@functools.lru_cache(maxsize=None)
def _sm_count(device):
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _auto_chunk(n_rows, device):
    sms = _sm_count(device)
    target = max(1, n_rows // (TUNING.decode_chunks_per_sm * sms))
    return min(max(triton.next_power_of_2(target), TUNING.decode_block_n), TUNING.decode_max_chunk)


def decode_v3(q, k_packed, v_packed, start, length, scale=None, chunk=None):
    """Triton split-KV decode: 2 launches, metadata stays on the device (no sync)."""
    _check_decode(q, k_packed, v_packed, start, length, FLOAT_DTYPES)
    _check_v3_device(q)
    B, H, G, D = q.shape
    n_heads, n_rows = B * H, k_packed.shape[0]
    if n_rows == 0:  # no rows at all: every head attends to nothing
        return torch.zeros_like(q)
    chunk = chunk or _auto_chunk(n_rows, q.device)
    n_parts = n_rows // chunk + n_heads  # >= sum of ceil(length / chunk) whenever sum(length) <= N
    o_part = torch.empty(n_parts, G, D, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(n_parts, G, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    block_heads, block_d = triton.next_power_of_2(n_heads), max(16, triton.next_power_of_2(D))
    upcast = INTERPRET and q.dtype == torch.bfloat16
    block_n = min(TUNING.decode_block_n, max(16, triton.next_power_of_2(chunk)))
    _decode_split_kernel[(n_parts,)](
        q, k_packed, v_packed, start, length, o_part, lse_part, n_heads, n_rows, chunk, scale * math.log2(math.e),
        G, D=D, BLOCK_HEADS=block_heads, BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_N=block_n,
        BLOCK_D=block_d, PRECISION="ieee" if q.dtype == torch.float32 or upcast else "tf32", DOT_F32=upcast,
        num_warps=4, num_stages=TUNING.decode_stages)
    block_gd = triton.next_power_of_2(G) * block_d
    _decode_combine_kernel[(n_heads,)](
        o_part, lse_part, length, out, n_heads, n_parts, chunk, G, D=D, BLOCK_HEADS=block_heads,
        BLOCK_C=max(1, 8192 // block_gd), BLOCK_GD=block_gd, BLOCK_D=block_d, num_warps=4)
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


def bench(out=None, quick=False):
    """Print one table (and write JSON to `out`): evict, decode and append, each beside its baselines."""
    from triton.testing import do_bench
    assert torch.cuda.is_available(), "the benchmark needs a CUDA card; on the CPU run the tests instead"
    dev, dtype, D, elt = "cuda", torch.bfloat16, 128, 2
    gen = torch.Generator().manual_seed(0)
    rows = []

    def add(op, case, impl, fn, nbytes, note=""):
        try:
            fn()  # compile and warm up outside the timing
            torch.cuda.synchronize()
            us = 1000 * do_bench(fn, warmup=25, rep=100, return_mode="median")  # flushes L2 before every call
        except Exception as e:  # one failing baseline must not lose the table
            us, note = None, f"skipped: {type(e).__name__}: {str(e).strip().splitlines()[0][:90] if str(e) else ''}"
        rows.append(dict(op=op, case=case, impl=impl, us=us, bytes=nbytes, note=note))

    src = torch.empty(2 ** 29, dtype=dtype, device=dev)  # 1 GiB
    dst = torch.empty_like(src)
    add("roof", "copy 1 GiB", "torch copy_", lambda: dst.copy_(src), 2 * 2 ** 30, "read + write")
    del src, dst

    # evict: B=1, H=32, T=32k, 20% kept, per-head counts from 0.5x to 1.5x the mean; bytes counted first
    B, H, T = 1, 32, 8192 if quick else 32768
    k, v = (torch.randn(B, H, T, D, dtype=dtype, device=dev) for _ in range(2))
    scores = torch.rand(B, H, T, device=dev)
    counts = _lengths(B, H, T // 5, T, "spread", gen)
    kv_bytes = 4 * int(counts.sum()) * D * elt  # read + write every kept K and V row
    case = f"E1: B={B} H={H} T={T} 20%"
    kept = torch.empty(kv_bytes // 2, dtype=torch.uint8, device=dev)
    add("evict", case, "copy of the kept bytes", lambda: kept.clone(), kv_bytes, "the roof at this size")
    for impl, note in (("v1", "topk + sort + gather"), ("v2", "torch.compile(v1)"), ("v3", "Triton select+compact")):
        add("evict", case, impl, lambda impl=impl: EVICT[impl](k, v, scores, counts, 4, 64), kv_bytes + 4 * B * H * T,
            note)
    counts_dev = counts.to(dev)
    add("evict", case, "v3 select only", lambda: _select(scores, counts_dev, 4, 64), 4 * B * H * T,
        "diagnostic: threshold + slice counts")
    del k, v, scores, kept

    # decode: one query token per query head over a 20% packed cache
    cases = [("D1", 1, 32, 1, 32768), ("D2", 8, 8, 4, 32768), ("D3", 1, 8, 4, 32768), ("D4", 1, 8, 4, 131072)]
    for name, B, H, G, T in cases[:2] if quick else cases:
        case, mean = f"{name}: B={B} Hq={H * G} Hkv={H} T={T}", T // 5
        q = torch.randn(B, H, G, D, dtype=dtype, device=dev)
        for label, n in (("SDPA flash, full cache", T), ("SDPA flash, uniform 20%", mean)):
            kv = [torch.randn(B, H, n, D, dtype=dtype, device=dev) for _ in range(2)]
            add("decode", case, label, lambda: _sdpa(q, *kv), B * H * n * 2 * D * elt)
            del kv
        for shape in ("uniform", "spread", "skewed"):
            lengths = _lengths(B, H, mean, T, shape, gen)
            kp, vp, start, length, _ = _random_packed(lengths, D, dtype, dev)
            nbytes = int(lengths.sum()) * 2 * D * elt
            for impl in ("v1", "v2", "v3") if shape == "spread" else ("v3",):
                add("decode", case, f"{impl} {shape}", lambda impl=impl: DECODE[impl](q, kp, vp, start, length), nbytes)
            if shape == "spread":
                add("decode", case, "varlen FA, head per seq", _varlen(q, kp, vp, start, lengths), nbytes,
                    "AdaKV's design")
            del kp, vp

    # append: O(B*H*D) bytes per step, beside re-allocating and copying the cache (AdaKV's append)
    for B, H in ((1, 32), (8, 8)):
        kp, vp, start, length, capacity = _random_packed(_lengths(B, H, 6553, 32768, "spread", gen), D, dtype, dev,
                                                         slack=8192)  # room for every timed call
        pos = torch.zeros(kp.shape[0], dtype=torch.long, device=dev)
        kn, vn = (torch.randn(B, H, D, dtype=dtype, device=dev) for _ in range(2))
        case = f"A{1 if B == 1 else 2}: B={B} H={H} D={D}"
        for impl in ("v1", "v3"):
            add("append", case, impl, lambda impl=impl: APPEND[impl](kp, vp, pos, start, length, capacity, kn, vn, 7,
                                                                      check=False), 4 * B * H * D * elt, "check=False")
        add("append", case, "re-pack copy", lambda: (kp.clone(), vp.clone()), 4 * kp.numel() * elt, "AdaKV-style")
        del kp, vp
    _report(rows, out)


def _report(rows, out):
    """The table, the targets of the issue as PASS / FAIL, and the JSON file."""
    props = torch.cuda.get_device_properties(0)
    roof = rows[0]["bytes"] / rows[0]["us"] / 1e3  # GB/s of the measured 1 GiB copy
    head = (f"{props.name} | {datetime.date.today()} | torch {torch.__version__} | triton {triton.__version__} | "
            f"copy roof {roof:.0f} GB/s | bf16, D=128, do_bench median, L2 flushed")
    us = {(r["case"].split(":")[0], r["impl"]): r["us"] for r in rows}  # ("D1", "v3 spread") -> us
    base = {"evict": "v1", "decode": "SDPA flash, full cache", "append": "v1"}
    print(head)
    print(f"{'op':7} {'case':32} {'impl':26} {'us':>9} {'MB':>9} {'GB/s':>7} {'%roof':>6} {'speedup':>8}  note")
    for r in rows:
        cells = f"{'-':>9} {r['bytes'] / 1e6:9.2f}"
        if r["us"]:
            b = us.get((r["case"].split(":")[0], base.get(r["op"])))
            r.update(gbps=r["bytes"] / r["us"] / 1e3, roof_pct=100 * r["bytes"] / r["us"] / 1e3 / roof,
                     speedup=b / r["us"] if b else None)
            cells = f"{r['us']:9.1f} {r['bytes'] / 1e6:9.2f} {r['gbps']:7.0f} {r['roof_pct']:5.0f}% " + \
                (f"{r['speedup']:7.2f}x" if b else "")
        print(f"{r['op']:7} {r['case']:32} {r['impl']:26} {cells:52}  {r['note']}")

    def ratio(a, b):  # time a / time b, None where a row is missing
        a, b = us.get(a), us.get(b)
        return a / b if a and b else None
    e_v3 = next((r for r in rows if r["op"] == "evict" and r["impl"] == "v3" and r["us"]), None)
    checks = [("evict v3 GB/s / copy roof >= 0.8", e_v3["roof_pct"] / 100 if e_v3 else None, ">=", 0.8),
              ("evict v1 / v3 time >= 3", ratio(("E1", "v1"), ("E1", "v3")), ">=", 3.0)]
    for name, goal in (("D1", 4.0), ("D2", 3.5), ("D4", 3.0)):
        checks.append((f"{name} full SDPA / v3 time >= {goal}", ratio((name, "SDPA flash, full cache"),
                                                                  (name, "v3 spread")), ">=", goal))
    for name in ("D1", "D2", "D3", "D4"):
        checks.append((f"{name} v3 skewed / uniform time <= 1.15", ratio((name, "v3 skewed"), (name, "v3 uniform")),
                       "<=", 1.15))
        checks.append((f"{name} varlen FA / v3 time > 1", ratio((name, "varlen FA, head per seq"), (name, "v3 spread")),
                       ">=", 1.0))
    print("targets of the issue:")
    for name, value, op, goal in checks:
        ok = value is not None and (value >= goal if op == ">=" else value <= goal)
        print(f"  {name:45} " + ("row missing" if value is None else f"{value:6.2f}  {'PASS' if ok else 'FAIL'}"))
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump({"header": head, "device": props.name, "date": str(datetime.date.today()), "torch":
                       torch.__version__, "triton": triton.__version__, "roof_gbps": roof, "rows": rows,
                       "targets": [dict(target=n, value=v, op=o, goal=g) for n, v, o, g in checks]}, f, indent=1)
        print(f"wrote {out}")


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
    # output
    parser.add_argument("--out", default=None, help="write the benchmark rows as JSON to this path")
    args = parser.parse_args()
    if args.bench:
        bench(args.out, args.quick)
    else:
        demo()
