"""
A tiny Llama-style GPT in one file, with an explicit per-head KV cache that really shrinks.

Read top to bottom, small pieces first: config; RMSNorm and RoPE; the KV cache and the probe
(what the method sees inside attention); attention, which calls their verbs; the SwiGLU MLP and
the block; the model with generation; checkpoints. Every budget in this project is per
(layer, KV head): with grouped-query attention (GQA) the cache stores each KV head once and
its group of query heads reads it together. The cache's math (evict, decode attention, append)
lives once, in kernels.py, as v1 (PyTorch), v2 (torch.compile) and v3 (Triton).

    python model.py            # load the shipped checkpoint and print its size and cache bytes
    hf.load_model("path/to/Llama-3.1-8B-Instruct")   # a real checkpoint, through GPT.from_pretrained

Shapes: B batch, L layers, H KV heads, G query heads per KV head, T tokens, D head dim,
C model width, V vocabulary.
"""

import hashlib
import math
import os
import shutil
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels  # the cache's math: evict, decode attention, append (v1 / v2 / v3)

# -----------------------------------------------------------------------------
# config


@dataclass
class GPTConfig:
    vocab_size: int = 2512  # the shipped tokenizer's 2,511 BPE ranks + <|endoftext|> (checkpoints/tiny.pt)
    block_size: int = 4096  # longest sequence RoPE tables are built for
    n_layer: int = 6
    n_head: int = 8  # query heads
    n_kv_head: int = 4  # KV heads; n_head // n_kv_head query heads share one (GQA)
    n_embd: int = 256
    mlp_hidden: int = 704  # SwiGLU width, about 8/3 * n_embd rounded to a multiple of 64
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True  # the output head reuses the token embedding
    # fields that only checkpoints of other projects set (GPT.from_pretrained); the defaults are the tiny model
    head_dim: int = None  # per-head width; None = n_embd // n_head
    rope_scaling: dict = None  # Hugging Face's, e.g. {"rope_type": "llama3", "factor": 8.0, ...}; None = plain RoPE
    qkv_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    o_bias: bool = False  # the output projection carries a bias (Llama with attention_bias)

    def __post_init__(self):
        if self.head_dim is None:
            assert self.n_embd % self.n_head == 0, f"n_embd {self.n_embd} must be divisible by n_head {self.n_head}"
            self.head_dim = self.n_embd // self.n_head
        assert self.n_head % self.n_kv_head == 0, \
            f"n_kv_head {self.n_kv_head} must divide n_head {self.n_head} (grouped-query attention)"

    @property
    def group(self):
        return self.n_head // self.n_kv_head


# -----------------------------------------------------------------------------
# the pieces: RMSNorm, RoPE, explicit attention weights


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_frequencies(cfg):
    """RoPE's inverse frequencies (D/2,) and the scale of cos/sin, stretched as the config's rope_scaling asks.

    linear: every frequency / factor. llama3 (Llama 3.1): long wavelengths / factor, short ones
    kept, a smooth ramp between. yarn (Qwen2.5's long context): a ramp between the two over the
    dimensions, and cos/sin scaled by 0.1 ln(factor) + 1. The arithmetic follows Hugging Face's
    order of operations, so the tables agree to the last bit in float32.
    """
    D = cfg.head_dim
    dims = torch.arange(0, D, 2).float() / D  # (D/2,)
    inv_freq = 1.0 / (cfg.rope_theta ** dims)
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq, 1.0
    missing = [k for k in {"linear": ["factor"], "yarn": ["factor", "original_max_position_embeddings"],
                           "llama3": ["factor", "original_max_position_embeddings", "low_freq_factor",
                                      "high_freq_factor"]}.get(kind, []) if scaling.get(k) is None]
    if kind not in ("linear", "llama3", "yarn"):
        raise ValueError(f"rope scaling {kind!r} is not supported; supported: default, linear, llama3, yarn")
    if missing:
        raise ValueError(f"rope scaling {kind!r} needs {missing} in rope_scaling, got {scaling}")
    factor = scaling["factor"]
    if kind == "linear":
        return inv_freq / factor, 1.0
    old_context = scaling["original_max_position_embeddings"]
    if kind == "llama3":
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        stretched = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * stretched / factor + smooth * stretched
        medium = ~(wavelen < old_context / high) * ~(wavelen > old_context / low)
        return torch.where(medium, smoothed, stretched), 1.0

    # yarn
    def mscale(scale, m=1):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    attention_scale = scaling.get("attention_factor")
    if attention_scale is None:
        attention_scale = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def correction_dim(rotations):  # the dimension whose wavelength fits `rotations` times into old_context
        return D * math.log(old_context / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

    lo, hi = correction_dim(scaling.get("beta_fast") or 32), correction_dim(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, D - 1)
    ramp = torch.clamp((torch.arange(D // 2, dtype=torch.float32) - lo) / ((hi + 0.001 if lo == hi else hi) - lo), 0, 1)
    extrapolate = 1 - ramp  # 1 = keep the original frequency, 0 = interpolate (divide by factor)
    pos_freqs = cfg.rope_theta ** dims
    return 1.0 / (factor * pos_freqs) * (1 - extrapolate) + inv_freq * extrapolate, float(attention_scale)


def rope_tables(cfg, device=None):
    """cos and sin of shape (block_size, D) in the Hugging Face Llama layout (two halves)."""
    inv_freq, scale = rope_frequencies(cfg)
    inv_freq = inv_freq.to(device)
    angles = torch.outer(torch.arange(cfg.block_size, device=device).float(), inv_freq)  # (T, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, D)
    if scale == 1.0:
        return angles.cos(), angles.sin()
    return angles.cos() * scale, angles.sin() * scale


def apply_rope(x, cos, sin):
    """Rotate x (B, heads, T, D) by the angles of its positions; cos/sin are (T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


def attention_probs(q, k, mask):
    """The slow, explicit attention weights that every probe and the cache reference use.

    q (B, H, G, Tq, D), k (B, H, Tk, D), mask (Tq, Tk) or (B, H, 1, 1, Tk) bool (True = may attend)
    returns (B, H, G, Tq, Tk) float32.
    """
    scores = torch.einsum("bhgqd,bhkd->bhgqk", q.float(), k.float()) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1)


# -----------------------------------------------------------------------------
# the KV cache: packed rows, a length per (layer, batch, KV head)


class KVCache:
    """A KV cache in which every (layer, batch row, KV head) keeps its own number of tokens.

    Memory layout, one set per layer l (rows of all heads packed back to back, no padding):

        k[l], v[l]   (N_l, D)   head (b, h) owns rows start[l, b, h] ... start + capacity - 1;
                                the first length[l, b, h] of them are its tokens, in ascending
                                token order, the rest are spare rows for appends.
        pos[l]       (N_l,)     int64, the original token position of every row, so one can
                                always ask which tokens a head still holds.
        start, length, capacity (L, B, H) int64

    N_l = sum of capacities. `keep` and `evict` allocate new, smaller storage holding only the
    kept rows, so evicting really frees memory (masking would not). `append` writes one row per
    head in place, O(B * H * D) bytes, and only re-packs when a head's spare rows run out.

    Verbs: prefill (the prompt's K/V), append (one decoded token), keep (evict given slots),
    evict (evict by score), attend (one decode step). `nbytes()` reports what K and V occupy.
    The cache owns its fields: kernels.py computes (returns new rows or writes the rows it is
    handed), the verbs here install the results.

    impl, who runs evict / attend / append (all in kernels.py, one math):
        "v1"  the PyTorch reference (any device; the default on the CPU)
        "v2"  v1 under torch.compile (evict and attend; append stays v1, it has no compiled twin)
        "v3"  the Triton kernels (CUDA, or the CPU under TRITON_INTERPRET=1; the default on CUDA)
    attend(need_probs=True) always runs v1, the one path that returns the attention weights.

    The prefill / decode protocol: `seen` counts the tokens fed so far (the position of the next
    token). A forward pass writes layers 0 .. L-1 in order, and only the last layer's prefill or
    append advances `seen`, so every layer of one pass reads the same value: seen == 0 means this
    pass is the prompt (Attention prefills), seen > 0 means decode one token (Attention appends and
    attends). GPT.forward and Attention.forward read it; nothing else changes it.
    """

    IMPLS = ("v1", "v2", "v3")

    def __init__(self, cfg, batch_size, device="cpu", dtype=torch.float32, slack=32, impl=None):
        self.cfg, self.B, self.device, self.dtype = cfg, batch_size, torch.device(device), dtype
        self.slack = slack  # spare rows per head after prefill / keep / evict / re-pack
        if impl is None:
            impl = "v3" if self.device.type == "cuda" and kernels.HAVE_TRITON else "v1"
        if impl not in self.IMPLS:
            raise ValueError(f"impl must be one of {self.IMPLS} (v1 PyTorch reference, v2 torch.compile, v3 Triton) "
                             f"or None (v3 on CUDA, else v1); got {impl!r}"
                             + (" ('reference' is now 'v1')" if impl == "reference" else ""))
        self.impl = impl
        L, B, H = cfg.n_layer, batch_size, cfg.n_kv_head
        self.k = [None] * L
        self.v = [None] * L
        self.pos = [None] * L
        self.start = torch.zeros(L, B, H, dtype=torch.long, device=self.device)
        self.length = torch.zeros(L, B, H, dtype=torch.long, device=self.device)
        self.capacity = torch.zeros(L, B, H, dtype=torch.long, device=self.device)
        self.seen = 0  # tokens fed so far = the position of the next token (the protocol: see above)

    # -- storage helpers

    def _allocate(self, layer, capacity):
        """Fresh packed storage for a layer with the given per-head capacities (B, H)."""
        cap = capacity.flatten()  # (B*H,)
        start = torch.cumsum(cap, 0) - cap  # exclusive prefix sum: where each head begins
        n_rows = int(cap.sum())
        D = self.cfg.head_dim
        self.k[layer] = torch.empty(n_rows, D, dtype=self.dtype, device=self.device)
        self.v[layer] = torch.empty(n_rows, D, dtype=self.dtype, device=self.device)
        self.pos[layer] = torch.full((n_rows,), -1, dtype=torch.long, device=self.device)
        self.start[layer] = start.view(self.B, -1)
        self.capacity[layer] = capacity

    def _rows(self, layer, idx):
        """Packed row numbers of per-head token slots idx (B, H, K) -> (B, H, K)."""
        return self.start[layer][..., None] + idx

    def _move(self, layer, src_rows, dst_counts, new_capacity, valid):
        """Copy rows src_rows (B, H, K) [valid] into fresh storage; dst_counts (B, H) per head."""
        old_k, old_v, old_pos = self.k[layer], self.v[layer], self.pos[layer]
        self._allocate(layer, new_capacity)
        K = src_rows.shape[-1]
        dst_rows = self._rows(layer, torch.arange(K, device=self.device).expand_as(src_rows))
        src, dst = src_rows[valid], dst_rows[valid]  # (n_kept,) each, head-major, ascending
        self.k[layer][dst] = old_k[src]
        self.v[layer][dst] = old_v[src]
        self.pos[layer][dst] = old_pos[src]
        self.length[layer] = dst_counts

    # -- the verbs

    def prefill(self, layer, k, v):
        """Store a prompt's keys and values, k and v (B, H, T, D), for one layer."""
        B, H, T, D = k.shape
        assert (B, H, D) == (self.B, self.cfg.n_kv_head, self.cfg.head_dim), \
            f"prefill expects (B={self.B}, H={self.cfg.n_kv_head}, T, D={self.cfg.head_dim}), got {tuple(k.shape)}"
        self._allocate(layer, torch.full((B, H), T + self.slack, dtype=torch.long, device=self.device))
        rows = self._rows(layer, torch.arange(T, device=self.device).expand(B, H, T))  # (B, H, T)
        self.k[layer][rows] = k.to(self.dtype)
        self.v[layer][rows] = v.to(self.dtype)
        self.pos[layer][rows] = torch.arange(T, device=self.device).expand(B, H, T)
        self.length[layer] = T
        if layer == self.cfg.n_layer - 1:
            self.seen = T

    def append(self, layer, k, v, position=None):
        """Write one decoded token's k and v (B, H, D) at the end of every head's rows (its position:
        `seen` unless given, as when a chunk of tokens is appended one after another)."""
        if bool((self.length[layer] >= self.capacity[layer]).any()):
            # a head is full: re-pack this layer with fresh spare rows (amortised, not every step)
            idx = torch.arange(int(self.length[layer].max()), device=self.device)
            valid = idx < self.length[layer][..., None]  # (B, H, K)
            src = self._rows(layer, idx.expand(*valid.shape))
            self._move(layer, src, self.length[layer].clone(), self.length[layer] + self.slack, valid)
        # in place, O(B * H * D) bytes: row start + length of every head, and length += 1 (a view of ours)
        kernels.append_(self.k[layer], self.v[layer], self.pos[layer], self.start[layer], self.length[layer],
                        self.capacity[layer], k.to(self.dtype).contiguous(), v.to(self.dtype).contiguous(),
                        self.seen if position is None else position, impl=self.impl,
                        check=False)  # capacity was checked above (v2 appends as v1)
        if layer == self.cfg.n_layer - 1:
            self.seen += 1

    def keep(self, layer, kept_idx, counts=None):
        """Evict: keep only the given token slots of every head, in ascending order.

        kept_idx (B, H, K) int64: slots (0 .. length-1) each head keeps; only the first
        counts[b, h] entries of a row are read when counts (B, H) is given (rows of
        different lengths, padded). Any order; duplicates and out-of-range slots are refused.
        """
        B, H = self.B, self.cfg.n_kv_head
        if kept_idx.dim() != 3 or kept_idx.shape[:2] != (B, H):
            raise ValueError(f"kept_idx must have shape (B={B}, H={H}, K), got {tuple(kept_idx.shape)}")
        if kept_idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"kept_idx must hold integer slots, got dtype {kept_idx.dtype}")
        kept_idx = kept_idx.to(self.device, torch.long)
        K = kept_idx.shape[-1]
        counts = torch.full((B, H), K, dtype=torch.long, device=self.device) if counts is None \
            else counts.to(self.device, torch.long)
        if counts.shape != (B, H):
            raise ValueError(f"counts must have shape (B={B}, H={H}), got {tuple(counts.shape)}")
        length = self.length[layer]
        if bool((counts < 0).any()) or bool((counts > K).any()) or bool((counts > length).any()):
            bad = (counts > length).nonzero()
            raise ValueError(f"layer {layer}: each head keeps between 0 and its length tokens "
                             f"(and at most K={K}); got counts {counts.tolist()} for lengths {length.tolist()}"
                             + (f", first offending head (b, h) = {bad[0].tolist()}" if len(bad) else ""))
        valid = torch.arange(K, device=self.device) < counts[..., None]  # (B, H, K)
        if bool(((kept_idx < 0) | (kept_idx >= length[..., None]))[valid].any()):
            raise ValueError(f"layer {layer}: kept slots must lie in [0, length) of their head; "
                             f"got min {int(kept_idx[valid].min())}, max {int(kept_idx[valid].max())} "
                             f"for lengths {length.tolist()}")
        # sort each row (invalid entries last), then refuse duplicates
        big = torch.iinfo(torch.long).max
        ordered = torch.sort(kept_idx.masked_fill(~valid, big), dim=-1).values
        if bool(((ordered[..., 1:] == ordered[..., :-1]) & valid[..., 1:]).any()):
            raise ValueError(f"layer {layer}: kept slots of a head must be distinct; got duplicates")
        src = self._rows(layer, ordered.masked_fill(~valid, 0))
        self._move(layer, src, counts, counts + self.slack, valid)

    def attend(self, layer, q, need_probs=False):
        """One decode step: q (B, H, G, D) attends to each head's own rows -> (out (B, H, G, D), probs).

        probs (B, H, G, K) are the attention weights over each head's first K = max length rows (0
        past a head's length) when need_probs, else None; they come from v1, whatever the impl.
        """
        args = (q.to(self.dtype).contiguous(), self.k[layer], self.v[layer], self.start[layer], self.length[layer])
        if need_probs:
            out, probs = kernels.decode_v1(*args, return_probs=True)
            return out.to(q.dtype), probs
        return kernels.decode_attention(*args, impl=self.impl).to(q.dtype), None

    def attend_chunk(self, layer, q, need_probs=False):
        """A chunk of Tq new tokens (already appended) attends to each head's rows, token t to the rows
        before it and itself: q (B, H, G, Tq, D) -> (out (B, H, G, Tq, D), probs (B, H, G, Tq, K) or None).

        kernels.attend_rows, the per-head math of attend (v1) with a causal mask inside the chunk;
        feeding a question this way costs one pass, not Tq decode steps."""
        out, probs = kernels.attend_rows(q.to(self.dtype).contiguous(), self.k[layer], self.v[layer],
                                         self.start[layer], self.length[layer], return_probs=need_probs)
        return out.to(q.dtype), probs

    def evict(self, layer, scores, counts, sink=0, window=0):
        """Evict by score right after prefill: head (b, h) keeps its counts[b, h] best tokens.

        scores (B, H, T), one per token; the first `sink` and last `window` tokens are always
        kept, ties go to the later (more recent) token. kernels.evict selects and compacts (a
        radix select on the GPU) into fresh storage, which becomes this layer's; `keep` is the
        same thing for explicit slots.
        """
        n = self.length[layer]
        if not bool((n == n.flatten()[0]).all()):
            raise ValueError(f"evict works on a freshly prefilled layer (all heads {tuple(n.shape)} of one "
                             f"length); got lengths {n.tolist()}: use keep() with explicit slots instead")
        T = int(n.flatten()[0])
        rows = self._rows(layer, torch.arange(T, device=self.device))  # (B, H, T)
        k, v = self.k[layer][rows], self.v[layer][rows]  # (B, H, T, D) each, contiguous
        packed = kernels.evict(k, v, scores.to(self.device).contiguous(), counts, sink, window, self.slack,
                               impl=self.impl)  # a kernels.PackedKV: the kept rows, packed
        self.k[layer], self.v[layer], self.pos[layer] = packed.k, packed.v, packed.pos
        self.start[layer], self.length[layer], self.capacity[layer] = packed.start, packed.length, packed.capacity

    def clone(self):
        """An independent copy (the evaluation compresses one prefilled cache many ways)."""
        other = KVCache.__new__(KVCache)
        other.__dict__.update(self.__dict__)
        other.k = [t.clone() if t is not None else None for t in self.k]
        other.v = [t.clone() if t is not None else None for t in self.v]
        other.pos = [t.clone() if t is not None else None for t in self.pos]
        other.start, other.length, other.capacity = self.start.clone(), self.length.clone(), self.capacity.clone()
        return other

    def repeat(self, n):
        """A cache of n * B rows: row i * B + b is a copy of row b (compress each row its own way,
        then decode all of them as one batch)."""
        other = KVCache.__new__(KVCache)
        other.__dict__.update(self.__dict__)
        other.B = n * self.B
        other.k = [t.repeat(n, 1) if t is not None else None for t in self.k]  # (n * N_l, D) each
        other.v = [t.repeat(n, 1) if t is not None else None for t in self.v]
        other.pos = [t.repeat(n) if t is not None else None for t in self.pos]  # (n * N_l,)
        rows = torch.tensor([t.shape[0] if t is not None else 0 for t in self.k], device=self.device)  # (L,) N_l
        copy = torch.arange(n, device=self.device).repeat_interleave(self.B)  # (n * B,) the copy a row is in
        other.start = self.start.repeat(1, n, 1) + copy[None, :, None] * rows[:, None, None]  # (L, n * B, H)
        other.length, other.capacity = self.length.repeat(1, n, 1), self.capacity.repeat(1, n, 1)
        return other

    def keys(self, layer, b=0):
        """Keys of every head of batch row b, (H, T, D), when all heads hold the same T tokens."""
        n = self.length[layer, b]
        assert bool((n == n[0]).all()), "keys() needs equal head lengths (call it before evicting)"
        return self.k[layer][self._rows(layer, torch.arange(int(n[0]), device=self.device))[b]]

    # -- inspection

    def kept_positions(self, layer, b, h):
        """The original token positions head (b, h) of a layer still holds, ascending."""
        s, n = int(self.start[layer, b, h]), int(self.length[layer, b, h])
        return self.pos[layer][s:s + n]

    def nbytes(self, allocated=False):
        """Bytes of K and V held: rows in use, or (allocated=True) all rows incl. spare ones."""
        rows = int(self.capacity.sum()) if allocated else int(self.length.sum())
        return 2 * rows * self.cfg.head_dim * torch.tensor([], dtype=self.dtype).element_size()


@dataclass
class Probe:
    """What the method needs to see inside attention, filled in by the one attention code path.

    query_pos: positions whose attention weights to all earlier tokens the prefill records
    (SnapKV's observation window); decode: record every step's weights to all cached rows
    (the oracle). keep_values: record each layer's value vectors (B, H, T, D) of the prompt.
    query_stats = n: the mean and covariance of each query head's pre-RoPE queries past the first
    n positions (Expected Attention; n = the sinks). Attention calls the verbs record_queries
    (before RoPE), record_prefill and record_decode; a new kind of record is a field here and a
    line in one of them.
    """
    query_pos: torch.Tensor = None
    decode: bool = False
    keep_values: bool = False
    query_stats: int = None  # Expected Attention: query statistics past this many first positions
    prefill_attn: dict = field(default_factory=dict)  # layer -> (B, H, G, Tq, T)
    decode_attn: list = field(default_factory=list)  # step -> {layer: (B, H, G, rows)}
    values: dict = field(default_factory=dict)  # layer -> (B, H, T, D)
    query_mean: dict = field(default_factory=dict)  # layer -> (B, H*G, D)
    query_cov: dict = field(default_factory=dict)  # layer -> (B, H*G, D, D)

    def record_queries(self, layer, q):
        """The queries q (B, H*G, T, D) of one layer before RoPE: with query_stats = n, their mean and
        covariance over positions n.. (one-token decode steps record nothing)."""
        if self.query_stats is None or q.shape[2] <= max(self.query_stats, 1):
            return
        q = q[:, :, self.query_stats:].float()  # (B, H*G, T - n, D)
        mean = q.mean(dim=2)  # (B, H*G, D)
        centered = q - mean[:, :, None]  # (B, H*G, T - n, D)
        self.query_mean[layer] = mean
        self.query_cov[layer] = centered.transpose(-1, -2) @ centered / q.shape[2]  # (B, H*G, D, D)

    def record_prefill(self, layer, q, k, v):
        """The prompt pass of one layer: q (B, H, G, T, D) after RoPE, k and v (B, H, T, D)."""
        if self.query_pos is not None:
            qp, T = self.query_pos, k.shape[2]
            mask = torch.arange(T, device=k.device)[None, :] <= qp[:, None]  # (Tq, T) causal
            self.prefill_attn[layer] = attention_probs(q[:, :, :, qp], k, mask)  # (B, H, G, Tq, T)
        if self.keep_values:
            self.values[layer] = v.detach()  # (B, H, T, D)

    def record_decode(self, layer, probs, step=-1):
        """One decode step of one layer: probs (B, H, G, rows) over the cache's rows (KVCache.attend).
        A chunk of Tq tokens records its steps -Tq .. -1 in order (layer 0 opens each step)."""
        if not self.decode:
            return
        if layer == 0:
            self.decode_attn.append({})
        self.decode_attn[-1 if layer == 0 else step][layer] = probs


# -----------------------------------------------------------------------------
# attention, MLP and the block


class Attention(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        D = cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * D, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * D, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * D, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * D, cfg.n_embd, bias=cfg.o_bias)

    def forward(self, x, cos, sin, cache=None, probe=None):
        cfg = self.cfg
        B, T, C = x.shape
        H, G, D = cfg.n_kv_head, cfg.group, cfg.head_dim
        q = self.q_proj(x).view(B, T, H * G, D).transpose(1, 2)  # (B, H*G, T, D)
        k = self.k_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        v = self.v_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        if probe is not None:
            probe.record_queries(self.layer_idx, q)  # (B, H*G, T, D) before RoPE: Expected Attention
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if cache is not None and cache.seen > 0 and T > 1:
            # a chunk after the prompt (a question): its K/V go in row by row, then it attends causally
            start = cache.seen
            for t in range(T):
                cache.append(self.layer_idx, k[:, :, t], v[:, :, t], position=start + t)
            need_probs = probe is not None and probe.decode  # only the oracle's probe reads the weights
            y, probs = cache.attend_chunk(self.layer_idx, q.view(B, H, G, T, D), need_probs)  # (B, H, G, T, D)
            if need_probs:
                for t in range(T):  # the oracle sees every token of the chunk as one decode step
                    probe.record_decode(self.layer_idx, probs[:, :, :, t], step=t - T)
            y = y.permute(0, 3, 1, 2, 4).reshape(B, T, H * G * D)  # (B, T, H*G*D)
        elif cache is not None and cache.seen > 0:  # the cache's protocol: seen > 0 is decode (KVCache)
            # decode: one new token; its K/V go into the cache, then it attends to every row kept
            cache.append(self.layer_idx, k[:, :, 0], v[:, :, 0])
            need_probs = probe is not None and probe.decode  # only the oracle's probe reads the weights
            y, probs = cache.attend(self.layer_idx, q[:, :, 0].view(B, H, G, D), need_probs=need_probs)
            if probe is not None:
                probe.record_decode(self.layer_idx, probs)  # (B, H, G, rows), or None when not recorded
            y = y.reshape(B, 1, H * G * D)  # (B, 1, H*G*D)
        else:
            # full causal attention over the prompt (training, the uncached twin, and prefill)
            # each KV head is repeated for its G query heads so every PyTorch version takes its flash kernel
            kr, vr = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)  # (B, H*G, T, D)
            y = F.scaled_dot_product_attention(q, kr, vr, is_causal=True)  # (B, H*G, T, D)
            y = y.transpose(1, 2).reshape(B, T, H * G * D)  # (B, T, H*G*D)
            if cache is not None:
                cache.prefill(self.layer_idx, k, v)
            if probe is not None:
                probe.record_prefill(self.layer_idx, q.view(B, H, G, T, D), k, v)  # (B, H, G, T, D) query groups
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache=None, probe=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, probe)
        return x + self.mlp(self.post_attention_layernorm(x))


# -----------------------------------------------------------------------------
# the model


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, D)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                # the projections that write into the residual stream start small, as in GPT-2 / nanoGPT
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, cache=None, probe=None, loss_weights=None, last_only=False):
        """idx (B, T) -> logits (B, T, V), or (B, 1, V) of the last position when last_only.

        No cache: the plain causal forward (training, and the slow twin of cached decoding).
        Empty cache: the same forward, and every layer's K/V is stored (prefill).
        Filled cache: the tokens are appended to the cache and attend to it (one decode step, or a
        chunk such as a question, causal inside the chunk).
        last_only skips the output head for all but the last position (a prefill needs only that
        one: with a large vocabulary the head is a tenth of a small model's prefill).
        """
        B, T = idx.shape
        if cache is not None and cache.seen > 0:
            start = cache.seen  # decode: one token, or a chunk (Attention appends it and attends causally)
        else:
            start = 0
        if start + T > self.cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds the model's context of "
                             f"{self.cfg.block_size}; shorten the prompt")
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]  # (T, D)
        x = self.embed_tokens(idx)  # (B, T, C)
        for block in self.layers:
            x = block(x, cos, sin, cache, probe)
        logits = self.lm_head(self.norm(x[:, -1:] if last_only else x))  # (B, T or 1, V)
        if targets is None:
            return logits
        losses = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1),
                                 ignore_index=-1, reduction="none")
        if loss_weights is None:
            return logits, losses.mean()
        w = loss_weights.reshape(-1)
        return logits, (losses * w).sum() / w.sum().clamp(min=1e-8)

    def o_proj_heads(self, layer):
        """Each query head's slice of the output projection: (H, G, C, D), W_O[h] in the paper."""
        cfg = self.cfg
        w = self.layers[layer].self_attn.o_proj.weight  # (C, H*G*D)
        return w.view(cfg.n_embd, cfg.n_kv_head, cfg.group, cfg.head_dim).permute(1, 2, 0, 3)

    def new_cache(self, batch_size=1, slack=32, impl=None):
        """An empty KVCache on the model's device and dtype (impl: see KVCache)."""
        p = self.embed_tokens.weight
        return KVCache(self.cfg, batch_size, device=p.device, dtype=p.dtype, slack=slack, impl=impl)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, cache=None, temperature=0.0, stop_token=None, generator=None, probe=None):
        """Feed idx (B, T) through the cache (prefill or continue), then sample new tokens.

        Greedy when temperature == 0; stop_token: one id or a collection of ids, generation stops
        once every row has produced one. Returns (new tokens (B, <= max_new_tokens), cache).
        """
        cache = cache if cache is not None else self.new_cache(idx.shape[0])
        stops = None if stop_token is None else torch.tensor(
            [stop_token] if isinstance(stop_token, int) else sorted(stop_token), dtype=torch.long, device=idx.device)
        done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        logits = self(idx, cache=cache, probe=probe, last_only=True)[:, -1]  # (B, V)
        out = []
        for _ in range(max_new_tokens):
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)  # (B, 1)
            else:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            out.append(nxt)
            if stops is not None:
                done |= torch.isin(nxt[:, 0], stops)
                if bool(done.all()):
                    break
            logits = self(nxt, cache=cache, probe=probe)[:, -1]
        return torch.cat(out, dim=1), cache

    @classmethod
    def from_pretrained(cls, cfg, tensors, device="cpu", dtype=None):
        """Build a model of cfg from a real checkpoint's tensors: an iterable of (name, tensor) pairs.

        Names are Hugging Face's Llama names ("model.layers.0.self_attn.q_proj.weight"; the
        "model." prefix is optional). Reading the files (a safetensors folder, a GGUF file) and
        mapping their config to a GPTConfig is hf.py's job; this only places the tensors. The
        model is built without memory (on the meta device) and filled tensor by tensor, in the
        first tensor's dtype unless dtype is given. Returns the model in eval mode.
        """
        with torch.device("meta"):
            model = cls(cfg)  # shapes only, no memory
        expected = model.state_dict()
        state, unexpected, wrong = {}, [], []
        for key, tensor in tensors:
            name = key.removeprefix("model.")  # our names are Hugging Face's without "model."
            if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and cfg.tie_embeddings):
                continue  # recomputed here / the embedding is the output head
            if name not in expected:
                unexpected.append(name)
                continue
            if tensor.shape != expected[name].shape:
                wrong.append(f"{name}: {tuple(tensor.shape)} vs {tuple(expected[name].shape)}")
                continue
            dtype = dtype or tensor.dtype  # the first tensor tells the checkpoint's dtype
            state[name] = tensor.to(device=device, dtype=dtype)
        if unexpected or wrong:
            raise RuntimeError(f"the checkpoint does not fit GPT({cfg}): unexpected tensors {unexpected[:5]}, "
                               f"shape mismatches (file vs model) {wrong[:5]}")
        model.load_state_dict(state, strict=False, assign=True)  # the file's tensors become the parameters
        if cfg.tie_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        missing = [n for n, p in model.named_parameters() if p.is_meta]
        if missing:
            raise RuntimeError(f"the checkpoint lacks {len(missing)} tensors of GPT({cfg}), e.g. {missing[:5]}; "
                               f"is it complete?")
        cos, sin = rope_tables(cfg, device)
        model.rope_cos, model.rope_sin = cos.to(dtype), sin.to(dtype)  # (block_size, D) each
        return model.requires_grad_(False).eval()


# -----------------------------------------------------------------------------
# checkpoints: weights, config, the tokenizer's hash, and how they were made

DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "tiny.pt")


def save_checkpoint(path, model, tokenizer_path, meta):
    """Write fp16 weights (the shipped file stays small), the config and the tokenizer's sha256."""
    with open(tokenizer_path, "rb") as f:
        tok_sha = hashlib.sha256(f.read()).hexdigest()
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), os.path.basename(tokenizer_path))
    if os.path.abspath(tokenizer_path) != beside:
        shutil.copyfile(tokenizer_path, beside)  # the tokenizer always travels with its checkpoint
    state = {k: v.detach().to("cpu", torch.float16) for k, v in model.state_dict().items()
             if not (model.cfg.tie_embeddings and k == "lm_head.weight")}
    tmp = path + ".tmp"
    torch.save({"config": asdict(model.cfg), "model": state, "tokenizer_sha256": tok_sha,
                "tokenizer_file": os.path.basename(tokenizer_path), "meta": meta}, tmp)
    os.replace(tmp, path)  # atomic: a crash never leaves half a checkpoint


def load_checkpoint(path=DEFAULT_CHECKPOINT, device="cpu", dtype=torch.float32):
    """Load (model, header): header holds the training meta and the tokenizer file beside the
    checkpoint with its sha256 (tasks.load_tokenizer reads it; model.py knows no tokenizer)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}. The tiny model ships in checkpoints/; to make "
                                f"one: python train_tiny.py --smoke (CPU, a minute) or see README.md")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        cfg = GPTConfig(**ckpt["config"])
    except Exception as e:  # torch raises many kinds of errors on a damaged file
        raise RuntimeError(f"checkpoint {path} could not be read ({type(e).__name__}: {e}); it may be "
                           f"truncated or not a checkpoint of this project: restore it with git checkout "
                           f"or retrain with train_tiny.py") from None
    model = GPT(cfg)
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not cfg.tie_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {path} does not match GPT({cfg}): missing {missing}, unexpected {unexpected}")
    model.to(device=device, dtype=dtype).eval()
    header = {"meta": ckpt["meta"], "tokenizer_sha256": ckpt["tokenizer_sha256"],
              "tokenizer_path": os.path.join(os.path.dirname(os.path.abspath(path)), ckpt["tokenizer_file"])}
    return model, header


if __name__ == "__main__":
    model, header = load_checkpoint()
    cfg, cache = model.cfg, model.new_cache(1)
    with torch.no_grad():
        model(torch.zeros(1, 256, dtype=torch.long), cache=cache)  # a 256-token prompt fills the cache
    print(f"{DEFAULT_CHECKPOINT}: {model.num_params() / 1e6:.2f} M parameters, {cfg}")
    print(f"KV cache of a 256-token prompt: {cache.nbytes() / 1e6:.2f} MB in use ({cfg.n_layer} layers x "
          f"{cfg.n_kv_head} KV heads x {cfg.head_dim} dims, {cache.dtype}), impl {cache.impl}")
