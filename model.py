"""
A tiny Llama-style GPT in one file, with an explicit per-head KV cache that really shrinks.

Read top to bottom, small pieces first: config; RMSNorm and RoPE; the KV cache and the probe
(what the method sees inside attention); attention, which calls their verbs; the SwiGLU MLP and
the block; the model with generation; checkpoints. Every budget in this project is per
(layer, KV head): with grouped-query attention (GQA) the cache stores each KV head once and
its group of query heads reads it together. The cache's math (evict, decode attention, append)
lives once, in kernels.py, as v1 (PyTorch), v2 (torch.compile) and v3 (Triton).

    python model.py            # load the shipped checkpoint and print its size and cache bytes
    hf.load_model("path/to/Llama-3.1-8B-Instruct")   # a real checkpoint (experiments/hf.py), GPT.from_pretrained

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

    Verbs: prefill (a prompt), append (new tokens: a decode step or a chunk such as a question), keep
    (evict given slots), evict (evict by score), attend; repeat / clone copy it; keys, kept_mask and
    nbytes inspect it. kernels.py computes, the verbs install its results. impl picks who runs evict,
    attend and append: "v1" PyTorch (any device; the default on the CPU), "v2" torch.compile, "v3"
    Triton (the default on CUDA; the CPU under TRITON_INTERPRET=1); kernels.py says what each is.

    `seen` counts the tokens fed so far (the position of the next one). A forward pass writes layers
    0 .. L-1 in order and only the last layer advances it, so every layer of one pass reads the same
    value: 0 means the pass is the prompt (Attention prefills), more means new tokens (append, attend).
    """

    def __init__(self, n_layer, n_kv_head, head_dim, batch_size=1, device="cpu", dtype=torch.float32, slack=32,
                 impl=None):
        self.n_layer, self.n_kv_head, self.head_dim, self.B = n_layer, n_kv_head, head_dim, batch_size
        self.device, self.dtype = torch.device(device), dtype
        self.slack = slack  # spare rows per head after prefill / keep / evict / re-pack
        self.impl = impl or ("v3" if self.device.type == "cuda" and kernels.HAVE_TRITON else "v1")
        if self.impl not in ("v1", "v2", "v3"):
            raise ValueError(f"impl must be one of ['v1', 'v2', 'v3'] (PyTorch, torch.compile, Triton) or None (v3 "
                             f"on CUDA with Triton, else v1); got {impl!r}")
        # Memory layout, one set per layer l (the rows of all heads packed back to back, no padding):
        #   k[l], v[l]   (N_l, D)  head (b, h) owns rows start[l, b, h] ... start + capacity - 1; the first
        #                          length[l, b, h] of them are its tokens in ascending token order, the rest
        #                          are spare rows for appends
        #   pos[l]       (N_l,)    int64 original token position of every row (-1 on spare rows)
        #   start, length, capacity   (L, B, H) int64; N_l = the sum of layer l's capacities
        # keep and evict allocate new, smaller storage holding only the kept rows, so evicting really frees
        # memory (masking would not); append writes in place and re-packs only when spare rows run out.
        L, B, H = n_layer, batch_size, n_kv_head
        self.k, self.v, self.pos = [None] * L, [None] * L, [None] * L
        self.start, self.length, self.capacity = (torch.zeros(L, B, H, dtype=torch.long, device=self.device)
                                                  for _ in range(3))
        self.seen = 0

    # -- storage

    def _allocate(self, layer, capacity):
        """Fresh packed storage for a layer with the given per-head capacities (B, H)."""
        n_rows = int(capacity.sum())
        self.k[layer] = torch.empty(n_rows, self.head_dim, dtype=self.dtype, device=self.device)
        self.v[layer] = torch.empty(n_rows, self.head_dim, dtype=self.dtype, device=self.device)
        self.pos[layer] = torch.full((n_rows,), -1, dtype=torch.long, device=self.device)
        self.start[layer] = torch.cumsum(capacity.flatten(), 0).view_as(capacity) - capacity  # exclusive prefix sum
        self.capacity[layer] = capacity

    def _rows(self, layer, slots):
        """Packed row numbers of per-head token slots (B, H, K) -> (B, H, K)."""
        return self.start[layer][..., None] + slots

    def _move(self, layer, slots, counts, spare):
        """Copy each head's first counts[b, h] slots (B, H, K) into fresh storage with `spare` rows to spare."""
        old_k, old_v, old_pos = self.k[layer], self.v[layer], self.pos[layer]
        order = torch.arange(slots.shape[-1], device=self.device).expand_as(slots)  # (B, H, K)
        valid = order < counts[..., None]  # (B, H, K)
        src = self._rows(layer, slots)[valid]  # (n_kept,) head-major
        self._allocate(layer, counts + spare)
        dst = self._rows(layer, order)[valid]  # (n_kept,) the same heads, from their first row on
        self.k[layer][dst], self.v[layer][dst], self.pos[layer][dst] = old_k[src], old_v[src], old_pos[src]
        self.length[layer] = counts

    def _row_heads(self, capacity, n_rows):
        """The head b * H + h that owns each packed row (N,): heads hold capacity[b, h] rows, back to back."""
        heads = torch.arange(capacity.numel(), device=self.device)
        return torch.repeat_interleave(heads, capacity.flatten(), output_size=n_rows)

    def _same_length(self, layer, verb):
        """T when every head of the layer holds the same T rows (after prefill, also after repeat), else refused."""
        n = self.length[layer]
        if not bool((n == n.flatten()[0]).all()):
            raise ValueError(f"{verb} needs every head of layer {layer} to hold the same number of rows (as after "
                             f"prefill); got lengths {n.tolist()}: call it before evicting, or use keep()")
        return int(n.flatten()[0])

    def _check(self, verb, k, v):
        """New keys and values must be (B, H, T >= 1, D), in this cache's B, H and D."""
        if k.dim() != 4 or (k.shape[0], k.shape[1], k.shape[3]) != (self.B, self.n_kv_head, self.head_dim) or \
                k.shape[2] < 1 or v.shape != k.shape:
            raise ValueError(f"{verb} expects k, v (B={self.B}, H={self.n_kv_head}, T >= 1, D={self.head_dim}), "
                             f"got {tuple(k.shape)} and {tuple(v.shape)}")

    # -- the verbs

    def prefill(self, layer, k, v):
        """Store a prompt's keys and values, k and v (B, H, T, D), for one layer."""
        self._check("prefill", k, v)
        B, H, T, D = k.shape
        self._allocate(layer, torch.full((B, H), T + self.slack, dtype=torch.long, device=self.device))
        slots = torch.arange(T, device=self.device).expand(B, H, T)  # (B, H, T)
        rows = self._rows(layer, slots)
        self.k[layer][rows], self.v[layer][rows], self.pos[layer][rows] = k.to(self.dtype), v.to(self.dtype), slots
        self.length[layer] = T
        if layer == self.n_layer - 1:
            self.seen = T

    def append(self, layer, k, v):
        """Write T >= 1 new tokens, k and v (B, H, T, D), after every head's rows (positions seen ..), in place;
        a layer whose heads lack T spare rows is re-packed once first, with T + slack spare rows per head."""
        self._check("append", k, v)
        B, H, T, D = k.shape
        length = self.length[layer]  # (B, H), a view: append_ grows it in place
        if bool((length + T > self.capacity[layer]).any()):  # amortised: not every step
            slots = torch.arange(int(length.max()), device=self.device).expand(B, H, -1)  # (B, H, K)
            self._move(layer, slots, length.clone(), T + self.slack)
        kernels.append_(self.k[layer], self.v[layer], self.pos[layer], self.start[layer], self.length[layer],
                        self.capacity[layer], k.to(self.dtype).contiguous(), v.to(self.dtype).contiguous(),
                        self.seen, impl=self.impl, check=False)  # capacity was made sure of above
        if layer == self.n_layer - 1:
            self.seen += T

    def keep(self, layer, kept_idx, counts=None):
        """Evict by explicit slots: head (b, h) keeps slots kept_idx[b, h, :counts[b, h]] (0 .. length - 1, any
        order, distinct), in ascending order. kept_idx (B, H, K) int; counts (B, H), K when not given."""
        B, H, K, length = self.B, self.n_kv_head, kept_idx.shape[-1], self.length[layer]
        if kept_idx.dim() != 3 or kept_idx.shape[:2] != (B, H) or kept_idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"kept_idx must hold integer slots of shape (B={B}, H={H}, K); got {kept_idx.dtype} "
                             f"{tuple(kept_idx.shape)}")
        counts = torch.full((B, H), K, device=self.device) if counts is None else counts.to(self.device, torch.long)
        if counts.shape != (B, H) or bool(((counts < 0) | (counts > K) | (counts > length)).any()):
            raise ValueError(f"layer {layer}: counts (B={B}, H={H}): each head keeps between 0 and its length tokens "
                             f"(and at most K={K}); got {counts.tolist()} for lengths {length.tolist()}")
        valid = torch.arange(K, device=self.device) < counts[..., None]  # (B, H, K)
        slots = kept_idx.to(self.device, torch.long).masked_fill(~valid, torch.iinfo(torch.long).max)
        ordered = torch.sort(slots, dim=-1).values  # (B, H, K) ascending, padding last: valid stays in front
        outside = bool(((ordered < 0) | (ordered >= length[..., None]))[valid].any())
        if outside or bool(((ordered[..., 1:] == ordered[..., :-1]) & valid[..., 1:]).any()):
            rule = "lie in [0, its length)" if outside else "be distinct"
            raise ValueError(f"layer {layer}: a head's kept slots must {rule}; got slots {int(ordered[valid].min())} "
                             f".. {int(ordered[valid].max())} for lengths {length.tolist()}")
        self._move(layer, ordered.masked_fill(~valid, 0), counts, self.slack)

    def evict(self, layer, scores, counts, sink=0, window=0):
        """Evict by score when every head holds the same T rows: head (b, h) keeps its counts[b, h] best rows by
        scores (B, H, T), always the first `sink` and last `window`, ties to the later row. kernels.evict
        selects and compacts them into fresh storage, which becomes the layer's."""
        T = self._same_length(layer, "evict")
        rows = self._rows(layer, torch.arange(T, device=self.device))  # (B, H, T)
        k, v, held = self.k[layer][rows], self.v[layer][rows], self.pos[layer][rows]  # (B, H, T[, D]) contiguous
        packed = kernels.evict(k, v, scores.to(self.device).contiguous(), counts, sink, window, self.slack,
                               impl=self.impl)  # a kernels.PackedKV; its pos are slots 0 .. T - 1
        heads = self._row_heads(packed.capacity, packed.k.shape[0])  # (N,)
        pos = torch.where(packed.pos >= 0, held.view(-1)[heads * T + packed.pos.clamp(min=0)], -1)  # slot -> position
        self.k[layer], self.v[layer], self.pos[layer] = packed.k, packed.v, pos
        self.start[layer], self.length[layer], self.capacity[layer] = packed.start, packed.length, packed.capacity

    def attend(self, layer, q, need_probs=False):
        """The new tokens q (B, H, G, Tq, D), every head's last Tq rows, attend to their head's rows, causally
        inside the chunk -> out (B, H, G, Tq, D), and the weights (B, H, G, Tq, K = max length) or None.
        Tq = 1 is a decode step (kernels.decode_attention, the cache's impl); need_probs or Tq > 1 run v1's
        per-head math (kernels.attend_rows)."""
        dtype, q = q.dtype, q.to(self.dtype).contiguous()
        rows = (self.k[layer], self.v[layer], self.start[layer], self.length[layer])
        if q.shape[3] == 1 and not need_probs:
            out = kernels.decode_attention(q[:, :, :, 0], *rows, impl=self.impl)  # (B, H, G, D)
            return out[:, :, :, None].to(dtype), None
        out, probs = kernels.attend_rows(q, *rows, return_probs=need_probs)
        return out.to(dtype), probs

    # -- copies, through the constructor

    def repeat(self, n):
        """A cache of n * B rows in which row i * B + b is a copy of row b (compress each row its own way,
        then decode all of them as one batch); repeat(1) is an independent copy."""
        other = KVCache(self.n_layer, self.n_kv_head, self.head_dim, n * self.B, self.device, self.dtype, self.slack,
                        self.impl)
        other.k, other.v, other.pos = ([None if t is None else torch.cat([t] * n) for t in ts]
                                       for ts in (self.k, self.v, self.pos))
        rows = torch.tensor([0 if t is None else t.shape[0] for t in self.k], device=self.device)  # (L,) N_l
        copy = torch.arange(n, device=self.device).repeat_interleave(self.B)  # (n * B,) the copy a row is in
        other.start = self.start.repeat(1, n, 1) + copy[None, :, None] * rows[:, None, None]  # (L, n * B, H)
        other.length, other.capacity, other.seen = self.length.repeat(1, n, 1), self.capacity.repeat(1, n, 1), self.seen
        return other

    def clone(self):
        """An independent copy (the evaluation compresses one prefilled cache many ways)."""
        return self.repeat(1)

    # -- inspection

    def keys(self, layer, b=0):
        """Keys of every head of batch row b, (H, T, D), while all heads hold the same T rows (before evicting)."""
        T = self._same_length(layer, "keys()")
        return self.k[layer][self._rows(layer, torch.arange(T, device=self.device))[b]]

    def kept_mask(self, layer, T):
        """(B, H, T) bool: True where head (b, h) of the layer still holds original position t (t < T)."""
        pos = self.pos[layer]  # (N,)
        heads = self._row_heads(self.capacity[layer], pos.shape[0])  # (N,)
        held = (pos >= 0) & (pos < T)  # spare rows hold -1; tokens appended later hold positions >= T
        mask = torch.zeros(self.B * self.n_kv_head, T, dtype=torch.bool, device=self.device)
        mask[heads[held], pos[held]] = True
        return mask.view(self.B, self.n_kv_head, T)

    def nbytes(self, allocated=False):
        """Bytes of K and V held: rows in use, or (allocated=True) all rows including spare ones."""
        rows = int(self.capacity.sum()) if allocated else int(self.length.sum())
        return 2 * rows * self.head_dim * torch.tensor([], dtype=self.dtype).element_size()


@dataclass
class Probe:
    """What the method needs to see inside attention, filled in by the one attention code path.

    query_pos: positions whose attention weights to all earlier tokens the prefill records
    (SnapKV's observation window); decode: record the weights of every token fed after the prompt
    over all cached rows (the oracle). keep_values: record each layer's value vectors (B, H, T, D) of
    the prompt. query_stats = n: the mean and covariance of each query head's pre-RoPE queries past
    the first n positions (Expected Attention; n = the sinks). Attention calls the verbs
    record_queries (before RoPE), record_prefill and record_decode; a new kind of record is a field
    here and a line in one of them.
    """
    query_pos: torch.Tensor = None
    decode: bool = False
    keep_values: bool = False
    query_stats: int = None  # Expected Attention: query statistics past this many first positions
    prefill_attn: dict = field(default_factory=dict)  # layer -> (B, H, G, Tq, T)
    decode_attn: list = field(default_factory=list)  # step (one token fed after the prompt) -> {layer: (B, H, G, rows)}
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

    def record_decode(self, layer, probs):
        """Tokens fed after the prompt, one layer: probs (B, H, G, Tq, rows) over the cache's rows (KVCache.attend).
        Each of the Tq tokens is one step: layer 0 opens the chunk's Tq steps, later layers fill the same ones."""
        if not self.decode:
            return
        Tq = probs.shape[3]
        if layer == 0:
            self.decode_attn.extend({} for _ in range(Tq))
        for t, step in enumerate(self.decode_attn[len(self.decode_attn) - Tq:]):
            step[layer] = probs[:, :, :, t]  # (B, H, G, rows)


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

        if cache is None or cache.seen == 0:
            # full causal attention over the prompt (training, the uncached twin, and prefill)
            # each KV head is repeated for its G query heads so every PyTorch version takes its flash kernel
            kr, vr = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)  # (B, H*G, T, D)
            y = F.scaled_dot_product_attention(q, kr, vr, is_causal=True)  # (B, H*G, T, D)
            y = y.transpose(1, 2).reshape(B, T, H * G * D)  # (B, T, H*G*D)
            if cache is not None:
                cache.prefill(self.layer_idx, k, v)
            if probe is not None:
                probe.record_prefill(self.layer_idx, q.view(B, H, G, T, D), k, v)  # (B, H, G, T, D) query groups
        else:
            # a filled cache: the T new tokens (one decode step, or a chunk such as a question) go in after
            # every head's rows, then attend to the rows kept, causally inside the chunk
            cache.append(self.layer_idx, k, v)
            need_probs = probe is not None and probe.decode  # only the oracle's probe reads the weights
            y, probs = cache.attend(self.layer_idx, q.view(B, H, G, T, D), need_probs)  # (B, H, G, T, D)
            if need_probs:
                probe.record_decode(self.layer_idx, probs)  # (B, H, G, T, rows)
            y = y.permute(0, 3, 1, 2, 4).reshape(B, T, H * G * D)  # (B, T, H*G*D)
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

    def weights_key(self):
        """The weights' dtype and device: both change the answers, so both name every saved record (int8 for linear
        layers quantized by torch's dynamic quantization)."""
        p = self.embed_tokens.weight
        schemes = {str(m.weight().qscheme()).removeprefix("torch.") for m in self.modules()
                   if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)}  # int8 layers, and how they are scaled
        return f"{p.dtype}/{p.device.type}" + "".join(f"/int8 {s}" for s in sorted(schemes))

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
        start = 0 if cache is None else cache.seen  # the position of the first new token
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
        w = w().dequantize() if callable(w) else w  # an int8 layer (torch's dynamic quantization) hands it out
        return w.view(cfg.n_embd, cfg.n_kv_head, cfg.group, cfg.head_dim).permute(1, 2, 0, 3)

    def new_cache(self, batch_size=1, slack=32, impl=None):
        """An empty KVCache for this model on its device and dtype (slack, impl: see KVCache)."""
        p, cfg = self.embed_tokens.weight, self.cfg
        return KVCache(cfg.n_layer, cfg.n_kv_head, cfg.head_dim, batch_size, device=p.device, dtype=p.dtype,
                       slack=slack, impl=impl)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, cache=None, temperature=0.0, stop_ids=(), done=None, generator=None,
                 probe=None):
        """Feed idx (B, T) through the cache (a prefill if it is empty, else a chunk), then decode: B lists of new ids.

        Row b finishes when it emits a token in stop_ids (left out of its list) or when done(its ids so
        far) returns True (its ids kept as they are). A finished row gets no more tokens, so what a row
        decodes never depends on the rows beside it; decoding ends when every row has finished or after
        max_new_tokens. Each step's tokens are fed back through the cache until then, the last step's
        too (a probe sees the query of every token kept; a finished row is fed a token nothing reads).
        Greedy at temperature 0, else sampled from softmax(logits / temperature) with `generator`.
        """
        B = idx.shape[0]
        cache = cache if cache is not None else self.new_cache(B)
        stops = {int(stop_ids)} if isinstance(stop_ids, int) else {int(t) for t in stop_ids}
        rows, finished = [[] for _ in range(B)], [False] * B
        logits = self(idx, cache=cache, probe=probe, last_only=True)[:, -1]  # (B, V)
        for _ in range(max_new_tokens):
            if temperature == 0:
                nxt = logits.argmax(-1)  # (B,)
            else:
                probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
                nxt = torch.multinomial(probs, 1, generator=generator)[:, 0]  # (B,)
            for b, token in enumerate(nxt.tolist()):
                if finished[b]:
                    continue
                if token in stops:
                    finished[b] = True
                else:
                    rows[b].append(token)
                    finished[b] = done is not None and bool(done(rows[b]))
            if all(finished):
                break
            logits = self(nxt[:, None], cache=cache, probe=probe)[:, -1]  # (B, V)
        return rows

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
