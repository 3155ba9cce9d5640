"""
LU-KV, read top to bottom: how many cached tokens each (layer, KV head) keeps.

Tang et al., "Predicting Future Utility: Global Combinatorial Optimization for Task-Agnostic
KV Cache Eviction" (arXiv 2602.08585, ICML 2026). A heuristic scorer ranks tokens inside a head;
LU-KV picks per-head budgets so that the long-horizon utility lost is smallest over the model:

  1. scorers            rank the tokens inside each head (SnapKV, KeyDiff, -> SCORERS
                        K-norm, Expected Attention)
  2. oracle importance  I[l, h, j] = max over future steps k, query heads q of KV head h of
                        || A[k, j] * v_j @ W_O[q] ||                       -> run_full
  3. loss curves        evict in the scorer's order, cumulative I lost     -> loss_curve
  4. convex hull        the lower convex hull (= PAVA on the increments)   -> lower_convex_hull
  5. greedy solver      one global min-heap over hull slopes (readable),  -> greedy_budget_table
                        and its fast twin, one sort of hull segments; one
                        sweep gives nested budgets for every ratio 1..99%:
                        a table [99, n_layer, n_kv_head] (kvpress LUKVPress layout)
  6. offline profiling  average the table over calibration contexts        -> build_profile
  7. online             look up the ratio, largest-remainder rounding,    -> allocate, compress
                        keep each head's top tokens by the scorer

    python lukv.py --demo              # heatmap + a small evaluation at 80%, about a minute on a CPU
    python lukv.py --profile           # the profiles, into runs/profiles/ (--out-dir checkpoints: the shipped ones)

The experiments (the full evaluation grid, knockout, the task-loss utility) live in
evaluate.py; real models (Hugging Face folders, GGUF files) in real.py.

Shapes: L layers, H KV heads, G query heads per KV head, T context tokens, D head dim, C width.
"""

import argparse
import hashlib
import heapq
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

import tasks
from model import DEFAULT_CHECKPOINT, Probe, load_checkpoint

# -----------------------------------------------------------------------------
# config


@dataclass
class LUKVConfig:
    sink: int = 4  # first tokens every head always keeps (attention sinks)
    window: int = 16  # most recent tokens every head always keeps
    min_share: float = 0.01  # every head also keeps at least this fraction of the context
    snap_window: int = 16  # SnapKV: how many last positions observe the context
    snap_kernel: int = 5  # SnapKV: pooling width over tokens (odd)
    snap_pool: str = "avg"  # SnapKV: "avg" (SnapKV's and kvpress's default) or "max" (AdaKV's code; our old default)
    ea_epsilon: float = 0.02  # Expected Attention: (score + epsilon) * ||v|| (the paper's and kvpress's table)
    ea_future: int = 512  # Expected Attention: the future positions whose RoPE rotations are averaged
    adakv_alpha: float = 0.2  # AdaKV: the share of a head's uniform budget it always keeps
    adakv_blend: str = "original"  # AdaKV: "original" (FFY0/AdaKV) or "kvpress" (floor, then pooled top-k)
    pyramid_beta: int = 20  # PyramidKV: the last layer keeps 1 / beta of the average budget
    horizon: int = 16  # oracle: answer tokens the model generates after the question
    stop_at_answer: bool = True  # oracle: the future ends at the answer's newline (False: always horizon steps)
    correct_only: bool = False  # profiling: keep only the calibration questions the model answers right
    normalise_values: bool = True  # oracle: divide ||v W_O|| by its sum over the layer (official code)

    def __post_init__(self):
        if self.snap_pool not in ("avg", "max"):
            raise ValueError(f"snap_pool must be 'avg' or 'max', got {self.snap_pool!r}")
        if self.snap_kernel < 1 or self.snap_kernel % 2 == 0:
            raise ValueError(f"snap_kernel must be odd and positive (a centred pooling window), got {self.snap_kernel}")
        if self.adakv_blend not in ("original", "kvpress"):
            raise ValueError(f"adakv_blend must be 'original' or 'kvpress', got {self.adakv_blend!r}")
        if not 0 <= self.adakv_alpha <= 1 or self.ea_epsilon < 0 or self.ea_future < 1 or self.pyramid_beta < 1:
            raise ValueError(f"expected 0 <= adakv_alpha <= 1, ea_epsilon >= 0, ea_future >= 1 and pyramid_beta >= 1, "
                             f"got {self.adakv_alpha}, {self.ea_epsilon}, {self.ea_future}, {self.pyramid_beta}")

    def floor(self, T):
        """Tokens every head keeps at least: sink + window + the minimum share."""
        return min(T, self.sink + self.window + math.ceil(self.min_share * T))


# each scorer's protected tokens in the paper's experiments (and kvpress's shipped LU-KV table for Expected
# Attention): LUKVConfig(**PAPER_SETTINGS[scorer]) reproduces them; a profile belongs to one of these
PAPER_SETTINGS = {"snapkv": dict(sink=4, window=32, snap_window=32), "keydiff": dict(sink=4, window=1),
                  "expected_attention": dict(sink=4, window=1, ea_epsilon=0.02)}


def keep_count(n, ratio):
    """Tokens kept of n at a compression ratio, in integers: n - round_half_up(ratio * n).

    The ratio is read in millionths, so 0.8 is exactly 800000 / 10**6 and 400 tokens keep 80 (float
    arithmetic gives int(400 * (1 - 0.8)) = 79, what kvpress keeps). The greedy table rounds its
    evictions the same way, so a profile's row and this count agree."""
    millionths = round(ratio * 10**6)
    return n - (2 * millionths * n + 10**6) // (2 * 10**6)


def progress(done, total, text):
    """A progress line: redrawn in place on a terminal; every 10% and at the end in a log file."""
    if sys.stdout.isatty():
        print(f"\r{text}", end="\n" if done == total else "", flush=True)
    elif done == total or done % max(1, total // 10) == 0:
        print(text, flush=True)


# -----------------------------------------------------------------------------
# 1. intra-head scorers: (L, H, T), higher = more worth keeping. LU-KV does not change these.


def snapkv_scores(probe, cfg):
    """SnapKV: the attention the observation window (the last w positions) pays to each token, summed over
    the window, pooled over cfg.snap_kernel neighbours (cfg.snap_pool: avg or max), GQA-group mean.

    As in SnapKV's code, the context before the window is pooled on its own, zero-padded at its ends, so
    the window's attention to itself never leaks into its neighbours' scores. The window's own tokens
    (pooled apart the same way) only count when cfg.window < w: SnapKV always keeps them. Each query
    head is pooled before the group mean (kvpress's order; for avg pooling the order does not matter)."""
    pool = {"avg": torch.nn.functional.avg_pool1d, "max": torch.nn.functional.max_pool1d}[cfg.snap_pool]
    layers = []
    for l in sorted(probe.prefill_attn):
        a = probe.prefill_attn[l][0]  # (H, G, w, T)
        H, G, w, T = a.shape
        s = a.sum(dim=2)  # (H, G, T)
        parts = [part for part in (s[..., :T - w], s[..., T - w:]) if part.shape[-1] > 0]
        pooled = [pool(part.reshape(H * G, 1, -1), cfg.snap_kernel, stride=1, padding=cfg.snap_kernel // 2)
                  for part in parts]  # each (H*G, 1, T_part)
        layers.append(torch.cat(pooled, dim=-1).view(H, G, T).mean(dim=1))  # (H, T)
    return torch.stack(layers)  # (L, H, T)


def keydiff_scores(cache):
    """KeyDiff: keys that differ most from the head's mean direction are kept (negative cosine)."""
    layers = []
    for l in range(len(cache.k)):
        k = torch.nn.functional.normalize(cache.keys(l).float(), dim=-1)  # (H, T, D)
        anchor = torch.nn.functional.normalize(k.mean(dim=1, keepdim=True), dim=-1)  # (H, 1, D)
        layers.append(-(k * anchor).sum(-1))  # (H, T)
    return torch.stack(layers)


def knorm_scores(cache):
    """K-norm (Devoto et al. 2024): keys with a small norm draw attention, so keep them."""
    return torch.stack([-cache.keys(l).float().norm(dim=-1) for l in range(len(cache.k))])  # (L, H, T)


def streaming_scores(L, H, T):
    """StreamingLLM's positional rule: the newest tokens first (sinks are protected anyway)."""
    return torch.arange(T, dtype=torch.float32).expand(L, H, T).clone()


def average_rope(cfg, T, n_future):
    """cos and sin (D,) of the RoPE rotation averaged over positions T .. T + n_future - 1 of a model config.

    R_t x = cos_t * x + sin_t * rotate_half(x) is linear in (cos_t, sin_t), so the mean rotation is
    the same formula with the mean cos and sin (model.py's tables, including their scaling)."""
    from model import rope_frequencies  # model.py's RoPE, so Llama 3.1 / yarn scaling comes along

    inv_freq, scale = rope_frequencies(cfg)  # (D/2,)
    angles = torch.outer(torch.arange(T, T + n_future, dtype=torch.float32), inv_freq)  # (F, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (F, D) Hugging Face's two-halves layout
    return (angles.cos() * scale).mean(dim=0), (angles.sin() * scale).mean(dim=0)


def rotate(x, cos, sin):
    """Apply the rotation (cos, sin) (D,) to the last dimension of x (model.apply_rope's formula)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def expected_attention_scores(cache, probe, cfg):
    """Expected Attention (Devoto et al.; kvpress ExpectedAttentionPress): the attention that future
    queries are expected to pay each token, times its value norm. Query-free.

    Per layer the prefill recorded the mean mu and covariance Sigma of each query head's pre-RoPE
    queries past the sinks (Probe(query_stats=sink)). Both are rotated by the average RoPE rotation R
    of the next cfg.ea_future positions: mu -> R mu, Sigma -> R Sigma R^T. A query q ~ N(mu, Sigma)
    has E[exp(q.k / sqrt(D))] = exp(mu.k / sqrt(D) + k^T Sigma k / (2 D)), so token j of query head q
    scores softmax_j(mu.k_j / sqrt(D) + k_j^T Sigma k_j / (2 D)) over the tokens past the sinks; the
    GQA group's mean, then (score + cfg.ea_epsilon) * ||v_j||. Sinks get 0 here (protect keeps them)."""
    if getattr(probe, "query_stats", None) != cfg.sink:
        raise ValueError(f"expected attention needs the query statistics past the {cfg.sink} sinks, recorded "
                         f"at prefill with Probe(query_stats={cfg.sink}); the probe has query_stats="
                         f"{getattr(probe, 'query_stats', None)!r} (lukv.prefill turns it on)")
    if not probe.values:
        raise ValueError("expected attention needs the value vectors: Probe(keep_values=True)")
    H, G, D = cache.cfg.n_kv_head, cache.cfg.group, cache.cfg.head_dim
    T = cache.keys(0).shape[1]
    cos, sin = (x.to(cache.device) for x in average_rope(cache.cfg, T, cfg.ea_future))  # (D,) each
    layers = []
    for l in range(len(cache.k)):
        scores = torch.zeros(H, T, device=cache.device)
        if T > max(cfg.sink, 1):
            keys = cache.keys(l).float()[:, cfg.sink:]  # (H, T', D), T' = T - sink
            values = probe.values[l][0].float()[:, cfg.sink:]  # (H, T', D)
            mu = rotate(probe.query_mean[l][0].float(), cos, sin).view(H, G, D)  # (H, G, D) = R mu
            sigma = probe.query_cov[l][0].float()  # (H*G, D, D)
            sigma = rotate(rotate(sigma, cos, sin).transpose(-1, -2), cos, sin).view(H, G, D, D)  # R Sigma R^T
            logits = torch.einsum("hgd,htd->hgt", mu, keys) / math.sqrt(D)  # (H, G, T')
            logits += torch.einsum("htd,hgde,hte->hgt", keys, sigma, keys) / (2 * D)
            expected = torch.softmax(logits, dim=-1).mean(dim=1)  # (H, T')
            scores[:, cfg.sink:] = (expected + cfg.ea_epsilon) * values.norm(dim=-1)
        layers.append(scores)
    return torch.stack(layers)  # (L, H, T)


def protect(scores, cfg):
    """Sink and recent-window tokens get +inf so every scorer keeps them."""
    scores = scores.clone()
    scores[..., :cfg.sink] = float("inf")
    scores[..., max(cfg.sink, scores.shape[-1] - cfg.window):] = float("inf")
    return scores


# -----------------------------------------------------------------------------
# 2. oracle importance (offline): what each cached token contributes to the next steps' outputs


@torch.no_grad()
def value_out_norms(model, values, normalise):
    """||v_j @ W_O[q]|| for every layer, KV head h, query head q of its group, token j: (L, H, G, T)."""
    norms = []
    for l, v in sorted(values.items()):
        w = model.o_proj_heads(l).float()  # (H, G, C, D)
        out = torch.einsum("hgcd,htd->hgtc", w, v[0].float())  # (H, G, T, C)
        n = out.norm(dim=-1)  # (H, G, T)
        norms.append(n / n.sum() if normalise else n)
    return torch.stack(norms)


def oracle_from_steps(decode_attn, vnorm, T):
    """I[l, h, j] = max over steps k and group heads q of A[l, h, q, k, j] * vnorm[l, h, q, j]: (L, H, T)."""
    L = vnorm.shape[0]
    # computed where the attention lives (the model's device), in float32 whatever the model's dtype;
    # returned on the CPU, where the loss curves and the solver (numpy) read it
    imp = torch.zeros(vnorm.shape[0], vnorm.shape[1], T, device=vnorm.device)
    for step in decode_attn:
        a = torch.stack([step[l][0, :, :, :T].float() for l in range(L)])  # (L, H, G, T)
        imp = torch.maximum(imp, (a * vnorm[..., :T].float()).amax(dim=2))
    return imp.cpu()


@torch.no_grad()
def prefill(model, ctx_ids, cfg):
    """Prefill the context once, recording what the scorers and the oracle read: (cache, probe)."""
    T = len(ctx_ids)
    if T == 0:
        raise ValueError("empty context: there is nothing to compress")
    w = min(cfg.snap_window, T)
    device = model.embed_tokens.weight.device  # the cache, the probe and the prompt live with the model
    probe = Probe(query_pos=torch.arange(T - w, T, device=device), keep_values=True, query_stats=cfg.sink)
    cache = model.new_cache(1)
    model(torch.tensor([ctx_ids], device=device), cache=cache, probe=probe, last_only=True)
    return cache, probe


@torch.no_grad()
def oracle_importance(model, cache, probe, q_ids, cfg, max_answer, stop_token):
    """The model's own answer to q_ids with the full cache, and the oracle importance (L, H, T) of
    every context token over the question plus that answer (the future of the query-agnostic setting)."""
    future = Probe(decode=True)
    answer, _ = model.generate(torch.tensor([q_ids], device=cache.device), max_answer, cache=cache.clone(),
                               stop_token=stop_token, probe=future)
    vnorm = value_out_norms(model, probe.values, cfg.normalise_values)
    return answer[0].tolist(), oracle_from_steps(future.decode_attn, vnorm, cache.seen)


def run_full(model, ctx_ids, q_ids, cfg, max_answer, stop_token):
    """prefill + oracle_importance: the prefilled cache (to compress many ways), the probe of the
    prefill (scorer inputs), the full-cache answer tokens and the oracle importance (L, H, T)."""
    cache, probe = prefill(model, ctx_ids, cfg)
    answer, imp = oracle_importance(model, cache, probe, q_ids, cfg, max_answer, stop_token)
    return cache, probe, answer, imp


SCORERS = ["snapkv", "keydiff", "knorm", "streaming", "expected_attention", "oracle"]


def scores_for(name, cache, probe, imp, cfg):
    """Every scorer by name; 'oracle' ranks by the oracle importance itself (an upper bound)."""
    L, H, T = imp.shape
    raw = {"snapkv": lambda: snapkv_scores(probe, cfg), "keydiff": lambda: keydiff_scores(cache),
           "knorm": lambda: knorm_scores(cache), "streaming": lambda: streaming_scores(L, H, T),
           "expected_attention": lambda: expected_attention_scores(cache, probe, cfg),
           "oracle": lambda: imp.clone()}
    if name not in raw:
        raise ValueError(f"unknown scorer {name!r}; expected one of {list(raw)}")
    s = raw[name]()
    if not torch.isfinite(s).all():
        raise ValueError(f"scorer {name} produced NaN or infinite scores")
    return protect(s, cfg)


# -----------------------------------------------------------------------------
# 3-4. one head's loss curve and its convex relaxation
#
# from here to largest_remainder the solver is numpy only, with plain integer arguments (floors,
# n_protected_total): copy it into another code base as it is. head_curves and context_table at
# the end of the solver bridge from this project's (L, H, T) tensors and LUKVConfig.
# shapes: N heads (every (layer, kv head) pair, flattened), n_h evictable tokens of head h, so a
# curve is (n_h + 1,); P points of all curves laid end to end; S hull segments of all heads;
# R ratio rows.


def loss_curve(order_scores, utility, n_protected=0):
    """Cumulative oracle loss of one head when tokens are evicted in the heuristic's order.

    order_scores, utility: (T,). Tokens go lowest score first; ties go to the lower token
    index, so the curve is deterministic. Returns curve (T - n_protected + 1,) with curve[0] = 0
    and curve[n] = utility lost after the first n evictions.
    Protected tokens (sink + recent window) are the caller's job: either slice them out before
    calling, or give them score +inf and pass their count as n_protected, which stops the curve
    before them (they sort last, so they are never evicted)."""
    order_scores, utility = np.asarray(order_scores, float), np.asarray(utility, float)
    if order_scores.ndim != 1 or order_scores.shape != utility.shape:
        raise ValueError(f"expected order_scores and utility of the same shape (T,), "
                         f"got {order_scores.shape} and {utility.shape}")
    if not np.isfinite(utility).all() or np.isnan(order_scores).any():
        raise ValueError("expected finite utility and non-NaN scores (+inf marks protected tokens)")
    if not 0 <= n_protected <= len(utility):
        raise ValueError(f"expected 0 <= n_protected <= T = {len(utility)}, got {n_protected}")
    order = np.argsort(order_scores, kind="stable")  # (T,) stable sort = (score, index) order
    evictable = order[: len(order) - n_protected]
    return np.concatenate([[0.0], np.cumsum(utility[evictable])])  # (T - n_protected + 1,)


def exact_grid(curves):
    """Equal-length curves (N, m), each rounded onto a grid where the subtraction of any two of its values is exact.

    A curve is rounded to a multiple of a power of two: the float spacing at its largest |value|
    (twice that when the curve changes sign). Then every difference of two of its values is a
    float, and every hull slope (y_b - y_a) / (b - a) is the true slope, rounded once. Why it
    matters: rounding is monotone, so a steeper true slope never gets a smaller stored slope,
    and then the lower hull is the same whichever order its points are visited in (hull_segments
    relies on it). A value moves by at most one unit in the last place of the largest |value|."""
    curves = np.asarray(curves, float)
    low, high = curves.min(axis=1), curves.max(axis=1)  # (N,) each
    # every |difference| within a curve is below 2**exponent
    exponent = np.frexp(np.maximum(-low, high))[1] + ((low < 0) & (high > 0))  # (N,)
    step = np.ldexp(1.0, np.maximum(exponent - 53, -1074))[:, None]  # (N, 1) a power of two
    on_grid = np.divide(curves, step)  # (N, m) exact, and below 2**53 in magnitude
    np.rint(on_grid, out=on_grid)
    on_grid *= step
    return on_grid


def lower_convex_hull(curve):
    """Lower convex hull of the points (i, curve[i]), evaluated at every integer i.

    Returns hull (n+1,) and slopes (n,), where slopes[i] is the slope of the hull segment that
    contains the step i -> i+1. Every step of a segment gets the segment's one slope
    (y_end - y_start) / (x_end - x_start), taken on the curve's exact grid (exact_grid), so
    equal slopes mean the same segment and the slopes strictly increase from one segment to
    the next."""
    curve = np.asarray(curve, float)
    n = len(curve) - 1
    y = exact_grid(curve[None])[0]  # (n+1,) the curve on its exact grid: slopes are rounded once

    def slope(a, b):
        return (y[b] - y[a]) / (b - a)

    # monotone chain, left to right. the pop test compares the very slopes stored below, so
    # float rounding can never leave a stored slope smaller than the one before it.
    vertices = []
    for x in range(n + 1):
        while len(vertices) >= 2 and slope(vertices[-2], vertices[-1]) >= slope(vertices[-1], x):
            vertices.pop()  # vertices[-1] lies on or above the chord, not a hull corner
        vertices.append(x)

    hull, slopes = curve.copy(), np.empty(n)  # (n+1,), (n,)
    for x0, x1 in zip(vertices[:-1], vertices[1:]):
        s = slope(x0, x1)
        slopes[x0:x1] = s
        hull[x0:x1] = curve[x0] + s * np.arange(x1 - x0)  # vertices keep their exact value
    return hull, slopes


def pava_slopes(increments):
    """Non-decreasing least-squares fit to increments (n,) with unit weights (pool adjacent violators).

    Why this is the hull again: a convex minorant of the curve is exactly a curve whose steps
    never decrease. Pooling a violating run of steps replaces them by their mean, i.e. by the
    chord over that run, and PAVA keeps pooling until no run dips below a chord. So
    curve[0] + cumsum(pava_slopes(diff(curve))) is the greatest convex minorant, the lower
    convex hull (the classical result: the isotonic regression of slopes is the derivative of
    the greatest convex minorant of the cumulative sum)."""
    blocks = []  # [sum, count] of each pooled run, left to right
    for value in np.asarray(increments, float):
        blocks.append([value, 1])
        while len(blocks) >= 2 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return np.concatenate([np.full(c, s / c) for s, c in blocks]) if blocks else np.empty(0)


def _prune_wrong_turns(curves, chain_below):
    """Delete points of equal-length curves (N, m) that turn the wrong way, all rows at once.

    Returns point (P,) (flat positions row * m + token of the survivors), their grid values y
    (P,), and whether the last pass still deleted some (then the chain must finish the job).
    Every pass deletes each point whose slope from its left neighbour is >= its slope to its
    right one; it stops when a pass deletes none (the survivors are the hull) or fewer than
    chain_below of them (the chain is quicker then). The first and last point of a row always
    stay, so an inner point's neighbours are in its own row."""
    N, m = curves.shape
    y = exact_grid(curves)  # (N, m)
    # the first pass runs on whole rows, where every step is one token wide: its slopes are the
    # increments themselves (a division by 1, bit for bit)
    increments = y[:, 1:] - y[:, :-1]  # (N, m-1)
    keep = np.ones((N, m), dtype=bool)
    np.less(increments[:, :-1], increments[:, 1:], out=keep[:, 1:-1])  # (N, m-2) right turns
    point = np.flatnonzero(keep)  # (P,)
    n_deleted, y = keep.size - len(point), y.ravel()[point]
    row_starts = np.arange(N) * m  # (N,) flat position of each row's first point
    while n_deleted > 0 and n_deleted >= chain_below * len(point):
        slope = (y[1:] - y[:-1]) / (point[1:] - point[:-1])  # (P-1,) from each point to the next
        keep = np.ones(len(point), dtype=bool)
        np.less(slope[:-1], slope[1:], out=keep[1:-1])
        keep[np.searchsorted(point, row_starts)] = True  # the ends of every row stay
        keep[np.searchsorted(point, row_starts + m - 1)] = True
        survivors = np.flatnonzero(keep)
        n_deleted = len(point) - len(survivors)
        y, point = y[survivors], point[survivors]
    return point, y, n_deleted > 0


def _chain(row, point, y, n_rows):
    """The monotone chain over the points (P,) of n_rows rows (row by row, left to right), all rows
    in lockstep: each round every unfinished row either pops its top or pushes its next point.
    Returns the indices (V,) of the points left on the stacks, the corners."""
    first = np.searchsorted(row, np.arange(n_rows))  # (n_rows,) first point of each row
    last = np.searchsorted(row, np.arange(n_rows), side="right") - 1  # (n_rows,) and its last
    stack = np.empty(len(point), dtype=np.int64)  # row r's stack: stack[first[r] : first[r] + size[r]]
    stack_slope = np.empty(len(point))  # slope of the segment that ends at each stack entry
    stack[first], size, nxt = first, np.ones(n_rows, dtype=np.int64), first + 1
    active = np.flatnonzero(nxt <= last)  # (A,) rows with points left
    while len(active):
        top = first[active] + size[active] - 1  # (A,) stack slot of each top
        new = nxt[active]  # (A,) each row's next point
        new_slope = (y[new] - y[stack[top]]) / (point[new] - point[stack[top]])  # (A,)
        pop = (size[active] >= 2) & (stack_slope[top] >= new_slope)  # lower_convex_hull's test
        size[active[pop]] -= 1
        push, slot = active[~pop], top[~pop] + 1
        stack[slot], stack_slope[slot] = new[~pop], new_slope[~pop]
        size[push] += 1
        nxt[push] += 1
        active = active[nxt[active] <= last[active]]
    return stack[np.arange(len(point)) - first[row] < size[row]]  # (V,)


def _hull_corners(curves, chain_below):
    """Hull corners of equal-length curves (N, m): row, token index and grid value of each, (V,) each, row by row."""
    N, m = curves.shape
    rows = max(1, 2**19 // m)  # rows per chunk: about half a million points, which stay in cache
    parts = [_prune_wrong_turns(curves[r : r + rows], chain_below) for r in range(0, N, rows)]
    point = np.concatenate([part[0] + r * m for part, r in zip(parts, range(0, N, rows))])  # (P,)
    y = np.concatenate([part[1] for part in parts])  # (P,)
    row = point // m  # (P,)
    if any(part[2] for part in parts):  # points may be left to delete: the chain finishes
        corner = _chain(row, point, y, N)  # (V,)
        row, point, y = row[corner], point[corner], y[corner]
    return row, point - row * m, y


def hull_segments(curves, chain_below=1 / 8):
    """The lower convex hulls of N curves at once (lower_convex_hull's fast twin), as segments.

    Returns head, start, end (int64) and slope (float64), each (S,): segment i is head[i]'s hull
    from token start[i] to end[i]; heads in order, each head's segments left to right. The
    corners and the bits of every slope are lower_convex_hull's.
    Why two algorithms agree bit for bit: on the exact grid a stored slope is the true slope
    rounded once, and rounding never reverses an order. Then a point that fails the turn test
    slope(p, j) >= slope(j, q) for any points p < j < q is never a corner, and once the
    survivors' slopes strictly increase none is left to delete: every order of deletions ends
    at the same corners (results/SOLVER.md has the proof). The monotone chain is one order;
    _hull_corners takes another that numpy runs fast: passes that delete every wrong turn at
    once, then, when a pass deletes fewer than chain_below of the points, the chain over the
    rest (any chain_below gives the same corners; only the time changes)."""
    lengths = np.array([len(c) for c in curves], dtype=np.int64)  # (N,) n_h + 1 points each
    parts = [(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))]  # (no heads: no segments)
    for m in np.unique(lengths):  # equal-length heads together (a profile has one length)
        heads = np.flatnonzero(lengths == m)
        if len(heads) == len(curves) and isinstance(curves, np.ndarray):
            block = curves  # (N, m) already one array
        else:
            block = np.stack([np.asarray(curves[h], float) for h in heads])  # (N_m, m)
        row, x, y = _hull_corners(block, chain_below)
        parts.append((heads[row], x, y))
    head, x, y = (np.concatenate(p) for p in zip(*parts))  # (V,) each
    by_head = np.argsort(head, kind="stable")  # heads in order, each one's corners left to right
    head, x, y = head[by_head], x[by_head], y[by_head]
    a = np.flatnonzero(head[1:] == head[:-1])  # (S,) consecutive corners of one head bound a segment
    slope = (y[a + 1] - y[a]) / (x[a + 1] - x[a])  # (S,) lower_convex_hull's formula
    return head[a], x[a], x[a + 1], slope


# -----------------------------------------------------------------------------
# 5. the global greedy over all heads


def _check_curves(curves, floors):
    """Validate curves and floors; return floors as an int array and each head's reachable curve."""
    floors = np.asarray(floors)
    if floors.shape != (len(curves),):
        raise ValueError(f"expected one floor per head, shape ({len(curves)},), got {floors.shape}")
    if not np.issubdtype(floors.dtype, np.integer):
        raise ValueError(f"expected integer floors (tokens each head keeps), got dtype {floors.dtype}")
    for h, (curve, floor) in enumerate(zip(curves, floors)):
        curve = np.asarray(curve, float)
        if curve.ndim != 1 or len(curve) == 0:
            raise ValueError(f"curve of head {h}: expected shape (T+1,), got {curve.shape}")
        if not np.isfinite(curve).all():
            raise ValueError(f"curve of head {h} contains NaN or inf; expected finite losses")
        if floor < 0:
            raise ValueError(f"floors must be non-negative, got floors[{h}] = {floor}")
        if floor > len(curve) - 1:
            raise ValueError(f"floors[{h}] = {floor} exceeds head {h}'s {len(curve) - 1} "
                             "evictable tokens; lower the floor")
    # the floor caps evictions at T - floor; the hull is taken over that reachable part so that a
    # head stopped by its floor always stops on a hull vertex. curves (N, T+1) in one array with
    # one floor stay one array, (N, T+1-floor), which the fast hull takes as it is.
    if isinstance(curves, np.ndarray) and curves.ndim == 2 and len(floors) and (floors == floors[0]).all():
        return floors.astype(np.int64), np.asarray(curves, float)[:, : curves.shape[1] - floors[0]]
    return floors.astype(np.int64), [np.asarray(c, float)[: len(c) - f] for c, f in zip(curves, floors)]


def _check_total(total_evict, reachable):
    limit = sum(len(c) - 1 for c in reachable)
    if not 0 <= total_evict <= limit:
        raise ValueError(f"expected 0 <= total_evict <= {limit} (the tokens the floors allow to "
                         f"evict, sum of T_h - floor_h), got {total_evict}")


def _check_method(method):
    if method not in ("fast", "heap"):
        raise ValueError(f"expected method 'fast' (sorted hull segments) or 'heap' (the readable min-heap), "
                         f"got {method!r}")


def _greedy_order(reachable):
    """The readable greedy: head index of every eviction in order, (sum of T_h - floor_h,), by a min-heap."""
    slopes = [lower_convex_hull(c)[1] for c in reachable]
    n_evict = np.zeros(len(reachable), dtype=np.int64)  # (N,) evictions made so far

    def key(h):
        e = n_evict[h]
        # equal stored slopes <=> same hull segment (see lower_convex_hull)
        mid_segment = e > 0 and slopes[h][e] == slopes[h][e - 1]
        # on equal slopes a head already inside a segment goes first, so at most one head ever
        # stops part-way through a segment; that one head's curve-to-hull gap is then the whole
        # excess of the true loss over the optimum. (with the index tie-break alone the same
        # happens, since the heap minimum never decreases, but the flag states the intent.)
        return (slopes[h][e], 0 if mid_segment else 1, h)

    heap = [key(h) for h in range(len(reachable)) if len(slopes[h]) > 0]
    heapq.heapify(heap)
    order = []
    while heap:
        h = heapq.heappop(heap)[2]
        n_evict[h] += 1
        order.append(h)
        if n_evict[h] < len(slopes[h]):
            heapq.heappush(heap, key(h))
    return np.array(order, dtype=np.int64)


def _greedy_segments(reachable):
    """The fast greedy: whole hull segments in the heap's eviction order, as head, start, end (S,) each.

    Why a sort gives the heap's order: a head's slopes rise from segment to segment, and once a
    head enters a segment it finishes it first (the mid-segment rule). So the heap merges the
    heads' segment lists by (slope, head), which is a stable sort of all segments by slope when
    they are laid out head by head. np.repeat(head, end - start) is _greedy_order's output."""
    head, start, end, slope = hull_segments(reachable)  # (S,) each, head by head, left to right
    order = np.argsort(slope, kind="stable")  # equal slopes keep head order: the lower head first
    return head[order], start[order], end[order]


def _n_evict_after(segments, totals, n_heads):
    """Per-head evictions (R, N) once the first totals[r] evictions of the segment order are made."""
    head, start, end = segments  # (S,) each, in eviction order
    done_after = np.cumsum(end - start)  # (S,) evictions made once each segment is finished
    table = np.zeros((len(totals), n_heads), dtype=np.int64)  # (R, N)
    n_evict, finished = np.zeros(n_heads, dtype=np.int64), 0  # (N,) after the finished segments
    for r, total in enumerate(totals):  # totals never decrease: each row starts from the one before
        k = int(np.searchsorted(done_after, total, side="right"))  # segments finished within total
        np.maximum.at(n_evict, head[finished:k], end[finished:k])  # a head's later segment ends further right
        finished = k
        table[r] = n_evict
        if k < len(head):  # segment k is under way: its head is part of the way from start to end
            table[r, head[k]] = start[k] + total - (done_after[k - 1] if k > 0 else 0)
    return table


def greedy_evictions(curves, floors, total_evict, method="fast"):
    """Tokens evicted per head, n_evict (N,), when total_evict evictions go one at a time to the lowest hull slope.

    method "fast" sorts hull segments (hull_segments, _greedy_segments); "heap" is the readable
    min-heap over lower_convex_hull's slopes (_greedy_order). Both give identical results."""
    _check_method(method)
    floors, reachable = _check_curves(curves, floors)
    _check_total(total_evict, reachable)
    if method == "heap":
        return np.bincount(_greedy_order(reachable)[:total_evict], minlength=len(curves))  # (N,)
    return _n_evict_after(_greedy_segments(reachable), [total_evict], len(curves))[0]  # (N,)


def greedy_budget_table(curves, floors, n_ratios=99, n_protected_total=0, method="fast"):
    """The paper's one-pass sweep: n_evict (n_ratios, N), row r-1 = per-head evictions at ratio r/(n_ratios+1).

    curves are the heads' curves over evictable tokens only. The ratio counts over all tokens,
    n_tokens = sum(T_h) + n_protected_total (pass the protected sink + window count to match the
    paper), and row r-1 evicts round_half_up(r / (n_ratios+1) * n_tokens) tokens in total. Once
    every token above the floors is gone, the remaining rows repeat that last state. method as
    in greedy_evictions."""
    _check_method(method)
    floors, reachable = _check_curves(curves, floors)
    if n_ratios < 1 or n_protected_total < 0:
        raise ValueError(f"expected n_ratios >= 1 and n_protected_total >= 0, "
                         f"got {n_ratios} and {n_protected_total}")
    n_tokens = sum(len(c) - 1 for c in curves) + n_protected_total
    limit = sum(len(c) - 1 for c in reachable)  # what the floors allow
    denominator = n_ratios + 1
    # integer round-half-up of r / denominator * n_tokens, no float ties to worry about
    totals = [min((2 * r * n_tokens + denominator) // (2 * denominator), limit) for r in range(1, n_ratios + 1)]
    if method == "fast":
        return _n_evict_after(_greedy_segments(reachable), totals, len(curves))  # (R, N)
    order = _greedy_order(reachable)
    table = np.zeros((n_ratios, len(curves)), dtype=np.int64)  # (R, N)
    n_evict, done = np.zeros(len(curves), dtype=np.int64), 0
    for r, total in enumerate(totals):
        n_evict += np.bincount(order[done:total], minlength=len(curves))
        table[r], done = n_evict, total
    return table


# -----------------------------------------------------------------------------
# the exact reference and the losses


def dp_exact(curves, floors, total_evict):
    """Exact minimum of sum_h curve_h[e_h] with sum e_h = total_evict, e_h <= T_h - floor_h.

    Knapsack over heads on the true (non-convex) curves, O(N * total * T). Small instances only:
    it is the reader's reference for the greedy. Returns (min_loss, n_evict (N,)); among equal
    optima the last head evicts as few tokens as it can, then the one before it, and so on."""
    floors, reachable = _check_curves(curves, floors)
    _check_total(total_evict, reachable)
    best = np.full(total_evict + 1, np.inf)  # (E+1,) best loss of the heads so far, by total evicted
    best[0] = 0.0
    choices = []  # per head: (E+1,) its evictions in the best split of each total
    for curve in reachable:
        new, choice = np.full_like(best, np.inf), np.zeros(total_evict + 1, dtype=np.int64)
        for e in range(min(len(curve) - 1, total_evict) + 1):
            candidate = best[: total_evict + 1 - e] + curve[e]  # (E+1-e,)
            better = candidate < new[e:]  # strict: the smaller e wins ties
            new[e:][better], choice[e:][better] = candidate[better], e
        best = new
        choices.append(choice)
    n_evict, remaining = np.zeros(len(curves), dtype=np.int64), total_evict
    for h in reversed(range(len(curves))):
        n_evict[h] = choices[h][remaining]
        remaining -= n_evict[h]
    return float(best[total_evict]), n_evict


def true_loss(curves, n_evict):
    """Sum over heads of curve_h[n_evict_h]: the utility actually lost."""
    return float(sum(np.asarray(c, float)[e] for c, e in zip(curves, n_evict)))


def relaxed_loss(curves, n_evict, floors=None):
    """Sum over heads of hull_h[n_evict_h], with the hull of the floor-reachable part (as the greedy uses)."""
    floors = np.zeros(len(curves), dtype=np.int64) if floors is None else floors
    _, reachable = _check_curves(curves, floors)
    return float(sum(lower_convex_hull(c)[0][e] for c, e in zip(reachable, n_evict)))


# -----------------------------------------------------------------------------
# integer budgets from a ratio row


def largest_remainder(shares, total, minimum=None, maximum=None):
    """Round non-negative shares (N,) summing to total into integers (N,) summing exactly to total.

    Every head gets floor(share), then the leftover units go to the largest fractional parts,
    ties to the lower index; so |rounded - share| < 1. Bounds come after: the integers are
    clipped to [minimum, maximum] and the sum is repaired one unit at a time, taking from
    (giving to) the head furthest above (below) its share that still may move, ties to the lower
    index. A head pinned by a bound may then sit a unit or more from its share; that is the price
    of the bound."""
    shares = np.asarray(shares, float)
    if shares.ndim != 1 or not np.isfinite(shares).all() or (shares < 0).any():
        raise ValueError(f"expected finite non-negative shares of shape (H,), got {shares}")
    minimum = np.zeros(len(shares), np.int64) if minimum is None else np.asarray(minimum, np.int64)
    maximum = np.full(len(shares), total, np.int64) if maximum is None else np.asarray(maximum, np.int64)
    if int(total) != total or not minimum.sum() <= total <= maximum.sum() or (minimum > maximum).any():
        raise ValueError(f"expected an integer total with sum(minimum) = {minimum.sum()} <= total "
                         f"<= sum(maximum) = {maximum.sum()} and minimum <= maximum, got {total}")
    if abs(shares.sum() - total) > 1e-6 * max(1.0, total):
        raise ValueError(f"shares sum to {shares.sum()}, expected total = {total}")

    rounded = np.floor(shares).astype(np.int64)  # (N,)
    leftover = int(total - rounded.sum())  # in [0, N] when shares sum to total
    by_remainder = np.lexsort((np.arange(len(shares)), -(shares - rounded)))  # largest first
    rounded[by_remainder[: max(leftover, 0)]] += 1
    rounded = np.clip(rounded, minimum, maximum)
    while rounded.sum() != total:
        if rounded.sum() < total:
            excess = np.where(rounded < maximum, shares - rounded, -np.inf)
        else:
            excess = np.where(rounded > minimum, rounded - shares, -np.inf)
        rounded[np.argmax(excess)] += 1 if rounded.sum() < total else -1  # argmax: first of ties
    return rounded


# -----------------------------------------------------------------------------
# 6. one context's budget table, and offline profiling over calibration contexts

RATIOS = np.arange(1, 100) / 100  # row r-1 of a table is global compression r% (kvpress LUKVPress)


def _stable_argsort(order_scores):
    """np.argsort(order_scores, axis=1, kind="stable") of (N, n) scores, about 3x faster for float32 ones.

    A stable sort is a sort of (score, index) pairs, and for float32 scores a pair fits in one
    uint64: the score's bits made order-preserving (a negative's bits flipped, a positive's sign
    bit set) above the index. numpy sorts integers with vector instructions."""
    if order_scores.dtype != np.float32 or order_scores.shape[1] >= 2**32:
        return np.argsort(order_scores, axis=1, kind="stable")
    bits = (order_scores + np.float32(0.0)).view(np.uint32)  # (N, n); + 0.0 makes -0.0 tie with 0.0
    key = np.where(bits >> 31 == 1, ~bits, bits | np.uint32(1 << 31)).astype(np.uint64) << np.uint64(32)
    key |= np.arange(order_scores.shape[1], dtype=np.uint64)  # (N, n) score, then index
    key.sort(axis=1)
    return (key & np.uint64(2**32 - 1)).astype(np.int64)  # (N, n)


def host_array(x):
    """A numpy array of x: torch tensors come to the CPU (bf16 / fp16 widened to fp32, exactly)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.dtype in (torch.bfloat16, torch.float16) else x).numpy()
    return np.asarray(x)


def head_curves(imp, scores, cfg):
    """Loss curves (N, n+1) over the evictable tokens, greedy floors (N,) and protected tokens per head, N = L * H.

    The bridge from this project to the numpy solver above: imp and scores are (L, H, T) (torch
    or numpy), cfg gives the integers sink, window and floor(T). Row l * H + h is
    loss_curve(scores[l, h, sink:T-window], imp[l, h, sink:T-window]), all rows at once."""
    L, H, T = imp.shape
    lo, hi = cfg.sink, max(cfg.sink, T - cfg.window)  # tokens [lo, hi) may be evicted
    floor = max(0, cfg.floor(T) - (T - (hi - lo)))  # evictable tokens each head keeps
    utility = host_array(imp).reshape(L * H, T)[:, lo:hi]  # (N, n)
    order_scores = host_array(scores).reshape(L * H, T)[:, lo:hi]  # (N, n)
    if not np.isfinite(utility).all() or np.isnan(order_scores).any():
        raise ValueError("expected finite utility and non-NaN scores (+inf marks protected tokens)")
    order = _stable_argsort(order_scores)  # (N, n) loss_curve's order in every row
    curves = np.zeros((L * H, utility.shape[1] + 1))  # (N, n+1)
    # summed in float64 like loss_curve's (widening each value first is exact)
    np.cumsum(np.take_along_axis(utility, order, axis=1), axis=1, dtype=np.float64, out=curves[:, 1:])
    floors = np.full(L * H, min(floor, hi - lo), dtype=np.int64)  # (N,)
    return curves, floors, T - (hi - lo)


def context_table(imp, scores, cfg, method="fast"):
    """The paper's sweep on one context: prune_ratio (99, L, H) of every head at ratios 1..99%.

    method "fast" (sorted hull segments) or "heap" (the readable min-heap): identical tables."""
    L, H, T = imp.shape
    curves, floors, n_protected = head_curves(imp, scores, cfg)
    n_evict = greedy_budget_table(curves, floors, len(RATIOS), n_protected_total=L * H * n_protected,
                                  method=method)  # (99, L*H)
    return n_evict.reshape(len(RATIOS), L, H) / T


@torch.no_grad()
def calibration_tables(model, ctx_ids, questions, scorers, cfg, stop_token, keep=None):
    """{scorer: [(99, L, H) per question]} for one calibration context and its questions (token ids).

    As in the paper: the scorer sees the context without the question; the oracle's future is
    the question plus the model's own answer. One prefill serves every question. keep(i, answer)
    may drop question i by its answer (ours: only the questions the model answers right)."""
    cache, probe = prefill(model, ctx_ids, cfg)
    tables = {s: [] for s in scorers}
    for i, q_ids in enumerate(questions):
        answer, imp = oracle_importance(model, cache, probe, q_ids, cfg, cfg.horizon, stop_token)
        if keep is None or keep(i, answer):
            for s in scorers:
                tables[s].append(context_table(imp, scores_for(s, cache, probe, imp, cfg), cfg))
    return tables


@torch.no_grad()
def build_profile(model, enc, scorers, cfg, n_contexts=16, n_questions=8, length=1024, seed=0, log=progress):
    """Average the per-(context, question) tables over calibration prose with questions (tasks 'qa').

    Calibration seeds never meet evaluation seeds. cfg.correct_only (ours) drops the questions the
    model answers wrong: their futures attend to the wrong facts. Returns {scorer: (99, L, H)}.
    """
    rng = random.Random(f"calibration-{seed}")
    # the answers are short: with the stop token the future is the question plus the answer, and a
    # longer horizon changes nothing; without it the model continues for exactly `horizon` steps
    stop = enc.encode_ordinary("\n")[0] if cfg.stop_at_answer else None
    tables, t0 = {s: [] for s in scorers}, time.time()
    for i in range(n_contexts):
        ex = tasks.make_example("qa", rng, length, n_questions)
        right = lambda j, answer: tasks.exact_match("qa", enc.decode(answer).split("\n")[0], ex.qa[j][1])  # noqa
        got = calibration_tables(model, enc.encode_ordinary(ex.context), [enc.encode_ordinary(q) for q, _ in ex.qa],
                                 scorers, cfg, stop, right if cfg.correct_only else None)
        for s in scorers:
            tables[s] += got[s]
        log(i + 1, n_contexts, f"profile {','.join(scorers)}: context {i + 1}/{n_contexts} "
            f"({len(tables[scorers[0]])} (context, question) tables, {time.time() - t0:.0f} s)")
    if not tables[scorers[0]]:
        raise RuntimeError(f"no calibration question was kept (correct_only={cfg.correct_only}): the model answered "
                           f"none of {n_contexts * n_questions} right; profile without --calib-correct-only")
    return {s: np.mean(t, axis=0) for s, t in tables.items()}


# a profile is a table [99, L, H] of prune ratios (float32 .npy, what kvpress's LUKVPress loads)
# and a .json sidecar saying who it belongs to and how it was made; the same for every model

PROFILE_CHECKS = ["model", "scorer", "sink", "window"]  # what load_profile compares by name


def file_id(path):
    """A short id of a checkpoint file: the sha256 of its bytes (profiles name the model they belong to)."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def profile_meta(scorer, model_id, cfg, **extra):
    """What a profile's sidecar records: who it belongs to and how it was made (refused if they differ)."""
    return {"scorer": scorer, "model": model_id, "sink": cfg.sink, "window": cfg.window, "min_share": cfg.min_share,
            "snap_window": cfg.snap_window, "snap_kernel": cfg.snap_kernel, "snap_pool": cfg.snap_pool,
            "ea_epsilon": cfg.ea_epsilon, "ea_future": cfg.ea_future,
            "layout": "[99, n_layer, n_kv_head] prune ratios; row round(100 * ratio) - 1 (kvpress LUKVPress)",
            **extra}


def sidecar(path):
    return path[: -len(".npy")] + ".json"


def write_atomic(target, write):
    """write(f) into target's .tmp (a binary file object), then rename: an interrupted write never
    leaves half a file behind."""
    with open(target + ".tmp", "wb") as f:  # a file object: np.save would append .npy to a name
        write(f)
    os.replace(target + ".tmp", target)


def save_profile(path, table, meta):
    """Write the table as float32 .npy and its metadata beside it; each file atomically."""
    if not path.endswith(".npy"):
        raise ValueError(f"a profile is a .npy file (what kvpress's LUKVPress reads), got {path!r}")
    table = np.asarray(table, dtype=np.float32)
    if table.ndim != 3 or table.shape[0] != len(RATIOS):
        raise ValueError(f"expected a table of shape (99, n_layer, n_kv_head), got {table.shape}")
    write_atomic(path, lambda f: np.save(f, table))
    write_atomic(sidecar(path), lambda f: f.write(json.dumps(meta, indent=1).encode()))


def load_profile(path, scorer, model_id, shape, cfg):
    """(table, meta) of a profile; refuse one made for another model, scorer, shape, sink, window or
    SnapKV window, by name. shape is (n_layer, n_kv_head)."""
    if not os.path.exists(path) or not os.path.exists(sidecar(path)):
        raise FileNotFoundError(f"expected the profile {path} and its sidecar {sidecar(path)}; make them with "
                                f"--profile --scorer {scorer}")
    table = np.load(path)
    with open(sidecar(path)) as f:
        meta = json.load(f)
    want = {"model": model_id, "scorer": scorer, "sink": cfg.sink, "window": cfg.window}
    for key in PROFILE_CHECKS:
        if meta.get(key) == want[key]:
            continue
        if key == "model":
            raise ValueError(f"profile {path} was made for another model (id {meta.get(key)!r}; this one is "
                             f"{want[key]!r}); profile this model with --profile --scorer {scorer}")
        raise ValueError(f"profile {path} was made for {key} {meta.get(key)!r}, not {want[key]!r}; pass the "
                         f"matching option or rebuild it with --profile --scorer {scorer}")
    if table.shape != (len(RATIOS), *shape):
        raise ValueError(f"profile {path} has shape {table.shape}, expected (99, {shape[0]}, {shape[1]})")
    if scorer == "snapkv" and meta.get("snap_window") != cfg.snap_window:
        raise ValueError(f"profile {path} was made with SnapKV window {meta.get('snap_window')}, not "
                         f"{cfg.snap_window}; pass --snap-window {meta.get('snap_window')} or rebuild it "
                         f"with --profile --snap-window {cfg.snap_window}")
    if scorer == "snapkv" and meta.get("snap_pool", "max") != cfg.snap_pool:  # older profiles: max-pooled
        raise ValueError(f"profile {path} was made with SnapKV {meta.get('snap_pool', 'max')} pooling, not "
                         f"{cfg.snap_pool}; pass the matching pooling or rebuild it with --profile --scorer snapkv")
    if scorer == "expected_attention" and (meta.get("ea_epsilon"), meta.get("ea_future")) != \
            (cfg.ea_epsilon, cfg.ea_future):
        raise ValueError(f"profile {path} was made with Expected Attention epsilon {meta.get('ea_epsilon')} and "
                         f"{meta.get('ea_future')} future positions, not {cfg.ea_epsilon} and {cfg.ea_future}; "
                         f"rebuild it with --profile --scorer expected_attention")
    return table, meta


# -----------------------------------------------------------------------------
# 7. online: ratio -> per-head keep counts, by each allocator; then compress


def check_ratio(ratio):
    if not (isinstance(ratio, (int, float)) and 0 <= ratio < 1):
        raise ValueError(f"compression ratio must lie in [0, 1) (0.8 = evict 80%), got {ratio!r}")


def kept_total(n_heads, ratio, T, cfg):
    """Tokens n_heads heads of T tokens keep in all at a ratio (keep_count: integers), refused below the floors."""
    total, floor = keep_count(n_heads * T, ratio), cfg.floor(T)
    if total < n_heads * floor:
        raise ValueError(f"ratio {ratio} keeps {total} tokens, below the floor of {floor} per head x {n_heads} "
                         f"heads (sink {cfg.sink} + window {cfg.window} + {cfg.min_share:.0%}); lower the ratio")
    return total


def counts_from_shares(shares, ratio, T, cfg):
    """Scale per-head shares (L, H) to keep keep_count(L * H * T, ratio) tokens exactly, each head at
    least its floor: largest-remainder rounding, so integer shares that already sum to it come back unchanged."""
    L, H = shares.shape
    total = kept_total(L * H, ratio, T, cfg)
    shares = np.asarray(shares, float) * total / max(float(np.sum(shares)), 1e-30)
    counts = largest_remainder(shares.ravel(), total, minimum=np.full(L * H, cfg.floor(T)), maximum=np.full(L * H, T))
    return counts.reshape(L, H)


def pyramid_layer_budgets(L, T, capacity, window, beta=20):
    """PyramidKV's per-layer budgets (L,): tokens each head of layer l keeps *before* the window, which
    comes on top. Integer arithmetic as in KVCache-Factory's PyramidKVCluster.

    capacity is what a head keeps on average, window included (the original's max_capacity_prompt), so
    the budgets average base = capacity - window. The first layer keeps max_num = 2 base - base // beta,
    the last min_num = base // beta, in equal steps (max_num - min_num) // (L - 1). max_num is capped at
    the T - window tokens before the window (min_num = 2 base - max_num then keeps the average), and a
    context shorter than 2 base (compression under about 50%) keeps base in every layer, as there."""
    base = max(0, capacity - window)
    if T < 2 * base or L == 1:
        return np.full(L, base, dtype=np.int64)
    min_num = base // beta
    max_num = 2 * base - min_num
    if max_num >= T - window:
        max_num = T - window
        min_num = 2 * base - max_num
    steps = (max_num - min_num) // (L - 1)
    return max_num - steps * np.arange(L, dtype=np.int64)


def pyramid_shares(L, H, T, ratio, cfg):
    """PyramidKV's per-head shares (L, H): its layer budgets at this ratio plus the window on top.

    Ours differ from the original in two named ways: the capacity is keep_count(T, ratio), so the
    window sits inside the ratio's budget like every allocator's, and counts_from_shares rescales the
    shares to the exact total (its floored steps keep up to L (L - 1) / 2 more tokens per head) and
    lifts heads to their floor. kvpress's PyramidKVPress puts its window inside the layer budget and
    falls back to uniform whenever (1 - ratio) T / beta < its window; ours never does."""
    window = min(cfg.window, T)
    budgets = pyramid_layer_budgets(L, T, keep_count(T, ratio), window, cfg.pyramid_beta) + window  # (L,)
    return np.repeat(budgets[:, None], H, axis=1).astype(float)


def adakv_counts(scores, ratio, cfg):
    """AdaKV (Feng et al.): in every layer the heads share the layer's budget by their scores.

    cfg.adakv_blend = "original" (FFY0/AdaKV AdaptiveSnapKVCluster): each head's budget before the window
    is B (its uniform share); the layer's top H * B scores before the windows, pooled over its heads,
    give head h a count c_h; head h keeps c_h (1 - alpha) + alpha B tokens there, and its window on
    top. The original floors alpha B and rounds each head (torch.round), which leaves the layer's total
    a few tokens off; ours rounds the layer jointly (largest remainder) so every allocator keeps the
    same total: the two agree whenever alpha B is an integer and the per-head rounds add up.
    cfg.adakv_blend = "kvpress" (kvpress AdaKVPress, our earlier version): every head first keeps its top
    alpha * (its uniform share) tokens, and the rest of the layer's budget goes to the pooled top scores.
    Either way a head keeps at least its floor; the layers' totals are as even as integers allow."""
    L, H, T = scores.shape
    total, floor, alpha = kept_total(L * H, ratio, T, cfg), cfg.floor(T), cfg.adakv_alpha
    layer_totals = largest_remainder(np.full(L, total / L), total)  # (L,)
    window = min(cfg.window, T)
    counts = np.zeros((L, H), dtype=np.int64)
    for l in range(L):
        keep = int(layer_totals[l])
        if cfg.adakv_blend == "kvpress":
            base = min(T, max(floor, int(alpha * (keep // H))))
            ordered = torch.sort(scores[l], dim=-1, descending=True).values  # (H, T)
            rest = ordered[:, base:].reshape(-1)  # (H * (T - base),) candidates beyond each head's floor
            n_extra = keep - base * H
            top = torch.topk(rest, n_extra).indices if n_extra > 0 else torch.empty(0, dtype=torch.long)
            counts[l] = base + np.bincount((top // (T - base)).cpu().numpy(), minlength=H)
            continue
        n_pooled = keep - H * window  # H * B: the layer's budget before the windows
        pooled = np.zeros(H)
        if n_pooled > 0 and T > window:
            before = scores[l, :, :T - window].reshape(-1)  # (H * (T - window),)
            top = torch.topk(before, n_pooled).indices
            pooled = np.bincount((top // (T - window)).cpu().numpy(), minlength=H)  # (H,) c_h
        shares = pooled * (1 - alpha) + alpha * max(n_pooled, 0) / H + window  # (H,) sums to keep
        counts[l] = largest_remainder(shares * keep / max(shares.sum(), 1e-30), keep, minimum=np.full(H, floor),
                                      maximum=np.full(H, T))
    return counts


def lukv_counts(ratio, scores, cfg, profile):
    """LU-KV online: the profile's row for this ratio, rescaled to this context's tokens."""
    if profile is None:
        raise ValueError("the lukv allocator needs a profile (python lukv.py --profile)")
    L, H, T = scores.shape
    row = round(100 * ratio) - 1  # kvpress LUKVPress convention
    return counts_from_shares((1 - profile[row]) * T, ratio, T, cfg)


def oracle_counts(ratio, scores, cfg, imp):
    """Per input, solved on this input's own oracle curves: the upper bound of any profile."""
    L, H, T = scores.shape
    curves, floors, n_protected = head_curves(imp, scores, cfg)
    total_keep = round((1 - ratio) * L * H * T)
    evicted = greedy_evictions(curves, floors, L * H * T - max(total_keep, L * H * cfg.floor(T)))
    return T - evicted.reshape(L, H)


# name -> counts (L, H) from (ratio, scores (L, H, T), cfg, profile, oracle importance, seed)
ALLOCATORS = {
    "uniform": lambda r, s, cfg, profile, imp, seed: counts_from_shares(np.ones(s.shape[:2]), r, s.shape[2], cfg),
    "pyramid": lambda r, s, cfg, profile, imp, seed: counts_from_shares(pyramid_shares(*s.shape, r, cfg), r,
                                                                        s.shape[2], cfg),
    "adakv": lambda r, s, cfg, profile, imp, seed: adakv_counts(s, r, cfg),
    "lukv": lambda r, s, cfg, profile, imp, seed: lukv_counts(r, s, cfg, profile),
    # control: LU-KV's budgets given to random heads (does the profile know *which* heads?)
    "shuffled": lambda r, s, cfg, profile, imp, seed: np.random.default_rng(seed).permutation(
        lukv_counts(r, s, cfg, profile).ravel()).reshape(s.shape[:2]),
    "oracle": lambda r, s, cfg, profile, imp, seed: oracle_counts(r, s, cfg, imp),
}


def allocate(name, ratio, scores, cfg, profile=None, imp=None, seed=0):
    """Per-head keep counts (L, H) for one context; every allocator keeps the same total."""
    check_ratio(ratio)
    if name not in ALLOCATORS:
        raise ValueError(f"unknown allocator {name!r}; expected one of {list(ALLOCATORS)}")
    L, H, T = scores.shape
    if ratio == 0:
        return np.full((L, H), T)
    return ALLOCATORS[name](ratio, scores, cfg, profile, imp, seed)


def compress(cache, scores, counts):
    """Keep each head's counts[l, h] best tokens by score, through the cache's eviction entry point.

    counts (L, H), or (B, L, H) for a cache of B rows (one allocator per row: the rows share a
    prefill and are decoded as one batch). Ties go the way the loss curves go (the lower index is
    evicted first). Returns the keep mask, (L, H, T) or (B, L, H, T), so callers can measure
    what was lost.
    """
    L, H, T = scores.shape
    counts = torch.as_tensor(counts, dtype=torch.long)
    batched = counts.dim() == 3
    counts = counts if batched else counts[None]  # (B, L, H)
    if counts.shape != (cache.B, L, H):
        raise ValueError(f"counts must have shape (L={L}, H={H}) or (B={cache.B}, L, H), got {tuple(counts.shape)}")
    if bool((counts > T).any()) or bool((counts < 0).any()):
        raise ValueError(f"keep counts must lie in [0, T={T}], got min {int(counts.min())}, max {int(counts.max())}")
    # ranked where the scores live (a scorer on the GPU leaves them there), in float32 so a bf16 scorer
    # ranks as it would on the CPU; cache.keep moves the slots to the cache's device
    scores, device = scores.float(), scores.device
    order = torch.sort(scores, dim=-1, stable=True).indices  # (L, H, T) ascending = eviction order
    positions = torch.arange(T, device=device)
    rank = torch.empty_like(order).scatter_(-1, order, positions.expand(L, H, T))  # (L, H, T)
    keep = rank >= (T - counts.to(device))[..., None]  # (B, L, H, T)
    slots = torch.where(keep, positions, T)  # kept slots, others pushed past the end
    kept_idx = torch.sort(slots, dim=-1).values[..., :int(counts.max())]  # (B, L, H, K)
    for l in range(L):
        cache.keep(l, kept_idx[:, l], counts[:, l])
    keep = keep.cpu()  # beside the oracle importance (CPU) it is measured against
    return keep if batched else keep[0]


@torch.no_grad()
def answer_with(model, enc, cache, follow_ids, max_new, stop):
    """Greedy answer to follow_ids (the question) through a (compressed) cache, up to its first newline."""
    new, _ = model.generate(torch.tensor([follow_ids], device=cache.device), max_new, cache=cache, stop_token=stop)
    return enc.decode(new[0].tolist()).split("\n")[0]


# -----------------------------------------------------------------------------
# the shipped tiny model, the demo and the command line


def load_tiny(path=DEFAULT_CHECKPOINT):
    """(model, tokenizer, meta) of a checkpoint of this project (model.py's file + tasks.py's tokenizer)."""
    model, header = load_checkpoint(path)
    enc = tasks.load_tokenizer(header["tokenizer_path"], expected_sha256=header["tokenizer_sha256"])
    if enc.n_vocab != model.cfg.vocab_size:
        raise ValueError(f"tokenizer {header['tokenizer_path']} has {enc.n_vocab} tokens, the checkpoint "
                         f"expects {model.cfg.vocab_size}")
    return model, enc, header["meta"]


def profile_path(checkpoint, scorer):
    """Where the profile of a checkpoint and scorer lives: beside the checkpoint."""
    return os.path.join(os.path.dirname(os.path.abspath(checkpoint)), f"profile_{scorer}.npy")


def heatmap(keep_frac, title):
    """A layer x head heatmap of keep fractions drawn with block characters (darker = keeps more)."""
    shades = " ░▒▓█"
    L, H = keep_frac.shape
    lines = [title, "        " + "".join(f"h{h:<3d}" for h in range(H)) + "   keep % per KV head"]
    for l in range(L):
        cells = "".join(shades[min(4, int(f * 5))] * 3 + " " for f in keep_frac[l])
        lines.append(f"layer {l:2d} {cells}  " + " ".join(f"{100 * f:3.0f}" for f in keep_frac[l]))
    lines.append("        scale: ' ' <20%  ░ <40%  ▒ <60%  ▓ <80%  █ >=80%")
    return "\n".join(lines)


@torch.no_grad()
def demo(model, enc, profile, cfg, ratio=0.8, n=8, length=1024, seed=2, log=progress):
    """Exact match per family with the full cache and with each allocator at one ratio (SnapKV
    scores, query-agnostic): one prefill per example, its cache cloned and compressed per allocator."""
    stop = enc.encode_ordinary("\n")[0]
    allocators = ["uniform", "pyramid", "adakv", "lukv"]
    hits = {a: {f: 0 for f in tasks.EVAL_FAMILIES} for a in ["full"] + allocators}
    for i, family in enumerate(tasks.EVAL_FAMILIES):
        for ex in tasks.example_set(family, n, length, seed):
            (q, a), ctx = ex.qa[0], enc.encode_ordinary(ex.context)
            q_ids, max_new = enc.encode_ordinary(q), len(enc.encode_ordinary(a)) + 2
            cache, probe, full_answer, imp = run_full(model, ctx, q_ids, cfg, max_new, stop)
            hits["full"][family] += tasks.exact_match(family, enc.decode(full_answer).split("\n")[0], a)
            scores = scores_for("snapkv", cache, probe, imp, cfg)
            for name in allocators:
                c = cache.clone()
                compress(c, scores, allocate(name, ratio, scores, cfg, profile, imp))
                hits[name][family] += tasks.exact_match(family, answer_with(model, enc, c, q_ids, max_new, stop), a)
        log(i + 1, len(tasks.EVAL_FAMILIES), f"demo: {i + 1}/{len(tasks.EVAL_FAMILIES)} families")
    lines = [f"exact match, {n} examples per family, {length} tokens, {ratio:.0%} compression, SnapKV scores, "
             f"query-agnostic (avg over the families the full cache gets >= 50% right)"]
    keep = [f for f in tasks.EVAL_FAMILIES if hits["full"][f] >= n / 2]
    lines.append(f"{'':9s}" + "".join(f"{f.removeprefix('niah_'):>12s}" for f in tasks.EVAL_FAMILIES) + f"{'avg':>7s}")
    for name, row in hits.items():
        avg = np.mean([row[f] / n for f in keep]) if keep else float("nan")
        lines.append(f"{name:9s}" + "".join(f"{row[f] / n:12.2f}" for f in tasks.EVAL_FAMILIES) + f"{avg:7.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # ---- what to do
    parser.add_argument("--demo", action="store_true", help="heatmap + small evaluation at 80%% (about a minute on a CPU)")
    parser.add_argument("--model", default=None, help="real models live one floor up: python real.py --demo --model "
                        "smollm2 (this file stays on the shipped tiny model)")
    parser.add_argument("--profile", action="store_true", help="rebuild the profiles next to the checkpoint")
    # ---- model and method
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    parser.add_argument("--scorers", "--scorer", default=None, help="comma list (--profile; default: snapkv,keydiff,knorm,expected_attention,oracle)")
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--horizon", type=int, default=16, help="oracle: answer tokens generated after the question")
    parser.add_argument("--snap-window", type=int, default=16, help="SnapKV: the last context positions that observe")
    parser.add_argument("--past-answer", action="store_true",
                        help="--profile: the oracle's future runs the full --horizon steps, past the answer's newline")
    # ---- data
    parser.add_argument("--length", type=int, default=1024, help="context tokens")
    parser.add_argument("--n", type=int, default=8, help="--demo: examples per family")
    parser.add_argument("--seed", type=int, default=2, help="--demo: evaluation seed (calibration uses others)")
    parser.add_argument("--calib-contexts", type=int, default=16)
    parser.add_argument("--calib-questions", type=int, default=8)
    parser.add_argument("--calib-seed", type=int, default=0, help="--profile: calibration seed (calibration-N)")
    parser.add_argument("--calib-correct-only", action="store_true",
                        help="--profile (ours): only the calibration questions the model answers right")
    parser.add_argument("--out-dir", default="runs/profiles", help="--profile: where profile_<scorer>.npy go (the "
                        "shipped ones in checkpoints/ are replaced only when you name it)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.model:  # lukv.py imports no real-model code (hf.py sits above it): say where that demo lives
        parser.error(f"--model {args.model}: real models run from real.py, which reads them with hf.py; "
                     f"run python real.py {'--demo' if args.demo else '--profile'} --model {args.model}")
    if not (args.demo or args.profile):
        parser.print_help()
        sys.exit(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = LUKVConfig(sink=args.sink, window=args.window, horizon=args.horizon, stop_at_answer=not args.past_answer,
                     correct_only=args.calib_correct_only, snap_window=args.snap_window)
    model, enc, meta = load_tiny(args.checkpoint)
    model_id = file_id(args.checkpoint)  # the profiles name the model they belong to
    print(f"model: {os.path.basename(args.checkpoint)} ({model.num_params() / 1e6:.2f}M parameters, "
          f"{model.cfg.n_layer} layers x {model.cfg.n_kv_head} KV heads, id {model_id})")

    if args.profile:
        scorers = args.scorers.split(",") if args.scorers else ["snapkv", "keydiff", "knorm", "expected_attention", "oracle"]
        tables = build_profile(model, enc, scorers, cfg, args.calib_contexts, args.calib_questions, args.length,
                               seed=args.calib_seed)
        for s, table in tables.items():
            meta_p = profile_meta(s, model_id, cfg, horizon=cfg.horizon, stop_at_answer=cfg.stop_at_answer,
                                  normalise_values=cfg.normalise_values, correct_only=cfg.correct_only,
                                  calibration=f"tasks qa, {args.calib_contexts} contexts x {args.calib_questions} "
                                              f"questions, {args.length} tokens, seed calibration-{args.calib_seed}")
            os.makedirs(args.out_dir, exist_ok=True)
            path = os.path.join(args.out_dir, f"profile_{s}.npy")
            save_profile(path, table, meta_p)
            print(f"wrote {path} and its .json sidecar")

    if args.demo:
        t0 = time.time()
        shape = (model.cfg.n_layer, model.cfg.n_kv_head)
        profile, _ = load_profile(profile_path(args.checkpoint, "snapkv"), "snapkv", model_id, shape, cfg)
        print(heatmap(1 - profile[79], "LU-KV budgets at 80% compression (SnapKV scorer): share of the context "
                                       "each head keeps"))
        print(demo(model, enc, profile, cfg, 0.8, args.n, args.length, args.seed))
        print(f"demo took {time.time() - t0:.0f} s")
