"""
LU-KV, read top to bottom: how many cached tokens each (layer, KV head) keeps.

Tang et al., "Predicting Future Utility: Global Combinatorial Optimization for Task-Agnostic
KV Cache Eviction" (arXiv 2602.08585, ICML 2026). A heuristic scorer ranks tokens inside a head;
LU-KV picks per-head budgets so that the long-horizon utility lost is smallest over the model:

  1. scorers            rank the tokens inside each head (SnapKV, KeyDiff) -> SCORERS
  2. oracle importance  I[l, h, j] = max over future steps k, query heads q of KV head h of
                        || A[k, j] * v_j @ W_O[q] ||                       -> run_full
  3. loss curves        evict in the scorer's order, cumulative I lost     -> loss_curve
  4. convex hull        the lower convex hull (= PAVA on the increments)   -> lower_convex_hull
  5. greedy solver      one global min-heap over hull slopes, one sweep    -> greedy_budget_table
                        gives nested budgets for every ratio 1..99%:
                        a table [99, n_layer, n_kv_head] (kvpress LUKVPress layout)
  6. offline profiling  average the table over calibration contexts        -> build_profile
  7. online             look up the ratio, largest-remainder rounding,    -> allocate, compress
                        keep each head's top tokens by the scorer

    python lukv.py --demo              # heatmap + a small evaluation at 80%, about a minute on a CPU
    python lukv.py --profile           # rebuild the shipped profiles (checkpoints/profile_*.npy)

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
    snap_kernel: int = 5  # SnapKV: max-pool width over tokens
    horizon: int = 16  # oracle: answer tokens the model generates after the question
    stop_at_answer: bool = True  # oracle: the future ends at the answer's newline (False: always horizon steps)
    correct_only: bool = False  # profiling: keep only the calibration questions the model answers right
    normalise_values: bool = True  # oracle: divide ||v W_O|| by its sum over the layer (official code)

    def floor(self, T):
        """Tokens every head keeps at least: sink + window + the minimum share."""
        return min(T, self.sink + self.window + math.ceil(self.min_share * T))


def progress(done, total, text):
    """A progress line: redrawn in place on a terminal; every 10% and at the end in a log file."""
    if sys.stdout.isatty():
        print(f"\r{text}", end="\n" if done == total else "", flush=True)
    elif done == total or done % max(1, total // 10) == 0:
        print(text, flush=True)


# -----------------------------------------------------------------------------
# 1. intra-head scorers: (L, H, T), higher = more worth keeping. LU-KV does not change these.


def snapkv_scores(probe, cfg):
    """SnapKV: attention the last positions pay to each token, summed, GQA group mean, max-pooled."""
    layers = []
    for l in sorted(probe.prefill_attn):
        a = probe.prefill_attn[l][0]  # (H, G, w, T)
        s = a.sum(dim=2).mean(dim=1)  # (H, T)
        s = torch.nn.functional.max_pool1d(s[:, None], cfg.snap_kernel, stride=1, padding=cfg.snap_kernel // 2)[:, 0]
        layers.append(s)
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
    imp = torch.zeros(vnorm.shape[0], vnorm.shape[1], T)
    for step in decode_attn:
        a = torch.stack([step[l][0, :, :, :T] for l in range(L)])  # (L, H, G, T)
        imp = torch.maximum(imp, (a * vnorm[..., :T]).amax(dim=2))
    return imp


@torch.no_grad()
def run_full(model, ctx_ids, q_ids, cfg, max_answer, stop_token):
    """Prefill the context once with every probe, then answer with the full cache.

    Returns the prefilled cache (to compress many ways), the probe of the prefill (scorer
    inputs), the full-cache answer tokens, and the oracle importance (L, H, T) over the
    question plus the model's own answer (the future steps of the query-agnostic setting).
    """
    T = len(ctx_ids)
    if T == 0:
        raise ValueError("empty context: there is nothing to compress")
    w = min(cfg.snap_window, T)
    probe = Probe(query_pos=torch.arange(T - w, T), keep_values=True)
    cache = model.new_cache(1)
    model(torch.tensor([ctx_ids]), cache=cache, probe=probe)
    future = Probe(decode=True)
    answer, _ = model.generate(torch.tensor([q_ids]), max_answer, cache=cache.clone(), stop_token=stop_token,
                               probe=future)
    vnorm = value_out_norms(model, probe.values, cfg.normalise_values)
    return cache, probe, answer[0].tolist(), oracle_from_steps(future.decode_attn, vnorm, T)


SCORERS = ["snapkv", "keydiff", "knorm", "streaming", "oracle"]


def scores_for(name, cache, probe, imp, cfg):
    """Every scorer by name; 'oracle' ranks by the oracle importance itself (an upper bound)."""
    L, H, T = imp.shape
    raw = {"snapkv": lambda: snapkv_scores(probe, cfg), "keydiff": lambda: keydiff_scores(cache),
           "knorm": lambda: knorm_scores(cache), "streaming": lambda: streaming_scores(L, H, T),
           "oracle": lambda: imp.clone()}
    if name not in raw:
        raise ValueError(f"unknown scorer {name!r}; expected one of {list(raw)}")
    s = raw[name]()
    if not torch.isfinite(s).all():
        raise ValueError(f"scorer {name} produced NaN or infinite scores")
    return protect(s, cfg)


# -----------------------------------------------------------------------------
# 3-4. one head's loss curve and its convex relaxation


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


def lower_convex_hull(curve):
    """Lower convex hull of the points (i, curve[i]), evaluated at every integer i.

    Returns hull (n+1,) and slopes (n,), where slopes[i] is the slope of the hull segment that
    contains the step i -> i+1. Every step of a segment gets the segment's exact slope
    (y_end - y_start) / (x_end - x_start), so equal slopes mean the same segment and the
    slopes strictly increase from one segment to the next."""
    curve = np.asarray(curve, float)
    n = len(curve) - 1

    def slope(a, b):
        return (curve[b] - curve[a]) / (b - a)

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


# -----------------------------------------------------------------------------
# 5. the global greedy over all heads


def _check_curves(curves, floors):
    """Validate curves and floors; return floors as an int array and each head's reachable curve."""
    floors = np.asarray(floors)
    if floors.shape != (len(curves),):
        raise ValueError(f"expected one floor per head, shape ({len(curves)},), got {floors.shape}")
    if not np.issubdtype(floors.dtype, np.integer):
        raise ValueError(f"expected integer floors (tokens each head keeps), got dtype {floors.dtype}")
    reachable = []
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
        # the floor caps evictions at T - floor; the hull is taken over that reachable part so
        # that a head stopped by its floor always stops on a hull vertex
        reachable.append(curve[: len(curve) - floor])
    return floors.astype(np.int64), reachable


def _check_total(total_evict, reachable):
    limit = sum(len(c) - 1 for c in reachable)
    if not 0 <= total_evict <= limit:
        raise ValueError(f"expected 0 <= total_evict <= {limit} (the tokens the floors allow to "
                         f"evict, sum of T_h - floor_h), got {total_evict}")


def _greedy_order(reachable):
    """Head index of every eviction, in the order the greedy makes them: (sum of T_h - floor_h,)."""
    slopes = [lower_convex_hull(c)[1] for c in reachable]
    evicted = np.zeros(len(reachable), dtype=np.int64)

    def key(h):
        e = evicted[h]
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
        evicted[h] += 1
        order.append(h)
        if evicted[h] < len(slopes[h]):
            heapq.heappush(heap, key(h))
    return np.array(order, dtype=np.int64)


def greedy_evictions(curves, floors, total_evict):
    """Tokens evicted per head, (H,), when total_evict evictions go one at a time to the lowest hull slope."""
    floors, reachable = _check_curves(curves, floors)
    _check_total(total_evict, reachable)
    order = _greedy_order(reachable)
    return np.bincount(order[:total_evict], minlength=len(curves))  # (H,)


def greedy_budget_table(curves, floors, n_ratios=99, n_protected_total=0):
    """The paper's one-pass sweep: evicted (n_ratios, H), row r-1 = per-head evictions at ratio r/(n_ratios+1).

    curves are the heads' curves over evictable tokens only. The ratio counts over all tokens,
    N = sum(T_h) + n_protected_total (pass the protected sink + window count to match the
    paper), and row r-1 evicts round_half_up(r / (n_ratios+1) * N) tokens in total. Once every
    token above the floors is gone, the remaining rows repeat that last state."""
    floors, reachable = _check_curves(curves, floors)
    if n_ratios < 1 or n_protected_total < 0:
        raise ValueError(f"expected n_ratios >= 1 and n_protected_total >= 0, "
                         f"got {n_ratios} and {n_protected_total}")
    order = _greedy_order(reachable)
    n_tokens = sum(len(c) - 1 for c in curves) + n_protected_total
    denominator = n_ratios + 1
    evicted = np.zeros((n_ratios, len(curves)), dtype=np.int64)  # (R, H)
    counts, done = np.zeros(len(curves), dtype=np.int64), 0
    for r in range(1, n_ratios + 1):
        # integer round-half-up of r / denominator * n_tokens, no float ties to worry about
        target = min((2 * r * n_tokens + denominator) // (2 * denominator), len(order))
        counts += np.bincount(order[done:target], minlength=len(curves))
        evicted[r - 1], done = counts, target
    return evicted


# -----------------------------------------------------------------------------
# the exact reference and the losses


def dp_exact(curves, floors, total_evict):
    """Exact minimum of sum_h curve_h[e_h] with sum e_h = total_evict, e_h <= T_h - floor_h.

    Knapsack over heads on the true (non-convex) curves, O(H * total * T). Small instances only:
    it is the reader's reference for the greedy. Returns (min_loss, evictions (H,)); among equal
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
    evictions, remaining = np.zeros(len(curves), dtype=np.int64), total_evict
    for h in reversed(range(len(curves))):
        evictions[h] = choices[h][remaining]
        remaining -= evictions[h]
    return float(best[total_evict]), evictions


def true_loss(curves, evictions):
    """Sum over heads of curve_h[e_h]: the utility actually lost."""
    return float(sum(np.asarray(c, float)[e] for c, e in zip(curves, evictions)))


def relaxed_loss(curves, evictions, floors=None):
    """Sum over heads of hull_h[e_h], with the hull of the floor-reachable part (as the greedy uses)."""
    floors = np.zeros(len(curves), dtype=np.int64) if floors is None else floors
    _, reachable = _check_curves(curves, floors)
    return float(sum(lower_convex_hull(c)[0][e] for c, e in zip(reachable, evictions)))


# -----------------------------------------------------------------------------
# integer budgets from a ratio row


def largest_remainder(shares, total, minimum=None, maximum=None):
    """Round non-negative shares (H,) summing to total into int counts (H,) summing exactly to total.

    Every head gets floor(share), then the leftover units go to the largest fractional parts,
    ties to the lower index; so |count - share| < 1. Bounds come after: counts are clipped to
    [minimum, maximum] and the sum is repaired one unit at a time, taking from (giving to) the
    head furthest above (below) its share that still may move, ties to the lower index. A head
    pinned by a bound may then sit a unit or more from its share; that is the price of the bound."""
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

    counts = np.floor(shares).astype(np.int64)
    leftover = int(total - counts.sum())  # in [0, H] when shares sum to total
    by_remainder = np.lexsort((np.arange(len(shares)), -(shares - counts)))  # largest first
    counts[by_remainder[: max(leftover, 0)]] += 1
    counts = np.clip(counts, minimum, maximum)
    while counts.sum() != total:
        if counts.sum() < total:
            excess = np.where(counts < maximum, shares - counts, -np.inf)
        else:
            excess = np.where(counts > minimum, counts - shares, -np.inf)
        counts[np.argmax(excess)] += 1 if counts.sum() < total else -1  # argmax: first of ties
    return counts


# -----------------------------------------------------------------------------
# 6. one context's budget table, and offline profiling over calibration contexts

RATIOS = np.arange(1, 100) / 100  # row r-1 of a table is global compression r% (kvpress LUKVPress)


def head_curves(imp, scores, cfg):
    """Loss curves (evictable tokens only) and greedy floors of every head, in (l, h) order."""
    L, H, T = imp.shape
    lo, hi = cfg.sink, max(cfg.sink, T - cfg.window)  # tokens [lo, hi) may be evicted
    floor = max(0, cfg.floor(T) - (T - (hi - lo)))  # evictable tokens each head keeps
    curves = [loss_curve(scores[l, h, lo:hi].numpy(), imp[l, h, lo:hi].numpy()) for l in range(L) for h in range(H)]
    floors = np.full(L * H, min(floor, hi - lo), dtype=np.int64)
    return curves, floors, T - (hi - lo)


def context_table(imp, scores, cfg):
    """The paper's sweep on one context: prune ratio of every head at ratios 1..99%, (99, L, H)."""
    L, H, T = imp.shape
    curves, floors, n_protected = head_curves(imp, scores, cfg)
    evicted = greedy_budget_table(curves, floors, len(RATIOS), n_protected_total=L * H * n_protected)  # (99, L*H)
    return evicted.reshape(len(RATIOS), L, H) / T


@torch.no_grad()
def build_profile(model, enc, scorers, cfg, n_contexts=16, n_questions=8, length=1024, seed=0, log=progress):
    """Average the per-(context, question) tables over calibration prose with questions (tasks 'qa').

    As in the paper: the scorer sees the context without the question; the oracle's future is
    the question plus the model's own answer. Calibration seeds never meet evaluation seeds.
    cfg.correct_only (ours) drops the questions the model answers wrong: their futures attend to
    the wrong facts. Returns {scorer: (99, L, H) mean prune ratios}.
    """
    rng = random.Random(f"calibration-{seed}")
    # the answers are short: with the stop token the future is the question plus the answer, and a
    # longer horizon changes nothing; without it the model continues for exactly `horizon` steps
    stop = enc.encode_ordinary("\n")[0] if cfg.stop_at_answer else None
    tables, t0 = {s: [] for s in scorers}, time.time()
    for i in range(n_contexts):
        ex = tasks.make_example("qa", rng, length, n_questions)
        ctx_ids = enc.encode_ordinary(ex.context)
        for q, a in ex.qa:
            cache, probe, answer, imp = run_full(model, ctx_ids, enc.encode_ordinary(q), cfg, cfg.horizon, stop)
            if cfg.correct_only and not tasks.exact_match("qa", enc.decode(answer).split("\n")[0], a):
                continue
            for s in scorers:
                tables[s].append(context_table(imp, scores_for(s, cache, probe, imp, cfg), cfg))
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
            "snap_window": cfg.snap_window, "snap_kernel": cfg.snap_kernel,
            "layout": "[99, n_layer, n_kv_head] prune ratios; row round(100 * ratio) - 1 (kvpress LUKVPress)",
            **extra}


def sidecar(path):
    return path[: -len(".npy")] + ".json"


def save_profile(path, table, meta):
    """Write the table as float32 .npy and its metadata beside it; each file atomically."""
    if not path.endswith(".npy"):
        raise ValueError(f"a profile is a .npy file (what kvpress's LUKVPress reads), got {path!r}")
    table = np.asarray(table, dtype=np.float32)
    if table.ndim != 3 or table.shape[0] != len(RATIOS):
        raise ValueError(f"expected a table of shape (99, n_layer, n_kv_head), got {table.shape}")
    for target, write in ((path, lambda f: np.save(f, table)),
                          (sidecar(path), lambda f: f.write(json.dumps(meta, indent=1).encode()))):
        with open(target + ".tmp", "wb") as f:  # a file object: np.save would append .npy to a name
            write(f)
        os.replace(target + ".tmp", target)  # an interrupted write never leaves half a file behind


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
        if meta.get(key) != want[key]:
            raise ValueError(f"profile {path} was made for {key} {meta.get(key)!r}, not {want[key]!r}; pass the "
                             f"matching option or rebuild it with --profile --scorer {scorer}")
    if table.shape != (len(RATIOS), *shape):
        raise ValueError(f"profile {path} has shape {table.shape}, expected (99, {shape[0]}, {shape[1]})")
    if scorer == "snapkv" and meta.get("snap_window") != cfg.snap_window:
        raise ValueError(f"profile {path} was made with SnapKV window {meta.get('snap_window')}, not "
                         f"{cfg.snap_window}; pass --snap-window {meta.get('snap_window')} or rebuild it "
                         f"with --profile --snap-window {cfg.snap_window}")
    return table, meta


# -----------------------------------------------------------------------------
# 7. online: ratio -> per-head keep counts, by each allocator; then compress


def check_ratio(ratio):
    if not (isinstance(ratio, (int, float)) and 0 <= ratio < 1):
        raise ValueError(f"compression ratio must lie in [0, 1) (0.8 = evict 80%), got {ratio!r}")


def counts_from_shares(shares, ratio, T, cfg):
    """Scale per-head shares (L, H) to keep round((1 - ratio) * L * H * T) tokens exactly."""
    L, H = shares.shape
    total = round((1 - ratio) * L * H * T)
    floor = cfg.floor(T)
    if total < L * H * floor:
        raise ValueError(f"ratio {ratio} keeps {total} tokens, below the floor of {floor} per head x {L * H} "
                         f"heads (sink {cfg.sink} + window {cfg.window} + {cfg.min_share:.0%}); lower the ratio")
    shares = np.asarray(shares, float) * total / max(float(np.sum(shares)), 1e-30)
    counts = largest_remainder(shares.ravel(), total, minimum=np.full(L * H, floor), maximum=np.full(L * H, T))
    return counts.reshape(L, H)


def pyramid_shares(L, H, T, ratio, beta=20):
    """PyramidKV: budgets fall linearly from the first layer to the last (beta sets the slope)."""
    k_avg = (1 - ratio) * T
    k_min = k_avg / beta
    k_max = 2 * k_avg - k_min
    per_layer = k_max - (k_max - k_min) * np.arange(L) / max(1, L - 1)  # (L,)
    return np.repeat(per_layer[:, None], H, axis=1)


def adakv_counts(scores, ratio, cfg, alpha=0.2):
    """AdaKV: each layer keeps (1 - ratio) * H * T tokens, each head a floor of alpha of the
    uniform share, and the rest goes to the layer's highest scores pooled across its heads."""
    L, H, T = scores.shape
    per_head = round((1 - ratio) * T)
    base = min(T, max(cfg.floor(T), int(alpha * per_head)))
    counts = np.zeros((L, H), dtype=np.int64)
    for l in range(L):
        ordered = torch.sort(scores[l], dim=-1, descending=True).values  # (H, T)
        rest = ordered[:, base:].reshape(-1)  # candidates beyond each head's floor
        n_extra = per_head * H - base * H
        top = torch.topk(rest, n_extra).indices if n_extra > 0 else torch.empty(0, dtype=torch.long)
        counts[l] = base + np.bincount((top // (T - base)).numpy(), minlength=H)
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
    "pyramid": lambda r, s, cfg, profile, imp, seed: counts_from_shares(pyramid_shares(*s.shape, r), r, s.shape[2], cfg),
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

    Ties go the way the loss curves go (the lower index is evicted first). Returns the keep
    mask (L, H, T) so callers can measure what was lost.
    """
    L, H, T = scores.shape
    counts = torch.as_tensor(counts, dtype=torch.long)
    if bool((counts > T).any()) or bool((counts < 0).any()):
        raise ValueError(f"keep counts must lie in [0, T={T}], got min {int(counts.min())}, max {int(counts.max())}")
    order = torch.sort(scores, dim=-1, stable=True).indices  # (L, H, T) ascending = eviction order
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(T).expand(L, H, T))  # (L, H, T)
    keep = rank >= (T - counts)[..., None]  # (L, H, T)
    slots = torch.where(keep, torch.arange(T), T)  # kept slots, others pushed past the end
    kept_idx = torch.sort(slots, dim=-1).values[..., :int(counts.max())]  # (L, H, K)
    for l in range(L):
        cache.keep(l, kept_idx[l][None], counts[l][None])
    return keep


@torch.no_grad()
def answer_with(model, enc, cache, follow_ids, max_new, stop):
    """Greedy answer to follow_ids (the question) through a (compressed) cache, up to its first newline."""
    new, _ = model.generate(torch.tensor([follow_ids]), max_new, cache=cache, stop_token=stop)
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
    lines.append(f"        scale: ' ' <20%  ░ <40%  ▒ <60%  ▓ <80%  █ >=80%")
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
    lines.append(f"{'':9s}" + "".join(f"{f.removeprefix('niah_'):>10s}" for f in tasks.EVAL_FAMILIES) + f"{'avg':>7s}")
    for name, row in hits.items():
        avg = np.mean([row[f] / n for f in keep]) if keep else float("nan")
        lines.append(f"{name:9s}" + "".join(f"{row[f] / n:10.2f}" for f in tasks.EVAL_FAMILIES) + f"{avg:7.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # ---- what to do
    parser.add_argument("--demo", action="store_true", help="heatmap + small evaluation at 80%% (about a minute on a CPU)")
    parser.add_argument("--profile", action="store_true", help="rebuild the profiles next to the checkpoint")
    # ---- model and method
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    parser.add_argument("--scorers", "--scorer", default=None, help="comma list (--profile; default: snapkv,keydiff,knorm,oracle)")
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
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
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
        scorers = args.scorers.split(",") if args.scorers else ["snapkv", "keydiff", "knorm", "oracle"]
        tables = build_profile(model, enc, scorers, cfg, args.calib_contexts, args.calib_questions, args.length,
                               seed=args.calib_seed)
        for s, table in tables.items():
            meta_p = profile_meta(s, model_id, cfg, horizon=cfg.horizon, stop_at_answer=cfg.stop_at_answer,
                                  normalise_values=cfg.normalise_values, correct_only=cfg.correct_only,
                                  calibration=f"tasks qa, {args.calib_contexts} contexts x {args.calib_questions} "
                                              f"questions, {args.length} tokens, seed calibration-{args.calib_seed}")
            save_profile(profile_path(args.checkpoint, s), table, meta_p)
            print(f"wrote {profile_path(args.checkpoint, s)} and its .json sidecar")

    if args.demo:
        t0 = time.time()
        shape = (model.cfg.n_layer, model.cfg.n_kv_head)
        profile, _ = load_profile(profile_path(args.checkpoint, "snapkv"), "snapkv", model_id, shape, cfg)
        print(heatmap(1 - profile[79], "LU-KV budgets at 80% compression (SnapKV scorer): share of the context "
                                       "each head keeps"))
        print(demo(model, enc, profile, cfg, 0.8, args.n, args.length, args.seed))
        print(f"demo took {time.time() - t0:.0f} s")
