"""
Kernels for a per-head KV cache: eviction (select + compact), decode attention over the packed
cache, and an in-place append, each beside the PyTorch reference it must agree with.

Laid out like a Triton tutorial: per operation, v1 (the reference, plain PyTorch), then v2, then v3
(Triton), then a plain-named wrapper that picks one (`evict`, `decode_attention`, `append_`; impl
"auto" is v3 on CUDA tensors, else v1). What v2 and v3 are differs per operation:

    evict    v1  order-preserving integer keys, topk, sort, gather, then a scatter into the layout
             v2  v1's select + gather under torch.compile (the scatter into the layout stays eager)
             v3  a radix select of each head's threshold key over slices of its row, then a compaction
    decode   v1  one head at a time over a view of its own rows (attend_rows, which also takes chunks)
             v2  not v1 compiled: every head padded to the longest and masked (_attend_padded), one
                 graph under torch.compile
             v3  split-KV over equal parts of the token stream of all heads, then a log-sum-exp merge
    append   v1  indexed writes of T new rows per head
             v2  none: impl "v2" runs v1 (a few indexed writes cost launches, not bytes)
             v3  one program per head writes one row; a chunk of T tokens is T launches

Each section starts by counting the bytes its operation must move: that count over the card's copy
bandwidth is the floor a timing is held against. The measured numbers, the targets, the Nsight
readings and the variants that lost are in results/KERNELS.md.

The packed layout is model.KVCache's: head (b, h) owns rows start[b, h] ... start + capacity - 1;
the first length[b, h] hold its kept tokens in ascending token order, the rest are spare rows.

    python kernels.py                          # a small agreement check (CPU: v1 and v2)
    TRITON_INTERPRET=1 python kernels.py       # the same with v3 run as Python on the CPU
    python kernels.py --bench                  # a few rows on a CUDA card: v1 / v2 / v3 beside SDPA
    python -m bench.kernels                    # the full benchmark (eager + CUDA graph), --profile, --once
    python -m pytest -q tests/test_kernels.py  # CPU: Triton runs under TRITON_INTERPRET=1 (conftest.py)

Eviction follows lukv's ranking: the eviction order is a stable ascending sort of the scores, so
among tied scores the lower token index goes first (the higher index is kept); the first `sink`
and last `window` tokens are always kept. Scores are compared as fp32 (-0.0 ties +0.0, NaN ranks
above +inf as in torch.sort), protected tokens above everything.

Shapes: B batch, H KV heads, G query heads per KV head, T tokens, D head dim, K kept tokens per
head, N packed rows (the sum of all capacities), P parts of the decode token stream (one program each).
"""

import argparse
import functools
import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # v1 and v2 still run without Triton; the v3 kernels below become plain functions
    import types
    triton = types.SimpleNamespace(jit=lambda fn: fn, cdiv=lambda a, b: -(-a // b),
                                   next_power_of_2=lambda n: 1 << max(0, int(n) - 1).bit_length())
    tl = types.SimpleNamespace(constexpr=lambda x: x)
    HAVE_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # read once, as Triton does when kernels are defined


class PackedKV(NamedTuple):
    """The packed per-head cache of one layer (model.KVCache's layout), as evict returns it."""
    k: torch.Tensor  # (N, D)
    v: torch.Tensor  # (N, D)
    pos: torch.Tensor  # (N,) int64 original token index of every row, -1 on spare rows
    start: torch.Tensor  # (B, H) int64 first row of each head
    length: torch.Tensor  # (B, H) int64 rows in use
    capacity: torch.Tensor  # (B, H) int64 rows owned (length + spare)


# -----------------------------------------------------------------------------
# evict = select + compact: keep counts[b, h] tokens of each head by score, packed
#   bytes: read the kept K and V rows and write them packed, 4 * K_total * D * elt, plus the scores
#   (4 B per token, read once per radix round and once by the compaction; they fit in L2).
#   E1 (B=1, H=32, T=32k, D=128 bf16, 20% kept): 215 MB of rows -> 72 us at a 3.0 TB/s copy roof.
#   v1: order-preserving keys, topk, sort, gather (the reference)


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


# input checks, shared by every operation: a clear error before any launch or compile
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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


# the packed layout of given counts, made once per distinct counts (evict v1 / v2 / v3 and the benchmarks)
_LAYOUTS = {}  # (counts, slack, device) -> the layout's (3, B, H) device tensor and N: see _layout
MAX_LAYOUTS = 256  # distinct layouts kept; entries are never dropped (a recorded CUDA graph may read them)


def _layout(counts, slack, device):
    """start, length, capacity (B, H) on the device and N: heads packed back to back.

    The host -> device copy of a layout is made once per distinct (counts, slack, device) and kept,
    so a repeated call copies nothing from the host. That matters for CUDA graphs: a captured copy
    from a temporary pinned buffer would replay whatever that buffer holds later, while a captured
    clone of a kept tensor replays the right layout. Callers get a clone, which they may change in
    place (append grows `length`). Past MAX_LAYOUTS layouts, new ones are not kept.
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
        meta = torch.stack([start, counts, capacity])  # (3, B, H)
        meta = meta.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else meta.to(device)
        n_rows = int(capacity.sum())
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


#   v2: v1's select + gather under torch.compile, where torch.compile works (it needs a C++ compiler on the CPU)


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


def evict_v2(k, v, scores, counts, sink=0, window=0, slack=32):
    """v1 with the select + gather under torch.compile (the scatter into the layout stays eager)."""
    return evict_v1(k, v, scores, counts, sink, window, slack, compiled=True)


# -----------------------------------------------------------------------------
# evict, v3: a radix select of each row's threshold key spread over slices of the row, then a sliced compaction
#   _radix_round_kernel  ROUNDS = 4 launches of (slices, rows) programs: round r histograms digit r (8 bits,
#                        from the top) of the keys still tied with the count-th largest on the higher digits;
#                        the slices of a row add their 256 bins into one row histogram (integer atomics: the
#                        same sums in any order). The last round also stores each slice's own bins.
#   _compact_kernel      (slices, rows) programs: the threshold from the row histograms, this slice's output
#                        offset from the bins of earlier slices, positions by block-local prefix sums, then a
#                        dense copy of its kept K/V rows
# Why this shape: one program per row (32 rows) leaves 100 of 132 SMs idle, and tl.histogram costs grow with
# the bin count (2048 bins cost ~9x what 256 do per key), so small digits over many programs per row.


@dataclass
class Tuning:
    """Block sizes and launch shapes of the v3 kernels (bench/kernels.py times some alternatives)."""
    select_slice: int = 1024  # tokens per program of the radix rounds and the compaction (a power of two)
    select_warps: int = 4  # warps per radix-round program
    copy_rows: int = 32  # packed rows per copy tile of the compaction kernel (32 x 128 bf16 = 8 KB)
    copy_warps: int = 4  # warps per compaction program
    decode_block_n: int = 64  # keys per inner tile of the decode kernel when G = 1
    decode_warps: int = 4  # warps per decode program when G = 1
    decode_stages: int = 3  # software pipelining depth of the K/V loads (3 x 2 x 16 KB of shared memory)
    decode_block_n_gqa: int = 64  # the same three when G > 1 query heads share a KV head
    decode_warps_gqa: int = 4  # (64 / 4 / 3 beat 128 / 8 / 2 on an H100: D2 93.8 vs 101.6 us)
    decode_stages_gqa: int = 3
    decode_programs_per_sm: int = 2  # the token stream of all heads is cut into this many equal parts per SM
    decode_min_chunk: int = 256  # fewest tokens per decode program (short caches use fewer programs)
    combine_block: int = 64  # partial results per tile of the combine kernel


TUNING = Tuning()
RADIX_BITS, BINS, ROUNDS = 8, 256, 4  # 32-bit keys as 4 digits of 8 bits (2- and 4-bit digits lost)
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
def _replay_rounds(hist_ptr, count, N_ROUNDS: tl.constexpr, BINS: tl.constexpr):
    """Follow the count-th largest key through the first N_ROUNDS row histograms (BINS each).

    Returns (prefix, above, n_in): the digits picked so far as one integer (the bucket), the keys of the
    row above the bucket, and the keys in it. Digits are of the unsigned key u = key + 2^31.
    """
    offs_b = tl.arange(0, BINS)
    prefix = count.to(tl.int64) * 0  # (scalar int64 zeros of the right type)
    above = count * 0
    n_in = count * 0
    for r in tl.static_range(N_ROUNDS):
        hist = tl.load(hist_ptr + r * BINS + offs_b)  # (BINS,) keys of the bucket per next digit
        at_or_above = above + tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist  # (BINS,) non-increasing
        digit = tl.sum((at_or_above >= count).to(tl.int32), 0) - 1  # the last bin still holding the count-th
        n_in = tl.sum(tl.where(offs_b == digit, hist, 0), 0)
        above = tl.sum(tl.where(offs_b == digit, at_or_above, 0), 0) - n_in
        prefix = prefix * BINS + digit
    return prefix, above, n_in


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
    BITS: tl.constexpr,  # bits per digit (8)
    BINS: tl.constexpr,  # 2 ** BITS
    ROUNDS: tl.constexpr,  # 32 // BITS
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
    hist = tl.histogram(digit, BINS, mask=in_bucket)  # (BINS,) int32; `mask` needs Triton >= 3.5
    tl.atomic_add(hist_row + ROUND * BINS + offs_b, hist, mask=hist > 0, sem="relaxed")
    if ROUND == ROUNDS - 1:  # the compaction's offsets: this slice's counts for every possible last digit
        above_slice = tl.sum(((offs_t < T) & (keys > hi)).to(tl.int32), 0)
        gt = above_slice + tl.sum(hist, 0) - tl.cumsum(hist, 0)  # (BINS,) keys above candidate (prefix, b)
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
    """The radix rounds -> row histograms (B*H, ROUNDS, BINS), per-slice tables gt, eq (B*H, n_slices, BINS)."""
    B, H, T = scores.shape
    slice_len = TUNING.select_slice  # one size for every T: GPU tests and runs compile it once
    n_slices = triton.cdiv(T, slice_len)
    hist = torch.zeros(B * H, ROUNDS, BINS, dtype=torch.int32, device=scores.device)
    gt, eq = (torch.empty(B * H, n_slices, BINS, dtype=torch.int32, device=scores.device) for _ in range(2))
    for r in range(ROUNDS):
        _radix_round_kernel[(n_slices, B * H)](scores, counts, hist, gt, eq, T, sink, window, n_slices, ROUND=r,
                                               SLICE=slice_len, BITS=RADIX_BITS, BINS=BINS, ROUNDS=ROUNDS,
                                               num_warps=TUNING.select_warps)
    return hist, gt, eq


def _check_v3_device(t):
    if not HAVE_TRITON:
        raise RuntimeError("v3 needs Triton (pip install triton); use impl='v1'")
    if not (t.is_cuda or INTERPRET):
        raise ValueError(f"v3 runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1), got device "
                         f"{t.device}; move the inputs to the GPU or use impl='v1'")


def evict_v3(k, v, scores, counts, sink=0, window=0, slack=32):
    """Triton radix select (4 rounds) and sliced compaction: five launches and a memset, no host sync."""
    counts = _check_evict(k, v, scores, counts, sink, window, slack)
    _check_v3_device(k)
    B, H, T, D = k.shape
    start, length, capacity, N = _layout(counts, slack, k.device)
    pos = torch.empty(N, dtype=torch.long, device=k.device)
    k_out, v_out = k.new_empty(N, D), v.new_empty(N, D)
    if N == 0:  # nothing kept, no spare rows: nothing to launch
        return PackedKV(k_out, v_out, pos, start, length, capacity)
    hist, gt, eq = _select(scores, length, sink, window)
    n_slices = gt.shape[1]
    _compact_kernel[(n_slices, B * H)](
        scores, k, v, hist, gt, eq, start, length, capacity, pos, k_out, v_out, T, sink, window, n_slices, D=D,
        SLICE=TUNING.select_slice, BLOCK_S=64, BLOCK_R=TUNING.copy_rows, BLOCK_D=triton.next_power_of_2(D),
        BINS=BINS, ROUNDS=ROUNDS, num_warps=TUNING.copy_warps)
    return PackedKV(k_out, v_out, pos, start, length, capacity)


EVICT = {"v1": evict_v1, "v2": evict_v2, "v3": evict_v3}


# the wrappers: one name per operation, the version picked by impl


def _auto_impl(t):
    return "v3" if HAVE_TRITON and t.is_cuda else "v1"


def _pick(table, impl, t):
    """The version a wrapper runs: impl 'auto' is v3 on CUDA tensors (with Triton), else v1."""
    impl = _auto_impl(t) if impl == "auto" else impl
    if impl not in table:
        raise ValueError(f"impl must be 'auto' or one of {sorted(table)}, got {impl!r}")
    return table[impl]


def evict(k, v, scores, counts, sink=0, window=0, slack=32, impl="auto"):
    """Keep counts[b, h] tokens of k, v (B, H, T, D) by score -> PackedKV. impl: auto / v1 / v2 / v3.

    Returns the kept rows in fresh storage; the caller (model.KVCache.evict) installs them.
    """
    return _pick(EVICT, impl, k)(k, v, scores, counts, sink, window, slack)


# -----------------------------------------------------------------------------
# decode attention: one query token per query head over each head's packed rows
#   bytes: read every kept K and V row once, 2 * sum(length) * D * elt (q, the output and the partial
#   results are O(B*H*G*D)). D1 (B=1, 32 heads, 20% of 32k, D=128 bf16): 107 MB -> 36 us at 3.0 TB/s;
#   full-cache SDPA reads 537 MB (179 us), so a 20% cache can be at most 5x faster.
#   v1: one head at a time over a view of its own rows: softmax(q k^T * scale) v (the reference;
#       it reads only the kept rows, so on the CPU it is also the fast one)
#   v2: every head padded to the longest and masked, one graph under torch.compile


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
    """q (B, H, G, D) over each head's first length rows -> out (B, H, G, D), probs (B, H, G, K) (0 past a length).

    Every head is padded to the longest, so it reads B * H * kmax rows: one shape for torch.compile (v2)."""
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    slots = torch.arange(kmax, device=q.device)
    valid = slots < length[..., None]  # (B, H, K)
    rows = (start[..., None] + slots).clamp(0, max(k_packed.shape[0] - 1, 0))  # (B, H, K)
    keys, values = k_packed[rows].to(ct), v_packed[rows].to(ct)  # (B, H, K, D) each
    values = values.masked_fill(~valid[..., None], 0.0)  # padding may read garbage rows: 0 * NaN is NaN
    s = torch.einsum("bhgd,bhkd->bhgk", q.to(ct), keys) * scale  # (B, H, G, K)
    probs = torch.softmax(s.masked_fill(~valid[:, :, None], float("-inf")), dim=-1)
    probs = torch.where(valid[:, :, None], probs, 0.0)  # empty heads: 0, not NaN
    return torch.einsum("bhgk,bhkd->bhgd", probs, values).to(q.dtype), probs  # (B, H, G, D), (B, H, G, K)


def attend_rows(q, k_packed, v_packed, start, length, scale=None, return_probs=False):
    """A chunk of Tq new tokens per head attends to that head's rows, one head at a time (plain PyTorch).

    q (B, H, G, Tq, D); head (b, h) owns rows start .. start + length of k_packed, v_packed (N, D), and
    its last Tq rows are the chunk's own tokens: token t sees the rows before length - (Tq - 1 - t).
    Tq = 1 is a decode step. Returns out (B, H, G, Tq, D) and, if return_probs, the weights
    (B, H, G, Tq, K) over each head's first K = max length rows (0 past a head's length), else None.
    Each head's rows are a view, never copied or padded, so it reads sum(length) rows, not B * H * K.
    """
    B, H, G, Tq, D = q.shape
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    kmax = int(length.max()) if length.numel() else 0
    qs = (q.to(ct) * scale).view(B, H, G * Tq, D)  # every query head's Tq tokens as rows of one matrix
    out = torch.zeros(B, H, G * Tq, D, dtype=ct, device=q.device)
    probs = torch.zeros(B, H, G, Tq, kmax, dtype=ct, device=q.device) if return_probs else None
    future = torch.ones(Tq, Tq, dtype=torch.bool, device=q.device).triu(1)  # the chunk's later tokens
    for b, (starts, lengths) in enumerate(zip(start.tolist(), length.tolist())):
        for h, (s, n) in enumerate(zip(starts, lengths)):
            if n == 0:
                continue  # an empty head attends to nothing: zeros
            keys, values = k_packed[s:s + n], v_packed[s:s + n]  # (n, D) views of this head's rows
            if keys.dtype != ct:
                keys, values = keys.to(ct), values.to(ct)
            scores = qs[b, h] @ keys.T  # (G * Tq, n)
            if Tq > 1:  # token t may not see the chunk's tokens after it
                scores.view(G, Tq, n)[:, :, n - Tq:].masked_fill_(future, float("-inf"))
            p = torch.softmax(scores, dim=-1)  # (G * Tq, n)
            torch.mm(p, values, out=out[b, h])
            if return_probs:
                probs[b, h, :, :, :n] = p.view(G, Tq, n)
    return out.view(B, H, G, Tq, D).to(q.dtype), probs


def decode_v1(q, k_packed, v_packed, start, length, scale=None, return_probs=False):
    """One decode step over the packed cache, a head at a time; fp64 inputs give fp64.
    return_probs: also the weights (B, H, G, K)."""
    _check_decode(q, k_packed, v_packed, start, length, FLOAT_DTYPES + (torch.float64,))
    out, probs = attend_rows(q[:, :, :, None], k_packed, v_packed, start, length, scale, return_probs)
    return (out[:, :, :, 0], probs[:, :, :, 0]) if return_probs else out[:, :, :, 0]


def decode_v2(q, k_packed, v_packed, start, length, scale=None):
    """v1's math with every head padded to the longest and masked, as one graph under torch.compile."""
    _check_decode(q, k_packed, v_packed, start, length, FLOAT_DTYPES)
    kmax = int(length.max()) if length.numel() else 0
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _compiled(_attend_padded, q.device.type)(q, k_packed, v_packed, start, length, scale, kmax)[0]


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
    width = tl.where(chunk > 0, chunk + 0 * total, auto)  # a caller's chunk wins (tests); `0 * total`: int64
    return offs_h, lengths, ends, total, width


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
    BLOCK_G: tl.constexpr,  # G padded to >= 16 rows for tl.dot
    BLOCK_N: tl.constexpr,  # keys per inner tile
    BLOCK_D: tl.constexpr,  # next power of two >= D, >= 16
    PRECISION: tl.constexpr,  # tl.dot input precision ("ieee" for fp32 inputs)
    DOT_F32: tl.constexpr,  # upcast dot operands (the Triton 3.9 interpreter's bf16 tl.dot is wrong)
):
    part = tl.program_id(0).to(tl.int64)
    offs_h, lengths, ends, total, width = _token_stream(length_ptr, n_heads, n_parts, chunk, min_chunk,
                                                        BLOCK_HEADS, BLOCK_N)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
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
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)  # (BLOCK_G, BLOCK_D)
            m = m_new
        slot = part + head
        # an empty head inside the part writes nothing (its slot may be another segment's)
        write_g = (offs_g < G) & (t0 + 0 * offs_g < t1)  # (BLOCK_G,)
        tl.store(o_part_ptr + (slot * G + offs_g)[:, None] * D + offs_d[None, :], acc / l[:, None],
                 mask=write_g[:, None] & (offs_d[None, :] < D))
        tl.store(lse_part_ptr + slot * G + offs_g, m + tl.log2(l), mask=write_g)


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
    offs_c = tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    l = (n * 0).to(tl.float32)  # scalar running sums
    m = l - float("inf")
    acc = tl.zeros([BLOCK_D], tl.float32)
    for c0 in range(0, n, BLOCK_C):  # one pass: rescale the running sums when the maximum grows
        slot = p_first + c0 + offs_c + head  # (BLOCK_C,)
        mask_c = (c0 + offs_c < n) & (slot < n_parts + n_heads)  # (lengths past N never read past the buffer)
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


@functools.lru_cache(maxsize=None)
def _sm_count(device):
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def decode_v3(q, k_packed, v_packed, start, length, scale=None, chunk=None):
    """Triton split-KV decode: two launches, metadata on the device (no host sync).

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
    _decode_split_kernel[(n_parts,)](
        q, k_packed, v_packed, start, length, o_part, lse_part, n_heads, n_rows, n_parts, chunk, max(1, min_chunk),
        scale * math.log2(math.e), G, D=D, BLOCK_HEADS=block_heads, BLOCK_G=max(16, triton.next_power_of_2(G)),
        BLOCK_N=block_n, BLOCK_D=block_d, PRECISION="ieee" if q.dtype == torch.float32 or upcast else "tf32",
        DOT_F32=upcast, num_warps=warps, num_stages=stages)
    _decode_combine_kernel[(n_heads, G)](
        o_part, lse_part, length, out, n_heads, n_parts, chunk, max(1, min_chunk), G, D=D,
        BLOCK_HEADS=block_heads, BLOCK_N=block_n, BLOCK_C=TUNING.combine_block, BLOCK_D=block_d, num_warps=4)
    return out


DECODE = {"v1": decode_v1, "v2": decode_v2, "v3": decode_v3}


def decode_attention(q, k_packed, v_packed, start, length, scale=None, impl="auto"):
    """q (B, H, G, D) attends to each head's packed rows -> (B, H, G, D), like KVCache.attend."""
    return _pick(DECODE, impl, q)(q, k_packed, v_packed, start, length, scale)


# -----------------------------------------------------------------------------
# append T new tokens per head in place (T = 1: a decode step; T > 1: a chunk, such as a question)
#   bytes: read and write T K and V rows per head, 4 * B*H * T * D * elt (A1, B=1, H=32, T=1: 32 KB), where
#   AdaKV's append re-allocates and copies the whole cache in use (215 MB at 20% of 32k).
#   There is no v2 (impl "v2" runs v1): the v1 step is a few indexed writes; it costs launches, not bytes.


def _check_append(k_packed, v_packed, pos, start, length, capacity, k_new, v_new, check):
    dev = k_packed.device
    _check_tensor("k_packed", k_packed, 2, FLOAT_DTYPES, dev)
    _check_tensor("v_packed", v_packed, 2, (k_packed.dtype,), dev)
    _check_tensor("k_new", k_new, 4, (k_packed.dtype,), dev)
    _check_tensor("v_new", v_new, 4, (k_packed.dtype,), dev)
    for name, t in (("pos", pos), ("start", start), ("length", length), ("capacity", capacity)):
        _check_tensor(name, t, 1 if name == "pos" else 2, (torch.int64,), dev)
    B, H, T, D = k_new.shape
    if v_new.shape != k_new.shape or T < 1 or v_packed.shape != k_packed.shape or k_packed.shape[1] != D or \
            pos.shape[0] != k_packed.shape[0] or not start.shape == length.shape == capacity.shape == (B, H):
        raise ValueError(f"expected k_new, v_new (B, H, T, D) with T >= 1, k_packed, v_packed (N, D), pos (N,), "
                         f"start, length, capacity (B, H); got k_new {tuple(k_new.shape)}, v_new {tuple(v_new.shape)}, "
                         f"k_packed {tuple(k_packed.shape)}, pos {tuple(pos.shape)}, start {tuple(start.shape)}")
    if check and bool((length + T > capacity).any()):  # one sync; check=False leaves it to the kernel
        full = (length + T > capacity).nonzero()[0].tolist()
        raise ValueError(f"capacity overflow: head (b, h) = {full} has fewer than T = {T} spare rows left; re-pack "
                         f"the cache with more slack (KVCache.append re-packs) before appending")


def append_v1(k_packed, v_packed, pos, start, length, capacity, k_new, v_new, position, check=True):
    """Write k_new, v_new (B, H, T, D) at rows start + length ... + T - 1 of every head, positions
    position ... position + T - 1; length += T (in place). Rows past a head's capacity are skipped."""
    _check_append(k_packed, v_packed, pos, start, length, capacity, k_new, v_new, check)
    slot = length[..., None] + torch.arange(k_new.shape[2], device=k_packed.device)  # (B, H, T) each token's slot
    rows = start[..., None] + slot  # (B, H, T)
    fits = (slot < capacity[..., None]) & (rows >= 0) & (rows < k_packed.shape[0])  # full heads: no stray write
    b, h, t = fits.nonzero(as_tuple=True)  # (n,) each: the new tokens that fit
    r = rows[b, h, t]  # (n,)
    k_packed[r], v_packed[r], pos[r] = k_new[b, h, t], v_new[b, h, t], position + t
    length += fits.sum(-1)


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
    """Triton append: one launch per new token, one program per head (a decode step: one launch)."""
    _check_append(k_packed, v_packed, pos, start, length, capacity, k_new, v_new, check)
    _check_v3_device(k_packed)
    B, H, T, D = k_new.shape
    for t in range(T):  # a chunk's tokens one after another; (B, H, 1, D) is already the kernel's (B*H, D)
        k_t, v_t = (k_new, v_new) if T == 1 else (k_new[:, :, t].contiguous(), v_new[:, :, t].contiguous())
        _append_kernel[(B * H,)](k_t, v_t, k_packed, v_packed, pos, start, length, capacity, position + t,
                                 k_packed.shape[0], D=D, BLOCK_D=triton.next_power_of_2(D), num_warps=1)


APPEND = {"v1": append_v1, "v2": append_v1, "v3": append_v3}  # v2: append has no compiled twin, it runs v1


def append_(k_packed, v_packed, pos, start, length, capacity, k_new, v_new, position, impl="auto", check=True):
    """Append T tokens per head, k_new, v_new (B, H, T, D), in place (impl: auto / v1 / v2 = v1 / v3);
    raises when a head lacks T spare rows (check=False: such rows are skipped)."""
    _pick(APPEND, impl, k_packed)(k_packed, v_packed, pos, start, length, capacity, k_new, v_new, position, check)


# -----------------------------------------------------------------------------
# benchmark, small: bytes first, then triton.testing.do_bench (median, L2 flushed) side by side.
# bench/kernels.py has the full table (CUDA-graph timings, skewed lengths, variants, the targets).


def _spread(B, H, mean):
    """Per-head lengths (B, H) from 0.5x to 1.5x of mean: a budget that differs per head."""
    return torch.linspace(0.5 * mean, 1.5 * mean, H).round().long().repeat(B, 1)


def bench():
    """One small table: E1 evict, D1 / D2 decode and A1 append, v1 / v2 / v3 beside a copy or SDPA."""
    if not torch.cuda.is_available():
        raise SystemExit("kernels.py --bench needs a CUDA card (it times GPU kernels); on the CPU run `python -m "
                         "pytest -q tests/test_kernels.py`, which checks every version under the interpreter")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench
    dev, dtype, D, elt = "cuda", torch.bfloat16, 128, 2
    rows = []

    def add(case, impl, fn, nbytes):
        fn()  # compile and warm up
        rows.append((case, impl, 1000 * do_bench(fn, warmup=10, rep=50, return_mode="median"), nbytes))

    def sdpa(q, k, v):  # dense decode: a group's G query heads are G query tokens of its KV head
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v)  # q (B, H, G, D), k, v (B, H, T, D)

    k, v = (torch.randn(1, 32, 32768, D, dtype=dtype, device=dev) for _ in range(2))
    scores, counts = torch.rand(1, 32, 32768, device=dev), _spread(1, 32, 32768 // 5)
    kv_bytes = 4 * int(counts.sum()) * D * elt  # read + write every kept K and V row
    kept = torch.empty(kv_bytes // 2, dtype=torch.uint8, device=dev)
    kept_out = torch.empty_like(kept)
    add("E1 evict B=1 H=32 T=32k 20%", "copy of the kept bytes", lambda: kept_out.copy_(kept), kv_bytes)
    for impl in ("v1", "v2", "v3"):
        add("E1 evict B=1 H=32 T=32k 20%", impl, lambda impl=impl: EVICT[impl](k, v, scores, counts, 4, 64), kv_bytes)
    for name, B, H, G, T in (("D1", 1, 32, 1, 32768), ("D2", 8, 8, 4, 32768)):
        case = f"{name} decode B={B} Hq={H * G} Hkv={H} T=32k"
        q = torch.randn(B, H, G, D, dtype=dtype, device=dev)
        kf, vf = (torch.randn(B, H, T, D, dtype=dtype, device=dev) for _ in range(2))
        add(case, "SDPA flash, full cache", lambda q=q, kf=kf, vf=vf: sdpa(q, kf, vf), 2 * B * H * T * D * elt)
        start, length, _, N = _layout(_spread(B, H, T // 5), 32, dev)
        kp, vp = (torch.randn(N, D, dtype=dtype, device=dev) for _ in range(2))
        for impl in ("v1", "v2", "v3"):
            add(case, impl, lambda impl=impl, q=q, kp=kp, vp=vp, start=start, length=length:
                DECODE[impl](q, kp, vp, start, length), 2 * int(length.sum()) * D * elt)
    start, length, capacity, N = _layout(_spread(1, 32, 6553), 8192, dev)  # room for every timed call
    kp, vp = (torch.randn(N, D, dtype=dtype, device=dev) for _ in range(2))
    pos = torch.zeros(N, dtype=torch.long, device=dev)
    kn, vn = (torch.randn(1, 32, 1, D, dtype=dtype, device=dev) for _ in range(2))  # (B, H, T=1, D)
    for impl in ("v1", "v3"):  # check=False: a head that fills up is skipped, not an error
        add("A1 append B=1 H=32", impl, lambda impl=impl: APPEND[impl](kp, vp, pos, start, length, capacity, kn, vn,
                                                                       7, check=False), 4 * 32 * D * elt)
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | bf16, D=128, "
          f"do_bench median (L2 flushed) of eager calls")
    print(f"{'case':34} {'impl':24} {'us':>9} {'MB':>8} {'GB/s':>6} {'speedup':>8}")
    for case, impl, us, nbytes in rows:
        base = next(r[2] for r in rows if r[0] == case and r[1] in ("v1", "SDPA flash, full cache"))
        print(f"{case:34} {impl:24} {us:9.1f} {nbytes / 1e6:8.2f} {nbytes / us / 1e3:6.0f} {base / us:7.2f}x")


# -----------------------------------------------------------------------------
# CLI


def demo():
    """A small agreement check of every implementation that runs on this machine."""
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    k, v = (torch.randn(2, 4, 300, 64, device=dev) for _ in range(2))
    scores = torch.randint(0, 8, (2, 4, 300), device=dev).float()  # many ties
    counts = torch.randint(8, 300, (2, 4))
    ref = evict_v1(k, v, scores, counts, sink=2, window=4)
    q = torch.randn(2, 4, 2, 64, device=dev)
    out_ref = decode_v1(q.double(), ref.k.double(), ref.v.double(), ref.start, ref.length)
    for impl in ("v1", "v2", "v3"):
        if impl == "v2" and not v2_available(dev)[0]:
            print(f"v2: skipped, torch.compile fails here ({v2_available(dev)[1]})")
            continue
        if impl == "v3" and not (HAVE_TRITON and (dev == "cuda" or INTERPRET)):
            print("v3: skipped, Triton needs CUDA (or TRITON_INTERPRET=1 python kernels.py on the CPU)")
            continue
        got = EVICT[impl](k, v, scores, counts, sink=2, window=4)
        out = DECODE[impl](q, got.k, got.v, got.start, got.length)
        print(f"{impl}: evict positions equal: {torch.equal(got.pos, ref.pos)}, decode max |diff| vs fp64: "
              f"{(out.double() - out_ref).abs().max().item():.2e}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench", action="store_true", help="a few timed rows (needs CUDA); the full "
                                                             "benchmark is python -m bench.kernels")
    args = parser.parse_args()
    bench() if args.bench else demo()
